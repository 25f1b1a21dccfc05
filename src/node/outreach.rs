//! Reaching out to members this node knows of but has not heard in gossip.
//!
//! chitchat only gossips with nodes whose gossip state it already holds (and with its seeds, at
//! random). A member this node learnt of another way is invisible to it: a joiner it just
//! admitted (the joiner's own gossip can only reach the one member that knows it, its seed,
//! and picks it at random among the members its acceptance listed), a member from the cache or
//! from a bootstrap answer. So the node asks gossip to talk to each such member directly, at
//! once and then with a growing pause while it stays unheard: one exchange with the seed tells
//! the joiner the whole mesh and the mesh the joiner, instead of waiting for a random pick.
//! A member that stays silent (it is down) costs one small datagram a minute at most.
//!
//! News travels the same way: a node that learnt or made new statements gossips with two live
//! members at once ([`Push`]) instead of waiting for chitchat's next round.

use super::snapshot::Snapshot;
use crate::constants::{GOSSIP_PORT, GOSSIP_PUSH_EVERY};
use crate::gossip::{Gossip, Liveness, Membership};
use crate::id::NodeId;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// The first retry comes this soon; then each pause doubles, up to [`MAX_PAUSE`].
pub const FIRST_PAUSE: Duration = Duration::from_millis(500);
pub const MAX_PAUSE: Duration = Duration::from_secs(60);
/// At most this many reach-outs per call (a tick): a node that knows a thousand silent members
/// spreads the datagrams over time.
pub const MAX_PER_TICK: usize = 16;

#[derive(Default)]
pub struct Outreach {
    /// Per unheard member: when to try next, and the pause after that.
    next: HashMap<NodeId, (Instant, Duration)>,
}

impl Outreach {
    /// The members among `unheard` to reach out to now. Members no longer unheard are
    /// forgotten (a member heard again and then lost starts from the first pause).
    pub fn due(&mut self, unheard: &[NodeId], now: Instant) -> Vec<NodeId> {
        self.next.retain(|id, _| unheard.contains(id));
        let mut out = Vec::new();
        for id in unheard {
            if out.len() >= MAX_PER_TICK {
                break;
            }
            let (at, pause) = *self.next.entry(*id).or_insert((now, FIRST_PAUSE));
            if now >= at {
                out.push(*id);
                self.next
                    .insert(*id, (now + pause, (pause * 2).min(MAX_PAUSE)));
            }
        }
        out
    }
}

/// News to push: set when this node took in or made new statements; taken at most every
/// [`GOSSIP_PUSH_EVERY`].
#[derive(Default)]
pub struct Push {
    due: bool,
    last: Option<Instant>,
}

impl Push {
    pub fn news(&mut self) {
        self.due = true;
    }

    /// Whether to push now.
    pub fn take(&mut self, now: Instant) -> bool {
        if !self.due
            || self
                .last
                .is_some_and(|t| now.saturating_duration_since(t) < GOSSIP_PUSH_EVERY)
        {
            return false;
        }
        self.due = false;
        self.last = Some(now);
        true
    }
}

/// How gossip spreads from this node beyond chitchat's own rounds: taking in what chitchat
/// heard (news to push on), reaching out to the unheard, pushing news. The node's tick runs it;
/// so does the gossip-scale harness, so what it measures is what nodes do.
#[derive(Default)]
pub struct Spread {
    outreach: Outreach,
    push: Push,
}

impl Spread {
    /// This node made a new statement.
    pub fn news(&mut self) {
        self.push.news();
    }

    /// Take in what chitchat heard (see [`Gossip::poll`]).
    pub async fn take_in(
        &mut self,
        g: &mut Gossip,
        m: &mut Membership,
        now: u64,
        probes: &HashMap<NodeId, Liveness>,
    ) {
        if g.poll(m, now, probes).await {
            self.push.news();
        }
    }

    /// Reach out to the members gossip has not heard, and push news to two live members.
    pub fn send(&mut self, g: &Gossip, snap: &Snapshot, now: Instant) {
        let addr = |slot| SocketAddr::from((snap.params.range.node_ip(slot), GOSSIP_PORT));
        let unheard: Vec<NodeId> = snap
            .members
            .iter()
            .filter(|r| !r.is_self && r.slot.is_some() && !g.has_heard(&r.id))
            .map(|r| r.id)
            .collect();
        if !unheard.is_empty() {
            for id in self.outreach.due(&unheard, now) {
                if let Some(slot) = snap.member(&id).and_then(|r| r.slot) {
                    g.gossip_now(addr(slot));
                }
            }
        }
        if !self.push.take(now) {
            return;
        }
        let live: Vec<SocketAddr> = snap
            .members
            .iter()
            .filter(|r| !r.is_self && r.liveness == Liveness::Alive)
            .filter_map(|r| Some(addr(r.slot?)))
            .collect();
        let mut rng = rand_core::OsRng;
        for _ in 0..2.min(live.len()) {
            let i = rand_core::RngCore::next_u32(&mut rng) as usize % live.len();
            g.gossip_now(live[i]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unheard_members_are_reached_at_once_then_with_growing_pauses() {
        let t0 = Instant::now();
        let a = NodeId([1; 8]);
        let b = NodeId([2; 8]);
        let mut o = Outreach::default();
        assert_eq!(o.due(&[a], t0), vec![a], "at once");
        assert!(o.due(&[a], t0 + Duration::from_millis(100)).is_empty());
        assert_eq!(o.due(&[a, b], t0 + FIRST_PAUSE), vec![a, b]);
        // a's next pause is twice the first.
        let t1 = t0 + FIRST_PAUSE;
        assert!(o.due(&[a], t1 + FIRST_PAUSE).is_empty());
        assert_eq!(o.due(&[a], t1 + 2 * FIRST_PAUSE), vec![a]);
        // Pauses stop growing at the cap.
        let mut t = t1 + 2 * FIRST_PAUSE;
        for _ in 0..20 {
            t += MAX_PAUSE;
            assert_eq!(o.due(&[a], t), vec![a]);
        }
        // Heard (no longer listed), then unheard again: from the start.
        assert!(o.due(&[], t).is_empty());
        assert_eq!(o.due(&[a], t + Duration::from_millis(1)), vec![a]);
    }

    #[test]
    fn news_is_pushed_at_once_then_at_most_every_push_period() {
        let t0 = Instant::now();
        let mut p = Push::default();
        assert!(!p.take(t0), "no news");
        p.news();
        assert!(p.take(t0));
        assert!(!p.take(t0), "taken");
        p.news();
        assert!(!p.take(t0 + GOSSIP_PUSH_EVERY / 2), "too soon");
        assert!(p.take(t0 + GOSSIP_PUSH_EVERY), "still due, now allowed");
    }

    #[test]
    fn a_tick_reaches_out_to_a_bounded_number() {
        let t0 = Instant::now();
        let many: Vec<NodeId> = (0..100u8).map(|i| NodeId([i; 8])).collect();
        let mut o = Outreach::default();
        assert_eq!(o.due(&many, t0).len(), MAX_PER_TICK);
        // The others get their turn on the next ticks.
        assert_eq!(o.due(&many, t0).len(), MAX_PER_TICK);
    }
}
