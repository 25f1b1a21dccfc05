//! `meshctl status`: this node and one line per peer.

use super::Node;
use crate::constants::REJECT_AFTER_TIME;
use crate::control::{MeshStatus, PeerReport, PeerState, SelfStatus, StatusReport};
use crate::gossip::Liveness;
use crate::mesh::addressing::subnet_string;
use crate::util::b64;
use std::collections::HashMap;

impl<P: super::platform::Platform> Node<P> {
    pub(super) fn status(&self) -> StatusReport {
        let stats: HashMap<_, _> = self
            .device
            .stats()
            .into_iter()
            .map(|s| (s.node_id, s))
            .collect();
        let assign = self.m.assignments();
        let range = &self.m.params.range;
        let dns_names = crate::dns::zone::unique_names(self.m.active().map(|x| {
            (
                x.cert.name.as_str(),
                x.cert.issued_at,
                x.cert.node_id.to_string(),
            )
        }));
        let mut peers: Vec<PeerReport> = self
            .m
            .active()
            .filter(|x| x.cert.node_id != self.cert.node_id)
            .map(|x| {
                let st = stats.get(&x.cert.node_id);
                let slot = assign.get(&x.cert.node_id).map(|a| a.slot);
                let session = st
                    .and_then(|s| s.last_handshake)
                    .is_some_and(|d| d < REJECT_AFTER_TIME);
                let state = match x.liveness {
                    Liveness::Dead => PeerState::Offline,
                    _ if session => PeerState::Online,
                    _ => PeerState::Connecting,
                };
                PeerReport {
                    name: x.cert.name.clone(),
                    hostnames: x
                        .routes
                        .as_ref()
                        .map(|r| r.hostnames.clone())
                        .unwrap_or_default(),
                    exit_node: x.routes.as_ref().is_some_and(|r| r.exit_node),
                    dns_name: dns_names
                        .get(&x.cert.node_id.to_string())
                        .cloned()
                        .unwrap_or_else(|| x.cert.name.clone()),
                    node_id: x.cert.node_id.to_string(),
                    mesh_ip: slot
                        .map(|s| range.node_ip(s).to_string())
                        .unwrap_or_default(),
                    subnet: slot.map(|s| subnet_string(range, s)).unwrap_or_default(),
                    state,
                    online: state == PeerState::Online,
                    endpoint: st.and_then(|s| s.endpoint).map(|e| e.to_string()),
                    last_handshake_secs: st.and_then(|s| s.last_handshake).map(|d| d.as_secs()),
                    rx_bytes: st.map_or(0, |s| s.rx_bytes),
                    tx_bytes: st.map_or(0, |s| s.tx_bytes),
                    dropped_bad_source: st.map_or(0, |s| s.dropped_bad_source),
                    wg_key: b64(&x.cert.wireguard),
                }
            })
            .collect();
        peers.sort_by(|a, b| a.name.cmp(&b.name));
        StatusReport {
            me: SelfStatus {
                name: self.cert.name.clone(),
                node_id: self.cert.node_id.to_string(),
                mesh_ip: self.mesh_ip().to_string(),
                subnet: subnet_string(range, self.own_slot),
                wg_key: b64(&self.cert.wireguard),
                port: self.config.port,
                endpoints: self.endpoints.iter().map(|e| e.to_string()).collect(),
                admin: self.root.is_some(),
                tun: self.config.tun.clone(),
            },
            mesh: MeshStatus {
                id: self.m.params.mesh.short(),
                range: range.to_string(),
                domain: self.m.params.domain.clone(),
                members: peers.len() + 1,
                revoked: self.m.revocations().count(),
            },
            peers,
            dns: self.dns_status(),
            edge: self.edge_status(),
            drops: {
                let c = &self.device.counters;
                let get =
                    |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
                crate::control::api::DropStatus {
                    no_route: get(&c.dropped_no_peer),
                    bad_source: get(&c.dropped_bad_source),
                    bad_destination: get(&c.dropped_bad_destination),
                    unknown_peer: get(&c.dropped_unknown_peer),
                    malformed: get(&c.dropped_unknown_frame),
                }
            },
        }
    }
}
