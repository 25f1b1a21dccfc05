//! Human output for `meshctl status` (like `tailscale status` / `innernet show`): one line per
//! peer, durations as "12s ago", sizes as "1.2 MiB", keys abbreviated.

use crate::control::{
    DnsReport, DnsStatus, NatMapping, NetcheckReport, PeerState, PingResponse, ServiceView,
    StatusReport,
};
use crate::util::{ago, human_bytes, short_key};
use base64::Engine;
use std::fmt::Write;
use std::time::Duration;

fn short_b64(k: &str) -> String {
    base64::engine::general_purpose::STANDARD
        .decode(k)
        .map(|b| short_key(&b))
        .unwrap_or_else(|_| k.to_string())
}

pub fn status(s: &StatusReport) -> String {
    let mut o = String::new();
    let me = &s.me;
    let _ = writeln!(
        o,
        "{}  {}  subnet {}  key {}  port {}{}",
        me.name,
        me.mesh_ip,
        me.subnet,
        short_b64(&me.wg_key),
        me.port,
        if me.admin { "  admin" } else { "" }
    );
    let _ = writeln!(
        o,
        "mesh {}  range {}  domain {}  {} member{}{}",
        s.mesh.id,
        s.mesh.range,
        s.mesh.domain,
        s.mesh.members,
        if s.mesh.members == 1 { "" } else { "s" },
        if s.mesh.revoked > 0 {
            format!("  {} removed", s.mesh.revoked)
        } else {
            String::new()
        }
    );
    let _ = writeln!(
        o,
        "endpoints {}",
        if me.endpoints.is_empty() {
            "(none found: pass --endpoint)".to_string()
        } else {
            me.endpoints.join(", ")
        }
    );
    let _ = writeln!(o, "{}", dns_line(&s.dns));
    for e in &s.edge.exposed {
        let _ = writeln!(
            o,
            "exposes {} -> {}{}{}",
            e.hostname,
            e.to,
            e.http_to
                .as_ref()
                .map(|h| format!(", http -> {h}"))
                .unwrap_or_default(),
            if e.proxy_protocol { " (PROXY v2)" } else { "" }
        );
    }
    if let Some(g) = &s.edge.gateway {
        let _ = writeln!(
            o,
            "gateway https {}, http {}",
            g.first.as_deref().unwrap_or("off"),
            g.second.as_deref().unwrap_or("off")
        );
    }
    if let Some(p) = &s.edge.proxy {
        let _ = writeln!(
            o,
            "proxy socks5 {}, http {}",
            p.first.as_deref().unwrap_or("off"),
            p.second.as_deref().unwrap_or("off")
        );
    }
    if s.edge.exit_node {
        let _ = writeln!(o, "exit node: yes");
    }
    let d = &s.drops;
    let drops: Vec<String> = [
        (d.no_route, "no route"),
        (d.bad_source, "bad source"),
        (d.bad_destination, "not for this node"),
        (d.forged_source, "forged source"),
        (d.no_session, "no session (queue full)"),
        (d.unknown_peer, "unknown peer"),
        (d.malformed, "malformed"),
        (d.unsplittable, "local reads not splittable (tiny MSS?)"),
    ]
    .iter()
    .filter(|(n, _)| *n > 0)
    .map(|(n, what)| format!("{n} {what}"))
    .collect();
    if !drops.is_empty() {
        let _ = writeln!(o, "dropped packets: {}", drops.join(", "));
    }
    if s.peers.is_empty() {
        let _ = writeln!(
            o,
            "\nno peers yet: run `meshctl invite` and `meshd join` on another machine"
        );
        return o;
    }
    let rows: Vec<Vec<String>> = s
        .peers
        .iter()
        .map(|p| {
            vec![
                if p.dns_name != p.name {
                    format!("{} (dns: {})", p.name, p.dns_name)
                } else {
                    p.name.clone()
                },
                if p.mesh_ip.is_empty() {
                    "-".into()
                } else {
                    p.mesh_ip.clone()
                },
                match p.state {
                    PeerState::Online => "online",
                    PeerState::Connecting => "connecting",
                    PeerState::Offline => "offline",
                }
                .into(),
                match (&p.path, &p.endpoint) {
                    (Some(_), Some(e)) if p.relay.is_some() => {
                        format!("{e} (relayed via {})", p.relay.as_deref().unwrap_or("-"))
                    }
                    (Some(path), Some(e)) => format!("{e} ({path})"),
                    (None, Some(e)) => e.clone(),
                    _ => "-".into(),
                },
                p.rtt_ms.map(rtt).unwrap_or_else(|| "-".into()),
                p.last_handshake_secs
                    .map(|s| ago(Duration::from_secs(s)))
                    .unwrap_or_else(|| "never".into()),
                human_bytes(p.rx_bytes),
                human_bytes(p.tx_bytes),
                p.version.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    let _ = writeln!(o);
    o += &table(
        &[
            "NAME",
            "MESH IP",
            "STATE",
            "ENDPOINT",
            "RTT",
            "HANDSHAKE",
            "RX",
            "TX",
            "VERSION",
        ],
        &rows,
    );
    let skew = version_skew(&s.me.version, &s.peers);
    if !skew.is_empty() {
        let _ = writeln!(
            o,
            "\nwarning: {} run{} another meshd than this node ({}): {}",
            plural(skew.len(), "peer"),
            if skew.len() == 1 { "s" } else { "" },
            s.me.version,
            skew.join(", ")
        );
    }
    o
}

/// `meshctl workload ls`.
pub fn workloads(r: &crate::control::WorkloadsReport) -> String {
    let mut o = match (&r.bridge, r.enabled) {
        (Some(b), true) => format!(
            "workloads on {b}: {} via {}{}\n",
            r.subnet,
            r.gateway,
            if r.forged_dropped > 0 {
                format!(", {} forged packets dropped", r.forged_dropped)
            } else {
                String::new()
            }
        ),
        _ => "workloads off (meshctl workloads enable)\n".to_string(),
    };
    if let Some(e) = &r.error {
        let _ = writeln!(o, "NOT in place: {e}");
    }
    if !r.workloads.is_empty() {
        let rows: Vec<Vec<String>> = r
            .workloads
            .iter()
            .map(|w| {
                vec![
                    w.name.clone(),
                    w.ip.clone(),
                    w.dns.clone(),
                    match (w.container, w.present) {
                        (true, _) => "docker container",
                        (false, true) => "namespace",
                        (false, false) => "namespace (missing)",
                    }
                    .to_string(),
                ]
            })
            .collect();
        o += &table(&["NAME", "ADDRESS", "DNS", "WHAT"], &rows);
    }
    o
}

fn plural(n: usize, what: &str) -> String {
    format!("{n} {what}{}", if n == 1 { "" } else { "s" })
}

/// A round trip: "0.42 ms", "12 ms".
fn rtt(ms: f64) -> String {
    if ms < 10.0 {
        format!("{ms:.2} ms")
    } else {
        format!("{ms:.0} ms")
    }
}

/// The peers that say they run another build than `mine`, as "name (version)". Empty when this
/// node does not know its own version (an old daemon) or every peer that says runs the same.
pub fn version_skew(mine: &str, peers: &[crate::control::PeerReport]) -> Vec<String> {
    if mine.is_empty() {
        return Vec::new();
    }
    peers
        .iter()
        .filter_map(|p| {
            let v = p.version.as_deref()?;
            (v != mine).then(|| format!("{} ({v})", p.name))
        })
        .collect()
}

fn dns_line(d: &DnsStatus) -> String {
    match (&d.listen, &d.error) {
        (Some(l), _) => format!(
            "dns {} on {l}, upstream {}; host: {}",
            d.domain,
            if d.upstreams.is_empty() {
                "none".to_string()
            } else {
                d.upstreams.join(", ")
            },
            d.host
        ),
        (None, Some(e)) => format!("dns {} NOT serving: {e}", d.domain),
        (None, None) => format!("dns {} not serving", d.domain),
    }
}

/// Left-aligned columns.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut w: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            l.push_str(c);
            if i + 1 < cells.len() {
                l.push_str(&" ".repeat(w[i] - c.chars().count() + 2));
            }
        }
        l.trim_end().to_string() + "\n"
    };
    let mut o = line(header.to_vec());
    for r in rows {
        o += &line(r.iter().map(|s| s.as_str()).collect());
    }
    o
}

