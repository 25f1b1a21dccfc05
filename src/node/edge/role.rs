//! A listener role (the gateway, the proxy): its listen addresses, its accept loops, and
//! replacing it without losing the previous addresses when the new ones cannot be bound.

use crate::control::ApiFailure;
use crate::proxy::listen::accept_loop;
use crate::state::ListenPair;
use std::net::SocketAddr;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::error;

/// A running listener role (gateway or proxy): its addresses, the token that stops its accept
/// loops and connections, and the loops themselves (awaited on stop, so the addresses are free
/// again when a replacement binds them).
pub struct Role {
    pub pair: ListenPair,
    pub stop: CancellationToken,
    loops: Vec<tokio::task::JoinHandle<()>>,
}

impl Role {
    pub fn new(pair: ListenPair) -> Role {
        Role {
            pair,
            stop: CancellationToken::new(),
            loops: Vec::new(),
        }
    }

    pub fn spawn<F, Fut>(
        &mut self,
        l: tokio::net::TcpListener,
        max: usize,
        per_source: Option<usize>,
        what: &'static str,
        handler: F,
    ) where
        F: Fn(tokio::net::TcpStream, SocketAddr) -> Fut + Clone + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        self.loops.push(tokio::spawn(accept_loop(
            l,
            max,
            per_source,
            self.stop.clone(),
            what,
            handler,
        )));
    }

    /// Stop accepting and cut its connections; returns once its listeners are closed.
    pub async fn stop(self) -> ListenPair {
        self.stop.cancel();
        for h in self.loops {
            // An accept loop returns at its next poll after the cancel; bounded all the same.
            let _ = tokio::time::timeout(Duration::from_secs(5), h).await;
        }
        self.pair
    }
}

/// Replace the role in `slot` with one listening on `pair` (`None`: stop it). Asking for what
/// already runs changes nothing (live connections go on). If the new addresses cannot be bound,
/// the previous ones are bound again, so a failed change loses nothing.
pub async fn replace_role<F, Fut>(
    slot: &mut Option<Role>,
    pair: Option<ListenPair>,
    what: &str,
    start: F,
) -> Result<(), ApiFailure>
where
    F: Fn(ListenPair) -> Fut,
    Fut: std::future::Future<Output = Result<Role, ApiFailure>>,
{
    if let (Some(running), Some(wanted)) = (slot.as_ref(), pair.as_ref()) {
        if running.pair == *wanted {
            return Ok(());
        }
    }
    let previous = match slot.take() {
        Some(r) => Some(r.stop().await),
        None => None,
    };
    let Some(pair) = pair else { return Ok(()) };
    match start(pair).await {
        Ok(r) => {
            *slot = Some(r);
            Ok(())
        }
        Err(mut e) => {
            if let Some(prev) = previous {
                match start(prev).await {
                    Ok(r) => {
                        *slot = Some(r);
                        e.message =
                            format!("{}; the {what} keeps its previous addresses", e.message);
                    }
                    Err(again) => {
                        error!(error = %again.message, "{what} could not take back its previous addresses")
                    }
                }
            }
            Err(e)
        }
    }
}

pub async fn bind(addr: SocketAddr, what: &str) -> Result<tokio::net::TcpListener, ApiFailure> {
    tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        let hint = match e.kind() {
            std::io::ErrorKind::AddrInUse => {
                " (something else listens there; pick another address)"
            }
            std::io::ErrorKind::PermissionDenied => {
                " (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
            }
            _ => "",
        };
        ApiFailure::conflict(format!("cannot listen on {addr} for the {what}: {e}{hint}"))
    })
}
