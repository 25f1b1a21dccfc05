//! The machine's own addresses (getifaddrs), for the endpoints a node publishes.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// One address of a network interface.
pub struct IfAddr {
    pub ifname: String,
    pub up: bool,
    pub loopback: bool,
    pub ip: IpAddr,
}

/// Every IPv4 and IPv6 address on the machine's interfaces (getifaddrs).
pub fn interface_addresses() -> Vec<IfAddr> {
    let mut out = Vec::new();
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a linked list we walk read-only and free once.
    unsafe {
        if libc::getifaddrs(&mut ifap) != 0 {
            return out;
        }
        let mut cur = ifap;
        while !cur.is_null() {
            let ifa = &*cur;
            cur = ifa.ifa_next;
            if ifa.ifa_addr.is_null() {
                continue;
            }
            let ip = match (*ifa.ifa_addr).sa_family as i32 {
                libc::AF_INET => {
                    let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                    IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)))
                }
                libc::AF_INET6 => {
                    let sin6 = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                    IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr))
                }
                _ => continue,
            };
            out.push(IfAddr {
                ifname: std::ffi::CStr::from_ptr(ifa.ifa_name)
                    .to_string_lossy()
                    .into_owned(),
                up: ifa.ifa_flags & libc::IFF_UP as u32 != 0,
                loopback: ifa.ifa_flags & libc::IFF_LOOPBACK as u32 != 0,
                ip,
            });
        }
        libc::freeifaddrs(ifap);
    }
    out
}

/// The machine's addresses other nodes may reach it on: up, non-loopback, not link-local, not
/// inside the mesh range, not on `skip_if`. IPv4 first.
pub fn local_addresses(skip_if: &str, mesh: &crate::id::MeshRange) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = Vec::new();
    for a in interface_addresses() {
        if !a.up || a.loopback || a.ifname == skip_if || out.contains(&a.ip) {
            continue;
        }
        let usable = match a.ip {
            IpAddr::V4(ip) => !ip.is_link_local() && !ip.is_loopback() && !mesh.contains(ip),
            IpAddr::V6(ip) => !ip.is_unicast_link_local() && !ip.is_loopback(),
        };
        if usable {
            out.push(a.ip);
        }
    }
    out.sort_by_key(|ip| ip.is_ipv6());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_addresses_exclude_loopback_and_mesh() {
        let mesh: crate::id::MeshRange = "10.210.0.0/16".parse().unwrap();
        for a in local_addresses("mesh0", &mesh) {
            assert!(!a.is_loopback());
            if let IpAddr::V4(v4) = a {
                assert!(!mesh.contains(v4));
            }
        }
    }
}