/// One `meshctl ping` answer.
pub fn pong(r: &PingResponse) -> String {
    let path = match &r.relay {
        Some(relay) => format!("relayed via {relay}"),
        None => r.path.clone(),
    };
    format!(
        "pong from {} ({}) via {} ({path}) in {:.2} ms",
        r.name,
        r.mesh_ip,
        r.endpoint.as_deref().unwrap_or("-"),
        r.rtt_us as f64 / 1000.0
    )
}

/// `meshctl netcheck`.
pub fn netcheck(r: &NetcheckReport) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "published endpoints: {}",
        if r.endpoints.is_empty() {
            "(none)".to_string()
        } else {
            r.endpoints.join(", ")
        }
    );
    let _ = writeln!(
        o,
        "behind NAT: {}",
        match r.behind_nat {
            Some(true) => "yes (members see another address than this node's own)",
            Some(false) => "no (members see this node's own address)",
            None => "unknown (no member has said where it sees this node yet)",
        }
    );
    let _ = writeln!(
        o,
        "mapping: {}",
        match r.mapping {
            NatMapping::EndpointIndependent => "endpoint-independent (one public address for every destination: easy NAT)",
            NatMapping::EndpointDependent => "endpoint-dependent (a new public port per destination: hard NAT; direct paths only to peers whose NAT lets any port in)",
            NatMapping::Unknown => "unknown (needs two observers at different addresses)",
        }
    );
    let _ = writeln!(
        o,
        "port reachable from outside: {}",
        match r.port_reachable {
            Some(true) => "yes (a member's probe from a new port got in: members reach this node first)",
            Some(false) => "no (the NAT lets in only answers to what this node sent: paths need punching or a relay)",
            None => "unknown (not checked yet)",
        }
    );
    let _ = writeln!(
        o,
        "hole punches: {} sent, {} made for others' requests; {} path messages refused",
        r.punches_sent, r.punches_answered, r.dropped
    );
    let x = &r.relay;
    let _ = writeln!(
        o,
        "relay for others: {}; {} session(s), {} packets ({}) forwarded; refused {} ask(s); dropped {} frame(s) for no session, {} from unbound addresses, {} over the rate",
        if x.enabled { "on" } else { "off (meshctl relay enable)" },
        x.sessions.len(),
        x.forwarded_packets,
        human_bytes(x.forwarded_bytes),
        x.refused,
        x.dropped_unknown,
        x.dropped_unbound,
        x.dropped_rate
    );
    for s in &x.sessions {
        let _ = writeln!(
            o,
            "  relaying {} <-> {} ({} <-> {})",
            s.between[0],
            s.between[1],
            s.endpoints[0].as_deref().unwrap_or("-"),
            s.endpoints[1].as_deref().unwrap_or("-")
        );
    }
    if r.observations.is_empty() {
        return o;
    }
    let rows: Vec<Vec<String>> = r
        .observations
        .iter()
        .map(|x| {
            vec![
                x.observer.clone(),
                x.observer_at.clone(),
                x.seen.clone(),
                ago(Duration::from_secs(x.age_secs)),
            ]
        })
        .collect();
    o.push('\n');
    o.push_str(&table(
        &["OBSERVER", "OBSERVER AT", "SEES THIS NODE AT", "AGE"],
        &rows,
    ));
    o
}

