//! Wire types of the control API. Field names are part of the `meshctl status --json` contract.

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    #[serde(rename = "self")]
    pub me: SelfStatus,
    pub mesh: MeshStatus,
    pub peers: Vec<PeerReport>,
    pub dns: DnsStatus,
    pub edge: EdgeStatus,
    /// What the data plane dropped since start, by reason.
    #[serde(default)]
    pub drops: DropStatus,
    /// The threads the data plane spreads encryption and decryption over under load.
    #[serde(default)]
    pub lanes: LaneStatus,
    /// What the data plane handed the TUN device.
    #[serde(default)]
    pub tun: TunStatus,
}

/// Packets the data plane handed to the TUN device since start, and the writes they took:
/// with TUN offload, runs of one TCP flow's segments go in one write (coalesced), so under
/// bulk TCP there are several packets per write.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunStatus {
    pub packets: u64,
    pub writes: u64,
}

/// Receive lanes (`MESHD_RX_LANES`) and seal lanes (`MESHD_TX_LANES`): threads beyond the
/// receive and TUN threads that decrypt and encrypt under load, and the reads they took since
/// the node started. None on two cores or fewer by default.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaneStatus {
    pub receive: usize,
    pub seal: usize,
    /// Reads of datagrams (up to 64 KiB each) the receive thread handed to a receive lane.
    pub receive_reads: u64,
    /// Reads from the TUN device (up to 128 packets each) sealed and sent by a seal lane.
    pub seal_reads: u64,
}

/// Packets the data plane dropped, by reason (counters since the node started).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DropStatus {
    /// Outgoing packets for a mesh address no peer holds.
    pub no_route: u64,
    /// Decrypted packets whose source is outside the sending peer's /24.
    pub bad_source: u64,
    /// Decrypted packets not addressed to this node's /24.
    pub bad_destination: u64,
    /// Outgoing packets from this machine or its workloads with a source outside this node's
    /// /24 (a forged address).
    #[serde(default)]
    pub forged_source: u64,
    /// Outgoing packets for a peer without a session beyond what may wait for one (64 per
    /// peer, 2 MiB in all), or that waited while its handshakes gave up.
    #[serde(default)]
    pub no_session: u64,
    /// WireGuard messages from keys or sessions this node does not know.
    pub unknown_peer: u64,
    /// Datagrams that are neither WireGuard nor join frames, or malformed.
    pub malformed: u64,
    /// Reads from the TUN device that could not be split into packets: a TCP super-packet of
    /// more segments than a read holds (a connection with a tiny MSS), or a bad offload header.
    #[serde(default)]
    pub unsplittable: u64,
}

/// Gateway, serving, proxy and exit roles of this node.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EdgeStatus {
    pub exposed: Vec<ExposedView>,
    /// Listening addresses of the public gateway, when enabled.
    pub gateway: Option<ListenView>,
    /// Listening addresses of the local proxy, when enabled.
    pub proxy: Option<ListenView>,
    pub exit_node: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExposedView {
    pub hostname: String,
    pub to: String,
    pub http_to: Option<String>,
    pub proxy_protocol: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ListenView {
    /// HTTPS (gateway) or SOCKS5 (proxy).
    pub first: Option<String>,
    /// HTTP.
    pub second: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ExposeRequest {
    pub hostname: String,
    pub to: Option<std::net::SocketAddr>,
    #[serde(default)]
    pub http_to: Option<std::net::SocketAddr>,
    #[serde(default)]
    pub proxy_protocol: bool,
}

/// Enable (with listen addresses; "off" disables one of the two) or disable a role.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ListenRequest {
    pub enable: bool,
    pub first: Option<String>,
    pub second: Option<String>,
    /// For the proxy: allow non-loopback listen addresses.
    #[serde(default)]
    pub allow_public: bool,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ToggleRequest {
    pub enable: bool,
}

/// `meshctl nc`: open a stream to HOST:PORT through the mesh (or an exit node).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ConnectRequest {
    pub host: String,
    pub port: u16,
    pub exit: Option<String>,
}

/// Mesh DNS as this node runs it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DnsStatus {
    pub domain: String,
    /// `IP:53` when serving.
    pub listen: Option<String>,
    pub upstreams: Vec<String>,
    /// How the host resolves the mesh domain: "systemd-resolved (mesh0)" or "not registered".
    pub host: String,
    /// Why DNS is not serving, if it is not.
    pub error: Option<String>,
}

