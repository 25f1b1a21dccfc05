//! PROXY protocol version 2 headers (haproxy's proxy-protocol.txt, section 2.2): tells the
//! workload the real client address of a connection that came through the gateway.

use std::net::{IpAddr, SocketAddr};

pub const SIGNATURE: [u8; 12] = [
    0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a,
];

/// `PROXY` command, TCP, from `src` (the client) to `dst` (the address it connected to).
pub fn header(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let mut h = SIGNATURE.to_vec();
    h.push(0x21); // version 2, PROXY
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            h.push(0x11); // AF_INET, STREAM
            h.extend_from_slice(&12u16.to_be_bytes());
            h.extend_from_slice(&s.octets());
            h.extend_from_slice(&d.octets());
        }
        (s, d) => {
            let v6 = |ip: IpAddr| match ip {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            h.push(0x21); // AF_INET6, STREAM
            h.extend_from_slice(&36u16.to_be_bytes());
            h.extend_from_slice(&v6(s).octets());
            h.extend_from_slice(&v6(d).octets());
        }
    }
    h.extend_from_slice(&src.port().to_be_bytes());
    h.extend_from_slice(&dst.port().to_be_bytes());
    h
}

/// Decode a header: `(source, destination, header length)`; `None` if incomplete or not v2.
pub fn decode(b: &[u8]) -> Option<(SocketAddr, SocketAddr, usize)> {
    if b.len() < 16 || b[..12] != SIGNATURE || b[12] != 0x21 {
        return None;
    }
    let len = u16::from_be_bytes([b[14], b[15]]) as usize;
    if b.len() < 16 + len {
        return None;
    }
    let a = &b[16..16 + len];
    let (src, dst) = match b[13] {
        0x11 if len >= 12 => {
            let s = std::net::Ipv4Addr::new(a[0], a[1], a[2], a[3]);
            let d = std::net::Ipv4Addr::new(a[4], a[5], a[6], a[7]);
            let sp = u16::from_be_bytes([a[8], a[9]]);
            let dp = u16::from_be_bytes([a[10], a[11]]);
            (SocketAddr::from((s, sp)), SocketAddr::from((d, dp)))
        }
        0x21 if len >= 36 => {
            let s: [u8; 16] = a[..16].try_into().ok()?;
            let d: [u8; 16] = a[16..32].try_into().ok()?;
            let sp = u16::from_be_bytes([a[32], a[33]]);
            let dp = u16::from_be_bytes([a[34], a[35]]);
            (
                SocketAddr::from((std::net::Ipv6Addr::from(s), sp)),
                SocketAddr::from((std::net::Ipv6Addr::from(d), dp)),
            )
        }
        _ => return None,
    };
    Some((src, dst, 16 + len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_and_mixed_headers_round_trip() {
        let s: SocketAddr = "198.51.100.9:51000".parse().unwrap();
        let d: SocketAddr = "198.51.100.1:443".parse().unwrap();
        let h = header(s, d);
        assert_eq!(h.len(), 28);
        assert_eq!(decode(&h), Some((s, d, 28)));
        assert_eq!(decode(&h[..20]), None);
        let s6: SocketAddr = "[2001:db8::9]:1".parse().unwrap();
        let h = header(s6, d);
        let (ds, dd, n) = decode(&h).unwrap();
        assert_eq!((ds, n), (s6, 52));
        assert_eq!(
            dd,
            SocketAddr::from((
                std::net::Ipv4Addr::new(198, 51, 100, 1).to_ipv6_mapped(),
                443
            ))
        );
    }
}
