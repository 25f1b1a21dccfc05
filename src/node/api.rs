//! The control API as the node answers it: one handler per call, each checking the request with
//! a pure function first (so a bad request changes nothing), then changing the one part it is
//! about, persisting settings, and publishing what other nodes must learn. Replies are typed
//! ([`ApiReply`]).

use super::platform::Platform;
use super::snapshot::{MemberRow, Snapshot};
use super::traversal::Mapping;
use super::{admin, edge, report, services, traverser, Exit, Node, NodeError};
use crate::constants::GOSSIP_PORT;
use crate::control::{
    ApiCall, ApiFailure, ApiReply, ApiRequest, ExitNodeResponse, ExposeRequest, ExposeResponse,
    GatewayResponse, InviteRequest, InviteResponse, LeaveResponse, ListenRequest, NatMapping,
    NetcheckReport, ObservationView, PingResponse, ProxyResponse, RelayReport, RelayResponse,
    RelaySessionView, RemoveRequest, RemoveResponse, SelfStatus, ServiceAddRequest,
    ServiceAddResponse, ServiceRemoveRequest, ServiceRemoveResponse, StatusReport, ToggleRequest,
    UnexposeResponse,
};
use crate::gossip::Liveness;
use crate::mesh::addressing::subnet_string;
use crate::mesh::path::PathKind;
use crate::state::{ListenPair, STATE_VERSION};
use crate::util::{b64, unix_now, unix_now_ms};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Instant;
use tracing::{info, warn};

/// `meshd leave` pushes the departure to every member four times, this far apart.
const LEAVE_PUSH_SPACING: std::time::Duration = std::time::Duration::from_millis(250);

impl<P: Platform> Node<P> {
    /// Answer one call; `Some(exit)` when the node must stop (after `leave`).
    pub(super) async fn on_api(&mut self, call: ApiCall) -> Result<Option<Exit>, NodeError> {
        // A ping waits for the network: answered by a task of its own, the loop goes on.
        let call = match call.request {
            ApiRequest::Ping(r) => {
                self.ping(&r.node, call.reply);
                return Ok(None);
            }
            request => ApiCall {
                request,
                reply: call.reply,
            },
        };
        let mut exit = None;
        let result = match call.request {
            ApiRequest::Status => Ok(ApiReply::Status(Box::new(self.status()))),
            ApiRequest::Invite(r) => self.invite(r).map(ApiReply::Invite),
            ApiRequest::Remove(r) => self.remove(r).await.map(ApiReply::Remove),
            ApiRequest::Dns => Ok(ApiReply::Dns(self.dns.report(&self.view.m().params.domain))),
            ApiRequest::Services => Ok(ApiReply::Services(self.view.snapshot().services())),
            ApiRequest::ServiceAdd(r) => self.service_add(r).await.map(ApiReply::ServiceAdd),
            ApiRequest::ServiceRemove(r) => {
                self.service_remove(r).await.map(ApiReply::ServiceRemove)
            }
            ApiRequest::Expose(r) => self.expose(r).await.map(ApiReply::Expose),
            ApiRequest::Unexpose(r) => self.unexpose(r).await.map(ApiReply::Unexpose),
            ApiRequest::Gateway(r) => self.gateway(r).await.map(ApiReply::Gateway),
            ApiRequest::Proxy(r) => self.proxy(r).await.map(ApiReply::Proxy),
            ApiRequest::ExitNode(r) => self.exit_node(r).await.map(ApiReply::ExitNode),
            ApiRequest::Relay(r) => self.relay(r).map(ApiReply::Relay),
            ApiRequest::Config(r) => self.set_config(r).await.map(ApiReply::Config),
            ApiRequest::LogLevel(r) => match crate::logging::set(&r.level) {
                Ok(()) => {
                    info!(level = %r.level, "log level changed");
                    Ok(ApiReply::LogLevel(crate::control::LogLevelResponse {
                        level: r.level,
                    }))
                }
                Err(m) => Err(ApiFailure::bad_request(m)),
            },
            ApiRequest::Metrics => {
                let snap = self.view.snapshot();
                let rtt = self
                    .nat
                    .view
                    .lock()
                    .unwrap()
                    .rtt
                    .iter()
                    .filter_map(|(id, d)| Some((snap.member(id)?.name.clone(), d.as_secs_f64())))
                    .collect();
                Ok(ApiReply::Metrics(super::metrics::render(
                    &self.status(),
                    &self.netcheck(),
                    &rtt,
                )))
            }
            ApiRequest::Discovery => Ok(ApiReply::Discovery(super::metrics::discovery(
                &self.status(),
            ))),
            ApiRequest::Netcheck => Ok(ApiReply::Netcheck(self.netcheck())),
            ApiRequest::Workloads => Ok(ApiReply::Workloads(self.workloads_report())),
            ApiRequest::WorkloadsSet(r) => self.workloads_set(r).await.map(ApiReply::Workloads),
            ApiRequest::WorkloadAdd(r) => self.workload_add(r).await.map(ApiReply::Workload),
            ApiRequest::WorkloadRemove(r) => self.workload_remove(r).await.map(ApiReply::Workload),
            ApiRequest::Ping(_) => unreachable!("answered above"),
            ApiRequest::Leave => {
                let r = self.leave().await;
                exit = Some(Exit::Left);
                Ok(ApiReply::Leave(r))
            }
        };
        // Whatever the call changed in the view (a removal, a service), the data plane, DNS
        // and the edge follow before the reply goes out.
        self.refresh().await?;
        let _ = call.reply.send(result);
        Ok(exit)
    }

