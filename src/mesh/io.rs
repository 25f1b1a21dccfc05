//! The data plane's two I/O edges, each behind a small trait with an in-memory twin (like
//! wireguard-go's `tun.Device`/`conn.Bind` with `tuntest`/`bindtest`; the twins live in
//! `testing::mem`, compiled for tests only). The protocol code in [`super::device`] never
//! touches a file descriptor; batching (recvmmsg, GSO/GRO, TUN offload) and more worker threads
//! can come in behind these traits.
//!
//! Contract: `recv*` waits for one packet and returns its length; an error means the edge is
//! broken for good, except `ErrorKind::Interrupted`/`WouldBlock` which callers retry. `send*`
//! never blocks the caller for long: a full queue drops the packet, as a kernel would.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

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
