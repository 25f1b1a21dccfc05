//! End-to-end harness: real `meshd` processes, each in its own network namespace on a bridge.
//!
//! ```text
//!   [<lab>-1]          [<lab>-2]          [<lab>-N]        one namespace per machine
//!   meshd, mesh0       meshd, mesh0       meshd, mesh0
//!   eth0 198.51.100.1  eth0 198.51.100.2  eth0 198.51.100.N
//!        \                  |                  /
//!         +---------- br0 in [<lab>-hub] -----+
//! ```
//!
//! Every wait has a deadline; dropping the [`Lab`] (also when a test panics) stops every daemon
//! and deletes every namespace it made, and prints the daemons' logs if the test failed.

#![allow(dead_code)]

pub mod fleet;
pub mod nat;
pub mod workloads;

use meshd::cli::demo::lab::{Lan, Netns};
use meshd::control::StatusReport;
use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const MESHD: &str = env!("CARGO_BIN_EXE_meshd");
pub const MESHCTL: &str = env!("CARGO_BIN_EXE_meshctl");

pub struct Daemon {
    pub child: Child,
    pub lines: mpsc::Receiver<String>,
}

pub struct Lab {
    pub name: String,
    /// Extra environment for every meshd started.
    pub env: Vec<(String, String)>,
    /// The meshd binary the lab runs: this build's, unless a bench points at another.
    pub meshd: PathBuf,
    daemons: Vec<Option<Daemon>>,
    pub lan: Option<Lan>,
    pub dir: tempfile::TempDir,
}

/// A child process of a test (not a meshd the lab runs), killed when dropped, also on failure.
pub struct Kill(pub Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The programs the end-to-end tests run, and the Debian package of each.
const TOOLS: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("ping", "iputils-ping"),
    ("tcpdump", "tcpdump"),
    ("socat", "socat"),
    ("dig", "dnsutils"),
    ("dnsmasq", "dnsmasq-base"),
    ("dbus-daemon", "dbus-daemon"),
    ("curl", "curl"),
    ("nft", "nftables"),
    ("systemd-analyze", "systemd"),
    ("setpriv", "util-linux"),
    ("prometheus", "prometheus"),
    ("promtool", "prometheus"),
    ("dockerd", "docker.io"),
    ("docker", "docker.io"),
    ("iptables", "iptables"),
    ("busybox", "busybox-static"),
    ("unshare", "util-linux"),
];

/// Before the first end-to-end test: every program they run is there, or the test fails at
/// once with the one command that installs what is missing (not later, one by one, with
/// errors that do not say why).
pub fn preflight() {
    static CHECKED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    let r = CHECKED.get_or_init(|| {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let dirs: Vec<PathBuf> = std::env::split_paths(&path)
            .chain(["/usr/sbin".into(), "/sbin".into()])
            .collect();
        let mut missing: Vec<&str> = TOOLS
            .iter()
            .filter(|(tool, _)| !dirs.iter().any(|d| d.join(tool).is_file()))
            .map(|(_, pkg)| *pkg)
            .collect();
        missing.dedup();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "the end-to-end tests need programs this machine lacks; install them with:\n  \
                 sudo apt-get install -y --no-install-recommends {}",
                missing.join(" ")
            ))
        }
    });
    if let Err(m) = r {
        panic!("{m}");
    }
}