    /// `meshctl ping`: one round trip through the tunnel, answered on `reply` by a task.
    fn ping(&self, query: &str, reply: tokio::sync::oneshot::Sender<Result<ApiReply, ApiFailure>>) {
        let snap = self.view.snapshot();
        let row = match find_member(snap, query) {
            Ok(r) => r,
            Err(f) => {
                let _ = reply.send(Err(f));
                return;
            }
        };
        let Some(t) = &self.traverser else {
            let _ = reply.send(Err(ApiFailure::internal(
                "this node runs no path task (see its log)",
            )));
            return;
        };
        let (id, name) = (row.id, row.name.clone());
        let mesh_ip = row
            .slot
            .map(|s| snap.params.range.node_ip(s).to_string())
            .unwrap_or_default();
        let requests = t.requests.clone();
        let device = self.plane.device.clone();
        let snap = snap.clone();
        tokio::spawn(async move {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let asked = requests
                .send(traverser::Request::Ping {
                    node: id,
                    reply: tx,
                })
                .await;
            let rtt = match asked {
                Ok(()) => rx.await.ok().flatten(),
                Err(_) => None,
            };
            let (kind, direct) = match device.peer_by_node(&id) {
                Some(p) => {
                    let paths = p.paths.lock().unwrap();
                    (paths.kind(), paths.current())
                }
                None => (PathKind::Direct, None),
            };
            let endpoint = match kind {
                PathKind::Relay(r) => Some(r.via),
                PathKind::Direct => direct,
            }
            .map(|e| e.to_string());
            let r = match rtt {
                Some(rtt) => Ok(ApiReply::Ping(PingResponse {
                    name,
                    mesh_ip,
                    path: report::path_name(&kind).into(),
                    relay: report::relay_name(&kind, &snap),
                    endpoint,
                    rtt_us: rtt.as_micros() as u64,
                })),
                None => Err(ApiFailure {
                    status: 504,
                    message: format!(
                        "no answer from {name} ({mesh_ip}) within {} s: no working path to it \
                         (last tried {}); `meshctl status` shows its state",
                        traverser::PING_TIMEOUT.as_secs(),
                        endpoint.as_deref().unwrap_or("no endpoint")
                    ),
                }),
            };
            let _ = reply.send(r);
        });
    }

