//! hickory-server on the node's mesh address, port 53, UDP and TCP, with sockets bound to the
//! TUN device: queries from this host and through the tunnels are answered, packets for the
//! mesh address arriving from the underlay never reach it.
//!
//! The catalog holds the mesh zone and its reverse zones as [`LiveZone`]s: hickory's own
//! in-memory zone handler, rebuilt from membership and swapped in whole, so answers follow
//! membership without restarting the server. Everything else goes to hickory's forwarder.

use super::fast;
use super::zone::{self, ZoneInput};
use hickory_server::proto::rr::{LowerName, Name, RecordType};
use hickory_server::resolver::config::{ConnectionConfig, NameServerConfig, ResolverOpts};
use hickory_server::server::{Request, RequestInfo};
use hickory_server::store::forwarder::{ForwardConfig, ForwardZoneHandler};
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{
    AuthLookup, AxfrPolicy, Catalog, LookupControlFlow, LookupOptions, ZoneHandler, ZoneType,
};
use hickory_server::Server;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tracing::{debug, info, warn};

/// A zone whose contents are replaced wholesale.
pub struct LiveZone {
    origin: LowerName,
    inner: RwLock<Arc<InMemoryZoneHandler>>,
}

impl LiveZone {
    fn new(origin: &Name) -> LiveZone {
        LiveZone {
            origin: LowerName::new(origin),
            inner: RwLock::new(Arc::new(InMemoryZoneHandler::empty(
                origin.clone(),
                ZoneType::Primary,
                AxfrPolicy::Deny,
            ))),
        }
    }

    fn replace(&self, records: Vec<hickory_server::proto::rr::Record>, serial: u32) {
        let mut z = InMemoryZoneHandler::empty(
            Name::from(&self.origin),
            ZoneType::Primary,
            AxfrPolicy::Deny,
        );
        for r in records {
            z.upsert_mut(r, serial);
        }
        *self.inner.write().unwrap() = Arc::new(z);
    }

    fn current(&self) -> Arc<InMemoryZoneHandler> {
        self.inner.read().unwrap().clone()
    }
}

#[async_trait::async_trait]
impl ZoneHandler for LiveZone {
    fn zone_type(&self) -> ZoneType {
        ZoneType::Primary
    }

    fn axfr_policy(&self) -> AxfrPolicy {
        AxfrPolicy::Deny
    }

    fn origin(&self) -> &LowerName {
        &self.origin
    }

    async fn lookup(
        &self,
        name: &LowerName,
        rtype: RecordType,
        request_info: Option<&RequestInfo<'_>>,
        lookup_options: LookupOptions,
    ) -> LookupControlFlow<AuthLookup> {
        self.current()
            .lookup(name, rtype, request_info, lookup_options)
            .await
    }

    async fn search(
        &self,
        request: &Request,
        lookup_options: LookupOptions,
    ) -> (
        LookupControlFlow<AuthLookup>,
        Option<hickory_server::proto::rr::TSigResponseContext>,
    ) {
        self.current().search(request, lookup_options).await
    }

    async fn nsec_records(
        &self,
        name: &LowerName,
        lookup_options: LookupOptions,
    ) -> LookupControlFlow<AuthLookup> {
        self.current().nsec_records(name, lookup_options).await
    }
}

/// The catalog, with every answer counted by its response code (metrics).
#[derive(Clone)]
pub struct Counted(Arc<Catalog>);

#[async_trait::async_trait]
impl hickory_server::server::RequestHandler for Counted {
    async fn handle_request<
        R: hickory_server::server::ResponseHandler,
        T: hickory_server::net::runtime::Time,
    >(
        &self,
        request: &Request,
        response_handle: R,
    ) -> hickory_server::server::ResponseInfo {
        let info = self
            .0
            .handle_request::<R, T>(request, response_handle)
            .await;
        crate::metrics::dns_answer(u16::from(info.response_code));
        info
    }
}

