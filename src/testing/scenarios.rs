//! Multi-node scenarios on the in-memory harness: whole nodes in one process, gossip riding
//! the in-memory tunnels, partitions and lost control frames on the underlay.

use super::sim::*;
use crate::control::StatusReport;
use crate::id::MeshRange;
use crate::mesh::addressing::candidate;
use crate::node::setup;
use crate::trust::MeshId;
use crate::trust::NodeKeys;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mesh_forms_in_memory_and_gossip_rides_the_tunnels() {
    let mut sim = Sim::new();
    let token = sim.init("a", "10.210.0.0/16", None).await;
    sim.join("b", &token, None, None).await.unwrap();
    sim.join("c", &token, None, None).await.unwrap();
    sim.wait_for(
        "every node to see two online peers",
        Duration::from_secs(20),
        || async {
            let mut ok = true;
            for i in 0..3 {
                ok &= sim
                    .status(i)
                    .await
                    .is_some_and(|s| s.peers.len() == 2 && s.peers.iter().all(|p| p.online));
            }
            ok
        },
    )
    .await;
    assert!(sim.all_pairs(&[0, 1, 2]).await);
    // b and c never talked to each other except through gossip learnt via a.
    let b = sim.status(1).await.unwrap();
    assert!(b.peers.iter().any(|p| p.name == "c" && p.online));
    sim.shutdown().await;
}

/// Join requests and answers are single datagrams outside the tunnels: lost ones are
/// retried, and a retried request is answered the same way, also with a one-use token the
/// lost answer already spent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_survives_lost_requests_and_a_lost_answer_with_a_one_use_token() {
    let mut sim = Sim::new();
    sim.init("a", "10.210.0.0/16", None).await;
    let once = sim.one_use_token();
    // Machine 1 is the joiner: its first two requests and a's first answer are lost.
    sim.net.lose_control_frames(Sim::host(1), Sim::host(0), 2);
    sim.net.lose_control_frames(Sim::host(0), Sim::host(1), 1);
    let b = sim.join("b", &once, Some(0), None).await.unwrap();
    assert_eq!(b, 1);
    sim.wait_for("a and b to connect", Duration::from_secs(20), || async {
        sim.all_pairs(&[0, b]).await
    })
    .await;
    let a = sim.status(0).await.unwrap();
    assert_eq!(a.peers.len(), 1, "one member admitted once: {:?}", a.peers);
    // The token is spent: another joiner is refused.
    let err = sim.join("c", &once, Some(0), None).await.unwrap_err();
    assert!(format!("{err:#}").contains("has been used"), "{err:#}");
    sim.shutdown().await;
}

