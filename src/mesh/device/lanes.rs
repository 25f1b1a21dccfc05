//! Receive lanes: decryption spread over the cores, in order per peer (wireguard-go's scheme).
//! The receive thread reads the socket; under load it hands whole reads (up to 64 KiB of one
//! sender's datagrams, never single packets) to the lanes, threads of their own, and reads on.
//! Any lane takes the next read and decrypts its data messages at once, so one busy peer's reads
//! are decrypted on several cores side by side (its sessions are shared:
//! `boringtun::noise::Session::decrypt`). Each read handed over gets the next ticket of its
//! peer ([`Order`]); in its turn, when the peer's earlier tickets are done, the lane does what
//! decides (the replay window marks the counters, admission, roaming, the tunnel's timers) and
//! writes to the TUN device. So a peer's packets are judged and reach the kernel in the order
//! they arrived (of two copies of a message, the first to arrive wins), while different peers'
//! turns go on side by side. A read for a peer with reads still in the lanes always takes a
//! ticket too; a read holding several peers' datagrams waits until none of them has any there.
//! A read taken when the socket had nothing more and its peer has nothing in the lanes (light
//! traffic) is handled by the receive thread itself: no hand-off, no added latency. Read
//! buffers handed over are bounded ([`MAX_SPARE`]); when none is left, the receive thread waits
//! for a lane to give one back.

use super::MAX_PACKET;
use crate::mesh::peer::Peer;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// Read buffers (64 KiB each) that can be in lanes at once, beyond the receive thread's own.
const MAX_SPARE: usize = 16;
/// Lanes at most, whatever the core count.
const MAX_LANES: usize = 8;

/// One read from the UDP socket: `n` bytes of datagrams from `from`, each `segment` bytes (the
/// last may be shorter).
pub(super) struct Read {
    pub buf: Vec<u8>,
    pub n: usize,
    pub from: SocketAddr,
    pub segment: usize,
}

impl Read {
    pub fn new() -> Read {
        Read {
            buf: vec![0u8; MAX_PACKET],
            n: 0,
            from: SocketAddr::from(([0, 0, 0, 0], 0)),
            segment: 0,
        }
    }

    /// The datagrams in this read.
    pub fn datagrams(&self) -> std::slice::Chunks<'_, u8> {
        self.buf[..self.n].chunks(self.segment.max(1))
    }

    /// How many datagrams this read holds.
    pub fn count(&self) -> usize {
        self.n.div_ceil(self.segment.max(1))
    }
}

/// A read handed to the lanes: for `peer`, written to the TUN device in `ticket` order.
pub(super) struct Handed {
    pub read: Read,
    pub peer: Arc<Peer>,
    pub ticket: u64,
}

/// A peer's reads in the lanes: tickets are given in arrival order (by the receive thread
/// alone) and written in that order (by whichever lane decrypted each).
#[derive(Default)]
pub(crate) struct Order {
    turns: Mutex<Turns>,
    /// A ticket was written.
    next: Condvar,
}

#[derive(Default)]
struct Turns {
    /// Tickets given so far.
    given: u64,
    /// Tickets written so far: the one written next is `written`.
    written: u64,
}

impl Order {
    /// Reads of this peer are in the lanes, not yet written.
    fn pending(&self) -> bool {
        let t = self.turns.lock().unwrap();
        t.given > t.written
    }
}

pub(super) struct Lanes {
    threads: usize,
    stopped: AtomicBool,
    queue: Mutex<VecDeque<Handed>>,
    /// Reads were queued (or the lanes are to stop).
    work: Condvar,
    spare: Mutex<Spare>,
    /// A buffer came back (or the lanes are to stop).
    returned: Condvar,
}

/// How often a lane waiting for its turn, or the receive thread waiting for a buffer, looks
/// whether the lanes are stopping (the wait itself ends when the work ahead is done).
const STOP_CHECK: Duration = Duration::from_millis(100);

#[derive(Default)]
struct Spare {
    bufs: Vec<Vec<u8>>,
    /// Buffers made so far (in lanes or spare).
    made: usize,
}

