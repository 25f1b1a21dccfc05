//! NAT traversal, the rules (sans-IO, `now` passed in): what members observe of this node's
//! underlay address and which of those observations become candidates in its record, whether
//! its NAT maps per destination, and when to punch a path to a member with no working one.
//!
//! There is no separate server: any member that can reach two others is the observer of their
//! addresses and the go-between of their hole punch, after Tailscale's disco and Nebula's
//! lighthouses. Every message rides the tunnels (UDP to a member's mesh address, [`PATH_PORT`],
//! on a socket bound to the TUN device), so its sender is a member, authenticated by WireGuard.
//!
//! A punch: `a` has no working path to `b`. It sends a handshake initiation to each of `b`'s
//! candidates at once and asks a member it reaches to tell `b` ([`Msg::CallMe`]); that member
//! passes it on with the address it sees `a` at ([`Msg::Punch`]), and `b` sends to each of
//! `a`'s candidates. Each side's packets open its own NAT for the other's; the first
//! authenticated answer wins (the data plane follows it, as it follows any roaming peer).

use crate::id::NodeId;
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

/// UDP port of path messages on the mesh address.
pub const PATH_PORT: u16 = 7948;
/// An observation counts this long after it was made.
pub const OBSERVATION_TTL: Duration = Duration::from_secs(120);
/// Observed addresses published in the record, at most.
pub const MAX_OBSERVED: usize = 2;
/// Observers remembered, at most (the oldest go first).
const MAX_OBSERVERS: usize = 64;
/// A member with no working path is punched after this long, then twice as long each time up
/// to [`PUNCH_BACKOFF_MAX`], for as long as it stays without one.
pub const PUNCH_FIRST: Duration = Duration::from_secs(1);
pub const PUNCH_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Members asked to pass a punch on, per attempt.
pub const GO_BETWEENS: usize = 2;
/// A punch another member asks for is made at most this often per peer.
pub const PUNCH_ANSWER_EVERY: Duration = Duration::from_millis(900);

const MAGIC: &[u8; 2] = b"MT";

/// A path message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Msg {
    /// "Your datagrams reach me from `addr`."
    Seen {
        addr: SocketAddr,
    },
    /// Requester to go-between: "ask `target` to punch toward me."
    CallMe {
        target: NodeId,
    },
    /// Go-between to target: "`peer` is punching toward you; it reaches me from `seen`."
    Punch {
        peer: NodeId,
        seen: Option<SocketAddr>,
    },
    /// `meshctl ping` through the tunnel.
    Ping {
        seq: u32,
    },
    Pong {
        seq: u32,
    },
    /// Member to relay: "relay between me and `peer`" ([`super::relays`]).
    RelayAsk {
        peer: NodeId,
    },
    /// Relay to member: "you reach `peer` through me, behind `session`."
    Relayed {
        peer: NodeId,
        session: u64,
    },
    /// "Send `nonce` to my address `addr` from a port I never sent to" (is it reachable?).
    ProbeMe {
        addr: SocketAddr,
        nonce: u64,
    },
}

fn put_addr(out: &mut Vec<u8>, a: &SocketAddr) {
    match a.ip() {
        IpAddr::V4(ip) => {
            out.push(4);
            out.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            out.push(6);
            out.extend_from_slice(&ip.octets());
        }
    }
    out.extend_from_slice(&a.port().to_be_bytes());
}

fn take_addr(d: &[u8]) -> Option<(SocketAddr, &[u8])> {
    let (&family, rest) = d.split_first()?;
    let (ip, rest): (IpAddr, &[u8]) = match family {
        4 if rest.len() >= 4 => (
            Ipv4Addr::from(<[u8; 4]>::try_from(&rest[..4]).ok()?).into(),
            &rest[4..],
        ),
        6 if rest.len() >= 16 => (
            Ipv6Addr::from(<[u8; 16]>::try_from(&rest[..16]).ok()?).into(),
            &rest[16..],
        ),
        _ => return None,
    };
    if rest.len() < 2 {
        return None;
    }
    let port = u16::from_be_bytes([rest[0], rest[1]]);
    Some((SocketAddr::new(ip, port), &rest[2..]))
}

