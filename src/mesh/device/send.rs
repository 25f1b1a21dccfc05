//! Sending: packets read from the TUN device are encrypted for the peer that holds their
//! destination /24 and sent to its endpoint, runs of equal datagrams in one system call (UDP GSO).
//! The TUN thread does it when the kernel has packets for the mesh; a receive thread does it in
//! passing when its own delivery made the kernel answer (a TCP ACK, an echo reply), so the answer
//! leaves without waking another thread. One [`TxState`] lock keeps reads planned one at a time
//! in the order the kernel gave them, and each read is sent in its turn (after every read
//! planned before it, wherever it was sealed), so packets leave in that order.
//!
//! Each read goes in three steps. *Planning* (in read order, under the send lock) finds each
//! packet's peer and takes the counters for a run of one peer's packets at once, under its
//! tunnel's lock, and lays the messages out as the datagram runs they are sent in. *Sealing*
//! encrypts them, on this thread or, when the kernel has several reads ready and seal lanes run
//! ([`super::sealers`]), on a lane. *Sending* passes the runs to the socket, reads in the order
//! they were read.

use super::sealers::Sealable;
use super::{transient, Device, MAX_PACKET, OUT_BUF, TUN_BATCH, TUN_PACKET_BUF};
use crate::mesh::io::{TunIo, UdpIo};
use crate::mesh::packet::{ipv4_dst, ipv4_src};
use crate::mesh::path::Route;
use crate::mesh::peer::Peer;
use crate::mesh::relay::{self, RELAY_HEADER};
use boringtun::noise::{SendCounters, TunnResult};
use std::io;
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::atomic::Ordering;
use std::time::Instant;
use tracing::{debug, warn};

/// Bytes a data message adds to its packet (header and tag).
const DATA_OVERHEAD: usize = 32;
/// Room for one packet's message in [`OutRead::out`]: the largest packet a TUN buffer holds,
/// sealed, behind a relay header.
const OUT_SLOT: usize = TUN_PACKET_BUF + DATA_OVERHEAD + RELAY_HEADER;

/// Encrypted datagrams for one endpoint, all `seg` bytes but possibly the last, sent with one
/// system call (UDP GSO). The kernel takes at most 64 segments and 64 KiB.
#[derive(Debug)]
struct Batch {
    /// Where the run starts in [`OutRead::out`], and its bytes.
    start: usize,
    len: usize,
    seg: usize,
    count: usize,
    to: SocketAddr,
    /// A shorter datagram ended the run.
    closed: bool,
}

const GSO_MAX_SEGMENTS: usize = 64;
const GSO_MAX_BYTES: usize = 60_000;

impl Batch {
    fn first(start: usize, to: SocketAddr, len: usize) -> Batch {
        Batch {
            start,
            len,
            seg: len,
            count: 1,
            to,
            closed: false,
        }
    }

    fn fits(&self, to: SocketAddr, len: usize) -> bool {
        self.to == to
            && !self.closed
            && len <= self.seg
            && self.count < GSO_MAX_SEGMENTS
            && self.len + len <= GSO_MAX_BYTES
    }

    fn append(&mut self, len: usize) {
        if len < self.seg {
            self.closed = true;
        }
        self.len += len;
        self.count += 1;
    }
}

/// One read from the TUN device on its way out: its packets, the counters they are sealed with
/// and where each message goes, laid out as the runs the socket sends. Owned, so it can be
/// sealed on another thread and come back.
#[derive(Default)]
pub(super) struct OutRead {
    bufs: Vec<Vec<u8>>,
    sizes: Vec<usize>,
    /// Each packet of the read: its destination slot (`NOWHERE`: not sent).
    slots: Vec<u32>,
    /// The messages, back to back in the order of `batches`.
    out: Vec<u8>,
    /// One peer's packets in a row: the counters taken for them, and their `seals`.
    runs: Vec<(SendCounters, Range<usize>)>,
    /// Each packet to seal: its index in `bufs`, and where its message starts in `out`.
    seals: Vec<(usize, usize)>,
    batches: Vec<Batch>,
}

