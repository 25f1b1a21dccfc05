//! The node runtime: loads the state, brings up the TUN device and the data plane, runs gossip
//! inside the tunnels, answers joins and the control API, and keeps all of them consistent.
//!
//! Parts, each with one job (the `Node` only wires them and runs the main loop):
//!
//! - `boot` loads and checks the state directory;
//! - [`view::View`] holds the membership view, its [`snapshot::Snapshot`] (recomputed once per
//!   change: what the data plane, DNS, the edge roles and status read) and the member cache;
//! - [`publisher::Publisher`] signs everything this node says about itself, with one
//!   sequence-number rule; `own` publishes it, runs gossip and follows this node's /24;
//! - `frames` handles the control frames outside the tunnels, with the pure rules of
//!   [`crate::join::seed`], `notices` and `fallback`;
//! - `dns::DnsRole` and `edge::EdgeRoles` own the mesh DNS server and the edge listeners;
//! - `api` answers the control API with typed replies, using the pure checks of
//!   `services`, `admin` and the edge requests, and `report` for `meshctl status`;
//! - [`setup`] creates a node's state (`init`, `join`); [`platform`] is the OS behind a trait.

mod admin;
mod api;
mod boot;
mod dns;
mod edge;
mod fallback;
mod frames;
mod metrics;
mod notices;
pub mod outreach;
mod own;
pub mod platform;
pub mod probe;
mod prober;
pub mod publisher;
pub mod relays;
mod report;
mod services;
pub mod setup;
pub mod snapshot;
pub mod traversal;
mod traverser;
pub mod view;
mod workloads;

use crate::constants::{ENDPOINT_RESCAN, RECONCILE_TICK, TUN_MTU};
use crate::control::{server as api_server, ApiCall};
use crate::gossip::Gossip;
use crate::id::MeshRange;
use crate::mesh::addressing::subnet_string;
use crate::mesh::device::DeviceEvent;
use crate::mesh::linux::{LinuxUdp, NetError};
use crate::mesh::{Device, PeerSpec};
use crate::state::{NodeConfig, Settings, StateDir, StateError};
use crate::trust::{Cert, NodeKeys, RootKey};
use crate::util::{unix_now, unix_now_ms};
use platform::{LinuxPlatform, Platform};
use publisher::Publisher;
use snapshot::Snapshot;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};
use view::View;

/// Where a node keeps its state and serves its API.
#[derive(Clone, Debug)]
pub struct NodeOptions {
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    /// A new UDP port, saved before the node starts (`meshd run --port`).
    pub port: Option<u16>,
}

/// How the node ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Exit {
    /// SIGINT/SIGTERM: state flushed, will come back with `meshd run`.
    Shutdown,
    /// `meshd leave`: departure announced, identity deleted.
    Left,
    /// Removed by an administrator (`meshctl remove`).
    Removed,
    /// Admitted with a limited invite that other nodes used up first (two joins with a one-use
    /// token at two seeds at the same moment): the earlier certificate keeps the use.
    InviteUsedUp,
}

/// Facts about the running node, given to the caller once it is up.
pub struct Ready {
    pub name: String,
    pub mesh_ip: Ipv4Addr,
    pub subnet: String,
}

/// Why a node could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error("the mesh range {0} has no free /24 for this node")]
    MeshFull(MeshRange),
    #[error("starting gossip: {0}")]
    Gossip(String),
    #[error("{0}")]
    ControlSocket(String),
    #[error("the data plane stopped ({0}); see the warning above")]
    DataPlaneStopped(String),
}

/// What a node is, fixed for its run but for the /24 it holds.
struct Local {
    state: StateDir,
    socket: PathBuf,
    keys: NodeKeys,
    cert: Cert,
    root: Option<RootKey>,
    /// The configuration this run uses (the port and TUN device it was started with).
    config: NodeConfig,
    /// A port and TUN device `meshctl set` saved for the next start.
    next_start: Option<(u16, String)>,
    tun_index: u32,
    /// The /24 the TUN device is addressed in (follows the snapshot's assignment).
    slot: u32,
}

