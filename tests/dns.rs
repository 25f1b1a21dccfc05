//! Mesh DNS end to end: names, pointers, services following membership, forwarding, robustness,
//! and no answers from outside the mesh.

mod common;

use common::Lab;
use std::net::Ipv4Addr;
use std::process::{Child, Stdio};
use std::time::Duration;

/// `dig` in host `h` against `server`; returns the `+short` lines.
fn dig(lab: &Lab, h: usize, server: Ipv4Addr, args: &[&str]) -> Vec<String> {
    let mut a = vec![
        format!("@{server}"),
        "+short".into(),
        "+time=2".into(),
        "+tries=2".into(),
    ];
    a.extend(args.iter().map(|s| s.to_string()));
    let a: Vec<&str> = a.iter().map(|s| s.as_str()).collect();
    let o = lab.sh(h, "dig", &a);
    let mut v: Vec<String> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty() && !l.starts_with(';'))
        .collect();
    v.sort();
    v
}

/// The response code `dig` reports ("NOERROR", "NXDOMAIN", ...), or "TIMEOUT".
fn rcode(lab: &Lab, h: usize, server: Ipv4Addr, name: &str) -> String {
    let o = lab.sh(
        h,
        "dig",
        &[&format!("@{server}"), "+time=1", "+tries=1", name],
    );
    let out = String::from_utf8_lossy(&o.stdout);
    out.split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .map(|s| s.to_string())
        .unwrap_or_else(|| "TIMEOUT".into())
}

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn every_node_resolves_every_name_and_pointer_and_outsiders_get_nothing() {
    let mut lab = Lab::new("dnsnames", 4);
    lab.form(&["db1", "web1", "cache-7"]);
    let names = ["db1", "web1", "cache-7"];
    let ips: Vec<Ipv4Addr> = (0..3).map(|h| lab.mesh_ip(h)).collect();
    for h in 0..3 {
        for (j, name) in names.iter().enumerate() {
            let fq = format!("{name}.mesh.internal");
            lab.wait_for(
                &format!("host {h} resolving {fq}"),
                Duration::from_secs(10),
                || dig(&lab, h, ips[h], &[&fq]) == vec![ips[j].to_string()],
            );
            assert_eq!(
                dig(&lab, h, ips[h], &["-x", &ips[j].to_string()]),
                vec![format!("{fq}.")]
            );
        }
        assert_eq!(rcode(&lab, h, ips[h], "nobody.mesh.internal"), "NXDOMAIN");
    }
    // TCP works too, and another node's server answers the same.
    assert_eq!(
        dig(&lab, 1, ips[0], &["+tcp", "web1.mesh.internal"]),
        vec![ips[1].to_string()]
    );
    // `meshctl dns` shows the zone; `meshctl status` shows DNS serving.
    let z = String::from_utf8(lab.meshctl(0, &["dns"]).stdout).unwrap();
    assert!(
        z.contains("cache-7.mesh.internal.") && z.contains(&ips[2].to_string()),
        "{z}"
    );
    assert_eq!(lab.status(0).dns.listen, Some(format!("{}:53", ips[0])));

    // A machine on the LAN that is not a member, routing the mesh range at db1, gets no answer.
    let o = lab.sh(
        3,
        "ip",
        &[
            "route",
            "add",
            "10.210.0.0/16",
            "via",
            &lab.addr(0).to_string(),
        ],
    );
    assert!(o.status.success());
    // Its packets do reach db1 (the kernel answers pings to any local address)...
    assert!(
        lab.ping(3, ips[0]),
        "the outsider's route to db1's mesh address works"
    );
    // ...but the DNS server only listens through the tunnels.
    assert_eq!(rcode(&lab, 3, ips[0], "db1.mesh.internal"), "TIMEOUT");
    let o = lab.sh(
        3,
        "dig",
        &[
            &format!("@{}", ips[0]),
            "+tcp",
            "+time=1",
            "+tries=1",
            "db1.mesh.internal",
        ],
    );
    assert!(!String::from_utf8_lossy(&o.stdout).contains("status: NOERROR"));
}

