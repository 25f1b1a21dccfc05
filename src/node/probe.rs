//! Liveness by probes through the tunnels, after SWIM (Das, Gupta and Motivala, "SWIM: Scalable
//! Weakly-consistent Infection-style Process Group Membership Protocol", 2002): every half
//! second a node probes one member at random; a member that does not answer a few direct pings
//! is probed through four others (so one lossy path does not condemn it); a member that
//! answers nobody in two probes in a row is down, and the node tells every member, which each
//! confirm with a probe of their own before they believe it. A dead node is offline everywhere in about three seconds
//! at a cost of a few small datagrams a second per node, whatever the size of the mesh: gossip
//! heartbeats (chitchat's failure detector) would need all-to-all digests many times a second
//! for the same, and stay the slow backstop.
//!
//! Probes ride the tunnels (UDP to the member's mesh address, [`PROBE_PORT`], on a socket bound
//! to the TUN device), so their source is authenticated by WireGuard. [`Detector`] is the rule,
//! sans-IO with `now` passed in; the node's prober task owns the socket.

use crate::gossip::Liveness;
use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

/// UDP port of probes on the mesh address.
pub const PROBE_PORT: u16 = 7947;
/// One member is probed per period.
pub const PROBE_EVERY: Duration = Duration::from_millis(500);
/// Direct pings of one probe, this far apart.
pub const DIRECT_TRIES: u32 = 4;
pub const DIRECT_SPACING: Duration = Duration::from_millis(200);
/// Without an answer this long after the probe started, others are asked to ping too.
pub const INDIRECT_AFTER: Duration = Duration::from_millis(300);
pub const HELPERS: usize = 4;
/// Without any answer this long after the probe started, the member is down.
pub const GIVE_UP_AFTER: Duration = Duration::from_millis(1000);
/// A member found down is pinged this often, to notice its return.
pub const DOWN_RETRY: Duration = Duration::from_secs(1);
/// ...and its tunnel asked for a fresh handshake this often: a member that restarted lost its
/// session keys, and WireGuard alone would only notice after 15 s of one-way traffic.
pub const DOWN_REHANDSHAKE: Duration = Duration::from_secs(5);
/// An answer counts as "alive" evidence this long.
pub const ALIVE_FOR: Duration = Duration::from_secs(10);
/// Pings this node sent whose answers are still awaited (bounded).
const PENDING_MAX: usize = 4096;

const MAGIC: &[u8; 2] = b"MP";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Msg {
    Ping {
        seq: u32,
    },
    Ack {
        seq: u32,
    },
    /// "Ping `target` for me; answer me with this `seq`."
    PingReq {
        seq: u32,
        target: Ipv4Addr,
    },
    /// "`target` answers nobody here."
    Down {
        target: Ipv4Addr,
    },
}

impl Msg {
    pub fn encode(&self) -> Vec<u8> {
        let (kind, seq, ip) = match *self {
            Msg::Ping { seq } => (1u8, seq, None),
            Msg::Ack { seq } => (2, seq, None),
            Msg::PingReq { seq, target } => (3, seq, Some(target)),
            Msg::Down { target } => (4, 0, Some(target)),
        };
        let mut out = Vec::with_capacity(11);
        out.extend_from_slice(MAGIC);
        out.push(kind);
        out.extend_from_slice(&seq.to_be_bytes());
        if let Some(ip) = ip {
            out.extend_from_slice(&ip.octets());
        }
        out
    }

    pub fn decode(d: &[u8]) -> Option<Msg> {
        let rest = d.strip_prefix(MAGIC.as_slice())?;
        let (&kind, rest) = rest.split_first()?;
        let seq = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?);
        let ip = |r: &[u8]| -> Option<Ipv4Addr> {
            let o: [u8; 4] = r.get(4..8)?.try_into().ok()?;
            (r.len() == 8).then(|| Ipv4Addr::from(o))
        };
        match kind {
            1 if rest.len() == 4 => Some(Msg::Ping { seq }),
            2 if rest.len() == 4 => Some(Msg::Ack { seq }),
            3 => Some(Msg::PingReq {
                seq,
                target: ip(rest)?,
            }),
            4 => Some(Msg::Down { target: ip(rest)? }),
            _ => None,
        }
    }
}

