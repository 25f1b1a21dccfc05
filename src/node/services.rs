//! `meshctl service`: this node's services, persisted in settings.json, published as a signed
//! record and answered by every node's DNS.

use super::Node;
use crate::control::{ApiFailure, ApiResult, ServiceAddRequest, ServiceRemoveRequest, ServiceView};
use crate::gossip::chitchat_glue::KEY_SERVICES;
use crate::gossip::Liveness;
use crate::trust::{Context, ServiceDef, ServicesRecord, Signed};
use crate::util::{is_dns_label, next_seq};
use tracing::info;

impl<P: super::platform::Platform> Node<P> {
    /// Sign and publish the current list of services.
    pub(super) async fn publish_services(&mut self) {
        self.services_seq = next_seq(self.services_seq);
        let rec = ServicesRecord {
            identity: self.keys.identity_public(),
            seq: self.services_seq,
            services: self.settings.services.clone(),
        };
        let raw = Signed::sign(Context::Services, &rec, &self.keys.identity);
        let _ = self.m.ingest_services(self.cert.node_id, &raw);
        if let Some(g) = &self.gossip {
            g.set(KEY_SERVICES, raw.to_b64()).await;
        }
    }

    /// Write settings.json (services and the edge roles).
    pub(super) fn save_settings(&mut self) -> Result<(), ApiFailure> {
        self.settings.version = crate::state::STATE_VERSION;
        self.state
            .save_settings(&self.settings)
            .map_err(|e| ApiFailure::internal(format!("saving settings: {e}")))
    }

    pub(super) async fn service_add(&mut self, r: ServiceAddRequest) -> ApiResult {
        if !is_dns_label(&r.name) || r.name.len() > crate::dns::zone::MAX_SERVICE_NAME {
            return Err(ApiFailure::bad_request(format!(
                "service name {:?} is not valid: use 1-{} of a-z, 0-9 and '-', not starting or \
                 ending with '-' (its SRV record _NAME._tcp must fit in a DNS label)",
                r.name,
                crate::dns::zone::MAX_SERVICE_NAME
            )));
        }
        if r.port == 0 {
            return Err(ApiFailure::bad_request(
                "--port must be between 1 and 65535",
            ));
        }
        let range = self.m.params.range;
        if let Some(a) = r.address {
            let host = a.octets()[3];
            if range.slot_of(a) != Some(self.own_slot) || host == 0 || host == 255 {
                return Err(ApiFailure::bad_request(format!(
                    "--address {a} is not an address of this node's subnet {}: use .1-.254 of it",
                    crate::mesh::addressing::subnet_string(&range, self.own_slot)
                )));
            }
        }
        let def = ServiceDef {
            name: r.name.clone(),
            port: r.port,
            address: r.address,
        };
        let replaced = self.settings.services.iter().any(|s| s.name == def.name);
        self.settings.services.retain(|s| s.name != def.name);
        self.settings.services.push(def);
        self.settings.services.sort();
        self.save_settings()?;
        self.publish_services().await;
        self.refresh_dns();
        info!(service = %r.name, port = r.port, "service published");
        Ok(serde_json::json!({
            "name": r.name,
            "port": r.port,
            "address": r.address.unwrap_or(self.mesh_ip()).to_string(),
            "replaced": replaced,
            "dns": format!("{}.svc.{}", r.name, self.m.params.domain),
        }))
    }

    pub(super) async fn service_remove(&mut self, r: ServiceRemoveRequest) -> ApiResult {
        if !self.settings.services.iter().any(|s| s.name == r.name) {
            return Err(ApiFailure::not_found(format!(
                "this node publishes no service {:?}; `meshctl service ls` lists them",
                r.name
            )));
        }
        self.settings.services.retain(|s| s.name != r.name);
        self.save_settings()?;
        self.publish_services().await;
        self.refresh_dns();
        info!(service = %r.name, "service withdrawn");
        Ok(serde_json::json!({ "name": r.name }))
    }

    /// After a move to another /24: services published at an explicit address of the old one
    /// are no longer answered anywhere. Say so; the operator re-adds them (their workloads
    /// need new addresses too).
    pub(super) fn warn_services_outside_subnet(&self) {
        let range = self.m.params.range;
        for s in &self.settings.services {
            if let Some(ip) = s
                .address
                .filter(|ip| range.slot_of(*ip) != Some(self.own_slot))
            {
                tracing::warn!(
                    service = %s.name,
                    address = %ip,
                    subnet = %crate::mesh::addressing::subnet_string(&range, self.own_slot),
                    "service address is outside this node's new subnet; DNS no longer answers it: \
                     meshctl service add {} --port {} --address <an address of the new subnet>",
                    s.name,
                    s.port
                );
            }
        }
    }

    /// Every service instance in the mesh.
    pub(super) fn services_view(&self) -> Vec<ServiceView> {
        let assign = self.m.assignments();
        let range = self.m.params.range;
        let mut out = Vec::new();
        for x in self.m.active() {
            let Some(a) = assign.get(&x.cert.node_id) else {
                continue;
            };
            let local = x.cert.node_id == self.cert.node_id;
            for s in x.services.iter().flat_map(|r| r.services.iter()) {
                let outside_subnet = s
                    .address
                    .is_some_and(|ip| range.slot_of(ip) != Some(a.slot));
                out.push(ServiceView {
                    name: s.name.clone(),
                    node: x.cert.name.clone(),
                    address: s.address.unwrap_or(range.node_ip(a.slot)).to_string(),
                    port: s.port,
                    live: (local || x.liveness != Liveness::Dead) && !outside_subnet,
                    local,
                    outside_subnet,
                });
            }
        }
        out.sort_by(|a, b| (&a.name, &a.node).cmp(&(&b.name, &b.node)));
        out
    }
}
