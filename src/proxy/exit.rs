//! Exit node: connects proxied connections from mesh members onwards to wherever this node can
//! reach. Only after `meshctl exit-node enable`; otherwise it refuses, saying so. Accepts only
//! through the tunnels (socket bound to the TUN device).

use super::dial::connect;
use super::preamble::{self, ExitReply, ExitRequest, ExitStatus, EXIT_MAGIC, EXIT_REPLY_MAGIC};
use crate::id::MeshRange;
use std::net::{IpAddr, SocketAddr};
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

/// Cloud metadata and platform services outside the link-local range, which hand out machine
/// credentials to whoever asks from the machine: AWS over IPv6 (fd00:ec2::254), Alibaba Cloud
/// (100.100.100.200), Azure's WireServer (168.63.129.16). (169.254.169.254, used by most
/// clouds, and fe80::a9fe:a9fe are link-local and refused as such.)
const CLOUD_METADATA: [IpAddr; 3] = [
    IpAddr::V6(std::net::Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)),
    IpAddr::V4(std::net::Ipv4Addr::new(100, 100, 100, 200)),
    IpAddr::V4(std::net::Ipv4Addr::new(168, 63, 129, 16)),
];

/// Why this exit node will not connect a member to `ip`, if it will not: its own host (loopback
/// or any of its addresses, where local-only services listen), link-local addresses (cloud
/// metadata services live at 169.254.169.254), non-unicast addresses, and the mesh range
/// (members reach those directly, as themselves).
pub fn refusal(ip: IpAddr, mesh: &MeshRange, own: &[IpAddr]) -> Option<&'static str> {
    let ip = ip.to_canonical();
    let own_host =
        ip.is_loopback() || ip.is_unspecified() || own.iter().any(|o| o.to_canonical() == ip);
    if own_host {
        return Some("is the exit node itself; it is not reachable through it");
    }
    if CLOUD_METADATA.contains(&ip) {
        return Some("is a cloud metadata service; exits never go there");
    }
    match ip {
        IpAddr::V4(v4) => {
            if v4.is_link_local() {
                return Some("is link-local (cloud metadata lives there); exits never go there");
            }
            if v4.is_multicast() || v4.is_broadcast() {
                return Some("is not a unicast address");
            }
            if mesh.contains(v4) {
                return Some("is a mesh address; reach it directly over the mesh");
            }
        }
        IpAddr::V6(v6) => {
            if v6.is_unicast_link_local() {
                return Some("is link-local; exits never go there");
            }
            if v6.is_multicast() {
                return Some("is not a unicast address");
            }
        }
    }
    None
}

/// The status an exit reports when no address of a destination could be connected: refused if
/// any address refused (the host is there, the port is closed), else unreachable.
fn worse_of(so_far: ExitStatus, e: &super::dial::DialError) -> ExitStatus {
    match e {
        super::dial::DialError::Connect { source, .. }
            if source.kind() == std::io::ErrorKind::ConnectionRefused =>
        {
            ExitStatus::ConnectFailed
        }
        _ => so_far,
    }
}

pub async fn session(
    enabled: watch::Receiver<bool>,
    name: String,
    mesh: MeshRange,
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
    // Every address the name resolves to must be allowed: a name that mixes a public address
    // with a forbidden one is refused as a whole, so connection fallback cannot be steered.
    let own: Vec<IpAddr> = crate::mesh::linux::interface_addresses()
        .into_iter()
        .map(|a| a.ip)
        .collect();
    if let Some((a, why)) = addrs
        .iter()
        .find_map(|a| refusal(a.ip(), &mesh, &own).map(|why| (a, why)))
    {
        info!(%peer, target = %req.host, address = %a.ip(), "refused exit: {why}");
        let _ = answer(
            &mut client,
            ExitStatus::Refused,
            if req.host == a.ip().to_string() {
                format!("{} {why}", req.host)
            } else {
                format!("{} resolves to {}, which {why}", req.host, a.ip())
            },
        )
        .await;
        return;
    }
    let mut last = String::from("no address");
    let mut status = ExitStatus::Unreachable;
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
                // `meshctl exit-node disable` also ends the connections already open.
                let mut enabled = enabled.clone();
                tokio::select! {
                    _ = super::splice::splice(&mut client, &mut target) => {}
                    _ = enabled.wait_for(|on| !*on) => {
                        info!(%peer, target = %a, "exit connection closed: this node is no longer an exit node");
                    }
                }
                return;
            }
            Err(e) => {
                status = worse_of(status, &e);
                last = e.to_string();
            }
        }
    }
    let _ = answer(&mut client, status, last).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_is_reported_as_such_and_silence_as_unreachable() {
        use super::super::dial::DialError;
        let addr: SocketAddr = "192.0.2.1:80".parse().unwrap();
        let refused = DialError::Connect {
            addr,
            source: std::io::ErrorKind::ConnectionRefused.into(),
        };
        let timeout = DialError::Timeout(addr);
        let mut s = ExitStatus::Unreachable;
        s = worse_of(s, &timeout);
        assert_eq!(s, ExitStatus::Unreachable);
        s = worse_of(s, &refused);
        s = worse_of(s, &timeout);
        assert_eq!(s, ExitStatus::ConnectFailed);
        let rep = |status| {
            DialError::ExitRefused {
                node: "e".into(),
                status,
                message: String::new(),
            }
            .socks_reply()
        };
        assert_eq!(
            rep(ExitStatus::ConnectFailed),
            crate::proxy::socks5::REP_REFUSED
        );
        assert_eq!(
            rep(ExitStatus::Unreachable),
            crate::proxy::socks5::REP_HOST_UNREACHABLE
        );
    }

    #[test]
    fn exits_refuse_their_own_host_link_local_and_the_mesh() {
        let mesh: MeshRange = "10.210.0.0/16".parse().unwrap();
        let own: Vec<IpAddr> = vec!["192.0.2.5".parse().unwrap(), "2001:db8::5".parse().unwrap()];
        let refused = |s: &str| refusal(s.parse().unwrap(), &mesh, &own);
        for ip in [
            "127.0.0.1",
            "127.3.4.5",
            "::1",
            "::ffff:127.0.0.1",
            "0.0.0.0",
            "::",
            "192.0.2.5",
            "::ffff:192.0.2.5",
            "2001:db8::5",
            "169.254.169.254",
            "::ffff:169.254.169.254",
            "fe80::1",
            "fd00:ec2::254",
            "100.100.100.200",
            "::ffff:168.63.129.16",
            "224.0.0.1",
            "255.255.255.255",
            "ff02::1",
            "10.210.3.1",
        ] {
            assert!(refused(ip).is_some(), "{ip} must be refused");
        }
        for ip in ["198.51.100.7", "192.0.2.6", "2001:db8::6", "10.0.0.1"] {
            assert_eq!(refused(ip), None, "{ip} must be allowed");
        }
    }
}
