//! The join exchange: the only conversation outside the tunnels (DESIGN "Gossip rides inside the
//! tunnels"). The joiner sends its certificate chain, signed with its identity key, to a
//! bootstrap endpoint; the seed verifies it against the mesh root and the mesh's state, assigns
//! the joiner's slot with the deterministic rule and answers with a signed acceptance, or with a
//! refusal that says why. No secret crosses the wire.
//!
//! Frames are `MSHD` + kind byte + bincode body, on the mesh UDP port.

use crate::constants::{
    JOIN_ATTEMPT_MAX, JOIN_ATTEMPT_TIMEOUT, JOIN_DEADLINE, JOIN_REQUEST_MAX_AGE, MAX_JOIN_FRAME,
};
use crate::gossip::Membership;
use crate::mesh::io::UdpIo;
use crate::mesh::packet::CONTROL_MAGIC;
use crate::trust::{
    decode, encode, Cert, Context, Key32, MeshId, NodeId, NodeKeys, NodeRecord, Signed, Token,
    TrustError,
};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::time::Instant;

const KIND_REQUEST: u8 = 1;
const KIND_ACCEPT: u8 = 2;
const KIND_REFUSE: u8 = 3;
const KIND_REVOKED: u8 = 4;
const KIND_CONFLICT: u8 = 5;

/// What a joiner asks, signed with its identity key (proof it holds the key its certificate
/// names).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinRequest {
    pub cert: Signed,
    pub endpoints: Vec<SocketAddr>,
    pub sent_at: u64,
    pub nonce: [u8; 16],
}

/// The seed's answer, signed with the seed's identity key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinAccept {
    pub nonce: [u8; 16],
    /// The joiner this answers (its identity key).
    pub joiner: Key32,
    /// The slot candidate index assigned to the joiner.
    pub slot_k: u32,
    /// The joiner's address as the seed saw it.
    pub observed: SocketAddr,
    pub seed_cert: Signed,
    pub seed_record: Signed,
    /// A few other members (certificate, record) so the joiner's tunnels come up without waiting
    /// for gossip; gossip delivers the rest.
    pub members: Vec<(Signed, Option<Signed>)>,
    pub revocations: Vec<Signed>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefuseReason {
    Malformed,
    WrongMesh,
    BadSignature,
    Expired,
    UsedUp,
    Revoked,
    NameTaken,
    MeshFull,
    Stale,
}

/// A refusal. Unsigned: it changes nothing, and the joiner reports it as what that endpoint said.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinRefuse {
    pub nonce: [u8; 16],
    pub reason: RefuseReason,
    pub message: String,
}

#[derive(Debug)]
pub enum Frame {
    Request(Signed),
    Accept(Signed),
    Refuse(JoinRefuse),
    /// Sent to a removed node that still knocks: its root-signed revocation, so it can verify
    /// that it was removed and stop.
    Revoked(Signed),
    /// Sent to a member that claims a slot it lost (a collision resolved while it could not
    /// hear the winner): the winner's certificate and record. All signed, so the receiver needs
    /// no trust in the sender; once it verifies them it moves on to its next slot.
    Conflict(Vec<(Signed, Signed)>),
}

pub fn encode_frame(f: &Frame) -> Vec<u8> {
    let (kind, body) = match f {
        Frame::Request(s) => (KIND_REQUEST, encode(s)),
        Frame::Accept(s) => (KIND_ACCEPT, encode(s)),
        Frame::Refuse(r) => (KIND_REFUSE, encode(r)),
        Frame::Revoked(s) => (KIND_REVOKED, encode(s)),
        Frame::Conflict(v) => (KIND_CONFLICT, encode(v)),
    };
    let mut out = Vec::with_capacity(5 + body.len());
    out.extend_from_slice(CONTROL_MAGIC);
    out.push(kind);
    out.extend_from_slice(&body);
    out
}

pub fn decode_frame(d: &[u8]) -> Result<Frame, TrustError> {
    let malformed = |detail: &str| TrustError::Malformed {
        what: "join frame",
        detail: detail.into(),
    };
    if d.len() > MAX_JOIN_FRAME {
        return Err(malformed("too large"));
    }
    let rest = d
        .strip_prefix(CONTROL_MAGIC.as_slice())
        .ok_or_else(|| malformed("bad magic"))?;
    let (&kind, body) = rest.split_first().ok_or_else(|| malformed("empty"))?;
    match kind {
        KIND_REQUEST => Ok(Frame::Request(decode(body, "join request")?)),
        KIND_ACCEPT => Ok(Frame::Accept(decode(body, "join answer")?)),
        KIND_REFUSE => Ok(Frame::Refuse(decode(body, "join refusal")?)),
        KIND_REVOKED => Ok(Frame::Revoked(decode(body, "revocation notice")?)),
        KIND_CONFLICT => Ok(Frame::Conflict(decode(body, "slot conflict notice")?)),
        _ => Err(malformed("unknown kind")),
    }
}

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

