//! Membership by gossip (DESIGN "Gossip rides inside the tunnels"). [`membership`] is the pure
//! view built from verified statements; [`chitchat_glue`] runs chitchat on the node's mesh
//! address, bound to the TUN device, and translates its key-values into statements.

pub mod chitchat_glue;
pub mod membership;

pub use chitchat_glue::{Gossip, GossipConfig};
pub use membership::{Liveness, Member, Membership, MeshParams, Reject};
