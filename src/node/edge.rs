//! The node's edge roles: serving exposed hostnames, the public gateway, the local proxy and the
//! exit node. The main loop publishes a routing snapshot ([`MeshView`]) that the listener tasks
//! read; settings persist in settings.json and are re-applied at start-up.

use super::Node;
use crate::control::{
    ApiFailure, ApiResult, EdgeStatus, ExposeRequest, ExposedView, ListenRequest, ListenView,
    ToggleRequest,
};
use crate::gossip::chitchat_glue::KEY_ROUTES;
use crate::gossip::Liveness;
use crate::mesh::linux::bind_tcp_on_device;
use crate::proxy::dial::{Dialer, MeshDialer};
use crate::proxy::gateway::{self, Gateway};
use crate::proxy::listen::accept_loop;
use crate::proxy::routes::{HostRoute, MeshView, NodeView};
use crate::proxy::serve::Exposed;
use crate::proxy::{exit, forward, is_hostname_pattern, serve, EXIT_PORT, SERVE_PORT};
use crate::state::ListenPair;
use crate::trust::{Context, RoutesRecord, Signed};
use crate::util::next_seq;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

const MESH_SIDE_MAX_CONNECTIONS: usize = 4096;
const PROXY_MAX_CONNECTIONS: usize = 1024;
const MESH_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// A running listener role (gateway or proxy): its addresses, the token that stops its accept
/// loops and connections, and the loops themselves (awaited on stop, so the addresses are free
/// again when a replacement binds them).
pub(super) struct Role {
    pair: ListenPair,
    stop: CancellationToken,
    loops: Vec<tokio::task::JoinHandle<()>>,
}

impl Role {
    fn new(pair: ListenPair) -> Role {
        Role {
            pair,
            stop: CancellationToken::new(),
            loops: Vec::new(),
        }
    }

    fn spawn<F, Fut>(
        &mut self,
        l: tokio::net::TcpListener,
        max: usize,
        per_source: Option<usize>,
        what: &'static str,
        handler: F,
    ) where
        F: Fn(tokio::net::TcpStream, SocketAddr) -> Fut + Clone + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        self.loops.push(tokio::spawn(accept_loop(
            l,
            max,
            per_source,
            self.stop.clone(),
            what,
            handler,
        )));
    }

    /// Stop accepting and cut its connections; returns once its listeners are closed.
    async fn stop(self) -> ListenPair {
        self.stop.cancel();
        for h in self.loops {
            // An accept loop returns at its next poll after the cancel; bounded all the same.
            let _ = tokio::time::timeout(Duration::from_secs(5), h).await;
        }
        self.pair
    }
}

/// Replace the role in `slot` with one listening on `pair` (`None`: stop it). Asking for what
/// already runs changes nothing (live connections go on). If the new addresses cannot be bound,
/// the previous ones are bound again, so a failed change loses nothing.
async fn replace_role<F, Fut>(
    slot: &mut Option<Role>,
    pair: Option<ListenPair>,
    what: &str,
    start: F,
) -> Result<(), ApiFailure>
where
    F: Fn(ListenPair) -> Fut,
    Fut: std::future::Future<Output = Result<Role, ApiFailure>>,
{
    if let (Some(running), Some(wanted)) = (slot.as_ref(), pair.as_ref()) {
        if running.pair == *wanted {
            return Ok(());
        }
    }
    let previous = match slot.take() {
        Some(r) => Some(r.stop().await),
        None => None,
    };
    let Some(pair) = pair else { return Ok(()) };
    match start(pair).await {
        Ok(r) => {
            *slot = Some(r);
            Ok(())
        }
        Err(mut e) => {
            if let Some(prev) = previous {
                match start(prev).await {
                    Ok(r) => {
                        *slot = Some(r);
                        e.message =
                            format!("{}; the {what} keeps its previous addresses", e.message);
                    }
                    Err(again) => {
                        error!(error = %again.message, "{what} could not take back its previous addresses")
                    }
                }
            }
            Err(e)
        }
    }
}

/// Channels and listener handles of the edge roles.
pub(super) struct Edge {
    view_tx: watch::Sender<Arc<MeshView>>,
    exposed_tx: watch::Sender<Arc<Vec<Exposed>>>,
    exit_tx: watch::Sender<bool>,
    mesh_side: Option<CancellationToken>,
    gateway: Option<Role>,
    proxy: Option<Role>,
    routes_seq: u64,
}