const NOWHERE: u32 = u32::MAX;

impl OutRead {
    fn new() -> OutRead {
        OutRead {
            // Each its own zeroed allocation (not clones of one): pages only offload splits
            // write to become resident.
            bufs: (0..TUN_BATCH).map(|_| vec![0u8; TUN_PACKET_BUF]).collect(),
            sizes: vec![0usize; TUN_BATCH],
            slots: Vec::with_capacity(TUN_BATCH),
            out: vec![0u8; TUN_BATCH * OUT_SLOT],
            runs: Vec::new(),
            seals: Vec::with_capacity(TUN_BATCH),
            batches: Vec::new(),
        }
    }
}

impl Sealable for OutRead {
    /// Encrypt every planned message, each with the next of its run's counters (any thread).
    fn seal(&mut self) {
        let OutRead {
            bufs,
            sizes,
            out,
            runs,
            seals,
            ..
        } = self;
        for (counters, range) in runs.iter_mut() {
            for &(k, at) in &seals[range.clone()] {
                // Planning took one counter per message of the run.
                counters
                    .seal(&bufs[k][..sizes[k]], &mut out[at..])
                    .expect("a counter for each message");
            }
        }
        // The counters are spent: none may be used again.
        runs.clear();
    }

    /// Forget the read: nothing of it is sealed or sent.
    fn clear(&mut self) {
        self.slots.clear();
        self.runs.clear();
        self.seals.clear();
        self.batches.clear();
    }
}

