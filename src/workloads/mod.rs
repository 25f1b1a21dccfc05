//! Workloads on the node's /24 (the Uncloud model): a bridge holding the node's `.1/24` as the
//! workloads' gateway, forwarding between the bridge and the mesh only, masquerading for what
//! leaves the mesh range, and named network namespaces on the bridge (`meshctl workload add`).
//! Containers on different machines talk with their own addresses: no NAT inside the mesh.
//!
//! This module is the plan, pure: which addresses are free, the names of the interfaces, the
//! nftables table, the resolver file a namespace gets. [`linux`] carries it out with netlink,
//! namespaces and `nft`; the node's workload role decides when.
//!
//! Addresses of the /24: `.1` the node, `.2`-`.127` for namespaces made by meshd, `.128`-`.254`
//! for Docker's address management on the same bridge (`meshctl docker-network`), so the two
//! never hand out the same address.

pub mod docker;
pub mod linux;

use crate::id::MeshRange;
use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;

/// The bridge's name unless told otherwise.
pub const DEFAULT_BRIDGE: &str = "meshbr0";
/// meshd's own nftables table (family inet): created, replaced and deleted whole, never
/// touching the host's other rules.
pub const NFT_TABLE: &str = "meshd";
/// Host octets meshd hands to namespaces when no address is asked for.
pub const AUTO_HOSTS: std::ops::RangeInclusive<u8> = 2..=127;
/// How the host sides of meshd's namespaces' veth pairs begin ([`WorkloadDef::veth`]); any
/// other port on the bridge is someone else's (Docker's containers).
pub const VETH_PREFIX: &str = "mw-";

/// Host octets left to Docker's address management (`--ip-range .128/25`).
pub const DOCKER_HOSTS: std::ops::RangeInclusive<u8> = 128..=254;

/// One workload namespace meshd made, as kept in settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadDef {
    /// The network namespace's name (`ip netns exec NAME ...`) and its DNS label.
    pub name: String,
    /// Its host octet in the node's /24 (the address follows the /24 if it moves).
    pub host: u8,
}

impl WorkloadDef {
    pub fn ip(&self, range: &MeshRange, slot: u32) -> Ipv4Addr {
        host_ip(range, slot, self.host)
    }

    /// The host side of its veth pair: `mw-<octet>` (interface names are at most 15 bytes,
    /// workload names may be 63).
    pub fn veth(&self) -> String {
        format!("{VETH_PREFIX}{}", self.host)
    }
}

/// Address `.host` of the /24 at `slot`.
pub fn host_ip(range: &MeshRange, slot: u32, host: u8) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(range.subnet(slot)) | host as u32)
}

/// The bridge's settings, when workloads are enabled.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadSettings {
    pub bridge: String,
    #[serde(default)]
    pub namespaces: Vec<WorkloadDef>,
}

/// Why a workload cannot be added as asked.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error("{0:?} is not a workload name: use a DNS label (a-z, 0-9 and '-', at most 63, not starting or ending with '-')")]
    BadName(String),
    #[error("a workload named {0:?} exists already (meshctl workload rm {0} first)")]
    Exists(String),
    #[error("{ip} is not in this node's subnet {subnet}")]
    OutsideSubnet { ip: Ipv4Addr, subnet: String },
    #[error("{0} is reserved (.0 the network, .1 this node, .255 broadcast)")]
    Reserved(Ipv4Addr),
    #[error("{ip} is taken by workload {by:?}")]
    Taken { ip: Ipv4Addr, by: String },
    #[error("no free address left in .2-.127 of this node's subnet (.128-.254 are Docker's)")]
    Full,
}

/// Whether `name` may name a workload (and its namespace, and its DNS name).
pub fn valid_name(name: &str) -> bool {
    crate::util::is_dns_label(name)
}

/// The workload to add: `name` with the address asked for, else the first free one of
/// [`AUTO_HOSTS`]. Checks everything first.
pub fn plan_add(
    existing: &[WorkloadDef],
    name: &str,
    ip: Option<Ipv4Addr>,
    range: &MeshRange,
    slot: u32,
) -> Result<WorkloadDef, PlanError> {
    if !valid_name(name) {
        return Err(PlanError::BadName(name.to_string()));
    }
    if existing.iter().any(|w| w.name == name) {
        return Err(PlanError::Exists(name.to_string()));
    }
    let host = match ip {
        Some(ip) => {
            if range.slot_of(ip) != Some(slot) {
                return Err(PlanError::OutsideSubnet {
                    ip,
                    subnet: crate::mesh::addressing::subnet_string(range, slot),
                });
            }
            let host = ip.octets()[3];
            if matches!(host, 0 | 1 | 255) {
                return Err(PlanError::Reserved(ip));
            }
            if let Some(w) = existing.iter().find(|w| w.host == host) {
                return Err(PlanError::Taken {
                    ip,
                    by: w.name.clone(),
                });
            }
            host
        }
        None => AUTO_HOSTS
            .clone()
            .find(|h| !existing.iter().any(|w| w.host == *h))
            .ok_or(PlanError::Full)?,
    };
    Ok(WorkloadDef {
        name: name.to_string(),
        host,
    })
}

