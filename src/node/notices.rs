//! Notices outside the tunnels: what this node tells nodes that cannot hear gossip, and what it
//! believes of such notices. Pure rules over the membership view; the node sends and ingests.
//!
//! - A removed node that still knocks gets its root-signed revocation, so it can stop.
//! - A member shut out because its one-use invite was used first gets the certificates that
//!   used it.
//! - A member still claiming a /24 it lost gets the winner's certificate and record: while it
//!   uses the lost address, every member that resolved the conflict drops its packets, so
//!   gossip alone could never tell it.
//! - A conflict notice received is believed only from where a known member is, and only for
//!   what it proves about this node (that it lost its /24 or its invite).

use super::snapshot::Snapshot;
use crate::gossip::Membership;
use crate::id::{Key32, NodeId};
use crate::trust::Signed;
use crate::util::KeyedLimiter;
use crate::wire::Frame;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// At most one conflict notice per member this often.
pub const CONFLICT_NOTICE_EVERY: Duration = Duration::from_secs(3);
/// At most one revocation notice per removed key this often.
pub const REVOCATION_NOTICE_EVERY: Duration = Duration::from_secs(30);

/// How often each kind of notice may go to one node; bounded tables.
pub struct Cooldowns {
    conflict: KeyedLimiter<NodeId>,
    revoked: KeyedLimiter<Key32>,
}

impl Default for Cooldowns {
    fn default() -> Self {
        Cooldowns {
            conflict: KeyedLimiter::new(CONFLICT_NOTICE_EVERY, 1, 4096),
            revoked: KeyedLimiter::new(REVOCATION_NOTICE_EVERY, 1, 4096),
        }
    }
}

/// What to tell a node this one does not know that tried to handshake, if anything.
pub fn for_unknown_initiator(
    m: &Membership,
    wg: &Key32,
    cooldowns: &mut Cooldowns,
    now: Instant,
) -> Option<Frame> {
    let over = m
        .all()
        .find(|x| x.cert.wireguard == *wg && m.over_its_invite(&x.cert.node_id));
    if let Some(x) = over {
        if !cooldowns.conflict.allow(x.cert.node_id, now) {
            return None;
        }
        let invite = x.cert.invite.invite_key;
        let winners: Vec<(Signed, Signed)> = m
            .active()
            .filter(|w| w.cert.invite.invite_key == invite)
            .filter_map(|w| Some((w.cert.raw.clone(), w.record_raw.clone()?)))
            .collect();
        return Some(Frame::Conflict(winners));
    }
    let rev = m.revocations().find(|r| r.body.wireguard == *wg)?;
    cooldowns
        .revoked
        .allow(*wg, now)
        .then(|| Frame::Revoked(rev.raw.clone()))
}

/// The slot-conflict notices due now: `(member, frame)`, each member at most every
/// [`CONFLICT_NOTICE_EVERY`].
pub fn slot_loser_notices(
    snap: &Snapshot,
    cooldowns: &mut Cooldowns,
    now: Instant,
) -> Vec<(NodeId, Option<SocketAddr>, Frame)> {
    snap.losers
        .iter()
        .filter(|l| cooldowns.conflict.allow(l.id, now))
        .map(|l| (l.id, l.published, Frame::Conflict(l.winners.clone())))
        .collect()
}

