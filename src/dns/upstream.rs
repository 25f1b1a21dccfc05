//! Where names outside the mesh domain go: the resolvers the host itself uses, never meshd.

use crate::id::MeshRange;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;

/// systemd-resolved's list of the real upstream servers (its stub at 127.0.0.53 is in
/// /etc/resolv.conf instead).
pub const RESOLVED_UPSTREAMS: &str = "/run/systemd/resolve/resolv.conf";
pub const RESOLV_CONF: &str = "/etc/resolv.conf";

/// `nameserver` lines of a resolv.conf.
pub fn parse_resolv_conf(text: &str) -> Vec<IpAddr> {
    text.lines()
        .filter_map(|l| {
            let l = l.split(['#', ';']).next()?.trim();
            let mut parts = l.split_whitespace();
            if parts.next()? != "nameserver" {
                return None;
            }
            let addr = parts.next()?;
            addr.split('%').next()?.parse().ok()
        })
        .collect()
}

/// Drop addresses that would bring queries back to the mesh (this node or any member): forwarding
/// must never loop. IPv6 link-local servers (`fe80::1%eth0`) are dropped too: the forwarder
/// addresses servers without an interface scope, so they cannot be reached.
pub fn usable(addrs: Vec<SocketAddr>, mesh: &MeshRange) -> Vec<SocketAddr> {
    addrs
        .into_iter()
        .filter(|a| match a.ip() {
            IpAddr::V4(v4) => !mesh.contains(v4),
            IpAddr::V6(v6) => {
                let link_local = v6.is_unicast_link_local();
                if link_local {
                    tracing::warn!(server = %v6, "skipping a link-local DNS server: meshd cannot forward to it; pass --dns-upstream");
                }
                !link_local
            }
        })
        .collect()
}

/// The upstreams: the configured ones, else systemd-resolved's upstreams, else /etc/resolv.conf.
pub fn discover(configured: &[SocketAddr], mesh: &MeshRange) -> Vec<SocketAddr> {
    if !configured.is_empty() {
        return usable(configured.to_vec(), mesh);
    }
    for f in [RESOLVED_UPSTREAMS, RESOLV_CONF] {
        if let Ok(t) = std::fs::read_to_string(Path::new(f)) {
            let found = usable(
                parse_resolv_conf(&t)
                    .into_iter()
                    .map(|ip| SocketAddr::new(ip, 53))
                    .collect(),
                mesh,
            );
            if !found.is_empty() {
                return found;
            }
        }
    }
    Vec::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_nameservers_and_never_loops_into_the_mesh() {
        let t = "# generated\nsearch example.com\nnameserver 192.0.2.53\nnameserver fe80::1%eth0 # ll\n\
                 nameserver 10.210.4.1\n ; nameserver 192.0.2.99\noptions edns0\n";
        let ips = parse_resolv_conf(t);
        assert_eq!(ips.len(), 3);
        let mesh: MeshRange = "10.210.0.0/16".parse().unwrap();
        let u = usable(
            ips.into_iter().map(|ip| SocketAddr::new(ip, 53)).collect(),
            &mesh,
        );
        assert_eq!(u, vec!["192.0.2.53:53".parse().unwrap()]);
        let v6: Vec<SocketAddr> = vec!["[2001:db8::53]:53".parse().unwrap()];
        assert_eq!(
            usable(v6.clone(), &mesh),
            v6,
            "global IPv6 servers are kept"
        );
        assert_eq!(
            discover(&["192.0.2.1:5353".parse().unwrap()], &mesh),
            vec!["192.0.2.1:5353".parse().unwrap()]
        );
    }
}
