//! The data plane (DESIGN "Data plane"): one TUN device, one UDP socket, one boringtun `Tunn`
//! per peer. [`device`] is the protocol logic; [`io`] the edges with in-memory twins;
//! [`linux`] the real TUN device, UDP socket and netlink configuration.

pub mod addressing;
pub mod device;
pub mod io;
pub mod linux;
pub mod packet;
pub mod path;
pub mod peer;
pub mod relay;

pub use device::Device;
pub use peer::{PeerSpec, PeerStats};
