//! Network namespaces as "machines" on one host, for `meshd demo` and the end-to-end tests.
//!
//! Namespaces are made the way iproute2 makes them (`ip netns add`): a bind mount of a
//! namespace file under `/run/netns`, so `ip netns exec` works on them too. Links and addresses
//! are set through netlink and pings use a raw ICMP socket, so nothing here needs `ip` or `ping`.
//!
//! ```text
//!   [prefix-1]        [prefix-2]        [prefix-N]      one namespace per machine
//!     eth0 .1           eth0 .2           eth0 .N       198.51.100.0/24 (TEST-NET-2)
//!       |                 |                 |
//!     h1 ------------- h2 --- br0 ----------- hN        [prefix-hub]: a bridge
//! ```

use crate::mesh::linux::NetConfig;
use std::ffi::CString;
use std::fs::File;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const RUN_DIR: &str = "/run/netns";

/// Serialises namespace creation in this process (the /run/netns mount setup is not atomic).
static CREATE: Mutex<()> = Mutex::new(());

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_encoded_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

fn check(rc: libc::c_int, what: &str) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        let e = io::Error::last_os_error();
        Err(io::Error::new(e.kind(), format!("{what}: {e}")))
    }
}

/// Make /run/netns a shared mount point, as iproute2 does, so namespace mounts propagate to the
/// mount namespaces `ip netns exec` creates.
fn prepare_run_dir() -> io::Result<()> {
    std::fs::create_dir_all(RUN_DIR)?;
    let dir = cstr(Path::new(RUN_DIR))?;
    let none = CString::new("none").unwrap();
    let empty = CString::new("").unwrap();
    let mut bound = false;
    loop {
        // SAFETY: plain mount(2) calls with valid C strings.
        let rc = unsafe {
            libc::mount(
                empty.as_ptr(),
                dir.as_ptr(),
                none.as_ptr(),
                libc::MS_SHARED | libc::MS_REC,
                std::ptr::null(),
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINVAL) || bound {
            return Err(io::Error::new(
                e.kind(),
                format!("making {RUN_DIR} shared: {e}"),
            ));
        }
        // SAFETY: as above.
        check(
            unsafe {
                libc::mount(
                    dir.as_ptr(),
                    dir.as_ptr(),
                    none.as_ptr(),
                    libc::MS_BIND | libc::MS_REC,
                    std::ptr::null(),
                )
            },
            "bind-mounting /run/netns",
        )?;
        bound = true;
    }
}

/// A named network namespace. Dropping an owned one deletes it (after killing what runs in it).
#[derive(Debug)]
pub struct Netns {
    name: String,
    path: PathBuf,
    owned: bool,
}

impl Netns {
    /// Create a namespace (fails if it exists). Needs root.
    pub fn create(name: &str) -> io::Result<Netns> {
        let _g = CREATE.lock().unwrap_or_else(|e| e.into_inner());
        prepare_run_dir()?;
        let path = Path::new(RUN_DIR).join(name);
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| io::Error::new(e.kind(), format!("creating {}: {e}", path.display())))?;
        let target = cstr(&path)?;
        let made = std::thread::spawn(move || -> io::Result<()> {
            // SAFETY: unshare affects only this short-lived thread; the bind mount keeps the new
            // namespace alive after the thread exits.
            unsafe {
                check(libc::unshare(libc::CLONE_NEWNET), "unshare(CLONE_NEWNET)")?;
                let tid = libc::syscall(libc::SYS_gettid);
                let src = CString::new(format!("/proc/self/task/{tid}/ns/net")).unwrap();
                let none = CString::new("none").unwrap();
                check(
                    libc::mount(
                        src.as_ptr(),
                        target.as_ptr(),
                        none.as_ptr(),
                        libc::MS_BIND,
                        std::ptr::null(),
                    ),
                    "bind-mounting the namespace",
                )
            }
        })
        .join()
        .map_err(|_| io::Error::other("namespace thread panicked"))?;
        if let Err(e) = made {
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        let ns = Netns {
            name: name.to_string(),
            path,
            owned: true,
        };
        // Bring loopback up: processes expect it.
        ns.run_async(|| async {
            let nl = Netlink::new()?;
            nl.set_up_named("lo").await
        })
        .map_err(|e| io::Error::other(format!("{e:#}")))?;
        Ok(ns)
    }

    /// An existing namespace, not deleted on drop.
    pub fn open(name: &str) -> io::Result<Netns> {
        let path = Path::new(RUN_DIR).join(name);
        File::open(&path)?;
        Ok(Netns {
            name: name.to_string(),
            path,
            owned: false,
        })
    }

    /// Names of the namespaces under /run/netns starting with `prefix`.
    pub fn list(prefix: &str) -> Vec<String> {
        let Ok(rd) = std::fs::read_dir(RUN_DIR) else {
            return Vec::new();
        };
        let mut v: Vec<String> = rd
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with(prefix))
            .collect();
        v.sort();
        v
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn open_fd(&self) -> io::Result<File> {
        File::open(&self.path)
    }

    /// Processes whose network namespace is this one.
    pub fn pids(&self) -> Vec<i32> {
        let Ok(meta) = std::fs::metadata(&self.path) else {
            return Vec::new();
        };
        let (dev, ino) = (meta.dev(), meta.ino());
        let Ok(rd) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| {
                std::fs::metadata(format!("/proc/{pid}/ns/net"))
                    .map(|m| m.dev() == dev && m.ino() == ino)
                    .unwrap_or(false)
            })
            .collect()
    }

    /// Kill every process in the namespace and remove it.
    pub fn delete(&self) -> io::Result<()> {
        for pid in self.pids() {
            // SAFETY: kill(2) on a pid we found in this namespace.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.pids().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let p = cstr(&self.path)?;
        // SAFETY: umount2/unlink of our own namespace file.
        unsafe {
            libc::umount2(p.as_ptr(), libc::MNT_DETACH);
        }
        match std::fs::remove_file(&self.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Run `f` on a thread inside the namespace.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> io::Result<T> {
        let file = self.open_fd()?;
        std::thread::spawn(move || -> io::Result<T> {
            // SAFETY: setns on this dedicated thread only.
            check(
                unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) },
                "setns",
            )?;
            Ok(f())
        })
        .join()
        .map_err(|_| io::Error::other("namespace thread panicked"))?
    }

    /// Start a long-lived thread inside the namespace (a test server, say).
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> io::Result<std::thread::JoinHandle<io::Result<T>>> {
        let file = self.open_fd()?;
        Ok(std::thread::spawn(move || -> io::Result<T> {
            // SAFETY: setns on this dedicated thread only.
            check(
                unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) },
                "setns",
            )?;
            Ok(f())
        }))
    }

    /// Run an async closure on a current-thread runtime inside the namespace.
    pub fn run_async<T, F, Fut>(&self, f: F) -> anyhow::Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = anyhow::Result<T>>,
    {
        self.run(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(f())
        })?
    }

    /// A command that will run inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new(program);
        let fd: Option<RawFd> = self.open_fd().ok().map(|f| {
            let fd = f.as_raw_fd();
            std::mem::forget(f); // kept open for the child; closed on exec (O_CLOEXEC)
            fd
        });
        // SAFETY: only async-signal-safe calls (setns) between fork and exec.
        unsafe {
            c.pre_exec(move || {
                let fd =
                    fd.ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "namespace is gone"))?;
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if self.owned {
            let _ = self.delete();
        }
    }
}