impl Lab {
    /// A LAN of `hosts` machines for test `name` (unique per test; namespaces are prefixed with
    /// the process id so concurrent runs never collide).
    pub fn new(name: &str, hosts: usize) -> Lab {
        preflight();
        // SAFETY: geteuid has no preconditions.
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "end-to-end tests need root: they create network namespaces and TUN devices"
        );
        let prefix = format!("mt{}-{name}", std::process::id());
        let lan =
            Lan::create(&prefix, hosts, Ipv4Addr::new(198, 51, 100, 0)).expect("create namespaces");
        Lab {
            name: prefix,
            env: Vec::new(),
            meshd: PathBuf::from(MESHD),
            daemons: (0..hosts).map(|_| None).collect(),
            lan: Some(lan),
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    pub fn ns(&self, h: usize) -> &Netns {
        &self.lan.as_ref().expect("lan").hosts[h].ns
    }

    pub fn addr(&self, h: usize) -> Ipv4Addr {
        self.lan.as_ref().expect("lan").hosts[h].addr
    }

    pub fn add_host(&mut self) -> usize {
        let i = self
            .lan
            .as_mut()
            .expect("lan")
            .add_host()
            .expect("add host");
        self.daemons.push(None);
        i
    }

    pub fn state_dir(&self, h: usize) -> PathBuf {
        self.dir.path().join(format!("h{}", h + 1))
    }

    pub fn socket(&self, h: usize) -> PathBuf {
        self.dir.path().join(format!("h{}.sock", h + 1))
    }

    fn log(&self, h: usize) -> PathBuf {
        self.dir.path().join(format!("h{}.log", h + 1))
    }

    /// `meshd ARGS --state-dir .. --socket ..` inside host `h`, as a command.
    pub fn meshd_cmd(&self, h: usize, args: &[&str]) -> Command {
        let mut c = self.ns(h).command(&self.meshd);
        c.args(args)
            .arg("--state-dir")
            .arg(self.state_dir(h))
            .arg("--socket")
            .arg(self.socket(h))
            .env("MESHD_LOG", "info,meshd=debug");
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }

    /// Start a long-running meshd in host `h`.
    pub fn spawn(&mut self, h: usize, args: &[&str]) {
        self.spawn_with_input(h, args, None);
    }

    /// Start a long-running meshd in host `h`, writing `input` to its standard input.
    pub fn spawn_with_input(&mut self, h: usize, args: &[&str], input: Option<&str>) {
        assert!(self.daemons[h].is_none(), "host {h} already runs meshd");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log(h))
            .expect("log file");
        let mut child = self
            .meshd_cmd(h, args)
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn meshd");
        if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
            use std::io::Write;
            stdin
                .write_all(input.as_bytes())
                .expect("write meshd stdin");
        }
        let (tx, rx) = mpsc::channel();
        let out = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        self.daemons[h] = Some(Daemon { child, lines: rx });
    }

    /// `meshd init` on `h`; returns the token from its join line.
    pub fn init(&mut self, h: usize, name: &str, extra: &[&str]) -> String {
        let mut args = vec!["init", "--name", name];
        args.extend_from_slice(extra);
        self.spawn(h, &args);
        let d = self.daemons[h].as_ref().expect("daemon");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match d.lines.recv_timeout(left) {
                Ok(l) => {
                    if let Some(t) = l.strip_prefix("meshd join ") {
                        return t.trim().to_string();
                    }
                }
                Err(_) => panic!("meshd init on host {h} printed no join line within 30 s"),
            }
        }
    }

    /// A mesh of the first `names.len()` hosts: `meshd init` on host 0 with the first name,
    /// `meshd join` on the others, then wait (30 s at most) until every one reaches every
    /// other. Returns the token.
    pub fn form(&mut self, names: &[&str]) -> String {
        let token = self.init(0, names[0], &[]);
        for (h, name) in names.iter().enumerate().skip(1) {
            self.join(h, name, &token);
        }
        let hosts: Vec<usize> = (0..names.len()).collect();
        self.wait_all_pairs(&hosts, Duration::from_secs(30));
        token
    }

    pub fn join(&mut self, h: usize, name: &str, token: &str) {
        self.spawn(h, &["join", token, "--name", name]);
    }

    /// `meshd join -`: the token goes in on standard input, never on the command line.
    pub fn join_from_stdin(&mut self, h: usize, name: &str, token: &str) {
        self.spawn_with_input(
            h,
            &["join", "-", "--name", name],
            Some(&format!("{token}\n")),
        );
    }

    pub fn run(&mut self, h: usize) {
        self.spawn(h, &["run"]);
    }

    pub fn is_running(&mut self, h: usize) -> bool {
        match self.daemons[h].as_mut() {
            Some(d) => d.child.try_wait().ok().flatten().is_none(),
            None => false,
        }
    }

    /// Wait for the daemon on `h` to exit by itself; returns its exit code.
    pub fn wait_exit(&mut self, h: usize, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        let d = self.daemons[h].as_mut()?;
        loop {
            if let Ok(Some(st)) = d.child.try_wait() {
                self.daemons[h] = None;
                return st.code();
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The process id of the daemon on `h`, if one runs.
    pub fn pid(&self, h: usize) -> Option<u32> {
        self.daemons[h].as_ref().map(|d| d.child.id())
    }

    pub fn kill9(&mut self, h: usize) {
        if let Some(mut d) = self.daemons[h].take() {
            let _ = d.child.kill();
            let _ = d.child.wait();
        }
    }

    /// SIGTERM and wait (bounded) for a clean exit.
    pub fn stop(&mut self, h: usize) {
        if let Some(mut d) = self.daemons[h].take() {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(d.child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while d.child.try_wait().ok().flatten().is_none() {
                if Instant::now() > deadline {
                    let _ = d.child.kill();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = d.child.wait();
        }
    }

    /// `meshctl --socket .. ARGS` in host `h`.
    pub fn meshctl(&self, h: usize, args: &[&str]) -> Output {
        self.ns(h)
            .command(MESHCTL)
            .arg("--socket")
            .arg(self.socket(h))
            .args(args)
            .output()
            .expect("run meshctl")
    }

    pub fn try_status(&self, h: usize) -> Option<StatusReport> {
        let o = self.meshctl(h, &["status", "--json"]);
        if !o.status.success() {
            return None;
        }
        serde_json::from_slice(&o.stdout).ok()
    }

    pub fn status(&self, h: usize) -> StatusReport {
        let o = self.meshctl(h, &["status", "--json"]);
        assert!(
            o.status.success(),
            "meshctl status on host {h}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        serde_json::from_slice(&o.stdout).expect("status JSON")
    }

    pub fn mesh_ip(&self, h: usize) -> Ipv4Addr {
        self.status(h).me.mesh_ip.parse().expect("mesh ip")
    }

    /// `meshctl invite ARGS` on `h`; returns the token.
    pub fn invite(&self, h: usize, args: &[&str]) -> String {
        let mut a = vec!["invite"];
        a.extend_from_slice(args);
        let o = self.meshctl(h, &a);
        assert!(
            o.status.success(),
            "meshctl invite: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let s = String::from_utf8(o.stdout).expect("utf8");
        s.trim()
            .strip_prefix("meshd join ")
            .expect("join line")
            .to_string()
    }

    /// One ICMP echo over the mesh from host `from`.
    pub fn ping(&self, from: usize, to: Ipv4Addr) -> bool {
        meshd::cli::demo::lab::ping(self.ns(from), to, Duration::from_millis(700)).is_ok()
    }

    /// Poll `f` until it holds or `timeout` passes; returns how long it took.
    pub fn wait_for(&self, what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Duration {
        let start = Instant::now();
        loop {
            if f() {
                return start.elapsed();
            }
            if start.elapsed() > timeout {
                panic!("timed out after {timeout:?} waiting for: {what}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Wait until every listed host reaches every other's mesh address.
    pub fn wait_all_pairs(&self, hosts: &[usize], timeout: Duration) -> Duration {
        let start = Instant::now();
        let ips: Vec<Ipv4Addr> = hosts
            .iter()
            .map(|h| {
                let mut ip = None;
                self.wait_for(&format!("status of host {h}"), timeout, || {
                    ip = self.try_status(*h).and_then(|s| s.me.mesh_ip.parse().ok());
                    ip.is_some()
                });
                ip.expect("ip")
            })
            .collect();
        for (i, a) in hosts.iter().enumerate() {
            for (j, _) in hosts.iter().enumerate() {
                if i != j {
                    let left = timeout.saturating_sub(start.elapsed());
                    self.wait_for(&format!("host {a} reaching {}", ips[j]), left, || {
                        self.ping(*a, ips[j])
                    });
                }
            }
        }
        start.elapsed()
    }

    pub fn log_text(&self, h: usize) -> String {
        std::fs::read_to_string(self.log(h)).unwrap_or_default()
    }

    /// A command run to completion in host `h`.
    pub fn sh(&self, h: usize, program: &str, args: &[&str]) -> Output {
        self.ns(h)
            .command(program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("{program}: {e}"))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for h in 0..self.daemons.len() {
            self.stop(h);
        }
        if std::thread::panicking() {
            for h in 0..self.daemons.len() {
                let log = self.log_text(h);
                if !log.is_empty() {
                    let tail: Vec<&str> = log.lines().rev().take(60).collect();
                    eprintln!(
                        "----- meshd log, host {} (last {} lines) -----",
                        h + 1,
                        tail.len()
                    );
                    for l in tail.iter().rev() {
                        eprintln!("{l}");
                    }
                }
            }
        }
        self.lan = None;
    }
}
