//! meshd: a self-hosted mesh VPN with no central server.
//!
//! Every machine runs the same binary. Nodes authenticate each other through a chain of
//! signatures rooted in the mesh root key ([`trust`]), derive their /24 deterministically
//! ([`mesh::addressing`]), carry traffic over userspace WireGuard ([`mesh`]) and learn about each
//! other by gossip inside the tunnels ([`gossip`]). [`node`] wires the pieces together; the
//! binaries in `src/bin/` are thin shells over [`cli`].

pub mod cli;
pub mod constants;
pub mod control;
pub mod dns;
pub mod gossip;
pub mod id;
pub mod join;
pub mod mesh;
pub mod node;
pub mod proxy;
pub mod state;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod trust;
pub mod util;
pub mod wire;