impl Local {
    /// Save `node.json`: this run's configuration, with what waits for the next start.
    fn save_config(&self) -> Result<(), crate::state::StateError> {
        let mut c = self.config.clone();
        if let Some((port, tun)) = &self.next_start {
            c.port = *port;
            c.tun = tun.clone();
        }
        self.state.save_node(&c)
    }
}

/// The data plane as the control plane drives it.
/// Every peer's tunnel as the data plane reports it now (it walks every peer: call it at most
/// every second or so).
pub(crate) type TunnelStats = Arc<dyn Fn() -> Vec<crate::mesh::PeerStats> + Send + Sync>;

struct Plane<P: Platform> {
    device: Arc<Device<P::Tun, P::Udp>>,
    /// The peer set last installed.
    installed: Vec<PeerSpec>,
}

impl<P: Platform> Plane<P> {
    async fn install(&mut self, peers: &[PeerSpec]) {
        if peers != self.installed.as_slice() {
            self.device.set_peers(peers);
            self.installed = peers.to_vec();
        }
    }

    async fn send(&self, frame: &[u8], to: SocketAddr) {
        self.device.send_control(frame, to);
    }
}

/// The data plane as the path task drives it.
struct DevicePaths<T, U>(Arc<Device<T, U>>);

impl<T: crate::mesh::io::TunIo, U: crate::mesh::io::UdpIo> traverser::PathPlane
    for DevicePaths<T, U>
{
    fn punch(&self, node: crate::id::NodeId, seen: Option<SocketAddr>) {
        let extra: Vec<SocketAddr> = seen.into_iter().collect();
        self.0.punch(&node, &extra);
    }
    fn use_relay(&self, peer: crate::id::NodeId, relay: crate::mesh::path::RelayPath, first: bool) {
        self.0.use_relay(&peer, relay, first);
    }
    fn drop_relay(&self, peer: crate::id::NodeId, relay: crate::id::NodeId) {
        self.0.drop_relay(&peer, &relay);
    }
    fn bind(&self, session: u64, a: SocketAddr, b: SocketAddr) -> bool {
        self.0.relay_bind(session, a, b)
    }
    fn unbind(&self, session: u64) {
        self.0.relay_unbind(session);
    }
    fn sends_direct(&self, node: crate::id::NodeId) -> bool {
        self.0
            .peer_by_node(&node)
            .is_some_and(|p| p.paths.lock().unwrap().kind() == crate::mesh::path::PathKind::Direct)
    }
}

struct Node<P: Platform> {
    platform: Arc<P>,
    local: Local,
    view: View,
    publisher: Publisher,
    gossip: Option<Gossip>,
    plane: Plane<P>,
    frames: frames::Frames,
    spread: outreach::Spread,
    /// Direct probes through the tunnels (with host services) and what they say.
    prober: Option<prober::Prober>,
    verdicts: (
        tokio::sync::watch::Sender<prober::Verdicts>,
        tokio::sync::watch::Receiver<prober::Verdicts>,
    ),
    /// Observed addresses, hole punches and `meshctl ping` (with host services).
    traverser: Option<traverser::Traverser>,
    nat: traverser::Outputs,
    /// Calls into this node, for the metrics listener on the mesh address.
    api: mpsc::Sender<ApiCall>,
    /// The metrics listener (`MESH_IP:9586`), stopped when cancelled.
    metrics: Option<CancellationToken>,
    /// Whether this node relays for others (`meshctl relay`; on unless turned off).
    relay_enabled: Arc<std::sync::atomic::AtomicBool>,
    settings: Settings,
    dns: dns::DnsRole,
    edge: edge::EdgeRoles,
    workloads: workloads::WorkloadRole,
}

/// Run the node in `opts.state_dir` until shutdown. `udp` is the socket a fresh join used.
pub async fn run(
    opts: &NodeOptions,
    udp: Option<LinuxUdp>,
    shutdown: CancellationToken,
    ready: impl FnOnce(&Ready),
) -> Result<Exit, NodeError> {
    run_on(Arc::new(LinuxPlatform), opts, udp, shutdown, ready).await
}

