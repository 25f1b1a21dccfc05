//! The trust model (see DESIGN "Trust model"): mesh root key -> invite -> node certificate,
//! node-signed records and root-signed revocations. Everything here is pure: bytes in,
//! verified values or a [`TrustError`] out, with `now` passed in where time matters.

pub(crate) mod cert;
mod keys;
mod record;
mod revocation;
mod signed;
mod token;

pub use cert::{Cert, InviteBody, NodeCertBody};
pub use keys::{wg_public, NodeKeys, RootKey};
pub use record::{NodeRecord, RoutesRecord, SelfStatement, ServiceDef, ServicesRecord};
pub use revocation::{Revocation, RevocationBody};
pub use signed::{decode, encode, Context, Signed};
pub use token::{Bootstrap, Token, TOKEN_PREFIX};

use sha2::{Digest, Sha256};
use std::fmt;

/// A 32-byte public key (ed25519 or x25519).
pub type Key32 = [u8; 32];

/// The mesh identity: the root key's public half.
#[derive(
    Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct MeshId(pub Key32);

impl MeshId {
    /// Short form for humans and for chitchat's cluster id.
    pub fn short(&self) -> String {
        crate::util::hex(&self.0[..6])
    }
}

impl fmt::Display for MeshId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.short())
    }
}

impl fmt::Debug for MeshId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MeshId({})", self.short())
    }
}

/// Short node id: 8 bytes of SHA-256 over the identity key, printed as 16 hex digits. Used as
/// the chitchat node id (DESIGN: keep gossip ids short, full keys go in values).
#[derive(
    Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct NodeId(pub [u8; 8]);

impl NodeId {
    pub fn of_identity(identity: &Key32) -> NodeId {
        let mut h = Sha256::new();
        h.update(b"meshd/node-id/v1");
        h.update(identity);
        let d = h.finalize();
        let mut id = [0u8; 8];
        id.copy_from_slice(&d[..8]);
        NodeId(id)
    }

    pub fn parse(s: &str) -> Option<NodeId> {
        if s.len() != 16 {
            return None;
        }
        let mut id = [0u8; 8];
        for (i, b) in id.iter_mut().enumerate() {
            *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(NodeId(id))
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&crate::util::hex(&self.0))
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({self})")
    }
}

/// Why something failed to verify. Messages name what failed; callers add how to fix it.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum TrustError {
    #[error("malformed {what}: {detail}")]
    Malformed { what: &'static str, detail: String },
    #[error("{what} signature does not verify")]
    BadSignature { what: &'static str },
    #[error("{what} belongs to mesh {found}, not to mesh {expected}")]
    WrongMesh {
        what: &'static str,
        expected: MeshId,
        found: MeshId,
    },
    #[error("the invite expired {} ago (at unix time {expired_at})", crate::util::human_duration(std::time::Duration::from_secs(now.saturating_sub(*expired_at))))]
    Expired { expired_at: u64, now: u64 },
    #[error(
        "certificate was issued at {issued_at}, before its invite was created at {created_at}"
    )]
    IssuedBeforeInvite { issued_at: u64, created_at: u64 },
    #[error("certificate was issued at {issued_at}, after its invite expired at {expired_at}")]
    IssuedAfterExpiry { issued_at: u64, expired_at: u64 },
    #[error("node name {0:?} is not a valid DNS label (1-63 of a-z, 0-9 and '-', not starting or ending with '-')")]
    InvalidName(String),
    #[error("the invite's secret key does not match its public key")]
    InviteKeyMismatch,
}

/// Verify a raw ed25519 signature over `ctx || 0 || msg`.
pub(crate) fn verify_sig(
    key: &Key32,
    ctx: Context,
    msg: &[u8],
    sig: &[u8],
    what: &'static str,
) -> Result<(), TrustError> {
    use ed25519_dalek::{Signature, VerifyingKey};
    let vk = VerifyingKey::from_bytes(key).map_err(|_| TrustError::Malformed {
        what,
        detail: "public key is not a valid ed25519 point".into(),
    })?;
    let sig: [u8; 64] = sig.try_into().map_err(|_| TrustError::Malformed {
        what,
        detail: format!("signature is {} bytes, expected 64", sig.len()),
    })?;
    let sig = Signature::from_bytes(&sig);
    vk.verify_strict(&signed::message(ctx, msg), &sig)
        .map_err(|_| TrustError::BadSignature { what })
}