fn take_node(d: &[u8]) -> Option<(NodeId, &[u8])> {
    if d.len() < 8 {
        return None;
    }
    Some((NodeId(d[..8].try_into().ok()?), &d[8..]))
}

fn take_seq(d: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(d.try_into().ok()?))
}

impl Msg {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        match self {
            Msg::Seen { addr } => {
                out.push(1);
                put_addr(&mut out, addr);
            }
            Msg::CallMe { target } => {
                out.push(2);
                out.extend_from_slice(&target.0);
            }
            Msg::Punch { peer, seen } => {
                out.push(3);
                out.extend_from_slice(&peer.0);
                if let Some(a) = seen {
                    put_addr(&mut out, a);
                }
            }
            Msg::Ping { seq } => {
                out.push(4);
                out.extend_from_slice(&seq.to_be_bytes());
            }
            Msg::Pong { seq } => {
                out.push(5);
                out.extend_from_slice(&seq.to_be_bytes());
            }
            Msg::RelayAsk { peer } => {
                out.push(6);
                out.extend_from_slice(&peer.0);
            }
            Msg::Relayed { peer, session } => {
                out.push(7);
                out.extend_from_slice(&peer.0);
                out.extend_from_slice(&session.to_be_bytes());
            }
            Msg::ProbeMe { addr, nonce } => {
                out.push(8);
                put_addr(&mut out, addr);
                out.extend_from_slice(&nonce.to_be_bytes());
            }
        }
        out
    }

    /// Decode exactly one message (no trailing bytes); `None` for anything else.
    pub fn decode(d: &[u8]) -> Option<Msg> {
        let rest = d.strip_prefix(MAGIC)?;
        let (&kind, rest) = rest.split_first()?;
        match kind {
            1 => match take_addr(rest)? {
                (addr, []) => Some(Msg::Seen { addr }),
                _ => None,
            },
            2 => match take_node(rest)? {
                (target, []) => Some(Msg::CallMe { target }),
                _ => None,
            },
            3 => {
                let (peer, rest) = take_node(rest)?;
                let seen = match rest {
                    [] => None,
                    r => match take_addr(r)? {
                        (a, []) => Some(a),
                        _ => return None,
                    },
                };
                Some(Msg::Punch { peer, seen })
            }
            4 => Some(Msg::Ping {
                seq: take_seq(rest)?,
            }),
            5 => Some(Msg::Pong {
                seq: take_seq(rest)?,
            }),
            6 => match take_node(rest)? {
                (peer, []) => Some(Msg::RelayAsk { peer }),
                _ => None,
            },
            7 => {
                let (peer, rest) = take_node(rest)?;
                Some(Msg::Relayed {
                    peer,
                    session: u64::from_be_bytes(rest.try_into().ok()?),
                })
            }
            8 => {
                let (addr, rest) = take_addr(rest)?;
                Some(Msg::ProbeMe {
                    addr,
                    nonce: u64::from_be_bytes(rest.try_into().ok()?),
                })
            }
            _ => None,
        }
    }
}

/// Whether this node's NAT gives it one public address for every destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mapping {
    /// Fewer than two observers with different addresses: nothing can be said.
    Unknown,
    /// Observers at different addresses see the same address.
    Independent,
    /// Observers at different addresses see different ports of one address ("hard" NAT,
    /// symmetric: cloud NAT gateways, many carrier NATs). Peers reach it only if their own NAT
    /// lets in any port of an address they sent to.
    Dependent,
}

