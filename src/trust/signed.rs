//! Signed envelopes: a body (bincode bytes) and an ed25519 signature over a domain-separated
//! message. The signature covers the exact bytes carried, so verification never depends on
//! re-encoding.

use super::{verify_sig, Key32, TrustError};
use ed25519_dalek::{Signer, SigningKey};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Domain separation: every kind of signed statement signs under its own context, so a
/// signature made for one purpose can never be replayed as another.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Context {
    Invite,
    TokenSeal,
    Cert,
    CertSelf,
    CertWireguard,
    Record,
    Revocation,
    JoinRequest,
    JoinAccept,
    Services,
    Hostnames,
    About,
    Workloads,
}

impl Context {
    fn label(self) -> &'static [u8] {
        match self {
            Context::Invite => b"meshd/invite/v1",
            Context::TokenSeal => b"meshd/token-seal/v1",
            Context::Cert => b"meshd/cert/v1",
            Context::CertSelf => b"meshd/cert-self/v1",
            Context::CertWireguard => b"meshd/cert-wireguard/v1",
            Context::Record => b"meshd/record/v1",
            Context::Revocation => b"meshd/revocation/v1",
            Context::JoinRequest => b"meshd/join-request/v1",
            Context::JoinAccept => b"meshd/join-accept/v1",
            Context::Services => b"meshd/services/v1",
            Context::Hostnames => b"meshd/hostnames/v1",
            Context::About => b"meshd/about/v1",
            Context::Workloads => b"meshd/workloads/v1",
        }
    }
}

pub(crate) fn message(ctx: Context, body: &[u8]) -> Vec<u8> {
    let label = ctx.label();
    let mut m = Vec::with_capacity(label.len() + 1 + body.len());
    m.extend_from_slice(label);
    m.push(0);
    m.extend_from_slice(body);
    m
}

/// Upper bound for any decoded structure; protects against length-prefix bombs.
const DECODE_LIMIT: usize = 1 << 20;

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<DECODE_LIMIT>()
}

/// Encode a value with the wire codec (bincode 2, standard config).
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    bincode::serde::encode_to_vec(value, config()).expect("in-memory encoding cannot fail")
}

/// Decode a value, refusing trailing bytes.
pub fn decode<T: DeserializeOwned>(bytes: &[u8], what: &'static str) -> Result<T, TrustError> {
    let (v, used) = bincode::serde::decode_from_slice::<T, _>(bytes, config()).map_err(|e| {
        TrustError::Malformed {
            what,
            detail: e.to_string(),
        }
    })?;
    if used != bytes.len() {
        return Err(TrustError::Malformed {
            what,
            detail: format!("{} trailing bytes", bytes.len() - used),
        });
    }
    Ok(v)
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signed {
    pub body: Vec<u8>,
    pub sig: Vec<u8>,
}

impl Signed {
    pub fn sign<T: Serialize>(ctx: Context, value: &T, key: &SigningKey) -> Signed {
        let body = encode(value);
        let sig = key.sign(&message(ctx, &body)).to_bytes().to_vec();
        Signed { body, sig }
    }

    /// Check the signature with `key`, then decode the body.
    pub fn verify<T: DeserializeOwned>(
        &self,
        ctx: Context,
        key: &Key32,
        what: &'static str,
    ) -> Result<T, TrustError> {
        verify_sig(key, ctx, &self.body, &self.sig, what)?;
        decode(&self.body, what)
    }

    /// Decode the body without checking the signature: only to find out which key must be used
    /// to verify it. Never act on the result before verifying.
    pub fn peek<T: DeserializeOwned>(&self, what: &'static str) -> Result<T, TrustError> {
        decode(&self.body, what)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        encode(self)
    }

    pub fn from_bytes(bytes: &[u8], what: &'static str) -> Result<Signed, TrustError> {
        decode(bytes, what)
    }

    /// URL-safe base64 form, used in gossip values and state files.
    pub fn to_b64(&self) -> String {
        crate::util::b64url(&self.to_bytes())
    }

    pub fn from_b64(s: &str, what: &'static str) -> Result<Signed, TrustError> {
        let bytes = crate::util::from_b64url(s).map_err(|e| TrustError::Malformed {
            what,
            detail: e.to_string(),
        })?;
        Signed::from_bytes(&bytes, what)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_core::OsRng;

    #[test]
    fn signature_is_bound_to_context_and_key() {
        let k = SigningKey::generate(&mut OsRng);
        let other = SigningKey::generate(&mut OsRng);
        let s = Signed::sign(Context::Record, &(1u32, "x".to_string()), &k);
        let pk = k.verifying_key().to_bytes();
        let v: (u32, String) = s.verify(Context::Record, &pk, "t").unwrap();
        assert_eq!(v, (1, "x".into()));
        assert!(s.verify::<(u32, String)>(Context::Cert, &pk, "t").is_err());
        let opk = other.verifying_key().to_bytes();
        assert!(s
            .verify::<(u32, String)>(Context::Record, &opk, "t")
            .is_err());
        let mut t = s.clone();
        t.body[0] ^= 1;
        assert!(t
            .verify::<(u32, String)>(Context::Record, &pk, "t")
            .is_err());
    }

    #[test]
    fn decode_rejects_trailing_bytes_and_garbage() {
        let mut b = encode(&7u64);
        b.push(0);
        assert!(decode::<u64>(&b, "t").is_err());
        assert!(decode::<Signed>(&[0xff; 3], "t").is_err());
    }
}
