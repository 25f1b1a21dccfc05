//! The node's state directory (DESIGN "Processes, files and the local API").
//!
//! ```text
//! /var/lib/meshd/            0700
//!   node.key     0600  identity and WireGuard private keys           (secret)
//!   root.key     0600  mesh root key, only on admin nodes            (secret)
//!   node.json    0600  this node: mesh, name, certificate, slot, port, endpoints
//!   members.json 0600  member cache: certificates, records, revocations, tombstones, invite uses
//!   settings.json 0600 optional features (services, gateway, proxy, ...)
//!   lock               held while a meshd runs on this directory
//! ```
//!
//! Every file carries a `version`; every write is atomic. A file that cannot be parsed is an
//! error that names the file: meshd never silently resets a node's identity.

mod atomic;

pub use atomic::{read_secret, write_atomic};

use crate::trust::{Key32, MeshId, NodeKeys, RootKey, Signed};
use crate::util::{b64, from_b64url};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::fs::{self, File};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// The state format version this build reads and writes. Version 2: node certificates carry
/// the WireGuard key's proof of possession; version-1 state cannot be upgraded in place (its
/// certificate lacks the proof, and only the mesh's invite secret could re-issue it).
pub const STATE_VERSION: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "refusing to use {}: it holds secret keys but its mode is {mode:04o}, so other users can read it; \
         fix it with: chmod 600 {}",
        path.display(), path.display()
    )]
    InsecurePermissions { path: PathBuf, mode: u32 },
    #[error(
        "state file {} is corrupt ({reason}); meshd will not reset this node's identity. \
         Restore the file from a backup, or move the state directory away and join the mesh again",
        path.display()
    )]
    Corrupt { path: PathBuf, reason: String },
    #[error(
        "state file {} has format version {found}, but this meshd reads version {supported}; \
         run the meshd release that wrote it",
        path.display()
    )]
    NewerVersion {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error(
        "state file {} has format version {found}, written by an earlier meshd whose certificates \
         this one no longer accepts (it reads version {supported}); move the state directory away \
         and join the mesh again with a new token",
        path.display()
    )]
    UnsupportedVersion {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error(
        "no meshd node in {}: create one with `meshd init` or `meshd join TOKEN` \
         (or point --state-dir / MESHD_STATE_DIR at the right directory)",
        dir.display()
    )]
    NotInitialized { dir: PathBuf },
    #[error(
        "{} already holds node {name:?} of mesh {mesh}; refusing to overwrite it. \
         Use `meshd run` to start it, `meshd leave` to leave that mesh first, \
         or choose another --state-dir",
        dir.display()
    )]
    AlreadyInitialized {
        dir: PathBuf,
        name: String,
        mesh: String,
    },
    #[error(
        "another meshd is already running on {} (its lock is held); stop it first, \
         or give this one its own --state-dir",
        dir.display()
    )]
    Locked { dir: PathBuf },
}

impl StateError {
    pub fn io(path: &Path, source: std::io::Error) -> StateError {
        StateError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// `node.key`.
#[derive(Serialize, Deserialize)]
struct KeyFile {
    version: u32,
    identity: String,
    wireguard: String,
}

/// `root.key`.
#[derive(Serialize, Deserialize)]
struct RootFile {
    version: u32,
    root: String,
}

/// `node.json`: who this node is and how it is configured.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeConfig {
    pub version: u32,
    /// Mesh id (root public key), standard base64.
    pub mesh: String,
    pub name: String,
    /// The node certificate (URL-safe base64 of the signed certificate).
    pub cert: String,
    /// The slot candidate index this node holds.
    pub slot_k: u32,
    pub port: u16,
    /// Endpoints given with `--endpoint`; empty means "the machine's addresses".
    #[serde(default)]
    pub endpoints: Vec<SocketAddr>,
    /// Bootstrap members from the join token: the fallback when the member cache is stale.
    #[serde(default)]
    pub bootstrap: Vec<BootstrapEntry>,
    pub tun: String,
    /// Upstream resolvers for names outside the mesh domain (`--dns-upstream`); empty means
    /// "the host's resolvers".
    #[serde(default)]
    pub dns_upstream: Vec<SocketAddr>,
}

/// `workloads.host.json`: what meshd changed on the host for workloads, kept across restarts
/// (and crashes) so it can be undone.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadsHost {
    /// `net.ipv4.ip_forward` before meshd turned it on.
    pub ip_forward_before: Option<String>,
    /// Interfaces on the bridge when meshd took it down (Docker's containers), attached again
    /// when it comes back.
    #[serde(default)]
    pub bridge_ports: Vec<String>,
}

