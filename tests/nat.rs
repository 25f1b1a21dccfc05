//! NAT traversal with real meshd processes, NATs made with nftables in router namespaces
//! (`tests/common/nat.rs`, after NAT-LAB.md).
//!
//! ```text
//!   [p] 198.51.100.1 (public member)      [r1..r8] 198.51.100.2..9 (NAT routers, eth0 = WAN)
//!                        \                   |
//!                         +------ br0 -------+
//!   behind each router: one node on 192.0.2.16k+2/28 (two routers of each NAT kind)
//! ```

mod common;

use common::nat::NatKind;
use common::Lab;
use meshd::control::NatMapping;
use meshd::id::NodeId;
use meshd::node::traversal::{Msg, PATH_PORT};
use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

const P: usize = 0;

fn netcheck(lab: &Lab, h: usize) -> meshd::control::NetcheckReport {
    let o = lab.meshctl(h, &["netcheck", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).expect("netcheck JSON")
}

fn endpoint_of(lab: &Lab, h: usize, peer: &str) -> Option<String> {
    lab.try_status(h)?
        .peers
        .into_iter()
        .find(|p| p.name == peer)?
        .endpoint
}

/// Two nodes behind each of the four NAT kinds and one public member: every pair the NATs
/// allow (NAT-LAB.md's matrix) reaches each other on a direct path, found by observed
/// addresses and punches the public member passes on. Prints the table.
#[test]
fn nodes_behind_every_kind_of_nat_reach_each_other_directly() {
    let n = 8;
    let mut lab = Lab::new("natmx", 1 + 2 * n);
    let router = |i: usize| 1 + i;
    let node = |i: usize| 1 + n + i;
    let kind = |i: usize| NatKind::ALL[i / 2];
    for i in 0..n {
        lab.nat(router(i), kind(i), i as u8, &[node(i)]);
    }
    let token = lab.init(P, "p", &[]);
    let start = Instant::now();
    for i in 0..n {
        lab.join(node(i), &format!("n{i}"), &token);
    }
    let hosts: Vec<usize> = (0..n).map(node).collect();
    // Everyone reaches the public member (the NAT opens for it).
    let mut all = vec![P];
    all.extend(&hosts);
    let mut ips: Vec<Ipv4Addr> = Vec::new();
    lab.wait_for("every node's status", Duration::from_secs(60), || {
        ips = hosts
            .iter()
            .filter_map(|h| lab.try_status(*h)?.me.mesh_ip.parse().ok())
            .collect();
        ips.len() == n
    });
    let wan = |i: usize| lab.addr(router(i)).to_string();

    // Ping every pair every round until each traversable one answered or the deadline.
    let mut first: HashMap<(usize, usize), Duration> = HashMap::new();
    let deadline = Duration::from_secs(90);
    let want: Vec<(usize, usize)> = (0..n)
        .flat_map(|a| (0..n).map(move |b| (a, b)))
        .filter(|(a, b)| a != b && NatKind::traversable(kind(*a), kind(*b)))
        .collect();
    while start.elapsed() < deadline && !want.iter().all(|p| first.contains_key(p)) {
        let missing = lab.unreachable_pairs(&hosts, &ips);
        let t = start.elapsed();
        for a in 0..n {
            for b in 0..n {
                if a != b && !missing.contains(&(node(a), node(b))) {
                    first.entry((a, b)).or_insert(t);
                }
            }
        }
    }

    println!(
        "\n{:<16} {:<16} {:<10} {:>22}",
        "a", "b", "path", "first packet (s)"
    );
    let mut failures = Vec::new();
    for a in 0..n {
        for b in (a + 1)..n {
            let ep = endpoint_of(&lab, node(a), &format!("n{b}")).unwrap_or_default();
            let direct = ep.starts_with(&format!("{}:", wan(b)));
            // A pair counts once each reached the other.
            let t = match (first.get(&(a, b)), first.get(&(b, a))) {
                (Some(x), Some(y)) => Some(*x.max(y)),
                _ => None,
            };
            let path = match (t, direct) {
                (Some(_), true) => "direct".to_string(),
                (Some(_), false) => format!("via {ep}"),
                (None, _) => "none".to_string(),
            };
            println!(
                "{:<16} {:<16} {:<10} {:>22}",
                format!("n{a} {}", kind(a).short()),
                format!("n{b} {}", kind(b).short()),
                path,
                t.map(|t| format!("{:.1}", t.as_secs_f64()))
                    .unwrap_or_else(|| "-".into())
            );
            if NatKind::traversable(kind(a), kind(b)) && (t.is_none() || !direct) {
                failures.push(format!(
                    "n{a} ({}) and n{b} ({}): path {path}, endpoint {ep:?}",
                    kind(a).short(),
                    kind(b).short()
                ));
            }
        }
    }
    assert!(failures.is_empty(), "no direct path: {failures:#?}");
    // Each NATed node knows where members see it from, and publishes it.
    for i in 0..n {
        let r = netcheck(&lab, node(i));
        assert_eq!(r.behind_nat, Some(true), "n{i}: {r:?}");
        assert!(
            r.endpoints
                .iter()
                .any(|e| e.starts_with(&format!("{}:", wan(i)))),
            "n{i} publishes its NAT's address: {r:?}"
        );
        if kind(i) == NatKind::Symmetric {
            assert_eq!(r.mapping, NatMapping::EndpointDependent, "n{i}: {r:?}");
        }
    }
}

/// Two nodes behind one NAT (Linux NATs do not hairpin) reach each other directly over their
/// LAN addresses, and `meshctl ping` says so.
#[test]
fn two_nodes_behind_one_nat_talk_over_their_lan() {
    let mut lab = Lab::new("samenat", 4);
    let (router, a, b) = (1, 2, 3);
    let lan = lab.nat(router, NatKind::PortRestricted, 0, &[a, b]);
    let token = lab.init(P, "p", &[]);
    lab.join(a, "a", &token);
    lab.join(b, "b", &token);
    let took = lab.wait_all_pairs(&[P, a, b], Duration::from_secs(60));
    println!(
        "a and b behind one NAT reach each other after {:.1}s",
        took.as_secs_f64()
    );
    let ep = endpoint_of(&lab, a, "b").unwrap_or_default();
    assert_eq!(
        ep,
        format!("{}:51820", lan[1]),
        "a reaches b at its LAN address"
    );
    let o = lab.meshctl(a, &["ping", "b", "-c", "2"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        out.contains(&format!("via {}:51820 (direct)", lan[1])),
        "{out}"
    );
    // A member that is not there: a clear error and a failure status.
    let o = lab.meshctl(a, &["ping", "nobody"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("no member named"));

    // Hostile path messages from a member (garbage, a call-me and a punch naming no member)
    // are refused and counted, and make a punch nobody.
    let before = netcheck(&lab, a);
    let (a_ip, p_ip) = (lab.mesh_ip(a), lab.mesh_ip(P));
    lab.ns(P)
        .run(move || {
            let s = std::net::UdpSocket::bind((p_ip, 0)).expect("bind on p's mesh address");
            let to = (a_ip, PATH_PORT);
            let stranger = NodeId([0xee; 8]);
            s.send_to(b"garbage", to).unwrap();
            s.send_to(&Msg::CallMe { target: stranger }.encode(), to)
                .unwrap();
            let punch = Msg::Punch {
                peer: stranger,
                seen: Some("198.51.100.99:9".parse().unwrap()),
            };
            s.send_to(&punch.encode(), to).unwrap();
        })
        .unwrap();
    lab.wait_for(
        "a to refuse three messages",
        Duration::from_secs(10),
        || netcheck(&lab, a).dropped >= before.dropped + 3,
    );
    assert_eq!(netcheck(&lab, a).punches_answered, before.punches_answered);
}

/// A node behind two NATs in a row (carrier NAT in front of a home router) reaches a node
/// behind another NAT directly.
#[test]
fn a_node_behind_carrier_nat_reaches_a_node_behind_another_nat() {
    let mut lab = Lab::new("cgnat", 6);
    let (carrier, home, a, router, b) = (1, 2, 3, 4, 5);
    // The carrier's routers: `home` sits on the carrier's LAN, `a` behind `home`.
    lab.nat(carrier, NatKind::PortRestricted, 1, &[home]);
    lab.nat(home, NatKind::PortRestricted, 2, &[a]);
    lab.nat(router, NatKind::PortRestricted, 3, &[b]);
    let token = lab.init(P, "p", &[]);
    lab.join(a, "a", &token);
    lab.join(b, "b", &token);
    let took = lab.wait_all_pairs(&[P, a, b], Duration::from_secs(60));
    println!(
        "a behind two NATs and b reach each other after {:.1}s",
        took.as_secs_f64()
    );
    let ep = endpoint_of(&lab, b, "a").unwrap_or_default();
    assert!(
        ep.starts_with(&format!("{}:", lab.addr(carrier))),
        "b reaches a at the carrier's address, got {ep}"
    );
}

/// Routers that forget a UDP mapping after 4 s of silence: the pair stays connected through
/// two idle minutes (no traffic of its own; what keeps the mappings is meshd's).
#[test]
fn a_direct_path_survives_two_idle_minutes_behind_nats_with_short_mapping_timeouts() {
    let mut lab = Lab::new("natidle", 5);
    let (ra, a, rb, b) = (1, 2, 3, 4);
    lab.nat(ra, NatKind::PortRestricted, 0, &[a]);
    lab.nat(rb, NatKind::PortRestricted, 1, &[b]);
    for r in [ra, rb] {
        lab.must(
            r,
            "sysctl",
            &[
                "-qw",
                "net.netfilter.nf_conntrack_udp_timeout=4",
                "net.netfilter.nf_conntrack_udp_timeout_stream=4",
            ],
        );
    }
    let token = lab.init(P, "p", &[]);
    lab.join(a, "a", &token);
    lab.join(b, "b", &token);
    lab.wait_all_pairs(&[P, a, b], Duration::from_secs(60));
    let before = endpoint_of(&lab, a, "b").unwrap_or_default();
    assert!(
        before.starts_with(&format!("{}:", lab.addr(rb))),
        "{before}"
    );
    // The idle time is what is tested: nothing to wait for but the clock.
    std::thread::sleep(Duration::from_secs(120));
    // The first packet after the idle time gets through (one echo, no retry).
    assert!(lab.ping(a, lab.mesh_ip(b)), "a -> b after two idle minutes");
    assert!(lab.ping(b, lab.mesh_ip(a)), "b -> a after two idle minutes");
    let after = endpoint_of(&lab, a, "b").unwrap_or_default();
    assert!(after.starts_with(&format!("{}:", lab.addr(rb))), "{after}");
}
