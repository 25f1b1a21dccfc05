//! A backlog the kernel routes into the mesh at once: how fast a node seals and sends it with
//! 0, 1 and 2 seal lanes (`MESHD_TX_LANES`). In process, over the in-memory underlay, so it
//! measures meshd's send path alone: no kernel TCP, no receiver inside the timing (the peer's
//! socket holds what arrives). With lanes, a planned read goes to an idle lane when the next
//! read is ready behind it, and every read leaves in its turn; 0 lanes is the default on two
//! cores (the TUN thread does everything), so that row is today's path there.
//!
//! Rounds of the three settings interleave; each round queues `PACKETS` packets of 1,400 bytes
//! in the node's TUN device (which holds 1,024) `BATCHES` times while its sending is held,
//! releases them, and prints the median rate until all are sealed and sent.
//!
//!     cargo bench --bench tx_lanes --features testing [-- BATCHES ROUNDS]

#[path = "lanes_common.rs"]
mod common;

use common::{pair, until, PACKETS};
use std::time::{Duration, Instant};

/// Seconds the sender took for `batches` backlogs of PACKETS packets.
async fn measure(lanes: usize, batches: usize) -> f64 {
    let p = pair((0, lanes), (0, 0)).await;
    let mut spent = Duration::ZERO;
    for _ in 0..batches {
        let before = p.opened();
        p.net.hold(p.b_addr(), true);
        {
            let _held = p.a.dev.hold_sending();
            for _ in 0..PACKETS {
                let queued = p.inject.try_send(p.packet.clone());
                queued.expect("room in the TUN queue");
            }
        }
        let t0 = Instant::now();
        until("the backlog sent", || {
            p.net.held(p.b_addr()) as u64 >= PACKETS
        })
        .await;
        spent += t0.elapsed();
        p.net.hold(p.b_addr(), false);
        until("the backlog opened", || p.opened() >= before + PACKETS).await;
    }
    p.stop.cancel();
    spent.as_secs_f64()
}

fn main() {
    common::run("tx_lanes", "one node's backlog sealed and sent", measure);
}
