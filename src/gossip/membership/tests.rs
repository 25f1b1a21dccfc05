//! Membership rules: verification, revocation, departures, invite limits, competing
//! certificates, pruning and the cache.

use super::*;
use crate::trust::cert::tests::{cert, invite};
use crate::trust::Context;
use crate::trust::{NodeKeys, RevocationBody, RootKey};

struct World {
    root: RootKey,
    inv: Signed,
    secret: ed25519_dalek::SigningKey,
}

fn world(max_uses: Option<u32>) -> World {
    let root = RootKey::generate();
    let (_, inv, secret) = invite(&root, 10_000, max_uses);
    World { root, inv, secret }
}

fn params(w: &World) -> MeshParams {
    MeshParams {
        mesh: MeshId(w.root.public()),
        range: "10.210.0.0/16".parse().unwrap(),
        domain: "mesh.internal".into(),
    }
}

fn node(w: &World, name: &str, at: u64) -> (NodeKeys, Cert) {
    let k = NodeKeys::generate();
    let raw = cert(&w.inv, &w.secret, &k, name, at);
    let c = Cert::verify(&raw, &MeshId(w.root.public())).unwrap();
    (k, c)
}

fn record(k: &NodeKeys, seq: u64, slot_k: u32, left: bool) -> Signed {
    Signed::sign(
        Context::Record,
        &NodeRecord {
            identity: k.identity_public(),
            seq,
            endpoints: vec!["192.0.2.1:51820".parse().unwrap()],
            slot_k,
            left,
        },
        &k.identity,
    )
}

#[test]
fn records_must_be_signed_by_their_node_and_fresh() {
    let w = world(None);
    let (ka, a) = node(&w, "a", 100);
    let (kb, b) = node(&w, "b", 200);
    let mut m = Membership::new(params(&w), a.clone(), 0);
    m.ingest_record(a.node_id, &record(&ka, 1, 0, false))
        .unwrap();
    let bid = m.ingest_cert(&b.raw, 0).unwrap();
    // B's record signed by A is refused.
    assert!(matches!(
        m.ingest_record(bid, &record(&ka, 5, 0, false)),
        Err(Reject::Trust(_))
    ));
    assert!(m.ingest_record(bid, &record(&kb, 5, 0, false)).unwrap());
    // Replaying an older record changes nothing.
    assert_eq!(
        m.ingest_record(bid, &record(&kb, 4, 3, false)),
        Err(Reject::Stale)
    );
    assert_eq!(m.get(&bid).unwrap().claim_k(), Some(0));
    let specs = m.peer_specs(&m.assignments());
    assert_eq!(specs.len(), 1);
    assert_eq!(specs[0].name, "b");
}

#[test]
fn revocation_removes_and_keeps_out_across_restarts() {
    let w = world(None);
    let (ka, a) = node(&w, "a", 100);
    let (kb, b) = node(&w, "b", 200);
    let mut m = Membership::new(params(&w), a.clone(), 0);
    m.ingest_record(a.node_id, &record(&ka, 1, 0, false))
        .unwrap();
    m.ingest_cert(&b.raw, 0).unwrap();
    m.ingest_record(b.node_id, &record(&kb, 1, 0, false))
        .unwrap();
    let rev = Revocation::issue(
        &w.root.0,
        RevocationBody {
            mesh: MeshId(w.root.public()),
            identity: kb.identity_public(),
            wireguard: kb.wg_public(),
            name: "b".into(),
            revoked_at: 5,
        },
    );
    assert!(m.ingest_revocation(&rev.raw).unwrap());
    assert!(m.peer_specs(&m.assignments()).is_empty());
    assert_eq!(m.ingest_cert(&b.raw, 0), Err(Reject::Revoked(b.node_id)));
    // A restarted node, from its cache, still refuses B.
    let cache = m.to_cache();
    let mut m2 = Membership::new(params(&w), a, 0);
    assert!(m2.load_cache(&cache, 0).is_empty());
    assert_eq!(m2.ingest_cert(&b.raw, 0), Err(Reject::Revoked(b.node_id)));
    assert!(m2.is_revoked(&b.node_id, &kb.wg_public()));
}

