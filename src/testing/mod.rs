//! Test tooling, compiled for the crate's own tests only: in-memory twins of the I/O edges
//! ([`mem`]), a whole-node harness on them ([`sim`]) and the multi-node scenarios run on it
//! ([`scenarios`]).

pub mod mem;
#[cfg(test)]
mod scenarios;
pub mod sim;
