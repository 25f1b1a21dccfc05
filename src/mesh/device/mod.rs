//! The data plane (DESIGN "Data plane"), split by verb like wireguard-go's device/: `send`
//! (TUN -> encapsulate -> UDP), `receive` (UDP -> demultiplex -> decapsulate -> [`admission`]
//! -> TUN), `timers` (WireGuard timers). This file holds the device and its peer table. The
//! device owns no policy: the control plane tells it which peers exist ([`Device::set_peers`])
//! and receives the control frames that arrive on the shared UDP port.

pub mod admission;
mod lanes;
pub(crate) use lanes::Order;
mod receive;
mod sealers;
mod send;
#[cfg(test)]
mod tests;
mod timers;

use super::io::{TunIo, UdpIo};
use super::path::{RelayPath, Route};
use super::peer::{Peer, PeerSpec, PeerStats};
use super::relay::{self, RelayTable, RELAY_HEADER};
use crate::constants::{HANDSHAKE_RATE_LIMIT, PERSISTENT_KEEPALIVE};
use crate::id::{Key32, MeshRange, NodeId};
use crate::util::short_key;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Tunn, TunnResult};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use x25519_dalek::{PublicKey, StaticSecret};

/// Addresses one punch sends to, at most.
pub const PUNCH_TARGETS: usize = 8;
/// Largest datagram or raw TUN read handled.
const MAX_PACKET: usize = 65535;
/// One IP packet from the TUN device after offload splitting (MTU-sized, with room to spare).
const TUN_PACKET_BUF: usize = 2048;
/// Packets one TUN read may split into (64 KiB / MTU, and then some).
const TUN_BATCH: usize = crate::mesh::io::TUN_READ_PACKETS;
/// Reads (up to 64 KiB each with GRO, so up to about 180 full-size datagrams in all) taken per
/// receive round.
const UDP_BATCH: usize = 4;
/// Rounds of `UDP_BATCH` reads the receive thread takes before it waits (and so sees a wake-up)
/// again: at most 4 MiB of datagrams.
const UDP_ROUNDS_PER_WAIT: usize = 16;
/// Output buffers must hold a packet plus WireGuard's 32 bytes, and at least 148 bytes.
const OUT_BUF: usize = MAX_PACKET + 64;
/// Room for what the receive path sends back: handshake answers, cookie replies, and packets
/// from the TUN device (at most [`TUN_PACKET_BUF`]) sealed for a peer.
const REPLY_BUF: usize = TUN_PACKET_BUF + 64;

/// What the data plane reports to the control plane.
#[derive(Debug)]
pub enum DeviceEvent {
    /// A control frame (join request/answer) received on the mesh port.
    Control(Vec<u8>, SocketAddr),
    /// A valid handshake initiation for this node's key from a key that is not a peer (for
    /// example a removed node): the control plane may tell it why.
    UnknownInitiator(Key32, SocketAddr),
}

#[derive(Debug, Default)]
pub struct DeviceCounters {
    pub dropped_no_peer: AtomicU64,
    pub dropped_bad_source: AtomicU64,
    /// Decrypted packets not addressed to this node's subnet: a member may only send here
    /// what is for here (no routing through this node).
    pub dropped_bad_destination: AtomicU64,
    /// Outgoing packets (from this machine or its workloads) whose source is outside this
    /// node's /24.
    pub dropped_forged_source: AtomicU64,
    /// Packets for a peer without a session, beyond what may wait for one.
    pub dropped_no_session: AtomicU64,
    pub dropped_unknown_frame: AtomicU64,
    /// TUN reads that could not be split into packets (see `DropStatus::unsplittable`).
    pub dropped_unsplittable: AtomicU64,
    pub dropped_unknown_peer: AtomicU64,
    /// Relayed frames for no session here, from an address not bound to theirs, or over the
    /// session's rate.
    pub dropped_relay_unknown: AtomicU64,
    pub dropped_relay_unbound: AtomicU64,
    pub dropped_relay_rate: AtomicU64,
    /// Frames this node relayed for others, and their bytes.
    pub relayed_packets: AtomicU64,
    pub relayed_bytes: AtomicU64,
    /// Reads (up to 64 KiB of datagrams each) the receive thread handed to a lane.
    pub lane_reads: AtomicU64,
    /// TUN reads sealed and sent by a seal lane.
    pub sealed_on_lanes: AtomicU64,
    /// Packets handed to the TUN device, and the writes they took (fewer when TCP segments
    /// are coalesced).
    pub tun_packets: AtomicU64,
    pub tun_writes: AtomicU64,
}

