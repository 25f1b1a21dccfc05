//! One projection of the membership view, computed once per change and read by every part of
//! the node (data plane, DNS, edge roles, status, notices): who the active members are, the
//! name each answers to, its /24, whether it is live, what it serves. Pure: [`Snapshot::of`]
//! takes the view and nothing else, so what DNS answers, what the gateway routes to and what
//! `meshctl status` shows cannot disagree.

use crate::control::ServiceView;
use crate::dns::zone::{unique_names, NodeEntry, ServiceEntry, ZoneInput};
use crate::gossip::{Liveness, Membership, MeshParams};
use crate::id::{Key32, NodeId};
use crate::mesh::addressing::{candidate, Assignment};
use crate::mesh::PeerSpec;
use crate::proxy::is_hostname_pattern;
use crate::proxy::routes::{HostRoute, MeshView, NodeView};
use crate::trust::Signed;
use crate::util::is_dns_label;
use std::collections::{BTreeMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

/// One active member as every consumer sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct MemberRow {
    pub id: NodeId,
    /// The name in its certificate.
    pub name: String,
    /// The name it answers to in DNS and the proxy: its own, or with an id suffix when two
    /// members raced for one name (the earlier certificate keeps the plain name).
    pub dns_name: String,
    pub wg: Key32,
    pub is_self: bool,
    /// Its /24, if the range has one for it.
    pub slot: Option<u32>,
    pub liveness: Liveness,
    /// Addresses it published (its signed record).
    pub endpoints: Vec<SocketAddr>,
    pub hostnames: Vec<String>,
    pub exit_node: bool,
    pub services: Vec<ServiceRow>,
}

impl MemberRow {
    /// This node, or not declared offline: what DNS answers and gateways route to.
    pub fn live(&self) -> bool {
        self.is_self || self.liveness != Liveness::Dead
    }
}

/// One service a member published.
#[derive(Clone, Debug, PartialEq)]
pub struct ServiceRow {
    pub name: String,
    pub port: u16,
    /// Its address: the one published, or the member's own.
    pub ip: Ipv4Addr,
    /// The address is in the member's own /24 (a node may only publish those; one outside is
    /// left from before a move to another /24).
    pub in_subnet: bool,
}

impl ServiceRow {
    /// Whether it may be answered (DNS, the proxy's `NAME.svc`): in its node's /24, under a
    /// name that is a DNS label (names come from other nodes' records: never trusted).
    pub fn answerable(&self) -> bool {
        self.in_subnet && is_dns_label(&self.name)
    }
}

/// A member still claiming a /24 it lost to an earlier certificate, with the statements that
/// prove it (the winners' certificates and records).
#[derive(Clone, Debug, PartialEq)]
pub struct SlotLoser {
    pub id: NodeId,
    /// Where it published to be reached.
    pub published: Option<SocketAddr>,
    pub winners: Vec<(Signed, Signed)>,
}

/// The projection, with the membership version it was computed from.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub version: u64,
    pub me: NodeId,
    pub params: MeshParams,
    pub assignments: BTreeMap<NodeId, Assignment>,
    /// Active members, this node included, by node id.
    pub members: Vec<MemberRow>,
    /// What the data plane should have.
    pub peers: Vec<PeerSpec>,
    /// What mesh DNS serves.
    pub zone: ZoneInput,
    /// What the gateway and the proxy route by.
    pub routes: Arc<MeshView>,
    pub losers: Vec<SlotLoser>,
    /// Endpoints other members published: the addresses notices outside the tunnels are heard
    /// from.
    pub member_endpoints: HashSet<SocketAddr>,
}

