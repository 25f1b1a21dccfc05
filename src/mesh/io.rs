//! The data plane's two I/O edges, each behind a small trait with an in-memory twin (like
//! wireguard-go's `tun.Device`/`conn.Bind` with `tuntest`/`bindtest`). The protocol code in
//! [`super::device`] never touches a file descriptor; batching (recvmmsg, GSO/GRO, TUN offload)
//! and more worker threads can come in behind these traits.
//!
//! Contract: `recv*` waits for one packet and returns its length; an error means the edge is
//! broken for good, except `ErrorKind::Interrupted`/`WouldBlock` which callers retry. `send*`
//! never blocks the caller for long: a full queue drops the packet, as a kernel would.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

/// Bytes kept free in front of every packet handed to [`TunIo::send_batch`] (room for a
/// virtio-net header when the device does offload).
pub const TUN_HEADROOM: usize = 16;

pub trait TunIo: Send + Sync + 'static {
    /// Read one IP packet written by the kernel.
    fn recv(&self, buf: &mut [u8]) -> impl Future<Output = io::Result<usize>> + Send;
    /// Hand one IP packet to the kernel.
    fn send(&self, packet: &[u8]) -> impl Future<Output = io::Result<()>> + Send;

    /// Read what the kernel wrote, as IP packets: `bufs[i][..sizes[i]]` for the returned count.
    /// With offload one read can carry a TCP super-packet, split here into MTU-sized packets;
    /// `scratch` holds the raw read (64 KiB + header). The default reads one packet.
    fn recv_batch(
        &self,
        _scratch: &mut [u8],
        bufs: &mut [Vec<u8>],
        sizes: &mut [usize],
    ) -> impl Future<Output = io::Result<usize>> + Send {
        async move {
            sizes[0] = self.recv(&mut bufs[0]).await?;
            Ok(1)
        }
    }

    /// Hand packets to the kernel, each at `bufs[i][TUN_HEADROOM..]`. With offload, consecutive
    /// segments of one TCP flow are coalesced first; the buffers may be modified. The default
    /// writes them one by one.
    fn send_batch(&self, bufs: &mut [Vec<u8>]) -> impl Future<Output = io::Result<()>> + Send {
        async move {
            for b in bufs.iter() {
                self.send(&b[TUN_HEADROOM..]).await?;
            }
            Ok(())
        }
    }
}

pub trait UdpIo: Send + Sync + 'static {
    fn recv_from(
        &self,
        buf: &mut [u8],
    ) -> impl Future<Output = io::Result<(usize, SocketAddr)>> + Send;
    fn send_to(
        &self,
        datagram: &[u8],
        to: SocketAddr,
    ) -> impl Future<Output = io::Result<()>> + Send;
    fn local_addr(&self) -> SocketAddr;
    /// A datagram that has already arrived, without waiting (`WouldBlock` if none): lets the
    /// receive loop take a batch per wake-up.
    fn try_recv_from(&self, _buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        Err(io::ErrorKind::WouldBlock.into())
    }
    /// Like [`UdpIo::recv_from`], but the buffer may hold several datagrams from one sender,
    /// each `segment` bytes (the last may be shorter): UDP GRO on Linux. Returns
    /// `(bytes, from, segment)`. The default receives one datagram.
    fn recv_gro(
        &self,
        buf: &mut [u8],
    ) -> impl Future<Output = io::Result<(usize, SocketAddr, usize)>> + Send {
        async move {
            let (n, from) = self.recv_from(buf).await?;
            Ok((n, from, n))
        }
    }
    /// Non-blocking [`UdpIo::recv_gro`].
    fn try_recv_gro(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, usize)> {
        let (n, from) = self.try_recv_from(buf)?;
        Ok((n, from, n))
    }
    /// Send `buf` as datagrams of `segment` bytes each (the last may be shorter), all to `to`:
    /// one system call with UDP GSO on Linux. The default sends them one by one.
    fn send_gso(
        &self,
        buf: &[u8],
        segment: usize,
        to: SocketAddr,
    ) -> impl Future<Output = io::Result<()>> + Send {
        async move {
            for d in buf.chunks(segment.max(1)) {
                self.send_to(d, to).await?;
            }
            Ok(())
        }
    }
}

impl<T: TunIo> TunIo for Arc<T> {
    fn recv(&self, buf: &mut [u8]) -> impl Future<Output = io::Result<usize>> + Send {
        (**self).recv(buf)
    }
    fn send(&self, packet: &[u8]) -> impl Future<Output = io::Result<()>> + Send {
        (**self).send(packet)
    }
    fn recv_batch(
        &self,
        scratch: &mut [u8],
        bufs: &mut [Vec<u8>],
        sizes: &mut [usize],
    ) -> impl Future<Output = io::Result<usize>> + Send {
        (**self).recv_batch(scratch, bufs, sizes)
    }
    fn send_batch(&self, bufs: &mut [Vec<u8>]) -> impl Future<Output = io::Result<()>> + Send {
        (**self).send_batch(bufs)
    }
}

