//! The prober task: runs the [`Detector`] on a UDP socket on the node's mesh address (bound to
//! the TUN device, so probes only ever arrive through a tunnel), follows the membership from
//! the snapshot channel and which tunnels have a session from the data plane, and publishes
//! its verdicts for the membership view.

use super::probe::{Detector, Msg, Target, PROBE_PORT};
use super::snapshot::Snapshot;
use super::TunnelStats;
use crate::gossip::Liveness;
use crate::id::NodeId;
use crate::mesh::linux::bind_udp_on_device;
use std::collections::{HashMap, HashSet};
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::debug;

/// How often the detector's clock advances.
const TICK: Duration = Duration::from_millis(200);
/// How often which tunnels have a session is looked at (it walks every peer).
const SESSIONS_EVERY: Duration = Duration::from_secs(1);

/// Ask the data plane for a fresh handshake with a member.
pub type Rehandshake = Arc<dyn Fn(NodeId) + Send + Sync>;
/// Per member, what the probes say (members they say nothing of are absent).
pub type Verdicts = Arc<HashMap<NodeId, Liveness>>;

/// A running prober; stopped when dropped.
pub struct Prober {
    stop: CancellationToken,
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Start probing from `ip` (the node's mesh address) on `tun`.
pub fn spawn(
    ip: Ipv4Addr,
    tun: &str,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    stats: TunnelStats,
    rehandshake: Rehandshake,
    verdicts: watch::Sender<Verdicts>,
) -> io::Result<Prober> {
    let sock = bind_udp_on_device(SocketAddr::from((ip, PROBE_PORT)), tun)?;
    let sock = tokio::net::UdpSocket::from_std(sock)?;
    let stop = CancellationToken::new();
    tokio::spawn(run(
        sock,
        snapshots,
        stats,
        rehandshake,
        verdicts,
        stop.clone(),
    ));
    Ok(Prober { stop })
}

async fn run(
    sock: tokio::net::UdpSocket,
    mut snapshots: watch::Receiver<Arc<Snapshot>>,
    stats: TunnelStats,
    rehandshake: Rehandshake,
    verdicts: watch::Sender<Verdicts>,
    stop: CancellationToken,
) {
    let seed = rand_core::RngCore::next_u64(&mut rand_core::OsRng);
    let mut d = Detector::new(Instant::now(), seed);
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut by_ip: HashMap<Ipv4Addr, NodeId> = HashMap::new();
    let mut last_sessions: Option<Instant> = None;
    let mut buf = [0u8; 64];
    snapshots.mark_changed();
    loop {
        let out = tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {
                let now = Instant::now();
                let membership_moved = snapshots.has_changed().unwrap_or(false);
                if membership_moved
                    || last_sessions.is_none_or(|t| now.duration_since(t) >= SESSIONS_EVERY)
                {
                    last_sessions = Some(now);
                    let up: HashSet<NodeId> = stats()
                        .into_iter()
                        .filter(|s| s.has_session())
                        .map(|s| s.node_id)
                        .collect();
                    let snap = snapshots.borrow_and_update().clone();
                    by_ip = snap
                        .members
                        .iter()
                        .filter(|r| !r.is_self)
                        .filter_map(|r| Some((snap.params.range.node_ip(r.slot?), r.id)))
                        .collect();
                    let targets: Vec<Target> = by_ip
                        .iter()
                        .map(|(ip, id)| Target { ip: *ip, reachable: up.contains(id) })
                        .collect();
                    d.set_members(&targets);
                }
                let out = d.tick(now);
                for ip in d.rehandshakes() {
                    if let Some(id) = by_ip.get(&ip) {
                        rehandshake(*id);
                    }
                }
                let v: HashMap<NodeId, Liveness> = d
                    .verdicts(now)
                    .filter_map(|(ip, l)| Some((*by_ip.get(&ip)?, l)))
                    .collect();
                if **verdicts.borrow() != v {
                    verdicts.send_replace(Arc::new(v));
                }
                out
            }
            r = sock.recv_from(&mut buf) => match r {
                Ok((n, SocketAddr::V4(from))) => match Msg::decode(&buf[..n]) {
                    Some(msg) => d.receive(*from.ip(), msg, Instant::now()),
                    None => Vec::new(),
                },
                Ok(_) => Vec::new(),
                Err(e) => {
                    debug!(error = %e, "probe socket");
                    Vec::new()
                }
            },
        };
        for (to, msg) in out {
            let to = SocketAddr::new(IpAddr::V4(to), PROBE_PORT);
            if let Err(e) = sock.send_to(&msg.encode(), to).await {
                debug!(%to, error = %e, "probe not sent");
            }
        }
    }
}
