//! In-memory twins of the data plane's I/O edges ([`crate::mesh::io`]): a TUN device whose
//! kernel side is the test, and an underlay network of UDP sockets whose links can be cut
//! (partitions), lose control frames, and be captured.

use crate::mesh::io::{TunIo, UdpIo, TUN_HEADROOM};
use std::collections::{HashMap, HashSet};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

const MEM_QUEUE: usize = 1024;

/// In-memory TUN: the test plays the kernel. `inject` is what the kernel would route into the
/// mesh; `delivered` is what meshd hands back to the kernel.
pub struct MemTun {
    from_kernel: tokio::sync::Mutex<mpsc::Receiver<Vec<u8>>>,
    /// A packet taken off the queue by `wait_readable`, for the next read.
    pending: Mutex<Option<Vec<u8>>>,
    to_kernel: mpsc::Sender<Vec<u8>>,
    /// Wakes a waiting reader (an empty packet, never a real one).
    waker: mpsc::Sender<Vec<u8>>,
    woken: AtomicBool,
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
                pending: Mutex::new(None),
                to_kernel,
                waker: inject.clone(),
                woken: AtomicBool::new(false),
            },
            MemTunHandle { inject, delivered },
        )
    }
}

impl TunIo for MemTun {
    type Writer = ();
    fn writer(&self) {}

    fn wait_readable(&self) -> io::Result<()> {
        wait_queued(&self.woken, &self.pending, &self.from_kernel, |p| {
            p.is_empty()
        })
    }

