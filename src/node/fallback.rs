//! The bootstrap fallback of a running node (DESIGN, "Restart"): a node that hears from no
//! member for a while (its member cache was lost or moved aside, or every cached endpoint went
//! stale while it was down) sends its join request to the token's bootstrap endpoints again. A
//! seed answers a member's request like a retried join, with its own certificate and record and
//! a few other members; the node takes those in, its tunnels come up and gossip resumes.
//!
//! [`Fallback`] is the rule as a small state machine with `now` passed in: when to ask, which
//! answers are welcome. The node sends and ingests.

use crate::constants::{BOOTSTRAP_FALLBACK_AFTER, BOOTSTRAP_FALLBACK_RETRY};
use crate::id::{Key32, MeshId};
use crate::join::verify_accept;
use crate::trust::{Cert, Signed};
use crate::wire::{JoinAccept, JoinRefuse};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// How often the node looks at its tunnels (the look walks every peer's statistics).
pub const CHECK_EVERY: Duration = Duration::from_secs(1);
/// Requests whose answers are still welcome.
const PENDING_MAX: usize = 8;
const PENDING_TTL: Duration = Duration::from_secs(120);
/// Places asked in one round (a request is one datagram of about 1.5 KB).
pub const PER_ROUND: usize = 16;

/// A place the fallback asks: an address and, where known, the WireGuard key of the node there
/// (an answer must then come from that node).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub addr: SocketAddr,
    pub wireguard: Option<Key32>,
}

pub struct Fallback {
    /// Since when this node has had no live tunnel (or since start).
    cut_off_since: Instant,
    last_sent: Option<Instant>,
    last_check: Option<Instant>,
    /// Nonces of requests sent, with when.
    pending: Vec<([u8; 16], Instant)>,
    /// Members asked directly (where their handshakes came from), still welcome to answer.
    direct: Vec<(Target, Instant)>,
    /// Where the next round over members' endpoints starts.
    rotation: usize,
}

impl Fallback {
    pub fn new(now: Instant) -> Fallback {
        Fallback {
            cut_off_since: now,
            last_sent: None,
            last_check: None,
            pending: Vec::new(),
            direct: Vec::new(),
            rotation: 0,
        }
    }

    /// Whether the node should look at its tunnels now ([`CHECK_EVERY`]).
    pub fn check_due(&mut self, now: Instant) -> bool {
        if self
            .last_check
            .is_some_and(|t| now.saturating_duration_since(t) < CHECK_EVERY)
        {
            return false;
        }
        self.last_check = Some(now);
        true
    }

    /// What the node saw: whether any tunnel is in touch, and whether it has any peer to try
    /// at all. Returns whether to ask the targets now: after [`BOOTSTRAP_FALLBACK_AFTER`] cut
    /// off (at once if there is no peer whose tunnel could come up by itself: a cache left
    /// without records), then every [`BOOTSTRAP_FALLBACK_RETRY`] while it stays so.
    pub fn should_ask(
        &mut self,
        now: Instant,
        in_touch: bool,
        have_peers: bool,
        have_targets: bool,
    ) -> bool {
        if in_touch {
            self.cut_off_since = now;
            self.last_sent = None;
            return false;
        }
        let grace = if have_peers {
            BOOTSTRAP_FALLBACK_AFTER
        } else {
            Duration::ZERO
        };
        if !have_targets
            || now.saturating_duration_since(self.cut_off_since) < grace
            || self
                .last_sent
                .is_some_and(|t| now.saturating_duration_since(t) < BOOTSTRAP_FALLBACK_RETRY)
        {
            return false;
        }
        self.last_sent = Some(now);
        true
    }

    /// A request with `nonce` went out.
    pub fn asked(&mut self, nonce: [u8; 16], now: Instant) {
        self.pending
            .retain(|(_, t)| now.saturating_duration_since(*t) < PENDING_TTL);
        if self.pending.len() >= PENDING_MAX {
            self.pending.remove(0);
        }
        self.pending.push((nonce, now));
    }

    /// Which of `members` (their known endpoints) to ask this round, with `bootstrap` always:
    /// at most [`PER_ROUND`], the members taken in turn over the rounds.
    pub fn round(&mut self, bootstrap: Vec<Target>, members: Vec<Target>) -> Vec<Target> {
        let mut out = bootstrap;
        if !members.is_empty() {
            let room = PER_ROUND.saturating_sub(out.len()).min(members.len());
            let start = self.rotation % members.len();
            out.extend(members.iter().cycle().skip(start).take(room).cloned());
            self.rotation = start + room;
        }
        out
    }

