//! The join exchange: the only conversation outside the tunnels (DESIGN "Gossip rides inside the
//! tunnels"). The joiner ([`joiner`]) sends its certificate chain, signed with its identity key,
//! to a bootstrap endpoint; the seed ([`seed`]) verifies it against the mesh root and the mesh's
//! state, assigns the joiner's slot with the deterministic rule and answers with a signed
//! acceptance, or with a refusal that says why. No secret crosses the wire. The frames
//! themselves are in [`crate::wire`].

pub mod joiner;
pub mod seed;

pub use joiner::{join, make_request, verify_accept, JoinError, JoinOutcome};
pub use seed::{acceptance, decide, peek_request_node, Admission};
