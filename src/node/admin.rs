//! Administration through the API: invites and removals need the mesh root key on this node.

use super::Node;
use crate::constants::{DEFAULT_INVITE_TTL, TOKEN_BOOTSTRAP_MEMBERS};
use crate::control::{
    ApiFailure, ApiResult, InviteRequest, InviteResponse, RemoveRequest, RemoveResponse,
};
use crate::gossip::Liveness;
use crate::trust::{Bootstrap, NodeId, Revocation, RevocationBody};
use crate::util::unix_now;
use std::time::Duration;
use tracing::info;

const NOT_ADMIN: &str = "this node does not hold the mesh root key (root.key), so it cannot";
const MAX_INVITE_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

impl<P: super::platform::Platform> Node<P> {
    pub(super) fn invite(&self, r: InviteRequest) -> ApiResult {
        let root = self.root.as_ref().ok_or_else(|| {
            ApiFailure::forbidden(format!(
                "{NOT_ADMIN} make invites; run meshctl invite on an admin node (the one that ran meshd init)"
            ))
        })?;
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
        // Bootstrap: this node first, then a few other members that are online now: alive by
        // gossip, or with a tunnel that handshook in the last few minutes (gossip's failure
        // detector can lag behind a member that just joined or came back).
        let mut bootstrap: Vec<Bootstrap> = self
            .endpoints
            .iter()
            .take(2)
            .map(|a| Bootstrap {
                addr: *a,
                wireguard: self.keys.wg_public(),
            })
            .collect();
        let stats = self.device.stats();
        for x in self.m.active() {
            if bootstrap.len() > TOKEN_BOOTSTRAP_MEMBERS {
                break;
            }
            if x.cert.node_id == self.cert.node_id {
                continue;
            }
            let tunnel = stats.iter().find(|s| s.node_id == x.cert.node_id);
            let handshook = tunnel
                .and_then(|s| s.last_handshake)
                .is_some_and(|t| t < Duration::from_secs(180));
            if x.liveness != Liveness::Alive && !handshook {
                continue;
            }
            let live_tunnel = tunnel.and_then(|s| s.endpoint);
            let addr = live_tunnel
                .or_else(|| x.record.as_ref().and_then(|r| r.endpoints.first().copied()));
            if let Some(addr) = addr {
                bootstrap.push(Bootstrap {
                    addr,
                    wireguard: x.cert.wireguard,
                });
            }
        }
        let now = unix_now();
        let token = super::setup::make_token(
            root,
            self.m.params.range,
            &self.m.params.domain,
            ttl,
            r.uses,
            bootstrap.clone(),
            now,
        );
        info!(expires_in = ?ttl, uses = ?r.uses, "invite created");
        serde_json::to_value(InviteResponse {
            token: token.encode(),
            expires_at: token.invite.expires_at,
            uses: r.uses,
            bootstrap: bootstrap.iter().map(|b| b.addr.to_string()).collect(),
        })
        .map_err(|e| ApiFailure::internal(e.to_string()))
    }

    pub(super) async fn remove(&mut self, r: RemoveRequest) -> ApiResult {
        let root = self.root.as_ref().ok_or_else(|| {
            ApiFailure::forbidden(format!(
                "{NOT_ADMIN} remove members; run meshctl remove on an admin node (the one that ran meshd init)"
            ))
        })?;
        let named: Vec<_> = self.m.all().filter(|x| x.cert.name == r.node).collect();
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
            .and_then(|id| self.m.get(&id))
            .or_else(|| named.first().copied())
            .ok_or_else(|| {
                ApiFailure::not_found(format!(
                    "no member named {:?}; `meshctl status` lists the members",
                    r.node
                ))
            })?;
        if target.cert.node_id == self.cert.node_id {
            return Err(ApiFailure::bad_request(
                "this is the local node; to take it out of the mesh use `meshd leave`",
            ));
        }
        let name = target.cert.name.clone();
        let id = target.cert.node_id;
        let rev = Revocation::issue(
            &root.0,
            RevocationBody {
                mesh: self.m.params.mesh,
                identity: target.cert.identity,
                wireguard: target.cert.wireguard,
                name: name.clone(),
                revoked_at: unix_now(),
            },
        );
        self.m
            .ingest_revocation(&rev.raw)
            .map_err(|e| ApiFailure::internal(e.to_string()))?;
        self.hints.remove(&id);
        self.push_peers().await;
        let _ = self.persist();
        info!(node = %name, id = %id, "member removed; revocation spreading");
        serde_json::to_value(RemoveResponse {
            name,
            node_id: id.to_string(),
        })
        .map_err(|e| ApiFailure::internal(e.to_string()))
    }
}
