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

use boringtun::x25519::{PublicKey, StaticSecret};
use meshd::id::MeshRange;
use meshd::mesh::packet::build_ipv4_udp;
use meshd::mesh::{Device, PeerSpec};
use meshd::testing::mem::{MemNet, MemTun, MemTunHandle, MemUdp};
use meshd::trust::NodeId;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const PACKETS: u64 = 1000;
const PAYLOAD: usize = 1400 - 28;

struct Node {
    dev: Arc<Device<MemTun, MemUdp>>,
    tun: Option<MemTunHandle>,
    spec: PeerSpec,
}

fn range() -> MeshRange {
    "10.210.0.0/16".parse().unwrap()
}

fn ip(slot: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(range().subnet(slot)) + 1)
}

fn node(net: &MemNet, host: u8, slot: u32, lanes: usize, stop: &CancellationToken) -> Node {
    // Read when the device is made.
    std::env::set_var("MESHD_RX_LANES", lanes.to_string());
    let secret = StaticSecret::random_from_rng(rand_core::OsRng);
    let addr = SocketAddr::from(([192, 0, 2, host], 51820));
    let spec = PeerSpec {
        node_id: NodeId([host; 8]),
        name: format!("n{host}"),
        wg: PublicKey::from(&secret).to_bytes(),
        slot,
        endpoints: vec![addr],
    };
    let (tun, handle) = MemTun::new();
    let (dev, ctl) = Device::new(tun, net.bind(addr).unwrap(), secret, range(), slot);
    tokio::spawn(dev.clone().run(stop.clone()));
    // The device's reports are not read here.
    std::mem::forget(ctl);
    Node {
        dev,
        tun: Some(handle),
        spec,
    }
}

/// Wait (bounded) until `done` holds.
async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
}

/// Seconds the receiver took for `batches` backlogs of PACKETS datagrams from the sender.
async fn measure(lanes: usize, batches: usize) -> f64 {
    let net = MemNet::new();
    let stop = CancellationToken::new();
    let mut a = node(&net, 1, 3, 0, &stop);
    let mut b = node(&net, 2, 7, lanes, &stop);
    a.dev.set_peers(std::slice::from_ref(&b.spec));
    b.dev.set_peers(std::slice::from_ref(&a.spec));
    let inject = a.tun.take().unwrap().inject;
    let mut delivered = b.tun.take().unwrap().delivered;
    // What B hands the kernel is taken away (and not counted: B counts what it opened).
    tokio::spawn(async move { while delivered.recv().await.is_some() {} });
    let packet = build_ipv4_udp(ip(3), ip(7), 1, 2, &[7u8; PAYLOAD]);
    inject.send(packet.clone()).await.unwrap();
    let from_a = b.dev.peer_by_node(&a.spec.node_id).unwrap();
    let rx = || from_a.counters.rx_packets.load(Ordering::Relaxed);
    until("the session", || rx() >= 1).await;
    let b_addr = b.spec.endpoints[0];
    let mut spent = Duration::ZERO;
    for _ in 0..batches {
        net.hold(b_addr, true);
        for _ in 0..PACKETS {
            inject.send(packet.clone()).await.unwrap();
        }
        until("the backlog sealed", || net.held(b_addr) as u64 >= PACKETS).await;
        let (start, t0) = (rx(), Instant::now());
        net.hold(b_addr, false);
        until("the backlog opened", || rx() >= start + PACKETS).await;
        spent += t0.elapsed();
    }
    stop.cancel();
    spent.as_secs_f64()
}

fn main() {
    let mut args = std::env::args().skip(1).filter(|a| a != "--bench");
    let batches: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(200);
    let rounds: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(5);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let settings = [0usize, 1, 2];
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); settings.len()];
    for round in 0..rounds {
        for (i, &lanes) in settings.iter().enumerate() {
            let secs = rt.block_on(measure(lanes, batches));
            let mbit = (batches as u64 * PACKETS * 1400 * 8) as f64 / secs / 1e6;
            eprintln!("round {round}: {lanes} lanes {mbit:.0} Mbit/s");
            rates[i].push(mbit);
        }
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "rx_lanes: one peer's backlog ({} x {} datagrams of 1400 B), opened and delivered, \
         {cores} cores, median of {rounds}",
        batches, PACKETS
    );
    let base = median(&mut rates[0].clone());
    for (i, &lanes) in settings.iter().enumerate() {
        let m = median(&mut rates[i]);
        println!("  {lanes} lanes: {m:>6.0} Mbit/s  {:.2}x 0 lanes", m / base);
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}
