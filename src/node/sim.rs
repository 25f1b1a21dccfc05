//! The in-memory twin of [`super::platform::LinuxPlatform`], and multi-node scenarios on it
//! (DESIGN "Testing": fast multi-node scenarios without root).
//!
//! Each simulated machine has an in-memory TUN device whose kernel side is a small task here,
//! an in-memory UDP socket on a shared [`MemNet`] underlay (links can be cut: partitions), and a
//! gossip transport that, like the real one, rides the tunnels: every chitchat datagram becomes
//! a UDP packet to the peer's mesh address, written into the node's TUN device, encrypted by the
//! node's own data plane, and delivered from the receiving node's TUN to its gossip socket.
//! (chitchat's envelope codec is private, so the packet carries a handle to the envelope.)

use super::platform::Platform;
use super::setup::{self, InitParams, JoinParams};
use super::{Exit, NodeOptions};
use crate::control::client::Client;
use crate::control::StatusReport;
use crate::mesh::addressing::MeshRange;
use crate::mesh::io::{MemNet, MemTun, MemUdp};
use crate::mesh::packet::{build_ipv4_udp, ipv4_dst, ipv4_src};
use crate::state::StateDir;
use crate::trust::{NodeKeys, Token};
use async_trait::async_trait;
use chitchat::transport::{RecvOutcome, SendOutcome, Socket, Transport};
use chitchat::ChitchatEnvelope;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const GOSSIP: u16 = crate::constants::GOSSIP_PORT;

/// Envelopes in flight, by the handle their packet carries.
#[derive(Default)]
struct Envelopes {
    next: AtomicU64,
    map: Mutex<HashMap<u64, ChitchatEnvelope>>,
}

/// The kernel side of one machine's TUN device.
#[derive(Default)]
struct Kernel {
    inject: Mutex<Option<mpsc::Sender<Vec<u8>>>>,
    gossip_inbox: Mutex<Option<mpsc::Sender<RecvOutcome>>>,
    other: Mutex<Option<mpsc::UnboundedSender<Vec<u8>>>>,
    addr: Mutex<Option<Ipv4Addr>>,
}

pub struct SimPlatform {
    net: MemNet,
    host: IpAddr,
    envelopes: Arc<Envelopes>,
    kernel: Arc<Kernel>,
    /// Packets the node delivered to its TUN that were not gossip (what a test sent).
    received: Mutex<Option<mpsc::UnboundedReceiver<Vec<u8>>>>,
}

impl SimPlatform {
    fn new(net: MemNet, host: IpAddr, envelopes: Arc<Envelopes>) -> SimPlatform {
        SimPlatform {
            net,
            host,
            envelopes,
            kernel: Arc::new(Kernel::default()),
            received: Mutex::new(None),
        }
    }

    /// The node's current mesh address.
    pub fn mesh_ip(&self) -> Option<Ipv4Addr> {
        *self.kernel.addr.lock().unwrap()
    }
}

impl Platform for SimPlatform {
    type Tun = MemTun;
    type Udp = MemUdp;

    fn bind_udp(&self, port: u16) -> anyhow::Result<MemUdp> {
        Ok(self.net.bind(SocketAddr::new(self.host, port))?)
    }

    async fn create_tun(
        &self,
        _name: &str,
        addr: Ipv4Addr,
        _prefix: u8,
        _mtu: u16,
    ) -> anyhow::Result<(MemTun, u32)> {
        let (tun, mut handle) = MemTun::new();
        let (other_tx, other_rx) = mpsc::unbounded_channel();
        *self.kernel.inject.lock().unwrap() = Some(handle.inject.clone());
        *self.kernel.other.lock().unwrap() = Some(other_tx);
        *self.kernel.addr.lock().unwrap() = Some(addr);
        *self.received.lock().unwrap() = Some(other_rx);
        let kernel = self.kernel.clone();
        let envelopes = self.envelopes.clone();
        tokio::spawn(async move {
            while let Some(p) = handle.delivered.recv().await {
                let (Some(src), Some(_dst)) = (ipv4_src(&p), ipv4_dst(&p)) else {
                    continue;
                };
                let is_gossip =
                    p.len() >= 36 && p[9] == 17 && u16::from_be_bytes([p[22], p[23]]) == GOSSIP;
                if !is_gossip {
                    if let Some(tx) = kernel.other.lock().unwrap().as_ref() {
                        let _ = tx.send(p);
                    }
                    continue;
                }
                let id = u64::from_be_bytes(p[28..36].try_into().expect("8 bytes"));
                let Some(envelope) = envelopes.map.lock().unwrap().remove(&id) else {
                    continue;
                };
                let inbox = kernel.gossip_inbox.lock().unwrap().clone();
                if let Some(inbox) = inbox {
                    let _ = inbox.try_send(RecvOutcome {
                        from_addr: SocketAddr::from((src, GOSSIP)),
                        envelope,
                        num_bytes_received: p.len(),
                    });
                }
            }
        });
        Ok((tun, 1))
    }