#[test]
fn a_left_node_frees_its_slot_and_cannot_return() {
    let w = world(None);
    let (ka, a) = node(&w, "a", 100);
    let (kb, b) = node(&w, "b", 200);
    let mut m = Membership::new(params(&w), a.clone(), 0);
    m.ingest_record(a.node_id, &record(&ka, 1, 0, false))
        .unwrap();
    m.ingest_cert(&b.raw, 0).unwrap();
    m.ingest_record(b.node_id, &record(&kb, 1, 0, false))
        .unwrap();
    let b_slot = m.assignments()[&b.node_id].slot;
    m.ingest_record(b.node_id, &record(&kb, 2, 0, true))
        .unwrap();
    assert!(!m.assignments().contains_key(&b.node_id));
    assert!(m.peer_specs(&m.assignments()).is_empty());
    // A newcomer with B's key would now be offered B's old slot.
    assert_eq!(
        addressing::candidate(
            &m.params.mesh,
            &kb.wg_public(),
            m.claim_for_newcomer(&kb.wg_public()).unwrap(),
            256
        ),
        b_slot
    );
    let mut m2 = Membership::new(params(&w), a, 0);
    m2.load_cache(&m.to_cache(), 0);
    assert_eq!(m2.ingest_cert(&b.raw, 0), Err(Reject::Left(b.node_id)));
}

#[test]
fn a_one_use_invite_admits_only_the_earliest_certificate() {
    let w = world(Some(1));
    let (_, a) = node(&w, "a", 100);
    let (_, b) = node(&w, "b", 200);
    let (_, c) = node(&w, "c", 300);
    let mut m = Membership::new(params(&w), a.clone(), 0);
    m.ingest_cert(&b.raw, 0).unwrap();
    m.set_admitted_k(b.node_id, 0);
    m.ingest_cert(&c.raw, 0).unwrap();
    m.set_admitted_k(c.node_id, 0);
    let active: Vec<String> = m.active().map(|m| m.cert.name.clone()).collect();
    // a, b and c share the invite in this test world; only the first certificate counts.
    assert_eq!(active, vec!["a".to_string()]);
    assert_eq!(m.invite_uses(&a.invite.invite_key, &c.node_id), 2);
}

/// Competing certificates (one identity issued twice, or one WireGuard key under two
/// identities) resolve to the same winner on every node, whatever order they arrive in.
#[test]
fn competing_certificates_resolve_the_same_everywhere() {
    let w = world(None);
    let (ka, a) = node(&w, "a", 100);
    let (kb, b) = node(&w, "b", 200);
    // B issues itself a second certificate later; a third party reuses B's WireGuard key
    // with an identity of its own, once after B and once before.
    let b_again = Cert::verify(
        &cert(&w.inv, &w.secret, &kb, "b", 250),
        &MeshId(w.root.public()),
    )
    .unwrap();
    let copycat = |at: u64| {
        let k = NodeKeys {
            identity: ed25519_dalek::SigningKey::generate(&mut rand_core::OsRng),
            wireguard: kb.wireguard.clone(),
        };
        cert(&w.inv, &w.secret, &k, "x", at)
    };
    let late_copy = copycat(300);
    let early_copy = copycat(150);

    let view = |order: &[&Signed]| {
        let mut m = Membership::new(params(&w), a.clone(), 0);
        for raw in order {
            let _ = m.ingest_cert(raw, 0);
        }
        m.all()
            .map(|m| (m.cert.node_id, m.cert.issued_at))
            .collect::<Vec<_>>()
    };
    let forward = view(&[&b.raw, &b_again.raw, &late_copy]);
    let backward = view(&[&late_copy, &b_again.raw, &b.raw]);
    assert_eq!(forward, backward);
    assert!(forward.contains(&(b.node_id, 200)), "{forward:?}");
    assert_eq!(forward.len(), 2, "the later copy of B's key is refused");

    // The earlier holder of a key wins even when it arrives second.
    let mut m = Membership::new(params(&w), a.clone(), 0);
    m.ingest_cert(&b.raw, 0).unwrap();
    let early_id = m.ingest_cert(&early_copy, 0).unwrap();
    assert!(m.get(&b.node_id).is_none());
    assert!(m.get(&early_id).is_some());
    assert!(matches!(
        m.ingest_cert(&b.raw, 0),
        Err(Reject::WireguardKeyTaken { holder, .. }) if holder == early_id
    ));

    // Nobody takes this node's own key away from it, however early the copy claims to be.
    let thief = NodeKeys {
        identity: ed25519_dalek::SigningKey::generate(&mut rand_core::OsRng),
        wireguard: ka.wireguard.clone(),
    };
    let stolen = cert(&w.inv, &w.secret, &thief, "a2", 1);
    assert!(matches!(
        m.ingest_cert(&stolen, 0),
        Err(Reject::WireguardKeyTaken { holder, .. }) if holder == a.node_id
    ));
    assert!(m.get(&a.node_id).is_some());
}

