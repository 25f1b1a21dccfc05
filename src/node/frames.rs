//! Control frames outside the tunnels, as the node handles them: join requests (any member is a
//! seed), revocation and conflict notices, and answers to this node's own bootstrap fallback.
//! The rules are pure ([`crate::join::seed`], [`super::notices`], [`super::fallback`]); this file
//! applies their decisions: what to take into the view, what to send where.

use super::fallback::{Fallback, Target};
use super::notices::{self, Cooldowns};
use super::platform::Platform;
use super::{Node, NodeError};
use crate::id::Key32;
use crate::join::{acceptance, decide, make_request, peek_request_node};
use crate::state::decode_key;
use crate::trust::Signed;
use crate::util::{sender_key, unix_now, KeyedLimiter};
use crate::wire::{decode_frame, encode_frame, Frame};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

pub struct Frames {
    /// Control frames come from anyone: bounded per source address.
    limit: KeyedLimiter<IpAddr>,
    /// Refused joins are logged at warning level once a minute per source address.
    refusal_log: KeyedLimiter<IpAddr>,
    cooldowns: Cooldowns,
    fallback: Fallback,
    /// Direct asks of unroutable members, per source address.
    direct_asks: KeyedLimiter<IpAddr>,
}

impl Frames {
    pub fn new(now: Instant) -> Frames {
        Frames {
            limit: KeyedLimiter::new(Duration::from_secs(1), 20, 4096),
            refusal_log: KeyedLimiter::new(Duration::from_secs(60), 1, 1024),
            cooldowns: Cooldowns::default(),
            fallback: Fallback::new(now),
            direct_asks: KeyedLimiter::new(Duration::from_secs(5), 1, 1024),
        }
    }
}

impl<P: Platform> Node<P> {
    /// The bootstrap endpoints this node joined through.
    fn bootstrap_targets(&self) -> Vec<Target> {
        self.local
            .config
            .bootstrap
            .iter()
            .map(|b| Target {
                addr: b.addr,
                wireguard: decode_key(&b.wireguard).ok(),
            })
            .collect()
    }

    /// Every member's last known endpoints, each answerable only by that member.
    fn member_targets(&self) -> Vec<Target> {
        self.view
            .snapshot()
            .members
            .iter()
            .filter(|r| !r.is_self)
            .flat_map(|r| {
                r.endpoints.iter().map(|a| Target {
                    addr: *a,
                    wireguard: Some(r.wg),
                })
            })
            .collect()
    }

    /// Send this node's join request to `targets`, as a member asking again.
    async fn ask(&mut self, targets: &[Target], direct: bool) {
        let now = Instant::now();
        let (req, nonce) = make_request(
            &self.local.keys,
            &self.local.cert.raw,
            self.publisher.endpoints().to_vec(),
            unix_now(),
        );
        if direct {
            for t in targets {
                self.frames.fallback.asked_directly(t.clone(), nonce, now);
            }
        } else {
            self.frames.fallback.asked(nonce, now);
        }
        let frame = encode_frame(&Frame::Request(req));
        for t in targets {
            self.plane.send(&frame, t.addr).await;
        }
    }

    pub(super) async fn on_control_frame(
        &mut self,
        frame: &[u8],
        from: SocketAddr,
    ) -> Result<(), NodeError> {
        if !self
            .frames
            .limit
            .allow(sender_key(from.ip()), Instant::now())
        {
            debug!(%from, "control frame dropped: too many from this address");
            return Ok(());
        }
        match decode_frame(frame) {
            Ok(Frame::Request(raw)) => self.on_join_request(raw, from).await?,
            // Root-signed, so it is safe to take from anyone.
            Ok(Frame::Revoked(raw)) => match self.view.m_mut().ingest_revocation(&raw) {
                Ok(true) => info!(%from, "learnt of a removal from a member"),
                Ok(false) => {}
                Err(e) => {
                    debug!(%from, error = %e, "ignoring a revocation notice that does not verify")
                }
            },
            Ok(Frame::Conflict(statements)) => self.on_conflict_notice(statements, from),
            // Only ever an answer to this node's own bootstrap fallback.
            Ok(Frame::Accept(raw)) => self.on_fallback_answer(&raw, from).await?,
            Ok(Frame::Refuse(r)) => {
                if self.frames.fallback.answers(&r) {
                    warn!(%from, reason = ?r.reason, "a bootstrap member refused this node: {}", r.message);
                }
            }
            // Only the path task knows which nonce it asked for.
            Ok(Frame::Reach(nonce)) => {
                if let Some(t) = &self.traverser {
                    let _ = t
                        .requests
                        .try_send(super::traverser::Request::Reached(nonce));
                }
            }
            Err(e) => debug!(%from, error = %e, "ignoring a malformed control frame"),
        }
        Ok(())
    }

