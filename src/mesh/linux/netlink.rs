//! Interfaces, addresses and routes through netlink (rtnetlink): no `ip` binary needed.

use super::NetError;
use futures::TryStreamExt;
use std::net::{IpAddr, Ipv4Addr};
use tracing::{debug, warn};

/// Netlink configuration of interfaces, addresses and routes.
pub struct NetConfig {
    handle: rtnetlink::Handle,
}

impl NetConfig {
    pub fn new() -> Result<NetConfig, NetError> {
        let (conn, handle, _) = rtnetlink::new_connection()
            .map_err(|e| NetError::io("cannot open a netlink socket", e))?;
        tokio::spawn(conn);
        Ok(NetConfig { handle })
    }

    pub fn handle(&self) -> &rtnetlink::Handle {
        &self.handle
    }

    /// The index of interface `name`.
    pub async fn index(&self, name: &str) -> Result<u32, NetError> {
        self.link_index(name)
            .await?
            .ok_or_else(|| NetError::NoInterface(name.to_string()))
    }

    pub async fn set_up(&self, index: u32) -> Result<(), NetError> {
        use rtnetlink::LinkUnspec;
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(|e| NetError::netlink(format!("bringing interface {index} up"), e))
    }

    pub async fn set_mtu(&self, index: u32, mtu: u16) -> Result<(), NetError> {
        use rtnetlink::LinkUnspec;
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).mtu(mtu as u32).build())
            .execute()
            .await
            .map_err(|e| NetError::netlink(format!("setting the MTU of interface {index}"), e))
    }

    pub async fn add_address(
        &self,
        index: u32,
        addr: Ipv4Addr,
        prefix: u8,
    ) -> Result<(), NetError> {
        self.handle
            .address()
            .add(index, IpAddr::V4(addr), prefix)
            .execute()
            .await
            .map_err(|e| {
                NetError::netlink(format!("adding {addr}/{prefix} to interface {index}"), e)
            })
    }

    /// Remove every address from an interface.
    pub async fn flush_addresses(&self, index: u32) -> Result<(), NetError> {
        let mut old = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        let mut msgs = Vec::new();
        while let Some(m) = old.try_next().await.map_err(|e| {
            NetError::netlink(format!("listing the addresses of interface {index}"), e)
        })? {
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
    ) -> Result<(), NetError> {
        self.set_mtu(index, mtu).await?;
        self.limit_gso_segments(index).await;
        self.add_address(index, addr, prefix).await?;
        self.set_up(index).await
    }

    /// Keep the kernel's TCP super-packets for the device within what one read is split
    /// into ([`crate::mesh::io::TUN_READ_PACKETS`]): a connection with a tiny MSS would otherwise
    /// hand over 64 KiB in more segments than that, and lose them. Kernels that cannot change
    /// the limit keep theirs (such reads are then dropped and counted).
    async fn limit_gso_segments(&self, index: u32) {
        use rtnetlink::packet_route::link::LinkAttribute;
        use rtnetlink::LinkUnspec;
        let segs = crate::mesh::io::TUN_READ_PACKETS as u32;
        let r = self
            .handle
            .link()
            .set(
                LinkUnspec::new_with_index(index)
                    .append_extra_attribute(LinkAttribute::GsoMaxSegs(segs))
                    .build(),
            )
            .execute()
            .await;
        if let Err(e) = r {
            debug!(error = %e, "cannot limit the TUN device's GSO segments");
        }
    }

    /// Replace the TUN device's address (a moved slot).
    pub async fn replace_address(
        &self,
        index: u32,
        addr: Ipv4Addr,
        prefix: u8,
    ) -> Result<(), NetError> {
        self.flush_addresses(index).await?;
        self.add_address(index, addr, prefix).await
    }

    pub async fn link_index(&self, name: &str) -> Result<Option<u32>, NetError> {
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
            Err(e) => Err(NetError::netlink(format!("looking up interface {name}"), e)),
        }
    }

    pub async fn set_up_named(&self, name: &str) -> Result<(), NetError> {
        let i = self.index(name).await?;
        self.set_up(i).await
    }

    /// A bridge named `name`, up.
    pub async fn add_bridge(&self, name: &str) -> Result<(), NetError> {
        self.handle
            .link()
            .add(rtnetlink::LinkBridge::new(name).build())
            .execute()
            .await
            .map_err(|e| NetError::netlink(format!("creating bridge {name}"), e))?;
        self.set_up_named(name).await
    }

    /// Put interface `index` on bridge `bridge`, up.
    pub async fn attach(&self, index: u32, bridge: u32) -> Result<(), NetError> {
        use rtnetlink::LinkUnspec;
        self.handle
            .link()
            .set(
                LinkUnspec::new_with_index(index)
                    .controller(bridge)
                    .up()
                    .build(),
            )
            .execute()
            .await
            .map_err(|e| NetError::netlink(format!("attaching interface {index} to a bridge"), e))
    }

    /// A veth pair (at `mtu`, or the default) whose `peer` end moves into `into` (a namespace
    /// file descriptor); `local` stays here, attached to `bridge` and up.
    pub async fn add_veth_into(
        &self,
        (local, peer): (&str, &str),
        mtu: Option<u16>,
        bridge: &str,
        into: std::os::fd::RawFd,
    ) -> Result<(), NetError> {
        use rtnetlink::LinkUnspec;
        let h = &self.handle;
        let mut veth = rtnetlink::LinkVeth::new(local, peer);
        if let Some(mtu) = mtu {
            veth = veth.mtu(mtu as u32);
        }
        h.link()
            .add(veth.build())
            .execute()
            .await
            .map_err(|e| NetError::netlink(format!("creating veth {local}"), e))?;
        let p = self.index(peer).await?;
        h.link()
            .set(LinkUnspec::new_with_index(p).setns_by_fd(into).build())
            .execute()
            .await
            .map_err(|e| NetError::netlink(format!("moving {peer} into its namespace"), e))?;
        let l = self.index(local).await?;
        let b = self.index(bridge).await?;
        self.attach(l, b).await
    }

    pub async fn rename(&self, from: &str, to: &str) -> Result<(), NetError> {
        use rtnetlink::LinkUnspec;
        let i = self.index(from).await?;
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(i).name(to.to_string()).build())
            .execute()
            .await
            .map_err(|e| NetError::netlink(format!("renaming {from} to {to}"), e))
    }

    pub async fn add_address_named(
        &self,
        name: &str,
        addr: Ipv4Addr,
        prefix: u8,
    ) -> Result<(), NetError> {
        let i = self.index(name).await?;
        self.add_address(i, addr, prefix).await
    }
}
