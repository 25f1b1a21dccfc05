//! The local control API (DESIGN "Processes, files and the local API"): JSON over HTTP/1.1 on a
//! Unix socket, so `curl --unix-socket /run/meshd/meshd.sock http://meshd/v1/status` works.
//! `meshctl` is a client of it and nothing more. [`api`] holds the wire types shared by both
//! sides; [`server`] turns requests into [`api::ApiCall`]s for the node's main loop; [`client`]
//! is what `meshctl` uses.

pub mod api;
pub mod client;
pub mod server;

pub use api::*;