const WORKLOADS_HOST_JSON: &str = "workloads.host.json";

/// `settings.json`: what the operator turned on at run time (services, ...). Survives restarts.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    pub version: u32,
    #[serde(default)]
    pub services: Vec<crate::trust::ServiceDef>,
    /// Hostnames this node serves for gateways (`meshctl expose`).
    #[serde(default)]
    pub exposed: Vec<crate::proxy::serve::Exposed>,
    /// Public gateway listeners, when enabled.
    #[serde(default)]
    pub gateway: Option<ListenPair>,
    /// Local forward proxy listeners (SOCKS5, HTTP), when enabled.
    #[serde(default)]
    pub proxy: Option<ListenPair>,
    /// Whether this node serves as an exit node.
    #[serde(default)]
    pub exit_node: bool,
    /// This node does not relay for other members (`meshctl relay disable`).
    #[serde(default)]
    pub relay_disabled: bool,
    /// Workloads on this node's /24 (`meshctl workloads enable`): the bridge and the
    /// namespaces meshd made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workloads: Option<crate::workloads::WorkloadSettings>,
}

/// Two optional listen addresses: gateway (HTTPS, HTTP) or proxy (SOCKS5, HTTP).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenPair {
    pub first: Option<SocketAddr>,
    pub second: Option<SocketAddr>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootstrapEntry {
    pub addr: SocketAddr,
    pub wireguard: String,
}

impl NodeConfig {
    pub fn mesh_id(&self) -> Result<MeshId, String> {
        decode_key(&self.mesh).map(MeshId)
    }
    pub fn cert_signed(&self) -> Result<Signed, String> {
        Signed::from_b64(&self.cert, "node certificate").map_err(|e| e.to_string())
    }
}

