//! The admission policy of decrypted packets (DESIGN "Data plane"): a peer may send only from
//! its own /24 (the WireGuard allowed-IPs rule) and only to this node's own /24 (no member can
//! use another as a router). Pure: the receive path asks, and counts what it drops.

use crate::id::MeshRange;
use std::net::{IpAddr, Ipv4Addr};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    Deliver,
    /// The source is outside the sending peer's /24 (or not IPv4: the mesh is IPv4 inside).
    BadSource,
    /// The destination is not in this node's own /24.
    BadDestination,
}

/// Whether a packet decrypted from the peer holding `peer_slot`, with source `src` and
/// destination `dst`, may be handed to this node (holding `own_slot`).
pub fn admit(
    range: &MeshRange,
    peer_slot: u32,
    own_slot: u32,
    src: IpAddr,
    dst: Option<Ipv4Addr>,
) -> Admission {
    let from_peer = match src {
        IpAddr::V4(s) => range.slot_of(s) == Some(peer_slot),
        IpAddr::V6(_) => false,
    };
    if !from_peer {
        return Admission::BadSource;
    }
    if dst.and_then(|d| range.slot_of(d)) != Some(own_slot) {
        return Admission::BadDestination;
    }
    Admission::Deliver
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_peers_subnet_to_this_nodes_subnet_is_delivered() {
        let r: MeshRange = "10.210.0.0/16".parse().unwrap();
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        let v4 = |s: &str| IpAddr::V4(ip(s));
        // Peer in slot 7, this node in slot 3.
        let ok = admit(&r, 7, 3, v4("10.210.7.20"), Some(ip("10.210.3.1")));
        assert_eq!(ok, Admission::Deliver);
        // A workload of this node's /24 is a fine destination too.
        assert_eq!(
            admit(&r, 7, 3, v4("10.210.7.1"), Some(ip("10.210.3.200"))),
            Admission::Deliver
        );
        // Spoofed sources: another member's /24, outside the mesh, IPv6.
        for src in [
            v4("10.210.9.1"),
            v4("192.0.2.1"),
            "2001:db8::1".parse().unwrap(),
        ] {
            assert_eq!(
                admit(&r, 7, 3, src, Some(ip("10.210.3.1"))),
                Admission::BadSource,
                "{src}"
            );
        }
        // Routing through this node: a third /24, outside the mesh, or no IPv4 header.
        for dst in [Some(ip("10.210.9.1")), Some(ip("198.51.100.1")), None] {
            assert_eq!(
                admit(&r, 7, 3, v4("10.210.7.1"), dst),
                Admission::BadDestination,
                "{dst:?}"
            );
        }
        // The source rule is checked first: a spoofed packet counts as a bad source.
        assert_eq!(
            admit(&r, 7, 3, v4("10.210.9.1"), Some(ip("10.210.9.2"))),
            Admission::BadSource
        );
    }
}