    async fn readdress(&self, _index: u32, addr: Ipv4Addr, _prefix: u8) -> anyhow::Result<()> {
        *self.kernel.addr.lock().unwrap() = Some(addr);
        Ok(())
    }

    fn gossip_transport(&self, _tun: &str) -> Box<dyn Transport> {
        Box::new(TunnelledGossip {
            kernel: self.kernel.clone(),
            envelopes: self.envelopes.clone(),
        })
    }

    fn local_addresses(&self, _tun: &str, _range: &MeshRange) -> Vec<IpAddr> {
        vec![self.host]
    }

    fn host_services(&self) -> bool {
        false
    }
}

struct TunnelledGossip {
    kernel: Arc<Kernel>,
    envelopes: Arc<Envelopes>,
}

#[async_trait]
impl Transport for TunnelledGossip {
    async fn open(&self, listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        let (tx, rx) = mpsc::channel(1024);
        *self.kernel.gossip_inbox.lock().unwrap() = Some(tx);
        Ok(Box::new(TunnelledSocket {
            addr: listen_addr,
            kernel: self.kernel.clone(),
            envelopes: self.envelopes.clone(),
            rx,
        }))
    }
}

struct TunnelledSocket {
    addr: SocketAddr,
    kernel: Arc<Kernel>,
    envelopes: Arc<Envelopes>,
    rx: mpsc::Receiver<RecvOutcome>,
}

#[async_trait]
impl Socket for TunnelledSocket {
    fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.addr)
    }

    async fn send(
        &mut self,
        to: SocketAddr,
        envelope: ChitchatEnvelope,
    ) -> anyhow::Result<SendOutcome> {
        let (IpAddr::V4(src), IpAddr::V4(dst)) = (self.addr.ip(), to.ip()) else {
            return Ok(SendOutcome { num_bytes_sent: 0 });
        };
        let id = self.envelopes.next.fetch_add(1, Ordering::Relaxed);
        self.envelopes.map.lock().unwrap().insert(id, envelope);
        let packet = build_ipv4_udp(src, dst, GOSSIP, GOSSIP, &id.to_be_bytes());
        let inject = self.kernel.inject.lock().unwrap().clone();
        if let Some(inject) = inject {
            let _ = inject.try_send(packet);
        }
        Ok(SendOutcome { num_bytes_sent: 36 })
    }

    async fn recv(&mut self) -> anyhow::Result<RecvOutcome> {
        self.rx
            .recv()
            .await
            .ok_or_else(|| anyhow::anyhow!("gossip socket closed"))
    }
}

/// A simulated machine running meshd.
struct SimNode {
    platform: Arc<SimPlatform>,
    opts: NodeOptions,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<anyhow::Result<Exit>>>,
}

/// Several machines on one in-memory underlay.
pub struct Sim {
    net: MemNet,
    envelopes: Arc<Envelopes>,
    dir: tempfile::TempDir,
    nodes: Vec<SimNode>,
}

impl Default for Sim {
    fn default() -> Sim {
        Sim::new()
    }
}

impl Sim {
    pub fn new() -> Sim {
        Sim {
            net: MemNet::new(),
            envelopes: Arc::default(),
            dir: tempfile::tempdir().expect("tempdir"),
            nodes: Vec::new(),
        }
    }

