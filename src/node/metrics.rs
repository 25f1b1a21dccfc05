//! `GET /metrics` and `GET /sd`: Prometheus text and HTTP service discovery, projected from the
//! same typed reports `meshctl status` and `meshctl netcheck` show (pure).

use crate::control::server::METRICS_PORT;
use crate::control::{NetcheckReport, PeerReport, PeerState, SdTargetGroup, StatusReport};
use crate::metrics::{Kind, Text};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

/// Every metric of this node.
pub fn render(s: &StatusReport, n: &NetcheckReport, rtt: &BTreeMap<String, f64>) -> String {
    let mut t = Text::default();
    t.family(
        "meshd_build_info",
        Kind::Gauge,
        "The running meshd's version (release and commit).",
    )
    .sample("meshd_build_info", &[("version", &s.me.version)], 1.0);
    t.family(
        "meshd_members",
        Kind::Gauge,
        "Other members of the mesh by state.",
    );
    for (state, name) in [
        (PeerState::Online, "online"),
        (PeerState::Connecting, "connecting"),
        (PeerState::Offline, "offline"),
    ] {
        let count = s.peers.iter().filter(|p| p.state == state).count();
        t.sample("meshd_members", &[("state", name)], count as f64);
    }
    per_peer(
        &mut t,
        s,
        ("meshd_peer_info", Kind::Gauge),
        "Each peer's meshd version, as its signed about record says (1 per peer).",
        |p| {
            let v = p.version.as_deref().unwrap_or("unknown");
            Some((Some(("version", v)), 1.0))
        },
    );
    per_peer(
        &mut t,
        s,
        ("meshd_peer_receive_bytes_total", Kind::Counter),
        "Bytes received from each peer through its tunnel.",
        |p| Some((None, p.rx_bytes as f64)),
    );
    per_peer(
        &mut t,
        s,
        ("meshd_peer_transmit_bytes_total", Kind::Counter),
        "Bytes sent to each peer through its tunnel.",
        |p| Some((None, p.tx_bytes as f64)),
    );
    per_peer(
        &mut t,
        s,
        ("meshd_peer_last_handshake_seconds", Kind::Gauge),
        "Seconds since each peer's last WireGuard handshake.",
        |p| p.last_handshake_secs.map(|h| (None, h as f64)),
    );
    per_peer(
        &mut t,
        s,
        ("meshd_peer_path", Kind::Gauge),
        "The path to each peer (1 for the one in use: direct, relayed, or none).",
        |p| Some((Some(("path", p.path.as_deref().unwrap_or("none"))), 1.0)),
    );
    t.family(
        "meshd_peer_rtt_seconds",
        Kind::Gauge,
        "Round trip to each peer through its tunnel, last measured.",
    );
    for (peer, secs) in rtt {
        t.sample("meshd_peer_rtt_seconds", &[("peer", peer)], *secs);
    }
    let d = &s.drops;
    t.family(
        "meshd_dropped_packets_total",
        Kind::Counter,
        "Packets the data plane dropped, by reason.",
    );
    for (reason, v) in [
        ("no_route", d.no_route),
        ("bad_source", d.bad_source),
        ("bad_destination", d.bad_destination),
        ("forged_source", d.forged_source),
        ("no_session", d.no_session),
        ("unknown_peer", d.unknown_peer),
        ("malformed", d.malformed),
        ("unsplittable", d.unsplittable),
    ] {
        t.sample(
            "meshd_dropped_packets_total",
            &[("reason", reason)],
            v as f64,
        );
    }
    let l = &s.lanes;
    t.family(
        "meshd_lanes",
        Kind::Gauge,
        "Threads beyond the receive and TUN threads that decrypt (receive) and encrypt (seal) under load.",
    );
    for (direction, lanes) in [("receive", l.receive), ("seal", l.seal)] {
        t.sample("meshd_lanes", &[("direction", direction)], lanes as f64);
    }
    t.family(
        "meshd_lane_reads_total",
        Kind::Counter,
        "Reads the lanes took: datagram reads decrypted on receive lanes, TUN reads sealed on seal lanes.",
    );
    for (direction, reads) in [("receive", l.receive_reads), ("seal", l.seal_reads)] {
        t.sample(
            "meshd_lane_reads_total",
            &[("direction", direction)],
            reads as f64,
        );
    }
    t.family(
        "meshd_tun_packets_total",
        Kind::Counter,
        "Packets the data plane handed to the TUN device.",
    )
    .sample("meshd_tun_packets_total", &[], s.tun.packets as f64);
    t.family(
        "meshd_tun_writes_total",
        Kind::Counter,
        "Writes to the TUN device those packets took (runs of one TCP flow's segments go in one).",
    )
    .sample("meshd_tun_writes_total", &[], s.tun.writes as f64);
    let r = &n.relay;
    t.family(
        "meshd_relay_sessions",
        Kind::Gauge,
        "Sessions this node relays for other members.",
    )
    .sample("meshd_relay_sessions", &[], r.sessions.len() as f64);
    t.family(
        "meshd_relay_forwarded_bytes_total",
        Kind::Counter,
        "Bytes this node relayed for other members.",
    )
    .sample(
        "meshd_relay_forwarded_bytes_total",
        &[],
        r.forwarded_bytes as f64,
    );
    t.family(
        "meshd_relay_dropped_total",
        Kind::Counter,
        "Relayed frames dropped, by reason.",
    );
    for (reason, v) in [
        ("unknown_session", r.dropped_unknown),
        ("unbound_source", r.dropped_unbound),
        ("rate", r.dropped_rate),
    ] {
        t.sample("meshd_relay_dropped_total", &[("reason", reason)], v as f64);
    }
    t.family(
        "meshd_hole_punches_total",
        Kind::Counter,
        "Hole punches made, for this node or asked by others.",
    )
    .sample(
        "meshd_hole_punches_total",
        &[("kind", "sent")],
        n.punches_sent as f64,
    )
    .sample(
        "meshd_hole_punches_total",
        &[("kind", "answered")],
        n.punches_answered as f64,
    );
    t.family(
        "meshd_dns_answers_total",
        Kind::Counter,
        "Mesh DNS answers, by response code.",
    );
    for (i, result) in crate::metrics::DNS_RESULTS.iter().enumerate() {
        let v = crate::metrics::DNS_ANSWERS[i].load(Ordering::Relaxed);
        t.sample("meshd_dns_answers_total", &[("result", result)], v as f64);
    }
    let g = &crate::metrics::GOSSIP;
    t.family(
        "meshd_gossip_messages_total",
        Kind::Counter,
        "Gossip messages through the tunnels, by direction.",
    );
    for (dir, v) in [
        ("sent", &g.sent_messages),
        ("received", &g.received_messages),
    ] {
        t.sample(
            "meshd_gossip_messages_total",
            &[("direction", dir)],
            v.load(Ordering::Relaxed) as f64,
        );
    }
    t.family(
        "meshd_gossip_bytes_total",
        Kind::Counter,
        "Gossip bytes through the tunnels, by direction.",
    );
    for (dir, v) in [("sent", &g.sent_bytes), ("received", &g.received_bytes)] {
        t.sample(
            "meshd_gossip_bytes_total",
            &[("direction", dir)],
            v.load(Ordering::Relaxed) as f64,
        );
    }
    let conns = crate::metrics::connections();
    t.family(
        "meshd_connections_total",
        Kind::Counter,
        "Connections accepted, by listener (gateway, proxy, mesh side).",
    );
    for (what, accepted, _) in &conns {
        t.sample(
            "meshd_connections_total",
            &[("listener", what)],
            *accepted as f64,
        );
    }
    t.family(
        "meshd_connections_refused_total",
        Kind::Counter,
        "Connections refused at a limit, by listener.",
    );
    for (what, _, refused) in &conns {
        t.sample(
            "meshd_connections_refused_total",
            &[("listener", what)],
            *refused as f64,
        );
    }
    t.finish()
}

