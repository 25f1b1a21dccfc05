//! Memory of a node's state at 3, 100 and 1,000 peers: the control plane's view of the mesh
//! (every member's certificate and signed records, the snapshot the node's parts read) and the
//! data plane with a WireGuard session to every peer, in one process with the in-memory I/O
//! twins. Each size runs in a process of its own (this binary again), which measures its
//! resident set after the handshakes, with the remote ends gone and freed memory given back;
//! the table shows each size against an empty node, and the cost per peer.
//!
//! It does not include what a real meshd adds whatever its peer count (code, the async runtime,
//! DNS, the control socket): `benches/memory.sh` measures real processes with 3 peers.
//!
//!     cargo bench --bench peers_memory --features testing

use meshd::id::NodeId;
use meshd::mesh::io::UdpIo;
use meshd::mesh::{Device, PeerSpec};
use meshd::node::view::View;
use meshd::testing::fixtures::World;
use meshd::testing::mem::{MemNet, MemTun};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(n) = args
        .iter()
        .position(|a| a == "--peers")
        .map(|i| &args[i + 1])
    {
        let n: usize = n.parse().expect("--peers N");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(one_size(n));
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let measure = |n: usize| -> (u64, u64) {
        let out = std::process::Command::new(&exe)
            .args(["--peers", &n.to_string()])
            .output()
            .expect("run a size");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let s = String::from_utf8_lossy(&out.stdout);
        let mut it = s.split_whitespace().map(|v| v.parse::<u64>().unwrap());
        (it.next().unwrap(), it.next().unwrap())
    };
    println!("peers_memory: a node's state with a session to every peer (in-memory I/O)");
    let (rss0, anon0) = measure(0);
    println!(
        "{:>6}{:>10}{:>12}{:>18}",
        "peers", "RSS MB", "anon MB", "anon KiB / peer"
    );
    println!(
        "{:>6}{:>10.1}{:>12.1}{:>18}",
        0,
        rss0 as f64 / 1024.0,
        anon0 as f64 / 1024.0,
        "-"
    );
    for n in [3usize, 100, 1000] {
        let (rss, anon) = measure(n);
        println!(
            "{:>6}{:>10.1}{:>12.1}{:>18.1}",
            n,
            rss as f64 / 1024.0,
            anon as f64 / 1024.0,
            (anon.saturating_sub(anon0)) as f64 / n as f64
        );
    }
}

/// Build a node with `n` peers, handshake with every one, drop the remote ends, and print
/// "VmRSS RssAnon" in KiB.
async fn one_size(n: usize) {
    let world = World::new("10.128.0.0/9");
    let (membership, members) = world.mesh(n + 1);
    let view = View::new(membership, Instant::now());
    let range = world.params.range;
    let own_slot = view
        .snapshot()
        .peers
        .iter()
        .map(|p| p.slot)
        .max()
        .map_or(1, |s| s + 1);

    let net = MemNet::new();
    let me = SocketAddr::from(([192, 0, 2, 1], 51820));
    let (tun, _tun_handle) = MemTun::new();
    let (dev, _events) = Device::new(
        tun,
        net.bind(me).unwrap(),
        members[0].0.wireguard.clone(),
        range,
        own_slot,
    );
    let stop = CancellationToken::new();
    let running = tokio::spawn(dev.clone().run(stop.clone()));

    // The remote ends: a socket and a tunnel each, answering the node's first initiation.
    let mut remotes = Vec::new();
    let mut specs = Vec::new();
    for (i, (keys, cert)) in members.iter().enumerate().skip(1) {
        let addr = SocketAddr::from(([198, 18, (i / 250) as u8, (i % 250) as u8 + 1], 51820));
        let tunn = boringtun::noise::Tunn::new(
            keys.wireguard.clone(),
            x25519_dalek::PublicKey::from(&members[0].0.wireguard),
            None,
            None,
            i as u32,
            None,
        );
        remotes.push((net.bind(addr).unwrap(), tunn));
        let mut id = [0u8; 8];
        id.copy_from_slice(&cert.node_id.0[..8]);
        specs.push(PeerSpec {
            node_id: NodeId(id),
            name: format!("n{i}"),
            wg: keys.wg_public(),
            slot: i as u32,
            endpoints: vec![addr],
        });
    }
    dev.set_peers(&specs);
    // Answer the node's latest initiation from every remote end that has no session yet, at
    // most 150 a second: the node demands cookies past 400 handshake messages a second, which
    // these plain remote ends do not follow up.
    let mut buf = vec![0u8; 2048];
    let mut out = vec![0u8; 2048];
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let up: std::collections::HashSet<String> = dev
            .stats()
            .into_iter()
            .filter(|s| s.has_session())
            .map(|s| s.name)
            .collect();
        if up.len() == n {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {n} handshakes completed",
            up.len()
        );
        let mut answered = 0;
        for (i, (sock, tunn)) in remotes.iter_mut().enumerate() {
            if up.contains(&format!("n{}", i + 1)) || answered == 150 {
                continue;
            }
            let mut latest = None;
            while let Ok(Ok((len, from))) =
                tokio::time::timeout(Duration::from_millis(1), sock.recv_from(&mut buf)).await
            {
                if buf[0] == 1 {
                    latest = Some((buf[..len].to_vec(), from));
                }
            }
            if let Some((init, from)) = latest {
                if let boringtun::noise::TunnResult::WriteToNetwork(answer) =
                    tunn.decapsulate(Some(from.ip()), &init, &mut out)
                {
                    sock.send_to(answer, from).unwrap();
                    answered += 1;
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    drop(remotes);
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim takes no pointers; it returns freed heap memory to the system.
    unsafe {
        libc::malloc_trim(0);
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    println!("{} {}", field("VmRSS:"), field("RssAnon:"));
    stop.cancel();
    let _ = running.await;
    drop(view);
}
