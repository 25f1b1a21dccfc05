//! Host integration with systemd-resolved, through its D-Bus API (no `resolvectl`): the mesh
//! domain is routed to this node's DNS on the TUN link, and nothing else is. Where resolved does
//! not run, meshd leaves the host's resolver configuration alone; it never rewrites
//! /etc/resolv.conf or /etc/hosts.

use std::net::Ipv4Addr;
use std::time::Duration;

const DEST: &str = "org.freedesktop.resolve1";
const PATH: &str = "/org/freedesktop/resolve1";
const IFACE: &str = "org.freedesktop.resolve1.Manager";
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// A call to systemd-resolved that failed.
#[derive(Debug, thiserror::Error)]
pub enum ResolvedError {
    #[error("systemd-resolved did not answer {0} in time")]
    Timeout(&'static str),
    #[error("systemd-resolved {0}: {1}")]
    Call(&'static str, zbus::Error),
}

pub struct Resolved {
    conn: zbus::Connection,
}

impl Resolved {
    /// The system bus, if systemd-resolved runs on it (`DBUS_SYSTEM_BUS_ADDRESS` is honoured).
    pub async fn detect() -> Option<Resolved> {
        let conn = tokio::time::timeout(CALL_TIMEOUT, zbus::Connection::system())
            .await
            .ok()?
            .ok()?;
        let reply = tokio::time::timeout(
            CALL_TIMEOUT,
            conn.call_method(
                Some("org.freedesktop.DBus"),
                "/org/freedesktop/DBus",
                Some("org.freedesktop.DBus"),
                "NameHasOwner",
                &(DEST,),
            ),
        )
        .await
        .ok()?
        .ok()?;
        let running: bool = reply.body().deserialize().ok()?;
        running.then_some(Resolved { conn })
    }

    async fn call<B>(&self, method: &'static str, body: &B) -> Result<(), ResolvedError>
    where
        B: serde::Serialize + zbus::zvariant::DynamicType,
    {
        tokio::time::timeout(
            CALL_TIMEOUT,
            self.conn
                .call_method(Some(DEST), PATH, Some(IFACE), method, body),
        )
        .await
        .map_err(|_| ResolvedError::Timeout(method))?
        .map_err(|e| ResolvedError::Call(method, e))?;
        Ok(())
    }

    /// Route `domain` (and only it) to `server` on link `ifindex`, and make it a search domain.
    pub async fn register(
        &self,
        ifindex: i32,
        server: Ipv4Addr,
        domain: &str,
    ) -> Result<(), ResolvedError> {
        self.call(
            "SetLinkDNS",
            &(ifindex, vec![(libc::AF_INET, server.octets().to_vec())]),
        )
        .await?;
        self.call(
            "SetLinkDomains",
            &(
                ifindex,
                vec![(domain.to_string(), true), (domain.to_string(), false)],
            ),
        )
        .await?;
        // Never the default route: other names keep going where they went before. Older
        // resolved versions lack these calls; that only costs a little noise.
        for (m, r) in [
            (
                "SetLinkDefaultRoute",
                self.call("SetLinkDefaultRoute", &(ifindex, false)).await,
            ),
            (
                "SetLinkLLMNR",
                self.call("SetLinkLLMNR", &(ifindex, "no")).await,
            ),
            (
                "SetLinkMulticastDNS",
                self.call("SetLinkMulticastDNS", &(ifindex, "no")).await,
            ),
        ] {
            if let Err(e) = r {
                tracing::debug!(method = m, error = %e, "optional resolved call failed");
            }
        }
        Ok(())
    }

    /// Undo everything set on the link.
    pub async fn revert(&self, ifindex: i32) -> Result<(), ResolvedError> {
        self.call("RevertLink", &(ifindex,)).await
    }
}
