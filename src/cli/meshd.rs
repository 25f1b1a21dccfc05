//! `meshd`: init, join, run, leave, demo.

use super::args::{MeshdCli, MeshdCommand, NodeArgs, Paths};
use super::service::{self, BadInput};
use crate::control::client::Client;
use crate::control::LeaveResponse;
use crate::id::MeshRange;
use crate::node::platform::LinuxPlatform;
use crate::node::setup::{self, InitParams, JoinParams};
use crate::node::{self, Exit, NodeOptions, Ready};
use crate::state::StateDir;
use crate::trust::Token;
use crate::util::{is_dns_label, unix_now};
use clap::Parser;
use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

pub fn main() -> ExitCode {
    let cli = MeshdCli::parse();
    super::init_logging("info", cli.log_level.as_deref());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("meshd: {}", service::describe(&e));
            ExitCode::from(service::exit_code(&e))
        }
    }
}

async fn run(cli: MeshdCli) -> anyhow::Result<ExitCode> {
    if matches!(
        cli.command,
        MeshdCommand::Init { .. } | MeshdCommand::Join { .. } | MeshdCommand::Run { .. }
    ) {
        // Before anything is read or written: a first run without it leaves nothing behind.
        service::check_net_admin()?;
    }
    match cli.command {
        MeshdCommand::Init {
            node,
            cidr,
            domain,
            paths,
        } => init(node, cidr, domain, paths).await,
        MeshdCommand::Join {
            token,
            node,
            bootstrap,
            paths,
        } => join(token, node, bootstrap, paths).await,
        MeshdCommand::Run { port, paths } => run_node(&paths, port, None, |_| {}).await,
        MeshdCommand::Leave { paths } => leave(&paths).await,
        MeshdCommand::Demo { nodes, once } => super::demo::run(nodes, once).await,
        MeshdCommand::Completions { shell } => {
            super::docs::print_completions("meshd", shell)?;
            Ok(ExitCode::SUCCESS)
        }
        MeshdCommand::Manpages { dir } => {
            for p in super::docs::manpages(&dir)? {
                println!("{}", dir.join(p).display());
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// A value given to meshd that it cannot use (exit status 78).
fn bad(message: impl Into<String>) -> anyhow::Error {
    BadInput(message.into()).into()
}

/// `--tun`: an interface name the kernel takes, checked before anything is written or asked.
fn tun_name(node: &NodeArgs) -> anyhow::Result<String> {
    crate::util::check_ifname("--tun", &node.tun).map_err(bad)?;
    Ok(node.tun.clone())
}

/// The node's name: `--name`, else the hostname, validated as a DNS label.
fn node_name(arg: &Option<String>) -> anyhow::Result<String> {
    match arg {
        Some(n) => {
            if !is_dns_label(n) {
                return Err(bad(format!(
                    "--name {n:?} is not a valid node name: use 1-63 lowercase letters, digits and '-', \
                     not starting or ending with '-'"
                )));
            }
            Ok(n.clone())
        }
        None => {
            let h = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .unwrap_or_default()
                .trim()
                .to_lowercase();
            let h = h.split('.').next().unwrap_or("").to_string();
            if !is_dns_label(&h) {
                return Err(bad(format!(
                    "the hostname {h:?} is not a valid node name (a DNS label: 1-63 of a-z, 0-9 and '-'); \
                     pass --name NAME"
                )));
            }
            Ok(h)
        }
    }
}

fn endpoints(node: &NodeArgs) -> anyhow::Result<Vec<std::net::SocketAddr>> {
    node.endpoints
        .iter()
        .map(|e| setup::parse_endpoint(e, node.port).map_err(|m| bad(format!("--endpoint: {m}"))))
        .collect()
}

fn dns_upstreams(node: &NodeArgs) -> anyhow::Result<Vec<std::net::SocketAddr>> {
    node.dns_upstream
        .iter()
        .map(|e| setup::parse_endpoint(e, 53).map_err(|m| bad(format!("--dns-upstream: {m}"))))
        .collect()
}

fn print_join_line(token: &Token) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "meshd join {}", token.encode());
    let _ = out.flush();
}

async fn init(
    node: NodeArgs,
    cidr: String,
    domain: String,
    paths: Paths,
) -> anyhow::Result<ExitCode> {
    let name = node_name(&node.name)?;
    let range: MeshRange = cidr
        .parse()
        .map_err(|e: String| bad(format!("--cidr: {e}")))?;
    validate_domain(&domain)?;
    let state = StateDir::new(&paths.state_dir);
    let p = InitParams {
        name,
        range,
        domain,
        port: node.port,
        endpoints: endpoints(&node)?,
        tun: tun_name(&node)?,
        dns_upstream: dns_upstreams(&node)?,
        keys: None,
    };
    let token = setup::create_mesh(&LinuxPlatform, &state, &p, unix_now())?;
    drop(state);
    if node.no_run {
        eprintln!(
            "created mesh {} in {}; start the node with `meshd run` (or systemctl start meshd). \
             On every other machine run:",
            token.mesh(),
            paths.state_dir.display()
        );
        print_join_line(&token);
        return Ok(ExitCode::SUCCESS);
    }
    let ran = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ran2 = ran.clone();
    let result = run_node(&paths, None, None, move |r: &Ready| {
        ran2.store(true, std::sync::atomic::Ordering::Relaxed);
        eprintln!(
            "created mesh {}; this node is {} at {} ({}). On every other machine run:",
            token.mesh(),
            r.name,
            r.mesh_ip,
            r.subnet
        );
        print_join_line(&token);
    })
    .await;
    undo_if_never_ran(result, &ran, &paths, true)
}

/// A first `init`/`join` whose node never came up leaves no state behind: the retry its error
/// advises (another `--port`, a TUN device) then starts clean.
fn undo_if_never_ran(
    result: anyhow::Result<ExitCode>,
    ran: &std::sync::atomic::AtomicBool,
    paths: &Paths,
    root_key_too: bool,
) -> anyhow::Result<ExitCode> {
    let Err(e) = result else {
        return result;
    };
    if ran.load(std::sync::atomic::Ordering::Relaxed) {
        return Err(e);
    }
    match StateDir::new(&paths.state_dir).undo_setup(root_key_too) {
        Ok(()) => Err(e.context(format!(
            "nothing was kept in {}: fix the cause and run the same command again",
            paths.state_dir.display()
        ))),
        Err(u) => Err(e.context(format!("(and removing the new state failed: {u})"))),
    }
}

fn validate_domain(d: &str) -> anyhow::Result<()> {
    let labels: Vec<&str> = d.split('.').collect();
    if labels.len() < 2 || !labels.iter().all(|l| is_dns_label(l)) {
        return Err(bad(format!(
            "--domain {d:?} is not usable: give at least two DNS labels such as mesh.internal \
             (never a whole top-level domain)"
        )));
    }
    Ok(())
}

/// One line from standard input (prompting when it is a terminal).
fn read_token_from_stdin() -> anyhow::Result<String> {
    use std::io::{BufRead, IsTerminal, Read};
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        eprint!("Paste the join token and press Enter: ");
    }
    let mut line = String::new();
    // A token is a few hundred bytes; never read without bound.
    stdin
        .lock()
        .take(64 * 1024)
        .read_line(&mut line)
        .map_err(|e| anyhow::anyhow!("reading the join token from standard input: {e}"))?;
    let line = line.trim();
    if line.is_empty() {
        return Err(bad(
            "no join token on standard input; pipe it in (meshd join - < token.txt) or pass it as \
             the argument",
        ));
    }
    Ok(line.to_string())
}

async fn join(
    token: String,
    node: NodeArgs,
    bootstrap: Vec<String>,
    paths: Paths,
) -> anyhow::Result<ExitCode> {
    let token = if token == "-" {
        read_token_from_stdin()?
    } else {
        token
    };
    let token = Token::decode(&token).map_err(|e| {
        anyhow::Error::new(e).context(
            "this join token is not usable (it is the whole line `meshd init` or `meshctl invite` \
             printed)",
        )
    })?;
    let name = node_name(&node.name)?;
    let bootstrap = bootstrap
        .iter()
        .map(|b| {
            setup::parse_endpoint(b, crate::constants::DEFAULT_PORT)
                .map_err(|m| bad(format!("--bootstrap: {m}")))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let state = StateDir::new(&paths.state_dir);
    let p = JoinParams {
        name,
        port: node.port,
        endpoints: endpoints(&node)?,
        tun: tun_name(&node)?,
        bootstrap,
        dns_upstream: dns_upstreams(&node)?,
        keys: None,
    };
    let udp = setup::join_mesh(&LinuxPlatform, &state, &token, &p, unix_now()).await?;
    drop(state);
    if node.no_run {
        eprintln!(
            "joined mesh {}; start the node with `meshd run` (or systemctl start meshd)",
            token.mesh()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let ran = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ran2 = ran.clone();
    let result = run_node(&paths, None, Some(udp), move |r: &Ready| {
        ran2.store(true, std::sync::atomic::Ordering::Relaxed);
        eprintln!(
            "joined mesh {} as {} at {} ({})",
            token.mesh(),
            r.name,
            r.mesh_ip,
            r.subnet
        );
    })
    .await;
    undo_if_never_ran(result, &ran, &paths, false)
}

async fn run_node(
    paths: &Paths,
    port: Option<u16>,
    udp: Option<crate::mesh::linux::LinuxUdp>,
    ready: impl FnOnce(&Ready),
) -> anyhow::Result<ExitCode> {
    let opts = NodeOptions {
        state_dir: paths.state_dir.clone(),
        socket: paths.socket.clone(),
        port,
    };
    let shutdown = CancellationToken::new();
    spawn_signal_handler(shutdown.clone());
    let ready = |r: &Ready| {
        ready(r);
        // The TUN device, the tunnels' socket and mesh DNS are up.
        service::notify(&format!(
            "READY=1\nSTATUS=node {} at {} ({})",
            r.name, r.mesh_ip, r.subnet
        ));
    };
    let exit = node::run(&opts, udp, shutdown, ready).await;
    service::notify("STOPPING=1");
    match exit? {
        Exit::Shutdown => Ok(ExitCode::SUCCESS),
        Exit::Left => Ok(ExitCode::SUCCESS),
        Exit::Removed => {
            eprintln!("meshd: this node was removed from the mesh by an administrator");
            Ok(ExitCode::from(3))
        }
        Exit::InviteUsedUp => {
            eprintln!(
                "meshd: the invite this node joined with was used up by another node first; \
                 move the state directory away and join again with a new token"
            );
            Ok(ExitCode::from(3))
        }
    }
}

/// `meshd leave` with the daemon stopped: run the node just long enough to tell the members
/// (a departure only counts once they hear it), then leave as a running node would.
async fn leave_stopped(paths: &Paths) -> anyhow::Result<ExitCode> {
    service::check_net_admin()?;
    eprintln!("meshd is not running: starting it to tell the members this node leaves");
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let run_paths = paths.clone();
    let node = tokio::spawn(async move {
        let opts = NodeOptions {
            state_dir: run_paths.state_dir.clone(),
            socket: run_paths.socket.clone(),
            port: None,
        };
        node::run(&opts, None, CancellationToken::new(), move |_: &Ready| {
            let _ = ready_tx.send(());
        })
        .await
    });
    if tokio::time::timeout(Duration::from_secs(30), ready_rx)
        .await
        .map_or(true, |r| r.is_err())
    {
        node.abort();
        anyhow::bail!("the node did not start within 30 s to announce its departure; see above");
    }
    let c = Client::new(&paths.socket);
    let r: LeaveResponse = c.post("/v1/leave", &serde_json::json!({})).await?;
    match tokio::time::timeout(Duration::from_secs(20), node).await {
        Ok(Ok(Ok(Exit::Left))) => {
            println!("{} left the mesh; subnet {} released", r.name, r.subnet);
            Ok(ExitCode::SUCCESS)
        }
        Ok(Ok(Ok(other))) => anyhow::bail!("the node stopped ({other:?}) before it had left"),
        Ok(Ok(Err(e))) => Err(e.into()),
        Ok(Err(e)) => anyhow::bail!("the node task failed: {e}"),
        Err(_) => anyhow::bail!(
            "{} announced its departure but did not stop within 20 s",
            r.name
        ),
    }
}

fn spawn_signal_handler(shutdown: CancellationToken) {
    tokio::spawn(async move {
        crate::util::shutdown_signal().await;
        tracing::info!("shutting down");
        shutdown.cancel();
    });
}

async fn leave(paths: &Paths) -> anyhow::Result<ExitCode> {
    let c = Client::new(&paths.socket);
    let r: LeaveResponse = match c.post("/v1/leave", &serde_json::json!({})).await {
        Ok(r) => r,
        Err(crate::control::client::ClientError::Connect { .. })
            if paths.state_dir.join("node.json").exists() =>
        {
            return leave_stopped(paths).await;
        }
        Err(e) => return Err(e.into()),
    };
    // Wait for the daemon to exit, so its port, TUN device and state lock are free when this
    // returns (`meshd leave && meshd join ...`). An older daemon sends no pid: its socket going
    // away is the sign then.
    let stat = std::path::PathBuf::from(format!("/proc/{}/stat", r.pid));
    let running = || {
        if r.pid == 0 {
            return paths.socket.exists();
        }
        // Gone, or a zombie its parent has not reaped yet: either way it let go of everything.
        std::fs::read_to_string(&stat).is_ok_and(|s| {
            s.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .is_some_and(|state| state != "Z" && state != "X")
        })
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    while running() {
        if Instant::now() >= deadline {
            // The pid may belong to another pid namespace (meshd in a container, the CLI on
            // the host): if the daemon's socket and the node's state are gone, it did leave.
            if !paths.socket.exists() && !paths.state_dir.join("node.json").exists() {
                break;
            }
            anyhow::bail!(
                "{} announced its departure, but meshd (pid {}) has not exited after 15 s; \
                 check its log",
                r.name,
                r.pid
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("{} left the mesh; subnet {} released", r.name, r.subnet);
    Ok(ExitCode::SUCCESS)
}
