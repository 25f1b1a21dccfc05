//! Carrying out the workload plan on Linux: the bridge and the workloads' veth pairs through
//! netlink, named network namespaces made the way `ip netns add` makes them (a bind mount of a
//! namespace under `/run/netns`, so `ip netns exec NAME` works), forwarding sysctls, and
//! meshd's own nftables table through `nft -f` (replaced whole, atomically).

use super::{BridgePlan, WorkloadDef, NFT_TABLE};
use crate::mesh::linux::netns::{Netns, RUN_DIR};
use crate::mesh::linux::{NetConfig, NetError};
use futures::TryStreamExt;
use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Where `ip netns exec` finds a namespace's own `/etc` files.
pub const NETNS_ETC: &str = "/etc/netns";
/// MTU of the bridge and the workloads' interfaces: the tunnel's.
pub const MTU: u16 = crate::constants::TUN_MTU;

fn io_err(what: impl Into<String>, e: io::Error) -> NetError {
    NetError::io(what, e)
}

fn netns_path(name: &str) -> PathBuf {
    Path::new(RUN_DIR).join(name)
}

pub fn netns_exists(name: &str) -> bool {
    netns_path(name).exists()
}

fn ns_err(e: impl std::fmt::Display) -> NetError {
    NetError::Other(e.to_string())
}

/// Make the named namespace `name` (like `ip netns add`), unless it exists.
pub fn netns_create(name: &str) -> Result<(), NetError> {
    if !netns_exists(name) {
        Netns::create(name)
            .map_err(|e| {
                ns_err(format!(
                    "creating network namespace {name} (needs CAP_SYS_ADMIN): {e}"
                ))
            })?
            .persist();
    }
    Ok(())
}

/// Remove the named namespace (like `ip netns del`): processes still in it keep it alive.
pub fn netns_delete(name: &str) -> Result<(), NetError> {
    match Netns::open(name) {
        Ok(ns) => ns
            .unlink()
            .map_err(|e| ns_err(format!("removing network namespace {name}: {e}"))),
        Err(_) => Ok(()),
    }
}

/// Run `f` with a netlink connection inside namespace `name`, on a thread of its own.
pub fn in_netns<T, F, Fut>(name: &str, f: F) -> Result<T, NetError>
where
    T: Send + 'static,
    F: FnOnce(NetConfig) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T, NetError>>,
{
    let ns = Netns::open(name).map_err(|e| ns_err(format!("network namespace {name}: {e}")))?;
    ns.run_async(move || async move { Ok(f(NetConfig::new()?).await?) })
        .map_err(|e| ns_err(format!("{e:#}")))
}

/// The bridge with the node's `.1/24`, up, at the tunnel's MTU. Returns its index.
pub async fn ensure_bridge(nc: &NetConfig, plan: &BridgePlan) -> Result<u32, NetError> {
    let index = match nc.link_index(&plan.bridge).await? {
        Some(i) => i,
        None => {
            nc.add_bridge(&plan.bridge).await?;
            nc.index(&plan.bridge).await?
        }
    };
    nc.set_mtu(index, MTU).await?;
    let want = plan.gateway();
    if addresses(nc, index).await? != [(want, 24)] {
        nc.replace_address(index, want, 24).await?;
    }
    nc.set_up(index).await?;
    Ok(index)
}

/// The IPv4 addresses of interface `index`, with their prefixes.
pub async fn addresses(nc: &NetConfig, index: u32) -> Result<Vec<(Ipv4Addr, u8)>, NetError> {
    use rtnetlink::packet_route::address::AddressAttribute;
    let mut s = nc
        .handle()
        .address()
        .get()
        .set_link_index_filter(index)
        .execute();
    let mut out = Vec::new();
    while let Some(m) = s
        .try_next()
        .await
        .map_err(|e| NetError::netlink(format!("listing addresses of {index}"), e))?
    {
        for a in &m.attributes {
            if let AddressAttribute::Address(IpAddr::V4(ip)) = a {
                out.push((*ip, m.header.prefix_len));
            }
        }
    }
    Ok(out)
}

/// Delete interface `name` if it exists.
pub async fn delete_link(nc: &NetConfig, name: &str) -> Result<(), NetError> {
    if let Some(i) = nc.link_index(name).await? {
        nc.handle()
            .link()
            .del(i)
            .execute()
            .await
            .map_err(|e| NetError::netlink(format!("deleting {name}"), e))?;
    }
    Ok(())
}

/// The names of the interfaces attached to bridge `index`.
pub async fn bridge_ports(nc: &NetConfig, index: u32) -> Result<Vec<String>, NetError> {
    use rtnetlink::packet_route::link::LinkAttribute;
    let mut s = nc.handle().link().get().execute();
    let mut out = Vec::new();
    while let Some(m) = s
        .try_next()
        .await
        .map_err(|e| NetError::netlink("listing interfaces", e))?
    {
        let attached = m
            .attributes
            .iter()
            .any(|a| matches!(a, LinkAttribute::Controller(c) if *c == index));
        if attached {
            if let Some(name) = m.attributes.iter().find_map(|a| match a {
                LinkAttribute::IfName(n) => Some(n.clone()),
                _ => None,
            }) {
                out.push(name);
            }
        }
    }
    Ok(out)
}

