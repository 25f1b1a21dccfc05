//! Command-line definitions (clap). The forms here are a contract: tests, docs and users
//! depend on them.

use crate::constants::*;
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "meshd",
    version = VERSION,
    about = "meshd: a self-hosted mesh VPN with no central server"
)]
pub struct MeshdCli {
    /// Log level or filter: error, warn, info, debug, trace, or e.g. info,meshd=debug
    /// (default info; `meshctl log-level` changes it while running).
    #[arg(long, global = true, env = "MESHD_LOG", value_name = "LEVEL")]
    pub log_level: Option<String>,
    #[command(subcommand)]
    pub command: MeshdCommand,
}

#[derive(Args, Debug, Clone)]
pub struct Paths {
    /// State directory (keys, certificate, member cache).
    #[arg(long, env = "MESHD_STATE_DIR", default_value = DEFAULT_STATE_DIR, global = true)]
    pub state_dir: PathBuf,
    /// Control socket meshctl talks to.
    #[arg(long, env = "MESHD_SOCKET", default_value = DEFAULT_SOCKET, global = true)]
    pub socket: PathBuf,
}

#[derive(Args, Debug, Clone)]
pub struct NodeArgs {
    /// Node name, a DNS label (default: the hostname).
    #[arg(long)]
    pub name: Option<String>,
    /// UDP port for WireGuard and joins.
    #[arg(long, default_value_t = DEFAULT_PORT)]
    pub port: u16,
    /// How other nodes reach this one, ADDR:PORT; repeat for several
    /// (default: this machine's non-loopback addresses with the port).
    #[arg(long = "endpoint", value_name = "ADDR:PORT")]
    pub endpoints: Vec<String>,
    /// TUN interface name.
    #[arg(long, default_value = DEFAULT_TUN)]
    pub tun: String,
    /// DNS server for names outside the mesh domain, IP[:PORT]; repeat for several
    /// (default: systemd-resolved's upstreams, else the resolvers in /etc/resolv.conf).
    #[arg(long = "dns-upstream", value_name = "IP[:PORT]")]
    pub dns_upstream: Vec<String>,
    /// Create the node's state and exit instead of running it (then start it with
    /// `meshd run`, e.g. from the systemd unit).
    #[arg(long)]
    pub no_run: bool,
}

#[derive(Subcommand, Debug)]
pub enum MeshdCommand {
    /// Create a new mesh with this machine as its first node, print a join line, and run.
    Init {
        #[command(flatten)]
        node: NodeArgs,
        /// Mesh range; each node gets a /24 of it.
        #[arg(long, default_value = DEFAULT_CIDR)]
        cidr: String,
        /// Mesh DNS domain.
        #[arg(long, default_value = DEFAULT_DOMAIN)]
        domain: String,
        #[command(flatten)]
        paths: Paths,
    },
    /// Join a mesh with a token from `meshd init` or `meshctl invite`, then run.
    Join {
        /// The token (the whole `meshd join ...` line works too), or `-` to read it from
        /// standard input, which keeps it out of the process list and the shell history.
        token: String,
        #[command(flatten)]
        node: NodeArgs,
        /// A live member to ask first, ADDR:PORT (in addition to the token's bootstrap list).
        #[arg(long, value_name = "ADDR:PORT")]
        bootstrap: Vec<String>,
        #[command(flatten)]
        paths: Paths,
    },
    /// Run an existing node (what the systemd unit calls).
    Run {
        /// Listen on this UDP port from now on (saved, as `meshctl set --port` does); for when
        /// the node's port is taken and meshd cannot start to be told.
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
        port: Option<u16>,
        #[command(flatten)]
        paths: Paths,
    },
    /// Leave the mesh for good: announce the departure, release the subnet, delete this node's
    /// identity. Talks to the running meshd (or starts it to announce the departure).
    Leave {
        #[command(flatten)]
        paths: Paths,
    },
    /// Start a real mesh of several nodes in network namespaces on this machine (needs root),
    /// show it working, and clean everything up on Ctrl-C.
    Demo {
        /// Number of nodes, 2 to 16.
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// Stop after showing the mesh instead of waiting for Ctrl-C.
        #[arg(long)]
        once: bool,
    },
    /// Print a shell completion script for meshd (bash, zsh, fish, elvish, powershell).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Write the man pages of meshd and meshctl (meshd.1, meshctl.1, one per subcommand) into
    /// DIR (what the package ships).
    #[command(hide = true)]
    Manpages {
        /// Where to write them.
        dir: PathBuf,
    },
}

