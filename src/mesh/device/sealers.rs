//! Seal lanes: threads that encrypt whole TUN reads when the kernel has several ready at once
//! (wireguard-go's encryption workers, by read). The thread draining the TUN device takes the
//! counters of every message in order under each tunnel's lock ([`super::send`]: planning),
//! hands all but the last read to the lanes, seals the last itself, waits for the others and
//! sends every read in the order it was read. So one busy peer is encrypted on several cores,
//! no counter is used twice (each read owns its counters by value), and messages leave in
//! order. A lone read is sealed inline: nothing waits on a hand-off when traffic is light.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// Lanes at most, whatever the machine or `MESHD_TX_LANES` says.
const MAX_LANES: usize = 16;
/// How often the thread waiting for handed reads looks whether a lane died.
const LOST_CHECK: Duration = Duration::from_millis(100);

/// Work a lane can do: a planned read.
pub(super) trait Sealable: Send {
    /// Encrypt it.
    fn seal(&mut self);
    /// Forget it: nothing of it may be sent.
    fn clear(&mut self);
}

pub(super) struct Sealers<W> {
    threads: usize,
    state: Mutex<State<W>>,
    /// Reads were handed (or the lanes are to stop).
    work: Condvar,
    /// A handed read was sealed (or a lane died).
    sealed: Condvar,
}

struct State<W> {
    /// Handed reads not yet taken, by their place in the drain.
    queue: VecDeque<(usize, W)>,
    /// Sealed reads not yet taken back.
    done: Vec<(usize, W)>,
    /// Lanes running now: reads are handed only while one is.
    running: usize,
    stopped: bool,
    /// A lane ended in a panic: what it held is lost, and nobody waits for it.
    lost: bool,
}

impl<W: Sealable> Sealers<W> {
    /// One lane per core beyond two (the TUN thread's and the receive thread's), unless
    /// `MESHD_TX_LANES` says how many; as with receive lanes, none on two cores by default.
    pub fn for_this_machine() -> Sealers<W> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let n = std::env::var("MESHD_TX_LANES")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(cores.saturating_sub(2));
        Sealers::new(n)
    }

    pub fn new(n: usize) -> Sealers<W> {
        Sealers {
            threads: n.min(MAX_LANES),
            state: Mutex::new(State {
                queue: VecDeque::new(),
                done: Vec::new(),
                running: 0,
                stopped: false,
                lost: false,
            }),
            work: Condvar::new(),
            sealed: Condvar::new(),
        }
    }

    /// Lane threads to start.
    pub fn len(&self) -> usize {
        self.threads
    }

    /// Reads worth reading ahead now: one more than the lanes that can take them.
    pub fn reads_at_once(&self) -> usize {
        if self.threads == 0 {
            return 1;
        }
        let s = self.state.lock().unwrap();
        if s.stopped || s.lost {
            1
        } else {
            1 + s.running.min(self.threads)
        }
    }

    /// Hand `reads` (with their places) to the lanes. False, and nothing taken: no lane runs,
    /// or they are stopping; the caller seals them itself.
    pub fn hand(&self, reads: &mut Vec<(usize, W)>) -> bool {
        let mut s = self.state.lock().unwrap();
        if s.stopped || s.lost || s.running == 0 {
            return false;
        }
        s.queue.extend(reads.drain(..));
        drop(s);
        self.work.notify_all();
        true
    }

    /// Wait until `count` handed reads are sealed and take them back, in any order. Reads a
    /// dead lane held are lost (their packets with them): the data plane is going down.
    pub fn take_back(&self, count: usize, into: &mut Vec<(usize, W)>) {
        let mut s = self.state.lock().unwrap();
        loop {
            if s.done.len() >= count {
                into.append(&mut s.done);
                return;
            }
            if s.lost {
                into.append(&mut s.done);
                // Not sealed: handed back so their buffers are kept, sent by nobody.
                for (i, mut r) in s.queue.drain(..) {
                    r.clear();
                    into.push((i, r));
                }
                return;
            }
            s = self.sealed.wait_timeout(s, LOST_CHECK).unwrap().0;
        }
    }

    /// A lane's thread: seal handed reads until the lanes stop and none is left.
    pub fn lane(&self) {
        self.state.lock().unwrap().running += 1;
        // Dropped after `s` (declared before it): counts this lane out however it ends.
        let _gone = Gone(self);
        let mut s = self.state.lock().unwrap();
        loop {
            let Some((i, mut read)) = s.queue.pop_front() else {
                if s.stopped {
                    return;
                }
                s = self.work.wait(s).unwrap();
                continue;
            };
            drop(s);
            read.seal();
            s = self.state.lock().unwrap();
            s.done.push((i, read));
            self.sealed.notify_all();
        }
    }

    /// Stop the lanes once what was handed is sealed.
    pub fn stop(&self) {
        self.state.lock().unwrap().stopped = true;
        self.work.notify_all();
    }
}

