//! NAT routers for the lab, after `NAT-LAB.md`: a lab host on the bridge becomes a router (its
//! `eth0` is the WAN side, on the bridge) and other lab hosts move off the bridge onto a LAN
//! behind it, with one of the four RFC 4787 behaviours made with nftables.

use super::Lab;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NatKind {
    /// Endpoint-independent mapping and filtering: anyone may send to the mapped port.
    FullCone,
    /// Endpoint-independent mapping; only addresses the host sent to may send back (any port).
    AddressRestricted,
    /// Endpoint-independent mapping; only the exact address and port sent to (Linux default).
    PortRestricted,
    /// A new random public port per destination (cloud NAT gateways).
    Symmetric,
}

impl NatKind {
    pub const ALL: [NatKind; 4] = [
        NatKind::FullCone,
        NatKind::AddressRestricted,
        NatKind::PortRestricted,
        NatKind::Symmetric,
    ];

    pub fn short(self) -> &'static str {
        match self {
            NatKind::FullCone => "full-cone",
            NatKind::AddressRestricted => "addr-restricted",
            NatKind::PortRestricted => "port-restricted",
            NatKind::Symmetric => "symmetric",
        }
    }

    /// Whether two nodes behind these NATs can have a direct path (NAT-LAB.md's matrix).
    pub fn traversable(a: NatKind, b: NatKind) -> bool {
        use NatKind::*;
        !matches!(
            (a, b),
            (PortRestricted, Symmetric) | (Symmetric, PortRestricted) | (Symmetric, Symmetric)
        )
    }

    /// The nftables ruleset of a router whose WAN is `eth0`, LAN `lan0`, with `host` the one
    /// machine behind it (full cone and address-restricted forward to it).
    pub fn ruleset(self, host: &str) -> String {
        // Without this, a punch that reaches the router before its host sent anything is
        // recorded by conntrack and moves the host's later mapping (NAT-LAB.md).
        let mut r = String::from(
            "table ip filter {\n\
             \tchain input { type filter hook input priority filter; iifname \"eth0\" ct state new drop; }\n\
             }\n",
        );
        r.push_str("table ip nat {\n");
        match self {
            NatKind::Symmetric => r.push_str(
                "\tchain post { type nat hook postrouting priority srcnat; oifname \"eth0\" masquerade random; }\n",
            ),
            _ => r.push_str(
                "\tchain post { type nat hook postrouting priority srcnat; oifname \"eth0\" masquerade; }\n",
            ),
        }
        match self {
            NatKind::FullCone => r.push_str(&format!(
                "\tchain pre {{ type nat hook prerouting priority dstnat; iifname \"eth0\" meta l4proto udp dnat ip to {host}; }}\n"
            )),
            NatKind::AddressRestricted => r.push_str(&format!(
                "\tset peers {{ type ipv4_addr; flags dynamic,timeout; timeout 60s; }}\n\
                 \tchain track {{ type filter hook forward priority filter; iifname \"lan0\" update @peers {{ ip daddr }}; }}\n\
                 \tchain pre {{ type nat hook prerouting priority dstnat; iifname \"eth0\" ip saddr @peers meta l4proto udp dnat ip to {host}; }}\n"
            )),
            _ => {}
        }
        r.push_str("}\n");
        r
    }
}

impl Lab {
    /// Run a command in host `h`, failing the test with its stderr if it fails.
    pub fn must(&self, h: usize, program: &str, args: &[&str]) {
        let o = self.sh(h, program, args);
        assert!(
            o.status.success(),
            "{program} {args:?} in host {h}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }

    /// An nftables ruleset loaded in host `h`.
    pub fn nft(&self, h: usize, ruleset: &str) {
        let path = self
            .dir
            .path()
            .join(format!("nft-{h}-{}.conf", ruleset.len()));
        std::fs::write(&path, ruleset).unwrap();
        self.must(h, "nft", &["-f", path.to_str().unwrap()]);
    }

    /// Make host `router` a NAT of `kind` for the hosts `inside`, which leave the bridge for a
    /// LAN `192.0.2.{16 * lan}/28` behind it (router `.1`, hosts `.2`, `.3`, ...). Returns the
    /// hosts' LAN addresses.
    pub fn nat(&self, router: usize, kind: NatKind, lan: u8, inside: &[usize]) -> Vec<String> {
        let base = 16 * lan;
        let gw = format!("192.0.2.{}", base + 1);
        self.must(router, "sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
        self.must(router, "ip", &["link", "add", "lan0", "type", "bridge"]);
        self.must(
            router,
            "ip",
            &["addr", "add", &format!("{gw}/28"), "dev", "lan0"],
        );
        self.must(router, "ip", &["link", "set", "lan0", "up"]);
        let mut addrs = Vec::new();
        for (i, h) in inside.iter().enumerate() {
            let ns = self.ns(*h).name().to_string();
            let port = format!("lan{i}p");
            let addr = format!("192.0.2.{}", base + 2 + i as u8);
            self.must(*h, "ip", &["link", "del", "eth0"]);
            self.must(
                router,
                "ip",
                &[
                    "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns,
                ],
            );
            self.must(router, "ip", &["link", "set", &port, "master", "lan0"]);
            self.must(router, "ip", &["link", "set", &port, "up"]);
            self.must(
                *h,
                "ip",
                &["addr", "add", &format!("{addr}/28"), "dev", "eth0"],
            );
            self.must(*h, "ip", &["link", "set", "eth0", "up"]);
            self.must(*h, "ip", &["route", "add", "default", "via", &gw]);
            addrs.push(addr);
        }
        self.nft(router, &kind.ruleset(&addrs[0]));
        addrs
    }
}