/// A certificate refused for its WireGuard key changes nothing, also when it is an earlier
/// re-issue of a member's identity: the member keeps its current certificate, on every node
/// alike whatever the arrival order.
#[test]
fn a_certificate_refused_for_its_wireguard_key_removes_nothing() {
    let w = world(None);
    let (_, a) = node(&w, "a", 10);
    let (k1, c1_late) = node(&w, "one", 300);
    let (k2, c2) = node(&w, "two", 50);
    // The holder of both keys re-issues "one" earlier, with "two"'s WireGuard key.
    let k1b = NodeKeys {
        identity: k1.identity.clone(),
        wireguard: k2.wireguard.clone(),
    };
    let c1_early = cert(&w.inv, &w.secret, &k1b, "one", 100);
    let view = |order: &[&Signed]| {
        let mut m = Membership::new(params(&w), a.clone(), 0);
        for raw in order {
            let _ = m.ingest_cert(raw, 0);
        }
        let mut v: Vec<_> = m
            .all()
            .map(|m| (m.cert.name.clone(), m.cert.issued_at))
            .collect();
        v.sort();
        v
    };
    let forward = view(&[&c1_late.raw, &c2.raw, &c1_early]);
    assert_eq!(
        forward,
        vec![("a".into(), 10), ("one".into(), 300), ("two".into(), 50)]
    );
    assert_eq!(
        view(&[&c1_early, &c2.raw, &c1_late.raw]),
        view(&[&c2.raw, &c1_early, &c1_late.raw])
    );
    assert_eq!(forward, view(&[&c2.raw, &c1_late.raw, &c1_early]));
}

#[test]
fn prune_forgets_members_that_never_showed_up() {
    let w = world(None);
    let (_, a) = node(&w, "a", 100);
    let (_, b) = node(&w, "b", 200);
    let mut m = Membership::new(params(&w), a, 1000);
    m.ingest_cert(&b.raw, 1000).unwrap();
    assert!(m.prune(1000 + 60).is_empty());
    assert_eq!(
        m.prune(1000 + PENDING_MEMBER_TTL.as_secs() + 1),
        vec!["b".to_string()]
    );
}

