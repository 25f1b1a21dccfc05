//! The token's bootstrap endpoints as the fallback of a running node (DESIGN, "Restart"): a
//! node that hears from no member for a while (its member cache was lost or moved aside, or
//! every cached endpoint went stale while it was down) sends its join request to them again.
//! A seed answers a member's request like a retried join, with its own certificate and record
//! and a few other members; the node takes those in, its tunnels come up and gossip resumes.

use super::Node;
use crate::constants::{BOOTSTRAP_FALLBACK_AFTER, BOOTSTRAP_FALLBACK_RETRY};
use crate::join::{encode_frame, make_request, verify_accept, Frame};
use crate::trust::{Key32, Signed};
use crate::util::unix_now;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

/// A tunnel that handshook this recently means the node is in touch with the mesh.
const IN_TOUCH: Duration = Duration::from_secs(180);
/// Requests whose answers are still welcome.
const PENDING_MAX: usize = 8;
const PENDING_TTL: Duration = Duration::from_secs(120);

pub(super) struct Fallback {
    /// Since when this node has had no live tunnel (or since start).
    cut_off_since: Instant,
    last_sent: Option<Instant>,
    /// The check walks every peer's statistics: once a second is plenty.
    last_check: Option<Instant>,
    pending: Vec<([u8; 16], Instant)>,
}

impl Fallback {
    pub(super) fn new() -> Fallback {
        Fallback {
            cut_off_since: Instant::now(),
            last_sent: None,
            last_check: None,
            pending: Vec::new(),
        }
    }
}

impl<P: super::platform::Platform> Node<P> {
    /// The bootstrap endpoints this node joined through, with their WireGuard keys.
    fn bootstrap_entries(&self) -> Vec<(SocketAddr, Option<Key32>)> {
        self.config
            .bootstrap
            .iter()
            .map(|b| (b.addr, crate::state::decode_key(&b.wireguard).ok()))
            .collect()
    }

    /// Called every tick: send the join request to the bootstrap endpoints when cut off.
    pub(super) async fn bootstrap_fallback(&mut self) {
        let now = Instant::now();
        if self
            .fallback
            .last_check
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
        {
            return;
        }
        self.fallback.last_check = Some(now);
        let in_touch = self
            .device
            .stats()
            .iter()
            .any(|s| s.last_handshake.is_some_and(|t| t < IN_TOUCH));
        if in_touch {
            self.fallback.cut_off_since = now;
            self.fallback.last_sent = None;
            return;
        }
        let entries = self.bootstrap_entries();
        if entries.is_empty()
            || now.duration_since(self.fallback.cut_off_since) < BOOTSTRAP_FALLBACK_AFTER
            || self
                .fallback
                .last_sent
                .is_some_and(|t| now.duration_since(t) < BOOTSTRAP_FALLBACK_RETRY)
        {
            return;
        }
        self.fallback.last_sent = Some(now);
        let (req, nonce) = make_request(
            &self.keys,
            &self.cert.raw,
            self.endpoints.clone(),
            unix_now(),
        );
        self.fallback
            .pending
            .retain(|(_, t)| now.duration_since(*t) < PENDING_TTL);
        if self.fallback.pending.len() >= PENDING_MAX {
            self.fallback.pending.remove(0);
        }
        self.fallback.pending.push((nonce, now));
        let frame = encode_frame(&Frame::Request(req));
        let addrs: Vec<SocketAddr> = entries.iter().map(|(a, _)| *a).collect();
        info!(bootstrap = ?addrs, "no tunnel to any member for a while; asking the token's bootstrap endpoints");
        for addr in addrs {
            self.device.send_control(&frame, addr).await;
        }
    }

    /// A refusal arrived: worth a warning if it answers this node's fallback request (the
    /// reason, e.g. a removal, is what the operator needs to know); ignored otherwise.
    pub(super) fn on_refusal(&mut self, r: &crate::join::JoinRefuse, from: SocketAddr) {
        if self.fallback.pending.iter().any(|(n, _)| *n == r.nonce) {
            warn!(%from, reason = ?r.reason, "a bootstrap member refused this node: {}", r.message);
        }
    }

    /// An acceptance arrived: if it answers one of this node's fallback requests, take in the
    /// seed and the members it lists.
    pub(super) async fn on_accept(&mut self, raw: &Signed, from: SocketAddr) {
        let Some((_, expected)) = self
            .bootstrap_entries()
            .into_iter()
            .find(|(a, _)| *a == from)
        else {
            debug!(%from, "ignoring a join answer from an address this node never asked");
            return;
        };
        let identity = self.keys.identity_public();
        let mesh = self.m.params.mesh;
        let verified = self.fallback.pending.iter().find_map(|(nonce, _)| {
            verify_accept(raw, &mesh, nonce, &identity, expected.as_ref()).ok()
        });
        let Some((seed, accept)) = verified else {
            debug!(%from, "ignoring a join answer that answers no request of this node");
            return;
        };
        self.fallback.pending.clear();
        let now = unix_now();
        for r in &accept.revocations {
            let _ = self.m.ingest_revocation(r);
        }
        let mut learnt = 0;
        let statements = std::iter::once((&accept.seed_cert, Some(&accept.seed_record)))
            .chain(accept.members.iter().map(|(c, r)| (c, r.as_ref())));
        for (cert, record) in statements {
            match self.m.ingest_cert(cert, now) {
                Ok(id) => {
                    learnt += 1;
                    if let Some(r) = record {
                        let _ = self.m.ingest_record(id, r);
                    }
                }
                Err(e) => debug!(error = %e, "skipping a member from the bootstrap answer"),
            }
        }
        if accept.slot_k != self.record.slot_k {
            warn!(
                seed = %seed.name,
                "the bootstrap member places this node differently; keeping its own claim"
            );
        }
        info!(seed = %seed.name, %from, members = learnt, "back in touch through a bootstrap endpoint");
        self.push_peers().await;
    }
}