/// What a successful join yields.
pub struct JoinOutcome {
    pub seed: Cert,
    pub seed_addr: SocketAddr,
    pub accept: JoinAccept,
}

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("{addr} refused the join: {message}")]
    Refused {
        addr: SocketAddr,
        reason: RefuseReason,
        message: String,
    },
    #[error(
        "no bootstrap endpoint answered ({tried}); check that one of them is running meshd and that \
         UDP to its port is not blocked, or pass a live member with --bootstrap ADDR:PORT"
    )]
    NoAnswer { tried: String },
    #[error("{addr} could not read the join request: {message}")]
    Unreadable { addr: SocketAddr, message: String },
    #[error("the token lists no bootstrap endpoint; pass one with --bootstrap ADDR:PORT")]
    NoBootstrap,
    #[error("sending the join request: {0}")]
    Io(#[from] std::io::Error),
}

/// Build the signed request.
pub fn make_request(
    keys: &NodeKeys,
    cert: &Signed,
    endpoints: Vec<SocketAddr>,
    now: u64,
) -> (Signed, [u8; 16]) {
    use rand_core::RngCore;
    let mut nonce = [0u8; 16];
    rand_core::OsRng.fill_bytes(&mut nonce);
    let req = JoinRequest {
        cert: cert.clone(),
        endpoints,
        sent_at: now,
        nonce,
    };
    (
        Signed::sign(Context::JoinRequest, &req, &keys.identity),
        nonce,
    )
}

/// Verify an acceptance: signed by a member of the token's mesh (and, where the token named the
/// endpoint's key, by that very node), answering our nonce and our identity.
pub fn verify_accept(
    raw: &Signed,
    mesh: &MeshId,
    nonce: &[u8; 16],
    identity: &Key32,
    expected_wg: Option<&Key32>,
) -> Result<(Cert, JoinAccept), TrustError> {
    let peek: JoinAccept = raw.peek("join answer")?;
    let seed = Cert::verify(&peek.seed_cert, mesh)?;
    let acc: JoinAccept = raw.verify(Context::JoinAccept, &seed.identity, "join answer")?;
    if acc.nonce != *nonce || acc.joiner != *identity {
        return Err(TrustError::Malformed {
            what: "join answer",
            detail: "it answers another request".into(),
        });
    }
    if let Some(wg) = expected_wg {
        if *wg != seed.wireguard {
            return Err(TrustError::Malformed {
                what: "join answer",
                detail: "it comes from another node than the token names".into(),
            });
        }
    }
    Ok((seed, acc))
}

