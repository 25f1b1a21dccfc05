//! One WireGuard peer: its `Tunn`, its endpoints and its counters.

use crate::trust::{Key32, NodeId};
use boringtun::noise::Tunn;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

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

/// If an initiation sent to the current endpoint got no authenticated answer within this long,
/// the next initiation goes to the next candidate.
const ROTATE_AFTER: Duration = Duration::from_secs(4);
/// An endpoint learnt from authenticated traffic is kept over gossiped candidates this long.
const ROAMED_ENDPOINT_STICKY: Duration = Duration::from_secs(30);

/// Endpoint selection: roaming (follow the last authenticated packet) plus trying the gossiped
/// candidates in turn while handshakes go unanswered. Pure state, `now` passed in.
#[derive(Debug, Default)]
pub struct Endpoints {
    current: Option<SocketAddr>,
    candidates: Vec<SocketAddr>,
    last_init: Option<(Instant, SocketAddr)>,
    last_auth_rx: Option<Instant>,
}

impl Endpoints {
    pub fn new(candidates: Vec<SocketAddr>) -> Endpoints {
        Endpoints {
            current: candidates.first().copied(),
            candidates,
            ..Default::default()
        }
    }

    pub fn current(&self) -> Option<SocketAddr> {
        self.current
    }

    pub fn candidates(&self) -> &[SocketAddr] {
        &self.candidates
    }

    /// How long ago the last authenticated packet arrived.
    pub fn heard(&self, now: Instant) -> Option<Duration> {
        self.last_auth_rx.map(|r| now.saturating_duration_since(r))
    }

    /// An authenticated packet arrived from `from`. Returns true if the endpoint moved.
    pub fn authenticated(&mut self, from: SocketAddr, now: Instant) -> bool {
        self.last_auth_rx = Some(now);
        let moved = self.current != Some(from);
        self.current = Some(from);
        moved
    }

    /// A handshake initiation is about to be sent: pick where to. Rotates to the next candidate
    /// when the previous initiation to the current endpoint went unanswered.
    pub fn for_initiation(&mut self, now: Instant) -> Option<SocketAddr> {
        if let (Some((sent, to)), Some(cur)) = (self.last_init, self.current) {
            let answered = self.last_auth_rx.is_some_and(|r| r >= sent);
            if to == cur
                && !answered
                && now.duration_since(sent) >= ROTATE_AFTER
                && !self.candidates.is_empty()
            {
                let next = match self.candidates.iter().position(|c| *c == cur) {
                    Some(i) => self.candidates[(i + 1) % self.candidates.len()],
                    None => self.candidates[0],
                };
                self.current = Some(next);
            }
        }
        if self.current.is_none() {
            self.current = self.candidates.first().copied();
        }
        if let Some(c) = self.current {
            self.last_init = Some((now, c));
        }
        self.current
    }

    /// New candidates from gossip. The current endpoint stays if it was confirmed recently by
    /// authenticated traffic (it may be a NAT mapping nobody gossips).
    pub fn set_candidates(&mut self, candidates: Vec<SocketAddr>, now: Instant) {
        if candidates == self.candidates {
            return;
        }
        let fresh = self
            .last_auth_rx
            .is_some_and(|r| now.duration_since(r) < ROAMED_ENDPOINT_STICKY);
        let keep = self
            .current
            .is_some_and(|c| fresh || candidates.contains(&c));
        if !keep {
            self.current = candidates.first().copied();
        }
        self.candidates = candidates;
    }
}

#[derive(Debug, Default)]
pub struct PeerCounters {
    /// Decrypted packets whose source address was outside the peer's /24.
    pub dropped_bad_source: AtomicU64,
    pub rx_packets: AtomicU64,
    pub tx_packets: AtomicU64,
}

pub struct Peer {
    pub node_id: NodeId,
    pub wg: Key32,
    /// Local session index (boringtun uses `index << 8 | session`).
    pub index: u32,
    pub(crate) name: Mutex<String>,
    slot: AtomicU32,
    pub(crate) tunn: Mutex<Tunn>,
    pub(crate) endpoints: Mutex<Endpoints>,
    pub(crate) last_retry: Mutex<Option<Instant>>,
    pub counters: PeerCounters,
}

impl Peer {
    pub(crate) fn new(spec: &PeerSpec, index: u32, tunn: Tunn) -> Peer {
        Peer {
            node_id: spec.node_id,
            wg: spec.wg,
            index,
            name: Mutex::new(spec.name.clone()),
            slot: AtomicU32::new(spec.slot),
            tunn: Mutex::new(tunn),
            endpoints: Mutex::new(Endpoints::new(spec.endpoints.clone())),
            last_retry: Mutex::new(None),
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
        self.endpoints.lock().unwrap().current()
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

#[cfg(test)]
mod tests {
    use super::*;

    fn a(p: u16) -> SocketAddr {
        SocketAddr::from(([192, 0, 2, 1], p))
    }

    #[test]
    fn unanswered_initiations_walk_the_candidates() {
        let t0 = Instant::now();
        let mut e = Endpoints::new(vec![a(1), a(2), a(3)]);
        assert_eq!(e.for_initiation(t0), Some(a(1)));
        // boringtun retries after REKEY_TIMEOUT (5 s): next candidate.
        assert_eq!(e.for_initiation(t0 + Duration::from_secs(5)), Some(a(2)));
        assert_eq!(e.for_initiation(t0 + Duration::from_secs(10)), Some(a(3)));
        assert_eq!(e.for_initiation(t0 + Duration::from_secs(15)), Some(a(1)));
        // A quick retransmission does not rotate.
        assert_eq!(e.for_initiation(t0 + Duration::from_secs(16)), Some(a(1)));
    }

    #[test]
    fn authenticated_traffic_pins_and_roams() {
        let t0 = Instant::now();
        let mut e = Endpoints::new(vec![a(1), a(2)]);
        e.for_initiation(t0);
        assert!(e.authenticated(a(9), t0 + Duration::from_secs(1)));
        // Answered: no rotation, and the roamed address is used.
        assert_eq!(e.for_initiation(t0 + Duration::from_secs(6)), Some(a(9)));
        // New gossip does not override a fresh roamed endpoint...
        e.set_candidates(vec![a(4)], t0 + Duration::from_secs(7));
        assert_eq!(e.current(), Some(a(9)));
        // ...but does once it has gone stale.
        e.set_candidates(vec![a(5)], t0 + Duration::from_secs(100));
        assert_eq!(e.current(), Some(a(5)));
    }
}