    /// Everything already queued, up to a batch (as an offloading kernel would hand over).
    fn try_recv_batch(
        &self,
        _scratch: &mut [u8],
        bufs: &mut [Vec<u8>],
        sizes: &mut [usize],
    ) -> io::Result<usize> {
        let mut rx = self
            .from_kernel
            .try_lock()
            .map_err(|_| io::Error::from(io::ErrorKind::WouldBlock))?;
        let mut held = self.pending.lock().unwrap().take();
        let mut k = 0;
        while k < bufs.len() {
            let p = match held.take() {
                Some(p) => p,
                None => match rx.try_recv() {
                    Ok(p) if p.is_empty() => continue,
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            let n = p.len().min(bufs[k].len());
            bufs[k][..n].copy_from_slice(&p[..n]);
            sizes[k] = n;
            k += 1;
        }
        if k == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(k)
    }

    fn send_batch(&self, _: &mut (), bufs: &mut [Vec<u8>]) -> io::Result<usize> {
        for b in bufs.iter() {
            let _ = self.to_kernel.try_send(b[TUN_HEADROOM..].to_vec());
        }
        Ok(bufs.len())
    }

    fn wake(&self) {
        self.woken.store(true, Ordering::Relaxed);
        let _ = self.waker.try_send(Vec::new());
    }
}

/// A twin's `wait_readable`: block until something is queued (kept in `pending` for the next
/// read), skipping wake-up markers, or until the twin was woken for good.
fn wait_queued<T>(
    woken: &AtomicBool,
    pending: &Mutex<Option<T>>,
    rx: &tokio::sync::Mutex<mpsc::Receiver<T>>,
    is_wake: impl Fn(&T) -> bool,
) -> io::Result<()> {
    loop {
        if woken.load(Ordering::Relaxed) {
            return Err(io::ErrorKind::Interrupted.into());
        }
        if pending.lock().unwrap().is_some() {
            return Ok(());
        }
        let item = rx
            .blocking_lock()
            .blocking_recv()
            .ok_or_else(|| io::Error::new(io::ErrorKind::BrokenPipe, "in-memory twin closed"))?;
        if !is_wake(&item) {
            *pending.lock().unwrap() = Some(item);
        }
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
    /// Datagrams kept back from sockets being held, in order.
    held: HashMap<SocketAddr, Vec<Datagram>>,
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
        inner.sockets.insert(addr, tx.clone());
        Ok(MemUdp {
            addr,
            net: self.clone(),
            rx: tokio::sync::Mutex::new(rx),
            pending: Mutex::new(None),
            waker: tx,
            woken: AtomicBool::new(false),
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

    /// Keep datagrams for the socket at `addr` back (`true`), or hand it all that was kept at
    /// once (`false`): a receiver that fell behind, with a backlog to read.
    pub fn hold(&self, addr: SocketAddr, on: bool) {
        let mut inner = self.inner.lock().unwrap();
        if on {
            inner.held.entry(addr).or_default();
        } else if let Some(kept) = inner.held.remove(&addr) {
            if let Some(tx) = inner.sockets.get(&addr) {
                for d in kept {
                    let _ = tx.try_send(d);
                }
            }
        }
    }

    /// Datagrams kept back for `addr` so far.
    pub fn held(&self, addr: SocketAddr) -> usize {
        self.inner
            .lock()
            .unwrap()
            .held
            .get(&addr)
            .map_or(0, |k| k.len())
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
        if let Some(kept) = inner.held.get_mut(&to) {
            kept.push((data.to_vec(), from));
            return;
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
    /// A datagram taken off the queue that did not fit a coalesced read, or that
    /// `wait_readable` took for the next read.
    pending: Mutex<Option<Datagram>>,
    /// Wakes a waiting reader (an empty datagram from the unspecified address, which the
    /// network never delivers).
    waker: mpsc::Sender<Datagram>,
    woken: AtomicBool,
}

fn is_wake(d: &Datagram) -> bool {
    d.0.is_empty() && d.1.ip().is_unspecified()
}

impl Drop for MemUdp {
    fn drop(&mut self) {
        self.net.inner.lock().unwrap().sockets.remove(&self.addr);
    }
}

impl MemUdp {
    /// One datagram, waiting for it (for tests that play a raw peer).
    pub async fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        let mut rx = self.rx.lock().await;
        let held = self.pending.lock().unwrap().take();
        let (d, from) = match held {
            Some(d) => d,
            None => loop {
                let d = rx.recv().await.ok_or_else(|| {
                    io::Error::new(io::ErrorKind::BrokenPipe, "mem socket closed")
                })?;
                if !is_wake(&d) {
                    break d;
                }
            },
        };
        let n = d.len().min(buf.len());
        buf[..n].copy_from_slice(&d[..n]);
        Ok((n, from))
    }

    /// Coalesce like kernel UDP GRO: `first`, then queued datagrams from the same sender with
    /// the same size (the last may be shorter), as one buffer.
    fn coalesce(
        &self,
        rx: &mut mpsc::Receiver<Datagram>,
        (first, from): Datagram,
        buf: &mut [u8],
    ) -> (usize, SocketAddr, usize) {
        let segment = first.len();
        let mut n = first.len().min(buf.len());
        buf[..n].copy_from_slice(&first[..n]);
        let mut pending = self.pending.lock().unwrap();
        while let Ok((d, f)) = rx.try_recv() {
            if d.is_empty() && f.ip().is_unspecified() {
                continue;
            }
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
        (n, from, segment)
    }
}

impl UdpIo for MemUdp {
    fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    fn wait_readable(&self) -> io::Result<()> {
        wait_queued(&self.woken, &self.pending, &self.rx, is_wake)
    }

    fn try_recv_gro(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, usize)> {
        let mut rx = self
            .rx
            .try_lock()
            .map_err(|_| io::Error::from(io::ErrorKind::WouldBlock))?;
        let held = self.pending.lock().unwrap().take();
        let first = match held {
            Some(d) => d,
            None => loop {
                match rx.try_recv() {
                    Ok(d) if is_wake(&d) => continue,
                    Ok(d) => break d,
                    Err(_) => return Err(io::ErrorKind::WouldBlock.into()),
                }
            },
        };
        Ok(self.coalesce(&mut rx, first, buf))
    }

    fn send_to(&self, datagram: &[u8], to: SocketAddr) -> io::Result<()> {
        self.net.deliver(self.addr, to, datagram);
        Ok(())
    }

    fn wake(&self) {
        self.woken.store(true, Ordering::Relaxed);
        let _ = self
            .waker
            .try_send((Vec::new(), SocketAddr::from(([0, 0, 0, 0], 0))));
    }

    async fn recv_gro_async(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, usize)> {
        let mut rx = self.rx.lock().await;
        let held = self.pending.lock().unwrap().take();
        let first = match held {
            Some(d) => d,
            None => loop {
                let d = rx.recv().await.ok_or_else(|| {
                    io::Error::new(io::ErrorKind::BrokenPipe, "mem socket closed")
                })?;
                if !is_wake(&d) {
                    break d;
                }
            },
        };
        Ok(self.coalesce(&mut rx, first, buf))
    }
}
