//! A backlog the kernel routes into the mesh at once: how fast a node seals and sends it with
//! 0, 1 and 2 seal lanes (`MESHD_TX_LANES`). In process, over the in-memory underlay, so it
//! measures meshd's send path alone: no kernel TCP, no receiver inside the timing (the peer's
//! socket holds what arrives). With lanes, of several reads ready at once all but the last are
//! sealed on lanes and every read leaves in order; 0 lanes is the default on two cores (the
//! TUN thread does everything), so that row is today's path there.
//!
//! Rounds of the three settings interleave; each round queues `PACKETS` packets of 1,400 bytes
//! in the node's TUN device (which holds 1,024) `BATCHES` times while its sending is held,
//! releases them, and prints the median rate until all are sealed and sent.
//!
//!     cargo bench --bench tx_lanes --features testing [-- BATCHES ROUNDS]

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
    std::env::set_var("MESHD_TX_LANES", lanes.to_string());
    std::env::set_var("MESHD_RX_LANES", "0");
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
        tokio::time::sleep(Duration::from_micros(50)).await;
    }
}

/// Seconds the sender took for `batches` backlogs of PACKETS packets.
async fn measure(lanes: usize, batches: usize) -> f64 {
    let net = MemNet::new();
    let stop = CancellationToken::new();
    let mut a = node(&net, 1, 3, lanes, &stop);
    let mut b = node(&net, 2, 7, 0, &stop);
    a.dev.set_peers(std::slice::from_ref(&b.spec));
    b.dev.set_peers(std::slice::from_ref(&a.spec));
    let inject = a.tun.take().unwrap().inject;
    let mut delivered = b.tun.take().unwrap().delivered;
    // What B hands the kernel is taken away (B's work is outside the timing).
    tokio::spawn(async move { while delivered.recv().await.is_some() {} });
    let packet = build_ipv4_udp(ip(3), ip(7), 1, 2, &[7u8; PAYLOAD]);
    inject.send(packet.clone()).await.unwrap();
    let from_a = b.dev.peer_by_node(&a.spec.node_id).unwrap();
    let rx = || from_a.counters.rx_packets.load(Ordering::Relaxed);
    until("the session", || rx() >= 1).await;
    let b_addr = b.spec.endpoints[0];
    let mut spent = Duration::ZERO;
    for _ in 0..batches {
        let before = rx();
        net.hold(b_addr, true);
        {
            let _held = a.dev.hold_sending();
            for _ in 0..PACKETS {
                inject
                    .try_send(packet.clone())
                    .expect("room in the TUN queue");
            }
        }
        let t0 = Instant::now();
        until("the backlog sent", || net.held(b_addr) as u64 >= PACKETS).await;
        spent += t0.elapsed();
        net.hold(b_addr, false);
        until("the backlog opened", || rx() >= before + PACKETS).await;
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
            eprintln!("round {round}: {lanes} seal lanes {mbit:.0} Mbit/s");
            rates[i].push(mbit);
        }
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "tx_lanes: one node's backlog ({} x {} packets of 1400 B), sealed and sent, \
         {cores} cores, median of {rounds}",
        batches, PACKETS
    );
    let base = median(&mut rates[0].clone());
    for (i, &lanes) in settings.iter().enumerate() {
        let m = median(&mut rates[i]);
        println!(
            "  {lanes} seal lanes: {m:>6.0} Mbit/s  {:.2}x 0 lanes",
            m / base
        );
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}
