//! chitchat, run the meshd way: listening on the node's mesh address with the socket bound to
//! the TUN device (so gossip only ever arrives through a WireGuard tunnel, whose allowed-IP check
//! authenticated the sender's mesh address), short node ids, tuned failure detection, and every
//! value treated as an untrusted claim until [`Membership`] has verified its signature.

use super::membership::{Liveness, Membership, Reject};
use crate::constants::{DEAD_NODE_GRACE, FD_INITIAL_INTERVAL, GOSSIP_INTERVAL, PHI_THRESHOLD};
use crate::trust::{NodeId, Signed};
use async_trait::async_trait;
use chitchat::transport::{Socket, Transport};
use chitchat::{
    spawn_chitchat, ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig,
    ProtocolVersion,
};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::Duration;
// chitchat keeps time with tokio's clock; so does this glue, so both can run on a paused one.
use tokio::time::Instant;
use tracing::{debug, warn};

/// This node's certificate.
pub const KEY_CERT: &str = "cert";
/// This node's signed record.
pub const KEY_RECORD: &str = "rec";
/// This node's signed services.
pub const KEY_SERVICES: &str = "svc";
/// This node's signed hostnames and exit flag.
pub const KEY_ROUTES: &str = "web";
/// The software this node runs (its signed about record).
pub const KEY_ABOUT: &str = "about";
/// The workloads this node names (its signed workloads record).
pub const KEY_WORKLOADS: &str = "wl";
/// The single-valued keys a node publishes about itself; each holds a signed statement.
const SIGNED_KEYS: [&str; 6] = [
    KEY_CERT,
    KEY_RECORD,
    KEY_SERVICES,
    KEY_ROUTES,
    KEY_ABOUT,
    KEY_WORKLOADS,
];
/// Revocations this node knows, one key each: `rev.<node id>`.
pub const PREFIX_REVOCATION: &str = "rev.";

/// A member not heard in gossip this long after gossip started is shown offline.
const UNHEARD_GRACE: Duration = Duration::from_secs(10);

/// chitchat's UDP transport, with the socket bound to a device. chitchat keeps its envelope
/// codec private, so this opens chitchat's own socket and then applies `SO_BINDTODEVICE` to it,
/// finding the descriptor by its bound address.
pub struct DeviceBoundUdp {
    pub ifname: String,
}

#[async_trait]
impl Transport for DeviceBoundUdp {
    async fn open(&self, listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        let sock = chitchat::transport::UdpSocket::open(listen_addr).await?;
        bind_open_socket_to_device(listen_addr, &self.ifname).map_err(|e| {
            anyhow::anyhow!(
                "binding gossip socket {listen_addr} to {}: {e}",
                self.ifname
            )
        })?;
        Ok(Box::new(sock))
    }
}

/// Apply `SO_BINDTODEVICE` to this process's UDP socket bound to exactly `addr`.
fn bind_open_socket_to_device(addr: SocketAddr, ifname: &str) -> std::io::Result<()> {
    use std::os::fd::{BorrowedFd, RawFd};
    for entry in std::fs::read_dir("/proc/self/fd")? {
        let Some(fd) = entry?
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<RawFd>().ok())
        else {
            continue;
        };
        // SAFETY: the descriptor is only borrowed for the calls below; if it was closed in the
        // meantime the calls fail with EBADF and we move on.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        let sock = socket2::SockRef::from(&borrowed);
        let is_udp = matches!(sock.r#type(), Ok(t) if t == socket2::Type::DGRAM);
        if is_udp && sock.local_addr().ok().and_then(|a| a.as_socket()) == Some(addr) {
            return sock.bind_device(Some(ifname.as_bytes()));
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::NotFound,
        "gossip socket not found",
    ))
}

/// A socket opened on any transport, handed to chitchat counting what crosses it into
/// [`crate::metrics::GOSSIP`] (messages and bytes each way, as chitchat reports them).
struct Counted(std::sync::Mutex<Option<Box<dyn Socket>>>);