#[derive(Clone, Copy, Debug)]
pub struct Observation {
    /// Where the observer sends from, as this node sees it.
    pub observer_at: IpAddr,
    /// Where this node's datagrams come from, as the observer sees them.
    pub seen: SocketAddr,
    pub at: Instant,
}

/// What members say they see of this node's underlay address.
#[derive(Debug, Default)]
pub struct Observations {
    by_observer: HashMap<NodeId, Observation>,
}

impl Observations {
    /// `observer` (at `observer_at`) sees this node at `seen`.
    pub fn observe(
        &mut self,
        observer: NodeId,
        observer_at: IpAddr,
        seen: SocketAddr,
        now: Instant,
    ) {
        if !self.by_observer.contains_key(&observer) && self.by_observer.len() >= MAX_OBSERVERS {
            if let Some(oldest) = self
                .by_observer
                .iter()
                .min_by_key(|(_, o)| o.at)
                .map(|(id, _)| *id)
            {
                self.by_observer.remove(&oldest);
            }
        }
        self.by_observer.insert(
            observer,
            Observation {
                observer_at,
                seen,
                at: now,
            },
        );
    }

    /// Forget observations past their time; whether any went.
    pub fn prune(&mut self, now: Instant) -> bool {
        let before = self.by_observer.len();
        self.by_observer
            .retain(|_, o| now.saturating_duration_since(o.at) < OBSERVATION_TTL);
        self.by_observer.len() != before
    }

    pub fn iter(&self) -> impl Iterator<Item = (&NodeId, &Observation)> {
        self.by_observer.iter()
    }

    /// The observed addresses to publish as candidates, best first, none of `local` (already
    /// published). An address seen by observers at two or more different addresses is
    /// confirmed; once any is, unconfirmed ones are left out, so one member alone cannot add a
    /// candidate a second contradicts. With a single observer its word is all there is.
    pub fn candidates(&self, local: &[SocketAddr]) -> Vec<SocketAddr> {
        let mut by_addr: HashMap<SocketAddr, (HashSet<IpAddr>, Instant)> = HashMap::new();
        for o in self.by_observer.values() {
            if local.contains(&o.seen) || o.seen.ip().is_unspecified() || o.seen.port() == 0 {
                continue;
            }
            let e = by_addr
                .entry(o.seen)
                .or_insert_with(|| (HashSet::new(), o.at));
            e.0.insert(o.observer_at);
            e.1 = e.1.max(o.at);
        }
        let mut all: Vec<(SocketAddr, usize, Instant)> = by_addr
            .into_iter()
            .map(|(a, (who, at))| (a, who.len(), at))
            .collect();
        if all.iter().any(|(_, n, _)| *n >= 2) {
            all.retain(|(_, n, _)| *n >= 2);
        }
        all.sort_by(|x, y| y.1.cmp(&x.1).then(y.2.cmp(&x.2)).then(x.0.cmp(&y.0)));
        all.into_iter()
            .take(MAX_OBSERVED)
            .map(|(a, _, _)| a)
            .collect()
    }

    /// Whether the mapping depends on the destination, from observers at different addresses.
    pub fn mapping(&self) -> Mapping {
        let mut seen_by: HashMap<IpAddr, HashMap<IpAddr, HashSet<u16>>> = HashMap::new();
        for o in self.by_observer.values() {
            seen_by
                .entry(o.seen.ip())
                .or_default()
                .entry(o.observer_at)
                .or_default()
                .insert(o.seen.port());
        }
        let mut verdict = Mapping::Unknown;
        for observers in seen_by.values() {
            if observers.len() < 2 {
                continue;
            }
            let ports: HashSet<u16> = observers.values().flatten().copied().collect();
            if ports.len() > 1 {
                return Mapping::Dependent;
            }
            verdict = Mapping::Independent;
        }
        verdict
    }
}

