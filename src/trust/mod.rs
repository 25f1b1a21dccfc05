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
pub use record::{
    AboutRecord, NodeRecord, RoutesRecord, SelfStatement, ServiceDef, ServicesRecord, WorkloadName,
    WorkloadsRecord,
};
pub use revocation::{Revocation, RevocationBody};
pub use signed::{decode, encode, Context, Signed};
pub use token::{Bootstrap, Token, TOKEN_PREFIX};

pub use crate::id::{Key32, MeshId, NodeId};

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
