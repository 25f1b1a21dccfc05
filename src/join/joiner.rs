//! The joiner's side of a join: the signed request, the check of an answer, and the retry loop
//! over the token's bootstrap endpoints.

use crate::constants::{JOIN_ATTEMPT_MAX, JOIN_ATTEMPT_TIMEOUT, JOIN_DEADLINE, MAX_JOIN_FRAME};
use crate::mesh::io::UdpIo;
use crate::trust::{Cert, Context, Key32, MeshId, NodeKeys, Signed, Token, TrustError};
use crate::wire::{decode_frame, encode_frame, Frame, JoinAccept, JoinRequest, RefuseReason};
use std::net::SocketAddr;
use tokio::time::Instant;

/// What a successful join yields.
pub struct JoinOutcome {
    pub seed: Cert,
    pub seed_addr: SocketAddr,
    pub accept: JoinAccept,
}

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("{addr} refused the join: {message}")]
    Refused {
        addr: SocketAddr,
        reason: RefuseReason,
        message: String,
    },
    #[error(
        "no bootstrap endpoint answered ({tried}); check that one of them is running meshd and that \
         UDP to its port is not blocked, or pass a live member with --bootstrap ADDR:PORT"
    )]
    NoAnswer { tried: String },
    #[error("{addr} could not read the join request: {message}")]
    Unreadable { addr: SocketAddr, message: String },
    #[error("the token lists no bootstrap endpoint; pass one with --bootstrap ADDR:PORT")]
    NoBootstrap,
    #[error("sending the join request: {0}")]
    Io(#[from] std::io::Error),
}

/// Build the signed request.
pub fn make_request(
    keys: &NodeKeys,
    cert: &Signed,
    endpoints: Vec<SocketAddr>,
    now: u64,
) -> (Signed, [u8; 16]) {
    use rand_core::RngCore;
    let mut nonce = [0u8; 16];
    rand_core::OsRng.fill_bytes(&mut nonce);
    let req = JoinRequest {
        cert: cert.clone(),
        endpoints,
        sent_at: now,
        nonce,
    };
    (
        Signed::sign(Context::JoinRequest, &req, &keys.identity),
        nonce,
    )
}

/// Verify an acceptance: signed by a member of the token's mesh (and, where the token named the
/// endpoint's key, by that very node), answering our nonce and our identity.
pub fn verify_accept(
    raw: &Signed,
    mesh: &MeshId,
    nonce: &[u8; 16],
    identity: &Key32,
    expected_wg: Option<&Key32>,
) -> Result<(Cert, JoinAccept), TrustError> {
    let peek: JoinAccept = raw.peek("join answer")?;
    let seed = Cert::verify(&peek.seed_cert, mesh)?;
    let acc: JoinAccept = raw.verify(Context::JoinAccept, &seed.identity, "join answer")?;
    if acc.nonce != *nonce || acc.joiner != *identity {
        return Err(TrustError::Malformed {
            what: "join answer",
            detail: "it answers another request".into(),
        });
    }
    if let Some(wg) = expected_wg {
        if *wg != seed.wireguard {
            return Err(TrustError::Malformed {
                what: "join answer",
                detail: "it comes from another node than the token names".into(),
            });
        }
    }
    Ok((seed, acc))
}