/// One member as the punch schedule sees it.
#[derive(Clone, Copy, Debug)]
pub struct PathState {
    pub node: NodeId,
    /// A two-way exchange happened recently on the tunnel, on any path (it can pass a punch on).
    pub up: bool,
    /// ...and directly: a member reached only through a relay is punched still, so traffic
    /// moves to a direct path once one opens.
    pub direct: bool,
    /// Worth trying: a member not known to be down.
    pub wanted: bool,
}

/// What the schedule wants done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Send a handshake initiation to each of the member's candidates now.
    Punch(NodeId),
    /// Ask `via` to have `target` punch toward this node.
    CallMe { via: NodeId, target: NodeId },
}

#[derive(Clone, Copy, Debug)]
struct Attempt {
    next: Instant,
    backoff: Duration,
}

/// When to punch which member, and which members to ask to pass it on.
#[derive(Debug)]
pub struct Punches {
    attempts: HashMap<NodeId, Attempt>,
    answered: HashMap<NodeId, Instant>,
    turn: usize,
}

impl Default for Punches {
    fn default() -> Self {
        Punches::new()
    }
}

impl Punches {
    pub fn new() -> Punches {
        Punches {
            attempts: HashMap::new(),
            answered: HashMap::new(),
            turn: 0,
        }
    }

    /// The punches and calls due at `now`. A member whose path is down is punched
    /// [`PUNCH_FIRST`] after it was found so, then at doubling intervals; each punch asks up to
    /// [`GO_BETWEENS`] members with a working path, taken in turn, to pass it on.
    pub fn tick(&mut self, now: Instant, members: &[PathState]) -> Vec<Action> {
        let helpers: Vec<NodeId> = members.iter().filter(|m| m.up).map(|m| m.node).collect();
        let present: HashSet<NodeId> = members.iter().map(|m| m.node).collect();
        self.attempts.retain(|id, _| present.contains(id));
        self.answered
            .retain(|_, t| now.saturating_duration_since(*t) < PUNCH_BACKOFF_MAX);
        let mut out = Vec::new();
        for m in members {
            if m.direct || !m.wanted {
                self.attempts.remove(&m.node);
                continue;
            }
            let a = self.attempts.entry(m.node).or_insert(Attempt {
                next: now + PUNCH_FIRST,
                backoff: PUNCH_FIRST,
            });
            if now < a.next {
                continue;
            }
            a.backoff = (a.backoff * 2).min(PUNCH_BACKOFF_MAX);
            a.next = now + a.backoff;
            out.push(Action::Punch(m.node));
            let others: Vec<NodeId> = helpers.iter().copied().filter(|h| *h != m.node).collect();
            for i in 0..others.len().min(GO_BETWEENS) {
                let via = others[(self.turn + i) % others.len()];
                out.push(Action::CallMe {
                    via,
                    target: m.node,
                });
            }
            self.turn = self.turn.wrapping_add(1);
        }
        out
    }

