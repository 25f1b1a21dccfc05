//! Device tests: two or more devices over the in-memory underlay.

use super::receive::Deliver;
use super::send::{MAX_WAITING_BYTES, MAX_WAITING_PER_PEER};
use super::*;
use crate::mesh::packet::{build_ipv4_udp, ipv4_src};
use crate::mesh::packet::{classify, FrameKind};
use crate::testing::mem::{MemNet, MemTun, MemTunHandle, MemUdp};
use crate::testing::tunnels::handshaken;
use boringtun::noise::errors::WireGuardError;
use boringtun::noise::Packet;
use std::collections::HashMap;
use std::net::Ipv4Addr;
use tokio::time::timeout;

struct TestNode {
    dev: Arc<Device<MemTun, MemUdp>>,
    tun: MemTunHandle,
    wg: Key32,
    slot: u32,
    addr: SocketAddr,
    _ctl: mpsc::Receiver<DeviceEvent>,
}

fn range() -> MeshRange {
    "10.210.0.0/16".parse().unwrap()
}

fn node(net: &MemNet, host: u8, slot: u32, stop: &CancellationToken) -> TestNode {
    node_with_lanes(net, host, slot, stop, (0, 0))
}

fn node_with_lanes(
    net: &MemNet,
    host: u8,
    slot: u32,
    stop: &CancellationToken,
    lanes: (usize, usize),
) -> TestNode {
    let secret = StaticSecret::random_from_rng(rand_core::OsRng);
    let wg = PublicKey::from(&secret).to_bytes();
    let addr = SocketAddr::from(([192, 0, 2, host], 51820));
    let (tun, handle) = MemTun::new();
    let udp = net.bind(addr).unwrap();
    let (dev, ctl) = Device::new_with_lanes(tun, udp, secret, range(), slot, lanes);
    tokio::spawn(dev.clone().run(stop.clone()));
    TestNode {
        dev,
        tun: handle,
        wg,
        slot,
        addr,
        _ctl: ctl,
    }
}

/// The node id the tests give the node on `slot`.
fn node_id(slot: u32) -> NodeId {
    let mut id = [0u8; 8];
    id[..4].copy_from_slice(&slot.to_le_bytes());
    NodeId(id)
}

fn spec(n: &TestNode, endpoints: Vec<SocketAddr>) -> PeerSpec {
    PeerSpec {
        node_id: node_id(n.slot),
        name: format!("n{}", n.slot),
        wg: n.wg,
        slot: n.slot,
        endpoints,
    }
}

/// A peer on `slot` with a fresh key and an endpoint nobody is bound to.
fn unreachable(slot: u32, name: &str) -> PeerSpec {
    let secret = StaticSecret::random_from_rng(rand_core::OsRng);
    PeerSpec {
        node_id: node_id(slot),
        name: name.to_string(),
        wg: PublicKey::from(&secret).to_bytes(),
        slot,
        endpoints: vec![SocketAddr::from(([198, 51, 100, 9], 51820))],
    }
}

fn ip(slot: u32, host: u8) -> Ipv4Addr {
    let r = range();
    Ipv4Addr::from(u32::from(r.subnet(slot)) + host as u32)
}

async fn expect_delivery(n: &mut TestNode, payload: &[u8]) -> Vec<u8> {
    loop {
        let p = timeout(Duration::from_secs(10), n.tun.delivered.recv())
            .await
            .expect("packet delivered within 10 s")
            .expect("tun open");
        if p.ends_with(payload) {
            return p;
        }
    }
}

/// A and B peers of each other, with a session (a first packet crossed).
async fn connect(a: &TestNode, b: &mut TestNode) {
    a.dev.set_peers(&[spec(b, vec![b.addr])]);
    b.dev.set_peers(&[spec(a, vec![a.addr])]);
    a.tun
        .inject
        .send(build_ipv4_udp(ip(a.slot, 1), ip(b.slot, 1), 1, 1, b"hello"))
        .await
        .unwrap();
    expect_delivery(b, b"hello").await;
}

/// Packet `i` of a numbered burst from `from`'s node to `to`'s (UDP port 2, `size` bytes of
/// payload starting with `i`).
fn numbered(from: u32, to: u32, i: u32, size: usize) -> Vec<u8> {
    let mut payload = vec![0u8; size];
    payload[..4].copy_from_slice(&i.to_be_bytes());
    build_ipv4_udp(ip(from, 1), ip(to, 1), 1, 2, &payload)
}

/// The numbers of the next `n` numbered packets (see [`numbered`]) `node` delivers, in the order
/// delivered (other packets skipped; each within 10 s).
async fn delivered_numbers(node: &mut TestNode, n: usize) -> Vec<u32> {
    let mut seqs = Vec::with_capacity(n);
    while seqs.len() < n {
        let p = timeout(Duration::from_secs(10), node.tun.delivered.recv())
            .await
            .expect("every packet within 10 s")
            .expect("open");
        if p.len() >= 32 && u16::from_be_bytes([p[22], p[23]]) == 2 {
            seqs.push(u32::from_be_bytes([p[28], p[29], p[30], p[31]]));
        }
    }
    seqs
}

