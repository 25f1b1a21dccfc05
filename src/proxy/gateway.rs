//! The public gateway: HTTPS routed by the ClientHello's SNI without terminating TLS, and HTTP
//! routed by Host, each passed through the mesh to a live node serving that name.
//!
//! Bounded: a client has [`HELLO_TIMEOUT`] in all to send its ClientHello or request head (a
//! silent client, or one sending a byte a second, is cut off), concurrent connections are capped
//! by the accept loop, and every connection is its own task.

use super::dial::connect;
use super::preamble::{self, Handoff, Kind, HANDOFF_MAGIC};
use super::routes::{HostRoute, MeshView};
use super::sni::{self, Sni};
use super::{http_head, SERVE_PORT};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tracing::{debug, info};

/// Time a client has to send its ClientHello (or HTTP request head).
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// Connecting to a serving node through the mesh.
pub const BACKEND_CONNECT_TIMEOUT: Duration = Duration::from_millis(1500);
/// Concurrent client connections per listener.
pub const MAX_CONNECTIONS: usize = 4096;
/// Connections one client address (IPv6: one /64) may hold at once, so one source cannot take
/// every slot.
pub const MAX_CONNECTIONS_PER_CLIENT: usize = 256;
/// A passed-through connection with no byte either way for this long is closed (nginx's
/// `proxy_timeout` default), so silent or half-closed clients give their slots back.
pub const IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

/// A serving node that just failed to accept is tried last for this long, so requests do not
/// each wait out a connect timeout while failure detection catches up.
const FAILED_BACKEND_PENALTY: Duration = Duration::from_secs(10);

pub struct Gateway {
    pub view: watch::Receiver<Arc<MeshView>>,
    next: AtomicUsize,
    failed: std::sync::Mutex<std::collections::HashMap<std::net::Ipv4Addr, std::time::Instant>>,
}

impl Gateway {
    pub fn new(view: watch::Receiver<Arc<MeshView>>) -> Arc<Gateway> {
        Arc::new(Gateway {
            view,
            next: AtomicUsize::new(0),
            failed: Default::default(),
        })
    }

    /// Candidate serving nodes, spreading connections over the best-ranked ones.
    fn candidates(&self, host: &str) -> Vec<HostRoute> {
        let view = self.view.borrow().clone();
        let routes: Vec<HostRoute> = view.route(host).into_iter().cloned().collect();
        let Some(first) = routes.first() else {
            return routes;
        };
        let rank = |r: &HostRoute| (r.pattern.starts_with("*."), !r.live);
        let top = routes.iter().take_while(|r| rank(r) == rank(first)).count();
        let mut out = routes;
        let shift = self.next.fetch_add(1, Ordering::Relaxed) % top;
        out[..top].rotate_left(shift);
        // Recently failed nodes go last within their rank (stable: the order among the others is
        // kept); a failed exact, live route still comes before offline or wildcard ones.
        let now = std::time::Instant::now();
        let failed = self.failed.lock().unwrap();
        let recently = |r: &HostRoute| {
            failed
                .get(&r.ip)
                .is_some_and(|t| now.duration_since(*t) < FAILED_BACKEND_PENALTY)
        };
        out.sort_by_key(|r| (rank(r), recently(r)));
        out
    }

    /// Connect to a serving node for `host`, failing over down the list.
    async fn backend(&self, host: &str) -> Option<(TcpStream, HostRoute)> {
        self.backend_with(host, |addr| connect(addr, BACKEND_CONNECT_TIMEOUT))
            .await
    }

    /// [`Gateway::backend`] over any connector: a node that fails is tried last for a while.
    async fn backend_with<S, E, F, Fut>(&self, host: &str, connect: F) -> Option<(S, HostRoute)>
    where
        E: std::fmt::Display,
        F: Fn(SocketAddr) -> Fut,
        Fut: std::future::Future<Output = Result<S, E>>,
    {
        for r in self.candidates(host) {
            let addr = SocketAddr::from((r.ip, SERVE_PORT));
            match connect(addr).await {
                Ok(s) => {
                    self.failed.lock().unwrap().remove(&r.ip);
                    return Some((s, r));
                }
                Err(e) => {
                    debug!(%host, node = %r.node, error = %e, "serving node unreachable; trying the next");
                    let now = std::time::Instant::now();
                    let mut failed = self.failed.lock().unwrap();
                    failed.retain(|_, t| now.duration_since(*t) < FAILED_BACKEND_PENALTY);
                    failed.insert(r.ip, now);
                }
            }
        }
        None
    }

