//! The mesh DNS role of the node: the server on the node's mesh address, the zone it serves
//! (following the snapshot), and the host's resolver integration. It owns all of that; the node
//! tells it where to listen and what the zone is.

use crate::control::{DnsRecordView, DnsReport, DnsStatus};
use crate::dns::resolved::Resolved;
use crate::dns::zone::{self, ZoneInput};
use crate::dns::{upstream, DnsServer};
use crate::id::MeshRange;
use std::net::{Ipv4Addr, SocketAddr};
use tracing::{error, info, warn};

/// DNS port on the mesh address.
pub const DNS_PORT: u16 = 53;

pub struct DnsRole {
    tun: String,
    tun_index: u32,
    /// Configured upstreams (empty: the host's).
    upstream: Vec<SocketAddr>,
    server: Option<DnsServer>,
    /// The zone being served.
    zone: Option<ZoneInput>,
    /// Why DNS is not serving, if it is not.
    error: Option<String>,
    /// How the host resolves the mesh domain.
    host: String,
    resolved: Option<Resolved>,
    /// The workloads' bridge (name, interface index), when there is one: DNS answers there
    /// too (on the same `.1`).
    bridge: Option<(String, u32)>,
}

impl DnsRole {
    pub fn new(tun: &str, tun_index: u32, upstream: Vec<SocketAddr>) -> DnsRole {
        DnsRole {
            tun: tun.to_string(),
            tun_index,
            upstream,
            server: None,
            zone: None,
            error: None,
            host: String::new(),
            resolved: None,
            bridge: None,
        }
    }

    /// (Re)start the server on `ip` (the node's mesh address, which moves with its /24).
    pub async fn start(&mut self, ip: Ipv4Addr, zone: &ZoneInput, range: &MeshRange) {
        if let Some(d) = self.server.take() {
            d.stop().await;
        }
        let upstreams = upstream::discover(&self.upstream, range);
        if upstreams.is_empty() {
            warn!("no upstream DNS server found (resolv.conf); names outside the mesh will not resolve through meshd");
        }
        let also: Vec<&str> = self.bridge.iter().map(|(b, _)| b.as_str()).collect();
        match DnsServer::start(ip, DNS_PORT, &self.tun, &also, zone, upstreams).await {
            Ok(d) => {
                self.server = Some(d);
                self.zone = Some(zone.clone());
                self.error = None;
            }
            Err(e) => {
                error!(error = %e, "mesh DNS is not serving");
                self.error = Some(format!("{e:#}"));
            }
        }
        self.register_with_host(&zone.domain).await;
    }

    /// Forward to `upstream` from now on (empty: the host's resolvers). Whether the server
    /// must be started again to use them (it is running, or failed).
    pub fn set_upstream(&mut self, upstream: Vec<SocketAddr>) -> bool {
        let changed = self.upstream != upstream;
        self.upstream = upstream;
        changed && self.started()
    }

    /// Answer on the workloads' bridge too (name and interface index), or no longer. Whether the
    /// server must be started again (a bridge made again is a new device to bind to).
    pub fn set_bridge(&mut self, bridge: Option<(String, u32)>) -> bool {
        let changed = self.bridge != bridge;
        self.bridge = bridge;
        changed && self.started()
    }

    /// It was started (serving, or failed trying).
    fn started(&self) -> bool {
        self.server.is_some() || self.error.is_some()
    }

    /// Serve `zone` from now on (a no-op if it is what is served).
    pub fn update(&mut self, zone: &ZoneInput) {
        let Some(d) = &mut self.server else { return };
        if self.zone.as_ref() == Some(zone) {
            return;
        }
        if let Err(e) = d.update(zone) {
            error!(error = %e, "updating the mesh zone failed");
            return;
        }
        self.zone = Some(zone.clone());
    }

    pub fn status(&self, domain: &str) -> DnsStatus {
        DnsStatus {
            domain: domain.to_string(),
            listen: self.server.as_ref().map(|d| d.listen.to_string()),
            upstreams: self
                .server
                .as_ref()
                .map(|d| d.upstreams.iter().map(|u| u.to_string()).collect())
                .unwrap_or_default(),
            host: self.host.clone(),
            error: self.error.clone(),
        }
    }

    /// `meshctl dns`: the records as served.
    pub fn report(&self, domain: &str) -> DnsReport {
        let mut records = Vec::new();
        if let Some(z) = self.zone.as_ref().and_then(|z| zone::build(z, 0).ok()) {
            for r in z.forward.iter().chain(z.reverse.values().flatten()) {
                let rtype = r.record_type().to_string();
                if rtype == "SOA" || rtype == "NS" {
                    continue;
                }
                records.push(DnsRecordView {
                    name: r.name.to_string(),
                    rtype,
                    ttl: r.ttl,
                    value: r.data.to_string(),
                });
            }
        }
        DnsReport {
            status: self.status(domain),
            records,
        }
    }

    /// Host integration: see [`crate::dns::resolved`]. Without systemd-resolved, the host's
    /// resolver configuration is left alone and `meshctl dns` says how to use the server.
    async fn register_with_host(&mut self, domain: &str) {
        let Some(d) = &self.server else {
            self.host = "not registered (DNS not serving)".to_string();
            return;
        };
        let std::net::IpAddr::V4(ip) = d.listen.ip() else {
            return;
        };
        if self.resolved.is_none() {
            self.resolved = Resolved::detect().await;
        }
        let Some(r) = &self.resolved else {
            self.host = "not registered (no systemd-resolved); see `meshctl dns`".to_string();
            return;
        };
        match r.register(self.tun_index as i32, ip, domain).await {
            Ok(()) => {
                info!(link = %self.tun, %domain, "registered mesh DNS with systemd-resolved");
                self.host = format!("systemd-resolved ({}: ~{domain})", self.tun);
            }
            Err(e) => {
                warn!(error = %e, "registering mesh DNS with systemd-resolved failed");
                self.host = format!("systemd-resolved registration failed: {e}");
            }
        }
    }

    /// Unregister from the host and stop serving.
    pub async fn stop(&mut self) {
        if let Some(r) = self.resolved.take() {
            if let Err(e) = r.revert(self.tun_index as i32).await {
                warn!(error = %e, "removing mesh DNS from systemd-resolved failed");
            }
        }
        if let Some(d) = self.server.take() {
            d.stop().await;
        }
    }
}
