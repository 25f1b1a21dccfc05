//! Which path a peer's packets take (sans-IO, `now` passed in): direct to one of its endpoints,
//! or through a relay (a member both reach, forwarding the pair's own WireGuard ciphertext
//! behind a session header, [`super::relay`]).
//!
//! Without a relay this is plain WireGuard roaming: follow the last authenticated packet, and
//! walk the gossiped candidates while handshakes go unanswered. With one, the rules the best
//! systems converged on (DESIGN "Paths between nodes"):
//!
//! - the direct path counts only after a two-way exchange on it ([`Paths::proved`]): a
//!   handshake answer that arrived directly (the initiation went out directly: answers go back
//!   the way their question came), or data arriving directly just after this node answered a
//!   handshake directly;
//! - direct beats relayed: a relayed peer moves to the direct path as soon as it is proved
//!   again, and back to the relay only when the direct path stops answering ([`STALL`] after
//!   unanswered data, with a handshake sent [`NUDGE_AFTER`] into the silence to ask), or has
//!   been silent [`DIRECT_TRUST`]. A fresh proof is needed after every fall-back, so paths do
//!   not flap.

use crate::id::NodeId;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// If an initiation sent to the current endpoint got no authenticated answer within this long,
/// the next initiation goes to the next candidate.
const ROTATE_AFTER: Duration = Duration::from_secs(4);
/// An endpoint learnt from authenticated traffic is kept over gossiped candidates this long.
const ROAMED_ENDPOINT_STICKY: Duration = Duration::from_secs(30);
/// Data arriving directly this soon after this node answered a handshake directly proves the
/// direct path both ways (the answer reached the peer: it used the session it set up).
const PROOF_WINDOW: Duration = Duration::from_secs(5);
/// A direct path with a relay beside it is trusted while authenticated packets arrived on it
/// this recently (idle tunnels hear a keepalive every 25 s).
pub const DIRECT_TRUST: Duration = Duration::from_secs(35);
/// Data sent on the path in use and unanswered this long: ask with a handshake.
pub const NUDGE_AFTER: Duration = Duration::from_secs(2);
/// ...and this long: the path is dropped for the next one.
pub const STALL: Duration = Duration::from_secs(6);
/// Relays remembered per peer: the one in use and one more (answers arrive through either).
pub const MAX_RELAYS: usize = 2;

/// Where one datagram goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    Direct(SocketAddr),
    /// To the relay at `via`, behind the header of `session`.
    Relay {
        via: SocketAddr,
        session: u64,
    },
}

impl Route {
    /// The address the datagram is sent to.
    pub fn to(&self) -> SocketAddr {
        match self {
            Route::Direct(a) => *a,
            Route::Relay { via, .. } => *via,
        }
    }
}

/// How an authenticated packet arrived.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    Direct,
    Relay(u64),
}

/// What kind of authenticated packet arrived.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Heard {
    /// An answer to this node's handshake initiation.
    HandshakeAnswer,
    /// A handshake initiation (it proves nothing of the way back).
    Initiation,
    Data,
}

/// A relay this peer is reached through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RelayPath {
    /// The member that relays.
    pub node: NodeId,
    /// Its endpoint (where this node's tunnel to it sends).
    pub via: SocketAddr,
    pub session: u64,
}

/// The path in use, for status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathKind {
    Direct,
    Relay(RelayPath),
}

#[derive(Debug)]
pub struct Paths {
    current: Option<SocketAddr>,
    candidates: Vec<SocketAddr>,
    last_init: Option<(Instant, SocketAddr)>,
    /// Last authenticated packet, any path.
    last_auth_rx: Option<Instant>,
    /// Last authenticated packet that arrived directly.
    direct_rx: Option<Instant>,
    /// Last two-way exchange on the direct path.
    proved: Option<Instant>,
    /// Last handshake answer this node sent directly.
    answered_direct: Option<Instant>,
    relays: Vec<RelayPath>,
    /// Sending through `relays[0]` (only ever with a relay).
    relayed: bool,
    /// When the path in use last changed.
    switched: Option<Instant>,
    /// First data sent on the path in use since it was last heard from.
    unanswered: Option<Instant>,
    last_nudge: Option<Instant>,
    switches: u64,
}