/// [`run`] on any [`Platform`].
pub async fn run_on<P: Platform>(
    platform: Arc<P>,
    opts: &NodeOptions,
    udp: Option<P::Udp>,
    shutdown: CancellationToken,
    ready: impl FnOnce(&Ready),
) -> Result<Exit, NodeError> {
    let loaded = match boot::load(opts)? {
        Ok(l) => l,
        Err(exit) => return Ok(exit),
    };
    let params = loaded.membership.params.clone();
    let mesh_ip = params.range.node_ip(loaded.slot);
    let udp = match udp {
        Some(u) => u,
        None => platform.bind_udp(loaded.config.port)?,
    };
    let (tun, tun_index) = platform
        .create_tun(&loaded.config.tun, mesh_ip, params.range.prefix, TUN_MTU)
        .await?;
    info!(tun = %loaded.config.tun, address = %mesh_ip, subnet = %subnet_string(&params.range, loaded.slot), "TUN device up");
    let (device, events) = Device::new(
        tun,
        udp,
        loaded.keys.wireguard.clone(),
        params.range,
        loaded.slot,
    );
    let dev_stop = CancellationToken::new();
    let mut data_plane = tokio::spawn(device.clone().run(dev_stop.clone()));

    let edge = edge::EdgeRoles::default();
    let listener =
        api_server::bind(&opts.socket).map_err(|e| NodeError::ControlSocket(e.to_string()))?;
    let (api_tx, api_rx) = mpsc::channel::<ApiCall>(64);
    let api_stop = CancellationToken::new();
    tokio::spawn(api_server::serve(
        listener,
        opts.socket.clone(),
        api_tx.clone(),
        Some(edge.dialer()),
        api_stop.clone(),
    ));

    let endpoints = setup::effective_endpoints(
        &loaded.config.endpoints,
        loaded.config.port,
        platform.local_addresses(&loaded.config.tun, &params.range),
    );
    let mut publisher = Publisher::new(
        &loaded.keys,
        loaded.seq_floor,
        endpoints,
        loaded.config.slot_k,
    );
    let mut membership = loaded.membership;
    let _ = publisher
        .record(unix_now_ms())
        .ingest(&mut membership, loaded.cert.node_id);
    let now = Instant::now();
    let mut node = Node {
        dns: dns::DnsRole::new(
            &loaded.config.tun,
            tun_index,
            loaded.config.dns_upstream.clone(),
        ),
        local: Local {
            state: loaded.state,
            socket: opts.socket.clone(),
            keys: loaded.keys,
            cert: loaded.cert,
            root: loaded.root,
            config: loaded.config,
            next_start: None,
            tun_index,
            slot: loaded.slot,
        },
        view: View::new(membership, now),
        publisher,
        gossip: None,
        plane: Plane {
            device,
            installed: Vec::new(),
        },
        frames: frames::Frames::new(now),
        spread: outreach::Spread::default(),
        prober: None,
        verdicts: tokio::sync::watch::channel(Default::default()),
        traverser: None,
        nat: traverser::Outputs {
            candidates: tokio::sync::watch::channel(Vec::new()).0,
            view: Default::default(),
        },
        api: api_tx,
        metrics: None,
        relay_enabled: Arc::new(std::sync::atomic::AtomicBool::new(
            !loaded.settings.relay_disabled,
        )),
        settings: loaded.settings,
        edge,
        workloads: Default::default(),
        platform,
    };
    node.start().await?;
    ready(&Ready {
        name: node.local.cert.name.clone(),
        mesh_ip,
        subnet: subnet_string(&params.range, node.local.slot),
    });
    info!(name = %node.local.cert.name, mesh = %params.mesh, address = %mesh_ip, "meshd running");

    let exit = node
        .main_loop(events, api_rx, &shutdown, &mut data_plane)
        .await;

    if let Some(g) = node.gossip.take() {
        g.shutdown().await;
    }
    node.edge.stop_all();
    if matches!(exit, Ok(Exit::Left)) {
        // Leaving for good: the namespaces go too.
        let _ = node
            .workloads_set(crate::control::WorkloadsRequest {
                enable: false,
                bridge: None,
            })
            .await;
    }
    node.take_down_bridge().await;
    node.prober = None;
    node.traverser = None;
    if let Some(stop) = node.metrics.take() {
        stop.cancel();
    }
    node.dns.stop().await;
    dev_stop.cancel();
    // State first, then the API socket: a `meshd leave` waiting on this process sees the state
    // gone by the time it returns.
    let saved = match &exit {
        Ok(Exit::Left) => node.local.state.remove_node(),
        Ok(_) | Err(_) => {
            if let Err(e) = node.view.persist(&node.local.state, Instant::now()) {
                error!(error = %e, "saving the member cache failed");
            }
            Ok(())
        }
    };
    api_stop.cancel();
    // Give the API server a moment to remove its socket; the TUN device goes with the process.
    let deadline = Instant::now() + Duration::from_secs(2);
    while node.local.socket.exists() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    saved?;
    exit
}