    /// Any member is a seed: admit (or refuse, saying why) by the pure rule, and answer.
    async fn on_join_request(&mut self, raw: Signed, from: SocketAddr) -> Result<(), NodeError> {
        let started = Instant::now();
        let now = unix_now();
        let adm = match decide(self.view.m(), &raw, now) {
            Ok(adm) => adm,
            Err(refusal) => {
                let who = peek_request_node(&raw)
                    .map(|(_, n)| n)
                    .unwrap_or_else(|| "?".into());
                if self
                    .frames
                    .refusal_log
                    .allow(sender_key(from.ip()), Instant::now())
                {
                    warn!(%from, node = %who, reason = ?refusal.reason, "refused a join: {}", refusal.message);
                } else {
                    debug!(%from, node = %who, reason = ?refusal.reason, "refused a join: {}", refusal.message);
                }
                self.plane
                    .send(&encode_frame(&Frame::Refuse(refusal)), from)
                    .await;
                return Ok(());
            }
        };
        let id = adm.cert.node_id;
        let m = self.view.m_mut();
        let first_admission = m.get(&id).is_none();
        if let Err(e) = m.ingest_cert(&adm.cert.raw, now) {
            warn!(%from, error = %e, "join passed checks but the certificate was not accepted");
            return Ok(());
        }
        m.set_admitted_k(id, adm.slot_k);
        m.set_admitted_from(id, from);
        let Some(own_record) = self.publisher.record_raw().cloned() else {
            return Ok(());
        };
        let answer = acceptance(
            self.view.m(),
            &self.local.keys,
            &self.local.cert.raw,
            &own_record,
            &adm,
            from,
        );
        // The joiner's handshakes are accepted before it hears the answer.
        self.refresh().await?;
        self.plane
            .send(&encode_frame(&Frame::Accept(answer)), from)
            .await;
        if first_admission {
            // The member cache follows within a second (the tick writes it when the view
            // changed): a burst of joins costs one write, not one per joiner. A crash in
            // between forgets nothing for good: the joiner runs and gossips its certificate.
            info!(node = %adm.cert.name, %from, slot_k = adm.slot_k, "admitted a new member");
        } else {
            // A retried (or replayed) request: same answer, nothing new to write.
            debug!(node = %adm.cert.name, %from, "answered a repeated join request");
        }
        debug!(took = ?started.elapsed(), "join request handled");
        Ok(())
    }

    /// A member says this node lost its /24, or its invite, to earlier members: heard only
    /// from where a known member is, and believed only for what moves this node.
    fn on_conflict_notice(&mut self, statements: Vec<(Signed, Signed)>, from: SocketAddr) {
        let known = self.view.snapshot().member_endpoints.contains(&from)
            || self.plane.device.is_peer_endpoint(from);
        if !known {
            debug!(%from, "ignoring a slot conflict notice from an address no member uses");
            return;
        }
        let now = unix_now();
        let take = notices::judge_conflict_notice(self.view.m(), statements, now);
        if take.is_empty() {
            debug!(%from, "ignoring a slot conflict notice that does not concern this node");
        }
        let m = self.view.m_mut();
        for (cert, record) in take {
            let _ = m
                .ingest_cert(&cert, now)
                .and_then(|id| m.ingest_record(id, &record));
        }
    }

