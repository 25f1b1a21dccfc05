//! Many datagrams per system call: `recvmmsg` and `sendmmsg` on a non-blocking UDP socket
//! (callers wait for readiness with tokio and call these inside `try_io`).

use std::io;
use std::net::SocketAddr;
use std::os::fd::RawFd;

/// The most datagrams one call moves.
pub const BATCH: usize = 32;

/// One received datagram: its length, sender, and whether it was cut to fit its buffer.
#[derive(Clone, Copy, Debug)]
pub struct Received {
    pub len: usize,
    pub from: SocketAddr,
    pub truncated: bool,
}

/// Receive up to `bufs.len()` (at most [`BATCH`]) datagrams without waiting, into `bufs` (each
/// buffer's whole length is room); their lengths and senders into `out`. `WouldBlock` when
/// none is there.
pub fn recv(fd: RawFd, bufs: &mut [Vec<u8>], out: &mut Vec<Received>) -> io::Result<usize> {
    let n = bufs.len().min(BATCH);
    out.clear();
    // SAFETY: each mmsghdr points at an iovec and a sockaddr_storage of these local arrays and
    // at a caller's buffer, all alive for the call; the kernel writes at most the given
    // lengths, and only the first `got` entries, which it filled, are read afterwards.
    unsafe {
        let mut names: [libc::sockaddr_storage; BATCH] = std::mem::zeroed();
        let mut iovs: [libc::iovec; BATCH] = std::mem::zeroed();
        let mut hdrs: [libc::mmsghdr; BATCH] = std::mem::zeroed();
        for i in 0..n {
            iovs[i] = libc::iovec {
                iov_base: bufs[i].as_mut_ptr() as *mut libc::c_void,
                iov_len: bufs[i].len(),
            };
            let h = &mut hdrs[i].msg_hdr;
            h.msg_name = &mut names[i] as *mut _ as *mut libc::c_void;
            h.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as u32;
            h.msg_iov = &mut iovs[i];
            h.msg_iovlen = 1;
        }
        let got = libc::recvmmsg(
            fd,
            hdrs.as_mut_ptr(),
            n as libc::c_uint,
            // (`as _`: the flags are a c_int in glibc, a c_uint in musl)
            libc::MSG_DONTWAIT as _,
            std::ptr::null_mut(),
        );
        if got < 0 {
            return Err(io::Error::last_os_error());
        }
        for i in 0..got as usize {
            let h = &hdrs[i];
            let Some(from) = socket2::SockAddr::new(names[i], h.msg_hdr.msg_namelen).as_socket()
            else {
                continue;
            };
            out.push(Received {
                len: (h.msg_len as usize).min(bufs[i].len()),
                from: super::unmap(from),
                truncated: h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0,
            });
        }
        Ok(got as usize)
    }
}

/// Send `msgs` (at most [`BATCH`] of them are tried) without waiting; how many went.
/// `WouldBlock` when the socket's buffer is full before the first.
pub fn send(fd: RawFd, msgs: &[(&[u8], SocketAddr)]) -> io::Result<usize> {
    let n = msgs.len().min(BATCH);
    if n == 0 {
        return Ok(0);
    }
    let addrs: Vec<socket2::SockAddr> = msgs[..n].iter().map(|(_, a)| (*a).into()).collect();
    // SAFETY: as in `recv`: every pointer refers to `msgs`, `addrs` or these local arrays,
    // alive for the call; the kernel only reads them.
    unsafe {
        let mut iovs: [libc::iovec; BATCH] = std::mem::zeroed();
        let mut hdrs: [libc::mmsghdr; BATCH] = std::mem::zeroed();
        for i in 0..n {
            iovs[i] = libc::iovec {
                iov_base: msgs[i].0.as_ptr() as *mut libc::c_void,
                iov_len: msgs[i].0.len(),
            };
            let h = &mut hdrs[i].msg_hdr;
            h.msg_name = addrs[i].as_ptr() as *mut libc::c_void;
            h.msg_namelen = addrs[i].len();
            h.msg_iov = &mut iovs[i];
            h.msg_iovlen = 1;
        }
        let sent = libc::sendmmsg(
            fd,
            hdrs.as_mut_ptr(),
            n as libc::c_uint,
            libc::MSG_DONTWAIT as _,
        );
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(sent as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn a_batch_goes_and_comes_whole() {
        let a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        b.set_nonblocking(true).unwrap();
        let to = b.local_addr().unwrap();
        let payloads: Vec<Vec<u8>> = (0..40u8).map(|i| vec![i; 10 + i as usize]).collect();
        let msgs: Vec<(&[u8], SocketAddr)> = payloads.iter().map(|p| (&p[..], to)).collect();
        let mut sent = 0;
        while sent < msgs.len() {
            sent += send(a.as_raw_fd(), &msgs[sent..]).unwrap();
        }
        let mut bufs = vec![vec![0u8; 30]; BATCH];
        let mut out = Vec::new();
        let mut seen = Vec::new();
        for _ in 0..100 {
            match recv(b.as_raw_fd(), &mut bufs, &mut out) {
                Ok(_) => {
                    for (i, r) in out.iter().enumerate() {
                        assert_eq!(r.from, a.local_addr().unwrap());
                        seen.push((bufs[i][0], r.len, r.truncated));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(seen.len(), 40, "every datagram, in order, across batches");
        for (i, (first, len, truncated)) in seen.into_iter().enumerate() {
            assert_eq!(first, i as u8);
            assert_eq!(len, (10 + i).min(30));
            assert_eq!(truncated, 10 + i > 30, "datagram {i}");
        }
    }
}