impl Edge {
    pub(super) fn new() -> Edge {
        Edge {
            view_tx: watch::channel(Arc::new(MeshView::default())).0,
            exposed_tx: watch::channel(Arc::new(Vec::new())).0,
            exit_tx: watch::channel(false).0,
            mesh_side: None,
            gateway: None,
            proxy: None,
            routes_seq: 0,
        }
    }

    /// Routes records continue above this sequence number (see `MemberCache::own_seq`).
    pub(super) fn set_seq_floor(&mut self, seq: u64) {
        self.routes_seq = self.routes_seq.max(seq);
    }

    /// The dialer `meshctl nc` and the proxies use.
    pub(super) fn dialer(&self) -> Arc<dyn Dialer> {
        Arc::new(MeshDialer {
            view: self.view_tx.subscribe(),
            connect_timeout: MESH_CONNECT_TIMEOUT,
        })
    }

    pub(super) fn stop_all(&mut self) {
        for t in [
            self.mesh_side.take(),
            self.gateway.take().map(|g| g.stop),
            self.proxy.take().map(|p| p.stop),
        ]
        .into_iter()
        .flatten()
        {
            t.cancel();
        }
    }
}

/// `ADDR:PORT`, a bare port (on `default_ip`), or "off".
fn listen_addr(s: Option<&str>, default: SocketAddr) -> Result<Option<SocketAddr>, String> {
    let Some(s) = s else { return Ok(Some(default)) };
    if s.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    if let Ok(p) = s.parse::<u16>() {
        return Ok(Some(SocketAddr::new(default.ip(), p)));
    }
    s.parse::<SocketAddr>().map(Some).map_err(|_| {
        format!("{s:?} is not a listen address: write ADDR:PORT (e.g. 0.0.0.0:443), a port, or off")
    })
}

/// The listen addresses a request asks for; `None` to disable the role.
fn listen_pair(
    r: &ListenRequest,
    role: &str,
    first: SocketAddr,
    second: SocketAddr,
) -> Result<Option<ListenPair>, ApiFailure> {
    if !r.enable {
        return Ok(None);
    }
    let first = listen_addr(r.first.as_deref(), first).map_err(ApiFailure::bad_request)?;
    let second = listen_addr(r.second.as_deref(), second).map_err(ApiFailure::bad_request)?;
    if first.is_none() && second.is_none() {
        return Err(ApiFailure::bad_request(format!(
            "both listeners are off; use `meshctl {role} disable`"
        )));
    }
    Ok(Some(ListenPair { first, second }))
}

fn pair_json(p: &Option<ListenPair>, first: &str, second: &str) -> serde_json::Value {
    let addr = |a: Option<SocketAddr>| a.map(|a| a.to_string());
    serde_json::json!({
        "enabled": p.is_some(),
        first: p.as_ref().and_then(|p| addr(p.first)),
        second: p.as_ref().and_then(|p| addr(p.second)),
    })
}

async fn bind(addr: SocketAddr, what: &str) -> Result<tokio::net::TcpListener, ApiFailure> {
    tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        let hint = match e.kind() {
            std::io::ErrorKind::AddrInUse => {
                " (something else listens there; pick another address)"
            }
            std::io::ErrorKind::PermissionDenied => {
                " (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
            }
            _ => "",
        };
        ApiFailure::conflict(format!("cannot listen on {addr} for the {what}: {e}{hint}"))
    })
}

