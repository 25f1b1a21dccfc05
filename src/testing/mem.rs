//! In-memory twins of the data plane's I/O edges ([`crate::mesh::io`]): a TUN device whose
//! kernel side is the test, and an underlay network of UDP sockets whose links can be cut
//! (partitions), lose control frames, and be captured.

use crate::mesh::io::{TunIo, UdpIo};
use std::collections::{HashMap, HashSet};
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

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
