//! Invites and node certificates: root -> invite -> node.

use super::keys::xeddsa;
use super::signed::message;
use super::{encode, verify_sig, Context, Key32, MeshId, NodeId, NodeKeys, Signed, TrustError};
use crate::id::MeshRange;
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
    /// The identity key's signature over [`SelfClaim`]: proof that the holder of `identity`
    /// made this certificate. Without it anyone holding an invite could certify somebody
    /// else's identity (and so their node id) next to a WireGuard key of their own.
    pub self_sig: Vec<u8>,
    /// The WireGuard key's own signature (XEdDSA, see [`crate::trust::keys::xeddsa`]) over the
    /// same [`SelfClaim`]: proof that the holder has the WireGuard secret. Without it a member
    /// could certify another node's WireGuard key under an identity of its own and, as the
    /// earlier certificate for that key, push the real holder out of the mesh.
    pub wg_sig: Vec<u8>,
}

/// What the identity key signs inside a certificate: everything the certificate says about
/// the node, bound to the invite it joins through.
#[derive(Serialize)]
struct SelfClaim<'a> {
    invite_key: &'a Key32,
    name: &'a str,
    identity: &'a Key32,
    wireguard: &'a Key32,
    issued_at: u64,
}

impl NodeCertBody {
    /// The certificate body for `keys` joining through `invite` (whose public key is
    /// `invite_key`), self-signed by the node's identity key.
    pub fn new(
        invite: &Signed,
        invite_key: &Key32,
        name: &str,
        keys: &NodeKeys,
        issued_at: u64,
    ) -> NodeCertBody {
        let identity = keys.identity_public();
        let wireguard = keys.wg_public();
        let claim = SelfClaim {
            invite_key,
            name,
            identity: &identity,
            wireguard: &wireguard,
            issued_at,
        };
        let self_sig = Signed::sign(Context::CertSelf, &claim, &keys.identity).sig;
        let wg_sig = xeddsa::sign(
            &keys.wireguard,
            &message(Context::CertWireguard, &encode(&claim)),
        );
        NodeCertBody {
            invite: invite.clone(),
            name: name.to_string(),
            identity,
            wireguard,
            issued_at,
            self_sig,
            wg_sig,
        }
    }

    pub fn sign(&self, invite_secret: &SigningKey) -> Signed {
        Signed::sign(Context::Cert, self, invite_secret)
    }