/// A running mesh DNS server.
pub struct DnsServer {
    forward: Arc<LiveZone>,
    reverse: Vec<(Name, Arc<LiveZone>)>,
    /// TCP (hickory's server).
    server: Server<Counted>,
    /// UDP: prepared answers for the zone, hickory for the rest ([`fast`]).
    handler: Counted,
    answers: Arc<fast::Answers>,
    udp: Vec<tokio::task::JoinHandle<()>>,
    pub listen: SocketAddr,
    pub upstreams: Vec<SocketAddr>,
    serial: u32,
    /// What the last build left out, so it is logged when it changes, not on every update.
    skipped: Vec<String>,
}

/// Why mesh DNS could not serve.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("binding DNS to {what} on {ifname}: {error}")]
    Bind {
        what: String,
        ifname: String,
        error: std::io::Error,
    },
    #[error("building the mesh zone: {0}")]
    Zone(String),
    #[error("DNS forwarder: {0}")]
    Forwarder(String),
}

impl DnsServer {
    /// Serve the mesh zone on `ip:port`, bound to `ifname` (and to each of `also_on`),
    /// forwarding other names upstream.
    pub async fn start(
        ip: Ipv4Addr,
        port: u16,
        ifname: &str,
        also_on: &[&str],
        input: &ZoneInput,
        upstreams: Vec<SocketAddr>,
    ) -> Result<DnsServer, DnsError> {
        let origin = zone::fqdn(&input.domain).map_err(|e| DnsError::Zone(e.to_string()))?;
        let forward = Arc::new(LiveZone::new(&origin));
        let reverse: Vec<(Name, Arc<LiveZone>)> = zone::reverse_origins(&input.range)
            .into_iter()
            .map(|o| {
                let z = Arc::new(LiveZone::new(&o));
                (o, z)
            })
            .collect();
        let mut catalog = Catalog::new();
        catalog.upsert(
            LowerName::new(&origin),
            vec![forward.clone() as Arc<dyn ZoneHandler>],
        );
        for (o, z) in &reverse {
            catalog.upsert(LowerName::new(o), vec![z.clone() as Arc<dyn ZoneHandler>]);
        }
        if !upstreams.is_empty() {
            catalog.upsert(
                LowerName::new(&Name::root()),
                vec![Arc::new(forwarder(&upstreams)?) as Arc<dyn ZoneHandler>],
            );
        }
        let want = SocketAddr::from((ip, port));
        let handler = Counted(Arc::new(catalog));
        let answers = Arc::new(fast::Answers::default());
        let mut udp_tasks = Vec::new();
        let mut server = Server::new(handler.clone());
        let mut listen = want;
        // The same address on each device (the TUN, the workloads' bridge): a socket bound to
        // a device only hears what came through it.
        for (i, ifname) in std::iter::once(ifname)
            .chain(also_on.iter().copied())
            .enumerate()
        {
            let bind = |what: String| {
                let ifname = ifname.to_string();
                move |error| DnsError::Bind {
                    what,
                    ifname,
                    error,
                }
            };
            let at = if i == 0 { want } else { listen };
            let udp = crate::mesh::linux::bind_udp_on_device(at, ifname)
                .map_err(bind(format!("{at}/udp")))?;
            // Port 0 (tests): TCP and the other devices take the port UDP got.
            listen = udp.local_addr().map_err(bind(format!("{at}/udp")))?;
            let tcp = crate::mesh::linux::bind_tcp_on_device(listen, ifname)
                .map_err(bind(format!("{listen}/tcp")))?;
            let udp =
                tokio::net::UdpSocket::from_std(udp).map_err(bind(format!("{listen}/udp")))?;
            udp_tasks.push(tokio::spawn(fast::serve(
                udp,
                handler.clone(),
                answers.clone(),
            )));
            server.register_listener(
                tokio::net::TcpListener::from_std(tcp).map_err(bind(format!("{listen}/tcp")))?,
                Duration::from_secs(5),
                32,
            );
        }
        let mut s = DnsServer {
            forward,
            reverse,
            server,
            handler,
            answers,
            udp: udp_tasks,
            listen,
            upstreams,
            serial: 0,
            skipped: Vec::new(),
        };
        s.update(input)?;
        info!(listen = %listen, domain = %input.domain, upstreams = ?s.upstreams, "mesh DNS serving");
        Ok(s)
    }

