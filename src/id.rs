//! The identifiers every layer shares: keys, node and mesh ids, and the mesh range. A leaf:
//! it imports nothing else of this crate but formatting helpers, so trust, addressing and the
//! data plane can all name these types without importing each other.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// A 32-byte public key (ed25519 or x25519).
pub type Key32 = [u8; 32];

/// The mesh identity: the root key's public half.
#[derive(
    Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct MeshId(pub Key32);

impl MeshId {
    /// Short form for humans and for chitchat's cluster id.
    pub fn short(&self) -> String {
        crate::util::hex(&self.0[..6])
    }
}

impl fmt::Display for MeshId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.short())
    }
}

impl fmt::Debug for MeshId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MeshId({})", self.short())
    }
}

/// Short node id: 8 bytes of SHA-256 over the identity key, printed as 16 hex digits. Used as
/// the chitchat node id (DESIGN: keep gossip ids short, full keys go in values).
#[derive(
    Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct NodeId(pub [u8; 8]);

impl NodeId {
    pub fn of_identity(identity: &Key32) -> NodeId {
        let mut h = Sha256::new();
        h.update(b"meshd/node-id/v1");
        h.update(identity);
        let d = h.finalize();
        let mut id = [0u8; 8];
        id.copy_from_slice(&d[..8]);
        NodeId(id)
    }

    pub fn parse(s: &str) -> Option<NodeId> {
        if s.len() != 16 {
            return None;
        }
        let mut id = [0u8; 8];
        for (i, b) in id.iter_mut().enumerate() {
            *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(NodeId(id))
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&crate::util::hex(&self.0))
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({self})")
    }
}

/// The mesh range: an IPv4 prefix between /8 and /24, cut into /24 slots.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
pub struct MeshRange {
    pub base: Ipv4Addr,
    pub prefix: u8,
}

impl MeshRange {
    pub fn new(base: Ipv4Addr, prefix: u8) -> Result<MeshRange, String> {
        if !(8..=24).contains(&prefix) {
            return Err(format!(
                "mesh range /{prefix} is not supported: use a prefix between /8 and /24 \
                 (each node takes a /24; /16 holds 256 nodes)"
            ));
        }
        let mask = u32::MAX << (32 - prefix);
        let b = u32::from(base);
        if b & !mask != 0 {
            return Err(format!(
                "mesh range {base}/{prefix} has host bits set: did you mean {}/{prefix}?",
                Ipv4Addr::from(b & mask)
            ));
        }
        Ok(MeshRange { base, prefix })
    }

    /// Number of /24 slots.
    pub fn slots(&self) -> u32 {
        1u32 << (24 - self.prefix)
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = u32::MAX << (32 - self.prefix);
        u32::from(ip) & mask == u32::from(self.base)
    }

    /// The slot whose /24 holds `ip`, if `ip` is in the mesh range.
    pub fn slot_of(&self, ip: Ipv4Addr) -> Option<u32> {
        if !self.contains(ip) {
            return None;
        }
        Some((u32::from(ip) - u32::from(self.base)) >> 8)
    }

    /// Network address of a slot's /24.
    pub fn subnet(&self, slot: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.base) + (slot << 8))
    }

    /// The node's own address in its /24 (`.1`).
    pub fn node_ip(&self, slot: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.base) + (slot << 8) + 1)
    }
}

impl fmt::Display for MeshRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.base, self.prefix)
    }
}

impl FromStr for MeshRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (a, p) = s.split_once('/').ok_or_else(|| {
            format!("mesh range {s:?} must be written as ADDRESS/PREFIX, e.g. 10.210.0.0/16")
        })?;
        let base: Ipv4Addr = a
            .parse()
            .map_err(|_| format!("mesh range {s:?}: {a:?} is not an IPv4 address"))?;
        let prefix: u8 = p
            .parse()
            .map_err(|_| format!("mesh range {s:?}: {p:?} is not a prefix length"))?;
        MeshRange::new(base, prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_validates_ranges() {
        let r: MeshRange = "10.210.0.0/16".parse().unwrap();
        assert_eq!(r.slots(), 256);
        assert_eq!(r.node_ip(5), Ipv4Addr::new(10, 210, 5, 1));
        assert_eq!(r.slot_of(Ipv4Addr::new(10, 210, 7, 200)), Some(7));
        assert_eq!(r.slot_of(Ipv4Addr::new(10, 211, 0, 1)), None);
        assert_eq!("10.128.0.0/9".parse::<MeshRange>().unwrap().slots(), 32768);
        let e = "10.210.1.0/16".parse::<MeshRange>().unwrap_err();
        assert!(e.contains("did you mean 10.210.0.0/16"), "{e}");
        assert!("10.0.0.0/25".parse::<MeshRange>().is_err());
        assert!("10.0.0.0".parse::<MeshRange>().is_err());
        assert!("banana/16".parse::<MeshRange>().is_err());
    }

    #[test]
    fn node_ids_print_and_parse_as_16_hex_digits() {
        let id = NodeId::of_identity(&[7; 32]);
        let s = id.to_string();
        assert_eq!(s.len(), 16);
        assert_eq!(NodeId::parse(&s), Some(id));
        assert_eq!(NodeId::parse("xyz"), None);
        assert_eq!(NodeId::parse(&s[..15]), None);
    }
}
