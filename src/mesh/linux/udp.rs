//! The mesh UDP socket: dual-stack where IPv6 exists, buffers sized for bursts, UDP GSO for
//! sending runs of equal datagrams and UDP GRO for receiving them.

use super::wait::{writable, Waiter};
use super::NetError;
use crate::constants::UDP_SOCKET_BUFFER;
use crate::mesh::io::UdpIo;
use socket2::{Domain, Protocol, Socket, Type};
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd};
use tracing::{debug, info};

/// The mesh UDP socket: dual-stack where IPv6 exists, with buffers sized for bursts, and UDP
/// GSO (one `sendmsg` for a run of equal-sized datagrams) where the kernel offers it. Read by
/// the data plane's receive thread (blocking in `poll`), written from any thread without
/// waiting; the async runtime only reads it for the join exchange, before the data plane runs.
pub struct LinuxUdp {
    sock: std::net::UdpSocket,
    v6: bool,
    local: SocketAddr,
    gso: std::sync::atomic::AtomicBool,
    waiter: Waiter,
}

// linux/udp.h (not in libc's glibc bindings).
const SOL_UDP: libc::c_int = 17;
const UDP_SEGMENT: libc::c_int = 103;
const UDP_GRO: libc::c_int = 104;

/// One `recvmsg`: `(bytes, from, segment size)`; with UDP GRO the buffer may hold several
/// datagrams of `segment` bytes from the same sender.
fn recvmsg_gro(fd: std::os::fd::RawFd, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, usize)> {
    // SAFETY: every pointer in the msghdr refers to a live local for the duration of the call;
    // control messages are read only within msg_controllen as returned by the kernel.
    unsafe {
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        };
        let mut name: libc::sockaddr_storage = std::mem::zeroed();
        let mut control = [0u64; 8];
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_name = &mut name as *mut _ as *mut libc::c_void;
        msg.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as u32;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = std::mem::size_of_val(&control) as _;
        let n = libc::recvmsg(fd, &mut msg, libc::MSG_DONTWAIT);
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        let mut segment = n;
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == SOL_UDP && (*c).cmsg_type == UDP_GRO {
                let s = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const libc::c_int);
                if s > 0 {
                    segment = s as usize;
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
        let from = socket2::SockAddr::new(name, msg.msg_namelen)
            .as_socket()
            .ok_or_else(|| io::Error::other("datagram from a non-IP address"))?;
        Ok((n, unmap(from), segment))
    }
}

/// One `sendmsg` of `buf` cut by the kernel into `segment`-byte datagrams.
fn sendmsg_gso(
    fd: std::os::fd::RawFd,
    buf: &[u8],
    segment: u16,
    to: &socket2::SockAddr,
) -> io::Result<usize> {
    // SAFETY: every pointer in the msghdr refers to a live local for the duration of the call;
    // the control buffer is large and aligned enough for one cmsghdr carrying a u16.
    unsafe {
        let mut iov = libc::iovec {
            iov_base: buf.as_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        };
        let space = libc::CMSG_SPACE(std::mem::size_of::<u16>() as u32) as usize;
        let mut control = [0u64; 8];
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_name = to.as_ptr() as *mut libc::c_void;
        msg.msg_namelen = to.len();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = space as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = SOL_UDP;
        (*cmsg).cmsg_type = UDP_SEGMENT;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<u16>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg) as *mut u16, segment);
        let n = libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT);
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

impl LinuxUdp {
    pub fn bind(port: u16) -> Result<LinuxUdp, NetError> {
        let (sock, v6) = match bind_socket(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)), true) {
            Ok(s) => (s, true),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => return Err(port_in_use(port, e)),
            Err(e) => {
                debug!(error = %e, "no IPv6 socket; using IPv4 only");
                let s = bind_socket(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)), false)
                    .map_err(|e| {
                        if e.kind() == io::ErrorKind::AddrInUse {
                            port_in_use(port, e)
                        } else {
                            NetError::Bind { port, error: e }
                        }
                    })?;
                (s, false)
            }
        };
        let local = sock
            .local_addr()
            .map_err(|e| NetError::io(format!("reading the address of UDP port {port}"), e))?;
        let waiter = Waiter::new().map_err(|e| NetError::io("creating an eventfd", e))?;
        Ok(LinuxUdp {
            sock,
            v6,
            local,
            gso: std::sync::atomic::AtomicBool::new(true),
            waiter,
        })
    }
}