/// `meshctl dns`: the zone as this node serves it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DnsReport {
    pub status: DnsStatus,
    pub records: Vec<DnsRecordView>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DnsRecordView {
    pub name: String,
    #[serde(rename = "type")]
    pub rtype: String,
    pub ttl: u32,
    pub value: String,
}

/// One service instance in the mesh.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServiceView {
    pub name: String,
    pub node: String,
    pub address: String,
    pub port: u16,
    /// Whether it is in DNS answers now (its node is not offline, its address is in the node's
    /// subnet).
    pub live: bool,
    pub local: bool,
    /// Its address is outside its node's /24 (the node moved after a lost subnet conflict):
    /// nobody answers it until it is added again with an address of the new subnet.
    #[serde(default)]
    pub outside_subnet: bool,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ServiceAddRequest {
    pub name: String,
    pub port: u16,
    pub address: Option<std::net::Ipv4Addr>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ServiceRemoveRequest {
    pub name: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SelfStatus {
    pub name: String,
    pub node_id: String,
    pub mesh_ip: String,
    pub subnet: String,
    /// WireGuard public key, base64.
    pub wg_key: String,
    pub port: u16,
    pub endpoints: Vec<String>,
    /// Whether this node holds the mesh root key (can invite and remove).
    pub admin: bool,
    pub tun: String,
    /// The running meshd's version ([`crate::constants::VERSION`]).
    #[serde(default)]
    pub version: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MeshStatus {
    pub id: String,
    pub range: String,
    pub domain: String,
    /// Active members, this node included.
    pub members: usize,
    pub revoked: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PeerState {
    /// Gossip hears it and the tunnel has a live session.
    Online,
    /// Gossip hears it (directly or through others) but no tunnel session yet.
    Connecting,
    /// Silent: the failure detector declared it dead. It keeps its subnet.
    Offline,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PeerReport {
    pub name: String,
    /// The name this node answers to in DNS (differs from `name` only after a name race).
    pub dns_name: String,
    /// Hostnames it serves through gateways.
    pub hostnames: Vec<String>,
    /// It offers itself as an exit node.
    pub exit_node: bool,
    pub node_id: String,
    pub mesh_ip: String,
    pub subnet: String,
    pub state: PeerState,
    pub online: bool,
    pub endpoint: Option<String>,
    /// How traffic to it travels: `direct` (to `endpoint`) or `relayed` (through `relay`), or
    /// absent without a working path.
    #[serde(default)]
    pub path: Option<String>,
    /// The member relaying to it, when relayed.
    #[serde(default)]
    pub relay: Option<String>,
    /// Round trip through its tunnel, last measured (every 15 s), in milliseconds.
    #[serde(default)]
    pub rtt_ms: Option<f64>,
    /// The meshd it runs (`--version`), as it says in its signed about record; absent for a
    /// release that does not say.
    #[serde(default)]
    pub version: Option<String>,
    pub last_handshake_secs: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub dropped_bad_source: u64,
    pub wg_key: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct InviteRequest {
    pub expires_secs: Option<u64>,
    pub uses: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InviteResponse {
    pub token: String,
    pub expires_at: u64,
    pub uses: Option<u32>,
    pub bootstrap: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PingRequest {
    /// Node name, DNS name, mesh address or node id.
    pub node: String,
}

/// One round trip through the tunnel to a member.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PingResponse {
    pub name: String,
    pub mesh_ip: String,
    /// `direct` or `relayed`.
    pub path: String,
    /// The member relaying, when relayed.
    #[serde(default)]
    pub relay: Option<String>,
    /// The underlay address the tunnel sends to (the relay's, when relayed).
    pub endpoint: Option<String>,
    pub rtt_us: u64,
}

/// What members see of this node's underlay address.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NetcheckReport {
    /// This node's candidates as it publishes them (local addresses, then observed ones).
    pub endpoints: Vec<String>,
    pub observations: Vec<ObservationView>,
    pub mapping: NatMapping,
    /// Whether members see this node at an address that is not its own (a NAT between);
    /// `None` before any member said.
    pub behind_nat: Option<bool>,
    pub punches_sent: u64,
    pub punches_answered: u64,
    /// Path messages refused (garbage, or not from a member).
    pub dropped: u64,
    /// Whether a member's probe from a port this node never sent to reached the address members
    /// see it at (no NAT, a forwarded port, a full-cone or address-restricted NAT: yes; a NAT
    /// that filters by port, or maps per destination: no); `None` before the first check.
    #[serde(default)]
    pub port_reachable: Option<bool>,
    /// This node as a relay for others.
    #[serde(default)]
    pub relay: RelayReport,
}

/// A node's relay role: what it relays for other members and what it refused.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RelayReport {
    pub enabled: bool,
    pub sessions: Vec<RelaySessionView>,
    pub forwarded_packets: u64,
    pub forwarded_bytes: u64,
    /// Relayed frames for no session here.
    pub dropped_unknown: u64,
    /// Relayed frames from an address bound to neither end of their session.
    pub dropped_unbound: u64,
    /// Relayed frames over their session's rate.
    pub dropped_rate: u64,
    /// Relay asks refused (relaying off, no direct path to both members, too many sessions).
    pub refused: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RelaySessionView {
    /// The session id, hex.
    pub session: String,
    /// The two members it relays between.
    pub between: [String; 2],
    /// Their endpoints as bound, in the same order.
    pub endpoints: [Option<String>; 2],
}

/// `meshctl set`: what to change in this node's configuration (absent: unchanged).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ConfigRequest {
    pub port: Option<u16>,
    /// ADDR[:PORT]; an empty list goes back to "this machine's addresses".
    pub endpoints: Option<Vec<String>>,
    /// IP[:PORT]; an empty list goes back to "the host's resolvers".
    pub dns_upstream: Option<Vec<String>>,
    pub tun: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConfigResponse {
    /// What changed, as `field: old -> new`.
    pub changed: Vec<String>,
    /// Some changes (the port, the TUN device) take effect only when meshd restarts; the
    /// others are applied already.
    pub restart_needed: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LogLevelRequest {
    pub level: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LogLevelResponse {
    pub level: String,
}

/// One target group of Prometheus HTTP service discovery (`http_sd_configs`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SdTargetGroup {
    pub targets: Vec<String>,
    pub labels: std::collections::BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RelayResponse {
    pub relay: bool,
}

/// Whether a node's NAT gives it one public address for every destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NatMapping {
    /// Fewer than two observers at different addresses: nothing can be said.
    Unknown,
    /// One public address for every destination ("easy" NAT, or none).
    EndpointIndependent,
    /// A new public port per destination ("hard" NAT, symmetric).
    EndpointDependent,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ObservationView {
    pub observer: String,
    /// Where the observer is, as this node sees it.
    pub observer_at: String,
    /// Where this node is, as the observer sees it.
    pub seen: String,
    pub age_secs: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RemoveRequest {
    /// Node name or node id.
    pub node: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RemoveResponse {
    pub name: String,
    pub node_id: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LeaveResponse {
    pub name: String,
    pub subnet: String,
    /// The daemon's process id: `meshd leave` waits for it to exit (port and lock released).
    #[serde(default)]
    pub pid: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServiceAddResponse {
    pub name: String,
    pub port: u16,
    /// The address it answers at.
    pub address: String,
    /// It replaced a service of the same name.
    pub replaced: bool,
    /// Its DNS name, `NAME.svc.<domain>`.
    pub dns: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServiceRemoveResponse {
    pub name: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExposeResponse {
    pub hostname: String,
    pub to: String,
    pub replaced: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UnexposeResponse {
    pub hostname: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GatewayResponse {
    pub enabled: bool,
    pub https: Option<String>,
    pub http: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProxyResponse {
    pub enabled: bool,
    pub socks5: Option<String>,
    pub http: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExitNodeResponse {
    pub exit_node: bool,
}

/// `meshctl workloads enable|disable`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct WorkloadsRequest {
    pub enable: bool,
    /// The bridge's name (default `meshbr0`), when enabling.
    #[serde(default)]
    pub bridge: Option<String>,
}

/// `meshctl workload add NAME [--ip ADDR]`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct WorkloadAddRequest {
    pub name: String,
    #[serde(default)]
    pub ip: Option<String>,
}

/// `meshctl workload rm NAME`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct WorkloadRemoveRequest {
    pub name: String,
}

/// One workload namespace.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkloadView {
    pub name: String,
    pub ip: String,
    /// `NAME.NODE.<domain>`.
    pub dns: String,
    /// Its namespace exists (`ip netns exec NAME ...` works); a container is there.
    pub present: bool,
    /// A Docker container on the bridge (named from Docker), not a namespace of meshd's.
    #[serde(default)]
    pub container: bool,
}

/// Workloads on this node's /24 (`meshctl workload ls`, `meshctl docker-network`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkloadsReport {
    pub enabled: bool,
    pub bridge: Option<String>,
    /// The node's /24 and its `.1`, the workloads' gateway.
    pub subnet: String,
    pub gateway: String,
    pub workloads: Vec<WorkloadView>,
    /// Packets from the bridge with a source outside the /24, dropped.
    pub forged_dropped: u64,
    /// Why the bridge is not (fully) in place, if it is not.
    pub error: Option<String>,
}

/// Every successful reply, serialized as the bare response object of its call.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum ApiReply {
    Status(Box<StatusReport>),
    Invite(InviteResponse),
    Remove(RemoveResponse),
    Leave(LeaveResponse),
    Dns(DnsReport),
    Services(Vec<ServiceView>),
    ServiceAdd(ServiceAddResponse),
    ServiceRemove(ServiceRemoveResponse),
    Expose(ExposeResponse),
    Unexpose(UnexposeResponse),
    Gateway(GatewayResponse),
    Proxy(ProxyResponse),
    ExitNode(ExitNodeResponse),
    Relay(RelayResponse),
    Config(ConfigResponse),
    LogLevel(LogLevelResponse),
    /// Prometheus text (served as text/plain).
    Metrics(String),
    /// Prometheus HTTP service discovery: every live member's metrics target.
    Discovery(Vec<SdTargetGroup>),
    Ping(PingResponse),
    Netcheck(NetcheckReport),
    Workloads(WorkloadsReport),
    Workload(WorkloadView),
}

/// Error body of every failed call.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ApiErrorBody {
    pub error: String,
}

/// A request as the node's main loop sees it.
#[derive(Debug)]
pub enum ApiRequest {
    Status,
    Invite(InviteRequest),
    Remove(RemoveRequest),
    Leave,
    Dns,
    Services,
    ServiceAdd(ServiceAddRequest),
    ServiceRemove(ServiceRemoveRequest),
    Expose(ExposeRequest),
    Unexpose(ExposeRequest),
    Gateway(ListenRequest),
    Proxy(ListenRequest),
    ExitNode(ToggleRequest),
    Relay(ToggleRequest),
    Config(ConfigRequest),
    LogLevel(LogLevelRequest),
    Metrics,
    Discovery,
    Ping(PingRequest),
    Netcheck,
    Workloads,
    WorkloadsSet(WorkloadsRequest),
    WorkloadAdd(WorkloadAddRequest),
    WorkloadRemove(WorkloadRemoveRequest),
}

/// A failure with its HTTP status.
#[derive(Debug)]
pub struct ApiFailure {
    pub status: u16,
    pub message: String,
}

impl ApiFailure {
    pub fn bad_request(m: impl Into<String>) -> ApiFailure {
        ApiFailure {
            status: 400,
            message: m.into(),
        }
    }
    pub fn forbidden(m: impl Into<String>) -> ApiFailure {
        ApiFailure {
            status: 403,
            message: m.into(),
        }
    }
    pub fn not_found(m: impl Into<String>) -> ApiFailure {
        ApiFailure {
            status: 404,
            message: m.into(),
        }
    }
    pub fn conflict(m: impl Into<String>) -> ApiFailure {
        ApiFailure {
            status: 409,
            message: m.into(),
        }
    }
    pub fn internal(m: impl Into<String>) -> ApiFailure {
        ApiFailure {
            status: 500,
            message: m.into(),
        }
    }
}

impl std::fmt::Display for ApiFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ApiFailure {}

pub type ApiResult = Result<ApiReply, ApiFailure>;

/// One call, with the channel its answer goes back on.
#[derive(Debug)]
pub struct ApiCall {
    pub request: ApiRequest,
    pub reply: oneshot::Sender<ApiResult>,
}
