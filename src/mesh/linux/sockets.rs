//! Sockets bound to the TUN device, for the services that must only be reachable through the
//! tunnels (gossip, mesh DNS, gateway handoffs, exit requests).

use socket2::{Domain, Protocol, Socket, Type};
use std::io;
use std::net::SocketAddr;

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
