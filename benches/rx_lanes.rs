//! One peer's backlog arriving at a node that fell behind: how fast the node opens and delivers
//! it with its receive work on 0, 1 and 2 lanes (`MESHD_RX_LANES`). In process, over the
//! in-memory underlay, so it measures meshd's receive path alone: no kernel TCP, no sender (the
//! backlog is sealed and held before the clock starts). With lanes, one peer's reads are opened
//! on several threads at once and written in order; 0 lanes is the default on two cores (the
//! receive thread does everything), so that row is today's path there.
//!
//! Rounds of the three settings interleave; each round releases `PACKETS` datagrams of 1,400
//! bytes (the in-memory socket queue holds 1,024) `BATCHES` times and prints the median rate.
//!
//!     cargo bench --bench rx_lanes --features testing [-- BATCHES ROUNDS]

#[path = "lanes_common.rs"]
mod common;

use common::{pair, until, PACKETS};
use std::time::{Duration, Instant};

/// Seconds the receiver took for `batches` backlogs of PACKETS datagrams from the sender.
async fn measure(lanes: usize, batches: usize) -> f64 {
    let p = pair((0, 0), (lanes, 0)).await;
    let mut spent = Duration::ZERO;
    for _ in 0..batches {
        p.net.hold(p.b_addr(), true);
        for _ in 0..PACKETS {
            p.inject.send(p.packet.clone()).await.unwrap();
        }
        until("the backlog sealed", || {
            p.net.held(p.b_addr()) as u64 >= PACKETS
        })
        .await;
        let (start, t0) = (p.opened(), Instant::now());
        p.net.hold(p.b_addr(), false);
        until("the backlog opened", || p.opened() >= start + PACKETS).await;
        spent += t0.elapsed();
    }
    p.stop.cancel();
    spent.as_secs_f64()
}

fn main() {
    common::run(
        "rx_lanes",
        "one peer's backlog opened and delivered",
        measure,
    );
}
