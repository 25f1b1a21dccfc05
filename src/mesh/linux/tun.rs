//! The kernel TUN device (tun-rs), with TCP segmentation offload where the kernel has it.

use super::gro;
use super::wait::Waiter;
use super::NetError;
use crate::mesh::io::{TunIo, TUN_HEADROOM};
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use tracing::{info, warn};
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
    /// Whether runs of TCP segments are written coalesced: with offload, until the kernel
    /// refuses such a write as invalid (then every packet goes alone).
    coalesce: AtomicBool,
    /// Tests: the error number the next coalesced write fails with instead of being made.
    #[cfg(test)]
    refuse_next: std::sync::atomic::AtomicI32,
}

/// What one writing thread keeps between writes: the plan of its last batch (the groups of
/// packets written together), so planning allocates nothing.
#[derive(Default)]
pub struct TunWriter {
    groups: Vec<gro::Group>,
}

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
            // The name is taken by an interface that is no TUN device (eth0, a bridge).
            Some(libc::EINVAL) if std::path::Path::new("/sys/class/net").join(name).exists() => {
                format!(
                    "{name} is another kind of interface on this machine; pick a free name \
                     with --tun"
                )
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
            coalesce: AtomicBool::new(offload),
            #[cfg(test)]
            refuse_next: Default::default(),
        })
    }
}

