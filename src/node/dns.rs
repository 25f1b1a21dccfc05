//! Mesh DNS in the node: the zone follows the membership view; the server follows the node's
//! address.

use super::Node;
use crate::control::{DnsRecordView, DnsReport, DnsStatus};
use crate::dns::zone::{self, NodeEntry, ServiceEntry, ZoneInput};
use crate::dns::{upstream, DnsServer};
use crate::gossip::Liveness;
use tracing::{error, warn};

/// DNS port on the mesh address.
pub const DNS_PORT: u16 = 53;

impl<P: super::platform::Platform> Node<P> {
    /// The zone as the membership view says it should be.
    pub(super) fn dns_input(&self) -> ZoneInput {
        let assign = self.m.assignments();
        let range = self.m.params.range;
        let names = zone::unique_names(self.m.active().map(|x| {
            (
                x.cert.name.as_str(),
                x.cert.issued_at,
                x.cert.node_id.to_string(),
            )
        }));
        let mut nodes = Vec::new();
        let mut services = Vec::new();
        for x in self.m.active() {
            let Some(a) = assign.get(&x.cert.node_id) else {
                continue;
            };
            let name = names[&x.cert.node_id.to_string()].clone();
            let ip = range.node_ip(a.slot);
            nodes.push(NodeEntry {
                name: name.clone(),
                ip,
            });
            let live = x.cert.node_id == self.cert.node_id || x.liveness != Liveness::Dead;
            if !live {
                continue;
            }
            for s in x.services.iter().flat_map(|r| r.services.iter()) {
                let sip = s.address.unwrap_or(ip);
                // A node may only publish addresses of its own /24.
                if range.slot_of(sip) != Some(a.slot) || !crate::util::is_dns_label(&s.name) {
                    continue;
                }
                services.push(ServiceEntry {
                    service: s.name.clone(),
                    node: name.clone(),
                    ip: sip,
                    port: s.port,
                });
            }
        }
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        services.sort();
        ZoneInput {
            domain: self.m.params.domain.clone(),
            range,
            serving: names
                .get(&self.cert.node_id.to_string())
                .cloned()
                .unwrap_or_else(|| self.cert.name.clone()),
            nodes,
            services,
        }
    }

    /// (Re)start the DNS server on the current mesh address.
    pub(super) async fn start_dns(&mut self) {
        if let Some(d) = self.dns.take() {
            d.stop().await;
        }
        let input = self.dns_input();
        let upstreams = upstream::discover(&self.config.dns_upstream, &self.m.params.range);
        if upstreams.is_empty() {
            warn!("no upstream DNS server found (resolv.conf); names outside the mesh will not resolve through meshd");
        }
        match DnsServer::start(
            self.mesh_ip(),
            DNS_PORT,
            &self.config.tun,
            &input,
            upstreams,
        )
        .await
        {
            Ok(d) => {
                self.dns = Some(d);
                self.dns_input = Some(input);
                self.dns_error = None;
            }
            Err(e) => {
                error!(error = %e, "mesh DNS is not serving");
                self.dns_error = Some(format!("{e:#}"));
            }
        }
        self.register_dns_with_host().await;
    }

    /// Push membership changes into the zone.
    pub(super) fn refresh_dns(&mut self) {
        if self.dns.is_none() {
            return;
        }
        let input = self.dns_input();
        if self.dns_input.as_ref() == Some(&input) {
            return;
        }
        let Some(d) = &mut self.dns else { return };
        if let Err(e) = d.update(&input) {
            error!(error = %e, "updating the mesh zone failed");
            return;
        }
        self.dns_input = Some(input);
    }

    pub(super) fn dns_status(&self) -> DnsStatus {
        DnsStatus {
            domain: self.m.params.domain.clone(),
            listen: self.dns.as_ref().map(|d| d.listen.to_string()),
            upstreams: self
                .dns
                .as_ref()
                .map(|d| d.upstreams.iter().map(|u| u.to_string()).collect())
                .unwrap_or_default(),
            host: self.dns_host.clone(),
            error: self.dns_error.clone(),
        }
    }

    pub(super) fn dns_report(&self) -> DnsReport {
        let mut records = Vec::new();
        if let Some(input) = &self.dns_input {
            if let Ok(z) = zone::build(input, 0) {
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
        }
        DnsReport {
            status: self.dns_status(),
            records,
        }
    }

    /// Host integration: see [`crate::dns::resolved`]. Without systemd-resolved, the host's
    /// resolver configuration is left alone and `meshctl dns` says how to use the server.
    pub(super) async fn register_dns_with_host(&mut self) {
        let Some(d) = &self.dns else {
            self.dns_host = "not registered (DNS not serving)".to_string();
            return;
        };
        let ip = match d.listen.ip() {
            std::net::IpAddr::V4(v4) => v4,
            _ => return,
        };
        if self.resolved.is_none() {
            self.resolved = crate::dns::resolved::Resolved::detect().await;
        }
        let Some(r) = &self.resolved else {
            self.dns_host = "not registered (no systemd-resolved); see `meshctl dns`".to_string();
            return;
        };
        let domain = self.m.params.domain.clone();
        match r.register(self.tun_index as i32, ip, &domain).await {
            Ok(()) => {
                tracing::info!(link = %self.config.tun, %domain, "registered mesh DNS with systemd-resolved");
                self.dns_host = format!("systemd-resolved ({}: ~{domain})", self.config.tun);
            }
            Err(e) => {
                warn!(error = %e, "registering mesh DNS with systemd-resolved failed");
                self.dns_host = format!("systemd-resolved registration failed: {e}");
            }
        }
    }

    pub(super) async fn unregister_dns_from_host(&mut self) {
        if let Some(r) = self.resolved.take() {
            if let Err(e) = r.revert(self.tun_index as i32).await {
                warn!(error = %e, "removing mesh DNS from systemd-resolved failed");
            }
        }
    }
}
