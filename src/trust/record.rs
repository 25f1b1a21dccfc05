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
