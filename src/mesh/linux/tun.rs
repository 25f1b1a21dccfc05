//! The kernel TUN device (tun-rs), with TCP segmentation offload where the kernel has it.

use super::NetError;
use crate::mesh::io::{TunIo, TUN_HEADROOM};
use std::io;
use tracing::info;

/// The kernel TUN device, with TCP segmentation offload when the kernel supports it: the
/// kernel hands over up to 64 KiB of one TCP flow per read and takes coalesced segments back.
pub struct LinuxTun {
    dev: tun_rs::AsyncDevice,
    pub name: String,
    pub index: u32,
    /// Coalescing state for writes (used by the single writer, hence uncontended).
    gro: tokio::sync::Mutex<tun_rs::GROTable>,
}

impl LinuxTun {
    /// Create the TUN device `name`. It disappears when this process exits, however it exits.
    pub fn create(name: &str) -> Result<LinuxTun, NetError> {
        let build = |offload: bool| {
            tun_rs::DeviceBuilder::new()
                .name(name)
                .offload(offload)
                .build_async()
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
        Ok(LinuxTun {
            dev,
            name: name.to_string(),
            index,
            gro: tokio::sync::Mutex::new(tun_rs::GROTable::new()),
        })
    }
}

impl TunIo for LinuxTun {
    /// One packet (the device loop uses the batch form; this one allocates).
    async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        let mut scratch = vec![0u8; 65535 + tun_rs::VIRTIO_NET_HDR_LEN];
        let mut bufs = vec![vec![0u8; 2048]; tun_rs::IDEAL_BATCH_SIZE];
        let mut sizes = vec![0usize; tun_rs::IDEAL_BATCH_SIZE];
        self.recv_batch(&mut scratch, &mut bufs, &mut sizes).await?;
        let n = sizes[0].min(buf.len());
        buf[..n].copy_from_slice(&bufs[0][..n]);
        Ok(n)
    }
    async fn send(&self, packet: &[u8]) -> io::Result<()> {
        let mut b = vec![0u8; TUN_HEADROOM];
        b.extend_from_slice(packet);
        self.send_batch(std::slice::from_mut(&mut b)).await
    }
    async fn recv_batch(
        &self,
        scratch: &mut [u8],
        bufs: &mut [Vec<u8>],
        sizes: &mut [usize],
    ) -> io::Result<usize> {
        self.dev.recv_multiple(scratch, bufs, sizes, 0).await
    }
    async fn send_batch(&self, bufs: &mut [Vec<u8>]) -> io::Result<()> {
        let mut gro = self.gro.lock().await;
        self.dev
            .send_multiple(&mut gro, bufs, TUN_HEADROOM)
            .await
            .map(|_| ())
    }
}
