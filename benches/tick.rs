//! The control-plane work of one reconcile tick (every 200 ms on every node), at 100 and 1,000
//! members: `View::tick` (prune, the stop verdict, the snapshot if the view changed) and what
//! the node's parts compare before they act on a new snapshot (the data plane's peer set, the
//! DNS zone, the edge's routes). Gossip polling and I/O are not in it.
//!
//! Two cases: a steady tick (nothing changed: the common case) and a tick after one member's
//! liveness flipped (the snapshot is recomputed).
//!
//!     cargo bench --bench tick --features testing

use meshd::gossip::Liveness;
use meshd::node::view::View;
use meshd::testing::fixtures::{World, T0};
use std::time::{Duration, Instant};

fn median(mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort();
    (v[v.len() / 2], v[v.len() * 9 / 10])
}

fn main() {
    println!("tick: control-plane work of one 200 ms reconcile tick (median, p90)");
    for n in [100usize, 1000] {
        let world = World::new(if n <= 200 {
            "10.210.0.0/16"
        } else {
            "10.128.0.0/9"
        });
        let (m, members) = world.mesh(n);
        let flip = members[n / 2].1.node_id;
        let mut view = View::new(m, Instant::now());
        let mut installed = view.snapshot().peers.clone();
        let mut zone = view.snapshot().zone.clone();
        let mut routes = view.snapshot().routes.clone();
        let mut run = |view: &mut View, change: bool, round: usize| -> Duration {
            if change {
                let l = if round % 2 == 0 {
                    Liveness::Dead
                } else {
                    Liveness::Alive
                };
                view.m_mut().set_liveness(flip, l, T0);
            }
            let t = Instant::now();
            if let Ok(Some(snap)) = view.tick(T0, false) {
                if snap.peers != installed {
                    installed = snap.peers.clone();
                }
                if snap.zone != zone {
                    zone = snap.zone.clone();
                }
                if *snap.routes != *routes {
                    routes = snap.routes.clone();
                }
            }
            t.elapsed()
        };
        let rounds = if n <= 100 { 2000 } else { 200 };
        let steady: Vec<Duration> = (0..rounds).map(|i| run(&mut view, false, i)).collect();
        let changed: Vec<Duration> = (0..rounds).map(|i| run(&mut view, true, i)).collect();
        let (s50, s90) = median(steady);
        let (c50, c90) = median(changed);
        println!(
            "members {n:>5}: steady {s50:>9.1?} {s90:>9.1?}   after a change {c50:>9.1?} {c90:>9.1?}"
        );
    }
}
