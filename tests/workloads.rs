//! Workloads on the node's /24 with real meshd processes: namespaces on two nodes talk with
//! their own addresses (no NAT inside the mesh), reach outside masqueraded, resolve each other
//! by name, cannot forge another node's address; the bridge and rules go with meshd and come
//! back with it.

mod common;

use common::{Kill, Lab};
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

/// A TCP server in `ns` (a workload namespace, or `None`: a lab host via `lab_host`) that
/// answers every connection with the address it came from.
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