    fn verify_self_sig(&self, invite_key: &Key32) -> Result<(), TrustError> {
        let claim = encode(&SelfClaim {
            invite_key,
            name: &self.name,
            identity: &self.identity,
            wireguard: &self.wireguard,
            issued_at: self.issued_at,
        });
        verify_sig(
            &self.identity,
            Context::CertSelf,
            &claim,
            &self.self_sig,
            "certificate self-signature",
        )?;
        if !xeddsa::verify(
            &self.wireguard,
            &message(Context::CertWireguard, &claim),
            &self.wg_sig,
        ) {
            return Err(TrustError::BadSignature {
                what: "certificate WireGuard key proof",
            });
        }
        Ok(())
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
    /// Verify the whole chain root -> invite -> node, and that the node's identity key signed
    /// what the certificate says about it. Expiry of the invite is *not* checked against `now`
    /// here (members keep valid certificates after their invite expires); only that the
    /// certificate was issued while the invite was valid.
    pub fn verify(raw: &Signed, mesh: &MeshId) -> Result<Cert, TrustError> {
        let peek: NodeCertBody = raw.peek("node certificate")?;
        let invite = InviteBody::verify(&peek.invite, mesh)?;
        let body: NodeCertBody =
            raw.verify(Context::Cert, &invite.invite_key, "node certificate")?;
        if body.issued_at < invite.created_at {
            return Err(TrustError::IssuedBeforeInvite {
                issued_at: body.issued_at,
                created_at: invite.created_at,
            });
        }
        if body.issued_at > invite.expires_at {
            return Err(TrustError::IssuedAfterExpiry {
                issued_at: body.issued_at,
                expired_at: invite.expires_at,
            });
        }
        if !crate::util::is_dns_label(&body.name) {
            return Err(TrustError::InvalidName(body.name));
        }
        body.verify_self_sig(&invite.invite_key)?;
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

    /// The node id this certificate claims, without verifying anything.
    pub fn peek_node_id(raw: &Signed) -> Result<NodeId, TrustError> {
        let body: NodeCertBody = raw.peek("node certificate")?;
        Ok(NodeId::of_identity(&body.identity))
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
    use crate::trust::RootKey;

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
            created_at: 0,
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
        let invite_key = secret.verifying_key().to_bytes();
        NodeCertBody::new(invite_raw, &invite_key, name, keys, at).sign(secret)
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

        // Issued before the invite existed.
        let (mut later, _, later_secret) = invite(&root, 5000, None);
        later.created_at = 1000;
        later.invite_key = later_secret.verifying_key().to_bytes();
        let early = cert(&later.sign(&root.0), &later_secret, &keys, "db1", 999);
        assert!(matches!(
            Cert::verify(&early, &mesh),
            Err(TrustError::IssuedBeforeInvite { .. })
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

#[cfg(test)]
mod self_sig_tests {
    use super::tests::invite;
    use super::*;
    use crate::trust::RootKey;

    /// An invite holder cannot certify somebody else's identity key: the identity must sign
    /// the certificate's contents itself, and the signature covers every field.
    #[test]
    fn certificate_needs_the_identity_keys_own_signature() {
        let root = RootKey::generate();
        let mesh = MeshId(root.public());
        let (body, inv, secret) = invite(&root, 5000, None);
        let victim = NodeKeys::generate();
        let attacker = NodeKeys::generate();

        // Victim's identity, attacker's WireGuard key, signature by the attacker's identity.
        let mut forged = NodeCertBody::new(&inv, &body.invite_key, "db1", &attacker, 2000);
        forged.identity = victim.identity_public();
        let e = Cert::verify(&forged.sign(&secret), &mesh).unwrap_err();
        assert_eq!(
            e,
            TrustError::BadSignature {
                what: "certificate self-signature"
            }
        );

        // Changing any field the identity signed breaks it too.
        let good = NodeCertBody::new(&inv, &body.invite_key, "db1", &victim, 2000);
        assert!(Cert::verify(&good.sign(&secret), &mesh).is_ok());
        let mut renamed = good.clone();
        renamed.name = "db2".into();
        let mut rekeyed = good.clone();
        rekeyed.wireguard = attacker.wg_public();
        let mut redated = good.clone();
        redated.issued_at = 2001;
        for bad in [renamed, rekeyed, redated] {
            assert!(matches!(
                Cert::verify(&bad.sign(&secret), &mesh),
                Err(TrustError::BadSignature { .. })
            ));
        }

        // The attacker's own identity, properly self-signed, naming the victim's WireGuard key:
        // refused, because only the WireGuard secret can make the key proof.
        let mut stolen_key = NodeCertBody::new(&inv, &body.invite_key, "evil", &attacker, 2000);
        stolen_key.wireguard = victim.wg_public();
        let claim = SelfClaim {
            invite_key: &body.invite_key,
            name: "evil",
            identity: &stolen_key.identity,
            wireguard: &stolen_key.wireguard,
            issued_at: 2000,
        };
        stolen_key.self_sig = Signed::sign(Context::CertSelf, &claim, &attacker.identity).sig;
        assert_eq!(
            Cert::verify(&stolen_key.sign(&secret), &mesh).unwrap_err(),
            TrustError::BadSignature {
                what: "certificate WireGuard key proof"
            }
        );
        // Nor does a key proof lifted from the victim's own certificate (it covers the claim).
        stolen_key.wg_sig = good.wg_sig.clone();
        assert!(Cert::verify(&stolen_key.sign(&secret), &mesh).is_err());

        // A self-signature made for another invite does not carry over.
        let (body2, inv2, secret2) = invite(&root, 5000, None);
        let mut moved = NodeCertBody::new(&inv, &body.invite_key, "db1", &victim, 2000);
        moved.invite = inv2;
        let _ = body2;
        assert!(matches!(
            Cert::verify(&moved.sign(&secret2), &mesh),
            Err(TrustError::BadSignature { .. })
        ));
    }
}