/// A label beside `peer`, and the value.
type PeerSample<'a> = (Option<(&'static str, &'a str)>, f64);

/// One family with a sample per peer, labelled `peer` (and what `f` adds); a peer `f` gives
/// nothing for is left out.
fn per_peer<'a>(
    t: &mut Text,
    s: &'a StatusReport,
    (name, kind): (&str, Kind),
    help: &str,
    f: impl Fn(&'a PeerReport) -> Option<PeerSample<'a>>,
) {
    t.family(name, kind, help);
    for p in &s.peers {
        if let Some((extra, v)) = f(p) {
            let mut labels = vec![("peer", p.name.as_str())];
            labels.extend(extra);
            t.sample(name, &labels, v);
        }
    }
}

/// Prometheus HTTP service discovery: this node and every member not found offline, each a
/// target `MESH_IP:9586` labelled with its node name and subnet.
pub fn discovery(s: &StatusReport) -> Vec<SdTargetGroup> {
    let group = |name: &str, ip: &str, subnet: &str| SdTargetGroup {
        targets: vec![format!("{ip}:{METRICS_PORT}")],
        labels: [("node", name), ("subnet", subnet)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    };
    let mut out = vec![group(&s.me.name, &s.me.mesh_ip, &s.me.subnet)];
    for p in s
        .peers
        .iter()
        .filter(|p| p.state != PeerState::Offline && !p.mesh_ip.is_empty())
    {
        out.push(group(&p.name, &p.mesh_ip, &p.subnet));
    }
    out
}
