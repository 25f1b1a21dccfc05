//! Test tooling: a mesh on paper ([`fixtures`]), in-memory twins of the I/O edges ([`mem`]) and
//! two tunnels with a session ([`tunnels`]),
//! also for the benchmarks through the `testing` feature; compiled for the crate's own tests
//! only, a whole-node harness on the twins ([`sim`]) and the multi-node scenarios run on it.

pub mod fixtures;
pub mod gossip_fleet;
pub mod mem;
#[cfg(test)]
mod scenarios;
#[cfg(test)]
pub mod sim;
pub mod tunnels;
