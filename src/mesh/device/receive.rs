//! Receiving: datagrams on the mesh port are demultiplexed (WireGuard or control frame),
//! handshakes are matched to peers (rate-limited before any Diffie-Hellman), data is decrypted,
//! checked by the admission policy and handed to the TUN device in batches: by the receive thread,
//! or under load by the receive lanes, in order per peer ([`super::lanes`]).

use super::admission::{admit, Admission};
use super::lanes::Read;
use super::{
    transient, Device, DeviceEvent, REPLY_BUF, TUN_BATCH, TUN_PACKET_BUF, UDP_BATCH,
    UDP_ROUNDS_PER_WAIT,
};
use crate::mesh::io::{TunIo, UdpIo, TUN_HEADROOM};
use crate::mesh::packet::{classify, ipv4_dst, FrameKind};
use crate::mesh::path::{Heard, Route, Via};
use crate::mesh::peer::Peer;
use crate::mesh::relay::{self, Refused};
use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::{Packet, Session, Tunn, TunnResult};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;
use tracing::{debug, info, warn};

/// What became of a relayed frame.
enum Relayed {
    /// For one of this node's peers, decrypted into the TUN buffer.
    Tun,
    /// Relayed by this node: to go on to this address, unchanged.
    Forward(SocketAddr),
    /// Dropped (counted), or handled with nothing for the TUN device.
    Nothing,
}

/// Whose a read is ([`Device::owner_of`]).
enum Owner {
    None,
    One(Arc<Peer>),
    Several(Vec<Arc<Peer>>),
}

impl Owner {
    fn add(&mut self, p: &Arc<Peer>) {
        match self {
            Owner::None => *self = Owner::One(p.clone()),
            Owner::One(q) if Arc::ptr_eq(q, p) => {}
            Owner::One(q) => *self = Owner::Several(vec![q.clone(), p.clone()]),
            Owner::Several(v) => {
                if !v.iter().any(|q| Arc::ptr_eq(q, p)) {
                    v.push(p.clone());
                }
            }
        }
    }
}

/// A run of data messages of one read, from one session, opened with its shared keys; the
/// tunnel and the peer's paths hear of it once, at its end ([`Device::end_run`]).
struct Opened {
    index: u32,
    peer: Arc<Peer>,
    session: Arc<Session>,
    /// Messages that proved authentic (decrypted), keepalives included.
    opened: usize,
    /// Bytes of the packets inside.
    bytes: usize,
}

/// A data message a lane decrypted ahead of its turn (into the TUN buffer of the same index as
/// the datagram in its reads): its counter and plaintext length. It counts as received only in
/// turn ([`Session::accept`]).
#[derive(Clone, Copy)]
pub(super) struct Decrypted {
    counter: u64,
    len: usize,
}

/// What a thread that delivers to the TUN device keeps between batches.
pub(super) struct Deliver<W> {
    to_tun: Vec<Vec<u8>>,
    /// Per datagram of the reads in hand, what was decrypted ahead ([`Device::decrypt_ahead`]).
    pub ahead: Vec<Option<Decrypted>>,
    out: Vec<u8>,
    writer: W,
}

impl<W> Deliver<W> {
    pub(super) fn new(writer: W) -> Deliver<W> {
        Deliver {
            to_tun: (0..TUN_BATCH)
                .map(|_| Vec::with_capacity(TUN_PACKET_BUF))
                .collect(),
            ahead: vec![None; TUN_BATCH],
            out: vec![0u8; REPLY_BUF],
            writer,
        }
    }
}