/// A lane thread ending: counted out; if by a panic, nobody waits for what it held.
struct Gone<'a, W: Sealable>(&'a Sealers<W>);

impl<W: Sealable> Drop for Gone<'_, W> {
    fn drop(&mut self) {
        let mut s = match self.0.state.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        s.running -= 1;
        if std::thread::panicking() {
            s.lost = true;
        }
        drop(s);
        self.0.sealed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread::ThreadId;
    use std::time::Instant;

    #[derive(Debug)]
    struct Work {
        sealed_on: Option<ThreadId>,
        cleared: bool,
        panics: bool,
    }

    fn work(panics: bool) -> Work {
        Work {
            sealed_on: None,
            cleared: false,
            panics,
        }
    }

    impl Sealable for Work {
        fn seal(&mut self) {
            assert!(!self.panics, "a lane dies");
            self.sealed_on = Some(std::thread::current().id());
        }
        fn clear(&mut self) {
            self.cleared = true;
        }
    }

    fn until(what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "timed out: {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn handed_reads_come_back_sealed_by_the_lanes() {
        let sealers = Sealers::<Work>::new(2);
        assert_eq!(sealers.reads_at_once(), 1, "no lane runs yet");
        std::thread::scope(|s| {
            let lanes: Vec<_> = (0..2).map(|_| s.spawn(|| sealers.lane())).collect();
            until("both lanes run", || sealers.reads_at_once() == 3);
            let mut handed: Vec<(usize, Work)> = (0..5).map(|i| (i, work(false))).collect();
            assert!(sealers.hand(&mut handed));
            assert!(handed.is_empty(), "taken");
            sealers.take_back(5, &mut handed);
            handed.sort_by_key(|h| h.0);
            assert_eq!(
                handed.iter().map(|h| h.0).collect::<Vec<_>>(),
                [0, 1, 2, 3, 4]
            );
            let me = std::thread::current().id();
            for (_, w) in &handed {
                assert!(w.sealed_on.is_some_and(|t| t != me), "sealed on a lane");
            }
            sealers.stop();
            for l in lanes {
                l.join().expect("a lane returns once stopped");
            }
        });
        assert_eq!(sealers.reads_at_once(), 1);
        let mut more = vec![(0, work(false))];
        assert!(!sealers.hand(&mut more), "stopped: sealed by the caller");
        assert_eq!(more.len(), 1, "and left with it");
    }

    #[test]
    fn what_a_dead_lane_held_is_not_waited_for_and_the_rest_comes_back_cleared() {
        let sealers = Sealers::<Work>::new(1);
        std::thread::scope(|s| {
            let lane = s.spawn(|| sealers.lane());
            until("the lane runs", || sealers.reads_at_once() == 2);
            // The lane takes the first and dies on it; the second is never taken.
            let mut handed = vec![(0, work(true)), (1, work(false))];
            assert!(sealers.hand(&mut handed));
            sealers.take_back(2, &mut handed);
            assert!(lane.join().is_err(), "the lane panicked");
            assert_eq!(handed.len(), 1, "the dead lane's read is lost");
            let (i, w) = &handed[0];
            assert_eq!(*i, 1);
            assert!(
                w.cleared && w.sealed_on.is_none(),
                "not sealed, so never sent"
            );
        });
        assert_eq!(sealers.reads_at_once(), 1, "nothing is handed any more");
        let mut more = vec![(0, work(false))];
        assert!(!sealers.hand(&mut more));
    }
}
