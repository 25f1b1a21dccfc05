//! The crypto floor of the data plane: ChaCha20-Poly1305 on 1,420-byte packets (a full packet at
//! the tunnel's MTU), on one core, in process (no kernel, no other thread).
//!
//! - ring's seal and open alone (`LessSafeKey`, in place): what any tunnel built on ring pays;
//! - the same through the session meshd uses (vendored boringtun): counters taken for a run
//!   with `Tunn::reserve_data` and each message sealed with `SendCounters::seal`, and messages
//!   opened with `Session::decrypt` + `Session::accept` (copy, replay window, inner header);
//! - `openssl speed` on the same size, when `openssl` is installed: the fastest ChaCha20-Poly1305
//!   on this CPU we know of (OpenSSL has AVX-512 code for it; ring's fastest here is AVX2).
//!
//! It prints microseconds per packet, Gbit/s of packets, the session path against ring alone,
//! and the ceiling that crypto alone puts on a tunnel: Mbit/s per core when one core seals and
//! opens every packet and does nothing else.
//!
//! cargo bench --bench crypto --features testing [-- PACKETS ROUNDS]
//!     (default 50000 packets, 5 rounds)
//! cargo bench --bench crypto --features testing -- --floor
//!     one line, "SEAL_US OPEN_US" through the session path (benches/throughput.sh reads it)

use boringtun::noise::{Packet, Session, Tunn, TunnResult};
use meshd::mesh::packet::build_ipv4_udp;
use meshd::testing::tunnels;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305};
use std::hint::black_box;
use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

/// A packet at the tunnel's MTU.
const LEN: usize = 1420;
/// A data message's header and tag around the packet.
const OVERHEAD: usize = 32;

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let floor = args.iter().any(|a| a == "--floor");
    let mut nums = args.iter().filter_map(|a| a.parse::<usize>().ok());
    let packets = nums.next().unwrap_or(if floor { 20_000 } else { 50_000 });
    let rounds = nums.next().unwrap_or(if floor { 3 } else { 5 });

    let packet = build_ipv4_udp(
        Ipv4Addr::new(10, 210, 3, 1),
        Ipv4Addr::new(10, 210, 7, 1),
        1,
        2,
        &[7u8; LEN - 28],
    );
    assert_eq!(packet.len(), LEN);
    let (mut a, b) = handshaken();
    let session = b.1;
    let mut b = b.0;
    let key = LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &[7u8; 32]).unwrap());

    // [ring seal, ring open, session seal, session open], seconds per packet, per round.
    let mut secs: [Vec<f64>; 4] = Default::default();
    for _ in 0..rounds {
        secs[0].push(ring_seal(&key, &packet, packets));
        secs[1].push(ring_open(&key, &packet, packets));
        let (seal, messages) = session_seal(&mut a, &packet, packets);
        secs[2].push(seal);
        secs[3].push(session_open(&mut b, &session, &messages));
    }
    let us: Vec<f64> = secs.iter_mut().map(|s| median(s) * 1e6).collect();
    if floor {
        println!("{:.4} {:.4}", us[2], us[3]);
        return;
    }
    let gbit = |us: f64| LEN as f64 * 8.0 / us / 1e3;
    println!(
        "crypto: ChaCha20-Poly1305 on {LEN}-byte packets, one core, {packets} packets, median of {rounds}"
    );
    println!("  {:<34}{:>10}{:>10}", "", "us/packet", "Gbit/s");
    let names = [
        "ring seal",
        "ring open",
        "meshd's session seal (reserved)",
        "meshd's session open (+ replay)",
    ];
    for (name, us) in names.iter().zip(&us) {
        println!("  {name:<34}{us:>10.3}{:>10.2}", gbit(*us));
    }
    println!(
        "  session path / ring alone: {:.2}x seal, {:.2}x open (time per packet)",
        us[2] / us[0],
        us[3] / us[1]
    );
    if let Some(ssl_us) = openssl_seal_us() {
        println!(
            "  openssl speed (seal):              {ssl_us:>10.3}{:>10.2}   ring seal / openssl: {:.2}x",
            gbit(ssl_us),
            us[0] / ssl_us
        );
    } else {
        println!("  (openssl not installed: no reference beyond ring)");
    }
    // One core sealing and opening every packet of a tunnel, nothing else: TCP carries
    // LEN - 52 bytes of data per packet (IPv4, TCP with timestamps).
    let per_packet = (us[2] + us[3]) * 1e-6;
    let ceiling = (LEN - 52) as f64 * 8.0 / per_packet / 1e6;
    println!(
        "  crypto ceiling: {ceiling:.0} Mbit/s of TCP per core ({:.3} cores per Gbit/s), when a core \
         only seals and opens",
        1000.0 / ceiling
    );
}

