//! The node's edge roles: serving exposed hostnames, the public gateway, the local proxy and the
//! exit node. [`EdgeRoles`] owns their listeners and the channels their tasks read: the routing
//! view (from the node's [`Snapshot`]), what this node exposes, and whether it is an exit. Which
//! roles are on persists in settings.json; the API changes them.

mod requests;
mod role;

pub use requests::{exposure, listen_pair, normalize_hostname, proxy_pair, GATEWAY_DEFAULT};

use super::snapshot::Snapshot;
use crate::control::{ApiFailure, EdgeStatus, ExposedView, ListenView};
use crate::id::MeshRange;
use crate::mesh::linux::bind_tcp_on_device;
use crate::proxy::dial::{Dialer, MeshDialer};
use crate::proxy::gateway::{self, Gateway};
use crate::proxy::listen::accept_loop;
use crate::proxy::routes::MeshView;
use crate::proxy::serve::Exposed;
use crate::proxy::{exit, forward, serve, EXIT_PORT, SERVE_PORT};
use crate::state::{ListenPair, Settings};
use role::{bind, replace_role, Role};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info};

const MESH_SIDE_MAX_CONNECTIONS: usize = 4096;
const PROXY_MAX_CONNECTIONS: usize = 1024;
const MESH_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Listeners of the edge roles and the channels their tasks read.
pub struct EdgeRoles {
    view_tx: watch::Sender<Arc<MeshView>>,
    exposed_tx: watch::Sender<Arc<Vec<Exposed>>>,
    exit_tx: watch::Sender<bool>,
    mesh_side: Option<CancellationToken>,
    gateway: Option<Role>,
    proxy: Option<Role>,
}

impl Default for EdgeRoles {
    fn default() -> Self {
        EdgeRoles {
            view_tx: watch::channel(Arc::new(MeshView::default())).0,
            exposed_tx: watch::channel(Arc::new(Vec::new())).0,
            exit_tx: watch::channel(false).0,
            mesh_side: None,
            gateway: None,
            proxy: None,
        }
    }
}

impl EdgeRoles {
    /// The dialer `meshctl nc` and the proxies use.
    pub fn dialer(&self) -> Arc<dyn Dialer> {
        Arc::new(MeshDialer {
            view: self.view_tx.subscribe(),
            connect_timeout: MESH_CONNECT_TIMEOUT,
        })
    }

    /// Route by this snapshot from now on (listeners see it at their next connection).
    pub fn update(&self, snap: &Snapshot) {
        if **self.view_tx.borrow() != *snap.routes {
            self.view_tx.send_replace(snap.routes.clone());
        }
    }

    /// What this node serves and whether it is an exit, for the mesh-side listeners.
    pub fn set_offers(&self, settings: &Settings) {
        self.exposed_tx
            .send_replace(Arc::new(settings.exposed.clone()));
        self.exit_tx.send_replace(settings.exit_node);
    }

    /// Start every role `settings` turn on (at start-up), reporting the ones that fail.
    pub async fn start(&mut self, settings: &Settings) {
        self.set_offers(settings);
        if let Err(e) = self.apply_gateway(settings.gateway.clone()).await {
            error!(error = %e.message, "gateway not started");
        }
        if let Err(e) = self.apply_proxy(settings.proxy.clone()).await {
            error!(error = %e.message, "proxy not started");
        }
    }

    pub fn stop_all(&mut self) {
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

    /// Listeners on the mesh address: gateway handoffs and exit requests. Restarted when the
    /// node's address changes.
    pub fn start_mesh_side(&mut self, ip: Ipv4Addr, tun: &str, name: &str, range: MeshRange) {
        if let Some(t) = self.mesh_side.take() {
            t.cancel();
        }
        let stop = CancellationToken::new();
        for (port, what) in [
            (SERVE_PORT, "gateway handoffs"),
            (EXIT_PORT, "exit requests"),
        ] {
            let l = match bind_tcp_on_device(SocketAddr::from((ip, port)), tun)
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
            let view = self.view_tx.subscribe();
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
                let exposed = self.exposed_tx.subscribe();
                Arc::new(move |s, p| Box::pin(serve::session(exposed.clone(), s, p)))
            } else {
                let enabled = self.exit_tx.subscribe();
                let name = name.to_string();
                let mesh = range;
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
        self.mesh_side = Some(stop);
    }

    /// Start (or stop, with `None`) the public gateway listeners.
    pub async fn apply_gateway(&mut self, pair: Option<ListenPair>) -> Result<(), ApiFailure> {
        let gw = Gateway::new(self.view_tx.subscribe());
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
        replace_role(&mut self.gateway, pair, "gateway", start).await
    }

    /// Start (or stop) the local proxy listeners.
    pub async fn apply_proxy(&mut self, pair: Option<ListenPair>) -> Result<(), ApiFailure> {
        let dialer = self.dialer();
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
        replace_role(&mut self.proxy, pair, "proxy", start).await
    }

    pub fn status(&self, settings: &Settings) -> EdgeStatus {
        let view = |p: &ListenPair| ListenView {
            first: p.first.map(|a| a.to_string()),
            second: p.second.map(|a| a.to_string()),
        };
        EdgeStatus {
            exposed: settings
                .exposed
                .iter()
                .map(|e| ExposedView {
                    hostname: e.hostname.clone(),
                    to: e.to.to_string(),
                    http_to: e.http_to.map(|a| a.to_string()),
                    proxy_protocol: e.proxy_protocol,
                })
                .collect(),
            gateway: self.gateway.as_ref().map(|r| view(&r.pair)),
            proxy: self.proxy.as_ref().map(|r| view(&r.pair)),
            exit_node: settings.exit_node,
        }
    }
}