    /// `meshctl netcheck`: what members see of this node.
    fn netcheck(&self) -> NetcheckReport {
        let v = self.nat.view.lock().unwrap().clone();
        let snap = self.view.snapshot();
        let now = Instant::now();
        let own = self.publisher.endpoints();
        let mut observations: Vec<ObservationView> = v
            .observations
            .iter()
            .map(|(id, o)| ObservationView {
                observer: snap
                    .member(id)
                    .map(|r| r.name.clone())
                    .unwrap_or_else(|| id.to_string()),
                observer_at: o.observer_at.to_string(),
                seen: o.seen.to_string(),
                age_secs: now.saturating_duration_since(o.at).as_secs(),
            })
            .collect();
        observations.sort_by(|a, b| a.observer.cmp(&b.observer));
        let local = self.local_endpoints();
        let behind_nat = (!v.observations.is_empty())
            .then(|| v.observations.iter().any(|(_, o)| !local.contains(&o.seen)));
        NetcheckReport {
            endpoints: own.iter().map(|e| e.to_string()).collect(),
            observations,
            mapping: match v.mapping {
                Mapping::Unknown => NatMapping::Unknown,
                Mapping::Independent => NatMapping::EndpointIndependent,
                Mapping::Dependent => NatMapping::EndpointDependent,
            },
            behind_nat,
            punches_sent: v.punches_sent,
            punches_answered: v.punches_answered,
            dropped: v.dropped,
            port_reachable: v.port_reachable,
            relay: self.relay_report(&v),
        }
    }

    fn relay_report(&self, v: &super::traverser::NatView) -> RelayReport {
        let snap = self.view.snapshot();
        let name = |id: &crate::id::NodeId| {
            snap.member(id)
                .map(|r| r.name.clone())
                .unwrap_or_else(|| id.to_string())
        };
        let device = &self.plane.device;
        let c = &device.counters;
        let get = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        let mut sessions: Vec<RelaySessionView> = v
            .relay_sessions
            .iter()
            .map(|(s, a, b)| {
                let ends = device.relay_ends(*s);
                RelaySessionView {
                    session: format!("{s:016x}"),
                    between: [name(a), name(b)],
                    endpoints: [
                        ends.map(|e| e[0].to_string()),
                        ends.map(|e| e[1].to_string()),
                    ],
                }
            })
            .collect();
        sessions.sort_by(|x, y| x.between.cmp(&y.between));
        RelayReport {
            enabled: self
                .relay_enabled
                .load(std::sync::atomic::Ordering::Relaxed),
            sessions,
            forwarded_packets: get(&c.relayed_packets),
            forwarded_bytes: get(&c.relayed_bytes),
            dropped_unknown: get(&c.dropped_relay_unknown),
            dropped_unbound: get(&c.dropped_relay_unbound),
            dropped_rate: get(&c.dropped_relay_rate),
            refused: v.relay_refused,
        }
    }

    fn status(&self) -> StatusReport {
        let snap = self.view.snapshot();
        let stats: HashMap<_, _> = self
            .plane
            .device
            .stats()
            .into_iter()
            .map(|s| (s.node_id, s))
            .collect();
        let l = &self.local;
        let me = SelfStatus {
            name: l.cert.name.clone(),
            node_id: l.cert.node_id.to_string(),
            mesh_ip: self.mesh_ip().to_string(),
            subnet: subnet_string(&snap.params.range, l.slot),
            wg_key: b64(&l.cert.wireguard),
            port: l.config.port,
            endpoints: self
                .publisher
                .endpoints()
                .iter()
                .map(|e| e.to_string())
                .collect(),
            admin: l.root.is_some(),
            tun: l.config.tun.clone(),
            version: crate::constants::VERSION.to_string(),
        };
        let mut s = report::status(
            me,
            snap,
            &stats,
            self.view.m().revocations().count(),
            self.dns.status(&snap.params.domain),
            self.edge.status(&self.settings),
            report::drops(&self.plane.device.counters),
        );
        let device = &self.plane.device;
        s.lanes = report::lanes(device.lanes(), &device.counters);
        s.tun = report::tun(&device.counters);
        // Round trips the path task measured (through each tunnel, every 15 s).
        let rtt: HashMap<String, f64> = self
            .nat
            .view
            .lock()
            .unwrap()
            .rtt
            .iter()
            .map(|(id, d)| (id.to_string(), d.as_secs_f64() * 1000.0))
            .collect();
        for p in &mut s.peers {
            p.rtt_ms = rtt.get(&p.node_id).copied();
        }
        s
    }

