//! The proxy's one I/O edge: opening a stream to a target, either a mesh name or address
//! (directly through the tunnels) or anything an exit node can reach. [`MemDialer`] is the
//! in-memory twin the protocol tests use.

use super::preamble::{self, ExitReply, ExitRequest, ExitStatus, EXIT_MAGIC, EXIT_REPLY_MAGIC};
use super::routes::MeshView;
use super::socks5;
use async_trait::async_trait;
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::watch;

pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for T {}
pub type BoxStream = Box<dyn Stream>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DialRequest {
    pub host: String,
    pub port: u16,
    /// Name of the exit node to go through.
    pub exit: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error(
        "{0} is not a mesh name or address; to reach it through an exit node, name the exit node \
         (the proxy's SOCKS5 username or proxy user; meshctl nc --exit NODE)"
    )]
    NotInMesh(String),
    #[error("no member named {0:?} to use as exit node")]
    UnknownExit(String),
    #[error("exit node {node} refused: {message}")]
    ExitRefused {
        node: String,
        status: ExitStatus,
        message: String,
    },
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("connecting to {0} timed out")]
    Timeout(SocketAddr),
}

impl DialError {
    /// The SOCKS5 reply code for this failure.
    pub fn socks_reply(&self) -> u8 {
        match self {
            DialError::NotInMesh(_) | DialError::UnknownExit(_) => socks5::REP_NOT_ALLOWED,
            DialError::ExitRefused { status, .. } => match status {
                ExitStatus::NotAnExit | ExitStatus::Refused => socks5::REP_NOT_ALLOWED,
                ExitStatus::ResolveFailed => socks5::REP_HOST_UNREACHABLE,
                ExitStatus::ConnectFailed => socks5::REP_REFUSED,
                ExitStatus::Unreachable => socks5::REP_HOST_UNREACHABLE,
                ExitStatus::Ok => socks5::REP_FAILURE,
            },
            DialError::Connect { source, .. }
                if source.kind() == io::ErrorKind::ConnectionRefused =>
            {
                socks5::REP_REFUSED
            }
            DialError::Connect { .. } | DialError::Timeout(_) => socks5::REP_HOST_UNREACHABLE,
        }
    }

    /// The HTTP status for this failure.
    pub fn http_status(&self) -> u16 {
        match self {
            DialError::NotInMesh(_) | DialError::UnknownExit(_) => 403,
            DialError::ExitRefused {
                status: ExitStatus::NotAnExit | ExitStatus::Refused,
                ..
            } => 403,
            DialError::Timeout(_) => 504,
            _ => 502,
        }
    }
}

#[async_trait]
pub trait Dialer: Send + Sync + 'static {
    async fn dial(&self, req: &DialRequest) -> Result<BoxStream, DialError>;
}

