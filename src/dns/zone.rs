//! The mesh zone as data: from members and services to DNS records. Pure: [`ZoneInput`] in,
//! records out, so every naming rule is unit-tested here.
//!
//! ```text
//! NODE.<domain>                      A    the node's .1
//! WORKLOAD.NODE.<domain>             A    a named workload of the node's /24
//! NAME.svc.<domain>                  A    every live provider of service NAME
//! NODE.NAME.svc.<domain>             A    one provider's address for NAME
//! _NAME._tcp.svc.<domain>            SRV  0 0 PORT NODE.NAME.svc.<domain>, one per provider
//! d.c.b.a.in-addr.arpa               PTR  NODE.<domain> (or the workload's, or the service
//!                                         instance name)
//! <domain>, reverse zones            SOA, NS
//! ```

use crate::id::MeshRange;
use hickory_server::proto::rr::rdata::{A, NS, PTR, SOA, SRV};
use hickory_server::proto::rr::{Name, RData, Record};
use hickory_server::proto::ProtoError;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

/// Longest service name: its SRV owner `_NAME` must still be a DNS label (63).
pub const MAX_SERVICE_NAME: usize = 62;

/// Longest part of a node name kept before a `-<6 hex>` suffix (63 - 7).
const MAX_BASE_BEFORE_SUFFIX: usize = 56;