/// Netlink inside a namespace thread: the data plane's [`NetConfig`] plus bridges and veths.
pub struct Netlink(NetConfig);

impl std::ops::Deref for Netlink {
    type Target = NetConfig;
    fn deref(&self) -> &NetConfig {
        &self.0
    }
}

impl Netlink {
    pub fn new() -> anyhow::Result<Netlink> {
        Ok(Netlink(NetConfig::new()?))
    }

    pub async fn set_up_named(&self, name: &str) -> anyhow::Result<()> {
        let i = self.index(name).await?;
        Ok(self.set_up(i).await?)
    }

    pub async fn add_bridge(&self, name: &str) -> anyhow::Result<()> {
        self.handle()
            .link()
            .add(rtnetlink::LinkBridge::new(name).build())
            .execute()
            .await?;
        self.set_up_named(name).await
    }

    /// A veth pair whose `peer` end moves into `into` (a namespace file descriptor); `local`
    /// stays here, attached to `bridge` and up.
    pub async fn add_veth_into(
        &self,
        local: &str,
        peer: &str,
        bridge: &str,
        into: RawFd,
    ) -> anyhow::Result<()> {
        let h = self.handle();
        h.link()
            .add(rtnetlink::LinkVeth::new(local, peer).build())
            .execute()
            .await?;
        let p = self.index(peer).await?;
        h.link()
            .set(
                rtnetlink::LinkUnspec::new_with_index(p)
                    .setns_by_fd(into)
                    .build(),
            )
            .execute()
            .await?;
        let l = self.index(local).await?;
        let b = self.index(bridge).await?;
        h.link()
            .set(
                rtnetlink::LinkUnspec::new_with_index(l)
                    .controller(b)
                    .up()
                    .build(),
            )
            .execute()
            .await?;
        Ok(())
    }

    pub async fn rename(&self, from: &str, to: &str) -> anyhow::Result<()> {
        let i = self.index(from).await?;
        self.handle()
            .link()
            .set(
                rtnetlink::LinkUnspec::new_with_index(i)
                    .name(to.to_string())
                    .build(),
            )
            .execute()
            .await?;
        Ok(())
    }

    pub async fn add_address_named(
        &self,
        name: &str,
        addr: Ipv4Addr,
        prefix: u8,
    ) -> anyhow::Result<()> {
        let i = self.index(name).await?;
        Ok(self.add_address(i, addr, prefix).await?)
    }
}

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
            nl.add_bridge("br0").await
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
            nl.add_veth_into(&local, &peer2, "br0", fd).await
        })?;
        drop(target);
        ns.run_async(move || async move {
            let nl = Netlink::new()?;
            nl.rename(&peer, "eth0").await?;
            nl.add_address_named("eth0", addr, 24).await?;
            nl.set_up_named("eth0").await
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