    fn invite(&self, r: InviteRequest) -> Result<InviteResponse, ApiFailure> {
        let snap = self.view.snapshot();
        let stats: HashMap<_, _> = self
            .plane
            .device
            .stats()
            .into_iter()
            .map(|s| (s.node_id, s))
            .collect();
        let bootstrap = admin::bootstrap_list(
            self.publisher.endpoints(),
            self.local.keys.wg_public(),
            snap,
            &stats,
        );
        let token = admin::invite(
            self.local.root.as_ref(),
            &r,
            snap,
            bootstrap.clone(),
            unix_now(),
        )?;
        info!(expires_in = ?(token.invite.expires_at - token.invite.created_at), uses = ?r.uses, "invite created");
        Ok(InviteResponse {
            token: token.encode(),
            expires_at: token.invite.expires_at,
            uses: r.uses,
            bootstrap: bootstrap.iter().map(|b| b.addr.to_string()).collect(),
        })
    }

    async fn remove(&mut self, r: RemoveRequest) -> Result<RemoveResponse, ApiFailure> {
        let rev = admin::removal(self.local.root.as_ref(), self.view.m(), &r, unix_now())?;
        self.view
            .m_mut()
            .ingest_revocation(&rev.raw)
            .map_err(|e| ApiFailure::internal(e.to_string()))?;
        let _ = self.view.persist(&self.local.state, Instant::now());
        info!(node = %rev.body.name, id = %rev.node_id, "member removed; revocation spreading");
        Ok(RemoveResponse {
            name: rev.body.name.clone(),
            node_id: rev.node_id.to_string(),
        })
    }

    /// Write settings.json (services and the edge roles).
    pub(super) fn save_settings(&mut self) -> Result<(), ApiFailure> {
        self.settings.version = STATE_VERSION;
        self.local
            .state
            .save_settings(&self.settings)
            .map_err(|e| ApiFailure::internal(format!("saving settings: {e}")))
    }

    async fn publish_services(&mut self) {
        let p = self
            .publisher
            .services(self.settings.services.clone(), unix_now_ms());
        self.publish(p).await;
    }

    async fn service_add(
        &mut self,
        r: ServiceAddRequest,
    ) -> Result<ServiceAddResponse, ApiFailure> {
        let range = self.view.m().params.range;
        let def = services::service_def(&r, &range, self.local.slot)?;
        let s = &mut self.settings.services;
        let replaced = s.iter().any(|x| x.name == def.name);
        s.retain(|x| x.name != def.name);
        s.push(def);
        s.sort();
        self.save_settings()?;
        self.publish_services().await;
        info!(service = %r.name, port = r.port, "service published");
        Ok(ServiceAddResponse {
            address: r.address.unwrap_or(self.mesh_ip()).to_string(),
            dns: format!("{}.svc.{}", r.name, self.view.m().params.domain),
            name: r.name,
            port: r.port,
            replaced,
        })
    }

