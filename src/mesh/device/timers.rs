//! The WireGuard timers: `update_timers` for every peer every [`TIMER_TICK`], the shared
//! handshake rate limiter reset every second, and peers whose handshakes gave up retried at a
//! slower pace while they stay members.

use super::{Device, OUT_BUF};
use crate::constants::{RETRY_EXPIRED_PEER, TIMER_TICK};
use crate::mesh::io::{TunIo, UdpIo};
use boringtun::noise::errors::WireGuardError;
use boringtun::noise::TunnResult;
use std::sync::Arc;
use std::time::{Duration, Instant};

impl<T: TunIo, U: UdpIo> Device<T, U> {
    pub(super) async fn timer_loop(self: Arc<Self>) {
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
            for p in self.peers() {
                let mut expired = false;
                let len = {
                    let mut t = p.tunn.lock().unwrap();
                    match t.update_timers(&mut out) {
                        TunnResult::WriteToNetwork(d) => Some(d.len()),
                        TunnResult::Err(WireGuardError::ConnectionExpired) => {
                            // boringtun gave up (REKEY_ATTEMPT_TIME): what waited goes too
                            // (below, with the tunnel unlocked: the queue is locked first).
                            // This peer is still a member, so keep knocking at a slower pace.
                            expired = true;
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
                if expired {
                    let dropped = self.take_waiting(&p).len() as u64;
                    self.counters
                        .dropped_no_session
                        .fetch_add(dropped, std::sync::atomic::Ordering::Relaxed);
                }
                if let Some(len) = len {
                    self.send_to_peer(&p, &out[..len]);
                }
                // However the session came (the other side's first data may not have passed
                // through here yet), what waited for it does not wait past a tick.
                if p.counters
                    .waiting
                    .load(std::sync::atomic::Ordering::Relaxed)
                    > 0
                {
                    self.release_waiting(&p);
                }
                // Data went unanswered on the path in use and there is another: ask it with
                // a fresh handshake (an answer proves it; silence moves the peer off it).
                if p.paths.lock().unwrap().nudge(now) {
                    if let Some(len) = super::initiation(&p, true, &mut out) {
                        self.send_to_peer(&p, &out[..len]);
                    }
                }
            }
        }
    }
}
