//! What this node is and says: its statements, signed by the [`Publisher`] and taken into the
//! view and gossip in one place; its gossip instance, started on its mesh address; its /24,
//! followed when it loses a conflict; its endpoints, re-read from the machine.

use super::platform::Platform;
use super::publisher::Publication;
use super::snapshot::Snapshot;
use super::{services, setup, Node, NodeError};
use crate::constants::GOSSIP_PORT;
use crate::gossip::chitchat_glue::KEY_CERT;
use crate::gossip::{Gossip, GossipConfig};
use crate::mesh::addressing::subnet_string;
use crate::util::unix_now_ms;
use std::net::SocketAddr;
use tracing::{info, warn};

impl<P: Platform> Node<P> {
    /// Sign-ingest-gossip: the one way a statement of this node goes out.
    pub(super) async fn publish(&mut self, p: Publication) {
        let me = self.local.cert.node_id;
        if let Err(e) = p.ingest(self.view.m_mut(), me) {
            warn!(error = %e, "this node's own statement was not taken in");
        }
        if let Some(g) = &self.gossip {
            g.set(p.key(), p.raw.to_b64()).await;
        }
        self.spread.news();
    }

    pub(super) async fn publish_record(&mut self) {
        let p = self.publisher.record(unix_now_ms());
        self.publish(p).await;
    }

    /// Hostnames and exit flag, as settings say; and the same to the mesh-side listeners.
    pub(super) async fn publish_routes(&mut self) {
        let hostnames = self
            .settings
            .exposed
            .iter()
            .map(|e| e.hostname.clone())
            .collect();
        let p = self
            .publisher
            .routes(hostnames, self.settings.exit_node, unix_now_ms());
        self.publish(p).await;
        self.edge.set_offers(&self.settings);
    }

    /// Gossip on the current mesh address, seeded with every member's, starting from this
    /// node's certificate, its latest statements and every revocation it knows.
    pub(super) async fn start_gossip(&mut self) -> Result<(), NodeError> {
        let m = self.view.m();
        let me = self.local.cert.node_id;
        let seeds: Vec<SocketAddr> = self
            .view
            .snapshot()
            .assignments
            .iter()
            .filter(|(id, _)| **id != me)
            .map(|(_, a)| SocketAddr::from((m.params.range.node_ip(a.slot), GOSSIP_PORT)))
            .collect();
        let mut initial = vec![(KEY_CERT.to_string(), self.local.cert.raw.to_b64())];
        initial.extend(
            self.publisher
                .latest()
                .map(|p| (p.key().to_string(), p.raw.to_b64())),
        );
        let cfg = GossipConfig {
            node_id: me,
            addr: SocketAddr::from((self.mesh_ip(), GOSSIP_PORT)),
            cluster_id: format!("meshd-{}", m.params.mesh.short()),
            seeds,
            initial,
        };
        let transport = self.platform.gossip_transport(&self.local.config.tun);
        let mut g = Gossip::start(cfg, transport.as_ref())
            .await
            .map_err(|e| NodeError::Gossip(e.to_string()))?;
        g.publish_revocations(self.view.m()).await;
        self.gossip = Some(g);
        Ok(())
    }

    /// If the deterministic rule moved this node (it lost a slot conflict), follow: new claim,
    /// new address, gossip and the mesh-side services restarted on it.
    pub(super) async fn follow_own_slot(&mut self, snap: &Snapshot) -> Result<(), NodeError> {
        let Some(a) = snap.assignments.get(&self.local.cert.node_id).copied() else {
            return Ok(());
        };
        if a.k == self.local.config.slot_k && a.slot == self.local.slot {
            return Ok(());
        }
        let range = snap.params.range;
        warn!(
            from = %subnet_string(&range, self.local.slot),
            to = %subnet_string(&range, a.slot),
            "subnet conflict lost to an earlier member; moving"
        );
        self.local.config.slot_k = a.k;
        self.local.save_config()?;
        self.view
            .m_mut()
            .set_admitted_k(self.local.cert.node_id, a.k);
        self.publisher.set_slot_k(a.k);
        if a.slot != self.local.slot {
            self.local.slot = a.slot;
            let ip = self.mesh_ip();
            self.platform
                .readdress(self.local.tun_index, ip, range.prefix)
                .await?;
            self.plane.device.set_own_slot(a.slot);
            services::warn_outside_subnet(&self.settings.services, &range, a.slot);
            if let Some(g) = self.gossip.take() {
                g.shutdown().await;
            }
            self.start_gossip().await?;
            if self.platform.host_services() {
                self.start_mesh_services().await;
            }
            // The bridge, the table and every workload follow the /24.
            self.apply_workloads().await;
        }
        self.publish_record().await;
        Ok(())
    }

    /// This node's own endpoints: the configured ones, else its addresses on the mesh port.
    pub(super) fn local_endpoints(&self) -> Vec<SocketAddr> {
        setup::effective_endpoints(
            &self.local.config.endpoints,
            self.local.config.port,
            self.platform
                .local_addresses(&self.local.config.tun, &self.view.m().params.range),
        )
    }

    pub(super) async fn refresh_endpoints(&mut self) {
        let mut e = self.local_endpoints();
        // Then where members see this node from (its NAT's public side), if not already there.
        for a in self.nat.candidates.borrow().iter() {
            if !e.contains(a) {
                e.push(*a);
            }
        }
        if self.publisher.set_endpoints(e.clone()) {
            info!(endpoints = ?e, "endpoints changed");
            self.publish_record().await;
        }
    }
}
