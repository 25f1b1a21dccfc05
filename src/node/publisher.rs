//! Everything this node says about itself, signed: its record (endpoints, subnet claim,
//! departure), its services, its routes (hostnames, exit flag), its named workloads and the
//! software it runs. One sequence-number rule for
//! all of them: the clock in milliseconds, but always above the last number this node
//! published, in this run or an earlier one (members keep the highest they saw, so a clock
//! that went back must not make a new statement look older). Pure: the node hands each
//! [`Publication`] to the membership view and to gossip.

use crate::gossip::chitchat_glue::{
    KEY_ABOUT, KEY_RECORD, KEY_ROUTES, KEY_SERVICES, KEY_WORKLOADS,
};
use crate::gossip::{Membership, Reject};
use crate::id::{Key32, NodeId};
use crate::trust::{
    AboutRecord, NodeKeys, NodeRecord, RoutesRecord, SelfStatement, ServiceDef, ServicesRecord,
    Signed, WorkloadName, WorkloadsRecord,
};
use ed25519_dalek::SigningKey;
use std::net::SocketAddr;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Record,
    Services,
    Routes,
    About,
    Workloads,
}

/// One signed statement, ready to be taken in and gossiped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Publication {
    pub kind: Kind,
    pub raw: Signed,
}

impl Publication {
    /// The gossip key it travels under.
    pub fn key(&self) -> &'static str {
        match self.kind {
            Kind::Record => KEY_RECORD,
            Kind::Services => KEY_SERVICES,
            Kind::Routes => KEY_ROUTES,
            Kind::About => KEY_ABOUT,
            Kind::Workloads => KEY_WORKLOADS,
        }
    }

    /// Take it into this node's own view (where the data plane, DNS and status read it).
    pub fn ingest(&self, m: &mut Membership, me: NodeId) -> Result<bool, Reject> {
        match self.kind {
            Kind::Record => m.ingest_record(me, &self.raw),
            Kind::Services => m.ingest_services(me, &self.raw),
            Kind::Routes => m.ingest_routes(me, &self.raw),
            Kind::About => m.ingest_about(me, &self.raw),
            Kind::Workloads => m.ingest_workloads(me, &self.raw),
        }
    }
}

pub struct Publisher {
    identity: SigningKey,
    public: Key32,
    seq: u64,
    record: NodeRecord,
    latest: [Option<Publication>; 5],
}

impl Publisher {
    /// `seq_floor`: the highest sequence number this node published before (from its cache).
    pub fn new(keys: &NodeKeys, seq_floor: u64, endpoints: Vec<SocketAddr>, slot_k: u32) -> Self {
        Publisher {
            identity: keys.identity.clone(),
            public: keys.identity_public(),
            seq: seq_floor,
            record: NodeRecord {
                identity: keys.identity_public(),
                seq: 0,
                endpoints,
                slot_k,
                left: false,
            },
            latest: [None, None, None, None, None],
        }
    }

    fn next_seq(&mut self, now_ms: u64) -> u64 {
        self.seq = now_ms.max(self.seq.saturating_add(1));
        self.seq
    }

    fn keep(&mut self, kind: Kind, raw: Signed) -> Publication {
        let p = Publication { kind, raw };
        self.latest[kind as usize] = Some(p.clone());
        p
    }

    fn sign<T: SelfStatement + serde::Serialize>(&self, body: &T) -> Signed {
        Signed::sign(T::CONTEXT, body, &self.identity)
    }

    /// The record with the current endpoints, claim and departure flag.
    pub fn record(&mut self, now_ms: u64) -> Publication {
        self.record.seq = self.next_seq(now_ms);
        let raw = self.sign(&self.record);
        self.keep(Kind::Record, raw)
    }

    pub fn endpoints(&self) -> &[SocketAddr] {
        &self.record.endpoints
    }

    /// New endpoints; whether they differ (and a new record is due).
    pub fn set_endpoints(&mut self, endpoints: Vec<SocketAddr>) -> bool {
        let changed = self.record.endpoints != endpoints;
        self.record.endpoints = endpoints;
        changed
    }

    pub fn set_slot_k(&mut self, k: u32) {
        self.record.slot_k = k;
    }

    /// Mark the departure; the next record says so.
    pub fn leave(&mut self) {
        self.record.left = true;
    }

    pub fn left(&self) -> bool {
        self.record.left
    }

    pub fn services(&mut self, services: Vec<ServiceDef>, now_ms: u64) -> Publication {
        let rec = ServicesRecord {
            identity: self.public,
            seq: self.next_seq(now_ms),
            services,
        };
        let raw = self.sign(&rec);
        self.keep(Kind::Services, raw)
    }

