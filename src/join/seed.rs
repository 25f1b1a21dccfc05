//! The seed's side of a join, pure: whether to admit a request ([`decide`]) over this node's
//! membership view, and the signed acceptance it answers with ([`acceptance`]). Any member can be
//! the seed.

use crate::constants::JOIN_REQUEST_MAX_AGE;
use crate::gossip::Membership;
use crate::trust::{Cert, Context, NodeId, NodeKeys, Signed, TrustError};
use crate::wire::{JoinAccept, JoinRefuse, JoinRequest, RefuseReason};
use std::net::SocketAddr;

/// Keep acceptances well inside one datagram: members beyond this come by gossip.
const ACCEPT_BUDGET: usize = 8 * 1024;

/// A verified request the seed has decided to admit.
#[derive(Debug)]
pub struct Admission {
    pub cert: Cert,
    pub request: JoinRequest,
    pub slot_k: u32,
}

fn refuse(nonce: [u8; 16], reason: RefuseReason, message: impl Into<String>) -> JoinRefuse {
    JoinRefuse {
        nonce,
        reason,
        message: message.into(),
    }
}

/// The seed's decision on a join request: pure, over this node's membership view.
pub fn decide(m: &Membership, raw: &Signed, now: u64) -> Result<Admission, JoinRefuse> {
    let no_nonce = [0u8; 16];
    let peek: JoinRequest = raw
        .peek("join request")
        .map_err(|e| {
            refuse(
                no_nonce,
                RefuseReason::Malformed,
                format!("this node cannot read the join request ({e}); do both nodes run the same meshd version?"),
            )
        })?;
    let nonce = peek.nonce;
    let ours = m.params.mesh;
    if let Some(theirs) = Cert::peek_mesh(&peek.cert) {
        if theirs != ours {
            return Err(refuse(
                nonce,
                RefuseReason::WrongMesh,
                format!(
                    "this node belongs to mesh {ours}, but the token is for mesh {theirs}; \
                     use a token of mesh {ours}, or a bootstrap endpoint of mesh {theirs}"
                ),
            ));
        }
    }
    let cert = Cert::verify(&peek.cert, &ours).map_err(|e| match e {
        TrustError::WrongMesh { .. } => refuse(nonce, RefuseReason::WrongMesh, e.to_string()),
        TrustError::BadSignature { .. } => refuse(
            nonce,
            RefuseReason::BadSignature,
            format!("{e}: the token was altered, or is not from this mesh's administrator"),
        ),
        _ => refuse(nonce, RefuseReason::Malformed, e.to_string()),
    })?;
    let req: JoinRequest = raw
        .verify(Context::JoinRequest, &cert.identity, "join request")
        .map_err(|e| refuse(nonce, RefuseReason::BadSignature, e.to_string()))?;
    // A current member asking again (a retried join, or a running node cut off from the mesh
    // falling back to its bootstrap members) is not joining: its invite may have expired since.
    let existing = m.get(&cert.node_id).filter(|x| x.cert.raw == cert.raw);
    if existing.is_none() && now > cert.invite.expires_at {
        return Err(refuse(
            nonce,
            RefuseReason::Expired,
            TrustError::Expired {
                expired_at: cert.invite.expires_at,
                now,
            }
            .to_string()
                + "; ask an administrator for a new one (meshctl invite)",
        ));
    }
    let max_age = JOIN_REQUEST_MAX_AGE.as_secs();
    if req.sent_at.saturating_add(max_age) < now || req.sent_at > now.saturating_add(max_age) {
        return Err(refuse(
            nonce,
            RefuseReason::Stale,
            "the join request's clock is more than 5 minutes off this node's; fix the clock (NTP) and retry",
        ));
    }
    if m.is_revoked(&cert.node_id, &cert.wireguard) {
        return Err(refuse(
            nonce,
            RefuseReason::Revoked,
            format!("node {} was removed from this mesh", cert.name),
        ));
    }
    if m.is_tombstoned(&cert.node_id) {
        return Err(refuse(
            nonce,
            RefuseReason::Revoked,
            format!(
                "node {} left this mesh; join again with a fresh state directory",
                cert.name
            ),
        ));
    }
    // A new certificate must be new: its issue time decides slot and invite-use priority, so a
    // joiner may not date it into the past (or the future) to win either.
    if existing.is_none()
        && (cert.issued_at.saturating_add(max_age) < now
            || cert.issued_at > now.saturating_add(max_age))
    {
        return Err(refuse(
            nonce,
            RefuseReason::Stale,
            format!(
                "the certificate was issued at unix time {}, more than 5 minutes from this node's clock ({now}); fix the clock (NTP) and join again",
                cert.issued_at
            ),
        ));
    }
    if let Some(max) = cert.invite.max_uses {
        if existing.is_none()
            && m.invite_uses(&cert.invite.invite_key, &cert.node_id) >= max as usize
        {
            return Err(refuse(
                nonce,
                RefuseReason::UsedUp,
                format!(
                    "this token was made for {max} use{} and has been used; ask for a new one (meshctl invite)",
                    if max == 1 { "" } else { "s" }
                ),
            ));
        }
    }
    if let Some(holder) = m.name_holder(&cert.name, &cert.node_id) {
        return Err(refuse(
            nonce,
            RefuseReason::NameTaken,
            format!(
                "the name {:?} is already used by another member (node {}); pick another with --name",
                cert.name, holder.cert.node_id
            ),
        ));
    }
    // A retried request gets the same answer.
    let slot_k = match existing.and_then(|x| x.claim_k()) {
        Some(k) => k,
        None => m.claim_for_newcomer(&cert.wireguard).ok_or_else(|| {
            refuse(
                nonce,
                RefuseReason::MeshFull,
                format!("the mesh range {} has no free /24 left", m.params.range),
            )
        })?,
    };
    Ok(Admission {
        cert,
        request: req,
        slot_k,
    })
}

