//! One WireGuard peer: its `Tunn`, its endpoints and its counters.

use crate::trust::{Key32, NodeId};
use boringtun::noise::Tunn;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub use super::path::{PathKind, Paths};

/// What the control plane wants the data plane to have for one peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerSpec {
    pub node_id: NodeId,
    pub name: String,
    pub wg: Key32,
    pub slot: u32,
    /// Candidate endpoints, best first.
    pub endpoints: Vec<SocketAddr>,
}

#[derive(Debug, Default)]
pub struct PeerCounters {
    /// Decrypted packets whose source address was outside the peer's /24.
    pub dropped_bad_source: AtomicU64,
    pub rx_packets: AtomicU64,
    pub tx_packets: AtomicU64,
    /// Packets waiting for a session now.
    pub waiting: AtomicU64,
}

pub struct Peer {
    pub node_id: NodeId,
    pub wg: Key32,
    /// Local session index (boringtun uses `index << 8 | session`).
    pub index: u32,
    /// The order of this peer's reads in the receive lanes.
    pub(crate) order: crate::mesh::device::Order,
    pub(crate) name: Mutex<String>,
    slot: AtomicU32,
    pub(crate) tunn: Mutex<Tunn>,
    pub(crate) paths: Mutex<Paths>,
    pub(crate) last_retry: Mutex<Option<Instant>>,
    /// Packets for the peer while its tunnel has no session, sent once it has one (bounded
    /// per peer and across peers by the device).
    pub(crate) waiting: Mutex<VecDeque<Vec<u8>>>,
    /// Removed from the device: nothing may wait for it any more (set before its queue is
    /// emptied, read under the queue's lock).
    pub(crate) removed: AtomicBool,
    pub counters: PeerCounters,
}

impl Peer {
    pub(crate) fn new(spec: &PeerSpec, index: u32, tunn: Tunn) -> Peer {
        Peer {
            node_id: spec.node_id,
            wg: spec.wg,
            index,
            order: Default::default(),
            name: Mutex::new(spec.name.clone()),
            slot: AtomicU32::new(spec.slot),
            tunn: Mutex::new(tunn),
            paths: Mutex::new(Paths::new(spec.endpoints.clone())),
            last_retry: Mutex::new(None),
            waiting: Mutex::new(VecDeque::new()),
            removed: AtomicBool::new(false),
            counters: PeerCounters::default(),
        }
    }

    pub fn slot(&self) -> u32 {
        self.slot.load(Ordering::Relaxed)
    }

    pub(crate) fn set_slot(&self, slot: u32) {
        self.slot.store(slot, Ordering::Relaxed)
    }

    pub fn name(&self) -> String {
        self.name.lock().unwrap().clone()
    }

    pub fn endpoint(&self) -> Option<SocketAddr> {
        self.paths.lock().unwrap().current()
    }
}

/// A snapshot of one peer for status output.
#[derive(Clone, Debug)]
pub struct PeerStats {
    pub node_id: NodeId,
    pub name: String,
    pub wg: Key32,
    pub slot: u32,
    pub endpoint: Option<SocketAddr>,
    /// Since the last authenticated packet from the peer.
    pub last_rx: Option<Duration>,
    pub last_handshake: Option<Duration>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub dropped_bad_source: u64,
    /// The path in use: direct, or through which relay.
    pub path: PathKind,
    /// Times the path in use changed.
    pub path_switches: u64,
}

impl PeerStats {
    /// Whether the tunnel has a session it may use: a handshake within REJECT_AFTER_TIME
    /// (WireGuard whitepaper 6.1). The one "tunnel is up" rule: status, invites and the
    /// bootstrap fallback all ask this.
    pub fn has_session(&self) -> bool {
        self.last_handshake
            .is_some_and(|d| d < crate::constants::REJECT_AFTER_TIME)
    }
}
