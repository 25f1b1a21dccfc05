//! What `rx_lanes` and `tx_lanes` share: two in-memory nodes with a session, a bounded wait,
//! and the rounds that interleave 0, 1 and 2 lanes and print medians.

use boringtun::x25519::{PublicKey, StaticSecret};
use meshd::id::MeshRange;
use meshd::mesh::packet::build_ipv4_udp;
use meshd::mesh::{Device, PeerSpec};
use meshd::testing::mem::{MemNet, MemTun, MemTunHandle, MemUdp};
use meshd::trust::NodeId;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Packets in one backlog (the in-memory TUN queue and socket hold 1,024).
pub const PACKETS: u64 = 1000;
const PAYLOAD: usize = 1400 - 28;

pub struct Node {
    pub dev: Arc<Device<MemTun, MemUdp>>,
    pub spec: PeerSpec,
}

/// A sends to B: A's and B's devices, with a session, A's TUN queue and B's address.
pub struct Pair {
    pub net: MemNet,
    pub stop: CancellationToken,
    pub a: Node,
    pub b: Node,
    pub inject: mpsc::Sender<Vec<u8>>,
    /// A 1,400-byte packet from A's node to B's.
    pub packet: Vec<u8>,
}

impl Pair {
    /// Packets B has opened from A.
    pub fn opened(&self) -> u64 {
        let from_a = self.b.dev.peer_by_node(&self.a.spec.node_id).unwrap();
        from_a.counters.rx_packets.load(Ordering::Relaxed)
    }

    pub fn b_addr(&self) -> SocketAddr {
        self.b.spec.endpoints[0]
    }
}

fn range() -> MeshRange {
    "10.210.0.0/16".parse().unwrap()
}

fn ip(slot: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(range().subnet(slot)) + 1)
}

/// A node with `(rx, tx)` lanes (`MESHD_RX_LANES`, `MESHD_TX_LANES`).
fn node(
    net: &MemNet,
    host: u8,
    slot: u32,
    lanes: (usize, usize),
    stop: &CancellationToken,
) -> (Node, MemTunHandle) {
    // Read when the device is made.
    std::env::set_var("MESHD_RX_LANES", lanes.0.to_string());
    std::env::set_var("MESHD_TX_LANES", lanes.1.to_string());
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
    (Node { dev, spec }, handle)
}

/// A and B with the given lanes, peers of each other, once a first packet from A was opened.
/// What B hands its kernel is taken away (B counts what it opened).
pub async fn pair(a_lanes: (usize, usize), b_lanes: (usize, usize)) -> Pair {
    let net = MemNet::new();
    let stop = CancellationToken::new();
    let (a, a_tun) = node(&net, 1, 3, a_lanes, &stop);
    let (b, mut b_tun) = node(&net, 2, 7, b_lanes, &stop);
    a.dev.set_peers(std::slice::from_ref(&b.spec));
    b.dev.set_peers(std::slice::from_ref(&a.spec));
    tokio::spawn(async move { while b_tun.delivered.recv().await.is_some() {} });
    let packet = build_ipv4_udp(ip(3), ip(7), 1, 2, &[7u8; PAYLOAD]);
    a_tun.inject.send(packet.clone()).await.unwrap();
    let p = Pair {
        net,
        stop,
        a,
        b,
        inject: a_tun.inject,
        packet,
    };
    until("the session", || p.opened() >= 1).await;
    p
}

/// Wait (bounded) until `done` holds.
pub async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_micros(50)).await;
    }
}

/// Interleave rounds of 0, 1 and 2 lanes (`measure(lanes, batches)` gives the seconds for
/// `batches` backlogs) and print each setting's median rate and its ratio to none.
pub fn run<F, Fut>(name: &str, what: &str, measure: F)
where
    F: Fn(usize, usize) -> Fut,
    Fut: Future<Output = f64>,
{
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
    println!("{name}: {what} ({batches} x {PACKETS} of 1400 B), {cores} cores, median of {rounds}");
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
