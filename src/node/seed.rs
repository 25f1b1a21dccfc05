//! Answering joiners: any member can be the seed.

use super::Node;
use crate::join::{decide, decode_frame, encode_frame, peek_request_node, Frame, JoinAccept};
use crate::trust::{Context, Signed};
use crate::util::unix_now;
use std::net::SocketAddr;
use tracing::{debug, info, warn};

/// Keep acceptances well inside one datagram: members beyond this come by gossip.
const ACCEPT_BUDGET: usize = 8 * 1024;

impl<P: super::platform::Platform> Node<P> {
    /// A node this one does not know tried to handshake. If it was removed, hand it the
    /// revocation (at most every 30 s per key) so it can stop; if it is shut out because its
    /// invite was used up first, hand it the certificates that used it.
    pub(super) async fn on_unknown_initiator(&mut self, wg: [u8; 32], from: SocketAddr) {
        let over = self
            .m
            .all()
            .find(|x| x.cert.wireguard == wg && self.m.over_its_invite(&x.cert.node_id))
            .map(|x| (x.cert.node_id, x.cert.invite.invite_key));
        if let Some((id, invite)) = over {
            let now = std::time::Instant::now();
            if self
                .conflict_notified
                .get(&id)
                .is_some_and(|t| now.duration_since(*t) < std::time::Duration::from_secs(3))
            {
                return;
            }
            let winners: Vec<(Signed, Signed)> = self
                .m
                .active()
                .filter(|w| w.cert.invite.invite_key == invite)
                .filter_map(|w| Some((w.cert.raw.clone(), w.record_raw.clone()?)))
                .collect();
            self.conflict_notified.insert(id, now);
            debug!(%from, node = %id, "telling a member that its invite was used up first");
            self.device
                .send_control(&encode_frame(&Frame::Conflict(winners)), from)
                .await;
            return;
        }
        let Some(rev) = self
            .m
            .revocations()
            .find(|r| r.body.wireguard == wg)
            .map(|r| r.raw.clone())
        else {
            return;
        };
        let now = std::time::Instant::now();
        if self
            .notified
            .get(&wg)
            .is_some_and(|t| now.duration_since(*t) < std::time::Duration::from_secs(30))
        {
            return;
        }
        self.notified.insert(wg, now);
        debug!(%from, "telling a removed node about its revocation");
        self.device
            .send_control(&encode_frame(&Frame::Revoked(rev)), from)
            .await;
    }

    /// Members that still claim a slot they lost are told who won (at most every 3 s each): while
    /// they use the lost slot's address, every member that resolved the conflict drops their
    /// packets, so gossip alone could never tell them.
    pub(super) async fn notify_slot_losers(&mut self) {
        let assign = self.m.assignments();
        let slots = self.m.params.range.slots();
        let now = std::time::Instant::now();
        let mut notices = Vec::new();
        for x in self.m.active() {
            let id = x.cert.node_id;
            // The claim as this node knows it: from the member's record, or, if none has got
            // through yet (its packets are dropped while it uses the lost address), from its
            // admission.
            let (Some(claim), Some(a)) = (x.claim_k(), assign.get(&id)) else {
                continue;
            };
            if id == self.cert.node_id || claim == a.k {
                continue;
            }
            if self
                .conflict_notified
                .get(&id)
                .is_some_and(|t| now.duration_since(*t) < std::time::Duration::from_secs(3))
            {
                continue;
            }
            let claimed = crate::mesh::addressing::candidate(
                &self.m.params.mesh,
                &x.cert.wireguard,
                claim,
                slots,
            );
            let winners: Vec<(Signed, Signed)> = self
                .m
                .active()
                .filter(|w| {
                    assign
                        .get(&w.cert.node_id)
                        .is_some_and(|wa| wa.slot == claimed)
                })
                .filter_map(|w| Some((w.cert.raw.clone(), w.record_raw.clone()?)))
                .collect();
            let to = self
                .device
                .peer_by_node(&id)
                .and_then(|p| p.endpoint())
                .or_else(|| x.record.as_ref().and_then(|r| r.endpoints.first().copied()));
            if let (false, Some(to)) = (winners.is_empty(), to) {
                notices.push((id, to, winners));
            }
        }
        for (id, to, winners) in notices {
            self.conflict_notified.insert(id, now);
            debug!(node = %id, %to, "telling a member its slot claim lost a conflict");
            self.device
                .send_control(&encode_frame(&Frame::Conflict(winners)), to)
                .await;
        }
    }

