//! Receiving: datagrams on the mesh port are demultiplexed (WireGuard or control frame),
//! handshakes are matched to peers (rate-limited before any Diffie-Hellman), data is decrypted,
//! checked by the admission policy and handed to the TUN device in batches: by the receive thread,
//! or under load by the lane of the peer ([`super::lanes`]).

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
use boringtun::noise::{Packet, Tunn, TunnResult};
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

/// What a thread that delivers to the TUN device keeps between batches.
struct Deliver<W> {
    to_tun: Vec<Vec<u8>>,
    out: Vec<u8>,
    writer: W,
}

impl<W> Deliver<W> {
    fn new(writer: W) -> Deliver<W> {
        Deliver {
            to_tun: (0..TUN_BATCH)
                .map(|_| Vec::with_capacity(TUN_PACKET_BUF))
                .collect(),
            out: vec![0u8; REPLY_BUF],
            writer,
        }
    }
}

impl<T: TunIo, U: UdpIo> Device<T, U> {
    /// The receive thread: wait for datagrams, then take what has arrived a batch of reads at a
    /// time. Under load, reads for a peer go to its lane ([`super::lanes`]); the rest are
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
                // A full batch: more is waiting, so lanes take their peers' reads.
                let more = k == UDP_BATCH;
                here.clear();
                // A lane with a read kept here this round keeps the rest of its reads here too:
                // they are handled after it, in order.
                let mut kept = 0u64;
                for (i, r) in reads[..k].iter_mut().enumerate() {
                    match self.lane_of(r) {
                        Some(l) if kept & (1 << l) == 0 && self.lanes.hand_over(l, more, r) => {
                            self.counters.lane_reads.fetch_add(1, Ordering::Relaxed);
                        }
                        Some(l) => {
                            kept |= 1 << l;
                            here.push(i);
                        }
                        None => here.push(i),
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

    /// Lane `l`'s thread: decrypt and deliver the reads handed to it, in order.
    pub(super) fn lane_thread(&self, l: usize) {
        let mut work = Vec::new();
        let mut dl = Deliver::new(self.tun.writer());
        while self.lanes.take(l, &mut work).is_some() {
            if work.is_empty() {
                // Idle a while: an empty batch lets the writer give back what it keeps only
                // for heavy traffic (the TUN coalescing table).
                let _ = self.tun.send_batch(&mut dl.writer, &mut []);
                continue;
            }
            self.deliver(work.iter(), &mut dl);
            self.answer_inline();
            self.lanes.done(&mut work);
        }
    }

    /// The lane of the peer a read of data messages is for (data only: handshakes, relayed
    /// and control frames are few and handled by the receive thread).
    fn lane_of(&self, r: &Read) -> Option<usize> {
        if self.lanes.len() == 0 || r.n < 16 || r.buf[..4] != [4, 0, 0, 0] {
            return None;
        }
        let index = u32::from_le_bytes([r.buf[4], r.buf[5], r.buf[6], r.buf[7]]) >> 8;
        let t = self.table.read().unwrap();
        t.by_index.get(&index).map(|p| p.lane % self.lanes.len())
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
    /// forwarded or opened, control frames passed to the node.
    fn deliver<'r>(&self, reads: impl Iterator<Item = &'r Read>, dl: &mut Deliver<T::Writer>) {
        let Deliver {
            to_tun,
            out,
            writer,
        } = dl;
        let mut ready = 0;
        for r in reads {
            let from = r.from;
            let segment = r.segment.max(1);
            // Frames this node relays, as a byte range of the read and where they go: a run of
            // them leaves in one system call (UDP GSO), as they came (UDP GRO).
            let mut run: Option<(usize, usize, SocketAddr)> = None;
            // With GRO one read may hold several datagrams of `segment` bytes.
            for (k, d) in r.datagrams().enumerate() {
                if ready == to_tun.len() {
                    self.write_tun(writer, &mut to_tun[..ready]);
                    ready = 0;
                }
                let kind = classify(d);
                if kind != FrameKind::Relay {
                    self.forward_run(r, run.take());
                }
                match kind {
                    FrameKind::WireGuard => {
                        if self.inbound(d, from, Via::Direct, None, &mut to_tun[ready], out) {
                            ready += 1;
                        }
                    }
                    FrameKind::Relay => match self.relayed(d, from, &mut to_tun[ready], out) {
                        Relayed::Forward(to) => {
                            let at = k * segment;
                            match &mut run {
                                Some((_, end, t)) if *t == to && *end == at => *end += d.len(),
                                _ => {
                                    self.forward_run(r, run.take());
                                    run = Some((at, at + d.len(), to));
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
            self.forward_run(r, run);
        }
        self.write_tun(writer, &mut to_tun[..ready]);
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
        if let Err(e) = self.tun.send_batch(writer, bufs) {
            debug!(error = %e, "writing to the TUN device failed");
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
    }
}