impl LinuxTun {
    /// Write planned segments as one packet: the first one's headers made the coalesced
    /// packet's, then every payload after it, in one `writev` (nothing copied here). Returns
    /// the writes made. If the kernel refuses it, the first segment's headers are put back and
    /// every segment goes alone; refused as invalid, coalescing stops for good.
    fn write_coalesced(&self, g: &gro::Group, segs: &mut [Vec<u8>]) -> io::Result<usize> {
        debug_assert!((2..=gro::MAX_SEGMENTS).contains(&segs.len()));
        // The head's headers as they were (IP and TCP headers are at most 80 bytes).
        let mut saved = [0u8; 80];
        let kept = (segs[0].len() - TUN_HEADROOM).min(saved.len());
        saved[..kept].copy_from_slice(&segs[0][TUN_HEADROOM..TUN_HEADROOM + kept]);
        gro::finish(&mut segs[0], TUN_HEADROOM, g);
        let empty = libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        };
        let mut iov = [empty; gro::MAX_SEGMENTS];
        let head = &segs[0][TUN_HEADROOM - VIRTIO_NET_HDR_LEN..];
        iov[0] = libc::iovec {
            iov_base: head.as_ptr() as *mut libc::c_void,
            iov_len: head.len(),
        };
        for (v, b) in iov[1..].iter_mut().zip(&segs[1..]) {
            let data = &b[TUN_HEADROOM + g.hdr..];
            *v = libc::iovec {
                iov_base: data.as_ptr() as *mut libc::c_void,
                iov_len: data.len(),
            };
        }
        let count = segs.len().min(gro::MAX_SEGMENTS);
        let Err(e) = self.writev(&iov[..count]) else {
            return Ok(1);
        };
        if e.raw_os_error() == Some(libc::EINVAL) && self.coalesce.swap(false, Ordering::Relaxed) {
            warn!(error = %e, "the kernel refused a coalesced TCP packet; writing segments one at a time from now on");
        }
        segs[0][TUN_HEADROOM..TUN_HEADROOM + kept].copy_from_slice(&saved[..kept]);
        let mut result = Ok(segs.len());
        for b in segs.iter_mut() {
            if let Err(e) = self.write_one(b) {
                result = Err(e);
            }
        }
        result
    }

    /// One `writev` of `iov`, whose entries point into buffers borrowed for the whole call.
    fn writev(&self, iov: &[libc::iovec]) -> io::Result<()> {
        #[cfg(test)]
        if let e @ 1.. = self.refuse_next.swap(0, Ordering::Relaxed) {
            return Err(io::Error::from_raw_os_error(e));
        }
        // SAFETY: every entry points into a buffer the caller keeps borrowed for the call;
        // the kernel only reads them.
        let n =
            unsafe { libc::writev(self.dev.as_raw_fd(), iov.as_ptr(), iov.len() as libc::c_int) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Write one packet, with offload behind an empty virtio-net header (no offload asked).
    fn write_one(&self, buf: &mut [u8]) -> io::Result<()> {
        if !self.offload {
            return self.dev.send(&buf[TUN_HEADROOM..]).map(drop);
        }
        let start = TUN_HEADROOM - VIRTIO_NET_HDR_LEN;
        buf[start..TUN_HEADROOM].fill(0);
        self.dev.send(&buf[start..]).map(drop)
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

    fn send_batch(&self, w: &mut TunWriter, bufs: &mut [Vec<u8>]) -> io::Result<usize> {
        let mut result = Ok(());
        // Without offload (or once the kernel refused a coalesced packet) every packet goes
        // alone.
        if !self.coalesce.load(Ordering::Relaxed) {
            for buf in bufs.iter_mut() {
                if let Err(e) = self.write_one(buf) {
                    result = Err(e);
                }
            }
            return result.map(|()| bufs.len());
        }
        // Runs of one TCP flow's segments go as one packet each; every other packet as it is,
        // behind an empty virtio-net header. Every group is tried.
        gro::plan(bufs, TUN_HEADROOM, &mut w.groups);
        let mut writes = 0;
        for g in &w.groups {
            let written = if g.range.len() == 1 {
                self.write_one(&mut bufs[g.range.start]).map(|()| 1)
            } else {
                self.write_coalesced(g, &mut bufs[g.range.clone()])
            };
            match written {
                Ok(n) => writes += n,
                Err(e) => result = Err(e),
            }
        }
        result.map(|()| writes)
    }

    fn wake(&self) {
        self.waiter.wake()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::linux::netns::Netns;
    use crate::mesh::packet::build_ipv4_udp;
    use std::net::{Ipv4Addr, UdpSocket};
    use std::time::Duration;

    /// An IPv4/UDP packet 192.0.2.2:`sport` -> 192.0.2.1:7000 behind `TUN_HEADROOM` bytes of
    /// garbage (the writer owns the headroom: a header it forgets to write shows).
    fn udp_packet(sport: u16, payload: &[u8]) -> Vec<u8> {
        let (from, to) = (Ipv4Addr::new(192, 0, 2, 2), Ipv4Addr::new(192, 0, 2, 1));
        let mut p = vec![0xa5u8; TUN_HEADROOM];
        p.extend(build_ipv4_udp(from, to, sport, 7000, payload));
        p
    }

    /// A namespace with the TUN device `name` at 192.0.2.1/24, up.
    fn device(name: &'static str) -> (Netns, LinuxTun) {
        let ns = Netns::create(&format!("mt{}-{name}", std::process::id())).unwrap();
        let tun = ns.run(|| LinuxTun::create(name)).unwrap().unwrap();
        for args in [
            &["addr", "add", "192.0.2.1/24", "dev", name][..],
            &["link", "set", name, "up"][..],
        ] {
            let st = ns.command("ip").args(args).status().unwrap();
            assert!(st.success(), "ip {args:?}");
        }
        (ns, tun)
    }

    /// Packets that coalescing does not take (UDP) are written one at a time and reach a socket
    /// in the device's namespace, in order and unchanged, in batches of every size.
    #[test]
    fn writes_every_batch_size_a_packet_at_a_time_when_nothing_coalesces() {
        let (ns, tun) = device("mtw0");
        let sock = ns
            .run(|| UdpSocket::bind("192.0.2.1:7000"))
            .unwrap()
            .unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut w = tun.writer();
        let mut seq = 0u32;
        for n in [1, 7, 24, 2, 128] {
            let mut bufs: Vec<Vec<u8>> = (0..n)
                .map(|i| udp_packet(40000, &(seq + i as u32).to_be_bytes().repeat(100)))
                .collect();
            let writes = tun.send_batch(&mut w, &mut bufs).unwrap();
            assert_eq!(writes, n, "UDP is never merged: a write per packet");
            for _ in 0..n {
                let mut got = [0u8; 2048];
                let len = sock
                    .recv(&mut got)
                    .expect("a packet written to the TUN device");
                assert_eq!(&got[..len], &seq.to_be_bytes().repeat(100)[..]);
                seq += 1;
            }
        }
    }

    /// The timestamp value in TCP options `o`, 0 without one.
    fn tsval(mut o: &[u8]) -> u32 {
        while let [kind, rest @ ..] = o {
            match kind {
                0 => break,
                1 => o = rest,
                _ => {
                    let len = usize::from(*rest.first().unwrap_or(&0)).max(2);
                    if *kind == 8 && o.len() >= 10 {
                        return u32::from_be_bytes(o[2..6].try_into().unwrap());
                    }
                    o = o.get(len..).unwrap_or(&[]);
                }
            }
        }
        0
    }

    /// A TCP connection to a real socket in the device's namespace, the peer's side played
    /// through the device (192.0.2.2:40001 -> 192.0.2.1:`port`), with timestamps as Linux
    /// sends them.
    struct Played<'a> {
        tun: &'a LinuxTun,
        w: TunWriter,
        conn: std::net::TcpStream,
        port: u16,
        /// The peer's next sequence number and timestamp value.
        seq: u32,
        ts: u32,
        /// The socket's next sequence number and its last timestamp value.
        their: u32,
        their_ts: u32,
    }

    const PEER: ([u8; 4], u16) = ([192, 0, 2, 2], 40001);
    const ACK: u8 = 0x10;

    impl<'a> Played<'a> {
        /// The handshake, played through the device, and the connection accepted. Bounded.
        fn connect(ns: &Netns, tun: &'a LinuxTun, port: u16) -> Played<'a> {
            use crate::mesh::linux::gro::tcp4;
            use std::net::TcpListener;
            let listener = ns
                .run(move || TcpListener::bind(("192.0.2.1", port)))
                .unwrap()
                .unwrap();
            listener.set_nonblocking(true).unwrap();
            let me = ([192, 0, 2, 1], port);
            let mut w = tun.writer();
            let syn = 0x02;
            let isn = 1000u32;
            let syn_packet = tcp4(TUN_HEADROOM, PEER, me, isn, 0, syn, &ts(1, 0), &[]);
            tun.send_batch(&mut w, &mut [syn_packet]).unwrap();
            // The kernel's SYN-ACK, read from the device.
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            let (mut scratch, mut bufs, mut sizes) =
                (vec![0u8; 70000], vec![vec![0u8; 2048]; 8], [0usize; 8]);
            let (server_isn, their_ts) = 'found: loop {
                assert!(
                    std::time::Instant::now() < deadline,
                    "no SYN-ACK from the kernel"
                );
                if let Ok(n) = tun.try_recv_batch(&mut scratch, &mut bufs, &mut sizes) {
                    for (b, &len) in bufs.iter().zip(&sizes).take(n) {
                        let p = &b[..len];
                        if len >= 40 && p[9] == 6 && p[33] == syn | ACK {
                            break 'found (
                                u32::from_be_bytes(p[24..28].try_into().unwrap()),
                                tsval(&p[40..20 + usize::from(p[32] >> 4) * 4]),
                            );
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(1));
            };
            let their = server_isn.wrapping_add(1);
            let ack_packet = tcp4(
                TUN_HEADROOM,
                PEER,
                me,
                isn + 1,
                their,
                ACK,
                &ts(2, their_ts),
                &[],
            );
            tun.send_batch(&mut w, &mut [ack_packet]).unwrap();
            let conn = loop {
                assert!(
                    std::time::Instant::now() < deadline,
                    "no connection accepted"
                );
                match listener.accept() {
                    Ok((c, _)) => break c,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(1))
                    }
                    Err(e) => panic!("accept: {e}"),
                }
            };
            conn.set_nonblocking(false).unwrap();
            conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            Played {
                tun,
                w,
                conn,
                port,
                seq: isn + 1,
                ts: 3,
                their,
                their_ts,
            }
        }

        /// `data` as 1,000-byte segments in one batch, PSH on the last; the writes it took.
        fn send(&mut self, data: &[u8]) -> usize {
            use crate::mesh::linux::gro::tcp4;
            let psh = 0x08;
            let n = data.len().div_ceil(1000);
            let mut segs: Vec<Vec<u8>> = data
                .chunks(1000)
                .enumerate()
                .map(|(k, chunk)| {
                    let flags = if k + 1 == n { ACK | psh } else { ACK };
                    let seq = self.seq.wrapping_add(k as u32 * 1000);
                    let o = ts(self.ts, self.their_ts);
                    let me = ([192, 0, 2, 1], self.port);
                    tcp4(TUN_HEADROOM, PEER, me, seq, self.their, flags, &o, chunk)
                })
                .collect();
            self.seq = self.seq.wrapping_add(data.len() as u32);
            self.ts += 1;
            self.tun.send_batch(&mut self.w, &mut segs).unwrap()
        }

        /// The socket reads exactly `data`, in order and unchanged.
        fn receive(&mut self, data: &[u8]) {
            use std::io::Read;
            let mut got = vec![0u8; data.len()];
            self.conn
                .read_exact(&mut got)
                .expect("every byte that was written");
            assert!(got == data, "the bytes arrive in order and unchanged");
        }
    }

    /// TCP options NOP NOP timestamps (value, echo).
    fn ts(v: u32, e: u32) -> Vec<u8> {
        let mut o = vec![1, 1, 8, 10];
        o.extend(v.to_be_bytes());
        o.extend(e.to_be_bytes());
        o
    }

    /// 40,000 bytes of a pattern that shows a byte out of place; `round` changes it.
    fn stream(round: u32) -> Vec<u8> {
        (0..40_000u32)
            .map(|i| ((i * 7 + round) % 251) as u8)
            .collect()
    }

    /// A run of one connection's segments is written as one coalesced packet, and the kernel
    /// takes it: a real TCP socket in the namespace receives every byte, in order.
    #[test]
    fn a_run_of_tcp_segments_goes_as_one_packet_and_a_real_socket_gets_every_byte() {
        let (ns, tun) = device("mtw1");
        let mut c = Played::connect(&ns, &tun, 7001);
        for round in 0..3 {
            let data = stream(round);
            assert_eq!(c.send(&data), 1, "40 segments, one packet");
            c.receive(&data);
        }
    }

    /// A coalesced write the kernel refuses puts the first segment's headers back and sends
    /// every segment alone, so nothing is lost. Refused as invalid, every later run goes a
    /// segment at a time; refused for a passing reason (no buffer space), the next run is
    /// coalesced again.
    #[test]
    fn a_refused_coalesced_write_sends_every_segment_alone_and_loses_nothing() {
        let (ns, tun) = device("mtw2");
        let mut c = Played::connect(&ns, &tun, 7002);
        tun.refuse_next.store(libc::ENOBUFS, Ordering::Relaxed);
        let data = stream(0);
        assert_eq!(c.send(&data), 40, "refused: each of 40 segments alone");
        c.receive(&data);
        assert!(tun.coalesce.load(Ordering::Relaxed), "a passing refusal");
        let data = stream(1);
        assert_eq!(c.send(&data), 1, "coalesced again");
        c.receive(&data);

        tun.refuse_next.store(libc::EINVAL, Ordering::Relaxed);
        let data = stream(2);
        assert_eq!(c.send(&data), 40, "refused as invalid: each segment alone");
        c.receive(&data);
        assert!(!tun.coalesce.load(Ordering::Relaxed), "coalescing stops");
        let data = stream(3);
        assert_eq!(c.send(&data), 40, "and stays stopped");
        c.receive(&data);
    }
}