/// Slot-conflict notices travel outside the tunnels. One from an address no member uses
/// teaches the node nothing, even when everything in it verifies (here: a certificate made
/// with a leaked token).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflict_notice_from_a_stranger_adds_no_member() {
    use crate::join::make_request;
    use crate::mesh::io::UdpIo;
    use crate::trust::{NodeCertBody, NodeRecord};
    use crate::wire::{decode_frame, encode_frame, Frame};
    let (sim, token) = Sim::two_nodes().await;

    let now = crate::util::unix_now();
    let certify = |name: &str, keys: &NodeKeys| {
        NodeCertBody::new(&token.invite_raw, &token.invite.invite_key, name, keys, now)
            .sign(&token.invite_secret)
    };
    // The notice would move b if it were believed: a certificate older than b's (through
    // an invite made before b joined) whose claim lands on b's slot.
    let range: crate::id::MeshRange = "10.210.0.0/16".parse().unwrap();
    let b_subnet = sim.status(1).await.unwrap().me.subnet;
    let b_ip: std::net::Ipv4Addr = sim.status(1).await.unwrap().me.mesh_ip.parse().unwrap();
    let b_slot = range.slot_of(b_ip).unwrap();
    let early = setup::make_token(
        &sim.root_key(0),
        range,
        "mesh.internal",
        Duration::from_secs(3600),
        None,
        vec![],
        now - 100,
    );
    let (intruder, slot_k) = (0..10_000)
        .find_map(|_| {
            let keys = NodeKeys::generate();
            (0..32)
                .find(|k| {
                    crate::mesh::addressing::candidate(
                        &token.mesh(),
                        &keys.wg_public(),
                        *k,
                        range.slots(),
                    ) == b_slot
                })
                .map(|k| (keys, k))
        })
        .expect("a key with a candidate on b's slot");
    let intruder_cert = NodeCertBody::new(
        &early.invite_raw,
        &early.invite.invite_key,
        "intruder",
        &intruder,
        now - 100,
    )
    .sign(&early.invite_secret);
    let record = crate::trust::Signed::sign(
        crate::trust::Context::Record,
        &NodeRecord {
            identity: intruder.identity_public(),
            seq: 1,
            endpoints: vec!["192.0.2.200:4000".parse().unwrap()],
            slot_k,
            left: false,
        },
        &intruder.identity,
    );
    let stranger = sim.net.bind("192.0.2.200:4000".parse().unwrap()).unwrap();
    let notice = Frame::Conflict(vec![(intruder_cert, record)]);
    stranger
        .send_to(&encode_frame(&notice), Sim::endpoint(1))
        .unwrap();
    // Control frames are handled in order: once a join sent after the notice is answered,
    // the notice has been dealt with.
    let joiner = NodeKeys::generate();
    let (req, _) = make_request(&joiner, &certify("c", &joiner), vec![], now);
    stranger
        .send_to(&encode_frame(&Frame::Request(req)), Sim::endpoint(1))
        .unwrap();
    let mut buf = vec![0u8; 65536];
    let answered = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let (n, _) = stranger.recv_from(&mut buf).await.unwrap();
            if matches!(decode_frame(&buf[..n]), Ok(Frame::Accept(_))) {
                return;
            }
        }
    })
    .await;
    assert!(answered.is_ok(), "b answers the join within 10 s");
    let s = sim.status(1).await.unwrap();
    assert!(
        s.peers.iter().all(|p| p.name != "intruder"),
        "{:?}",
        s.peers
    );
    assert_eq!(
        s.mesh.members, 3,
        "a, b and the admitted c; not the intruder"
    );
    assert_eq!(s.me.subnet, b_subnet, "b keeps its slot");
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_use_token_used_on_both_sides_of_a_partition_keeps_only_the_earlier_joiner() {
    let (mut sim, _) = Sim::two_nodes().await;
    let once = sim.one_use_token();
    for (p, q) in [(0, 1), (0, 3), (2, 1), (2, 3)] {
        sim.cut(p, q, true);
    }
    // Each seed sees the token unused and admits its joiner.
    let x = sim.join("x", &once, Some(0), None).await.unwrap();
    let y = sim.join("y", &once, Some(1), None).await.unwrap();
    sim.wait_for(
        "x and y up on their sides",
        Duration::from_secs(20),
        || async { sim.all_pairs(&[0, x]).await && sim.all_pairs(&[1, y]).await },
    )
    .await;
    for (p, q) in [(0, 1), (0, 3), (2, 1), (2, 3)] {
        sim.cut(p, q, false);
    }
    // After the heal exactly one of them stops, saying why; the other stays a member.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let (loser, winner, why) = loop {
        if let Some(e) = sim.exit_of(x).await {
            break (x, y, e);
        }
        if let Some(e) = sim.exit_of(y).await {
            break (y, x, e);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "neither joiner stopped:\n{}",
            sim.dump().await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(why, "InviteUsedUp");
    sim.wait_for(
        "the winner to reach a and b, the loser gone from views",
        Duration::from_secs(30),
        || async {
            let gone = |s: Option<StatusReport>| {
                s.is_some_and(|s| {
                    s.peers.len() == 2 && s.peers.iter().all(|p| p.name != ["x", "y"][loser - 2])
                })
            };
            sim.all_pairs(&[0, 1, winner]).await
                && gone(sim.status(0).await)
                && gone(sim.status(1).await)
        },
    )
    .await;
    sim.shutdown().await;
}

/// Keys for two joiners whose first candidate is the same slot, free of the given ones.
fn colliding_keys(mesh: &MeshId, range: &MeshRange, taken: &[u32]) -> (NodeKeys, NodeKeys) {
    let slots = range.slots();
    loop {
        let x = NodeKeys::generate();
        let s = candidate(mesh, &x.wg_public(), 0, slots);
        if taken.contains(&s) {
            continue;
        }
        for _ in 0..20 * slots {
            let y = NodeKeys::generate();
            if candidate(mesh, &y.wg_public(), 0, slots) == s {
                return (x, y);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healed_partition_moves_the_later_of_two_colliding_joiners() {
    if let Ok(f) = std::env::var("SIM_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(f)
            .with_test_writer()
            .try_init();
    }
    let (mut sim, token) = Sim::two_nodes().await;
    let range: MeshRange = "10.210.0.0/16".parse().unwrap();
    let mesh = token.mesh();
    let taken: Vec<u32> = (0..2)
        .map(|i| range.slot_of(sim.mesh_ip(i).unwrap()).unwrap())
        .collect();
    let (kx, ky) = colliding_keys(&mesh, &range, &taken);

    // Partition: {a, x} | {b, y}. x joins through a, y through b, both pick the same slot.
    for (p, q) in [(0, 1), (0, 3), (2, 1), (2, 3)] {
        sim.cut(p, q, true);
    }
    // They also pick the same name: no seed could see the other one.
    let x = sim.join("x", &token, Some(0), Some(kx)).await.unwrap();
    let y = sim.join("x", &token, Some(1), Some(ky)).await.unwrap();
    assert_eq!((x, y), (2, 3));
    sim.wait_for(
        "x and y up on their sides",
        Duration::from_secs(20),
        || async { sim.all_pairs(&[0, 2]).await && sim.all_pairs(&[1, 3]).await },
    )
    .await;
    let before_x = sim.mesh_ip(x).unwrap();
    assert_eq!(Some(before_x), sim.mesh_ip(y), "the two joiners collided");
    // Both publish a service at a workload address (.7) of the subnet they hold now.
    let o = before_x.octets();
    let workload = std::net::Ipv4Addr::new(o[0], o[1], o[2], 7);
    for i in [x, y] {
        crate::control::client::Client::new(&sim.nodes[i].opts.socket)
            .post::<_, serde_json::Value>(
                "/v1/services",
                &crate::control::api::ServiceAddRequest {
                    name: "web".into(),
                    port: 80,
                    address: Some(workload),
                },
            )
            .await
            .unwrap();
    }

    // Heal: every node computes the same answer; the later certificate moves.
    tracing::info!("sim: healing the partition");
    for (p, q) in [(0, 1), (0, 3), (2, 1), (2, 3)] {
        sim.cut(p, q, false);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    while !(sim.mesh_ip(x) != sim.mesh_ip(y) && sim.all_pairs(&[0, 1, 2, 3]).await) {
        if tokio::time::Instant::now() > deadline {
            panic!(
                "all four did not reach each other within 40 s:\n{}",
                sim.dump().await
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let moved: Vec<usize> = [x, y]
        .into_iter()
        .filter(|i| sim.mesh_ip(*i) != Some(before_x))
        .collect();
    assert_eq!(moved.len(), 1, "exactly one of the two moved");
    // The one that moved has its service at an address of the old subnet: listed as such
    // (and not live); the other's is fine.
    for i in [x, y] {
        let v: Vec<crate::control::api::ServiceView> =
            crate::control::client::Client::new(&sim.nodes[i].opts.socket)
                .get("/v1/services")
                .await
                .unwrap();
        let own = v
            .iter()
            .find(|s| s.local && s.name == "web")
            .expect("own service");
        let did_move = moved.contains(&i);
        assert_eq!(own.outside_subnet, did_move, "node {i}: {own:?}");
        assert_eq!(own.live, !did_move, "node {i}: {own:?}");
    }
    // Every node agrees on every subnet.
    let views: Vec<Vec<(String, String)>> = {
        let mut v = Vec::new();
        for i in 0..4 {
            let s = sim.status(i).await.unwrap();
            let mut all: Vec<(String, String)> = s
                .peers
                .iter()
                .map(|p| (p.name.clone(), p.subnet.clone()))
                .collect();
            all.push((s.me.name.clone(), s.me.subnet.clone()));
            all.sort();
            v.push(all);
        }
        v
    };
    assert!(views.windows(2).all(|w| w[0] == w[1]), "{views:?}");

    // Two members answer to "x": removing "x" would be a guess, so it is refused, naming
    // both node ids; the node id says which one.
    let admin = crate::control::client::Client::new(&sim.nodes[0].opts.socket);
    let req = |node: String| crate::control::api::RemoveRequest { node };
    let e = admin
        .post::<_, serde_json::Value>("/v1/remove", &req("x".into()))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("2 members are named \"x\""), "{e}");
    let y_id = sim.status(y).await.unwrap().me.node_id;
    assert!(e.contains(&y_id), "{e}");
    assert_eq!(
        sim.status(0).await.unwrap().mesh.members,
        4,
        "nothing removed"
    );
    admin
        .post::<_, serde_json::Value>("/v1/remove", &req(y_id.clone()))
        .await
        .unwrap();
    sim.wait_for("y to be removed", Duration::from_secs(10), || async {
        sim.status(0)
            .await
            .is_some_and(|s| s.peers.iter().all(|p| p.node_id != y_id))
    })
    .await;
    sim.shutdown().await;
}