impl Snapshot {
    pub fn of(m: &Membership) -> Snapshot {
        let assignments = m.assignments();
        let range = m.params.range;
        let me = m.self_id;
        let names = unique_names(m.active().map(|x| {
            (
                x.cert.name.as_str(),
                x.cert.issued_at,
                x.cert.node_id.to_string(),
            )
        }));
        let mut members = Vec::new();
        let mut losers = Vec::new();
        let mut member_endpoints = HashSet::new();
        for x in m.active() {
            let id = x.cert.node_id;
            let a = assignments.get(&id);
            let slot = a.map(|a| a.slot);
            let own_ip = slot.map(|s| range.node_ip(s));
            let services = match own_ip {
                Some(ip) => x
                    .services
                    .iter()
                    .flat_map(|r| r.services.iter())
                    .map(|s| {
                        let sip = s.address.unwrap_or(ip);
                        ServiceRow {
                            name: s.name.clone(),
                            port: s.port,
                            ip: sip,
                            in_subnet: range.slot_of(sip) == slot,
                        }
                    })
                    .collect(),
                None => Vec::new(),
            };
            let endpoints = x
                .record
                .as_ref()
                .map(|r| r.endpoints.clone())
                .unwrap_or_default();
            if id != me {
                member_endpoints.extend(endpoints.iter().copied());
                // The claim as this node knows it: from the member's record, or, if none has
                // got through yet (its packets are dropped while it uses the lost address),
                // from its admission.
                if let (Some(claim), Some(a)) = (x.claim_k(), a) {
                    if claim != a.k {
                        let lost =
                            candidate(&m.params.mesh, &x.cert.wireguard, claim, range.slots());
                        losers.push((id, lost, endpoints.first().copied()));
                    }
                }
            }
            members.push(MemberRow {
                id,
                name: x.cert.name.clone(),
                dns_name: names
                    .get(&id.to_string())
                    .cloned()
                    .unwrap_or_else(|| x.cert.name.clone()),
                wg: x.cert.wireguard,
                is_self: id == me,
                slot,
                liveness: x.liveness,
                endpoints,
                hostnames: x
                    .routes
                    .as_ref()
                    .map(|r| r.hostnames.clone())
                    .unwrap_or_default(),
                exit_node: x.routes.as_ref().is_some_and(|r| r.exit_node),
                services,
            });
        }
        let holders: BTreeMap<u32, NodeId> =
            assignments.iter().map(|(id, a)| (a.slot, *id)).collect();
        let losers = losers
            .into_iter()
            .filter_map(|(id, lost, published)| {
                let winner = m.get(holders.get(&lost)?)?;
                let winners = vec![(winner.cert.raw.clone(), winner.record_raw.clone()?)];
                Some(SlotLoser {
                    id,
                    published,
                    winners,
                })
            })
            .collect();
        let zone = zone_input(&m.params, &members);
        let routes = Arc::new(mesh_view(&m.params, &members));
        Snapshot {
            version: m.version(),
            me,
            peers: m.peer_specs(&assignments),
            params: m.params.clone(),
            assignments,
            members,
            zone,
            routes,
            losers,
            member_endpoints,
        }
    }

    /// This node's row (always present: a node is an active member of its own view, or it
    /// shuts down).
    pub fn me(&self) -> Option<&MemberRow> {
        self.members.iter().find(|r| r.is_self)
    }

    pub fn member(&self, id: &NodeId) -> Option<&MemberRow> {
        self.members
            .binary_search_by(|r| r.id.cmp(id))
            .ok()
            .map(|i| &self.members[i])
    }

    /// Every service in the mesh, for `meshctl service ls`.
    pub fn services(&self) -> Vec<ServiceView> {
        let mut out: Vec<ServiceView> = self
            .members
            .iter()
            .filter(|r| r.slot.is_some())
            .flat_map(|r| {
                r.services.iter().map(move |s| ServiceView {
                    name: s.name.clone(),
                    node: r.name.clone(),
                    address: s.ip.to_string(),
                    port: s.port,
                    live: r.live() && s.in_subnet,
                    local: r.is_self,
                    outside_subnet: !s.in_subnet,
                })
            })
            .collect();
        out.sort_by(|a, b| (&a.name, &a.node).cmp(&(&b.name, &b.node)));
        out
    }
}

fn zone_input(params: &MeshParams, members: &[MemberRow]) -> ZoneInput {
    let mut nodes = Vec::new();
    let mut services = Vec::new();
    let mut serving = None;
    for r in members {
        if r.is_self {
            serving = Some(r.dns_name.clone());
        }
        let Some(slot) = r.slot else { continue };
        nodes.push(NodeEntry {
            name: r.dns_name.clone(),
            ip: params.range.node_ip(slot),
        });
        if !r.live() {
            continue;
        }
        for s in r.services.iter().filter(|s| s.answerable()) {
            services.push(ServiceEntry {
                service: s.name.clone(),
                node: r.dns_name.clone(),
                ip: s.ip,
                port: s.port,
            });
        }
    }
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    services.sort();
    ZoneInput {
        domain: params.domain.clone(),
        range: params.range,
        serving: serving.unwrap_or_default(),
        nodes,
        services,
    }
}

fn mesh_view(params: &MeshParams, members: &[MemberRow]) -> MeshView {
    let mut v = MeshView {
        domain: params.domain.clone(),
        range: Some(params.range),
        ..Default::default()
    };
    for r in members {
        let Some(slot) = r.slot else { continue };
        let ip = params.range.node_ip(slot);
        let live = r.live();
        v.nodes.insert(
            r.dns_name.clone(),
            NodeView {
                ip,
                live,
                exit: r.exit_node,
            },
        );
        for h in r.hostnames.iter().filter(|h| is_hostname_pattern(h)) {
            v.hostnames.push(HostRoute {
                pattern: h.clone(),
                node: r.dns_name.clone(),
                ip,
                live,
            });
        }
        if live {
            for s in r.services.iter().filter(|s| s.answerable()) {
                v.services
                    .entry(s.name.clone())
                    .or_default()
                    .push((r.dns_name.clone(), s.ip));
            }
        }
    }
    v.hostnames
        .sort_by(|a, b| (&a.pattern, &a.node).cmp(&(&b.pattern, &b.node)));
    v
}