impl Paths {
    pub fn new(candidates: Vec<SocketAddr>) -> Paths {
        Paths {
            current: candidates.first().copied(),
            candidates,
            last_init: None,
            last_auth_rx: None,
            direct_rx: None,
            proved: None,
            answered_direct: None,
            relays: Vec::new(),
            relayed: false,
            switched: None,
            unanswered: None,
            last_nudge: None,
            switches: 0,
        }
    }

    /// The direct endpoint.
    pub fn current(&self) -> Option<SocketAddr> {
        self.current
    }

    pub fn candidates(&self) -> &[SocketAddr] {
        &self.candidates
    }

    pub fn relays(&self) -> &[RelayPath] {
        &self.relays
    }

    /// How many times the path in use changed.
    pub fn switches(&self) -> u64 {
        self.switches
    }

    /// How long ago the last authenticated packet arrived (any path).
    pub fn heard(&self, now: Instant) -> Option<Duration> {
        self.last_auth_rx.map(|r| now.saturating_duration_since(r))
    }

    /// How long ago the direct path last proved itself both ways.
    pub fn proved(&self, now: Instant) -> Option<Duration> {
        self.proved.map(|r| now.saturating_duration_since(r))
    }

    pub fn kind(&self) -> PathKind {
        match (self.relayed, self.relays.first()) {
            (true, Some(r)) => PathKind::Relay(*r),
            _ => PathKind::Direct,
        }
    }

    /// The relay whose session is `session`, if this peer is reached through it at `from`.
    pub fn relay_session(&self, session: u64, from: SocketAddr) -> bool {
        self.relays
            .iter()
            .any(|r| r.session == session && r.via == from)
    }

    fn direct_good(&self, now: Instant) -> bool {
        self.proved.is_some()
            && self
                .direct_rx
                .is_some_and(|r| now.saturating_duration_since(r) < DIRECT_TRUST)
    }

    fn stalled(&self, now: Instant) -> bool {
        self.unanswered
            .is_some_and(|t| now.saturating_duration_since(t) >= STALL)
    }

    fn switch(&mut self, relayed: bool, now: Instant) {
        if self.relayed != relayed {
            self.relayed = relayed;
            self.switches += 1;
        }
        self.switched = Some(now);
        self.unanswered = None;
    }

    /// Apply the path rules at `now`.
    fn choose(&mut self, now: Instant) {
        if self.relays.is_empty() {
            self.relayed = false;
            return;
        }
        if self.relayed {
            let fresh_proof = self
                .proved
                .is_some_and(|p| self.switched.is_none_or(|s| p > s));
            if fresh_proof && self.direct_good(now) {
                self.switch(false, now);
            } else if self.stalled(now) && self.relays.len() > 1 {
                // This relay stopped answering: the next one.
                self.relays.rotate_left(1);
                self.switched = Some(now);
                self.unanswered = None;
                self.switches += 1;
            }
        } else if !self.direct_good(now) || self.stalled(now) {
            self.switch(true, now);
        }
    }

    /// Where data goes now. Records it as sent, for stall detection.
    pub fn route_data(&mut self, now: Instant) -> Option<Route> {
        self.choose(now);
        let r = self.route_now();
        if r.is_some() && self.unanswered.is_none() && !self.relays.is_empty() {
            self.unanswered = Some(now);
        }
        r
    }

    /// Where a reply (handshake answer, keepalive) goes now.
    pub fn route(&mut self, now: Instant) -> Option<Route> {
        self.choose(now);
        self.route_now()
    }

    fn route_now(&self) -> Option<Route> {
        match (self.relayed, self.relays.first()) {
            (true, Some(r)) => Some(Route::Relay {
                via: r.via,
                session: r.session,
            }),
            _ => self.current.map(Route::Direct),
        }
    }

    /// The route of a packet that arrived `via`: answers go back the way they came.
    pub fn route_back(&self, via: Via) -> Option<Route> {
        match via {
            Via::Direct => self.current.map(Route::Direct),
            Via::Relay(s) => self
                .relays
                .iter()
                .find(|r| r.session == s)
                .map(|r| Route::Relay {
                    via: r.via,
                    session: r.session,
                }),
        }
    }

