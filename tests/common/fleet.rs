//! A fleet on one machine: one `meshd init` and many `meshd join` started at the same moment,
//! and what a fleet operator watches: does every node list every member, does every node reach
//! every other, does anyone report a live node offline. Shared by the scale test and
//! `benches/scale.rs`.

use super::Lab;
use meshd::control::client::Client;
use meshd::control::{PeerState, StatusReport};
use std::collections::{BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

impl Lab {
    /// `meshd init` on host 0, then `meshd join` on hosts 1..n all at once. Returns when the
    /// joins were started.
    pub fn form_at_once(&mut self, n: usize) -> Instant {
        let token = self.init(0, "n0", &[]);
        let start = Instant::now();
        for h in 1..n {
            self.join(h, &format!("n{h}"), &token);
        }
        start
    }

    /// Every host's status, straight from its control socket (no process per host).
    pub fn statuses(&self, hosts: &[usize]) -> Vec<Option<StatusReport>> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let mut out = Vec::with_capacity(hosts.len());
            for h in hosts {
                let c = Client::new(self.socket(*h));
                let s = tokio::time::timeout(Duration::from_secs(5), c.get("/v1/status")).await;
                out.push(s.ok().and_then(|r| r.ok()));
            }
            out
        })
    }

    /// Pairs `(from, to)` of `hosts` where `from` got no echo from `to`'s mesh address, each
    /// host pinging all the others at once (all hosts in parallel).
    pub fn unreachable_pairs(&self, hosts: &[usize], ips: &[Ipv4Addr]) -> Vec<(usize, usize)> {
        std::thread::scope(|scope| {
            let jobs: Vec<_> = hosts
                .iter()
                .enumerate()
                .map(|(i, h)| {
                    let targets: Vec<Ipv4Addr> = ips
                        .iter()
                        .enumerate()
                        .filter(|(j, _)| *j != i)
                        .map(|(_, ip)| *ip)
                        .collect();
                    let ns = self.ns(*h);
                    scope.spawn(move || {
                        meshd::cli::demo::lab::ping_all(ns, &targets, Duration::from_secs(1))
                            .unwrap_or_else(|_| vec![None; targets.len()])
                    })
                })
                .collect();
            let mut missing = Vec::new();
            for (i, job) in jobs.into_iter().enumerate() {
                let answers = job.join().expect("pinger thread");
                let others = (0..hosts.len()).filter(|j| *j != i);
                for (j, a) in others.zip(answers) {
                    if a.is_none() {
                        missing.push((hosts[i], hosts[j]));
                    }
                }
            }
            missing
        })
    }
}

/// What the statuses of a fleet say at one moment.
pub struct Census {
    /// Hosts whose status lists `n` members (themselves included).
    pub complete: usize,
    /// Hosts that see every one of their peers online.
    pub all_online: usize,
    /// `(observer, peer name)` pairs reported offline.
    pub offline: BTreeSet<(usize, String)>,
    /// Mesh address of each host that answered.
    pub ips: HashMap<usize, Ipv4Addr>,
}

pub fn census(hosts: &[usize], statuses: &[Option<StatusReport>], n: usize) -> Census {
    let mut c = Census {
        complete: 0,
        all_online: 0,
        offline: BTreeSet::new(),
        ips: HashMap::new(),
    };
    for (h, s) in hosts.iter().zip(statuses) {
        let Some(s) = s else { continue };
        if let Ok(ip) = s.me.mesh_ip.parse() {
            c.ips.insert(*h, ip);
        }
        if s.mesh.members == n {
            c.complete += 1;
            if s.peers.iter().all(|p| p.online) {
                c.all_online += 1;
            }
        }
        for p in s.peers.iter().filter(|p| p.state == PeerState::Offline) {
            c.offline.insert((*h, p.name.clone()));
        }
    }
    c
}

/// How every host but `subject` reports it, in `statuses` (one per host of `hosts`).
pub fn reports_of(
    subject: &str,
    hosts: &[usize],
    statuses: &[Option<StatusReport>],
) -> Vec<(usize, Option<PeerState>)> {
    hosts
        .iter()
        .zip(statuses)
        .filter(|(_, s)| s.as_ref().is_some_and(|s| s.me.name != subject))
        .map(|(h, s)| {
            let state = s
                .as_ref()
                .and_then(|s| s.peers.iter().find(|p| p.name == subject))
                .map(|p| p.state);
            (*h, state)
        })
        .collect()
}