    /// Replace the zone contents.
    pub fn update(&mut self, input: &ZoneInput) -> Result<(), DnsError> {
        self.serial = self
            .serial
            .wrapping_add(1)
            .max(crate::util::unix_now() as u32);
        let z = zone::build(input, self.serial).map_err(|e| DnsError::Zone(e.to_string()))?;
        if z.skipped != self.skipped {
            for s in &z.skipped {
                warn!("left out of mesh DNS: {s}");
            }
            self.skipped = z.skipped.clone();
        }
        // Prepared answers from the old zone go first, so none is served stale; the new ones
        // are asked of the new zone off the runtime and installed unless it changed again.
        let generation = self.answers.invalidate();
        let mut records = z.forward.clone();
        records.extend(z.reverse.values().flatten().cloned());
        self.forward.replace(z.forward, self.serial);
        for (o, live) in &self.reverse {
            live.replace(z.reverse.get(o).cloned().unwrap_or_default(), self.serial);
        }
        let (handler, answers) = (self.handler.clone(), self.answers.clone());
        tokio::task::spawn_blocking(move || {
            let refs: Vec<_> = records.iter().collect();
            let Some(p) = fast::prepare(&handler, &refs, || answers.is_current(generation)) else {
                return;
            };
            let n = p.len();
            if answers.install(generation, p) {
                debug!(answers = n, "mesh DNS answers prepared");
            }
        });
        debug!(
            serial = self.serial,
            nodes = input.nodes.len(),
            services = input.services.len(),
            "zone updated"
        );
        Ok(())
    }

    /// Whether the zone's answers are prepared (tests; a query is answered either way).
    pub fn prepared(&self) -> usize {
        self.answers.get().len()
    }

    /// UDP queries answered from prepared answers so far (tests).
    pub fn prepared_hits(&self) -> u64 {
        self.answers.hits()
    }

    pub async fn stop(mut self) {
        for t in std::mem::take(&mut self.udp) {
            t.abort();
            let _ = t.await;
        }
        let _ = self.server.shutdown_gracefully().await;
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        for t in &self.udp {
            t.abort();
        }
    }
}