/// A node that was down long ago keeps its members at restart: the time it was down does
/// not count as their silence; the time it ran does.
#[test]
fn a_restart_after_a_month_forgets_no_member() {
    let w = world(None);
    let (_, a) = node(&w, "a", 100);
    let (kb, b) = node(&w, "b", 200);
    let mut before = Membership::new(params(&w), a.clone(), 1000);
    before.ingest_cert(&b.raw, 1000).unwrap();
    before
        .ingest_record(b.node_id, &record(&kb, 1, 0, false))
        .unwrap();
    before.set_liveness(b.node_id, Liveness::Alive, 1000);
    let cache = before.to_cache();

    let month = MEMBER_CACHE_TTL.as_secs();
    let restart = 1000 + 2 * month;
    let mut after = Membership::new(params(&w), a.clone(), restart);
    assert!(after.load_cache(&cache, restart).is_empty());
    assert!(after.prune(restart).is_empty(), "forgot members at restart");
    assert!(after.prune(restart + month - 1).is_empty());
    // Silent for a whole month of this run: forgotten.
    assert_eq!(after.prune(restart + month + 1), vec!["b".to_string()]);

    // The node ran 20 days without hearing from b, was down two months, then restarts:
    // b has 10 days left, not a fresh month (restarts do not keep dead members forever).
    let day = 24 * 3600;
    let mut cache = cache;
    cache.saved_at = 1000 + 20 * day;
    let restart = cache.saved_at + 60 * day;
    let mut after = Membership::new(params(&w), a, restart);
    assert!(after.load_cache(&cache, restart).is_empty());
    assert!(after.prune(restart + 10 * day - 1).is_empty());
    assert_eq!(after.prune(restart + 10 * day + 1), vec!["b".to_string()]);
}

/// The cache remembers the highest sequence number this node published, so the next run
/// continues above it even with its clock behind.
#[test]
fn the_cache_keeps_this_nodes_highest_sequence_number() {
    let w = world(None);
    let (ka, a) = node(&w, "a", 100);
    let mut m = Membership::new(params(&w), a.clone(), 1000);
    assert_eq!(m.to_cache().own_seq, 0);
    m.ingest_record(a.node_id, &record(&ka, 7_000, 0, false))
        .unwrap();
    assert_eq!(m.to_cache().own_seq, 7_000);
}

/// A one-use token whose joiner was admitted but never ran can be used again once that
/// admission is forgotten; a member that did run keeps its use.
#[test]
fn a_pending_member_that_never_came_gives_its_invite_use_back() {
    let w = world(Some(1));
    let (_, a) = node(&w, "a", 100);
    let (_, b) = node(&w, "b", 200);
    let (kc, c) = node(&w, "c", 300);
    let mut m = Membership::new(params(&w), a.clone(), 1000);
    // In this world a's own certificate uses the one-use invite too: count b and c only.
    m.ingest_cert(&b.raw, 1000).unwrap();
    assert_eq!(m.invite_uses(&b.invite.invite_key, &a.node_id), 1);
    m.prune(1000 + PENDING_MEMBER_TTL.as_secs() + 1);
    assert_eq!(m.invite_uses(&b.invite.invite_key, &a.node_id), 0);

    // c runs (its record arrives), then goes silent: its use stays.
    m.ingest_cert(&c.raw, 1000).unwrap();
    m.ingest_record(c.node_id, &record(&kc, 1, 0, false))
        .unwrap();
    m.set_liveness(c.node_id, Liveness::Dead, 1001);
    m.prune(1000 + PENDING_MEMBER_TTL.as_secs() + 1);
    assert!(m.get(&c.node_id).is_some());
    assert_eq!(m.invite_uses(&b.invite.invite_key, &a.node_id), 1);
}

/// A member this node admitted keeps its claim and the address it asked from across a
/// restart, before its own record ever arrived: the restarted node still routes to it.
#[test]
fn an_admission_survives_a_restart_before_the_members_record_arrives() {
    let w = world(None);
    let (_, a) = node(&w, "a", 100);
    let (_, b) = node(&w, "b", 200);
    let mut m = Membership::new(params(&w), a.clone(), 1000);
    m.ingest_cert(&b.raw, 1000).unwrap();
    m.set_admitted_k(b.node_id, 3);
    let from: std::net::SocketAddr = "192.0.2.9:51820".parse().unwrap();
    m.set_admitted_from(b.node_id, from);
    let slot = m.assignments()[&b.node_id].slot;
    let mut after = Membership::new(params(&w), a, 1000);
    assert!(after.load_cache(&m.to_cache(), 1000).is_empty());
    assert_eq!(after.get(&b.node_id).unwrap().admitted_k, Some(3));
    assert_eq!(after.assignments()[&b.node_id].slot, slot);
    let specs = after.peer_specs(&after.assignments());
    assert_eq!(specs[0].endpoints, vec![from]);
}
