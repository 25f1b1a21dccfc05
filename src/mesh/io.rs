//! The data plane's two I/O edges, each behind a small trait with an in-memory twin (like
//! wireguard-go's `tun.Device`/`conn.Bind` with `tuntest`/`bindtest`; the twins live in
//! `testing::mem`, compiled for tests only). The protocol code in [`super::device`] never
//! touches a file descriptor.
//!
//! The data plane runs on threads of its own, not on the async runtime: each waits in the
//! kernel for its own file descriptor, so a packet costs one wake-up of the thread that handles
//! it (no reactor thread handing readiness to a worker) and a thread can look at the other edge
//! at once when its own work made something ready there (an echo reply, a TCP ACK).
//!
//! Contract: `wait_*` blocks until a `try_*` call would likely find something, or until `wake`
//! was called (then `ErrorKind::Interrupted`, for good: `wake` is for shutdown). `try_*` never
//! blocks (`WouldBlock` when there is nothing). An error of another kind means the edge is
//! broken. `send*` never blocks the caller for long: a full queue drops the packet, as a kernel
//! would.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

/// Bytes kept free in front of every packet handed to [`TunIo::send_batch`] (room for a
/// virtio-net header when the device does offload).
pub const TUN_HEADROOM: usize = 16;

/// Packets one read from the TUN device may be split into: with offload, a TCP super-packet of
/// up to 64 KiB. The device is told to make none of more segments (its GSO limit).
pub const TUN_READ_PACKETS: usize = 128;

pub trait TunIo: Send + Sync + 'static {
    /// What one writing thread keeps between writes.
    type Writer: Send;
    fn writer(&self) -> Self::Writer;

    /// Block until the kernel has written something for the mesh, or `wake` was called.
    fn wait_readable(&self) -> io::Result<()>;

    /// Read what the kernel wrote, as IP packets: `bufs[i][..sizes[i]]` for the returned count,
    /// without waiting. With offload one read can carry a TCP super-packet, split here into
    /// MTU-sized packets; `scratch` holds the raw read (64 KiB + header).
    fn try_recv_batch(
        &self,
        scratch: &mut [u8],
        bufs: &mut [Vec<u8>],
        sizes: &mut [usize],
    ) -> io::Result<usize>;

    /// Hand packets to the kernel, each at `bufs[i][TUN_HEADROOM..]`, and say in how many
    /// writes. With offload, runs of consecutive segments of one TCP flow go as one packet
    /// each; the buffers (their headers and headroom) may be modified.
    fn send_batch(&self, writer: &mut Self::Writer, bufs: &mut [Vec<u8>]) -> io::Result<usize>;

    /// Make every `wait_readable`, now and later, return `Interrupted`.
    fn wake(&self);
}

pub trait UdpIo: Send + Sync + 'static {
    fn local_addr(&self) -> SocketAddr;

    /// Block until a datagram has arrived, or `wake` was called.
    fn wait_readable(&self) -> io::Result<()>;

    /// One read without waiting: `(bytes, from, segment)`. The buffer may hold several
    /// datagrams from one sender, each `segment` bytes (the last may be shorter): UDP GRO on
    /// Linux.
    fn try_recv_gro(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, usize)>;

    fn send_to(&self, datagram: &[u8], to: SocketAddr) -> io::Result<()>;

    /// Send `buf` as datagrams of `segment` bytes each (the last may be shorter), all to `to`:
    /// one system call with UDP GSO on Linux. The default sends them one by one.
    fn send_gso(&self, buf: &[u8], segment: usize, to: SocketAddr) -> io::Result<()> {
        for d in buf.chunks(segment.max(1)) {
            self.send_to(d, to)?;
        }
        Ok(())
    }

    /// Make every `wait_readable`, now and later, return `Interrupted`.
    fn wake(&self);

    /// Wait for a datagram on the async runtime (GRO as in [`UdpIo::try_recv_gro`]): for the
    /// join exchange, which runs before the data plane does and never beside it.
    fn recv_gro_async(
        &self,
        buf: &mut [u8],
    ) -> impl Future<Output = io::Result<(usize, SocketAddr, usize)>> + Send;
}

impl<T: TunIo> TunIo for Arc<T> {
    type Writer = T::Writer;
    fn writer(&self) -> T::Writer {
        (**self).writer()
    }
    fn wait_readable(&self) -> io::Result<()> {
        (**self).wait_readable()
    }
    fn try_recv_batch(
        &self,
        scratch: &mut [u8],
        bufs: &mut [Vec<u8>],
        sizes: &mut [usize],
    ) -> io::Result<usize> {
        (**self).try_recv_batch(scratch, bufs, sizes)
    }
    fn send_batch(&self, writer: &mut T::Writer, bufs: &mut [Vec<u8>]) -> io::Result<usize> {
        (**self).send_batch(writer, bufs)
    }
    fn wake(&self) {
        (**self).wake()
    }
}

impl<U: UdpIo> UdpIo for Arc<U> {
    fn local_addr(&self) -> SocketAddr {
        (**self).local_addr()
    }
    fn wait_readable(&self) -> io::Result<()> {
        (**self).wait_readable()
    }
    fn try_recv_gro(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, usize)> {
        (**self).try_recv_gro(buf)
    }
    fn send_to(&self, datagram: &[u8], to: SocketAddr) -> io::Result<()> {
        (**self).send_to(datagram, to)
    }
    fn send_gso(&self, buf: &[u8], segment: usize, to: SocketAddr) -> io::Result<()> {
        (**self).send_gso(buf, segment, to)
    }
    fn wake(&self) {
        (**self).wake()
    }
    fn recv_gro_async(
        &self,
        buf: &mut [u8],
    ) -> impl Future<Output = io::Result<(usize, SocketAddr, usize)>> + Send {
        (**self).recv_gro_async(buf)
    }
}
