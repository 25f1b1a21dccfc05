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

/// The kernel TUN device.
pub struct LinuxTun {
    dev: tun_rs::AsyncDevice,
    pub name: String,
    pub index: u32,
}

impl LinuxTun {
    /// Create the TUN device `name`. It disappears when this process exits, however it exits.
    pub fn create(name: &str) -> anyhow::Result<LinuxTun> {
        let dev = tun_rs::DeviceBuilder::new()
            .name(name)
            .build_async()
            .map_err(|e| {
                let hint = match e.raw_os_error() {
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
                anyhow::anyhow!("cannot create TUN device {name}: {e}; {hint}")
            })?;
        let index = dev
            .if_index()
            .map_err(|e| anyhow::anyhow!("cannot read the index of {name}: {e}"))?;
        Ok(LinuxTun {
            dev,
            name: name.to_string(),
            index,
        })
    }
}

impl TunIo for LinuxTun {
    async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.dev.recv(buf).await
    }
    async fn send(&self, packet: &[u8]) -> io::Result<()> {
        self.dev.send(packet).await.map(|_| ())
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

/// The mesh UDP socket: dual-stack where IPv6 exists, with buffers sized for bursts.
pub struct LinuxUdp {
    sock: tokio::net::UdpSocket,
    v6: bool,
    local: SocketAddr,
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
        Ok(LinuxUdp { sock, v6, local })
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

impl UdpIo for LinuxUdp {
    async fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        let (n, from) = self.sock.recv_from(buf).await?;
        Ok((n, unmap(from)))
    }
    async fn send_to(&self, datagram: &[u8], to: SocketAddr) -> io::Result<()> {
        let to = match (self.v6, to) {
            (true, SocketAddr::V4(v4)) => SocketAddr::from((v4.ip().to_ipv6_mapped(), v4.port())),
            _ => to,
        };
        self.sock.send_to(datagram, to).await.map(|_| ())
    }
    fn local_addr(&self) -> SocketAddr {
        self.local
    }
}

/// The machine's addresses other nodes may reach it on: up, non-loopback, not link-local, not
/// inside the mesh range, not on `skip_if`. IPv4 first.
pub fn local_addresses(skip_if: &str, mesh: &super::addressing::MeshRange) -> Vec<IpAddr> {
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a linked list we walk read-only and free once.
    unsafe {
        if libc::getifaddrs(&mut ifap) != 0 {
            return Vec::new();
        }
        let mut cur = ifap;
        while !cur.is_null() {
            let ifa = &*cur;
            cur = ifa.ifa_next;
            if ifa.ifa_addr.is_null() {
                continue;
            }
            let flags = ifa.ifa_flags;
            if flags & libc::IFF_UP as u32 == 0 || flags & libc::IFF_LOOPBACK as u32 != 0 {
                continue;
            }
            let name = std::ffi::CStr::from_ptr(ifa.ifa_name).to_string_lossy();
            if name == skip_if {
                continue;
            }
            match (*ifa.ifa_addr).sa_family as i32 {
                libc::AF_INET => {
                    let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                    let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                    if !ip.is_link_local()
                        && !ip.is_loopback()
                        && !mesh.contains(ip)
                        && !v4.contains(&IpAddr::V4(ip))
                    {
                        v4.push(IpAddr::V4(ip));
                    }
                }
                libc::AF_INET6 => {
                    let sin6 = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                    let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
                    let link_local = ip.segments()[0] & 0xffc0 == 0xfe80;
                    if !link_local && !ip.is_loopback() && !v6.contains(&IpAddr::V6(ip)) {
                        v6.push(IpAddr::V6(ip));
                    }
                }
                _ => {}
            }
        }
        libc::freeifaddrs(ifap);
    }
    v4.extend(v6);
    v4
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
