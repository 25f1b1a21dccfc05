//! Splicing two streams both ways, half-close included: when one side finishes sending, the
//! other side's write half is shut down and the reverse direction carries on until it finishes
//! too (`tokio::io::copy_bidirectional`).

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// Each direction's copy buffer: HAProxy's default `tune.bufsize`, half the system calls of
/// tokio's 8 KiB for bulk transfers; 32 KiB per connection.
pub const BUFFER: usize = 16 * 1024;

/// Returns bytes copied (a to b, b to a).
pub async fn splice<A, B>(a: &mut A, b: &mut B) -> std::io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    tokio::io::copy_bidirectional_with_sizes(a, b, BUFFER, BUFFER).await
}

/// [`splice`], ended with a `TimedOut` error once no byte has moved either way for `idle` (like
/// nginx's `proxy_timeout`): a peer that goes silent, or never finishes a half-closed
/// connection, cannot hold a connection slot forever.
pub async fn splice_idle<A, B>(a: &mut A, b: &mut B, idle: Duration) -> std::io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let start = Instant::now();
    let last = Arc::new(AtomicU64::new(0));
    let mut a = Activity {
        inner: a,
        start,
        last: last.clone(),
    };
    let mut b = Activity {
        inner: b,
        start,
        last: last.clone(),
    };
    let watchdog = async {
        loop {
            let deadline = start + Duration::from_millis(last.load(Ordering::Relaxed)) + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    };
    tokio::select! {
        r = tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, BUFFER, BUFFER) => r,
        _ = watchdog => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no data either way for {idle:?}"),
        )),
    }
}

/// A stream that notes when bytes last moved through it (milliseconds since `start`).
struct Activity<'a, S: ?Sized> {
    inner: &'a mut S,
    start: Instant,
    last: Arc<AtomicU64>,
}

impl<S: ?Sized> Activity<'_, S> {
    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last.fetch_max(ms, Ordering::Relaxed);
    }
}

impl<S: AsyncRead + Unpin + ?Sized> AsyncRead for Activity<'_, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut *self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.touch();
        }
        r
    }
}

impl<S: AsyncWrite + Unpin + ?Sized> AsyncWrite for Activity<'_, S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut *self.inner).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Traffic keeps a spliced connection open; silence ends it after the idle time, also when
    /// one side has half-closed and the other never finishes.
    #[tokio::test(start_paused = true)]
    async fn silence_ends_a_splice_and_traffic_keeps_it() {
        let (mut client, mut a) = tokio::io::duplex(1024);
        let (mut b, mut server) = tokio::io::duplex(1024);
        let idle = Duration::from_secs(60);
        let task = tokio::spawn(async move { splice_idle(&mut a, &mut b, idle).await });
        // Chatter every 40 s for 4 minutes: never idle for 60 s.
        let mut buf = [0u8; 8];
        for i in 0..6u8 {
            tokio::time::sleep(Duration::from_secs(40)).await;
            client.write_all(&[i]).await.unwrap();
            server.read_exact(&mut buf[..1]).await.unwrap();
            assert_eq!(buf[0], i);
            assert!(!task.is_finished(), "ended while traffic flowed");
        }
        // The client half-closes; the server stays silent and never closes.
        client.shutdown().await.unwrap();
        let r = tokio::time::timeout(Duration::from_secs(120), task)
            .await
            .expect("the splice ends within the idle time")
            .unwrap();
        assert_eq!(r.unwrap_err().kind(), std::io::ErrorKind::TimedOut);
        drop(server);
    }
}
