//! Mesh DNS (issue: every node answers for the mesh's names and services and forwards the rest).
//! [`zone`] turns membership into records (pure); [`upstream`] finds the host's resolvers;
//! [`server`] runs hickory-server on the node's mesh address; [`resolved`] registers the mesh
//! domain with systemd-resolved where it runs.

pub mod fast;
pub mod resolved;
pub mod server;
pub mod upstream;
pub mod zone;

pub use server::DnsServer;