impl<P: super::platform::Platform> Node<P> {
    /// The routing snapshot for the gateway and the proxy.
    pub(super) fn mesh_view(&self) -> MeshView {
        let assign = self.m.assignments();
        let range = self.m.params.range;
        let names = crate::dns::zone::unique_names(self.m.active().map(|x| {
            (
                x.cert.name.as_str(),
                x.cert.issued_at,
                x.cert.node_id.to_string(),
            )
        }));
        let mut v = MeshView {
            domain: self.m.params.domain.clone(),
            range: Some(range),
            ..Default::default()
        };
        for x in self.m.active() {
            let Some(a) = assign.get(&x.cert.node_id) else {
                continue;
            };
            let ip = range.node_ip(a.slot);
            let name = names[&x.cert.node_id.to_string()].clone();
            let live = x.cert.node_id == self.cert.node_id || x.liveness != Liveness::Dead;
            let routes = x.routes.as_ref();
            v.nodes.insert(
                name.clone(),
                NodeView {
                    ip,
                    live,
                    exit: routes.is_some_and(|r| r.exit_node),
                },
            );
            for h in routes.iter().flat_map(|r| r.hostnames.iter()) {
                if is_hostname_pattern(h) {
                    v.hostnames.push(HostRoute {
                        pattern: h.clone(),
                        node: name.clone(),
                        ip,
                        live,
                    });
                }
            }
            if live {
                for s in x.services.iter().flat_map(|r| r.services.iter()) {
                    let sip = s.address.unwrap_or(ip);
                    if range.slot_of(sip) == Some(a.slot) {
                        v.services
                            .entry(s.name.clone())
                            .or_default()
                            .push((name.clone(), sip));
                    }
                }
            }
        }
        v.hostnames
            .sort_by(|a, b| (&a.pattern, &a.node).cmp(&(&b.pattern, &b.node)));
        v
    }

    /// Push membership changes to the listener tasks.
    pub(super) fn refresh_edge(&mut self) {
        let v = self.mesh_view();
        if **self.edge.view_tx.borrow() != v {
            self.edge.view_tx.send_replace(Arc::new(v));
        }
    }

    /// Sign and publish this node's hostnames and exit flag.
    pub(super) async fn publish_routes(&mut self) {
        self.edge.routes_seq = next_seq(self.edge.routes_seq);
        let rec = RoutesRecord {
            identity: self.keys.identity_public(),
            seq: self.edge.routes_seq,
            hostnames: self
                .settings
                .exposed
                .iter()
                .map(|e| e.hostname.clone())
                .collect(),
            exit_node: self.settings.exit_node,
        };
        let raw = Signed::sign(Context::Hostnames, &rec, &self.keys.identity);
        let _ = self.m.ingest_routes(self.cert.node_id, &raw);
        if let Some(g) = &self.gossip {
            g.set(KEY_ROUTES, raw.to_b64()).await;
        }
        self.edge
            .exposed_tx
            .send_replace(Arc::new(self.settings.exposed.clone()));
        self.edge.exit_tx.send_replace(self.settings.exit_node);
        self.refresh_edge();
    }

    /// Listeners on the mesh address: gateway handoffs and exit requests. Restarted when the
    /// node's address changes.
    pub(super) fn start_mesh_side(&mut self) {
        if let Some(t) = self.edge.mesh_side.take() {
            t.cancel();
        }
        let stop = CancellationToken::new();
        let ip = self.mesh_ip();
        let tun = self.config.tun.clone();
        for (port, what) in [
            (SERVE_PORT, "gateway handoffs"),
            (EXIT_PORT, "exit requests"),
        ] {
            let l = match bind_tcp_on_device(SocketAddr::from((ip, port)), &tun)
                .and_then(tokio::net::TcpListener::from_std)
            {
                Ok(l) => l,
                Err(e) => {
                    error!(port, error = %e, "cannot listen for {what} on the mesh address");
                    continue;
                }
            };
            // Handoffs and exit requests come from member nodes themselves (a gateway, a
            // member's proxy), never from workloads in their /24s: a container must not be able
            // to hand a serving node a made-up client address, or use exits on its own.
            let view = self.edge.view_tx.subscribe();
            let from_node = move |p: SocketAddr| {
                let ok = view.borrow().is_node_address(p.ip());
                if !ok {
                    debug!(peer = %p, what, "refused: not a member node's address");
                }
                ok
            };
            type Boxed = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;
            type Session = Arc<dyn Fn(tokio::net::TcpStream, SocketAddr) -> Boxed + Send + Sync>;
            let session: Session = if port == SERVE_PORT {
                let exposed = self.edge.exposed_tx.subscribe();
                Arc::new(move |s, p| Box::pin(serve::session(exposed.clone(), s, p)))
            } else {
                let enabled = self.edge.exit_tx.subscribe();
                let name = self.cert.name.clone();
                let mesh = self.m.params.range;
                Arc::new(move |s, p| {
                    Box::pin(exit::session(enabled.clone(), name.clone(), mesh, s, p))
                })
            };
            tokio::spawn(accept_loop(
                l,
                MESH_SIDE_MAX_CONNECTIONS,
                None,
                stop.clone(),
                what,
                move |s, p| {
                    let run = from_node(p).then(|| session(s, p));
                    async move {
                        if let Some(f) = run {
                            f.await
                        }
                    }
                },
            ));
        }
        self.edge.mesh_side = Some(stop);
    }

