//! `meshd demo`: the one-machine way to see meshd work (like `consul agent -dev`). As root it
//! builds a LAN of network namespaces, starts one real `meshd` per namespace through the real
//! `init`/`join` path, shows `meshctl status` and a reachability matrix over the mesh, and on
//! Ctrl-C (or with `--once`) removes everything it made.

pub mod lab;

use crate::control::client::Client;
use crate::control::StatusReport;
use lab::{ping, Lan, Netns};
use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, ExitCode, Stdio};
use std::time::{Duration, Instant};

const PREFIX: &str = "meshd-demo";
const MAX_NODES: usize = 16;

struct Demo {
    children: Vec<Child>,
    lan: Option<Lan>,
    dir: PathBuf,
}

impl Demo {
    fn stop(&mut self) {
        for c in &mut self.children {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for c in &mut self.children {
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        self.children.clear();
        self.lan = None; // deletes the namespaces (and anything left in them)
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        self.stop();
    }
}

fn remove_stale() {
    let stale = Netns::list(PREFIX);
    if !stale.is_empty() {
        eprintln!(
            "removing namespaces left by an earlier demo: {}",
            stale.join(" ")
        );
    }
    // Hosts before the hub.
    for name in stale.iter().rev() {
        if let Ok(ns) = Netns::open(name) {
            let _ = ns.delete();
        }
    }
}

pub async fn run(nodes: usize, once: bool) -> anyhow::Result<ExitCode> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        anyhow::bail!("meshd demo needs root: it creates network namespaces. Run it with sudo");
    }
    if !(2..=MAX_NODES).contains(&nodes) {
        anyhow::bail!("--nodes must be between 2 and {MAX_NODES}");
    }
    let exe = std::env::current_exe()?;
    tokio::task::spawn_blocking(move || demo(exe, nodes, once)).await?
}

fn demo(exe: PathBuf, n: usize, once: bool) -> anyhow::Result<ExitCode> {
    remove_stale();
    let dir = std::env::temp_dir().join(format!("meshd-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut d = Demo {
        children: Vec::new(),
        lan: None,
        dir: dir.clone(),
    };
    let stop = install_signal_flag()?;
    eprintln!(
        "creating {n} machines (network namespaces {PREFIX}-1..{n}) on a bridge, 198.51.100.0/24"
    );
    d.lan = Some(Lan::create(PREFIX, n, Ipv4Addr::new(198, 51, 100, 0))?);
    let names: Vec<String> = (1..=n).map(|i| format!("node{i}")).collect();
    let socket = |i: usize| dir.join(format!("node{}.sock", i + 1));

    // node1: meshd init; read its join line.
    let mut token = String::new();
    for (i, name) in names.iter().enumerate() {
        let lan = d.lan.as_ref().expect("lan");
        let host = &lan.hosts[i];
        let mut cmd = host.ns.command(&exe);
        let state = dir.join(name);
        let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
        if i == 0 {
            cmd.arg("init");
        } else {
            cmd.args(["join", &token]);
        }
        cmd.args(["--name", name])
            .arg("--endpoint")
            .arg(format!("{}:51820", host.addr))
            .arg("--state-dir")
            .arg(&state)
            .arg("--socket")
            .arg(socket(i))
            .env("MESHD_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log);
        eprintln!(
            "  {}: meshd {} (in {})",
            names[i],
            if i == 0 { "init" } else { "join <token>" },
            host.ns.name()
        );
        let mut child = cmd.spawn()?;
        let stdout = child.stdout.take().expect("piped");
        d.children.push(child);
        if i == 0 {
            token = read_join_line(stdout, Duration::from_secs(30))
                .map_err(|e| anyhow::anyhow!("{e}; see {}", dir.join("node1.log").display()))?;
        }
    }

    // Wait for every node to report every peer, then for all-pairs reachability.
    let start = Instant::now();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let statuses = loop {
        let st: Vec<Option<StatusReport>> = (0..n)
            .map(|i| {
                rt.block_on(Client::new(socket(i)).get::<StatusReport>("/v1/status"))
                    .ok()
            })
            .collect();
        if st.iter().all(|s| {
            s.as_ref()
                .is_some_and(|s| s.peers.len() == n - 1 && s.peers.iter().all(|p| p.online))
        }) {
            break st
                .into_iter()
                .map(|s| s.expect("checked"))
                .collect::<Vec<_>>();
        }
        if Instant::now() > deadline || stop.load(std::sync::atomic::Ordering::Relaxed) {
            anyhow::bail!(
                "the mesh did not come up within 60 s; logs are in {}",
                dir.display()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let ips: Vec<Ipv4Addr> = statuses
        .iter()
        .map(|s| s.me.mesh_ip.parse().expect("ip"))
        .collect();
    let lan = d.lan.as_ref().expect("lan");
    let mut matrix = vec![vec![None; n]; n];
    let mut all = true;
    for (i, row) in matrix.iter_mut().enumerate() {
        for (j, cell) in row.iter_mut().enumerate() {
            if i == j {
                continue;
            }
            *cell = (0..10)
                .find_map(|_| ping(&lan.hosts[i].ns, ips[j], Duration::from_millis(500)).ok());
            all &= cell.is_some();
        }
    }
    let took = start.elapsed();

    for (i, s) in statuses.iter().enumerate() {
        println!("$ meshctl status   # on {}", names[i]);
        print!("{}", crate::cli::format::status(s));
        println!();
    }
    println!("reachability over the mesh (ICMP echo, round-trip time):");
    print!("{:>8}", "from\\to");
    for name in &names {
        print!("{name:>10}");
    }
    println!();
    for (i, row) in matrix.iter().enumerate() {
        print!("{:>8}", names[i]);
        for (j, c) in row.iter().enumerate() {
            let cell = match (i == j, c) {
                (true, _) => "-".to_string(),
                (false, Some(rtt)) => format!("{:.2}ms", rtt.as_secs_f64() * 1000.0),
                (false, None) => "FAIL".to_string(),
            };
            print!("{cell:>10}");
        }
        println!();
    }
    println!(
        "\n{} of {} pairs reachable; mesh up {:.1}s after the joins started",
        matrix.iter().flatten().filter(|c| c.is_some()).count(),
        n * (n - 1),
        took.as_secs_f64()
    );
    if !once {
        println!("\nThe mesh keeps running. Try, in another terminal:");
        println!("  sudo ip netns exec {PREFIX}-1 ping {}", ips[n - 1]);
        println!(
            "  sudo ip netns exec {PREFIX}-2 {} --socket {} status",
            exe.with_file_name("meshctl").display(),
            socket(1).display()
        );
        println!("Press Ctrl-C to stop and remove everything.");
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    eprintln!("stopping the nodes and removing the namespaces");
    d.stop();
    eprintln!("done: nothing left behind");
    Ok(if all {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn read_join_line(stdout: std::process::ChildStdout, timeout: Duration) -> anyhow::Result<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(t) = line.strip_prefix("meshd join ") {
                let _ = tx.send(t.trim().to_string());
                return;
            }
        }
    });
    rx.recv_timeout(timeout)
        .map_err(|_| anyhow::anyhow!("meshd init did not print a join line within {timeout:?}"))
}

/// SIGINT/SIGTERM set a flag the demo loop polls, so cleanup always runs.
fn install_signal_flag() -> anyhow::Result<std::sync::Arc<std::sync::atomic::AtomicBool>> {
    let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let f = flag.clone();
    let handle = tokio::runtime::Handle::current();
    handle.spawn(async move {
        crate::util::shutdown_signal().await;
        f.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    Ok(flag)
}
