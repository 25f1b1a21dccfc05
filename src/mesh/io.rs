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

pub trait TunIo: Send + Sync + 'static {
    /// Read one IP packet written by the kernel.
    fn recv(&self, buf: &mut [u8]) -> impl Future<Output = io::Result<usize>> + Send;
    /// Hand one IP packet to the kernel.
    fn send(&self, packet: &[u8]) -> impl Future<Output = io::Result<()>> + Send;
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
}

impl<T: TunIo> TunIo for Arc<T> {
    fn recv(&self, buf: &mut [u8]) -> impl Future<Output = io::Result<usize>> + Send {
        (**self).recv(buf)
    }
    fn send(&self, packet: &[u8]) -> impl Future<Output = io::Result<()>> + Send {
        (**self).send(packet)
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
}

impl Drop for MemUdp {
    fn drop(&mut self) {
        self.net.inner.lock().unwrap().sockets.remove(&self.addr);
    }
}

impl UdpIo for MemUdp {
    async fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        let (d, from) = self
            .rx
            .lock()
            .await
            .recv()
            .await
            .ok_or_else(|| io::Error::new(io::ErrorKind::BrokenPipe, "mem socket closed"))?;
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
}
