//! Sending: packets read from the TUN device are encrypted for the peer that holds their
//! destination /24 and sent to its endpoint, runs of equal datagrams in one system call (UDP GSO).
//! The TUN thread does it when the kernel has packets for the mesh; a receive thread does it in
//! passing when its own delivery made the kernel answer (a TCP ACK, an echo reply), so the answer
//! leaves without waking another thread. One [`TxState`] lock keeps every read-encrypt-send run
//! whole, so packets leave in the order the kernel gave them.

use super::{transient, Device, MAX_PACKET, OUT_BUF, TUN_BATCH, TUN_PACKET_BUF};
use crate::mesh::io::{TunIo, UdpIo};
use crate::mesh::packet::{ipv4_dst, ipv4_src};
use crate::mesh::path::Route;
use crate::mesh::peer::Peer;
use crate::mesh::relay::{self, RELAY_HEADER};
use boringtun::noise::TunnResult;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Instant;
use tracing::{debug, warn};

/// Encrypted datagrams for one endpoint, all `seg` bytes but possibly the last, sent with one
/// system call (UDP GSO). The kernel takes at most 64 segments and 64 KiB.
pub(super) struct GsoBatch {
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
    pub(super) fn new() -> GsoBatch {
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

/// Reads the TUN device takes per drain at most, so the other threads get the lock in turn.
const TUN_DRAIN_READS: usize = 64;
/// Packets kept for one peer while its tunnel has no session (the kernel's WireGuard keeps 128).
pub const MAX_WAITING_PER_PEER: usize = 64;
/// Bytes kept across all peers while their tunnels have no session.
pub const MAX_WAITING_BYTES: usize = 2 << 20;

/// The send path's buffers, behind the device's one send lock.
pub(super) struct TxState {
    scratch: Vec<u8>,
    bufs: Vec<Vec<u8>>,
    sizes: Vec<usize>,
    gso: GsoBatch,
}

impl TxState {
    pub(super) fn new() -> TxState {
        TxState {
            scratch: vec![0u8; MAX_PACKET + 64],
            // Each its own zeroed allocation (not clones of one): pages only offload splits
            // write to become resident.
            bufs: (0..TUN_BATCH).map(|_| vec![0u8; TUN_PACKET_BUF]).collect(),
            sizes: vec![0usize; TUN_BATCH],
            gso: GsoBatch::new(),
        }
    }
}

impl<T: TunIo, U: UdpIo> Device<T, U> {
    pub(super) fn send_to_peer(&self, peer: &Peer, datagram: &[u8]) {
        let is_initiation = datagram.first() == Some(&1);
        let route = {
            let mut paths = peer.paths.lock().unwrap();
            if is_initiation {
                paths.for_initiation(Instant::now())
            } else {
                paths.route(Instant::now())
            }
        };
        match route {
            Some(route) => {
                if let Err(e) = self.send_route(route, datagram) {
                    debug!(peer = %peer.name(), to = %route.to(), error = %e, "send failed");
                } else {
                    peer.counters.tx_packets.fetch_add(1, Ordering::Relaxed);
                }
            }
            None => debug!(peer = %peer.name(), "no endpoint known; packet dropped"),
        }
    }

    /// The TUN thread: wait for the kernel to have packets for the mesh, then send them.
    pub(super) fn tun_thread(&self) {
        loop {
            match self.tun.wait_readable() {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => return,
                Err(e) if transient(&e) => continue,
                Err(e) => {
                    warn!(error = %e, "waiting for the TUN device failed");
                    return;
                }
            }
            let mut tx = self.tx.lock().unwrap();
            if let Err(e) = self.drain_tun(&mut tx) {
                warn!(error = %e, "reading the TUN device failed");
                return;
            }
        }
    }

    /// Read, encrypt and send what the kernel has for the mesh until it has no more (a bounded
    /// number of reads). Only a broken device is an error.
    pub(super) fn drain_tun(&self, tx: &mut TxState) -> io::Result<()> {
        let TxState {
            scratch,
            bufs,
            sizes,
            gso,
        } = tx;
        for _ in 0..TUN_DRAIN_READS {
            let n = match self.tun.try_recv_batch(scratch, bufs, sizes) {
                Ok(n) => n,
                Err(e) if transient(&e) => break,
                // Not from the system call: the read was taken but could not be split (more
                // segments than `TUN_BATCH`, say, from a connection with a tiny MSS). That
                // packet is lost, as the kernel's own path would have lost it; the rest go on.
                Err(e) if e.raw_os_error().is_none() => {
                    debug!(error = %e, "a TUN read could not be split; dropped");
                    self.counters
                        .dropped_unsplittable
                        .fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                Err(e) => return Err(e),
            };
            let now = Instant::now();
            for i in 0..n {
                self.outbound(&bufs[i][..sizes[i]], gso, now);
            }
            self.flush(gso);
        }
        Ok(())
    }

    /// Encrypt one packet from the TUN device. Data messages join `gso` (sent together with
    /// the others of the batch that go to the same endpoint); handshakes go out at once.
    fn outbound(&self, packet: &[u8], gso: &mut GsoBatch, now: Instant) {
        let Some(slot) = ipv4_dst(packet).and_then(|d| self.range.slot_of(d)) else {
            return;
        };
        let own = self.own_slot.load(Ordering::Relaxed);
        if slot == own {
            return;
        }
        // Only this node's /24 sends from here: a workload forging another node's address (or
        // one outside the mesh) gets nothing through. Peers would drop it too; this counts it
        // where it happened.
        if ipv4_src(packet).and_then(|s| self.range.slot_of(s)) != Some(own) {
            self.counters
                .dropped_forged_source
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
        let Some(peer) = self.table.read().unwrap().by_slot.get(&slot).cloned() else {
            self.counters
                .dropped_no_peer
                .fetch_add(1, Ordering::Relaxed);
            return;
        };
        let route = peer.paths.lock().unwrap().route_data(now);
        // Through a relay, the session header goes in front of the datagram.
        let head = match route {
            Some(Route::Relay { .. }) => RELAY_HEADER,
            _ => 0,
        };
        let mut tunn = peer.tunn.lock().unwrap();
        if tunn.time_since_last_handshake().is_none() {
            // No session yet: the packet waits here (bounded), and a handshake is on its way.
            let mut init = [0u8; super::INITIATION_BUF];
            let hs = match tunn.format_handshake_initiation(&mut init, false) {
                TunnResult::WriteToNetwork(d) => Some(d.len()),
                _ => None,
            };
            drop(tunn);
            self.hold_for_session(&peer, packet);
            if let Some(n) = hs {
                self.send_to_peer(&peer, &init[..n]);
            }
            return;
        }
        if peer.counters.waiting.load(Ordering::Relaxed) > 0 {
            // Those that waited for the session go first.
            drop(tunn);
            self.release_waiting(&peer);
            tunn = peer.tunn.lock().unwrap();
        }
        let start = gso.len;
        let result = tunn.encapsulate(packet, &mut gso.spare()[head..]);
        drop(tunn);
        let len = match result {
            TunnResult::WriteToNetwork(d) => d.len(),
            TunnResult::Err(e) => {
                debug!(peer = %peer.name(), error = ?e, "encapsulate failed");
                return;
            }
            _ => return,
        };
        let is_data = gso.buf[start + head] == 4;
        if !is_data {
            // A handshake (the session needed one first): out at once, on its own.
            let d = gso.buf[start + head..start + head + len].to_vec();
            self.send_to_peer(&peer, &d);
            return;
        }
        if let Some(Route::Relay { session, .. }) = route {
            gso.buf[start..start + head].copy_from_slice(&relay::header(session));
        }
        let len = len + head;
        match route.map(|r| r.to()) {
            Some(to) => {
                if !gso.fits(to, len) {
                    self.flush(gso);
                    gso.buf.copy_within(start..start + len, 0);
                }
                gso.append(to, len);
                peer.counters.tx_packets.fetch_add(1, Ordering::Relaxed);
            }
            None => debug!(peer = %peer.name(), "no endpoint known; packet dropped"),
        }
    }

    /// Keep `packet` until the peer's tunnel has a session: at most [`MAX_WAITING_PER_PEER`]
    /// per peer (the oldest gives way) and [`MAX_WAITING_BYTES`] across peers (then the packet
    /// is dropped), so a thousand unreachable peers cannot take the memory. Counted.
    pub(super) fn hold_for_session(&self, peer: &Peer, packet: &[u8]) {
        let mut w = peer.waiting.lock().unwrap();
        if peer.removed.load(Ordering::SeqCst) {
            // Removed since this packet found it: its queue is not counted any more.
            self.counters
                .dropped_no_peer
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
        if w.len() >= MAX_WAITING_PER_PEER {
            if let Some(old) = w.pop_front() {
                self.waiting_bytes.fetch_sub(old.len(), Ordering::Relaxed);
                peer.counters.waiting.fetch_sub(1, Ordering::Relaxed);
                self.counters
                    .dropped_no_session
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        if self.waiting_bytes.load(Ordering::Relaxed) + packet.len() > MAX_WAITING_BYTES {
            self.counters
                .dropped_no_session
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.waiting_bytes
            .fetch_add(packet.len(), Ordering::Relaxed);
        peer.counters.waiting.fetch_add(1, Ordering::Relaxed);
        w.push_back(packet.to_vec());
    }

    /// Send what waited for the peer's session, if it has one now. The queue stays locked, and
    /// its packets counted, until the last is sent: a send that sees the count comes here and
    /// waits, so no newer packet overtakes one that waited (lock order: queue, then tunnel).
    pub(super) fn release_waiting(&self, peer: &Peer) {
        let mut w = peer.waiting.lock().unwrap();
        if w.is_empty()
            || peer
                .tunn
                .lock()
                .unwrap()
                .time_since_last_handshake()
                .is_none()
        {
            return;
        }
        let mut out = vec![0u8; OUT_BUF];
        let (count, mut bytes) = (w.len(), 0);
        for p in w.drain(..) {
            bytes += p.len();
            let len = match peer.tunn.lock().unwrap().encapsulate(&p, &mut out) {
                TunnResult::WriteToNetwork(d) => d.len(),
                _ => continue,
            };
            self.send_to_peer(peer, &out[..len]);
        }
        self.waiting_bytes.fetch_sub(bytes, Ordering::Relaxed);
        peer.counters
            .waiting
            .fetch_sub(count as u64, Ordering::Relaxed);
    }

    /// Give up what waited for the peer (it left, or its handshakes gave up).
    pub(super) fn take_waiting(&self, peer: &Peer) -> Vec<Vec<u8>> {
        let packets: Vec<Vec<u8>> = peer.waiting.lock().unwrap().drain(..).collect();
        let bytes: usize = packets.iter().map(|p| p.len()).sum();
        self.waiting_bytes.fetch_sub(bytes, Ordering::Relaxed);
        peer.counters
            .waiting
            .fetch_sub(packets.len() as u64, Ordering::Relaxed);
        packets
    }

    fn flush(&self, gso: &mut GsoBatch) {
        if let Some(to) = gso.to {
            if let Err(e) = self.udp.send_gso(&gso.buf[..gso.len], gso.seg, to) {
                debug!(%to, error = %e, "send failed");
            }
        }
        gso.reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