/// A member as the detector sees it: its mesh address, and whether its tunnel has a session
/// (a member without one cannot be probed yet, and is not condemned for it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target {
    pub ip: Ipv4Addr,
    pub reachable: bool,
}

#[derive(Debug)]
struct Probe {
    started: Instant,
    direct_sent: u32,
    next_direct: Instant,
    indirect_sent: bool,
    /// Its failure condemns the member: the second probe in a row, or one made because
    /// another member reported it down.
    last_chance: bool,
}

#[derive(Debug, Default)]
struct Peer {
    reachable: bool,
    last_answer: Option<Instant>,
    probe: Option<Probe>,
    /// Down: when to ping it again, and when to ask its tunnel for a fresh handshake again.
    down: Option<(Instant, Instant)>,
}

#[derive(Debug)]
enum Pending {
    /// A ping of this node's own probe of `target`.
    Mine { target: Ipv4Addr },
    /// A ping sent for `requester`, to answer with its `seq` if `target` answers.
    Relay {
        requester: Ipv4Addr,
        seq: u32,
        target: Ipv4Addr,
    },
}

pub struct Detector {
    peers: HashMap<Ipv4Addr, Peer>,
    /// Down members whose tunnels want a fresh handshake (taken by [`Detector::rehandshakes`]).
    rehandshake: Vec<Ipv4Addr>,
    pending: HashMap<u32, (Pending, Instant)>,
    next_seq: u32,
    next_round: Instant,
    rng: u64,
}

impl Detector {
    pub fn new(now: Instant, seed: u64) -> Detector {
        Detector {
            peers: HashMap::new(),
            rehandshake: Vec::new(),
            pending: HashMap::new(),
            next_seq: seed as u32,
            next_round: now,
            rng: seed | 1,
        }
    }

    fn random(&mut self, n: usize) -> usize {
        // xorshift64: plenty for picking probe targets.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng % n.max(1) as u64) as usize
    }

    fn ping(&mut self, to: Ipv4Addr, why: Pending, now: Instant) -> (Ipv4Addr, Msg) {
        if self.pending.len() >= PENDING_MAX {
            let horizon = GIVE_UP_AFTER * 2;
            self.pending
                .retain(|_, (_, at)| now.saturating_duration_since(*at) < horizon);
        }
        self.next_seq = self.next_seq.wrapping_add(1);
        let seq = self.next_seq;
        if self.pending.len() < PENDING_MAX {
            self.pending.insert(seq, (why, now));
        }
        (to, Msg::Ping { seq })
    }

    /// The members now: new ones are added, gone ones forgotten.
    pub fn set_members(&mut self, members: &[Target]) {
        self.peers
            .retain(|ip, _| members.iter().any(|m| m.ip == *ip));
        for m in members {
            self.peers.entry(m.ip).or_default().reachable = m.reachable;
        }
    }

    fn alive(&mut self, ip: Ipv4Addr, now: Instant) {
        if let Some(p) = self.peers.get_mut(&ip) {
            p.last_answer = Some(now);
            p.probe = None;
            p.down = None;
        }
    }

    fn start_probe(&mut self, ip: Ipv4Addr, now: Instant, last_chance: bool) {
        if let Some(p) = self.peers.get_mut(&ip) {
            if p.probe.is_none() && p.down.is_none() {
                p.probe = Some(Probe {
                    started: now,
                    direct_sent: 0,
                    next_direct: now,
                    indirect_sent: false,
                    last_chance,
                });
            }
        }
    }