    pub(super) async fn on_control_frame(&mut self, frame: &[u8], from: SocketAddr) {
        if !self.control_limit.allow(
            crate::util::sender_key(from.ip()),
            std::time::Instant::now(),
        ) {
            debug!(%from, "control frame dropped: too many from this address");
            return;
        }
        let raw = match decode_frame(frame) {
            Ok(Frame::Request(raw)) => raw,
            Ok(Frame::Revoked(raw)) => {
                // Root-signed, so it is safe to take from anyone.
                match self.m.ingest_revocation(&raw) {
                    Ok(true) => info!(%from, "learnt of a removal from a member"),
                    Ok(false) => {}
                    Err(e) => {
                        debug!(%from, error = %e, "ignoring a revocation notice that does not verify")
                    }
                }
                return;
            }
            Ok(Frame::Conflict(statements)) => {
                self.on_conflict_notice(statements, from);
                return;
            }
            Ok(Frame::Accept(raw)) => {
                // Only ever an answer to this node's own bootstrap fallback.
                self.on_accept(&raw, from).await;
                return;
            }
            Ok(Frame::Refuse(r)) => {
                self.on_refusal(&r, from);
                return;
            }
            Err(e) => {
                debug!(%from, error = %e, "ignoring a malformed control frame");
                return;
            }
        };
        let now = unix_now();
        match decide(&self.m, &raw, now) {
            Ok(adm) => {
                let id = adm.cert.node_id;
                let name = adm.cert.name.clone();
                let first_admission = self.m.get(&id).is_none();
                if let Err(e) = self.m.ingest_cert(&adm.cert.raw, now) {
                    warn!(%from, error = %e, "join passed checks but the certificate was not accepted");
                    return;
                }
                self.m.set_admitted_k(id, adm.slot_k);
                // Where the joiner asked from is its first endpoint candidate. Only a first
                // admission sets it: a request replayed from elsewhere must not redirect the
                // tunnel (it cannot take it over, but it could stall it).
                if first_admission {
                    self.hints.insert(id, from);
                }
                let accept =
                    self.acceptance(&adm.cert.identity, adm.request.nonce, adm.slot_k, from, &id);
                let signed = Signed::sign(Context::JoinAccept, &accept, &self.keys.identity);
                self.push_peers().await;
                self.device
                    .send_control(&encode_frame(&Frame::Accept(signed)), from)
                    .await;
                if first_admission {
                    info!(node = %name, %from, slot_k = adm.slot_k, "admitted a new member");
                    let _ = self.persist();
                } else {
                    // A retried (or replayed) request: same answer, nothing new to write.
                    debug!(node = %name, %from, "answered a repeated join request");
                }
            }
            Err(refusal) => {
                let who = peek_request_node(&raw)
                    .map(|(_, n)| n)
                    .unwrap_or_else(|| "?".into());
                if self.refusal_log_limit.allow(
                    crate::util::sender_key(from.ip()),
                    std::time::Instant::now(),
                ) {
                    warn!(%from, node = %who, reason = ?refusal.reason, "refused a join: {}", refusal.message);
                } else {
                    debug!(%from, node = %who, reason = ?refusal.reason, "refused a join: {}", refusal.message);
                }
                self.device
                    .send_control(&encode_frame(&Frame::Refuse(refusal)), from)
                    .await;
            }
        }
    }

