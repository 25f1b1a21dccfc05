//! The membership layer of fleets too big to run as processes on one machine: every node's
//! real gossip glue, view, snapshot and spreading in one process over chitchat's in-process
//! transport (src/testing/gossip_fleet.rs says what is and is not in it). Prints, per size,
//! the time until every view lists every member and the gossip each node sends and receives
//! once converged, in protocol time (tokio's paused clock: the time one machine takes to play a
//! thousand nodes does not count).
//!
//!     cargo bench --bench gossip_scale --features testing [-- SIZES...]   (default 500 1000)

use meshd::testing::gossip_fleet::form;
use std::time::Duration;

fn main() {
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let sizes = if sizes.is_empty() {
        vec![500, 1000]
    } else {
        sizes
    };
    // Protocol time: the clock advances only while every node waits (see gossip_fleet.rs).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("runtime");
    println!("gossip_scale: whole fleets' membership layer in one process, on a paused clock");
    for n in sizes {
        match rt.block_on(form(n, Duration::from_secs(std::env::var("GOSSIP_SCALE_DEADLINE").ok().and_then(|v| v.parse().ok()).unwrap_or(600)), Duration::from_secs(10))) {
            Ok(f) => println!(
                "{n:>5} nodes: every view complete after {:>6.1} s; idle gossip per node {:>6.1} KiB/s, {:.1} messages/s, {:.0} B each",
                f.converged_after.as_secs_f64(),
                f.bytes_per_node_per_sec / 1024.0,
                f.messages_per_node_per_sec,
                f.mean_message
            ),
            Err(e) => println!("{n:>5} nodes: {e}"),
        }
    }
}