    /// A member was asked directly, at the address `target` names: its answer is welcome.
    pub fn asked_directly(&mut self, target: Target, nonce: [u8; 16], now: Instant) {
        self.direct.retain(|(t, at)| {
            t.addr != target.addr && now.saturating_duration_since(*at) < PENDING_TTL
        });
        if self.direct.len() >= PENDING_MAX {
            self.direct.remove(0);
        }
        self.direct.push((target, now));
        self.asked(nonce, now);
    }

    /// Everywhere an answer is welcome from: `targets`, and the members asked directly.
    pub fn welcome(&self, mut targets: Vec<Target>) -> Vec<Target> {
        targets.extend(self.direct.iter().map(|(t, _)| t.clone()));
        targets
    }

    /// Whether a refusal answers one of this node's requests (and is worth a warning).
    pub fn answers(&self, r: &JoinRefuse) -> bool {
        self.pending.iter().any(|(n, _)| *n == r.nonce)
    }

    /// An acceptance from `from`: the seed and its answer if it comes from one of `targets`
    /// (from the node the target names, where it names one) and answers a pending request.
    /// Once one is taken, earlier requests are no longer welcome.
    pub fn accept(
        &mut self,
        raw: &Signed,
        from: SocketAddr,
        targets: &[Target],
        mesh: &MeshId,
        identity: &Key32,
    ) -> Option<(Cert, JoinAccept)> {
        let target = targets.iter().find(|t| t.addr == from)?;
        let verified = self.pending.iter().find_map(|(nonce, _)| {
            verify_accept(raw, mesh, nonce, identity, target.wireguard.as_ref()).ok()
        })?;
        self.pending.clear();
        Some(verified)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_asks_only_after_being_cut_off_for_a_while_and_then_slowly() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut f = Fallback::new(t0);
        // In touch: never.
        assert!(!f.should_ask(t0 + s(100), true, true, true));
        // Cut off since t0 + 100: not before the grace, then once, then after the retry time.
        assert!(!f.should_ask(t0 + s(110), false, true, true));
        assert!(f.should_ask(t0 + s(100) + BOOTSTRAP_FALLBACK_AFTER, false, true, true));
        let first = t0 + s(100) + BOOTSTRAP_FALLBACK_AFTER;
        assert!(!f.should_ask(first + s(1), false, true, true));
        assert!(!f.should_ask(first + BOOTSTRAP_FALLBACK_RETRY - s(1), false, true, true));
        assert!(f.should_ask(first + BOOTSTRAP_FALLBACK_RETRY, false, true, true));
        // Nowhere to ask: nothing, however long.
        let mut g = Fallback::new(t0);
        assert!(!g.should_ask(t0 + s(1000), false, true, false));
        // Back in touch resets the grace.
        let later = first + s(200);
        assert!(!f.should_ask(later, true, true, true));
        assert!(!f.should_ask(later + s(5), false, true, true));
        assert!(f.should_ask(later + BOOTSTRAP_FALLBACK_AFTER, false, true, true));
    }

    /// With no peer whose tunnel could come up by itself (a cache left without records), a node
    /// asks at once, and then at the retry pace.
    #[test]
    fn a_node_with_nothing_to_try_asks_at_once() {
        let t0 = Instant::now();
        let mut f = Fallback::new(t0);
        assert!(f.should_ask(t0, false, false, true));
        assert!(!f.should_ask(t0 + Duration::from_secs(1), false, false, true));
        assert!(f.should_ask(t0 + BOOTSTRAP_FALLBACK_RETRY, false, false, true));
    }

