//! Bounded accept loops (like mini-redis `server.rs`): a semaphore caps concurrent connections,
//! each connection runs in its own task so one slow client never blocks another, and every
//! loop stops when its token is cancelled.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// Accept on `listener` until `stop`, at most `max` connections at once and, with `per_source`,
/// at most that many from one client address (IPv6: one /64).
pub async fn accept_loop<F, Fut>(
    listener: TcpListener,
    max: usize,
    per_source: Option<usize>,
    stop: CancellationToken,
    what: &'static str,
    handler: F,
) where
    F: Fn(TcpStream, SocketAddr) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(max));
    let sources: Sources = Arc::default();
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    debug!(what, error = %e, "accept failed");
                    // EMFILE and friends: back off instead of spinning.
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            warn!(what, %peer, max, "connection limit reached; refusing a connection");
            crate::metrics::connection(what, false);
            drop(stream);
            continue;
        };
        let source = match per_source {
            // A load balancer or reverse proxy in front of the node connects from loopback or
            // a private address on behalf of many clients: the per-client cap is for the open
            // internet.
            Some(_) if behind_a_proxy(peer.ip()) => None,
            Some(limit) => match SourceSlot::take(&sources, peer, limit) {
                Some(s) => Some(s),
                None => {
                    debug!(what, %peer, limit, "per-client connection limit reached; refusing a connection");
                    crate::metrics::connection(what, false);
                    drop(stream);
                    continue;
                }
            },
            None => None,
        };
        crate::metrics::connection(what, true);
        let _ = stream.set_nodelay(true);
        let h = handler.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = h(stream, peer) => {}
                _ = stop.cancelled() => {}
            }
            drop(permit);
            drop(source);
        });
    }
}

type Sources = Arc<Mutex<HashMap<IpAddr, usize>>>;

/// Loopback and private (RFC 1918, IPv6 unique-local) sources.
fn behind_a_proxy(ip: IpAddr) -> bool {
    match ip.to_canonical() {
        IpAddr::V4(v4) => v4.is_loopback() || v4.is_private(),
        IpAddr::V6(v6) => v6.is_loopback() || (v6.segments()[0] & 0xfe00) == 0xfc00,
    }
}

/// One connection counted against its client address; given back when dropped.
struct SourceSlot {
    sources: Sources,
    key: IpAddr,
}

impl SourceSlot {
    fn take(sources: &Sources, peer: SocketAddr, limit: usize) -> Option<SourceSlot> {
        let key = crate::util::sender_key(peer.ip());
        let mut map = sources.lock().unwrap();
        let n = map.entry(key).or_insert(0);
        if *n >= limit {
            return None;
        }
        *n += 1;
        Some(SourceSlot {
            sources: sources.clone(),
            key,
        })
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut map = self.sources.lock().unwrap();
        if let Some(n) = map.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_and_loopback_sources_are_not_capped_per_client() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "192.168.0.9",
            "172.16.5.5",
            "::1",
            "fd00::5",
            "::ffff:10.0.0.1",
        ] {
            assert!(behind_a_proxy(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["198.51.100.7", "2001:db8::1", "100.64.0.1"] {
            assert!(!behind_a_proxy(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn per_source_slots_are_bounded_and_given_back() {
        let sources: Sources = Arc::default();
        let a: SocketAddr = "192.0.2.1:1000".parse().unwrap();
        let a2: SocketAddr = "192.0.2.1:1001".parse().unwrap();
        let b: SocketAddr = "192.0.2.2:1000".parse().unwrap();
        let one = SourceSlot::take(&sources, a, 2).unwrap();
        let _two = SourceSlot::take(&sources, a2, 2).unwrap();
        assert!(
            SourceSlot::take(&sources, a, 2).is_none(),
            "third from one address"
        );
        let _other = SourceSlot::take(&sources, b, 2).expect("another address is not affected");
        drop(one);
        assert!(
            SourceSlot::take(&sources, a, 2).is_some(),
            "a slot came back"
        );
        // IPv6 clients count per /64.
        let v6a: SocketAddr = "[2001:db8::1]:1".parse().unwrap();
        let v6b: SocketAddr = "[2001:db8::ffff]:1".parse().unwrap();
        let _x = SourceSlot::take(&sources, v6a, 1).unwrap();
        assert!(SourceSlot::take(&sources, v6b, 1).is_none());
    }
}
