//! What the edge requests of the API ask for, checked before anything changes: listen
//! addresses, hostnames, and whether a proxy would be open to the network. Pure.

use crate::control::{ApiFailure, ExposeRequest, ListenRequest};
use crate::proxy::is_hostname_pattern;
use crate::proxy::serve::Exposed;
use crate::state::ListenPair;
use std::net::SocketAddr;

/// Default gateway listeners (HTTPS, HTTP).
pub const GATEWAY_DEFAULT: (SocketAddr, SocketAddr) = (
    SocketAddr::V4(std::net::SocketAddrV4::new(
        std::net::Ipv4Addr::UNSPECIFIED,
        443,
    )),
    SocketAddr::V4(std::net::SocketAddrV4::new(
        std::net::Ipv4Addr::UNSPECIFIED,
        80,
    )),
);
/// Default proxy listeners (SOCKS5, HTTP), on loopback.
pub const PROXY_DEFAULT: (SocketAddr, SocketAddr) = (
    SocketAddr::V4(std::net::SocketAddrV4::new(
        std::net::Ipv4Addr::LOCALHOST,
        1080,
    )),
    SocketAddr::V4(std::net::SocketAddrV4::new(
        std::net::Ipv4Addr::LOCALHOST,
        3128,
    )),
);

/// `ADDR:PORT`, a bare port (on `default_ip`), or "off".
fn listen_addr(s: Option<&str>, default: SocketAddr) -> Result<Option<SocketAddr>, String> {
    let Some(s) = s else { return Ok(Some(default)) };
    if s.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    if let Ok(p) = s.parse::<u16>() {
        return Ok(Some(SocketAddr::new(default.ip(), p)));
    }
    s.parse::<SocketAddr>().map(Some).map_err(|_| {
        format!("{s:?} is not a listen address: write ADDR:PORT (e.g. 0.0.0.0:443), a port, or off")
    })
}

/// The listen addresses a request asks for; `None` to disable the role.
pub fn listen_pair(
    r: &ListenRequest,
    role: &str,
    first: SocketAddr,
    second: SocketAddr,
) -> Result<Option<ListenPair>, ApiFailure> {
    if !r.enable {
        return Ok(None);
    }
    let first = listen_addr(r.first.as_deref(), first).map_err(ApiFailure::bad_request)?;
    let second = listen_addr(r.second.as_deref(), second).map_err(ApiFailure::bad_request)?;
    if first.is_none() && second.is_none() {
        return Err(ApiFailure::bad_request(format!(
            "both listeners are off; use `meshctl {role} disable`"
        )));
    }
    Ok(Some(ListenPair { first, second }))
}

/// A hostname as stored and compared: trimmed, lowercase, no trailing dot.
pub fn normalize_hostname(h: &str) -> String {
    h.trim().trim_end_matches('.').to_ascii_lowercase()
}

/// The exposure `meshctl expose` asks for.
pub fn exposure(r: &ExposeRequest) -> Result<Exposed, ApiFailure> {
    let host = normalize_hostname(&r.hostname);
    if !is_hostname_pattern(&host) {
        return Err(ApiFailure::bad_request(format!(
            "{:?} is not a valid DNS name: use labels of a-z, 0-9 and '-' (e.g. app.example.com), \
             or a wildcard like *.example.com",
            r.hostname
        )));
    }
    let to = r.to.ok_or_else(|| {
        ApiFailure::bad_request(
            "--to ADDR:PORT is required (where the workload listens on this node)",
        )
    })?;
    Ok(Exposed {
        hostname: host,
        to,
        http_to: r.http_to,
        proxy_protocol: r.proxy_protocol,
    })
}

