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
