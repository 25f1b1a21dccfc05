//! The path task: runs the [`traversal`](super::traversal) rules on a UDP socket on the node's
//! mesh address (bound to the TUN device, so messages only ever arrive through a tunnel from a
//! member). It tells members where their datagrams come from, collects what they say of this
//! node (published by the node as candidates), punches paths to members it has none to, passes
//! punches on for others, and answers `meshctl ping`.

use super::relays::{self, Member, Relays};
use super::snapshot::Snapshot;
use super::traversal::{
    Action, Mapping, Msg, Observation, Observations, PathState, Punches, PATH_PORT,
};
use super::TunnelStats;
use crate::id::NodeId;
use crate::mesh::linux::bind_udp_on_device;
use crate::mesh::path::{PathKind, RelayPath};
use crate::mesh::PeerStats;
use crate::util::KeyedLimiter;
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

/// How often the schedule runs (and pings time out).
const TICK: Duration = Duration::from_millis(250);
/// How often the tunnels are looked at (it walks every peer).
const TUNNELS_EVERY: Duration = Duration::from_secs(1);
/// Each member with a working path is told where it is seen from this often (and at once when
/// that changes).
const SEEN_EVERY: Duration = Duration::from_secs(15);
/// A tunnel counts as a working path while authenticated packets arrived this recently
/// (keepalives come every 25 s on an idle one).
pub const PATH_QUIET: Duration = Duration::from_secs(35);
/// `meshctl ping` waits this long for an answer.
pub const PING_TIMEOUT: Duration = Duration::from_secs(3);
const PINGS_MAX: usize = 256;
/// Whether this node's public address is reachable from a new port is checked this often (and
/// when that address changes)...
const REACH_EVERY: Duration = Duration::from_secs(60);
/// ...and the probe must arrive within this long.
const REACH_WAIT: Duration = Duration::from_secs(3);

/// One member's tunnel, as the schedule sees it.
#[derive(Clone, Copy, Debug)]
struct Tunnel {
    node: NodeId,
    endpoint: Option<SocketAddr>,
    /// A working path: a session, and authenticated packets within [`PATH_QUIET`].
    up: bool,
    /// ...on which the data plane sends directly.
    direct: bool,
}

impl Tunnel {
    fn of(s: &PeerStats) -> Tunnel {
        let up = s.has_session() && s.last_rx.is_some_and(|d| d < PATH_QUIET);
        Tunnel {
            node: s.node_id,
            endpoint: s.endpoint,
            up,
            direct: up && s.path == PathKind::Direct,
        }
    }
}

/// Where a `meshctl ping` gets its round trip (`None`: no answer in time).
type PingReply = oneshot::Sender<Option<Duration>>;

/// What the path task asks of the data plane.
pub trait PathPlane: Send + Sync {
    /// Punch a path to a member (with the address a go-between sees it at).
    fn punch(&self, node: NodeId, seen: Option<SocketAddr>);
    /// Reach `peer` through a relay too (`first`: send through it while direct fails).
    fn use_relay(&self, peer: NodeId, relay: RelayPath, first: bool);
    fn drop_relay(&self, peer: NodeId, relay: NodeId);
    /// As a relay: forward `session` between `a` and `b`; false when full.
    fn bind(&self, session: u64, a: SocketAddr, b: SocketAddr) -> bool;
    fn unbind(&self, session: u64);
    /// Whether the data plane sends to `node` directly now (not through a relay).
    fn sends_direct(&self, node: NodeId) -> bool;
}

/// What members see of this node (for `meshctl netcheck`).
#[derive(Clone, Debug)]
pub struct NatView {
    pub observations: Vec<(NodeId, Observation)>,
    pub mapping: Mapping,
    /// Path messages refused: garbage, or from an address that is no member's.
    pub dropped: u64,
    pub punches_sent: u64,
    pub punches_answered: u64,
    /// Sessions this node relays for others: (session, a, b).
    pub relay_sessions: Vec<(u64, NodeId, NodeId)>,
    /// Relay asks refused (relaying off, no direct path to both, too many).
    pub relay_refused: u64,
    /// Whether a member's probe from a port this node never sent to reached its public
    /// address; `None` before the first check.
    pub port_reachable: Option<bool>,
    /// Round trips last measured to members.
    pub rtt: Vec<(NodeId, Duration)>,
}