    fn host(i: usize) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(192, 0, 2, i as u8 + 1))
    }

    pub fn endpoint(i: usize) -> SocketAddr {
        SocketAddr::new(Sim::host(i), 51820)
    }

    fn machine(&mut self) -> (usize, Arc<SimPlatform>, NodeOptions) {
        let i = self.nodes.len();
        let platform = Arc::new(SimPlatform::new(
            self.net.clone(),
            Sim::host(i),
            self.envelopes.clone(),
        ));
        let opts = NodeOptions {
            state_dir: self.dir.path().join(format!("n{i}")),
            socket: self.dir.path().join(format!("n{i}.sock")),
        };
        (i, platform, opts)
    }

    fn start(&mut self, platform: Arc<SimPlatform>, opts: NodeOptions, udp: Option<MemUdp>) {
        let stop = CancellationToken::new();
        let (p, o, s) = (platform.clone(), opts.clone(), stop.clone());
        let task = tokio::spawn(async move { super::run_on(p, &o, udp, s, |_| {}).await });
        self.nodes.push(SimNode {
            platform,
            opts,
            stop,
            task: Some(task),
        });
    }

    /// A mesh of "a" (admin) and "b" in 10.210.0.0/16, connected; returns the init token.
    pub async fn two_nodes() -> (Sim, Token) {
        let mut sim = Sim::new();
        let token = sim.init("a", "10.210.0.0/16", None).await;
        sim.join("b", &token, None, None).await.unwrap();
        sim.wait_for("a and b to connect", Duration::from_secs(20), || async {
            sim.all_pairs(&[0, 1]).await
        })
        .await;
        (sim, token)
    }

    /// A one-use token of the mesh node 0 administers (10.210.0.0/16), listing no bootstrap.
    pub fn one_use_token(&self) -> Token {
        setup::make_token(
            &self.root_key(0),
            "10.210.0.0/16".parse().unwrap(),
            "mesh.internal",
            Duration::from_secs(3600),
            Some(1),
            vec![],
            crate::util::unix_now(),
        )
    }

    pub async fn init(&mut self, name: &str, cidr: &str, keys: Option<NodeKeys>) -> Token {
        let (_, platform, opts) = self.machine();
        let p = InitParams {
            name: name.into(),
            range: cidr.parse().expect("cidr"),
            domain: "mesh.internal".into(),
            port: 51820,
            endpoints: vec![],
            tun: "mesh0".into(),
            dns_upstream: vec![],
            keys,
        };
        let token = setup::create_mesh(
            platform.as_ref(),
            &StateDir::new(&opts.state_dir),
            &p,
            crate::util::unix_now(),
        )
        .expect("create mesh");
        self.start(platform, opts, None);
        token
    }

    pub async fn join(
        &mut self,
        name: &str,
        token: &Token,
        via: Option<usize>,
        keys: Option<NodeKeys>,
    ) -> anyhow::Result<usize> {
        let (i, platform, opts) = self.machine();
        let p = JoinParams {
            name: name.into(),
            port: 51820,
            endpoints: vec![],
            tun: "mesh0".into(),
            bootstrap: via.map(Sim::endpoint).into_iter().collect(),
            dns_upstream: vec![],
            keys,
        };
        let udp = setup::join_mesh(
            platform.as_ref(),
            &StateDir::new(&opts.state_dir),
            token,
            &p,
            crate::util::unix_now(),
        )
        .await?;
        self.start(platform, opts, Some(udp));
        Ok(i)
    }

    /// Cut (or restore) the underlay between two machines.
    pub fn cut(&self, a: usize, b: usize, cut: bool) {
        self.net.set_cut(Sim::host(a), Sim::host(b), cut);
    }

    pub async fn status(&self, i: usize) -> Option<StatusReport> {
        Client::new(&self.nodes[i].opts.socket)
            .get("/v1/status")
            .await
            .ok()
    }

    pub fn mesh_ip(&self, i: usize) -> Option<Ipv4Addr> {
        self.nodes[i].platform.mesh_ip()
    }

    /// Send one UDP packet over the mesh from `from` to `to` and wait (bounded) for it to arrive.
    pub async fn reaches(&self, from: usize, to: usize) -> bool {
        let (Some(src), Some(dst)) = (self.mesh_ip(from), self.mesh_ip(to)) else {
            return false;
        };
        let marker = format!(
            "probe {from}->{to} {}",
            rand_core::RngCore::next_u64(&mut rand_core::OsRng)
        );
        let inject = self.nodes[from]
            .platform
            .kernel
            .inject
            .lock()
            .unwrap()
            .clone();
        let Some(inject) = inject else { return false };
        let _ = inject
            .send(build_ipv4_udp(src, dst, 9, 9, marker.as_bytes()))
            .await;
        let mut rx = self.nodes[to].platform.received.lock().unwrap().take();
        let Some(r) = rx.as_mut() else { return false };
        let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
        let mut ok = false;
        while let Ok(Some(p)) = tokio::time::timeout_at(deadline, r.recv()).await {
            if p.ends_with(marker.as_bytes()) {
                ok = true;
                break;
            }
        }
        *self.nodes[to].platform.received.lock().unwrap() = rx;
        ok
    }

    /// Poll `f` until it holds, for at most `timeout`.
    pub async fn wait_for<F, Fut>(&self, what: &str, timeout: Duration, mut f: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = tokio::time::Instant::now() + timeout;
        while !f().await {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out after {timeout:?} waiting for: {what}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Every node's view and the reachability matrix, for failure messages.
    pub async fn dump(&self) -> String {
        let mut out = String::new();
        for i in 0..self.nodes.len() {
            match self.status(i).await {
                Some(s) => {
                    out += &format!(
                        "node {i} {} {} ({}):\n",
                        s.me.name, s.me.mesh_ip, s.me.subnet
                    );
                    for p in &s.peers {
                        out += &format!(
                            "   {} {} {:?} ep={:?} hs={:?} dropped_src={}\n",
                            p.name,
                            p.subnet,
                            p.state,
                            p.endpoint,
                            p.last_handshake_secs,
                            p.dropped_bad_source
                        );
                    }
                }
                None => out += &format!("node {i}: no status\n"),
            }
        }
        for a in 0..self.nodes.len() {
            for b in 0..self.nodes.len() {
                if a != b {
                    out += &format!("{a}->{b}:{} ", self.reaches(a, b).await);
                }
            }
        }
        out
    }

    pub async fn all_pairs(&self, nodes: &[usize]) -> bool {
        for a in nodes {
            for b in nodes {
                if a != b && !self.reaches(*a, *b).await {
                    return false;
                }
            }
        }
        true
    }

    /// How node `i` ended, if it has.
    pub async fn exit_of(&mut self, i: usize) -> Option<String> {
        let t = self.nodes[i].task.as_ref()?;
        if !t.is_finished() {
            return None;
        }
        let r = self.nodes[i].task.take()?.await;
        Some(match r {
            Ok(Ok(exit)) => format!("{exit:?}"),
            Ok(Err(e)) => format!("error: {e:#}"),
            Err(e) => format!("panic: {e}"),
        })
    }

    pub fn root_key(&self, i: usize) -> crate::trust::RootKey {
        StateDir::new(&self.nodes[i].opts.state_dir)
            .load_root()
            .expect("root key readable")
            .expect("node holds the root key")
    }

    pub async fn shutdown(mut self) {
        for n in &mut self.nodes {
            n.stop.cancel();
            if let Some(t) = n.task.take() {
                let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::addressing::candidate;
    use crate::trust::MeshId;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_mesh_forms_in_memory_and_gossip_rides_the_tunnels() {
        let mut sim = Sim::new();
        let token = sim.init("a", "10.210.0.0/16", None).await;
        sim.join("b", &token, None, None).await.unwrap();
        sim.join("c", &token, None, None).await.unwrap();
        sim.wait_for(
            "every node to see two online peers",
            Duration::from_secs(20),
            || async {
                let mut ok = true;
                for i in 0..3 {
                    ok &= sim
                        .status(i)
                        .await
                        .is_some_and(|s| s.peers.len() == 2 && s.peers.iter().all(|p| p.online));
                }
                ok
            },
        )
        .await;
        assert!(sim.all_pairs(&[0, 1, 2]).await);
        // b and c never talked to each other except through gossip learnt via a.
        let b = sim.status(1).await.unwrap();
        assert!(b.peers.iter().any(|p| p.name == "c" && p.online));
        sim.shutdown().await;
    }

    /// Join requests and answers are single datagrams outside the tunnels: lost ones are
    /// retried, and a retried request is answered the same way, also with a one-use token the
    /// lost answer already spent.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_join_survives_lost_requests_and_a_lost_answer_with_a_one_use_token() {
        let mut sim = Sim::new();
        sim.init("a", "10.210.0.0/16", None).await;
        let once = sim.one_use_token();
        // Machine 1 is the joiner: its first two requests and a's first answer are lost.
        sim.net.lose_control_frames(Sim::host(1), Sim::host(0), 2);
        sim.net.lose_control_frames(Sim::host(0), Sim::host(1), 1);
        let b = sim.join("b", &once, Some(0), None).await.unwrap();
        assert_eq!(b, 1);
        sim.wait_for("a and b to connect", Duration::from_secs(20), || async {
            sim.all_pairs(&[0, b]).await
        })
        .await;
        let a = sim.status(0).await.unwrap();
        assert_eq!(a.peers.len(), 1, "one member admitted once: {:?}", a.peers);
        // The token is spent: another joiner is refused.
        let err = sim.join("c", &once, Some(0), None).await.unwrap_err();
        assert!(format!("{err:#}").contains("has been used"), "{err:#}");
        sim.shutdown().await;
    }

    /// Slot-conflict notices travel outside the tunnels. One from an address no member uses
    /// teaches the node nothing, even when everything in it verifies (here: a certificate made
    /// with a leaked token).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_conflict_notice_from_a_stranger_adds_no_member() {
        use crate::join::{decode_frame, encode_frame, make_request, sign_record, Frame};
        use crate::mesh::io::UdpIo;
        use crate::trust::{NodeCertBody, NodeRecord};
        let (sim, token) = Sim::two_nodes().await;

        let now = crate::util::unix_now();
        let certify = |name: &str, keys: &NodeKeys| {
            NodeCertBody::new(&token.invite_raw, &token.invite.invite_key, name, keys, now)
                .sign(&token.invite_secret)
        };
        // The notice would move b if it were believed: a certificate older than b's (through
        // an invite made before b joined) whose claim lands on b's slot.
        let range: crate::mesh::addressing::MeshRange = "10.210.0.0/16".parse().unwrap();
        let b_subnet = sim.status(1).await.unwrap().me.subnet;
        let b_ip: std::net::Ipv4Addr = sim.status(1).await.unwrap().me.mesh_ip.parse().unwrap();
        let b_slot = range.slot_of(b_ip).unwrap();
        let early = setup::make_token(
            &sim.root_key(0),
            range,
            "mesh.internal",
            Duration::from_secs(3600),
            None,
            vec![],
            now - 100,
        );
        let (intruder, slot_k) = (0..10_000)
            .find_map(|_| {
                let keys = NodeKeys::generate();
                (0..32)
                    .find(|k| {
                        crate::mesh::addressing::candidate(
                            &token.mesh(),
                            &keys.wg_public(),
                            *k,
                            range.slots(),
                        ) == b_slot
                    })
                    .map(|k| (keys, k))
            })
            .expect("a key with a candidate on b's slot");
        let intruder_cert = NodeCertBody::new(
            &early.invite_raw,
            &early.invite.invite_key,
            "intruder",
            &intruder,
            now - 100,
        )
        .sign(&early.invite_secret);
        let record = sign_record(
            &intruder,
            &NodeRecord {
                identity: intruder.identity_public(),
                seq: 1,
                endpoints: vec!["192.0.2.200:4000".parse().unwrap()],
                slot_k,
                left: false,
            },
        );
        let stranger = sim.net.bind("192.0.2.200:4000".parse().unwrap()).unwrap();
        let notice = Frame::Conflict(vec![(intruder_cert, record)]);
        stranger
            .send_to(&encode_frame(&notice), Sim::endpoint(1))
            .await
            .unwrap();
        // Control frames are handled in order: once a join sent after the notice is answered,
        // the notice has been dealt with.
        let joiner = NodeKeys::generate();
        let (req, _) = make_request(&joiner, &certify("c", &joiner), vec![], now);
        stranger
            .send_to(&encode_frame(&Frame::Request(req)), Sim::endpoint(1))
            .await
            .unwrap();
        let mut buf = vec![0u8; 65536];
        let answered = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let (n, _) = stranger.recv_from(&mut buf).await.unwrap();
                if matches!(decode_frame(&buf[..n]), Ok(Frame::Accept(_))) {
                    return;
                }
            }
        })
        .await;
        assert!(answered.is_ok(), "b answers the join within 10 s");
        let s = sim.status(1).await.unwrap();
        assert!(
            s.peers.iter().all(|p| p.name != "intruder"),
            "{:?}",
            s.peers
        );
        assert_eq!(
            s.mesh.members, 3,
            "a, b and the admitted c; not the intruder"
        );
        assert_eq!(s.me.subnet, b_subnet, "b keeps its slot");
        sim.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_one_use_token_used_on_both_sides_of_a_partition_keeps_only_the_earlier_joiner() {
        let (mut sim, _) = Sim::two_nodes().await;
        let once = sim.one_use_token();
        for (p, q) in [(0, 1), (0, 3), (2, 1), (2, 3)] {
            sim.cut(p, q, true);
        }
        // Each seed sees the token unused and admits its joiner.
        let x = sim.join("x", &once, Some(0), None).await.unwrap();
        let y = sim.join("y", &once, Some(1), None).await.unwrap();
        sim.wait_for(
            "x and y up on their sides",
            Duration::from_secs(20),
            || async { sim.all_pairs(&[0, x]).await && sim.all_pairs(&[1, y]).await },
        )
        .await;
        for (p, q) in [(0, 1), (0, 3), (2, 1), (2, 3)] {
            sim.cut(p, q, false);
        }
        // After the heal exactly one of them stops, saying why; the other stays a member.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let (loser, winner, why) = loop {
            if let Some(e) = sim.exit_of(x).await {
                break (x, y, e);
            }
            if let Some(e) = sim.exit_of(y).await {
                break (y, x, e);
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "neither joiner stopped:\n{}",
                sim.dump().await
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(why, "InviteUsedUp");
        sim.wait_for(
            "the winner to reach a and b, the loser gone from views",
            Duration::from_secs(30),
            || async {
                let gone = |s: Option<StatusReport>| {
                    s.is_some_and(|s| {
                        s.peers.len() == 2
                            && s.peers.iter().all(|p| p.name != ["x", "y"][loser - 2])
                    })
                };
                sim.all_pairs(&[0, 1, winner]).await
                    && gone(sim.status(0).await)
                    && gone(sim.status(1).await)
            },
        )
        .await;
        sim.shutdown().await;
    }

    /// Keys for two joiners whose first candidate is the same slot, free of the given ones.
    fn colliding_keys(mesh: &MeshId, range: &MeshRange, taken: &[u32]) -> (NodeKeys, NodeKeys) {
        let slots = range.slots();
        loop {
            let x = NodeKeys::generate();
            let s = candidate(mesh, &x.wg_public(), 0, slots);
            if taken.contains(&s) {
                continue;
            }
            for _ in 0..20 * slots {
                let y = NodeKeys::generate();
                if candidate(mesh, &y.wg_public(), 0, slots) == s {
                    return (x, y);
                }
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_healed_partition_moves_the_later_of_two_colliding_joiners() {
        if let Ok(f) = std::env::var("SIM_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(f)
                .with_test_writer()
                .try_init();
        }
        let (mut sim, token) = Sim::two_nodes().await;
        let range: MeshRange = "10.210.0.0/16".parse().unwrap();
        let mesh = token.mesh();
        let taken: Vec<u32> = (0..2)
            .map(|i| range.slot_of(sim.mesh_ip(i).unwrap()).unwrap())
            .collect();
        let (kx, ky) = colliding_keys(&mesh, &range, &taken);

        // Partition: {a, x} | {b, y}. x joins through a, y through b, both pick the same slot.
        for (p, q) in [(0, 1), (0, 3), (2, 1), (2, 3)] {
            sim.cut(p, q, true);
        }
        // They also pick the same name: no seed could see the other one.
        let x = sim.join("x", &token, Some(0), Some(kx)).await.unwrap();
        let y = sim.join("x", &token, Some(1), Some(ky)).await.unwrap();
        assert_eq!((x, y), (2, 3));
        sim.wait_for(
            "x and y up on their sides",
            Duration::from_secs(20),
            || async { sim.all_pairs(&[0, 2]).await && sim.all_pairs(&[1, 3]).await },
        )
        .await;
        let before_x = sim.mesh_ip(x).unwrap();
        assert_eq!(Some(before_x), sim.mesh_ip(y), "the two joiners collided");
        // Both publish a service at a workload address (.7) of the subnet they hold now.
        let o = before_x.octets();
        let workload = std::net::Ipv4Addr::new(o[0], o[1], o[2], 7);
        for i in [x, y] {
            crate::control::client::Client::new(&sim.nodes[i].opts.socket)
                .post::<_, serde_json::Value>(
                    "/v1/services",
                    &crate::control::api::ServiceAddRequest {
                        name: "web".into(),
                        port: 80,
                        address: Some(workload),
                    },
                )
                .await
                .unwrap();
        }

        // Heal: every node computes the same answer; the later certificate moves.
        tracing::info!("sim: healing the partition");
        for (p, q) in [(0, 1), (0, 3), (2, 1), (2, 3)] {
            sim.cut(p, q, false);
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
        while !(sim.mesh_ip(x) != sim.mesh_ip(y) && sim.all_pairs(&[0, 1, 2, 3]).await) {
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "all four did not reach each other within 40 s:\n{}",
                    sim.dump().await
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let moved: Vec<usize> = [x, y]
            .into_iter()
            .filter(|i| sim.mesh_ip(*i) != Some(before_x))
            .collect();
        assert_eq!(moved.len(), 1, "exactly one of the two moved");
        // The one that moved has its service at an address of the old subnet: listed as such
        // (and not live); the other's is fine.
        for i in [x, y] {
            let v: Vec<crate::control::api::ServiceView> =
                crate::control::client::Client::new(&sim.nodes[i].opts.socket)
                    .get("/v1/services")
                    .await
                    .unwrap();
            let own = v
                .iter()
                .find(|s| s.local && s.name == "web")
                .expect("own service");
            let did_move = moved.contains(&i);
            assert_eq!(own.outside_subnet, did_move, "node {i}: {own:?}");
            assert_eq!(own.live, !did_move, "node {i}: {own:?}");
        }
        // Every node agrees on every subnet.
        let views: Vec<Vec<(String, String)>> = {
            let mut v = Vec::new();
            for i in 0..4 {
                let s = sim.status(i).await.unwrap();
                let mut all: Vec<(String, String)> = s
                    .peers
                    .iter()
                    .map(|p| (p.name.clone(), p.subnet.clone()))
                    .collect();
                all.push((s.me.name.clone(), s.me.subnet.clone()));
                all.sort();
                v.push(all);
            }
            v
        };
        assert!(views.windows(2).all(|w| w[0] == w[1]), "{views:?}");

        // Two members answer to "x": removing "x" would be a guess, so it is refused, naming
        // both node ids; the node id says which one.
        let admin = crate::control::client::Client::new(&sim.nodes[0].opts.socket);
        let req = |node: String| crate::control::api::RemoveRequest { node };
        let e = admin
            .post::<_, serde_json::Value>("/v1/remove", &req("x".into()))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("2 members are named \"x\""), "{e}");
        let y_id = sim.status(y).await.unwrap().me.node_id;
        assert!(e.contains(&y_id), "{e}");
        assert_eq!(
            sim.status(0).await.unwrap().mesh.members,
            4,
            "nothing removed"
        );
        admin
            .post::<_, serde_json::Value>("/v1/remove", &req(y_id.clone()))
            .await
            .unwrap();
        sim.wait_for("y to be removed", Duration::from_secs(10), || async {
            sim.status(0)
                .await
                .is_some_and(|s| s.peers.iter().all(|p| p.node_id != y_id))
        })
        .await;
        sim.shutdown().await;
    }
}
