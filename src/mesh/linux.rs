//! The real edges on Linux: the TUN device (tun-rs), its configuration through netlink
//! (rtnetlink: no `ip` binary needed), the mesh UDP socket and the machine's own addresses.

use super::io::{TunIo, UdpIo};
use crate::constants::UDP_SOCKET_BUFFER;
use futures::TryStreamExt;
use socket2::{Domain, Protocol, Socket, Type};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use tracing::{debug, info, warn};

/// The kernel TUN device, with TCP segmentation offload when the kernel supports it: the
/// kernel hands over up to 64 KiB of one TCP flow per read and takes coalesced segments back.
pub struct LinuxTun {
    dev: tun_rs::AsyncDevice,
    pub name: String,
    pub index: u32,
    /// Coalescing state for writes (used by the single writer, hence uncontended).
    gro: tokio::sync::Mutex<tun_rs::GROTable>,
}

impl LinuxTun {
    /// Create the TUN device `name`. It disappears when this process exits, however it exits.
    pub fn create(name: &str) -> anyhow::Result<LinuxTun> {
        let build = |offload: bool| {
            tun_rs::DeviceBuilder::new()
                .name(name)
                .offload(offload)
                .build_async()
        };
        let hint = |e: &io::Error| match e.raw_os_error() {
            Some(libc::EBUSY) => format!(
                "an interface named {name} is already in use (another meshd or VPN?); \
                 stop it or pick another name with --tun"
            ),
            Some(libc::EPERM) | Some(libc::EACCES) => {
                "meshd needs root (or CAP_NET_ADMIN) to create a TUN device".to_string()
            }
            Some(libc::ENOENT) | Some(libc::ENODEV) => {
                "/dev/net/tun is missing: load the tun module (modprobe tun)".to_string()
            }
            _ => "check that /dev/net/tun exists and meshd runs as root".to_string(),
        };
        let fatal = |e: &io::Error| {
            matches!(
                e.raw_os_error(),
                Some(libc::EBUSY)
                    | Some(libc::EPERM)
                    | Some(libc::EACCES)
                    | Some(libc::ENOENT)
                    | Some(libc::ENODEV)
            )
        };
        let dev = match build(true) {
            Ok(d) => d,
            // Kernels (or sandboxes) without TUN offload: carry on without it, more slowly.
            Err(e) if !fatal(&e) => {
                info!(error = %e, "TUN offload unavailable; continuing without it");
                build(false).map_err(|e| {
                    anyhow::anyhow!("cannot create TUN device {name}: {e}; {}", hint(&e))
                })?
            }
            Err(e) => anyhow::bail!("cannot create TUN device {name}: {e}; {}", hint(&e)),
        };
        let index = dev
            .if_index()
            .map_err(|e| anyhow::anyhow!("cannot read the index of {name}: {e}"))?;
        Ok(LinuxTun {
            dev,
            name: name.to_string(),
            index,
            gro: tokio::sync::Mutex::new(tun_rs::GROTable::new()),
        })
    }
}

impl TunIo for LinuxTun {
    /// One packet (the device loop uses the batch form; this one allocates).
    async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        let mut scratch = vec![0u8; 65535 + tun_rs::VIRTIO_NET_HDR_LEN];
        let mut bufs = vec![vec![0u8; 2048]; tun_rs::IDEAL_BATCH_SIZE];
        let mut sizes = vec![0usize; tun_rs::IDEAL_BATCH_SIZE];
        self.recv_batch(&mut scratch, &mut bufs, &mut sizes).await?;
        let n = sizes[0].min(buf.len());
        buf[..n].copy_from_slice(&bufs[0][..n]);
        Ok(n)
    }
    async fn send(&self, packet: &[u8]) -> io::Result<()> {
        let mut b = vec![0u8; super::io::TUN_HEADROOM];
        b.extend_from_slice(packet);
        self.send_batch(std::slice::from_mut(&mut b)).await
    }
    async fn recv_batch(
        &self,
        scratch: &mut [u8],
        bufs: &mut [Vec<u8>],
        sizes: &mut [usize],
    ) -> io::Result<usize> {
        self.dev.recv_multiple(scratch, bufs, sizes, 0).await
    }
    async fn send_batch(&self, bufs: &mut [Vec<u8>]) -> io::Result<()> {
        let mut gro = self.gro.lock().await;
        self.dev
            .send_multiple(&mut gro, bufs, super::io::TUN_HEADROOM)
            .await
            .map(|_| ())
    }
}

/// Netlink configuration of interfaces, addresses and routes.
pub struct NetConfig {
    handle: rtnetlink::Handle,
}

impl NetConfig {
    pub fn new() -> anyhow::Result<NetConfig> {
        let (conn, handle, _) = rtnetlink::new_connection()
            .map_err(|e| anyhow::anyhow!("cannot open a netlink socket: {e}"))?;
        tokio::spawn(conn);
        Ok(NetConfig { handle })
    }

