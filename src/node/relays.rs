//! Member relays, the rules (sans-IO, `now` passed in): which member this node asks to relay to
//! a member it has no direct path to, which relay paths it hands the data plane, and, as a
//! relay, which sessions it agrees to.
//!
//! Messages ride the tunnels ([`super::traversal::Msg`]): `a` asks a member `r` it reaches
//! directly ([`Msg::RelayAsk`](super::traversal::Msg::RelayAsk)); `r` agrees only when it has
//! direct paths to both `a` and `b`, binds a session to the two endpoints its tunnels use, and
//! tells both ([`Msg::Relayed`](super::traversal::Msg::Relayed)). Both keep asking every
//! [`REFRESH`] while they use it; a session nobody refreshed for [`SESSION_TTL`] is unbound.
//! Relays are chosen by measured round trip; one that stops being a live member with a direct
//! path is dropped and another asked at once (failover). Once the pair's direct path has been
//! in use for [`LINGER`], its relays are let go.

use crate::id::NodeId;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// A member without a path for this long gets a relay (punching starts after 1 s).
pub const RELAY_AFTER: Duration = Duration::from_secs(3);
/// Relays asked at once, the nearest first.
pub const ASK_AT_ONCE: usize = 2;
/// An unanswered ask is repeated (to the next nearest) after this long.
pub const ASK_AGAIN: Duration = Duration::from_secs(2);
/// A relay in use is asked again this often, which keeps its session.
pub const REFRESH: Duration = Duration::from_secs(20);
/// A session not asked for this long ends, at the relay and at both ends.
pub const SESSION_TTL: Duration = Duration::from_secs(65);
/// Relays are let go after the direct path has been in use this long.
pub const LINGER: Duration = Duration::from_secs(60);
/// Sessions one member may hold at this relay, at most.
pub const SESSIONS_PER_MEMBER: usize = 64;

/// One member as the relay rules see it.
#[derive(Clone, Copy, Debug)]
pub struct Member {
    pub node: NodeId,
    /// A live member worth a path.
    pub live: bool,
    /// A working path of any kind.
    pub up: bool,
    /// A working path, and the data plane sends on it directly.
    pub direct: bool,
    pub rtt: Option<Duration>,
}

/// What the rules want done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Ask `relay` to relay between this node and `peer`.
    Ask {
        relay: NodeId,
        peer: NodeId,
    },
    /// Reach `peer` through `relay`'s `session` (`first`: send through it).
    Use {
        peer: NodeId,
        relay: NodeId,
        session: u64,
        first: bool,
    },
    /// Stop reaching `peer` through `relay`.
    Drop {
        peer: NodeId,
        relay: NodeId,
    },
    /// As a relay: forward `session` between the endpoints of `a` and `b`.
    Bind {
        session: u64,
        a: NodeId,
        b: NodeId,
    },
    Unbind {
        session: u64,
    },
    /// Tell `to` it reaches `peer` through this node's `session`.
    Tell {
        to: NodeId,
        peer: NodeId,
        session: u64,
    },
}

#[derive(Clone, Copy, Debug)]
struct InUse {
    relay: NodeId,
    session: u64,
    /// Last answer from the relay.
    answered: Instant,
    asked: Instant,
}

#[derive(Clone, Copy, Debug)]
struct Served {
    session: u64,
    asked: Instant,
}

#[derive(Debug, Default)]
pub struct Relays {
    /// Relays per peer, the one in use first.
    using: HashMap<NodeId, Vec<InUse>>,
    /// Since when each member has had no direct path / a direct one.
    no_direct: HashMap<NodeId, Instant>,
    direct_since: HashMap<NodeId, Instant>,
    /// Asks made, per peer and relay, and when.
    asked: HashMap<(NodeId, NodeId), Instant>,
    /// Sessions this node relays, per unordered pair.
    served: HashMap<(NodeId, NodeId), Served>,
}

fn pair(a: NodeId, b: NodeId) -> (NodeId, NodeId) {
    if a <= b {
        (a, b)
    } else {
        (b, a)
    }
}

impl Relays {
    /// The relays this node uses for `peer`, the one in use first.
    pub fn using(&self, peer: &NodeId) -> Vec<(NodeId, u64)> {
        self.using
            .get(peer)
            .map(|v| v.iter().map(|u| (u.relay, u.session)).collect())
            .unwrap_or_default()
    }

