//! The latency floor for benches/throughput.sh: a UDP round trip between two plain processes
//! over the same veth, no tunnel. A userspace tunnel's ping wakes at least two such processes
//! per round trip (each end's daemon) on top of ping itself, so this is what the machine's
//! scheduler and idle states cost before any tunnel code runs.
//!
//!   udp_echo serve ADDR            echo every datagram back (until killed)
//!   udp_echo ping ADDR COUNT GAP_MS  COUNT round trips, GAP_MS apart; prints "p50 p99" in ms

use std::net::UdpSocket;
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: udp_echo serve ADDR | udp_echo ping ADDR COUNT GAP_MS";
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["serve", addr] => {
            let s = UdpSocket::bind(addr).expect("binding the echo socket");
            let mut buf = [0u8; 2048];
            while let Ok((n, from)) = s.recv_from(&mut buf) {
                let _ = s.send_to(&buf[..n], from);
            }
        }
        ["ping", addr, count, gap] => {
            let count: usize = count.parse().expect(usage);
            let gap = Duration::from_millis(gap.parse().expect(usage));
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            s.connect(addr).expect("the echo address");
            s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
            let mut rtt = Vec::with_capacity(count);
            let mut buf = [0u8; 2048];
            for i in 0..count as u64 {
                let t = Instant::now();
                s.send(&i.to_be_bytes()).expect("sending");
                // A late answer to an earlier probe is skipped, not counted for this one.
                while let Ok(n) = s.recv(&mut buf) {
                    if buf[..n] == i.to_be_bytes() {
                        rtt.push(t.elapsed().as_secs_f64() * 1e3);
                        break;
                    }
                }
                std::thread::sleep(gap);
            }
            assert!(!rtt.is_empty(), "no echo answered");
            rtt.sort_by(|a, b| a.total_cmp(b));
            let q = |f: f64| rtt[((f * rtt.len() as f64) as usize).min(rtt.len() - 1)];
            println!("{:.3} {:.3}", q(0.50), q(0.99));
        }
        _ => {
            eprintln!("{usage}");
            std::process::exit(2);
        }
    }
}
