//! The membership view: everything this node believes about the mesh, built only from verified
//! statements (certificates chained to the root, records signed by their node, root-signed
//! revocations) plus liveness from the failure detector. Pure logic with `now` passed in: the
//! gossip task feeds it, the data plane and DNS read from it. `cache` persists it.

mod cache;

use crate::constants::{MEMBER_CACHE_TTL, PENDING_MEMBER_TTL};
use crate::id::MeshRange;
use crate::mesh::addressing::{self, Assignment, SlotClaim};
use crate::mesh::PeerSpec;
use crate::state::InviteUse;
use crate::trust::{
    AboutRecord, Cert, Key32, MeshId, NodeId, NodeRecord, Revocation, RoutesRecord, SelfStatement,
    ServicesRecord, Signed, TrustError, WorkloadsRecord,
};
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::{Ipv4Addr, SocketAddr};

/// Mesh-wide settings, from the root-signed invite every certificate carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshParams {
    pub mesh: MeshId,
    pub range: MeshRange,
    pub domain: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Liveness {
    /// The failure detector hears its heartbeats.
    Alive,
    /// Known, but silent: offline. It keeps its subnet.
    Dead,
    /// Known from the cache or a join, not (yet) heard in gossip.
    Unknown,
}

#[derive(Clone, Debug)]
pub struct Member {
    pub cert: Cert,
    pub record: Option<NodeRecord>,
    pub record_raw: Option<Signed>,
    /// The node's published services, verified.
    pub services: Option<ServicesRecord>,
    pub services_raw: Option<Signed>,
    /// Hostnames it serves and whether it is an exit node, verified.
    pub routes: Option<RoutesRecord>,
    pub routes_raw: Option<Signed>,
    /// The software it runs, verified.
    pub about: Option<AboutRecord>,
    pub about_raw: Option<Signed>,
    /// The workloads it names, verified.
    pub workloads: Option<WorkloadsRecord>,
    pub workloads_raw: Option<Signed>,
    /// Slot candidate index assigned at admission, used until the node's own record arrives.
    pub admitted_k: Option<u32>,
    /// Where this node (as its seed) saw the member's join request from: its first endpoint
    /// candidate until it publishes its own.
    pub admitted_from: Option<SocketAddr>,
    pub liveness: Liveness,
    /// Unix seconds this member was last known alive (or first seen).
    pub last_seen: u64,
    pub first_seen: u64,
}

impl Member {
    pub fn claim_k(&self) -> Option<u32> {
        self.record.as_ref().map(|r| r.slot_k).or(self.admitted_k)
    }
    pub fn left(&self) -> bool {
        self.record.as_ref().is_some_and(|r| r.left)
    }
}

/// Why a statement was not accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Reject {
    #[error(transparent)]
    Trust(#[from] TrustError),
    #[error("node {0} was removed from the mesh")]
    Revoked(NodeId),
    #[error("node {0} left the mesh")]
    Left(NodeId),
    #[error("record for unknown node {0}")]
    UnknownNode(NodeId),
    #[error("record is older than the one already known")]
    Stale,
    #[error("its WireGuard key already belongs to node {holder} ({name})")]
    WireguardKeyTaken { holder: NodeId, name: String },
    #[error("statement is for node {claimed}, but came under id {under}")]
    IdMismatch { claimed: NodeId, under: NodeId },
}

#[derive(Clone)]
pub struct Membership {
    pub params: MeshParams,
    pub self_id: NodeId,
    members: BTreeMap<NodeId, Member>,
    revocations: BTreeMap<NodeId, Revocation>,
    revoked_wg: HashSet<Key32>,
    tombstones: BTreeMap<NodeId, u64>,
    invite_uses: BTreeSet<InviteUse>,
    /// Set whenever something worth persisting changed.
    pub dirty: bool,
    /// Bumped on every change of what the view says (also liveness, which is not persisted):
    /// consumers recompute their projections only when it moved.
    version: u64,
}