impl<T: TunIo, U: UdpIo> Device<T, U> {
    /// The receive thread: wait for datagrams, then take what has arrived a batch of reads at a
    /// time. Under load, reads go to the receive lanes ([`super::lanes`]); the rest are
    /// decrypted here and handed to the kernel together, so it can coalesce TCP segments.
    pub(super) fn udp_thread(&self) {
        let mut reads: Vec<Read> = (0..UDP_BATCH).map(|_| Read::new()).collect();
        let mut here: Vec<usize> = Vec::with_capacity(UDP_BATCH);
        let mut dl = Deliver::new(self.tun.writer());
        loop {
            match self.udp.wait_readable() {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => return,
                Err(e) if transient(&e) => continue,
                Err(e) => {
                    warn!(error = %e, "waiting for the UDP socket failed");
                    return;
                }
            }
            // Rounds between waits are bounded: a socket that never runs dry (a bulk sender, a
            // flood of junk) must not keep the thread from seeing a wake-up in the wait.
            for _ in 0..UDP_ROUNDS_PER_WAIT {
                let mut k = 0;
                // Errors such as an ICMP "port unreachable" reported on the socket are skipped;
                // the attempts are bounded all the same.
                for _ in 0..2 * UDP_BATCH {
                    if k == UDP_BATCH {
                        break;
                    }
                    let r = &mut reads[k];
                    match self.udp.try_recv_gro(&mut r.buf) {
                        Ok((n, from, segment)) => {
                            (r.n, r.from, r.segment) = (n, from, segment);
                            k += 1;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if transient(&e) => continue,
                        Err(e) => {
                            warn!(error = %e, "reading the UDP socket failed");
                            return;
                        }
                    }
                }
                if k == 0 {
                    break;
                }
                // A full batch: more is waiting, so the lanes take what they can. A read of one
                // peer's kept here is for a peer with nothing in the lanes (only this thread
                // hands over, so that stays true this round): it cannot overtake one of its own.
                let more = k == UDP_BATCH;
                here.clear();
                for i in 0..k {
                    match self.owner_of(&reads[i]) {
                        Owner::One(p) if self.lanes.hand_over(&p, more, &mut reads[i]) => {
                            self.counters.lane_reads.fetch_add(1, Ordering::Relaxed);
                        }
                        Owner::Several(peers) => {
                            // Several peers' datagrams in one read (a relay's sessions, coalesced):
                            // after what each has in the lanes, and before anything later.
                            for p in &peers {
                                self.lanes.wait_idle(p);
                            }
                            here.push(i);
                            self.deliver(here.iter().map(|&i| &reads[i]), &mut dl);
                            here.clear();
                        }
                        _ => here.push(i),
                    }
                }
                self.deliver(here.iter().map(|&i| &reads[i]), &mut dl);
                self.answer_inline();
                if !more {
                    break;
                }
            }
        }
    }

    /// A lane's thread: decrypt the reads handed over, whoever's they are, ahead of their turn
    /// (several lanes at once for one peer); then, in the peer's turn, everything that decides
    /// (replay window, admission, roaming, the tunnel's bookkeeping) and the write to the TUN
    /// device, as the receive thread would have done it.
    pub(super) fn lane_thread(&self) {
        let mut dl = Deliver::new(self.tun.writer());
        let mut work = Vec::new();
        while self.lanes.take(&mut work, dl.to_tun.len()).is_some() {
            let Some(first) = work.first() else {
                continue;
            };
            self.decrypt_ahead(work.iter().map(|h| &h.read), &mut dl);
            // The reads taken together are one peer's next tickets: one turn for all.
            self.lanes.wait_turn(first);
            self.deliver(work.iter().map(|h| &h.read), &mut dl);
            for h in work.drain(..) {
                self.lanes.done(h);
            }
            self.answer_inline();
        }
    }

    /// Decrypt the direct data messages of `reads` into the TUN buffers of their index (counted
    /// across the reads), without counting them received (the part of the work that may run
    /// out of turn).
    pub(super) fn decrypt_ahead<'r>(
        &self,
        reads: impl Iterator<Item = &'r Read>,
        dl: &mut Deliver<T::Writer>,
    ) {
        let mut session: Option<(u32, Arc<Session>)> = None;
        let all = reads.flat_map(|r| r.datagrams());
        for (k, d) in all.enumerate().take(dl.to_tun.len()) {
            dl.ahead[k] = None;
            let Ok(Packet::PacketData(p)) = Tunn::parse_incoming_packet(d) else {
                continue;
            };
            let index = p.receiver_idx;
            if session.as_ref().map(|s| s.0) != Some(index) {
                session = self.session_for(index).map(|(_, s)| (index, s));
            }
            let Some((_, s)) = &session else {
                continue;
            };
            let buf = &mut dl.to_tun[k];
            buf.resize(TUN_HEADROOM + d.len(), 0);
            if let Ok((counter, len)) = s.decrypt(p, &mut buf[TUN_HEADROOM..]) {
                dl.ahead[k] = Some(Decrypted { counter, len });
            }
        }
    }

