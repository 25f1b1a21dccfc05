//! The kernel TUN device (tun-rs), with TCP segmentation offload where the kernel has it.

use super::wait::Waiter;
use super::NetError;
use crate::mesh::io::{TunIo, TUN_HEADROOM};
use std::io;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};
use tracing::info;
use tun_rs::VIRTIO_NET_HDR_LEN;

/// The kernel TUN device, with TCP segmentation offload when the kernel supports it: the
/// kernel hands over up to 64 KiB of one TCP flow per read and takes coalesced segments back.
/// Non-blocking; the data plane's threads wait for it in `poll`.
pub struct LinuxTun {
    dev: tun_rs::SyncDevice,
    pub name: String,
    pub index: u32,
    waiter: Waiter,
    /// Whether packets to and from the kernel carry a virtio-net header.
    offload: bool,
}

/// What one writing thread keeps: the offload coalescing table, while traffic is heavy. tun-rs
/// preallocates slots for 128 flows (about 1.7 MB, half of it touched by the allocator), which
/// an idle node, writing a few packets at a time, does not need: the table is made for the
/// first batch of [`GRO_MIN_BATCH`] packets and given back after [`GRO_IDLE`] without one.
#[derive(Default)]
pub struct TunWriter {
    gro: Option<(tun_rs::GROTable, Instant)>,
}

/// Batches smaller than this are written a packet at a time: coalescing would save a few
/// system calls at rates where they do not matter.
const GRO_MIN_BATCH: usize = 8;
/// How long the coalescing table outlives the last batch that used it.
const GRO_IDLE: Duration = Duration::from_secs(30);

impl LinuxTun {
    /// Create the TUN device `name`. It disappears when this process exits, however it exits.
    pub fn create(name: &str) -> Result<LinuxTun, NetError> {
        let build = |offload: bool| {
            tun_rs::DeviceBuilder::new()
                .name(name)
                .offload(offload)
                .build_sync()
        };
        let hint = |e: &io::Error| match e.raw_os_error() {
            Some(libc::EBUSY) => format!(
                "an interface named {name} is already in use (another meshd or VPN?); \
                 stop it or pick another name with --tun"
            ),
            Some(libc::EPERM) | Some(libc::EACCES) => {
                "meshd needs root (or CAP_NET_ADMIN) to create a TUN device".to_string()
            }
            Some(libc::ENOENT) | Some(libc::ENODEV) => {
                "/dev/net/tun is missing: load the tun module (modprobe tun)".to_string()
            }
            _ => "check that /dev/net/tun exists and meshd runs as root".to_string(),
        };
        let fatal = |e: &io::Error| {
            matches!(
                e.raw_os_error(),
                Some(libc::EBUSY)
                    | Some(libc::EPERM)
                    | Some(libc::EACCES)
                    | Some(libc::ENOENT)
                    | Some(libc::ENODEV)
            )
        };
        let dev = match build(true) {
            Ok(d) => d,
            // Kernels (or sandboxes) without TUN offload: carry on without it, more slowly.
            Err(e) if !fatal(&e) => {
                info!(error = %e, "TUN offload unavailable; continuing without it");
                build(false).map_err(|e| NetError::Tun {
                    name: name.to_string(),
                    hint: hint(&e),
                    error: e,
                })?
            }
            Err(e) => {
                return Err(NetError::Tun {
                    name: name.to_string(),
                    hint: hint(&e),
                    error: e,
                })
            }
        };
        let index = dev
            .if_index()
            .map_err(|e| NetError::io(format!("cannot read the index of {name}"), e))?;
        dev.set_nonblocking(true)
            .map_err(|e| NetError::io(format!("cannot make {name} non-blocking"), e))?;
        let waiter = Waiter::new().map_err(|e| NetError::io("creating an eventfd", e))?;
        let offload = dev.tcp_gso();
        Ok(LinuxTun {
            dev,
            name: name.to_string(),
            index,
            waiter,
            offload,
        })
    }
}

impl TunIo for LinuxTun {
    type Writer = TunWriter;

    fn writer(&self) -> TunWriter {
        TunWriter::default()
    }

    fn wait_readable(&self) -> io::Result<()> {
        self.waiter.readable(self.dev.as_raw_fd())
    }

    fn try_recv_batch(
        &self,
        scratch: &mut [u8],
        bufs: &mut [Vec<u8>],
        sizes: &mut [usize],
    ) -> io::Result<usize> {
        self.dev.recv_multiple(scratch, bufs, sizes, 0)
    }