impl Membership {
    pub fn new(params: MeshParams, own: Cert, now: u64) -> Membership {
        let self_id = own.node_id;
        let mut m = Membership {
            params,
            self_id,
            members: BTreeMap::new(),
            revocations: BTreeMap::new(),
            revoked_wg: HashSet::new(),
            tombstones: BTreeMap::new(),
            invite_uses: BTreeSet::new(),
            dirty: true,
            version: 0,
        };
        m.insert_cert(own, now);
        if let Some(me) = m.members.get_mut(&self_id) {
            me.liveness = Liveness::Alive;
        }
        m
    }

    fn insert_cert(&mut self, cert: Cert, now: u64) {
        if let Some(max) = cert.invite.max_uses {
            let u = InviteUse {
                invite: crate::util::hex(&cert.invite.invite_key),
                expires_at: cert.invite.expires_at,
                max_uses: max,
                node_id: cert.node_id.to_string(),
                issued_at: cert.issued_at,
            };
            if self.invite_uses.insert(u) {
                self.changed();
            }
        }
        let id = cert.node_id;
        self.members.entry(id).or_insert_with(|| Member {
            cert,
            record: None,
            record_raw: None,
            services: None,
            services_raw: None,
            routes: None,
            routes_raw: None,
            about: None,
            about_raw: None,
            workloads: None,
            workloads_raw: None,
            admitted_k: None,
            admitted_from: None,
            liveness: Liveness::Unknown,
            last_seen: now,
            first_seen: now,
        });
        self.changed();
    }

    /// Accept a certificate (from gossip, the cache or a join). Idempotent.
    pub fn ingest_cert(&mut self, raw: &Signed, now: u64) -> Result<NodeId, Reject> {
        let cert = Cert::verify(raw, &self.params.mesh)?;
        let id = cert.node_id;
        if self.revocations.contains_key(&id) || self.revoked_wg.contains(&cert.wireguard) {
            return Err(Reject::Revoked(id));
        }
        if self.tombstones.contains_key(&id) {
            return Err(Reject::Left(id));
        }
        if let Some(m) = self.members.get(&id) {
            if m.cert.raw == *raw {
                return Ok(id);
            }
            // Same identity, different certificate (only the identity's holder can make one):
            // every node keeps the same one, the earliest, so a node cannot move itself ahead
            // in slot priority by re-issuing and views converge whatever the arrival order.
            if cert_order(&m.cert) <= cert_order(&cert) {
                return Ok(id);
            }
            if id == self.self_id {
                // This node's own certificate is the one in its state; never swap it.
                return Ok(id);
            }
        }
        // A WireGuard key names one node: two members with one key would share a tunnel and a
        // revocation. Certificates prove possession of their WireGuard key, so two identities
        // with one key have one holder; the earliest certificate keeps it, on every node alike.
        // Decided before anything is removed, so a refused certificate changes nothing.
        let mut evict = None;
        if let Some(other) = self
            .members
            .values()
            .find(|m| m.cert.wireguard == cert.wireguard && m.cert.node_id != id)
        {
            let holder = other.cert.node_id;
            if holder == self.self_id || cert_order(&other.cert) <= cert_order(&cert) {
                return Err(Reject::WireguardKeyTaken {
                    holder,
                    name: other.cert.name.clone(),
                });
            }
            tracing::warn!(
                evicted = %holder,
                by = %id,
                "two certificates share WireGuard key {}; keeping the earlier one",
                crate::util::short_key(&cert.wireguard)
            );
            evict = Some(holder);
        }
        self.members.remove(&id);
        if let Some(holder) = evict {
            self.members.remove(&holder);
        }
        self.insert_cert(cert, now);
        Ok(id)
    }