    /// Whether to ask the path in use for an answer now (data unanswered for
    /// [`NUDGE_AFTER`]); only with a relay to fall back to, at most once per nudge period.
    pub fn nudge(&mut self, now: Instant) -> bool {
        self.choose(now);
        let due = !self.relays.is_empty()
            && self
                .unanswered
                .is_some_and(|t| now.saturating_duration_since(t) >= NUDGE_AFTER)
            && self
                .last_nudge
                .is_none_or(|t| now.saturating_duration_since(t) >= NUDGE_AFTER);
        if due {
            self.last_nudge = Some(now);
        }
        due
    }

    /// An authenticated packet arrived `via` from `from`. Returns true if the direct endpoint
    /// moved.
    pub fn heard_from(&mut self, via: Via, from: SocketAddr, what: Heard, now: Instant) -> bool {
        self.last_auth_rx = Some(now);
        let in_use = match via {
            Via::Direct => !self.relayed,
            Via::Relay(s) => self.relayed && self.relays.first().is_some_and(|r| r.session == s),
        };
        if in_use {
            self.unanswered = None;
        }
        match via {
            Via::Relay(_) => false,
            Via::Direct => {
                self.direct_rx = Some(now);
                let proof = match what {
                    Heard::HandshakeAnswer => true,
                    Heard::Data => self
                        .answered_direct
                        .is_some_and(|t| now.saturating_duration_since(t) < PROOF_WINDOW),
                    Heard::Initiation => false,
                };
                if proof {
                    self.proved = Some(now);
                }
                let moved = self.current != Some(from);
                self.current = Some(from);
                moved
            }
        }
    }

    /// This node sent a handshake answer on `route`.
    pub fn answered(&mut self, route: Route, now: Instant) {
        if matches!(route, Route::Direct(_)) {
            self.answered_direct = Some(now);
        }
    }

