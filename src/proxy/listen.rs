//! Bounded accept loops (like mini-redis `server.rs`): a semaphore caps concurrent connections,
//! each connection runs in its own task so one slow client never blocks another, and every
//! loop stops when its token is cancelled.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

pub async fn accept_loop<F, Fut>(
    listener: TcpListener,
    max: usize,
    stop: CancellationToken,
    what: &'static str,
    handler: F,
) where
    F: Fn(TcpStream, SocketAddr) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(max));
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
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let h = handler.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = h(stream, peer) => {}
                _ = stop.cancelled() => {}
            }
            drop(permit);
        });
    }
}