#[async_trait]
impl Transport for Counted {
    async fn open(&self, _listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        let inner = self.0.lock().unwrap().take();
        let inner = inner.ok_or_else(|| anyhow::anyhow!("the gossip socket was opened already"))?;
        Ok(Box::new(CountedSocket(inner)))
    }
}

struct CountedSocket(Box<dyn Socket>);

#[async_trait]
impl Socket for CountedSocket {
    fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        self.0.local_addr()
    }

    async fn send(
        &mut self,
        to: SocketAddr,
        envelope: chitchat::ChitchatEnvelope,
    ) -> anyhow::Result<chitchat::transport::SendOutcome> {
        let out = self.0.send(to, envelope).await?;
        crate::metrics::GOSSIP.sent(out.num_bytes_sent);
        Ok(out)
    }

    async fn recv(&mut self) -> anyhow::Result<chitchat::transport::RecvOutcome> {
        let got = self.0.recv().await?;
        crate::metrics::GOSSIP.received(got.num_bytes_received);
        Ok(got)
    }
}

pub struct GossipConfig {
    pub node_id: NodeId,
    /// Where this node gossips: its mesh address and the gossip port.
    pub addr: SocketAddr,
    pub cluster_id: String,
    pub seeds: Vec<SocketAddr>,
    pub initial: Vec<(String, String)>,
}

/// A running chitchat instance and the bookkeeping to feed [`Membership`] incrementally.
pub struct Gossip {
    handle: ChitchatHandle,
    started: Instant,
    /// Last (node, key) -> version processed, so unchanged values are not re-verified.
    seen: HashMap<(ChitchatId, String), u64>,
    rejected_logged: HashMap<(ChitchatId, String), u64>,
    /// When each node was first heard of in gossip. chitchat reports a node as dead until it has
    /// seen two heartbeats, so a node just heard of is not yet "offline".
    first_heard: HashMap<NodeId, Instant>,
    /// Revocations this node has put into its own gossip state.
    published_revocations: HashSet<NodeId>,
    /// Nodes whose gossip state chitchat holds, as of the last poll.
    heard: HashSet<NodeId>,
    /// Nodes chitchat's failure detector considers live, as of the last poll.
    live: HashSet<NodeId>,
    /// Per node, the state version whose keys were all taken in: a node whose version has not
    /// moved is skipped (so an idle poll is a version comparison per node).
    taken_in: HashMap<ChitchatId, u64>,
}

/// chitchat could not start (its socket, mostly).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct GossipError(String);

impl Gossip {
    pub async fn start(
        cfg: GossipConfig,
        transport: &dyn Transport,
    ) -> Result<Gossip, GossipError> {
        let generation = crate::util::unix_now_ms();
        let chitchat_id = ChitchatId::new(cfg.node_id.to_string(), generation, cfg.addr);
        let config = ChitchatConfig {
            chitchat_id,
            cluster_id: cfg.cluster_id,
            gossip_interval: GOSSIP_INTERVAL,
            listen_addr: cfg.addr,
            seed_nodes: cfg.seeds.iter().map(|s| s.to_string()).collect(),
            failure_detector_config: FailureDetectorConfig {
                phi_threshold: PHI_THRESHOLD,
                // Intervals between heartbeats kept per node (8 bytes each): a hundred rounds is
                // enough history for a mean, and a thousand would cost 8 KB per member.
                sampling_window_size: 100,
                max_interval: Duration::from_secs(10),
                initial_interval: FD_INITIAL_INTERVAL,
                dead_node_grace_period: DEAD_NODE_GRACE,
            },
            marked_for_deletion_grace_period: DEAD_NODE_GRACE,
            catchup_callback: None,
            extra_liveness_predicate: None,
            protocol_version: ProtocolVersion::V1,
        };
        let socket = transport
            .open(cfg.addr)
            .await
            .map_err(|e| GossipError(format!("{e:#}")))?;
        let counted = Counted(std::sync::Mutex::new(Some(socket)));
        let handle = spawn_chitchat(config, cfg.initial, &counted)
            .await
            .map_err(|e| GossipError(format!("{e:#}")))?;
        Ok(Gossip {
            handle,
            started: Instant::now(),
            seen: HashMap::new(),
            rejected_logged: HashMap::new(),
            first_heard: HashMap::new(),
            published_revocations: HashSet::new(),
            heard: HashSet::new(),
            live: HashSet::new(),
            taken_in: HashMap::new(),
        })
    }