    /// Start (or stop, with `None`) the public gateway listeners.
    pub(super) async fn apply_gateway(
        &mut self,
        pair: Option<ListenPair>,
    ) -> Result<(), ApiFailure> {
        let gw = Gateway::new(self.edge.view_tx.subscribe());
        let start = move |pair: ListenPair| {
            let gw = gw.clone();
            async move {
                let https = match pair.first {
                    Some(a) => Some(bind(a, "gateway (HTTPS)").await?),
                    None => None,
                };
                let http = match pair.second {
                    Some(a) => Some(bind(a, "gateway (HTTP)").await?),
                    None => None,
                };
                let mut role = Role::new(pair);
                if let Some(l) = https {
                    let g = gw.clone();
                    role.spawn(
                        l,
                        gateway::MAX_CONNECTIONS,
                        Some(gateway::MAX_CONNECTIONS_PER_CLIENT),
                        "gateway https",
                        move |s, p| gateway::https_session(g.clone(), s, p),
                    );
                }
                if let Some(l) = http {
                    let g = gw.clone();
                    role.spawn(
                        l,
                        gateway::MAX_CONNECTIONS,
                        Some(gateway::MAX_CONNECTIONS_PER_CLIENT),
                        "gateway http",
                        move |s, p| gateway::http_session(g.clone(), s, p),
                    );
                }
                info!(https = ?role.pair.first, http = ?role.pair.second, "gateway listening");
                Ok(role)
            }
        };
        replace_role(&mut self.edge.gateway, pair, "gateway", start).await
    }

    /// Start (or stop) the local proxy listeners.
    pub(super) async fn apply_proxy(&mut self, pair: Option<ListenPair>) -> Result<(), ApiFailure> {
        let dialer = self.edge.dialer();
        let start = move |pair: ListenPair| {
            let dialer = dialer.clone();
            async move {
                let socks = match pair.first {
                    Some(a) => Some(bind(a, "SOCKS5 proxy").await?),
                    None => None,
                };
                let http = match pair.second {
                    Some(a) => Some(bind(a, "HTTP proxy").await?),
                    None => None,
                };
                let mut role = Role::new(pair);
                if let Some(l) = socks {
                    let d = dialer.clone();
                    role.spawn(l, PROXY_MAX_CONNECTIONS, None, "socks5", move |s, _p| {
                        let d = d.clone();
                        async move {
                            let _ = forward::socks5_session(s, d.as_ref()).await;
                        }
                    });
                }
                if let Some(l) = http {
                    let d = dialer.clone();
                    role.spawn(
                        l,
                        PROXY_MAX_CONNECTIONS,
                        None,
                        "http proxy",
                        move |s, _p| {
                            let d = d.clone();
                            async move {
                                let _ = forward::http_session(s, d.as_ref()).await;
                            }
                        },
                    );
                }
                info!(socks5 = ?role.pair.first, http = ?role.pair.second, "proxy listening");
                Ok(role)
            }
        };
        replace_role(&mut self.edge.proxy, pair, "proxy", start).await
    }

    /// Re-apply persisted roles at start-up.
    pub(super) async fn start_edge(&mut self) {
        self.publish_routes().await;
        self.start_mesh_side();
        if let Err(e) = self.apply_gateway(self.settings.gateway.clone()).await {
            error!(error = %e.message, "gateway not started");
        }
        if let Err(e) = self.apply_proxy(self.settings.proxy.clone()).await {
            error!(error = %e.message, "proxy not started");
        }
    }