    async fn service_remove(
        &mut self,
        r: ServiceRemoveRequest,
    ) -> Result<ServiceRemoveResponse, ApiFailure> {
        if !self.settings.services.iter().any(|s| s.name == r.name) {
            return Err(ApiFailure::not_found(format!(
                "this node publishes no service {:?}; `meshctl service ls` lists them",
                r.name
            )));
        }
        self.settings.services.retain(|s| s.name != r.name);
        self.save_settings()?;
        self.publish_services().await;
        info!(service = %r.name, "service withdrawn");
        Ok(ServiceRemoveResponse { name: r.name })
    }

    async fn expose(&mut self, r: ExposeRequest) -> Result<ExposeResponse, ApiFailure> {
        let e = edge::exposure(&r)?;
        let (host, to) = (e.hostname.clone(), e.to);
        let exposed = &mut self.settings.exposed;
        let replaced = exposed.iter().any(|x| x.hostname == host);
        exposed.retain(|x| x.hostname != host);
        exposed.push(e);
        exposed.sort_by(|a, b| a.hostname.cmp(&b.hostname));
        self.save_settings()?;
        self.publish_routes().await;
        info!(%host, %to, proxy_protocol = r.proxy_protocol, "hostname exposed");
        Ok(ExposeResponse {
            hostname: host,
            to: to.to_string(),
            replaced,
        })
    }

    async fn unexpose(&mut self, r: ExposeRequest) -> Result<UnexposeResponse, ApiFailure> {
        let host = edge::normalize_hostname(&r.hostname);
        if !self.settings.exposed.iter().any(|e| e.hostname == host) {
            return Err(ApiFailure::not_found(format!(
                "this node does not expose {host:?}; `meshctl status` lists what it exposes"
            )));
        }
        self.settings.exposed.retain(|e| e.hostname != host);
        self.save_settings()?;
        self.publish_routes().await;
        info!(%host, "hostname withdrawn");
        Ok(UnexposeResponse { hostname: host })
    }

    async fn gateway(&mut self, r: ListenRequest) -> Result<GatewayResponse, ApiFailure> {
        let (https, http) = edge::GATEWAY_DEFAULT;
        let pair = edge::listen_pair(&r, "gateway", https, http)?;
        self.edge.apply_gateway(pair.clone()).await?;
        self.settings.gateway = pair.clone();
        self.save_settings()?;
        let (enabled, https, http) = pair_view(&pair);
        Ok(GatewayResponse {
            enabled,
            https,
            http,
        })
    }

    async fn proxy(&mut self, r: ListenRequest) -> Result<ProxyResponse, ApiFailure> {
        let (pair, public) = edge::proxy_pair(&r)?;
        if !public.is_empty() {
            warn!(addresses = ?public, "the proxy listens on non-loopback addresses: anyone who reaches them reaches the mesh");
        }
        self.edge.apply_proxy(pair.clone()).await?;
        self.settings.proxy = pair.clone();
        self.save_settings()?;
        let (enabled, socks5, http) = pair_view(&pair);
        Ok(ProxyResponse {
            enabled,
            socks5,
            http,
        })
    }

