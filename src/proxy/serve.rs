//! The serving side: a node that exposed a hostname accepts gateway handoffs on its mesh
//! address (socket bound to the TUN device, so only members reach it) and connects them to the
//! local workload, prefixed with a PROXY v2 header when the route asks for it.

use super::dial::connect;
use super::preamble::{self, Handoff, Kind, HANDOFF_MAGIC};
use super::proxy_protocol;
use super::routes::matches;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tracing::{debug, info};

const HANDOFF_TIMEOUT: Duration = Duration::from_secs(5);
const WORKLOAD_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// One exposed hostname (or `*.pattern`) on this node.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Exposed {
    pub hostname: String,
    /// Where TLS connections for the name go.
    pub to: SocketAddr,
    /// Where plain HTTP requests for the name go; without it they are redirected to HTTPS.
    #[serde(default)]
    pub http_to: Option<SocketAddr>,
    #[serde(default)]
    pub proxy_protocol: bool,
}

/// `308 Permanent Redirect` to the HTTPS form of the request.
fn redirect_to_https(host: &str, head: &[u8]) -> Vec<u8> {
    let path = super::http_head::parse(head)
        .ok()
        .flatten()
        .map(|h| h.target)
        .filter(|t| t.starts_with('/'))
        .unwrap_or_else(|| "/".into());
    format!(
        "HTTP/1.1 308 Permanent Redirect\r\nLocation: https://{host}{path}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .into_bytes()
}

/// Exact names first, then wildcards.
pub fn find<'a>(exposed: &'a [Exposed], host: &str) -> Option<&'a Exposed> {
    exposed.iter().find(|e| e.hostname == host).or_else(|| {
        exposed
            .iter()
            .find(|e| e.hostname.starts_with("*.") && matches(&e.hostname, host))
    })
}

pub async fn session(
    exposed: watch::Receiver<Arc<Vec<Exposed>>>,
    mut from_gw: TcpStream,
    peer: SocketAddr,
) {
    let h = tokio::time::timeout(
        HANDOFF_TIMEOUT,
        preamble::read::<Handoff, _>(HANDOFF_MAGIC, &mut from_gw),
    )
    .await;
    let Ok(Ok((handoff, rest))) = h else {
        debug!(%peer, "bad or slow gateway handoff; closed");
        return;
    };
    let target = {
        let list = exposed.borrow().clone();
        find(&list, &handoff.hostname).cloned()
    };
    let Some(target) = target else {
        info!(host = %handoff.hostname, gateway = %peer, "handoff for a name this node does not expose");
        return;
    };
    let to = match handoff.kind {
        Kind::Tls => target.to,
        Kind::Http => match target.http_to {
            Some(a) => a,
            None => {
                // The request head may still be on its way after the handoff.
                let head = super::gateway::read_head(
                    &mut from_gw,
                    rest,
                    super::http_head::MAX_HEAD,
                    |b| match super::http_head::parse(b) {
                        Ok(None) => None,
                        _ => Some(()),
                    },
                )
                .await
                .map(|(_, head)| head)
                .unwrap_or_default();
                let _ = from_gw
                    .write_all(&redirect_to_https(&handoff.hostname, &head))
                    .await;
                return;
            }
        },
    };
    let mut workload = match connect(to, WORKLOAD_CONNECT_TIMEOUT).await {
        Ok(w) => w,
        Err(e) => {
            info!(host = %handoff.hostname, %to, error = %e, "the workload is unreachable");
            return;
        }
    };
    // The PROXY header (if asked for) and what already came, in one write.
    let mut first = if target.proxy_protocol {
        proxy_protocol::header(handoff.client, handoff.gateway)
    } else {
        Vec::new()
    };
    first.extend_from_slice(&rest);
    if !first.is_empty() && workload.write_all(&first).await.is_err() {
        return;
    }
    debug!(host = %handoff.hostname, client = %handoff.client, %to, "serving");
    // `meshctl unexpose` (or re-exposing the name elsewhere) also ends the connections open.
    let mut exposed = exposed.clone();
    let host = handoff.hostname.clone();
    tokio::select! {
        _ = super::splice::splice(&mut from_gw, &mut workload) => {}
        _ = exposed.wait_for(|list| find(list, &host).map(|e| (e.to, e.http_to)) != Some((target.to, target.http_to))) => {
            info!(%host, "connection closed: the name is no longer exposed here as it was");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_before_wildcard() {
        let e = |h: &str, p: u16| Exposed {
            hostname: h.into(),
            to: SocketAddr::from(([127, 0, 0, 1], p)),
            http_to: None,
            proxy_protocol: false,
        };
        let list = vec![e("*.example.com", 1), e("app.example.com", 2)];
        assert_eq!(find(&list, "app.example.com").unwrap().to.port(), 2);
        assert_eq!(find(&list, "x.example.com").unwrap().to.port(), 1);
        assert!(find(&list, "example.com").is_none());
    }

    #[test]
    fn http_without_a_target_is_redirected_to_https() {
        let r = String::from_utf8(redirect_to_https(
            "app.example.com",
            b"GET /a?b HTTP/1.1\r\nHost: x\r\n\r\n",
        ))
        .unwrap();
        assert!(r.starts_with("HTTP/1.1 308"));
        assert!(r.contains("Location: https://app.example.com/a?b\r\n"));
    }
}
