//! HTTP/1.x request heads (httparse underneath): enough to route by Host at the gateway and to
//! act as a forward proxy (CONNECT authority-form and absolute-form requests).

/// Largest request head accepted.
pub const MAX_HEAD: usize = 16 * 1024;
const MAX_HEADERS: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    pub method: String,
    pub target: String,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub version: u8,
    pub headers: Vec<(String, Vec<u8>)>,
    /// Bytes of the buffer the head takes (the body starts after).
    pub len: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    #[error("request head larger than {MAX_HEAD} bytes")]
    TooLarge,
    #[error("malformed request: {0}")]
    Malformed(String),
    #[error("bad request target {0:?}")]
    BadTarget(String),
}

/// Parse what has arrived; `Ok(None)` means "need more".
pub fn parse(buf: &[u8]) -> Result<Option<RequestHead>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => Ok(Some(RequestHead {
            method: req.method.unwrap_or_default().to_string(),
            target: req.path.unwrap_or_default().to_string(),
            version: req.version.unwrap_or(1),
            headers: req
                .headers
                .iter()
                .map(|h| (h.name.to_string(), h.value.to_vec()))
                .collect(),
            len,
        })),
        Ok(httparse::Status::Partial) => {
            if buf.len() > MAX_HEAD {
                Err(HeadError::TooLarge)
            } else {
                Ok(None)
            }
        }
        Err(e) => Err(HeadError::Malformed(e.to_string())),
    }
}

/// Where a request asks to go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `/path` (a request to an origin server).
    Origin(String),
    /// `http://host[:port]/path` (a request to a forward proxy).
    Absolute {
        host: String,
        port: u16,
        path: String,
    },
    /// `host:port` (CONNECT).
    Authority { host: String, port: u16 },
}

/// Split `host[:port]` (with `[v6]` brackets), lowercasing the host.
pub fn split_host_port(s: &str, default_port: Option<u16>) -> Option<(String, u16)> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, after) = rest.split_once(']')?;
        let p = match after.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None if after.is_empty() => default_port?,
            None => return None,
        };
        (h.to_string(), p)
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') => (h.to_string(), p.parse().ok()?),
            Some(_) => return None,
            None => (s.to_string(), default_port?),
        }
    };
    if host.is_empty() || port == 0 {
        return None;
    }
    Some((host.to_ascii_lowercase(), port))
}

impl RequestHead {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
            .map(str::trim)
    }

    /// The Host header's host name, lowercased, without port; `None` if absent or not a valid
    /// host name.
    pub fn host(&self) -> Option<String> {
        let (h, _) = split_host_port(self.header("host")?, Some(80))?;
        let h = h.strip_suffix('.').unwrap_or(&h).to_string();
        crate::proxy::is_hostname(&h).then_some(h)
    }

    pub fn target(&self) -> Result<Target, HeadError> {
        let t = &self.target;
        let bad = || HeadError::BadTarget(t.clone());
        if self.method.eq_ignore_ascii_case("CONNECT") {
            let (host, port) = split_host_port(t, None).ok_or_else(bad)?;
            return Ok(Target::Authority { host, port });
        }
        if t.starts_with('/') {
            return Ok(Target::Origin(t.clone()));
        }
        let rest = t
            .strip_prefix("http://")
            .or_else(|| t.strip_prefix("HTTP://"))
            .ok_or_else(bad)?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].to_string()),
            None => (rest, "/".to_string()),
        };
        let authority = authority
            .rsplit_once('@')
            .map(|(_, a)| a)
            .unwrap_or(authority);
        let (host, port) = split_host_port(authority, Some(80)).ok_or_else(bad)?;
        Ok(Target::Absolute { host, port, path })
    }

    /// The user of `Proxy-Authorization: Basic base64(user:password)`.
    pub fn proxy_user(&self) -> Option<String> {
        use base64::Engine;
        let v = self.header("proxy-authorization")?;
        let (scheme, cred) = v.split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("basic") {
            return None;
        }
        let raw = base64::engine::general_purpose::STANDARD
            .decode(cred.trim())
            .ok()?;
        let s = String::from_utf8(raw).ok()?;
        let user = s.split(':').next()?.to_string();
        (!user.is_empty()).then_some(user)
    }

    /// The head re-encoded for the origin server: origin-form target, no proxy headers, one
    /// request per connection.
    pub fn to_origin(&self, path: &str) -> Vec<u8> {
        let mut out = format!("{} {} HTTP/1.{}\r\n", self.method, path, self.version).into_bytes();
        for (n, v) in &self.headers {
            let l = n.to_ascii_lowercase();
            if l.starts_with("proxy-") || l == "connection" || l == "keep-alive" {
                continue;
            }
            out.extend_from_slice(n.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(v);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"Connection: close\r\n\r\n");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn routes_by_host_and_understands_proxy_forms() {
        let r = parse(b"GET /x HTTP/1.1\r\nHost: App.Example.Test:8080\r\n\r\nbody")
            .unwrap()
            .unwrap();
        assert_eq!(r.host().as_deref(), Some("app.example.test"));
        assert_eq!(r.target(), Ok(Target::Origin("/x".into())));
        assert_eq!(
            r.len,
            b"GET /x HTTP/1.1\r\nHost: App.Example.Test:8080\r\n\r\n".len()
        );
        let c = parse(b"CONNECT db1.mesh.internal:22 HTTP/1.1\r\nProxy-Authorization: Basic ZXhpdDE6eA==\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(
            c.target(),
            Ok(Target::Authority {
                host: "db1.mesh.internal".into(),
                port: 22
            })
        );
        assert_eq!(c.proxy_user().as_deref(), Some("exit1"));
        let a = parse(b"GET http://web:8080/a?b HTTP/1.1\r\nHost: web:8080\r\nProxy-Connection: keep-alive\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(
            a.target(),
            Ok(Target::Absolute {
                host: "web".into(),
                port: 8080,
                path: "/a?b".into()
            })
        );
        let o = String::from_utf8(a.to_origin("/a?b")).unwrap();
        assert!(o.starts_with("GET /a?b HTTP/1.1\r\n"));
        assert!(!o.to_lowercase().contains("proxy-connection"));
        assert!(o.ends_with("Connection: close\r\n\r\n"));
        assert_eq!(parse(b"GET / HTTP/1.1\r\nHost: x"), Ok(None));
        assert!(parse(b"\x16\x03\x01garbage\r\n\r\n").is_err());
        assert_eq!(
            split_host_port("[2001:db8::1]:443", None),
            Some(("2001:db8::1".into(), 443))
        );
        assert_eq!(split_host_port("h:0", None), None);
        let big = vec![b'a'; MAX_HEAD + 10];
        assert!(parse(&big).is_err());
    }

    proptest! {
        #[test]
        fn never_panics(d in proptest::collection::vec(any::<u8>(), 0..1024)) {
            if let Ok(Some(h)) = parse(&d) {
                let _ = h.host();
                let _ = h.target();
                let _ = h.proxy_user();
                let _ = h.to_origin("/");
            }
        }

        #[test]
        fn host_headers_round_trip(host in "[a-z0-9]{1,12}(\\.[a-z0-9]{1,12}){0,3}", port in 1u16..) {
            let req = format!("GET / HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n");
            let h = parse(req.as_bytes()).unwrap().unwrap();
            prop_assert_eq!(h.host(), Some(host));
        }
    }
}