/// TTL of every answer: membership changes within seconds, so answers must not linger.
pub const TTL: u32 = 5;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeEntry {
    /// The name the node answers to (unique in the mesh).
    pub name: String,
    pub ip: Ipv4Addr,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ServiceEntry {
    pub service: String,
    /// DNS name of the providing node.
    pub node: String,
    pub ip: Ipv4Addr,
    pub port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct WorkloadEntry {
    pub name: String,
    /// DNS name of its node.
    pub node: String,
    pub ip: Ipv4Addr,
}

/// Everything the zone is built from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ZoneInput {
    pub domain: String,
    pub range: MeshRange,
    /// DNS name of the node serving the zone (SOA/NS).
    pub serving: String,
    pub nodes: Vec<NodeEntry>,
    pub services: Vec<ServiceEntry>,
    pub workloads: Vec<WorkloadEntry>,
}

/// Records of the forward zone and of each reverse zone (by origin).
pub struct ZoneRecords {
    pub origin: Name,
    pub forward: Vec<Record>,
    pub reverse: BTreeMap<Name, Vec<Record>>,
    /// Entries left out because they make no valid DNS name (a name published by another
    /// node, too long under this domain): one bad entry never takes the zone down.
    pub skipped: Vec<String>,
}

/// `NAME.NODE`, how workload `name` of `node` is named under the mesh domain; `None` when it
/// cannot be (not a DNS label, or a node called `svc`, which would collide with the services).
pub fn workload_label(name: &str, node: &str) -> Option<String> {
    (node != "svc" && crate::util::is_dns_label(name)).then(|| format!("{name}.{node}"))
}

pub fn fqdn(s: &str) -> Result<Name, ProtoError> {
    let mut n = Name::from_ascii(s)?;
    n.set_fqdn(true);
    Ok(n)
}

/// `d.c.b.a.in-addr.arpa.`
pub fn reverse_name(ip: Ipv4Addr) -> Name {
    let o = ip.octets();
    fqdn(&format!("{}.{}.{}.{}.in-addr.arpa", o[3], o[2], o[1], o[0])).expect("valid reverse name")
}

/// The reverse zones that cover exactly the mesh range: one per /16 when the range is /16 or
/// wider, else one per /24 (so no PTR query outside the mesh is answered here).
pub fn reverse_origins(range: &MeshRange) -> Vec<Name> {
    let base = u32::from(range.base);
    let (step_bits, labels) = if range.prefix <= 16 { (16, 2) } else { (8, 3) };
    let count = 1u32 << (32 - step_bits - range.prefix as u32);
    (0..count)
        .map(|i| {
            let o = Ipv4Addr::from(base + (i << step_bits)).octets();
            let s = if labels == 2 {
                format!("{}.{}.in-addr.arpa", o[1], o[0])
            } else {
                format!("{}.{}.{}.in-addr.arpa", o[2], o[1], o[0])
            };
            fqdn(&s).expect("valid origin")
        })
        .collect()
}

/// The reverse origin holding `ip`, if it is in the mesh range.
pub fn reverse_origin_of(range: &MeshRange, ip: Ipv4Addr) -> Option<Name> {
    if !range.contains(ip) {
        return None;
    }
    let o = ip.octets();
    let s = if range.prefix <= 16 {
        format!("{}.{}.in-addr.arpa", o[1], o[0])
    } else {
        format!("{}.{}.{}.in-addr.arpa", o[2], o[1], o[0])
    };
    fqdn(&s).ok()
}

fn soa_ns(origin: &Name, mname: &Name, hostmaster: &Name, serial: u32) -> [Record; 2] {
    [
        Record::from_rdata(
            origin.clone(),
            TTL,
            RData::SOA(SOA::new(
                mname.clone(),
                hostmaster.clone(),
                serial,
                60,
                10,
                3600,
                TTL,
            )),
        ),
        Record::from_rdata(origin.clone(), TTL, RData::NS(NS(mname.clone()))),
    ]
}

pub fn build(input: &ZoneInput, serial: u32) -> Result<ZoneRecords, ProtoError> {
    let origin = fqdn(&input.domain)?;
    let under =
        |label: &str| -> Result<Name, ProtoError> { fqdn(&format!("{label}.{}", input.domain)) };
    // A node that is no member any more (it left; its own row is gone) still serves the
    // rest of the zone until it stops: the apex names the primary then.
    let mname = match input.serving.as_str() {
        "" => origin.clone(),
        serving => under(serving)?,
    };
    let hostmaster = under("hostmaster")?;
    let mut forward: Vec<Record> = soa_ns(&origin, &mname, &hostmaster, serial).into();
    let mut reverse: BTreeMap<Name, Vec<Record>> = reverse_origins(&input.range)
        .into_iter()
        .map(|o| {
            let v: Vec<Record> = soa_ns(&o, &mname, &hostmaster, serial).into();
            (o, v)
        })
        .collect();
    let mut ptr_done = std::collections::HashSet::new();
    let mut add_ptr = |ip: Ipv4Addr, target: &Name, reverse: &mut BTreeMap<Name, Vec<Record>>| {
        if let Some(o) = reverse_origin_of(&input.range, ip) {
            if ptr_done.insert(ip) {
                if let Some(v) = reverse.get_mut(&o) {
                    v.push(Record::from_rdata(
                        reverse_name(ip),
                        TTL,
                        RData::PTR(PTR(target.clone())),
                    ));
                }
            }
        }
    };
    let mut skipped = Vec::new();
    for n in &input.nodes {
        let name = match under(&n.name) {
            Ok(name) => name,
            Err(e) => {
                skipped.push(format!("node {:?}: {e}", n.name));
                continue;
            }
        };
        forward.push(Record::from_rdata(name.clone(), TTL, RData::A(A(n.ip))));
        add_ptr(n.ip, &name, &mut reverse);
    }
    for w in &input.workloads {
        let name = match workload_label(&w.name, &w.node) {
            Some(label) => under(&label),
            None => Err(ProtoError::from("not a DNS label under a node's name")),
        };
        match name {
            Ok(name) => {
                forward.push(Record::from_rdata(name.clone(), TTL, RData::A(A(w.ip))));
                add_ptr(w.ip, &name, &mut reverse);
            }
            Err(e) => skipped.push(format!("workload {:?} of node {:?}: {e}", w.name, w.node)),
        }
    }
    for s in &input.services {
        let names = (|| {
            if !crate::util::is_dns_label(&s.service) || s.service.len() > MAX_SERVICE_NAME {
                return Err(ProtoError::from(format!(
                    "not a DNS label of at most {MAX_SERVICE_NAME} characters"
                )));
            }
            Ok((
                under(&format!("{}.svc", s.service))?,
                under(&format!("{}.{}.svc", s.node, s.service))?,
                under(&format!("_{}._tcp.svc", s.service))?,
            ))
        })();
        let (svc, instance, srv) = match names {
            Ok(n) => n,
            Err(e) => {
                skipped.push(format!("service {:?} of node {:?}: {e}", s.service, s.node));
                continue;
            }
        };
        forward.push(Record::from_rdata(svc, TTL, RData::A(A(s.ip))));
        forward.push(Record::from_rdata(instance.clone(), TTL, RData::A(A(s.ip))));
        forward.push(Record::from_rdata(
            srv,
            TTL,
            RData::SRV(SRV::new(0, 10, s.port, instance.clone())),
        ));
        add_ptr(s.ip, &instance, &mut reverse);
    }
    Ok(ZoneRecords {
        origin,
        forward,
        reverse,
        skipped,
    })
}

/// Unique DNS names for members that may share a certificate name (two joins with the same
/// name through different seeds at the same moment): the earliest certificate (issued_at, then
/// node id) keeps the name; the others answer as `NAME-<first 6 hex digits of their node id>`.
pub fn unique_names<'a>(
    members: impl Iterator<Item = (&'a str, u64, String)>,
) -> BTreeMap<String, String> {
    let mut by_name: BTreeMap<&str, Vec<(u64, String)>> = BTreeMap::new();
    for (name, issued_at, id) in members {
        by_name.entry(name).or_default().push((issued_at, id));
    }
    let mut out = BTreeMap::new();
    for (name, mut v) in by_name {
        v.sort();
        for (i, (_, id)) in v.into_iter().enumerate() {
            let dns = if i == 0 {
                name.to_string()
            } else {
                let base = &name[..name.len().min(MAX_BASE_BEFORE_SUFFIX)];
                format!("{base}-{}", &id[..6.min(id.len())])
            };
            out.insert(id, dns);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_server::proto::rr::RecordType;

    fn input() -> ZoneInput {
        ZoneInput {
            domain: "mesh.internal".into(),
            range: "10.210.0.0/16".parse().unwrap(),
            serving: "db1".into(),
            nodes: vec![
                NodeEntry {
                    name: "db1".into(),
                    ip: Ipv4Addr::new(10, 210, 4, 1),
                },
                NodeEntry {
                    name: "web1".into(),
                    ip: Ipv4Addr::new(10, 210, 9, 1),
                },
            ],
            services: vec![
                ServiceEntry {
                    service: "api".into(),
                    node: "db1".into(),
                    ip: Ipv4Addr::new(10, 210, 4, 1),
                    port: 8080,
                },
                ServiceEntry {
                    service: "api".into(),
                    node: "web1".into(),
                    ip: Ipv4Addr::new(10, 210, 9, 7),
                    port: 9090,
                },
            ],
            workloads: vec![WorkloadEntry {
                name: "pg".into(),
                node: "db1".into(),
                ip: Ipv4Addr::new(10, 210, 4, 20),
            }],
        }
    }

    fn find<'a>(rs: &'a [Record], name: &str, t: RecordType) -> Vec<&'a Record> {
        let n = fqdn(name).unwrap();
        rs.iter()
            .filter(|r| r.name == n && r.record_type() == t)
            .collect()
    }

    /// The zone of a node that just left (no row of its own): built, with the apex as SOA
    /// primary, not an error logged at every update until it stops.
    #[test]
    fn a_node_without_a_name_of_its_own_still_builds_the_zone() {
        let mut i = input();
        i.serving.clear();
        let z = build(&i, 7).unwrap();
        let soa = find(&z.forward, "mesh.internal", RecordType::SOA);
        match &soa[0].data {
            RData::SOA(s) => assert_eq!(&s.mname, &fqdn("mesh.internal").unwrap()),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            find(&z.forward, "db1.mesh.internal", RecordType::A).len(),
            1
        );
    }

    #[test]
    fn nodes_services_and_pointers() {
        let z = build(&input(), 7).unwrap();
        assert_eq!(z.origin, fqdn("mesh.internal").unwrap());
        let a = find(&z.forward, "db1.mesh.internal", RecordType::A);
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].data, RData::A(A(Ipv4Addr::new(10, 210, 4, 1))));
        assert_eq!(a[0].ttl, TTL);
        assert_eq!(
            find(&z.forward, "api.svc.mesh.internal", RecordType::A).len(),
            2
        );
        let srv = find(&z.forward, "_api._tcp.svc.mesh.internal", RecordType::SRV);
        let ports: Vec<u16> = srv
            .iter()
            .map(|r| match &r.data {
                RData::SRV(s) => s.port,
                _ => 0,
            })
            .collect();
        assert!(ports.contains(&8080) && ports.contains(&9090));
        // SRV targets resolve in the zone.
        assert_eq!(
            find(&z.forward, "web1.api.svc.mesh.internal", RecordType::A).len(),
            1
        );
        // PTR for node addresses and the container address.
        let rev = &z.reverse[&fqdn("210.10.in-addr.arpa").unwrap()];
        let ptr = find(rev, "1.4.210.10.in-addr.arpa", RecordType::PTR);
        assert_eq!(
            ptr[0].data,
            RData::PTR(PTR(fqdn("db1.mesh.internal").unwrap()))
        );
        assert_eq!(
            find(rev, "7.9.210.10.in-addr.arpa", RecordType::PTR).len(),
            1
        );
        assert_eq!(find(&z.forward, "mesh.internal", RecordType::SOA).len(), 1);
        // A workload under its node's name, both ways.
        let w = find(&z.forward, "pg.db1.mesh.internal", RecordType::A);
        assert_eq!(w[0].data, RData::A(A(Ipv4Addr::new(10, 210, 4, 20))));
        assert_eq!(
            find(rev, "20.4.210.10.in-addr.arpa", RecordType::PTR)[0].data,
            RData::PTR(PTR(fqdn("pg.db1.mesh.internal").unwrap()))
        );
        // A workload of a node named `svc` would shadow services: left out, said why.
        let mut bad = input();
        bad.workloads[0].node = "svc".into();
        let z = build(&bad, 7).unwrap();
        assert!(find(&z.forward, "pg.svc.mesh.internal", RecordType::A).is_empty());
        assert_eq!(z.skipped.len(), 1);
    }

    #[test]
    fn reverse_zones_cover_exactly_the_range() {
        let o = reverse_origins(&"10.210.0.0/16".parse().unwrap());
        assert_eq!(o, vec![fqdn("210.10.in-addr.arpa").unwrap()]);
        let o = reverse_origins(&"10.128.0.0/15".parse().unwrap());
        assert_eq!(o.len(), 2);
        assert_eq!(o[1], fqdn("129.10.in-addr.arpa").unwrap());
        let o = reverse_origins(&"10.0.16.0/20".parse().unwrap());
        assert_eq!(o.len(), 16);
        assert_eq!(o[0], fqdn("16.0.10.in-addr.arpa").unwrap());
        assert_eq!(
            reverse_origin_of(
                &"10.0.16.0/20".parse().unwrap(),
                Ipv4Addr::new(10, 0, 17, 3)
            ),
            Some(fqdn("17.0.10.in-addr.arpa").unwrap())
        );
        assert_eq!(
            reverse_origin_of(
                &"10.0.16.0/20".parse().unwrap(),
                Ipv4Addr::new(10, 0, 32, 3)
            ),
            None
        );
    }

    #[test]
    fn duplicate_names_go_to_the_earliest_certificate() {
        let names = unique_names(
            [
                ("db", 20, "bbbbbbbbbbbbbbbb".to_string()),
                ("db", 10, "aaaaaaaaaaaaaaaa".to_string()),
                ("web", 5, "cccccccccccccccc".to_string()),
            ]
            .iter()
            .map(|(n, t, id)| (*n, *t, id.clone())),
        );
        assert_eq!(names["aaaaaaaaaaaaaaaa"], "db");
        assert_eq!(names["bbbbbbbbbbbbbbbb"], "db-bbbbbb");
        assert_eq!(names["cccccccccccccccc"], "web");

        // A 63-character name still makes a valid label with its suffix.
        let long = "x".repeat(63);
        let names = unique_names(
            [
                (long.as_str(), 1, "aa".repeat(8)),
                (long.as_str(), 2, "bb".repeat(8)),
            ]
            .into_iter(),
        );
        let second = &names[&"bb".repeat(8)];
        assert_eq!(second.len(), 63);
        assert!(crate::util::is_dns_label(second), "{second}");
    }

    /// A name another node published that makes no valid DNS name is left out (and reported);
    /// everything else is still served.
    #[test]
    fn bad_entries_are_skipped_not_fatal() {
        let mut i = input();
        i.nodes.push(NodeEntry {
            name: "y".repeat(70),
            ip: Ipv4Addr::new(10, 210, 5, 1),
        });
        i.services.push(ServiceEntry {
            service: "s".repeat(63),
            node: "db1".into(),
            ip: Ipv4Addr::new(10, 210, 4, 1),
            port: 1,
        });
        i.services.push(ServiceEntry {
            service: "Bad_Name".into(),
            node: "db1".into(),
            ip: Ipv4Addr::new(10, 210, 4, 1),
            port: 1,
        });
        let z = build(&i, 1).unwrap();
        assert_eq!(z.skipped.len(), 3, "{:?}", z.skipped);
        assert!(z.skipped[0].contains("yyy"), "{:?}", z.skipped);
        // The good entries are all there.
        assert_eq!(
            find(&z.forward, "db1.mesh.internal.", RecordType::A).len(),
            1
        );
        assert_eq!(
            find(&z.forward, "web1.mesh.internal.", RecordType::A).len(),
            1
        );
        assert_eq!(
            find(&z.forward, "_api._tcp.svc.mesh.internal.", RecordType::SRV).len(),
            2
        );
        // The longest service name that fits works, SRV owner included.
        let mut i = input();
        i.services[0].service = "s".repeat(MAX_SERVICE_NAME);
        let z = build(&i, 1).unwrap();
        assert!(z.skipped.is_empty(), "{:?}", z.skipped);
    }
}
