//! One projection of the membership view, computed once per change and read by every part of
//! the node (data plane, DNS, edge roles, status, notices): who the active members are, the
//! name each answers to, its /24, whether it is live, what it serves. Pure: [`Snapshot::of`]
//! takes the view and nothing else, so what DNS answers, what the gateway routes to and what
//! `meshctl status` shows cannot disagree.

use crate::control::ServiceView;
use crate::dns::zone::{unique_names, NodeEntry, ServiceEntry, WorkloadEntry, ZoneInput};
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
    /// Addresses it published (its signed record), then where it asked to join from if this
    /// node admitted it.
    pub endpoints: Vec<SocketAddr>,
    pub hostnames: Vec<String>,
    pub exit_node: bool,
    pub services: Vec<ServiceRow>,
    /// The software it says it runs (`--version`), once its about record is known.
    pub version: Option<String>,
    /// Its named workloads, those in its own /24 under a valid name only (names come from
    /// other nodes' records: never trusted).
    pub workloads: Vec<(String, Ipv4Addr)>,
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
            // Every address known for it: those it published, and where it asked to join from
            // when this node admitted it.
            let mut endpoints = x
                .record
                .as_ref()
                .map(|r| r.endpoints.clone())
                .unwrap_or_default();
            if let Some(a) = x.admitted_from.filter(|a| !endpoints.contains(a)) {
                endpoints.push(a);
            }
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
                version: x.about.as_ref().map(|a| a.version.clone()),
                workloads: x
                    .workloads
                    .iter()
                    .flat_map(|r| r.workloads.iter())
                    .filter(|w| {
                        slot.is_some()
                            && range.slot_of(w.ip) == slot
                            && crate::workloads::valid_name(&w.name)
                            && ![0, 1, 255].contains(&w.ip.octets()[3])
                    })
                    .map(|w| (w.name.clone(), w.ip))
                    .collect(),
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
    let mut workloads = Vec::new();
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
        for (name, ip) in &r.workloads {
            workloads.push(WorkloadEntry {
                name: name.clone(),
                node: r.dns_name.clone(),
                ip: *ip,
            });
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
    workloads.sort();
    ZoneInput {
        domain: params.domain.clone(),
        range: params.range,
        serving: serving.unwrap_or_default(),
        nodes,
        services,
        workloads,
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
            // As the zone names them.
            for (name, ip) in &r.workloads {
                if let Some(label) = crate::dns::zone::workload_label(name, &r.dns_name) {
                    v.workloads.insert(label, *ip);
                }
            }
        }
    }
    v.hostnames
        .sort_by(|a, b| (&a.pattern, &a.node).cmp(&(&b.pattern, &b.node)));
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::addressing::candidate;
    use crate::testing::fixtures::{World, T0};
    use crate::trust::{NodeKeys, ServiceDef};

    fn svc(name: &str, port: u16, address: Option<&str>) -> ServiceDef {
        ServiceDef {
            name: name.into(),
            port,
            address: address.map(|a| a.parse().unwrap()),
        }
    }

    /// DNS, the gateway's routes, the proxy's services and `meshctl service ls` are one
    /// projection: a dead member keeps its name but its services go; a service outside its
    /// node's /24 or under a name that is no DNS label is answered nowhere; two members with
    /// one name answer to distinct DNS names.
    #[test]
    fn every_consumer_sees_the_same_members_names_and_services() {
        let w = World::new("10.210.0.0/16");
        let (m, members) = w.mesh(3);
        let mut m = m;
        let (k0, _) = &members[0];
        let (k1, c1) = &members[1];
        let (_, c2) = &members[2];
        let s = Snapshot::of(&m);
        let ip = |id| s.params.range.node_ip(s.assignments[id].slot);
        let ip1 = ip(&c1.node_id);
        let o = ip1.octets();
        let in1 = format!("{}.{}.{}.7", o[0], o[1], o[2]);
        // Another /24 of the range, whatever slot n1's random keys landed on.
        let out1 = format!("{}.{}.{}.9", o[0], o[1], o[2] ^ 1);
        m.ingest_services(
            c1.node_id,
            &World::services(
                k1,
                2,
                vec![
                    svc("web", 80, Some(&in1)),
                    svc("Bad_Name", 81, None),
                    svc("moved", 82, Some(&out1)),
                ],
            ),
        )
        .unwrap();
        // A later member with n0's name, and n2 offline.
        let (kx, cx) = w.node("n0", T0 + 100);
        m.ingest_cert(&cx.raw, T0).unwrap();
        let k = m.claim_for_newcomer(&cx.wireguard).unwrap();
        m.ingest_record(cx.node_id, &World::record(&kx, 1, k, vec![]))
            .unwrap();
        m.set_liveness(cx.node_id, Liveness::Alive, T0);
        m.set_liveness(c2.node_id, Liveness::Dead, T0);
        let s = Snapshot::of(&m);
        assert_eq!(s.version, m.version());

        let row = |id| s.member(id).unwrap();
        assert_eq!(row(&members[0].1.node_id).dns_name, "n0");
        let twin = &row(&cx.node_id).dns_name;
        assert!(twin.starts_with("n0-") && twin != "n0", "{twin}");
        assert!(row(&members[0].1.node_id).is_self);
        assert!(!row(&c2.node_id).live());

        // DNS: every node with a /24 (the offline one too); only answerable live services.
        let names: Vec<&str> = s.zone.nodes.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names.len(), 4);
        assert!(names.contains(&"n2") && names.contains(&twin.as_str()));
        let mut dns_svc: Vec<(String, String, Ipv4Addr)> = s
            .zone
            .services
            .iter()
            .map(|e| (e.service.clone(), e.node.clone(), e.ip))
            .collect();
        dns_svc.sort();
        let web1 = ("web".to_string(), "n1".to_string(), in1.parse().unwrap());
        assert!(dns_svc.contains(&web1), "{dns_svc:?}");
        assert!(
            !dns_svc.iter().any(|(_, n, _)| n == "n2"),
            "offline n2's service"
        );
        assert!(!dns_svc
            .iter()
            .any(|(svc, _, _)| svc == "moved" || svc == "Bad_Name"));
        assert_eq!(s.zone.serving, "n0");

        // The proxy's services are exactly DNS's.
        let mut proxy_svc: Vec<(String, String, Ipv4Addr)> = s
            .routes
            .services
            .iter()
            .flat_map(|(svc, v)| v.iter().map(move |(n, ip)| (svc.clone(), n.clone(), *ip)))
            .collect();
        proxy_svc.sort();
        assert_eq!(proxy_svc, dns_svc);
        // Routes: by DNS name, with liveness and exit flags; hostnames that are patterns.
        assert!(!s.routes.nodes["n2"].live);
        assert!(
            s.routes.nodes["n0"].exit,
            "every tenth member (n0) is an exit"
        );
        assert!(s.routes.route("app1.example.com")[0].node == "n1");

        // `meshctl service ls`: everything, flagged.
        let ls = s.services();
        let moved = ls.iter().find(|v| v.name == "moved").unwrap();
        assert!(moved.outside_subnet && !moved.live);
        let web_n2 = ls
            .iter()
            .find(|v| v.name == "web" && v.node == "n2")
            .unwrap();
        assert!(!web_n2.live && !web_n2.outside_subnet);
        assert!(ls.iter().any(|v| v.local && v.node == "n0"));

        // The data plane: every member but this node, with its published endpoints.
        assert_eq!(s.peers.len(), 3);
        assert!(s.peers.iter().all(|p| p.node_id != members[0].1.node_id));
        assert!(s
            .member_endpoints
            .contains(&"198.51.0.2:51820".parse().unwrap()));
        assert!(
            !s.member_endpoints
                .contains(&"198.51.0.1:51820".parse().unwrap()),
            "not this node's own"
        );
        let _ = k0;
    }

    /// A member still claiming a /24 an earlier certificate holds is listed with the winner's
    /// statements, for the notice that tells it.
    #[test]
    fn a_member_claiming_a_lost_slot_is_listed_with_the_winner() {
        let w = World::new("10.210.0.0/20"); // 16 slots: collisions are easy to find
        let (a_keys, a) = w.node("a", T0 + 1);
        let mut m = Membership::new(w.params.clone(), a.clone(), T0);
        m.ingest_record(a.node_id, &World::record(&a_keys, 1, 0, vec![]))
            .unwrap();
        let slots = w.params.range.slots();
        let a_slot = candidate(&w.params.mesh, &a.wireguard, 0, slots);
        // Keys whose first candidate is not a's slot, then keys whose first is x's.
        let first = |k: &NodeKeys| candidate(&w.params.mesh, &k.wg_public(), 0, slots);
        let keys_where = |want: &dyn Fn(u32) -> bool| {
            (0..10_000)
                .map(|_| NodeKeys::generate())
                .find(|k| want(first(k)))
                .expect("found within 10 000 tries")
        };
        let kx = keys_where(&|s| s != a_slot);
        let x = w.cert(&kx, "x", T0 + 2);
        let x_slot = first(&kx);
        let ky = keys_where(&|s| s == x_slot);
        let y = w.cert(&ky, "y", T0 + 3);
        for (k, c) in [(&kx, &x), (&ky, &y)] {
            m.ingest_cert(&c.raw, T0).unwrap();
            m.ingest_record(
                c.node_id,
                &World::record(k, 1, 0, vec!["192.0.2.9:1".parse().unwrap()]),
            )
            .unwrap();
        }
        let s = Snapshot::of(&m);
        assert_eq!(s.losers.len(), 1, "{:?}", s.losers);
        let l = &s.losers[0];
        assert_eq!(l.id, y.node_id, "the later certificate lost");
        assert_eq!(l.published, Some("192.0.2.9:1".parse().unwrap()));
        assert_eq!(l.winners.len(), 1);
        assert_eq!(l.winners[0].0, x.raw);
        assert_ne!(s.assignments[&y.node_id].slot, x_slot);
    }

    /// The view recomputes its snapshot only when the membership changed.
    #[test]
    fn the_snapshot_is_recomputed_only_after_a_change() {
        let w = World::new("10.210.0.0/16");
        let (m, members) = w.mesh(3);
        let mut v = super::super::view::View::new(m, std::time::Instant::now());
        assert!(v.refresh().is_none());
        assert!(v.tick(T0, false).unwrap().is_none());
        // Heartbeats of a live member change nothing; a liveness change does.
        v.m_mut()
            .set_liveness(members[1].1.node_id, Liveness::Alive, T0 + 5);
        assert!(v.refresh().is_none());
        v.m_mut()
            .set_liveness(members[1].1.node_id, Liveness::Dead, T0 + 5);
        let s = v.tick(T0 + 5, false).unwrap().expect("a new snapshot");
        assert!(!s.member(&members[1].1.node_id).unwrap().live());
        assert!(v.refresh().is_none());
    }
}
