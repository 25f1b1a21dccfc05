//! The data plane loops (DESIGN "Data plane"): TUN -> encapsulate -> UDP, UDP -> demultiplex ->
//! decapsulate -> allowed-IP check -> TUN, and the WireGuard timers. The device owns no policy:
//! the control plane tells it which peers exist ([`Device::set_peers`]) and receives the
//! control frames (join) that arrive on the shared UDP port.

use super::addressing::MeshRange;
use super::io::{TunIo, UdpIo, TUN_HEADROOM};
use super::packet::{classify, ipv4_dst, FrameKind};
use super::peer::{Peer, PeerSpec, PeerStats};
use crate::constants::{
    HANDSHAKE_RATE_LIMIT, PERSISTENT_KEEPALIVE, RETRY_EXPIRED_PEER, TIMER_TICK,
};
use crate::trust::{Key32, NodeId};
use crate::util::short_key;
use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use x25519_dalek::{PublicKey, StaticSecret};

/// Largest datagram or raw TUN read handled.
const MAX_PACKET: usize = 65535;
/// One IP packet from the TUN device after offload splitting (MTU-sized, with room to spare).
const TUN_PACKET_BUF: usize = 2048;
/// Packets one TUN read may split into (64 KiB / MTU, and then some).
const TUN_BATCH: usize = 128;
/// Datagrams taken per receive wake-up.
const UDP_BATCH: usize = 32;
/// Output buffers must hold a packet plus WireGuard's 32 bytes, and at least 148 bytes.
const OUT_BUF: usize = MAX_PACKET + 64;

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
    pub dropped_unknown_frame: AtomicU64,
    pub dropped_unknown_peer: AtomicU64,
}

/// Encrypted datagrams for one endpoint, all `seg` bytes but possibly the last, sent with one
/// system call (UDP GSO). The kernel takes at most 64 segments and 64 KiB.
struct GsoBatch {
    buf: Vec<u8>,
    len: usize,
    seg: usize,
    count: usize,
    to: Option<SocketAddr>,
    /// A shorter datagram ended the run.
    closed: bool,
}

const GSO_MAX_SEGMENTS: usize = 64;
const GSO_MAX_BYTES: usize = 60_000;

impl GsoBatch {
    fn new() -> GsoBatch {
        GsoBatch {
            buf: vec![0u8; GSO_MAX_BYTES + OUT_BUF],
            len: 0,
            seg: 0,
            count: 0,
            to: None,
            closed: false,
        }
    }

    /// Where the next datagram is encrypted to (always at least OUT_BUF bytes).
    fn spare(&mut self) -> &mut [u8] {
        &mut self.buf[self.len..]
    }

    fn fits(&self, to: SocketAddr, len: usize) -> bool {
        self.count == 0
            || (self.to == Some(to)
                && !self.closed
                && len <= self.seg
                && self.count < GSO_MAX_SEGMENTS
                && self.len + len <= GSO_MAX_BYTES)
    }

    /// Take the datagram just written at `len` (or moved to 0 after a flush).
    fn append(&mut self, to: SocketAddr, len: usize) {
        if self.count == 0 {
            self.to = Some(to);
            self.seg = len;
        } else if len < self.seg {
            self.closed = true;
        }
        self.len += len;
        self.count += 1;
    }

    fn reset(&mut self) {
        self.len = 0;
        self.seg = 0;
        self.count = 0;
        self.to = None;
        self.closed = false;
    }
}

#[derive(Default)]
struct PeerTable {
    by_slot: HashMap<u32, Arc<Peer>>,
    by_index: HashMap<u32, Arc<Peer>>,
    by_key: HashMap<Key32, Arc<Peer>>,
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
    pub counters: DeviceCounters,
}

