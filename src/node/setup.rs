//! Creating a node's state: `meshd init` (a new mesh) and `meshd join` (an existing one).
//! Nothing is written until the node is fully defined; `node.json` is written last and marks the
//! directory as holding a node, so a crash half-way leaves a directory `init`/`join` can reuse.

use super::platform::Platform;
use crate::constants::{DEFAULT_INVITE_TTL, TOKEN_BOOTSTRAP_MEMBERS};
use crate::id::MeshRange;
use crate::join::{self, JoinError};
use crate::mesh::linux::NetError;
use crate::state::{
    encode_key, BootstrapEntry, CachedMember, MemberCache, NodeConfig, StateDir, StateError,
    STATE_VERSION,
};
use crate::trust::{
    Bootstrap, Cert, InviteBody, MeshId, NodeCertBody, NodeKeys, RootKey, Token, TrustError,
};
use ed25519_dalek::SigningKey;
use std::net::{SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::time::Duration;

pub struct InitParams {
    pub name: String,
    pub range: MeshRange,
    pub domain: String,
    pub port: u16,
    pub endpoints: Vec<SocketAddr>,
    pub tun: String,
    pub dns_upstream: Vec<SocketAddr>,
    /// The node's keys; `None` makes new ones (tests choose them).
    pub keys: Option<NodeKeys>,
}

pub struct JoinParams {
    pub name: String,
    pub port: u16,
    pub endpoints: Vec<SocketAddr>,
    pub tun: String,
    pub bootstrap: Vec<SocketAddr>,
    pub dns_upstream: Vec<SocketAddr>,
    /// The node's keys; `None` makes new ones (tests choose them).
    pub keys: Option<NodeKeys>,
}

/// Why `meshd init` or `meshd join` did not create a node. Nothing was written.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error(transparent)]
    Trust(#[from] TrustError),
    #[error(
        "{} holds the root key of mesh {kept} (kept when this node left it); a new mesh here would \
         overwrite it, and it is the only way to administer that mesh. Move {} somewhere safe, \
         or use another --state-dir",
        .dir.display(),
        .key.display()
    )]
    KeptRootKey {
        dir: PathBuf,
        kept: MeshId,
        key: PathBuf,
    },
    #[error(
        "{} holds the root key of mesh {kept} (kept when this node left it); joining mesh {token} \
         here would mix the two. Move {} somewhere safe (it is the only way to administer that \
         mesh), or use another --state-dir",
        .dir.display(),
        .key.display()
    )]
    KeptRootKeyOtherMesh {
        dir: PathBuf,
        kept: MeshId,
        token: MeshId,
        key: PathBuf,
    },
    #[error(
        "this node ({name:?} in {}) is already a member of mesh {current}; the token is for mesh \
         {token}. Leave the current mesh first (meshd leave) or use another --state-dir",
        .dir.display()
    )]
    OtherMesh {
        name: String,
        dir: PathBuf,
        current: MeshId,
        token: MeshId,
    },
    #[error(
        "the join token cannot be used: {0}; ask an administrator for a new one (meshctl invite)"
    )]
    StaleToken(TrustError),
    #[error("join refused: {0}")]
    Refused(JoinError),
    #[error("join failed: {0}")]
    Failed(JoinError),
}

/// Endpoints to publish: the explicit ones, or the machine's addresses with the port.
pub fn effective_endpoints(
    explicit: &[SocketAddr],
    port: u16,
    local: Vec<std::net::IpAddr>,
) -> Vec<SocketAddr> {
    if !explicit.is_empty() {
        return explicit.to_vec();
    }
    local
        .into_iter()
        .map(|ip| SocketAddr::new(ip, port))
        .collect()
}

/// Make an invite and its token. `bootstrap` are members the joiner can contact.
pub fn make_token(
    root: &RootKey,
    range: MeshRange,
    domain: &str,
    ttl: Duration,
    uses: Option<u32>,
    bootstrap: Vec<Bootstrap>,
    now: u64,
) -> Token {
    let secret = SigningKey::generate(&mut rand_core::OsRng);
    let invite = InviteBody {
        mesh: MeshId(root.public()),
        range,
        domain: domain.to_string(),
        invite_key: secret.verifying_key().to_bytes(),
        created_at: now,
        expires_at: now + ttl.as_secs(),
        max_uses: uses,
    };
    let mut bootstrap = bootstrap;
    bootstrap.truncate(TOKEN_BOOTSTRAP_MEMBERS * 2);
    Token::create(&root.0, invite, secret, bootstrap)
}