impl<U: UdpIo> UdpIo for Arc<U> {
    fn recv_from(
        &self,
        buf: &mut [u8],
    ) -> impl Future<Output = io::Result<(usize, SocketAddr)>> + Send {
        (**self).recv_from(buf)
    }
    fn send_to(
        &self,
        datagram: &[u8],
        to: SocketAddr,
    ) -> impl Future<Output = io::Result<()>> + Send {
        (**self).send_to(datagram, to)
    }
    fn local_addr(&self) -> SocketAddr {
        (**self).local_addr()
    }
    fn try_recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        (**self).try_recv_from(buf)
    }
    fn send_gso(
        &self,
        buf: &[u8],
        segment: usize,
        to: SocketAddr,
    ) -> impl Future<Output = io::Result<()>> + Send {
        (**self).send_gso(buf, segment, to)
    }
    fn recv_gro(
        &self,
        buf: &mut [u8],
    ) -> impl Future<Output = io::Result<(usize, SocketAddr, usize)>> + Send {
        (**self).recv_gro(buf)
    }
    fn try_recv_gro(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, usize)> {
        (**self).try_recv_gro(buf)
    }
}

const MEM_QUEUE: usize = 1024;

/// In-memory TUN: the test plays the kernel. `inject` is what the kernel would route into the
/// mesh; `delivered` is what meshd hands back to the kernel.
pub struct MemTun {
    from_kernel: tokio::sync::Mutex<mpsc::Receiver<Vec<u8>>>,
    to_kernel: mpsc::Sender<Vec<u8>>,
}

/// The test's side of a [`MemTun`].
pub struct MemTunHandle {
    pub inject: mpsc::Sender<Vec<u8>>,
    pub delivered: mpsc::Receiver<Vec<u8>>,
}

impl MemTun {
    pub fn new() -> (MemTun, MemTunHandle) {
        let (inject, from_kernel) = mpsc::channel(MEM_QUEUE);
        let (to_kernel, delivered) = mpsc::channel(MEM_QUEUE);
        (
            MemTun {
                from_kernel: tokio::sync::Mutex::new(from_kernel),
                to_kernel,
            },
            MemTunHandle { inject, delivered },
        )
    }
}

impl TunIo for MemTun {
    async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        let p = self
            .from_kernel
            .lock()
            .await
            .recv()
            .await
            .ok_or_else(|| io::Error::new(io::ErrorKind::BrokenPipe, "mem tun closed"))?;
        let n = p.len().min(buf.len());
        buf[..n].copy_from_slice(&p[..n]);
        Ok(n)
    }
    async fn send(&self, packet: &[u8]) -> io::Result<()> {
        let _ = self.to_kernel.try_send(packet.to_vec());
        Ok(())
    }
    /// Everything already queued, up to a batch (as an offloading kernel would hand over).
    async fn recv_batch(
        &self,
        _scratch: &mut [u8],
        bufs: &mut [Vec<u8>],
        sizes: &mut [usize],
    ) -> io::Result<usize> {
        let mut rx = self.from_kernel.lock().await;
        let mut k = 0;
        while k < bufs.len() {
            let p = if k == 0 {
                rx.recv()
                    .await
                    .ok_or_else(|| io::Error::new(io::ErrorKind::BrokenPipe, "mem tun closed"))?
            } else {
                match rx.try_recv() {
                    Ok(p) => p,
                    Err(_) => break,
                }
            };
            let n = p.len().min(bufs[k].len());
            bufs[k][..n].copy_from_slice(&p[..n]);
            sizes[k] = n;
            k += 1;
        }
        Ok(k)
    }
}

type Datagram = (Vec<u8>, SocketAddr);

/// An in-memory underlay network: sockets bound to addresses, links that can be cut
/// (partitions) and a record of every datagram that crossed it (the "capture").
#[derive(Clone, Default)]
pub struct MemNet {
    inner: Arc<Mutex<MemNetInner>>,
}

#[derive(Default)]
struct MemNetInner {
    sockets: HashMap<SocketAddr, mpsc::Sender<Datagram>>,
    cut: HashSet<(std::net::IpAddr, std::net::IpAddr)>,
    /// Control frames (join requests and answers) still to lose on a directed link.
    lose_control: HashMap<(std::net::IpAddr, std::net::IpAddr), usize>,
    capture: Vec<(SocketAddr, SocketAddr, Vec<u8>)>,
    capturing: bool,
}

impl MemNet {
    pub fn new() -> MemNet {
        MemNet::default()
    }