impl OutRead {
    /// Where a message of `len` bytes for `to` goes: behind the last run if it fits there.
    fn place(&mut self, to: SocketAddr, len: usize) -> usize {
        match self.batches.last_mut() {
            Some(b) if b.fits(to, len) => {
                let at = b.start + b.len;
                b.append(len);
                at
            }
            last => {
                let at = last.map_or(0, |b| b.start + b.len);
                self.batches.push(Batch::first(at, to, len));
                at
            }
        }
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
    /// The read being planned or sealed here.
    read: OutRead,
    /// The one read into next, with seal lanes: kept between drains.
    ahead: Option<OutRead>,
}

impl TxState {
    pub(super) fn new() -> TxState {
        TxState {
            scratch: vec![0u8; MAX_PACKET + 64],
            read: OutRead::new(),
            ahead: None,
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
    /// number of reads). When seal lanes run and the next read is ready behind a planned one,
    /// the planned one goes to a lane; the last is sealed here. Only a broken device is an
    /// error.
    pub(super) fn drain_tun(&self, tx: &mut TxState) -> io::Result<()> {
        let mut reads = 0;
        if !self.read_tun(&mut tx.scratch, &mut tx.read, &mut reads)? {
            return Ok(());
        }
        loop {
            // `tx.read` is planned: its counters are taken, so it is sent in any case.
            let mut broken = None;
            if reads < TUN_DRAIN_READS && self.sealers.open() {
                let mut ahead = match tx.ahead.take() {
                    Some(r) => r,
                    None => self.sealers.spare(OutRead::new),
                };
                match self.read_tun(&mut tx.scratch, &mut ahead, &mut reads) {
                    Ok(true) => {
                        let planned = std::mem::replace(&mut tx.read, ahead);
                        match self.sealers.hand(planned) {
                            Ok(()) => {
                                self.counters
                                    .sealed_on_lanes
                                    .fetch_add(1, Ordering::Relaxed);
                                continue;
                            }
                            Err(mut planned) => {
                                // The lanes are stopping: sealed here, in read order.
                                self.seal_and_send(&mut planned);
                                self.sealers.unused(planned);
                                continue;
                            }
                        }
                    }
                    Ok(false) => tx.ahead = Some(ahead),
                    Err(e) => {
                        tx.ahead = Some(ahead);
                        broken = Some(e);
                    }
                }
            }
            self.seal_and_send(&mut tx.read);
            if let Some(e) = broken {
                return Err(e);
            }
            if reads >= TUN_DRAIN_READS
                || !self.read_tun(&mut tx.scratch, &mut tx.read, &mut reads)?
            {
                return Ok(());
            }
        }
    }

    /// Read the TUN device into `r` and plan it. False: nothing to read. Counts `reads`.
    fn read_tun(&self, scratch: &mut [u8], r: &mut OutRead, reads: &mut usize) -> io::Result<bool> {
        while *reads < TUN_DRAIN_READS {
            *reads += 1;
            match self.tun.try_recv_batch(scratch, &mut r.bufs, &mut r.sizes) {
                Ok(n) => {
                    self.plan(r, n, Instant::now());
                    return Ok(true);
                }
                Err(e) if transient(&e) => return Ok(false),
                // Not from the system call: the read was taken but could not be split (more
                // segments than `TUN_BATCH`, say, from a connection with a tiny MSS). That
                // packet is lost, as the kernel's own path would have lost it; the rest go on.
                Err(e) if e.raw_os_error().is_none() => {
                    debug!(error = %e, "a TUN read could not be split; dropped");
                    self.counters
                        .dropped_unsplittable
                        .fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(false)
    }

    /// Seal a planned read here and send it in its turn (after the reads handed before it).
    fn seal_and_send(&self, r: &mut OutRead) {
        r.seal();
        self.sealers.in_turn(r, |r| self.send_read(r));
        r.clear();
    }

    /// Pass a sealed read's runs of datagrams to the socket.
    pub(super) fn send_read(&self, r: &OutRead) {
        for b in &r.batches {
            if let Err(e) = self
                .udp
                .send_gso(&r.out[b.start..b.start + b.len], b.seg, b.to)
            {
                debug!(to = %b.to, error = %e, "send failed");
            }
        }
    }

    /// Plan a read: each packet's peer, the counters of each run of one peer's packets (taken
    /// in order, once per run), and where each message goes. Packets for a peer without a
    /// session wait for it; handshakes go out at once.
    fn plan(&self, r: &mut OutRead, n: usize, now: Instant) {
        r.clear();
        let own = self.own_slot.load(Ordering::Relaxed);
        for k in 0..n {
            let slot = self.destination(&r.bufs[k][..r.sizes[k]], own);
            r.slots.push(slot.unwrap_or(NOWHERE));
        }
        let mut i = 0;
        while i < n {
            let slot = r.slots[i];
            let end = (i..n).find(|&k| r.slots[k] != slot).unwrap_or(n);
            if slot != NOWHERE {
                self.plan_run(r, slot, i..end, now);
            }
            i = end;
        }
    }

    /// The mesh slot a packet from the TUN device goes to, if it goes anywhere.
    fn destination(&self, packet: &[u8], own: u32) -> Option<u32> {
        let slot = ipv4_dst(packet).and_then(|d| self.range.slot_of(d))?;
        if slot == own {
            return None;
        }
        // Only this node's /24 sends from here: a workload forging another node's address (or
        // one outside the mesh) gets nothing through. Peers would drop it too; this counts it
        // where it happened.
        if ipv4_src(packet).and_then(|s| self.range.slot_of(s)) != Some(own) {
            self.counters
                .dropped_forged_source
                .fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(slot)
    }

    /// Plan packets `run` of the read, all for `slot`.
    fn plan_run(&self, r: &mut OutRead, slot: u32, run: Range<usize>, now: Instant) {
        let count = run.len();
        let Some(peer) = self.table.read().unwrap().by_slot.get(&slot).cloned() else {
            self.counters
                .dropped_no_peer
                .fetch_add(count as u64, Ordering::Relaxed);
            return;
        };
        let route = peer.paths.lock().unwrap().route_data(now);
        let bytes: usize = r.sizes[run.clone()].iter().sum();
        let mut tunn = peer.tunn.lock().unwrap();
        let has_session = tunn.time_since_last_handshake().is_some();
        if has_session && peer.counters.waiting.load(Ordering::Relaxed) > 0 {
            // Those that waited for the session go first.
            drop(tunn);
            self.release_waiting(&peer);
            tunn = peer.tunn.lock().unwrap();
        }
        let counters = match route {
            Some(_) if has_session => tunn.reserve_data(count, bytes),
            _ => None,
        };
        let (route, counters) = match (route, counters) {
            (Some(route), Some(counters)) => (route, counters),
            (None, _) if has_session => {
                drop(tunn);
                debug!(peer = %peer.name(), "no endpoint known; packets dropped");
                return;
            }
            _ => {
                // No session (yet, or any more): the packets wait here (bounded), and a
                // handshake is on its way.
                let mut init = [0u8; super::INITIATION_BUF];
                let hs = match tunn.format_handshake_initiation(&mut init, false) {
                    TunnResult::WriteToNetwork(d) => Some(d.len()),
                    _ => None,
                };
                drop(tunn);
                for k in run {
                    self.hold_for_session(&peer, &r.bufs[k][..r.sizes[k]]);
                }
                if let Some(n) = hs {
                    self.send_to_peer(&peer, &init[..n]);
                }
                return;
            }
        };
        drop(tunn);
        // Through a relay, the session header goes in front of each message.
        let head = match route {
            Route::Relay { session, .. } => Some(relay::header(session)),
            _ => None,
        };
        let head_len = head.map_or(0, |h| h.len());
        let first = r.seals.len();
        for k in run {
            let at = r.place(route.to(), r.sizes[k] + DATA_OVERHEAD + head_len);
            if let Some(h) = &head {
                r.out[at..at + head_len].copy_from_slice(h);
            }
            r.seals.push((k, at + head_len));
        }
        r.runs.push((counters, first..r.seals.len()));
        peer.counters
            .tx_packets
            .fetch_add(count as u64, Ordering::Relaxed);
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_laid_out_as_runs_of_equal_datagrams_for_one_endpoint() {
        let a = SocketAddr::from(([192, 0, 2, 1], 1));
        let b = SocketAddr::from(([192, 0, 2, 2], 1));
        let mut r = OutRead::default();
        assert_eq!(r.place(a, 100), 0);
        assert_eq!(r.place(a, 100), 100);
        assert_eq!(r.place(b, 100), 200, "another endpoint starts a run");
        assert_eq!(r.place(b, 120), 300, "a larger datagram starts a run");
        assert_eq!(r.place(b, 120), 420);
        assert_eq!(r.place(b, 60), 540, "a shorter one ends the run");
        assert_eq!(r.place(b, 60), 600);
        let runs: Vec<_> = r
            .batches
            .iter()
            .map(|x| (x.start, x.len, x.seg, x.count, x.to))
            .collect();
        assert_eq!(
            runs,
            [
                (0, 200, 100, 2, a),
                (200, 100, 100, 1, b),
                (300, 300, 120, 3, b),
                (600, 60, 60, 1, b)
            ]
        );
        r.clear();
        for i in 0..GSO_MAX_SEGMENTS {
            assert_eq!(r.place(a, 10), i * 10);
        }
        assert_eq!(r.batches.len(), 1);
        r.place(a, 10);
        assert_eq!(r.batches.len(), 2, "segment limit");
        r.clear();
        let big = 1500;
        let per_run = GSO_MAX_BYTES / big;
        for _ in 0..=per_run {
            r.place(a, big);
        }
        assert_eq!(
            r.batches.iter().map(|x| x.count).collect::<Vec<_>>(),
            [per_run, 1],
            "byte limit"
        );
    }
}
