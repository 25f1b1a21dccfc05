//! The join token: one URL-safe string carrying an invite (root-signed), the invite's secret
//! key, and a few bootstrap endpoints sealed by the root. Anyone holding it can join until it
//! expires, so it is a secret.

use super::{Context, InviteBody, Key32, MeshId, Signed, TrustError};
use ed25519_dalek::SigningKey;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

/// Version prefix of the token string.
pub const TOKEN_PREFIX: &str = "mj1_";

/// A member a joiner can contact: its underlay address and WireGuard key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bootstrap {
    pub addr: SocketAddr,
    pub wireguard: Key32,
}

/// Root-signed binding of the bootstrap list to the invite, so no part of the token can be
/// altered without the root key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct TokenSeal {
    invite_key: Key32,
    bootstrap: Vec<Bootstrap>,
}

#[derive(Serialize, Deserialize)]
struct TokenWire {
    invite: Signed,
    seal: Signed,
    invite_secret: Key32,
}

pub struct Token {
    pub invite: InviteBody,
    pub invite_raw: Signed,
    pub bootstrap: Vec<Bootstrap>,
    pub invite_secret: SigningKey,
    seal_raw: Signed,
}

/// Never prints the invite secret.
impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("mesh", &self.invite.mesh)
            .field("expires_at", &self.invite.expires_at)
            .field("max_uses", &self.invite.max_uses)
            .field("bootstrap", &self.bootstrap)
            .finish()
    }
}

impl Token {
    /// Make a token. `invite.invite_key` must be `secret`'s public key.
    pub fn create(
        root: &SigningKey,
        invite: InviteBody,
        secret: SigningKey,
        bootstrap: Vec<Bootstrap>,
    ) -> Token {
        assert_eq!(invite.invite_key, secret.verifying_key().to_bytes());
        let invite_raw = invite.sign(root);
        let seal_raw = Signed::sign(
            Context::TokenSeal,
            &TokenSeal {
                invite_key: invite.invite_key,
                bootstrap: bootstrap.clone(),
            },
            root,
        );
        Token {
            invite,
            invite_raw,
            bootstrap,
            invite_secret: secret,
            seal_raw,
        }
    }

    pub fn mesh(&self) -> MeshId {
        self.invite.mesh
    }

    pub fn encode(&self) -> String {
        let wire = TokenWire {
            invite: self.invite_raw.clone(),
            seal: self.seal_raw.clone(),
            invite_secret: self.invite_secret.to_bytes(),
        };
        format!(
            "{TOKEN_PREFIX}{}",
            crate::util::b64url(&super::encode(&wire))
        )
    }

    /// Parse and verify a token (signatures and key consistency; expiry is checked by the
    /// caller with [`Token::check_fresh`], since that needs `now`).
    pub fn decode(s: &str) -> Result<Token, TrustError> {
        let s = s.trim();
        let s = s.strip_prefix("meshd join ").unwrap_or(s).trim();
        let Some(payload) = s.strip_prefix(TOKEN_PREFIX) else {
            return Err(TrustError::Malformed {
                what: "join token",
                detail: format!("a meshd token starts with {TOKEN_PREFIX:?}"),
            });
        };
        let bytes = crate::util::from_b64url(payload).map_err(|e| TrustError::Malformed {
            what: "join token",
            detail: format!("not valid base64 ({e}); was it copied completely?"),
        })?;
        let wire: TokenWire = super::decode(&bytes, "join token")?;
        let peek: InviteBody = wire.invite.peek("join token")?;
        let invite = InviteBody::verify(&wire.invite, &peek.mesh)?;
        let seal: TokenSeal = wire.seal.verify(
            Context::TokenSeal,
            &invite.mesh.0,
            "join token bootstrap list",
        )?;
        let secret = SigningKey::from_bytes(&wire.invite_secret);
        if secret.verifying_key().to_bytes() != invite.invite_key
            || seal.invite_key != invite.invite_key
        {
            return Err(TrustError::InviteKeyMismatch);
        }
        Ok(Token {
            invite,
            invite_raw: wire.invite,
            bootstrap: seal.bootstrap,
            invite_secret: secret,
            seal_raw: wire.seal,
        })
    }

    pub fn check_fresh(&self, now: u64) -> Result<(), TrustError> {
        if now > self.invite.expires_at {
            return Err(TrustError::Expired {
                expired_at: self.invite.expires_at,
                now,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trust::RootKey;
    use proptest::prelude::*;

    fn token() -> (RootKey, Token) {
        let root = RootKey::generate();
        let secret = SigningKey::generate(&mut rand_core::OsRng);
        let invite = InviteBody {
            mesh: MeshId(root.public()),
            range: "10.210.0.0/16".parse().unwrap(),
            domain: "mesh.internal".into(),
            invite_key: secret.verifying_key().to_bytes(),
            created_at: 100,
            expires_at: 200,
            max_uses: Some(1),
        };
        let bootstrap = vec![Bootstrap {
            addr: "198.51.100.1:51820".parse().unwrap(),
            wireguard: [4; 32],
        }];
        let t = Token::create(&root.0, invite, secret, bootstrap);
        (root, t)
    }

    #[test]
    fn round_trips_and_is_url_safe() {
        let (root, t) = token();
        let s = t.encode();
        assert!(s.starts_with(TOKEN_PREFIX));
        assert!(s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        let d = Token::decode(&s).unwrap();
        assert_eq!(d.invite, t.invite);
        assert_eq!(d.bootstrap, t.bootstrap);
        assert_eq!(d.mesh(), MeshId(root.public()));
        // The whole pasted line works too.
        assert!(Token::decode(&format!("meshd join {s}\n")).is_ok());
        assert!(d.check_fresh(200).is_ok());
        assert!(matches!(
            d.check_fresh(201),
            Err(TrustError::Expired { .. })
        ));
    }

    #[test]
    fn refuses_other_strings() {
        assert!(Token::decode("hello").is_err());
        assert!(Token::decode("mj1_!!!").is_err());
        assert!(Token::decode("mj1_").is_err());
    }

    #[test]
    fn a_swapped_bootstrap_list_is_detected() {
        let (_, a) = token();
        let (_, b) = token();
        // Graft b's seal onto a: signatures no longer line up.
        let wire = TokenWire {
            invite: a.invite_raw.clone(),
            seal: b.seal_raw.clone(),
            invite_secret: a.invite_secret.to_bytes(),
        };
        let s = format!(
            "{TOKEN_PREFIX}{}",
            crate::util::b64url(&crate::trust::encode(&wire))
        );
        assert!(Token::decode(&s).is_err());
    }

    proptest! {
        /// Any single-character change to a token is refused, never accepted as another token.
        #[test]
        fn tampering_with_any_character_is_refused(pos in 0usize..10_000, c in "[A-Za-z0-9_-]") {
            let (_, t) = token();
            let s = t.encode();
            let payload_start = TOKEN_PREFIX.len();
            let i = payload_start + pos % (s.len() - payload_start);
            let mut bytes = s.clone().into_bytes();
            let nc = c.as_bytes()[0];
            prop_assume!(bytes[i] != nc);
            bytes[i] = nc;
            let tampered = String::from_utf8(bytes).unwrap();
            // The last base64 character can carry padding bits that decode identically.
            if let Ok(d) = Token::decode(&tampered) {
                prop_assert_eq!(i, s.len() - 1);
                prop_assert_eq!(d.encode(), s);
            }
        }
    }
}
