//! The membership view: everything this node believes about the mesh, built only from verified
//! statements (certificates chained to the root, records signed by their node, root-signed
//! revocations) plus liveness from the failure detector. Pure logic with `now` passed in: the
//! gossip task feeds it, the data plane and DNS read from it.

use crate::constants::{MEMBER_CACHE_TTL, PENDING_MEMBER_TTL};
use crate::mesh::addressing::{self, Assignment, MeshRange, SlotClaim};
use crate::mesh::PeerSpec;
use crate::state::{CachedMember, InviteUse, MemberCache, Tombstone, STATE_VERSION};
use crate::trust::{
    Cert, Key32, MeshId, NodeId, NodeRecord, Revocation, RoutesRecord, SelfStatement,
    ServicesRecord, Signed, TrustError,
};
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::Ipv4Addr;

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
    /// Slot candidate index assigned at admission, used until the node's own record arrives.
    pub admitted_k: Option<u32>,
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
        };
        m.insert_cert(own, now);
        if let Some(me) = m.members.get_mut(&self_id) {
            me.liveness = Liveness::Alive;
        }
        m
    }

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
            if let Some(m) = self.members.get_mut(&id) {
                m.last_seen = c.last_seen.saturating_add(downtime).min(now);
                m.first_seen = c.first_seen.saturating_add(downtime).min(now);
                m.liveness = Liveness::Unknown;
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
                    last_seen: m.last_seen,
                    first_seen: m.first_seen,
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
                self.dirty = true;
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
            admitted_k: None,
            liveness: Liveness::Unknown,
            last_seen: now,
            first_seen: now,
        });
        self.dirty = true;
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
        self.dirty = true;
        if left && id != self.self_id {
            self.tombstones.insert(id, m.last_seen);
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
        self.dirty = true;
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
        self.dirty = true;
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
        self.dirty = true;
        Ok(true)
    }

    /// Remember the slot a seed assigned to a member it admitted.
    pub fn set_admitted_k(&mut self, id: NodeId, k: u32) {
        if let Some(m) = self.members.get_mut(&id) {
            if m.admitted_k != Some(k) {
                m.admitted_k = Some(k);
                self.dirty = true;
            }
        }
    }

    /// Liveness from the failure detector.
    pub fn set_liveness(&mut self, id: NodeId, live: Liveness, now: u64) {
        if id == self.self_id {
            return;
        }
        if let Some(m) = self.members.get_mut(&id) {
            m.liveness = live;
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
            self.dirty = true;
        }
        names
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

    /// What the data plane should have: every active member but this node, with a slot.
    pub fn peer_specs(&self, hints: &BTreeMap<NodeId, std::net::SocketAddr>) -> Vec<PeerSpec> {
        let assign = self.assignments();
        self.active()
            .filter(|m| m.cert.node_id != self.self_id)
            .filter_map(|m| {
                let a = assign.get(&m.cert.node_id)?;
                let mut endpoints = m
                    .record
                    .as_ref()
                    .map(|r| r.endpoints.clone())
                    .unwrap_or_default();
                if let Some(h) = hints.get(&m.cert.node_id) {
                    if !endpoints.contains(h) {
                        endpoints.insert(0, *h);
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
mod tests {
    use super::*;
    use crate::trust::cert::tests::{cert, invite};
    use crate::trust::Context;
    use crate::trust::{NodeKeys, RevocationBody, RootKey};

    struct World {
        root: RootKey,
        inv: Signed,
        secret: ed25519_dalek::SigningKey,
    }

    fn world(max_uses: Option<u32>) -> World {
        let root = RootKey::generate();
        let (_, inv, secret) = invite(&root, 10_000, max_uses);
        World { root, inv, secret }
    }

    fn params(w: &World) -> MeshParams {
        MeshParams {
            mesh: MeshId(w.root.public()),
            range: "10.210.0.0/16".parse().unwrap(),
            domain: "mesh.internal".into(),
        }
    }

    fn node(w: &World, name: &str, at: u64) -> (NodeKeys, Cert) {
        let k = NodeKeys::generate();
        let raw = cert(&w.inv, &w.secret, &k, name, at);
        let c = Cert::verify(&raw, &MeshId(w.root.public())).unwrap();
        (k, c)
    }

    fn record(k: &NodeKeys, seq: u64, slot_k: u32, left: bool) -> Signed {
        Signed::sign(
            Context::Record,
            &NodeRecord {
                identity: k.identity_public(),
                seq,
                endpoints: vec!["192.0.2.1:51820".parse().unwrap()],
                slot_k,
                left,
            },
            &k.identity,
        )
    }

    #[test]
    fn records_must_be_signed_by_their_node_and_fresh() {
        let w = world(None);
        let (ka, a) = node(&w, "a", 100);
        let (kb, b) = node(&w, "b", 200);
        let mut m = Membership::new(params(&w), a.clone(), 0);
        m.ingest_record(a.node_id, &record(&ka, 1, 0, false))
            .unwrap();
        let bid = m.ingest_cert(&b.raw, 0).unwrap();
        // B's record signed by A is refused.
        assert!(matches!(
            m.ingest_record(bid, &record(&ka, 5, 0, false)),
            Err(Reject::Trust(_))
        ));
        assert!(m.ingest_record(bid, &record(&kb, 5, 0, false)).unwrap());
        // Replaying an older record changes nothing.
        assert_eq!(
            m.ingest_record(bid, &record(&kb, 4, 3, false)),
            Err(Reject::Stale)
        );
        assert_eq!(m.get(&bid).unwrap().claim_k(), Some(0));
        let specs = m.peer_specs(&BTreeMap::new());
        assert_eq!(specs.len(), 1);
        assert_eq!(specs[0].name, "b");
    }

    #[test]
    fn revocation_removes_and_keeps_out_across_restarts() {
        let w = world(None);
        let (ka, a) = node(&w, "a", 100);
        let (kb, b) = node(&w, "b", 200);
        let mut m = Membership::new(params(&w), a.clone(), 0);
        m.ingest_record(a.node_id, &record(&ka, 1, 0, false))
            .unwrap();
        m.ingest_cert(&b.raw, 0).unwrap();
        m.ingest_record(b.node_id, &record(&kb, 1, 0, false))
            .unwrap();
        let rev = Revocation::issue(
            &w.root.0,
            RevocationBody {
                mesh: MeshId(w.root.public()),
                identity: kb.identity_public(),
                wireguard: kb.wg_public(),
                name: "b".into(),
                revoked_at: 5,
            },
        );
        assert!(m.ingest_revocation(&rev.raw).unwrap());
        assert!(m.peer_specs(&BTreeMap::new()).is_empty());
        assert_eq!(m.ingest_cert(&b.raw, 0), Err(Reject::Revoked(b.node_id)));
        // A restarted node, from its cache, still refuses B.
        let cache = m.to_cache();
        let mut m2 = Membership::new(params(&w), a, 0);
        assert!(m2.load_cache(&cache, 0).is_empty());
        assert_eq!(m2.ingest_cert(&b.raw, 0), Err(Reject::Revoked(b.node_id)));
        assert!(m2.is_revoked(&b.node_id, &kb.wg_public()));
    }

    #[test]
    fn a_left_node_frees_its_slot_and_cannot_return() {
        let w = world(None);
        let (ka, a) = node(&w, "a", 100);
        let (kb, b) = node(&w, "b", 200);
        let mut m = Membership::new(params(&w), a.clone(), 0);
        m.ingest_record(a.node_id, &record(&ka, 1, 0, false))
            .unwrap();
        m.ingest_cert(&b.raw, 0).unwrap();
        m.ingest_record(b.node_id, &record(&kb, 1, 0, false))
            .unwrap();
        let b_slot = m.assignments()[&b.node_id].slot;
        m.ingest_record(b.node_id, &record(&kb, 2, 0, true))
            .unwrap();
        assert!(!m.assignments().contains_key(&b.node_id));
        assert!(m.peer_specs(&BTreeMap::new()).is_empty());
        // A newcomer with B's key would now be offered B's old slot.
        assert_eq!(
            addressing::candidate(
                &m.params.mesh,
                &kb.wg_public(),
                m.claim_for_newcomer(&kb.wg_public()).unwrap(),
                256
            ),
            b_slot
        );
        let mut m2 = Membership::new(params(&w), a, 0);
        m2.load_cache(&m.to_cache(), 0);
        assert_eq!(m2.ingest_cert(&b.raw, 0), Err(Reject::Left(b.node_id)));
    }

    #[test]
    fn a_one_use_invite_admits_only_the_earliest_certificate() {
        let w = world(Some(1));
        let (_, a) = node(&w, "a", 100);
        let (_, b) = node(&w, "b", 200);
        let (_, c) = node(&w, "c", 300);
        let mut m = Membership::new(params(&w), a.clone(), 0);
        m.ingest_cert(&b.raw, 0).unwrap();
        m.set_admitted_k(b.node_id, 0);
        m.ingest_cert(&c.raw, 0).unwrap();
        m.set_admitted_k(c.node_id, 0);
        let active: Vec<String> = m.active().map(|m| m.cert.name.clone()).collect();
        // a, b and c share the invite in this test world; only the first certificate counts.
        assert_eq!(active, vec!["a".to_string()]);
        assert_eq!(m.invite_uses(&a.invite.invite_key, &c.node_id), 2);
    }

    /// Competing certificates (one identity issued twice, or one WireGuard key under two
    /// identities) resolve to the same winner on every node, whatever order they arrive in.
    #[test]
    fn competing_certificates_resolve_the_same_everywhere() {
        let w = world(None);
        let (ka, a) = node(&w, "a", 100);
        let (kb, b) = node(&w, "b", 200);
        // B issues itself a second certificate later; a third party reuses B's WireGuard key
        // with an identity of its own, once after B and once before.
        let b_again = Cert::verify(
            &cert(&w.inv, &w.secret, &kb, "b", 250),
            &MeshId(w.root.public()),
        )
        .unwrap();
        let copycat = |at: u64| {
            let k = NodeKeys {
                identity: ed25519_dalek::SigningKey::generate(&mut rand_core::OsRng),
                wireguard: kb.wireguard.clone(),
            };
            cert(&w.inv, &w.secret, &k, "x", at)
        };
        let late_copy = copycat(300);
        let early_copy = copycat(150);

        let view = |order: &[&Signed]| {
            let mut m = Membership::new(params(&w), a.clone(), 0);
            for raw in order {
                let _ = m.ingest_cert(raw, 0);
            }
            m.all()
                .map(|m| (m.cert.node_id, m.cert.issued_at))
                .collect::<Vec<_>>()
        };
        let forward = view(&[&b.raw, &b_again.raw, &late_copy]);
        let backward = view(&[&late_copy, &b_again.raw, &b.raw]);
        assert_eq!(forward, backward);
        assert!(forward.contains(&(b.node_id, 200)), "{forward:?}");
        assert_eq!(forward.len(), 2, "the later copy of B's key is refused");

        // The earlier holder of a key wins even when it arrives second.
        let mut m = Membership::new(params(&w), a.clone(), 0);
        m.ingest_cert(&b.raw, 0).unwrap();
        let early_id = m.ingest_cert(&early_copy, 0).unwrap();
        assert!(m.get(&b.node_id).is_none());
        assert!(m.get(&early_id).is_some());
        assert!(matches!(
            m.ingest_cert(&b.raw, 0),
            Err(Reject::WireguardKeyTaken { holder, .. }) if holder == early_id
        ));

        // Nobody takes this node's own key away from it, however early the copy claims to be.
        let thief = NodeKeys {
            identity: ed25519_dalek::SigningKey::generate(&mut rand_core::OsRng),
            wireguard: ka.wireguard.clone(),
        };
        let stolen = cert(&w.inv, &w.secret, &thief, "a2", 1);
        assert!(matches!(
            m.ingest_cert(&stolen, 0),
            Err(Reject::WireguardKeyTaken { holder, .. }) if holder == a.node_id
        ));
        assert!(m.get(&a.node_id).is_some());
    }

    /// A certificate refused for its WireGuard key changes nothing, also when it is an earlier
    /// re-issue of a member's identity: the member keeps its current certificate, on every node
    /// alike whatever the arrival order.
    #[test]
    fn a_certificate_refused_for_its_wireguard_key_removes_nothing() {
        let w = world(None);
        let (_, a) = node(&w, "a", 10);
        let (k1, c1_late) = node(&w, "one", 300);
        let (k2, c2) = node(&w, "two", 50);
        // The holder of both keys re-issues "one" earlier, with "two"'s WireGuard key.
        let k1b = NodeKeys {
            identity: k1.identity.clone(),
            wireguard: k2.wireguard.clone(),
        };
        let c1_early = cert(&w.inv, &w.secret, &k1b, "one", 100);
        let view = |order: &[&Signed]| {
            let mut m = Membership::new(params(&w), a.clone(), 0);
            for raw in order {
                let _ = m.ingest_cert(raw, 0);
            }
            let mut v: Vec<_> = m
                .all()
                .map(|m| (m.cert.name.clone(), m.cert.issued_at))
                .collect();
            v.sort();
            v
        };
        let forward = view(&[&c1_late.raw, &c2.raw, &c1_early]);
        assert_eq!(
            forward,
            vec![("a".into(), 10), ("one".into(), 300), ("two".into(), 50)]
        );
        assert_eq!(
            view(&[&c1_early, &c2.raw, &c1_late.raw]),
            view(&[&c2.raw, &c1_early, &c1_late.raw])
        );
        assert_eq!(forward, view(&[&c2.raw, &c1_late.raw, &c1_early]));
    }

    #[test]
    fn prune_forgets_members_that_never_showed_up() {
        let w = world(None);
        let (_, a) = node(&w, "a", 100);
        let (_, b) = node(&w, "b", 200);
        let mut m = Membership::new(params(&w), a, 1000);
        m.ingest_cert(&b.raw, 1000).unwrap();
        assert!(m.prune(1000 + 60).is_empty());
        assert_eq!(
            m.prune(1000 + PENDING_MEMBER_TTL.as_secs() + 1),
            vec!["b".to_string()]
        );
    }

    /// A node that was down long ago keeps its members at restart: the time it was down does
    /// not count as their silence; the time it ran does.
    #[test]
    fn a_restart_after_a_month_forgets_no_member() {
        let w = world(None);
        let (_, a) = node(&w, "a", 100);
        let (kb, b) = node(&w, "b", 200);
        let mut before = Membership::new(params(&w), a.clone(), 1000);
        before.ingest_cert(&b.raw, 1000).unwrap();
        before
            .ingest_record(b.node_id, &record(&kb, 1, 0, false))
            .unwrap();
        before.set_liveness(b.node_id, Liveness::Alive, 1000);
        let cache = before.to_cache();

        let month = MEMBER_CACHE_TTL.as_secs();
        let restart = 1000 + 2 * month;
        let mut after = Membership::new(params(&w), a.clone(), restart);
        assert!(after.load_cache(&cache, restart).is_empty());
        assert!(after.prune(restart).is_empty(), "forgot members at restart");
        assert!(after.prune(restart + month - 1).is_empty());
        // Silent for a whole month of this run: forgotten.
        assert_eq!(after.prune(restart + month + 1), vec!["b".to_string()]);

        // The node ran 20 days without hearing from b, was down two months, then restarts:
        // b has 10 days left, not a fresh month (restarts do not keep dead members forever).
        let day = 24 * 3600;
        let mut cache = cache;
        cache.saved_at = 1000 + 20 * day;
        let restart = cache.saved_at + 60 * day;
        let mut after = Membership::new(params(&w), a, restart);
        assert!(after.load_cache(&cache, restart).is_empty());
        assert!(after.prune(restart + 10 * day - 1).is_empty());
        assert_eq!(after.prune(restart + 10 * day + 1), vec!["b".to_string()]);
    }

    /// The cache remembers the highest sequence number this node published, so the next run
    /// continues above it even with its clock behind.
    #[test]
    fn the_cache_keeps_this_nodes_highest_sequence_number() {
        let w = world(None);
        let (ka, a) = node(&w, "a", 100);
        let mut m = Membership::new(params(&w), a.clone(), 1000);
        assert_eq!(m.to_cache().own_seq, 0);
        m.ingest_record(a.node_id, &record(&ka, 7_000, 0, false))
            .unwrap();
        assert_eq!(m.to_cache().own_seq, 7_000);
    }

    /// A one-use token whose joiner was admitted but never ran can be used again once that
    /// admission is forgotten; a member that did run keeps its use.
    #[test]
    fn a_pending_member_that_never_came_gives_its_invite_use_back() {
        let w = world(Some(1));
        let (_, a) = node(&w, "a", 100);
        let (_, b) = node(&w, "b", 200);
        let (kc, c) = node(&w, "c", 300);
        let mut m = Membership::new(params(&w), a.clone(), 1000);
        // In this world a's own certificate uses the one-use invite too: count b and c only.
        m.ingest_cert(&b.raw, 1000).unwrap();
        assert_eq!(m.invite_uses(&b.invite.invite_key, &a.node_id), 1);
        m.prune(1000 + PENDING_MEMBER_TTL.as_secs() + 1);
        assert_eq!(m.invite_uses(&b.invite.invite_key, &a.node_id), 0);

        // c runs (its record arrives), then goes silent: its use stays.
        m.ingest_cert(&c.raw, 1000).unwrap();
        m.ingest_record(c.node_id, &record(&kc, 1, 0, false))
            .unwrap();
        m.set_liveness(c.node_id, Liveness::Dead, 1001);
        m.prune(1000 + PENDING_MEMBER_TTL.as_secs() + 1);
        assert!(m.get(&c.node_id).is_some());
        assert_eq!(m.invite_uses(&b.invite.invite_key, &a.node_id), 1);
    }
}
