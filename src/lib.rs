//! meshd: a self-hosted mesh VPN with no central server.
//!
//! Every machine runs the same binary. Nodes authenticate each other through a chain of
//! signatures rooted in the mesh root key ([`trust`]), derive their /24 deterministically
//! ([`mesh::addressing`]), carry traffic over userspace WireGuard ([`mesh`]) and learn about each
//! other by gossip inside the tunnels ([`gossip`]). [`node`] wires the pieces together; the
//! binaries in `src/bin/` are thin shells over [`cli`].
//!
//! # Layout
//!
//! - [`id`]: keys, node and mesh ids, the mesh range. A leaf every other module may use.
//! - [`trust`]: root key, invites, node certificates, signed records, revocations, join
//!   tokens. Pure: bytes in, verified values out.
//! - [`mesh`]: the data plane. [`mesh::addressing`] derives each node's /24;
//!   [`mesh::device`] runs the WireGuard sessions (send, receive, timers, the admission policy);
//!   [`mesh::io`] is the TUN/UDP edge as traits; [`mesh::linux`] the real edge.
//! - [`gossip`]: the membership view built from verified statements (pure, with its cache) and
//!   chitchat running inside the tunnels.
//! - [`wire`]: the codec of the control frames outside the tunnels; [`join`]: the seed's
//!   decision (pure) and the joiner.
//! - [`node`]: the runtime, in parts: state loading, the view and its snapshot, the publisher of
//!   this node's statements, control-frame handling, gossip outreach and news pushes, the
//!   failure detector (a pure SWIM-style state machine and the task that probes), the bootstrap
//!   fallback, NAT traversal (observed addresses and punch rules, sans-IO, and the task that
//!   carries them), the DNS and edge roles, the API handlers.
//! - [`dns`]: the mesh zone (pure) and the DNS server; [`proxy`]: gateway, serving side, exit
//!   node and local proxies.
//! - [`control`]: the local API (wire types, server, client); [`state`]: the state directory,
//!   written atomically; [`cli`]: the two command lines and `meshd demo`.
//! - [`workloads`]: the node's /24 for containers and namespaces (a bridge, meshd's nftables
//!   table, named namespaces): the plan (pure) and carrying it out on Linux.
//! - [`constants`] (protocol constants with their sources), [`util`] (formatting, limiters).
//! - `testing` (tests, and benchmarks with the `testing` feature): fixtures, in-memory
//!   twins of the edges, the whole-node harness, a gossip-only fleet on a simulated clock.

pub mod cli;
pub mod constants;
pub mod control;
pub mod dns;
pub mod gossip;
pub mod id;
pub mod join;
pub mod logging;
pub mod mesh;
pub mod metrics;
pub mod node;
pub mod proxy;
pub mod state;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod trust;
pub mod util;
pub mod wire;
pub mod workloads;