/// `meshd init`: a new mesh with this node as its first member and administrator. Returns the
/// first join token (24 h, unlimited uses).
pub fn create_mesh<P: Platform>(
    platform: &P,
    state: &StateDir,
    p: &InitParams,
    now: u64,
) -> Result<Token, SetupError> {
    state.ensure_empty()?;
    if let Some(old) = state.load_root()? {
        return Err(SetupError::KeptRootKey {
            dir: state.path().to_path_buf(),
            kept: MeshId(old.public()),
            key: state.file("root.key"),
        });
    }
    let root = RootKey::generate();
    let keys = p.keys.clone().unwrap_or_else(NodeKeys::generate);
    // The first node joins through an invite of its own, so every certificate has the same
    // chain root -> invite -> node.
    let own = make_token(
        &root,
        p.range,
        &p.domain,
        Duration::from_secs(3600),
        Some(1),
        vec![],
        now,
    );
    let cert = NodeCertBody::new(&own.invite_raw, &own.invite.invite_key, &p.name, &keys, now)
        .sign(&own.invite_secret);
    Cert::verify(&cert, &MeshId(root.public()))?;
    let endpoints = effective_endpoints(
        &p.endpoints,
        p.port,
        platform.local_addresses(&p.tun, &p.range),
    );
    let token = make_token(
        &root,
        p.range,
        &p.domain,
        DEFAULT_INVITE_TTL,
        None,
        endpoints
            .iter()
            .map(|a| Bootstrap {
                addr: *a,
                wireguard: keys.wg_public(),
            })
            .collect(),
        now,
    );
    let config = NodeConfig {
        version: STATE_VERSION,
        mesh: encode_key(&root.public()),
        name: p.name.clone(),
        cert: cert.to_b64(),
        slot_k: 0,
        port: p.port,
        endpoints: p.endpoints.clone(),
        bootstrap: vec![],
        tun: p.tun.clone(),
        dns_upstream: p.dns_upstream.clone(),
    };
    state.ensure()?;
    state.save_root(&root)?;
    state.save_keys(&keys)?;
    state.save_members(&MemberCache {
        version: STATE_VERSION,
        ..Default::default()
    })?;
    state.save_node(&config)?;
    Ok(token)
}

/// `meshd join`: ask a bootstrap member to admit this machine, then write its state. Returns the
/// UDP socket the join used, so the node keeps the port the seed saw.
pub async fn join_mesh<P: Platform>(
    platform: &P,
    state: &StateDir,
    token: &Token,
    p: &JoinParams,
    now: u64,
) -> Result<P::Udp, SetupError> {
    if state.is_initialized() {
        if let Ok(c) = state.load_node() {
            if let Ok(m) = c.mesh_id() {
                if m != token.mesh() {
                    return Err(SetupError::OtherMesh {
                        name: c.name,
                        dir: state.path().to_path_buf(),
                        current: m,
                        token: token.mesh(),
                    });
                }
            }
        }
        state.ensure_empty()?;
    }
    if let Some(root) = state.load_root()? {
        if root.public() != token.mesh().0 {
            return Err(SetupError::KeptRootKeyOtherMesh {
                dir: state.path().to_path_buf(),
                kept: MeshId(root.public()),
                token: token.mesh(),
                key: state.file("root.key"),
            });
        }
    }
    token.check_fresh(now).map_err(SetupError::StaleToken)?;
    let keys = p.keys.clone().unwrap_or_else(NodeKeys::generate);
    // A joiner whose clock is a little behind the administrator's still issues a certificate
    // inside the invite's validity (seeds check the time against their own clocks).
    let cert = NodeCertBody::new(
        &token.invite_raw,
        &token.invite.invite_key,
        &p.name,
        &keys,
        now.max(token.invite.created_at),
    )
    .sign(&token.invite_secret);
    let udp = platform.bind_udp(p.port)?;
    platform.check_tun(&p.tun)?;
    let endpoints = effective_endpoints(
        &p.endpoints,
        p.port,
        platform.local_addresses(&p.tun, &token.invite.range),
    );
    let outcome = join::join(&udp, token, &keys, &cert, endpoints, &p.bootstrap, now)
        .await
        .map_err(|e| match e {
            JoinError::Refused { .. } => SetupError::Refused(e),
            other => SetupError::Failed(other),
        })?;
    let acc = &outcome.accept;
    tracing::info!(
        seed = %outcome.seed.name,
        at = %outcome.seed_addr,
        "admitted to mesh {}",
        token.mesh()
    );
    let mut members = vec![CachedMember {
        cert: acc.seed_cert.to_b64(),
        record: Some(acc.seed_record.to_b64()),
        services: None,
        routes: None,
        about: None,
        workloads: None,
        last_seen: now,
        first_seen: now,
        admitted_k: None,
        admitted_from: None,
    }];
    for (c, r) in &acc.members {
        members.push(CachedMember {
            cert: c.to_b64(),
            record: r.as_ref().map(|r| r.to_b64()),
            services: None,
            routes: None,
            about: None,
            workloads: None,
            last_seen: now,
            first_seen: now,
            admitted_k: None,
            admitted_from: None,
        });
    }
    let cache = MemberCache {
        version: STATE_VERSION,
        members,
        revocations: acc.revocations.iter().map(|r| r.to_b64()).collect(),
        ..Default::default()
    };
    let config = NodeConfig {
        version: STATE_VERSION,
        mesh: encode_key(&token.mesh().0),
        name: p.name.clone(),
        cert: cert.to_b64(),
        slot_k: acc.slot_k,
        port: p.port,
        endpoints: p.endpoints.clone(),
        bootstrap: token
            .bootstrap
            .iter()
            .map(|b| BootstrapEntry {
                addr: b.addr,
                wireguard: encode_key(&b.wireguard),
            })
            .collect(),
        tun: p.tun.clone(),
        dns_upstream: p.dns_upstream.clone(),
    };
    state.ensure()?;
    state.save_keys(&keys)?;
    state.save_members(&cache)?;
    state.save_node(&config)?;
    Ok(udp)
}

