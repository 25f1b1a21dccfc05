//! The data plane: TUN device, one UDP socket, a boringtun `Tunn` per peer.

pub mod addressing;
