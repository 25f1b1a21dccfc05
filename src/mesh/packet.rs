//! Packet classification and the few IP header fields the data plane reads.

use std::net::Ipv4Addr;

/// First bytes of a meshd control frame on the UDP port (join request/answer, later NAT probes).
/// WireGuard messages start with a little-endian type 1-4 followed by three zero bytes, so
/// `b'M'` (0x4d) can never be mistaken for one.
pub const CONTROL_MAGIC: &[u8; 4] = b"MSHD";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    WireGuard,
    Control,
    /// A relayed WireGuard datagram behind a session header ([`super::relay`]).
    Relay,
    Unknown,
}

/// Demultiplex a datagram arriving on the mesh port (DESIGN "One UDP port").
pub fn classify(datagram: &[u8]) -> FrameKind {
    if datagram.len() >= 4 && (1..=4).contains(&datagram[0]) && datagram[1..4] == [0, 0, 0] {
        FrameKind::WireGuard
    } else if datagram.len() > CONTROL_MAGIC.len() && datagram.starts_with(CONTROL_MAGIC) {
        FrameKind::Control
    } else if super::relay::parse(datagram).is_some() {
        FrameKind::Relay
    } else {
        FrameKind::Unknown
    }
}

/// Source address of an IPv4 packet.
pub fn ipv4_src(packet: &[u8]) -> Option<Ipv4Addr> {
    (packet.len() >= 20 && packet[0] >> 4 == 4)
        .then(|| Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]))
}

/// Destination address of an IPv4 packet.
pub fn ipv4_dst(packet: &[u8]) -> Option<Ipv4Addr> {
    (packet.len() >= 20 && packet[0] >> 4 == 4)
        .then(|| Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]))
}

/// RFC 1071 internet checksum.
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for c in data.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        sum += w as u32;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Build an IPv4/UDP packet (used by tests and by the in-memory harness).
pub fn build_ipv4_udp(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
    let total = 20 + 8 + payload.len();
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let c = checksum(&p[..20]);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p[20..22].copy_from_slice(&sport.to_be_bytes());
    p[22..24].copy_from_slice(&dport.to_be_bytes());
    p[24..26].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p[28..].copy_from_slice(payload);
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn classifies_wireguard_and_control() {
        assert_eq!(classify(&[1, 0, 0, 0, 9]), FrameKind::WireGuard);
        assert_eq!(classify(&[4, 0, 0, 0]), FrameKind::WireGuard);
        assert_eq!(classify(&[5, 0, 0, 0]), FrameKind::Unknown);
        assert_eq!(classify(&[1, 0, 1, 0]), FrameKind::Unknown);
        assert_eq!(classify(b"MSHD\x01rest"), FrameKind::Control);
        assert_eq!(classify(b"MSHD"), FrameKind::Unknown);
        assert_eq!(classify(b"MSHR\0\0\0\0\0\0\0\x01\x04"), FrameKind::Relay);
        assert_eq!(classify(b"MSHR\0\0\0\0\0\0\0\x01"), FrameKind::Unknown);
        assert_eq!(classify(&[]), FrameKind::Unknown);
    }

    #[test]
    fn reads_addresses() {
        let p = build_ipv4_udp(
            Ipv4Addr::new(10, 0, 0, 1),
            Ipv4Addr::new(10, 0, 1, 1),
            1,
            2,
            b"x",
        );
        assert_eq!(ipv4_src(&p), Some(Ipv4Addr::new(10, 0, 0, 1)));
        assert_eq!(ipv4_dst(&p), Some(Ipv4Addr::new(10, 0, 1, 1)));
        assert_eq!(checksum(&p[..20]), 0);
        assert_eq!(ipv4_dst(&p[..19]), None);
    }

    proptest! {
        #[test]
        fn classify_never_panics(d in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = classify(&d);
            let _ = ipv4_src(&d);
            let _ = ipv4_dst(&d);
        }
    }
}