    /// A go-between says `peer` is punching toward this node: whether to punch back now (at
    /// most once per [`PUNCH_ANSWER_EVERY`] per peer, whoever asks).
    pub fn asked(&mut self, peer: NodeId, now: Instant) -> bool {
        match self.answered.get(&peer) {
            Some(t) if now.saturating_duration_since(*t) < PUNCH_ANSWER_EVERY => false,
            _ => {
                self.answered.insert(peer, now);
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(i: u8) -> NodeId {
        NodeId([i; 8])
    }
    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }
    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn messages_round_trip_and_garbage_is_refused() {
        let all = [
            Msg::Seen {
                addr: sa("203.0.113.11:40000"),
            },
            Msg::Seen {
                addr: sa("[2001:db8::1]:51820"),
            },
            Msg::CallMe { target: id(7) },
            Msg::Punch {
                peer: id(9),
                seen: Some(sa("203.0.113.12:51820")),
            },
            Msg::Punch {
                peer: id(9),
                seen: None,
            },
            Msg::Ping { seq: 1 },
            Msg::Pong { seq: u32::MAX },
            Msg::RelayAsk { peer: id(3) },
            Msg::ProbeMe {
                addr: sa("203.0.113.11:51820"),
                nonce: 7,
            },
            Msg::Relayed {
                peer: id(4),
                session: u64::MAX - 1,
            },
        ];
        for m in all {
            let e = m.encode();
            assert_eq!(Msg::decode(&e), Some(m));
            // Every truncation and any trailing byte is refused.
            for cut in 0..e.len() {
                if let Some(d) = Msg::decode(&e[..cut]) {
                    // A Punch without its address is itself a valid message.
                    assert!(matches!(d, Msg::Punch { seen: None, .. }), "{d:?}");
                }
            }
            let mut long = e.clone();
            long.push(0);
            assert_eq!(Msg::decode(&long), None);
        }
        assert_eq!(Msg::decode(b"MP\x01\0\0\0\x01"), None);
        assert_eq!(Msg::decode(b""), None);
        assert_eq!(Msg::decode(b"MT\x09"), None);
    }

    #[test]
    fn decode_never_panics() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 40) as usize;
            let mut d: Vec<u8> = (0..len).map(|i| (x >> (i % 8 * 8)) as u8).collect();
            if len > 2 {
                d[0] = b'M';
                d[1] = b'T';
            }
            let _ = Msg::decode(&d);
        }
    }

    #[test]
    fn one_observer_is_believed_until_two_others_agree_on_something_else() {
        let t = Instant::now();
        let local = [sa("192.0.2.2:51820")];
        let mut o = Observations::default();
        assert!(o.candidates(&local).is_empty());
        assert_eq!(o.mapping(), Mapping::Unknown);
        // What the node already publishes is not repeated.
        o.observe(id(1), ip("203.0.113.2"), sa("192.0.2.2:51820"), t);
        assert!(o.candidates(&local).is_empty());
        o.observe(id(1), ip("203.0.113.2"), sa("203.0.113.11:51820"), t);
        assert_eq!(o.candidates(&local), vec![sa("203.0.113.11:51820")]);
        assert_eq!(o.mapping(), Mapping::Unknown);
        // A lying member's address is dropped once two observers confirm another.
        o.observe(id(2), ip("203.0.113.3"), sa("198.51.100.66:9"), t);
        o.observe(id(3), ip("203.0.113.4"), sa("203.0.113.11:51820"), t);
        assert_eq!(o.candidates(&local), vec![sa("203.0.113.11:51820")]);
        assert_eq!(o.mapping(), Mapping::Independent);
        // Two observers behind one address count once.
        let mut o = Observations::default();
        o.observe(id(1), ip("203.0.113.2"), sa("203.0.113.11:1"), t);
        o.observe(id(2), ip("203.0.113.2"), sa("203.0.113.11:1"), t);
        o.observe(
            id(3),
            ip("203.0.113.3"),
            sa("203.0.113.11:2"),
            t + Duration::from_secs(1),
        );
        assert_eq!(
            o.candidates(&[]),
            vec![sa("203.0.113.11:2"), sa("203.0.113.11:1")],
            "none confirmed: the newest first"
        );
        // ...and expire.
        o.prune(t + OBSERVATION_TTL);
        assert_eq!(o.candidates(&[]), vec![sa("203.0.113.11:2")]);
        o.prune(t + OBSERVATION_TTL + Duration::from_secs(1));
        assert!(o.candidates(&[]).is_empty());
    }

    #[test]
    fn a_mapping_per_destination_is_found_by_observers_at_different_addresses() {
        let t = Instant::now();
        let mut o = Observations::default();
        o.observe(id(1), ip("203.0.113.2"), sa("203.0.113.11:1000"), t);
        o.observe(id(2), ip("203.0.113.2"), sa("203.0.113.11:2000"), t);
        assert_eq!(o.mapping(), Mapping::Unknown, "one observer address");
        o.observe(id(3), ip("203.0.113.3"), sa("203.0.113.11:3000"), t);
        assert_eq!(o.mapping(), Mapping::Dependent);
        assert_eq!(o.candidates(&[]).len(), MAX_OBSERVED);
    }

    #[test]
    fn the_observer_table_is_bounded() {
        let t = Instant::now();
        let mut o = Observations::default();
        for i in 0..1000u32 {
            let mut n = [0u8; 8];
            n[..4].copy_from_slice(&i.to_be_bytes());
            o.observe(
                NodeId(n),
                ip("203.0.113.2"),
                sa("203.0.113.11:1"),
                t + Duration::from_millis(i as u64),
            );
        }
        assert_eq!(o.iter().count(), MAX_OBSERVERS);
    }

    #[test]
    fn a_member_without_a_path_is_punched_with_backoff_through_members_with_one() {
        let t = Instant::now();
        let mut p = Punches::new();
        let up = |n| PathState {
            node: id(n),
            up: true,
            direct: true,
            wanted: true,
        };
        let down = PathState {
            node: id(9),
            up: false,
            direct: false,
            wanted: true,
        };
        let members = [up(1), up(2), up(3), down];
        assert!(p.tick(t, &members).is_empty(), "a moment's grace");
        let a = p.tick(t + PUNCH_FIRST, &members);
        assert_eq!(a[0], Action::Punch(id(9)));
        let vias: Vec<NodeId> = a[1..]
            .iter()
            .map(|x| match x {
                Action::CallMe { via, target } => {
                    assert_eq!(*target, id(9));
                    *via
                }
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(vias.len(), GO_BETWEENS);
        assert!(!vias.contains(&id(9)));
        // Then at doubling intervals, up to the cap.
        let mut at = t + PUNCH_FIRST;
        let mut gaps = Vec::new();
        let mut last = at;
        while at < t + Duration::from_secs(200) {
            at += Duration::from_millis(100);
            if p.tick(at, &members).contains(&Action::Punch(id(9))) {
                gaps.push((at - last).as_secs());
                last = at;
            }
        }
        assert_eq!(&gaps[..5], &[2, 4, 8, 16, 30]);
        assert!(gaps[5..].iter().all(|g| *g == 30));
        // Once the path works, nothing; when it breaks again, the schedule starts over.
        assert!(p.tick(at, &[up(1), up(9)]).is_empty());
        assert!(p.tick(at, &[up(1), down]).is_empty());
        assert_eq!(
            p.tick(at + PUNCH_FIRST, &[up(1), down])[0],
            Action::Punch(id(9))
        );
        // A relayed member is punched still (the relay passes the call on too).
        let relayed = PathState { up: true, ..down };
        assert!(p
            .tick(at + Duration::from_secs(99), &[up(1), up(9)])
            .is_empty());
        let a = p.tick(at + Duration::from_secs(100), &[up(1), relayed]);
        assert!(a.is_empty(), "a moment's grace");
        let a = p.tick(at + Duration::from_secs(101), &[up(1), relayed]);
        assert_eq!(a[0], Action::Punch(id(9)));
        assert!(p
            .tick(at + Duration::from_secs(102), &[up(1), up(9)])
            .is_empty());
        // A member known to be down is left alone.
        let dead = PathState {
            wanted: false,
            ..down
        };
        assert!(p
            .tick(at + Duration::from_secs(60), &[up(1), dead])
            .is_empty());
    }

    #[test]
    fn asked_punches_are_bounded_per_peer() {
        let t = Instant::now();
        let mut p = Punches::new();
        assert!(p.asked(id(1), t));
        assert!(!p.asked(id(1), t + Duration::from_millis(100)));
        assert!(p.asked(id(2), t + Duration::from_millis(100)));
        assert!(p.asked(id(1), t + PUNCH_ANSWER_EVERY));
    }
}