/// What the bridge and its rules are made for: the node's /24 now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BridgePlan {
    pub bridge: String,
    /// The TUN device (the mesh side).
    pub tun: String,
    pub range: MeshRange,
    pub slot: u32,
    /// Whether this host forwarded packets before meshd turned forwarding on: if not, meshd's
    /// table keeps it that way for everything but the bridge.
    pub host_forwarded: bool,
}

impl BridgePlan {
    pub fn gateway(&self) -> Ipv4Addr {
        self.range.node_ip(self.slot)
    }

    /// `10.210.X.0/24`.
    pub fn subnet(&self) -> String {
        crate::mesh::addressing::subnet_string(&self.range, self.slot)
    }

    /// meshd's nftables table, whole (applied with `nft -f`, replacing the previous version
    /// atomically):
    ///
    /// - a workload may only send from this node's /24 (anything else is dropped and counted,
    ///   before routing, whatever the host's reverse-path setting);
    /// - into the bridge: only from the mesh, or answers to what the workloads started;
    /// - if the host did not forward before, nothing else is forwarded now either;
    /// - workloads' traffic to outside the mesh range leaves masqueraded as the host.
    pub fn nft_ruleset(&self) -> String {
        let (br, tun, subnet, range) = (&self.bridge, &self.tun, self.subnet(), &self.range);
        let host_rule = if self.host_forwarded {
            String::new()
        } else {
            format!(
                "\t\tiifname != {{ \"{br}\", \"{tun}\" }} oifname != {{ \"{br}\", \"{tun}\" }} counter drop comment \"the host did not forward before meshd\"\n"
            )
        };
        format!(
            "table inet {NFT_TABLE} {{\n\
             \tcounter forged {{ }}\n\
             \tchain prerouting {{\n\
             \t\ttype filter hook prerouting priority raw; policy accept;\n\
             \t\tiifname \"{br}\" ip saddr != {subnet} ip saddr != 0.0.0.0 counter name \"forged\" drop\n\
             \t}}\n\
             \tchain forward {{\n\
             \t\ttype filter hook forward priority filter; policy accept;\n\
             \t\toifname \"{br}\" ct state established,related accept\n\
             \t\toifname \"{br}\" iifname != {{ \"{tun}\", \"{br}\" }} counter drop\n\
             {host_rule}\
             \t}}\n\
             \tchain postrouting {{\n\
             \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
             \t\tip saddr {subnet} ip daddr != {range} oifname != \"{br}\" masquerade\n\
             \t}}\n\
             }}\n"
        )
    }
}

/// The resolver file of a workload namespace (`/etc/netns/NAME/resolv.conf`, which
/// `ip netns exec` puts in place of `/etc/resolv.conf`): the node's mesh DNS, searching the
/// node's workloads and the mesh.
pub fn resolv_conf(gateway: Ipv4Addr, node: &str, domain: &str) -> String {
    format!(
        "# written by meshd for this workload namespace\nnameserver {gateway}\nsearch {node}.{domain} {domain}\noptions ndots:1\n"
    )
}