    /// Accept a node's signed record. Returns whether anything changed.
    pub fn ingest_record(&mut self, id: NodeId, raw: &Signed) -> Result<bool, Reject> {
        let m = self.members.get_mut(&id).ok_or(Reject::UnknownNode(id))?;
        let Some(rec) = verify_statement::<NodeRecord>(&m.cert, raw, m.record.as_ref())? else {
            return Ok(false);
        };
        let left = rec.left;
        m.record = Some(rec);
        m.record_raw = Some(raw.clone());
        let last_seen = m.last_seen;
        self.changed();
        if left && id != self.self_id {
            self.tombstones.insert(id, last_seen);
        }
        Ok(true)
    }

    /// Accept a node's signed list of services. Returns whether anything changed.
    pub fn ingest_services(&mut self, id: NodeId, raw: &Signed) -> Result<bool, Reject> {
        let m = self.members.get_mut(&id).ok_or(Reject::UnknownNode(id))?;
        let Some(rec) = verify_statement::<ServicesRecord>(&m.cert, raw, m.services.as_ref())?
        else {
            return Ok(false);
        };
        m.services = Some(rec);
        m.services_raw = Some(raw.clone());
        self.changed();
        Ok(true)
    }

    /// Accept a node's signed hostnames and exit flag. Returns whether anything changed.
    pub fn ingest_routes(&mut self, id: NodeId, raw: &Signed) -> Result<bool, Reject> {
        let m = self.members.get_mut(&id).ok_or(Reject::UnknownNode(id))?;
        let Some(rec) = verify_statement::<RoutesRecord>(&m.cert, raw, m.routes.as_ref())? else {
            return Ok(false);
        };
        m.routes = Some(rec);
        m.routes_raw = Some(raw.clone());
        self.changed();
        Ok(true)
    }

    /// Accept a node's signed word on the software it runs. Returns whether anything changed.
    pub fn ingest_about(&mut self, id: NodeId, raw: &Signed) -> Result<bool, Reject> {
        let m = self.members.get_mut(&id).ok_or(Reject::UnknownNode(id))?;
        let Some(rec) = verify_statement::<AboutRecord>(&m.cert, raw, m.about.as_ref())? else {
            return Ok(false);
        };
        m.about = Some(rec);
        m.about_raw = Some(raw.clone());
        self.changed();
        Ok(true)
    }

    /// Accept a node's signed list of named workloads. Returns whether anything changed.
    pub fn ingest_workloads(&mut self, id: NodeId, raw: &Signed) -> Result<bool, Reject> {
        let m = self.members.get_mut(&id).ok_or(Reject::UnknownNode(id))?;
        let Some(rec) = verify_statement::<WorkloadsRecord>(&m.cert, raw, m.workloads.as_ref())?
        else {
            return Ok(false);
        };
        m.workloads = Some(rec);
        m.workloads_raw = Some(raw.clone());
        self.changed();
        Ok(true)
    }

    /// Accept a root-signed revocation. Returns whether it was new.
    pub fn ingest_revocation(&mut self, raw: &Signed) -> Result<bool, Reject> {
        let r = Revocation::verify(raw, &self.params.mesh)?;
        if self.revocations.contains_key(&r.node_id) {
            return Ok(false);
        }
        self.revoked_wg.insert(r.body.wireguard);
        if r.node_id != self.self_id {
            self.members.remove(&r.node_id);
        }
        self.revocations.insert(r.node_id, r);
        self.changed();
        Ok(true)
    }

    /// Remember the slot a seed assigned to a member it admitted.
    pub fn set_admitted_k(&mut self, id: NodeId, k: u32) {
        if let Some(m) = self.members.get_mut(&id) {
            if m.admitted_k != Some(k) {
                m.admitted_k = Some(k);
                self.changed();
            }
        }
    }

    /// Remember where a member this node admitted asked from. Only the first admission sets
    /// it: a request replayed from elsewhere must not redirect the tunnel (it cannot take it
    /// over, but it could stall it).
    pub fn set_admitted_from(&mut self, id: NodeId, from: SocketAddr) {
        if let Some(m) = self.members.get_mut(&id) {
            if m.admitted_from.is_none() {
                m.admitted_from = Some(from);
                self.changed();
            }
        }
    }

