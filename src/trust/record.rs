//! What a node publishes about itself, signed with its identity key.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

/// A node's signed self-description. `seq` only grows (unix milliseconds at publication), so a
/// replayed older record is recognised and ignored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub identity: [u8; 32],
    pub seq: u64,
    /// Where other nodes can reach this one, best first.
    pub endpoints: Vec<SocketAddr>,
    /// The slot candidate index this node holds (see `mesh::addressing`).
    pub slot_k: u32,
    /// Set when the node has left the mesh for good (`meshd leave`).
    pub left: bool,
}

/// One service a node offers (`meshctl service add`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, PartialOrd, Ord)]
pub struct ServiceDef {
    /// A DNS label: the service answers as `NAME.svc.<domain>`.
    pub name: String,
    pub port: u16,
    /// An address of the node's /24 (a container's, say); `None` is the node's own `.1`.
    #[serde(default)]
    pub address: Option<std::net::Ipv4Addr>,
}

/// The services a node publishes, signed with its identity key, replacing earlier versions
/// (`seq` only grows).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicesRecord {
    pub identity: [u8; 32],
    pub seq: u64,
    pub services: Vec<ServiceDef>,
}

/// The hostnames a node serves through gateways (`meshctl expose`) and whether it offers itself
/// as an exit node. Where the connections go on the node stays local.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutesRecord {
    pub identity: [u8; 32],
    pub seq: u64,
    /// Hostnames and `*.wildcard` patterns.
    pub hostnames: Vec<String>,
    pub exit_node: bool,
}

/// What software a node runs, published once at start so `meshctl status` and `meshctl version`
/// can show each peer's version and warn on skew. A key of its own (not a field of the node
/// record) so members on older releases, which refuse records with bytes they do not know,
/// simply ignore it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AboutRecord {
    pub identity: [u8; 32],
    pub seq: u64,
    /// `--version`: the package version and the commit.
    pub version: String,
    /// The machine: `x86_64-linux`, `aarch64-linux`.
    pub platform: String,
}

/// One named workload of a node's /24 (`meshctl workload add`): `NAME.NODE.<domain>` in mesh DNS.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadName {
    pub name: String,
    pub ip: std::net::Ipv4Addr,
}

/// The workloads a node names, signed with its identity key, replacing earlier versions. A key
/// of its own, so older releases ignore it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadsRecord {
    pub identity: [u8; 32],
    pub seq: u64,
    pub workloads: Vec<WorkloadName>,
}

/// A statement a node makes about itself: signed with its identity key, replaced by versions
/// with a higher `seq`.
pub trait SelfStatement: serde::de::DeserializeOwned + PartialEq {
    const CONTEXT: super::Context;
    const WHAT: &'static str;
    fn identity(&self) -> &[u8; 32];
    fn seq(&self) -> u64;
}

impl SelfStatement for NodeRecord {
    const CONTEXT: super::Context = super::Context::Record;
    const WHAT: &'static str = "node record";
    fn identity(&self) -> &[u8; 32] {
        &self.identity
    }
    fn seq(&self) -> u64 {
        self.seq
    }
}

impl SelfStatement for ServicesRecord {
    const CONTEXT: super::Context = super::Context::Services;
    const WHAT: &'static str = "services record";
    fn identity(&self) -> &[u8; 32] {
        &self.identity
    }
    fn seq(&self) -> u64 {
        self.seq
    }
}

impl SelfStatement for RoutesRecord {
    const CONTEXT: super::Context = super::Context::Hostnames;
    const WHAT: &'static str = "routes record";
    fn identity(&self) -> &[u8; 32] {
        &self.identity
    }
    fn seq(&self) -> u64 {
        self.seq
    }
}

impl SelfStatement for AboutRecord {
    const CONTEXT: super::Context = super::Context::About;
    const WHAT: &'static str = "about record";
    fn identity(&self) -> &[u8; 32] {
        &self.identity
    }
    fn seq(&self) -> u64 {
        self.seq
    }
}

impl SelfStatement for WorkloadsRecord {
    const CONTEXT: super::Context = super::Context::Workloads;
    const WHAT: &'static str = "workloads record";
    fn identity(&self) -> &[u8; 32] {
        &self.identity
    }
    fn seq(&self) -> u64 {
        self.seq
    }
}
