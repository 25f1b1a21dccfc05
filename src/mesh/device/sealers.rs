//! Seal lanes: threads that encrypt and send whole TUN reads when the kernel has several ready
//! at once (wireguard-go's encryption workers and sequencer, by read). The thread draining the
//! TUN device plans each read in order ([`super::send`]: each run of one peer's packets takes
//! its counters at once under the tunnel's lock). When the next read is ready behind it, the
//! planned one goes to a lane with a ticket, and the drainer reads on; a lane seals its read,
//! waits for the read's turn and sends it. A read with nothing ready behind it is sealed by the
//! drainer itself and sent in its turn, so a lone packet never waits on a hand-off; so is a read
//! while every lane is busy (the drainer seals beside them). Messages
//! leave in the order they were read, no counter is used twice (each read owns its counters by
//! value), and one busy peer is encrypted on several cores.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// Lanes at most, whatever the machine or `MESHD_TX_LANES` says. A peer's counters taken but
/// not yet sent span at most the reads on their way (one per lane, the drainer's, and the one
/// read ahead), 128 packets each; a message sent meanwhile outside the reads (a keepalive from
/// the timers, packets that waited for the session) carries a later counter and may arrive
/// first. The receiver's replay window keeps 1,024 counters behind the newest it saw, so
/// (4 + 2) x 128 = 768 stays inside it.
const MAX_LANES: usize = 4;
/// How often a thread waiting for a turn or a spare read looks whether a lane died.
const LOST_CHECK: Duration = Duration::from_millis(100);

/// Work a lane can do: a planned read.
pub(super) trait Sealable: Send {
    /// Encrypt it.
    fn seal(&mut self);
    /// Forget it once sent (or lost): nothing of it is sent again.
    fn clear(&mut self);
}

pub(super) struct Sealers<W> {
    threads: usize,
    state: Mutex<State<W>>,
    /// Reads were handed (or the lanes are to stop).
    work: Condvar,
    /// A read was sent, so the next turn and a spare read may be there (or a lane died).
    sent: Condvar,
}