impl<P: Platform> Node<P> {
    fn mesh_ip(&self) -> Ipv4Addr {
        self.view.m().params.range.node_ip(self.local.slot)
    }

    /// Everything up for the first time: peers, gossip, own statements, DNS, edge roles.
    async fn start(&mut self) -> Result<(), NodeError> {
        let snap = self.view.snapshot().clone();
        self.plane.install(&snap.peers).await;
        self.start_gossip().await?;
        let services = self
            .publisher
            .services(self.settings.services.clone(), unix_now_ms());
        self.publish(services).await;
        let about = self
            .publisher
            .about(crate::constants::VERSION, unix_now_ms());
        self.publish(about).await;
        if self.platform.host_services() {
            self.publish_routes().await;
            // The bridge first: DNS binds to it when it starts.
            self.apply_workloads().await;
            self.start_mesh_services().await;
            self.edge.start(&self.settings).await;
        }
        self.refresh().await?;
        Ok(())
    }

    /// Mesh DNS started again on the same address (new upstreams, a new bridge).
    async fn restart_dns(&mut self) {
        let snap = self.view.snapshot().clone();
        self.dns
            .start(self.mesh_ip(), &snap.zone, &snap.params.range)
            .await;
    }

    /// DNS, the prober and the mesh-side edge listeners, on the current mesh address.
    async fn start_mesh_services(&mut self) {
        let snap = self.view.snapshot().clone();
        let range = snap.params.range;
        self.dns.start(self.mesh_ip(), &snap.zone, &range).await;
        self.prober = None;
        let device = self.plane.device.clone();
        let stats: TunnelStats = Arc::new(move || device.stats());
        let device = self.plane.device.clone();
        let rehandshake: prober::Rehandshake = Arc::new(move |id| device.rehandshake(&id));
        match prober::spawn(
            self.mesh_ip(),
            &self.local.config.tun,
            self.view.subscribe(),
            stats.clone(),
            rehandshake,
            self.verdicts.0.clone(),
        ) {
            Ok(p) => self.prober = Some(p),
            Err(e) => error!(error = %e, "cannot probe members: failures show through gossip only"),
        }
        self.traverser = None;
        let plane: Arc<dyn traverser::PathPlane> = Arc::new(DevicePaths(self.plane.device.clone()));
        match traverser::spawn(
            self.mesh_ip(),
            &self.local.config.tun,
            self.view.subscribe(),
            stats,
            plane,
            self.relay_enabled.clone(),
            self.nat.clone(),
        ) {
            Ok(t) => self.traverser = Some(t),
            Err(e) => {
                error!(error = %e, "cannot run NAT traversal: members behind NAT may stay unreachable")
            }
        }
        if let Some(stop) = self.metrics.take() {
            stop.cancel();
        }
        let at = SocketAddr::from((self.mesh_ip(), api_server::METRICS_PORT));
        match crate::mesh::linux::bind_tcp_on_device(at, &self.local.config.tun)
            .and_then(tokio::net::TcpListener::from_std)
        {
            Ok(l) => {
                let stop = CancellationToken::new();
                tokio::spawn(api_server::serve_metrics(l, self.api.clone(), stop.clone()));
                self.metrics = Some(stop);
            }
            Err(e) => error!(%at, error = %e, "cannot serve metrics on the mesh address"),
        }
        self.edge.start_mesh_side(
            self.mesh_ip(),
            &self.local.config.tun,
            &self.local.cert.name,
            range,
        );
    }

