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

/// The public member and the `n` nodes of the matrix.
fn all_hosts(n: usize) -> impl Iterator<Item = usize> {
    (0..=n).map(move |i| if i == 0 { P } else { n + i })
}

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

/// `h`'s view of its path to `peer`: ("direct" | "relayed", relay, endpoint).
fn path_of(lab: &Lab, h: usize, peer: &str) -> Option<(String, Option<String>, String)> {
    let p = lab
        .try_status(h)?
        .peers
        .into_iter()
        .find(|p| p.name == peer)?;
    Some((p.path?, p.relay, p.endpoint?))
}

/// Two nodes behind each of the four NAT kinds and one public member: every pair reaches each
/// other; the pairs the NATs allow (NAT-LAB.md's matrix) on a direct path, found by observed
/// addresses and punches the public member passes on, the other three relayed through the
/// public member. Prints the table.
#[test]
fn nodes_behind_every_kind_of_nat_reach_each_other_directly_or_relayed() {
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
    let mut ips: Vec<Ipv4Addr> = Vec::new();
    lab.wait_for("every node's status", Duration::from_secs(60), || {
        ips = hosts
            .iter()
            .filter_map(|h| lab.try_status(*h)?.me.mesh_ip.parse().ok())
            .collect();
        ips.len() == n
    });
    let wan = |i: usize| lab.addr(router(i)).to_string();
    let want = |a: usize, b: usize| {
        if NatKind::traversable(kind(a), kind(b)) {
            "direct"
        } else {
            "relayed"
        }
    };

    // Ping every pair every round, and read every node's paths, until each pair answered
    // both ways on the path it should end on, or the deadline.
    let mut first: HashMap<(usize, usize), Duration> = HashMap::new();
    // Each side's path, and since when it has been that.
    let mut path: HashMap<(usize, usize), (String, Duration)> = HashMap::new();
    let deadline = Duration::from_secs(120);
    loop {
        let missing = lab.unreachable_pairs(&hosts, &ips);
        let t = start.elapsed();
        for a in 0..n {
            for b in 0..n {
                if a != b && !missing.contains(&(node(a), node(b))) {
                    first.entry((a, b)).or_insert(t);
                }
            }
        }
        for a in 0..n {
            let Some(st) = lab.try_status(node(a)) else {
                continue;
            };
            for b in (0..n).filter(|b| *b != a) {
                let now = st
                    .peers
                    .iter()
                    .find(|p| p.name == format!("n{b}"))
                    .and_then(|p| p.path.clone())
                    .unwrap_or_else(|| "none".into());
                let e = path.entry((a, b)).or_insert((now.clone(), t));
                if e.0 != now {
                    *e = (now, t);
                }
            }
        }
        let done = (0..n).all(|a| {
            (0..n).filter(|b| *b != a).all(|b| {
                first.contains_key(&(a, b)) && path.get(&(a, b)).is_some_and(|p| p.0 == want(a, b))
            })
        });
        if done || start.elapsed() > deadline {
            break;
        }
    }

    println!(
        "\n{:<14} {:<14} {:<22} {:>17} {:>17}",
        "a", "b", "path", "first packet (s)", "final path (s)"
    );
    let mut failures = Vec::new();
    for a in 0..n {
        for b in (a + 1)..n {
            let (kind_ab, relay, ep) = path_of(&lab, node(a), &format!("n{b}")).unwrap_or_default();
            // A pair counts once each reached the other, and is on its final path once both are.
            let both =
                |m: &HashMap<(usize, usize), Duration>| match (m.get(&(a, b)), m.get(&(b, a))) {
                    (Some(x), Some(y)) => Some(*x.max(y)),
                    _ => None,
                };
            let t = both(&first);
            let settled: HashMap<(usize, usize), Duration> = [(a, b), (b, a)]
                .iter()
                .filter_map(|k| Some((*k, path.get(k).filter(|p| p.0 == want(k.0, k.1))?.1)))
                .collect();
            let final_at = both(&settled);
            let shown = match (&relay, kind_ab.as_str()) {
                (Some(r), _) => format!("relayed via {r}"),
                (None, "direct") => format!("direct {ep}"),
                (None, other) => other.to_string(),
            };
            let secs = |t: Option<Duration>| {
                t.map(|t| format!("{:.1}", t.as_secs_f64()))
                    .unwrap_or_else(|| "-".into())
            };
            println!(
                "{:<14} {:<14} {:<22} {:>17} {:>17}",
                format!("n{a} {}", kind(a).short()),
                format!("n{b} {}", kind(b).short()),
                shown,
                secs(t),
                secs(final_at)
            );
            let direct_ok = kind_ab == "direct" && ep.starts_with(&format!("{}:", wan(b)));
            let ok = t.is_some()
                && final_at.is_some()
                && match want(a, b) {
                    "direct" => direct_ok,
                    // Through any member with direct paths to both (by round trip).
                    _ => relay
                        .as_ref()
                        .is_some_and(|r| *r != format!("n{a}") && *r != format!("n{b}")),
                };
            if !ok {
                failures.push(format!(
                    "n{a} ({}) and n{b} ({}): wanted {}, got {shown}, endpoint {ep:?}",
                    kind(a).short(),
                    kind(b).short(),
                    want(a, b)
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
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
    // A member's probe from a new port reaches the public member and the nodes behind NATs
    // that filter by address at most, not those that filter by port.
    let mut reach = Vec::new();
    lab.wait_for(
        "every node's reachability check",
        Duration::from_secs(30),
        || {
            reach = all_hosts(n)
                .map(|h| netcheck(&lab, h).port_reachable)
                .collect();
            reach.iter().all(|r| r.is_some())
        },
    );
    assert_eq!(reach[0], Some(true), "the public member");
    for i in 0..n {
        let open = matches!(kind(i), NatKind::FullCone | NatKind::AddressRestricted);
        assert_eq!(reach[1 + i], Some(open), "n{i} behind {}", kind(i).short());
    }
    // Members relay the five pairs of the three kinds (each sees only their ciphertext).
    let relays: Vec<_> = all_hosts(n).map(|h| netcheck(&lab, h).relay).collect();
    assert!(relays.iter().all(|r| r.enabled));
    let sessions: usize = relays.iter().map(|r| r.sessions.len()).sum();
    let forwarded: u64 = relays.iter().map(|r| r.forwarded_packets).sum();
    assert!(sessions >= 5 && forwarded > 0, "{relays:?}");
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
    // A member that is not there: a clear error, once (not tried three times), and a failure
    // status.
    let o = lab.meshctl(a, &["ping", "nobody"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.matches("no member named").count(), 1, "{err}");

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

/// Both of `a`'s and `b`'s views of their path to each other: (path, relay).
fn pair_paths(
    lab: &Lab,
    a: (usize, &str),
    b: (usize, &str),
) -> Option<[(String, Option<String>); 2]> {
    let (pa, ra, _) = path_of(lab, a.0, b.1)?;
    let (pb, rb, _) = path_of(lab, b.0, a.1)?;
    Some([(pa, ra), (pb, rb)])
}

/// Two public members and a pair no punch can connect (port-restricted x symmetric): the pair
/// is relayed, `meshctl ping` says through whom, the relay forwards nothing for strangers, and
/// when the relay in use is killed the other member takes over within 10 s.
#[test]
fn a_pair_no_punch_connects_is_relayed_and_survives_the_relay_dying() {
    let mut lab = Lab::new("relayfo", 7);
    let (q, ra, a, rb, b, stranger) = (1, 2, 3, 4, 5, 6);
    lab.nat(ra, NatKind::PortRestricted, 0, &[a]);
    lab.nat(rb, NatKind::Symmetric, 1, &[b]);
    let token = lab.init(P, "p", &[]);
    lab.join(q, "q", &token);
    lab.join(a, "a", &token);
    lab.join(b, "b", &token);
    let start = Instant::now();
    lab.wait_all_pairs(&[P, q, a, b], Duration::from_secs(60));
    let mut relay = String::new();
    lab.wait_for(
        "a and b relayed",
        Duration::from_secs(30),
        || match pair_paths(&lab, (a, "a"), (b, "b")) {
            Some([(pa, Some(r)), (pb, Some(_))]) if pa == "relayed" && pb == "relayed" => {
                relay = r;
                true
            }
            _ => false,
        },
    );
    println!(
        "a (port-restricted) and b (symmetric): relayed via {relay} after {:.1}s",
        start.elapsed().as_secs_f64()
    );
    let o = lab.meshctl(a, &["ping", "b", "-c", "2"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.contains(&format!("(relayed via {relay})")), "{out}");
    // A full-size inner packet (1420 bytes) crosses the relay with the don't-fragment bit set:
    // 1420 + 32 (WireGuard) + 12 (relay header) + 28 fits the underlay's 1500.
    let b_ip = lab.mesh_ip(b).to_string();
    let o = lab.sh(
        a,
        "ping",
        &["-c", "3", "-W", "2", "-M", "do", "-s", "1392", &b_ip],
    );
    assert!(
        o.status.success(),
        "1420-byte packets through the relay: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let r = if relay == "p" { P } else { q };
    let other = if r == P { q } else { P };

    // A stranger's frames, with the pair's own session id or with another, are dropped and
    // counted; nothing reaches the pair from them.
    let before = netcheck(&lab, r).relay;
    let session = before
        .sessions
        .iter()
        .find(|s| s.between.contains(&"a".to_string()) && s.between.contains(&"b".to_string()))
        .map(|s| u64::from_str_radix(&s.session, 16).unwrap())
        .expect("the relay lists the pair's session");
    let relay_at = std::net::SocketAddr::from((lab.addr(r), 51820));
    lab.ns(stranger)
        .run(move || {
            let s = std::net::UdpSocket::bind("0.0.0.0:51820").expect("bind");
            for sid in [session, session ^ 1] {
                let mut f = meshd::mesh::relay::header(sid).to_vec();
                f.extend_from_slice(&[4, 0, 0, 0]);
                f.extend_from_slice(&[0u8; 60]);
                for _ in 0..5 {
                    s.send_to(&f, relay_at).unwrap();
                }
            }
        })
        .unwrap();
    lab.wait_for(
        "the relay to drop the stranger's frames",
        Duration::from_secs(10),
        || {
            let now = netcheck(&lab, r).relay;
            now.dropped_unbound >= before.dropped_unbound + 5
                && now.dropped_unknown >= before.dropped_unknown + 5
        },
    );

    // The relay dies: the other public member takes over.
    lab.kill9(r);
    let killed = Instant::now();
    lab.wait_for(
        "a and b back after the relay died",
        Duration::from_secs(10),
        || lab.ping(a, lab.mesh_ip(b)) && lab.ping(b, lab.mesh_ip(a)),
    );
    let back = killed.elapsed();
    let other_name = if other == P { "p" } else { "q" };
    lab.wait_for(
        "a and b relayed by the other member",
        Duration::from_secs(20),
        || {
            matches!(pair_paths(&lab, (a, "a"), (b, "b")),
            Some([(_, Some(x)), (_, Some(y))]) if x == other_name && y == other_name)
        },
    );
    println!(
        "relay {relay} killed: a and b back after {:.1}s, relayed via {other_name}",
        back.as_secs_f64()
    );
}

/// A pair whose NATs could connect but UDP between them is blocked starts relayed; once the
/// block is lifted, traffic moves to the direct path within 60 s.
#[test]
fn a_relayed_pair_moves_to_the_direct_path_once_it_opens() {
    let mut lab = Lab::new("upgrade", 5);
    let (ra, a, rb, b) = (1, 2, 3, 4);
    lab.nat(ra, NatKind::PortRestricted, 0, &[a]);
    lab.nat(rb, NatKind::PortRestricted, 1, &[b]);
    let wan_b = lab.addr(rb).to_string();
    lab.nft(
        ra,
        &format!(
            "table ip block {{ chain blk {{ type filter hook forward priority -10; ip daddr {wan_b} drop; ip saddr {wan_b} drop; }}; }}\n"
        ),
    );
    let token = lab.init(P, "p", &[]);
    lab.join(a, "a", &token);
    lab.join(b, "b", &token);
    lab.wait_all_pairs(&[P, a, b], Duration::from_secs(60));
    lab.wait_for(
        "a and b relayed while blocked",
        Duration::from_secs(30),
        || {
            matches!(pair_paths(&lab, (a, "a"), (b, "b")),
            Some([(x, _), (y, _)]) if x == "relayed" && y == "relayed")
        },
    );
    lab.must(ra, "nft", &["delete", "table", "ip", "block"]);
    let lifted = Instant::now();
    lab.wait_for(
        "a and b direct once the block is gone",
        Duration::from_secs(60),
        || {
            matches!(pair_paths(&lab, (a, "a"), (b, "b")),
            Some([(x, None), (y, None)]) if x == "direct" && y == "direct")
        },
    );
    let took = lifted.elapsed();
    assert!(lab.ping(a, lab.mesh_ip(b)) && lab.ping(b, lab.mesh_ip(a)));
    let (_, _, ep) = path_of(&lab, a, "b").unwrap();
    assert!(
        ep.starts_with(&format!("{wan_b}:")),
        "a reaches b at its NAT: {ep}"
    );
    println!(
        "block lifted: a and b direct after {:.1}s",
        took.as_secs_f64()
    );
}
