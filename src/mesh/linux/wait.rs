//! Blocking waits for the data-plane threads: `poll` on one descriptor and an eventfd that
//! shutdown makes readable for good, so a thread asleep in the kernel can always be told to
//! stop.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

pub struct Waiter {
    stop: OwnedFd,
}

impl Waiter {
    pub fn new() -> io::Result<Waiter> {
        // SAFETY: eventfd takes no pointers; a non-negative result is a new descriptor we own.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nobody else.
        Ok(Waiter {
            stop: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Block until `fd` is readable (Ok) or [`Waiter::wake`] was called (`Interrupted`).
    pub fn readable(&self, fd: RawFd) -> io::Result<()> {
        let mut fds = [
            libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        loop {
            // SAFETY: `fds` is a live array of two pollfd for the duration of the call.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue; // a signal, not a wake-up
                }
                return Err(e);
            }
            if fds[1].revents != 0 {
                return Err(io::ErrorKind::Interrupted.into());
            }
            if fds[0].revents & (libc::POLLERR | libc::POLLNVAL) != 0
                && fds[0].revents & libc::POLLIN == 0
            {
                return Err(io::Error::other("descriptor failed while waiting"));
            }
            return Ok(());
        }
    }

    /// Wake every waiter, now and later (the count is never read back).
    pub fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our eventfd.
        unsafe {
            libc::write(
                self.stop.as_raw_fd(),
                &one as *const u64 as *const libc::c_void,
                8,
            );
        }
    }
}

/// Wait until `fd` is writable, at most `ms` milliseconds: a full send queue is waited out
/// briefly (backpressure) before a datagram is given up.
pub fn writable(fd: RawFd, ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one live pollfd for the duration of the call.
    unsafe { libc::poll(&mut p, 1, ms) > 0 && p.revents & libc::POLLOUT != 0 }
}