    /// Liveness from the failure detector.
    pub fn set_liveness(&mut self, id: NodeId, live: Liveness, now: u64) {
        if id == self.self_id {
            return;
        }
        if let Some(m) = self.members.get_mut(&id) {
            if m.liveness != live {
                m.liveness = live;
                self.version += 1;
            }
            if live == Liveness::Alive {
                // Not marked dirty: the node rewrites the cache at least hourly, which is as
                // fresh as last-seen times need to be (they matter on a scale of days).
                m.last_seen = now;
            }
        }
    }

    /// Forget admitted members that never showed up and members silent for a month; their
    /// slots are freed.
    pub fn prune(&mut self, now: u64) -> Vec<String> {
        let self_id = self.self_id;
        let mut never_came = HashSet::new();
        let gone: Vec<NodeId> = self
            .members
            .values()
            .filter(|m| m.cert.node_id != self_id)
            .filter(|m| {
                let never_seen = m.record.is_none() && m.liveness != Liveness::Alive;
                let since = |t: u64| now.saturating_sub(t);
                let pending_expired =
                    never_seen && since(m.first_seen) > PENDING_MEMBER_TTL.as_secs();
                if pending_expired {
                    never_came.insert(m.cert.node_id.to_string());
                }
                pending_expired
                    || (m.liveness != Liveness::Alive
                        && since(m.last_seen) > MEMBER_CACHE_TTL.as_secs())
            })
            .map(|m| m.cert.node_id)
            .collect();
        // An admission that never turned into a running node gives its invite use back, so a
        // one-use token whose joiner failed before it started can be used again. (Members that
        // did run keep counting: their use was real.)
        self.invite_uses
            .retain(|u| !never_came.contains(&u.node_id));
        let names = gone
            .iter()
            .filter_map(|id| self.members.remove(id).map(|m| m.cert.name))
            .collect::<Vec<_>>();
        if !names.is_empty() {
            self.changed();
        }
        names
    }

    /// Something the view says changed: worth persisting, and worth recomputing projections.
    fn changed(&mut self) {
        self.dirty = true;
        self.version += 1;
    }

    /// How many times the view changed; equal versions mean equal views.
    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn get(&self, id: &NodeId) -> Option<&Member> {
        self.members.get(id)
    }

    pub fn me(&self) -> &Member {
        &self.members[&self.self_id]
    }

    pub fn all(&self) -> impl Iterator<Item = &Member> {
        self.members.values()
    }

    pub fn revocations(&self) -> impl Iterator<Item = &Revocation> {
        self.revocations.values()
    }

    pub fn is_revoked(&self, id: &NodeId, wg: &Key32) -> bool {
        self.revocations.contains_key(id) || self.revoked_wg.contains(wg)
    }

    pub fn is_tombstoned(&self, id: &NodeId) -> bool {
        self.tombstones.contains_key(id)
    }

    /// Members beyond their invite's use limit: the earliest certificates win.
    fn overused(&self) -> HashSet<String> {
        let mut by_invite: BTreeMap<&str, Vec<&InviteUse>> = BTreeMap::new();
        for u in &self.invite_uses {
            by_invite.entry(&u.invite).or_default().push(u);
        }
        let mut out = HashSet::new();
        for (_, mut uses) in by_invite {
            uses.sort_by(|a, b| (a.issued_at, &a.node_id).cmp(&(b.issued_at, &b.node_id)));
            let max = uses[0].max_uses as usize;
            for u in uses.into_iter().skip(max) {
                out.insert(u.node_id.clone());
            }
        }
        out
    }

    /// Whether `id` is a member shut out because its invite was used up by earlier certificates.
    pub fn over_its_invite(&self, id: &NodeId) -> bool {
        self.overused().contains(&id.to_string())
    }

    /// How many distinct nodes used an invite, not counting `except`.
    pub fn invite_uses(&self, invite_key: &Key32, except: &NodeId) -> usize {
        let inv = crate::util::hex(invite_key);
        let except = except.to_string();
        self.invite_uses
            .iter()
            .filter(|u| u.invite == inv && u.node_id != except)
            .count()
    }