    /// A round asks the token's bootstrap endpoints and members' endpoints in turn, never more
    /// than PER_ROUND.
    #[test]
    fn rounds_take_members_in_turn() {
        let t = |i: u16| Target {
            addr: SocketAddr::from(([198, 51, 100, 1], i)),
            wireguard: None,
        };
        let mut f = Fallback::new(Instant::now());
        let members: Vec<Target> = (0..40).map(t).collect();
        let boot = vec![t(1000)];
        let r1 = f.round(boot.clone(), members.clone());
        assert_eq!(r1.len(), PER_ROUND);
        assert_eq!(r1[0], t(1000));
        assert_eq!(r1[1], t(0));
        let r2 = f.round(boot.clone(), members.clone());
        assert_eq!(
            r2[1],
            t(PER_ROUND as u16 - 1),
            "continues where the last round stopped"
        );
        let mut seen = std::collections::HashSet::new();
        for _ in 0..4 {
            seen.extend(f.round(vec![], members.clone()).into_iter().map(|x| x.addr));
        }
        assert_eq!(seen.len(), 40, "every member's endpoint gets asked");
        assert_eq!(f.round(boot.clone(), vec![]), boot);
    }

    #[test]
    fn tunnels_are_looked_at_once_a_second() {
        let t0 = Instant::now();
        let mut f = Fallback::new(t0);
        assert!(f.check_due(t0));
        assert!(!f.check_due(t0 + Duration::from_millis(200)));
        assert!(f.check_due(t0 + CHECK_EVERY));
    }

    #[test]
    fn only_refusals_of_pending_requests_count_and_the_pending_list_is_bounded() {
        let t0 = Instant::now();
        let mut f = Fallback::new(t0);
        let refusal = |n: u8| JoinRefuse {
            nonce: [n; 16],
            reason: crate::wire::RefuseReason::Revoked,
            message: String::new(),
        };
        assert!(!f.answers(&refusal(1)));
        for n in 1..=(PENDING_MAX as u8 + 2) {
            f.asked([n; 16], t0);
        }
        assert!(!f.answers(&refusal(1)), "the oldest were dropped");
        assert!(f.answers(&refusal(PENDING_MAX as u8 + 2)));
        // Requests too old are forgotten on the next one.
        f.asked([99; 16], t0 + PENDING_TTL);
        assert!(!f.answers(&refusal(PENDING_MAX as u8 + 2)));
        assert!(f.answers(&refusal(99)));
    }

    /// Only an answer from a target (from the node it names), to a pending request of this
    /// node, is taken; once one is, the others are no longer welcome.
    #[test]
    fn only_a_signed_answer_from_a_target_to_a_pending_request_is_taken() {
        use crate::join::{acceptance, decide, make_request};
        use crate::testing::fixtures::{World, T0};
        let w = World::new("10.210.0.0/16");
        let (seed_view, members) = w.mesh(2);
        let (seed_keys, seed_cert) = &members[0];
        let (me_keys, me_cert) = &members[1];
        let seed_addr: SocketAddr = "198.51.100.1:51820".parse().unwrap();
        let seed_record = World::record(seed_keys, 1, 0, vec![seed_addr]);
        let (req, nonce) = make_request(me_keys, &me_cert.raw, vec![], T0);
        let adm = decide(&seed_view, &req, T0).expect("a member asking again is admitted");
        let answer = acceptance(
            &seed_view,
            seed_keys,
            &seed_cert.raw,
            &seed_record,
            &adm,
            seed_addr,
        );

        let t0 = Instant::now();
        let mesh = w.params.mesh;
        let me = me_keys.identity_public();
        let target = |wg: Option<Key32>| {
            vec![Target {
                addr: seed_addr,
                wireguard: wg,
            }]
        };
        let right = target(Some(seed_keys.wg_public()));
        let mut f = Fallback::new(t0);
        assert!(
            f.accept(&answer, seed_addr, &right, &mesh, &me).is_none(),
            "nothing asked yet"
        );
        f.asked(nonce, t0);
        let elsewhere: SocketAddr = "198.51.100.9:51820".parse().unwrap();
        assert!(
            f.accept(&answer, elsewhere, &right, &mesh, &me).is_none(),
            "not a target"
        );
        let wrong_node = target(Some(me_keys.wg_public()));
        assert!(
            f.accept(&answer, seed_addr, &wrong_node, &mesh, &me)
                .is_none(),
            "another node"
        );
        let (seed, accept) = f
            .accept(&answer, seed_addr, &right, &mesh, &me)
            .expect("the answer is taken");
        assert_eq!(seed.node_id, seed_cert.node_id);
        assert_eq!(accept.nonce, nonce);
        assert!(
            f.accept(&answer, seed_addr, &right, &mesh, &me).is_none(),
            "taken once"
        );
    }
}
