//! A fleet forming at once: N real `meshd` processes, each in its own network namespace on one
//! bridge; `meshd init` on the first and `meshd join` on the other N-1 at the same moment. It
//! prints what a fleet operator cares about:
//!
//! - time from the joins' start to full membership on every node, and to all-pairs
//!   reachability (every node pings every other's mesh address);
//! - false "offline" reports during formation (every process is up the whole time);
//! - idle CPU, RSS and underlay bytes/s per node once formed;
//! - a `kill -9`ed node: time until every node reports it offline; restarted with `meshd run`:
//!   time until every node reports it online again.
//!
//! Run as root: `benches/scale.sh [N]` (N defaults to 100; the default mesh range /16 holds 256
//! nodes). `SCALE_MESHD=PATH` runs another meshd build (the packaged static one, say) instead of
//! this tree's. Everything it made is removed when it ends, also on failure.

#[path = "../tests/common/mod.rs"]
mod common;

use common::fleet::{census, reports_of};
use common::Lab;
use meshd::control::PeerState;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

const FORM_DEADLINE: Duration = Duration::from_secs(120);
const IDLE_SETTLE: Duration = Duration::from_secs(10);
const IDLE_WINDOW: Duration = Duration::from_secs(20);

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

/// Bytes in and out of a host's underlay interface.
fn underlay_bytes(lab: &Lab, h: usize) -> u64 {
    lab.ns(h)
        .run(|| {
            let dev = std::fs::read_to_string("/proc/thread-self/net/dev").unwrap_or_default();
            dev.lines()
                .find_map(|l| l.trim_start().strip_prefix("eth0:"))
                .map(|v| {
                    let f: Vec<u64> = v
                        .split_whitespace()
                        .filter_map(|x| x.parse().ok())
                        .collect();
                    f.first().copied().unwrap_or(0) + f.get(8).copied().unwrap_or(0)
                })
                .unwrap_or(0)
        })
        .unwrap_or(0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(100);
    assert!(
        (2..=250).contains(&n),
        "N must be 2-250 (the underlay is one /24)"
    );
    let mut lab = Lab::new("scale", n);
    lab.env.push((
        "MESHD_LOG".into(),
        std::env::var("SCALE_MESHD_LOG").unwrap_or_else(|_| "info".into()),
    ));
    if let Ok(bin) = std::env::var("SCALE_MESHD") {
        lab.meshd = bin.into();
    }
    let hosts: Vec<usize> = (0..n).collect();
    println!(
        "scale: {n} meshd processes, 1 init + {} joins at once",
        n - 1
    );

    // Formation.
    let start = lab.form_at_once(n);
    let mut offline_seen = BTreeSet::new();
    let mut complete_at: Vec<Option<Duration>> = vec![None; n];
    let mut t_members = None;
    let mut t_reach = None;
    let mut last = String::new();
    while t_reach.is_none() {
        if start.elapsed() > FORM_DEADLINE {
            if let Ok(hold) = std::env::var("SCALE_HOLD") {
                eprintln!(
                    "holding for {hold} s: {last}; state in {}",
                    lab.dir.path().display()
                );
                std::thread::sleep(Duration::from_secs(hold.parse().unwrap_or(600)));
            }
            panic!("not formed within {FORM_DEADLINE:?}: {last}");
        }
        let st = lab.statuses(&hosts);
        let c = census(&hosts, &st, n);
        offline_seen.extend(c.offline.iter().cloned());
        for (h, s) in st.iter().enumerate() {
            if complete_at[h].is_none() && s.as_ref().is_some_and(|s| s.mesh.members == n) {
                complete_at[h] = Some(start.elapsed());
            }
        }
        last = format!(
            "{}/{n} nodes list every member, {}/{n} see every peer online",
            c.complete, c.all_online
        );
        if t_members.is_none() && c.complete == n {
            t_members = Some(start.elapsed());
        }
        if t_members.is_some() && c.ips.len() == n {
            let ips: Vec<_> = hosts.iter().map(|h| c.ips[h]).collect();
            let missing = lab.unreachable_pairs(&hosts, &ips);
            if missing.is_empty() {
                t_reach = Some(start.elapsed());
            } else {
                last += &format!(", {} pairs unreachable", missing.len());
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let (t_members, t_reach) = (t_members.unwrap(), t_reach.unwrap());

    let mut order: Vec<(Duration, usize)> = complete_at
        .iter()
        .enumerate()
        .map(|(h, t)| (t.unwrap_or(t_members), h))
        .collect();
    order.sort();
    let slowest: Vec<String> = order
        .iter()
        .rev()
        .take(5)
        .map(|(t, h)| format!("n{h} {:.1}s", t.as_secs_f64()))
        .collect();
    if let Ok(dir) = std::env::var("SCALE_LOGS") {
        let _ = std::fs::create_dir_all(&dir);
        for h in &hosts {
            let _ = std::fs::write(format!("{dir}/n{h}.log"), lab.log_text(*h));
        }
    }

    // Idle.
    std::thread::sleep(IDLE_SETTLE);
    let pids: Vec<u32> = hosts
        .iter()
        .map(|h| lab.pid(*h).expect("running"))
        .collect();
    let cpu0: Vec<f64> = pids.iter().map(|p| cpu_seconds(*p)).collect();
    let net0: Vec<u64> = hosts.iter().map(|h| underlay_bytes(&lab, *h)).collect();
    let t0 = Instant::now();
    // Offline reports while idle count too.
    while t0.elapsed() < IDLE_WINDOW {
        let st = lab.statuses(&hosts);
        offline_seen.extend(census(&hosts, &st, n).offline);
        std::thread::sleep(Duration::from_secs(1));
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu: Vec<f64> = pids
        .iter()
        .zip(&cpu0)
        .map(|(p, c0)| (cpu_seconds(*p) - c0) / secs * 100.0)
        .collect();
    let rss: Vec<f64> = pids.iter().map(|p| rss_mib(*p)).collect();
    let net: Vec<f64> = hosts
        .iter()
        .zip(&net0)
        .map(|(h, b0)| (underlay_bytes(&lab, *h) - b0) as f64 / secs / 1024.0)
        .collect();

    // A node killed, then restarted.
    let victim = n / 2;
    let name = format!("n{victim}");
    let others: Vec<usize> = hosts.iter().copied().filter(|h| *h != victim).collect();
    lab.kill9(victim);
    let killed = Instant::now();
    let all_say = |lab: &Lab, want: PeerState| {
        let st = lab.statuses(&others);
        reports_of(&name, &others, &st)
            .iter()
            .all(|(_, s)| *s == Some(want))
    };
    let t_offline = lab.wait_for(
        &format!("{name} offline everywhere"),
        Duration::from_secs(120),
        || all_say(&lab, PeerState::Offline),
    );
    let _ = killed;
    lab.run(victim);
    let t_back = lab.wait_for(
        &format!("{name} online everywhere"),
        Duration::from_secs(120),
        || all_say(&lab, PeerState::Online),
    );

    let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    println!();
    println!("                                        {n:>5} nodes");
    println!(
        "full membership on every node      {:>9.1} s",
        t_members.as_secs_f64()
    );
    println!(
        "all pairs reachable                {:>9.1} s",
        t_reach.as_secs_f64()
    );
    println!("  last nodes to list every member: {}", slowest.join(", "));
    println!(
        "false offline reports (pairs)      {:>9}",
        offline_seen.len()
    );
    println!(
        "idle CPU per node (median / max)   {:>7.2} % / {:.2} % of a core",
        median(cpu.clone()),
        max(&cpu)
    );
    println!(
        "RSS per node (median / max)        {:>7.1} MiB / {:.1} MiB",
        median(rss.clone()),
        max(&rss)
    );
    println!(
        "underlay per node (median / max)   {:>7.1} KiB/s / {:.1} KiB/s",
        median(net.clone()),
        max(&net)
    );
    println!(
        "kill -9: offline everywhere after  {:>9.1} s",
        t_offline.as_secs_f64()
    );
    println!(
        "restart: online everywhere after   {:>9.1} s",
        t_back.as_secs_f64()
    );
    if !offline_seen.is_empty() {
        let shown: Vec<String> = offline_seen
            .iter()
            .take(10)
            .map(|(h, p)| format!("n{h} saw {p}"))
            .collect();
        println!("  offline reports: {}", shown.join(", "));
    }
}
