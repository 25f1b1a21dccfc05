//! Protocol and product constants, in one place, with where they come from.

use std::time::Duration;

/// Default UDP port for WireGuard and join frames (the WireGuard convention).
pub const DEFAULT_PORT: u16 = 51820;
/// Default mesh range; one /24 per node, so it holds 256 nodes.
pub const DEFAULT_CIDR: &str = "10.210.0.0/16";
/// Default TUN interface name.
pub const DEFAULT_TUN: &str = "mesh0";
/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/meshd";
/// Default control socket.
pub const DEFAULT_SOCKET: &str = "/run/meshd/meshd.sock";
/// Default mesh DNS domain (never a whole TLD: `.internal` is shared with cloud providers).
pub const DEFAULT_DOMAIN: &str = "mesh.internal";

/// TUN MTU: 1500 minus the worst-case WireGuard overhead over IPv6
/// (40 IPv6 + 8 UDP + 32 WireGuard data header/tag = 80), as wg-quick does.
pub const TUN_MTU: u16 = 1420;

/// Gossip (chitchat) UDP port, bound on the node's mesh address only.
pub const GOSSIP_PORT: u16 = 7946;
/// How often chitchat gossips on its own (anti-entropy). Every exchange carries a digest of
/// every member (about 20 bytes each, compressed), with three partners a round each way:
/// at 100 members a round costs a node about 24 KB, so rounds are two seconds apart. News
/// does not wait for them: a node that learns something new pushes it at once
/// ([`GOSSIP_PUSH_EVERY`]), and failures are found by probes through the tunnels
/// (`node::probe`), not by gossip heartbeats.
pub const GOSSIP_INTERVAL: Duration = Duration::from_secs(2);
/// A node that took in (or made) new statements gossips with two live members at once, at most
/// this often: an admission spreads across a 100-node mesh in a few hops, not a few rounds.
pub const GOSSIP_PUSH_EVERY: Duration = Duration::from_millis(300);
/// chitchat's phi-accrual threshold (its default; Cassandra uses the same). With heartbeats
/// every [`GOSSIP_INTERVAL`] it declares a silent node dead after ~16 s: the backstop behind
/// the probes (and the only detector where probes cannot run, as in the in-memory harness).
pub const PHI_THRESHOLD: f64 = 8.0;
/// Prior mean heartbeat interval for the failure detector before samples exist.
pub const FD_INITIAL_INTERVAL: Duration = GOSSIP_INTERVAL;
/// After this long dead, chitchat forgets a node's gossip state. The member cache keeps the
/// node (offline, holding its subnet) independently of this.
pub const DEAD_NODE_GRACE: Duration = Duration::from_secs(15 * 60);

/// WireGuard persistent keepalive, seconds (the usual NAT-friendly value).
pub const PERSISTENT_KEEPALIVE: u16 = 25;
/// How often `update_timers` runs for every peer (boringtun's device uses 250 ms).
pub const TIMER_TICK: Duration = Duration::from_millis(250);
/// WireGuard REKEY_TIMEOUT (whitepaper 6.1): an unanswered initiation is retried after this.
pub const REKEY_TIMEOUT: Duration = Duration::from_secs(5);
/// A session older than REJECT_AFTER_TIME (whitepaper 6.1) is unusable.
pub const REJECT_AFTER_TIME: Duration = Duration::from_secs(180);
/// How often a peer whose handshakes gave up (REKEY_ATTEMPT_TIME) is tried again.
pub const RETRY_EXPIRED_PEER: Duration = Duration::from_secs(15);
/// Handshake messages per second across all peers before cookies are demanded. boringtun's
/// device uses 100; `decapsulate` counts each handshake once more, hence twice that.
pub const HANDSHAKE_RATE_LIMIT: u64 = 200;

/// UDP socket buffers. The kernel default (208 KiB) drops tens of thousands of packets per
/// 10 s of iperf3 at the receiver; 8 MiB absorbs bursts at multi-gigabit rates.
pub const UDP_SOCKET_BUFFER: usize = 8 << 20;

/// Default join token lifetime.
pub const DEFAULT_INVITE_TTL: Duration = Duration::from_secs(24 * 3600);
/// How many live members a token lists as bootstrap endpoints.
pub const TOKEN_BOOTSTRAP_MEMBERS: usize = 3;
/// Join requests older than this (by the joiner's clock) are refused as replays.
pub const JOIN_REQUEST_MAX_AGE: Duration = Duration::from_secs(300);
/// How long a joiner first waits for an answer from one bootstrap endpoint before trying the
/// next; each pass over the endpoints waits half as long again, up to [`JOIN_ATTEMPT_MAX`].
pub const JOIN_ATTEMPT_TIMEOUT: Duration = Duration::from_millis(1000);
pub const JOIN_ATTEMPT_MAX: Duration = Duration::from_secs(4);
/// How long a joiner keeps retrying before it reports that no bootstrap endpoint answered: long
/// enough to ride out a lossy link (a request and its answer are single datagrams).
pub const JOIN_DEADLINE: Duration = Duration::from_secs(20);

/// How often the membership view is reconciled with gossip and pushed to the data plane.
pub const RECONCILE_TICK: Duration = Duration::from_millis(200);
/// A running node that has had no tunnel to any member for this long (since it started, or
/// since it last had one) asks the token's bootstrap endpoints again; then every
/// [`BOOTSTRAP_FALLBACK_RETRY`] while it stays cut off.
pub const BOOTSTRAP_FALLBACK_AFTER: Duration = Duration::from_secs(15);
pub const BOOTSTRAP_FALLBACK_RETRY: Duration = Duration::from_secs(30);
/// How often the machine's own addresses are re-read for the endpoint list.
pub const ENDPOINT_RESCAN: Duration = Duration::from_secs(30);
/// A member admitted by a seed that never shows up in gossip is forgotten after this.
pub const PENDING_MEMBER_TTL: Duration = Duration::from_secs(600);
/// A member not seen alive for this long is dropped from the member cache (and its slot freed).
pub const MEMBER_CACHE_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// Maximum length of a datagram the join protocol will accept.
pub const MAX_JOIN_FRAME: usize = 16 * 1024;

/// `meshd --version`: the release and the commit it was built from.
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (", env!("MESHD_COMMIT"), ")");