/// Attach interface `name` to the bridge and bring it up (if it exists). Whether it did.
pub async fn attach(nc: &NetConfig, name: &str, bridge: u32) -> Result<bool, NetError> {
    let Some(i) = nc.link_index(name).await? else {
        return Ok(false);
    };
    nc.attach(i, bridge).await?;
    Ok(true)
}

/// Workload `w`'s namespace, its veth pair on the bridge and its address (`ip`/24, default
/// route via `gateway`, resolver file), made or repaired: an existing namespace keeps its
/// processes and gets the address the plan says (a moved /24 renumbers it).
pub async fn ensure_workload(
    nc: &NetConfig,
    (bridge, bridge_name): (u32, &str),
    w: &WorkloadDef,
    ip: Ipv4Addr,
    gateway: Ipv4Addr,
    resolv: &str,
) -> Result<(), NetError> {
    netns_create(&w.name)?;
    let etc = Path::new(NETNS_ETC).join(&w.name);
    std::fs::create_dir_all(&etc).map_err(|e| io_err(format!("creating {}", etc.display()), e))?;
    std::fs::write(etc.join("resolv.conf"), resolv)
        .map_err(|e| io_err(format!("writing {}/resolv.conf", etc.display()), e))?;
    let host = w.veth();
    let inside = in_netns(&w.name, |nc| async move { nc.link_index("eth0").await })?;
    if nc.link_index(&host).await?.is_none() || inside.is_none() {
        // Half a pair (a namespace deleted and made again): start over.
        delete_link(nc, &host).await?;
        let peer = format!("{host}-p");
        let ns = std::fs::File::open(netns_path(&w.name))
            .map_err(|e| io_err(format!("opening namespace {}", w.name), e))?;
        nc.add_veth_into((&host, &peer), Some(MTU), bridge_name, ns.as_raw_fd())
            .await?;
        in_netns(
            &w.name,
            move |nc| async move { nc.rename(&peer, "eth0").await },
        )?;
    }
    attach(nc, &host, bridge).await?;
    in_netns(&w.name, move |nc| async move {
        let i = nc.index("eth0").await?;
        if addresses(&nc, i).await? != [(ip, 24)] {
            nc.replace_address(i, ip, 24).await?;
        }
        nc.set_up(i).await?;
        let route = rtnetlink::RouteMessageBuilder::<Ipv4Addr>::new()
            .gateway(gateway)
            .build();
        nc.handle()
            .route()
            .add(route)
            .replace()
            .execute()
            .await
            .map_err(|e| NetError::netlink(format!("the default route via {gateway}"), e))
    })
}

/// Remove workload `name`: its veth pair, namespace and resolver file.
pub async fn remove_workload(nc: &NetConfig, w: &WorkloadDef) -> Result<(), NetError> {
    delete_link(nc, &w.veth()).await?;
    netns_delete(&w.name)?;
    let etc = Path::new(NETNS_ETC).join(&w.name);
    if etc.exists() {
        std::fs::remove_dir_all(&etc)
            .map_err(|e| io_err(format!("removing {}", etc.display()), e))?;
    }
    Ok(())
}

fn sysctl_path(key: &str) -> PathBuf {
    Path::new("/proc/sys").join(key.replace('.', "/"))
}

pub fn sysctl_get(key: &str) -> Result<String, NetError> {
    std::fs::read_to_string(sysctl_path(key))
        .map(|s| s.trim().to_string())
        .map_err(|e| io_err(format!("reading {key}"), e))
}

pub fn sysctl_set(key: &str, value: &str) -> Result<(), NetError> {
    std::fs::write(sysctl_path(key), value).map_err(|e| {
        let hint = if e.raw_os_error() == Some(libc::EROFS) {
            " (/proc/sys is read-only here: under systemd, install the workloads drop-in, see \
             the README)"
        } else {
            ""
        };
        io_err(format!("setting {key}={value}{hint}"), e)
    })
}

fn nft(script: &str) -> Result<(), NetError> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| io_err("running nft (Debian package nftables)", e))?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(script.as_bytes())
        .map_err(|e| io_err("writing to nft", e))?;
    let out = child
        .wait_with_output()
        .map_err(|e| io_err("waiting for nft", e))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NetError::Other(format!(
            "nft refused meshd's table: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Put meshd's table in place, replacing any earlier version in one transaction.
pub fn nft_apply(plan: &BridgePlan) -> Result<(), NetError> {
    nft(&format!(
        "table inet {NFT_TABLE}\ndelete table inet {NFT_TABLE}\n{}",
        plan.nft_ruleset()
    ))
}

/// Remove meshd's table, if there is one.
pub fn nft_remove() -> Result<(), NetError> {
    nft(&format!(
        "table inet {NFT_TABLE}\ndelete table inet {NFT_TABLE}\n"
    ))
}

/// Packets dropped by the table's forged-source rule (`None` without the table).
pub fn nft_forged_packets() -> Option<u64> {
    let out = Command::new("nft")
        .args(["list", "counter", "inet", NFT_TABLE, "forged"])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut words = text.split_whitespace();
    while let Some(w) = words.next() {
        if w == "packets" {
            return words.next()?.parse().ok();
        }
    }
    None
}