/// The joiner's side: try each bootstrap endpoint in turn, passes with growing waits, until one
/// accepts, one refuses for a reason every member would agree on, or [`JOIN_DEADLINE`] passes.
/// Retries resend the same request, which a seed answers the same way (it is idempotent).
pub async fn join<U: UdpIo>(
    udp: &U,
    token: &Token,
    keys: &NodeKeys,
    cert: &Signed,
    endpoints: Vec<SocketAddr>,
    extra_bootstrap: &[SocketAddr],
    now: u64,
) -> Result<JoinOutcome, JoinError> {
    let mut targets: Vec<(SocketAddr, Option<Key32>)> =
        extra_bootstrap.iter().map(|a| (*a, None)).collect();
    targets.extend(token.bootstrap.iter().map(|b| (b.addr, Some(b.wireguard))));
    if targets.is_empty() {
        return Err(JoinError::NoBootstrap);
    }
    let (req, nonce) = make_request(keys, cert, endpoints, now);
    let frame = encode_frame(&Frame::Request(req));
    let identity = keys.identity_public();
    let mut buf = vec![0u8; MAX_JOIN_FRAME + 1];
    let give_up = Instant::now() + JOIN_DEADLINE;
    let mut wait = JOIN_ATTEMPT_TIMEOUT;
    let mut pass = 0u32;
    let mut unreadable = None;
    let mut unreadable_from = std::collections::HashSet::new();
    // Why a request could not be sent (no route, say), per endpoint: said once as it happens
    // and in the end, and a pass that sent nothing still waits before the next.
    let mut unsent: std::collections::HashMap<SocketAddr, String> = Default::default();
    while Instant::now() < give_up {
        if pass > 0 {
            tracing::info!(pass, "no answer to the join request yet; retrying");
        }
        pass += 1;
        let pass_started = Instant::now();
        for (addr, wg) in &targets {
            // A seed that could not read the request will not read it again.
            if unreadable_from.contains(addr) {
                continue;
            }
            if let Err(e) = udp.send_to(&frame, *addr) {
                let e = e.to_string();
                if unsent.get(addr) != Some(&e) {
                    tracing::warn!(%addr, error = %e, "cannot send the join request");
                }
                unsent.insert(*addr, e);
                continue;
            }
            unsent.remove(addr);
            let deadline = (Instant::now() + wait).min(give_up);
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                let Ok(r) = tokio::time::timeout(left, udp.recv_gro_async(&mut buf)).await else {
                    break;
                };
                // With UDP GRO, equal answers to retried requests may arrive as one buffer.
                let (n, from, segment) = r?;
                let n = n.min(segment.max(1));
                if from != *addr {
                    continue;
                }
                match decode_frame(&buf[..n]) {
                    Ok(Frame::Accept(raw)) => {
                        match verify_accept(&raw, &token.mesh(), &nonce, &identity, wg.as_ref()) {
                            Ok((seed, accept)) => {
                                return Ok(JoinOutcome {
                                    seed,
                                    seed_addr: *addr,
                                    accept,
                                })
                            }
                            Err(e) => {
                                tracing::warn!(%addr, error = %e, "ignoring an answer that does not verify");
                            }
                        }
                    }
                    // Refusals are unsigned, so only one naming this request's nonce counts (a
                    // sender that cannot see the request cannot make one).
                    Ok(Frame::Refuse(r)) if r.nonce == nonce => {
                        return Err(JoinError::Refused {
                            addr: *addr,
                            reason: r.reason,
                            message: r.message,
                        });
                    }
                    // A seed that cannot parse the request cannot name its nonce. Not final
                    // (anyone could send it), but the likeliest explanation if nobody else
                    // answers, so it is what the joiner reports in the end.
                    Ok(Frame::Refuse(r)) if r.nonce == [0u8; 16] => {
                        tracing::debug!(%addr, "the seed could not read the join request: {}", r.message);
                        unreadable_from.insert(*addr);
                        unreadable = Some(JoinError::Unreadable {
                            addr: *addr,
                            message: r.message,
                        });
                        break;
                    }
                    _ => {}
                }
            }
        }
        if unreadable_from.len() == targets.len() {
            break; // every seed says the same; retrying will not change it
        }
        // A pass takes at least `wait`, however quickly its sends failed or were refused.
        tokio::time::sleep_until((pass_started + wait).min(give_up)).await;
        wait = (wait * 3 / 2).min(JOIN_ATTEMPT_MAX);
    }
    if let Some(e) = unreadable {
        return Err(e);
    }
    Err(JoinError::NoAnswer {
        tried: targets
            .iter()
            .map(|(a, _)| match unsent.get(a) {
                Some(e) => format!("{a}: not sent: {e}"),
                None => a.to_string(),
            })
            .collect::<Vec<_>>()
            .join(", "),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trust::cert::tests::cert;
    use crate::trust::RootKey;
    use crate::wire::JoinRefuse;

    /// A token of a new mesh, and a joiner's keys and certificate under it.
    fn joiner() -> (Token, NodeKeys, Signed, u64) {
        let root = RootKey::generate();
        let now = crate::util::unix_now();
        let token = crate::node::setup::make_token(
            &root,
            "10.210.0.0/16".parse().unwrap(),
            "mesh.internal",
            std::time::Duration::from_secs(3600),
            None,
            vec![],
            now,
        );
        let keys = NodeKeys::generate();
        let c = cert(&token.invite_raw, &token.invite_secret, &keys, "j", now);
        (token, keys, c, now)
    }

    /// A seed at `addr` that cannot read join requests (another meshd version): it answers
    /// each without a nonce. How many it was sent.
    fn unreadable_seed(
        net: &crate::testing::mem::MemNet,
        addr: SocketAddr,
    ) -> std::sync::Arc<std::sync::atomic::AtomicUsize> {
        let seed = net.bind(addr).unwrap();
        let asked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = asked.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok((_, from)) = seed.recv_from(&mut buf).await {
                counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let no = JoinRefuse {
                    nonce: [0; 16],
                    reason: RefuseReason::Malformed,
                    message: "unknown field wg_sig".into(),
                };
                let _ = seed.send_to(&encode_frame(&Frame::Refuse(no)), from);
            }
        });
        asked
    }

    /// A socket with no route to some endpoints (all of them with `None`): sends there fail.
    /// Every send is counted.
    struct Unroutable(
        crate::testing::mem::MemUdp,
        std::sync::atomic::AtomicUsize,
        Option<SocketAddr>,
    );

    impl UdpIo for Unroutable {
        fn local_addr(&self) -> SocketAddr {
            self.0.local_addr()
        }
        fn wait_readable(&self) -> std::io::Result<()> {
            self.0.wait_readable()
        }
        fn try_recv_gro(&self, buf: &mut [u8]) -> std::io::Result<(usize, SocketAddr, usize)> {
            self.0.try_recv_gro(buf)
        }
        fn send_to(&self, d: &[u8], to: SocketAddr) -> std::io::Result<()> {
            let n = self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            assert!(n < 1000, "the join loop spins");
            match self.2 {
                Some(unroutable) if unroutable != to => self.0.send_to(d, to),
                _ => Err(std::io::Error::from_raw_os_error(libc::ENETUNREACH)),
            }
        }
        fn wake(&self) {
            self.0.wake()
        }
        async fn recv_gro_async(
            &self,
            buf: &mut [u8],
        ) -> std::io::Result<(usize, SocketAddr, usize)> {
            self.0.recv_gro_async(buf).await
        }
    }

    /// Sends that fail do not spin: each pass waits as when nothing answers (a few dozen
    /// sends in the whole deadline, not millions), and the error names why.
    #[tokio::test(start_paused = true)]
    async fn a_request_that_cannot_be_sent_is_retried_at_the_usual_pace() {
        use crate::testing::mem::MemNet;
        let net = MemNet::new();
        let udp = Unroutable(
            net.bind("192.0.2.2:51820".parse().unwrap()).unwrap(),
            Default::default(),
            None,
        );
        let seed: SocketAddr = "192.0.2.1:51820".parse().unwrap();
        let (token, keys, c, now) = joiner();
        let e = match join(&udp, &token, &keys, &c, vec![], &[seed], now).await {
            Err(e) => e.to_string(),
            Ok(_) => panic!("joined without sending"),
        };
        let sends = udp.1.load(std::sync::atomic::Ordering::Relaxed);
        assert!((5..=30).contains(&sends), "{sends} sends in the deadline");
        assert!(
            e.contains("192.0.2.1:51820: not sent:") && e.contains("unreachable"),
            "{e}"
        );
    }

    /// One seed that cannot read the request (it answers at once) and one that cannot be sent
    /// to: passes still take their time, and the unreadable seed is not asked again.
    #[tokio::test(start_paused = true)]
    async fn a_quick_refusal_beside_an_unroutable_seed_does_not_spin() {
        use crate::testing::mem::MemNet;
        let net = MemNet::new();
        let (a, b): (SocketAddr, SocketAddr) = (
            "192.0.2.1:51820".parse().unwrap(),
            "198.51.100.9:51820".parse().unwrap(),
        );
        let asked = unreadable_seed(&net, a);
        let udp = Unroutable(
            net.bind("192.0.2.2:51820".parse().unwrap()).unwrap(),
            Default::default(),
            Some(b),
        );
        let (token, keys, c, now) = joiner();
        let r = join(&udp, &token, &keys, &c, vec![], &[a, b], now).await;
        assert!(
            matches!(r, Err(JoinError::Unreadable { .. })),
            "{:?}",
            r.err()
        );
        assert_eq!(
            asked.load(std::sync::atomic::Ordering::Relaxed),
            1,
            "asked once"
        );
        let sends = udp.1.load(std::sync::atomic::Ordering::Relaxed);
        assert!(sends <= 30, "{sends} sends in the deadline");
    }

    /// A seed that cannot parse a request (another meshd version) answers without a nonce; the
    /// joiner reports that instead of "nobody answered", and gives up once every seed said so.
    #[tokio::test]
    async fn a_seed_that_cannot_read_the_request_is_reported() {
        use crate::testing::mem::MemNet;
        let net = MemNet::new();
        let seed_addr: SocketAddr = "192.0.2.1:51820".parse().unwrap();
        unreadable_seed(&net, seed_addr);
        let udp = net.bind("192.0.2.2:51820".parse().unwrap()).unwrap();
        let (token, keys, c, now) = joiner();
        let r = tokio::time::timeout(
            JOIN_DEADLINE * 2,
            join(&udp, &token, &keys, &c, vec![], &[seed_addr], now),
        )
        .await
        .expect("join gives up by its deadline");
        match r {
            Err(e @ JoinError::Unreadable { .. }) => {
                assert!(e.to_string().contains("unknown field wg_sig"), "{e}")
            }
            Err(e) => panic!("expected Unreadable, got {e}"),
            Ok(_) => panic!("expected Unreadable, got an acceptance"),
        }
    }
}
