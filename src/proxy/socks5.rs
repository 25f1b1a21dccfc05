//! SOCKS5 (RFC 1928) with username/password (RFC 1929), CONNECT only. Sans-IO parsers: each
//! takes the bytes received so far and returns the parsed message and how many bytes it took,
//! or `None` when more are needed.

use std::net::{Ipv4Addr, Ipv6Addr};

pub const VERSION: u8 = 5;
pub const METHOD_NO_AUTH: u8 = 0x00;
pub const METHOD_USER_PASS: u8 = 0x02;
pub const METHOD_NONE_ACCEPTABLE: u8 = 0xff;
pub const CMD_CONNECT: u8 = 0x01;

/// Reply codes.
pub const REP_OK: u8 = 0x00;
pub const REP_FAILURE: u8 = 0x01;
pub const REP_NOT_ALLOWED: u8 = 0x02;
pub const REP_NET_UNREACHABLE: u8 = 0x03;
pub const REP_HOST_UNREACHABLE: u8 = 0x04;
pub const REP_REFUSED: u8 = 0x05;
pub const REP_CMD_UNSUPPORTED: u8 = 0x07;
pub const REP_ATYP_UNSUPPORTED: u8 = 0x08;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Socks5Error {
    #[error("not SOCKS version 5 (got {0})")]
    Version(u8),
    #[error("malformed SOCKS5 message: {0}")]
    Malformed(&'static str),
    #[error("unsupported address type {0}")]
    AddressType(u8),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Addr {
    V4(Ipv4Addr),
    V6(Ipv6Addr),
    Domain(String),
}

impl std::fmt::Display for Addr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Addr::V4(a) => write!(f, "{a}"),
            Addr::V6(a) => write!(f, "{a}"),
            Addr::Domain(d) => f.write_str(d),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub cmd: u8,
    pub addr: Addr,
    pub port: u16,
}

type Parsed<T> = Result<Option<(T, usize)>, Socks5Error>;

/// Client greeting: the offered authentication methods.
pub fn parse_greeting(b: &[u8]) -> Parsed<Vec<u8>> {
    if b.is_empty() {
        return Ok(None);
    }
    if b[0] != VERSION {
        return Err(Socks5Error::Version(b[0]));
    }
    if b.len() < 2 {
        return Ok(None);
    }
    let n = b[1] as usize;
    if n == 0 {
        return Err(Socks5Error::Malformed("no methods offered"));
    }
    if b.len() < 2 + n {
        return Ok(None);
    }
    Ok(Some((b[2..2 + n].to_vec(), 2 + n)))
}

/// Prefer username/password (it names the exit node), else no authentication.
pub fn choose_method(offered: &[u8]) -> u8 {
    if offered.contains(&METHOD_USER_PASS) {
        METHOD_USER_PASS
    } else if offered.contains(&METHOD_NO_AUTH) {
        METHOD_NO_AUTH
    } else {
        METHOD_NONE_ACCEPTABLE
    }
}

/// RFC 1929 username/password sub-negotiation.
pub fn parse_userpass(b: &[u8]) -> Parsed<(String, String)> {
    if b.is_empty() {
        return Ok(None);
    }
    if b[0] != 1 {
        return Err(Socks5Error::Malformed("username/password version"));
    }
    let Some(&ulen) = b.get(1) else {
        return Ok(None);
    };
    let ulen = ulen as usize;
    let Some(&plen) = b.get(2 + ulen) else {
        return Ok(None);
    };
    let plen = plen as usize;
    let total = 3 + ulen + plen;
    if b.len() < total {
        return Ok(None);
    }
    let user = String::from_utf8_lossy(&b[2..2 + ulen]).into_owned();
    let pass = String::from_utf8_lossy(&b[3 + ulen..total]).into_owned();
    Ok(Some(((user, pass), total)))
}

/// The request (CONNECT, BIND, UDP ASSOCIATE; only CONNECT is served).
pub fn parse_request(b: &[u8]) -> Parsed<Request> {
    if b.is_empty() {
        return Ok(None);
    }
    if b[0] != VERSION {
        return Err(Socks5Error::Version(b[0]));
    }
    if b.len() < 4 {
        return Ok(None);
    }
    let cmd = b[1];
    let (addr, at) = match b[3] {
        1 => {
            if b.len() < 8 {
                return Ok(None);
            }
            (Addr::V4(Ipv4Addr::new(b[4], b[5], b[6], b[7])), 8)
        }
        4 => {
            if b.len() < 20 {
                return Ok(None);
            }
            let mut o = [0u8; 16];
            o.copy_from_slice(&b[4..20]);
            (Addr::V6(Ipv6Addr::from(o)), 20)
        }
        3 => {
            let Some(&n) = b.get(4) else { return Ok(None) };
            let n = n as usize;
            if n == 0 {
                return Err(Socks5Error::Malformed("empty domain name"));
            }
            if b.len() < 5 + n {
                return Ok(None);
            }
            let d = std::str::from_utf8(&b[5..5 + n])
                .map_err(|_| Socks5Error::Malformed("domain is not UTF-8"))?;
            (Addr::Domain(d.to_ascii_lowercase()), 5 + n)
        }
        t => return Err(Socks5Error::AddressType(t)),
    };
    if b.len() < at + 2 {
        return Ok(None);
    }
    let port = u16::from_be_bytes([b[at], b[at + 1]]);
    Ok(Some((Request { cmd, addr, port }, at + 2)))
}

/// A reply with an unspecified bound address.
pub fn reply(code: u8) -> [u8; 10] {
    [VERSION, code, 0, 1, 0, 0, 0, 0, 0, 0]
}

/// Encode a CONNECT request (clients and tests).
pub fn encode_request(addr: &Addr, port: u16) -> Vec<u8> {
    let mut v = vec![VERSION, CMD_CONNECT, 0];
    match addr {
        Addr::V4(a) => {
            v.push(1);
            v.extend_from_slice(&a.octets());
        }
        Addr::V6(a) => {
            v.push(4);
            v.extend_from_slice(&a.octets());
        }
        Addr::Domain(d) => {
            v.push(3);
            v.push(d.len() as u8);
            v.extend_from_slice(d.as_bytes());
        }
    }
    v.extend_from_slice(&port.to_be_bytes());
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_each_message_incrementally() {
        let g = [5u8, 2, 0, 2];
        for cut in 0..g.len() {
            assert_eq!(parse_greeting(&g[..cut]), Ok(None));
        }
        assert_eq!(parse_greeting(&g), Ok(Some((vec![0, 2], 4))));
        assert_eq!(choose_method(&[0, 2]), METHOD_USER_PASS);
        assert_eq!(choose_method(&[0]), METHOD_NO_AUTH);
        assert_eq!(choose_method(&[1]), METHOD_NONE_ACCEPTABLE);
        assert_eq!(parse_greeting(&[4, 1, 0]), Err(Socks5Error::Version(4)));

        let up = [1u8, 4, b'e', b'x', b'i', b't', 1, b'x'];
        for cut in 0..up.len() {
            assert_eq!(parse_userpass(&up[..cut]), Ok(None));
        }
        assert_eq!(
            parse_userpass(&up),
            Ok(Some((("exit".into(), "x".into()), up.len())))
        );

        for (addr, port) in [
            (Addr::Domain("db1.mesh.internal".into()), 22),
            (Addr::V4(Ipv4Addr::new(10, 210, 4, 1)), 80),
            (Addr::V6("2001:db8::1".parse().unwrap()), 443),
        ] {
            let r = encode_request(&addr, port);
            for cut in 0..r.len() {
                assert_eq!(parse_request(&r[..cut]), Ok(None));
            }
            let (req, used) = parse_request(&r).unwrap().unwrap();
            assert_eq!(
                (req.cmd, req.addr, req.port, used),
                (CMD_CONNECT, addr, port, r.len())
            );
        }
        assert_eq!(
            parse_request(&[5, 1, 0, 9, 0, 0]),
            Err(Socks5Error::AddressType(9))
        );
    }

    proptest! {
        #[test]
        fn never_panic(d in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse_greeting(&d);
            let _ = parse_userpass(&d);
            let _ = parse_request(&d);
        }

        #[test]
        fn domain_requests_round_trip(d in "[a-z0-9.-]{1,60}", port in any::<u16>()) {
            let r = encode_request(&Addr::Domain(d.clone()), port);
            let (req, _) = parse_request(&r).unwrap().unwrap();
            prop_assert_eq!(req.addr, Addr::Domain(d));
            prop_assert_eq!(req.port, port);
        }
    }
}