impl Lanes {
    /// One lane per core beyond two (the receive thread's and the TUN thread's), unless
    /// `MESHD_RX_LANES` says how many. On two cores a hand-off costs more than it gains
    /// (benches/fanin.sh), so there are none there by default.
    pub fn for_this_machine() -> Lanes {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let n = std::env::var("MESHD_RX_LANES")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(cores.saturating_sub(2));
        Lanes::new(n.min(MAX_LANES))
    }

    pub fn new(n: usize) -> Lanes {
        Lanes {
            threads: n,
            stopped: AtomicBool::new(false),
            queue: Mutex::new(VecDeque::new()),
            work: Condvar::new(),
            spare: Mutex::new(Spare::default()),
            returned: Condvar::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.threads
    }

    /// Hand `read` for `peer` to the lanes if it should go there: when more reads are waiting
    /// (`more`) or the peer still has reads in the lanes (then it must, to keep their order).
    /// The read's buffer goes with it and a spare one takes its place. False: the caller
    /// handles it. Called by the receive thread only (it gives the tickets).
    pub fn hand_over(&self, peer: &Arc<Peer>, more: bool, read: &mut Read) -> bool {
        if self.threads == 0 || !(more || peer.order.pending()) {
            return false;
        }
        let Some(buf) = self.take_spare() else {
            // Stopping: order no longer matters.
            return false;
        };
        let full = std::mem::replace(&mut read.buf, buf);
        let ticket = {
            let mut t = peer.order.turns.lock().unwrap();
            t.given += 1;
            t.given - 1
        };
        let mut q = self.queue.lock().unwrap();
        q.push_back(Handed {
            read: Read {
                buf: full,
                n: read.n,
                from: read.from,
                segment: read.segment,
            },
            peer: peer.clone(),
            ticket,
        });
        self.work.notify_one();
        true
    }

    /// A spare buffer; when all are out, wait for a lane to give one back. None: stopping.
    fn take_spare(&self) -> Option<Vec<u8>> {
        let mut s = self.spare.lock().unwrap();
        loop {
            if self.stopping() {
                return None;
            }
            if let Some(b) = s.bufs.pop() {
                return Some(b);
            }
            if s.made < MAX_SPARE {
                s.made += 1;
                return Some(vec![0u8; MAX_PACKET]);
            }
            // Every buffer is in a lane, whose work never waits on this thread: one comes back.
            s = self.returned.wait_timeout(s, STOP_CHECK).unwrap().0;
        }
    }

    /// A lane's thread: wait for the next read, and take the reads right behind it too while
    /// they are the same peer's (its next tickets) and all of them hold at most `max_datagrams`:
    /// fewer turns to pass between lanes, larger batches for the TUN device. None: stop.
    pub fn take(&self, work: &mut Vec<Handed>, max_datagrams: usize) -> Option<()> {
        let mut q = self.queue.lock().unwrap();
        loop {
            if self.stopping() {
                return None;
            }
            if let Some(h) = q.pop_front() {
                let mut datagrams = h.read.count();
                while let Some(next) = q.front() {
                    datagrams += next.read.count();
                    if !Arc::ptr_eq(&next.peer, &h.peer) || datagrams > max_datagrams {
                        break;
                    }
                    work.extend(q.pop_front());
                }
                work.insert(0, h);
                return Some(());
            }
            // `stop` wakes this wait (it takes the queue's lock first).
            q = self.work.wait(q).unwrap();
        }
    }

    /// Wait until `h` is its peer's next ticket to write (the earlier ones are being written
    /// by other lanes, which never wait on this one), or the lanes stop.
    pub fn wait_turn(&self, h: &Handed) {
        self.wait_for(&h.peer.order, |t| t.written == h.ticket);
    }

    /// Wait until `peer` has no read in the lanes (or the lanes stop): its next read may then
    /// be handled by the caller without overtaking any.
    pub fn wait_idle(&self, peer: &Peer) {
        self.wait_for(&peer.order, |t| t.given == t.written);
    }

    /// Wait until `done` holds for the peer's tickets (tickets are only ever written, so it
    /// comes as the work ahead ends), or the lanes stop.
    fn wait_for(&self, order: &Order, done: impl Fn(&Turns) -> bool) {
        let mut t = order.turns.lock().unwrap();
        while !done(&t) && !self.stopping() {
            t = order.next.wait_timeout(t, STOP_CHECK).unwrap().0;
        }
    }

    /// `h` was written (or dropped): the peer's next ticket may go, and its buffer comes back.
    pub fn done(&self, h: Handed) {
        {
            let mut t = h.peer.order.turns.lock().unwrap();
            t.written = t.written.max(h.ticket + 1);
            h.peer.order.next.notify_all();
        }
        self.spare.lock().unwrap().bufs.push(h.read.buf);
        self.returned.notify_one();
    }

    fn stopping(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }

    /// Stop every lane (their threads return from [`Lanes::take`]).
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        // Each lock taken before the wake-up: a thread that saw the flag unset is waiting by
        // then, and is woken.
        drop(self.queue.lock().unwrap());
        self.work.notify_all();
        drop(self.spare.lock().unwrap());
        self.returned.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::PeerSpec;
    use crate::trust::NodeId;
    use boringtun::noise::Tunn;
    use boringtun::x25519::{PublicKey, StaticSecret};
    use std::sync::mpsc;

    fn peer() -> Arc<Peer> {
        let secret = StaticSecret::random_from_rng(rand_core::OsRng);
        let theirs = PublicKey::from(&StaticSecret::random_from_rng(rand_core::OsRng));
        let spec = PeerSpec {
            node_id: NodeId([7; 8]),
            name: "p".into(),
            wg: theirs.to_bytes(),
            slot: 2,
            endpoints: Vec::new(),
        };
        let tunn = Tunn::new(secret, theirs, None, None, 1 << 8, None);
        Arc::new(Peer::new(&spec, 1, tunn))
    }

    fn read(tag: u8) -> Read {
        let mut r = Read::new();
        r.buf[0] = tag;
        r.n = 1;
        r
    }

    /// One read from the lanes (room for one datagram: never the next one with it).
    fn take(lanes: &Lanes) -> Handed {
        let mut work = Vec::new();
        lanes.take(&mut work, 1).expect("running");
        assert_eq!(work.len(), 1);
        work.pop().unwrap()
    }

    #[test]
    fn a_lone_read_stays_with_the_caller_and_a_peer_in_the_lanes_keeps_its_order() {
        let lanes = Lanes::new(1);
        let p = peer();
        let mut r = read(1);
        assert!(
            !lanes.hand_over(&p, false, &mut r),
            "nothing more waiting: inline"
        );
        assert!(
            lanes.hand_over(&p, true, &mut r),
            "more waiting: handed over"
        );
        assert_eq!(r.buf[0], 0, "a fresh buffer took its place");
        // The peer has a read in the lanes: even a lone read must follow it there.
        assert!(lanes.hand_over(&p, false, &mut read(2)));
        // Another peer with nothing in the lanes is not held up.
        assert!(!lanes.hand_over(&peer(), false, &mut read(3)));
        let (a, b) = (take(&lanes), take(&lanes));
        assert_eq!(
            (a.read.buf[0], a.ticket, b.read.buf[0], b.ticket),
            (1, 0, 2, 1)
        );
        lanes.wait_turn(&a);
        lanes.done(a);
        lanes.wait_turn(&b);
        lanes.done(b);
        assert!(
            !lanes.hand_over(&p, false, &mut read(4)),
            "all written: inline again"
        );
    }

    #[test]
    fn a_later_read_waits_for_its_peers_earlier_one_to_be_written() {
        let lanes = Arc::new(Lanes::new(2));
        let p = peer();
        for tag in [1, 2] {
            assert!(lanes.hand_over(&p, true, &mut read(tag)));
        }
        let (first, second) = (take(&lanes), take(&lanes));
        let (tx, rx) = mpsc::channel();
        let waiter = {
            let lanes = lanes.clone();
            std::thread::spawn(move || {
                lanes.wait_turn(&second);
                tx.send(()).unwrap();
                lanes.done(second);
            })
        };
        // Decrypted first, the second read still may not be written before the first.
        assert!(
            rx.recv_timeout(Duration::from_millis(200)).is_err(),
            "the second read's turn came before the first was written"
        );
        lanes.wait_turn(&first);
        lanes.done(first);
        rx.recv_timeout(Duration::from_secs(10))
            .expect("the second read's turn after the first");
        waiter.join().unwrap();
        assert!(!p.order.pending());
    }

    #[test]
    fn a_lane_takes_the_same_peers_next_reads_with_the_first_within_the_bound() {
        let lanes = Lanes::new(2);
        let (p, q) = (peer(), peer());
        for (who, tag) in [(&p, 1), (&p, 2), (&p, 3), (&q, 4), (&p, 5)] {
            assert!(lanes.hand_over(who, true, &mut read(tag)));
        }
        let mut work = Vec::new();
        // Room for two datagrams: the first read and the next of the same peer.
        lanes.take(&mut work, 2).unwrap();
        let got: Vec<(u8, u64)> = work.iter().map(|h| (h.read.buf[0], h.ticket)).collect();
        assert_eq!(got, [(1, 0), (2, 1)]);
        for h in work.drain(..) {
            lanes.wait_turn(&h);
            lanes.done(h);
        }
        // Another peer's read ends the run, whatever the room.
        lanes.take(&mut work, 64).unwrap();
        let got: Vec<u8> = work.iter().map(|h| h.read.buf[0]).collect();
        assert_eq!(got, [3]);
        for h in work.drain(..) {
            lanes.done(h);
        }
        lanes.take(&mut work, 64).unwrap();
        assert_eq!(work[0].read.buf[0], 4);
    }

    #[test]
    fn out_of_buffers_the_receive_thread_waits_for_one_to_come_back() {
        let lanes = Arc::new(Lanes::new(1));
        let p = peer();
        for i in 0..MAX_SPARE {
            assert!(lanes.hand_over(&p, true, &mut read(i as u8)));
        }
        // Every buffer is out: the next hand-over waits until a lane gives one back.
        let (tx, rx) = mpsc::channel();
        let receiver = {
            let (lanes, p) = (lanes.clone(), p.clone());
            std::thread::spawn(move || {
                let handed = lanes.hand_over(&p, true, &mut read(99));
                tx.send(()).unwrap();
                handed
            })
        };
        assert!(
            rx.recv_timeout(Duration::from_millis(200)).is_err(),
            "handed over with no buffer to spare"
        );
        let first = take(&lanes);
        lanes.wait_turn(&first);
        lanes.done(first);
        rx.recv_timeout(Duration::from_secs(10))
            .expect("the hand-over went on once a buffer came back");
        assert!(receiver.join().unwrap(), "and the read was handed over");
        let mut tickets = Vec::new();
        while tickets.len() < MAX_SPARE {
            let h = take(&lanes);
            tickets.push(h.ticket);
            lanes.wait_turn(&h);
            lanes.done(h);
        }
        assert_eq!(
            tickets,
            (1..=MAX_SPARE as u64).collect::<Vec<_>>(),
            "every read, in order"
        );
    }

    #[test]
    fn stopped_lanes_take_nothing_more_and_no_one_waits() {
        let lanes = Lanes::new(2);
        let p = peer();
        assert!(lanes.hand_over(&p, true, &mut read(1)));
        assert!(lanes.hand_over(&p, true, &mut read(2)));
        let _first = take(&lanes);
        let second = take(&lanes);
        lanes.stop();
        lanes.wait_turn(&second);
        assert!(!lanes.hand_over(&p, true, &mut read(3)));
        assert!(lanes.take(&mut Vec::new(), 64).is_none());
    }
}
