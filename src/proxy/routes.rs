//! What the gateway and the proxy need to know about the mesh, as one immutable snapshot the
//! node's main loop publishes on every change ([`MeshView`]). Pure lookups.

use crate::id::MeshRange;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    pub ip: Ipv4Addr,
    /// Heard in gossip (not declared offline).
    pub live: bool,
    /// Announces that it serves as an exit node.
    pub exit: bool,
}

/// One node exposing one hostname (or wildcard pattern).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRoute {
    pub pattern: String,
    pub node: String,
    pub ip: Ipv4Addr,
    pub live: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MeshView {
    pub domain: String,
    pub range: Option<MeshRange>,
    /// By DNS name.
    pub nodes: HashMap<String, NodeView>,
    /// Service name -> live providers: (node name, the service's address on it).
    pub services: HashMap<String, Vec<(String, Ipv4Addr)>>,
    pub hostnames: Vec<HostRoute>,
    /// `NAME.NODE` -> a live member's workload (namespace or container), as mesh DNS answers.
    pub workloads: HashMap<String, Ipv4Addr>,
}

/// Whether `pattern` (`name` or `*.name`) covers `host`. A wildcard covers exactly one more
/// label, as in TLS certificates.
pub fn matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(suffix) => host
            .split_once('.')
            .is_some_and(|(first, rest)| !first.is_empty() && rest == suffix),
        None => pattern == host,
    }
}

impl MeshView {
    /// Serving nodes for `host`, best first: exact live, wildcard live, then the rest (a node
    /// declared offline a moment ago may be back).
    pub fn route(&self, host: &str) -> Vec<&HostRoute> {
        let rank = |r: &HostRoute| match (r.pattern.starts_with("*."), r.live) {
            (false, true) => 0,
            (true, true) => 1,
            (false, false) => 2,
            (true, false) => 3,
        };
        let mut v: Vec<&HostRoute> = self
            .hostnames
            .iter()
            .filter(|r| matches(&r.pattern, host))
            .collect();
        v.sort_by_key(|r| rank(r));
        v
    }

    /// A mesh name or address to an address: `NODE`, `NODE.<domain>`, `NAME.svc.<domain>` (a live
    /// provider), `NAME.NODE.<domain>` (a workload), an IP in the mesh range. `None` if it is
    /// not in the mesh.
    pub fn resolve(&self, name: &str) -> Option<Ipv4Addr> {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if let Ok(ip) = name.parse::<IpAddr>() {
            return match ip {
                IpAddr::V4(v4) if self.range.is_some_and(|r| r.contains(v4)) => Some(v4),
                _ => None,
            };
        }
        let local = match name.strip_suffix(&format!(".{}", self.domain)) {
            Some(l) => l.to_string(),
            None if !name.contains('.') => name.clone(),
            None => return None,
        };
        if let Some(inner) = local.strip_suffix(".svc") {
            return match inner.split_once('.') {
                // NODE.NAME.svc: that node's instance, at the address it publishes (as DNS
                // answers it), if that node provides the service.
                Some((node, service)) => self
                    .services
                    .get(service)
                    .and_then(|v| v.iter().find(|(n, _)| n == node))
                    .map(|(_, ip)| *ip),
                // NAME.svc: a live provider.
                None => self
                    .services
                    .get(inner)
                    .and_then(|v| v.first())
                    .map(|(_, ip)| *ip),
            };
        }
        match self.nodes.get(&local) {
            Some(n) => Some(n.ip),
            None => self.workloads.get(&local).copied(),
        }
    }

    /// Whether `ip` is a member node's own address (its `.1`), not just any address in a
    /// member's /24 (its workloads).
    pub fn is_node_address(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.nodes.values().any(|n| IpAddr::V4(n.ip) == ip)
    }

    pub fn node(&self, name: &str) -> Option<&NodeView> {
        let name = name.to_ascii_lowercase();
        let short = name
            .strip_suffix(&format!(".{}", self.domain))
            .unwrap_or(&name);
        self.nodes.get(short)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view() -> MeshView {
        let mut v = MeshView {
            domain: "mesh.internal".into(),
            range: Some("10.210.0.0/16".parse().unwrap()),
            ..Default::default()
        };
        v.nodes.insert(
            "db1".into(),
            NodeView {
                ip: Ipv4Addr::new(10, 210, 4, 1),
                live: true,
                exit: false,
            },
        );
        v.nodes.insert(
            "gw".into(),
            NodeView {
                ip: Ipv4Addr::new(10, 210, 5, 1),
                live: true,
                exit: true,
            },
        );
        v.services.insert(
            "api".into(),
            vec![("db1".into(), Ipv4Addr::new(10, 210, 4, 7))],
        );
        for (p, n, ip, live) in [
            ("app.example.com", "a", 1, false),
            ("app.example.com", "b", 2, true),
            ("*.example.com", "c", 3, true),
        ] {
            v.hostnames.push(HostRoute {
                pattern: p.into(),
                node: n.into(),
                ip: Ipv4Addr::new(10, 210, ip, 1),
                live,
            });
        }
        v
    }

    #[test]
    fn exact_names_before_wildcards_live_before_offline() {
        let v = view();
        let r: Vec<&str> = v
            .route("app.example.com")
            .iter()
            .map(|r| r.node.as_str())
            .collect();
        assert_eq!(r, vec!["b", "c", "a"]);
        let r: Vec<&str> = v
            .route("other.example.com")
            .iter()
            .map(|r| r.node.as_str())
            .collect();
        assert_eq!(r, vec!["c"]);
        assert!(
            v.route("a.b.example.com").is_empty(),
            "a wildcard covers one label"
        );
        assert!(v.route("example.com").is_empty());
    }

    #[test]
    fn resolves_mesh_names_only() {
        let mut v = view();
        assert_eq!(v.resolve("db1"), Some(Ipv4Addr::new(10, 210, 4, 1)));
        assert_eq!(
            v.resolve("DB1.mesh.internal."),
            Some(Ipv4Addr::new(10, 210, 4, 1))
        );
        assert_eq!(
            v.resolve("api.svc.mesh.internal"),
            Some(Ipv4Addr::new(10, 210, 4, 7))
        );
        // A node's instance is at the address it publishes for the service, like in DNS; a node
        // that does not provide the service has no instance.
        assert_eq!(
            v.resolve("db1.api.svc.mesh.internal"),
            Some(Ipv4Addr::new(10, 210, 4, 7))
        );
        assert_eq!(v.resolve("gw.api.svc.mesh.internal"), None);
        // Workloads: NAME.NODE.<domain>.
        v.workloads
            .insert("web.db1".into(), Ipv4Addr::new(10, 210, 4, 2));
        assert_eq!(
            v.resolve("WEB.db1.mesh.internal."),
            Some(Ipv4Addr::new(10, 210, 4, 2))
        );
        assert_eq!(v.resolve("web.gw.mesh.internal"), None);
        assert_eq!(v.resolve("10.210.9.9"), Some(Ipv4Addr::new(10, 210, 9, 9)));
        assert_eq!(v.resolve("192.0.2.1"), None);
        assert_eq!(v.resolve("example.com"), None);
        assert_eq!(v.resolve("nobody"), None);
        assert!(v.node("gw.mesh.internal").unwrap().exit);
        assert!(v.is_node_address("10.210.4.1".parse().unwrap()));
        assert!(v.is_node_address("::ffff:10.210.5.1".parse().unwrap()));
        assert!(
            !v.is_node_address("10.210.4.7".parse().unwrap()),
            "a workload of db1"
        );
    }
}
