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
