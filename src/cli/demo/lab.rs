//! Network namespaces as "machines" on one host, for `meshd demo` and the end-to-end tests.
//!
//! Namespaces are [`Netns`] (made the way `ip netns add` makes them, so `ip netns exec` works on
//! them too). Links and addresses are set through netlink and pings use a raw ICMP socket, so
//! nothing here needs `ip` or `ping`.
//!
//! ```text
//!   [prefix-1]        [prefix-2]        [prefix-N]      one namespace per machine
//!     eth0 .1           eth0 .2           eth0 .N       198.51.100.0/24 (TEST-NET-2)
//!       |                 |                 |
//!     h1 ------------- h2 --- br0 ----------- hN        [prefix-hub]: a bridge
//! ```

pub use crate::mesh::linux::netns::Netns;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

/// Netlink inside a namespace thread.
pub use crate::mesh::linux::NetConfig as Netlink;

/// A machine on the LAN.
#[derive(Debug)]
pub struct Host {
    pub ns: Netns,
    pub addr: Ipv4Addr,
}

/// Several namespaces on one bridge.
#[derive(Debug)]
pub struct Lan {
    /// Hosts first, so they are removed before the hub when dropped.
    pub hosts: Vec<Host>,
    pub hub: Netns,
    prefix: String,
    base: Ipv4Addr,
}

impl Lan {
    /// `prefix-hub` with a bridge, and `n` hosts `prefix-1..n` at `base+1..n`/24.
    pub fn create(prefix: &str, n: usize, base: Ipv4Addr) -> anyhow::Result<Lan> {
        let hub = Netns::create(&format!("{prefix}-hub"))?;
        hub.run_async(|| async {
            let nl = Netlink::new()?;
            Ok(nl.add_bridge("br0").await?)
        })?;
        let mut lan = Lan {
            hosts: Vec::new(),
            hub,
            prefix: prefix.to_string(),
            base,
        };
        for _ in 0..n {
            lan.add_host()?;
        }
        Ok(lan)
    }

    /// Add one more host to the bridge; returns its index.
    pub fn add_host(&mut self) -> anyhow::Result<usize> {
        let i = self.hosts.len() + 1;
        make_room_for_neighbours(i);
        let ns = Netns::create(&format!("{}-{i}", self.prefix))?;
        let addr = Ipv4Addr::from(u32::from(self.base) + i as u32);
        let target = ns.open_fd()?;
        let fd = target.as_raw_fd();
        let (local, peer) = (format!("h{i}"), format!("p{i}"));
        let peer2 = peer.clone();
        self.hub.run_async(move || async move {
            let nl = Netlink::new()?;
            Ok(nl.add_veth_into((&local, &peer2), None, "br0", fd).await?)
        })?;
        drop(target);
        ns.run_async(move || async move {
            let nl = Netlink::new()?;
            nl.rename(&peer, "eth0").await?;
            nl.add_address_named("eth0", addr, 24).await?;
            Ok(nl.set_up_named("eth0").await?)
        })?;
        self.hosts.push(Host { ns, addr });
        Ok(i - 1)
    }
}

/// The kernel has one ARP table for all network namespaces, and drops packets to a new
/// neighbour once it holds `gc_thresh3` entries (1024 by default): "neighbor table overflow",
/// `NEIGH_CREATEFAIL` drops. Every host of a LAN of `n` learns up to `n` neighbours, so a lab
/// of more than about 30 hosts overflows the default, although each real machine of such a
/// fleet would hold only its own `n`. Raise the limits (never lower them) to fit `n * n`.
fn make_room_for_neighbours(n: usize) {
    let need = n * n + 256;
    for (knob, want) in [("gc_thresh3", 2 * need), ("gc_thresh2", need)] {
        for family in ["ipv4", "ipv6"] {
            let path = format!("/proc/sys/net/{family}/neigh/default/{knob}");
            let now: usize = std::fs::read_to_string(&path)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(usize::MAX);
            if now < want {
                let _ = std::fs::write(&path, want.to_string());
            }
        }
    }
}

/// One ICMP echo from inside `ns` to `dst`. Returns the round-trip time.
pub fn ping(ns: &Netns, dst: Ipv4Addr, timeout: Duration) -> io::Result<Duration> {
    ping_all(ns, &[dst], timeout)?
        .pop()
        .flatten()
        .ok_or_else(|| io::Error::new(io::ErrorKind::TimedOut, format!("no echo reply from {dst}")))
}

/// One ICMP echo from inside `ns` to each of `targets`, all at once: the round-trip time of
/// each that answered within `timeout`.
pub fn ping_all(
    ns: &Netns,
    targets: &[Ipv4Addr],
    timeout: Duration,
) -> io::Result<Vec<Option<Duration>>> {
    let targets = targets.to_vec();
    ns.run(move || echo_all(&targets, timeout))?
}

fn echo_all(targets: &[Ipv4Addr], timeout: Duration) -> io::Result<Vec<Option<Duration>>> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4))?;
    let id =
        (std::process::id() as u16) ^ (rand_core::RngCore::next_u32(&mut rand_core::OsRng) as u16);
    let start = Instant::now();
    for (seq, dst) in targets.iter().enumerate() {
        let mut pkt = vec![8u8, 0, 0, 0];
        pkt.extend_from_slice(&id.to_be_bytes());
        pkt.extend_from_slice(&(seq as u16).to_be_bytes());
        pkt.extend_from_slice(b"meshd-ping-payload");
        let c = crate::mesh::packet::checksum(&pkt);
        pkt[2..4].copy_from_slice(&c.to_be_bytes());
        // A full socket buffer or an unroutable target is an unanswered echo, not an error.
        let _ = s.send_to(&pkt, &std::net::SocketAddr::from((*dst, 0)).into());
    }
    let mut rtt = vec![None; targets.len()];
    let mut left_to_answer = targets.len();
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 1500];
    while left_to_answer > 0 {
        let left = timeout.saturating_sub(start.elapsed());
        if left.is_zero() {
            break;
        }
        s.set_read_timeout(Some(left))?;
        let n = match s.recv(&mut buf) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(e) => return Err(e),
        };
        // SAFETY: recv initialised the first n bytes.
        let d: Vec<u8> = buf[..n]
            .iter()
            .map(|b| unsafe { b.assume_init() })
            .collect();
        let ihl = ((d.first().copied().unwrap_or(0) & 0x0f) as usize) * 4;
        if d.len() < ihl + 8 {
            continue;
        }
        let src = Ipv4Addr::new(d[12], d[13], d[14], d[15]);
        let icmp = &d[ihl..];
        let seq = u16::from_be_bytes([icmp[6], icmp[7]]) as usize;
        if icmp[0] == 0
            && icmp[4..6] == id.to_be_bytes()
            && targets.get(seq) == Some(&src)
            && rtt[seq].is_none()
        {
            rtt[seq] = Some(start.elapsed());
            left_to_answer -= 1;
        }
    }
    Ok(rtt)
}