    /// Members that count: not left, not over their invite's limit. (Revoked and tombstoned
    /// nodes are never in `members` in the first place.)
    pub fn active(&self) -> impl Iterator<Item = &Member> {
        let overused = self.overused();
        self.members
            .values()
            .filter(move |m| !m.left() && !overused.contains(&m.cert.node_id.to_string()))
    }

    /// Every active member's slot, by the deterministic rule.
    pub fn assignments(&self) -> BTreeMap<NodeId, Assignment> {
        let claims: Vec<SlotClaim> = self
            .active()
            .filter_map(|m| {
                Some(SlotClaim {
                    node: m.cert.node_id,
                    wg: m.cert.wireguard,
                    issued_at: m.cert.issued_at,
                    k: m.claim_k()?,
                })
            })
            .collect();
        addressing::resolve(&self.params.mesh, &self.params.range, &claims)
    }

    /// The slot candidate a newcomer would get from this node's view.
    pub fn claim_for_newcomer(&self, wg: &Key32) -> Option<u32> {
        let taken: HashSet<u32> = self.assignments().values().map(|a| a.slot).collect();
        addressing::first_free_from(&self.params.mesh, wg, 0, self.params.range.slots(), &taken)
            .map(|a| a.k)
    }

    /// An active member other than `except` already using `name`.
    pub fn name_holder(&self, name: &str, except: &NodeId) -> Option<&Member> {
        self.active()
            .find(|m| m.cert.name == name && m.cert.node_id != *except)
    }

    /// The mesh address of a member, if it has a slot.
    pub fn mesh_ip(&self, id: &NodeId) -> Option<Ipv4Addr> {
        self.assignments()
            .get(id)
            .map(|a| self.params.range.node_ip(a.slot))
    }

    /// What the data plane should have, given the slot assignments: every active member but
    /// this node, with a slot; its endpoint candidates are the ones it published, after the
    /// address it was admitted from.
    pub fn peer_specs(&self, assign: &BTreeMap<NodeId, Assignment>) -> Vec<PeerSpec> {
        self.active()
            .filter(|m| m.cert.node_id != self.self_id)
            .filter_map(|m| {
                let a = assign.get(&m.cert.node_id)?;
                let mut endpoints = m
                    .record
                    .as_ref()
                    .map(|r| r.endpoints.clone())
                    .unwrap_or_default();
                if let Some(h) = m.admitted_from {
                    if !endpoints.contains(&h) {
                        endpoints.insert(0, h);
                    }
                }
                Some(PeerSpec {
                    node_id: m.cert.node_id,
                    name: m.cert.name.clone(),
                    wg: m.cert.wireguard,
                    slot: a.slot,
                    endpoints,
                })
            })
            .collect()
    }
}

/// The order in which competing certificates win: earliest issued, then by their bytes.
fn cert_order(c: &Cert) -> (u64, &[u8], &[u8]) {
    (c.issued_at, &c.raw.body, &c.raw.sig)
}

/// Check a node's statement about itself: signed by the node's identity, about that identity,
/// not older than what is held. `Ok(None)` means "same as held".
fn verify_statement<T: SelfStatement>(
    cert: &Cert,
    raw: &Signed,
    held: Option<&T>,
) -> Result<Option<T>, Reject> {
    let rec: T = raw.verify(T::CONTEXT, &cert.identity, T::WHAT)?;
    if *rec.identity() != cert.identity {
        return Err(Reject::IdMismatch {
            claimed: NodeId::of_identity(rec.identity()),
            under: cert.node_id,
        });
    }
    if let Some(old) = held {
        if rec.seq() < old.seq() {
            return Err(Reject::Stale);
        }
        if rec == *old {
            return Ok(None);
        }
    }
    Ok(Some(rec))
}

#[cfg(test)]
mod tests;