struct State<W> {
    /// Handed reads not yet taken, with their tickets.
    queue: VecDeque<(u64, W)>,
    /// Reads sent and cleared, for the drainer to read into again.
    spare: Vec<W>,
    /// Reads made so far (at most [`Sealers::max_reads`]).
    made: usize,
    /// Tickets given so far; the read sent next is ticket `turn`.
    given: u64,
    turn: u64,
    /// Lanes running now: reads are handed only while one is.
    running: usize,
    /// Lanes waiting for work.
    idle: usize,
    stopped: bool,
    /// A lane ended in a panic: what it held is lost; order is no longer waited for. (The
    /// thread's end also stops the data plane: this only keeps the others from hanging.)
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
                spare: Vec::new(),
                made: 0,
                given: 0,
                turn: 0,
                running: 0,
                idle: 0,
                stopped: false,
                lost: false,
            }),
            work: Condvar::new(),
            sent: Condvar::new(),
        }
    }

    /// Lane threads to start.
    pub fn len(&self) -> usize {
        self.threads
    }

    /// Reads made at most (beyond the drainer's own): reads go only to an idle lane, so each
    /// lane holds one at a time, and the drainer reads ahead into one more.
    fn max_reads(&self) -> usize {
        self.threads + 1
    }

    /// A lane could take a read now.
    pub fn open(&self) -> bool {
        if self.threads == 0 {
            return false;
        }
        let s = self.state.lock().unwrap();
        !s.stopped && !s.lost && s.running > 0
    }

    /// A read to read into: one a lane sent, or a new one while fewer than
    /// [`Sealers::max_reads`] exist; else wait until a lane sends one.
    pub fn spare(&self, make: impl FnOnce() -> W) -> W {
        let mut s = self.state.lock().unwrap();
        loop {
            if let Some(w) = s.spare.pop() {
                return w;
            }
            if s.made < self.max_reads() || s.lost || s.stopped {
                s.made += 1;
                drop(s);
                return make();
            }
            s = self.sent.wait_timeout(s, LOST_CHECK).unwrap().0;
        }
    }

    /// Give back a read that was not handed after all.
    pub fn unused(&self, w: W) {
        self.state.lock().unwrap().spare.push(w);
    }

    /// Hand a planned read to an idle lane, with the next ticket. `Err`, with the read: every
    /// lane is busy (or they are stopping); the caller seals it and sends it with
    /// [`Sealers::in_turn`], so it works beside the lanes instead of waiting for them.
    pub fn hand(&self, w: W) -> Result<(), W> {
        let mut s = self.state.lock().unwrap();
        if s.stopped || s.lost || s.queue.len() >= s.idle {
            return Err(w);
        }
        let ticket = s.given;
        s.given += 1;
        s.queue.push_back((ticket, w));
        drop(s);
        self.work.notify_one();
        Ok(())
    }

    /// Send a read sealed by the caller in its turn: after every read handed before it.
    pub fn in_turn(&self, w: &mut W, send: impl FnOnce(&mut W)) {
        if self.threads == 0 {
            send(w);
            return;
        }
        let mut s = self.state.lock().unwrap();
        if s.given == s.turn {
            // Nothing on its way: no ticket needed.
            drop(s);
            send(w);
            return;
        }
        let ticket = s.given;
        s.given += 1;
        self.send_at(s, ticket, w, send);
    }

    /// Wait for `ticket`'s turn, send, and pass the turn on.
    fn send_at(
        &self,
        mut s: std::sync::MutexGuard<'_, State<W>>,
        ticket: u64,
        w: &mut W,
        send: impl FnOnce(&mut W),
    ) {
        while s.turn != ticket && !s.lost {
            s = self.sent.wait_timeout(s, LOST_CHECK).unwrap().0;
        }
        drop(s);
        send(w);
        let mut s = self.state.lock().unwrap();
        s.turn = s.turn.max(ticket + 1);
        drop(s);
        self.sent.notify_all();
    }

    /// A lane's thread: seal handed reads and send each in its turn, until the lanes stop and
    /// none is left.
    pub fn lane(&self, send: impl Fn(&mut W)) {
        self.state.lock().unwrap().running += 1;
        // Dropped after `s` (declared before it): counts this lane out however it ends.
        let _gone = Gone(self);
        let mut s = self.state.lock().unwrap();
        loop {
            let Some((ticket, mut w)) = s.queue.pop_front() else {
                if s.stopped {
                    return;
                }
                s.idle += 1;
                s = self.work.wait(s).unwrap();
                s.idle -= 1;
                continue;
            };
            drop(s);
            w.seal();
            self.send_at(self.state.lock().unwrap(), ticket, &mut w, &send);
            w.clear();
            s = self.state.lock().unwrap();
            s.spare.push(w);
            self.sent.notify_all();
        }
    }

    /// Stop the lanes once what was handed is sent.
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
            // Never sealed: dropped rather than sent.
            s.queue.clear();
        }
        drop(s);
        self.0.sent.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Instant;

    type Log = Arc<Mutex<Vec<String>>>;

    struct Work {
        id: usize,
        log: Log,
        /// Sealing waits until this is set.
        gate: Option<Arc<AtomicBool>>,
        panics: bool,
        cleared: bool,
    }

    fn work(id: usize, log: &Log) -> Work {
        Work {
            id,
            log: log.clone(),
            gate: None,
            panics: false,
            cleared: false,
        }
    }

    impl Sealable for Work {
        fn seal(&mut self) {
            if let Some(gate) = &self.gate {
                until("the gate opens", || gate.load(Ordering::SeqCst));
            }
            assert!(!self.panics, "a lane dies");
            self.log.lock().unwrap().push(format!("sealed {}", self.id));
        }
        fn clear(&mut self) {
            self.cleared = true;
        }
    }

    fn sent(w: &mut Work) {
        w.log.lock().unwrap().push(format!("sent {}", w.id));
    }

    fn until(what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "timed out: {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn idle(s: &Sealers<Work>) -> usize {
        s.state.lock().unwrap().idle
    }

    fn logged(log: &Log) -> Vec<String> {
        log.lock().unwrap().clone()
    }

    /// A read sealed later on another lane still waits for the one handed before it, and the
    /// drainer's own read goes after both.
    #[test]
    fn reads_sealed_on_lanes_are_sent_in_the_order_they_were_handed() {
        let sealers = Sealers::<Work>::new(2);
        assert!(!sealers.open(), "no lane runs yet");
        let log: Log = Arc::default();
        std::thread::scope(|s| {
            let lanes: Vec<_> = (0..2).map(|_| s.spawn(|| sealers.lane(sent))).collect();
            until("both lanes wait for work", || idle(&sealers) == 2);
            assert!(sealers.open());
            let gate = Arc::new(AtomicBool::new(false));
            let mut first = work(0, &log);
            first.gate = Some(gate.clone());
            assert!(sealers.hand(first).is_ok());
            assert!(sealers.hand(work(1, &log)).is_ok());
            until("the second is sealed", || {
                logged(&log).contains(&"sealed 1".into())
            });
            assert_eq!(
                logged(&log),
                ["sealed 1"],
                "sealed, but not sent before the first"
            );
            gate.store(true, Ordering::SeqCst);
            let mut own = work(2, &log);
            sealers.in_turn(&mut own, sent);
            assert_eq!(
                logged(&log),
                ["sealed 1", "sealed 0", "sent 0", "sent 1", "sent 2"]
            );
            // Both come back as spares, cleared.
            until("spares back", || {
                sealers.state.lock().unwrap().spare.len() == 2
            });
            assert!(sealers
                .state
                .lock()
                .unwrap()
                .spare
                .iter()
                .all(|w| w.cleared));
            sealers.stop();
            for l in lanes {
                l.join().expect("a lane returns once stopped");
            }
        });
        assert!(!sealers.open());
        assert!(
            sealers.hand(work(3, &log)).is_err(),
            "stopped: the caller seals it"
        );
    }

    /// At most one read per lane, and one read ahead, are made; the next waits for one a lane
    /// sent.
    #[test]
    fn reads_made_are_bounded_and_come_back() {
        let sealers = Sealers::<Work>::new(1);
        let log: Log = Arc::default();
        let made = std::sync::atomic::AtomicUsize::new(0);
        let make = || {
            made.fetch_add(1, Ordering::SeqCst);
            work(9, &log)
        };
        std::thread::scope(|s| {
            let lane = s.spawn(|| sealers.lane(sent));
            until("the lane waits for work", || idle(&sealers) == 1);
            let (a, b) = (sealers.spare(make), sealers.spare(make));
            assert_eq!(made.load(Ordering::SeqCst), 2);
            assert!(sealers.hand(a).is_ok());
            // A third waits for the handed one to be sent, and is not made anew.
            let c = sealers.spare(make);
            assert_eq!(made.load(Ordering::SeqCst), 2);
            assert!(c.cleared, "a read that was sent");
            assert_eq!(logged(&log), ["sealed 9", "sent 9"]);
            sealers.unused(b);
            sealers.stop();
            lane.join().unwrap();
        });
    }

    /// A lane that dies loses what it held; nothing waits for it afterwards.
    #[test]
    fn after_a_lane_dies_nothing_waits_for_its_turn() {
        let sealers = Sealers::<Work>::new(1);
        let log: Log = Arc::default();
        std::thread::scope(|s| {
            let lane = s.spawn(|| sealers.lane(sent));
            until("the lane waits for work", || idle(&sealers) == 1);
            let gate = Arc::new(AtomicBool::new(false));
            let mut dies = work(0, &log);
            dies.panics = true;
            dies.gate = Some(gate.clone());
            assert!(sealers.hand(dies).is_ok());
            // The caller's own read waits for the handed one's turn, which never comes: the
            // lane dies once the caller has its ticket.
            let sealers = &sealers;
            s.spawn(move || {
                until("the caller waits", || {
                    sealers.state.lock().unwrap().given == 2
                });
                gate.store(true, Ordering::SeqCst);
            });
            let mut own = work(2, &log);
            sealers.in_turn(&mut own, sent);
            assert!(lane.join().is_err(), "the lane panicked");
            assert_eq!(
                logged(&log),
                ["sent 2"],
                "the dead lane's read is never sent"
            );
        });
        assert!(!sealers.open(), "nothing is handed any more");
        assert!(sealers.hand(work(3, &log)).is_err());
    }
}
