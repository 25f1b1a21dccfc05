//! Receive lanes: decryption and delivery spread over the cores. The receive thread reads the
//! socket; under load it hands whole reads (up to 64 KiB of one sender's datagrams, never single
//! packets) to the lane of the peer they are for, a thread of its own, and reads on while the
//! lane decrypts. Several peers' lanes run on several cores, and one busy peer's decryption runs
//! beside the next read. Every peer belongs to one lane, and a read for a lane that still has
//! work always joins its queue, so a peer's packets reach the TUN device in the order they
//! arrived. A read taken when the socket had nothing more (light traffic) is handled by the
//! receive thread itself: no hand-off, no added latency. Read buffers handed over are bounded
//! ([`MAX_SPARE`]); when none is left, the receive thread waits for the lane to finish and does
//! the work itself.

use super::MAX_PACKET;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// Read buffers (64 KiB each) that can be in lanes at once, beyond the receive thread's own.
const MAX_SPARE: usize = 16;
/// Lanes at most, whatever the core count (the receive thread keeps a bit per lane).
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
}

#[derive(Default)]
struct Queue {
    reads: VecDeque<Read>,
    /// The lane's thread is working on reads it took off the queue.
    busy: bool,
    stop: bool,
}

#[derive(Default)]
struct Lane {
    queue: Mutex<Queue>,
    /// Reads were queued (or the lane is to stop).
    work: Condvar,
    /// The lane finished everything it had.
    idle: Condvar,
}

pub(super) struct Lanes {
    lanes: Vec<Lane>,
    spare: Mutex<Spare>,
    /// How long a lane waits for work before [`Lanes::take`] returns empty-handed (so its
    /// thread can give back what it keeps only for heavy traffic).
    idle_check: Duration,
}