/// The identity a request claims, for logs (unverified).
pub fn peek_request_node(raw: &Signed) -> Option<(NodeId, String)> {
    let req: JoinRequest = raw.peek("join request").ok()?;
    let body: crate::trust::NodeCertBody = req.cert.peek("node certificate").ok()?;
    Some((NodeId::of_identity(&body.identity), body.name))
}

/// The signed answer to an admitted joiner: its slot, where it was seen, this seed's own
/// certificate and record, and as many other members and revocations as fit one datagram (the
/// rest come by gossip).
pub fn acceptance(
    m: &Membership,
    keys: &NodeKeys,
    own_cert: &Signed,
    own_record: &Signed,
    admission: &Admission,
    observed: SocketAddr,
) -> Signed {
    let mut budget = ACCEPT_BUDGET;
    let revocations: Vec<Signed> = m
        .revocations()
        .map(|r| r.raw.clone())
        .take_while(|r| {
            let n = r.body.len() + r.sig.len() + 8;
            budget = budget.saturating_sub(n);
            budget > 0
        })
        .collect();
    let joiner_id = admission.cert.node_id;
    let mut members = Vec::new();
    for x in m.active() {
        if x.cert.node_id == m.self_id || x.cert.node_id == joiner_id || x.record_raw.is_none() {
            continue;
        }
        let n = x.cert.raw.body.len() + x.record_raw.as_ref().map_or(0, |r| r.body.len()) + 160;
        if n > budget {
            break;
        }
        budget -= n;
        members.push((x.cert.raw.clone(), x.record_raw.clone()));
    }
    let accept = JoinAccept {
        nonce: admission.request.nonce,
        joiner: admission.cert.identity,
        slot_k: admission.slot_k,
        observed,
        seed_cert: own_cert.clone(),
        seed_record: own_record.clone(),
        members,
        revocations,
    };
    Signed::sign(Context::JoinAccept, &accept, &keys.identity)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gossip::MeshParams;
    use crate::join::joiner::make_request;
    use crate::trust::cert::tests::{cert, invite};
    use crate::trust::{MeshId, Revocation, RevocationBody, RootKey};

    fn setup(max_uses: Option<u32>) -> (RootKey, Membership, Signed, ed25519_dalek::SigningKey) {
        let root = RootKey::generate();
        let (_, inv, secret) = invite(&root, 10_000, max_uses);
        let k = NodeKeys::generate();
        let c = Cert::verify(
            &cert(&inv, &secret, &k, "seed", 100),
            &MeshId(root.public()),
        )
        .unwrap();
        let mut m = Membership::new(
            MeshParams {
                mesh: MeshId(root.public()),
                range: "10.210.0.0/16".parse().unwrap(),
                domain: "mesh.internal".into(),
            },
            c.clone(),
            0,
        );
        m.set_admitted_k(c.node_id, 0);
        (root, m, inv, secret)
    }

    fn request(
        inv: &Signed,
        secret: &ed25519_dalek::SigningKey,
        name: &str,
        now: u64,
    ) -> (NodeKeys, Signed) {
        let k = NodeKeys::generate();
        let c = cert(inv, secret, &k, name, now);
        let (r, _) = make_request(&k, &c, vec![], now);
        (k, r)
    }

    #[test]
    fn admits_a_valid_joiner_and_answers_retries_identically() {
        let (_, mut m, inv, secret) = setup(None);
        let (k, r) = request(&inv, &secret, "db1", 1000);
        let a = decide(&m, &r, 1000).unwrap();
        assert_eq!(a.cert.name, "db1");
        m.ingest_cert(&a.cert.raw, 1000).unwrap();
        m.set_admitted_k(a.cert.node_id, a.slot_k);
        let again = decide(&m, &r, 1001).unwrap();
        assert_eq!(again.slot_k, a.slot_k);
        // Long after the invite expired (10 000), the member asking again (a node cut off from
        // the mesh falling back to its bootstrap members) gets the same answer; a newcomer with
        // the expired invite does not.
        let (later, _) = make_request(&k, &a.cert.raw, vec![], 20_000);
        assert_eq!(decide(&m, &later, 20_000).unwrap().slot_k, a.slot_k);
        let k2 = NodeKeys::generate();
        let (newcomer, _) =
            make_request(&k2, &cert(&inv, &secret, &k2, "db2", 9_000), vec![], 20_000);
        assert_eq!(
            decide(&m, &newcomer, 20_000).unwrap_err().reason,
            RefuseReason::Expired
        );
        // The slot does not collide with the seed's.
        let asg = m.assignments();
        assert_ne!(asg[&a.cert.node_id].slot, asg[&m.self_id].slot);
    }

    #[test]
    fn refusals_say_why() {
        let (root, mut m, inv, secret) = setup(Some(1));
        // Expired.
        let (_, r) = request(&inv, &secret, "late", 9_000);
        assert_eq!(
            decide(&m, &r, 10_001).unwrap_err().reason,
            RefuseReason::Expired
        );
        // Another mesh.
        let other = RootKey::generate();
        let (_, oinv, osecret) = invite(&other, 10_000, None);
        let (_, r) = request(&oinv, &osecret, "x", 1000);
        let e = decide(&m, &r, 1000).unwrap_err();
        assert_eq!(e.reason, RefuseReason::WrongMesh);
        assert!(
            e.message.contains("another") || e.message.contains("token is for mesh"),
            "{}",
            e.message
        );
        // Used up: the seed itself used this one-use invite in this test world.
        let (_, r) = request(&inv, &secret, "second", 1000);
        assert_eq!(
            decide(&m, &r, 1000).unwrap_err().reason,
            RefuseReason::UsedUp
        );
        // A request signed by a key other than the certificate's.
        let (_, inv2, secret2) = invite(&root, 10_000, None);
        let k = NodeKeys::generate();
        let c = cert(&inv2, &secret2, &k, "imposter", 1000);
        let (forged, _) = make_request(&NodeKeys::generate(), &c, vec![], 1000);
        assert_eq!(
            decide(&m, &forged, 1000).unwrap_err().reason,
            RefuseReason::BadSignature
        );
        // Name taken by a live member.
        let (_, r) = request(&inv2, &secret2, "seed", 1000);
        assert_eq!(
            decide(&m, &r, 1000).unwrap_err().reason,
            RefuseReason::NameTaken
        );
        // Revoked.
        let (kr, r) = request(&inv2, &secret2, "gone", 1000);
        let rev = Revocation::issue(
            &root.0,
            RevocationBody {
                mesh: MeshId(root.public()),
                identity: kr.identity_public(),
                wireguard: kr.wg_public(),
                name: "gone".into(),
                revoked_at: 1,
            },
        );
        m.ingest_revocation(&rev.raw).unwrap();
        assert_eq!(
            decide(&m, &r, 1000).unwrap_err().reason,
            RefuseReason::Revoked
        );
        // Replayed from long ago.
        let (_, r) = request(&inv2, &secret2, "old", 1000);
        assert_eq!(
            decide(&m, &r, 5000).unwrap_err().reason,
            RefuseReason::Stale
        );
        // A fresh request carrying a backdated certificate (to win slot or invite priority).
        let k = NodeKeys::generate();
        let c = cert(&inv2, &secret2, &k, "backdated", 10);
        let (r, _) = make_request(&k, &c, vec![], 5000);
        let e = decide(&m, &r, 5000).unwrap_err();
        assert_eq!(e.reason, RefuseReason::Stale);
        assert!(
            e.message.contains("issued at unix time 10"),
            "{}",
            e.message
        );
        // The same, dated into the future.
        let c = cert(&inv2, &secret2, &k, "backdated", 9000);
        let (r, _) = make_request(&k, &c, vec![], 5000);
        assert_eq!(
            decide(&m, &r, 5000).unwrap_err().reason,
            RefuseReason::Stale
        );
        // Extreme clocks do not overflow the check.
        let (_, r) = request(&inv2, &secret2, "overflow", u64::MAX);
        assert!(decide(&m, &r, 1000).is_err());
        let (_, r) = request(&inv2, &secret2, "overflow", 1000);
        assert!(decide(&m, &r, u64::MAX).is_err());
    }
}
