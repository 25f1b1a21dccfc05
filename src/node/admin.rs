//! Administration through the API: invites and removals need the mesh root key on this node.
//! Both are decisions over the snapshot and the view; the node applies and persists them.

use super::snapshot::Snapshot;
use crate::constants::{DEFAULT_INVITE_TTL, TOKEN_BOOTSTRAP_MEMBERS};
use crate::control::{ApiFailure, InviteRequest, RemoveRequest};
use crate::gossip::{Liveness, Membership};
use crate::id::{Key32, NodeId};
use crate::mesh::PeerStats;
use crate::trust::{Bootstrap, Revocation, RevocationBody, RootKey, Token};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

const NOT_ADMIN: &str = "this node does not hold the mesh root key (root.key), so it cannot";
const MAX_INVITE_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

fn admin<'a>(
    root: Option<&'a RootKey>,
    what: &str,
    command: &str,
) -> Result<&'a RootKey, ApiFailure> {
    root.ok_or_else(|| {
        ApiFailure::forbidden(format!(
            "{NOT_ADMIN} {what}; run {command} on an admin node (the one that ran meshd init)"
        ))
    })
}

/// The bootstrap endpoints a new token lists: this node first, then a few other members that
/// are online now: alive by gossip, or with a tunnel that has a session (gossip's failure
/// detector can lag behind a member that just joined or came back), at the address their
/// tunnel uses, else the first they published.
pub fn bootstrap_list(
    own: &[SocketAddr],
    own_wg: Key32,
    snap: &Snapshot,
    stats: &HashMap<NodeId, PeerStats>,
) -> Vec<Bootstrap> {
    let mut out: Vec<Bootstrap> = own
        .iter()
        .take(2)
        .map(|a| Bootstrap {
            addr: *a,
            wireguard: own_wg,
        })
        .collect();
    for r in snap.members.iter().filter(|r| !r.is_self) {
        if out.len() > TOKEN_BOOTSTRAP_MEMBERS {
            break;
        }
        let tunnel = stats.get(&r.id);
        if r.liveness != Liveness::Alive && !tunnel.is_some_and(|s| s.has_session()) {
            continue;
        }
        let addr = tunnel
            .and_then(|s| s.endpoint)
            .or_else(|| r.endpoints.first().copied());
        if let Some(addr) = addr {
            out.push(Bootstrap {
                addr,
                wireguard: r.wg,
            });
        }
    }
    out
}

/// A new invite token, as `meshctl invite` asks for it.
pub fn invite(
    root: Option<&RootKey>,
    r: &InviteRequest,
    snap: &Snapshot,
    bootstrap: Vec<Bootstrap>,
    now: u64,
) -> Result<Token, ApiFailure> {
    let root = admin(root, "make invites", "meshctl invite")?;
    let ttl = r
        .expires_secs
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_INVITE_TTL);
    if ttl.is_zero() || ttl > MAX_INVITE_TTL {
        return Err(ApiFailure::bad_request(
            "--expires must be between 1s and 365d",
        ));
    }
    if r.uses == Some(0) {
        return Err(ApiFailure::bad_request("--uses must be at least 1"));
    }
    Ok(super::setup::make_token(
        root,
        snap.params.range,
        &snap.params.domain,
        ttl,
        r.uses,
        bootstrap,
        now,
    ))
}