    /// Advance to `now`; the datagrams to send.
    pub fn tick(&mut self, now: Instant) -> Vec<(Ipv4Addr, Msg)> {
        let mut out = Vec::new();
        // Probes under way.
        let probing: Vec<Ipv4Addr> = self
            .peers
            .iter()
            .filter(|(_, p)| p.probe.is_some())
            .map(|(ip, _)| *ip)
            .collect();
        for ip in probing {
            let (started, direct_due, indirect_due) = {
                let p = self.peers[&ip].probe.as_ref().expect("probing");
                (
                    p.started,
                    p.direct_sent < DIRECT_TRIES && now >= p.next_direct,
                    !p.indirect_sent && now >= p.started + INDIRECT_AFTER,
                )
            };
            if now >= started + GIVE_UP_AFTER {
                let p = self.peers.get_mut(&ip).expect("peer");
                let last_chance = p.probe.take().is_some_and(|p| p.last_chance);
                // Only a member with a session is condemned: without one, silence says
                // nothing (its tunnel to this node is not up yet).
                if !p.reachable {
                    continue;
                }
                if !last_chance {
                    // Suspect: one more probe at once before believing it (a lossy path or a
                    // busy machine must fail twice in a row).
                    self.start_probe(ip, now, true);
                    out.extend(self.first_ping(ip, now));
                    continue;
                }
                p.down = Some((now + DOWN_RETRY, now + DOWN_REHANDSHAKE));
                self.rehandshake.push(ip);
                let tell: Vec<Ipv4Addr> = self
                    .peers
                    .iter()
                    .filter(|(o, q)| **o != ip && q.reachable && q.down.is_none())
                    .map(|(o, _)| *o)
                    .collect();
                out.extend(tell.into_iter().map(|o| (o, Msg::Down { target: ip })));
                continue;
            }
            if direct_due {
                let p = self.peers.get_mut(&ip).expect("peer");
                let probe = p.probe.as_mut().expect("probing");
                probe.direct_sent += 1;
                probe.next_direct = now + DIRECT_SPACING;
                out.push(self.ping(ip, Pending::Mine { target: ip }, now));
            }
            if indirect_due {
                if let Some(probe) = self.peers.get_mut(&ip).and_then(|p| p.probe.as_mut()) {
                    probe.indirect_sent = true;
                }
                let mut helpers: Vec<Ipv4Addr> = self
                    .peers
                    .iter()
                    .filter(|(o, q)| **o != ip && q.reachable && q.down.is_none())
                    .map(|(o, _)| *o)
                    .collect();
                helpers.sort();
                for _ in 0..HELPERS.min(helpers.len()) {
                    let h = helpers.swap_remove(self.random(helpers.len()));
                    let (_, Msg::Ping { seq }) = self.ping(ip, Pending::Mine { target: ip }, now)
                    else {
                        continue;
                    };
                    out.push((h, Msg::PingReq { seq, target: ip }));
                }
            }
        }
        // Members found down: ping now and then, to notice they are back.
        let retry: Vec<Ipv4Addr> = self
            .peers
            .iter()
            .filter(|(_, p)| p.down.is_some_and(|(next, _)| now >= next))
            .map(|(ip, _)| *ip)
            .collect();
        for ip in retry {
            if let Some((_, mut rehandshake)) = self.peers[&ip].down {
                if now >= rehandshake {
                    rehandshake = now + DOWN_REHANDSHAKE;
                    self.rehandshake.push(ip);
                }
                self.peers.get_mut(&ip).expect("peer").down = Some((now + DOWN_RETRY, rehandshake));
            }
            out.push(self.ping(ip, Pending::Mine { target: ip }, now));
        }
        // A new round: one member at random.
        if now >= self.next_round {
            self.next_round = now + PROBE_EVERY;
            let mut candidates: Vec<Ipv4Addr> = self
                .peers
                .iter()
                .filter(|(_, p)| p.reachable && p.probe.is_none() && p.down.is_none())
                .map(|(ip, _)| *ip)
                .collect();
            if !candidates.is_empty() {
                candidates.sort();
                let ip = candidates[self.random(candidates.len())];
                self.start_probe(ip, now, false);
                out.extend(self.first_ping(ip, now));
            }
        }
        out
    }