    /// A handshake initiation is about to be sent: where to. On the direct path, rotates to the
    /// next candidate when the previous initiation to the current endpoint went unanswered.
    pub fn for_initiation(&mut self, now: Instant) -> Option<Route> {
        self.choose(now);
        if self.relayed {
            return self.route_now();
        }
        if let (Some((sent, to)), Some(cur)) = (self.last_init, self.current) {
            let answered = self.direct_rx.is_some_and(|r| r >= sent);
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
        self.current.map(Route::Direct)
    }

    /// New candidates from gossip. The current endpoint stays if it was confirmed recently by
    /// authenticated traffic (it may be a NAT mapping nobody gossips).
    pub fn set_candidates(&mut self, candidates: Vec<SocketAddr>, now: Instant) {
        if candidates == self.candidates {
            return;
        }
        let fresh = self
            .direct_rx
            .is_some_and(|r| now.duration_since(r) < ROAMED_ENDPOINT_STICKY);
        let keep = self
            .current
            .is_some_and(|c| fresh || candidates.contains(&c));
        if !keep {
            self.current = candidates.first().copied();
        }
        self.candidates = candidates;
    }

    /// Reach the peer through `relay` too (first: the one to send through). Returns whether
    /// anything changed.
    pub fn add_relay(&mut self, relay: RelayPath, first: bool, now: Instant) -> bool {
        let before = self.relays.clone();
        self.relays.retain(|r| r.node != relay.node);
        if first {
            self.relays.insert(0, relay);
        } else {
            self.relays.push(relay);
        }
        self.relays.truncate(MAX_RELAYS);
        if before.is_empty() {
            // The first relay: taken at once unless the direct path works.
            self.relayed = false;
            if !self.direct_good(now) {
                self.switch(true, now);
            }
        } else if before.first() != self.relays.first() && self.relayed {
            self.switched = Some(now);
            self.unanswered = None;
        }
        before != self.relays
    }

    /// Stop using the relay `node` for this peer.
    pub fn remove_relay(&mut self, node: &NodeId, now: Instant) -> bool {
        let before = self.relays.len();
        let was_first = self.relays.first().is_some_and(|r| r.node == *node);
        self.relays.retain(|r| r.node != *node);
        if self.relays.is_empty() && self.relayed {
            self.switch(false, now);
        } else if was_first && self.relayed {
            self.switched = Some(now);
            self.unanswered = None;
        }
        self.relays.len() != before
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(p: u16) -> SocketAddr {
        SocketAddr::from(([192, 0, 2, 1], p))
    }
    fn relay(n: u8, session: u64) -> RelayPath {
        RelayPath {
            node: NodeId([n; 8]),
            via: SocketAddr::from(([203, 0, 113, n], 51820)),
            session,
        }
    }
    fn s(x: u64) -> Duration {
        Duration::from_secs(x)
    }

    #[test]
    fn unanswered_initiations_walk_the_candidates() {
        let t0 = Instant::now();
        let mut e = Paths::new(vec![a(1), a(2), a(3)]);
        let d = |r: Option<Route>| r.map(|r| r.to());
        assert_eq!(d(e.for_initiation(t0)), Some(a(1)));
        // boringtun retries after REKEY_TIMEOUT (5 s): next candidate.
        assert_eq!(d(e.for_initiation(t0 + s(5))), Some(a(2)));
        assert_eq!(d(e.for_initiation(t0 + s(10))), Some(a(3)));
        assert_eq!(d(e.for_initiation(t0 + s(15))), Some(a(1)));
        // A quick retransmission does not rotate.
        assert_eq!(d(e.for_initiation(t0 + s(16))), Some(a(1)));
    }

    #[test]
    fn authenticated_traffic_pins_and_roams() {
        let t0 = Instant::now();
        let mut e = Paths::new(vec![a(1), a(2)]);
        e.for_initiation(t0);
        assert!(e.heard_from(Via::Direct, a(9), Heard::Data, t0 + s(1)));
        // Answered: no rotation, and the roamed address is used.
        assert_eq!(e.for_initiation(t0 + s(6)), Some(Route::Direct(a(9))));
        // New gossip does not override a fresh roamed endpoint...
        e.set_candidates(vec![a(4)], t0 + s(7));
        assert_eq!(e.current(), Some(a(9)));
        // ...but does once it has gone stale.
        e.set_candidates(vec![a(5)], t0 + s(100));
        assert_eq!(e.current(), Some(a(5)));
    }

    #[test]
    fn without_a_relay_every_packet_goes_direct_whatever_happens() {
        let t0 = Instant::now();
        let mut e = Paths::new(vec![a(1)]);
        for i in 0..100 {
            assert_eq!(e.route_data(t0 + s(i)), Some(Route::Direct(a(1))));
            assert!(!e.nudge(t0 + s(i)));
        }
        assert_eq!(e.kind(), PathKind::Direct);
    }

    #[test]
    fn a_relay_carries_a_peer_without_a_direct_path_until_the_direct_one_is_proved() {
        let t0 = Instant::now();
        let mut e = Paths::new(vec![a(1)]);
        let r = relay(7, 42);
        // Punch initiations arrive directly, but that says nothing of the way back.
        e.heard_from(Via::Direct, a(1), Heard::Initiation, t0);
        assert!(e.add_relay(r, true, t0));
        let via_relay = Some(Route::Relay {
            via: r.via,
            session: 42,
        });
        assert_eq!(e.route_data(t0), via_relay);
        assert_eq!(e.kind(), PathKind::Relay(r));
        // Relayed answers keep it there; answers go back the way they came.
        e.heard_from(Via::Relay(42), r.via, Heard::Data, t0 + s(1));
        assert_eq!(e.route_back(Via::Direct), Some(Route::Direct(a(1))));
        assert_eq!(e.route_back(Via::Relay(42)), via_relay);
        assert_eq!(e.route_data(t0 + s(2)), via_relay);
        // A handshake answered directly: the direct path is proved and wins.
        e.heard_from(Via::Direct, a(1), Heard::HandshakeAnswer, t0 + s(3));
        assert_eq!(e.route_data(t0 + s(3)), Some(Route::Direct(a(1))));
        assert_eq!(e.switches(), 2);
        // Relayed traffic still arriving does not move it back.
        e.heard_from(Via::Relay(42), r.via, Heard::Data, t0 + s(4));
        assert_eq!(e.route(t0 + s(4)), Some(Route::Direct(a(1))));
    }

    #[test]
    fn data_after_a_direct_answer_proves_the_direct_path_for_the_answering_side() {
        let t0 = Instant::now();
        let mut e = Paths::new(vec![a(1)]);
        e.add_relay(relay(7, 42), true, t0);
        e.heard_from(Via::Direct, a(1), Heard::Initiation, t0);
        e.answered(Route::Direct(a(1)), t0);
        e.heard_from(Via::Direct, a(1), Heard::Data, t0 + s(1));
        assert_eq!(e.route_data(t0 + s(1)), Some(Route::Direct(a(1))));
        // Without the answer, direct data alone is not a proof.
        let mut e = Paths::new(vec![a(1)]);
        e.add_relay(relay(7, 42), true, t0);
        e.heard_from(Via::Direct, a(1), Heard::Data, t0);
        assert!(matches!(e.route_data(t0), Some(Route::Relay { .. })));
    }

    #[test]
    fn a_direct_path_that_stops_answering_falls_back_and_needs_a_new_proof() {
        let t0 = Instant::now();
        let mut e = Paths::new(vec![a(1)]);
        e.heard_from(Via::Direct, a(1), Heard::HandshakeAnswer, t0);
        e.add_relay(relay(7, 42), true, t0);
        assert_eq!(e.route_data(t0), Some(Route::Direct(a(1))), "direct works");
        // Sent, nothing back: a nudge after NUDGE_AFTER, the relay after STALL.
        assert!(!e.nudge(t0 + s(1)));
        assert!(e.nudge(t0 + NUDGE_AFTER));
        assert!(!e.nudge(t0 + NUDGE_AFTER + s(1)), "not again at once");
        assert_eq!(e.route_data(t0 + s(5)), Some(Route::Direct(a(1))));
        assert!(matches!(
            e.route_data(t0 + STALL),
            Some(Route::Relay { .. })
        ));
        // Direct packets that are not a new proof do not bring it back (no flapping).
        e.heard_from(Via::Direct, a(1), Heard::Data, t0 + s(7));
        assert!(matches!(e.route_data(t0 + s(8)), Some(Route::Relay { .. })));
        e.heard_from(Via::Direct, a(1), Heard::HandshakeAnswer, t0 + s(9));
        assert_eq!(e.route_data(t0 + s(9)), Some(Route::Direct(a(1))));
        // An idle direct path is trusted DIRECT_TRUST after it was last heard.
        e.heard_from(Via::Direct, a(1), Heard::Data, t0 + s(10));
        assert_eq!(
            e.route(t0 + s(10) + DIRECT_TRUST - s(1)),
            Some(Route::Direct(a(1)))
        );
        assert!(matches!(
            e.route(t0 + s(10) + DIRECT_TRUST),
            Some(Route::Relay { .. })
        ));
    }

    #[test]
    fn a_silent_relay_gives_way_to_the_next_and_a_removed_one_goes() {
        let t0 = Instant::now();
        let mut e = Paths::new(vec![a(1)]);
        let (r1, r2) = (relay(7, 1), relay(8, 2));
        e.add_relay(r1, true, t0);
        e.add_relay(r2, false, t0);
        assert_eq!(e.kind(), PathKind::Relay(r1));
        // Frames of either session are the peer's; others are not.
        assert!(e.relay_session(1, r1.via) && e.relay_session(2, r2.via));
        assert!(!e.relay_session(1, r2.via) && !e.relay_session(3, r1.via));
        e.route_data(t0);
        e.route_data(t0 + STALL);
        assert_eq!(e.kind(), PathKind::Relay(r2), "stalled: the next relay");
        e.heard_from(Via::Relay(2), r2.via, Heard::Data, t0 + STALL);
        assert_eq!(e.kind(), PathKind::Relay(r2));
        assert!(e.remove_relay(&r2.node, t0 + s(10)));
        assert_eq!(e.kind(), PathKind::Relay(r1));
        assert!(e.remove_relay(&r1.node, t0 + s(10)));
        assert_eq!(e.kind(), PathKind::Direct);
        assert_eq!(e.route(t0 + s(10)), Some(Route::Direct(a(1))));
        // At most MAX_RELAYS are kept.
        for n in 0..5 {
            e.add_relay(relay(n, n as u64), false, t0);
        }
        assert_eq!(e.relays().len(), MAX_RELAYS);
    }
}
