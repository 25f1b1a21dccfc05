//! The local forward proxy into the mesh: SOCKS5 (RFC 1928, CONNECT, domain names resolved by
//! the mesh) and HTTP (CONNECT and absolute-form requests). The exit node for a connection is
//! the SOCKS5 username or the HTTP `Proxy-Authorization` user; without one, only mesh names and
//! addresses are reachable.

use super::dial::{DialError, DialRequest, Dialer};
use super::http_head::{self, Target};
use super::socks5::{self, Addr};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::{debug, info};

/// A client must finish its handshake within this long.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("handshake timed out")]
    Timeout,
    #[error("client closed the connection")]
    Closed,
    #[error(transparent)]
    Socks(#[from] socks5::Socks5Error),
    #[error(transparent)]
    Http(#[from] http_head::HeadError),
    #[error(transparent)]
    Dial(#[from] DialError),
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Read until `parse` yields a value; returns it and the bytes after it.
async fn read_until<S, T, E>(
    s: &mut S,
    buf: &mut Vec<u8>,
    mut parse: impl FnMut(&[u8]) -> Result<Option<(T, usize)>, E>,
) -> Result<T, ProxyError>
where
    S: AsyncRead + Unpin,
    ProxyError: From<E>,
{
    loop {
        if let Some((v, used)) = parse(buf)? {
            buf.drain(..used);
            return Ok(v);
        }
        if buf.len() > 64 * 1024 {
            return Err(ProxyError::Refused("handshake too large".into()));
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(ProxyError::Closed);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// One SOCKS5 client.
pub async fn socks5_session<S>(mut client: S, dialer: &dyn Dialer) -> Result<(), ProxyError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut buf = Vec::new();
    let (req, exit) = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        let methods = read_until(&mut client, &mut buf, socks5::parse_greeting).await?;
        let method = socks5::choose_method(&methods);
        client.write_all(&[socks5::VERSION, method]).await?;
        if method == socks5::METHOD_NONE_ACCEPTABLE {
            return Err(ProxyError::Refused(
                "no acceptable authentication method".into(),
            ));
        }
        let mut exit = None;
        if method == socks5::METHOD_USER_PASS {
            let (user, _password) =
                read_until(&mut client, &mut buf, socks5::parse_userpass).await?;
            client.write_all(&[1, 0]).await?;
            exit = (!user.is_empty()).then_some(user);
        }
        let req = match read_until(&mut client, &mut buf, socks5::parse_request).await {
            Ok(r) => r,
            // RFC 1928: a request that cannot be served still gets a reply saying why.
            Err(ProxyError::Socks(e)) => {
                let code = match e {
                    socks5::Socks5Error::AddressType(_) => socks5::REP_ATYP_UNSUPPORTED,
                    _ => socks5::REP_FAILURE,
                };
                let _ = client.write_all(&socks5::reply(code)).await;
                return Err(ProxyError::Socks(e));
            }
            Err(e) => return Err(e),
        };
        Ok::<_, ProxyError>((req, exit))
    })
    .await
    .map_err(|_| ProxyError::Timeout)??;
    if req.cmd != socks5::CMD_CONNECT {
        client
            .write_all(&socks5::reply(socks5::REP_CMD_UNSUPPORTED))
            .await?;
        return Err(ProxyError::Refused(format!(
            "SOCKS5 command {} is not supported (CONNECT only)",
            req.cmd
        )));
    }
    let host = match &req.addr {
        Addr::V6(a) => a.to_string(),
        a => a.to_string(),
    };
    let dial = DialRequest {
        host,
        port: req.port,
        exit,
    };
    match dialer.dial(&dial).await {
        Ok(mut upstream) => {
            client.write_all(&socks5::reply(socks5::REP_OK)).await?;
            if !buf.is_empty() {
                upstream.write_all(&buf).await?;
            }
            debug!(target = %dial.host, port = dial.port, exit = ?dial.exit, "socks5 connected");
            let _ = super::splice::splice(&mut client, &mut upstream).await;
            Ok(())
        }
        Err(e) => {
            info!(target = %dial.host, port = dial.port, exit = ?dial.exit, error = %e, "socks5 refused");
            client.write_all(&socks5::reply(e.socks_reply())).await?;
            Err(e.into())
        }
    }
}

fn http_error(status: u16, msg: &str) -> Vec<u8> {
    let reason = match status {
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        502 => "Bad Gateway",
        504 => "Gateway Timeout",
        _ => "Error",
    };
    let body = format!("{msg}\n");
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// One HTTP proxy client: CONNECT, or an absolute-form request (one per connection).
pub async fn http_session<S>(mut client: S, dialer: &dyn Dialer) -> Result<(), ProxyError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut buf = Vec::new();
    let head = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        read_until(&mut client, &mut buf, |b| {
            http_head::parse(b).map(|h| {
                h.map(|h| {
                    let n = h.len;
                    (h, n)
                })
            })
        }),
    )
    .await
    .map_err(|_| ProxyError::Timeout)?;
    let head = match head {
        Ok(h) => h,
        Err(ProxyError::Http(e)) => {
            client.write_all(&http_error(400, &e.to_string())).await?;
            return Err(e.into());
        }
        Err(e) => return Err(e),
    };
    let exit = head.proxy_user();
    let (host, port, origin_path) = match head.target() {
        Ok(Target::Authority { host, port }) => (host, port, None),
        Ok(Target::Absolute { host, port, path }) => (host, port, Some(path)),
        Ok(Target::Origin(_)) | Err(_) => {
            let msg = "this is a proxy: send CONNECT host:port or an absolute-form request (http://host/...)";
            client.write_all(&http_error(400, msg)).await?;
            return Err(ProxyError::Refused(msg.into()));
        }
    };
    let dial = DialRequest { host, port, exit };
    let mut upstream = match dialer.dial(&dial).await {
        Ok(u) => u,
        Err(e) => {
            info!(target = %dial.host, port = dial.port, exit = ?dial.exit, error = %e, "http proxy refused");
            client
                .write_all(&http_error(e.http_status(), &e.to_string()))
                .await?;
            return Err(e.into());
        }
    };
    match origin_path {
        None => {
            client
                .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                .await?
        }
        Some(path) => upstream.write_all(&head.to_origin(&path)).await?,
    }
    if !buf.is_empty() {
        upstream.write_all(&buf).await?;
    }
    let _ = super::splice::splice(&mut client, &mut upstream).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::dial::{mem_echo, MemDialer};
    use super::*;

    async fn roundtrip<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, msg: &[u8]) -> Vec<u8> {
        s.write_all(msg).await.unwrap();
        let mut got = vec![0u8; msg.len()];
        s.read_exact(&mut got).await.unwrap();
        got
    }

    #[tokio::test]
    async fn socks5_connects_by_name_with_and_without_an_exit() {
        let d = std::sync::Arc::new(MemDialer::default());
        d.add("db1.mesh.internal", 22, None, mem_echo);
        d.add("203.0.113.7", 80, Some("gw"), mem_echo);

        // No authentication, a mesh name.
        let (mut c, s) = tokio::io::duplex(4096);
        let d2 = d.clone();
        let t = tokio::spawn(async move { socks5_session(s, d2.as_ref()).await });
        c.write_all(&[5, 1, 0]).await.unwrap();
        let mut r = [0u8; 2];
        c.read_exact(&mut r).await.unwrap();
        assert_eq!(r, [5, 0]);
        c.write_all(&socks5::encode_request(
            &Addr::Domain("db1.mesh.internal".into()),
            22,
        ))
        .await
        .unwrap();
        let mut rep = [0u8; 10];
        c.read_exact(&mut rep).await.unwrap();
        assert_eq!(rep[1], socks5::REP_OK);
        assert_eq!(roundtrip(&mut c, b"ssh-2.0").await, b"ssh-2.0");
        drop(c);
        t.await.unwrap().unwrap();

        // Username = exit node; an address outside the mesh.
        let (mut c, s) = tokio::io::duplex(4096);
        let d2 = d.clone();
        let t = tokio::spawn(async move { socks5_session(s, d2.as_ref()).await });
        c.write_all(&[5, 2, 0, 2]).await.unwrap();
        c.read_exact(&mut r).await.unwrap();
        assert_eq!(r, [5, 2]);
        c.write_all(&[1, 2, b'g', b'w', 0]).await.unwrap();
        c.read_exact(&mut r).await.unwrap();
        assert_eq!(r, [1, 0]);
        c.write_all(&socks5::encode_request(
            &Addr::V4("203.0.113.7".parse().unwrap()),
            80,
        ))
        .await
        .unwrap();
        c.read_exact(&mut rep).await.unwrap();
        assert_eq!(rep[1], socks5::REP_OK);
        assert_eq!(roundtrip(&mut c, b"GET /").await, b"GET /");
        drop(c);
        t.await.unwrap().unwrap();
        assert_eq!(d.dialed.lock().unwrap()[1].exit.as_deref(), Some("gw"));

        // Outside the mesh without an exit: not allowed. UDP ASSOCIATE: unsupported.
        for (req, code) in [
            (
                socks5::encode_request(&Addr::Domain("example.com".into()), 443),
                socks5::REP_NOT_ALLOWED,
            ),
            (
                {
                    let mut r =
                        socks5::encode_request(&Addr::Domain("db1.mesh.internal".into()), 22);
                    r[1] = 3;
                    r
                },
                socks5::REP_CMD_UNSUPPORTED,
            ),
            (
                // An address type RFC 1928 does not define.
                vec![5, 1, 0, 9, 1, 2, 3, 4, 0, 80],
                socks5::REP_ATYP_UNSUPPORTED,
            ),
        ] {
            let (mut c, s) = tokio::io::duplex(4096);
            let d2 = d.clone();
            let t = tokio::spawn(async move { socks5_session(s, d2.as_ref()).await });
            c.write_all(&[5, 1, 0]).await.unwrap();
            c.read_exact(&mut r).await.unwrap();
            c.write_all(&req).await.unwrap();
            c.read_exact(&mut rep).await.unwrap();
            assert_eq!(rep[1], code);
            assert!(t.await.unwrap().is_err());
        }
    }

    #[tokio::test]
    async fn http_connect_and_absolute_form() {
        let d = std::sync::Arc::new(MemDialer::default());
        d.add("web.svc.mesh.internal", 8080, None, mem_echo);
        let (mut c, s) = tokio::io::duplex(4096);
        let d2 = d.clone();
        let t = tokio::spawn(async move { http_session(s, d2.as_ref()).await });
        c.write_all(b"CONNECT web.svc.mesh.internal:8080 HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut r = vec![0u8; 39];
        c.read_exact(&mut r).await.unwrap();
        assert_eq!(&r, b"HTTP/1.1 200 Connection established\r\n\r\n");
        assert_eq!(roundtrip(&mut c, b"hello").await, b"hello");
        drop(c);
        t.await.unwrap().unwrap();

        // Absolute form: the echo target receives the rewritten origin-form head.
        let (mut c, s) = tokio::io::duplex(4096);
        let d2 = d.clone();
        let t = tokio::spawn(async move { http_session(s, d2.as_ref()).await });
        c.write_all(b"GET http://web.svc.mesh.internal:8080/a HTTP/1.1\r\nHost: web\r\nProxy-Connection: keep-alive\r\n\r\n")
            .await
            .unwrap();
        let want = b"GET /a HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n";
        let mut got = vec![0u8; want.len()];
        c.read_exact(&mut got).await.unwrap();
        assert_eq!(String::from_utf8_lossy(&got), String::from_utf8_lossy(want));
        drop(c);
        t.await.unwrap().unwrap();

        // Not in the mesh: 403 with the reason.
        let (mut c, s) = tokio::io::duplex(4096);
        let d2 = d.clone();
        let t = tokio::spawn(async move { http_session(s, d2.as_ref()).await });
        c.write_all(b"CONNECT example.com:443 HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        let mut out = Vec::new();
        c.read_to_end(&mut out).await.unwrap();
        let out = String::from_utf8_lossy(&out);
        assert!(out.starts_with("HTTP/1.1 403"), "{out}");
        assert!(out.contains("not a mesh name"), "{out}");
        assert!(t.await.unwrap().is_err());
    }
}
