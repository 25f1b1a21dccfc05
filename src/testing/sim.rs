//! The in-memory twin of [`super::platform::LinuxPlatform`], and multi-node scenarios on it
//! (DESIGN "Testing": fast multi-node scenarios without root).
//!
//! Each simulated machine has an in-memory TUN device whose kernel side is a small task here,
//! an in-memory UDP socket on a shared [`MemNet`] underlay (links can be cut: partitions), and a
//! gossip transport that, like the real one, rides the tunnels: every chitchat datagram becomes
//! a UDP packet to the peer's mesh address, written into the node's TUN device, encrypted by the
//! node's own data plane, and delivered from the receiving node's TUN to its gossip socket.
//! (chitchat's envelope codec is private, so the packet carries a handle to the envelope.)

use crate::control::client::Client;
use crate::control::StatusReport;
use crate::id::MeshRange;
use crate::mesh::linux::NetError;
use crate::mesh::packet::{build_ipv4_udp, ipv4_dst, ipv4_src};
use crate::node::platform::Platform;
use crate::node::setup::{self, InitParams, JoinParams};
use crate::node::{Exit, NodeOptions};
use crate::state::StateDir;
use crate::testing::mem::{MemNet, MemTun, MemUdp};
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

    fn bind_udp(&self, port: u16) -> Result<MemUdp, NetError> {
        self.net
            .bind(SocketAddr::new(self.host, port))
            .map_err(|e| NetError::io("binding the simulated UDP socket", e))
    }

    async fn create_tun(
        &self,
        _name: &str,
        addr: Ipv4Addr,
        _prefix: u8,
        _mtu: u16,
    ) -> Result<(MemTun, u32), NetError> {
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

    async fn readdress(&self, _index: u32, addr: Ipv4Addr, _prefix: u8) -> Result<(), NetError> {
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
pub(crate) struct SimNode {
    platform: Arc<SimPlatform>,
    pub(crate) opts: NodeOptions,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<Result<Exit, crate::node::NodeError>>>,
}

/// Several machines on one in-memory underlay.
pub struct Sim {
    pub(crate) net: MemNet,
    envelopes: Arc<Envelopes>,
    dir: tempfile::TempDir,
    pub(crate) nodes: Vec<SimNode>,
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

    pub(crate) fn host(i: usize) -> IpAddr {
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
            port: None,
        };
        (i, platform, opts)
    }

    fn start(&mut self, platform: Arc<SimPlatform>, opts: NodeOptions, udp: Option<MemUdp>) {
        let stop = CancellationToken::new();
        let (p, o, s) = (platform.clone(), opts.clone(), stop.clone());
        let task = tokio::spawn(async move { crate::node::run_on(p, &o, udp, s, |_| {}).await });
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