#[derive(Default)]
struct PeerTable {
    by_slot: HashMap<u32, Arc<Peer>>,
    by_index: HashMap<u32, Arc<Peer>>,
    by_key: HashMap<Key32, Arc<Peer>>,
    by_node: HashMap<NodeId, Arc<Peer>>,
    /// Relay sessions this node's peers are reached through.
    by_relay_session: HashMap<u64, Arc<Peer>>,
}

impl PeerTable {
    /// Index `peer`'s relay sessions as its paths hold them now (receive looks them up).
    fn index_relays(&mut self, peer: &Arc<Peer>) {
        let kept: Vec<u64> = peer
            .paths
            .lock()
            .unwrap()
            .relays()
            .iter()
            .map(|r| r.session)
            .collect();
        self.by_relay_session
            .retain(|s, q| !Arc::ptr_eq(q, peer) || kept.contains(s));
        for s in kept {
            self.by_relay_session.insert(s, peer.clone());
        }
    }
}

pub struct Device<T, U> {
    tun: T,
    udp: U,
    secret: StaticSecret,
    public: PublicKey,
    range: MeshRange,
    own_slot: AtomicU32,
    table: RwLock<PeerTable>,
    limiter: Arc<RateLimiter>,
    /// Unknown initiators reported to the node, per key: once a second each, 4096 keys.
    unknown_reported: Mutex<crate::util::KeyedLimiter<Key32>>,
    next_index: AtomicU32,
    events: mpsc::Sender<DeviceEvent>,
    /// Sessions this node relays for others.
    relay: Mutex<RelayTable>,
    /// The send path: held for every read-encrypt-send run from the TUN device.
    tx: Mutex<send::TxState>,
    /// Receive lanes: threads that decrypt under load, in order per peer.
    lanes: lanes::Lanes,
    /// Seal lanes: threads that encrypt TUN reads when several are ready.
    sealers: sealers::Sealers<send::OutRead>,
    /// Bytes of packets waiting for their peer's session, across peers.
    waiting_bytes: AtomicUsize,
    pub counters: DeviceCounters,
}

/// See [`Device::hold_sending`].
#[cfg(feature = "testing")]
pub struct SendingHeld<'a>(#[allow(dead_code)] std::sync::MutexGuard<'a, send::TxState>);

impl<T: TunIo, U: UdpIo> Device<T, U> {
    pub fn new(
        tun: T,
        udp: U,
        secret: StaticSecret,
        range: MeshRange,
        own_slot: u32,
    ) -> (Arc<Self>, mpsc::Receiver<DeviceEvent>) {
        let lanes = lanes::Lanes::for_this_machine();
        let sealers = sealers::Sealers::for_this_machine();
        Self::with_lanes(tun, udp, secret, range, own_slot, lanes, sealers)
    }

    /// [`Device::new`] with given numbers of receive and seal lanes, whatever the machine.
    #[cfg(test)]
    pub(crate) fn new_with_lanes(
        tun: T,
        udp: U,
        secret: StaticSecret,
        range: MeshRange,
        own_slot: u32,
        (rx, tx): (usize, usize),
    ) -> (Arc<Self>, mpsc::Receiver<DeviceEvent>) {
        let (lanes, sealers) = (lanes::Lanes::new(rx), sealers::Sealers::new(tx));
        Self::with_lanes(tun, udp, secret, range, own_slot, lanes, sealers)
    }

