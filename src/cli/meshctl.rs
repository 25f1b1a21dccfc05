//! `meshctl`: a thin client of the control API.

use super::args::{
    GatewayCommand, MeshctlCli, MeshctlCommand, ProxyCommand, ServiceCommand, ToggleCommand,
    WorkloadCommand, WorkloadsCommand,
};
use crate::control::client::{Client, ClientError};
use crate::control::{
    ConnectRequest, DnsReport, ExitNodeResponse, ExposeRequest, ExposeResponse, GatewayResponse,
    InviteRequest, InviteResponse, ListenRequest, NetcheckReport, PingRequest, PingResponse,
    ProxyResponse, RelayResponse, RemoveRequest, RemoveResponse, ServiceAddRequest,
    ServiceAddResponse, ServiceRemoveRequest, ServiceRemoveResponse, ServiceView, StatusReport,
    ToggleRequest, UnexposeResponse, WorkloadAddRequest, WorkloadRemoveRequest, WorkloadView,
    WorkloadsReport, WorkloadsRequest,
};
use clap::Parser;

pub fn main() -> std::process::ExitCode {
    let cli = MeshctlCli::parse();
    super::init_logging("warn", None);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = rt.block_on(run(cli));
    // `meshctl nc` reads stdin on a blocking thread that cannot be interrupted; a normal runtime
    // drop would wait for that read, so nc would hang after the far side closed until the user
    // typed something or closed stdin.
    rt.shutdown_background();
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshctl: {}", super::service::describe(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// Parse "30m", "24h", "7d", "1h30m".
pub fn parse_duration(s: &str) -> anyhow::Result<std::time::Duration> {
    humantime::parse_duration(s)
        .map_err(|e| anyhow::anyhow!("invalid duration {s:?} ({e}): write it like 30m, 24h or 7d"))
}

async fn run(cli: MeshctlCli) -> anyhow::Result<()> {
    let c = Client::new(&cli.socket);
    let command = cli
        .command
        .unwrap_or(MeshctlCommand::Status { json: false });
    match command {
        MeshctlCommand::Version { json } => {
            let cli_version = crate::constants::VERSION;
            let status = c
                .get::<StatusReport>("/v1/status")
                .await
                .map_err(|e| e.to_string());
            let daemon = status.as_ref().map(|s| s.me.version.clone());
            let skew = status
                .as_ref()
                .map(|s| super::format::version_skew(&s.me.version, &s.peers))
                .unwrap_or_default();
            if json {
                let peers: serde_json::Map<String, serde_json::Value> = status
                    .as_ref()
                    .map(|s| {
                        s.peers
                            .iter()
                            .map(|p| (p.name.clone(), serde_json::json!(p.version)))
                            .collect()
                    })
                    .unwrap_or_default();
                let v = serde_json::json!({
                    "meshctl": cli_version,
                    "meshd": daemon.as_ref().ok(),
                    "peers": peers,
                    "error": daemon.as_ref().err(),
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("meshctl {cli_version}");
                match &daemon {
                    Ok(v) if v.is_empty() => println!("meshd (an older release: it does not say)"),
                    Ok(v) => println!("meshd {v}"),
                    Err(e) => println!("meshd: not reachable ({e})"),
                }
                if let Ok(s) = &status {
                    let unknown = s.peers.iter().filter(|p| p.version.is_none()).count();
                    let same = s.peers.len() - unknown - skew.len();
                    if !s.peers.is_empty() {
                        println!(
                            "peers: {same} on the same build{}{}",
                            if skew.is_empty() {
                                String::new()
                            } else {
                                format!(", {} on another", skew.len())
                            },
                            if unknown == 0 {
                                String::new()
                            } else {
                                format!(", {unknown} not saying (older releases or not yet heard)")
                            }
                        );
                    }
                }
            }
            if let Ok(v) = &daemon {
                if v != cli_version {
                    eprintln!(
                        "warning: meshctl and the running meshd are different builds; restart \
                         meshd after an upgrade (systemctl restart meshd)"
                    );
                }
            }
            if !skew.is_empty() {
                eprintln!(
                    "warning: peers on another build than this node: {}",
                    skew.join(", ")
                );
            }
        }
        MeshctlCommand::Completions { shell } => super::docs::print_completions("meshctl", shell)?,
        MeshctlCommand::Set {
            port,
            endpoints,
            default_endpoints,
            dns_upstream,
            default_dns_upstream,
            tun,
        } => {
            let pick = |v: Vec<String>, default: bool| {
                if default {
                    Some(Vec::new())
                } else {
                    (!v.is_empty()).then_some(v)
                }
            };
            let req = crate::control::ConfigRequest {
                port,
                endpoints: pick(endpoints, default_endpoints),
                dns_upstream: pick(dns_upstream, default_dns_upstream),
                tun,
            };
            let r: crate::control::ConfigResponse = c.post("/v1/config", &req).await?;
            if r.changed.is_empty() {
                println!("nothing changed");
            } else {
                for ch in &r.changed {
                    println!("{ch}");
                }
                if r.restart_needed {
                    println!(
                        "saved; the port and TUN device change when meshd restarts: sudo \
                         systemctl restart meshd (endpoints and DNS upstreams apply at once)"
                    );
                } else {
                    println!("saved and applied");
                }
            }
        }
        MeshctlCommand::LogLevel { level } => {
            let r: crate::control::LogLevelResponse = c
                .post("/v1/log-level", &crate::control::LogLevelRequest { level })
                .await?;
            println!("meshd logs at {} now (until it restarts)", r.level);
        }
        MeshctlCommand::Metrics => print!("{}", c.get_text("/v1/metrics").await?),
        MeshctlCommand::Status { json } => {
            if json {
                let v: serde_json::Value = c.get("/v1/status").await?;
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let s: StatusReport = c.get("/v1/status").await?;
                print!("{}", super::format::status(&s));
            }
        }
        MeshctlCommand::Invite { expires, uses } => {
            let ttl = parse_duration(&expires)?;
            let r: InviteResponse = c
                .post(
                    "/v1/invite",
                    &InviteRequest {
                        expires_secs: Some(ttl.as_secs()),
                        uses,
                    },
                )
                .await?;
            eprintln!(
                "invite valid for {}{}; bootstrap: {}",
                humantime::format_duration(ttl),
                match r.uses {
                    Some(1) => ", one use".to_string(),
                    Some(n) => format!(", {n} uses"),
                    None => ", unlimited uses".to_string(),
                },
                r.bootstrap.join(", ")
            );
            println!("meshd join {}", r.token);
        }
        MeshctlCommand::Remove { node } => {
            let r: RemoveResponse = c.post("/v1/remove", &RemoveRequest { node }).await?;
            println!(
                "removed {} ({}); the revocation is spreading to every member",
                r.name, r.node_id
            );
        }
        MeshctlCommand::Ping { node, count, json } => {
            let (mut answered, mut unanswered) = (0, 0);
            for i in 0..count.max(1) {
                if i > 0 {
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
                match c
                    .post::<_, PingResponse>("/v1/ping", &PingRequest { node: node.clone() })
                    .await
                {
                    Ok(r) => {
                        answered += 1;
                        if json {
                            println!("{}", serde_json::to_string(&r)?);
                        } else {
                            println!("{}", super::format::pong(&r));
                        }
                    }
                    // A round trip unanswered is said as it happens, as ping does; a ping
                    // that cannot be made (no such member, this node) ends it at once.
                    Err(ClientError::Api {
                        status: 504,
                        message,
                    }) => {
                        eprintln!("{message}");
                        unanswered += 1;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            if answered == 0 {
                anyhow::bail!("{node}: none of {unanswered} round trips answered");
            }
        }
        MeshctlCommand::Netcheck { json } => {
            let r: NetcheckReport = c.get("/v1/netcheck").await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print!("{}", super::format::netcheck(&r));
            }
        }
        MeshctlCommand::Dns { json } => {
            if json {
                let v: serde_json::Value = c.get("/v1/dns").await?;
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let r: DnsReport = c.get("/v1/dns").await?;
                print!("{}", super::format::dns(&r));
            }
        }
        MeshctlCommand::Service { command } => match command {
            ServiceCommand::Add {
                name,
                port,
                address,
            } => {
                let v: ServiceAddResponse = c
                    .post(
                        "/v1/services",
                        &ServiceAddRequest {
                            name,
                            port,
                            address,
                        },
                    )
                    .await?;
                println!(
                    "{} {} on {}:{}; answers as {}",
                    if v.replaced { "updated" } else { "published" },
                    v.name,
                    v.address,
                    v.port,
                    v.dns
                );
            }
            ServiceCommand::Rm { name } => {
                let _: ServiceRemoveResponse = c
                    .post(
                        "/v1/services/remove",
                        &ServiceRemoveRequest { name: name.clone() },
                    )
                    .await?;
                println!("withdrew {name}");
            }
            ServiceCommand::Ls { json } => {
                let v: Vec<ServiceView> = c.get("/v1/services").await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&v)?);
                } else {
                    print!("{}", super::format::services(&v));
                }
            }
        },
        MeshctlCommand::Expose {
            hostname,
            to,
            http_to,
            proxy_protocol,
        } => {
            let addr = |flag: &str, v: &str| {
                crate::node::setup::parse_endpoint(v, 0)
                    .ok()
                    .filter(|a| a.port() != 0)
                    .ok_or_else(|| {
                        anyhow::anyhow!("{flag} {v:?} must be ADDR:PORT, e.g. 127.0.0.1:8443")
                    })
            };
            let to = addr("--to", &to)?;
            let http_to = http_to.map(|h| addr("--http-to", &h)).transpose()?;
            let req = ExposeRequest {
                hostname,
                to: Some(to),
                http_to,
                proxy_protocol,
            };
            let v: ExposeResponse = c.post("/v1/expose", &req).await?;
            println!(
                "{} {} -> {}{}; gateways pass it through the mesh to this node",
                if v.replaced { "updated" } else { "exposed" },
                v.hostname,
                v.to,
                if proxy_protocol {
                    " (PROXY protocol v2)"
                } else {
                    ""
                }
            );
        }
        MeshctlCommand::Unexpose { hostname } => {
            let req = ExposeRequest {
                hostname,
                ..Default::default()
            };
            let v: UnexposeResponse = c.post("/v1/unexpose", &req).await?;
            println!("no longer serving {}", v.hostname);
        }
        MeshctlCommand::Gateway { command } => {
            let req = match command {
                GatewayCommand::Enable { https, http } => ListenRequest {
                    enable: true,
                    first: Some(https),
                    second: Some(http),
                    allow_public: true,
                },
                GatewayCommand::Disable => ListenRequest::default(),
            };
            let v: GatewayResponse = c.post("/v1/gateway", &req).await?;
            if v.enabled {
                println!(
                    "gateway listening: https {}, http {}",
                    v.https.as_deref().unwrap_or("off"),
                    v.http.as_deref().unwrap_or("off")
                );
            } else {
                println!("gateway disabled");
            }
        }
        MeshctlCommand::Proxy { command } => {
            let req = match command {
                ProxyCommand::Enable {
                    socks5,
                    http,
                    allow_public,
                } => ListenRequest {
                    enable: true,
                    first: Some(socks5),
                    second: Some(http),
                    allow_public,
                },
                ProxyCommand::Disable => ListenRequest::default(),
            };
            let v: ProxyResponse = c.post("/v1/proxy", &req).await?;
            if v.enabled {
                println!(
                    "proxy listening: socks5 {}, http {}",
                    v.socks5.as_deref().unwrap_or("off"),
                    v.http.as_deref().unwrap_or("off")
                );
            } else {
                println!("proxy disabled");
            }
        }
        MeshctlCommand::Workloads { command } => {
            let req = match command {
                WorkloadsCommand::Enable { bridge } => WorkloadsRequest {
                    enable: true,
                    bridge: Some(bridge),
                },
                WorkloadsCommand::Disable => WorkloadsRequest {
                    enable: false,
                    bridge: None,
                },
            };
            let r: WorkloadsReport = c.post("/v1/workloads", &req).await?;
            match &r.bridge {
                Some(b) if r.enabled => println!(
                    "workloads on {b}: {} with gateway {} (routed to the mesh, masqueraded \
                     elsewhere); add one with `meshctl workload add NAME` or \
                     `meshctl docker-network`",
                    r.subnet, r.gateway
                ),
                _ => println!("workloads off: bridge, rules and workload namespaces removed"),
            }
        }
        MeshctlCommand::Workload { command } => match command {
            WorkloadCommand::Add { name, ip } => {
                let w: WorkloadView = c
                    .post("/v1/workload/add", &WorkloadAddRequest { name, ip })
                    .await?;
                println!(
                    "workload {} at {} ({}); run programs in it with: sudo ip netns exec {} COMMAND",
                    w.name, w.ip, w.dns, w.name
                );
            }
            WorkloadCommand::Rm { name } => {
                let w: WorkloadView = c
                    .post("/v1/workload/rm", &WorkloadRemoveRequest { name })
                    .await?;
                println!("workload {} ({}) removed", w.name, w.ip);
            }
            WorkloadCommand::Ls { json } => {
                let r: WorkloadsReport = c.get("/v1/workloads").await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&r)?);
                } else {
                    print!("{}", super::format::workloads(&r));
                }
            }
        },
        MeshctlCommand::DockerNetwork { name, print } => {
            let r: WorkloadsReport = c.get("/v1/workloads").await?;
            let bridge = r.bridge.filter(|_| r.enabled).ok_or_else(|| {
                anyhow::anyhow!("workloads are off on this node: meshctl workloads enable first")
            })?;
            let gateway: std::net::Ipv4Addr = r
                .gateway
                .parse()
                .map_err(|e| anyhow::anyhow!("the node's gateway {}: {e}", r.gateway))?;
            let args = crate::workloads::docker_network_args(&bridge, gateway, &name);
            let shown = format!("docker {}", args.join(" "));
            let docker = std::process::Command::new("docker").arg("version").output();
            if print || !docker.is_ok_and(|o| o.status.success()) {
                println!("{shown}");
            } else {
                let o = std::process::Command::new("docker").args(&args).output()?;
                let err = String::from_utf8_lossy(&o.stderr);
                if o.status.success() {
                    println!("docker network {name} on {bridge} ({}); run containers with: docker run --network {name} ...", r.subnet);
                } else if err.contains("already exists") {
                    println!("docker network {name} exists already");
                } else {
                    anyhow::bail!("{shown} failed: {}", err.trim());
                }
            }
        }
        MeshctlCommand::Relay { command } => {
            let enable = matches!(command, ToggleCommand::Enable);
            let _: RelayResponse = c.post("/v1/relay", &ToggleRequest { enable }).await?;
            println!(
                "{}",
                if enable {
                    "this node relays for members that cannot reach each other directly"
                } else {
                    "this node no longer relays for other members (the sessions it held end)"
                }
            );
        }
        MeshctlCommand::ExitNode { command } => {
            let enable = matches!(command, ToggleCommand::Enable);
            let _: ExitNodeResponse = c.post("/v1/exit-node", &ToggleRequest { enable }).await?;
            println!(
                "{}",
                if enable {
                    "this node is an exit node: members' proxies may reach the networks it reaches"
                } else {
                    "this node is no longer an exit node"
                }
            );
        }
        MeshctlCommand::Nc { host, port, exit } => {
            let stream = c.connect(&ConnectRequest { host, port, exit }).await?;
            nc(stream).await?;
        }
    }
    Ok(())
}

/// stdin -> stream, stream -> stdout; stdin's end is passed on as a half-close, and the session
/// ends when the far side closes.
async fn nc<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static>(
    stream: S,
) -> anyhow::Result<()> {
    use tokio::io::AsyncWriteExt;
    let (mut r, mut w) = tokio::io::split(stream);
    let up = tokio::spawn(async move {
        let mut stdin = tokio::io::stdin();
        let _ = tokio::io::copy(&mut stdin, &mut w).await;
        let _ = w.shutdown().await;
    });
    let mut stdout = tokio::io::stdout();
    let res = tokio::io::copy(&mut r, &mut stdout).await;
    let _ = stdout.flush().await;
    up.abort();
    res.map(|_| ())
        .map_err(|e| anyhow::anyhow!("connection: {e}"))
}