impl Default for NatView {
    fn default() -> Self {
        NatView {
            observations: Vec::new(),
            mapping: Mapping::Unknown,
            dropped: 0,
            punches_sent: 0,
            punches_answered: 0,
            relay_sessions: Vec::new(),
            relay_refused: 0,
            port_reachable: None,
            rtt: Vec::new(),
        }
    }
}

/// Asked of the running task.
pub enum Request {
    /// Round trip to a member through its tunnel; `None` without an answer in time.
    Ping {
        node: NodeId,
        reply: oneshot::Sender<Option<Duration>>,
    },
    /// A reachability probe arrived on the mesh port with this nonce.
    Reached(u64),
}

/// A running path task; stopped when dropped.
pub struct Traverser {
    stop: CancellationToken,
    pub requests: mpsc::Sender<Request>,
}

impl Drop for Traverser {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Where the task reports: observed candidates (changed only when they change) and the view.
#[derive(Clone)]
pub struct Outputs {
    pub candidates: watch::Sender<Vec<SocketAddr>>,
    pub view: Arc<Mutex<NatView>>,
}

/// Start the path task on `ip` (the node's mesh address) on `tun`. `relay_enabled`: whether
/// this node relays for others (read every time it is asked).
pub fn spawn(
    ip: Ipv4Addr,
    tun: &str,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    stats: TunnelStats,
    plane: Arc<dyn PathPlane>,
    relay_enabled: Arc<AtomicBool>,
    out: Outputs,
) -> io::Result<Traverser> {
    let sock = bind_udp_on_device(SocketAddr::from((ip, PATH_PORT)), tun)?;
    let sock = tokio::net::UdpSocket::from_std(sock)?;
    let stop = CancellationToken::new();
    let (tx, rx) = mpsc::channel(16);
    let task = Task {
        sock,
        snapshots,
        stats,
        tunnels: Vec::new(),
        tunnels_at: None,
        dirty: true,
        plane,
        relay_enabled,
        relays: Relays::default(),
        members: Vec::new(),
        rtt: HashMap::new(),
        given: HashMap::new(),
        relay_asks: KeyedLimiter::new(Duration::from_secs(1), 8, 1024),
        reach: None,
        reach_checked: None,
        probes_for: KeyedLimiter::new(Duration::from_secs(10), 1, 1024),
        out,
        observations: Observations::default(),
        punches: Punches::new(),
        forwards: KeyedLimiter::new(Duration::from_secs(1), 4, 1024),
        by_ip: HashMap::new(),
        ip_of: HashMap::new(),
        endpoints: HashMap::new(),
        told: HashMap::new(),
        pings: HashMap::new(),
        next_seq: 1,
        view: NatView::default(),
    };
    tokio::spawn(task.run(rx, stop.clone()));
    Ok(Traverser { stop, requests: tx })
}

struct Task {
    sock: tokio::net::UdpSocket,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    stats: TunnelStats,
    /// The tunnels as last looked at, and when.
    tunnels: Vec<Tunnel>,
    tunnels_at: Option<Instant>,
    /// What the node and `meshctl netcheck` see changed since the last publish.
    dirty: bool,
    plane: Arc<dyn PathPlane>,
    relay_enabled: Arc<AtomicBool>,
    relays: Relays,
    /// Members as the relay rules last saw them.
    members: Vec<Member>,
    /// Round trips measured to members through their tunnels.
    rtt: HashMap<NodeId, Duration>,
    /// The relay endpoint handed to the data plane per (peer, relay).
    given: HashMap<(NodeId, NodeId), SocketAddr>,
    /// Relay asks taken, per requester.
    relay_asks: KeyedLimiter<NodeId>,
    /// The reachability probe in flight: its nonce, when asked.
    reach: Option<(u64, Instant)>,
    /// The address last checked, and when.
    reach_checked: Option<(SocketAddr, Instant)>,
    /// Reachability probes sent for others, per member.
    probes_for: KeyedLimiter<NodeId>,
    out: Outputs,
    observations: Observations,
    punches: Punches,
    /// CallMe passed on, per requester.
    forwards: KeyedLimiter<NodeId>,
    by_ip: HashMap<Ipv4Addr, NodeId>,
    ip_of: HashMap<NodeId, Ipv4Addr>,
    /// Where each member's tunnel sends now.
    endpoints: HashMap<NodeId, SocketAddr>,
    /// What each member was last told, and when.
    told: HashMap<NodeId, (SocketAddr, Instant)>,
    /// Pings in flight; those without a reply channel measure round trips for relay choice.
    pings: HashMap<u32, (Instant, NodeId, Option<PingReply>)>,
    next_seq: u32,
    view: NatView,
}

impl Task {
    async fn run(mut self, mut requests: mpsc::Receiver<Request>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut buf = [0u8; 128];
        self.snapshots.mark_changed();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => self.tick(Instant::now()).await,
                Some(r) = requests.recv() => self.request(r).await,
                r = self.sock.recv_from(&mut buf) => match r {
                    Ok((n, SocketAddr::V4(from))) => {
                        let d = buf[..n].to_vec();
                        self.receive(*from.ip(), &d, Instant::now()).await;
                    }
                    Ok(_) => self.refused(),
                    Err(e) => debug!(error = %e, "path socket"),
                },
            }
        }
    }

    /// A path message refused: garbage, not from a member, or naming no member.
    fn refused(&mut self) {
        self.view.dropped += 1;
        self.dirty = true;
    }

    async fn send(&self, to: NodeId, msg: Msg) {
        let Some(ip) = self.ip_of.get(&to) else {
            return;
        };
        let to = SocketAddr::new(IpAddr::V4(*ip), PATH_PORT);
        if let Err(e) = self.sock.send_to(&msg.encode(), to).await {
            debug!(%to, error = %e, "path message not sent");
        }
    }

    async fn tick(&mut self, now: Instant) {
        if self.snapshots.has_changed().unwrap_or(false) {
            let snap = self.snapshots.borrow_and_update().clone();
            self.by_ip = snap
                .members
                .iter()
                .filter(|r| !r.is_self)
                .filter_map(|r| Some((snap.params.range.node_ip(r.slot?), r.id)))
                .collect();
            self.ip_of = self.by_ip.iter().map(|(ip, id)| (*id, *ip)).collect();
            // A member found offline may be a relay in use: look again at once.
            self.tunnels_at = None;
        }
        if self
            .tunnels_at
            .is_none_or(|t| now.duration_since(t) >= TUNNELS_EVERY)
        {
            self.tunnels_at = Some(now);
            self.tunnels = (self.stats)().iter().map(Tunnel::of).collect();
            self.endpoints = self
                .tunnels
                .iter()
                .filter_map(|t| Some((t.node, t.endpoint?)))
                .collect();
            self.schedule(now).await;
        }
        // Pings past their time get their answer: none.
        let late: Vec<u32> = self
            .pings
            .iter()
            .filter(|(_, (sent, _, _))| now.duration_since(*sent) >= PING_TIMEOUT)
            .map(|(s, _)| *s)
            .collect();
        for s in late {
            if let Some((_, _, Some(reply))) = self.pings.remove(&s) {
                let _ = reply.send(None);
            }
        }
        if self.observations.prune(now) {
            self.dirty = true;
        }
        if self.dirty {
            self.dirty = false;
            self.publish();
        }
    }

    /// Tell members with a working path where their datagrams come from; punch the members
    /// without one.
    async fn schedule(&mut self, now: Instant) {
        let snap = self.snapshots.borrow().clone();
        let members: Vec<PathState> = self
            .tunnels
            .iter()
            .filter(|t| self.ip_of.contains_key(&t.node))
            .map(|t| PathState {
                node: t.node,
                up: t.up,
                direct: t.direct,
                wanted: snap.member(&t.node).is_some_and(|r| r.live()),
            })
            .collect();
        self.members = members
            .iter()
            .map(|m| Member {
                node: m.node,
                live: m.wanted,
                up: m.up,
                direct: m.direct,
                rtt: self.rtt.get(&m.node).copied(),
            })
            .collect();
        let mut seen = Vec::new();
        // Only a direct path says where a member's datagrams come from (through a relay, the
        // endpoint is a candidate that never answered).
        for t in self.tunnels.iter().filter(|t| t.direct) {
            let Some(ep) = t.endpoint else { continue };
            let due = match self.told.get(&t.node) {
                Some((said, at)) => *said != ep || now.duration_since(*at) >= SEEN_EVERY,
                None => true,
            };
            if due {
                seen.push((t.node, ep));
            }
        }
        for (node, ep) in seen {
            self.told.insert(node, (ep, now));
            self.send(node, Msg::Seen { addr: ep }).await;
            // And measure the round trip (relays are chosen by it).
            self.ping(node, None, now).await;
        }
        self.rtt.retain(|id, _| self.ip_of.contains_key(id));
        self.told.retain(|id, _| self.ip_of.contains_key(id));
        for a in self.punches.tick(now, &members) {
            match a {
                Action::Punch(node) => {
                    self.view.punches_sent += 1;
                    self.dirty = true;
                    self.plane.punch(node, None);
                }
                Action::CallMe { via, target } => self.send(via, Msg::CallMe { target }).await,
            }
        }
        self.check_reach(now).await;
        let enabled = self.relay_enabled.load(Ordering::Relaxed);
        let actions = self.relays.tick(now, &self.members, enabled);
        self.relay(actions).await;
        // A relay's endpoint moved (it roamed): the data plane follows.
        let mut moved = Vec::new();
        for ((peer, relay), via) in &self.given {
            if self
                .endpoints
                .get(relay)
                .is_some_and(|now_at| now_at != via)
            {
                let using = self.relays.using(peer);
                if let Some(i) = using.iter().position(|(r, _)| r == relay) {
                    moved.push(relays::Action::Use {
                        peer: *peer,
                        relay: *relay,
                        session: using[i].1,
                        first: i == 0,
                    });
                }
            }
        }
        self.relay(moved).await;
    }

    /// Ask a member with a direct path to send a probe to this node's public address from a
    /// port this node never sent to: whether it arrives says whether the address is reachable
    /// from outside (no NAT, a forwarded port, a NAT that filters by address at most).
    async fn check_reach(&mut self, now: Instant) {
        if let Some((_, asked)) = self.reach {
            if now.duration_since(asked) < REACH_WAIT {
                return;
            }
            self.reach = None;
            self.view.port_reachable = Some(false);
            self.dirty = true;
        }
        let Some(addr) = self.observations.candidates(&[]).first().copied() else {
            return;
        };
        let due = self
            .reach_checked
            .is_none_or(|(a, at)| a != addr || now.duration_since(at) >= REACH_EVERY);
        let Some(via) = self.tunnels.iter().find(|t| t.direct).map(|t| t.node) else {
            return;
        };
        if !due {
            return;
        }
        let nonce = rand_core::RngCore::next_u64(&mut rand_core::OsRng);
        self.reach = Some((nonce, now));
        self.reach_checked = Some((addr, now));
        self.send(via, Msg::ProbeMe { addr, nonce }).await;
    }

    /// Carry out what the relay rules want.
    async fn relay(&mut self, actions: Vec<relays::Action>) {
        use relays::Action as A;
        for a in actions {
            match a {
                A::Ask { relay, peer } => self.send(relay, Msg::RelayAsk { peer }).await,
                A::Use {
                    peer,
                    relay,
                    session,
                    first,
                } => {
                    let Some(via) = self.endpoints.get(&relay).copied() else {
                        continue;
                    };
                    self.given.insert((peer, relay), via);
                    self.plane.use_relay(
                        peer,
                        RelayPath {
                            node: relay,
                            via,
                            session,
                        },
                        first,
                    );
                }
                A::Drop { peer, relay } => {
                    self.given.remove(&(peer, relay));
                    self.plane.drop_relay(peer, relay);
                }
                A::Bind { session, a, b } => {
                    if let (Some(ea), Some(eb)) = (self.endpoints.get(&a), self.endpoints.get(&b)) {
                        self.plane.bind(session, *ea, *eb);
                    }
                }
                A::Unbind { session } => {
                    self.plane.unbind(session);
                    self.dirty = true;
                }
                A::Tell { to, peer, session } => {
                    self.dirty = true;
                    self.send(to, Msg::Relayed { peer, session }).await
                }
            }
        }
    }

    async fn ping(&mut self, node: NodeId, reply: Option<PingReply>, now: Instant) {
        if self.pings.len() >= PINGS_MAX || !self.ip_of.contains_key(&node) {
            if let Some(r) = reply {
                let _ = r.send(None);
            }
            return;
        }
        let seq = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1);
        self.pings.insert(seq, (now, node, reply));
        self.send(node, Msg::Ping { seq }).await;
    }

    /// Hand the observed candidates to the node (only when they changed) and the view to
    /// `meshctl netcheck`.
    fn publish(&mut self) {
        let candidates = self.observations.candidates(&[]);
        self.out.candidates.send_if_modified(|c| {
            if *c == candidates {
                return false;
            }
            info!(observed = ?candidates, "members see this node at new addresses");
            *c = candidates;
            true
        });
        self.view.observations = self.observations.iter().map(|(i, o)| (*i, *o)).collect();
        self.view.mapping = self.observations.mapping();
        self.view.relay_sessions = self.relays.served();
        self.view.rtt = self.rtt.iter().map(|(id, d)| (*id, *d)).collect();
        *self.out.view.lock().unwrap() = self.view.clone();
    }

    async fn request(&mut self, r: Request) {
        match r {
            Request::Ping { node, reply } => self.ping(node, Some(reply), Instant::now()).await,
            Request::Reached(nonce) => {
                if self.reach.is_some_and(|(n, _)| n == nonce) {
                    self.reach = None;
                    self.view.port_reachable = Some(true);
                    self.dirty = true;
                }
            }
        }
    }

    async fn receive(&mut self, from: Ipv4Addr, d: &[u8], now: Instant) {
        let (Some(sender), Some(msg)) = (self.by_ip.get(&from).copied(), Msg::decode(d)) else {
            self.refused();
            return;
        };
        match msg {
            Msg::Seen { addr } => {
                // Where the observer is, as this node sees it: observers behind one address
                // count as one.
                let (Some(at), true) =
                    (self.endpoints.get(&sender), self.plane.sends_direct(sender))
                else {
                    return;
                };
                self.observations.observe(sender, at.ip(), addr, now);
                self.dirty = true;
            }
            Msg::CallMe { target } => {
                if target == sender
                    || !self.ip_of.contains_key(&target)
                    || !self.forwards.allow(sender, now)
                {
                    self.refused();
                    return;
                }
                let seen = self.endpoints.get(&sender).copied();
                self.send(target, Msg::Punch { peer: sender, seen }).await;
            }
            Msg::Punch { peer, seen } => {
                if peer == sender || !self.ip_of.contains_key(&peer) {
                    self.refused();
                    return;
                }
                if self.punches.asked(peer, now) {
                    self.view.punches_answered += 1;
                    self.dirty = true;
                    self.plane.punch(peer, seen);
                }
            }
            Msg::RelayAsk { peer } => {
                let enabled = self.relay_enabled.load(Ordering::Relaxed);
                let session = rand_core::RngCore::next_u64(&mut rand_core::OsRng);
                let taken = self.relay_asks.allow(sender, now)
                    && self.ip_of.contains_key(&peer)
                    && match self
                        .relays
                        .asked(sender, peer, &self.members, enabled, session, now)
                    {
                        Some(actions) => {
                            self.relay(actions).await;
                            true
                        }
                        None => false,
                    };
                if !taken {
                    self.view.relay_refused += 1;
                    self.dirty = true;
                }
            }
            Msg::ProbeMe { addr, nonce } => {
                // Only to an address the member itself publishes or sends from, once per 10 s:
                // a small datagram to a verified address, never a reflector.
                let snap = self.snapshots.borrow().clone();
                let its = snap
                    .member(&sender)
                    .is_some_and(|r| r.endpoints.contains(&addr))
                    || self.endpoints.get(&sender) == Some(&addr);
                if !its || !self.probes_for.allow(sender, now) {
                    self.refused();
                    return;
                }
                let frame = crate::wire::encode_frame(&crate::wire::Frame::Reach(nonce));
                tokio::spawn(async move {
                    let any: SocketAddr = if addr.is_ipv4() {
                        (Ipv4Addr::UNSPECIFIED, 0).into()
                    } else {
                        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
                    };
                    match tokio::net::UdpSocket::bind(any).await {
                        Ok(s) => {
                            let _ = s.send_to(&frame, addr).await;
                        }
                        Err(e) => debug!(error = %e, "reachability probe not sent"),
                    }
                });
            }
            Msg::Relayed { peer, session } => {
                if !self.ip_of.contains_key(&peer) {
                    self.refused();
                    return;
                }
                if let Some(a) = self.relays.told(sender, peer, session, &self.members, now) {
                    self.relay(vec![a]).await;
                }
            }
            Msg::Ping { seq } => self.send(sender, Msg::Pong { seq }).await,
            Msg::Pong { seq } => {
                if self.pings.get(&seq).is_some_and(|(_, n, _)| *n == sender) {
                    if let Some((sent, _, reply)) = self.pings.remove(&seq) {
                        let rtt = now.duration_since(sent);
                        self.rtt.insert(sender, rtt);
                        self.dirty = true;
                        if let Some(reply) = reply {
                            let _ = reply.send(Some(rtt));
                        }
                    }
                }
            }
        }
    }
}
