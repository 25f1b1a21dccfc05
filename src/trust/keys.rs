//! Key material. Private keys are generated on the machine and never serialized anywhere but
//! the node's own 0600 state files.

use super::Key32;
use ed25519_dalek::SigningKey;
use rand_core::OsRng;
use x25519_dalek::{PublicKey, StaticSecret};

/// A node's own keys: its ed25519 identity and its x25519 WireGuard key.
#[derive(Clone)]
pub struct NodeKeys {
    pub identity: SigningKey,
    pub wireguard: StaticSecret,
}

/// Never prints the secrets.
impl std::fmt::Debug for NodeKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeKeys")
            .field("identity", &crate::util::short_key(&self.identity_public()))
            .field("wireguard", &crate::util::short_key(&self.wg_public()))
            .finish()
    }
}

impl NodeKeys {
    pub fn generate() -> NodeKeys {
        NodeKeys {
            identity: SigningKey::generate(&mut OsRng),
            wireguard: StaticSecret::random_from_rng(OsRng),
        }
    }

    pub fn identity_public(&self) -> Key32 {
        self.identity.verifying_key().to_bytes()
    }

    pub fn wg_public(&self) -> Key32 {
        PublicKey::from(&self.wireguard).to_bytes()
    }

    pub fn from_bytes(identity: Key32, wireguard: Key32) -> NodeKeys {
        NodeKeys {
            identity: SigningKey::from_bytes(&identity),
            wireguard: StaticSecret::from(wireguard),
        }
    }
}

/// The mesh root key: its public half is the mesh id.
pub struct RootKey(pub SigningKey);

impl RootKey {
    pub fn generate() -> RootKey {
        RootKey(SigningKey::generate(&mut OsRng))
    }

    pub fn public(&self) -> Key32 {
        self.0.verifying_key().to_bytes()
    }
}

/// The WireGuard public key of a secret.
pub fn wg_public(secret: &StaticSecret) -> Key32 {
    PublicKey::from(secret).to_bytes()
}

/// Signatures made with an x25519 (WireGuard) key, so a certificate can prove that its holder
/// has the WireGuard secret it names, not only its identity key.
///
/// This is the XEdDSA construction (Signal's specification): the clamped x25519 scalar `a`
/// gives the Edwards point `A = aB`, whose Montgomery form is the WireGuard public key; of
/// `A` and `-A` (same Montgomery u) the signer uses the one with sign bit 0, negating `a` if
/// needed, and makes an ordinary Ed25519 signature with it. A verifier turns the public u back
/// into the Edwards point with sign 0 and checks an Ed25519 signature. The nonce key is derived
/// from the secret with a separate hash, so signatures are deterministic and never share a
/// nonce with another key. (Not byte-compatible with Signal's XEdDSA, which uses a random nonce.)
pub mod xeddsa {
    use super::Key32;
    use curve25519_dalek::edwards::EdwardsPoint;
    use curve25519_dalek::montgomery::MontgomeryPoint;
    use curve25519_dalek::scalar::{clamp_integer, Scalar};
    use ed25519_dalek::hazmat::{raw_sign, ExpandedSecretKey};
    use ed25519_dalek::{Signature, VerifyingKey};
    use sha2::{Digest, Sha512};
    use x25519_dalek::StaticSecret;

    pub fn sign(secret: &StaticSecret, msg: &[u8]) -> Vec<u8> {
        let k = secret.to_bytes();
        let mut a = Scalar::from_bytes_mod_order(clamp_integer(k));
        let mut big_a = EdwardsPoint::mul_base(&a);
        if big_a.compress().as_bytes()[31] & 0x80 != 0 {
            a = -a;
            big_a = -big_a;
        }
        let mut h = Sha512::new();
        h.update(b"meshd/xeddsa-nonce/v1");
        h.update(k);
        let digest = h.finalize();
        let mut hash_prefix = [0u8; 32];
        hash_prefix.copy_from_slice(&digest[..32]);
        let esk = ExpandedSecretKey {
            scalar: a,
            hash_prefix,
        };
        let vk = VerifyingKey::from(big_a);
        raw_sign::<Sha512>(&esk, msg, &vk).to_bytes().to_vec()
    }

    /// Whether `public` is the canonical encoding of a Montgomery u (top bit clear, u < p), as
    /// x25519 produces: otherwise several byte strings would name one key, and revocations and
    /// the one-key-one-node rule compare bytes.
    fn canonical(public: &Key32) -> bool {
        if public[31] & 0x80 != 0 {
            return false;
        }
        // p = 2^255 - 19: little-endian ed ff .. ff 7f. u >= p only within the top 19 values.
        !(public[31] == 0x7f && public[1..31].iter().all(|b| *b == 0xff) && public[0] >= 0xed)
    }

    /// Whether `sig` is `public`'s signature over `msg`.
    pub fn verify(public: &Key32, msg: &[u8], sig: &[u8]) -> bool {
        if !canonical(public) {
            return false;
        }
        let Ok(sig) = <[u8; 64]>::try_from(sig) else {
            return false;
        };
        let Some(point) = MontgomeryPoint(*public).to_edwards(0) else {
            return false;
        };
        VerifyingKey::from(point)
            .verify_strict(msg, &Signature::from_bytes(&sig))
            .is_ok()
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(64))]
            /// Every key signs (whatever the sign of its Edwards point), only its own public key
            /// verifies, and a changed message or signature fails.
            #[test]
            fn signs_with_any_key_and_verifies_only_its_own(
                k in any::<[u8; 32]>(),
                other in any::<[u8; 32]>(),
                msg in proptest::collection::vec(any::<u8>(), 0..64),
                flip in 0usize..64,
            ) {
                let secret = StaticSecret::from(k);
                let public = super::super::wg_public(&secret);
                let sig = sign(&secret, &msg);
                prop_assert!(verify(&public, &msg, &sig));
                let mut longer = msg.clone();
                longer.push(0);
                prop_assert!(!verify(&public, &longer, &sig));
                let mut bad = sig.clone();
                bad[flip] ^= 1;
                prop_assert!(!verify(&public, &msg, &bad));
                let other_public = super::super::wg_public(&StaticSecret::from(other));
                if other_public != public {
                    prop_assert!(!verify(&other_public, &msg, &sig));
                }
                prop_assert!(!verify(&public, &msg, &sig[..63]));
                // The same u with the top bit set (a non-canonical encoding) is refused.
                let mut alias = public;
                alias[31] |= 0x80;
                prop_assert!(!verify(&alias, &msg, &sig));
            }
        }

        #[test]
        fn only_canonical_encodings_are_keys() {
            let mut p = [0xffu8; 32];
            p[31] = 0x7f;
            p[0] = 0xed; // p itself
            assert!(!canonical(&p));
            p[0] = 0xec; // p - 1
            assert!(canonical(&p));
            assert!(!canonical(&[0xff; 32]));
        }
    }
}
