//! Core mesh: formation, bootstrap through any member, restart after kill -9, offline detection.

mod common;

use common::Lab;
use meshd::control::PeerState;
use std::time::Duration;

#[test]
fn three_nodes_form_a_mesh_and_every_node_reaches_every_other() {
    let mut lab = Lab::new("form", 3);
    let token = lab.init(0, "alpha", &[]);
    let start = std::time::Instant::now();
    lab.join(1, "beta", &token);
    // The token can also come on standard input, out of the process list.
    lab.join_from_stdin(2, "gamma", &token);
    lab.wait_all_pairs(&[0, 1, 2], Duration::from_secs(30));
    println!(
        "all-pairs reachability {:.2}s after the joins started",
        start.elapsed().as_secs_f64()
    );

    // Status shows the mesh from every side, with the documented JSON fields.
    for h in 0..3 {
        let s = lab.status(h);
        assert_eq!(s.peers.len(), 2, "host {h}: {s:?}");
        assert!(s.me.subnet.ends_with(".0/24"));
        assert!(s.me.mesh_ip.ends_with(".1"));
        for p in &s.peers {
            assert!(p.online, "host {h} sees {} as {:?}", p.name, p.state);
            assert!(p
                .endpoint
                .as_deref()
                .is_some_and(|e| e.starts_with("198.51.100.")));
            assert!(p.last_handshake_secs.is_some());
            assert!(p.rx_bytes > 0 && p.tx_bytes > 0);
        }
    }
    let raw = lab.meshctl(0, &["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&raw.stdout).unwrap();
    for k in ["name", "mesh_ip", "subnet"] {
        assert!(v["self"][k].is_string(), "self.{k} missing: {v}");
    }
    for k in [
        "name",
        "mesh_ip",
        "subnet",
        "online",
        "endpoint",
        "last_handshake_secs",
        "rx_bytes",
        "tx_bytes",
    ] {
        assert!(v["peers"][0].get(k).is_some(), "peers[].{k} missing: {v}");
    }
    // Subnets are distinct.
    let subnets: std::collections::HashSet<String> =
        (0..3).map(|h| lab.status(h).me.subnet).collect();
    assert_eq!(subnets.len(), 3);
    // Human output: one line per peer.
    let human = String::from_utf8(lab.meshctl(1, &["status"]).stdout).unwrap();
    assert!(
        human
            .lines()
            .any(|l| l.starts_with("alpha") && l.contains("online")),
        "{human}"
    );
    assert!(
        human
            .lines()
            .any(|l| l.starts_with("gamma") && l.contains("online")),
        "{human}"
    );
}

#[test]
fn any_member_admits_joiners_while_the_first_node_is_down_and_it_rejoins() {
    let mut lab = Lab::new("boot", 5);
    lab.form(&["n1", "n2", "n3"]);
    // A token listing live members as bootstrap endpoints.
    let token2 = lab.invite(0, &["--expires", "1h"]);
    lab.stop(0);
    // n4 joins through n2/n3 while n1 (first in the list) is down; n5 after that.
    lab.join(3, "n4", &token2);
    lab.wait_all_pairs(&[1, 2, 3], Duration::from_secs(30));
    lab.join(4, "n5", &token2);
    lab.wait_all_pairs(&[1, 2, 3, 4], Duration::from_secs(30));
    // The first node comes back from its state and meets the newcomers through gossip.
    lab.run(0);
    lab.wait_all_pairs(&[0, 1, 2, 3, 4], Duration::from_secs(30));
    let s = lab.status(0);
    assert_eq!(s.peers.len(), 4);
    assert!(s.me.admin);
}

#[test]
fn kill9_then_run_comes_back_with_the_same_identity_and_subnet() {
    let mut lab = Lab::new("kill", 3);
    lab.form(&["a", "b", "c"]);
    let before = lab.status(2).me;

    lab.kill9(2);
    // Silent node: offline everywhere within 15 s, keeping its subnet.
    for h in [0, 1] {
        let took = lab.wait_for(
            &format!("host {h} to see c offline"),
            Duration::from_secs(15),
            || {
                lab.status(h)
                    .peers
                    .iter()
                    .any(|p| p.name == "c" && p.state == PeerState::Offline)
            },
        );
        println!("host {h} saw c offline after {:.1}s", took.as_secs_f64());
        let c = lab
            .status(h)
            .peers
            .into_iter()
            .find(|p| p.name == "c")
            .unwrap();
        assert_eq!(c.subnet, before.subnet);
    }

    lab.run(2);
    let ip = before.mesh_ip.parse().unwrap();
    let took = lab.wait_for("a reaching the restarted c", Duration::from_secs(5), || {
        lab.ping(0, ip)
    });
    println!("restarted node reachable after {:.2}s", took.as_secs_f64());
    let after = lab.status(2).me;
    assert_eq!(after.wg_key, before.wg_key, "same identity");
    assert_eq!(after.node_id, before.node_id);
    assert_eq!(after.subnet, before.subnet, "same subnet");
    lab.wait_for("c reaching b", Duration::from_secs(10), || {
        lab.ping(2, lab.mesh_ip(1))
    });
}

#[test]
fn state_problems_are_clear_errors_and_never_reset_the_identity() {
    use std::os::unix::fs::PermissionsExt;
    let mut lab = Lab::new("state", 1);
    lab.init(0, "solo", &[]);
    lab.wait_for("meshd to answer", Duration::from_secs(10), || {
        lab.try_status(0).is_some()
    });
    let key_before = lab.status(0).me.wg_key;
    lab.stop(0);
    let dir = lab.state_dir(0);

    // A secret readable by others is refused, with the fix.
    let key = dir.join("node.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let o = lab.meshd_cmd(0, &["run"]).output().unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(e.contains("chmod 600") && e.contains("node.key"), "{e}");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();

    // A truncated state file is an error naming it; nothing is rewritten.
    let node = dir.join("node.json");
    let good = std::fs::read(&node).unwrap();
    std::fs::write(&node, &good[..good.len() / 2]).unwrap();
    let o = lab.meshd_cmd(0, &["run"]).output().unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(e.contains("node.json") && e.contains("corrupt"), "{e}");
    assert_eq!(
        std::fs::read(&node).unwrap(),
        &good[..good.len() / 2],
        "left as it was"
    );

    // Restored, the node comes back as itself.
    std::fs::write(&node, &good).unwrap();
    lab.run(0);
    lab.wait_for("meshd to answer", Duration::from_secs(10), || {
        lab.try_status(0).is_some()
    });
    assert_eq!(lab.status(0).me.wg_key, key_before);

    // init over an existing node is refused.
    let o = lab
        .meshd_cmd(0, &["init", "--name", "other"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("already holds node \"solo\""));
}

#[test]
fn tunnels_follow_a_node_whose_underlay_address_changes() {
    let mut lab = Lab::new("roam", 2);
    lab.form(&["a", "b"]);
    let (ip_a, ip_b) = (lab.mesh_ip(0), lab.mesh_ip(1));
    // b's machine gets a new address (DHCP renewal, a move to another network). The old one
    // goes first: removing a primary address also removes the secondaries of its subnet.
    let old = format!("{}/24", lab.addr(1));
    for args in [
        vec!["addr", "del", old.as_str(), "dev", "eth0"],
        vec!["addr", "add", "198.51.100.77/24", "dev", "eth0"],
    ] {
        let o = lab.sh(1, "ip", &args);
        assert!(
            o.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    // b speaks first from its new address; a follows the authenticated packets.
    let took = lab.wait_for(
        "b reaching a from its new address",
        Duration::from_secs(30),
        || lab.ping(1, ip_a),
    );
    println!(
        "b reached a {:.1}s after its address changed",
        took.as_secs_f64()
    );
    lab.wait_for(
        "a reaching b at its new address",
        Duration::from_secs(10),
        || lab.ping(0, ip_b),
    );
    let peer = lab
        .status(0)
        .peers
        .into_iter()
        .find(|p| p.name == "b")
        .unwrap();
    assert_eq!(peer.endpoint.as_deref(), Some("198.51.100.77:51820"));
}

/// Two nodes, `a` (host 0) and `b` (host 1), reaching each other.
fn two_nodes(name: &str) -> Lab {
    let mut lab = Lab::new(name, 2);
    lab.form(&["a", "b"]);
    lab
}

/// `len` bytes from host 0 to an echo on host 1's mesh address and back (see
/// [`common::workloads::echo_bulk`]).
fn echo_across(lab: &Lab, len: usize, mss: Option<u32>) {
    let to = std::net::SocketAddr::from((lab.mesh_ip(1), 7000));
    common::workloads::echo_bulk(lab.ns(0), lab.ns(1), to, len, mss);
}

#[test]
fn bulk_tcp_crosses_the_mesh_intact() {
    let lab = two_nodes("bulk");
    // 16 MiB both ways through TSO on the TUN device, UDP GSO out and GRO in.
    echo_across(&lab, 16 << 20, None);
    tcp_was_coalesced(&lab);
}

/// Both nodes received the bulk transfer (data one way, the echo the other): the receive path
/// handed the kernel runs of each connection's segments in single writes, several packets per
/// write on average (one per write when nothing coalesces).
fn tcp_was_coalesced(lab: &Lab) {
    let tun: Vec<_> = (0..2).map(|h| lab.status(h).tun).collect();
    for t in &tun {
        assert!(
            t.packets > 10_000 && t.packets >= 3 * t.writes,
            "segments into the TUN device are coalesced: {tun:?}"
        );
    }
}

/// The same with two receive lanes and two seal lanes on both nodes (none by default on two
/// cores): reads of both directions handed to lanes, decrypted and sealed on several threads,
/// still make a whole, unchanged stream.
#[test]
fn bulk_tcp_crosses_the_mesh_intact_through_lanes() {
    let mut lab = Lab::new("lanes", 2);
    lab.env.push(("MESHD_RX_LANES".into(), "2".into()));
    lab.env.push(("MESHD_TX_LANES".into(), "2".into()));
    lab.form(&["a", "b"]);
    echo_across(&lab, 32 << 20, None);
    tcp_was_coalesced(&lab);
    let lanes: Vec<_> = (0..2).map(|h| lab.status(h).lanes).collect();
    for l in &lanes {
        assert_eq!((l.receive, l.seal), (2, 2), "{l:?}");
    }
    // Both nodes sent and received in bulk: each handed reads to both kinds of lanes (about
    // a thousand or more of each, measured).
    for l in &lanes {
        assert!(
            l.receive_reads > 0 && l.seal_reads > 0,
            "the transfer went through the lanes: {lanes:?}"
        );
    }
}

/// A connection with a tiny MSS: the kernel would hand the tunnel 64 KiB super-packets of
/// hundreds of segments, more than one read is split into. The TUN device's GSO limit keeps
/// them within it, so nothing is dropped and the transfer is whole.
#[test]
fn tcp_with_a_tiny_mss_crosses_without_dropped_reads() {
    let lab = two_nodes("mss");
    let link = lab.sh(0, "ip", &["-d", "link", "show", "mesh0"]);
    let link = String::from_utf8_lossy(&link.stdout);
    assert!(link.contains("gso_max_segs 128"), "{link}");
    echo_across(&lab, 4 << 20, Some(200));
    for h in 0..2 {
        assert_eq!(lab.status(h).drops.unsplittable, 0, "node {h}");
    }
}

#[test]
fn a_mesh_forms_over_an_ipv6_only_underlay() {
    let mut lab = Lab::new("v6", 3);
    // Replace each machine's IPv4 address with an IPv6 one.
    for h in 0..3 {
        let v4 = format!("{}/24", lab.addr(h));
        let v6 = format!("2001:db8::{}/64", h + 1);
        for args in [
            vec!["addr", "del", v4.as_str(), "dev", "eth0"],
            vec!["-6", "addr", "add", v6.as_str(), "dev", "eth0", "nodad"],
        ] {
            let o = lab.sh(h, "ip", &args);
            assert!(
                o.status.success(),
                "ip {args:?}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
    }
    // Endpoints are found on their own: the machines' only addresses are IPv6.
    let token = lab.init(0, "a", &[]);
    let t = meshd::trust::Token::decode(&token).unwrap();
    assert!(
        t.bootstrap.iter().all(|b| b.addr.is_ipv6()),
        "{:?}",
        t.bootstrap
    );
    lab.join(1, "b", &token);
    lab.join(2, "c", &token);
    lab.wait_all_pairs(&[0, 1, 2], Duration::from_secs(30));
    let s = lab.status(0);
    for p in &s.peers {
        assert!(
            p.endpoint
                .as_deref()
                .is_some_and(|e| e.starts_with("[2001:db8::")),
            "{p:?}"
        );
    }
}

/// A node whose TUN device is deleted under it stops with an error (a supervisor restarts it)
/// instead of running on without tunnels.
#[test]
fn a_node_whose_tun_device_is_deleted_exits_with_an_error() {
    let mut lab = Lab::new("tundel", 1);
    lab.init(0, "solo", &[]);
    lab.wait_for("the node to run", Duration::from_secs(15), || {
        lab.try_status(0).is_some()
    });
    let o = lab.sh(0, "ip", &["link", "del", "mesh0"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let code = lab.wait_exit(0, Duration::from_secs(15));
    assert!(
        matches!(code, Some(c) if c != 0),
        "exit status {code:?}; log:\n{}",
        lab.log_text(0)
    );
    assert!(
        lab.log_text(0).contains("data plane stopped"),
        "{}",
        lab.log_text(0)
    );
}

/// A node that lost its member cache (moved aside after corruption, say) finds its way back
/// through the bootstrap endpoints of the token it joined with, also once that token expired.
#[test]
fn a_node_without_its_member_cache_comes_back_through_the_bootstrap_endpoints() {
    let mut lab = Lab::new("fallback", 3);
    let token = lab.init(0, "a", &[]);
    lab.join(1, "b", &token);
    let short = lab.invite(0, &["--expires", "10s"]);
    let made = std::time::Instant::now();
    lab.join(2, "c", &short);
    lab.wait_all_pairs(&[0, 1, 2], Duration::from_secs(30));
    lab.stop(2);
    // (Expiry is checked in whole seconds.)
    lab.wait_for("c's token to expire", Duration::from_secs(20), || {
        made.elapsed() > Duration::from_secs(12)
    });
    std::fs::write(
        lab.state_dir(2).join("members.json"),
        format!(r#"{{"version": {}}}"#, meshd::state::STATE_VERSION),
    )
    .unwrap();
    lab.run(2);
    let took = lab.wait_all_pairs(&[0, 1, 2], Duration::from_secs(60));
    println!(
        "c back in the mesh {:.1}s after starting with no member cache",
        took.as_secs_f64()
    );
    assert!(
        lab.log_text(2)
            .contains("back in touch through a bootstrap endpoint"),
        "{}",
        lab.log_text(2)
    );
    assert_eq!(lab.status(2).peers.len(), 2);
}