/// A stream with bytes already read from it put back in front.
pub struct Prefixed<S> {
    prefix: Vec<u8>,
    at: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    pub fn new(prefix: Vec<u8>, inner: S) -> Prefixed<S> {
        Prefixed {
            prefix,
            at: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.at < self.prefix.len() {
            let n = buf.remaining().min(self.prefix.len() - self.at);
            let at = self.at;
            buf.put_slice(&self.prefix[at..at + n]);
            self.at += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// TCP connect with a deadline.
pub async fn connect(
    addr: SocketAddr,
    timeout: Duration,
) -> Result<tokio::net::TcpStream, DialError> {
    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(s)
        }
        Ok(Err(source)) => Err(DialError::Connect { addr, source }),
        Err(_) => Err(DialError::Timeout(addr)),
    }
}

/// The real dialer: mesh targets directly, the rest through a chosen exit node.
pub struct MeshDialer {
    pub view: watch::Receiver<Arc<MeshView>>,
    pub connect_timeout: Duration,
}

#[async_trait]
impl Dialer for MeshDialer {
    async fn dial(&self, req: &DialRequest) -> Result<BoxStream, DialError> {
        let view = self.view.borrow().clone();
        // Mesh names and addresses are always reached directly, also when the client names an
        // exit node (exits refuse the mesh range anyway): one proxy setting serves both.
        if let Some(ip) = view.resolve(&req.host) {
            let s = connect(SocketAddr::from((ip, req.port)), self.connect_timeout).await?;
            return Ok(Box::new(s));
        }
        let Some(exit) = &req.exit else {
            return Err(DialError::NotInMesh(req.host.clone()));
        };
        let node = view
            .node(exit)
            .ok_or_else(|| DialError::UnknownExit(exit.clone()))?;
        let addr = SocketAddr::from((node.ip, super::EXIT_PORT));
        let mut s = connect(addr, self.connect_timeout).await?;
        let ask = preamble::encode(
            EXIT_MAGIC,
            &ExitRequest {
                host: req.host.clone(),
                port: req.port,
            },
        );
        s.write_all(&ask)
            .await
            .map_err(|source| DialError::Connect { addr, source })?;
        // The exit node connects onwards with its own deadline; allow for it.
        let reply = tokio::time::timeout(
            self.connect_timeout * 2 + Duration::from_secs(10),
            preamble::read::<ExitReply, _>(EXIT_REPLY_MAGIC, &mut s),
        )
        .await
        .map_err(|_| DialError::Timeout(addr))?
        .map_err(|e| DialError::Connect {
            addr,
            source: io::Error::other(e.to_string()),
        })?;
        let (reply, rest) = reply;
        if reply.status != ExitStatus::Ok {
            return Err(DialError::ExitRefused {
                node: exit.clone(),
                status: reply.status,
                message: reply.message,
            });
        }
        Ok(Box::new(Prefixed::new(rest, s)))
    }
}

type Handler = Box<dyn Fn() -> BoxStream + Send + Sync>;
/// host, port, exit node.
type TargetKey = (String, u16, Option<String>);

/// In-memory twin: targets are registered by `host:port` (and exit), each connection gets a
/// fresh in-memory stream from its handler.
#[derive(Default)]
pub struct MemDialer {
    targets: Mutex<HashMap<TargetKey, Arc<Handler>>>,
    pub dialed: Mutex<Vec<DialRequest>>,
}

impl MemDialer {
    pub fn add(
        &self,
        host: &str,
        port: u16,
        exit: Option<&str>,
        h: impl Fn() -> BoxStream + Send + Sync + 'static,
    ) {
        self.targets.lock().unwrap().insert(
            (host.to_string(), port, exit.map(str::to_string)),
            Arc::new(Box::new(h)),
        );
    }
}

#[async_trait]
impl Dialer for MemDialer {
    async fn dial(&self, req: &DialRequest) -> Result<BoxStream, DialError> {
        self.dialed.lock().unwrap().push(req.clone());
        let h = self
            .targets
            .lock()
            .unwrap()
            .get(&(req.host.clone(), req.port, req.exit.clone()))
            .cloned();
        match h {
            Some(h) => Ok(h()),
            None if req.exit.is_some() => Err(DialError::ExitRefused {
                node: req.exit.clone().unwrap_or_default(),
                status: ExitStatus::NotAnExit,
                message: "not an exit node".into(),
            }),
            None => Err(DialError::NotInMesh(req.host.clone())),
        }
    }
}

/// An echo server on an in-memory stream (tests).
pub fn mem_echo() -> BoxStream {
    let (a, mut b) = tokio::io::duplex(64 * 1024);
    tokio::spawn(async move {
        let (mut r, mut w) = tokio::io::split(&mut b);
        let _ = tokio::io::copy(&mut r, &mut w).await;
    });
    Box::new(a)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::routes::NodeView;
    use tokio::io::AsyncReadExt;

    /// With an exit node named (a browser set up once with `office:x`), mesh names still go
    /// straight to their node; only the rest would go through the exit.
    #[tokio::test]
    async fn mesh_names_are_reached_directly_also_when_an_exit_is_named() {
        // A "mesh" on loopback: 127.0.0.0/16, node db at 127.0.7.1.
        let listener = tokio::net::TcpListener::bind("127.0.7.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let _ = s.write_all(b"db").await;
        });
        let mut view = MeshView {
            domain: "mesh.internal".into(),
            range: Some("127.0.0.0/16".parse().unwrap()),
            ..Default::default()
        };
        view.nodes.insert(
            "db".into(),
            NodeView {
                ip: std::net::Ipv4Addr::new(127, 0, 7, 1),
                live: true,
                exit: false,
            },
        );
        let (_tx, rx) = watch::channel(Arc::new(view));
        let dialer = MeshDialer {
            view: rx,
            connect_timeout: Duration::from_secs(5),
        };
        let req = DialRequest {
            host: "db.mesh.internal".into(),
            port,
            exit: Some("office".into()),
        };
        let mut s = dialer.dial(&req).await.expect("direct to the mesh node");
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"db");
        // Outside the mesh, the (unknown) exit is what it would go through.
        let outside = DialRequest {
            host: "example.com".into(),
            port: 443,
            exit: Some("office".into()),
        };
        assert!(matches!(
            dialer.dial(&outside).await,
            Err(DialError::UnknownExit(e)) if e == "office"
        ));
    }
}