/// The revocation `meshctl remove NODE` issues: NODE by name (refused if two members share
/// it) or by node id; never this node itself.
pub fn removal(
    root: Option<&RootKey>,
    m: &Membership,
    r: &RemoveRequest,
    now: u64,
) -> Result<Revocation, ApiFailure> {
    let root = admin(root, "remove members", "meshctl remove")?;
    let named: Vec<_> = m.all().filter(|x| x.cert.name == r.node).collect();
    if named.len() > 1 {
        let ids: Vec<String> = named.iter().map(|x| x.cert.node_id.to_string()).collect();
        return Err(ApiFailure::bad_request(format!(
            "{} members are named {:?} (node ids {}); say which one by its node id",
            named.len(),
            r.node,
            ids.join(", ")
        )));
    }
    let target = NodeId::parse(&r.node)
        .and_then(|id| m.get(&id))
        .or_else(|| named.first().copied())
        .ok_or_else(|| {
            ApiFailure::not_found(format!(
                "no member named {:?}; `meshctl status` lists the members",
                r.node
            ))
        })?;
    if target.cert.node_id == m.self_id {
        return Err(ApiFailure::bad_request(
            "this is the local node; to take it out of the mesh use `meshd leave`",
        ));
    }
    Ok(Revocation::issue(
        &root.0,
        RevocationBody {
            mesh: m.params.mesh,
            identity: target.cert.identity,
            wireguard: target.cert.wireguard,
            name: target.cert.name.clone(),
            revoked_at: now,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::fixtures::{World, T0};

    #[test]
    fn a_token_lists_this_node_then_members_online_by_gossip_or_tunnel() {
        let w = World::new("10.210.0.0/16");
        let (mut m, members) = w.mesh(4);
        let id = |i: usize| members[i].1.node_id;
        m.set_liveness(id(2), Liveness::Dead, T0);
        m.set_liveness(id(3), Liveness::Dead, T0);
        let snap = Snapshot::of(&m);
        // n3 is declared dead but its tunnel just handshook, at an address nobody gossiped.
        let roamed: SocketAddr = "203.0.113.5:4000".parse().unwrap();
        let stats: HashMap<NodeId, PeerStats> = [(
            id(3),
            PeerStats {
                node_id: id(3),
                name: "n3".into(),
                wg: members[3].1.wireguard,
                slot: 0,
                endpoint: Some(roamed),
                last_rx: Some(Duration::from_secs(1)),
                last_handshake: Some(Duration::from_secs(3)),
                rx_bytes: 0,
                tx_bytes: 0,
                dropped_bad_source: 0,
                path: crate::mesh::peer::PathKind::Direct,
                path_switches: 0,
            },
        )]
        .into();
        let own: SocketAddr = "198.51.100.1:51820".parse().unwrap();
        let list = bootstrap_list(&[own], members[0].0.wg_public(), &snap, &stats);
        let addrs: Vec<SocketAddr> = list.iter().map(|b| b.addr).collect();
        assert_eq!(addrs[0], own, "this node first");
        let mut rest = addrs[1..].to_vec();
        rest.sort();
        let n1: SocketAddr = "198.51.0.2:51820".parse().unwrap();
        assert_eq!(rest, vec![n1, roamed], "n2 is offline and has no tunnel");
        let b3 = list.iter().find(|b| b.addr == roamed).unwrap();
        assert_eq!(b3.wireguard, members[3].1.wireguard);
    }

    #[test]
    fn removals_need_the_root_key_and_never_take_this_node() {
        let w = World::new("10.210.0.0/16");
        let (m, _) = w.mesh(2);
        let r = |node: &str| RemoveRequest { node: node.into() };
        let e = removal(None, &m, &r("n1"), T0).unwrap_err();
        assert_eq!(e.status, 403);
        assert!(
            e.message.contains("run meshctl remove on an admin node"),
            "{}",
            e.message
        );
        let root = Some(&w.root);
        assert_eq!(removal(root, &m, &r("n0"), T0).unwrap_err().status, 400);
        assert_eq!(removal(root, &m, &r("nobody"), T0).unwrap_err().status, 404);
        let rev = removal(root, &m, &r("n1"), T0).unwrap();
        assert_eq!(rev.body.name, "n1");
        let snap = Snapshot::of(&m);
        let e = invite(None, &InviteRequest::default(), &snap, vec![], T0).unwrap_err();
        assert!(
            e.message.contains("run meshctl invite on an admin node"),
            "{}",
            e.message
        );
        let zero = InviteRequest {
            expires_secs: Some(0),
            uses: None,
        };
        assert_eq!(
            invite(root, &zero, &snap, vec![], T0).unwrap_err().status,
            400
        );
        let once = InviteRequest {
            expires_secs: Some(60),
            uses: Some(1),
        };
        let t = invite(root, &once, &snap, vec![], T0).unwrap();
        assert_eq!((t.invite.max_uses, t.invite.expires_at), (Some(1), T0 + 60));
    }
}