    pub async fn set(&self, key: &str, value: String) {
        let cc = self.handle.chitchat();
        let mut cc = cc.lock().await;
        let st = cc.self_node_state();
        if st.get(key) != Some(value.as_str()) {
            st.set(key, value);
        }
    }

    /// Spread every revocation the view knows (one key each), once.
    pub async fn publish_revocations(&mut self, m: &Membership) {
        let new: Vec<(NodeId, String)> = m
            .revocations()
            .filter(|r| !self.published_revocations.contains(&r.node_id))
            .map(|r| (r.node_id, r.raw.to_b64()))
            .collect();
        for (id, raw) in new {
            self.set(&format!("{PREFIX_REVOCATION}{id}"), raw).await;
            self.published_revocations.insert(id);
        }
    }

    /// Whether chitchat holds gossip state of `id` (as of the last poll).
    pub fn has_heard(&self, id: &NodeId) -> bool {
        self.heard.contains(id)
    }

    /// Ask chitchat to gossip with `addr` now.
    pub fn gossip_now(&self, addr: SocketAddr) {
        let _ = self.handle.gossip(addr);
    }

    /// Feed everything new in chitchat into the membership view and update liveness.
    /// Returns whether new statements were taken in (news worth pushing on).
    ///
    /// `probes` are what direct probes through the tunnels say of members (see
    /// `node::probe`): they decide over chitchat's failure detector where they say anything.
    pub async fn poll(
        &mut self,
        m: &mut Membership,
        now: u64,
        probes: &HashMap<NodeId, Liveness>,
    ) -> bool {
        let cc = self.handle.chitchat();
        let cc = cc.lock().await;
        let me = cc.self_chitchat_id().clone();
        let mut changed = false;
        // Collect (id, key, version, value) for keys whose version moved, from the nodes whose
        // state moved since it was last taken in completely (most polls: none).
        let mut todo: Vec<(ChitchatId, String, u64, String)> = Vec::new();
        let mut scanned: Vec<(ChitchatId, u64)> = Vec::new();
        for (cid, st) in cc.node_states() {
            if *cid == me || self.taken_in.get(cid) == Some(&st.max_version()) {
                continue;
            }
            scanned.push((cid.clone(), st.max_version()));
            for (k, v) in st.key_values() {
                if !SIGNED_KEYS.contains(&k) && !k.starts_with(PREFIX_REVOCATION) {
                    continue;
                }
                let Some(vv) = st.get_versioned(k) else {
                    continue;
                };
                if self.seen.get(&(cid.clone(), k.to_string())) == Some(&vv.version) {
                    continue;
                }
                todo.push((cid.clone(), k.to_string(), vv.version, v.to_string()));
            }
        }
        self.live.clear();
        self.live.extend(
            cc.live_nodes()
                .filter(|c| **c != me)
                .filter_map(|c| NodeId::parse(&c.node_id)),
        );
        // Bookkeeping follows chitchat: what it forgot (a dead node's old generation), this
        // forgets too, so a long-running node does not grow with every restart it has seen.
        if cc.node_states().len() != self.taken_in.len() + 1 || !scanned.is_empty() {
            self.heard.clear();
            self.heard.extend(
                cc.node_states()
                    .keys()
                    .filter_map(|c| NodeId::parse(&c.node_id)),
            );
            let present: HashSet<&ChitchatId> = cc.node_states().keys().collect();
            self.seen.retain(|(cid, _), _| present.contains(cid));
            self.rejected_logged
                .retain(|(cid, _), _| present.contains(cid));
            self.taken_in.retain(|cid, _| present.contains(cid));
            self.first_heard.retain(|id, _| self.heard.contains(id));
        }
        drop(cc);

        // Revocations first, then certificates, then records: each may depend on the previous.
        let rank = |k: &str| {
            if k.starts_with(PREFIX_REVOCATION) {
                0
            } else if k == KEY_CERT {
                1
            } else {
                2
            }
        };
        todo.sort_by_key(|t| rank(&t.1));
        // A node is taken in completely once none of its keys waits for a retry.
        let mut retry: HashSet<ChitchatId> = HashSet::new();
        for (cid, key, version, value) in todo {
            let Some(under) = NodeId::parse(&cid.node_id) else {
                self.seen.insert((cid, key), version);
                continue;
            };
            let result: Result<bool, Reject> = Signed::from_b64(&value, "gossip value")
                .map_err(Reject::from)
                .and_then(|raw| {
                    if key.starts_with(PREFIX_REVOCATION) {
                        m.ingest_revocation(&raw)
                    } else if key == KEY_CERT {
                        // A certificate belongs under its own node's id; checked before it
                        // is taken in, so a misfiled one changes nothing.
                        let claimed = crate::trust::Cert::peek_node_id(&raw)?;
                        if claimed != under {
                            return Err(Reject::IdMismatch { claimed, under });
                        }
                        let known = m.get(&under).is_some();
                        m.ingest_cert(&raw, now)?;
                        if !known {
                            debug!(node = %under, via = %cid.gossip_advertise_addr, "learnt of a member through gossip");
                        }
                        Ok(true)
                    } else if key == KEY_SERVICES {
                        m.ingest_services(under, &raw)
                    } else if key == KEY_ROUTES {
                        m.ingest_routes(under, &raw)
                    } else if key == KEY_ABOUT {
                        m.ingest_about(under, &raw)
                    } else if key == KEY_WORKLOADS {
                        m.ingest_workloads(under, &raw)
                    } else {
                        m.ingest_record(under, &raw)
                    }
                });
            match result {
                Ok(c) => {
                    changed |= c;
                    self.seen.insert((cid, key), version);
                }
                // The certificate may simply not have been processed yet: retry next time.
                Err(Reject::UnknownNode(_)) => {
                    retry.insert(cid);
                }
                Err(Reject::Stale) => {
                    self.seen.insert((cid, key), version);
                }
                Err(e) => {
                    if self
                        .rejected_logged
                        .insert((cid.clone(), key.clone()), version)
                        != Some(version)
                    {
                        warn!(node = %under, key = %key, error = %e, "ignoring gossip that does not verify");
                    }
                    self.seen.insert((cid, key), version);
                }
            }
        }

        for (cid, max_version) in scanned {
            if !retry.contains(&cid) {
                self.taken_in.insert(cid, max_version);
            }
        }
        let now_i = Instant::now();
        for id in &self.heard {
            self.first_heard.entry(*id).or_insert(now_i);
        }
        let past_grace = self.started.elapsed() > UNHEARD_GRACE;
        let ids: Vec<(NodeId, Liveness)> = m.all().map(|x| (x.cert.node_id, x.liveness)).collect();
        for (id, before) in ids {
            let heard_long_ago = self
                .first_heard
                .get(&id)
                .is_some_and(|t| now_i.duration_since(*t) > UNHEARD_GRACE);
            let now_l = if let Some(l) = probes.get(&id) {
                *l
            } else if self.live.contains(&id) {
                Liveness::Alive
            } else if before == Liveness::Alive
                || heard_long_ago
                || (!self.heard.contains(&id) && past_grace)
            {
                Liveness::Dead
            } else {
                before
            };

            m.set_liveness(id, now_l, now);
        }
        changed
    }

    pub async fn shutdown(self) {
        if let Err(e) = self.handle.shutdown().await {
            debug!(error = %e, "gossip shutdown");
        }
    }
}
