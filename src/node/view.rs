//! The node's membership view and its snapshot: the view changes as gossip, joins and the API
//! teach it things; the snapshot is recomputed only when it did, and the member cache
//! (`members.json`) is written at most once a second when something worth keeping changed,
//! and hourly regardless (members' last-seen times on disk stay current).

use super::snapshot::Snapshot;
use super::Exit;
use crate::gossip::Membership;
use crate::state::{StateDir, StateError};
use crate::util::unix_now;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tracing::{error, info};

const PERSIST_AFTER_CHANGE: Duration = Duration::from_secs(1);
const PERSIST_ANYWAY: Duration = Duration::from_secs(3600);

pub struct View {
    m: Membership,
    snap: Arc<Snapshot>,
    /// Every new snapshot, for the parts that run as their own tasks.
    tx: watch::Sender<Arc<Snapshot>>,
    last_persist: Instant,
}

impl View {
    pub fn new(m: Membership, now: Instant) -> View {
        let snap = Arc::new(Snapshot::of(&m));
        View {
            tx: watch::channel(snap.clone()).0,
            snap,
            m,
            last_persist: now,
        }
    }

    /// The snapshots from now on, starting with the current one.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.tx.subscribe()
    }

    pub fn m(&self) -> &Membership {
        &self.m
    }

    pub fn m_mut(&mut self) -> &mut Membership {
        &mut self.m
    }

    /// The snapshot of the view as it was at the last [`View::refresh`].
    pub fn snapshot(&self) -> &Arc<Snapshot> {
        &self.snap
    }

    /// Recompute the snapshot if the view changed since; the new one if so.
    pub fn refresh(&mut self) -> Option<Arc<Snapshot>> {
        if self.snap.version == self.m.version() {
            return None;
        }
        self.snap = Arc::new(Snapshot::of(&self.m));
        self.tx.send_replace(self.snap.clone());
        Some(self.snap.clone())
    }

    /// The pure part of a reconcile tick: forget members gone too long, check whether this
    /// node must stop, and recompute the snapshot if the view changed (the new one, if so).
    pub fn tick(&mut self, now: u64, left: bool) -> Result<Option<Arc<Snapshot>>, Exit> {
        for name in self.m.prune(now) {
            info!(member = %name, "forgetting a member that has not been seen for too long");
        }
        if let Some(exit) = self.verdict(left) {
            return Err(exit);
        }
        Ok(self.refresh())
    }

    /// Whether the view says this node must stop: it was removed, or it was shut out because
    /// the one-use invite it joined with was used first by an earlier certificate.
    pub fn verdict(&self, left: bool) -> Option<Exit> {
        let me = self.m.me();
        if self.m.is_revoked(&me.cert.node_id, &me.cert.wireguard) {
            return Some(Exit::Removed);
        }
        if !left && !self.m.active().any(|x| x.cert.node_id == self.m.self_id) {
            return Some(Exit::InviteUsedUp);
        }
        None
    }

    /// Write the member cache now.
    pub fn persist(&mut self, state: &StateDir, now: Instant) -> Result<(), StateError> {
        let mut cache = self.m.to_cache();
        cache.saved_at = unix_now();
        state.save_members(&cache)?;
        self.m.dirty = false;
        self.last_persist = now;
        Ok(())
    }

    /// Write the member cache if it is due.
    pub fn persist_if_due(&mut self, state: &StateDir, now: Instant) {
        let since = now.saturating_duration_since(self.last_persist);
        if (self.m.dirty && since >= PERSIST_AFTER_CHANGE) || since >= PERSIST_ANYWAY {
            if let Err(e) = self.persist(state, now) {
                error!(error = %e, "saving the member cache failed");
            }
        }
    }
}
