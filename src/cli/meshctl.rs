//! `meshctl`: a thin client of the control API.

use super::args::{MeshctlCli, MeshctlCommand, ServiceCommand};
use crate::control::client::Client;
use crate::control::{
    DnsReport, InviteRequest, InviteResponse, RemoveRequest, RemoveResponse, ServiceAddRequest,
    ServiceRemoveRequest, ServiceView, StatusReport,
};
use clap::Parser;

pub fn main() -> std::process::ExitCode {
    let cli = MeshctlCli::parse();
    super::init_logging("warn");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshctl: {e:#}");
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
    match cli.command {
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
                let v: serde_json::Value = c
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
                    if v["replaced"].as_bool() == Some(true) {
                        "updated"
                    } else {
                        "published"
                    },
                    v["name"].as_str().unwrap_or(""),
                    v["address"].as_str().unwrap_or(""),
                    v["port"],
                    v["dns"].as_str().unwrap_or("")
                );
            }
            ServiceCommand::Rm { name } => {
                let _: serde_json::Value = c
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
    }
    Ok(())
}
