//! The kernel TUN device (tun-rs), with TCP segmentation offload where the kernel has it.

use super::wait::Waiter;
use super::NetError;
use crate::mesh::io::{TunIo, TUN_HEADROOM};
use std::io;
use std::os::fd::AsRawFd;
use tracing::info;

/// The kernel TUN device, with TCP segmentation offload when the kernel supports it: the
/// kernel hands over up to 64 KiB of one TCP flow per read and takes coalesced segments back.
/// Non-blocking; the data plane's threads wait for it in `poll`.
pub struct LinuxTun {
    dev: tun_rs::SyncDevice,
    pub name: String,
    pub index: u32,
    waiter: Waiter,
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
        Ok(LinuxTun {
            dev,
            name: name.to_string(),
            index,
            waiter,
        })
    }
}

impl TunIo for LinuxTun {
    type Writer = tun_rs::GROTable;

    fn writer(&self) -> tun_rs::GROTable {
        tun_rs::GROTable::new()
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

    fn send_batch(&self, gro: &mut tun_rs::GROTable, bufs: &mut [Vec<u8>]) -> io::Result<()> {
        self.dev.send_multiple(gro, bufs, TUN_HEADROOM).map(|_| ())
    }

    fn wake(&self) {
        self.waiter.wake()
    }
}
