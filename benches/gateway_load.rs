//! TLS workload and load generator for `benches/gateway.sh`.
//!
//! ```text
//! gateway_load serve ADDR NAME                       TLS server for NAME (self-signed);
//!                                                    GET / -> "ok", GET /bytes/N -> N bytes
//! gateway_load rate ADDR NAME SECONDS CONCURRENCY    new TLS connections per second
//!                                                    (connect, handshake, GET /, close)
//! gateway_load throughput ADDR NAME BYTES            MB/s of one GET /bytes/BYTES
//! ```

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Debug)]
struct AcceptAll;

impl rustls::client::danger::ServerCertVerifier for AcceptAll {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

async fn serve(addr: SocketAddr, name: String) {
    let c = rcgen::generate_simple_self_signed(vec![name]).unwrap();
    let cfg = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            vec![c.cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(c.key_pair.serialize_der().into()),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let l = tokio::net::TcpListener::bind(addr).await.unwrap();
    println!("listening on {addr}");
    loop {
        let (s, _) = l.accept().await.unwrap();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let Ok(mut t) = acceptor.accept(s).await else {
                return;
            };
            let mut head = Vec::new();
            let mut b = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match t.read(&mut b).await {
                    Ok(n) if n > 0 => head.extend_from_slice(&b[..n]),
                    _ => return,
                }
            }
            let path = String::from_utf8_lossy(&head)
                .split_whitespace()
                .nth(1)
                .unwrap_or("/")
                .to_string();
            let n: u64 = path
                .strip_prefix("/bytes/")
                .and_then(|n| n.parse().ok())
                .unwrap_or(3);
            let hdr =
                format!("HTTP/1.1 200 OK\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n");
            if t.write_all(hdr.as_bytes()).await.is_err() {
                return;
            }
            let chunk = vec![b'x'; 64 * 1024];
            let mut left = n;
            while left > 0 {
                let k = left.min(chunk.len() as u64) as usize;
                if t.write_all(&chunk[..k]).await.is_err() {
                    return;
                }
                left -= k as u64;
            }
            let _ = t.shutdown().await;
        });
    }
}

fn connector() -> tokio_rustls::TlsConnector {
    let cfg = rustls::ClientConfig::builder()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAll))
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

/// One request; returns body bytes read.
async fn get(
    c: &tokio_rustls::TlsConnector,
    addr: SocketAddr,
    name: &str,
    path: &str,
) -> std::io::Result<u64> {
    let s = tokio::net::TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let sn =
        rustls::pki_types::ServerName::try_from(name.to_string()).map_err(std::io::Error::other)?;
    let mut t = c.connect(sn, s).await?;
    t.write_all(format!("GET {path} HTTP/1.1\r\nHost: {name}\r\n\r\n").as_bytes())
        .await?;
    let mut total = 0u64;
    let mut b = vec![0u8; 256 * 1024];
    loop {
        match t.read(&mut b).await {
            Ok(0) => break,
            Ok(n) => total += n as u64,
            // Servers that close without close_notify are fine for a benchmark.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e),
        }
    }
    Ok(total)
}

async fn rate(addr: SocketAddr, name: String, secs: u64, conc: usize) {
    let c = connector();
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for _ in 0..conc {
        let (c, name, done, failed) = (c.clone(), name.clone(), done.clone(), failed.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < end {
                match tokio::time::timeout(Duration::from_secs(10), get(&c, addr, &name, "/")).await
                {
                    Ok(Ok(_)) => done.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let d = done.load(Ordering::Relaxed);
    println!(
        "{:.0} {}",
        d as f64 / secs as f64,
        failed.load(Ordering::Relaxed)
    );
}

async fn throughput(addr: SocketAddr, name: String, bytes: u64) {
    let c = connector();
    let t0 = Instant::now();
    let n = get(&c, addr, &name, &format!("/bytes/{bytes}"))
        .await
        .unwrap();
    let s = t0.elapsed().as_secs_f64();
    println!("{:.1} {n}", n as f64 * 8.0 / s / 1e6);
}

fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let a: Vec<String> = std::env::args().collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let usage = "usage: gateway_load serve ADDR NAME | rate ADDR NAME SECONDS CONCURRENCY | throughput ADDR NAME BYTES";
    match a.get(1).map(String::as_str) {
        Some("serve") if a.len() == 4 => rt.block_on(serve(a[2].parse().unwrap(), a[3].clone())),
        Some("rate") if a.len() == 6 => rt.block_on(rate(
            a[2].parse().unwrap(),
            a[3].clone(),
            a[4].parse().unwrap(),
            a[5].parse().unwrap(),
        )),
        Some("throughput") if a.len() == 5 => rt.block_on(throughput(
            a[2].parse().unwrap(),
            a[3].clone(),
            a[4].parse().unwrap(),
        )),
        _ => {
            eprintln!("{usage}");
            std::process::exit(2);
        }
    }
}