#[test]
fn services_answer_for_live_providers_only() {
    let mut lab = Lab::new("dnssvc", 3);
    lab.form(&["a", "b", "c"]);
    let (ip_a, ip_b, ip_c) = (lab.mesh_ip(0), lab.mesh_ip(1), lab.mesh_ip(2));
    // b publishes a container address of its /24.
    let b_container = Ipv4Addr::from(u32::from(ip_b) + 6);
    let o = lab.meshctl(0, &["service", "add", "api", "--port", "8080"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = lab.meshctl(
        1,
        &[
            "service",
            "add",
            "api",
            "--port",
            "9090",
            "--address",
            &b_container.to_string(),
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // An address outside the node's /24 is refused.
    let o = lab.meshctl(
        1,
        &[
            "service",
            "add",
            "bad",
            "--port",
            "1",
            "--address",
            &ip_a.to_string(),
        ],
    );
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("not an address of this node's subnet"));
    // A name whose SRV owner (_NAME) would not fit in a DNS label is refused up front.
    let long = "s".repeat(63);
    let o = lab.meshctl(1, &["service", "add", &long, "--port", "1"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("service name"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    let both = {
        let mut v = vec![ip_a.to_string(), b_container.to_string()];
        v.sort();
        v
    };
    lab.wait_for("c to see both providers", Duration::from_secs(10), || {
        dig(&lab, 2, ip_c, &["api.svc.mesh.internal"]) == both
    });
    let srv = dig(&lab, 2, ip_c, &["SRV", "_api._tcp.svc.mesh.internal"]);
    assert_eq!(srv.len(), 2, "{srv:?}");
    assert!(
        srv.iter()
            .any(|l| l.contains(" 8080 a.api.svc.mesh.internal.")),
        "{srv:?}"
    );
    assert!(
        srv.iter()
            .any(|l| l.contains(" 9090 b.api.svc.mesh.internal.")),
        "{srv:?}"
    );
    assert_eq!(
        dig(&lab, 2, ip_c, &["b.api.svc.mesh.internal"]),
        vec![b_container.to_string()]
    );
    let ls = String::from_utf8(lab.meshctl(2, &["service", "ls"]).stdout).unwrap();
    assert!(
        ls.lines().filter(|l| l.starts_with("api")).count() == 2,
        "{ls}"
    );

    // b stops answering: within the failure detection time only a remains.
    lab.kill9(1);
    let took = lab.wait_for(
        "b to drop out of the answers",
        Duration::from_secs(15),
        || dig(&lab, 2, ip_c, &["api.svc.mesh.internal"]) == vec![ip_a.to_string()],
    );
    println!(
        "offline provider dropped out after {:.1}s",
        took.as_secs_f64()
    );
    assert_eq!(
        dig(&lab, 2, ip_c, &["SRV", "_api._tcp.svc.mesh.internal"]).len(),
        1
    );

    // Withdrawn: gone everywhere.
    let o = lab.meshctl(0, &["service", "rm", "api"]);
    assert!(o.status.success());
    lab.wait_for("the service to be gone", Duration::from_secs(10), || {
        rcode(&lab, 2, ip_c, "api.svc.mesh.internal") == "NXDOMAIN"
    });
    // Services survive a restart of the publisher.
    let o = lab.meshctl(0, &["service", "add", "db", "--port", "5432"]);
    assert!(o.status.success());
    lab.stop(0);
    lab.run(0);
    lab.wait_for(
        "db to be served again after a's restart",
        Duration::from_secs(15),
        || dig(&lab, 2, ip_c, &["db.svc.mesh.internal"]) == vec![ip_a.to_string()],
    );
}

#[test]
fn other_names_are_forwarded_upstream_and_garbage_is_survived() {
    let mut lab = Lab::new("dnsfwd", 3);
    // Host 3 (index 2) is not a member: it runs the upstream DNS server.
    let upstream = lab.addr(2);
    let _dnsmasq = Killed(
        lab.ns(2)
            .command("dnsmasq")
            .args([
                "--no-daemon",
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                "--pid-file=",
                "--port=53",
            ])
            .arg(format!("--listen-address={upstream}"))
            .arg("--address=/example.test/203.0.113.7")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("dnsmasq (Debian package dnsmasq)"),
    );
    let up = upstream.to_string();
    let token = lab.init(0, "a", &["--dns-upstream", &up]);
    lab.join(1, "b", &token);
    lab.wait_all_pairs(&[0, 1], Duration::from_secs(30));
    let ip_a = lab.mesh_ip(0);
    lab.wait_for(
        "a forwarding www.example.test",
        Duration::from_secs(10),
        || dig(&lab, 1, ip_a, &["www.example.test"]) == vec!["203.0.113.7".to_string()],
    );
    assert_eq!(lab.status(0).dns.upstreams, vec![format!("{up}:53")]);
    // Mesh names are never forwarded.
    assert_eq!(rcode(&lab, 1, ip_a, "ghost.mesh.internal"), "NXDOMAIN");

    // Garbage and truncated queries over UDP and TCP, from a member.
    let target = std::net::SocketAddr::from((ip_a, 53));
    lab.ns(1)
        .run(move || {
            use std::io::Write;
            let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
            let good_prefix = [0x12u8, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 3, b'a', b'b'];
            for junk in [&[][..], &[0u8; 2][..], &[0xff; 300][..], &good_prefix[..]] {
                s.send_to(junk, target).unwrap();
            }
            for junk in [&[0u8, 200, 1, 2][..], &[0xff; 64][..]] {
                let mut t =
                    std::net::TcpStream::connect_timeout(&target, Duration::from_secs(2)).unwrap();
                let _ = t.write_all(junk);
            }
        })
        .unwrap();
    assert_eq!(
        dig(&lab, 1, ip_a, &["b.mesh.internal"]),
        vec![lab.mesh_ip(1).to_string()]
    );
    assert_eq!(
        dig(&lab, 1, ip_a, &["+tcp", "www.example.test"]),
        vec!["203.0.113.7".to_string()]
    );
}
