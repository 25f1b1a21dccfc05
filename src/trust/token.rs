//! The join token: one URL-safe string carrying an invite (root-signed), the invite's secret
//! key, and a few bootstrap endpoints sealed by the root. Anyone holding it can join until it
//! expires, so it is a secret.

use super::{Context, InviteBody, Key32, MeshId, Signed, TrustError};
use ed25519_dalek::SigningKey;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

/// Version prefix of the token string.
/// Tokens are `mj2_<length>_<base64url payload><6-character checksum>`: the length and the
/// checksum (SHA-256 of the payload, first 4 bytes) tell a truncated or mistyped token from a
/// forged one, and say which. `mj1_` tokens (no length, no checksum) are still read.
pub const TOKEN_PREFIX: &str = "mj2_";
const TOKEN_PREFIX_V1: &str = "mj1_";
/// Characters of the checksum at the end.
const CHECK_CHARS: usize = 6;

fn check_of(payload: &str) -> String {
    use sha2::Digest;
    let h = sha2::Sha256::digest(payload.as_bytes());
    crate::util::b64url(&h[..4])
}

/// The payload of an `mj2_` token body (`<length>_<payload><checksum>`), or what is wrong with
/// it, in words a person can act on.
fn unwrap_v2(body: &str) -> Result<&str, String> {
    let (len, rest) = body
        .split_once('_')
        .ok_or("the length after \"mj2_\" is missing: copy the whole token")?;
    let len: usize = len.parse().map_err(|_| {
        format!("{len:?} after \"mj2_\" is not the token's length: copy the whole token")
    })?;
    let want = len + CHECK_CHARS;
    let at = TOKEN_PREFIX.len() + body.len() - rest.len();
    if let Some((i, c)) = rest
        .char_indices()
        .find(|(_, c)| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
    {
        return Err(format!(
            "character {} ({c:?}) cannot be part of a token: was it mistyped or wrapped?",
            at + i + 1
        ));
    }
    if rest.len() < want {
        return Err(format!(
            "it is truncated: {} of its {} characters are there; copy the whole line",
            at + rest.len(),
            at + want
        ));
    }
    if rest.len() > want {
        return Err(format!(
            "it has {} extra characters after character {}: was something pasted after it?",
            rest.len() - want,
            at + want
        ));
    }
    let (payload, check) = rest.split_at(len);
    if check_of(payload) != check {
        return Err(
            "its checksum does not match: a character was changed (mistyped or misread); copy \
             the token again"
                .into(),
        );
    }
    Ok(payload)
}

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
        let payload = crate::util::b64url(&super::encode(&wire));
        format!(
            "{TOKEN_PREFIX}{}_{payload}{}",
            payload.len(),
            check_of(&payload)
        )
    }

    /// Parse and verify a token (signatures and key consistency; expiry is checked by the
    /// caller with [`Token::check_fresh`], since that needs `now`).
    pub fn decode(s: &str) -> Result<Token, TrustError> {
        let s = s.trim();
        let s = s.strip_prefix("meshd join ").unwrap_or(s).trim();
        let malformed = |detail: String| TrustError::Malformed {
            what: "join token",
            detail,
        };
        let (payload, checked) = if let Some(body) = s.strip_prefix(TOKEN_PREFIX) {
            (unwrap_v2(body).map_err(malformed)?, true)
        } else if let Some(payload) = s.strip_prefix(TOKEN_PREFIX_V1) {
            (payload, false)
        } else {
            return Err(malformed(format!(
                "a meshd token starts with {TOKEN_PREFIX:?}"
            )));
        };
        let damaged = || {
            malformed(if checked {
                "its contents do not decode although the checksum matches: it was not made by \
                 meshd"
                    .into()
            } else {
                "it is truncated or damaged (an older token without a checksum): copy the \
                 whole line again"
                    .into()
            })
        };
        let bytes = crate::util::from_b64url(payload).map_err(|_| damaged())?;
        let wire: TokenWire = super::decode(&bytes, "join token").map_err(|_| damaged())?;
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
        let payload = crate::util::b64url(&crate::trust::encode(&wire));
        let s = format!(
            "{TOKEN_PREFIX}{}_{payload}{}",
            payload.len(),
            check_of(&payload)
        );
        assert!(matches!(
            Token::decode(&s),
            Err(e) if !e.to_string().contains("checksum")
        ));
    }

    fn why(s: &str) -> String {
        match Token::decode(s) {
            Ok(_) => panic!("accepted {s:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_damaged_token_says_what_is_wrong_and_where() {
        let (_, t) = token();
        let s = t.encode();
        let cut = &s[..s.len() - 10];
        let w = why(cut);
        assert!(
            w.contains("truncated") && w.contains(&format!("{} of its {}", cut.len(), s.len())),
            "{w}"
        );
        // A mistyped character in the middle.
        let mut typo = s.clone().into_bytes();
        let i = s.len() / 2;
        typo[i] = if typo[i] == b'A' { b'B' } else { b'A' };
        let w = why(std::str::from_utf8(&typo).unwrap());
        assert!(w.contains("checksum does not match"), "{w}");
        // A character no token has, with its position.
        let mut bad = s.clone();
        bad.replace_range(30..31, "!");
        assert!(why(&bad).contains("character 31 ('!')"), "{}", why(&bad));
        // Something pasted after it.
        assert!(why(&format!("{s}xyz")).contains("3 extra characters"));
        // Never decoder text.
        for w in [why(cut), why(&s[..20]), why("mj2_"), why("mj2_12_abc")] {
            assert!(!w.contains("Unexpected") && !w.contains('{'), "{w}");
        }
    }

    #[test]
    fn tokens_of_the_older_format_still_work_and_fail_in_words() {
        let (_, t) = token();
        let wire = TokenWire {
            invite: t.invite_raw.clone(),
            seal: t.seal_raw.clone(),
            invite_secret: t.invite_secret.to_bytes(),
        };
        let v1 = format!(
            "{TOKEN_PREFIX_V1}{}",
            crate::util::b64url(&crate::trust::encode(&wire))
        );
        assert_eq!(Token::decode(&v1).unwrap().invite, t.invite);
        let w = why(&v1[..v1.len() - 5]);
        assert!(w.contains("truncated or damaged"), "{w}");
        assert!(!w.contains("Unexpected"), "{w}");
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
            prop_assert!(Token::decode(&tampered).is_err());
        }
    }
}
