//! Servers the end-to-end tests run inside namespaces: a TLS web server signed by the test's own
//! CA (optionally reading a PROXY v2 header first), a plain HTTP server and a TCP echo server.
//! Each reports who it is and who the client was, so tests can tell where a request landed.

#![allow(dead_code)]

use meshd::cli::demo::lab::Netns;
use meshd::proxy::dial::Prefixed;
use meshd::proxy::proxy_protocol;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::oneshot;

/// The test's certificate authority.
pub struct Pki {
    pub ca_pem: String,
    ca: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl Pki {
    pub fn new() -> Pki {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "meshd test CA");
        let ca = p.self_signed(&key).unwrap();
        Pki {
            ca_pem: ca.pem(),
            ca,
            key,
        }
    }

    /// A server certificate for `names`, and its key (DER).
    pub fn server(&self, names: &[&str]) -> (Vec<u8>, Vec<u8>) {
        let key = rcgen::KeyPair::generate().unwrap();
        let p =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = p.signed_by(&key, &self.ca, &self.key).unwrap();
        (cert.der().to_vec(), key.serialize_der())
    }
}

/// A server running on a thread inside a namespace; stopped on drop.
pub struct Workload {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl Drop for Workload {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn read_head<S: AsyncRead + Unpin>(s: &mut S) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut b = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 16384 {
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&b[..n]),
            _ => break,
        }
    }
    buf
}

async fn respond<S: AsyncWrite + Unpin>(s: &mut S, body: &str) {
    let r = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = s.write_all(r.as_bytes()).await;
    let _ = s.shutdown().await;
}

/// Read a PROXY v2 header if one is expected; returns the client it names and the rest.
async fn proxy_header(
    s: &mut tokio::net::TcpStream,
    expect: bool,
) -> (Option<SocketAddr>, Vec<u8>) {
    if !expect {
        return (None, Vec::new());
    }
    let mut buf = Vec::new();
    let mut b = [0u8; 512];
    loop {
        if let Some((src, _dst, n)) = proxy_protocol::decode(&buf) {
            return (Some(src), buf.split_off(n));
        }
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&b[..n]),
            _ => return (None, buf),
        }
    }
}

fn run_server<F, Fut>(ns: &Netns, addr: SocketAddr, conn: F) -> Workload
where
    F: Fn(tokio::net::TcpStream, SocketAddr) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (stop, mut stopped) = oneshot::channel::<()>();
    let (ready, is_ready) = std::sync::mpsc::channel::<std::io::Result<()>>();
    let conn = Arc::new(conn);
    let thread = ns
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let l = match tokio::net::TcpListener::bind(addr).await {
                    Ok(l) => {
                        let _ = ready.send(Ok(()));
                        l
                    }
                    Err(e) => {
                        let _ = ready.send(Err(e));
                        return;
                    }
                };
                loop {
                    tokio::select! {
                        _ = &mut stopped => return,
                        r = l.accept() => if let Ok((s, peer)) = r {
                            tokio::spawn(conn(s, peer));
                        },
                    }
                }
            })
        })
        .unwrap();
    is_ready
        .recv_timeout(Duration::from_secs(10))
        .expect("server thread started")
        .expect("server bound");
    Workload {
        stop: Some(stop),
        thread: Some(thread),
    }
}

/// HTTPS: answers `hello from LABEL client=ADDR` where ADDR is the PROXY header's client (or "-").
pub fn tls(
    ns: &Netns,
    addr: SocketAddr,
    pki: &Pki,
    names: &[&str],
    label: &str,
    proxy: bool,
) -> Workload {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (cert, key) = pki.server(names);
    let cfg = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            vec![rustls::pki_types::CertificateDer::from(cert)],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.into()),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let label = label.to_string();
    run_server(ns, addr, move |mut s, _peer| {
        let acceptor = acceptor.clone();
        let label = label.clone();
        async move {
            let (client, rest) = proxy_header(&mut s, proxy).await;
            let Ok(mut tls) = acceptor.accept(Prefixed::new(rest, s)).await else {
                return;
            };
            let _ = read_head(&mut tls).await;
            let who = client.map(|c| c.to_string()).unwrap_or_else(|| "-".into());
            respond(&mut tls, &format!("hello from {label} client={who}\n")).await;
        }
    })
}

/// Plain HTTP: answers `hello http from LABEL path=PATH`.
pub fn http(ns: &Netns, addr: SocketAddr, label: &str) -> Workload {
    let label = label.to_string();
    run_server(ns, addr, move |mut s, _peer| {
        let label = label.clone();
        async move {
            let head = read_head(&mut s).await;
            let path = String::from_utf8_lossy(&head)
                .split_whitespace()
                .nth(1)
                .unwrap_or("?")
                .to_string();
            respond(&mut s, &format!("hello http from {label} path={path}\n")).await;
        }
    })
}

/// TCP echo until the client half-closes, then close.
pub fn echo(ns: &Netns, addr: SocketAddr) -> Workload {
    run_server(ns, addr, |mut s, _peer| async move {
        let (mut r, mut w) = s.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
        let _ = w.shutdown().await;
    })
}

/// `len` bytes from namespace `from` to an echo server at `to` in namespace `server`, and back,
/// over a connection with MSS `mss` (the kernel's choice if `None`): every byte comes back,
/// unchanged.
pub fn echo_bulk(from: &Netns, server: &Netns, to: SocketAddr, len: usize, mss: Option<u32>) {
    use sha2::{Digest, Sha256};
    use std::io::{Read, Write};
    let _echo = echo(server, to);
    let data: Vec<u8> = (0..len)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let sent = Sha256::digest(&data);
    let got = from
        .run(move || {
            let sock = socket2::Socket::new(
                socket2::Domain::IPV4,
                socket2::Type::STREAM,
                Some(socket2::Protocol::TCP),
            )
            .unwrap();
            if let Some(mss) = mss {
                sock.set_mss(mss).unwrap();
            }
            sock.connect_timeout(&to.into(), Duration::from_secs(5))
                .unwrap();
            let mut s: std::net::TcpStream = sock.into();
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            let mut w = s.try_clone().unwrap();
            let writer = std::thread::spawn(move || {
                w.write_all(&data).unwrap();
                w.shutdown(std::net::Shutdown::Write).unwrap();
            });
            let mut back = Vec::with_capacity(len);
            s.read_to_end(&mut back).unwrap();
            writer.join().unwrap();
            back
        })
        .unwrap();
    assert_eq!(got.len(), len, "every byte came back");
    assert_eq!(Sha256::digest(&got), sent, "and unchanged");
}
