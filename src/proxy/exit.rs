//! Exit node: connects proxied connections from mesh members onwards to wherever this node can
//! reach. Only after `meshctl exit-node enable`; otherwise it refuses, saying so. Accepts only
//! through the tunnels (socket bound to the TUN device).

use super::dial::connect;
use super::preamble::{self, ExitReply, ExitRequest, ExitStatus, EXIT_MAGIC, EXIT_REPLY_MAGIC};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tracing::{debug, info};

const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

async fn answer(
    s: &mut TcpStream,
    status: ExitStatus,
    message: impl Into<String>,
) -> std::io::Result<()> {
    s.write_all(&preamble::encode(
        EXIT_REPLY_MAGIC,
        &ExitReply {
            status,
            message: message.into(),
        },
    ))
    .await
}

pub async fn session(
    enabled: watch::Receiver<bool>,
    name: String,
    mut client: TcpStream,
    peer: SocketAddr,
) {
    let r = tokio::time::timeout(
        REQUEST_TIMEOUT,
        preamble::read::<ExitRequest, _>(EXIT_MAGIC, &mut client),
    )
    .await;
    let Ok(Ok((req, rest))) = r else {
        debug!(%peer, "bad or slow exit request; closed");
        return;
    };
    if !*enabled.borrow() {
        info!(%peer, target = %req.host, "refused: this node is not an exit node");
        let _ = answer(
            &mut client,
            ExitStatus::NotAnExit,
            format!("{name} is not an exit node (run `meshctl exit-node enable` on it)"),
        )
        .await;
        return;
    }
    let addrs = match tokio::time::timeout(
        RESOLVE_TIMEOUT,
        tokio::net::lookup_host((req.host.as_str(), req.port)),
    )
    .await
    {
        Ok(Ok(a)) => a.collect::<Vec<_>>(),
        Ok(Err(e)) => {
            let _ = answer(
                &mut client,
                ExitStatus::ResolveFailed,
                format!("cannot resolve {}: {e}", req.host),
            )
            .await;
            return;
        }
        Err(_) => {
            let _ = answer(
                &mut client,
                ExitStatus::ResolveFailed,
                format!("resolving {} timed out", req.host),
            )
            .await;
            return;
        }
    };
    if addrs
        .iter()
        .any(|a| a.ip().is_loopback() || a.ip().is_unspecified())
    {
        let _ = answer(
            &mut client,
            ExitStatus::Refused,
            format!(
                "{} is the exit node's own loopback; it is not reachable through it",
                req.host
            ),
        )
        .await;
        return;
    }
    let mut last = String::from("no address");
    for a in addrs {
        match connect(a, CONNECT_TIMEOUT).await {
            Ok(mut target) => {
                if answer(&mut client, ExitStatus::Ok, "").await.is_err() {
                    return;
                }
                if !rest.is_empty() && target.write_all(&rest).await.is_err() {
                    return;
                }
                debug!(%peer, target = %a, "exit connection");
                let _ = super::splice::splice(&mut client, &mut target).await;
                return;
            }
            Err(e) => last = e.to_string(),
        }
    }
    let _ = answer(&mut client, ExitStatus::ConnectFailed, last).await;
}