    /// Sessions this node relays for others: (session, a, b).
    pub fn served(&self) -> Vec<(u64, NodeId, NodeId)> {
        self.served
            .iter()
            .map(|((a, b), s)| (s.session, *a, *b))
            .collect()
    }

    /// The rules at `now`, over every member's state. `enabled`: this node relays for others.
    pub fn tick(&mut self, now: Instant, members: &[Member], enabled: bool) -> Vec<Action> {
        let by_id: HashMap<NodeId, Member> = members.iter().map(|m| (m.node, *m)).collect();
        let relay_ok = |r: &NodeId| by_id.get(r).is_some_and(|m| m.live && m.direct);
        let mut out = Vec::new();
        self.asked
            .retain(|_, t| now.saturating_duration_since(*t) < SESSION_TTL);
        for m in members {
            if m.direct {
                self.no_direct.remove(&m.node);
            } else {
                self.no_direct.entry(m.node).or_insert(now);
            }
            if m.direct {
                self.direct_since.entry(m.node).or_insert(now);
            } else {
                self.direct_since.remove(&m.node);
            }
        }
        self.no_direct.retain(|n, _| by_id.contains_key(n));
        self.direct_since.retain(|n, _| by_id.contains_key(n));
        // Relays in use: drop the dead, the silent and those no longer needed; refresh the rest.
        let peers: Vec<NodeId> = self.using.keys().copied().collect();
        for peer in peers {
            let m = by_id.get(&peer).copied();
            let lingered = self
                .direct_since
                .get(&peer)
                .is_some_and(|t| now.saturating_duration_since(*t) >= LINGER);
            let list = self.using.get_mut(&peer).unwrap();
            list.retain(|u| {
                let keep = m.is_some_and(|m| m.live)
                    && relay_ok(&u.relay)
                    && !lingered
                    && now.saturating_duration_since(u.answered) < SESSION_TTL;
                if !keep {
                    out.push(Action::Drop {
                        peer,
                        relay: u.relay,
                    });
                }
                keep
            });
            for u in list.iter_mut() {
                if now.saturating_duration_since(u.asked) >= REFRESH {
                    u.asked = now;
                    out.push(Action::Ask {
                        relay: u.relay,
                        peer,
                    });
                }
            }
            if list.is_empty() {
                self.using.remove(&peer);
            }
        }
        // Members without a direct path and no relay: ask the nearest members with direct paths.
        let mut near: Vec<&Member> = members.iter().filter(|m| m.live && m.direct).collect();
        near.sort_by_key(|m| (m.rtt.unwrap_or(Duration::MAX), m.node));
        for m in members {
            let waited = self
                .no_direct
                .get(&m.node)
                .is_some_and(|t| now.saturating_duration_since(*t) >= RELAY_AFTER);
            // Not `up`: a member reached through a relay that just died still looks up (its
            // last packets are recent) and must get another relay at once.
            if !m.live || m.direct || !waited || self.using.contains_key(&m.node) {
                continue;
            }
            let mut asks = 0;
            for r in near.iter().filter(|r| r.node != m.node) {
                if asks == ASK_AT_ONCE {
                    break;
                }
                let key = (m.node, r.node);
                if self
                    .asked
                    .get(&key)
                    .is_some_and(|t| now.saturating_duration_since(*t) < ASK_AGAIN * 2)
                {
                    // Asked not long ago: give the next one its turn first.
                    continue;
                }
                self.asked.insert(key, now);
                out.push(Action::Ask {
                    relay: r.node,
                    peer: m.node,
                });
                asks += 1;
            }
        }
        // As a relay: end sessions nobody asks for or whose ends lost their direct paths.
        self.served.retain(|(a, b), s| {
            let keep = enabled
                && relay_ok(a)
                && relay_ok(b)
                && now.saturating_duration_since(s.asked) < SESSION_TTL;
            if !keep {
                out.push(Action::Unbind { session: s.session });
            } else {
                out.push(Action::Bind {
                    session: s.session,
                    a: *a,
                    b: *b,
                });
            }
            keep
        });
        out
    }