    async fn pass(
        &self,
        mut client: TcpStream,
        peer: SocketAddr,
        kind: Kind,
        host: String,
        head: Vec<u8>,
    ) {
        let local = client.local_addr().unwrap_or(peer);
        let Some((mut backend, route)) = self.backend(&host).await else {
            info!(%host, %peer, "no reachable node serves this name");
            match kind {
                Kind::Tls => {
                    let _ = client.write_all(&sni::ALERT_UNRECOGNIZED_NAME).await;
                }
                Kind::Http => {
                    let _ = client
                        .write_all(&not_found(&host, "no reachable mesh node serves"))
                        .await;
                }
            }
            return;
        };
        let mut first = preamble::encode(
            HANDOFF_MAGIC,
            &Handoff {
                kind,
                hostname: host.clone(),
                client: peer,
                gateway: local,
            },
        );
        // The handoff and what the client sent so far in one write: one segment through the
        // tunnel, not two.
        first.extend_from_slice(&head);
        if backend.write_all(&first).await.is_err() {
            return;
        }
        debug!(%host, %peer, node = %route.node, "passing through");
        let _ = super::splice::splice_idle(&mut client, &mut backend, IDLE_TIMEOUT).await;
    }
}

fn not_found(host: &str, why: &str) -> Vec<u8> {
    let body = format!("{why} {host}\n");
    format!(
        "HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Read from `s`, after what already arrived in `buf`, until `done` says the head is
/// complete, within `HELLO_TIMEOUT` overall.
pub(super) async fn read_head<T>(
    s: &mut TcpStream,
    mut buf: Vec<u8>,
    max: usize,
    mut done: impl FnMut(&[u8]) -> Option<T>,
) -> Option<(T, Vec<u8>)> {
    let r = tokio::time::timeout(HELLO_TIMEOUT, async {
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(v) = done(&buf) {
                return Some(v);
            }
            if buf.len() > max {
                return None;
            }
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    match r {
        Ok(Some(v)) => Some((v, buf)),
        _ => None,
    }
}

/// One HTTPS client.
pub async fn https_session(gw: Arc<Gateway>, mut client: TcpStream, peer: SocketAddr) {
    let verdict = read_head(
        &mut client,
        Vec::new(),
        sni::MAX_HELLO + 5 * 8,
        |b| match sni::parse(b) {
            Ok(Sni::NeedMore) => None,
            other => Some(other),
        },
    )
    .await;
    let Some((verdict, hello)) = verdict else {
        debug!(%peer, "no ClientHello in time; closed");
        return;
    };
    match verdict {
        Ok(Sni::Name(host)) => {
            if gw.view.borrow().route(&host).is_empty() {
                info!(%host, %peer, "refused: no mesh node serves this name");
                let _ = client.write_all(&sni::ALERT_UNRECOGNIZED_NAME).await;
                return;
            }
            gw.pass(client, peer, Kind::Tls, host, hello).await;
        }
        Ok(Sni::NoName) => {
            debug!(%peer, "refused: ClientHello without SNI");
            let _ = client.write_all(&sni::ALERT_UNRECOGNIZED_NAME).await;
        }
        Ok(Sni::NeedMore) => {}
        Err(e) => {
            debug!(%peer, error = %e, "refused: malformed ClientHello");
            let _ = client.write_all(&sni::ALERT_UNRECOGNIZED_NAME).await;
        }
    }
}

/// The host an HTTP request is routed by, and the bytes to pass on. A request must carry
/// exactly one valid Host. The connection is routed once, so it carries one request:
/// `Connection: close` replaces the client's connection headers (later requests for other
/// hosts on a kept-alive connection would reach this backend). An `Upgrade` request (WebSocket)
/// passes unchanged: after the upgrade the connection is no longer HTTP.
fn http_route(h: &http_head::RequestHead, buf: &[u8]) -> Option<(String, Vec<u8>)> {
    let hosts = h
        .headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("host"))
        .count();
    if hosts != 1 {
        return None;
    }
    let host = h.host()?;
    if h.header("upgrade").is_some() {
        return Some((host, buf.to_vec()));
    }
    let mut out = h.to_origin(&h.target);
    out.extend_from_slice(&buf[h.len.min(buf.len())..]);
    Some((host, out))
}

/// One HTTP client (HTTP-01 challenges, redirects to HTTPS: whatever the workload answers).
pub async fn http_session(gw: Arc<Gateway>, mut client: TcpStream, peer: SocketAddr) {
    let verdict = read_head(
        &mut client,
        Vec::new(),
        http_head::MAX_HEAD,
        |b| match http_head::parse(b) {
            Ok(None) => None,
            other => Some(other),
        },
    )
    .await;
    let Some((verdict, head)) = verdict else {
        debug!(%peer, "no request head in time; closed");
        return;
    };
    let routed = match verdict {
        Ok(Some(h)) => http_route(&h, &head),
        _ => None,
    };
    let Some((host, head)) = routed else {
        let _ = client
            .write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: 42\r\nConnection: close\r\n\r\nthe request needs exactly one valid Host\r\n")
            .await;
        return;
    };
    if gw.view.borrow().route(&host).is_empty() {
        let _ = client
            .write_all(&not_found(&host, "no mesh node serves"))
            .await;
        return;
    }
    gw.pass(client, peer, Kind::Http, host, head).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn http_requests_are_routed_once_and_closed_after_one_request() {
        let parse = |b: &[u8]| http_head::parse(b).unwrap().unwrap();
        let buf = b"POST /a HTTP/1.1\r\nHost: App.example.test\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\nContent-Length: 2\r\n\r\nhi";
        let (host, out) = http_route(&parse(buf), buf).unwrap();
        assert_eq!(host, "app.example.test");
        let out = String::from_utf8(out).unwrap();
        assert!(out.starts_with("POST /a HTTP/1.1\r\n"), "{out}");
        assert!(out.contains("Content-Length: 2\r\n"), "{out}");
        assert!(!out.to_ascii_lowercase().contains("keep-alive"), "{out}");
        assert!(
            out.ends_with("Connection: close\r\n\r\nhi"),
            "the body follows: {out}"
        );
        // Two Host headers (or none): not routed.
        let two = b"GET / HTTP/1.1\r\nHost: a.example.test\r\nHost: b.example.test\r\n\r\n";
        assert!(http_route(&parse(two), two).is_none());
        let none = b"GET / HTTP/1.0\r\n\r\n";
        assert!(http_route(&parse(none), none).is_none());
        // A WebSocket upgrade passes as it came.
        let ws = b"GET /ws HTTP/1.1\r\nHost: a.example.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n";
        assert_eq!(http_route(&parse(ws), ws).unwrap().1, ws.to_vec());
    }

    /// A serving node that fails to accept is tried last for a while: the next connections go
    /// straight to a working one instead of each waiting out the failed node first.
    #[tokio::test]
    async fn a_failed_serving_node_is_tried_last() {
        let (dead, alive) = (Ipv4Addr::new(10, 210, 1, 1), Ipv4Addr::new(10, 210, 2, 1));
        let route = |ip: Ipv4Addr, node: &str| HostRoute {
            pattern: "app.example.test".into(),
            node: node.into(),
            ip,
            live: true,
        };
        let offline = Ipv4Addr::new(10, 210, 3, 1);
        let view = MeshView {
            hostnames: vec![
                route(dead, "dead"),
                route(alive, "alive"),
                HostRoute {
                    live: false,
                    ..route(offline, "offline")
                },
            ],
            ..Default::default()
        };
        let (_tx, rx) = watch::channel(Arc::new(view));
        let gw = Gateway::new(rx);
        let tried = std::sync::Mutex::new(Vec::new());
        let connect = |addr: SocketAddr| {
            tried.lock().unwrap().push(addr.ip());
            let ok = addr.ip() == std::net::IpAddr::V4(alive);
            async move {
                if ok {
                    Ok(())
                } else {
                    Err(std::io::Error::from(std::io::ErrorKind::ConnectionRefused))
                }
            }
        };
        // Round robin puts each node first in turn; once "dead" failed, it never is again.
        for _ in 0..6 {
            let (_, r) = gw.backend_with("app.example.test", connect).await.unwrap();
            assert_eq!(r.node, "alive");
        }
        let tried = tried.into_inner().unwrap();
        let dead_tries = tried
            .iter()
            .filter(|ip| **ip == std::net::IpAddr::V4(dead))
            .count();
        assert_eq!(dead_tries, 1, "the failed node was tried again: {tried:?}");
        // The penalty works within a rank: a failed live node still comes before an offline one.
        let order: Vec<String> = gw
            .candidates("app.example.test")
            .into_iter()
            .map(|r| r.node)
            .collect();
        assert_eq!(order, vec!["alive", "dead", "offline"]);
    }
}
