//! The node runtime: loads the state, brings up the TUN device and the data plane, runs gossip
//! inside the tunnels, answers joins and the control API, and keeps all of them consistent from
//! one main loop that alone owns the membership view.
//!
//! Submodules by concern: [`setup`] creates state (`init`/`join`), [`seed`] answers joiners,
//! [`admin`] invites and removals, [`report`] builds `meshctl status`.

mod admin;
mod dns;
mod edge;
mod fallback;
pub mod platform;
mod report;
mod seed;
mod services;
pub mod setup;
#[cfg(test)]
pub mod sim;

use crate::constants::{ENDPOINT_RESCAN, GOSSIP_PORT, RECONCILE_TICK, TUN_MTU};
use crate::control::{
    server as api_server, ApiCall, ApiFailure, ApiRequest, ApiResult, LeaveResponse,
};
use crate::gossip::chitchat_glue::{KEY_CERT, KEY_RECORD, PREFIX_REVOCATION};
use crate::gossip::{Gossip, GossipConfig, Membership, MeshParams};
use crate::join::sign_record;
use crate::mesh::addressing::subnet_string;
use crate::mesh::device::DeviceEvent;
use crate::mesh::linux::LinuxUdp;
use crate::mesh::{Device, PeerSpec};
use crate::state::{NodeConfig, StateDir};
use crate::trust::{Cert, NodeId, NodeKeys, NodeRecord, RootKey, Signed};
use crate::util::{next_seq, unix_now};
use platform::{LinuxPlatform, Platform};
use std::collections::{BTreeMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// Where a node keeps its state and serves its API.
#[derive(Clone, Debug)]
pub struct NodeOptions {
    pub state_dir: PathBuf,
    pub socket: PathBuf,
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

struct Node<P: Platform> {
    platform: Arc<P>,
    state: StateDir,
    socket: PathBuf,
    keys: NodeKeys,
    config: NodeConfig,
    cert: Cert,
    root: Option<RootKey>,
    m: Membership,
    device: Arc<Device<P::Tun, P::Udp>>,
    tun_index: u32,
    gossip: Option<Gossip>,
    own_slot: u32,
    endpoints: Vec<SocketAddr>,
    record: NodeRecord,
    record_raw: Signed,
    /// Addresses joiners were seen at, used as first endpoint candidates.
    hints: BTreeMap<NodeId, SocketAddr>,
    last_specs: Vec<PeerSpec>,
    published_revocations: HashSet<NodeId>,
    last_persist: Instant,
    /// Removed nodes recently told about their revocation.
    notified: std::collections::HashMap<[u8; 32], Instant>,
    /// Members recently told that their slot claim lost a conflict.
    conflict_notified: std::collections::HashMap<NodeId, Instant>,
    /// Control frames (joins, notices) come from anyone: bounded per source address.
    control_limit: crate::util::KeyedLimiter<std::net::IpAddr>,
    /// Refused joins are logged at warning level once a minute per source address.
    refusal_log_limit: crate::util::KeyedLimiter<std::net::IpAddr>,
    settings: crate::state::Settings,
    services_seq: u64,
    dns: Option<crate::dns::DnsServer>,
    dns_input: Option<crate::dns::zone::ZoneInput>,
    dns_error: Option<String>,
    dns_host: String,
    resolved: Option<crate::dns::resolved::Resolved>,
    edge: edge::Edge,
    fallback: fallback::Fallback,
}

/// Run the node in `opts.state_dir` until shutdown. `udp` is the socket a fresh join used.
pub async fn run(
    opts: &NodeOptions,
    udp: Option<LinuxUdp>,
    shutdown: CancellationToken,
    ready: impl FnOnce(&Ready),
) -> anyhow::Result<Exit> {
    run_on(Arc::new(LinuxPlatform), opts, udp, shutdown, ready).await
}

/// [`run`] on any [`Platform`].
pub async fn run_on<P: Platform>(
    platform: Arc<P>,
    opts: &NodeOptions,
    udp: Option<P::Udp>,
    shutdown: CancellationToken,
    ready: impl FnOnce(&Ready),
) -> anyhow::Result<Exit> {
    let mut state = StateDir::new(&opts.state_dir);
    if !state.is_initialized() {
        return Err(crate::state::StateError::NotInitialized {
            dir: opts.state_dir.clone(),
        }
        .into());
    }
    state.lock()?;
    let keys = state.load_keys()?;
    let config = state.load_node()?;
    let root = state.load_root()?;
    let settings: crate::state::Settings = state.load_settings()?;
    let corrupt = |reason: String| crate::state::StateError::Corrupt {
        path: state.file("node.json"),
        reason,
    };
    let mesh = config.mesh_id().map_err(corrupt)?;
    let cert_raw = config.cert_signed().map_err(corrupt)?;
    let cert =
        Cert::verify(&cert_raw, &mesh).map_err(|e| corrupt(format!("own certificate: {e}")))?;
    if cert.wireguard != keys.wg_public() || cert.identity != keys.identity_public() {
        return Err(corrupt("the certificate does not match node.key".into()).into());
    }
    let params = MeshParams {
        mesh,
        range: cert.invite.range,
        domain: cert.invite.domain.clone(),
    };
    // A root key kept from another mesh (after `meshd leave`) administers that mesh, not this one.
    let root = root.filter(|r| {
        let ours = r.public() == mesh.0;
        if !ours {
            warn!("root.key belongs to another mesh; this node does not administer mesh {mesh}");
        }
        ours
    });
    let now = unix_now();
    let mut m = Membership::new(params.clone(), cert.clone(), now);
    m.set_admitted_k(cert.node_id, config.slot_k);
    let cache = state.load_members()?;
    for w in m.load_cache(&cache, now) {
        warn!("{w}");
    }
    // Both end the node for good: exit status 3, which the systemd unit does not restart.
    if m.is_revoked(&cert.node_id, &cert.wireguard) {
        error!(
            "this node ({}) was removed from mesh {mesh} by an administrator; it cannot come back with \
             this identity. Move {} away and join again with a new token",
            cert.name,
            opts.state_dir.display()
        );
        return Ok(Exit::Removed);
    }
    if m.over_its_invite(&cert.node_id) {
        error!(
            "this node ({}) joined with an invite that other nodes used up first; move {} away and \
             join again with a new token",
            cert.name,
            opts.state_dir.display()
        );
        return Ok(Exit::InviteUsedUp);
    }

    let own_slot = m
        .assignments()
        .get(&cert.node_id)
        .map(|a| a.slot)
        .ok_or_else(|| {
            anyhow::anyhow!(
                "the mesh range {} has no free /24 for this node",
                params.range
            )
        })?;
    let mesh_ip = params.range.node_ip(own_slot);

    let udp = match udp {
        Some(u) => u,
        None => platform.bind_udp(config.port)?,
    };
    let (tun, tun_index) = platform
        .create_tun(&config.tun, mesh_ip, params.range.prefix, TUN_MTU)
        .await?;
    info!(tun = %config.tun, address = %mesh_ip, subnet = %subnet_string(&params.range, own_slot), "TUN device up");

    let (device, events) = Device::new(tun, udp, keys.wireguard.clone(), params.range, own_slot);
    let dev_stop = CancellationToken::new();
    let mut data_plane = tokio::spawn(device.clone().run(dev_stop.clone()));

    let mut edge = edge::Edge::new();
    edge.set_seq_floor(cache.own_seq);
    let listener = api_server::bind(&opts.socket)?;
    let (api_tx, api_rx) = mpsc::channel::<ApiCall>(64);
    let api_stop = CancellationToken::new();
    tokio::spawn(api_server::serve(
        listener,
        opts.socket.clone(),
        api_tx,
        Some(edge.dialer()),
        api_stop.clone(),
    ));

    let endpoints = setup::effective_endpoints(
        &config.endpoints,
        config.port,
        platform.local_addresses(&config.tun, &params.range),
    );
    // Sequence numbers continue above what this node published before, whatever the clock says.
    let seq_floor = cache.own_seq;
    let record = NodeRecord {
        identity: keys.identity_public(),
        seq: next_seq(seq_floor),
        endpoints: endpoints.clone(),
        slot_k: config.slot_k,
        left: false,
    };
    let record_raw = sign_record(&keys, &record);
    m.ingest_record(cert.node_id, &record_raw).ok();

    let mut node = Node {
        platform,
        state,
        socket: opts.socket.clone(),
        keys,
        config,
        cert,
        root,
        m,
        device,
        tun_index,
        gossip: None,
        own_slot,
        endpoints,
        record,
        record_raw,
        hints: BTreeMap::new(),
        last_specs: Vec::new(),
        published_revocations: HashSet::new(),
        last_persist: Instant::now(),
        notified: Default::default(),
        conflict_notified: Default::default(),
        control_limit: crate::util::KeyedLimiter::new(Duration::from_secs(1), 20, 4096),
        refusal_log_limit: crate::util::KeyedLimiter::new(Duration::from_secs(60), 1, 1024),
        settings,
        services_seq: seq_floor,
        dns: None,
        dns_input: None,
        dns_error: None,
        dns_host: String::new(),
        resolved: None,
        edge,
        fallback: fallback::Fallback::new(),
    };
    node.push_peers().await;
    node.start_gossip().await?;
    node.publish_services().await;
    if node.platform.host_services() {
        node.start_dns().await;
        node.start_edge().await;
    }
    ready(&Ready {
        name: node.cert.name.clone(),
        mesh_ip,
        subnet: subnet_string(&params.range, own_slot),
    });
    info!(name = %node.cert.name, mesh = %params.mesh, address = %mesh_ip, "meshd running");

    let exit = node
        .main_loop(events, api_rx, &shutdown, &mut data_plane)
        .await;

    if let Some(g) = node.gossip.take() {
        g.shutdown().await;
    }
    node.edge.stop_all();
    node.unregister_dns_from_host().await;
    if let Some(d) = node.dns.take() {
        d.stop().await;
    }
    dev_stop.cancel();
    // State first, then the API socket: a `meshd leave` waiting on this process sees the state
    // gone by the time it returns.
    let saved = match &exit {
        Ok(Exit::Shutdown) | Err(_) => {
            if let Err(e) = node.persist() {
                error!(error = %e, "saving the member cache failed");
            }
            Ok(())
        }
        Ok(Exit::Left) => node.state.remove_node(),
        Ok(Exit::Removed) | Ok(Exit::InviteUsedUp) => {
            let _ = node.persist();
            Ok(())
        }
    };
    api_stop.cancel();
    // Give the API server a moment to remove its socket; the TUN device goes with the process.
    let deadline = Instant::now() + Duration::from_secs(2);
    while node.socket.exists() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    saved?;
    exit
}

impl<P: Platform> Node<P> {
    async fn main_loop(
        &mut self,
        mut events: mpsc::Receiver<DeviceEvent>,
        mut api_rx: mpsc::Receiver<ApiCall>,
        shutdown: &CancellationToken,
        data_plane: &mut tokio::task::JoinHandle<()>,
    ) -> anyhow::Result<Exit> {
        let mut tick = tokio::time::interval(RECONCILE_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut rescan = tokio::time::interval(ENDPOINT_RESCAN);
        rescan.tick().await;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(Exit::Shutdown),
                // The data plane stops only when the TUN device or the UDP socket broke for
                // good (say, mesh0 was deleted): exit with an error, so a supervisor restarts
                // the node instead of leaving it up without tunnels.
                r = &mut *data_plane => {
                    anyhow::bail!(
                        "the data plane stopped ({}); see the warning above",
                        match r { Ok(()) => "a device loop ended".to_string(), Err(e) => e.to_string() }
                    );
                }
                _ = tick.tick() => {
                    if let Some(exit) = self.reconcile().await? {
                        return Ok(exit);
                    }
                }
                Some(ev) = events.recv() => match ev {
                    DeviceEvent::Control(frame, from) => self.on_control_frame(&frame, from).await,
                    DeviceEvent::UnknownInitiator(wg, from) => self.on_unknown_initiator(wg, from).await,
                },
                Some(call) = api_rx.recv() => {
                    if let Some(exit) = self.on_api(call).await {
                        return Ok(exit);
                    }
                }
                _ = rescan.tick() => self.refresh_endpoints().await,
            }
        }
    }

    fn mesh_ip(&self) -> Ipv4Addr {
        self.m.params.range.node_ip(self.own_slot)
    }

    async fn start_gossip(&mut self) -> anyhow::Result<()> {
        let me = self.cert.node_id;
        let assign = self.m.assignments();
        let seeds: Vec<SocketAddr> = assign
            .iter()
            .filter(|(id, _)| **id != me)
            .map(|(_, a)| SocketAddr::from((self.m.params.range.node_ip(a.slot), GOSSIP_PORT)))
            .collect();
        let mut initial = vec![
            (KEY_CERT.to_string(), self.cert.raw.to_b64()),
            (KEY_RECORD.to_string(), self.record_raw.to_b64()),
        ];
        self.published_revocations.clear();
        for r in self.m.revocations() {
            initial.push((format!("{PREFIX_REVOCATION}{}", r.node_id), r.raw.to_b64()));
            self.published_revocations.insert(r.node_id);
        }
        let cfg = GossipConfig {
            node_id: me,
            addr: SocketAddr::from((self.mesh_ip(), GOSSIP_PORT)),
            cluster_id: format!("meshd-{}", self.m.params.mesh.short()),
            seeds,
            initial,
        };
        let transport = self.platform.gossip_transport(&self.config.tun);
        self.gossip = Some(Gossip::start(cfg, transport.as_ref()).await?);
        Ok(())
    }

    /// Sign and publish a new version of this node's record.
    async fn publish_record(&mut self) {
        self.record.seq = next_seq(self.record.seq);
        self.record.endpoints = self.endpoints.clone();
        self.record.slot_k = self.config.slot_k;
        self.record_raw = sign_record(&self.keys, &self.record);
        let _ = self.m.ingest_record(self.cert.node_id, &self.record_raw);
        if let Some(g) = &self.gossip {
            g.set(KEY_RECORD, self.record_raw.to_b64()).await;
        }
    }

    async fn push_peers(&mut self) {
        let specs = self.m.peer_specs(&self.hints);
        if specs != self.last_specs {
            self.device.set_peers(&specs).await;
            self.last_specs = specs;
        }
    }

    fn persist(&mut self) -> anyhow::Result<()> {
        let mut cache = self.m.to_cache();
        cache.saved_at = unix_now();
        self.state.save_members(&cache)?;
        self.m.dirty = false;
        self.last_persist = Instant::now();
        Ok(())
    }

    async fn reconcile(&mut self) -> anyhow::Result<Option<Exit>> {
        let now = unix_now();
        if let Some(g) = &mut self.gossip {
            g.poll(&mut self.m, now).await;
        }
        for name in self.m.prune(now) {
            info!(member = %name, "forgetting a member that has not been seen for too long");
        }
        if self.m.is_revoked(&self.cert.node_id, &self.cert.wireguard) {
            error!("this node was removed from the mesh by an administrator; shutting down");
            return Ok(Some(Exit::Removed));
        }
        if !self.record.left && !self.m.active().any(|x| x.cert.node_id == self.cert.node_id) {
            error!(
                "this node joined with an invite that other nodes used up first (a one-use token \
                 used twice at the same moment); the earlier joiner keeps it. Shutting down"
            );
            return Ok(Some(Exit::InviteUsedUp));
        }
        self.follow_own_slot().await?;
        self.push_peers().await;
        self.notify_slot_losers().await;
        self.bootstrap_fallback().await;
        self.refresh_dns();
        self.refresh_edge();
        // Spread every revocation this node knows.
        if let Some(g) = &self.gossip {
            let new: Vec<_> = self
                .m
                .revocations()
                .filter(|r| !self.published_revocations.contains(&r.node_id))
                .map(|r| (r.node_id, r.raw.to_b64()))
                .collect();
            for (id, raw) in new {
                g.set(&format!("{PREFIX_REVOCATION}{id}"), raw).await;
                self.published_revocations.insert(id);
            }
        }
        // Also hourly without changes, so members' last-seen times on disk stay current.
        let since = self.last_persist.elapsed();
        if (self.m.dirty && since >= Duration::from_secs(1)) || since >= Duration::from_secs(3600) {
            if let Err(e) = self.persist() {
                error!(error = %e, "saving the member cache failed");
            }
        }
        Ok(None)
    }

    /// If the deterministic rule moved this node (it lost a slot conflict), follow: new claim,
    /// new address, gossip restarted on it.
    async fn follow_own_slot(&mut self) -> anyhow::Result<()> {
        let Some(a) = self.m.assignments().get(&self.cert.node_id).copied() else {
            return Ok(());
        };
        if a.k == self.config.slot_k && a.slot == self.own_slot {
            return Ok(());
        }
        warn!(
            from = %subnet_string(&self.m.params.range, self.own_slot),
            to = %subnet_string(&self.m.params.range, a.slot),
            "subnet conflict lost to an earlier member; moving"
        );
        self.config.slot_k = a.k;
        self.state.save_node(&self.config)?;
        self.m.set_admitted_k(self.cert.node_id, a.k);
        if a.slot != self.own_slot {
            self.own_slot = a.slot;
            let ip = self.mesh_ip();
            self.platform
                .readdress(self.tun_index, ip, self.m.params.range.prefix)
                .await?;
            self.device.set_own_slot(a.slot);
            self.warn_services_outside_subnet();
            if let Some(g) = self.gossip.take() {
                g.shutdown().await;
            }
            self.start_gossip().await?;
            self.publish_services().await;
            if self.platform.host_services() {
                self.start_dns().await;
                self.start_mesh_side();
            }
        }
        self.publish_record().await;
        Ok(())
    }

    async fn refresh_endpoints(&mut self) {
        let e = setup::effective_endpoints(
            &self.config.endpoints,
            self.config.port,
            self.platform
                .local_addresses(&self.config.tun, &self.m.params.range),
        );
        if e != self.endpoints {
            info!(endpoints = ?e, "endpoints changed");
            self.endpoints = e;
            self.publish_record().await;
        }
    }

    async fn on_api(&mut self, call: ApiCall) -> Option<Exit> {
        let (result, exit): (ApiResult, Option<Exit>) = match call.request {
            ApiRequest::Status => (
                Ok(serde_json::to_value(self.status()).expect("serializable")),
                None,
            ),
            ApiRequest::Invite(r) => (self.invite(r), None),
            ApiRequest::Remove(r) => (self.remove(r).await, None),
            ApiRequest::Dns => (
                Ok(serde_json::to_value(self.dns_report()).expect("serializable")),
                None,
            ),
            ApiRequest::Services => (
                Ok(serde_json::to_value(self.services_view()).expect("serializable")),
                None,
            ),
            ApiRequest::ServiceAdd(r) => (self.service_add(r).await, None),
            ApiRequest::ServiceRemove(r) => (self.service_remove(r).await, None),
            ApiRequest::Expose(r) => (self.expose(r).await, None),
            ApiRequest::Unexpose(r) => (self.unexpose(r).await, None),
            ApiRequest::Gateway(r) => (self.gateway_request(r).await, None),
            ApiRequest::Proxy(r) => (self.proxy_request(r).await, None),
            ApiRequest::ExitNode(r) => (self.exit_node_request(r).await, None),
            ApiRequest::Leave => match self.leave().await {
                Ok(v) => (Ok(v), Some(Exit::Left)),
                Err(e) => (Err(e), None),
            },
        };
        let _ = call.reply.send(result);
        exit
    }

    /// Announce the departure, push it to every member directly, and give gossip a few rounds
    /// to carry it further.
    async fn leave(&mut self) -> ApiResult {
        self.record.left = true;
        self.publish_record().await;
        let me = self.cert.node_id;
        let targets: Vec<SocketAddr> = self
            .m
            .assignments()
            .iter()
            .filter(|(id, _)| **id != me)
            .filter(|(id, _)| {
                self.m
                    .get(id)
                    .is_some_and(|x| x.liveness != crate::gossip::Liveness::Dead)
            })
            .map(|(_, a)| SocketAddr::from((self.m.params.range.node_ip(a.slot), GOSSIP_PORT)))
            .collect();
        if !targets.is_empty() {
            for round in 0..4 {
                if let Some(g) = &self.gossip {
                    for t in &targets {
                        g.gossip_now(*t);
                    }
                }
                tokio::time::sleep(crate::constants::GOSSIP_INTERVAL).await;
                tracing::debug!(round, "departure pushed");
            }
        }
        info!("left the mesh");
        serde_json::to_value(LeaveResponse {
            name: self.cert.name.clone(),
            subnet: subnet_string(&self.m.params.range, self.own_slot),
            pid: std::process::id(),
        })
        .map_err(|e| ApiFailure::internal(e.to_string()))
    }
}
