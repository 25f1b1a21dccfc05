//! The control frames on the mesh UDP port, outside the tunnels (DESIGN "One UDP port"): join
//! requests and answers, revocation notices to removed nodes, slot-conflict notices. Each is
//! `MSHD` + a kind byte + a bincode body. This module is the codec only; what a frame means is
//! decided by [`crate::join`] and the node's control-frame handling.

use crate::constants::MAX_JOIN_FRAME;
use crate::mesh::packet::CONTROL_MAGIC;
use crate::trust::{decode, encode, Key32, Signed, TrustError};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

const KIND_REQUEST: u8 = 1;
const KIND_ACCEPT: u8 = 2;
const KIND_REFUSE: u8 = 3;
const KIND_REVOKED: u8 = 4;
const KIND_CONFLICT: u8 = 5;
const KIND_REACH: u8 = 6;

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
    /// A member's reachability probe, sent from a port this node never sent to, to the
    /// address members see this node at (`meshctl netcheck`): the nonce it asked for.
    Reach(u64),
}

pub fn encode_frame(f: &Frame) -> Vec<u8> {
    let (kind, body) = match f {
        Frame::Request(s) => (KIND_REQUEST, encode(s)),
        Frame::Accept(s) => (KIND_ACCEPT, encode(s)),
        Frame::Refuse(r) => (KIND_REFUSE, encode(r)),
        Frame::Revoked(s) => (KIND_REVOKED, encode(s)),
        Frame::Conflict(v) => (KIND_CONFLICT, encode(v)),
        Frame::Reach(n) => (KIND_REACH, n.to_be_bytes().to_vec()),
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
        KIND_REACH => Ok(Frame::Reach(u64::from_be_bytes(
            body.try_into()
                .map_err(|_| malformed("reach probe length"))?,
        ))),
        _ => Err(malformed("unknown kind")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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