    pub fn routes(&mut self, hostnames: Vec<String>, exit_node: bool, now_ms: u64) -> Publication {
        let rec = RoutesRecord {
            identity: self.public,
            seq: self.next_seq(now_ms),
            hostnames,
            exit_node,
        };
        let raw = self.sign(&rec);
        self.keep(Kind::Routes, raw)
    }

    /// The software this node runs: `version` as `--version` prints it.
    pub fn about(&mut self, version: &str, now_ms: u64) -> Publication {
        let rec = AboutRecord {
            identity: self.public,
            seq: self.next_seq(now_ms),
            version: version.to_string(),
            platform: format!("{}-{}", std::env::consts::ARCH, std::env::consts::OS),
        };
        let raw = self.sign(&rec);
        self.keep(Kind::About, raw)
    }

    /// The named workloads of this node's /24 (empty with workloads off).
    pub fn workloads(&mut self, workloads: Vec<WorkloadName>, now_ms: u64) -> Publication {
        let rec = WorkloadsRecord {
            identity: self.public,
            seq: self.next_seq(now_ms),
            workloads,
        };
        let raw = self.sign(&rec);
        self.keep(Kind::Workloads, raw)
    }

    /// The latest record signed (what a seed hands joiners about itself).
    pub fn record_raw(&self) -> Option<&Signed> {
        self.latest[Kind::Record as usize].as_ref().map(|p| &p.raw)
    }

    /// The latest of every kind published, for a gossip instance starting afresh.
    pub fn latest(&self) -> impl Iterator<Item = &Publication> {
        self.latest.iter().flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trust::{Context, NodeRecord};

    #[test]
    fn one_sequence_rule_for_every_statement_even_with_the_clock_behind() {
        let keys = NodeKeys::generate();
        let mut p = Publisher::new(&keys, 5_000, vec![], 3);
        // The clock is behind what this node published before: numbers continue above it,
        // across kinds.
        let r = p.record(1_000);
        let s = p.services(vec![], 1_000);
        let w = p.routes(vec!["a.example.com".into()], true, 1_000);
        let a = p.about("9.9.9 (abc)", 1_000);
        let seq = |raw: &Signed, ctx| -> u64 {
            match ctx {
                Context::Record => {
                    raw.verify::<NodeRecord>(ctx, &keys.identity_public(), "r")
                        .unwrap()
                        .seq
                }
                Context::Services => {
                    raw.verify::<ServicesRecord>(ctx, &keys.identity_public(), "s")
                        .unwrap()
                        .seq
                }
                Context::About => {
                    raw.verify::<AboutRecord>(ctx, &keys.identity_public(), "a")
                        .unwrap()
                        .seq
                }
                _ => {
                    raw.verify::<RoutesRecord>(ctx, &keys.identity_public(), "w")
                        .unwrap()
                        .seq
                }
            }
        };
        assert_eq!(seq(&r.raw, Context::Record), 5_001);
        assert_eq!(seq(&s.raw, Context::Services), 5_002);
        assert_eq!(seq(&w.raw, Context::Hostnames), 5_003);
        assert_eq!(seq(&a.raw, Context::About), 5_004);
        let about: AboutRecord = a
            .raw
            .verify(Context::About, &keys.identity_public(), "a")
            .unwrap();
        assert_eq!(about.version, "9.9.9 (abc)");
        assert_eq!(a.key(), KEY_ABOUT);
        // With the clock ahead, the clock.
        let r2 = p.record(9_000);
        assert_eq!(seq(&r2.raw, Context::Record), 9_000);
        assert_eq!(p.record(9_000).kind, Kind::Record);
        assert_eq!(p.latest().count(), 4);
        assert_eq!(
            p.record_raw(),
            p.latest().find(|x| x.kind == Kind::Record).map(|x| &x.raw)
        );
    }

    #[test]
    fn the_record_carries_endpoints_claim_and_departure() {
        let keys = NodeKeys::generate();
        let mut p = Publisher::new(&keys, 0, vec!["192.0.2.1:51820".parse().unwrap()], 0);
        assert!(!p.set_endpoints(vec!["192.0.2.1:51820".parse().unwrap()]));
        assert!(p.set_endpoints(vec!["192.0.2.2:51820".parse().unwrap()]));
        p.set_slot_k(4);
        p.leave();
        let raw = p.record(1).raw;
        let rec: NodeRecord = raw
            .verify(Context::Record, &keys.identity_public(), "r")
            .unwrap();
        assert_eq!(rec.endpoints, vec!["192.0.2.2:51820".parse().unwrap()]);
        assert_eq!((rec.slot_k, rec.left), (4, true));
        assert!(p.left());
    }
}