/// Parse `ADDR:PORT`, accepting a bare address with the default port.
pub fn parse_endpoint(s: &str, default_port: u16) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    if let Ok(ip) = s.parse::<std::net::IpAddr>() {
        return Ok(SocketAddr::new(ip, default_port));
    }
    if let Some((h, p)) = s.rsplit_once(':') {
        if let (Ok(ip), Ok(port)) = (h.parse::<std::net::Ipv4Addr>(), p.parse::<u16>()) {
            return Ok(SocketAddr::V4(SocketAddrV4::new(ip, port)));
        }
    }
    Err(format!(
        "{s:?} is not an address: write ADDRESS or ADDRESS:PORT, e.g. 203.0.113.7:{default_port} \
         or [2001:db8::7]:{default_port} (the port is {default_port} when left out)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `meshd init --name alpha` parameters.
    fn alpha(port: u16) -> InitParams {
        InitParams {
            name: "alpha".into(),
            range: "10.210.0.0/16".parse().unwrap(),
            domain: "mesh.internal".into(),
            port,
            endpoints: vec!["198.51.100.1:51820".parse().unwrap()],
            tun: "mesh0".into(),
            dns_upstream: vec![],
            keys: None,
        }
    }

    #[test]
    fn init_writes_a_complete_node_and_refuses_to_overwrite_it() {
        let d = tempfile::tempdir().unwrap();
        let st = StateDir::new(d.path());
        let p = alpha(51820);
        let token = create_mesh(&crate::node::platform::LinuxPlatform, &st, &p, 1000).unwrap();
        assert_eq!(token.bootstrap.len(), 1);
        assert_eq!(token.invite.max_uses, None);
        assert_eq!(token.invite.expires_at, 1000 + 24 * 3600);
        let cfg = st.load_node().unwrap();
        assert_eq!(cfg.name, "alpha");
        let mesh = cfg.mesh_id().unwrap();
        assert_eq!(mesh, token.mesh());
        let cert = Cert::verify(&cfg.cert_signed().unwrap(), &mesh).unwrap();
        assert_eq!(cert.wireguard, st.load_keys().unwrap().wg_public());
        assert!(st.load_root().unwrap().is_some());
        let e = create_mesh(&crate::node::platform::LinuxPlatform, &st, &p, 1001)
            .unwrap_err()
            .to_string();
        assert!(e.contains("already holds node \"alpha\""), "{e}");
    }

    #[tokio::test]
    async fn a_kept_root_key_of_another_mesh_is_never_mixed_into_a_new_one() {
        let d = tempfile::tempdir().unwrap();
        let st = StateDir::new(d.path());
        let p = alpha(0);
        create_mesh(&crate::node::platform::LinuxPlatform, &st, &p, 1000).unwrap();
        st.remove_node().unwrap(); // what `meshd leave` leaves behind: root.key only
        let other = RootKey::generate();
        let token = make_token(
            &other,
            p.range,
            "mesh.internal",
            Duration::from_secs(60),
            None,
            vec![],
            1000,
        );
        let jp = JoinParams {
            name: "beta".into(),
            port: 0,
            endpoints: vec![],
            tun: "mesh0".into(),
            bootstrap: vec![],
            dns_upstream: vec![],
            keys: None,
        };
        let e = join_mesh(
            &crate::node::platform::LinuxPlatform,
            &st,
            &token,
            &jp,
            1000,
        )
        .await
        .err()
        .expect("refused")
        .to_string();
        assert!(e.contains("holds the root key of mesh"), "{e}");
        assert!(st.load_root().unwrap().is_some(), "the root key is kept");
        assert!(!st.is_initialized());

        // Nor does a new mesh made here overwrite it.
        let kept = st.load_root().unwrap().unwrap().public();
        let e = create_mesh(&crate::node::platform::LinuxPlatform, &st, &p, 1002)
            .unwrap_err()
            .to_string();
        assert!(e.contains("holds the root key of mesh"), "{e}");
        assert_eq!(st.load_root().unwrap().unwrap().public(), kept);
        assert!(!st.is_initialized());
    }

    #[test]
    fn endpoints_parse_with_clear_errors() {
        assert_eq!(
            parse_endpoint("192.0.2.1:1", 9).unwrap(),
            "192.0.2.1:1".parse().unwrap()
        );
        assert_eq!(
            parse_endpoint("192.0.2.1", 9).unwrap(),
            "192.0.2.1:9".parse().unwrap()
        );
        assert_eq!(
            parse_endpoint("[2001:db8::1]:5", 9).unwrap(),
            "[2001:db8::1]:5".parse().unwrap()
        );
        assert!(parse_endpoint("example.com:5", 9)
            .unwrap_err()
            .contains("ADDRESS:PORT"));
    }
}