fn forwarder(upstreams: &[SocketAddr]) -> Result<ForwardZoneHandler, DnsError> {
    let name_servers = upstreams
        .iter()
        .map(|u| {
            NameServerConfig::new(
                u.ip(),
                true,
                [ConnectionConfig::udp(), ConnectionConfig::tcp()]
                    .into_iter()
                    .map(|mut c| {
                        c.port = u.port();
                        c
                    })
                    .collect(),
            )
        })
        .collect();
    let mut opts = ResolverOpts::default();
    opts.timeout = Duration::from_secs(2);
    opts.attempts = 2;
    ForwardZoneHandler::builder_tokio(ForwardConfig {
        name_servers,
        options: Some(opts),
    })
    .build()
    .map_err(|e| DnsError::Forwarder(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::zone::{NodeEntry, ServiceEntry};
    use hickory_server::proto::op::{Message, Query, ResponseCode};
    use hickory_server::proto::rr::RData;

    fn input(domain: &str) -> ZoneInput {
        ZoneInput {
            domain: domain.into(),
            range: "10.210.0.0/16".parse().unwrap(),
            serving: "a".into(),
            nodes: vec![NodeEntry {
                name: "a".into(),
                ip: Ipv4Addr::new(10, 210, 1, 1),
            }],
            services: vec![ServiceEntry {
                service: "web".into(),
                node: "a".into(),
                ip: Ipv4Addr::new(10, 210, 1, 1),
                port: 8080,
            }],
            workloads: vec![],
        }
    }

    async fn ask(server: SocketAddr, name: &str, t: RecordType) -> Message {
        let mut m = Message::query();
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(zone::fqdn(name).unwrap(), t));
        let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let bytes = m.to_vec().unwrap();
        let mut buf = vec![0u8; 4096];
        for _ in 0..5 {
            sock.send_to(&bytes, server).await.unwrap();
            if let Ok(Ok((n, _))) =
                tokio::time::timeout(Duration::from_secs(2), sock.recv_from(&mut buf)).await
            {
                return Message::from_vec(&buf[..n]).unwrap();
            }
        }
        panic!("no answer from {server} for {name}");
    }

    fn a_records(m: &Message) -> Vec<Ipv4Addr> {
        m.answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(a.0),
                _ => None,
            })
            .collect()
    }

    async fn wait_prepared(s: &DnsServer) {
        for _ in 0..200 {
            if s.prepared() > 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("answers never prepared");
    }

    async fn raw_udp(server: SocketAddr, q: &[u8]) -> Vec<u8> {
        let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut buf = vec![0u8; 4096];
        for _ in 0..5 {
            sock.send_to(q, server).await.unwrap();
            if let Ok(Ok((n, _))) =
                tokio::time::timeout(Duration::from_secs(2), sock.recv_from(&mut buf)).await
            {
                return buf[..n].to_vec();
            }
        }
        panic!("no UDP answer from {server}");
    }

    /// hickory's own server (TCP) for the same query.
    async fn raw_tcp(server: SocketAddr, q: &[u8]) -> Vec<u8> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut t = tokio::net::TcpStream::connect(server).await.unwrap();
        t.write_all(&(q.len() as u16).to_be_bytes()).await.unwrap();
        t.write_all(q).await.unwrap();
        let mut len = [0u8; 2];
        t.read_exact(&mut len).await.unwrap();
        let mut b = vec![0u8; u16::from_be_bytes(len) as usize];
        t.read_exact(&mut b).await.unwrap();
        b
    }

    /// The prepared UDP answers are hickory's answers: the same message as its TCP server
    /// gives, with the client's ID, RD bit, EDNS payload and the question's case.
    #[tokio::test]
    async fn prepared_answers_are_hickorys() {
        let mut i = input("mesh.internal");
        i.nodes.push(NodeEntry {
            name: "b".into(),
            ip: Ipv4Addr::new(10, 210, 2, 1),
        });
        let s = DnsServer::start(Ipv4Addr::LOCALHOST, 0, "lo", &[], &i, vec![])
            .await
            .unwrap();
        wait_prepared(&s).await;
        let cases = [
            ("A.Mesh.INTERNAL.", RecordType::A),
            ("web.svc.mesh.internal.", RecordType::A),
            ("_web._tcp.svc.mesh.internal.", RecordType::SRV),
            ("1.1.210.10.in-addr.arpa.", RecordType::PTR),
            ("mesh.internal.", RecordType::SOA),
            ("mesh.internal.", RecordType::NS),
            ("nope.mesh.internal.", RecordType::A),
            ("a.mesh.internal.", RecordType::TXT),
        ];
        for (n, (name, t)) in cases.into_iter().enumerate() {
            for (edns, rd) in [(None, true), (Some(4000u16), true), (None, false)] {
                let mut m = Message::query();
                m.metadata.id = 0x1000 + n as u16;
                m.metadata.recursion_desired = rd;
                m.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
                if let Some(p) = edns {
                    let mut e = hickory_server::proto::op::Edns::new();
                    e.set_max_payload(p);
                    m.set_edns(e);
                }
                let q = m.to_vec().unwrap();
                let hits = s.prepared_hits();
                let udp = raw_udp(s.listen, &q).await;
                // Names and types the zone holds are prepared; the rest is hickory's.
                let prepared = !name.starts_with("nope") && t != RecordType::TXT;
                assert_eq!(s.prepared_hits() > hits, prepared, "{name} {t}");
                let tcp = raw_tcp(s.listen, &q).await;
                assert_eq!(
                    Message::from_vec(&udp).unwrap(),
                    Message::from_vec(&tcp).unwrap(),
                    "{name} {t} edns {edns:?} rd {rd}"
                );
                // The question exactly as asked (case kept).
                assert_eq!(&udp[12..12 + name.len() + 1], &q[12..12 + name.len() + 1]);
            }
        }
        // A prepared answer is never one from an older zone.
        let mut j = i.clone();
        j.nodes[1].ip = Ipv4Addr::new(10, 210, 3, 1);
        let mut s = s;
        s.update(&j).unwrap();
        let r = ask(s.listen, "b.mesh.internal", RecordType::A).await;
        assert_eq!(a_records(&r), vec![Ipv4Addr::new(10, 210, 3, 1)]);
        wait_prepared(&s).await;
        let r = ask(s.listen, "b.mesh.internal", RecordType::A).await;
        assert_eq!(a_records(&r), vec![Ipv4Addr::new(10, 210, 3, 1)]);
        s.stop().await;
    }

    /// A build of prepared answers for a zone that has changed again stops early.
    #[tokio::test]
    async fn a_build_for_an_older_zone_stops() {
        let i = input("mesh.internal");
        let s = DnsServer::start(Ipv4Addr::LOCALHOST, 0, "lo", &[], &i, vec![])
            .await
            .unwrap();
        let z = zone::build(&i, 1).unwrap();
        let refs: Vec<_> = z.forward.iter().collect();
        assert!(fast::prepare(&s.handler, &refs, || false).is_none());
        assert!(!fast::prepare(&s.handler, &refs, || true)
            .unwrap()
            .is_empty());
        s.stop().await;
    }

    #[tokio::test]
    async fn answers_the_zone_forwards_the_rest_and_survives_garbage() {
        let lo = Ipv4Addr::LOCALHOST;
        // An "upstream" for another domain: a second server.
        let mut up_input = input("example.test");
        up_input.nodes[0] = NodeEntry {
            name: "www".into(),
            ip: Ipv4Addr::new(203, 0, 113, 7),
        };
        up_input.range = "10.99.0.0/16".parse().unwrap();
        let upstream = DnsServer::start(lo, 0, "lo", &[], &up_input, vec![])
            .await
            .unwrap();
        let mut s = DnsServer::start(
            lo,
            0,
            "lo",
            &[],
            &input("mesh.internal"),
            vec![upstream.listen],
        )
        .await
        .unwrap();

        wait_prepared(&s).await;
        let r = ask(s.listen, "a.mesh.internal", RecordType::A).await;
        assert_eq!(a_records(&r), vec![Ipv4Addr::new(10, 210, 1, 1)]);
        assert!(r.metadata.authoritative);
        let r = ask(s.listen, "_web._tcp.svc.mesh.internal", RecordType::SRV).await;
        assert!(matches!(&r.answers[0].data, RData::SRV(srv) if srv.port == 8080));
        let r = ask(s.listen, "1.1.210.10.in-addr.arpa", RecordType::PTR).await;
        assert!(
            matches!(&r.answers[0].data, RData::PTR(p) if p.0 == zone::fqdn("a.mesh.internal").unwrap())
        );
        let r = ask(s.listen, "nope.mesh.internal", RecordType::A).await;
        assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
        let r = ask(s.listen, "www.example.test", RecordType::A).await;
        assert_eq!(
            a_records(&r),
            vec![Ipv4Addr::new(203, 0, 113, 7)],
            "forwarded upstream"
        );

        // Garbage and truncated queries, over UDP and TCP, then a good query.
        let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let good = {
            let mut m = Message::query();
            m.add_query(Query::query(
                zone::fqdn("a.mesh.internal").unwrap(),
                RecordType::A,
            ));
            m.to_vec().unwrap()
        };
        for junk in [
            vec![],
            vec![0u8; 3],
            vec![0xff; 512],
            good[..good.len() - 3].to_vec(),
        ] {
            sock.send_to(&junk, s.listen).await.unwrap();
        }
        use tokio::io::AsyncWriteExt;
        let mut t = tokio::net::TcpStream::connect(s.listen).await.unwrap();
        t.write_all(&[0, 40, 1, 2, 3]).await.unwrap();
        drop(t);

        // Membership changed: the new zone is served.
        let mut i = input("mesh.internal");
        i.nodes.push(NodeEntry {
            name: "b".into(),
            ip: Ipv4Addr::new(10, 210, 2, 1),
        });
        i.services.clear();
        s.update(&i).unwrap();
        let r = ask(s.listen, "b.mesh.internal", RecordType::A).await;
        assert_eq!(a_records(&r), vec![Ipv4Addr::new(10, 210, 2, 1)]);
        let r = ask(s.listen, "web.svc.mesh.internal", RecordType::A).await;
        assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
        s.stop().await;
        upstream.stop().await;
    }
}