/// See [`Lanes::idle_check`].
const IDLE_CHECK: Duration = Duration::from_secs(10);

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
        Lanes::with_idle_check(n, IDLE_CHECK)
    }

    fn with_idle_check(n: usize, idle_check: Duration) -> Lanes {
        Lanes {
            lanes: (0..n).map(|_| Lane::default()).collect(),
            spare: Mutex::new(Spare::default()),
            idle_check,
        }
    }

    pub fn len(&self) -> usize {
        self.lanes.len()
    }

    /// Hand `read` to lane `l` if it should go there: when more reads are waiting (`more`) or
    /// the lane still has work for its peers (then it must, to keep their order). The read's
    /// buffer goes with it and a spare one takes its place. False: the caller handles it.
    pub fn hand_over(&self, l: usize, more: bool, read: &mut Read) -> bool {
        let lane = &self.lanes[l];
        let mut q = lane.queue.lock().unwrap();
        if q.stop || !(more || q.busy || !q.reads.is_empty()) {
            return false;
        }
        let Some(buf) = self.take_spare() else {
            // Out of buffers: let the lane finish, then the caller goes on in order.
            while (q.busy || !q.reads.is_empty()) && !q.stop {
                q = lane.idle.wait(q).unwrap();
            }
            return false;
        };
        let full = std::mem::replace(&mut read.buf, buf);
        q.reads.push_back(Read {
            buf: full,
            n: read.n,
            from: read.from,
            segment: read.segment,
        });
        lane.work.notify_one();
        true
    }

    fn take_spare(&self) -> Option<Vec<u8>> {
        let mut s = self.spare.lock().unwrap();
        if let Some(b) = s.bufs.pop() {
            return Some(b);
        }
        if s.made < MAX_SPARE {
            s.made += 1;
            return Some(vec![0u8; MAX_PACKET]);
        }
        None
    }

    /// Lane `l`'s thread: wait for reads, take all that are queued into `work`. None: stop.
    pub fn take(&self, l: usize, work: &mut Vec<Read>) -> Option<()> {
        let lane = &self.lanes[l];
        let mut q = lane.queue.lock().unwrap();
        let mut waited = false;
        loop {
            if q.stop {
                q.busy = false;
                lane.idle.notify_all();
                return None;
            }
            if !q.reads.is_empty() {
                q.busy = true;
                work.extend(q.reads.drain(..));
                return Some(());
            }
            if waited {
                // Nothing for `idle_check`: back empty-handed, for the thread's idle work.
                return Some(());
            }
            q.busy = false;
            lane.idle.notify_all();
            let timeout;
            (q, timeout) = lane.work.wait_timeout(q, self.idle_check).unwrap();
            waited = timeout.timed_out();
        }
    }

    /// Give the buffers of handled reads back.
    pub fn done(&self, work: &mut Vec<Read>) {
        let mut s = self.spare.lock().unwrap();
        s.bufs.extend(work.drain(..).map(|r| r.buf));
    }

    /// Stop every lane (their threads return from [`Lanes::take`]).
    pub fn stop(&self) {
        for lane in &self.lanes {
            lane.queue.lock().unwrap().stop = true;
            lane.work.notify_all();
            lane.idle.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn read(tag: u8) -> Read {
        let mut r = Read::new();
        r.buf[0] = tag;
        r.n = 1;
        r
    }

    #[test]
    fn a_lone_read_stays_with_the_caller_and_a_busy_lane_keeps_order() {
        let lanes = Lanes::new(1);
        let mut r = read(1);
        assert!(
            !lanes.hand_over(0, false, &mut r),
            "nothing more waiting: inline"
        );
        assert!(
            lanes.hand_over(0, true, &mut r),
            "more waiting: handed over"
        );
        assert_eq!(r.buf[0], 0, "a fresh buffer took its place");
        // The lane has work now: even a lone read must queue behind it.
        let mut r2 = read(2);
        assert!(lanes.hand_over(0, false, &mut r2));
        let mut work = Vec::new();
        lanes.take(0, &mut work).unwrap();
        assert_eq!(work.iter().map(|r| r.buf[0]).collect::<Vec<_>>(), [1, 2]);
        lanes.done(&mut work);
        assert!(work.is_empty());
    }

    #[test]
    fn an_idle_lane_comes_back_empty_handed_then_takes_work_again() {
        let lanes = Lanes::with_idle_check(1, Duration::from_millis(20));
        let mut work = Vec::new();
        lanes.take(0, &mut work).unwrap();
        assert!(work.is_empty(), "nothing queued: back after the idle check");
        assert!(lanes.hand_over(0, true, &mut read(7)));
        lanes.take(0, &mut work).unwrap();
        assert_eq!(work.iter().map(|r| r.buf[0]).collect::<Vec<_>>(), [7]);
        lanes.done(&mut work);
        lanes.stop();
        assert!(lanes.take(0, &mut work).is_none(), "stopped");
    }

    #[test]
    fn out_of_buffers_the_caller_waits_for_the_lane_then_goes_on() {
        let lanes = Arc::new(Lanes::new(1));
        for i in 0..MAX_SPARE {
            assert!(lanes.hand_over(0, true, &mut read(i as u8)));
        }
        let worker = {
            let lanes = lanes.clone();
            std::thread::spawn(move || {
                let mut work = Vec::new();
                let mut seen = 0;
                while lanes.take(0, &mut work).is_some() {
                    seen += work.len();
                    lanes.done(&mut work);
                }
                seen
            })
        };
        // No spare buffer is left until the lane gives some back; either way the call returns
        // only when the read can be handled in order.
        let mut r = read(99);
        if !lanes.hand_over(0, true, &mut r) {
            let q = lanes.lanes[0].queue.lock().unwrap();
            assert!(
                q.reads.is_empty() && !q.busy,
                "inline only once the lane is done"
            );
        }
        lanes.stop();
        let seen = worker.join().unwrap();
        assert!(seen >= MAX_SPARE, "{seen}");
    }

    #[test]
    fn stopped_lanes_take_nothing_more() {
        let lanes = Lanes::new(2);
        lanes.stop();
        assert!(!lanes.hand_over(1, true, &mut read(1)));
        assert!(lanes.take(1, &mut Vec::new()).is_none());
    }
}
