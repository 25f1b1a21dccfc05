//! Root-signed revocations: `meshctl remove`.

use super::{Context, Key32, MeshId, NodeId, Signed, TrustError};
use ed25519_dalek::SigningKey;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevocationBody {
    pub mesh: MeshId,
    pub identity: Key32,
    pub wireguard: Key32,
    pub name: String,
    pub revoked_at: u64,
}

/// A verified revocation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Revocation {
    pub raw: Signed,
    pub body: RevocationBody,
    pub node_id: NodeId,
}

impl Revocation {
    pub fn issue(root: &SigningKey, body: RevocationBody) -> Revocation {
        let raw = Signed::sign(Context::Revocation, &body, root);
        Revocation {
            raw,
            node_id: NodeId::of_identity(&body.identity),
            body,
        }
    }

    pub fn verify(raw: &Signed, mesh: &MeshId) -> Result<Revocation, TrustError> {
        let body: RevocationBody = raw.verify(Context::Revocation, &mesh.0, "revocation")?;
        if body.mesh != *mesh {
            return Err(TrustError::WrongMesh {
                what: "revocation",
                expected: *mesh,
                found: body.mesh,
            });
        }
        Ok(Revocation {
            raw: raw.clone(),
            node_id: NodeId::of_identity(&body.identity),
            body,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trust::RootKey;

    #[test]
    fn only_the_root_can_revoke() {
        let root = RootKey::generate();
        let mesh = MeshId(root.public());
        let body = RevocationBody {
            mesh,
            identity: [1; 32],
            wireguard: [2; 32],
            name: "x".into(),
            revoked_at: 5,
        };
        let r = Revocation::issue(&root.0, body.clone());
        assert_eq!(Revocation::verify(&r.raw, &mesh).unwrap().body, body);
        let rogue = RootKey::generate();
        let forged = Revocation::issue(&rogue.0, body);
        assert!(Revocation::verify(&forged.raw, &mesh).is_err());
    }
}