    /// The peer and session of data messages for `receiver_idx`, if there is one.
    fn session_for(&self, receiver_idx: u32) -> Option<(Arc<Peer>, Arc<Session>)> {
        let peer = self
            .table
            .read()
            .unwrap()
            .by_index
            .get(&(receiver_idx >> 8))
            .cloned()?;
        let session = peer.tunn.lock().unwrap().data_session(receiver_idx)?;
        Some((peer, session))
    }

    /// Whose a read is, as far as that shows without decrypting: data messages, handshake
    /// answers and cookie replies by their receiver index, frames relayed to this node by their
    /// relay session, every datagram looked at. Initiations (only a Diffie-Hellman shows whose),
    /// control frames and frames relayed for others belong to no peer.
    fn owner_of(&self, r: &Read) -> Owner {
        if self.lanes.len() == 0 {
            return Owner::None;
        }
        /// What a datagram's peer is found by.
        #[derive(PartialEq, Clone, Copy)]
        enum Key {
            Index(u32),
            Relay(u64),
        }
        let t = self.table.read().unwrap();
        let mut owner = Owner::None;
        let mut last = None;
        for d in r.datagrams() {
            // A receiver index at `at`, as the table keeps it.
            let index = |at: usize| {
                d.get(at..at + 4)
                    .map(|b| Key::Index(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) >> 8))
            };
            let key = match (classify(d), d[0]) {
                (FrameKind::Relay, _) => relay::parse(d).map(|(session, _)| Key::Relay(session)),
                (FrameKind::WireGuard, 2) => index(8),
                (FrameKind::WireGuard, 3 | 4) => index(4),
                _ => None,
            };
            let Some(key) = key else { continue };
            if last.replace(key) == Some(key) {
                continue;
            }
            let peer = match key {
                Key::Index(index) => t.by_index.get(&index),
                Key::Relay(session) => t.by_relay_session.get(&session),
            };
            if let Some(p) = peer {
                owner.add(p);
            }
        }
        owner
    }

    /// What the kernel answered to the packets just delivered (TCP ACKs, echo replies) leaves
    /// from this thread, unless another is sending already.
    fn answer_inline(&self) {
        if let Ok(mut tx) = self.tx.try_lock() {
            if let Err(e) = self.drain_tun(&mut tx) {
                debug!(error = %e, "reading the TUN device failed");
            }
        }
    }

    /// Handle reads: WireGuard datagrams decrypted for the TUN device, relayed frames
    /// forwarded or opened, control frames passed to the node. Messages a lane decrypted
    /// ahead (`dl.ahead`) are taken as they are.
    pub(super) fn deliver<'r>(
        &self,
        reads: impl Iterator<Item = &'r Read>,
        dl: &mut Deliver<T::Writer>,
    ) {
        let Deliver {
            to_tun,
            ahead,
            out,
            writer,
        } = dl;
        let mut ready = 0;
        // Index of the datagram across the reads (where one decrypted ahead is).
        let mut slot = 0;
        for r in reads {
            // Data messages straight from one session, opened with it (found once).
            let mut run: Option<Opened> = None;
            let from = r.from;
            let segment = r.segment.max(1);
            // Frames this node relays, as a byte range of the read and where they go: a run of
            // them leaves in one system call (UDP GSO), as they came (UDP GRO).
            let mut relaying: Option<(usize, usize, SocketAddr)> = None;
            // With GRO one read may hold several datagrams of `segment` bytes.
            for (k, d) in r.datagrams().enumerate() {
                let early = ahead.get_mut(slot).and_then(Option::take);
                let this = slot;
                slot += 1;
                if ready == to_tun.len() {
                    self.write_tun(writer, &mut to_tun[..ready]);
                    ready = 0;
                }
                let kind = classify(d);
                if kind != FrameKind::Relay {
                    self.forward_run(r, relaying.take());
                }
                if kind == FrameKind::WireGuard {
                    if early.is_some() {
                        // Decrypted ahead into the buffer of this datagram's index (never
                        // below `ready`): in place for delivery.
                        to_tun.swap(ready, this);
                    }
                    match self.open_direct(d, from, &mut run, &mut to_tun[ready], early) {
                        Some(true) => {
                            ready += 1;
                            continue;
                        }
                        Some(false) => continue,
                        None => {}
                    }
                }
                self.end_run(run.take(), from);
                match kind {
                    FrameKind::WireGuard => {
                        if self.inbound(d, from, Via::Direct, None, &mut to_tun[ready], out) {
                            ready += 1;
                        }
                    }
                    FrameKind::Relay => match self.relayed(d, from, &mut to_tun[ready], out) {
                        Relayed::Forward(to) => {
                            let at = k * segment;
                            match &mut relaying {
                                Some((_, end, t)) if *t == to && *end == at => *end += d.len(),
                                _ => {
                                    self.forward_run(r, relaying.take());
                                    relaying = Some((at, at + d.len(), to));
                                }
                            }
                        }
                        Relayed::Tun => ready += 1,
                        Relayed::Nothing => {}
                    },
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
            self.forward_run(r, relaying);
            self.end_run(run, from);
        }
        self.write_tun(writer, &mut to_tun[..ready]);
    }

    /// A data message received directly, opened with its session's shared keys: found (one
    /// lock of the tunnel) for the first of a run from one session, then used without the
    /// tunnel's lock. `early`: a lane decrypted it ahead, into `to_tun`; it is only accepted
    /// here (the replay window marks it, in arrival order). True: a packet for the TUN device
    /// in `to_tun` at `TUN_HEADROOM`. False: dropped or counted as upstream's `decapsulate`
    /// would (or a keepalive). None: not for this path (not data, no such session): the
    /// general one takes it, and reports why.
    fn open_direct(
        &self,
        datagram: &[u8],
        from: SocketAddr,
        run: &mut Option<Opened>,
        to_tun: &mut Vec<u8>,
        early: Option<Decrypted>,
    ) -> Option<bool> {
        let Ok(Packet::PacketData(p)) = Tunn::parse_incoming_packet(datagram) else {
            return None;
        };
        if run.as_ref().map(|o| o.index) != Some(p.receiver_idx) {
            let (peer, session) = self.session_for(p.receiver_idx)?;
            self.end_run(run.take(), from);
            *run = Some(Opened {
                index: p.receiver_idx,
                peer,
                session,
                opened: 0,
                bytes: 0,
            });
        }
        let o = run.as_mut()?;
        // Decrypted ahead with the session of this very index (indexes are not reused).
        let result = match early {
            Some(e) => o
                .session
                .accept(e.counter, &mut to_tun[TUN_HEADROOM..TUN_HEADROOM + e.len]),
            None => {
                to_tun.resize(TUN_HEADROOM + datagram.len(), 0);
                o.session.open(p, &mut to_tun[TUN_HEADROOM..])
            }
        };
        let (len, src) = match result {
            TunnResult::WriteToTunnelV4(d, src) => (d.len(), IpAddr::V4(src)),
            TunnResult::WriteToTunnelV6(d, src) => (d.len(), IpAddr::V6(src)),
            TunnResult::Done => {
                o.opened += 1;
                return Some(false);
            }
            // Seen already (a duplicate found when the counter is marked is "invalid").
            TunnResult::Err(WireGuardError::DuplicateCounter | WireGuardError::InvalidCounter) => {
                return Some(false)
            }
            TunnResult::Err(e) => {
                // Not counted as heard from (an invalid packet inside included), as in
                // `inbound`.
                debug!(peer = %o.peer.name(), error = ?e, "decapsulate failed");
                return Some(false);
            }
            TunnResult::WriteToNetwork(_) => return Some(false),
        };
        o.opened += 1;
        o.bytes += len;
        Some(self.admit_packet(&o.peer, src, len, to_tun))
    }

    /// Send a run of relayed frames of `r` (bytes `start..end`, equal frames but the last) on.
    fn forward_run(&self, r: &Read, run: Option<(usize, usize, SocketAddr)>) {
        let Some((start, end, to)) = run else {
            return;
        };
        let segment = r.segment.max(1);
        if self.udp.send_gso(&r.buf[start..end], segment, to).is_ok() {
            let c = &self.counters;
            c.relayed_packets
                .fetch_add((end - start).div_ceil(segment) as u64, Ordering::Relaxed);
            c.relayed_bytes
                .fetch_add((end - start) as u64, Ordering::Relaxed);
        }
    }

    fn write_tun(&self, writer: &mut T::Writer, bufs: &mut [Vec<u8>]) {
        if bufs.is_empty() {
            return;
        }
        match self.tun.send_batch(writer, bufs) {
            Ok(writes) => {
                let c = &self.counters;
                c.tun_packets
                    .fetch_add(bufs.len() as u64, Ordering::Relaxed);
                c.tun_writes.fetch_add(writes as u64, Ordering::Relaxed);
            }
            Err(e) => debug!(error = %e, "writing to the TUN device failed"),
        }
    }

    /// A relayed frame: for one of this node's peers through a relay it uses, or for this node
    /// to relay between two members it agreed to. Anything else is dropped and counted.
    fn relayed(
        &self,
        frame: &[u8],
        from: SocketAddr,
        to_tun: &mut Vec<u8>,
        out: &mut [u8],
    ) -> Relayed {
        let Some((session, inner)) = relay::parse(frame) else {
            return Relayed::Nothing;
        };
        let mine = self
            .table
            .read()
            .unwrap()
            .by_relay_session
            .get(&session)
            .cloned()
            .filter(|p| p.paths.lock().unwrap().relay_session(session, from));
        if let Some(peer) = mine {
            if classify(inner) != FrameKind::WireGuard {
                self.counters
                    .dropped_unknown_frame
                    .fetch_add(1, Ordering::Relaxed);
                return Relayed::Nothing;
            }
            return match self.inbound(inner, from, Via::Relay(session), Some(&peer), to_tun, out) {
                true => Relayed::Tun,
                false => Relayed::Nothing,
            };
        }
        let verdict =
            self.relay
                .lock()
                .unwrap()
                .forward(session, from, frame.len(), Instant::now());
        let c = &self.counters;
        match verdict {
            Ok(to) => return Relayed::Forward(to),
            Err(Refused::Unknown) => {
                c.dropped_relay_unknown.fetch_add(1, Ordering::Relaxed);
            }
            Err(Refused::Unbound) => {
                c.dropped_relay_unbound.fetch_add(1, Ordering::Relaxed);
            }
            Err(Refused::Rate) => {
                c.dropped_relay_rate.fetch_add(1, Ordering::Relaxed);
            }
        }
        Relayed::Nothing
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

    /// Handle one WireGuard datagram that arrived `via` (through a relay: it must be from
    /// `expect`, the peer that relay session is for). Returns true when it carried a packet for
    /// the TUN device, left in `to_tun` at `TUN_HEADROOM`.
    fn inbound(
        &self,
        datagram: &[u8],
        from: SocketAddr,
        via: Via,
        expect: Option<&Arc<Peer>>,
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
        let heard = match packet {
            Packet::HandshakeInit(_) => Heard::Initiation,
            Packet::HandshakeResponse(_) => Heard::HandshakeAnswer,
            _ => Heard::Data,
        };
        if matches!(packet, Packet::HandshakeInit(_)) {
            // Check MAC1 and the handshake rate before the costly part of finding the peer
            // (a Diffie-Hellman): under load, the sender must first prove its address.
            match self.limiter.verify_packet(Some(from.ip()), datagram, out) {
                Ok(_) => {}
                Err(TunnResult::WriteToNetwork(cookie)) => {
                    let cookie = cookie.to_vec();
                    let back = match (via, expect) {
                        (Via::Relay(_), Some(p)) => p.paths.lock().unwrap().route_back(via),
                        _ => Some(Route::Direct(from)),
                    };
                    if let Some(r) = back {
                        let _ = self.send_route(r, &cookie);
                    }
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
        if expect.is_some_and(|e| !Arc::ptr_eq(e, &peer)) {
            // A relay session carries one pair's datagrams only.
            self.counters
                .dropped_unknown_peer
                .fetch_add(1, Ordering::Relaxed);
            return false;
        }

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
                .paths
                .lock()
                .unwrap()
                .heard_from(via, from, heard, Instant::now())
        {
            info!(peer = %peer.name(), endpoint = %from, "peer endpoint changed");
        }
        match action {
            Action::Nothing => false,
            Action::Net(replies) => {
                // Answers go back the way the question came.
                let back = peer.paths.lock().unwrap().route_back(via);
                for r in replies {
                    match back {
                        Some(route) => {
                            if r.first() == Some(&2) {
                                peer.paths.lock().unwrap().answered(route, Instant::now());
                            }
                            if self.send_route(route, &r).is_ok() {
                                peer.counters.tx_packets.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        None => self.send_to_peer(&peer, &r),
                    }
                }
                // A handshake answered: what waited for the session goes now.
                if peer.counters.waiting.load(Ordering::Relaxed) > 0 {
                    self.release_waiting(&peer);
                }
                false
            }
            Action::Tun(len, src) => {
                // The first data on a session this node answered makes it current.
                if peer.counters.waiting.load(Ordering::Relaxed) > 0 {
                    self.release_waiting(&peer);
                }
                self.admit_packet(&peer, src, len, to_tun)
            }
        }
    }

    /// The end of a run of opened data messages: the tunnel counts them (current session,
    /// timers, bytes), the peer's paths hear from `from`, and what waited for the session goes.
    fn end_run(&self, run: Option<Opened>, from: SocketAddr) {
        let Some(o) = run.filter(|o| o.opened > 0) else {
            return;
        };
        let peer = &o.peer;
        // A session replaced meanwhile is not counted (its messages were opened already).
        peer.tunn.lock().unwrap().data_received(&o.session, o.bytes);
        let now = Instant::now();
        if peer
            .paths
            .lock()
            .unwrap()
            .heard_from(Via::Direct, from, Heard::Data, now)
        {
            info!(peer = %peer.name(), endpoint = %from, "peer endpoint changed");
        }
        if peer.counters.waiting.load(Ordering::Relaxed) > 0 {
            self.release_waiting(peer);
        }
    }

    /// A decrypted packet from `peer` (`len` bytes at `TUN_HEADROOM` in `to_tun`, from `src`):
    /// true if the admission policy lets it through to the TUN device, else dropped and counted.
    fn admit_packet(&self, peer: &Peer, src: IpAddr, len: usize, to_tun: &mut Vec<u8>) -> bool {
        let packet = &to_tun[TUN_HEADROOM..TUN_HEADROOM + len];
        let own = self.own_slot.load(Ordering::Relaxed);
        match admit(&self.range, peer.slot(), own, src, ipv4_dst(packet)) {
            Admission::Deliver => {
                peer.counters.rx_packets.fetch_add(1, Ordering::Relaxed);
                to_tun.truncate(TUN_HEADROOM + len);
                true
            }
            Admission::BadSource => {
                peer.counters
                    .dropped_bad_source
                    .fetch_add(1, Ordering::Relaxed);
                self.counters
                    .dropped_bad_source
                    .fetch_add(1, Ordering::Relaxed);
                debug!(peer = %peer.name(), %src, "dropped packet with a source outside the peer's subnet");
                false
            }
            Admission::BadDestination => {
                self.counters
                    .dropped_bad_destination
                    .fetch_add(1, Ordering::Relaxed);
                debug!(peer = %peer.name(), dst = ?ipv4_dst(packet), "dropped packet not addressed to this node's subnet");
                false
            }
        }
    }
}
