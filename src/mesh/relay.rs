//! Relayed datagrams (sans-IO): the session header, and the relay's side, a table of sessions
//! it agreed to through its tunnels, each bound to the two members' endpoints.
//!
//! A relayed datagram is `MSHR` + session id (8 bytes, big-endian) + the two peers' own
//! WireGuard datagram: the relay can neither read nor forge what it carries. It forwards a
//! frame only from one bound endpoint of a session to the other, unchanged in size (never
//! more bytes out than in, so it cannot be made a reflector or an amplifier), within a byte
//! rate per session. Everything else is dropped and counted.
//!
//! MTU: 20 (IPv4) + 8 (UDP) + 12 (this header) + 32 (WireGuard) + 1420 (inner packet) = 1492
//! bytes, so a full-size inner packet crosses a relayed path on a 1500-byte IPv4 underlay
//! without fragmentation.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

pub const RELAY_MAGIC: &[u8; 4] = b"MSHR";
/// Bytes before the WireGuard datagram.
pub const RELAY_HEADER: usize = 12;
/// Sessions one relay holds, at most.
pub const MAX_SESSIONS: usize = 4096;
/// Bytes a second forwarded per session (both directions together), sustained...
pub const RATE_BYTES: f64 = 64.0 * 1024.0 * 1024.0;
/// ...and in a burst.
pub const BURST_BYTES: f64 = 4.0 * 1024.0 * 1024.0;

/// The header for `session`.
pub fn header(session: u64) -> [u8; RELAY_HEADER] {
    let mut h = [0u8; RELAY_HEADER];
    h[..4].copy_from_slice(RELAY_MAGIC);
    h[4..].copy_from_slice(&session.to_be_bytes());
    h
}

/// The session and the WireGuard datagram of a relayed frame.
pub fn parse(frame: &[u8]) -> Option<(u64, &[u8])> {
    if frame.len() <= RELAY_HEADER || !frame.starts_with(RELAY_MAGIC) {
        return None;
    }
    let session = u64::from_be_bytes(frame[4..RELAY_HEADER].try_into().ok()?);
    Some((session, &frame[RELAY_HEADER..]))
}

#[derive(Clone, Copy, Debug)]
struct Session {
    ends: [SocketAddr; 2],
    tokens: f64,
    refilled: Instant,
}

/// Why a frame was not forwarded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// No such session here.
    Unknown,
    /// The sender is neither end of the session.
    Unbound,
    /// Over the session's rate.
    Rate,
}

/// The relay's sessions.
#[derive(Debug, Default)]
pub struct RelayTable {
    sessions: HashMap<u64, Session>,
}

impl RelayTable {
    /// Agree to relay `session` between `a` and `b` (or rebind it to where they are now).
    /// False when the table is full.
    pub fn bind(&mut self, session: u64, a: SocketAddr, b: SocketAddr, now: Instant) -> bool {
        if let Some(s) = self.sessions.get_mut(&session) {
            s.ends = [a, b];
            return true;
        }
        if self.sessions.len() >= MAX_SESSIONS {
            return false;
        }
        self.sessions.insert(
            session,
            Session {
                ends: [a, b],
                tokens: BURST_BYTES,
                refilled: now,
            },
        );
        true
    }

    pub fn unbind(&mut self, session: u64) {
        self.sessions.remove(&session);
    }

    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// The bound ends of `session`.
    pub fn ends(&self, session: u64) -> Option<[SocketAddr; 2]> {
        self.sessions.get(&session).map(|s| s.ends)
    }

    /// Where a frame of `len` bytes for `session` from `from` goes, if anywhere.
    pub fn forward(
        &mut self,
        session: u64,
        from: SocketAddr,
        len: usize,
        now: Instant,
    ) -> Result<SocketAddr, Refused> {
        let s = self.sessions.get_mut(&session).ok_or(Refused::Unknown)?;
        let to = if from == s.ends[0] {
            s.ends[1]
        } else if from == s.ends[1] {
            s.ends[0]
        } else {
            return Err(Refused::Unbound);
        };
        let dt = now.saturating_duration_since(s.refilled);
        if dt > Duration::ZERO {
            s.tokens = (s.tokens + dt.as_secs_f64() * RATE_BYTES).min(BURST_BYTES);
            s.refilled = now;
        }
        if s.tokens < len as f64 {
            return Err(Refused::Rate);
        }
        s.tokens -= len as f64;
        Ok(to)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn frames_round_trip() {
        let mut f = header(0x0102_0304_0506_0708).to_vec();
        f.extend_from_slice(&[4, 0, 0, 0, 9]);
        assert_eq!(
            parse(&f),
            Some((0x0102_0304_0506_0708, &[4u8, 0, 0, 0, 9][..]))
        );
        assert_eq!(parse(&f[..RELAY_HEADER]), None, "nothing carried");
        assert_eq!(parse(b"MSHDxxxxxxxxxxxxx"), None);
        assert_eq!(parse(&[]), None);
    }

    #[test]
    fn only_the_bound_ends_are_forwarded_between_and_within_the_rate() {
        let t = Instant::now();
        let (a, b, x) = (
            sa("203.0.113.11:51820"),
            sa("203.0.113.12:40000"),
            sa("198.51.100.9:51820"),
        );
        let mut r = RelayTable::default();
        assert_eq!(r.forward(1, a, 100, t), Err(Refused::Unknown));
        assert!(r.bind(1, a, b, t));
        assert_eq!(r.forward(1, a, 100, t), Ok(b));
        assert_eq!(r.forward(1, b, 100, t), Ok(a));
        assert_eq!(r.forward(1, x, 100, t), Err(Refused::Unbound));
        assert_eq!(r.forward(2, a, 100, t), Err(Refused::Unknown));
        // The burst, then the rate.
        let mut sent = 0.0;
        while r.forward(1, a, 1400, t).is_ok() {
            sent += 1400.0;
        }
        assert!(sent <= BURST_BYTES, "{sent}");
        assert_eq!(r.forward(1, a, 1400, t), Err(Refused::Rate));
        assert_eq!(r.forward(1, a, 1400, t + Duration::from_millis(10)), Ok(b));
        // Rebinding follows a roamed end; unbinding ends it.
        assert!(r.bind(1, x, b, t));
        assert_eq!(
            r.forward(1, a, 1, t + Duration::from_secs(1)),
            Err(Refused::Unbound)
        );
        assert_eq!(r.forward(1, x, 1, t + Duration::from_secs(1)), Ok(b));
        r.unbind(1);
        assert_eq!(r.forward(1, x, 1, t), Err(Refused::Unknown));
        assert!(r.is_empty());
    }

    #[test]
    fn the_table_is_bounded() {
        let t = Instant::now();
        let mut r = RelayTable::default();
        let (a, b) = (sa("203.0.113.11:1"), sa("203.0.113.12:1"));
        for i in 0..MAX_SESSIONS as u64 {
            assert!(r.bind(i, a, b, t));
        }
        assert!(!r.bind(u64::MAX, a, b, t));
        assert!(
            r.bind(0, b, a, t),
            "an existing session can always be rebound"
        );
        assert_eq!(r.len(), MAX_SESSIONS);
    }

    proptest! {
        #[test]
        fn parse_never_panics(d in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = parse(&d);
        }
    }
}