    /// The first ping of a probe goes at once.
    fn first_ping(&mut self, ip: Ipv4Addr, now: Instant) -> Option<(Ipv4Addr, Msg)> {
        let probe = self.peers.get_mut(&ip)?.probe.as_mut()?;
        probe.direct_sent = 1;
        probe.next_direct = now + DIRECT_SPACING;
        Some(self.ping(ip, Pending::Mine { target: ip }, now))
    }

    /// A datagram from the member at `from`; the datagrams to send in answer.
    pub fn receive(&mut self, from: Ipv4Addr, msg: Msg, now: Instant) -> Vec<(Ipv4Addr, Msg)> {
        if !self.peers.contains_key(&from) {
            return Vec::new();
        }
        // Whatever it sent, it is alive.
        self.alive(from, now);
        match msg {
            Msg::Ping { seq } => vec![(from, Msg::Ack { seq })],
            Msg::Ack { seq } => match self.pending.remove(&seq) {
                Some((Pending::Mine { target }, _)) => {
                    self.alive(target, now);
                    Vec::new()
                }
                Some((
                    Pending::Relay {
                        requester,
                        seq,
                        target,
                    },
                    _,
                )) if target == from => vec![(requester, Msg::Ack { seq })],
                _ => Vec::new(),
            },
            Msg::PingReq { seq, target } if self.peers.contains_key(&target) => {
                let relay = Pending::Relay {
                    requester: from,
                    seq,
                    target,
                };
                vec![self.ping(target, relay, now)]
            }
            Msg::PingReq { .. } => Vec::new(),
            Msg::Down { target } => {
                // Believe it only after a probe of this node's own.
                let recent = self.peers.get(&target).and_then(|p| p.last_answer);
                if recent.is_none_or(|t| now.saturating_duration_since(t) >= PROBE_EVERY) {
                    // Corroborated: one failed probe of its own condemns it.
                    self.start_probe(target, now, true);
                    self.first_ping(target, now).into_iter().collect()
                } else {
                    Vec::new()
                }
            }
        }
    }

    /// Down members whose tunnels should start a fresh handshake now.
    pub fn rehandshakes(&mut self) -> Vec<Ipv4Addr> {
        std::mem::take(&mut self.rehandshake)
    }