    fn send_batch(&self, w: &mut TunWriter, bufs: &mut [Vec<u8>]) -> io::Result<()> {
        if bufs.len() >= GRO_MIN_BATCH {
            let now = Instant::now();
            let (gro, used) = w.gro.get_or_insert_with(|| (tun_rs::GROTable::new(), now));
            *used = now;
            return self.dev.send_multiple(gro, bufs, TUN_HEADROOM).map(|_| ());
        }
        if w.gro
            .as_ref()
            .is_some_and(|(_, used)| used.elapsed() > GRO_IDLE)
        {
            w.gro = None;
        }
        // A packet at a time, each behind an empty virtio-net header (no offload asked: what
        // the coalescing path writes for a packet it leaves alone). Every packet is tried.
        let mut result = Ok(());
        for buf in bufs.iter_mut() {
            let start = if self.offload {
                buf[TUN_HEADROOM - VIRTIO_NET_HDR_LEN..TUN_HEADROOM].fill(0);
                TUN_HEADROOM - VIRTIO_NET_HDR_LEN
            } else {
                TUN_HEADROOM
            };
            if let Err(e) = self.dev.send(&buf[start..]) {
                result = Err(e);
            }
        }
        result
    }

    fn wake(&self) {
        self.waiter.wake()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::linux::netns::Netns;
    use std::net::UdpSocket;

    /// An IPv4/UDP packet 192.0.2.2:`sport` -> 192.0.2.1:7000 behind `TUN_HEADROOM` bytes of
    /// garbage (the writer owns the headroom: a header it forgets to write shows).
    fn udp_packet(sport: u16, payload: &[u8]) -> Vec<u8> {
        let total = 20 + 8 + payload.len();
        let mut p = vec![0xa5u8; TUN_HEADROOM];
        p.resize(TUN_HEADROOM + total, 0);
        let ip = &mut p[TUN_HEADROOM..];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        ip[8] = 64;
        ip[9] = 17;
        ip[12..16].copy_from_slice(&[192, 0, 2, 2]);
        ip[16..20].copy_from_slice(&[192, 0, 2, 1]);
        let sum = ip[..20]
            .chunks(2)
            .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
            .sum::<u32>();
        let sum = (sum & 0xffff) + (sum >> 16);
        ip[10..12].copy_from_slice(&(!((sum & 0xffff) + (sum >> 16)) as u16).to_be_bytes());
        ip[20..22].copy_from_slice(&sport.to_be_bytes());
        ip[22..24].copy_from_slice(&7000u16.to_be_bytes());
        ip[24..26].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        // UDP checksum 0: none, allowed over IPv4.
        ip[28..].copy_from_slice(payload);
        p
    }

    /// Packets written to the device reach a socket in its namespace, in order and unchanged,
    /// whether written one at a time (small batches) or through the coalescing table (a big
    /// batch of one flow); the table exists only after a big batch and goes after `GRO_IDLE`.
    #[test]
    fn writes_every_batch_size_and_gives_the_coalescing_table_back_when_idle() {
        let ns = Netns::create(&format!("mt{}-tunw", std::process::id())).unwrap();
        let setup = |args: &[&str]| {
            let st = ns.command("ip").args(args).status().unwrap();
            assert!(st.success(), "ip {args:?}");
        };
        let (tun, sock) = {
            let ns_tun = ns.run(|| LinuxTun::create("mtw0")).unwrap().unwrap();
            setup(&["addr", "add", "192.0.2.1/24", "dev", "mtw0"]);
            setup(&["link", "set", "mtw0", "up"]);
            let sock = ns
                .run(|| UdpSocket::bind("192.0.2.1:7000"))
                .unwrap()
                .unwrap();
            sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            (ns_tun, sock)
        };
        let mut w = tun.writer();
        let mut seq = 0u32;
        let mut send_and_check = |w: &mut TunWriter, n: usize| {
            let mut bufs: Vec<Vec<u8>> = (0..n)
                .map(|i| udp_packet(40000, &(seq + i as u32).to_be_bytes().repeat(100)))
                .collect();
            tun.send_batch(w, &mut bufs).unwrap();
            for _ in 0..n {
                let mut got = [0u8; 2048];
                let len = sock
                    .recv(&mut got)
                    .expect("a packet written to the TUN device");
                assert_eq!(&got[..len], &seq.to_be_bytes().repeat(100)[..]);
                seq += 1;
            }
        };
        send_and_check(&mut w, 1);
        send_and_check(&mut w, GRO_MIN_BATCH - 1);
        assert!(w.gro.is_none(), "small batches need no coalescing table");
        send_and_check(&mut w, 3 * GRO_MIN_BATCH);
        assert!(
            w.gro.is_some(),
            "a big batch goes through the coalescing table"
        );
        send_and_check(&mut w, 2);
        assert!(w.gro.is_some(), "kept while traffic was heavy a moment ago");
        w.gro.as_mut().unwrap().1 = Instant::now() - GRO_IDLE - Duration::from_secs(1);
        send_and_check(&mut w, 1);
        assert!(
            w.gro.is_none(),
            "given back after GRO_IDLE without a big batch"
        );
        // An idle thread's empty batch (a lane's) gives it back too.
        send_and_check(&mut w, GRO_MIN_BATCH);
        w.gro.as_mut().unwrap().1 = Instant::now() - GRO_IDLE - Duration::from_secs(1);
        tun.send_batch(&mut w, &mut []).unwrap();
        assert!(
            w.gro.is_none(),
            "an empty batch gives it back after GRO_IDLE"
        );
    }
}
