//! The member cache (`members.json`): what a restarted node starts from, re-verified on load.

use super::{Liveness, Membership, Reject};
use crate::state::{CachedMember, MemberCache, Tombstone, STATE_VERSION};
use crate::trust::{Cert, NodeId, Signed};

impl Membership {
    /// Rebuild from the persisted cache, re-verifying every statement. Returns what had to be
    /// skipped, as warnings for the log: a tampered cache entry must not take the node down.
    pub fn load_cache(&mut self, cache: &MemberCache, now: u64) -> Vec<String> {
        let mut warnings = Vec::new();
        for r in &cache.revocations {
            match Signed::from_b64(r, "revocation")
                .map_err(Reject::from)
                .and_then(|s| self.ingest_revocation(&s))
            {
                Ok(_) => {}
                Err(e) => warnings.push(format!("skipping cached revocation: {e}")),
            }
        }
        for t in &cache.tombstones {
            if let Some(id) = NodeId::parse(&t.node_id) {
                self.tombstones.insert(id, t.at);
            }
        }
        self.invite_uses.extend(cache.invite_uses.iter().cloned());
        // Members' silence counts only while this node ran: shift their times by how long it
        // was down (since the cache was written; for an old cache without that time, since the
        // last member it saw). A node down for a month must not forget its peers.
        let saved_at = if cache.saved_at > 0 {
            cache.saved_at
        } else {
            cache
                .members
                .iter()
                .map(|c| c.last_seen)
                .max()
                .unwrap_or(now)
        };
        let downtime = now.saturating_sub(saved_at);
        for c in &cache.members {
            let cert = match Signed::from_b64(&c.cert, "node certificate")
                .and_then(|s| Cert::verify(&s, &self.params.mesh))
            {
                Ok(cert) => cert,
                Err(e) => {
                    warnings.push(format!("skipping cached member: {e}"));
                    continue;
                }
            };
            let id = cert.node_id;
            if id == self.self_id {
                continue;
            }
            if let Err(e) = self.ingest_cert(&cert.raw, now) {
                warnings.push(format!("skipping cached member {}: {e}", cert.name));
                continue;
            }
            if let Some(r) = &c.record {
                if let Err(e) = Signed::from_b64(r, "node record")
                    .map_err(Reject::from)
                    .and_then(|s| self.ingest_record(id, &s))
                {
                    warnings.push(format!("skipping cached record of {}: {e}", cert.name));
                }
            }
            if let Some(r) = &c.services {
                if let Err(e) = Signed::from_b64(r, "services record")
                    .map_err(Reject::from)
                    .and_then(|s| self.ingest_services(id, &s))
                {
                    warnings.push(format!("skipping cached services of {}: {e}", cert.name));
                }
            }
            if let Some(r) = &c.routes {
                if let Err(e) = Signed::from_b64(r, "routes record")
                    .map_err(Reject::from)
                    .and_then(|s| self.ingest_routes(id, &s))
                {
                    warnings.push(format!("skipping cached routes of {}: {e}", cert.name));
                }
            }
            if let Some(r) = &c.workloads {
                if let Err(e) = Signed::from_b64(r, "workloads record")
                    .map_err(Reject::from)
                    .and_then(|s| self.ingest_workloads(id, &s))
                {
                    warnings.push(format!("skipping cached workloads of {}: {e}", cert.name));
                }
            }
            if let Some(r) = &c.about {
                if let Err(e) = Signed::from_b64(r, "about record")
                    .map_err(Reject::from)
                    .and_then(|s| self.ingest_about(id, &s))
                {
                    warnings.push(format!(
                        "skipping cached about record of {}: {e}",
                        cert.name
                    ));
                }
            }
            if let Some(m) = self.members.get_mut(&id) {
                m.last_seen = c.last_seen.saturating_add(downtime).min(now);
                m.first_seen = c.first_seen.saturating_add(downtime).min(now);
                m.liveness = Liveness::Unknown;
                m.admitted_k = m.admitted_k.or(c.admitted_k);
                m.admitted_from = m.admitted_from.or(c.admitted_from);
            }
        }
        self.dirty = false;
        warnings
    }

    pub fn to_cache(&self) -> MemberCache {
        MemberCache {
            version: STATE_VERSION,
            members: self
                .members
                .values()
                .filter(|m| m.cert.node_id != self.self_id)
                .map(|m| CachedMember {
                    cert: m.cert.raw.to_b64(),
                    record: m.record_raw.as_ref().map(|r| r.to_b64()),
                    services: m.services_raw.as_ref().map(|r| r.to_b64()),
                    routes: m.routes_raw.as_ref().map(|r| r.to_b64()),
                    about: m.about_raw.as_ref().map(|r| r.to_b64()),
                    workloads: m.workloads_raw.as_ref().map(|r| r.to_b64()),
                    last_seen: m.last_seen,
                    first_seen: m.first_seen,
                    admitted_k: m.admitted_k,
                    admitted_from: m.admitted_from,
                })
                .collect(),
            tombstones: self
                .tombstones
                .iter()
                .map(|(id, at)| Tombstone {
                    node_id: id.to_string(),
                    at: *at,
                })
                .collect(),
            revocations: self.revocations.values().map(|r| r.raw.to_b64()).collect(),
            invite_uses: self.invite_uses.iter().cloned().collect(),
            own_seq: self.members.get(&self.self_id).map_or(0, |m| {
                [
                    m.record.as_ref().map(|r| r.seq),
                    m.services.as_ref().map(|r| r.seq),
                    m.routes.as_ref().map(|r| r.seq),
                    m.about.as_ref().map(|r| r.seq),
                    m.workloads.as_ref().map(|r| r.seq),
                ]
                .into_iter()
                .flatten()
                .max()
                .unwrap_or(0)
            }),
            // Set by whoever writes it (the node, with its clock).
            saved_at: 0,
        }
    }
}
