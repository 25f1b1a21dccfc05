//! The two mesh-internal headers that start a connection between nodes (always through a
//! WireGuard tunnel, to a socket bound to the TUN device, so the sender is an authenticated
//! member):
//!
//! - gateway -> serving node: which hostname, and who the client is ([`Handoff`]);
//! - proxy -> exit node: where to connect ([`ExitRequest`]), answered by an [`ExitReply`].
//!
//! Wire form: 4-byte magic, u16 length, bincode body.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

pub const HANDOFF_MAGIC: &[u8; 4] = b"MGW1";
pub const EXIT_MAGIC: &[u8; 4] = b"MEX1";
pub const EXIT_REPLY_MAGIC: &[u8; 4] = b"MEX1";
const MAX_BODY: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    /// TLS passed through by SNI.
    Tls,
    /// Plain HTTP routed by Host.
    Http,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handoff {
    pub kind: Kind,
    pub hostname: String,
    /// The client as the gateway saw it.
    pub client: SocketAddr,
    /// The gateway address the client connected to.
    pub gateway: SocketAddr,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRequest {
    /// A host name or an IP address literal.
    pub host: String,
    pub port: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitStatus {
    Ok,
    NotAnExit,
    ResolveFailed,
    /// The destination refused the connection.
    ConnectFailed,
    Refused,
    /// The destination did not answer in time, or has no route.
    Unreachable,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitReply {
    pub status: ExitStatus,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PreambleError {
    #[error("bad magic")]
    Magic,
    #[error("header too large")]
    TooLarge,
    #[error("malformed header: {0}")]
    Malformed(String),
}

pub fn encode<T: Serialize>(magic: &[u8; 4], v: &T) -> Vec<u8> {
    let body = crate::trust::encode(v);
    let mut out = magic.to_vec();
    out.extend_from_slice(&(body.len() as u16).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// Decode from the bytes so far: `Ok(None)` = need more; `Ok(Some((value, used)))`.
pub fn decode<T: serde::de::DeserializeOwned>(
    magic: &[u8; 4],
    b: &[u8],
) -> Result<Option<(T, usize)>, PreambleError> {
    let n = b.len().min(4);
    if b[..n] != magic[..n] {
        return Err(PreambleError::Magic);
    }
    if b.len() < 6 {
        return Ok(None);
    }
    let len = u16::from_be_bytes([b[4], b[5]]) as usize;
    if len > MAX_BODY {
        return Err(PreambleError::TooLarge);
    }
    if b.len() < 6 + len {
        return Ok(None);
    }
    let v = crate::trust::decode(&b[6..6 + len], "preamble")
        .map_err(|e| PreambleError::Malformed(e.to_string()))?;
    Ok(Some((v, 6 + len)))
}

/// Read one header from a stream, with whatever came after it. Bounded by the caller's timeout.
pub async fn read<T, R>(magic: &[u8; 4], r: &mut R) -> Result<(T, Vec<u8>), PreambleError>
where
    T: serde::de::DeserializeOwned,
    R: tokio::io::AsyncRead + Unpin,
{
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 2048];
    loop {
        let n = r
            .read(&mut chunk)
            .await
            .map_err(|e| PreambleError::Malformed(e.to_string()))?;
        if n == 0 {
            return Err(PreambleError::Malformed("connection closed".into()));
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some((v, used)) = decode(magic, &buf)? {
            return Ok((v, buf.split_off(used)));
        }
        if buf.len() > MAX_BODY + 6 {
            return Err(PreambleError::TooLarge);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trips_and_waits_for_more() {
        let h = Handoff {
            kind: Kind::Tls,
            hostname: "app.example.test".into(),
            client: "198.51.100.9:5000".parse().unwrap(),
            gateway: "198.51.100.1:443".parse().unwrap(),
        };
        let mut e = encode(HANDOFF_MAGIC, &h);
        for cut in 0..e.len() {
            assert_eq!(decode::<Handoff>(HANDOFF_MAGIC, &e[..cut]), Ok(None));
        }
        e.extend_from_slice(b"tls bytes");
        let (d, used) = decode::<Handoff>(HANDOFF_MAGIC, &e).unwrap().unwrap();
        assert_eq!(d, h);
        assert_eq!(&e[used..], b"tls bytes");
        assert_eq!(decode::<Handoff>(EXIT_MAGIC, &e), Err(PreambleError::Magic));
    }

    proptest! {
        #[test]
        fn never_panics(d in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut b = HANDOFF_MAGIC.to_vec();
            b.extend_from_slice(&d);
            let _ = decode::<Handoff>(HANDOFF_MAGIC, &b);
            let _ = decode::<ExitRequest>(EXIT_MAGIC, &d);
        }
    }
}