    pub fn bind(&self, addr: SocketAddr) -> io::Result<MemUdp> {
        let mut inner = self.inner.lock().unwrap();
        if inner.sockets.contains_key(&addr) {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("{addr} in use"),
            ));
        }
        let (tx, rx) = mpsc::channel(MEM_QUEUE);
        inner.sockets.insert(addr, tx);
        Ok(MemUdp {
            addr,
            net: self.clone(),
            rx: tokio::sync::Mutex::new(rx),
            pending: Mutex::new(None),
        })
    }

    /// Cut (or restore) both directions between two hosts.
    pub fn set_cut(&self, a: std::net::IpAddr, b: std::net::IpAddr, cut: bool) {
        let mut inner = self.inner.lock().unwrap();
        for pair in [(a, b), (b, a)] {
            if cut {
                inner.cut.insert(pair);
            } else {
                inner.cut.remove(&pair);
            }
        }
    }

    /// Lose the next `n` control frames (join requests, answers, notices) sent from host `from`
    /// to host `to`: a lossy link, aimed at the exchanges that have no WireGuard retransmission.
    pub fn lose_control_frames(&self, from: std::net::IpAddr, to: std::net::IpAddr, n: usize) {
        self.inner
            .lock()
            .unwrap()
            .lose_control
            .insert((from, to), n);
    }

    pub fn start_capture(&self) {
        let mut inner = self.inner.lock().unwrap();
        inner.capturing = true;
        inner.capture.clear();
    }

    pub fn captured(&self) -> Vec<(SocketAddr, SocketAddr, Vec<u8>)> {
        self.inner.lock().unwrap().capture.clone()
    }

    fn deliver(&self, from: SocketAddr, to: SocketAddr, data: &[u8]) {
        let mut inner = self.inner.lock().unwrap();
        if inner.cut.contains(&(from.ip(), to.ip())) {
            return;
        }
        if data.starts_with(crate::mesh::packet::CONTROL_MAGIC) {
            if let Some(left) = inner.lose_control.get_mut(&(from.ip(), to.ip())) {
                if *left > 0 {
                    *left -= 1;
                    return;
                }
            }
        }
        if inner.capturing {
            inner.capture.push((from, to, data.to_vec()));
        }
        if let Some(tx) = inner.sockets.get(&to) {
            let _ = tx.try_send((data.to_vec(), from));
        }
    }
}

pub struct MemUdp {
    addr: SocketAddr,
    net: MemNet,
    rx: tokio::sync::Mutex<mpsc::Receiver<Datagram>>,
    /// A datagram taken off the queue that did not fit a coalesced read.
    pending: Mutex<Option<Datagram>>,
}

impl Drop for MemUdp {
    fn drop(&mut self) {
        self.net.inner.lock().unwrap().sockets.remove(&self.addr);
    }
}

impl UdpIo for MemUdp {
    async fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        let held = self.pending.lock().unwrap().take();
        let (d, from) =
            match held {
                Some(d) => d,
                None => self.rx.lock().await.recv().await.ok_or_else(|| {
                    io::Error::new(io::ErrorKind::BrokenPipe, "mem socket closed")
                })?,
            };
        let n = d.len().min(buf.len());
        buf[..n].copy_from_slice(&d[..n]);
        Ok((n, from))
    }
    async fn send_to(&self, datagram: &[u8], to: SocketAddr) -> io::Result<()> {
        self.net.deliver(self.addr, to, datagram);
        Ok(())
    }
    fn local_addr(&self) -> SocketAddr {
        self.addr
    }
    fn try_recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        let held = self.pending.lock().unwrap().take();
        let (d, from) = match held {
            Some(d) => d,
            None => self
                .rx
                .try_lock()
                .map_err(|_| io::Error::from(io::ErrorKind::WouldBlock))?
                .try_recv()
                .map_err(|_| io::Error::from(io::ErrorKind::WouldBlock))?,
        };
        let n = d.len().min(buf.len());
        buf[..n].copy_from_slice(&d[..n]);
        Ok((n, from))
    }
    /// Coalesces like kernel UDP GRO: queued datagrams from the same sender with the same size
    /// (the last may be shorter) come back as one buffer.
    async fn recv_gro(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, usize)> {
        let mut rx = self.rx.lock().await;
        let held = self.pending.lock().unwrap().take();
        let (first, from) = match held {
            Some(d) => d,
            None => rx
                .recv()
                .await
                .ok_or_else(|| io::Error::new(io::ErrorKind::BrokenPipe, "mem socket closed"))?,
        };
        let segment = first.len();
        let mut n = first.len().min(buf.len());
        buf[..n].copy_from_slice(&first[..n]);
        let mut pending = self.pending.lock().unwrap();
        while let Ok((d, f)) = rx.try_recv() {
            if f != from || d.len() > segment || n + d.len() > buf.len() || n + d.len() > 65_000 {
                *pending = Some((d, f));
                break;
            }
            buf[n..n + d.len()].copy_from_slice(&d);
            n += d.len();
            if d.len() < segment {
                break;
            }
        }
        Ok((n, from, segment))
    }
}
