//! Test tooling: a mesh on paper ([`fixtures`], also for the benchmarks through the `testing`
//! feature) and, compiled for the crate's own tests only, in-memory twins of the I/O edges
//! ([`mem`]), a whole-node harness on them ([`sim`]) and the multi-node scenarios run on it.

pub mod fixtures;
pub mod gossip_fleet;
#[cfg(test)]
pub mod mem;
#[cfg(test)]
mod scenarios;
#[cfg(test)]
pub mod sim;