/// The joiner's side: try each bootstrap endpoint in turn, passes with growing waits, until one
/// accepts, one refuses for a reason every member would agree on, or [`JOIN_DEADLINE`] passes.
/// Retries resend the same request, which a seed answers the same way (it is idempotent).
pub async fn join<U: UdpIo>(
    udp: &U,
    token: &Token,
    keys: &NodeKeys,
    cert: &Signed,
    endpoints: Vec<SocketAddr>,
    extra_bootstrap: &[SocketAddr],
    now: u64,
) -> Result<JoinOutcome, JoinError> {
    let mut targets: Vec<(SocketAddr, Option<Key32>)> =
        extra_bootstrap.iter().map(|a| (*a, None)).collect();
    targets.extend(token.bootstrap.iter().map(|b| (b.addr, Some(b.wireguard))));
    if targets.is_empty() {
        return Err(JoinError::NoBootstrap);
    }
    let (req, nonce) = make_request(keys, cert, endpoints, now);
    let frame = encode_frame(&Frame::Request(req));
    let identity = keys.identity_public();
    let mut buf = vec![0u8; MAX_JOIN_FRAME + 1];
    let give_up = Instant::now() + JOIN_DEADLINE;
    let mut wait = JOIN_ATTEMPT_TIMEOUT;
    let mut pass = 0u32;
    let mut unreadable = None;
    let mut unreadable_from = std::collections::HashSet::new();
    while Instant::now() < give_up {
        if pass > 0 {
            tracing::info!(pass, "no answer to the join request yet; retrying");
        }
        pass += 1;
        for (addr, wg) in &targets {
            if let Err(e) = udp.send_to(&frame, *addr).await {
                tracing::debug!(%addr, error = %e, "join request not sent");
                continue;
            }
            let deadline = (Instant::now() + wait).min(give_up);
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                let Ok(r) = tokio::time::timeout(left, udp.recv_gro(&mut buf)).await else {
                    break;
                };
                // With UDP GRO, equal answers to retried requests may arrive as one buffer.
                let (n, from, segment) = r?;
                let n = n.min(segment.max(1));
                if from != *addr {
                    continue;
                }
                match decode_frame(&buf[..n]) {
                    Ok(Frame::Accept(raw)) => {
                        match verify_accept(&raw, &token.mesh(), &nonce, &identity, wg.as_ref()) {
                            Ok((seed, accept)) => {
                                return Ok(JoinOutcome {
                                    seed,
                                    seed_addr: *addr,
                                    accept,
                                })
                            }
                            Err(e) => {
                                tracing::warn!(%addr, error = %e, "ignoring an answer that does not verify");
                            }
                        }
                    }
                    // Refusals are unsigned, so only one naming this request's nonce counts (a
                    // sender that cannot see the request cannot make one).
                    Ok(Frame::Refuse(r)) if r.nonce == nonce => {
                        return Err(JoinError::Refused {
                            addr: *addr,
                            reason: r.reason,
                            message: r.message,
                        });
                    }
                    // A seed that cannot parse the request cannot name its nonce. Not final
                    // (anyone could send it), but the likeliest explanation if nobody else
                    // answers, so it is what the joiner reports in the end.
                    Ok(Frame::Refuse(r)) if r.nonce == [0u8; 16] => {
                        tracing::debug!(%addr, "the seed could not read the join request: {}", r.message);
                        unreadable_from.insert(*addr);
                        unreadable = Some(JoinError::Unreadable {
                            addr: *addr,
                            message: r.message,
                        });
                        break;
                    }
                    _ => {}
                }
            }
        }
        if unreadable_from.len() == targets.len() {
            break; // every seed says the same; retrying will not change it
        }
        wait = (wait * 3 / 2).min(JOIN_ATTEMPT_MAX);
    }
    if let Some(e) = unreadable {
        return Err(e);
    }
    Err(JoinError::NoAnswer {
        tried: targets
            .iter()
            .map(|(a, _)| a.to_string())
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// The identity a request claims, for logs (unverified).
pub fn peek_request_node(raw: &Signed) -> Option<(NodeId, String)> {
    let req: JoinRequest = raw.peek("join request").ok()?;
    let body: crate::trust::NodeCertBody = req.cert.peek("node certificate").ok()?;
    Some((NodeId::of_identity(&body.identity), body.name))
}

/// Sign a record for this node.
pub fn sign_record(keys: &NodeKeys, rec: &NodeRecord) -> Signed {
    Signed::sign(Context::Record, rec, &keys.identity)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gossip::MeshParams;
    use crate::trust::cert::tests::{cert, invite};
    use crate::trust::{Revocation, RevocationBody, RootKey};
    use proptest::prelude::*;

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

    /// A seed that cannot parse a request (another meshd version) answers without a nonce; the
    /// joiner reports that instead of "nobody answered", and gives up once every seed said so.
    #[tokio::test]
    async fn a_seed_that_cannot_read_the_request_is_reported() {
        use crate::mesh::io::MemNet;
        let net = MemNet::new();
        let seed_addr: SocketAddr = "192.0.2.1:51820".parse().unwrap();
        let seed = net.bind(seed_addr).unwrap();
        let joiner = net.bind("192.0.2.2:51820".parse().unwrap()).unwrap();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok((_, from)) = seed.recv_from(&mut buf).await {
                let no = refuse([0; 16], RefuseReason::Malformed, "unknown field wg_sig");
                let _ = seed.send_to(&encode_frame(&Frame::Refuse(no)), from).await;
            }
        });
        let root = RootKey::generate();
        let now = crate::util::unix_now();
        let token = crate::node::setup::make_token(
            &root,
            "10.210.0.0/16".parse().unwrap(),
            "mesh.internal",
            std::time::Duration::from_secs(3600),
            None,
            vec![],
            now,
        );
        let keys = NodeKeys::generate();
        let c = cert(&token.invite_raw, &token.invite_secret, &keys, "j", now);
        let r = tokio::time::timeout(
            JOIN_DEADLINE * 2,
            join(&joiner, &token, &keys, &c, vec![], &[seed_addr], now),
        )
        .await
        .expect("join gives up by its deadline");
        match r {
            Err(e @ JoinError::Unreadable { .. }) => {
                assert!(e.to_string().contains("unknown field wg_sig"), "{e}")
            }
            Err(e) => panic!("expected Unreadable, got {e}"),
            Ok(_) => panic!("expected Unreadable, got an acceptance"),
        }
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

    #[test]
    fn frames_round_trip() {
        let r = JoinRefuse {
            nonce: [1; 16],
            reason: RefuseReason::Expired,
            message: "m".into(),
        };
        let d = encode_frame(&Frame::Refuse(r.clone()));
        match decode_frame(&d).unwrap() {
            Frame::Refuse(x) => assert_eq!(x, r),
            other => panic!("{other:?}"),
        }
    }

    proptest! {
        #[test]
        fn decode_frame_never_panics(d in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_frame(&d);
            let mut framed = CONTROL_MAGIC.to_vec();
            framed.extend_from_slice(&d);
            let _ = decode_frame(&framed);
        }
    }
}