    /// A member says this node lost its slot, or its invite, to earlier members. The notice
    /// travels outside the tunnels, so it is heard only from where a known member is, and it
    /// can only teach this node what moves it: the statements are tried on a copy of the view,
    /// and taken only if they change this node's own slot or shut it out; then only the
    /// statements that do so are kept.
    fn on_conflict_notice(&mut self, statements: Vec<(Signed, Signed)>, from: SocketAddr) {
        if !self.is_member_endpoint(from) {
            debug!(%from, "ignoring a slot conflict notice from an address no member uses");
            return;
        }
        let now = unix_now();
        let me = self.cert.node_id;
        let mut trial = self.m.clone();
        let mut verified = Vec::new();
        for (cert, record) in statements {
            let r = trial
                .ingest_cert(&cert, now)
                .and_then(|id| trial.ingest_record(id, &record).map(|_| id));
            match r {
                Ok(id) => verified.push((id, cert, record)),
                Err(e) => {
                    debug!(%from, error = %e, "ignoring a slot conflict notice that does not verify")
                }
            }
        }
        let before = self.m.assignments().get(&me).map(|a| a.slot);
        let after = trial.assignments();
        let lost_slot = before.filter(|s| after.get(&me).map(|a| a.slot) != Some(*s));
        let shut_out = trial.over_its_invite(&me) && !self.m.over_its_invite(&me);
        if lost_slot.is_none() && !shut_out {
            debug!(%from, "ignoring a slot conflict notice that does not concern this node");
            return;
        }
        let my_invite = self.cert.invite.invite_key;
        for (id, cert, record) in verified {
            let takes_my_slot = lost_slot.is_some() && after.get(&id).map(|a| a.slot) == lost_slot;
            let uses_my_invite = shut_out
                && trial
                    .get(&id)
                    .is_some_and(|x| x.cert.invite.invite_key == my_invite);
            if takes_my_slot || uses_my_invite {
                let _ = self
                    .m
                    .ingest_cert(&cert, now)
                    .and_then(|id| self.m.ingest_record(id, &record));
            }
        }
    }

    /// Whether `addr` is where a known member is: its tunnel's current endpoint or one it
    /// published.
    fn is_member_endpoint(&self, addr: SocketAddr) -> bool {
        self.m.active().any(|x| {
            x.cert.node_id != self.cert.node_id
                && (x
                    .record
                    .as_ref()
                    .is_some_and(|r| r.endpoints.contains(&addr))
                    || self
                        .device
                        .peer_by_node(&x.cert.node_id)
                        .and_then(|p| p.endpoint())
                        .is_some_and(|e| e == addr))
        })
    }

    fn acceptance(
        &self,
        joiner: &[u8; 32],
        nonce: [u8; 16],
        slot_k: u32,
        observed: SocketAddr,
        joiner_id: &crate::trust::NodeId,
    ) -> JoinAccept {
        let mut budget = ACCEPT_BUDGET;
        let revocations: Vec<Signed> = self
            .m
            .revocations()
            .map(|r| r.raw.clone())
            .take_while(|r| {
                let n = r.body.len() + r.sig.len() + 8;
                budget = budget.saturating_sub(n);
                budget > 0
            })
            .collect();
        let mut members = Vec::new();
        for x in self.m.active() {
            if x.cert.node_id == self.cert.node_id
                || x.cert.node_id == *joiner_id
                || x.record_raw.is_none()
            {
                continue;
            }
            let n = x.cert.raw.body.len() + x.record_raw.as_ref().map_or(0, |r| r.body.len()) + 160;
            if n > budget {
                break;
            }
            budget -= n;
            members.push((x.cert.raw.clone(), x.record_raw.clone()));
        }
        JoinAccept {
            nonce,
            joiner: *joiner,
            slot_k,
            observed,
            seed_cert: self.cert.raw.clone(),
            seed_record: self.record_raw.clone(),
            members,
            revocations,
        }
    }
}