pub fn dns(r: &DnsReport) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "{}", dns_line(&r.status));
    if let Some(l) = &r.status.listen {
        let ip = l.rsplit_once(':').map(|(ip, _)| ip).unwrap_or(l);
        if !r.status.host.starts_with("systemd-resolved") {
            let _ = writeln!(
                o,
                "to use it: `dig @{ip} NAME.{d}`, or make {ip} this host's resolver (it forwards other \
                 names upstream); with systemd-resolved meshd registers {d} on its link by itself",
                d = r.status.domain
            );
        }
    }
    let _ = writeln!(o);
    let rows: Vec<Vec<String>> = r
        .records
        .iter()
        .map(|x| {
            vec![
                x.name.clone(),
                x.rtype.clone(),
                x.ttl.to_string(),
                x.value.clone(),
            ]
        })
        .collect();
    o += &table(&["NAME", "TYPE", "TTL", "VALUE"], &rows);
    o
}

pub fn services(v: &[ServiceView]) -> String {
    if v.is_empty() {
        return "no services; publish one with `meshctl service add NAME --port PORT`\n"
            .to_string();
    }
    let rows: Vec<Vec<String>> = v
        .iter()
        .map(|s| {
            vec![
                s.name.clone(),
                s.node.clone() + if s.local { " (this node)" } else { "" },
                s.address.clone(),
                s.port.to_string(),
                if s.outside_subnet {
                    "outside its node's subnet"
                } else if s.live {
                    "live"
                } else {
                    "offline"
                }
                .to_string(),
            ]
        })
        .collect();
    table(&["SERVICE", "NODE", "ADDRESS", "PORT", "STATE"], &rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::*;

    #[test]
    fn one_line_per_peer_with_human_units() {
        let s = StatusReport {
            me: SelfStatus {
                name: "alpha".into(),
                node_id: "00".into(),
                mesh_ip: "10.210.1.1".into(),
                subnet: "10.210.1.0/24".into(),
                wg_key: crate::util::b64(&[1; 32]),
                port: 51820,
                endpoints: vec!["198.51.100.1:51820".into()],
                admin: true,
                tun: "mesh0".into(),
                version: String::new(),
            },
            mesh: MeshStatus {
                id: "abc".into(),
                range: "10.210.0.0/16".into(),
                domain: "mesh.internal".into(),
                members: 2,
                revoked: 0,
            },
            peers: vec![PeerReport {
                name: "beta".into(),
                dns_name: "beta".into(),
                hostnames: vec![],
                exit_node: false,
                node_id: "01".into(),
                mesh_ip: "10.210.2.1".into(),
                subnet: "10.210.2.0/24".into(),
                state: PeerState::Online,
                online: true,
                endpoint: Some("198.51.100.2:51820".into()),
                path: Some("direct".into()),
                relay: None,
                rtt_ms: Some(0.4251),
                version: Some("0.1.0 (abc)".into()),
                last_handshake_secs: Some(12),
                rx_bytes: 1229,
                tx_bytes: 10,
                dropped_bad_source: 0,
                wg_key: crate::util::b64(&[2; 32]),
            }],
            dns: DnsStatus {
                domain: "mesh.internal".into(),
                listen: Some("10.210.1.1:53".into()),
                upstreams: vec!["192.0.2.53:53".into()],
                host: "not registered".into(),
                error: None,
            },
            edge: EdgeStatus::default(),
            drops: Default::default(),
            lanes: Default::default(),
            tun: Default::default(),
        };
        let out = status(&s);
        assert!(
            !out.contains("dropped"),
            "no drop line while nothing was dropped"
        );
        let mut with_drops = s.clone();
        with_drops.drops.bad_source = 3;
        with_drops.drops.no_route = 1;
        assert!(
            status(&with_drops).contains("dropped packets: 1 no route, 3 bad source"),
            "{}",
            status(&with_drops)
        );
        assert!(out.contains("alpha  10.210.1.1  subnet 10.210.1.0/24"));
        let peer_line = out.lines().find(|l| l.starts_with("beta")).unwrap();
        for part in [
            "10.210.2.1",
            "online",
            "198.51.100.2:51820",
            "12s ago",
            "1.2 KiB",
            "10 B",
            "0.43 ms",
            "0.1.0 (abc)",
        ] {
            assert!(peer_line.contains(part), "{peer_line}");
        }
        let header = out.lines().find(|l| l.starts_with("NAME")).unwrap();
        assert!(
            header.contains("RTT") && header.contains("VERSION"),
            "{header}"
        );
        // This node's version unknown (an old daemon): no skew said.
        assert!(!out.contains("warning"), "{out}");
        let mut skewed = s.clone();
        skewed.me.version = "0.2.0 (def)".into();
        assert!(
            status(&skewed).contains(
                "warning: 1 peer runs another meshd than this node (0.2.0 (def)): beta (0.1.0 (abc))"
            ),
            "{}",
            status(&skewed)
        );
        skewed.me.version = "0.1.0 (abc)".into();
        assert!(!status(&skewed).contains("warning"));
    }
}
