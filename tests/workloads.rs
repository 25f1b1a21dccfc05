//! Workloads on the node's /24 with real meshd processes: namespaces on two nodes talk with
//! their own addresses (no NAT inside the mesh; bulk TCP whole, coalesced segments forwarded
//! onto the bridge), reach outside masqueraded, resolve each other by name, cannot forge
//! another node's address; the bridge and rules go with meshd and come back with it.

mod common;

use common::workloads::echo_bulk;
use common::{Kill, Lab};
use meshd::cli::demo::lab::Netns;
use std::net::Ipv4Addr;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

/// Workload namespaces live under /run/netns, shared by every test of the machine: names of
/// this process only, removed whatever happens.
struct Names(Vec<String>);

impl Names {
    fn new(bases: &[&str]) -> Names {
        let pid = std::process::id();
        Names(bases.iter().map(|b| format!("{b}-{pid}")).collect())
    }
}

impl Drop for Names {
    fn drop(&mut self) {
        for n in &self.0 {
            let _ = Command::new("ip")
                .args(["netns", "del", n])
                .stderr(Stdio::null())
                .status();
            let _ = std::fs::remove_dir_all(format!("/etc/netns/{n}"));
        }
    }
}

/// `program args` inside workload namespace `ns`.
fn in_ns(ns: &str, program: &str, args: &[&str]) -> Output {
    Command::new("ip")
        .args(["netns", "exec", ns, program])
        .args(args)
        .output()
        .expect("ip netns exec")
}

/// `cmd` (socat with [`socat_args`], in a workload namespace or a lab host) as a server that
/// answers every connection with the address it came from; killed on drop.
fn peer_addr_server(cmd: Command) -> Kill {
    let mut cmd = cmd;
    Kill(
        cmd.stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("socat"),
    )
}

fn socat_args(port: u16) -> Vec<String> {
    vec![
        "-T5".into(),
        format!("TCP-LISTEN:{port},reuseaddr,fork"),
        "SYSTEM:echo $SOCAT_PEERADDR".into(),
    ]
}

/// Connect from workload `ns` to `to:port`; what the server said (the client's address as
/// the server saw it), or `None`.
fn ask(ns: &str, to: Ipv4Addr, port: u16) -> Option<String> {
    let o = in_ns(
        ns,
        "socat",
        &["-T3", "-", &format!("TCP:{to}:{port},connect-timeout=2")],
    );
    let s = String::from_utf8_lossy(&o.stdout).trim().to_string();
    (o.status.success() && !s.is_empty()).then_some(s)
}