/// `members.json`: what this node knows about the mesh, for restarts without a seed.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MemberCache {
    pub version: u32,
    #[serde(default)]
    pub members: Vec<CachedMember>,
    /// Identities that left the mesh (`meshd leave`), with when; they never come back.
    #[serde(default)]
    pub tombstones: Vec<Tombstone>,
    /// Root-signed revocations (URL-safe base64).
    #[serde(default)]
    pub revocations: Vec<String>,
    /// Uses of limited invites: which identities joined with which invite.
    #[serde(default)]
    pub invite_uses: Vec<InviteUse>,
    /// The highest sequence number this node published (record, services, routes): the floor
    /// for the next ones, so a node that starts with its clock behind (no RTC, before NTP) does
    /// not publish records its peers reject as older than what they hold.
    #[serde(default)]
    pub own_seq: u64,
    /// When this was written (unix seconds): at load, the time the node was down since is not
    /// counted as members' silence. 0 in caches written before this field existed.
    #[serde(default)]
    pub saved_at: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CachedMember {
    pub cert: String,
    #[serde(default)]
    pub record: Option<String>,
    /// Signed services record (URL-safe base64).
    #[serde(default)]
    pub services: Option<String>,
    /// Signed routes record (URL-safe base64).
    #[serde(default)]
    pub routes: Option<String>,
    /// Signed about record: the software it runs (URL-safe base64).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub about: Option<String>,
    /// Signed workloads record (URL-safe base64).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workloads: Option<String>,
    /// Unix seconds when this member was last known alive.
    pub last_seen: u64,
    /// Unix seconds when this node first learnt of the member.
    pub first_seen: u64,
    /// The slot candidate this node assigned the member when it admitted it (its claim until
    /// its own record is known).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admitted_k: Option<u32>,
    /// Where the member asked to join from, when this node admitted it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admitted_from: Option<SocketAddr>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tombstone {
    pub node_id: String,
    pub at: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct InviteUse {
    /// Invite key, hex.
    pub invite: String,
    pub expires_at: u64,
    pub max_uses: u32,
    pub node_id: String,
    pub issued_at: u64,
}

pub fn encode_key(k: &Key32) -> String {
    b64(k)
}

pub fn decode_key(s: &str) -> Result<Key32, String> {
    let v = STANDARD
        .decode(s.trim())
        .or_else(|_| from_b64url(s))
        .map_err(|e| format!("not base64: {e}"))?;
    v.try_into()
        .map_err(|v: Vec<u8>| format!("key is {} bytes, expected 32", v.len()))
}

pub struct StateDir {
    path: PathBuf,
    lock: Option<File>,
}

const NODE_KEY: &str = "node.key";
const ROOT_KEY: &str = "root.key";
const NODE_JSON: &str = "node.json";
const MEMBERS_JSON: &str = "members.json";
const SETTINGS_JSON: &str = "settings.json";

impl StateDir {
    pub fn new(path: impl Into<PathBuf>) -> StateDir {
        StateDir {
            path: path.into(),
            lock: None,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Create the directory (0700) if needed.
    pub fn ensure(&self) -> Result<(), StateError> {
        if !self.path.exists() {
            fs::create_dir_all(&self.path).map_err(|e| StateError::io(&self.path, e))?;
            fs::set_permissions(&self.path, fs::Permissions::from_mode(0o700))
                .map_err(|e| StateError::io(&self.path, e))?;
        }
        Ok(())
    }

    /// Take the directory's lock so two daemons never share one state.
    pub fn lock(&mut self) -> Result<(), StateError> {
        self.ensure()?;
        let p = self.file("lock");
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
            .map_err(|e| StateError::io(&p, e))?;
        // SAFETY: flock on a file descriptor we own.
        let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            return Err(StateError::Locked {
                dir: self.path.clone(),
            });
        }
        self.lock = Some(f);
        Ok(())
    }

    /// Whether a node lives here. `node.json` is written last when a node is created, so a
    /// directory where creation was interrupted does not count.
    pub fn is_initialized(&self) -> bool {
        self.file(NODE_JSON).exists()
    }

    /// Refuse to create a node where one exists (naming it).
    pub fn ensure_empty(&self) -> Result<(), StateError> {
        if !self.is_initialized() {
            return Ok(());
        }
        let (name, mesh) = match self.load_node() {
            Ok(c) => {
                let mesh = c.mesh_id().map(|m| m.short()).unwrap_or(c.mesh);
                (c.name, mesh)
            }
            Err(_) => ("?".into(), "?".into()),
        };
        Err(StateError::AlreadyInitialized {
            dir: self.path.clone(),
            name,
            mesh,
        })
    }

    pub fn save_keys(&self, keys: &NodeKeys) -> Result<(), StateError> {
        let f = KeyFile {
            version: STATE_VERSION,
            identity: b64(&keys.identity.to_bytes()),
            wireguard: b64(&keys.wireguard.to_bytes()),
        };
        self.write_json(NODE_KEY, &f)
    }

    pub fn load_keys(&self) -> Result<NodeKeys, StateError> {
        let p = self.file(NODE_KEY);
        if !p.exists() {
            return Err(StateError::NotInitialized {
                dir: self.path.clone(),
            });
        }
        let f: KeyFile = self.read_json(NODE_KEY, true)?;
        let corrupt = |reason: String| StateError::Corrupt {
            path: p.clone(),
            reason,
        };
        let identity = decode_key(&f.identity).map_err(|e| corrupt(format!("identity: {e}")))?;
        let wireguard = decode_key(&f.wireguard).map_err(|e| corrupt(format!("wireguard: {e}")))?;
        Ok(NodeKeys::from_bytes(identity, wireguard))
    }

    pub fn save_root(&self, root: &RootKey) -> Result<(), StateError> {
        self.write_json(
            ROOT_KEY,
            &RootFile {
                version: STATE_VERSION,
                root: b64(&root.0.to_bytes()),
            },
        )
    }

    /// The root key, if this node administers the mesh.
    pub fn load_root(&self) -> Result<Option<RootKey>, StateError> {
        if !self.file(ROOT_KEY).exists() {
            return Ok(None);
        }
        let f: RootFile = self.read_json(ROOT_KEY, true)?;
        let k = decode_key(&f.root).map_err(|reason| StateError::Corrupt {
            path: self.file(ROOT_KEY),
            reason,
        })?;
        Ok(Some(RootKey(ed25519_dalek::SigningKey::from_bytes(&k))))
    }

    pub fn save_node(&self, c: &NodeConfig) -> Result<(), StateError> {
        self.write_json(NODE_JSON, c)
    }

    pub fn load_node(&self) -> Result<NodeConfig, StateError> {
        if !self.file(NODE_JSON).exists() {
            return Err(StateError::NotInitialized {
                dir: self.path.clone(),
            });
        }
        self.read_json(NODE_JSON, false)
    }

    pub fn save_members(&self, m: &MemberCache) -> Result<(), StateError> {
        self.write_json(MEMBERS_JSON, m)
    }

    /// The member cache; an absent file is an empty cache.
    pub fn load_members(&self) -> Result<MemberCache, StateError> {
        if !self.file(MEMBERS_JSON).exists() {
            return Ok(MemberCache {
                version: STATE_VERSION,
                ..Default::default()
            });
        }
        self.read_json(MEMBERS_JSON, false)
    }

    pub fn save_settings<T: Serialize>(&self, s: &T) -> Result<(), StateError> {
        self.write_json(SETTINGS_JSON, s)
    }

    pub fn load_settings<T: DeserializeOwned + Default>(&self) -> Result<T, StateError> {
        if !self.file(SETTINGS_JSON).exists() {
            return Ok(T::default());
        }
        self.read_json(SETTINGS_JSON, false)
    }

    /// Remove this node's identity and caches after `meshd leave`. The root key, if any, stays:
    /// the mesh may still need administering.
    /// Undo a first `init`/`join` that failed before the node ran: every file it made (the
    /// root key too, for `init`: a failed init made it), and the directory if that leaves it
    /// empty, so the advised retry starts clean.
    pub fn undo_setup(&self, root_key_too: bool) -> Result<(), StateError> {
        self.remove_node()?;
        if root_key_too {
            let p = self.file(ROOT_KEY);
            match fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(StateError::io(&p, e)),
            }
        }
        let _ = fs::remove_dir(&self.path);
        Ok(())
    }

    pub fn remove_node(&self) -> Result<(), StateError> {
        // node.json first: it is what makes a directory a node, so an interrupted removal
        // leaves a directory that is no longer a half-working node.
        for f in [
            NODE_JSON,
            NODE_KEY,
            MEMBERS_JSON,
            SETTINGS_JSON,
            WORKLOADS_HOST_JSON,
        ] {
            let p = self.file(f);
            match fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(StateError::io(&p, e)),
            }
        }
        Ok(())
    }

    /// What meshd changed on the host for workloads, to undo (`workloads.host.json`).
    /// `None` when there is no file; an unreadable one is an error (what it holds must be
    /// undone, so it is never silently taken as empty).
    pub fn load_workloads_host(&self) -> Result<Option<WorkloadsHost>, StateError> {
        if !self.file(WORKLOADS_HOST_JSON).exists() {
            return Ok(None);
        }
        self.read_json(WORKLOADS_HOST_JSON, false).map(Some)
    }

    pub fn save_workloads_host(&self, h: &WorkloadsHost) -> Result<(), StateError> {
        #[derive(Serialize)]
        struct Versioned<'a> {
            version: u32,
            #[serde(flatten)]
            host: &'a WorkloadsHost,
        }
        let v = Versioned {
            version: STATE_VERSION,
            host: h,
        };
        self.write_json(WORKLOADS_HOST_JSON, &v)
    }

    fn write_json<T: Serialize>(&self, name: &str, value: &T) -> Result<(), StateError> {
        self.ensure()?;
        let mut data = serde_json::to_vec_pretty(value).expect("state serializes");
        data.push(b'\n');
        write_atomic(&self.file(name), &data, 0o600)
    }

    fn read_json<T: DeserializeOwned>(&self, name: &str, secret: bool) -> Result<T, StateError> {
        let p = self.file(name);
        let data = if secret {
            read_secret(&p)?
        } else {
            fs::read(&p).map_err(|e| StateError::io(&p, e))?
        };
        #[derive(Deserialize)]
        struct Version {
            version: u32,
        }
        let corrupt = |e: serde_json::Error| StateError::Corrupt {
            path: p.clone(),
            reason: e.to_string(),
        };
        let v: Version = serde_json::from_slice(&data).map_err(corrupt)?;
        if v.version > STATE_VERSION {
            return Err(StateError::NewerVersion {
                path: p.clone(),
                found: v.version,
                supported: STATE_VERSION,
            });
        }
        if v.version != STATE_VERSION {
            return Err(StateError::UnsupportedVersion {
                path: p.clone(),
                found: v.version,
                supported: STATE_VERSION,
            });
        }
        serde_json::from_slice(&data).map_err(corrupt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workloads_host_round_trips() {
        let d = tempfile::tempdir().unwrap();
        let s = StateDir::new(d.path().join("st"));
        assert_eq!(s.load_workloads_host().unwrap(), None);
        let h = WorkloadsHost {
            ip_forward_before: Some("0".into()),
            bridge_ports: vec!["veth1234".into()],
        };
        s.save_workloads_host(&h).unwrap();
        assert_eq!(s.load_workloads_host().unwrap(), Some(h));
        fs::write(s.file(WORKLOADS_HOST_JSON), b"{").unwrap();
        assert!(s.load_workloads_host().is_err());
    }

    #[test]
    fn keys_round_trip_and_are_private() {
        let d = tempfile::tempdir().unwrap();
        let s = StateDir::new(d.path().join("st"));
        assert!(matches!(
            s.load_keys(),
            Err(StateError::NotInitialized { .. })
        ));
        let k = NodeKeys::generate();
        s.save_keys(&k).unwrap();
        let l = s.load_keys().unwrap();
        assert_eq!(l.identity_public(), k.identity_public());
        assert_eq!(l.wg_public(), k.wg_public());
        let mode = fs::metadata(s.file(NODE_KEY)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let dmode = fs::metadata(s.path()).unwrap().permissions().mode();
        assert_eq!(dmode & 0o777, 0o700);
    }

    #[test]
    fn truncated_or_future_files_are_clear_errors() {
        let d = tempfile::tempdir().unwrap();
        let s = StateDir::new(d.path());
        s.save_keys(&NodeKeys::generate()).unwrap();
        let p = s.file(NODE_KEY);
        let data = fs::read(&p).unwrap();
        write_atomic(&p, &data[..data.len() / 2], 0o600).unwrap();
        let e = s.load_keys().unwrap_err();
        assert!(matches!(e, StateError::Corrupt { .. }), "{e}");
        assert!(e.to_string().contains("node.key"));
        write_atomic(
            &p,
            br#"{"version": 9, "identity": "", "wireguard": ""}"#,
            0o600,
        )
        .unwrap();
        assert!(matches!(
            s.load_keys(),
            Err(StateError::NewerVersion { found: 9, .. })
        ));
        // State from before the certificate format change is named as such, with the way out.
        write_atomic(
            &p,
            br#"{"version": 1, "identity": "", "wireguard": ""}"#,
            0o600,
        )
        .unwrap();
        let e = s.load_keys().unwrap_err();
        assert!(
            matches!(e, StateError::UnsupportedVersion { found: 1, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("join the mesh again"), "{e}");
    }

    #[test]
    fn a_second_lock_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let mut a = StateDir::new(d.path());
        a.lock().unwrap();
        let mut b = StateDir::new(d.path());
        assert!(matches!(b.lock(), Err(StateError::Locked { .. })));
        drop(a);
        b.lock().unwrap();
    }
}
