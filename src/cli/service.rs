//! Running as a Linux service: readiness for systemd (`sd_notify`), logs journald sorts by
//! priority, the permission check before anything is touched, and exit codes that tell a
//! service manager what not to restart.

use crate::node::setup::SetupError;
use crate::node::NodeError;
use crate::state::StateError;
use crate::trust::TrustError;
use std::fmt;
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// sysexits(3) EX_NOPERM: missing permission (not restarted by the unit).
pub const EXIT_NO_PERMISSION: u8 = 77;
/// sysexits(3) EX_CONFIG: bad configuration or state (not restarted by the unit).
pub const EXIT_CONFIG: u8 = 78;

/// Tell the service manager about this process (`READY=1`, `STATUS=...`, `STOPPING=1`): a
/// datagram to `$NOTIFY_SOCKET`, when there is one. Whether it was sent.
pub fn notify(state: &str) -> bool {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return false;
    };
    let sock = match std::os::unix::net::UnixDatagram::unbound() {
        Ok(s) => s,
        Err(_) => return false,
    };
    let bytes = path.as_encoded_bytes();
    let sent = if let Some(name) = bytes.strip_prefix(b"@") {
        // An abstract socket.
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|a| sock.send_to_addr(state.as_bytes(), &a))
    } else {
        sock.send_to(state.as_bytes(), std::path::Path::new(&path))
    };
    sent.is_ok()
}

/// Whether standard error is journald's stream (`$JOURNAL_STREAM` names its device and inode).
pub fn under_journald() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(v) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.split_once(':') else {
        return false;
    };
    let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    dev.parse() == Ok(meta.dev()) && ino.parse() == Ok(meta.ino())
}

/// Log lines for journald: a `<N>` priority prefix (sd-daemon(3)) and no timestamp of our own.
pub struct Journald<F>(pub F);

impl<S, N, F> FormatEvent<S, N> for Journald<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        write!(w, "<{}>", priority(event.metadata().level()))?;
        self.0.format_event(ctx, w, event)
    }
}

/// syslog priority of a tracing level.
pub fn priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        _ => 7,
    }
}

/// meshd creates a TUN device, addresses and routes: it needs CAP_NET_ADMIN (root has it).
/// Checked before anything is read or written, so a first run without it leaves nothing behind.
pub fn check_net_admin() -> Result<(), NoPermission> {
    const CAP_NET_ADMIN: u32 = 12;
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok());
    match eff {
        Some(caps) if caps & (1 << CAP_NET_ADMIN) == 0 => Err(NoPermission),
        _ => Ok(()),
    }
}

#[derive(Debug, thiserror::Error)]
#[error(
    "meshd needs root (precisely CAP_NET_ADMIN) to create its TUN device and set routes: run it \
     with sudo, or as the systemd service (sudo systemctl start meshd)"
)]
pub struct NoPermission;

/// A value on the command line (or standard input) meshd cannot use: exit status
/// [`EXIT_CONFIG`], which the unit does not restart on (the same input fails the same way).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadInput(pub String);

/// The exit status for an error: [`EXIT_NO_PERMISSION`], [`EXIT_CONFIG`] or 1.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    for cause in e.chain() {
        if cause.is::<NoPermission>() {
            return EXIT_NO_PERMISSION;
        }
        if cause.is::<BadInput>() {
            return EXIT_CONFIG;
        }
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::PermissionDenied {
                return EXIT_NO_PERMISSION;
            }
        }
        let state = |s: &StateError| match s {
            StateError::Io { source, .. }
                if source.kind() == std::io::ErrorKind::PermissionDenied =>
            {
                Some(EXIT_NO_PERMISSION)
            }
            StateError::Io { .. } => None,
            _ => Some(EXIT_CONFIG),
        };
        let code = if let Some(s) = cause.downcast_ref::<StateError>() {
            state(s)
        } else if let Some(s) = cause.downcast_ref::<SetupError>() {
            match s {
                SetupError::State(s) => state(s),
                SetupError::Net(_) | SetupError::Failed(_) => None,
                _ => Some(EXIT_CONFIG),
            }
        } else if let Some(n) = cause.downcast_ref::<NodeError>() {
            match n {
                NodeError::State(s) => state(s),
                _ => None,
            }
        } else if cause.is::<TrustError>() {
            Some(EXIT_CONFIG)
        } else {
            None
        };
        if let Some(c) = code {
            return c;
        }
    }
    1
}

/// The error and its causes on one line, each cause once (an error that already shows its
/// source is not followed by it again).
pub fn describe(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let s = cause.to_string();
        if out.contains(&s) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&s);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_exit_codes_a_service_manager_understands() {
        let denied = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        let e = anyhow::Error::new(StateError::Io {
            path: "/var/lib/meshd".into(),
            source: denied,
        });
        assert_eq!(exit_code(&e), EXIT_NO_PERMISSION);
        assert_eq!(
            describe(&e).matches("ermission denied").count(),
            1,
            "said once: {}",
            describe(&e)
        );
        let e = anyhow::Error::new(StateError::Corrupt {
            path: "node.json".into(),
            reason: "bad".into(),
        });
        assert_eq!(exit_code(&e), EXIT_CONFIG);
        assert_eq!(
            exit_code(&anyhow::Error::new(NoPermission)),
            EXIT_NO_PERMISSION
        );
        assert_eq!(exit_code(&anyhow::anyhow!("the network is down")), 1);
        let e = anyhow::Error::new(NoPermission).context("starting");
        assert_eq!(exit_code(&e), EXIT_NO_PERMISSION);
    }

    #[test]
    fn priorities_follow_syslog() {
        assert_eq!(priority(&Level::ERROR), 3);
        assert_eq!(priority(&Level::WARN), 4);
        assert_eq!(priority(&Level::INFO), 6);
        assert_eq!(priority(&Level::DEBUG), 7);
    }

    #[test]
    fn readiness_reaches_the_notify_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        // The environment is per process: set it only for this check, in a child.
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "cli::service::tests::notify_child",
                "--nocapture",
            ])
            .env("NOTIFY_SOCKET", &path)
            .env("MESHD_NOTIFY_CHILD", "1")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut buf = [0u8; 128];
        listener
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=test");
    }

    #[test]
    fn notify_child() {
        if std::env::var_os("MESHD_NOTIFY_CHILD").is_some() {
            assert!(notify("READY=1\nSTATUS=test"));
        }
    }
}