/// Wait until `n` datagrams are held back for `addr` (bounded).
async fn wait_held(net: &MemNet, addr: SocketAddr, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while net.held(addr) < n {
        assert!(
            Instant::now() < deadline,
            "the senders did not send the burst"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn packets_cross_the_tunnel_both_ways_and_bad_sources_are_dropped() {
    let net = MemNet::new();
    let stop = CancellationToken::new();
    let mut a = node(&net, 1, 3, &stop);
    let mut b = node(&net, 2, 7, &stop);
    a.dev.set_peers(&[spec(&b, vec![b.addr])]);
    b.dev.set_peers(&[spec(&a, vec![a.addr])]);
    net.start_capture();

    let p = build_ipv4_udp(ip(3, 1), ip(7, 1), 1000, 2000, b"hello-b");
    a.tun.inject.send(p.clone()).await.unwrap();
    assert_eq!(expect_delivery(&mut b, b"hello-b").await, p);
    let q = build_ipv4_udp(ip(7, 5), ip(3, 9), 2000, 1000, b"hello-a");
    b.tun.inject.send(q.clone()).await.unwrap();
    assert_eq!(expect_delivery(&mut a, b"hello-a").await, q);

    // Nothing crossed the underlay in clear.
    for (_, _, d) in net.captured() {
        assert_eq!(classify(&d), FrameKind::WireGuard);
        assert!(!d.windows(7).any(|w| w == b"hello-b" || w == b"hello-a"));
    }

    // B's own machine (or a workload on it) sends with a source outside B's /24: B drops and
    // counts it before it is sealed.
    let spoofed = build_ipv4_udp(ip(9, 1), ip(3, 1), 1, 1, b"spoof");
    b.tun.inject.send(spoofed.clone()).await.unwrap();
    let marker = build_ipv4_udp(ip(7, 1), ip(3, 1), 1, 1, b"after0");
    b.tun.inject.send(marker).await.unwrap();
    let got = expect_delivery(&mut a, b"after0").await;
    assert_eq!(ipv4_src(&got), Some(ip(7, 1)));
    assert_eq!(
        b.dev.counters.dropped_forged_source.load(Ordering::Relaxed),
        1
    );
    // A B that seals such a packet anyway (a modified build): A drops and counts it.
    let a_id = spec(&a, vec![]).node_id;
    let peer = b.dev.peer_by_node(&a_id).expect("B knows A");
    let seal = |packet: &[u8]| -> Vec<u8> {
        let mut out = vec![0u8; 2048];
        match peer.tunn.lock().unwrap().encapsulate(packet, &mut out) {
            TunnResult::WriteToNetwork(d) => d.to_vec(),
            _ => panic!("the session is up, so encapsulation yields a datagram"),
        }
    };
    b.dev.udp().send_to(&seal(&spoofed), a.addr).unwrap();
    let marker = build_ipv4_udp(ip(7, 1), ip(3, 1), 1, 1, b"after");
    b.tun.inject.send(marker).await.unwrap();
    let got = expect_delivery(&mut a, b"after").await;
    assert_eq!(ipv4_src(&got), Some(ip(7, 1)));
    let st = a.dev.stats();
    assert_eq!(st[0].dropped_bad_source, 1);
    assert_eq!(a.dev.counters.dropped_bad_source.load(Ordering::Relaxed), 1);
    assert!(st[0].last_handshake.is_some());
    assert!(st[0].rx_bytes > 0 && st[0].tx_bytes > 0);

    // B (a member, with a valid tunnel) sends A a packet for a third subnet, as if A were a
    // router: A drops and counts it instead of delivering it to its TUN device.
    let elsewhere = build_ipv4_udp(ip(7, 1), ip(9, 1), 1, 1, b"route-me");
    b.dev.udp().send_to(&seal(&elsewhere), a.addr).unwrap();
    let marker = build_ipv4_udp(ip(7, 1), ip(3, 1), 1, 1, b"after2");
    b.tun.inject.send(marker).await.unwrap();
    let got = expect_delivery(&mut a, b"after2").await;
    assert!(!got.ends_with(b"route-me"));
    assert_eq!(
        a.dev
            .counters
            .dropped_bad_destination
            .load(Ordering::Relaxed),
        1
    );
    stop.cancel();
}

/// A flood of replayed handshake initiations from elsewhere puts the device under load: it
/// answers with cookie replies (before any Diffie-Hellman) and never moves the real peer's
/// endpoint to the flooder.
#[tokio::test]
async fn a_replayed_handshake_flood_gets_cookies_and_moves_nothing() {
    let net = MemNet::new();
    let stop = CancellationToken::new();
    let mut a = node(&net, 1, 3, &stop);
    let b = node(&net, 2, 7, &stop);
    // Captured from the start: B's first initiation is the one replayed.
    net.start_capture();
    a.dev.set_peers(&[spec(&b, vec![b.addr])]);
    b.dev.set_peers(&[spec(&a, vec![a.addr])]);
    let p = build_ipv4_udp(ip(7, 1), ip(3, 1), 1, 1, b"hi");
    b.tun.inject.send(p).await.unwrap();
    expect_delivery(&mut a, b"hi").await;
    let init = net
        .captured()
        .into_iter()
        .find(|(from, _, d)| *from == b.addr && d.first() == Some(&1))
        .expect("b initiated the handshake")
        .2;

    let flooder = net.bind(SocketAddr::from(([192, 0, 2, 99], 4000))).unwrap();
    for _ in 0..(HANDSHAKE_RATE_LIMIT * 3) {
        flooder.send_to(&init, a.addr).unwrap();
    }
    let mut buf = vec![0u8; 256];
    let cookie = timeout(Duration::from_secs(10), async {
        loop {
            let (n, _) = flooder.recv_from(&mut buf).await.unwrap();
            if n > 0 && buf[0] == 3 {
                return;
            }
        }
    })
    .await;
    assert!(cookie.is_ok(), "the flood is answered with cookie replies");
    let st = a.dev.stats();
    assert_eq!(st[0].endpoint, Some(b.addr), "the peer did not move");
    stop.cancel();
}

#[tokio::test]
async fn a_burst_arrives_complete_and_in_order_through_batching() {
    let net = MemNet::new();
    let stop = CancellationToken::new();
    let a = node(&net, 1, 3, &stop);
    let mut b = node(&net, 2, 7, &stop);
    connect(&a, &mut b).await;
    // 200 equal packets, then one short one: GSO runs and GRO-coalesced reads.
    let mut sent: Vec<Vec<u8>> = (0..200).map(|i| numbered(3, 7, i, 1000)).collect();
    sent.push(build_ipv4_udp(ip(3, 1), ip(7, 1), 1, 2, b"last"));
    for p in &sent {
        a.tun.inject.send(p.clone()).await.unwrap();
    }
    let mut got = Vec::new();
    while got.len() < sent.len() {
        let p = timeout(Duration::from_secs(10), b.tun.delivered.recv())
            .await
            .expect("all packets within 10 s")
            .expect("open");
        if p.len() > 28 && u16::from_be_bytes([p[22], p[23]]) == 2 {
            got.push(p);
        }
    }
    assert_eq!(got, sent);
    stop.cancel();
}

/// Two peers' bursts reach a receiver that fell behind: it hands full reads to its two lanes,
/// which take any peer's next read (so each peer's reads are decrypted on both at once), and
/// every packet of a peer is delivered in the order it was sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bursts_from_two_peers_go_through_lanes_in_order() {
    let net = MemNet::new();
    let stop = CancellationToken::new();
    let mut b = node_with_lanes(&net, 2, 7, &stop, (2, 0));
    let a = node(&net, 1, 3, &stop);
    let c = node(&net, 3, 11, &stop);
    b.dev
        .set_peers(&[spec(&a, vec![a.addr]), spec(&c, vec![c.addr])]);
    for (s, n) in [(&a, 3u32), (&c, 11)] {
        s.dev.set_peers(&[spec(&b, vec![b.addr])]);
        let hello = format!("hello{n}");
        s.tun
            .inject
            .send(build_ipv4_udp(ip(n, 1), ip(7, 1), 1, 1, hello.as_bytes()))
            .await
            .unwrap();
        expect_delivery(&mut b, hello.as_bytes()).await;
    }
    // B stops reading for a moment: both bursts wait in its socket, then arrive at once.
    const N: u32 = 300;
    net.hold(b.addr, true);
    for i in 0..N {
        for (s, n) in [(&a, 3u32), (&c, 11)] {
            s.tun.inject.send(numbered(n, 7, i, 1300)).await.unwrap();
        }
    }
    // Wait until both bursts are all waiting for B.
    wait_held(&net, b.addr, 2 * N as usize).await;
    net.hold(b.addr, false);
    let mut next = HashMap::from([(ip(3, 1), 0u32), (ip(11, 1), 0u32)]);
    let mut got = 0;
    while got < 2 * N {
        let p = timeout(Duration::from_secs(10), b.tun.delivered.recv())
            .await
            .expect("all packets within 10 s")
            .expect("open");
        if p.len() < 32 || u16::from_be_bytes([p[22], p[23]]) != 2 {
            continue;
        }
        let from = ipv4_src(&p).unwrap();
        let seq = u32::from_be_bytes([p[28], p[29], p[30], p[31]]);
        let want = next.get_mut(&from).expect("a known sender");
        assert_eq!(seq, *want, "packets from {from} in order");
        *want += 1;
        got += 1;
    }
    assert!(
        b.dev.counters.lane_reads.load(Ordering::Relaxed) > 0,
        "the backlog went through the lanes"
    );
    stop.cancel();
}

#[tokio::test]
async fn a_dead_first_candidate_is_skipped() {
    let net = MemNet::new();
    let stop = CancellationToken::new();
    let a = node(&net, 1, 3, &stop);
    let mut b = node(&net, 2, 7, &stop);
    // A only knows a stale address of B first, then the right one.
    let stale = SocketAddr::from(([192, 0, 2, 99], 51820));
    a.dev.set_peers(&[spec(&b, vec![stale, b.addr])]);
    b.dev.set_peers(&[spec(&a, vec![])]);
    let p = build_ipv4_udp(ip(3, 1), ip(7, 1), 1, 1, b"rotated");
    a.tun.inject.send(p).await.unwrap();
    // boringtun retries after 5 s, to the next candidate.
    expect_delivery(&mut b, b"rotated").await;
    assert_eq!(a.dev.stats()[0].endpoint, Some(b.addr));
    // B learnt A's address from the authenticated handshake (roaming).
    assert_eq!(b.dev.stats()[0].endpoint, Some(a.addr));
    stop.cancel();
}

#[tokio::test]
async fn removed_peers_are_unreachable_and_unknown_keys_are_ignored() {
    let net = MemNet::new();
    let stop = CancellationToken::new();
    let a = node(&net, 1, 3, &stop);
    let mut b = node(&net, 2, 7, &stop);
    // B knows A, A does not know B: B's handshakes go nowhere.
    b.dev.set_peers(&[spec(&a, vec![a.addr])]);
    let p = build_ipv4_udp(ip(7, 1), ip(3, 1), 1, 1, b"x");
    b.tun.inject.send(p).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while a.dev.counters.dropped_unknown_peer.load(Ordering::Relaxed) == 0 {
        assert!(Instant::now() < deadline, "A never saw B's initiation");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(a.dev.stats().is_empty());
    // Once removed, nothing is routed to the peer any more.
    b.dev.set_peers(&[]);
    let p = build_ipv4_udp(ip(7, 1), ip(3, 1), 1, 1, b"y");
    let before = b.dev.counters.dropped_no_peer.load(Ordering::Relaxed);
    b.tun.inject.send(p).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while b.dev.counters.dropped_no_peer.load(Ordering::Relaxed) == before {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = b.tun.delivered.try_recv();
    stop.cancel();
}

/// Packets for a peer whose tunnel has no session wait for it, at most 64 (the oldest give
/// way, counted), and go in order once the peer answers.
#[tokio::test]
async fn packets_wait_for_a_session_bounded_and_go_once_it_comes() {
    let net = MemNet::new();
    let stop = CancellationToken::new();
    let a = node(&net, 1, 3, &stop);
    let mut b = node(&net, 2, 7, &stop);
    // A knows B; B does not know A yet, so A's handshakes go unanswered.
    a.dev.set_peers(&[spec(&b, vec![b.addr])]);
    for i in 0..100u32 {
        a.tun.inject.send(numbered(3, 7, i, 200)).await.unwrap();
    }
    let b_id = spec(&b, vec![]).node_id;
    let peer = a.dev.peer_by_node(&b_id).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while a.dev.counters.dropped_no_session.load(Ordering::Relaxed) < 36 {
        assert!(Instant::now() < deadline, "the overflow was not counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        peer.counters.waiting.load(Ordering::Relaxed),
        MAX_WAITING_PER_PEER as u64
    );
    // B learns of A and answers: the 64 newest arrive, in order.
    b.dev.set_peers(&[spec(&a, vec![a.addr])]);
    assert_eq!(
        delivered_numbers(&mut b, 64).await,
        (36..100).collect::<Vec<_>>(),
        "in order"
    );
    assert_eq!(peer.counters.waiting.load(Ordering::Relaxed), 0);
    assert_eq!(a.dev.waiting_bytes.load(Ordering::Relaxed), 0);
    stop.cancel();
}

/// Packets still waiting when the session is up leave before a newer packet from the TUN device:
/// whichever thread releases them (the send path that finds them, the receive path, a timer),
/// the newer one goes after them, and nothing is left counted.
#[tokio::test]
async fn packets_that_waited_leave_before_newer_ones_once_the_session_is_up() {
    let net = MemNet::new();
    let stop = CancellationToken::new();
    let a = node(&net, 1, 3, &stop);
    let mut b = node(&net, 2, 7, &stop);
    connect(&a, &mut b).await;
    let peer = a
        .dev
        .peer_by_node(&spec(&b, vec![]).node_id)
        .expect("A knows B");
    // As if they had come before the session (the handshake was just answered).
    const WAITED: u32 = 20;
    for i in 0..WAITED {
        a.dev.hold_for_session(&peer, &numbered(3, 7, i, 300));
    }
    a.tun
        .inject
        .send(numbered(3, 7, WAITED, 300))
        .await
        .unwrap();
    let seqs = delivered_numbers(&mut b, WAITED as usize + 1).await;
    assert_eq!(
        seqs,
        (0..=WAITED).collect::<Vec<_>>(),
        "the waiting first, in order"
    );
    assert_eq!(peer.counters.waiting.load(Ordering::Relaxed), 0);
    assert_eq!(a.dev.waiting_bytes.load(Ordering::Relaxed), 0);
    stop.cancel();
}

/// Many unreachable peers cannot make the waiting packets grow past the device's budget.
#[tokio::test]
async fn waiting_packets_across_peers_stay_within_the_budget() {
    let net = MemNet::new();
    let stop = CancellationToken::new();
    let a = node(&net, 1, 3, &stop);
    let peers: Vec<PeerSpec> = (0..40u32)
        .map(|i| unreachable(100 + i, &format!("gone{i}")))
        .collect();
    a.dev.set_peers(&peers);
    let per_packet = 1400usize;
    let total = 40 * MAX_WAITING_PER_PEER;
    for k in 0..MAX_WAITING_PER_PEER {
        for i in 0..40u32 {
            let mut payload = vec![0u8; per_packet - 28];
            payload[..4].copy_from_slice(&(k as u32).to_be_bytes());
            let p = build_ipv4_udp(ip(3, 1), ip(100 + i, 1), 1, 2, &payload);
            a.tun.inject.send(p).await.unwrap();
        }
    }
    let held_max = MAX_WAITING_BYTES / per_packet;
    let deadline = Instant::now() + Duration::from_secs(10);
    while a.dev.counters.dropped_no_session.load(Ordering::Relaxed) < (total - held_max) as u64 {
        assert!(Instant::now() < deadline, "the overflow was not counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(a.dev.waiting_bytes.load(Ordering::Relaxed) <= MAX_WAITING_BYTES);
    let held: u64 = a
        .dev
        .peers()
        .iter()
        .map(|p| p.counters.waiting.load(Ordering::Relaxed))
        .sum();
    assert_eq!(held as usize, held_max);
    // Removing the peers gives the budget back.
    a.dev.set_peers(&[]);
    assert_eq!(a.dev.waiting_bytes.load(Ordering::Relaxed), 0);
    stop.cancel();
}

/// As a relay, a run of frames from one end goes on to the other unchanged and in order (in one
/// send per run); a frame for no session in the middle is dropped and counted.
#[tokio::test]
async fn relayed_frames_go_on_in_order_and_strangers_are_dropped() {
    let net = MemNet::new();
    let stop = CancellationToken::new();
    let r = node(&net, 1, 3, &stop);
    let a = net
        .bind(SocketAddr::from(([192, 0, 2, 10], 51820)))
        .unwrap();
    let b = net
        .bind(SocketAddr::from(([192, 0, 2, 11], 51820)))
        .unwrap();
    let session = 0x5eed;
    assert!(r.dev.relay_bind(session, a.local_addr(), b.local_addr()));
    net.hold(r.addr, true);
    let frame = |s: u64, i: u32| {
        let mut f = crate::mesh::relay::header(s).to_vec();
        f.extend_from_slice(&i.to_be_bytes());
        f.resize(f.len() + 600, 0xab);
        f
    };
    for i in 0..40u32 {
        a.send_to(&frame(session, i), r.addr).unwrap();
        if i == 20 {
            a.send_to(&frame(0xbad, i), r.addr).unwrap();
        }
    }
    net.hold(r.addr, false);
    let mut buf = vec![0u8; 2048];
    let h = crate::mesh::relay::RELAY_HEADER;
    for i in 0..40u32 {
        let (n, from) = timeout(Duration::from_secs(10), b.recv_from(&mut buf))
            .await
            .expect("every frame relayed")
            .unwrap();
        assert_eq!(from, r.addr);
        assert_eq!(
            &buf[..n],
            &frame(session, i)[..],
            "frame {i} unchanged, in order"
        );
        assert_eq!(u32::from_be_bytes(buf[h..h + 4].try_into().unwrap()), i);
    }
    assert_eq!(r.dev.counters.relayed_packets.load(Ordering::Relaxed), 40);
    assert_eq!(
        r.dev.counters.dropped_relay_unknown.load(Ordering::Relaxed),
        1
    );
    stop.cancel();
}

/// A TUN device whose thread dies of a bug.
struct PanickingTun;

impl TunIo for PanickingTun {
    type Writer = ();
    fn writer(&self) {}
    fn wait_readable(&self) -> std::io::Result<()> {
        panic!("a bug in the TUN thread (expected by this test)")
    }
    fn try_recv_batch(
        &self,
        _: &mut [u8],
        _: &mut [Vec<u8>],
        _: &mut [usize],
    ) -> std::io::Result<usize> {
        Err(std::io::ErrorKind::WouldBlock.into())
    }
    fn send_batch(&self, _: &mut (), bufs: &mut [Vec<u8>]) -> std::io::Result<usize> {
        Ok(bufs.len())
    }
    fn wake(&self) {}
}

/// A data-plane thread that panics ends the data plane (the node sees `run` return and stops)
/// instead of leaving a node that runs on without it.
#[tokio::test]
async fn a_panicking_data_plane_thread_ends_the_data_plane() {
    let net = MemNet::new();
    let secret = StaticSecret::random_from_rng(rand_core::OsRng);
    let udp = net.bind(SocketAddr::from(([192, 0, 2, 1], 51820))).unwrap();
    let (dev, _events) = Device::new(PanickingTun, udp, secret, range(), 3);
    let stop = CancellationToken::new();
    timeout(Duration::from_secs(10), dev.run(stop))
        .await
        .expect("run returns once a thread died");
}

/// A UDP socket that never runs dry: every read returns a full batch of junk (frames of no
/// known type), as under a flood or a bulk sender that always has more queued.
struct EndlessUdp {
    woken: std::sync::atomic::AtomicBool,
}

impl UdpIo for EndlessUdp {
    fn local_addr(&self) -> SocketAddr {
        SocketAddr::from(([192, 0, 2, 1], 51820))
    }
    fn wait_readable(&self) -> std::io::Result<()> {
        if self.woken.load(Ordering::SeqCst) {
            return Err(std::io::ErrorKind::Interrupted.into());
        }
        Ok(())
    }
    fn try_recv_gro(&self, buf: &mut [u8]) -> std::io::Result<(usize, SocketAddr, usize)> {
        let n = buf.len().min(64 * 100);
        buf[..n].fill(0xee);
        Ok((n, SocketAddr::from(([192, 0, 2, 9], 4000)), 100))
    }
    fn send_to(&self, _: &[u8], _: SocketAddr) -> std::io::Result<()> {
        Ok(())
    }
    fn wake(&self) {
        self.woken.store(true, Ordering::SeqCst);
    }
    async fn recv_gro_async(&self, _: &mut [u8]) -> std::io::Result<(usize, SocketAddr, usize)> {
        std::future::pending().await
    }
}

/// Shutdown reaches the receive thread while datagrams keep coming: it goes back to its wait
/// (where a wake-up shows) after a bounded number of reads, however full the socket stays.
#[tokio::test]
async fn the_receive_thread_stops_under_an_endless_flood() {
    let secret = StaticSecret::random_from_rng(rand_core::OsRng);
    let (tun, _handle) = MemTun::new();
    let udp = EndlessUdp {
        woken: Default::default(),
    };
    let (dev, _events) = Device::new(tun, udp, secret, range(), 3);
    let stop = CancellationToken::new();
    let run = tokio::spawn(dev.clone().run(stop.clone()));
    // The flood is being read (and dropped) before shutdown is asked for.
    let deadline = Instant::now() + Duration::from_secs(10);
    while dev.counters.dropped_unknown_frame.load(Ordering::Relaxed) < 10_000 {
        assert!(Instant::now() < deadline, "the flood was never read");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.cancel();
    timeout(Duration::from_secs(10), run)
        .await
        .expect("run returns while the flood goes on")
        .unwrap();
}

/// A TUN device whose next read cannot be split into packets (tun-rs refuses a TCP
/// super-packet of more segments than a read holds: a connection with a tiny MSS).
struct UnsplittableOnce {
    inner: MemTun,
    fail: std::sync::atomic::AtomicBool,
}

impl TunIo for UnsplittableOnce {
    type Writer = <MemTun as TunIo>::Writer;
    fn writer(&self) -> Self::Writer {
        self.inner.writer()
    }
    fn wait_readable(&self) -> std::io::Result<()> {
        self.inner.wait_readable()
    }
    fn try_recv_batch(
        &self,
        scratch: &mut [u8],
        bufs: &mut [Vec<u8>],
        sizes: &mut [usize],
    ) -> std::io::Result<usize> {
        let n = self.inner.try_recv_batch(scratch, bufs, sizes)?;
        if self.fail.swap(false, Ordering::SeqCst) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "too many segments",
            ));
        }
        Ok(n)
    }
    fn send_batch(&self, w: &mut Self::Writer, bufs: &mut [Vec<u8>]) -> std::io::Result<usize> {
        self.inner.send_batch(w, bufs)
    }
    fn wake(&self) {
        self.inner.wake()
    }
}

/// A read the TUN device gave but that cannot be split loses that packet (counted), not the
/// data plane: the next packet still crosses.
#[tokio::test]
async fn an_unsplittable_tun_read_is_dropped_and_counted_not_fatal() {
    let net = MemNet::new();
    let stop = CancellationToken::new();
    let mut b = node(&net, 2, 7, &stop);
    let secret = StaticSecret::random_from_rng(rand_core::OsRng);
    let a_wg = PublicKey::from(&secret).to_bytes();
    let a_addr = SocketAddr::from(([192, 0, 2, 1], 51820));
    let (inner, a_tun) = MemTun::new();
    let tun = UnsplittableOnce {
        inner,
        fail: true.into(),
    };
    let (a, _a_events) = Device::new(tun, net.bind(a_addr).unwrap(), secret, range(), 3);
    tokio::spawn(a.clone().run(stop.clone()));
    a.set_peers(&[spec(&b, vec![b.addr])]);
    b.dev.set_peers(&[PeerSpec {
        node_id: node_id(3),
        name: "n3".into(),
        wg: a_wg,
        slot: 3,
        endpoints: vec![a_addr],
    }]);

    let lost = build_ipv4_udp(ip(3, 1), ip(7, 1), 1000, 2000, b"lost");
    a_tun.inject.send(lost).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while a.counters.dropped_unsplittable.load(Ordering::Relaxed) == 0 {
        assert!(Instant::now() < deadline, "the bad read was never taken");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let next = build_ipv4_udp(ip(3, 1), ip(7, 1), 1000, 2000, b"after-bad-read");
    a_tun.inject.send(next.clone()).await.unwrap();
    assert_eq!(expect_delivery(&mut b, b"after-bad-read").await, next);
    assert_eq!(a.counters.dropped_unsplittable.load(Ordering::Relaxed), 1);
    stop.cancel();
}

/// A send that found a peer just before it was removed (the TUN thread holds it from the table)
/// cannot leave its packet counted against the budget for good: it is dropped and counted.
#[tokio::test]
async fn a_packet_for_a_peer_removed_meanwhile_does_not_keep_budget() {
    let net = MemNet::new();
    let stop = CancellationToken::new();
    let a = node(&net, 1, 3, &stop);
    let gone = unreachable(9, "gone");
    a.dev.set_peers(std::slice::from_ref(&gone));
    let held = a
        .dev
        .peer_by_node(&gone.node_id)
        .expect("the peer is there");
    a.dev.set_peers(&[]);
    // The interleaving: the send looked the peer up before the removal, queues after it.
    let p = build_ipv4_udp(ip(3, 1), ip(9, 1), 1, 2, &[0u8; 100]);
    a.dev.hold_for_session(&held, &p);
    assert_eq!(a.dev.waiting_bytes.load(Ordering::Relaxed), 0);
    assert!(held.waiting.lock().unwrap().is_empty());
    assert_eq!(a.dev.counters.dropped_no_peer.load(Ordering::Relaxed), 1);
    stop.cancel();
}

/// The patched tunnel shares its sessions: one peer's data messages decrypted on two threads
/// at once, each thread trying every message, are accepted exactly once each and intact (a
/// decrypted message counts only when accepted, so a copy decrypted beside it is refused); the
/// tunnel hands out only the session of the exact index, and hears of what was opened outside.
#[test]
fn a_shared_session_opens_one_peers_messages_on_two_threads_once_each() {
    let (mut a, mut b, resp, keepalive) = handshaken();
    let mut buf = vec![0u8; 2048];
    let mut buf2 = vec![0u8; 2048];
    let sealed: Vec<Vec<u8>> = (0..400u32)
        .map(|i| {
            let p = numbered(3, 7, i, 1000);
            match a.encapsulate(&p, &mut buf) {
                TunnResult::WriteToNetwork(d) => d.to_vec(),
                _ => panic!("a session"),
            }
        })
        .collect();
    let index = u32::from_le_bytes(sealed[0][4..8].try_into().unwrap());
    let session = b.data_session(index).expect("B's session for A's messages");
    // The same slot of the ring (index modulo 8), another index: not this session.
    assert!(b.data_session(index ^ 8).is_none(), "only the exact index");
    let accepted: Vec<(u32, usize)> = std::thread::scope(|s| {
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let (session, sealed) = (&session, &sealed);
                s.spawn(move || {
                    let mut out = vec![0u8; 2048];
                    let mut got = Vec::new();
                    for d in sealed {
                        let Ok(Packet::PacketData(p)) = Tunn::parse_incoming_packet(d) else {
                            panic!("data")
                        };
                        // The other thread may have accepted it already: then a duplicate.
                        let Ok((counter, len)) = session.decrypt(p, &mut out) else {
                            continue;
                        };
                        match session.accept(counter, &mut out[..len]) {
                            TunnResult::WriteToTunnelV4(pk, src) => {
                                assert_eq!(src, ip(3, 1));
                                let seq = u32::from_be_bytes(pk[28..32].try_into().unwrap());
                                got.push((seq, pk.len()));
                            }
                            // Seen already: at the quick look (duplicate) or when marking.
                            TunnResult::Err(
                                WireGuardError::DuplicateCounter | WireGuardError::InvalidCounter,
                            ) => {}
                            other => panic!("not opened: {other:?}"),
                        }
                    }
                    got
                })
            })
            .collect();
        threads
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    let mut seqs: Vec<u32> = accepted.iter().map(|o| o.0).collect();
    seqs.sort_unstable();
    assert_eq!(
        seqs,
        (0..400).collect::<Vec<_>>(),
        "each message accepted exactly once"
    );
    let Ok(Packet::PacketData(replay)) = Tunn::parse_incoming_packet(&sealed[7]) else {
        panic!("data")
    };
    assert!(
        matches!(
            session.open(replay, &mut buf2),
            TunnResult::Err(WireGuardError::DuplicateCounter)
        ),
        "a replay is refused"
    );
    let bytes: usize = accepted.iter().map(|o| o.1).sum();
    let rx_before = b.stats().2;
    assert!(b.data_received(&session, bytes));
    assert_eq!(
        b.stats().2 - rx_before,
        bytes,
        "the tunnel counts what was opened outside"
    );
    // A session that is not B's (A's own, for B's messages) is not counted.
    let foreign = a.data_session(u32::from_le_bytes(resp[8..12].try_into().unwrap()));
    let foreign = foreign.expect("A's session for B's messages");
    assert!(!b.data_received(&foreign, 1000), "not one of B's sessions");
    assert_eq!(b.stats().2 - rx_before, bytes);
    // The keepalive A sent at the handshake still opens through the tunnel as before.
    assert!(matches!(
        b.decapsulate(None, &keepalive, &mut buf2),
        TunnResult::Done
    ));
}

/// Under load, with lanes decrypting one peer's reads side by side, copies of its messages that
/// arrive later from another address lose: the originals are delivered once each and in order,
/// no copy is, and the peer's endpoint stays where the originals came from (the replay window
/// and roaming see messages in arrival order, whichever lane decrypted first). Each read of
/// copies arrives one read after its originals, so lanes hold originals and their copies at
/// once. (Whether a copy is decrypted first is up to the scheduler: a race this test offers
/// but cannot force.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn later_copies_neither_win_nor_move_the_endpoint_through_the_lanes() {
    let net = MemNet::new();
    let stop = CancellationToken::new();
    let mut b = node_with_lanes(&net, 2, 7, &stop, (2, 0));
    let a = node(&net, 1, 3, &stop);
    connect(&a, &mut b).await;
    // 47 datagrams of 1,360 bytes fill one coalesced read of the in-memory socket.
    const READ: u32 = 47;
    const READS: u32 = 8;
    let thief = net
        .bind(SocketAddr::from(([192, 0, 2, 66], 51820)))
        .unwrap();
    net.start_capture();
    net.hold(b.addr, true);
    // A's data messages to B so far (not keepalives, 32 bytes), as captured when sent.
    let sent = || -> Vec<Vec<u8>> {
        net.captured()
            .into_iter()
            .filter(|(from, to, d)| {
                *from == a.addr && *to == b.addr && d.first() == Some(&4) && d.len() > 32
            })
            .map(|(_, _, d)| d)
            .collect()
    };
    let mut copies_due: Vec<Vec<u8>> = Vec::new();
    for r in 0..READS {
        for i in r * READ..(r + 1) * READ {
            a.tun.inject.send(numbered(3, 7, i, 1300)).await.unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while sent().len() < ((r + 1) * READ) as usize {
            assert!(Instant::now() < deadline, "A did not send read {r}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // The copies of the read before this one, right behind it.
        for d in copies_due.drain(..) {
            thief.send_to(&d, b.addr).unwrap();
        }
        copies_due = sent().split_off((r * READ) as usize);
    }
    net.hold(b.addr, false);
    let n = READ * READS;
    let mut next = 0u32;
    while next < n {
        let p = timeout(Duration::from_secs(10), b.tun.delivered.recv())
            .await
            .expect("all packets within 10 s")
            .expect("open");
        if p.len() < 32 || u16::from_be_bytes([p[22], p[23]]) != 2 {
            continue;
        }
        let seq = u32::from_be_bytes([p[28], p[29], p[30], p[31]]);
        assert_eq!(seq, next, "in order, once each");
        next += 1;
    }
    // Every copy is in B's hands soon after; none may come through.
    if let Ok(Some(p)) = timeout(Duration::from_millis(500), b.tun.delivered.recv()).await {
        panic!("a copy was delivered: {} bytes", p.len());
    }
    assert!(
        b.dev.counters.lane_reads.load(Ordering::Relaxed) > 0,
        "through the lanes"
    );
    let peer = b.dev.peer_by_node(&node_id(3)).unwrap();
    assert_eq!(
        peer.endpoint(),
        Some(a.addr),
        "the copies did not move the endpoint"
    );
    stop.cancel();
}

/// What a lane does, step by step and in a set order: copies of a peer's messages from another
/// address are decrypted ahead first, the originals after them; in turn, the originals (which
/// arrived first) are judged first. The originals are delivered, every copy is refused as seen,
/// nothing is counted twice, and the endpoint stays. Decrypting ahead marks nothing: marked in
/// decrypt order, the copies would have won.
#[tokio::test]
async fn decrypted_ahead_the_first_to_arrive_still_wins_in_turn() {
    let net = MemNet::new();
    let stop = CancellationToken::new();
    let a = node(&net, 1, 3, &stop);
    let mut b = node(&net, 2, 7, &stop);
    connect(&a, &mut b).await;
    // Five messages that never reach B on their own.
    const N: u32 = 5;
    net.start_capture();
    net.hold(b.addr, true);
    for i in 0..N {
        a.tun.inject.send(numbered(3, 7, i, 1000)).await.unwrap();
    }
    let data = || -> Vec<Vec<u8>> {
        net.captured()
            .into_iter()
            .filter(|(from, _, d)| *from == a.addr && d.first() == Some(&4) && d.len() > 32)
            .map(|(_, _, d)| d)
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while data().len() < N as usize {
        assert!(Instant::now() < deadline, "A did not send");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // One coalesced read of them, as the socket would give it.
    let read = |from: SocketAddr| {
        let mut r = lanes::Read::new();
        let sent = data();
        r.segment = sent[0].len();
        for d in &sent {
            r.buf[r.n..r.n + d.len()].copy_from_slice(d);
            r.n += d.len();
        }
        r.from = from;
        r
    };
    let originals = read(a.addr);
    let copies = read(SocketAddr::from(([192, 0, 2, 66], 51820)));
    let (mut lane_o, mut lane_c) = (Deliver::new(()), Deliver::new(()));
    b.dev.decrypt_ahead(std::iter::once(&copies), &mut lane_c);
    b.dev
        .decrypt_ahead(std::iter::once(&originals), &mut lane_o);
    for lane in [&lane_o, &lane_c] {
        let ahead = lane.ahead.iter().filter(|e| e.is_some()).count();
        assert_eq!(
            ahead, N as usize,
            "every message decrypted ahead, both times"
        );
    }
    let peer = b.dev.peer_by_node(&node_id(3)).unwrap();
    let rx = || peer.counters.rx_packets.load(Ordering::Relaxed);
    let before = rx();
    b.dev.deliver(std::iter::once(&originals), &mut lane_o);
    assert_eq!(
        rx() - before,
        N as u64,
        "the originals, judged first, are delivered"
    );
    let mut next = 0;
    while next < N {
        let p = expect_delivery(&mut b, &[]).await;
        if p.len() > 32 && u16::from_be_bytes([p[22], p[23]]) == 2 {
            assert_eq!(
                u32::from_be_bytes([p[28], p[29], p[30], p[31]]),
                next,
                "in order"
            );
            next += 1;
        }
    }
    b.dev.deliver(std::iter::once(&copies), &mut lane_c);
    assert_eq!(rx() - before, N as u64, "no copy is delivered");
    assert!(
        lane_c.ahead.iter().all(Option::is_none),
        "what was decrypted ahead is used up in turn"
    );
    assert_eq!(peer.endpoint(), Some(a.addr), "the copies moved nothing");
    stop.cancel();
}

/// The counters a tunnel reserves for a run of messages are its own: sealed on two threads at
/// once (the run split in two), every message opens on the other side exactly once and in
/// counter order, no counter is used twice, a run seals no more than it holds, and what the
/// tunnel sends next comes after the run.
#[test]
fn reserved_counters_seal_on_two_threads_each_once_and_in_order() {
    let (mut a, mut b, _, keepalive) = handshaken();
    let mut buf = vec![0u8; 2048];
    let mut buf2 = vec![0u8; 2048];
    assert!(matches!(
        b.decapsulate(None, &keepalive, &mut buf2),
        TunnResult::Done
    ));
    const N: usize = 400;
    let packets: Vec<Vec<u8>> = (0..N as u32).map(|i| numbered(3, 7, i, 1000)).collect();
    let tx_before = a.stats().1;
    // Two runs taken one after the other, as for two reads, sealed side by side.
    let bytes_of = |ps: &[Vec<u8>]| ps.iter().map(|p| p.len()).sum::<usize>();
    let (lo, hi) = packets.split_at(N / 2);
    let mut first = a.reserve_data(N / 2, bytes_of(lo)).expect("a session");
    let mut second = a.reserve_data(N / 2, bytes_of(hi)).expect("a session");
    assert_eq!(
        a.stats().1 - tx_before,
        bytes_of(&packets),
        "the tunnel counts the runs as sent"
    );
    assert_eq!((first.len(), second.len()), (N / 2, N / 2));
    let seal = |run: &mut boringtun::noise::SendCounters, packets: &[Vec<u8>]| -> Vec<Vec<u8>> {
        let mut out = vec![0u8; 2048];
        let sealed = packets
            .iter()
            .map(|p| {
                let n = run.seal(p, &mut out).expect("a counter for each");
                out[..n].to_vec()
            })
            .collect();
        assert!(run.is_empty());
        assert!(
            run.seal(&packets[0], &mut out).is_none(),
            "no more than reserved"
        );
        sealed
    };
    let (one, two) = std::thread::scope(|s| {
        let t1 = s.spawn(|| seal(&mut first, lo));
        let t2 = s.spawn(|| seal(&mut second, hi));
        (t1.join().unwrap(), t2.join().unwrap())
    });
    let TunnResult::WriteToNetwork(after) = a.encapsulate(&packets[0], &mut buf) else {
        panic!("sealed")
    };
    let after = after.to_vec();
    let counter = |d: &[u8]| u64::from_le_bytes(d[8..16].try_into().unwrap());
    let sealed: Vec<Vec<u8>> = one.into_iter().chain(two).collect();
    let counters: Vec<u64> = sealed.iter().map(|d| counter(d)).collect();
    let first_counter = counters[0];
    assert_eq!(
        counters,
        (first_counter..first_counter + N as u64).collect::<Vec<_>>(),
        "the run's counters, each once, in packet order"
    );
    assert_eq!(
        counter(&after),
        first_counter + N as u64,
        "the next send follows the run"
    );
    for (i, d) in sealed.iter().chain([&after]).enumerate() {
        match b.decapsulate(None, d, &mut buf2) {
            TunnResult::WriteToTunnelV4(p, _) => {
                let seq = u32::from_be_bytes(p[28..32].try_into().unwrap());
                assert_eq!(seq as usize, i % N, "opened intact and in order");
            }
            other => panic!("message {i} not opened: {other:?}"),
        }
    }
}

/// With seal lanes, a backlog of reads for two peers is sealed on the lanes and still leaves
/// in order: each peer's messages carry consecutive counters in the order they went out, and
/// each peer gets its packets once and in order.
#[tokio::test]
async fn a_backlog_sealed_on_lanes_leaves_in_order_with_consecutive_counters() {
    let net = MemNet::new();
    let stop = CancellationToken::new();
    let a = node_with_lanes(&net, 1, 3, &stop, (0, 2));
    let mut b = node(&net, 2, 7, &stop);
    let mut c = node(&net, 3, 11, &stop);
    a.dev
        .set_peers(&[spec(&b, vec![b.addr]), spec(&c, vec![c.addr])]);
    for (n, s) in [(7u32, &mut b), (11, &mut c)] {
        s.dev.set_peers(&[spec(&a, vec![a.addr])]);
        let hello = format!("hello{n}");
        a.tun
            .inject
            .send(build_ipv4_udp(ip(3, 1), ip(n, 1), 1, 1, hello.as_bytes()))
            .await
            .unwrap();
        expect_delivery(s, hello.as_bytes()).await;
    }
    // A's sending waits while the backlog is queued, in blocks of 8 packets per peer, so its
    // reads hold runs for both: then several reads are ready at once.
    const N: u32 = 480;
    {
        let _held = a.dev.tx.lock().unwrap();
        for i in 0..N {
            let to = if (i / 8) % 2 == 0 { 7 } else { 11 };
            a.tun.inject.try_send(numbered(3, to, i, 1200)).unwrap();
        }
        net.start_capture();
    }
    let got = [
        delivered_numbers(&mut b, N as usize / 2).await,
        delivered_numbers(&mut c, N as usize / 2).await,
    ];
    let sent =
        |to: u32| -> Vec<u32> { (0..N).filter(|i| ((i / 8) % 2 == 0) == (to == 7)).collect() };
    assert_eq!(got[0], sent(7), "B gets its packets once and in order");
    assert_eq!(got[1], sent(11), "C gets its packets once and in order");
    for to in [b.addr, c.addr] {
        let counters: Vec<u64> = net
            .captured()
            .iter()
            .filter(|(from, dst, d)| *from == a.addr && *dst == to && d[0] == 4 && d.len() > 32)
            .map(|(_, _, d)| u64::from_le_bytes(d[8..16].try_into().unwrap()))
            .collect();
        assert_eq!(counters.len(), N as usize / 2);
        let start = counters[0];
        assert_eq!(
            counters,
            (start..start + N as u64 / 2).collect::<Vec<_>>(),
            "consecutive counters in the order they went out to {to}"
        );
    }
    assert!(
        a.dev.counters.sealed_on_lanes.load(Ordering::Relaxed) > 0,
        "the backlog went through the seal lanes"
    );
    stop.cancel();
}
