//! Public HTTPS by SNI through the mesh, and a SOCKS5/HTTP proxy into it.
//!
//! ```text
//!  client --TLS--> gateway node :443 --(mesh)--> serving node :SERVE_PORT --> workload 127.0.0.1:8443
//!                  reads SNI only      Handoff     exposed name -> ADDR:PORT, optional PROXY v2
//!
//!  app --SOCKS5/HTTP--> local proxy --(mesh)--> mesh address            (mesh names)
//!                                   --(mesh)--> exit node :EXIT_PORT --> anything it reaches
//! ```
//!
//! Protocol parsing is sans-IO ([`sni`], [`http_head`], [`socks5`], [`proxy_protocol`],
//! [`preamble`]); [`routes`] is the routing snapshot; [`dial`] is the one I/O edge the proxies
//! use, with an in-memory twin; the listeners are in [`gateway`], [`serve`], [`exit`] and
//! [`forward`].

pub mod dial;
pub mod exit;
pub mod forward;
pub mod gateway;
pub mod http_head;
pub mod listen;
pub mod preamble;
pub mod proxy_protocol;
pub mod routes;
pub mod serve;
pub mod sni;
pub mod socks5;
pub mod splice;

/// Where a serving node accepts gateway handoffs, on its mesh address.
pub const SERVE_PORT: u16 = 7947;
/// Where an exit node accepts proxied connections, on its mesh address.
pub const EXIT_PORT: u16 = 7948;

/// A valid DNS host name: labels of a-z, 0-9 and '-', 1-63 long, 253 in all, lowercase.
pub fn is_hostname(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(crate::util::is_dns_label)
}

/// A hostname or a wildcard `*.name` (a wildcard needs at least two more labels).
pub fn is_hostname_pattern(s: &str) -> bool {
    match s.strip_prefix("*.") {
        Some(rest) => is_hostname(rest) && rest.contains('.'),
        None => is_hostname(s),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostnames_and_patterns() {
        assert!(is_hostname("app.example.com"));
        assert!(is_hostname("localhost"));
        assert!(!is_hostname("App.example.com"));
        assert!(!is_hostname("a..b"));
        assert!(!is_hostname("-a.b"));
        assert!(!is_hostname("a_b.c"));
        assert!(is_hostname_pattern("*.example.com"));
        assert!(!is_hostname_pattern("*.com"));
        assert!(!is_hostname_pattern("a.*.com"));
        assert!(!is_hostname_pattern("*"));
    }
}
