//! Small formatting helpers shared by logs, status output and errors.

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Completes on the first SIGINT or SIGTERM (never, if the handlers cannot be installed).
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
}

/// Wall-clock now as unix seconds. Only the edges call this; logic takes `now` as a parameter.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Wall-clock now as unix milliseconds (record sequence numbers).
pub fn unix_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The sequence number of a signed record after `prev`: the clock in milliseconds, but always
/// above `prev` (a clock that went back must not make the record look older).
pub fn next_seq(prev: u64) -> u64 {
    unix_now_ms().max(prev.saturating_add(1))
}

/// Standard base64 of a key, as WireGuard tools print it.
pub fn b64(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

/// URL-safe base64 without padding (tokens, gossip values).
pub fn b64url(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

pub fn from_b64url(s: &str) -> Result<Vec<u8>, base64::DecodeError> {
    URL_SAFE_NO_PAD.decode(s.trim())
}

/// A key abbreviated for humans and logs: `AbCd…WxYz`.
pub fn short_key(bytes: &[u8]) -> String {
    let s = b64(bytes);
    if s.len() <= 10 {
        return s;
    }
    format!("{}…{}", &s[..4], &s[s.len() - 5..s.len() - 1])
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// "12s ago", "4m ago", "3h ago", "2d ago".
pub fn ago(d: Duration) -> String {
    format!("{} ago", human_duration(d))
}

/// "12s", "4m", "3h", "2d".
pub fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    if s < 60 {
        format!("{s}s")
    } else if s < 3600 {
        format!("{}m", s / 60)
    } else if s < 86400 {
        format!("{}h", s / 3600)
    } else {
        format!("{}d", s / 86400)
    }
}

/// "0 B", "512 B", "1.2 KiB", "3.4 MiB", "1.0 GiB".
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// Whether `name` is a valid DNS label as meshd uses node names: 1-63 characters of
/// `a-z`, `0-9` and `-`, not starting or ending with `-`.
pub fn is_dns_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// Whether `name` may name a network interface as meshd creates them (TUN, bridge): 1-15
/// characters of `a-z`, `A-Z`, `0-9`, `-` and `_`.
pub fn is_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// [`is_ifname`], with what to give instead for option `flag` (`--tun`).
pub fn check_ifname(flag: &str, name: &str) -> Result<(), String> {
    if is_ifname(name) {
        return Ok(());
    }
    Err(format!(
        "{flag} {name:?} is not an interface name: 1-15 letters, digits, '-' and '_'"
    ))
}

/// At most `burst` events per `window` for each key, remembering at most `capacity` keys: what
/// unauthenticated senders can make this node do (log, look up, answer) is bounded per sender
/// and in total. When the table is full of live windows, keys not in it share one overflow
/// window of `burst` events, so a flood of fresh keys slows newcomers down but cannot shut
/// them out, and never grows the table.
pub struct KeyedLimiter<K> {
    windows: std::collections::HashMap<K, (std::time::Instant, u32)>,
    overflow: (std::time::Instant, u32),
    last_sweep: Option<std::time::Instant>,
    window: Duration,
    burst: u32,
    capacity: usize,
}

/// Advance a window to `now` and count one event in it; whether it is within `burst`.
fn count_in(
    w: &mut (std::time::Instant, u32),
    now: std::time::Instant,
    window: Duration,
    burst: u32,
) -> bool {
    if now.saturating_duration_since(w.0) >= window {
        *w = (now, 0);
    }
    w.1 = w.1.saturating_add(1);
    w.1 <= burst
}

/// The key a datagram's sender is limited under: its IPv4 address, or its IPv6 /64 (one host
/// commonly holds a whole /64, so per-address limits would not bound it).
pub fn sender_key(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip.to_canonical() {
        std::net::IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            std::net::IpAddr::V6(prefix.into())
        }
        v4 => v4,
    }
}

impl<K: std::hash::Hash + Eq> KeyedLimiter<K> {
    pub fn new(window: Duration, burst: u32, capacity: usize) -> Self {
        let now = std::time::Instant::now();
        KeyedLimiter {
            windows: std::collections::HashMap::new(),
            overflow: (now, 0),
            last_sweep: None,
            window,
            burst,
            capacity,
        }
    }

    /// Whether one more event for `key` is allowed at `now` (and count it if so).
    pub fn allow(&mut self, key: K, now: std::time::Instant) -> bool {
        let (window, burst) = (self.window, self.burst);
        if let Some(w) = self.windows.get_mut(&key) {
            return count_in(w, now, window, burst);
        }
        // Full: drop ended windows, at most once per window (a sweep is O(capacity)).
        if self.windows.len() >= self.capacity
            && self
                .last_sweep
                .is_none_or(|t| now.saturating_duration_since(t) >= window)
        {
            self.last_sweep = Some(now);
            self.windows
                .retain(|_, (start, _)| now.saturating_duration_since(*start) < window);
        }
        if self.windows.len() >= self.capacity {
            return count_in(&mut self.overflow, now, window, burst);
        }
        self.windows.insert(key, (now, 1));
        burst >= 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn senders_are_keyed_by_ipv4_address_or_ipv6_slash_64() {
        let k = |s: &str| sender_key(s.parse().unwrap()).to_string();
        assert_eq!(k("192.0.2.7"), "192.0.2.7");
        assert_eq!(k("::ffff:192.0.2.7"), "192.0.2.7");
        assert_eq!(k("2001:db8:1:2:aaaa:bbbb:cccc:dddd"), "2001:db8:1:2::");
        assert_eq!(k("2001:db8:1:2::1"), k("2001:db8:1:2:ffff::9"));
        assert_ne!(k("2001:db8:1:2::1"), k("2001:db8:1:3::1"));
    }

    #[test]
    fn keyed_limiter_bounds_each_key_and_the_table() {
        let t0 = std::time::Instant::now();
        let mut l = KeyedLimiter::new(Duration::from_secs(1), 2, 3);
        assert!(l.allow(1, t0));
        assert!(l.allow(1, t0));
        assert!(!l.allow(1, t0), "third in the window");
        assert!(l.allow(2, t0));
        assert!(l.allow(3, t0));
        // Full of live windows: new keys share one overflow window of the same burst.
        assert!(l.allow(4, t0), "overflow window");
        assert!(l.allow(5, t0), "overflow window");
        assert!(!l.allow(6, t0), "overflow window spent");
        assert!(!l.allow(4, t0), "overflow window spent");
        assert_eq!(
            l.windows.len(),
            3,
            "the table never grows past its capacity"
        );
        let t1 = t0 + Duration::from_secs(1);
        assert!(l.allow(4, t1), "expired windows make room");
        assert!(l.allow(1, t1), "a new window for the first key");
        assert!(l.windows.len() <= 3);
    }

    #[test]
    fn formats_durations_and_sizes() {
        assert_eq!(ago(Duration::from_secs(12)), "12s ago");
        assert_eq!(human_duration(Duration::from_secs(240)), "4m");
        assert_eq!(human_duration(Duration::from_secs(3 * 3600 + 5)), "3h");
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1229), "1.2 KiB");
        assert_eq!(human_bytes(3 * 1024 * 1024 + 400 * 1024), "3.4 MiB");
    }

    #[test]
    fn short_keys_keep_both_ends() {
        let k = [7u8; 32];
        let s = short_key(&k);
        assert!(s.contains('…'));
        assert!(b64(&k).starts_with(&s[..4]));
    }

    #[test]
    fn dns_labels() {
        for ok in ["a", "db1", "node-7", &"x".repeat(63)] {
            assert!(is_dns_label(ok), "{ok}");
        }
        for bad in ["", "-a", "a-", "A", "a_b", "a.b", &"x".repeat(64), "é"] {
            assert!(!is_dns_label(bad), "{bad}");
        }
    }
}