/// The Docker network on the same bridge and /24: Docker hands out `.128`-`.254`, meshd does
/// the routing and masquerading (Docker's own masquerade would hide containers' addresses from
/// the mesh).
pub fn docker_network_args(bridge: &str, gateway: Ipv4Addr, name: &str) -> Vec<String> {
    let o = gateway.octets();
    let subnet = format!("{}.{}.{}.0/24", o[0], o[1], o[2]);
    let upper = format!("{}.{}.{}.{}/25", o[0], o[1], o[2], DOCKER_HOSTS.start());
    [
        "network",
        "create",
        "--driver",
        "bridge",
        "--subnet",
        &subnet,
        "--gateway",
        &gateway.to_string(),
        "--ip-range",
        &upper,
        "-o",
        &format!("com.docker.network.bridge.name={bridge}"),
        "-o",
        "com.docker.network.bridge.enable_ip_masquerade=false",
        "-o",
        "com.docker.network.driver.mtu=1420",
        name,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range() -> MeshRange {
        "10.210.0.0/16".parse().unwrap()
    }

    fn w(name: &str, host: u8) -> WorkloadDef {
        WorkloadDef {
            name: name.into(),
            host,
        }
    }

    #[test]
    fn addresses_are_the_first_free_or_the_one_asked_for_checked() {
        let r = range();
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        assert_eq!(plan_add(&[], "web", None, &r, 5,).unwrap(), w("web", 2));
        let have = [w("a", 2), w("b", 4)];
        assert_eq!(plan_add(&have, "c", None, &r, 5).unwrap().host, 3);
        assert_eq!(
            plan_add(&have, "c", Some(ip("10.210.5.200")), &r, 5).unwrap(),
            w("c", 200)
        );
        assert_eq!(
            plan_add(&have, "a", None, &r, 5),
            Err(PlanError::Exists("a".into()))
        );
        assert_eq!(
            plan_add(&have, "c", Some(ip("10.210.5.4")), &r, 5),
            Err(PlanError::Taken {
                ip: ip("10.210.5.4"),
                by: "b".into()
            })
        );
        assert!(matches!(
            plan_add(&have, "c", Some(ip("10.210.6.9")), &r, 5),
            Err(PlanError::OutsideSubnet { .. })
        ));
        for reserved in ["10.210.5.0", "10.210.5.1", "10.210.5.255"] {
            assert_eq!(
                plan_add(&have, "c", Some(ip(reserved)), &r, 5),
                Err(PlanError::Reserved(ip(reserved)))
            );
        }
        for bad in ["", "-x", "x-", "has space", "UPPER", "a.b", &"x".repeat(64)] {
            assert_eq!(
                plan_add(&have, bad, None, &r, 5),
                Err(PlanError::BadName(bad.to_string())),
                "{bad:?}"
            );
        }
        let full: Vec<WorkloadDef> = AUTO_HOSTS.map(|h| w(&format!("w{h}"), h)).collect();
        assert_eq!(plan_add(&full, "x", None, &r, 5), Err(PlanError::Full));
        // Docker's half stays usable when asked for by address.
        assert_eq!(
            plan_add(&full, "x", Some(ip("10.210.5.130")), &r, 5)
                .unwrap()
                .host,
            130
        );
        assert_eq!(w("x", 130).ip(&r, 7), ip("10.210.7.130"), "follows the /24");
        assert_eq!(w("x", 130).veth(), "mw-130");
    }

    #[test]
    fn the_table_confines_the_bridge_to_its_subnet_and_the_mesh() {
        let p = BridgePlan {
            bridge: "meshbr0".into(),
            tun: "mesh0".into(),
            range: range(),
            slot: 5,
            host_forwarded: true,
        };
        let t = p.nft_ruleset();
        assert!(t.starts_with("table inet meshd {"));
        assert!(t.contains(
            "iifname \"meshbr0\" ip saddr != 10.210.5.0/24 ip saddr != 0.0.0.0 counter name \"forged\" drop"
        ));
        assert!(
            t.contains("oifname \"meshbr0\" iifname != { \"mesh0\", \"meshbr0\" } counter drop")
        );
        assert!(t.contains(
            "ip saddr 10.210.5.0/24 ip daddr != 10.210.0.0/16 oifname != \"meshbr0\" masquerade"
        ));
        assert!(!t.contains("did not forward"));
        let closed = BridgePlan {
            host_forwarded: false,
            ..p.clone()
        };
        assert!(closed
            .nft_ruleset()
            .contains("did not forward before meshd"));
        assert_eq!(p.gateway(), "10.210.5.1".parse::<Ipv4Addr>().unwrap());
    }

    #[test]
    fn a_namespace_resolves_through_its_node() {
        let r = resolv_conf("10.210.5.1".parse().unwrap(), "alpha", "mesh.internal");
        assert!(r.contains("nameserver 10.210.5.1\n"));
        assert!(r.contains("search alpha.mesh.internal mesh.internal\n"));
        let d = docker_network_args("meshbr0", "10.210.5.1".parse().unwrap(), "mesh").join(" ");
        assert_eq!(
            d,
            "network create --driver bridge --subnet 10.210.5.0/24 --gateway 10.210.5.1 \
             --ip-range 10.210.5.128/25 -o com.docker.network.bridge.name=meshbr0 -o \
             com.docker.network.bridge.enable_ip_masquerade=false -o \
             com.docker.network.driver.mtu=1420 mesh"
        );
    }
}
