//! The server name of a TLS ClientHello, read without terminating TLS (RFC 8446 4.1.2,
//! RFC 6066 3). Sans-IO: give it the bytes received so far; it says whether it needs more.
//! The ClientHello may span several TLS records; it is reassembled up to [`MAX_HELLO`].

/// Largest ClientHello accepted (post-quantum key shares make them ~2 KiB; 16 KiB is the record
/// limit and plenty).
pub const MAX_HELLO: usize = 16 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sni {
    /// Not enough bytes yet.
    NeedMore,
    /// A complete ClientHello naming this host (lowercased).
    Name(String),
    /// A complete ClientHello without a server name.
    NoName,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SniError {
    #[error("not a TLS handshake")]
    NotTls,
    #[error("not a ClientHello")]
    NotClientHello,
    #[error("ClientHello larger than {MAX_HELLO} bytes")]
    TooLarge,
    #[error("malformed ClientHello: {0}")]
    Malformed(&'static str),
    #[error("server name is not a valid host name")]
    BadName,
}

const CONTENT_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const EXT_SERVER_NAME: u16 = 0;

struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], SniError> {
        if self.b.len() < n {
            return Err(SniError::Malformed("truncated"));
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn u8(&mut self) -> Result<u8, SniError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, SniError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn vec8(&mut self) -> Result<&'a [u8], SniError> {
        let n = self.u8()? as usize;
        self.take(n)
    }
    fn vec16(&mut self) -> Result<&'a [u8], SniError> {
        let n = self.u16()? as usize;
        self.take(n)
    }
}

/// Parse what has arrived of a TLS connection.
pub fn parse(buf: &[u8]) -> Result<Sni, SniError> {
    // Reassemble handshake bytes from consecutive handshake records.
    let mut hs = Vec::new();
    let mut rest = buf;
    let mut first = true;
    loop {
        if rest.len() < 5 {
            if first && !rest.is_empty() && rest[0] != CONTENT_HANDSHAKE {
                return Err(SniError::NotTls);
            }
            break;
        }
        if rest[0] != CONTENT_HANDSHAKE || rest[1] != 3 {
            return Err(SniError::NotTls);
        }
        let len = u16::from_be_bytes([rest[3], rest[4]]) as usize;
        if len == 0 || len > MAX_HELLO + 2048 {
            return Err(SniError::Malformed("record length"));
        }
        if rest.len() < 5 + len {
            hs.extend_from_slice(&rest[5..]);
            break;
        }
        hs.extend_from_slice(&rest[5..5 + len]);
        rest = &rest[5 + len..];
        first = false;
        if hs.len() >= 4 {
            let need = 4 + u32::from_be_bytes([0, hs[1], hs[2], hs[3]]) as usize;
            if hs.len() >= need {
                break;
            }
        }
    }
    if hs.len() < 4 {
        return if buf.len() > MAX_HELLO + 5 {
            Err(SniError::TooLarge)
        } else {
            Ok(Sni::NeedMore)
        };
    }
    if hs[0] != HANDSHAKE_CLIENT_HELLO {
        return Err(SniError::NotClientHello);
    }
    let len = u32::from_be_bytes([0, hs[1], hs[2], hs[3]]) as usize;
    if len > MAX_HELLO {
        return Err(SniError::TooLarge);
    }
    if hs.len() < 4 + len {
        return Ok(Sni::NeedMore);
    }
    client_hello(&hs[4..4 + len])
}

fn client_hello(body: &[u8]) -> Result<Sni, SniError> {
    let mut r = Reader { b: body };
    r.take(2)?; // legacy_version
    r.take(32)?; // random
    r.vec8()?; // legacy_session_id
    let suites = r.vec16()?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return Err(SniError::Malformed("cipher suites"));
    }
    r.vec8()?; // legacy_compression_methods
    if r.b.is_empty() {
        return Ok(Sni::NoName); // no extensions at all
    }
    let mut ext = Reader { b: r.vec16()? };
    while !ext.b.is_empty() {
        let ty = ext.u16()?;
        let data = ext.vec16()?;
        if ty != EXT_SERVER_NAME {
            continue;
        }
        let mut d = Reader { b: data };
        let mut list = Reader { b: d.vec16()? };
        while !list.b.is_empty() {
            let name_type = list.u8()?;
            let name = list.vec16()?;
            if name_type == 0 {
                return host_name(name).map(Sni::Name);
            }
        }
        return Ok(Sni::NoName);
    }
    Ok(Sni::NoName)
}