    pub fn handle(&self) -> &rtnetlink::Handle {
        &self.handle
    }

    /// The index of interface `name`.
    pub async fn index(&self, name: &str) -> anyhow::Result<u32> {
        self.link_index(name)
            .await?
            .ok_or_else(|| anyhow::anyhow!("no network interface named {name}"))
    }

    pub async fn set_up(&self, index: u32) -> anyhow::Result<()> {
        use rtnetlink::LinkUnspec;
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(|e| anyhow::anyhow!("bringing interface {index} up: {e}"))
    }

    pub async fn set_mtu(&self, index: u32, mtu: u16) -> anyhow::Result<()> {
        use rtnetlink::LinkUnspec;
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).mtu(mtu as u32).build())
            .execute()
            .await
            .map_err(|e| anyhow::anyhow!("setting the MTU of interface {index}: {e}"))
    }

    pub async fn add_address(&self, index: u32, addr: Ipv4Addr, prefix: u8) -> anyhow::Result<()> {
        self.handle
            .address()
            .add(index, IpAddr::V4(addr), prefix)
            .execute()
            .await
            .map_err(|e| anyhow::anyhow!("adding {addr}/{prefix} to interface {index}: {e}"))
    }

    /// Remove every address from an interface.
    pub async fn flush_addresses(&self, index: u32) -> anyhow::Result<()> {
        let mut old = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        let mut msgs = Vec::new();
        while let Some(m) = old.try_next().await? {
            msgs.push(m);
        }
        for m in msgs {
            if let Err(e) = self.handle.address().del(m).execute().await {
                warn!(error = %e, "removing an old address failed");
            }
        }
        Ok(())
    }

    /// MTU, the node's address with the mesh prefix (which also routes the whole mesh range
    /// to the device), and link up.
    pub async fn configure_tun(
        &self,
        index: u32,
        addr: Ipv4Addr,
        prefix: u8,
        mtu: u16,
    ) -> anyhow::Result<()> {
        self.set_mtu(index, mtu).await?;
        self.add_address(index, addr, prefix).await?;
        self.set_up(index).await
    }

    /// Replace the TUN device's address (a moved slot).
    pub async fn replace_address(
        &self,
        index: u32,
        addr: Ipv4Addr,
        prefix: u8,
    ) -> anyhow::Result<()> {
        self.flush_addresses(index).await?;
        self.add_address(index, addr, prefix).await
    }

    pub async fn link_index(&self, name: &str) -> anyhow::Result<Option<u32>> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match links.try_next().await {
            Ok(Some(l)) => Ok(Some(l.header.index)),
            Ok(None) => Ok(None),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

/// The mesh UDP socket: dual-stack where IPv6 exists, with buffers sized for bursts, and UDP
/// GSO (one `sendmsg` for a run of equal-sized datagrams) where the kernel offers it.
pub struct LinuxUdp {
    sock: tokio::net::UdpSocket,
    v6: bool,
    local: SocketAddr,
    gso: std::sync::atomic::AtomicBool,
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
        let n = libc::recvmsg(fd, &mut msg, 0);
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
        let n = libc::sendmsg(fd, &msg, 0);
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

impl LinuxUdp {
    pub fn bind(port: u16) -> anyhow::Result<LinuxUdp> {
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
                            anyhow::anyhow!("cannot bind UDP port {port}: {e}")
                        }
                    })?;
                (s, false)
            }
        };
        let local = sock.local_addr()?;
        let sock = tokio::net::UdpSocket::from_std(sock)?;
        Ok(LinuxUdp {
            sock,
            v6,
            local,
            gso: std::sync::atomic::AtomicBool::new(true),
        })
    }
}

fn port_in_use(port: u16, e: io::Error) -> anyhow::Error {
    anyhow::anyhow!(
        "UDP port {port} is already in use ({e}): another meshd or WireGuard may be running; \
         stop it or choose another port with --port"
    )
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

impl UdpIo for LinuxUdp {
    async fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        let (n, from) = self.sock.recv_from(buf).await?;
        Ok((n, unmap(from)))
    }
    async fn send_to(&self, datagram: &[u8], to: SocketAddr) -> io::Result<()> {
        self.sock.send_to(datagram, self.map(to)).await.map(|_| ())
    }
    async fn send_gso(&self, buf: &[u8], segment: usize, to: SocketAddr) -> io::Result<()> {
        use std::sync::atomic::Ordering::Relaxed;
        if buf.len() > segment
            && segment > 0
            && segment <= u16::MAX as usize
            && self.gso.load(Relaxed)
        {
            let addr = socket2::SockAddr::from(self.map(to));
            let fd = self.sock.as_raw_fd();
            let r = self
                .sock
                .async_io(tokio::io::Interest::WRITABLE, || {
                    sendmsg_gso(fd, buf, segment as u16, &addr)
                })
                .await;
            match r {
                Ok(_) => return Ok(()),
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EIO) | Some(libc::EINVAL) | Some(libc::EOPNOTSUPP)
                    ) =>
                {
                    info!(error = %e, "UDP GSO unavailable; sending datagrams one by one");
                    self.gso.store(false, Relaxed);
                }
                Err(e) => return Err(e),
            }
        }
        for d in buf.chunks(segment.max(1)) {
            self.send_to(d, to).await?;
        }
        Ok(())
    }
    fn local_addr(&self) -> SocketAddr {
        self.local
    }
    fn try_recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        let (n, from) = self.sock.try_recv_from(buf)?;
        Ok((n, unmap(from)))
    }
    async fn recv_gro(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, usize)> {
        let fd = self.sock.as_raw_fd();
        self.sock
            .async_io(tokio::io::Interest::READABLE, || recvmsg_gro(fd, buf))
            .await
    }
    fn try_recv_gro(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, usize)> {
        let fd = self.sock.as_raw_fd();
        self.sock
            .try_io(tokio::io::Interest::READABLE, || recvmsg_gro(fd, buf))
    }
}