/// Two tunnels with a session: A sends to B. B's half is its tunnel and the session A's
/// messages are for.
fn handshaken() -> (Tunn, (Tunn, Arc<Session>)) {
    let (a, mut b, _, keepalive) = tunnels::handshaken();
    // B's session begins with A's first message (the keepalive).
    let Ok(Packet::PacketData(p)) = Tunn::parse_incoming_packet(&keepalive) else {
        panic!("a data message")
    };
    let session = b.data_session(p.receiver_idx).expect("B's session");
    let mut buf = vec![0u8; 2048];
    assert!(matches!(
        b.decapsulate(None, &keepalive, &mut buf),
        TunnResult::Done
    ));
    (a, (b, session))
}

fn ring_seal(key: &LessSafeKey, packet: &[u8], n: usize) -> f64 {
    let mut buf = packet.to_vec();
    let t = Instant::now();
    for i in 0..n as u64 {
        let tag = key
            .seal_in_place_separate_tag(nonce(i), Aad::empty(), &mut buf)
            .unwrap();
        let _ = black_box(tag);
    }
    t.elapsed().as_secs_f64() / n as f64
}

/// Opens `n` messages sealed beforehand (outside the clock), each in place once.
fn ring_open(key: &LessSafeKey, packet: &[u8], n: usize) -> f64 {
    let mut sealed: Vec<Vec<u8>> = (0..n as u64)
        .map(|i| {
            let mut m = packet.to_vec();
            key.seal_in_place_append_tag(nonce(i), Aad::empty(), &mut m)
                .unwrap();
            m
        })
        .collect();
    let t = Instant::now();
    for (i, m) in sealed.iter_mut().enumerate() {
        let plain = key
            .open_in_place(nonce(i as u64), Aad::empty(), m)
            .expect("opens");
        let _ = black_box(plain);
    }
    let secs = t.elapsed().as_secs_f64() / n as f64;
    assert!(sealed.iter().all(|m| m[..LEN] == *packet), "opened intact");
    secs
}

fn nonce(counter: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_le_bytes());
    Nonce::assume_unique_for_key(n)
}

/// Seals `n` copies of `packet` as meshd's send path does: one run of counters taken under the
/// tunnel, then each message sealed into its own place. Returns the time per packet and the
/// messages.
fn session_seal(a: &mut Tunn, packet: &[u8], n: usize) -> (f64, Vec<Vec<u8>>) {
    let mut out: Vec<Vec<u8>> = (0..n).map(|_| vec![0u8; LEN + OVERHEAD]).collect();
    let t = Instant::now();
    // Runs of 128, as from one TUN read.
    for chunk in out.chunks_mut(128) {
        let mut counters = a.reserve_data(chunk.len(), chunk.len() * LEN).unwrap();
        for m in chunk.iter_mut() {
            let len = counters.seal(packet, m).unwrap();
            debug_assert_eq!(len, LEN + OVERHEAD);
        }
    }
    (t.elapsed().as_secs_f64() / n as f64, out)
}

/// Opens the messages as meshd's receive path does: decrypt (copy, quick replay check, open)
/// and accept (mark the counter, check the inner header); the tunnel hears of each run.
fn session_open(b: &mut Tunn, session: &Session, messages: &[Vec<u8>]) -> f64 {
    let mut dst = vec![0u8; LEN + OVERHEAD];
    let mut accepted = 0usize;
    let t = Instant::now();
    for chunk in messages.chunks(128) {
        for m in chunk {
            let Ok(Packet::PacketData(p)) = Tunn::parse_incoming_packet(m) else {
                panic!("a data message")
            };
            let (counter, len) = session.decrypt(p, &mut dst).expect("opens");
            if let TunnResult::WriteToTunnelV4(inner, _) = session.accept(counter, &mut dst[..len])
            {
                accepted += 1;
                let _ = black_box(inner);
            }
        }
        b.data_received(session, chunk.len() * LEN);
    }
    let secs = t.elapsed().as_secs_f64() / messages.len() as f64;
    assert_eq!(accepted, messages.len(), "every message accepted once");
    secs
}

/// `openssl speed` sealing LEN-byte messages, microseconds per message; None without openssl.
fn openssl_seal_us() -> Option<f64> {
    let out = Command::new("openssl")
        .args(["speed", "-seconds", "2", "-bytes", &LEN.to_string()])
        .args(["-evp", "chacha20-poly1305"])
        .output()
        .ok()?;
    // The last line: "ChaCha20-Poly1305  1710399.94k" (thousands of bytes per second).
    let text = String::from_utf8_lossy(&out.stdout);
    let kbytes: f64 = text
        .lines()
        .last()?
        .split_whitespace()
        .last()?
        .trim_end_matches('k')
        .parse()
        .ok()?;
    Some(LEN as f64 / (kbytes * 1e3) * 1e6)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}
