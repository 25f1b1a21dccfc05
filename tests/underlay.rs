//! Hostile underlays, made with nftables inside the lab's namespaces (this kernel has no netem):
//! a node behind a masquerading NAT, and 20% packet loss on every host.
//!
//! ```text
//!   [a] 198.51.100.1   [b] 198.51.100.2   [nat] 198.51.100.3 --veth-- 203.0.113.2 [c]
//!          \                 |                 /      masquerade       default via .1
//!           +------------- br0 --------------+
//! ```

mod common;

use common::Lab;
use std::time::Duration;

const A: usize = 0;
const B: usize = 1;
const NAT: usize = 2;
const C: usize = 3;

/// A node behind NAT advertises addresses nobody can reach. It joins through the NAT (the seed
/// answers where the request came from), and every member reaches it: its own handshakes open
/// the NAT mapping and the members' tunnels follow them to the NAT's public address.
#[test]
fn a_node_behind_nat_joins_and_every_member_reaches_it() {
    let mut lab = Lab::new("nat", 4);
    // Move host C off the bridge, behind the NAT host.
    let c_ns = lab.ns(C).name().to_string();
    lab.must(C, "ip", &["link", "del", "eth0"]);
    lab.must(
        NAT,
        "ip",
        &[
            "link", "add", "lan0", "type", "veth", "peer", "name", "eth0", "netns", &c_ns,
        ],
    );
    lab.must(NAT, "ip", &["addr", "add", "203.0.113.1/24", "dev", "lan0"]);
    lab.must(NAT, "ip", &["link", "set", "lan0", "up"]);
    lab.must(NAT, "sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
    lab.nft(NAT,
        "table ip nat {\n\
         \tchain post { type nat hook postrouting priority srcnat; oifname \"eth0\" masquerade random; }\n\
         }\n",
    );
    lab.must(C, "ip", &["addr", "add", "203.0.113.2/24", "dev", "eth0"]);
    lab.must(C, "ip", &["link", "set", "eth0", "up"]);
    lab.must(C, "ip", &["route", "add", "default", "via", "203.0.113.1"]);

    let token = lab.init(A, "a", &[]);
    lab.join(B, "b", &token);
    lab.wait_all_pairs(&[A, B], Duration::from_secs(30));
    lab.join(C, "c", &token);
    let took = lab.wait_all_pairs(&[A, B, C], Duration::from_secs(60));
    println!("all pairs through the NAT after {:.2}s", took.as_secs_f64());

    // The members talk to c at the NAT's public address, not the one c advertises.
    for h in [A, B] {
        let s = lab.status(h);
        let c = s.peers.iter().find(|p| p.name == "c").expect("c is a peer");
        let ep = c.endpoint.clone().unwrap_or_default();
        assert!(
            ep.starts_with("198.51.100.3:"),
            "host {h} reaches c at {ep}, expected the NAT's address"
        );
        assert!(c.online, "host {h} sees c as {:?}", c.state);
    }
    // And the members' own traffic to c (not only c's to them) gets through, again later.
    assert!(lab.ping(B, lab.mesh_ip(C)));
    assert!(lab.ping(A, lab.mesh_ip(C)));
}

/// 20% of the datagrams every host receives are lost: joins (single datagrams, retried),
/// handshakes, gossip and traffic all get through in the end.
#[test]
fn the_mesh_forms_and_carries_traffic_under_20_percent_loss() {
    let mut lab = Lab::new("loss", 3);
    for h in 0..3 {
        lab.nft(h,
            "table inet loss {\n\
             \tchain input { type filter hook input priority 0; iifname \"eth0\" udp dport 51820 numgen random mod 100 < 20 counter drop; }\n\
             }\n",
        );
    }
    let token = lab.init(0, "a", &[]);
    let start = std::time::Instant::now();
    lab.join(1, "b", &token);
    lab.join(2, "c", &token);
    lab.wait_all_pairs(&[0, 1, 2], Duration::from_secs(90));
    println!(
        "all pairs under 20% loss after {:.2}s",
        start.elapsed().as_secs_f64()
    );
    // Every node sees the others online (gossip got through).
    for h in 0..3 {
        lab.wait_for(
            &format!("host {h} to see two online peers"),
            Duration::from_secs(30),
            || {
                lab.try_status(h)
                    .is_some_and(|s| s.peers.len() == 2 && s.peers.iter().all(|p| p.online))
            },
        );
    }
    // The loss was real: every host's rules dropped datagrams.
    for h in 0..3 {
        let o = lab.sh(h, "nft", &["list", "table", "inet", "loss"]);
        assert!(o.status.success());
        let listing = String::from_utf8_lossy(&o.stdout).to_string();
        let dropped: u64 = listing
            .split("counter packets ")
            .skip(1)
            .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
            .sum();
        assert!(dropped > 0, "host {h} dropped nothing:\n{listing}");
        println!("host {h}: {dropped} datagrams dropped by the loss rules");
    }
}