    /// `from` asks this node to relay to `peer`. `members` as in [`Relays::tick`]; `session`
    /// is a fresh random id, used if a new session is made. `None`: refused.
    pub fn asked(
        &mut self,
        from: NodeId,
        peer: NodeId,
        members: &[Member],
        enabled: bool,
        session: u64,
        now: Instant,
    ) -> Option<Vec<Action>> {
        let ok = |n: &NodeId| members.iter().any(|m| m.node == *n && m.live && m.direct);
        if !enabled || from == peer || !ok(&from) || !ok(&peer) {
            return None;
        }
        let key = pair(from, peer);
        let s = match self.served.get_mut(&key) {
            Some(s) => {
                s.asked = now;
                s.session
            }
            None => {
                let held = self
                    .served
                    .keys()
                    .filter(|(a, b)| *a == from || *b == from)
                    .count();
                if held >= SESSIONS_PER_MEMBER {
                    return None;
                }
                self.served.insert(
                    key,
                    Served {
                        session,
                        asked: now,
                    },
                );
                session
            }
        };
        Some(vec![
            Action::Bind {
                session: s,
                a: from,
                b: peer,
            },
            Action::Tell {
                to: from,
                peer,
                session: s,
            },
            Action::Tell {
                to: peer,
                peer: from,
                session: s,
            },
        ])
    }