/// The proxy listeners a request asks for, refused if any is reachable from the network
/// without `--allow-public`. Returns them with the non-loopback addresses among them.
pub fn proxy_pair(r: &ListenRequest) -> Result<(Option<ListenPair>, Vec<SocketAddr>), ApiFailure> {
    let pair = listen_pair(r, "proxy", PROXY_DEFAULT.0, PROXY_DEFAULT.1)?;
    let public: Vec<SocketAddr> = pair
        .iter()
        .flat_map(|p| [p.first, p.second])
        .flatten()
        .filter(|a| !a.ip().is_loopback())
        .collect();
    if !public.is_empty() && !r.allow_public {
        return Err(ApiFailure::bad_request(format!(
            "listening on {} would let anyone who reaches that address into the mesh; pass \
             --allow-public if that is what you want",
            public
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    Ok((pair, public))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(enable: bool, first: Option<&str>, second: Option<&str>) -> ListenRequest {
        ListenRequest {
            enable,
            first: first.map(str::to_string),
            second: second.map(str::to_string),
            allow_public: false,
        }
    }

    #[test]
    fn listen_addresses_take_a_port_an_address_or_off() {
        let (https, http) = GATEWAY_DEFAULT;
        let p = listen_pair(&req(true, None, None), "gateway", https, http).unwrap();
        assert_eq!(
            p,
            Some(ListenPair {
                first: Some(https),
                second: Some(http)
            })
        );
        let p = listen_pair(
            &req(true, Some("8443"), Some("off")),
            "gateway",
            https,
            http,
        )
        .unwrap()
        .unwrap();
        assert_eq!(p.first, Some("0.0.0.0:8443".parse().unwrap()));
        assert_eq!(p.second, None);
        let p = listen_pair(
            &req(true, Some("192.0.2.1:443"), None),
            "gateway",
            https,
            http,
        )
        .unwrap()
        .unwrap();
        assert_eq!(p.first, Some("192.0.2.1:443".parse().unwrap()));
        assert_eq!(
            listen_pair(&req(false, Some("junk"), None), "gateway", https, http).unwrap(),
            None
        );
        let e = listen_pair(&req(true, Some("junk"), None), "gateway", https, http).unwrap_err();
        assert_eq!(e.status, 400);
        assert!(
            e.message.contains("is not a listen address"),
            "{}",
            e.message
        );
        let e =
            listen_pair(&req(true, Some("off"), Some("OFF")), "gateway", https, http).unwrap_err();
        assert!(
            e.message.contains("meshctl gateway disable"),
            "{}",
            e.message
        );
    }

    #[test]
    fn a_proxy_open_to_the_network_needs_allow_public() {
        let (p, public) = proxy_pair(&req(true, None, None)).unwrap();
        assert!(p.is_some() && public.is_empty());
        let e = proxy_pair(&req(true, Some("0.0.0.0:1080"), None)).unwrap_err();
        assert!(e.message.contains("--allow-public"), "{}", e.message);
        let mut r = req(true, Some("0.0.0.0:1080"), None);
        r.allow_public = true;
        let (_, public) = proxy_pair(&r).unwrap();
        assert_eq!(public, vec!["0.0.0.0:1080".parse().unwrap()]);
    }

    #[test]
    fn exposed_hostnames_are_normalized_and_checked() {
        let r = |h: &str, to: Option<&str>| ExposeRequest {
            hostname: h.into(),
            to: to.map(|t| t.parse().unwrap()),
            ..Default::default()
        };
        let e = exposure(&r(" App.Example.COM. ", Some("127.0.0.1:8080"))).unwrap();
        assert_eq!(e.hostname, "app.example.com");
        assert_eq!(
            exposure(&r("*.example.com", Some("127.0.0.1:1")))
                .unwrap()
                .hostname,
            "*.example.com"
        );
        assert!(exposure(&r("bad_name", Some("127.0.0.1:1")))
            .unwrap_err()
            .message
            .contains("not a valid DNS name"));
        assert!(exposure(&r("a.example.com", None))
            .unwrap_err()
            .message
            .contains("--to"));
    }
}
