//! `meshctl`: a thin client of the control API.

use super::args::{MeshctlCli, MeshctlCommand};
use crate::control::client::Client;
use crate::control::{InviteRequest, InviteResponse, RemoveRequest, RemoveResponse, StatusReport};
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
    }
    Ok(())
}