    /// What the probes say: down members are dead; members that answered lately are alive.
    pub fn verdicts(&self, now: Instant) -> impl Iterator<Item = (Ipv4Addr, Liveness)> + '_ {
        self.peers.iter().filter_map(move |(ip, p)| {
            if p.down.is_some() {
                Some((*ip, Liveness::Dead))
            } else if p
                .last_answer
                .is_some_and(|t| now.saturating_duration_since(t) < ALIVE_FOR)
            {
                Some((*ip, Liveness::Alive))
            } else {
                None
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    /// Detectors on a simulated network with a fixed one-way delay and deterministic loss.
    struct World {
        nodes: Vec<Detector>,
        ips: Vec<Ipv4Addr>,
        dead: HashSet<usize>,
        /// Directed links that drop everything.
        cut: HashSet<(usize, usize)>,
        /// Percentage of datagrams lost, at random (a fixed seed: runs are repeatable).
        loss_pct: u64,
        rng: u64,
        sent: u64,
        inflight: Vec<(Instant, usize, usize, Msg)>,
        now: Instant,
    }

    const DELAY: Duration = Duration::from_millis(5);
    const STEP: Duration = Duration::from_millis(50);

    impl World {
        fn new(n: usize) -> World {
            let now = Instant::now();
            let ips: Vec<Ipv4Addr> = (0..n).map(|i| Ipv4Addr::new(10, 210, i as u8, 1)).collect();
            let nodes = (0..n)
                .map(|i| {
                    let mut d = Detector::new(now, 0x9e37_79b9 * (i as u64 + 1));
                    let others: Vec<Target> = ips
                        .iter()
                        .enumerate()
                        .filter(|(j, _)| *j != i)
                        .map(|(_, ip)| Target {
                            ip: *ip,
                            reachable: true,
                        })
                        .collect();
                    d.set_members(&others);
                    d
                })
                .collect();
            World {
                nodes,
                ips,
                dead: HashSet::new(),
                cut: HashSet::new(),
                loss_pct: 0,
                rng: 0x2545_f491_4f6c_dd1d,
                sent: 0,
                inflight: Vec::new(),
                now,
            }
        }

        fn index(&self, ip: Ipv4Addr) -> usize {
            self.ips.iter().position(|x| *x == ip).unwrap()
        }

        fn send(&mut self, from: usize, out: Vec<(Ipv4Addr, Msg)>) {
            for (to, msg) in out {
                self.sent += 1;
                self.rng ^= self.rng << 13;
                self.rng ^= self.rng >> 7;
                self.rng ^= self.rng << 17;
                if self.rng % 100 < self.loss_pct {
                    continue;
                }
                let to = self.index(to);
                // The codec is part of the path.
                let msg = Msg::decode(&msg.encode()).expect("round trip");
                self.inflight.push((self.now + DELAY, from, to, msg));
            }
        }

        fn step(&mut self) {
            self.now += STEP;
            let now = self.now;
            let due: Vec<_> = self
                .inflight
                .iter()
                .filter(|m| m.0 <= now)
                .cloned()
                .collect();
            self.inflight.retain(|m| m.0 > now);
            for (_, from, to, msg) in due {
                if self.dead.contains(&to) || self.cut.contains(&(from, to)) {
                    continue;
                }
                let out = self.nodes[to].receive(self.ips[from], msg, now);
                self.send(to, out);
            }
            for i in 0..self.nodes.len() {
                if self.dead.contains(&i) {
                    continue;
                }
                let out = self.nodes[i].tick(now);
                self.send(i, out);
            }
        }

        fn run(&mut self, d: Duration) {
            let steps = d.as_millis() / STEP.as_millis();
            for _ in 0..steps {
                self.step();
            }
        }

        /// What node `i` says of node `j`.
        fn says(&self, i: usize, j: usize) -> Option<Liveness> {
            let ip = self.ips[j];
            self.nodes[i]
                .verdicts(self.now)
                .find(|(x, _)| *x == ip)
                .map(|(_, l)| l)
        }

        fn all_say(&self, j: usize, want: Option<Liveness>) -> bool {
            (0..self.nodes.len())
                .filter(|i| *i != j && !self.dead.contains(i))
                .all(|i| self.says(i, j) == want)
        }

        /// Steps until every live node says `want` of `j`; how long it took.
        fn until_all_say(&mut self, j: usize, want: Liveness, limit: Duration) -> Duration {
            let start = self.now;
            while !self.all_say(j, Some(want)) {
                assert!(
                    self.now - start < limit,
                    "not everywhere {want:?} within {limit:?}"
                );
                self.step();
            }
            self.now - start
        }
    }

    #[test]
    fn messages_round_trip_and_junk_is_refused() {
        for m in [
            Msg::Ping { seq: 7 },
            Msg::Ack { seq: u32::MAX },
            Msg::PingReq {
                seq: 1,
                target: Ipv4Addr::new(10, 210, 3, 1),
            },
            Msg::Down {
                target: Ipv4Addr::new(10, 210, 4, 1),
            },
        ] {
            assert_eq!(Msg::decode(&m.encode()), Some(m));
        }
        for junk in [
            &b""[..],
            b"MP",
            b"MP\x01\0\0\0",
            b"MP\x01\0\0\0\0\0",
            b"XX\x01\0\0\0\0",
            b"MP\x09\0\0\0\0",
        ] {
            assert_eq!(Msg::decode(junk), None, "{junk:?}");
        }
    }

    /// A healthy mesh: everyone is alive to everyone, nobody is ever called down.
    #[test]
    fn a_healthy_mesh_has_no_down_verdicts() {
        let mut w = World::new(20);
        for _ in 0..40 {
            w.run(Duration::from_secs(1));
            for i in 0..20 {
                for j in 0..20 {
                    assert_ne!(w.says(i, j), Some(Liveness::Dead), "{i} says {j} is down");
                }
            }
        }
        // Everyone got to answer somebody's probe.
        assert!((0..20).all(|j| (0..20).any(|i| w.says(i, j) == Some(Liveness::Alive))));
    }

    /// A node that stops is down everywhere in a few seconds, and alive again soon after it
    /// comes back.
    #[test]
    fn a_dead_node_is_down_everywhere_in_seconds_and_back_when_it_returns() {
        let mut w = World::new(30);
        w.run(Duration::from_secs(20));
        w.dead.insert(7);
        let t = w.until_all_say(7, Liveness::Dead, Duration::from_secs(10));
        println!("down everywhere after {t:?}");
        assert!(t <= Duration::from_secs(5), "down everywhere after {t:?}");
        // Every node that found it down asked for a fresh handshake with it; more every 5 s.
        for i in (0..30).filter(|i| *i != 7) {
            assert!(w.nodes[i].rehandshakes().contains(&w.ips[7]), "node {i}");
        }
        w.run(DOWN_REHANDSHAKE + Duration::from_secs(1));
        assert!(w.nodes[0].rehandshakes().contains(&w.ips[7]));
        w.dead.remove(&7);
        let t = w.until_all_say(7, Liveness::Alive, Duration::from_secs(10));
        assert!(t <= Duration::from_secs(2), "back everywhere after {t:?}");
    }

    /// One broken path does not condemn a member: the indirect probes get through.
    #[test]
    fn a_member_unreachable_from_one_node_only_is_not_down() {
        let mut w = World::new(10);
        w.run(Duration::from_secs(5));
        w.cut.insert((0, 3));
        w.cut.insert((3, 0));
        w.run(Duration::from_secs(30));
        for i in 0..10 {
            assert_ne!(w.says(i, 3), Some(Liveness::Dead), "{i} says 3 is down");
        }
    }

    /// 20% of datagrams lost everywhere (a lossy network): false down verdicts are rare, and a
    /// real death is still seen everywhere.
    #[test]
    fn lossy_links_rarely_condemn_anyone_and_deaths_are_still_seen() {
        let mut w = World::new(20);
        w.loss_pct = 20;
        let mut false_downs = 0;
        for _ in 0..(60 * 1000 / STEP.as_millis() as usize) {
            w.step();
            for i in 0..20 {
                for j in 0..20 {
                    if w.says(i, j) == Some(Liveness::Dead) {
                        false_downs += 1;
                    }
                }
            }
        }
        // Counted in steps of 50 ms over 20 x 19 pairs for 60 s (456 000 pair-steps): below 80
        // is at most a few seconds of one pair in a whole minute.
        println!("false down pair-steps under loss: {false_downs}");
        assert!(
            false_downs < 80,
            "{false_downs} pair-steps of false down verdicts"
        );
        w.dead.insert(4);
        w.until_all_say(4, Liveness::Dead, Duration::from_secs(15));
    }

    #[test]
    fn unreachable_members_are_not_probed_or_condemned() {
        let mut w = World::new(3);
        for d in &mut w.nodes {
            d.set_members(&[
                Target {
                    ip: Ipv4Addr::new(10, 210, 0, 1),
                    reachable: false,
                },
                Target {
                    ip: Ipv4Addr::new(10, 210, 1, 1),
                    reachable: false,
                },
                Target {
                    ip: Ipv4Addr::new(10, 210, 2, 1),
                    reachable: false,
                },
            ]);
        }
        w.dead.insert(2);
        w.run(Duration::from_secs(10));
        assert_eq!(w.sent, 0, "nothing probed without sessions");
        assert_eq!(w.says(0, 2), None);
    }
}