impl<T: TunIo, U: UdpIo> Device<T, U> {
    pub fn new(
        tun: T,
        udp: U,
        secret: StaticSecret,
        range: MeshRange,
        own_slot: u32,
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
            counters: DeviceCounters::default(),
        };
        (Arc::new(dev), events_rx)
    }

    pub fn udp(&self) -> &U {
        &self.udp
    }

    pub fn set_own_slot(&self, slot: u32) {
        self.own_slot.store(slot, Ordering::Relaxed);
    }

    /// Run the data plane until `shutdown` fires or an edge breaks for good.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let a = tokio::spawn(self.clone().tun_loop());
        let b = tokio::spawn(self.clone().udp_loop());
        let c = tokio::spawn(self.clone().timer_loop());
        let loops = [a.abort_handle(), b.abort_handle(), c.abort_handle()];
        tokio::select! {
            _ = shutdown.cancelled() => {}
            r = a => warn!(result = ?r, "tun loop ended"),
            r = b => warn!(result = ?r, "udp loop ended"),
            r = c => warn!(result = ?r, "timer loop ended"),
        }
        // One loop ending stops the data plane as a whole; the node sees `run` return.
        for l in loops {
            l.abort();
        }
    }

    /// Reconcile the peer set with what the control plane wants. New peers get a handshake
    /// initiation right away, so tunnels are up before the first packet needs them.
    pub async fn set_peers(&self, specs: &[PeerSpec]) {
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
                t.by_key.remove(&p.wg);
                t.by_index.remove(&p.index);
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
                    p.endpoints
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
                t.by_index.insert(index, p.clone());
                t.by_slot.insert(s.slot, p.clone());
                fresh.push(p);
            }
        }
        let mut out = vec![0u8; 256];
        for p in fresh {
            let len = match p
                .tunn
                .lock()
                .unwrap()
                .format_handshake_initiation(&mut out, false)
            {
                TunnResult::WriteToNetwork(d) => d.len(),
                _ => continue,
            };
            self.send_to_peer(&p, &out[..len]).await;
        }
    }

    /// Send a control frame (join answer) from the mesh port.
    pub async fn send_control(&self, frame: &[u8], to: SocketAddr) {
        if let Err(e) = self.udp.send_to(frame, to).await {
            debug!(%to, error = %e, "control frame send failed");
        }
    }

    /// Per-peer statistics.
    pub fn stats(&self) -> Vec<PeerStats> {
        let peers: Vec<Arc<Peer>> = self
            .table
            .read()
            .unwrap()
            .by_key
            .values()
            .cloned()
            .collect();
        peers
            .iter()
            .map(|p| {
                let (hs, tx, rx, _, _) = p.tunn.lock().unwrap().stats();
                PeerStats {
                    node_id: p.node_id,
                    name: p.name(),
                    wg: p.wg,
                    slot: p.slot(),
                    endpoint: p.endpoint(),
                    last_handshake: hs,
                    rx_bytes: rx as u64,
                    tx_bytes: tx as u64,
                    dropped_bad_source: p.counters.dropped_bad_source.load(Ordering::Relaxed),
                }
            })
            .collect()
    }

    pub fn peer_by_node(&self, node: &NodeId) -> Option<Arc<Peer>> {
        self.table
            .read()
            .unwrap()
            .by_key
            .values()
            .find(|p| p.node_id == *node)
            .cloned()
    }

    fn alloc_index(&self, t: &PeerTable) -> u32 {
        loop {
            let i = self.next_index.fetch_add(1, Ordering::Relaxed) & 0x00ff_ffff;
            if !t.by_index.contains_key(&i) {
                return i;
            }
        }
    }

    async fn send_to_peer(&self, peer: &Peer, datagram: &[u8]) {
        let is_initiation = datagram.first() == Some(&1);
        let to = {
            let mut ep = peer.endpoints.lock().unwrap();
            if is_initiation {
                ep.for_initiation(Instant::now())
            } else {
                ep.current()
            }
        };
        match to {
            Some(to) => {
                if let Err(e) = self.udp.send_to(datagram, to).await {
                    debug!(peer = %peer.name(), %to, error = %e, "send failed");
                } else {
                    peer.counters.tx_packets.fetch_add(1, Ordering::Relaxed);
                }
            }
            None => debug!(peer = %peer.name(), "no endpoint known; packet dropped"),
        }
    }

    async fn tun_loop(self: Arc<Self>) {
        let mut scratch = vec![0u8; MAX_PACKET + 64];
        let mut bufs = vec![vec![0u8; TUN_PACKET_BUF]; TUN_BATCH];
        let mut sizes = vec![0usize; TUN_BATCH];
        let mut gso = GsoBatch::new();
        loop {
            let n = match self
                .tun
                .recv_batch(&mut scratch, &mut bufs, &mut sizes)
                .await
            {
                Ok(n) => n,
                Err(e) if transient(&e) => continue,
                Err(e) => {
                    warn!(error = %e, "reading the TUN device failed");
                    return;
                }
            };
            for i in 0..n {
                self.outbound(&bufs[i][..sizes[i]], &mut gso).await;
            }
            self.flush(&mut gso).await;
        }
    }

    /// Encrypt one packet from the TUN device. Data messages join `gso` (sent together with
    /// the others of the batch that go to the same endpoint); handshakes go out at once.
    async fn outbound(&self, packet: &[u8], gso: &mut GsoBatch) {
        let Some(slot) = ipv4_dst(packet).and_then(|d| self.range.slot_of(d)) else {
            return;
        };
        if slot == self.own_slot.load(Ordering::Relaxed) {
            return;
        }
        let Some(peer) = self.table.read().unwrap().by_slot.get(&slot).cloned() else {
            self.counters
                .dropped_no_peer
                .fetch_add(1, Ordering::Relaxed);
            return;
        };
        let start = gso.len;
        let len = match peer.tunn.lock().unwrap().encapsulate(packet, gso.spare()) {
            TunnResult::WriteToNetwork(d) => d.len(),
            TunnResult::Err(e) => {
                debug!(peer = %peer.name(), error = ?e, "encapsulate failed");
                return;
            }
            _ => return,
        };
        let is_data = gso.buf[start] == 4;
        let to = peer.endpoint();
        match (is_data, to) {
            (true, Some(to)) => {
                if !gso.fits(to, len) {
                    self.flush(gso).await;
                    gso.buf.copy_within(start..start + len, 0);
                }
                gso.append(to, len);
                peer.counters.tx_packets.fetch_add(1, Ordering::Relaxed);
            }
            (true, None) => debug!(peer = %peer.name(), "no endpoint known; packet dropped"),
            (false, _) => {
                let d = gso.buf[start..start + len].to_vec();
                self.send_to_peer(&peer, &d).await;
            }
        }
    }

    async fn flush(&self, gso: &mut GsoBatch) {
        if let Some(to) = gso.to {
            if let Err(e) = self.udp.send_gso(&gso.buf[..gso.len], gso.seg, to).await {
                debug!(%to, error = %e, "send failed");
            }
        }
        gso.reset();
    }

    /// Receive: one wait, then whatever else has already arrived (up to a batch); decrypt into
    /// TUN buffers and hand them to the kernel together, so it can coalesce TCP segments.
    async fn udp_loop(self: Arc<Self>) {
        let mut dgrams = vec![vec![0u8; MAX_PACKET]; UDP_BATCH];
        let mut meta = vec![(0usize, SocketAddr::from(([0, 0, 0, 0], 0)), 0usize); UDP_BATCH];
        let mut to_tun: Vec<Vec<u8>> = (0..TUN_BATCH)
            .map(|_| Vec::with_capacity(TUN_PACKET_BUF))
            .collect();
        let mut out = vec![0u8; OUT_BUF];
        loop {
            meta[0] = match self.udp.recv_gro(&mut dgrams[0]).await {
                Ok(r) => r,
                Err(e) if transient(&e) => continue,
                Err(e) => {
                    warn!(error = %e, "reading the UDP socket failed");
                    return;
                }
            };
            let mut k = 1;
            while k < UDP_BATCH {
                match self.udp.try_recv_gro(&mut dgrams[k]) {
                    Ok(r) => {
                        meta[k] = r;
                        k += 1;
                    }
                    Err(_) => break,
                }
            }
            let mut ready = 0;
            for i in 0..k {
                let (n, from, segment) = meta[i];
                // With GRO one read may hold several datagrams of `segment` bytes.
                for d in dgrams[i][..n].chunks(segment.max(1)) {
                    if ready == to_tun.len() {
                        self.write_tun(&mut to_tun[..ready]).await;
                        ready = 0;
                    }
                    match classify(d) {
                        FrameKind::WireGuard => {
                            if self.inbound(d, from, &mut to_tun[ready], &mut out).await {
                                ready += 1;
                            }
                        }
                        FrameKind::Control => {
                            if self
                                .events
                                .try_send(DeviceEvent::Control(d.to_vec(), from))
                                .is_err()
                            {
                                debug!(%from, "control queue full; frame dropped");
                            }
                        }
                        FrameKind::Unknown => {
                            self.counters
                                .dropped_unknown_frame
                                .fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
            self.write_tun(&mut to_tun[..ready]).await;
        }
    }

    async fn write_tun(&self, bufs: &mut [Vec<u8>]) {
        if bufs.is_empty() {
            return;
        }
        if let Err(e) = self.tun.send_batch(bufs).await {
            debug!(error = %e, "writing to the TUN device failed");
        }
    }

    fn find_peer(&self, packet: &Packet, from: SocketAddr) -> Option<Arc<Peer>> {
        let t = self.table.read().unwrap();
        match packet {
            Packet::HandshakeInit(p) => {
                let half = parse_handshake_anon(&self.secret, &self.public, p).ok()?;
                let peer = t.by_key.get(&half.peer_static_public).cloned();
                if peer.is_none()
                    && self
                        .unknown_reported
                        .lock()
                        .unwrap()
                        .allow(half.peer_static_public, Instant::now())
                {
                    let _ = self
                        .events
                        .try_send(DeviceEvent::UnknownInitiator(half.peer_static_public, from));
                }
                peer
            }
            Packet::HandshakeResponse(p) => t.by_index.get(&(p.receiver_idx >> 8)).cloned(),
            Packet::PacketCookieReply(p) => t.by_index.get(&(p.receiver_idx >> 8)).cloned(),
            Packet::PacketData(p) => t.by_index.get(&(p.receiver_idx >> 8)).cloned(),
        }
    }

    /// Handle one WireGuard datagram. Returns true when it carried a packet for the TUN device,
    /// left in `to_tun` at `TUN_HEADROOM`.
    async fn inbound(
        &self,
        datagram: &[u8],
        from: SocketAddr,
        to_tun: &mut Vec<u8>,
        out: &mut [u8],
    ) -> bool {
        let Ok(packet) = Tunn::parse_incoming_packet(datagram) else {
            self.counters
                .dropped_unknown_frame
                .fetch_add(1, Ordering::Relaxed);
            return false;
        };
        let mut roams = !matches!(packet, Packet::PacketCookieReply(_));
        if matches!(packet, Packet::HandshakeInit(_)) {
            // Check MAC1 and the handshake rate before the costly part of finding the peer
            // (a Diffie-Hellman): under load, the sender must first prove its address.
            match self.limiter.verify_packet(Some(from.ip()), datagram, out) {
                Ok(_) => {}
                Err(TunnResult::WriteToNetwork(cookie)) => {
                    let cookie = cookie.to_vec();
                    let _ = self.udp.send_to(&cookie, from).await;
                    return false;
                }
                Err(_) => {
                    self.counters
                        .dropped_unknown_frame
                        .fetch_add(1, Ordering::Relaxed);
                    return false;
                }
            }
        }
        let Some(peer) = self.find_peer(&packet, from) else {
            self.counters
                .dropped_unknown_peer
                .fetch_add(1, Ordering::Relaxed);
            return false;
        };

        enum Action {
            Nothing,
            Tun(usize, IpAddr),
            Net(Vec<Vec<u8>>),
        }
        // Decrypt straight into the TUN buffer (room for a handshake answer too).
        to_tun.resize(TUN_HEADROOM + datagram.len().max(256), 0);
        let action = {
            let mut t = peer.tunn.lock().unwrap();
            match t.decapsulate(Some(from.ip()), datagram, &mut to_tun[TUN_HEADROOM..]) {
                TunnResult::WriteToNetwork(d) => {
                    // A cookie reply answers a message that was not authenticated (it was
                    // sent because of load): no reason to follow its sender anywhere.
                    if d.first() == Some(&3) {
                        roams = false;
                    }
                    let mut replies = vec![d.to_vec()];
                    // Flush packets queued while the handshake was in flight.
                    let mut guard = 0;
                    while let TunnResult::WriteToNetwork(d) = t.decapsulate(None, &[], out) {
                        replies.push(d.to_vec());
                        guard += 1;
                        if guard > 1024 {
                            break;
                        }
                    }
                    Action::Net(replies)
                }
                TunnResult::WriteToTunnelV4(d, src) => Action::Tun(d.len(), IpAddr::V4(src)),
                TunnResult::WriteToTunnelV6(d, src) => Action::Tun(d.len(), IpAddr::V6(src)),
                TunnResult::Done => Action::Nothing,
                TunnResult::Err(WireGuardError::DuplicateCounter) => return false,
                TunnResult::Err(e) => {
                    debug!(peer = %peer.name(), %from, error = ?e, "decapsulate failed");
                    return false;
                }
            }
        };
        // Authenticated: follow the peer to wherever it now sends from.
        if roams
            && peer
                .endpoints
                .lock()
                .unwrap()
                .authenticated(from, Instant::now())
        {
            info!(peer = %peer.name(), endpoint = %from, "peer endpoint changed");
        }
        match action {
            Action::Nothing => false,
            Action::Net(replies) => {
                for r in replies {
                    self.send_to_peer(&peer, &r).await;
                }
                false
            }
            Action::Tun(len, src) => {
                let allowed = match src {
                    IpAddr::V4(s) => self.range.slot_of(s) == Some(peer.slot()),
                    IpAddr::V6(_) => false,
                };
                if !allowed {
                    peer.counters
                        .dropped_bad_source
                        .fetch_add(1, Ordering::Relaxed);
                    self.counters
                        .dropped_bad_source
                        .fetch_add(1, Ordering::Relaxed);
                    debug!(peer = %peer.name(), %src, "dropped packet with a source outside the peer's subnet");
                    return false;
                }
                let own = self.own_slot.load(Ordering::Relaxed);
                let packet = &to_tun[TUN_HEADROOM..TUN_HEADROOM + len];
                if ipv4_dst(packet).and_then(|d| self.range.slot_of(d)) != Some(own) {
                    self.counters
                        .dropped_bad_destination
                        .fetch_add(1, Ordering::Relaxed);
                    debug!(peer = %peer.name(), dst = ?ipv4_dst(packet), "dropped packet not addressed to this node's subnet");
                    return false;
                }
                peer.counters.rx_packets.fetch_add(1, Ordering::Relaxed);
                to_tun.truncate(TUN_HEADROOM + len);
                true
            }
        }
    }

    async fn timer_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(TIMER_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut out = vec![0u8; OUT_BUF];
        let mut last_reset = Instant::now();
        loop {
            tick.tick().await;
            let now = Instant::now();
            if now.duration_since(last_reset) >= Duration::from_secs(1) {
                self.limiter.reset_count();
                last_reset = now;
            }
            let peers: Vec<Arc<Peer>> = self
                .table
                .read()
                .unwrap()
                .by_key
                .values()
                .cloned()
                .collect();
            for p in peers {
                let len = {
                    let mut t = p.tunn.lock().unwrap();
                    match t.update_timers(&mut out) {
                        TunnResult::WriteToNetwork(d) => Some(d.len()),
                        TunnResult::Err(WireGuardError::ConnectionExpired) => {
                            // boringtun gave up (REKEY_ATTEMPT_TIME). This peer is still a
                            // member, so keep knocking at a slower pace.
                            let mut last = p.last_retry.lock().unwrap();
                            if last.is_none_or(|l| now.duration_since(l) >= RETRY_EXPIRED_PEER) {
                                *last = Some(now);
                                match t.format_handshake_initiation(&mut out, false) {
                                    TunnResult::WriteToNetwork(d) => Some(d.len()),
                                    _ => None,
                                }
                            } else {
                                None
                            }
                        }
                        _ => None,
                    }
                };
                if let Some(len) = len {
                    self.send_to_peer(&p, &out[..len]).await;
                }
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::io::{MemNet, MemTun, MemTunHandle, MemUdp};
    use crate::mesh::packet::{build_ipv4_udp, ipv4_src};
    use std::net::Ipv4Addr;
    use tokio::time::timeout;

    struct TestNode {
        dev: Arc<Device<MemTun, MemUdp>>,
        tun: MemTunHandle,
        wg: Key32,
        slot: u32,
        addr: SocketAddr,
        _ctl: mpsc::Receiver<DeviceEvent>,
    }

    fn range() -> MeshRange {
        "10.210.0.0/16".parse().unwrap()
    }

    fn node(net: &MemNet, host: u8, slot: u32, stop: &CancellationToken) -> TestNode {
        let secret = StaticSecret::random_from_rng(rand_core::OsRng);
        let wg = PublicKey::from(&secret).to_bytes();
        let addr = SocketAddr::from(([192, 0, 2, host], 51820));
        let (tun, handle) = MemTun::new();
        let (dev, ctl) = Device::new(tun, net.bind(addr).unwrap(), secret, range(), slot);
        tokio::spawn(dev.clone().run(stop.clone()));
        TestNode {
            dev,
            tun: handle,
            wg,
            slot,
            addr,
            _ctl: ctl,
        }
    }

    fn spec(n: &TestNode, endpoints: Vec<SocketAddr>) -> PeerSpec {
        let mut id = [0u8; 8];
        id[..4].copy_from_slice(&n.slot.to_le_bytes());
        PeerSpec {
            node_id: NodeId(id),
            name: format!("n{}", n.slot),
            wg: n.wg,
            slot: n.slot,
            endpoints,
        }
    }

    fn ip(slot: u32, host: u8) -> Ipv4Addr {
        let r = range();
        Ipv4Addr::from(u32::from(r.subnet(slot)) + host as u32)
    }

    async fn expect_delivery(n: &mut TestNode, payload: &[u8]) -> Vec<u8> {
        loop {
            let p = timeout(Duration::from_secs(10), n.tun.delivered.recv())
                .await
                .expect("packet delivered within 10 s")
                .expect("tun open");
            if p.ends_with(payload) {
                return p;
            }
        }
    }

    #[tokio::test]
    async fn packets_cross_the_tunnel_both_ways_and_bad_sources_are_dropped() {
        let net = MemNet::new();
        let stop = CancellationToken::new();
        let mut a = node(&net, 1, 3, &stop);
        let mut b = node(&net, 2, 7, &stop);
        a.dev.set_peers(&[spec(&b, vec![b.addr])]).await;
        b.dev.set_peers(&[spec(&a, vec![a.addr])]).await;
        net.start_capture();

        let p = build_ipv4_udp(ip(3, 1), ip(7, 1), 1000, 2000, b"hello-b");
        a.tun.inject.send(p.clone()).await.unwrap();
        assert_eq!(expect_delivery(&mut b, b"hello-b").await, p);
        let q = build_ipv4_udp(ip(7, 5), ip(3, 9), 2000, 1000, b"hello-a");
        b.tun.inject.send(q.clone()).await.unwrap();
        assert_eq!(expect_delivery(&mut a, b"hello-a").await, q);

        // Nothing crossed the underlay in clear.
        for (_, _, d) in net.captured() {
            assert_eq!(classify(&d), FrameKind::WireGuard);
            assert!(!d.windows(7).any(|w| w == b"hello-b" || w == b"hello-a"));
        }

        // B sends with a source outside its /24: A drops and counts it.
        let spoofed = build_ipv4_udp(ip(9, 1), ip(3, 1), 1, 1, b"spoof");
        b.tun.inject.send(spoofed).await.unwrap();
        let marker = build_ipv4_udp(ip(7, 1), ip(3, 1), 1, 1, b"after");
        b.tun.inject.send(marker).await.unwrap();
        let got = expect_delivery(&mut a, b"after").await;
        assert_eq!(ipv4_src(&got), Some(ip(7, 1)));
        let st = a.dev.stats();
        assert_eq!(st[0].dropped_bad_source, 1);
        assert_eq!(a.dev.counters.dropped_bad_source.load(Ordering::Relaxed), 1);
        assert!(st[0].last_handshake.is_some());
        assert!(st[0].rx_bytes > 0 && st[0].tx_bytes > 0);

        // B (a member, with a valid tunnel) sends A a packet for a third subnet, as if A were a
        // router: A drops and counts it instead of delivering it to its TUN device.
        let elsewhere = build_ipv4_udp(ip(7, 1), ip(9, 1), 1, 1, b"route-me");
        let a_id = spec(&a, vec![]).node_id;
        let peer = b.dev.peer_by_node(&a_id).expect("B knows A");
        let mut out = vec![0u8; 2048];
        let sealed = match peer.tunn.lock().unwrap().encapsulate(&elsewhere, &mut out) {
            TunnResult::WriteToNetwork(d) => d.to_vec(),
            _ => panic!("the session is up, so encapsulation yields a datagram"),
        };
        b.dev.udp().send_to(&sealed, a.addr).await.unwrap();
        let marker = build_ipv4_udp(ip(7, 1), ip(3, 1), 1, 1, b"after2");
        b.tun.inject.send(marker).await.unwrap();
        let got = expect_delivery(&mut a, b"after2").await;
        assert!(!got.ends_with(b"route-me"));
        assert_eq!(
            a.dev
                .counters
                .dropped_bad_destination
                .load(Ordering::Relaxed),
            1
        );
        stop.cancel();
    }

    /// A flood of replayed handshake initiations from elsewhere puts the device under load: it
    /// answers with cookie replies (before any Diffie-Hellman) and never moves the real peer's
    /// endpoint to the flooder.
    #[tokio::test]
    async fn a_replayed_handshake_flood_gets_cookies_and_moves_nothing() {
        let net = MemNet::new();
        let stop = CancellationToken::new();
        let mut a = node(&net, 1, 3, &stop);
        let b = node(&net, 2, 7, &stop);
        a.dev.set_peers(&[spec(&b, vec![b.addr])]).await;
        b.dev.set_peers(&[spec(&a, vec![a.addr])]).await;
        net.start_capture();
        let p = build_ipv4_udp(ip(7, 1), ip(3, 1), 1, 1, b"hi");
        b.tun.inject.send(p).await.unwrap();
        expect_delivery(&mut a, b"hi").await;
        let init = net
            .captured()
            .into_iter()
            .find(|(from, _, d)| *from == b.addr && d.first() == Some(&1))
            .expect("b initiated the handshake")
            .2;

        let flooder = net.bind(SocketAddr::from(([192, 0, 2, 99], 4000))).unwrap();
        for _ in 0..(HANDSHAKE_RATE_LIMIT * 3) {
            flooder.send_to(&init, a.addr).await.unwrap();
        }
        let mut buf = vec![0u8; 256];
        let cookie = timeout(Duration::from_secs(10), async {
            loop {
                let (n, _) = flooder.recv_from(&mut buf).await.unwrap();
                if n > 0 && buf[0] == 3 {
                    return;
                }
            }
        })
        .await;
        assert!(cookie.is_ok(), "the flood is answered with cookie replies");
        let st = a.dev.stats();
        assert_eq!(st[0].endpoint, Some(b.addr), "the peer did not move");
        stop.cancel();
    }

    #[test]
    fn gso_batches_hold_equal_datagrams_for_one_endpoint() {
        let a = SocketAddr::from(([192, 0, 2, 1], 1));
        let b = SocketAddr::from(([192, 0, 2, 2], 1));
        let mut g = GsoBatch::new();
        assert!(g.fits(a, 100));
        g.append(a, 100);
        assert!(g.fits(a, 100));
        assert!(!g.fits(b, 100), "another endpoint");
        assert!(!g.fits(a, 120), "a larger datagram");
        g.append(a, 100);
        assert!(g.fits(a, 60));
        g.append(a, 60);
        assert!(!g.fits(a, 60), "a shorter datagram ends the run");
        assert_eq!((g.len, g.seg, g.count), (260, 100, 3));
        g.reset();
        for _ in 0..GSO_MAX_SEGMENTS {
            assert!(g.fits(a, 10));
            g.append(a, 10);
        }
        assert!(!g.fits(a, 10), "segment limit");
        assert!(g.spare().len() >= OUT_BUF);
    }

    #[tokio::test]
    async fn a_burst_arrives_complete_and_in_order_through_batching() {
        let net = MemNet::new();
        let stop = CancellationToken::new();
        let a = node(&net, 1, 3, &stop);
        let mut b = node(&net, 2, 7, &stop);
        a.dev.set_peers(&[spec(&b, vec![b.addr])]).await;
        b.dev.set_peers(&[spec(&a, vec![a.addr])]).await;
        // Establish the session first.
        a.tun
            .inject
            .send(build_ipv4_udp(ip(3, 1), ip(7, 1), 1, 1, b"hello"))
            .await
            .unwrap();
        expect_delivery(&mut b, b"hello").await;
        // 200 equal packets, then one short one: GSO runs and GRO-coalesced reads.
        let mut sent = Vec::new();
        for i in 0..200u32 {
            let mut payload = vec![0u8; 1000];
            payload[..4].copy_from_slice(&i.to_be_bytes());
            sent.push(build_ipv4_udp(ip(3, 1), ip(7, 1), 1, 2, &payload));
        }
        sent.push(build_ipv4_udp(ip(3, 1), ip(7, 1), 1, 2, b"last"));
        for p in &sent {
            a.tun.inject.send(p.clone()).await.unwrap();
        }
        let mut got = Vec::new();
        while got.len() < sent.len() {
            let p = timeout(Duration::from_secs(10), b.tun.delivered.recv())
                .await
                .expect("all packets within 10 s")
                .expect("open");
            if p.len() > 28 && u16::from_be_bytes([p[22], p[23]]) == 2 {
                got.push(p);
            }
        }
        assert_eq!(got, sent);
        stop.cancel();
    }

    #[tokio::test]
    async fn a_dead_first_candidate_is_skipped() {
        let net = MemNet::new();
        let stop = CancellationToken::new();
        let a = node(&net, 1, 3, &stop);
        let mut b = node(&net, 2, 7, &stop);
        // A only knows a stale address of B first, then the right one.
        let stale = SocketAddr::from(([192, 0, 2, 99], 51820));
        a.dev.set_peers(&[spec(&b, vec![stale, b.addr])]).await;
        b.dev.set_peers(&[spec(&a, vec![])]).await;
        let p = build_ipv4_udp(ip(3, 1), ip(7, 1), 1, 1, b"rotated");
        a.tun.inject.send(p).await.unwrap();
        // boringtun retries after 5 s, to the next candidate.
        expect_delivery(&mut b, b"rotated").await;
        assert_eq!(a.dev.stats()[0].endpoint, Some(b.addr));
        // B learnt A's address from the authenticated handshake (roaming).
        assert_eq!(b.dev.stats()[0].endpoint, Some(a.addr));
        stop.cancel();
    }

    #[tokio::test]
    async fn removed_peers_are_unreachable_and_unknown_keys_are_ignored() {
        let net = MemNet::new();
        let stop = CancellationToken::new();
        let a = node(&net, 1, 3, &stop);
        let mut b = node(&net, 2, 7, &stop);
        // B knows A, A does not know B: B's handshakes go nowhere.
        b.dev.set_peers(&[spec(&a, vec![a.addr])]).await;
        let p = build_ipv4_udp(ip(7, 1), ip(3, 1), 1, 1, b"x");
        b.tun.inject.send(p).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while a.dev.counters.dropped_unknown_peer.load(Ordering::Relaxed) == 0 {
            assert!(Instant::now() < deadline, "A never saw B's initiation");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(a.dev.stats().is_empty());
        // Once removed, nothing is routed to the peer any more.
        b.dev.set_peers(&[]).await;
        let p = build_ipv4_udp(ip(7, 1), ip(3, 1), 1, 1, b"y");
        let before = b.dev.counters.dropped_no_peer.load(Ordering::Relaxed);
        b.tun.inject.send(p).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while b.dev.counters.dropped_no_peer.load(Ordering::Relaxed) == before {
            assert!(Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = b.tun.delivered.try_recv();
        stop.cancel();
    }
}
