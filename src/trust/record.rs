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
