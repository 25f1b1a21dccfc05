//! Splicing two streams both ways, half-close included: when one side finishes sending, the
//! other side's write half is shut down and the reverse direction carries on until it finishes
//! too (`tokio::io::copy_bidirectional`).

use tokio::io::{AsyncRead, AsyncWrite};

/// Returns bytes copied (a to b, b to a).
pub async fn splice<A, B>(a: &mut A, b: &mut B) -> std::io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    tokio::io::copy_bidirectional(a, b).await
}