fn port_in_use(port: u16, error: io::Error) -> NetError {
    NetError::PortInUse { port, error }
}

fn bind_socket(addr: SocketAddr, v6: bool) -> io::Result<std::net::UdpSocket> {
    let domain = if v6 { Domain::IPV6 } else { Domain::IPV4 };
    let s = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
    if v6 {
        s.set_only_v6(false)?;
    }
    size_buffers(&s);
    // Let the kernel coalesce runs of datagrams (UDP GRO); optional.
    let one: libc::c_int = 1;
    // SAFETY: setsockopt with a pointer to a live c_int of the right size.
    let _ = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            SOL_UDP,
            UDP_GRO,
            &one as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    Ok(s.into())
}

/// Ask for large buffers; as root, force past `net.core.[rw]mem_max`.
fn size_buffers(s: &Socket) {
    let size = UDP_SOCKET_BUFFER as libc::c_int;
    for (force, plain, what) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF, "receive"),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF, "send"),
    ] {
        // SAFETY: setsockopt with a pointer to a live c_int of the right size.
        let forced = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                force,
                &size as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        } == 0;
        if !forced {
            // SAFETY: as above.
            unsafe {
                libc::setsockopt(
                    s.as_raw_fd(),
                    libc::SOL_SOCKET,
                    plain,
                    &size as *const _ as *const libc::c_void,
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
        }
        let got = if what == "receive" {
            s.recv_buffer_size()
        } else {
            s.send_buffer_size()
        };
        if let Ok(got) = got {
            if got < UDP_SOCKET_BUFFER {
                info!(
                    wanted = UDP_SOCKET_BUFFER,
                    got,
                    "UDP {what} buffer is smaller than wanted; raise net.core.{}mem_max",
                    if what == "receive" { "r" } else { "w" }
                );
            }
        }
    }
}

/// v4-mapped IPv6 addresses from a dual-stack socket, shown and compared as IPv4.
pub fn unmap(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::from((v4, v6.port())),
            None => a,
        },
        v4 => v4,
    }
}

impl LinuxUdp {
    /// IPv4 destinations on a dual-stack socket are written v4-mapped.
    fn map(&self, to: SocketAddr) -> SocketAddr {
        match (self.v6, to) {
            (true, SocketAddr::V4(v4)) => SocketAddr::from((v4.ip().to_ipv6_mapped(), v4.port())),
            _ => to,
        }
    }
}

impl LinuxUdp {
    /// One datagram without waiting; a full send queue is waited out for a moment first, on
    /// the data plane's own threads only (see [`may_wait`]).
    fn send_one(&self, datagram: &[u8], to: &socket2::SockAddr) -> io::Result<()> {
        let fd = self.sock.as_raw_fd();
        for _ in 0..2 {
            // SAFETY: `datagram` and `to` are live for the duration of the call.
            let n = unsafe {
                libc::sendto(
                    fd,
                    datagram.as_ptr() as *const libc::c_void,
                    datagram.len(),
                    libc::MSG_DONTWAIT,
                    to.as_ptr(),
                    to.len(),
                )
            };
            if n >= 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            // Which thread this is only matters once the buffer is full (not per datagram).
            if e.kind() != io::ErrorKind::WouldBlock || !may_wait() || !writable(fd, SEND_WAIT_MS) {
                return Err(e);
            }
        }
        Err(io::ErrorKind::WouldBlock.into())
    }
}

/// How long a send waits for room in a full socket buffer before the datagram is dropped.
const SEND_WAIT_MS: i32 = 5;

/// Whether a send may wait for room in the socket buffer: not on the async runtime's threads
/// (the timers' handshakes and keepalives, peer changes), where waiting would stall DNS, gossip
/// and the control API behind a saturated uplink; a datagram dropped there is sent again by
/// the timers. The data plane's threads wait, which paces them to the link.
fn may_wait() -> bool {
    tokio::runtime::Handle::try_current().is_err()
}

impl UdpIo for LinuxUdp {
    fn local_addr(&self) -> SocketAddr {
        self.local
    }

    fn wait_readable(&self) -> io::Result<()> {
        self.waiter.readable(self.sock.as_raw_fd())
    }

    fn try_recv_gro(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, usize)> {
        recvmsg_gro(self.sock.as_raw_fd(), buf)
    }

    fn send_to(&self, datagram: &[u8], to: SocketAddr) -> io::Result<()> {
        self.send_one(datagram, &socket2::SockAddr::from(self.map(to)))
    }