    /// `relay` says this node reaches `peer` through its `session`. `None`: not taken.
    pub fn told(
        &mut self,
        relay: NodeId,
        peer: NodeId,
        session: u64,
        members: &[Member],
        now: Instant,
    ) -> Option<Action> {
        let get = |n: &NodeId| members.iter().find(|m| m.node == *n);
        if relay == peer || !get(&relay).is_some_and(|m| m.live && m.direct) || get(&peer).is_none()
        {
            return None;
        }
        let list = self.using.entry(peer).or_default();
        if let Some(pos) = list.iter().position(|u| u.relay == relay) {
            let u = &mut list[pos];
            u.answered = now;
            let changed = u.session != session;
            u.session = session;
            return changed.then_some(Action::Use {
                peer,
                relay,
                session,
                first: pos == 0,
            });
        }
        if list.len() >= crate::mesh::path::MAX_RELAYS {
            return None;
        }
        let first = list.is_empty();
        list.push(InUse {
            relay,
            session,
            answered: now,
            asked: now,
        });
        Some(Action::Use {
            peer,
            relay,
            session,
            first,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(i: u8) -> NodeId {
        NodeId([i; 8])
    }
    fn m(i: u8, up: bool, direct: bool, rtt_ms: Option<u64>) -> Member {
        Member {
            node: id(i),
            live: true,
            up,
            direct,
            rtt: rtt_ms.map(Duration::from_millis),
        }
    }
    fn asks(a: &[Action]) -> Vec<(NodeId, NodeId)> {
        a.iter()
            .filter_map(|x| match x {
                Action::Ask { relay, peer } => Some((*relay, *peer)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_member_without_a_path_gets_the_nearest_relays_asked_then_the_next() {
        let t = Instant::now();
        let mut r = Relays::default();
        let members = [
            m(1, true, true, Some(30)),
            m(2, true, true, Some(5)),
            m(3, true, true, None),
            m(9, false, false, None),
        ];
        assert!(
            asks(&r.tick(t, &members, true)).is_empty(),
            "punching first"
        );
        let a = asks(&r.tick(t + RELAY_AFTER, &members, true));
        assert_eq!(a, vec![(id(2), id(9)), (id(1), id(9))], "nearest first");
        // Unanswered: the next ones get their turn, then the first again.
        let a = asks(&r.tick(t + RELAY_AFTER + ASK_AGAIN, &members, true));
        assert_eq!(a, vec![(id(3), id(9))]);
        // An answer: used, first; no more asks.
        assert_eq!(
            r.told(id(1), id(9), 77, &members, t + RELAY_AFTER + ASK_AGAIN),
            Some(Action::Use {
                peer: id(9),
                relay: id(1),
                session: 77,
                first: true
            })
        );
        // A second relay's answer is kept beside it; a third is not taken.
        assert!(matches!(
            r.told(id(2), id(9), 78, &members, t),
            Some(Action::Use { first: false, .. })
        ));
        assert_eq!(r.told(id(3), id(9), 79, &members, t), None);
        let members_up = [members[0], members[1], members[2], m(9, true, false, None)];
        assert!(asks(&r.tick(t + Duration::from_secs(10), &members_up, true)).is_empty());
        // Refreshed every REFRESH while in use.
        let a = asks(&r.tick(t + Duration::from_secs(30), &members_up, true));
        assert_eq!(a.len(), 2);
        // An answer from a non-member or about oneself is refused.
        assert_eq!(r.told(id(5), id(9), 1, &members, t), None);
        assert_eq!(r.told(id(9), id(9), 1, &members, t), None);
    }

    #[test]
    fn a_dead_relay_is_dropped_and_another_asked_at_once() {
        let t = Instant::now();
        let mut r = Relays::default();
        let members = [
            m(1, true, true, Some(1)),
            m(2, true, true, Some(2)),
            m(9, false, false, None),
        ];
        r.tick(t, &members, true);
        r.tick(t + RELAY_AFTER, &members, true);
        r.told(id(1), id(9), 7, &members, t + RELAY_AFTER);
        let mut dead = members;
        dead[0].live = false;
        dead[0].direct = false;
        dead[0].up = false;
        // The peer still looks up: its last packets through the dead relay are recent.
        dead[2].up = true;
        let a = r.tick(t + Duration::from_secs(10), &dead, true);
        assert!(a.contains(&Action::Drop {
            peer: id(9),
            relay: id(1)
        }));
        assert_eq!(asks(&a), vec![(id(2), id(9))]);
        assert!(r.using(&id(9)).is_empty());
    }

    #[test]
    fn relays_are_let_go_after_the_direct_path_lasted() {
        let t = Instant::now();
        let mut r = Relays::default();
        let members = [m(1, true, true, None), m(9, false, false, None)];
        r.tick(t, &members, true);
        r.told(id(1), id(9), 7, &members, t);
        let direct = [members[0], m(9, true, true, None)];
        let a = r.tick(t + Duration::from_secs(1), &direct, true);
        assert!(!a.iter().any(|x| matches!(x, Action::Drop { .. })));
        let a = r.tick(t + Duration::from_secs(1) + LINGER, &direct, true);
        assert!(a.contains(&Action::Drop {
            peer: id(9),
            relay: id(1)
        }));
    }

    #[test]
    fn a_relay_serves_only_members_it_reaches_directly_and_only_while_asked() {
        let t = Instant::now();
        let mut r = Relays::default();
        let members = [
            m(1, true, true, None),
            m(2, true, true, None),
            m(3, true, false, None),
        ];
        assert!(
            r.asked(id(1), id(2), &members, false, 5, t).is_none(),
            "disabled"
        );
        assert!(
            r.asked(id(1), id(3), &members, true, 5, t).is_none(),
            "no direct path to 3"
        );
        assert!(
            r.asked(id(1), id(4), &members, true, 5, t).is_none(),
            "not a member"
        );
        assert!(r.asked(id(1), id(1), &members, true, 5, t).is_none());
        let a = r.asked(id(1), id(2), &members, true, 5, t).unwrap();
        assert!(a.contains(&Action::Tell {
            to: id(2),
            peer: id(1),
            session: 5
        }));
        // The other side asking gets the same session.
        let a = r.asked(id(2), id(1), &members, true, 6, t).unwrap();
        assert!(a.contains(&Action::Tell {
            to: id(2),
            peer: id(1),
            session: 5
        }));
        assert_eq!(r.served(), vec![(5, id(1), id(2))]);
        // Asked for: kept (and rebound to where the ends are now); then it ends.
        let a = r.tick(t + Duration::from_secs(30), &members, true);
        assert!(a.contains(&Action::Bind {
            session: 5,
            a: id(1),
            b: id(2)
        }));
        let a = r.tick(t + SESSION_TTL, &members, true);
        assert!(a.contains(&Action::Unbind { session: 5 }));
        assert!(r.served().is_empty());
        // Turning relaying off ends every session.
        r.asked(id(1), id(2), &members, true, 8, t).unwrap();
        let a = r.tick(t, &members, false);
        assert!(a.contains(&Action::Unbind { session: 8 }));
    }

    #[test]
    fn one_member_cannot_fill_the_relay() {
        let t = Instant::now();
        let mut r = Relays::default();
        let mut members = vec![m(0, true, true, None)];
        for i in 1..=(SESSIONS_PER_MEMBER as u8 + 1) {
            members.push(m(i, true, true, None));
        }
        for i in 1..=SESSIONS_PER_MEMBER as u8 {
            assert!(r.asked(id(0), id(i), &members, true, i as u64, t).is_some());
        }
        let last = SESSIONS_PER_MEMBER as u8 + 1;
        assert!(r.asked(id(0), id(last), &members, true, 999, t).is_none());
    }
}