/// One address of a network interface.
pub struct IfAddr {
    pub ifname: String,
    pub up: bool,
    pub loopback: bool,
    pub ip: IpAddr,
}

/// Every IPv4 and IPv6 address on the machine's interfaces (getifaddrs).
pub fn interface_addresses() -> Vec<IfAddr> {
    let mut out = Vec::new();
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a linked list we walk read-only and free once.
    unsafe {
        if libc::getifaddrs(&mut ifap) != 0 {
            return out;
        }
        let mut cur = ifap;
        while !cur.is_null() {
            let ifa = &*cur;
            cur = ifa.ifa_next;
            if ifa.ifa_addr.is_null() {
                continue;
            }
            let ip = match (*ifa.ifa_addr).sa_family as i32 {
                libc::AF_INET => {
                    let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                    IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)))
                }
                libc::AF_INET6 => {
                    let sin6 = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                    IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr))
                }
                _ => continue,
            };
            out.push(IfAddr {
                ifname: std::ffi::CStr::from_ptr(ifa.ifa_name)
                    .to_string_lossy()
                    .into_owned(),
                up: ifa.ifa_flags & libc::IFF_UP as u32 != 0,
                loopback: ifa.ifa_flags & libc::IFF_LOOPBACK as u32 != 0,
                ip,
            });
        }
        libc::freeifaddrs(ifap);
    }
    out
}

/// The machine's addresses other nodes may reach it on: up, non-loopback, not link-local, not
/// inside the mesh range, not on `skip_if`. IPv4 first.
pub fn local_addresses(skip_if: &str, mesh: &super::addressing::MeshRange) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = Vec::new();
    for a in interface_addresses() {
        if !a.up || a.loopback || a.ifname == skip_if || out.contains(&a.ip) {
            continue;
        }
        let usable = match a.ip {
            IpAddr::V4(ip) => !ip.is_link_local() && !ip.is_loopback() && !mesh.contains(ip),
            IpAddr::V6(ip) => !ip.is_unicast_link_local() && !ip.is_loopback(),
        };
        if usable {
            out.push(a.ip);
        }
    }
    out.sort_by_key(|ip| ip.is_ipv6());
    out
}

/// Bind a UDP socket to `addr` and to the device `ifname` (SO_BINDTODEVICE), so it only ever
/// receives packets that arrived through that device. Gossip and mesh DNS use this: Linux
/// otherwise accepts packets for any local address on any interface, and the mesh address must
/// only be reachable through the tunnels.
pub fn bind_udp_on_device(addr: SocketAddr, ifname: &str) -> io::Result<std::net::UdpSocket> {
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    s.bind_device(Some(ifname.as_bytes()))?;
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    Ok(s.into())
}

/// TCP listener counterpart of [`bind_udp_on_device`].
pub fn bind_tcp_on_device(addr: SocketAddr, ifname: &str) -> io::Result<std::net::TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.bind_device(Some(ifname.as_bytes()))?;
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    Ok(s.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unmaps_v4_mapped_addresses() {
        let m: SocketAddr = "[::ffff:192.0.2.7]:51820".parse().unwrap();
        assert_eq!(unmap(m), "192.0.2.7:51820".parse().unwrap());
        let v6: SocketAddr = "[2001:db8::1]:1".parse().unwrap();
        assert_eq!(unmap(v6), v6);
    }

    #[test]
    fn local_addresses_exclude_loopback_and_mesh() {
        let mesh: super::super::addressing::MeshRange = "10.210.0.0/16".parse().unwrap();
        for a in local_addresses("mesh0", &mesh) {
            assert!(!a.is_loopback());
            if let IpAddr::V4(v4) = a {
                assert!(!mesh.contains(v4));
            }
        }
    }
}