/// Which statements of a conflict notice to take in. The notice travels outside the tunnels,
/// so it can only teach this node what moves it: the statements are tried on a copy of the
/// view and kept only if they change this node's own /24 or shut it out; then only the
/// statements that do so. The caller checks first that it came from a member's address.
pub fn judge_conflict_notice(
    m: &Membership,
    statements: Vec<(Signed, Signed)>,
    now: u64,
) -> Vec<(Signed, Signed)> {
    let me = m.self_id;
    let mut trial = m.clone();
    let mut verified = Vec::new();
    for (cert, record) in statements {
        let r = trial
            .ingest_cert(&cert, now)
            .and_then(|id| trial.ingest_record(id, &record).map(|_| id));
        match r {
            Ok(id) => verified.push((id, cert, record)),
            Err(e) => {
                tracing::debug!(error = %e, "ignoring a slot conflict notice that does not verify")
            }
        }
    }
    let before = m.assignments().get(&me).map(|a| a.slot);
    let after = trial.assignments();
    let lost_slot = before.filter(|s| after.get(&me).map(|a| a.slot) != Some(*s));
    let shut_out = trial.over_its_invite(&me) && !m.over_its_invite(&me);
    if lost_slot.is_none() && !shut_out {
        return Vec::new();
    }
    let my_invite = m.me().cert.invite.invite_key;
    verified
        .into_iter()
        .filter(|(id, _, _)| {
            let takes_my_slot = lost_slot.is_some() && after.get(id).map(|a| a.slot) == lost_slot;
            let uses_my_invite = shut_out
                && trial
                    .get(id)
                    .is_some_and(|x| x.cert.invite.invite_key == my_invite);
            takes_my_slot || uses_my_invite
        })
        .map(|(_, c, r)| (c, r))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::addressing::candidate;
    use crate::testing::fixtures::{World, T0};
    use crate::trust::{NodeKeys, Revocation, RevocationBody};

    #[test]
    fn a_removed_node_that_knocks_gets_its_revocation_every_30_seconds() {
        let w = World::new("10.210.0.0/16");
        let (mut m, members) = w.mesh(2);
        let (kb, b) = &members[1];
        let rev = Revocation::issue(
            &w.root.0,
            RevocationBody {
                mesh: w.params.mesh,
                identity: b.identity,
                wireguard: b.wireguard,
                name: "n1".into(),
                revoked_at: T0,
            },
        );
        m.ingest_revocation(&rev.raw).unwrap();
        let mut c = Cooldowns::default();
        let t0 = Instant::now();
        let wg = kb.wg_public();
        match for_unknown_initiator(&m, &wg, &mut c, t0) {
            Some(Frame::Revoked(raw)) => assert_eq!(raw, rev.raw),
            other => panic!("expected the revocation, got {other:?}"),
        }
        assert!(for_unknown_initiator(&m, &wg, &mut c, t0 + Duration::from_secs(29)).is_none());
        assert!(for_unknown_initiator(&m, &wg, &mut c, t0 + REVOCATION_NOTICE_EVERY).is_some());
        // A key nobody knows gets nothing.
        let stranger = NodeKeys::generate().wg_public();
        assert!(for_unknown_initiator(&m, &stranger, &mut c, t0).is_none());
    }

    #[test]
    fn slot_loser_notices_go_at_most_every_3_seconds_per_member() {
        let w = World::new("10.210.0.0/20");
        let (ka, a) = w.node("a", T0 + 1);
        let mut m = Membership::new(w.params.clone(), a.clone(), T0);
        m.ingest_record(a.node_id, &World::record(&ka, 1, 0, vec![]))
            .unwrap();
        let slots = w.params.range.slots();
        let a_slot = candidate(&w.params.mesh, &a.wireguard, 0, slots);
        let ky = (0..10_000)
            .map(|_| NodeKeys::generate())
            .find(|k| candidate(&w.params.mesh, &k.wg_public(), 0, slots) == a_slot)
            .expect("a colliding key within 10 000 tries");
        let y = w.cert(&ky, "y", T0 + 2);
        m.ingest_cert(&y.raw, T0).unwrap();
        m.ingest_record(
            y.node_id,
            &World::record(&ky, 1, 0, vec!["192.0.2.7:9".parse().unwrap()]),
        )
        .unwrap();
        let snap = Snapshot::of(&m);
        let mut c = Cooldowns::default();
        let t0 = Instant::now();
        let due = slot_loser_notices(&snap, &mut c, t0);
        assert_eq!(due.len(), 1);
        let (id, to, frame) = &due[0];
        assert_eq!(
            (*id, *to),
            (y.node_id, Some("192.0.2.7:9".parse().unwrap()))
        );
        assert!(matches!(frame, Frame::Conflict(v) if v[0].0 == a.raw));
        assert!(slot_loser_notices(&snap, &mut c, t0 + Duration::from_secs(1)).is_empty());
        assert_eq!(
            slot_loser_notices(&snap, &mut c, t0 + CONFLICT_NOTICE_EVERY).len(),
            1
        );
    }

    /// A notice is believed only for what it proves about this node: statements that take its
    /// /24 are kept, the rest of the notice is not; a notice that moves nothing teaches nothing.
    #[test]
    fn a_conflict_notice_teaches_only_what_moves_this_node() {
        let w = World::new("10.210.0.0/20");
        let slots = w.params.range.slots();
        let (kme, me) = w.node("me", T0 + 10);
        let mut m = Membership::new(w.params.clone(), me.clone(), T0);
        m.ingest_record(me.node_id, &World::record(&kme, 1, 0, vec![]))
            .unwrap();
        let my_slot = m.assignments()[&me.node_id].slot;
        // An earlier member on this node's slot, and an unrelated one.
        let kw = (0..10_000)
            .map(|_| NodeKeys::generate())
            .find(|k| candidate(&w.params.mesh, &k.wg_public(), 0, slots) == my_slot)
            .expect("a colliding key within 10 000 tries");
        let winner = w.cert(&kw, "winner", T0 + 1);
        let winner_rec = World::record(&kw, 1, 0, vec![]);
        // Unrelated: its first candidate is another slot (with 16 slots, a random key would
        // take this node's one time in 16).
        let ko = (0..10_000)
            .map(|_| NodeKeys::generate())
            .find(|k| candidate(&w.params.mesh, &k.wg_public(), 0, slots) != my_slot)
            .expect("a key on another slot");
        let other = w.cert(&ko, "other", T0 + 2);
        let other_rec = World::record(&ko, 1, 0, vec![]);
        let take = judge_conflict_notice(
            &m,
            vec![
                (other.raw.clone(), other_rec.clone()),
                (winner.raw.clone(), winner_rec.clone()),
            ],
            T0,
        );
        assert_eq!(take, vec![(winner.raw.clone(), winner_rec)]);
        // Without the winner, nothing moves this node: nothing is taken.
        assert!(judge_conflict_notice(&m, vec![(other.raw, other_rec)], T0).is_empty());
        // Statements that do not verify are ignored.
        let forged = World::record(&ko, 1, 0, vec![]);
        assert!(judge_conflict_notice(&m, vec![(winner.raw, forged)], T0).is_empty());
        assert!(
            m.get(&winner.node_id).is_none(),
            "the view itself is untouched"
        );
    }
}