    /// A node this one does not know tried to handshake: tell it why, if the view knows; or,
    /// if it is a member this node cannot route to (it knows its certificate but not its
    /// claim: a cache a crash left without records), ask it, where its handshake came from.
    pub(super) async fn on_unknown_initiator(&mut self, wg: Key32, from: SocketAddr) {
        let now = Instant::now();
        let snap = self.view.snapshot();
        let unroutable = snap.members.iter().any(|r| r.wg == wg && r.slot.is_none());
        // An initiation can be replayed from any address: one ask per source per few seconds
        // bounds what a replayer can make this node send (a request is ~1.5 KB).
        if unroutable && self.frames.direct_asks.allow(sender_key(from.ip()), now) {
            debug!(%from, "a member this node cannot route to knocked; asking it for its record");
            let target = Target {
                addr: from,
                wireguard: Some(wg),
            };
            self.ask(&[target], true).await;
            return;
        }
        let notice =
            notices::for_unknown_initiator(self.view.m(), &wg, &mut self.frames.cooldowns, now);
        if let Some(frame) = notice {
            debug!(%from, "telling a node this one does not know why");
            self.plane.send(&encode_frame(&frame), from).await;
        }
    }

    /// Members that still claim a /24 they lost are told who won.
    pub(super) async fn send_slot_loser_notices(&mut self) {
        let snap = self.view.snapshot().clone();
        if snap.losers.is_empty() {
            return;
        }
        let due = notices::slot_loser_notices(&snap, &mut self.frames.cooldowns, Instant::now());
        for (id, published, frame) in due {
            let to = self
                .plane
                .device
                .peer_by_node(&id)
                .and_then(|p| p.endpoint())
                .or(published);
            if let Some(to) = to {
                debug!(node = %id, %to, "telling a member its slot claim lost a conflict");
                self.plane.send(&encode_frame(&frame), to).await;
            }
        }
    }

    /// Called every tick: when cut off from every member, ask the token's bootstrap endpoints
    /// and members' last known endpoints, a round at a time.
    pub(super) async fn bootstrap_fallback(&mut self) {
        let now = Instant::now();
        if !self.frames.fallback.check_due(now) {
            return;
        }
        let in_touch = self.plane.device.stats().iter().any(|s| s.has_session());
        let have_peers = !self.plane.installed.is_empty();
        let (boot, members) = (self.bootstrap_targets(), self.member_targets());
        let have_targets = !boot.is_empty() || !members.is_empty();
        if !self
            .frames
            .fallback
            .should_ask(now, in_touch, have_peers, have_targets)
        {
            return;
        }
        let round = self.frames.fallback.round(boot, members);
        let addrs: Vec<SocketAddr> = round.iter().map(|t| t.addr).collect();
        info!(asking = ?addrs, "no tunnel to any member; asking the bootstrap endpoints and members' last known addresses");
        self.ask(&round, false).await;
    }

    /// An answer to the fallback: take in the seed and the members it lists.
    async fn on_fallback_answer(
        &mut self,
        raw: &Signed,
        from: SocketAddr,
    ) -> Result<(), NodeError> {
        let mut known = self.bootstrap_targets();
        known.extend(self.member_targets());
        let targets = self.frames.fallback.welcome(known);
        let m = self.view.m();
        let (mesh, identity) = (m.params.mesh, self.local.keys.identity_public());
        let Some((seed, accept)) = self
            .frames
            .fallback
            .accept(raw, from, &targets, &mesh, &identity)
        else {
            debug!(%from, "ignoring a join answer that answers no request of this node");
            return Ok(());
        };
        let now = unix_now();
        let m = self.view.m_mut();
        for r in &accept.revocations {
            let _ = m.ingest_revocation(r);
        }
        let mut learnt = 0;
        let statements = std::iter::once((&accept.seed_cert, Some(&accept.seed_record)))
            .chain(accept.members.iter().map(|(c, r)| (c, r.as_ref())));
        for (cert, record) in statements {
            match m.ingest_cert(cert, now) {
                Ok(id) => {
                    learnt += 1;
                    if let Some(r) = record {
                        let _ = m.ingest_record(id, r);
                    }
                }
                Err(e) => debug!(error = %e, "skipping a member from the bootstrap answer"),
            }
        }
        if accept.slot_k != self.local.config.slot_k {
            warn!(
                seed = %seed.name,
                "the bootstrap member places this node differently; keeping its own claim"
            );
        }
        if self.local.config.bootstrap.iter().any(|b| b.addr == from) {
            info!(seed = %seed.name, %from, members = learnt, "back in touch through a bootstrap endpoint");
        } else {
            info!(seed = %seed.name, %from, members = learnt, "back in touch through a member it asked");
        }
        self.refresh().await
    }
}