#[derive(Parser, Debug)]
#[command(
    name = "meshctl",
    version = VERSION,
    about = "Inspect and administer the local meshd node"
)]
pub struct MeshctlCli {
    /// Control socket of the meshd to talk to.
    #[arg(long, env = "MESHD_SOCKET", default_value = DEFAULT_SOCKET, global = true)]
    pub socket: PathBuf,
    /// What to do (default: `status`).
    #[command(subcommand)]
    pub command: Option<MeshctlCommand>,
}

#[derive(Subcommand, Debug)]
pub enum MeshctlCommand {
    /// The versions of this meshctl and of the running meshd (warns when they differ).
    Version {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Print a shell completion script for meshctl (bash, zsh, fish, elvish, powershell).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Change the running meshd's log level or filter (error, warn, info, debug, trace, or
    /// e.g. info,meshd=debug) until it restarts.
    LogLevel {
        /// The level or filter.
        level: String,
    },
    /// This node's Prometheus metrics (also served on http://MESH_IP:9586/metrics, with
    /// http://MESH_IP:9586/sd listing every member's metrics target for Prometheus).
    Metrics,
    /// This node and one line per peer (also what `meshctl` alone prints).
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Make a join token (needs the mesh root key on this node). Prints `meshd join <TOKEN>`.
    Invite {
        /// Lifetime, e.g. 30m, 24h, 7d.
        #[arg(long, default_value = "24h")]
        expires: String,
        /// How many nodes may join with it (default: unlimited until it expires).
        #[arg(long)]
        uses: Option<u32>,
    },
    /// Remove a member for good (needs the mesh root key on this node).
    Remove {
        /// Node name or node id.
        node: String,
    },
    /// The mesh DNS zone as this node serves it, and how the host uses it.
    Dns {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Publish, withdraw and list services (answered as NAME.svc.<domain>).
    Service {
        #[command(subcommand)]
        command: ServiceCommand,
    },
    /// Serve HOSTNAME through the mesh's gateways: connections for it are forwarded to ADDR:PORT
    /// on this node (TLS is terminated there, not at the gateway).
    Expose {
        /// A DNS name, or a wildcard such as *.example.com (matched after exact names).
        hostname: String,
        /// Where the workload listens on this node, e.g. 127.0.0.1:8443.
        #[arg(long, value_name = "ADDR:PORT")]
        to: String,
        /// Where plain HTTP requests for the name go (HTTP-01 challenges, redirects); without
        /// it, HTTP requests are redirected to HTTPS.
        #[arg(long, value_name = "ADDR:PORT")]
        http_to: Option<String>,
        /// Send a PROXY protocol v2 header so the workload sees the real client address.
        #[arg(long)]
        proxy_protocol: bool,
    },
    /// Stop serving HOSTNAME.
    Unexpose {
        /// A hostname this node serves (as given to `meshctl expose`).
        hostname: String,
    },
    /// This node as a public gateway (HTTPS passed through by SNI, HTTP by Host).
    Gateway {
        #[command(subcommand)]
        command: GatewayCommand,
    },
    /// A local SOCKS5/HTTP proxy into the mesh.
    Proxy {
        #[command(subcommand)]
        command: ProxyCommand,
    },
    /// Change this node's port, endpoints, DNS upstreams or TUN name (saved; endpoints and
    /// upstreams apply at once, the port and TUN name when meshd restarts).
    Set {
        /// UDP port for WireGuard and joins (from the next start).
        #[arg(long)]
        port: Option<u16>,
        /// How other nodes reach this one, ADDR[:PORT]; repeat for several (replaces the list).
        #[arg(long = "endpoint", value_name = "ADDR[:PORT]")]
        endpoints: Vec<String>,
        /// Go back to publishing this machine's own addresses.
        #[arg(long, conflicts_with = "endpoints")]
        default_endpoints: bool,
        /// DNS server for names outside the mesh, IP[:PORT]; repeat for several (replaces the list).
        #[arg(long = "dns-upstream", value_name = "IP[:PORT]")]
        dns_upstream: Vec<String>,
        /// Go back to the host's resolvers.
        #[arg(long, conflicts_with = "dns_upstream")]
        default_dns_upstream: bool,
        /// TUN interface name (from the next start).
        #[arg(long)]
        tun: Option<String>,
    },
    /// Let other members' proxies exit to the networks this node reaches.
    ExitNode {
        #[command(subcommand)]
        command: ToggleCommand,
    },
    /// Relay for members that cannot reach each other directly (on by default; the relay sees
    /// only their WireGuard ciphertext).
    Relay {
        #[command(subcommand)]
        command: ToggleCommand,
    },
    /// Round trips to a member through its tunnel, with the path they take (like `ping`).
    Ping {
        /// A member: name, NAME.<domain>, mesh address or node id.
        node: String,
        /// How many round trips (one a second).
        #[arg(short = 'c', long, default_value_t = 3)]
        count: u32,
        /// Machine-readable output (one JSON object per answer).
        #[arg(long)]
        json: bool,
    },
    /// Where members see this node from: its public address per observer, whether its NAT maps
    /// per destination (hard NAT), and hole punches made.
    Netcheck {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Workloads on this node's /24: a bridge (meshbr0) holding the node's .1 as their gateway,
    /// routed to the mesh without NAT, masqueraded to anywhere else.
    Workloads {
        #[command(subcommand)]
        command: WorkloadsCommand,
    },
    /// Network namespaces on the workloads bridge, each with an address of this node's /24
    /// and a name in mesh DNS (NAME.NODE.<domain>).
    Workload {
        #[command(subcommand)]
        command: WorkloadCommand,
    },
    /// A Docker network on the workloads bridge, so `docker run --network mesh` gives a
    /// container a mesh address (.128-.254 of this node's /24): creates it when docker is
    /// here, else prints the command.
    DockerNetwork {
        /// The Docker network's name.
        #[arg(long, default_value = "mesh")]
        name: String,
        /// Print the docker command instead of running it.
        #[arg(long)]
        print: bool,
    },
    /// Connect stdin/stdout to HOST:PORT through the mesh (for ssh -o ProxyCommand='meshctl nc %h %p').
    Nc {
        /// A mesh name (db1, db1.mesh.internal, api.svc.mesh.internal) or address; anything with --exit.
        host: String,
        /// The TCP port to connect to.
        port: u16,
        /// Go through this exit node.
        #[arg(long)]
        exit: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum GatewayCommand {
    /// Start (and keep, across restarts) the gateway listeners.
    Enable {
        /// HTTPS listener, ADDR:PORT or "off".
        #[arg(long, default_value = "0.0.0.0:443")]
        https: String,
        /// HTTP listener, ADDR:PORT or "off".
        #[arg(long, default_value = "0.0.0.0:80")]
        http: String,
    },
    /// Stop being a gateway (kept across restarts).
    Disable,
}

#[derive(Subcommand, Debug)]
pub enum ProxyCommand {
    /// Start (and keep, across restarts) the proxy listeners.
    Enable {
        /// SOCKS5 listener, ADDR:PORT or "off".
        #[arg(long, default_value = "127.0.0.1:1080")]
        socks5: String,
        /// HTTP proxy listener, ADDR:PORT or "off".
        #[arg(long, default_value = "127.0.0.1:3128")]
        http: String,
        /// Allow listening on non-loopback addresses (anyone reaching them reaches the mesh).
        #[arg(long)]
        allow_public: bool,
    },
    /// Stop the proxy (kept across restarts).
    Disable,
}

#[derive(Subcommand, Debug)]
pub enum ToggleCommand {
    /// Turn it on (kept across restarts).
    Enable,
    /// Turn it off (kept across restarts).
    Disable,
}

#[derive(Subcommand, Debug)]
pub enum WorkloadsCommand {
    /// Make the bridge, forwarding and masquerading (kept across restarts, removed while meshd
    /// is stopped).
    Enable {
        /// The bridge's name.
        #[arg(long, default_value = "meshbr0")]
        bridge: String,
    },
    /// Remove the bridge, meshd's rules and every workload namespace (kept across restarts).
    Disable,
}

#[derive(Subcommand, Debug)]
pub enum WorkloadCommand {
    /// Make a network namespace NAME on the bridge, for `ip netns exec NAME ...`.
    Add {
        /// The namespace's name and its DNS label (NAME.NODE.<domain>).
        name: String,
        /// Its address in this node's /24; default: the first free of .2-.127.
        #[arg(long)]
        ip: Option<String>,
    },
    /// Remove a workload namespace (processes still in it lose their network).
    #[command(alias = "remove")]
    Rm {
        /// A workload of this node.
        name: String,
    },
    /// This node's workloads.
    #[command(alias = "list")]
    Ls {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum ServiceCommand {
    /// Publish a service of this node (replaces one of the same name).
    Add {
        /// Service name, a DNS label.
        name: String,
        /// TCP port it listens on.
        #[arg(long)]
        port: u16,
        /// An address of this node's /24 (e.g. a container's); default: the node's .1.
        #[arg(long)]
        address: Option<std::net::Ipv4Addr>,
    },
    /// Withdraw a service of this node.
    #[command(alias = "remove")]
    Rm {
        /// A service of this node.
        name: String,
    },
    /// Every service in the mesh.
    #[command(alias = "list")]
    Ls {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every command, subcommand and option says what it is for in `--help`.
    fn no_blank_help(c: &clap::Command, path: &str, blank: &mut Vec<String>) {
        for a in c.get_arguments() {
            let builtin = matches!(a.get_id().as_str(), "help" | "version");
            if !builtin && !a.is_positional() && a.get_help().is_none() {
                blank.push(format!("{path} --{}", a.get_id()));
            }
            if a.is_positional() && a.get_help().is_none() {
                blank.push(format!("{path} <{}>", a.get_id()));
            }
        }
        for s in c.get_subcommands() {
            let p = format!("{path} {}", s.get_name());
            if s.get_about().is_none() && s.get_name() != "help" {
                blank.push(p.clone());
            }
            no_blank_help(s, &p, blank);
        }
    }

    #[test]
    fn every_help_line_is_filled() {
        let mut blank = Vec::new();
        no_blank_help(&MeshdCli::command(), "meshd", &mut blank);
        no_blank_help(&MeshctlCli::command(), "meshctl", &mut blank);
        assert!(blank.is_empty(), "no help text: {blank:#?}");
    }

    /// Every command path (`meshctl service add`) and option (`--json`) under `c` that the
    /// README does not name.
    fn undocumented(c: &clap::Command, path: &str, readme: &str, missing: &mut Vec<String>) {
        for a in c.get_arguments() {
            if let Some(long) = a.get_long() {
                let builtin = matches!(long, "help" | "version");
                if !builtin && !a.is_hide_set() && !readme.contains(&format!("--{long}")) {
                    missing.push(format!("{path} --{long}"));
                }
            }
        }
        for s in c.get_subcommands() {
            if s.get_name() == "help" || s.is_hide_set() {
                continue;
            }
            let p = format!("{path} {}", s.get_name());
            if !readme.contains(&p) {
                missing.push(p.clone());
            }
            undocumented(s, &p, readme, missing);
        }
    }

    /// The README is where a newcomer looks: it names every command and every option.
    #[test]
    fn the_readme_names_every_command_and_option() {
        let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
            .expect("README.md");
        let mut missing = Vec::new();
        undocumented(&MeshdCli::command(), "meshd", &readme, &mut missing);
        undocumented(&MeshctlCli::command(), "meshctl", &readme, &mut missing);
        assert!(missing.is_empty(), "not in the README: {missing:#?}");
    }

    #[test]
    fn the_version_names_the_commit() {
        assert!(VERSION.starts_with(env!("CARGO_PKG_VERSION")));
        assert!(VERSION.contains('('), "{VERSION}");
    }
}