    fn send_gso(&self, buf: &[u8], segment: usize, to: SocketAddr) -> io::Result<()> {
        use std::sync::atomic::Ordering::Relaxed;
        let addr = socket2::SockAddr::from(self.map(to));
        if buf.len() > segment
            && segment > 0
            && segment <= u16::MAX as usize
            && self.gso.load(Relaxed)
        {
            let fd = self.sock.as_raw_fd();
            let mut r = sendmsg_gso(fd, buf, segment as u16, &addr);
            if matches!(&r, Err(e) if e.kind() == io::ErrorKind::WouldBlock)
                && may_wait()
                && writable(fd, SEND_WAIT_MS)
            {
                r = sendmsg_gso(fd, buf, segment as u16, &addr);
            }
            match r {
                Ok(_) => return Ok(()),
                // The kernel or the device cannot segment at all: one by one from now on.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EIO) | Some(libc::EOPNOTSUPP)) => {
                    info!(error = %e, "UDP GSO unavailable; sending datagrams one by one");
                    self.gso.store(false, Relaxed);
                }
                // This send only: a segment too big for the route's MTU (a relayed run going on
                // over IPv6, say) or more segments than the kernel takes at once.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    debug!(error = %e, segment, bytes = buf.len(), "GSO send refused; one by one");
                }
                Err(e) => return Err(e),
            }
        }
        for d in buf.chunks(segment.max(1)) {
            self.send_one(d, &addr)?;
        }
        Ok(())
    }

    fn wake(&self) {
        self.waiter.wake()
    }

    async fn recv_gro_async(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, usize)> {
        // Registered with the runtime only while waiting: the data plane's thread owns the
        // socket's reads the rest of the time, and a registration would wake the runtime for
        // every datagram it gets.
        let fd = self.sock.as_raw_fd();
        // SAFETY: F_DUPFD_CLOEXEC takes no pointers; a non-negative result is a new descriptor.
        let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `dup` was just created and is owned by nobody else.
        let dup = unsafe { std::os::fd::OwnedFd::from_raw_fd(dup) };
        let sock = tokio::net::UdpSocket::from_std(std::net::UdpSocket::from(dup))?;
        sock.async_io(tokio::io::Interest::READABLE, || recvmsg_gro(fd, buf))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sends wait for room in a full socket buffer on the data plane's threads, never on the
    /// async runtime's.
    #[test]
    fn only_threads_off_the_runtime_wait_for_a_full_socket() {
        assert!(may_wait(), "a plain thread (the data plane's)");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .unwrap();
        assert!(!rt.block_on(async { may_wait() }), "the runtime's thread");
        let worker = rt.block_on(async { tokio::spawn(async { may_wait() }).await.unwrap() });
        assert!(!worker, "a runtime worker");
        let blocking = rt.block_on(async { tokio::task::spawn_blocking(may_wait).await.unwrap() });
        assert!(!blocking, "a blocking task belongs to the runtime too");
        assert!(
            std::thread::spawn(may_wait).join().unwrap(),
            "a thread of its own"
        );
    }

    /// A GSO send the kernel refuses for its own sake (here: more segments than it takes at
    /// once) still delivers every datagram, in order, and leaves GSO on for the next send.
    #[test]
    fn a_refused_gso_send_goes_one_by_one_and_keeps_gso() {
        let udp = LinuxUdp::bind(0).unwrap();
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let to = rx.local_addr().unwrap();
        let check = |count: usize| {
            let buf: Vec<u8> = (0..count).flat_map(|i| [i as u8; 10]).collect();
            udp.send_gso(&buf, 10, to).unwrap();
            let mut got = [0u8; 64];
            for i in 0..count {
                let n = rx.recv(&mut got).expect("every datagram arrives");
                assert_eq!(&got[..n], &[i as u8; 10], "datagram {i} in order");
            }
        };
        // 200 segments: over the kernel's limit (64, 128 on newer kernels): EINVAL.
        check(200);
        assert!(udp.gso.load(std::sync::atomic::Ordering::Relaxed));
        check(8);
        assert!(udp.gso.load(std::sync::atomic::Ordering::Relaxed));
    }

    #[test]
    fn unmaps_v4_mapped_addresses() {
        let m: SocketAddr = "[::ffff:192.0.2.7]:51820".parse().unwrap();
        assert_eq!(unmap(m), "192.0.2.7:51820".parse().unwrap());
        let v6: SocketAddr = "[2001:db8::1]:1".parse().unwrap();
        assert_eq!(unmap(v6), v6);
    }
}