    fn with_lanes(
        tun: T,
        udp: U,
        secret: StaticSecret,
        range: MeshRange,
        own_slot: u32,
        lanes: lanes::Lanes,
        sealers: sealers::Sealers<send::OutRead>,
    ) -> (Arc<Self>, mpsc::Receiver<DeviceEvent>) {
        let public = PublicKey::from(&secret);
        let (events, events_rx) = mpsc::channel(256);
        // Every initiation is counted twice by this one limiter: in the pre-check before the
        // peer lookup (`inbound`) and again inside the peer's `Tunn::decapsulate`. Doubling
        // the threshold makes cookies start at HANDSHAKE_RATE_LIMIT initiations a second. One
        // shared limiter (not two) so the cookie a sender gets satisfies both checks.
        let limiter = Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT * 2));
        let dev = Device {
            tun,
            udp,
            secret,
            public,
            range,
            own_slot: AtomicU32::new(own_slot),
            table: RwLock::new(PeerTable::default()),
            limiter,
            unknown_reported: Mutex::new(crate::util::KeyedLimiter::new(
                Duration::from_secs(1),
                1,
                4096,
            )),
            next_index: AtomicU32::new(rand_index()),
            events,
            relay: Mutex::new(RelayTable::default()),
            tx: Mutex::new(send::TxState::new()),
            lanes,
            sealers,
            waiting_bytes: AtomicUsize::new(0),
            counters: DeviceCounters::default(),
        };
        (Arc::new(dev), events_rx)
    }

    /// Receive lanes and seal lanes this device runs.
    pub fn lanes(&self) -> (usize, usize) {
        (self.lanes.len(), self.sealers.len())
    }

    pub fn udp(&self) -> &U {
        &self.udp
    }

    /// Hold the send path until the guard drops: what the kernel routes into the mesh
    /// meanwhile waits in the TUN device, then goes out as one backlog (benchmarks).
    #[cfg(feature = "testing")]
    pub fn hold_sending(&self) -> SendingHeld<'_> {
        SendingHeld(self.tx.lock().unwrap())
    }

    pub fn set_own_slot(&self, slot: u32) {
        self.own_slot.store(slot, Ordering::Relaxed);
    }

    /// Run the data plane until `shutdown` fires or an edge breaks for good: a thread for the
    /// TUN device, one for the UDP socket, the receive and seal lanes, and the timers on the
    /// runtime.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let (ended_tx, mut ended) = mpsc::unbounded_channel::<String>();
        let mut threads = Vec::new();
        let mut start = |name: String, work: Box<dyn FnOnce() + Send>| {
            let ended = ended_tx.clone();
            let label = name.clone();
            match std::thread::Builder::new().name(name).spawn(move || {
                // Reports the end however it comes: a panic unwinding out of `work` too, so
                // the node never runs on with a dead data-plane thread.
                let _report = Ended(ended, label);
                work();
            }) {
                Ok(t) => threads.push(t),
                Err(e) => {
                    warn!(error = %e, "cannot start a data-plane thread");
                    let _ = ended_tx.send("spawn".into());
                }
            }
        };
        let dev = self.clone();
        start("mesh-tun".into(), Box::new(move || dev.tun_thread()));
        let dev = self.clone();
        start("mesh-udp".into(), Box::new(move || dev.udp_thread()));
        for l in 0..self.lanes.len() {
            let dev = self.clone();
            start(format!("mesh-lane{l}"), Box::new(move || dev.lane_thread()));
        }
        for l in 0..self.sealers.len() {
            let dev = self.clone();
            start(
                format!("mesh-seal{l}"),
                Box::new(move || dev.sealers.lane(|r| dev.send_read(r))),
            );
        }
        let mut timers = tokio::spawn(self.clone().timer_loop());
        tokio::select! {
            _ = shutdown.cancelled() => {}
            Some(which) = ended.recv() => warn!(thread = %which, "data plane thread ended"),
            r = &mut timers => warn!(result = ?r, "timer loop ended"),
        }
        // One part ending stops the data plane as a whole; the node sees `run` return.
        timers.abort();
        self.tun.wake();
        self.udp.wake();
        self.lanes.stop();
        self.sealers.stop();
        // Woken, the threads return at once; wait for them off the runtime.
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
    }

    /// Reconcile the peer set with what the control plane wants. New peers get a handshake
    /// initiation right away, so tunnels are up before the first packet needs them.
    pub fn set_peers(&self, specs: &[PeerSpec]) {
        let mut fresh = Vec::new();
        {
            let mut t = self.table.write().unwrap();
            let wanted: HashMap<Key32, &PeerSpec> = specs.iter().map(|s| (s.wg, s)).collect();
            let gone: Vec<Arc<Peer>> = t
                .by_key
                .values()
                .filter(|p| !wanted.contains_key(&p.wg))
                .cloned()
                .collect();
            for p in gone {
                info!(peer = %p.name(), key = %short_key(&p.wg), "peer removed");
                // A send that found the peer a moment ago may still try to queue for it: it
                // sees `removed` under the queue's lock, so nothing is left counted here.
                p.removed.store(true, Ordering::SeqCst);
                self.take_waiting(&p);
                t.by_key.remove(&p.wg);
                t.by_index.remove(&p.index);
                t.by_node.remove(&p.node_id);
                t.by_relay_session.retain(|_, q| !Arc::ptr_eq(q, &p));
                if t.by_slot.get(&p.slot()).is_some_and(|q| Arc::ptr_eq(q, &p)) {
                    t.by_slot.remove(&p.slot());
                }
            }
            let now = Instant::now();
            for s in specs {
                if s.wg == self.public.to_bytes() {
                    continue;
                }
                if let Some(p) = t.by_key.get(&s.wg).cloned() {
                    if p.slot() != s.slot {
                        if t.by_slot.get(&p.slot()).is_some_and(|q| Arc::ptr_eq(q, &p)) {
                            t.by_slot.remove(&p.slot());
                        }
                        p.set_slot(s.slot);
                    }
                    t.by_slot.insert(s.slot, p.clone());
                    *p.name.lock().unwrap() = s.name.clone();
                    p.paths
                        .lock()
                        .unwrap()
                        .set_candidates(s.endpoints.clone(), now);
                    continue;
                }
                let index = self.alloc_index(&t);
                let tunn = Tunn::new(
                    self.secret.clone(),
                    PublicKey::from(s.wg),
                    None,
                    Some(PERSISTENT_KEEPALIVE),
                    index,
                    Some(self.limiter.clone()),
                );
                let p = Arc::new(Peer::new(s, index, tunn));
                info!(peer = %s.name, key = %short_key(&s.wg), slot = s.slot, endpoints = ?s.endpoints, "peer added");
                t.by_key.insert(s.wg, p.clone());
                t.by_node.insert(s.node_id, p.clone());
                t.by_index.insert(index, p.clone());
                t.by_slot.insert(s.slot, p.clone());
                fresh.push(p);
            }
        }
        let mut out = [0u8; INITIATION_BUF];
        for p in fresh {
            if let Some(len) = initiation(&p, false, &mut out) {
                self.send_to_peer(&p, &out[..len]);
            }
        }
    }

    /// Send a control frame (join answer) from the mesh port.
    pub fn send_control(&self, frame: &[u8], to: SocketAddr) {
        if let Err(e) = self.udp.send_to(frame, to) {
            debug!(%to, error = %e, "control frame send failed");
        }
    }

    /// Every peer, taken out of the table (so no lock is held while they are used).
    fn peers(&self) -> Vec<Arc<Peer>> {
        self.table
            .read()
            .unwrap()
            .by_key
            .values()
            .cloned()
            .collect()
    }

    /// Per-peer statistics.
    pub fn stats(&self) -> Vec<PeerStats> {
        let now = Instant::now();
        self.peers()
            .iter()
            .map(|p| {
                let (hs, tx, rx, _, _) = p.tunn.lock().unwrap().stats();
                let (endpoint, last_rx, path, path_switches) = {
                    let e = p.paths.lock().unwrap();
                    (e.current(), e.heard(now), e.kind(), e.switches())
                };
                PeerStats {
                    node_id: p.node_id,
                    name: p.name(),
                    wg: p.wg,
                    slot: p.slot(),
                    endpoint,
                    last_rx,
                    last_handshake: hs,
                    rx_bytes: rx as u64,
                    tx_bytes: tx as u64,
                    dropped_bad_source: p.counters.dropped_bad_source.load(Ordering::Relaxed),
                    path,
                    path_switches,
                }
            })
            .collect()
    }

    /// Start a fresh handshake with the peer of `node` now (it may have restarted and lost its
    /// session keys; WireGuard alone notices only after 15 s of one-way traffic).
    pub fn rehandshake(&self, node: &NodeId) {
        let Some(peer) = self.peer_by_node(node) else {
            return;
        };
        let mut out = [0u8; INITIATION_BUF];
        if let Some(len) = initiation(&peer, true, &mut out) {
            self.send_to_peer(&peer, &out[..len]);
        }
    }

    /// Punch a path to the peer of `node`: one fresh handshake initiation, sent to each of its
    /// candidates and to `extra` (where a go-between sees it) at once. Whichever gets an
    /// authenticated answer becomes the endpoint. At most [`PUNCH_TARGETS`] addresses.
    pub fn punch(&self, node: &NodeId, extra: &[SocketAddr]) {
        let Some(peer) = self.peer_by_node(node) else {
            return;
        };
        let mut to: Vec<SocketAddr> = Vec::new();
        {
            let e = peer.paths.lock().unwrap();
            for a in e.current().iter().chain(e.candidates()).chain(extra) {
                if !to.contains(a) && to.len() < PUNCH_TARGETS {
                    to.push(*a);
                }
            }
        }
        if to.is_empty() {
            return;
        }
        let mut out = [0u8; INITIATION_BUF];
        let Some(len) = initiation(&peer, true, &mut out) else {
            return;
        };
        debug!(peer = %peer.name(), targets = ?to, "punching");
        for a in to {
            if self.udp.send_to(&out[..len], a).is_ok() {
                peer.counters.tx_packets.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Whether `addr` is where some peer's tunnel currently sends.
    pub fn is_peer_endpoint(&self, addr: SocketAddr) -> bool {
        self.table
            .read()
            .unwrap()
            .by_key
            .values()
            .any(|p| p.endpoint() == Some(addr))
    }

    /// Reach the peer of `node` through `relay` too (`first`: send through it while the
    /// direct path does not work).
    pub fn use_relay(&self, node: &NodeId, relay: RelayPath, first: bool) {
        let mut t = self.table.write().unwrap();
        let Some(peer) = t.by_node.get(node).cloned() else {
            return;
        };
        let changed = peer
            .paths
            .lock()
            .unwrap()
            .add_relay(relay, first, Instant::now());
        t.index_relays(&peer);
        if changed {
            info!(peer = %peer.name(), relay = %relay.via, session = relay.session, "relay path");
        }
    }

    /// Stop reaching the peer of `node` through the relay `relay`.
    pub fn drop_relay(&self, node: &NodeId, relay: &NodeId) {
        let mut t = self.table.write().unwrap();
        let Some(peer) = t.by_node.get(node).cloned() else {
            return;
        };
        if peer
            .paths
            .lock()
            .unwrap()
            .remove_relay(relay, Instant::now())
        {
            info!(peer = %peer.name(), "relay path dropped");
        }
        t.index_relays(&peer);
    }

    /// As a relay: forward `session` between `a` and `b` (or rebind it). False when full.
    pub fn relay_bind(&self, session: u64, a: SocketAddr, b: SocketAddr) -> bool {
        self.relay
            .lock()
            .unwrap()
            .bind(session, a, b, Instant::now())
    }

    pub fn relay_unbind(&self, session: u64) {
        self.relay.lock().unwrap().unbind(session);
    }

    /// The endpoints `session` is bound to here, as a relay.
    pub fn relay_ends(&self, session: u64) -> Option<[SocketAddr; 2]> {
        self.relay.lock().unwrap().ends(session)
    }

    /// Sessions relayed for others now.
    pub fn relay_sessions(&self) -> usize {
        self.relay.lock().unwrap().len()
    }

    /// Send one datagram on `route` (behind the session header through a relay).
    pub(super) fn send_route(&self, route: Route, datagram: &[u8]) -> std::io::Result<()> {
        match route {
            Route::Direct(to) => self.udp.send_to(datagram, to),
            Route::Relay { via, session } => {
                let mut framed = Vec::with_capacity(RELAY_HEADER + datagram.len());
                framed.extend_from_slice(&relay::header(session));
                framed.extend_from_slice(datagram);
                self.udp.send_to(&framed, via)
            }
        }
    }

    pub fn peer_by_node(&self, node: &NodeId) -> Option<Arc<Peer>> {
        self.table.read().unwrap().by_node.get(node).cloned()
    }

    fn alloc_index(&self, t: &PeerTable) -> u32 {
        loop {
            let i = self.next_index.fetch_add(1, Ordering::Relaxed) & 0x00ff_ffff;
            if !t.by_index.contains_key(&i) {
                return i;
            }
        }
    }
}

/// Sends a data-plane thread's name when dropped: at its end, returned or unwound.
struct Ended(mpsc::UnboundedSender<String>, String);

impl Drop for Ended {
    fn drop(&mut self) {
        let _ = self.0.send(std::mem::take(&mut self.1));
    }
}

/// Room for a handshake initiation (148 bytes).
pub(super) const INITIATION_BUF: usize = 256;

/// A handshake initiation for `peer` in `out` (a fresh one if `force`, else only when none is
/// in flight); its length.
fn initiation(peer: &Peer, force: bool, out: &mut [u8]) -> Option<usize> {
    match peer
        .tunn
        .lock()
        .unwrap()
        .format_handshake_initiation(out, force)
    {
        TunnResult::WriteToNetwork(d) => Some(d.len()),
        _ => None,
    }
}

fn transient(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        Interrupted | WouldBlock | ConnectionRefused | ConnectionReset | OutOfMemory
    ) || e.raw_os_error() == Some(libc::ENOBUFS)
}

fn rand_index() -> u32 {
    use rand_core::RngCore;
    rand_core::OsRng.next_u32() & 0x00ff_ffff
}