    pub(super) async fn expose(&mut self, r: ExposeRequest) -> ApiResult {
        let host = r.hostname.trim().trim_end_matches('.').to_ascii_lowercase();
        if !is_hostname_pattern(&host) {
            return Err(ApiFailure::bad_request(format!(
                "{:?} is not a valid DNS name: use labels of a-z, 0-9 and '-' (e.g. app.example.com), \
                 or a wildcard like *.example.com",
                r.hostname
            )));
        }
        let to = r.to.ok_or_else(|| {
            ApiFailure::bad_request(
                "--to ADDR:PORT is required (where the workload listens on this node)",
            )
        })?;
        let replaced = self.settings.exposed.iter().any(|e| e.hostname == host);
        self.settings.exposed.retain(|e| e.hostname != host);
        self.settings.exposed.push(Exposed {
            hostname: host.clone(),
            to,
            http_to: r.http_to,
            proxy_protocol: r.proxy_protocol,
        });
        self.settings
            .exposed
            .sort_by(|a, b| a.hostname.cmp(&b.hostname));
        self.save_settings()?;
        self.publish_routes().await;
        info!(%host, %to, proxy_protocol = r.proxy_protocol, "hostname exposed");
        Ok(serde_json::json!({ "hostname": host, "to": to.to_string(), "replaced": replaced }))
    }

    pub(super) async fn unexpose(&mut self, r: ExposeRequest) -> ApiResult {
        let host = r.hostname.trim().trim_end_matches('.').to_ascii_lowercase();
        if !self.settings.exposed.iter().any(|e| e.hostname == host) {
            return Err(ApiFailure::not_found(format!(
                "this node does not expose {host:?}; `meshctl status` lists what it exposes"
            )));
        }
        self.settings.exposed.retain(|e| e.hostname != host);
        self.save_settings()?;
        self.publish_routes().await;
        info!(%host, "hostname withdrawn");
        Ok(serde_json::json!({ "hostname": host }))
    }

    pub(super) async fn gateway_request(&mut self, r: ListenRequest) -> ApiResult {
        let pair = listen_pair(
            &r,
            "gateway",
            ([0, 0, 0, 0], 443).into(),
            ([0, 0, 0, 0], 80).into(),
        )?;
        self.apply_gateway(pair.clone()).await?;
        self.settings.gateway = pair.clone();
        self.save_settings()?;
        Ok(pair_json(&pair, "https", "http"))
    }

    pub(super) async fn proxy_request(&mut self, r: ListenRequest) -> ApiResult {
        let pair = listen_pair(
            &r,
            "proxy",
            ([127, 0, 0, 1], 1080).into(),
            ([127, 0, 0, 1], 3128).into(),
        )?;
        let public: Vec<SocketAddr> = pair
            .iter()
            .flat_map(|p| [p.first, p.second])
            .flatten()
            .filter(|a| !a.ip().is_loopback())
            .collect();
        if !public.is_empty() && !r.allow_public {
            return Err(ApiFailure::bad_request(format!(
                "listening on {} would let anyone who reaches that address into the mesh; pass \
                 --allow-public if that is what you want",
                public
                    .iter()
                    .map(|a| a.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        if !public.is_empty() {
            warn!(addresses = ?public, "the proxy listens on non-loopback addresses: anyone who reaches them reaches the mesh");
        }
        self.apply_proxy(pair.clone()).await?;
        self.settings.proxy = pair.clone();
        self.save_settings()?;
        Ok(pair_json(&pair, "socks5", "http"))
    }

    pub(super) async fn exit_node_request(&mut self, r: ToggleRequest) -> ApiResult {
        self.settings.exit_node = r.enable;
        self.save_settings()?;
        self.publish_routes().await;
        info!(enabled = r.enable, "exit node setting changed");
        Ok(serde_json::json!({ "exit_node": r.enable }))
    }

    pub(super) fn edge_status(&self) -> EdgeStatus {
        let view = |p: &ListenPair| ListenView {
            first: p.first.map(|a| a.to_string()),
            second: p.second.map(|a| a.to_string()),
        };
        EdgeStatus {
            exposed: self
                .settings
                .exposed
                .iter()
                .map(|e| ExposedView {
                    hostname: e.hostname.clone(),
                    to: e.to.to_string(),
                    http_to: e.http_to.map(|a| a.to_string()),
                    proxy_protocol: e.proxy_protocol,
                })
                .collect(),
            gateway: self.edge.gateway.as_ref().map(|r| view(&r.pair)),
            proxy: self.edge.proxy.as_ref().map(|r| view(&r.pair)),
            exit_node: self.settings.exit_node,
        }
    }
}
