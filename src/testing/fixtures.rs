//! A mesh on paper: a root, an invite valid for a long time, members with real keys and
//! certificates, and their signed statements, for unit tests of the pure parts and for the
//! benchmarks (through the `testing` feature). Only the public API is used, so what a fixture
//! builds is what a node would have verified.

use crate::gossip::{Liveness, Membership, MeshParams};
use crate::id::MeshRange;
use crate::node::setup::make_token;
use crate::trust::{
    Cert, Context, NodeCertBody, NodeKeys, NodeRecord, RootKey, RoutesRecord, ServiceDef,
    ServicesRecord, Signed, Token,
};
use std::net::SocketAddr;
use std::time::Duration;

/// Unix time the fixtures' invite is made at; certificates are issued after it.
pub const T0: u64 = 1_000_000;

pub struct World {
    pub root: RootKey,
    pub token: Token,
    pub params: MeshParams,
}

impl World {
    pub fn new(cidr: &str) -> World {
        let root = RootKey::generate();
        let range: MeshRange = cidr.parse().expect("mesh range");
        let token = make_token(
            &root,
            range,
            "mesh.internal",
            Duration::from_secs(10 * 365 * 24 * 3600),
            None,
            vec![],
            T0,
        );
        let params = MeshParams {
            mesh: token.mesh(),
            range,
            domain: "mesh.internal".into(),
        };
        World {
            root,
            token,
            params,
        }
    }

    /// A member's certificate, issued at `at` (earlier certificates win slot conflicts).
    pub fn cert(&self, keys: &NodeKeys, name: &str, at: u64) -> Cert {
        let raw = NodeCertBody::new(
            &self.token.invite_raw,
            &self.token.invite.invite_key,
            name,
            keys,
            at,
        )
        .sign(&self.token.invite_secret);
        Cert::verify(&raw, &self.token.mesh()).expect("fixture certificate verifies")
    }

    /// New keys and their certificate.
    pub fn node(&self, name: &str, at: u64) -> (NodeKeys, Cert) {
        let k = NodeKeys::generate();
        let c = self.cert(&k, name, at);
        (k, c)
    }

    pub fn record(keys: &NodeKeys, seq: u64, slot_k: u32, endpoints: Vec<SocketAddr>) -> Signed {
        let rec = NodeRecord {
            identity: keys.identity_public(),
            seq,
            endpoints,
            slot_k,
            left: false,
        };
        Signed::sign(Context::Record, &rec, &keys.identity)
    }

    pub fn services(keys: &NodeKeys, seq: u64, services: Vec<ServiceDef>) -> Signed {
        let rec = ServicesRecord {
            identity: keys.identity_public(),
            seq,
            services,
        };
        Signed::sign(Context::Services, &rec, &keys.identity)
    }

    pub fn routes(keys: &NodeKeys, seq: u64, hostnames: Vec<String>, exit_node: bool) -> Signed {
        let rec = RoutesRecord {
            identity: keys.identity_public(),
            seq,
            hostnames,
            exit_node,
        };
        Signed::sign(Context::Hostnames, &rec, &keys.identity)
    }

    /// The view of member 0 of a mesh of `n` members `n0..`, joined one after another (no
    /// conflicts), each alive, with a record, a service `web` and a hostname `appI.example.com`
    /// (every tenth an exit node).
    pub fn mesh(&self, n: usize) -> (Membership, Vec<(NodeKeys, Cert)>) {
        let members: Vec<(NodeKeys, Cert)> = (0..n)
            .map(|i| self.node(&format!("n{i}"), T0 + 1 + i as u64))
            .collect();
        let mut m = Membership::new(self.params.clone(), members[0].1.clone(), T0);
        for (i, (k, c)) in members.iter().enumerate() {
            let id = m.ingest_cert(&c.raw, T0).expect("member certificate");
            let slot_k = m.claim_for_newcomer(&c.wireguard).expect("a free /24");
            let ep = SocketAddr::from(([198, 51, (i / 250) as u8, (i % 250) as u8 + 1], 51820));
            m.ingest_record(id, &World::record(k, 1, slot_k, vec![ep]))
                .expect("record");
            let web = ServiceDef {
                name: "web".into(),
                port: 80,
                address: None,
            };
            m.ingest_services(id, &World::services(k, 1, vec![web]))
                .expect("services");
            let host = format!("app{i}.example.com");
            m.ingest_routes(id, &World::routes(k, 1, vec![host], i % 10 == 0))
                .expect("routes");
            m.set_liveness(id, Liveness::Alive, T0);
        }
        (m, members)
    }
}