fn host_name(b: &[u8]) -> Result<String, SniError> {
    let s = std::str::from_utf8(b).map_err(|_| SniError::BadName)?;
    let s = s.strip_suffix('.').unwrap_or(s).to_ascii_lowercase();
    if crate::proxy::is_hostname(&s) {
        Ok(s)
    } else {
        Err(SniError::BadName)
    }
}

/// A fatal `unrecognized_name` alert (RFC 6066 3, alert 112), sent before closing.
pub const ALERT_UNRECOGNIZED_NAME: [u8; 7] = [21, 3, 3, 0, 2, 2, 112];

/// Build a minimal ClientHello (tests and benchmarks).
pub fn client_hello_for(name: Option<&str>) -> Vec<u8> {
    let mut body = vec![3, 3];
    body.extend_from_slice(&[7u8; 32]);
    body.push(0);
    body.extend_from_slice(&[0, 2, 0x13, 0x01]);
    body.extend_from_slice(&[1, 0]);
    let mut exts = Vec::new();
    if let Some(n) = name {
        let mut list = vec![0u8];
        list.extend_from_slice(&(n.len() as u16).to_be_bytes());
        list.extend_from_slice(n.as_bytes());
        let mut sn = (list.len() as u16).to_be_bytes().to_vec();
        sn.extend_from_slice(&list);
        exts.extend_from_slice(&0u16.to_be_bytes());
        exts.extend_from_slice(&(sn.len() as u16).to_be_bytes());
        exts.extend_from_slice(&sn);
    }
    // An unrelated extension (supported_versions) before/after does not matter.
    exts.extend_from_slice(&[0, 43, 0, 3, 2, 3, 4]);
    body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
    body.extend_from_slice(&exts);
    let mut hs = vec![HANDSHAKE_CLIENT_HELLO];
    hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    let mut rec = vec![CONTENT_HANDSHAKE, 3, 1];
    rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    rec.extend_from_slice(&hs);
    rec
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn finds_the_name_and_asks_for_more_until_complete() {
        let h = client_hello_for(Some("App.Example.Test"));
        for cut in 0..h.len() {
            assert_eq!(parse(&h[..cut]), Ok(Sni::NeedMore), "cut at {cut}");
        }
        assert_eq!(parse(&h), Ok(Sni::Name("app.example.test".into())));
        assert_eq!(parse(&client_hello_for(None)), Ok(Sni::NoName));
    }

    #[test]
    fn reassembles_a_hello_split_over_two_records() {
        let h = client_hello_for(Some("a.example.test"));
        let hs = &h[5..];
        let (a, b) = hs.split_at(10);
        let mut two = vec![22, 3, 1];
        two.extend_from_slice(&(a.len() as u16).to_be_bytes());
        two.extend_from_slice(a);
        two.extend_from_slice(&[22, 3, 1]);
        two.extend_from_slice(&(b.len() as u16).to_be_bytes());
        two.extend_from_slice(b);
        assert_eq!(parse(&two), Ok(Sni::Name("a.example.test".into())));
    }

    #[test]
    fn refuses_what_is_not_a_client_hello() {
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Err(SniError::NotTls));
        assert_eq!(
            parse(&[22, 3, 3, 0, 4, 2, 0, 0, 0]),
            Err(SniError::NotClientHello)
        );
        // An odd-length cipher suite list.
        let mut odd = client_hello_for(Some("x.test"));
        let at = 5 + 4 + 2 + 32 + 1;
        odd[at..at + 2].copy_from_slice(&[0, 1]);
        assert!(matches!(parse(&odd), Err(SniError::Malformed(_))));
        // A declared length that runs past the end of the hello.
        let mut long = client_hello_for(Some("x.test"));
        // record 5 + handshake 4 + version 2 + random 32 + session 1 + suites 4 + compression 2
        // + extensions length 2 + extension type 2: the server_name extension's length.
        let at = 5 + 4 + 2 + 32 + 1 + 4 + 2 + 2 + 2;
        long[at..at + 2].copy_from_slice(&[0, 200]);
        assert_eq!(parse(&long), Err(SniError::Malformed("truncated")));
        assert_eq!(
            parse(&client_hello_for(Some("bad name!"))),
            Err(SniError::BadName)
        );
    }

    proptest! {
        #[test]
        fn never_panics_on_garbage(d in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = parse(&d);
            let mut tls = vec![22u8, 3, 1];
            tls.extend_from_slice(&(d.len() as u16).to_be_bytes());
            tls.extend_from_slice(&d);
            let _ = parse(&tls);
        }

        #[test]
        fn any_valid_name_round_trips(name in "[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\\.[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?){0,3}") {
            prop_assert_eq!(parse(&client_hello_for(Some(&name))), Ok(Sni::Name(name.clone())));
        }
    }
}
