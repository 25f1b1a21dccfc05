//! What the node runtime needs from the operating system, behind one trait: the TUN device and
//! its address, the mesh UDP socket, the gossip transport and the machine's addresses.
//! [`LinuxPlatform`] is the real thing; the in-memory twin in `testing::sim` runs whole meshes in
//! one process for fast multi-node scenarios (DESIGN "Testing").

use crate::id::MeshRange;
use crate::mesh::io::{TunIo, UdpIo};
use crate::mesh::linux::{local_addresses, LinuxTun, LinuxUdp, NetConfig, NetError};
use chitchat::transport::Transport;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};

pub trait Platform: Send + Sync + 'static {
    type Tun: TunIo;
    type Udp: UdpIo;

    fn bind_udp(&self, port: u16) -> Result<Self::Udp, NetError>;

    /// Create the TUN device with the node's address (mesh prefix, which routes the mesh range
    /// to it) and MTU, up. Returns it and its interface index.
    fn create_tun(
        &self,
        name: &str,
        addr: Ipv4Addr,
        prefix: u8,
        mtu: u16,
    ) -> impl Future<Output = Result<(Self::Tun, u32), NetError>> + Send;

    /// Whether a TUN device `name` can be made here (made and removed again): checked before a
    /// join asks the mesh for anything, so a name that cannot work leaves no member behind.
    fn check_tun(&self, _name: &str) -> Result<(), NetError> {
        Ok(())
    }

    /// Give the TUN device a new address (the node's slot moved).
    fn readdress(
        &self,
        index: u32,
        addr: Ipv4Addr,
        prefix: u8,
    ) -> impl Future<Output = Result<(), NetError>> + Send;

    /// How gossip travels (through the TUN device, on Linux).
    fn gossip_transport(&self, tun: &str) -> Box<dyn Transport>;

    /// The machine's addresses other nodes may reach it on.
    fn local_addresses(&self, tun: &str, range: &MeshRange) -> Vec<IpAddr>;

    /// Whether services listening on the mesh address (DNS, gateway handoffs, exit) can run.
    fn host_services(&self) -> bool {
        true
    }
}

/// The real operating system.
pub struct LinuxPlatform;

impl Platform for LinuxPlatform {
    type Tun = LinuxTun;
    type Udp = LinuxUdp;

    fn bind_udp(&self, port: u16) -> Result<LinuxUdp, NetError> {
        LinuxUdp::bind(port)
    }

    async fn create_tun(
        &self,
        name: &str,
        addr: Ipv4Addr,
        prefix: u8,
        mtu: u16,
    ) -> Result<(LinuxTun, u32), NetError> {
        let tun = LinuxTun::create(name)?;
        let index = tun.index;
        NetConfig::new()?
            .configure_tun(index, addr, prefix, mtu)
            .await?;
        Ok((tun, index))
    }

    fn check_tun(&self, name: &str) -> Result<(), NetError> {
        LinuxTun::create(name).map(drop)
    }

    async fn readdress(&self, index: u32, addr: Ipv4Addr, prefix: u8) -> Result<(), NetError> {
        NetConfig::new()?.replace_address(index, addr, prefix).await
    }

    fn gossip_transport(&self, tun: &str) -> Box<dyn Transport> {
        Box::new(crate::gossip::chitchat_glue::DeviceBoundUdp {
            ifname: tun.to_string(),
        })
    }

    fn local_addresses(&self, tun: &str, range: &MeshRange) -> Vec<IpAddr> {
        local_addresses(tun, range)
    }
}