fn workloads(lab: &Lab, h: usize) -> serde_json::Value {
    let o = lab.meshctl(h, &["workload", "ls", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn ip_of(lab: &Lab, h: usize, name: &str) -> Ipv4Addr {
    workloads(lab, h)["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["name"] == name)
        .and_then(|w| w["ip"].as_str()?.parse().ok())
        .unwrap_or_else(|| panic!("workload {name} on host {h}"))
}

fn ok(o: &Output) -> bool {
    o.status.success()
}

/// Something the node's namespace has (a link, meshd's table), by command.
fn has(lab: &Lab, h: usize, program: &str, args: &[&str]) -> bool {
    ok(&lab.sh(h, program, args))
}

#[test]
fn workloads_on_two_nodes_talk_with_their_own_addresses() {
    let names = Names::new(&["wa", "wb"]);
    let (wa, wb) = (names.0[0].as_str(), names.0[1].as_str());
    let mut lab = Lab::new("wl", 4);
    let token = lab.init(0, "a", &[]);
    lab.join(1, "b", &token);
    lab.join(2, "c", &token);
    lab.wait_all_pairs(&[0, 1, 2], Duration::from_secs(60));
    let c_ip = lab.mesh_ip(2);

    // Without workloads enabled, adding one says what to do.
    let o = lab.meshctl(0, &["workload", "add", wa]);
    assert!(!ok(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("meshctl workloads enable"),
        "{o:?}"
    );
    let forwarding = |lab: &Lab, h: usize| {
        let o = lab.sh(h, "sysctl", &["-n", "net.ipv4.ip_forward"]);
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    assert!(ok(&lab.sh(1, "sysctl", &["-qw", "net.ipv4.ip_forward=0"])));
    for h in [0, 1] {
        let o = lab.meshctl(h, &["workloads", "enable"]);
        assert!(ok(&o), "{}", String::from_utf8_lossy(&o.stderr));
    }
    assert!(has(&lab, 0, "ip", &["link", "show", "meshbr0"]));
    // A bad name or an address outside the /24 changes nothing.
    let o = lab.meshctl(0, &["workload", "add", "Not_A_Label"]);
    assert!(!ok(&o) && String::from_utf8_lossy(&o.stderr).contains("DNS label"));
    let o = lab.meshctl(0, &["workload", "add", wa, "--ip", &format!("{c_ip}")]);
    assert!(!ok(&o) && String::from_utf8_lossy(&o.stderr).contains("not in this node's subnet"));
    assert!(workloads(&lab, 0)["workloads"]
        .as_array()
        .unwrap()
        .is_empty());

    for (h, n) in [(0, wa), (1, wb)] {
        let o = lab.meshctl(h, &["workload", "add", n]);
        assert!(ok(&o), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let (a_wl, b_wl) = (ip_of(&lab, 0, wa), ip_of(&lab, 1, wb));
    assert_eq!(a_wl.octets()[..3], lab.mesh_ip(0).octets()[..3]);
    assert_eq!(a_wl.octets()[3], 2, "the first free address");

    // Across the mesh: the server in b's workload sees a's workload's own address.
    let mut server = Command::new("ip");
    server
        .args(["netns", "exec", wb, "socat"])
        .args(socat_args(7000));
    let _srv = peer_addr_server(server);
    let mut seen = None;
    lab.wait_for("a's workload to reach b's", Duration::from_secs(20), || {
        seen = ask(wa, b_wl, 7000);
        seen.is_some()
    });
    assert_eq!(
        seen.as_deref(),
        Some(a_wl.to_string().as_str()),
        "no NAT in the mesh"
    );
    // Bulk TCP between the workloads, both ways: each node hands the kernel runs of segments
    // coalesced into single packets, and the kernel forwards them onto the bridge (split
    // again for the workload's veth) with every byte intact.
    let before: Vec<_> = (0..2).map(|h| lab.status(h).tun).collect();
    let (from, server) = (Netns::open(wa).unwrap(), Netns::open(wb).unwrap());
    echo_bulk(&from, &server, (b_wl, 7002).into(), 8 << 20, None);
    let after: Vec<_> = (0..2).map(|h| lab.status(h).tun).collect();
    for h in 0..2 {
        let packets = after[h].packets - before[h].packets;
        let writes = after[h].writes - before[h].writes;
        assert!(
            packets > 5_000 && packets >= 3 * writes,
            "node {h} coalesced what it forwarded: {packets} packets in {writes} writes"
        );
    }
    // And a third node (no workloads of its own) answers a's workload.
    assert!(ok(&in_ns(
        wa,
        "ping",
        &["-c", "1", "-W", "2", &c_ip.to_string()]
    )));

    // Outside the mesh: masqueraded as a's underlay address.
    let outside = lab.addr(3);
    let mut server = lab.ns(3).command("socat");
    server.args(socat_args(7001));
    let _out = peer_addr_server(server);
    let mut seen = None;
    lab.wait_for(
        "a's workload to reach outside",
        Duration::from_secs(20),
        || {
            seen = ask(wa, outside, 7001);
            seen.is_some()
        },
    );
    assert_eq!(seen, Some(lab.addr(0).to_string()), "masqueraded");
    // Nothing outside reaches a workload (the bridge takes only the mesh).
    let o = lab.sh(
        3,
        "ip",
        &[
            "route",
            "add",
            &format!("{a_wl}/32"),
            "via",
            &lab.addr(0).to_string(),
        ],
    );
    assert!(ok(&o), "{o:?}");
    let o = lab.sh(3, "ping", &["-c", "1", "-W", "1", &a_wl.to_string()]);
    assert!(!ok(&o), "the outside reached a workload");

    // Names: NAME.NODE.<domain> from every node, both ways, and from inside a workload.
    let fqdn = format!("{wa}.a.mesh.internal");
    for h in [0, 1, 2] {
        let server = lab.mesh_ip(h).to_string();
        lab.wait_for("the workload's name", Duration::from_secs(20), || {
            let o = lab.sh(h, "dig", &["+short", &format!("@{server}"), &fqdn]);
            String::from_utf8_lossy(&o.stdout).trim() == a_wl.to_string()
        });
        let o = lab.sh(
            h,
            "dig",
            &["+short", &format!("@{server}"), "-x", &a_wl.to_string()],
        );
        assert_eq!(
            String::from_utf8_lossy(&o.stdout).trim(),
            format!("{fqdn}.")
        );
    }
    // The proxy and `meshctl nc` take the names DNS answers: a's node reaches b's workload.
    let o = lab.meshctl(0, &["nc", &format!("{wb}.b.mesh.internal"), "7000"]);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        lab.mesh_ip(0).to_string(),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = in_ns(wa, "dig", &["+short", &format!("{wb}.b.mesh.internal")]);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        b_wl.to_string(),
        "a workload resolves through its node's DNS on the bridge"
    );

    // A workload forging an address of b's /24 gets nothing through, and it is counted.
    let b_sub = lab.mesh_ip(1).octets();
    let forged = Ipv4Addr::new(b_sub[0], b_sub[1], b_sub[2], 77);
    assert!(ok(&in_ns(
        wa,
        "ip",
        &["addr", "add", &format!("{forged}/32"), "dev", "eth0"]
    )));
    let o = in_ns(
        wa,
        "ping",
        &[
            "-c",
            "3",
            "-i",
            "0.2",
            "-W",
            "1",
            "-I",
            &forged.to_string(),
            &c_ip.to_string(),
        ],
    );
    assert!(!ok(&o), "forged pings must not be answered");
    let dropped = workloads(&lab, 0)["forged_dropped"].as_u64().unwrap();
    assert!(dropped >= 3, "{dropped} forged packets counted");
    assert!(ok(&in_ns(
        wa,
        "ip",
        &["addr", "del", &format!("{forged}/32"), "dev", "eth0"]
    )));

    // Stopping meshd removes the bridge and its table; starting it brings both back, and the
    // namespace (with its server untouched) works again.
    lab.stop(1);
    assert!(!has(&lab, 1, "ip", &["link", "show", "meshbr0"]));
    assert!(!has(&lab, 1, "nft", &["list", "table", "inet", "meshd"]));
    assert!(std::path::Path::new(&format!("/run/netns/{wb}")).exists());
    lab.run(1);
    lab.wait_for("b's workload back", Duration::from_secs(30), || {
        ask(wa, b_wl, 7000).as_deref() == Some(a_wl.to_string().as_str())
    });
    assert!(has(&lab, 1, "nft", &["list", "table", "inet", "meshd"]));

    // A crash leaves everything in place; the next start takes it over and the next clean
    // stop still gives forwarding back as it was before meshd (off).
    assert_eq!(forwarding(&lab, 1), "1");
    lab.kill9(1);
    assert!(has(&lab, 1, "ip", &["link", "show", "meshbr0"]));
    lab.run(1);
    lab.wait_for(
        "b's workload after a crash",
        Duration::from_secs(30),
        || ask(wa, b_wl, 7000).as_deref() == Some(a_wl.to_string().as_str()),
    );
    lab.stop(1);
    assert!(!has(&lab, 1, "ip", &["link", "show", "meshbr0"]));
    assert_eq!(
        forwarding(&lab, 1),
        "0",
        "forwarding as it was before meshd"
    );
    lab.run(1);
    lab.wait_for("b's workload back again", Duration::from_secs(30), || {
        ask(wa, b_wl, 7000).as_deref() == Some(a_wl.to_string().as_str())
    });

    // Removing one, then disabling: everything goes.
    let o = lab.meshctl(1, &["workload", "rm", wb]);
    assert!(ok(&o), "{o:?}");
    assert!(!std::path::Path::new(&format!("/run/netns/{wb}")).exists());
    let o = lab.meshctl(0, &["workloads", "disable"]);
    assert!(ok(&o), "{o:?}");
    assert!(!has(&lab, 0, "ip", &["link", "show", "meshbr0"]));
    assert!(!has(&lab, 0, "nft", &["list", "table", "inet", "meshd"]));
    assert!(!std::path::Path::new(&format!("/run/netns/{wa}")).exists());
    lab.wait_for("the name withdrawn", Duration::from_secs(20), || {
        let server = lab.mesh_ip(2).to_string();
        let o = lab.sh(2, "dig", &["+short", &format!("@{server}"), &fqdn]);
        String::from_utf8_lossy(&o.stdout).trim().is_empty()
    });
}

/// A private dockerd inside a node's namespace (its own data, exec root and socket, its own
/// mount namespace), stopped with its containers on drop.
struct Dockerd {
    child: std::process::Child,
    sock: String,
}

impl Dockerd {
    fn start(lab: &Lab, h: usize) -> Dockerd {
        let dir = lab.dir.path().join(format!("docker{h}"));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = format!("unix://{}", dir.join("docker.sock").display());
        let child = lab
            .ns(h)
            .command("unshare")
            .args(["--mount", "--propagation", "slave", "dockerd"])
            .arg(format!("--data-root={}", dir.join("data").display()))
            .arg(format!("--exec-root={}", dir.join("exec").display()))
            .arg(format!("--pidfile={}", dir.join("docker.pid").display()))
            .args(["-H", &sock, "--bridge=none"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("dockerd.log")).unwrap())
            .spawn()
            .expect("dockerd (Debian package docker.io)");
        let d = Dockerd { child, sock };
        lab.wait_for("dockerd ready", Duration::from_secs(60), || {
            ok(&d.docker(&["info"]))
        });
        d
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new("docker");
        c.env("DOCKER_HOST", &self.sock);
        c
    }

    fn docker(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().expect("docker")
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        if let Ok(o) = self.cmd().args(["ps", "-aq"]).output() {
            let ids = String::from_utf8_lossy(&o.stdout).into_owned();
            let ids: Vec<&str> = ids.split_whitespace().collect();
            if !ids.is_empty() {
                let _ = self.cmd().args(["rm", "-f"]).args(&ids).output();
            }
        }
        // SAFETY: signalling the child we started.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An image with nothing but a static busybox, made offline.
fn busybox_image(d: &Dockerd, dir: &std::path::Path) -> &'static str {
    let root = dir.join("rootfs");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("busybox (Debian package busybox-static)");
    let ldd = Command::new("ldd").arg(busybox).output().unwrap();
    assert!(
        !ok(&ldd),
        "{busybox} must be static: apt-get install busybox-static"
    );
    std::fs::copy(busybox, root.join("bin/busybox")).unwrap();
    for a in ["sh", "nc", "ping", "echo", "ip"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(a)).unwrap();
    }
    let mut tar = Command::new("tar")
        .arg("-C")
        .arg(&root)
        .args(["-c", "."])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let import = d
        .cmd()
        .args(["import", "-c", "ENV PATH=/bin", "-", "meshd-test-busybox"])
        .stdin(tar.stdout.take().unwrap())
        .output()
        .unwrap();
    assert!(tar.wait().unwrap().success());
    assert!(ok(&import), "{}", String::from_utf8_lossy(&import.stderr));
    "meshd-test-busybox"
}

/// `meshctl docker-network` gives a real container a mesh address: a member reaches it
/// through the mesh (past Docker's own forwarding rules), it reaches the member with its own
/// address.
#[test]
fn a_docker_container_gets_a_mesh_address() {
    let mut lab = Lab::new("dk", 2);
    // meshd asks the test's private dockerd (see Dockerd::start) for the containers' names.
    let docker_host = format!("unix://{}/docker0/docker.sock", lab.dir.path().display());
    lab.env.push(("DOCKER_HOST".into(), docker_host));
    let token = lab.init(0, "a", &[]);
    lab.join(1, "b", &token);
    lab.wait_all_pairs(&[0, 1], Duration::from_secs(60));
    let b_ip = lab.mesh_ip(1);
    // A host that did not forward before: Docker turns forwarding on and drops what it does
    // not know in FORWARD, as it does on a real machine.
    assert!(ok(&lab.sh(0, "sysctl", &["-qw", "net.ipv4.ip_forward=0"])));
    let d = Dockerd::start(&lab, 0);
    let image = busybox_image(&d, lab.dir.path());
    let o = lab.meshctl(0, &["workloads", "enable"]);
    assert!(ok(&o), "{}", String::from_utf8_lossy(&o.stderr));
    let rules =
        String::from_utf8_lossy(&lab.sh(0, "iptables", &["-S", "DOCKER-USER"]).stdout).into_owned();
    assert!(rules.contains("meshd"), "{rules}");

    let o = lab
        .ns(0)
        .command(env!("CARGO_BIN_EXE_meshctl"))
        .env("DOCKER_HOST", &d.sock)
        .arg("--socket")
        .arg(lab.socket(0))
        .args(["docker-network"])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(ok(&o), "{out}{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.contains("docker network mesh on meshbr0"), "{out}");
    let o = d.docker(&[
        "run",
        "-d",
        "--name",
        "c1",
        "--network",
        "mesh",
        image,
        "sh",
        "-c",
        "exec nc -ll -p 8080 -e echo hello-from-c1",
    ]);
    assert!(ok(&o), "{}", String::from_utf8_lossy(&o.stderr));
    let o = d.docker(&[
        "inspect",
        "-f",
        "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
        "c1",
    ]);
    let c1: Ipv4Addr = String::from_utf8_lossy(&o.stdout).trim().parse().unwrap();
    let a_sub = lab.mesh_ip(0).octets();
    assert_eq!(c1.octets()[..3], a_sub[..3], "in a's /24");
    assert!(c1.octets()[3] >= 128, "Docker's half of the /24: {c1}");

    // Its name, from Docker, in mesh DNS on every node and in `meshctl workload ls`.
    let fqdn = "c1.a.mesh.internal";
    for h in [0, 1] {
        let server = format!("@{}", lab.mesh_ip(h));
        lab.wait_for("the container's name", Duration::from_secs(20), || {
            let o = lab.sh(h, "dig", &["+short", &server, fqdn]);
            String::from_utf8_lossy(&o.stdout).trim() == c1.to_string()
        });
    }
    let listed = workloads(&lab, 0);
    let listed = &listed["workloads"].as_array().unwrap()[..];
    assert!(
        listed
            .iter()
            .any(|w| w["name"] == "c1" && w["container"] == true && w["ip"] == c1.to_string()),
        "{listed:?}"
    );
    // Listed, but Docker's to remove: said so, and meshd carries on.
    let o = lab.meshctl(0, &["workload", "rm", "c1"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!ok(&o) && err.contains("docker rm"), "{err}");
    assert!(
        lab.is_running(0),
        "meshd survives `workload rm` of a container"
    );

    let reach = |lab: &Lab| {
        let o = lab.sh(
            1,
            "socat",
            &["-T3", "-", &format!("TCP:{c1}:8080,connect-timeout=2")],
        );
        String::from_utf8_lossy(&o.stdout).contains("hello-from-c1")
    };
    lab.wait_for("b to reach the container", Duration::from_secs(20), || {
        reach(&lab)
    });
    // The container's own address, as b sees it.
    let mut server = lab.ns(1).command("socat");
    server.args(socat_args(7000));
    let _srv = peer_addr_server(server);
    let mut seen = String::new();
    lab.wait_for("the container to reach b", Duration::from_secs(20), || {
        let o = d.docker(&[
            "exec",
            "c1",
            "sh",
            "-c",
            &format!("nc -w 2 {b_ip} 7000 </dev/null"),
        ]);
        seen = String::from_utf8_lossy(&o.stdout).trim().to_string();
        !seen.is_empty()
    });
    assert_eq!(seen, c1.to_string(), "no NAT in the mesh");

    // A restart takes the bridge down and puts the container's port back on the new one.
    lab.stop(0);
    assert!(!has(&lab, 0, "ip", &["link", "show", "meshbr0"]));
    lab.run(0);
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    while !reach(&lab) {
        if std::time::Instant::now() > deadline {
            for (h, c, a) in [
                (0, "ip", vec!["-d", "link", "show", "master", "meshbr0"]),
                (0, "ip", vec!["addr", "show", "meshbr0"]),
                (0, "ip", vec!["route"]),
                (0, "iptables", vec!["-S"]),
                (0, "nft", vec!["list", "ruleset"]),
                (0, "sysctl", vec!["net.ipv4.ip_forward"]),
                (0, "ip", vec!["neigh"]),
            ] {
                let o = lab.sh(h, c, &a);
                eprintln!(
                    "--- {c} {a:?}\n{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                );
            }
            let gw = lab.mesh_ip(0).to_string();
            let o = d.docker(&[
                "exec",
                "c1",
                "sh",
                "-c",
                &format!("ip addr; ip route; ip neigh; ping -c1 -W1 {gw}"),
            ]);
            eprintln!(
                "--- container\n{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            panic!("b did not reach the container after a's restart");
        }
        std::thread::sleep(Duration::from_millis(200));
    }

    // After the restart the name is published again (the watcher found it before the node's
    // loop listened).
    let server = format!("@{}", lab.mesh_ip(1));
    lab.wait_for(
        "the container's name after a restart",
        Duration::from_secs(20),
        || {
            let o = lab.sh(1, "dig", &["+short", &server, fqdn]);
            String::from_utf8_lossy(&o.stdout).trim() == c1.to_string()
        },
    );

    // The container gone, its name goes too.
    assert!(ok(&d.docker(&["rm", "-f", "c1"])));
    lab.wait_for(
        "the container's name withdrawn",
        Duration::from_secs(20),
        || {
            let o = lab.sh(1, "dig", &["+short", &server, fqdn]);
            o.status.success() && String::from_utf8_lossy(&o.stdout).trim().is_empty()
        },
    );
}
