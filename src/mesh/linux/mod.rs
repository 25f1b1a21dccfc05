//! The real edges on Linux, one file per verb: `tun` the TUN device, `netlink` interface
//! configuration, `udp` the mesh UDP socket, `ifaddr` the machine's own addresses,
//! `sockets` listeners bound to the TUN device, `wait` the data-plane threads' blocking waits.

mod gro;
mod ifaddr;
mod netlink;
mod sockets;
mod tun;
mod udp;
mod wait;

pub use ifaddr::{interface_addresses, local_addresses, IfAddr};
pub use netlink::NetConfig;
pub mod mmsg;
pub mod netns;
pub use sockets::{bind_tcp_on_device, bind_udp_on_device};
pub use tun::LinuxTun;
pub use udp::{unmap, LinuxUdp};

use std::io;

/// What failed at the operating system's network edge, with how to fix it where that is known.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("cannot create TUN device {name}: {error}; {hint}")]
    Tun {
        name: String,
        error: io::Error,
        hint: String,
    },
    #[error(
        "UDP port {port} is already in use ({error}): another meshd or WireGuard may be running; \
         stop it or choose another port with --port (meshd init, join and run take it; run \
         saves it)"
    )]
    PortInUse { port: u16, error: io::Error },
    #[error("cannot bind UDP port {port}: {error}")]
    Bind { port: u16, error: io::Error },
    #[error("no network interface named {0}")]
    NoInterface(String),
    #[error("{what}: {error}")]
    Netlink {
        what: String,
        error: rtnetlink::Error,
    },
    #[error("{what}: {error}")]
    Io { what: String, error: io::Error },
    #[error("{0}")]
    Other(String),
}

impl NetError {
    pub fn io(what: impl Into<String>, error: io::Error) -> NetError {
        NetError::Io {
            what: what.into(),
            error,
        }
    }

    pub fn netlink(what: impl Into<String>, error: rtnetlink::Error) -> NetError {
        NetError::Netlink {
            what: what.into(),
            error,
        }
    }
}