    async fn main_loop(
        &mut self,
        mut events: mpsc::Receiver<DeviceEvent>,
        mut api_rx: mpsc::Receiver<ApiCall>,
        shutdown: &CancellationToken,
        data_plane: &mut tokio::task::JoinHandle<()>,
    ) -> Result<Exit, NodeError> {
        let mut tick = tokio::time::interval(RECONCILE_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut rescan = tokio::time::interval(ENDPOINT_RESCAN);
        rescan.tick().await;
        let mut observed = self.nat.candidates.subscribe();
        let mut containers = self.workloads.containers.subscribe();
        // Containers found before this subscription (the watcher starts with the workloads,
        // earlier in the start) are published now; later changes through `containers`.
        if !self.workloads.containers.borrow().is_empty() {
            self.publish_workloads().await;
        }
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(Exit::Shutdown),
                // The data plane stops only when the TUN device or the UDP socket broke for
                // good (say, mesh0 was deleted): exit with an error, so a supervisor restarts
                // the node instead of leaving it up without tunnels.
                r = &mut *data_plane => {
                    return Err(NodeError::DataPlaneStopped(match r {
                        Ok(()) => "a device loop ended".to_string(),
                        Err(e) => e.to_string(),
                    }));
                }
                _ = tick.tick() => {
                    if let Some(exit) = self.tick().await? {
                        return Ok(exit);
                    }
                }
                Some(ev) = events.recv() => match ev {
                    DeviceEvent::Control(frame, from) => self.on_control_frame(&frame, from).await?,
                    DeviceEvent::UnknownInitiator(wg, from) => self.on_unknown_initiator(wg, from).await,
                },
                Some(call) = api_rx.recv() => {
                    if let Some(exit) = self.on_api(call).await? {
                        return Ok(exit);
                    }
                }
                _ = rescan.tick() => {
                    self.refresh_endpoints().await;
                    self.keep_docker_rule();
                }
                Ok(()) = observed.changed() => self.refresh_endpoints().await,
                Ok(()) = containers.changed() => self.publish_workloads().await,
            }
        }
    }

    /// One reconcile tick: take in gossip, forget what is too old, follow the view (only if it
    /// changed), send the notices due, and keep the cache on disk.
    async fn tick(&mut self) -> Result<Option<Exit>, NodeError> {
        let now = unix_now();
        if let Some(g) = &mut self.gossip {
            let probes = self.verdicts.1.borrow().clone();
            self.spread
                .take_in(g, self.view.m_mut(), now, &probes)
                .await;
        }
        match self.view.tick(now, self.publisher.left()) {
            Ok(Some(snap)) => self.apply(&snap).await?,
            Ok(None) => {}
            Err(Exit::Removed) => {
                error!("this node was removed from the mesh by an administrator; shutting down");
                return Ok(Some(Exit::Removed));
            }
            Err(exit) => {
                error!(
                    "this node joined with an invite that other nodes used up first (a one-use \
                     token used twice at the same moment); the earlier joiner keeps it. Shutting down"
                );
                return Ok(Some(exit));
            }
        }
        if let Some(g) = &self.gossip {
            self.spread.send(g, self.view.snapshot(), Instant::now());
        }
        self.send_slot_loser_notices().await;
        self.bootstrap_fallback().await;
        if let Some(g) = &mut self.gossip {
            g.publish_revocations(self.view.m()).await;
        }
        self.view.persist_if_due(&self.local.state, Instant::now());
        Ok(None)
    }

    /// Follow the view if it changed since the last snapshot.
    async fn refresh(&mut self) -> Result<(), NodeError> {
        match self.view.refresh() {
            Some(snap) => self.apply(&snap).await,
            None => Ok(()),
        }
    }

    /// Follow a new snapshot: this node's own /24, the data plane's peers, the zone, the
    /// edge's routes.
    async fn apply(&mut self, snap: &Snapshot) -> Result<(), NodeError> {
        self.follow_own_slot(snap).await?;
        self.plane.install(&snap.peers).await;
        self.dns.update(&snap.zone);
        self.edge.update(snap);
        Ok(())
    }
}
