//! Invites and node certificates: root -> invite -> node.

use super::{Context, Key32, MeshId, NodeId, Signed, TrustError};
use crate::mesh::addressing::MeshRange;
use ed25519_dalek::SigningKey;
use serde::{Deserialize, Serialize};

/// What the root signs when it makes an invite. It also carries the mesh-wide settings, so a
/// joiner learns them authenticated by the root.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InviteBody {
    pub mesh: MeshId,
    pub range: MeshRange,
    pub domain: String,
    pub invite_key: Key32,
    pub created_at: u64,
    pub expires_at: u64,
    /// `None`: unlimited.
    pub max_uses: Option<u32>,
}

impl InviteBody {
    pub fn sign(&self, root: &SigningKey) -> Signed {
        Signed::sign(Context::Invite, self, root)
    }

    /// Verify an invite against the pinned mesh root.
    pub fn verify(raw: &Signed, mesh: &MeshId) -> Result<InviteBody, TrustError> {
        let body: InviteBody = raw.verify(Context::Invite, &mesh.0, "invite")?;
        if body.mesh != *mesh {
            return Err(TrustError::WrongMesh {
                what: "invite",
                expected: *mesh,
                found: body.mesh,
            });
        }
        Ok(body)
    }

    /// Short id of the invite (its key), for logs and the use ledger.
    pub fn short_id(&self) -> String {
        crate::util::hex(&self.invite_key[..6])
    }
}

/// What a node signs with the invite key when it joins.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeCertBody {
    pub invite: Signed,
    pub name: String,
    pub identity: Key32,
    pub wireguard: Key32,
    pub issued_at: u64,
}

impl NodeCertBody {
    pub fn sign(&self, invite_secret: &SigningKey) -> Signed {
        Signed::sign(Context::Cert, self, invite_secret)
    }
}

/// A verified node certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cert {
    pub raw: Signed,
    pub invite: InviteBody,
    pub name: String,
    pub identity: Key32,
    pub wireguard: Key32,
    pub issued_at: u64,
    pub node_id: NodeId,
}

impl Cert {
    /// Verify the whole chain root -> invite -> node. Expiry of the invite is *not* checked
    /// against `now` here (members keep valid certificates after their invite expires); only
    /// that the certificate was issued before the invite expired.
    pub fn verify(raw: &Signed, mesh: &MeshId) -> Result<Cert, TrustError> {
        let peek: NodeCertBody = raw.peek("node certificate")?;
        let invite = InviteBody::verify(&peek.invite, mesh)?;
        let body: NodeCertBody =
            raw.verify(Context::Cert, &invite.invite_key, "node certificate")?;
        if body.issued_at > invite.expires_at {
            return Err(TrustError::IssuedAfterExpiry {
                issued_at: body.issued_at,
                expired_at: invite.expires_at,
            });
        }
        if !crate::util::is_dns_label(&body.name) {
            return Err(TrustError::InvalidName(body.name));
        }
        Ok(Cert {
            raw: raw.clone(),
            node_id: NodeId::of_identity(&body.identity),
            invite,
            name: body.name,
            identity: body.identity,
            wireguard: body.wireguard,
            issued_at: body.issued_at,
        })
    }

    /// The mesh this certificate claims to belong to, without verifying anything.
    pub fn peek_mesh(raw: &Signed) -> Option<MeshId> {
        let body: NodeCertBody = raw.peek("node certificate").ok()?;
        let invite: InviteBody = body.invite.peek("invite").ok()?;
        Some(invite.mesh)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::trust::{NodeKeys, RootKey};

    pub fn invite(
        root: &RootKey,
        expires_at: u64,
        max_uses: Option<u32>,
    ) -> (InviteBody, Signed, SigningKey) {
        let secret = SigningKey::generate(&mut rand_core::OsRng);
        let body = InviteBody {
            mesh: MeshId(root.public()),
            range: "10.210.0.0/16".parse().unwrap(),
            domain: "mesh.internal".into(),
            invite_key: secret.verifying_key().to_bytes(),
            created_at: 1000,
            expires_at,
            max_uses,
        };
        let raw = body.sign(&root.0);
        (body, raw, secret)
    }

    pub fn cert(
        invite_raw: &Signed,
        secret: &SigningKey,
        keys: &NodeKeys,
        name: &str,
        at: u64,
    ) -> Signed {
        NodeCertBody {
            invite: invite_raw.clone(),
            name: name.into(),
            identity: keys.identity_public(),
            wireguard: keys.wg_public(),
            issued_at: at,
        }
        .sign(secret)
    }

    #[test]
    fn chain_verifies_and_binds_every_link() {
        let root = RootKey::generate();
        let mesh = MeshId(root.public());
        let (_, inv, secret) = invite(&root, 5000, None);
        let keys = NodeKeys::generate();
        let raw = cert(&inv, &secret, &keys, "db1", 2000);
        let c = Cert::verify(&raw, &mesh).unwrap();
        assert_eq!(c.name, "db1");
        assert_eq!(c.wireguard, keys.wg_public());
        assert_eq!(c.node_id, NodeId::of_identity(&keys.identity_public()));

        // Another mesh's root does not accept it.
        let other = RootKey::generate();
        let e = Cert::verify(&raw, &MeshId(other.public())).unwrap_err();
        assert!(
            matches!(e, TrustError::BadSignature { what: "invite" }),
            "{e}"
        );

        // A certificate signed by a key that is not the invite's is refused.
        let rogue = SigningKey::generate(&mut rand_core::OsRng);
        let forged = cert(&inv, &rogue, &keys, "db1", 2000);
        assert!(matches!(
            Cert::verify(&forged, &mesh),
            Err(TrustError::BadSignature {
                what: "node certificate"
            })
        ));

        // Issued after the invite expired.
        let late = cert(&inv, &secret, &keys, "db1", 6000);
        assert!(matches!(
            Cert::verify(&late, &mesh),
            Err(TrustError::IssuedAfterExpiry { .. })
        ));

        // Bad names are refused even when correctly signed.
        let bad = cert(&inv, &secret, &keys, "Bad_Name", 2000);
        assert!(matches!(
            Cert::verify(&bad, &mesh),
            Err(TrustError::InvalidName(_))
        ));
    }
}
