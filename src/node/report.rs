//! `meshctl status`: this node and one line per peer, from the snapshot and the data plane's
//! statistics. Pure.

use super::snapshot::Snapshot;
use crate::control::{
    DnsStatus, DropStatus, EdgeStatus, LaneStatus, MeshStatus, PeerReport, PeerState, SelfStatus,
    StatusReport, TunStatus,
};
use crate::gossip::Liveness;
use crate::id::NodeId;
use crate::mesh::addressing::subnet_string;
use crate::mesh::device::DeviceCounters;
use crate::mesh::path::PathKind;
use crate::mesh::PeerStats;
use crate::util::b64;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

/// A peer's state: offline by the failure detector; online once its tunnel has a session.
pub fn peer_state(liveness: Liveness, stats: Option<&PeerStats>) -> PeerState {
    match liveness {
        Liveness::Dead => PeerState::Offline,
        _ if stats.is_some_and(|s| s.has_session()) => PeerState::Online,
        _ => PeerState::Connecting,
    }
}

pub fn peers(snap: &Snapshot, stats: &HashMap<NodeId, PeerStats>) -> Vec<PeerReport> {
    let range = &snap.params.range;
    let mut peers: Vec<PeerReport> = snap
        .members
        .iter()
        .filter(|r| !r.is_self)
        .map(|r| {
            let st = stats.get(&r.id);
            let state = peer_state(r.liveness, st);
            PeerReport {
                name: r.name.clone(),
                hostnames: r.hostnames.clone(),
                exit_node: r.exit_node,
                dns_name: r.dns_name.clone(),
                node_id: r.id.to_string(),
                mesh_ip: r
                    .slot
                    .map(|s| range.node_ip(s).to_string())
                    .unwrap_or_default(),
                subnet: r.slot.map(|s| subnet_string(range, s)).unwrap_or_default(),
                state,
                online: state == PeerState::Online,
                endpoint: st.and_then(|s| s.endpoint).map(|e| e.to_string()),
                path: st
                    .filter(|s| state == PeerState::Online && s.endpoint.is_some())
                    .map(|s| path_name(&s.path).to_string()),
                relay: st
                    .filter(|_| state == PeerState::Online)
                    .and_then(|s| relay_name(&s.path, snap)),
                // Filled in by the caller from the path task's measurements.
                rtt_ms: None,
                version: r.version.clone(),
                last_handshake_secs: st.and_then(|s| s.last_handshake).map(|d| d.as_secs()),
                rx_bytes: st.map_or(0, |s| s.rx_bytes),
                tx_bytes: st.map_or(0, |s| s.tx_bytes),
                dropped_bad_source: st.map_or(0, |s| s.dropped_bad_source),
                wg_key: b64(&r.wg),
            }
        })
        .collect();
    peers.sort_by(|a, b| a.name.cmp(&b.name));
    peers
}

/// `direct` or `relayed`.
pub fn path_name(p: &PathKind) -> &'static str {
    match p {
        PathKind::Direct => "direct",
        PathKind::Relay(_) => "relayed",
    }
}

/// The name of the member relaying, when relayed.
pub fn relay_name(p: &PathKind, snap: &Snapshot) -> Option<String> {
    match p {
        PathKind::Direct => None,
        PathKind::Relay(r) => Some(
            snap.member(&r.node)
                .map(|m| m.name.clone())
                .unwrap_or_else(|| r.node.to_string()),
        ),
    }
}

pub fn drops(c: &DeviceCounters) -> DropStatus {
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    DropStatus {
        no_route: get(&c.dropped_no_peer),
        bad_source: get(&c.dropped_bad_source),
        bad_destination: get(&c.dropped_bad_destination),
        forged_source: get(&c.dropped_forged_source),
        no_session: get(&c.dropped_no_session),
        unknown_peer: get(&c.dropped_unknown_peer),
        malformed: get(&c.dropped_unknown_frame),
        unsplittable: get(&c.dropped_unsplittable),
    }
}

/// The data plane's lanes: how many, and the reads they took.
pub fn lanes(lanes: (usize, usize), c: &DeviceCounters) -> LaneStatus {
    LaneStatus {
        receive: lanes.0,
        seal: lanes.1,
        receive_reads: c.lane_reads.load(Ordering::Relaxed),
        seal_reads: c.sealed_on_lanes.load(Ordering::Relaxed),
    }
}

/// What the data plane handed the TUN device.
pub fn tun(c: &DeviceCounters) -> TunStatus {
    TunStatus {
        packets: c.tun_packets.load(Ordering::Relaxed),
        writes: c.tun_writes.load(Ordering::Relaxed),
    }
}

/// The whole report.
pub fn status(
    me: SelfStatus,
    snap: &Snapshot,
    stats: &HashMap<NodeId, PeerStats>,
    revoked: usize,
    dns: DnsStatus,
    edge: EdgeStatus,
    drops: DropStatus,
) -> StatusReport {
    let peers = peers(snap, stats);
    StatusReport {
        me,
        mesh: MeshStatus {
            id: snap.params.mesh.short(),
            range: snap.params.range.to_string(),
            domain: snap.params.domain.clone(),
            members: peers.len() + 1,
            revoked,
        },
        peers,
        dns,
        edge,
        drops,
        lanes: LaneStatus::default(),
        tun: TunStatus::default(),
    }
}