    /// `meshctl set`: check every field first (a bad one changes nothing), then save them all.
    /// Endpoints and DNS upstreams apply at once (a new record; DNS restarted on the same
    /// address); the port and TUN device are bound at start, so those wait for a restart.
    async fn set_config(
        &mut self,
        r: crate::control::ConfigRequest,
    ) -> Result<crate::control::ConfigResponse, ApiFailure> {
        use super::setup::parse_endpoint;
        // Compared with what is saved: a port or TUN set earlier for the next start included.
        let mut c = self.local.config.clone();
        if let Some((port, tun)) = &self.local.next_start {
            c.port = *port;
            c.tun = tun.clone();
        }
        let mut changed = Vec::new();
        let list = |v: &[SocketAddr]| {
            if v.is_empty() {
                "(default)".to_string()
            } else {
                v.iter()
                    .map(|a| a.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            }
        };
        if let Some(port) = r.port {
            if port == 0 {
                return Err(ApiFailure::bad_request("--port must be 1-65535"));
            }
            if port != c.port {
                changed.push(format!("port: {} -> {port}", c.port));
                c.port = port;
            }
        }
        // A list given replaces the one kept; each address is checked first.
        let mut replace = |given: Option<Vec<String>>,
                           kept: &mut Vec<SocketAddr>,
                           default_port: u16,
                           what: &str|
         -> Result<(), ApiFailure> {
            let Some(given) = given else { return Ok(()) };
            let parsed = given
                .iter()
                .map(|e| {
                    parse_endpoint(e, default_port)
                        .map_err(|m| ApiFailure::bad_request(format!("--{what}: {m}")))
                })
                .collect::<Result<Vec<_>, _>>()?;
            if parsed != *kept {
                changed.push(format!("{what}: {} -> {}", list(kept), list(&parsed)));
                *kept = parsed;
            }
            Ok(())
        };
        let port = c.port;
        replace(r.endpoints, &mut c.endpoints, port, "endpoint")?;
        replace(r.dns_upstream, &mut c.dns_upstream, 53, "dns-upstream")?;
        if let Some(tun) = r.tun {
            crate::util::check_ifname("--tun", &tun).map_err(ApiFailure::bad_request)?;
            if tun != c.tun {
                changed.push(format!("tun: {} -> {tun}", c.tun));
                c.tun = tun;
            }
        }
        if changed.is_empty() {
            return Ok(crate::control::ConfigResponse {
                changed,
                restart_needed: false,
            });
        }
        let endpoints_changed = c.endpoints != self.local.config.endpoints;
        let upstreams_changed = c.dns_upstream != self.local.config.dns_upstream;
        // What runs keeps the port and TUN it was started with until the restart.
        let running = (self.local.config.port, self.local.config.tun.clone());
        let next = (c.port, c.tun.clone());
        let before = (self.local.config.clone(), self.local.next_start.clone());
        self.local.next_start = (next != running).then_some(next);
        let restart_needed = self.local.next_start.is_some();
        self.local.config = crate::state::NodeConfig {
            port: running.0,
            tun: running.1,
            ..c
        };
        if let Err(e) = self.local.save_config() {
            (self.local.config, self.local.next_start) = before;
            return Err(ApiFailure::internal(format!("saving node.json: {e}")));
        }
        if endpoints_changed {
            self.refresh_endpoints().await;
        }
        if upstreams_changed
            && self
                .dns
                .set_upstream(self.local.config.dns_upstream.clone())
        {
            self.restart_dns().await;
        }
        info!(?changed, restart_needed, "configuration changed");
        Ok(crate::control::ConfigResponse {
            changed,
            restart_needed,
        })
    }

    fn relay(&mut self, r: ToggleRequest) -> Result<RelayResponse, ApiFailure> {
        self.settings.relay_disabled = !r.enable;
        self.save_settings()?;
        self.relay_enabled
            .store(r.enable, std::sync::atomic::Ordering::Relaxed);
        info!(enabled = r.enable, "relay setting changed");
        Ok(RelayResponse { relay: r.enable })
    }

    async fn exit_node(&mut self, r: ToggleRequest) -> Result<ExitNodeResponse, ApiFailure> {
        self.settings.exit_node = r.enable;
        self.save_settings()?;
        self.publish_routes().await;
        info!(enabled = r.enable, "exit node setting changed");
        Ok(ExitNodeResponse {
            exit_node: r.enable,
        })
    }

    /// Announce the departure, push it to every member directly, and give gossip a few rounds
    /// to carry it further.
    async fn leave(&mut self) -> LeaveResponse {
        self.publisher.leave();
        self.publish_record().await;
        let snap = self.view.snapshot().clone();
        let range = snap.params.range;
        let targets: Vec<SocketAddr> = snap
            .members
            .iter()
            .filter(|r| !r.is_self && r.liveness != Liveness::Dead)
            .filter_map(|r| r.slot)
            .map(|slot| SocketAddr::from((range.node_ip(slot), GOSSIP_PORT)))
            .collect();
        if !targets.is_empty() {
            for round in 0..4 {
                if let Some(g) = &self.gossip {
                    for t in &targets {
                        g.gossip_now(*t);
                    }
                }
                tokio::time::sleep(LEAVE_PUSH_SPACING).await;
                tracing::debug!(round, "departure pushed");
            }
        }
        info!("left the mesh");
        LeaveResponse {
            name: self.local.cert.name.clone(),
            subnet: subnet_string(&range, self.local.slot),
            pid: std::process::id(),
        }
    }
}

/// Whether a role is on, and its two listen addresses.
fn pair_view(p: &Option<ListenPair>) -> (bool, Option<String>, Option<String>) {
    let addr = |a: Option<SocketAddr>| a.map(|a| a.to_string());
    (
        p.is_some(),
        p.as_ref().and_then(|p| addr(p.first)),
        p.as_ref().and_then(|p| addr(p.second)),
    )
}

/// The member a command names: by name, DNS name, mesh address or node id.
pub(super) fn find_member<'a>(
    snap: &'a Snapshot,
    query: &str,
) -> Result<&'a MemberRow, ApiFailure> {
    let q = query.trim().trim_end_matches('.');
    let domain = format!(".{}", snap.params.domain);
    let q = q.strip_suffix(domain.as_str()).unwrap_or(q);
    let ip: Option<std::net::Ipv4Addr> = q.parse().ok();
    let found = snap.members.iter().filter(|r| !r.is_self).find(|r| {
        r.dns_name == q
            || r.id.to_string() == q
            || ip.is_some_and(|ip| r.slot.map(|s| snap.params.range.node_ip(s)) == Some(ip))
    });
    let found = found.or_else(|| {
        let mut by_name = snap.members.iter().filter(|r| !r.is_self && r.name == q);
        match (by_name.next(), by_name.next()) {
            (Some(r), None) => Some(r),
            _ => None,
        }
    });
    match found {
        Some(r) => Ok(r),
        None if snap
            .members
            .iter()
            .any(|r| r.is_self && (r.name == q || r.dns_name == q)) =>
        {
            Err(ApiFailure::bad_request(format!("{q} is this node")))
        }
        None => Err(ApiFailure::not_found(format!(
            "no member named {q:?} (a name, NAME.{}, a mesh address or a node id)",
            snap.params.domain
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::fixtures::World;

    /// `meshctl ping` names a member as people write it: its name, its DNS name (with or
    /// without the domain and a trailing dot), its mesh address or its node id; this node and
    /// strangers get clear errors.
    #[test]
    fn members_are_found_by_any_of_their_names() {
        let w = World::new("10.210.0.0/16");
        let (m, members) = w.mesh(3);
        let snap = Snapshot::of(&m);
        let n1 = &members[1].1;
        let ip = snap
            .params
            .range
            .node_ip(snap.member(&n1.node_id).unwrap().slot.unwrap())
            .to_string();
        let id = n1.node_id.to_string();
        for q in [
            "n1",
            "n1.mesh.internal",
            "n1.mesh.internal.",
            " n1 ",
            &ip,
            &id,
        ] {
            let r = find_member(&snap, q).unwrap_or_else(|e| panic!("{q:?}: {}", e.message));
            assert_eq!(r.id, n1.node_id, "{q:?}");
        }
        let me = find_member(&snap, "n0").unwrap_err();
        assert_eq!(me.status, 400);
        assert!(me.message.contains("is this node"), "{}", me.message);
        let none = find_member(&snap, "nobody").unwrap_err();
        assert_eq!(none.status, 404);
        assert!(none.message.contains("no member named"), "{}", none.message);
    }
}
