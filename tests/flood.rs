//! A member under a handshake flood: 10,000 WireGuard initiations a second from a non-member
//! address (valid MAC1, a thousand made-up keys, replayed). The handshake rate limiter answers
//! with cookies before any Diffie-Hellman, so traffic between members goes on: ping loss stays
//! under 1% and nobody is reported offline.
//!
//! ```text
//!   [h1] a  <== 10k initiations/s ==  [h4] flooder (not a member)
//!   [h2] b, [h3] c: ping a and each other all along
//! ```

mod common;

use base64::Engine;
use boringtun::noise::{Tunn, TunnResult};
use common::Lab;
use meshd::cli::demo::lab::ping_all;
use meshd::control::PeerState;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use x25519_dalek::{PublicKey, StaticSecret};

const RATE: u64 = 10_000;
const FLOOD: Duration = Duration::from_secs(10);

#[test]
fn a_handshake_flood_from_a_stranger_does_not_disturb_the_members() {
    let mut lab = Lab::new("flood", 4);
    lab.form(&["a", "b", "c"]);
    let ips: Vec<_> = (0..3).map(|h| lab.mesh_ip(h)).collect();

    // A thousand initiations to a from made-up keys: valid WireGuard messages a must look at.
    let a_key: [u8; 32] = base64::engine::general_purpose::STANDARD
        .decode(lab.status(0).me.wg_key)
        .unwrap()
        .try_into()
        .unwrap();
    let initiations: Vec<Vec<u8>> = (0..1000u32)
        .map(|i| {
            let mut t = Tunn::new(
                StaticSecret::random_from_rng(rand_core::OsRng),
                PublicKey::from(a_key),
                None,
                None,
                i,
                None,
            );
            let mut buf = vec![0u8; 256];
            match t.format_handshake_initiation(&mut buf, false) {
                TunnResult::WriteToNetwork(d) => d.to_vec(),
                _ => panic!("an initiation"),
            }
        })
        .collect();
    let target = SocketAddr::from((lab.addr(0), 51820));
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let (s2, n2) = (stop.clone(), sent.clone());
    let flooder = lab
        .ns(3)
        .spawn(move || {
            let sock = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
            let start = Instant::now();
            let mut k = 0usize;
            while !s2.load(Ordering::Relaxed) && start.elapsed() < FLOOD * 2 {
                // Paced: the count due by now, in bursts of at most 100.
                let due = (start.elapsed().as_secs_f64() * RATE as f64) as u64;
                let behind = due.saturating_sub(n2.load(Ordering::Relaxed)).min(100);
                for _ in 0..behind {
                    let _ = sock.send_to(&initiations[k % initiations.len()], target);
                    k += 1;
                    n2.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        })
        .unwrap();

    // Members ping each other all along, and nobody may see anybody offline.
    let start = Instant::now();
    let (mut asked, mut answered) = (0usize, 0usize);
    let mut offline = Vec::new();
    let mut round = 0;
    while start.elapsed() < FLOOD {
        for from in [1usize, 2] {
            let targets: Vec<_> = (0..3).filter(|j| *j != from).map(|j| ips[j]).collect();
            let got = ping_all(lab.ns(from), &targets, Duration::from_secs(1)).unwrap();
            asked += got.len();
            answered += got.iter().filter(|r| r.is_some()).count();
        }
        round += 1;
        if round % 5 == 0 {
            for h in 0..3 {
                for p in lab.status(h).peers {
                    if p.state == PeerState::Offline {
                        offline.push(format!("{} saw {} offline", h, p.name));
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    flooder.join().unwrap().unwrap();
    let rate = sent.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64();
    let loss = 1.0 - answered as f64 / asked as f64;
    println!(
        "flood of {rate:.0} initiations/s: {answered}/{asked} pings answered ({:.2}% loss)",
        loss * 100.0
    );
    assert!(rate >= RATE as f64 * 0.9, "the flood ran at {rate:.0}/s");
    assert!(asked >= 200, "{asked} pings");
    assert!(loss < 0.01, "{:.2}% of pings lost", loss * 100.0);
    assert!(offline.is_empty(), "{offline:?}");
    // The flood reached a, and all but a small part of it was answered with cookies before
    // any Diffie-Hellman: only initiations under the rate limit get as far as the key lookup
    // (and are dropped there, as from unknown keys).
    let d = lab.status(0).drops;
    let total = sent.load(Ordering::Relaxed);
    println!(
        "a dropped {} of {total} initiations after the key lookup",
        d.unknown_peer
    );
    assert!(d.unknown_peer > 0, "{d:?}");
    assert!(d.unknown_peer < total / 10, "{d:?} of {total}");
}
