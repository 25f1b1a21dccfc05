//! Two WireGuard tunnels with a session between them, without a device or a socket: for the
//! data plane's unit tests and `benches/crypto.rs`.

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};

/// Tunnels A and B after A's handshake: B's response and A's keepalive, not yet seen by B.
pub fn handshaken() -> (Tunn, Tunn, Vec<u8>, Vec<u8>) {
    let (sa, sb) = (
        StaticSecret::random_from_rng(rand_core::OsRng),
        StaticSecret::random_from_rng(rand_core::OsRng),
    );
    let (pa, pb) = (PublicKey::from(&sa), PublicKey::from(&sb));
    let mut a = Tunn::new(sa, pb, None, None, 1 << 8, None);
    let mut b = Tunn::new(sb, pa, None, None, 2 << 8, None);
    let (mut buf, mut buf2) = (vec![0u8; 2048], vec![0u8; 2048]);
    let TunnResult::WriteToNetwork(init) = a.format_handshake_initiation(&mut buf, false) else {
        panic!("initiation")
    };
    let TunnResult::WriteToNetwork(resp) = b.decapsulate(None, init, &mut buf2) else {
        panic!("response")
    };
    let resp = resp.to_vec();
    let TunnResult::WriteToNetwork(keepalive) = a.decapsulate(None, &resp, &mut buf) else {
        panic!("keepalive")
    };
    let keepalive = keepalive.to_vec();
    (a, b, resp, keepalive)
}
