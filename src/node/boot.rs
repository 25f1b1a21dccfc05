//! Loading a node from its state directory: keys, configuration, certificate (re-verified), the
//! member cache (every statement re-verified), and the checks that end a node for good.

use super::{Exit, NodeError, NodeOptions};
use crate::gossip::{Membership, MeshParams};
use crate::state::{NodeConfig, Settings, StateDir, StateError};
use crate::trust::{Cert, NodeKeys, RootKey};
use crate::util::unix_now;
use tracing::{error, warn};

/// A node's state, loaded and checked.
pub struct Loaded {
    pub state: StateDir,
    pub keys: NodeKeys,
    pub config: NodeConfig,
    pub root: Option<RootKey>,
    pub settings: Settings,
    pub cert: Cert,
    pub membership: Membership,
    /// The highest sequence number this node published before.
    pub seq_floor: u64,
    /// The /24 this node holds.
    pub slot: u32,
}

/// Load the node in `opts.state_dir` (and lock it). `Ok(Err(exit))`: the state says the node
/// cannot run any more (removed, or shut out of its invite).
pub fn load(opts: &NodeOptions) -> Result<Result<Loaded, Exit>, NodeError> {
    let mut state = StateDir::new(&opts.state_dir);
    if !state.is_initialized() {
        return Err(StateError::NotInitialized {
            dir: opts.state_dir.clone(),
        }
        .into());
    }
    state.lock()?;
    let keys = state.load_keys()?;
    let mut config = state.load_node()?;
    if let Some(port) = opts.port.filter(|p| *p != config.port) {
        tracing::info!(
            from = config.port,
            to = port,
            "UDP port changed (--port) and saved"
        );
        config.port = port;
        state.save_node(&config)?;
    }
    let root = state.load_root()?;
    let settings: Settings = state.load_settings()?;
    let corrupt = |reason: String| StateError::Corrupt {
        path: state.file("node.json"),
        reason,
    };
    let mesh = config.mesh_id().map_err(corrupt)?;
    let cert_raw = config.cert_signed().map_err(corrupt)?;
    let cert =
        Cert::verify(&cert_raw, &mesh).map_err(|e| corrupt(format!("own certificate: {e}")))?;
    if cert.wireguard != keys.wg_public() || cert.identity != keys.identity_public() {
        return Err(corrupt("the certificate does not match node.key".into()).into());
    }
    let params = MeshParams {
        mesh,
        range: cert.invite.range,
        domain: cert.invite.domain.clone(),
    };
    // A root key kept from another mesh (after `meshd leave`) administers that mesh, not this one.
    let root = root.filter(|r| {
        let ours = r.public() == mesh.0;
        if !ours {
            warn!("root.key belongs to another mesh; this node does not administer mesh {mesh}");
        }
        ours
    });
    let now = unix_now();
    let mut m = Membership::new(params.clone(), cert.clone(), now);
    m.set_admitted_k(cert.node_id, config.slot_k);
    let cache = state.load_members()?;
    for w in m.load_cache(&cache, now) {
        warn!("{w}");
    }
    // Both end the node for good: exit status 3, which the systemd unit does not restart.
    if m.is_revoked(&cert.node_id, &cert.wireguard) {
        error!(
            "this node ({}) was removed from mesh {mesh} by an administrator; it cannot come back with \
             this identity. Move {} away and join again with a new token",
            cert.name,
            opts.state_dir.display()
        );
        return Ok(Err(Exit::Removed));
    }
    if m.over_its_invite(&cert.node_id) {
        error!(
            "this node ({}) joined with an invite that other nodes used up first; move {} away and \
             join again with a new token",
            cert.name,
            opts.state_dir.display()
        );
        return Ok(Err(Exit::InviteUsedUp));
    }
    let slot = m
        .assignments()
        .get(&cert.node_id)
        .map(|a| a.slot)
        .ok_or(NodeError::MeshFull(params.range))?;
    Ok(Ok(Loaded {
        state,
        keys,
        config,
        root,
        settings,
        cert,
        membership: m,
        seq_floor: cache.own_seq,
        slot,
    }))
}
