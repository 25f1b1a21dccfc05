//! Public HTTPS by SNI (and HTTP by Host) through a gateway node to the nodes serving each name.
//!
//! ```text
//!  [client 198.51.100.4] --TLS--> [gw 198.51.100.1 :443/:80] ==mesh==> [s1] workloads on 127.0.0.1
//!   not a member                                               ==mesh==> [s2] workloads on 127.0.0.1
//! ```

mod common;

use common::workloads::{self, Pki};
use common::Lab;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

const GW: usize = 0;
const S1: usize = 1;
const S2: usize = 2;
const CLIENT: usize = 3;

fn mesh(lab: &mut Lab) {
    let token = lab.init(GW, "gw", &[]);
    lab.join(S1, "s1", &token);
    lab.join(S2, "s2", &token);
    lab.wait_all_pairs(&[GW, S1, S2], Duration::from_secs(30));
    let o = lab.meshctl(GW, &["gateway", "enable"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

fn expose(lab: &Lab, h: usize, args: &[&str]) {
    let mut a = vec!["expose"];
    a.extend_from_slice(args);
    let o = lab.meshctl(h, &a);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// curl from the client through the gateway; (success, stdout, stderr).
fn curl(lab: &Lab, ca: &std::path::Path, url: &str) -> (bool, String, String) {
    let host = url
        .split("://")
        .nth(1)
        .unwrap()
        .split(['/', ':'])
        .next()
        .unwrap();
    let port = if url.starts_with("https") { 443 } else { 80 };
    let resolve = format!("{host}:{port}:{}", lab.addr(GW));
    let o = lab.sh(
        CLIENT,
        "curl",
        &[
            "-sS",
            "--max-time",
            "10",
            "--cacert",
            ca.to_str().unwrap(),
            "--resolve",
            &resolve,
            url,
        ],
    );
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// A test CA (its PEM in the lab directory, for curl).
fn test_ca(lab: &Lab) -> (Pki, std::path::PathBuf) {
    let pki = Pki::new();
    let ca = lab.dir.path().join("ca.pem");
    std::fs::write(&ca, &pki.ca_pem).unwrap();
    (pki, ca)
}

/// A TLS workload for `host` on s1 (127.0.0.1:8443), exposed and served through the gateway.
fn serve_one(lab: &Lab, host: &str) -> (std::path::PathBuf, workloads::Workload) {
    let (pki, ca) = test_ca(lab);
    let w = workloads::tls(lab.ns(S1), local(8443), &pki, &[host], "s1", false);
    expose(lab, S1, &[host, "--to", "127.0.0.1:8443"]);
    let url = format!("https://{host}/");
    lab.wait_for("the name to be served", Duration::from_secs(15), || {
        curl(lab, &ca, &url).0
    });
    (ca, w)
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Raw TCP from the client to the gateway: send `data`, return what comes back before close.
fn raw(lab: &Lab, port: u16, data: Vec<u8>) -> Vec<u8> {
    let gw = SocketAddr::from((lab.addr(GW), port));
    lab.ns(CLIENT)
        .run(move || {
            let mut s = std::net::TcpStream::connect_timeout(&gw, Duration::from_secs(5)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.write_all(&data).unwrap();
            let mut out = Vec::new();
            let _ = s.read_to_end(&mut out);
            out
        })
        .unwrap()
}

#[test]
fn tls_is_passed_through_by_sni_to_the_node_serving_each_name() {
    let mut lab = Lab::new("gwsni", 4);
    mesh(&mut lab);
    let (pki, ca) = test_ca(&lab);
    let _w1 = workloads::tls(
        lab.ns(S1),
        local(8443),
        &pki,
        &["app.example.test"],
        "s1",
        false,
    );
    let _w1h = workloads::http(lab.ns(S1), local(8080), "s1");
    let _w1p = workloads::tls(
        lab.ns(S1),
        local(8444),
        &pki,
        &["pp.example.test"],
        "s1-pp",
        true,
    );
    let _w2 = workloads::tls(
        lab.ns(S2),
        local(8443),
        &pki,
        &["other.example.test"],
        "s2",
        false,
    );
    expose(
        &lab,
        S1,
        &[
            "app.example.test",
            "--to",
            "127.0.0.1:8443",
            "--http-to",
            "127.0.0.1:8080",
        ],
    );
    expose(
        &lab,
        S1,
        &[
            "pp.example.test",
            "--to",
            "127.0.0.1:8444",
            "--proxy-protocol",
        ],
    );
    expose(&lab, S2, &["other.example.test", "--to", "127.0.0.1:8443"]);
    // Invalid names are refused with a clear error.
    let o = lab.meshctl(S1, &["expose", "not a name", "--to", "127.0.0.1:1"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("not a valid DNS name"));

    // The page of the node serving the name; the certificate checks out against the test CA,
    // so TLS ends at the workload, not the gateway.
    lab.wait_for(
        "app.example.test through the gateway",
        Duration::from_secs(15),
        || curl(&lab, &ca, "https://app.example.test/").1 == "hello from s1 client=-\n",
    );
    lab.wait_for(
        "other.example.test through the gateway",
        Duration::from_secs(15),
        || curl(&lab, &ca, "https://other.example.test/").1 == "hello from s2 client=-\n",
    );
    // The workload sees the real client through PROXY protocol v2.
    lab.wait_for(
        "pp.example.test through the gateway",
        Duration::from_secs(15),
        || curl(&lab, &ca, "https://pp.example.test/").0,
    );
    let (_, body, _) = curl(&lab, &ca, "https://pp.example.test/");
    assert!(
        body.starts_with(&format!("hello from s1-pp client={}:", lab.addr(CLIENT))),
        "{body}"
    );

    // HTTP by Host: to the workload's HTTP listener, or redirected to HTTPS when it has none.
    let (ok, body, err) = curl(
        &lab,
        &ca,
        "http://app.example.test/.well-known/acme-challenge/t",
    );
    assert!(ok, "{err}");
    assert_eq!(
        body,
        "hello http from s1 path=/.well-known/acme-challenge/t\n"
    );
    let o = lab.sh(
        CLIENT,
        "curl",
        &[
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{redirect_url}",
            "--resolve",
            &format!("other.example.test:80:{}", lab.addr(GW)),
            "http://other.example.test/p",
        ],
    );
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "308 https://other.example.test/p"
    );

    // Unknown names: a TLS unrecognized_name alert; no SNI: the same; garbage: closed.
    let (ok, _, err) = curl(&lab, &ca, "https://nope.example.test/");
    assert!(!ok);
    assert!(err.to_lowercase().contains("unrecognized name"), "{err}");
    let alert = meshd::proxy::sni::ALERT_UNRECOGNIZED_NAME.to_vec();
    assert_eq!(
        raw(&lab, 443, meshd::proxy::sni::client_hello_for(None)),
        alert
    );
    assert_eq!(
        raw(
            &lab,
            443,
            meshd::proxy::sni::client_hello_for(Some("nope.example.test"))
        ),
        alert
    );
    let mut bad = vec![22u8, 3, 1, 0, 40];
    bad.extend_from_slice(&[0xee; 40]);
    let got = raw(&lab, 443, bad);
    assert!(
        got.is_empty() || got == alert,
        "malformed hello must be refused: {got:?}"
    );
    let o = lab.sh(
        CLIENT,
        "curl",
        &[
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--resolve",
            &format!("nope.example.test:80:{}", lab.addr(GW)),
            "http://nope.example.test/",
        ],
    );
    assert_eq!(String::from_utf8_lossy(&o.stdout), "404");

    // Withdrawn: refused again.
    let o = lab.meshctl(S2, &["unexpose", "other.example.test"]);
    assert!(o.status.success());
    lab.wait_for(
        "other.example.test to be refused",
        Duration::from_secs(15),
        || {
            curl(&lab, &ca, "https://other.example.test/")
                .2
                .to_lowercase()
                .contains("unrecognized name")
        },
    );
    let st = lab.status(S1);
    assert_eq!(st.edge.exposed.len(), 2);
    assert!(lab.status(GW).edge.gateway.is_some());
}

#[test]
fn requests_keep_succeeding_when_one_of_two_serving_nodes_stops() {
    let mut lab = Lab::new("gwha", 4);
    mesh(&mut lab);
    let (pki, ca) = test_ca(&lab);
    let _w1 = workloads::tls(
        lab.ns(S1),
        local(8443),
        &pki,
        &["ha.example.test"],
        "s1",
        false,
    );
    let _w2 = workloads::tls(
        lab.ns(S2),
        local(8443),
        &pki,
        &["ha.example.test", "*.example.test"],
        "s2",
        false,
    );
    expose(&lab, S1, &["ha.example.test", "--to", "127.0.0.1:8443"]);
    expose(&lab, S2, &["*.example.test", "--to", "127.0.0.1:8443"]);
    expose(&lab, S2, &["ha.example.test", "--to", "127.0.0.1:8443"]);
    let mut seen = std::collections::HashSet::new();
    lab.wait_for(
        "both serving nodes to answer",
        Duration::from_secs(20),
        || {
            let (ok, body, _) = curl(&lab, &ca, "https://ha.example.test/");
            if ok {
                seen.insert(body);
            }
            seen.len() == 2
        },
    );
    // A wildcard name goes to the node exposing the wildcard.
    assert_eq!(
        curl(&lab, &ca, "https://any.example.test/").1,
        "hello from s2 client=-\n"
    );

    lab.kill9(S1);
    let start = Instant::now();
    for i in 0..10 {
        let (ok, body, err) = curl(&lab, &ca, "https://ha.example.test/");
        assert!(ok, "request {i} after s1 stopped failed: {err}");
        assert_eq!(body, "hello from s2 client=-\n");
    }
    println!(
        "10 requests after s1 stopped took {:.1}s",
        start.elapsed().as_secs_f64()
    );
}

#[test]
fn silent_and_slow_clients_do_not_hold_up_others() {
    let mut lab = Lab::new("gwslow", 4);
    mesh(&mut lab);
    let (ca, _w) = serve_one(&lab, "app.example.test");

    // 40 silent clients and one sending its ClientHello a byte a second, all at once.
    let gw = SocketAddr::from((lab.addr(GW), 443));
    let hello = meshd::proxy::sni::client_hello_for(Some("app.example.test"));
    let abusers = lab
        .ns(CLIENT)
        .spawn(move || {
            let start = Instant::now();
            let silent: Vec<std::net::TcpStream> = (0..40)
                .map(|_| std::net::TcpStream::connect_timeout(&gw, Duration::from_secs(5)).unwrap())
                .collect();
            let mut slow =
                std::net::TcpStream::connect_timeout(&gw, Duration::from_secs(5)).unwrap();
            slow.set_write_timeout(Some(Duration::from_secs(2)))
                .unwrap();
            // At a byte a second 30 bytes take 30 s; the gateway must cut it off before.
            let mut cut_after = None;
            for b in hello.iter().take(30) {
                if slow.write_all(&[*b]).is_err() {
                    cut_after = Some(start.elapsed());
                    break;
                }
                std::thread::sleep(Duration::from_secs(1));
            }
            // The gateway closed the silent ones too: reads end.
            let mut closed = 0;
            for mut s in silent {
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let mut b = [0u8; 16];
                if matches!(s.read(&mut b), Ok(0)) {
                    closed += 1;
                }
            }
            (cut_after, closed)
        })
        .unwrap();
    // Once all 41 are connected, real clients are still served: curl gives each request 10 s,
    // and a gateway that waited on the abusers would need their hello timeouts first.
    lab.wait_for(
        "the abusers to be connected",
        Duration::from_secs(10),
        || {
            let o = lab.sh(
                GW,
                "ss",
                &["-Htn", "state", "established", "( sport = :443 )"],
            );
            String::from_utf8_lossy(&o.stdout).lines().count() >= 41
        },
    );
    for i in 0..5 {
        let (ok, _, err) = curl(&lab, &ca, "https://app.example.test/");
        assert!(ok, "request {i} while abusers are connected: {err}");
    }
    let (slow_cut, closed) = abusers.join().unwrap().unwrap();
    assert_eq!(closed, 40, "every silent client is cut off");
    let cut = slow_cut.expect("the byte-a-second client is cut off before it has sent 30 bytes");
    println!(
        "byte-a-second client cut off after {:.1}s",
        cut.as_secs_f64()
    );
}

/// `gateway enable` again, with an address that is taken, and with HTTP turned off: the gateway
/// keeps serving throughout, and a failed change leaves it as it was.
#[test]
fn changing_the_gateway_listeners_keeps_it_serving() {
    let mut lab = Lab::new("gwre", 4);
    mesh(&mut lab);
    let (ca, _w) = serve_one(&lab, "re.example.test");
    let served = |lab: &Lab| {
        let (ok, body, err) = curl(lab, &ca, "https://re.example.test/");
        assert!(ok, "{err}");
        assert_eq!(body, "hello from s1 client=-\n");
    };
    let gateway = |lab: &Lab| {
        let g = lab.status(GW).edge.gateway.expect("gateway on");
        (g.first, g.second)
    };

    // The same again: nothing changes.
    let o = lab.meshctl(GW, &["gateway", "enable"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    served(&lab);

    // An address something else holds (mesh DNS listens on the mesh address, port 53): refused,
    // and the gateway keeps its addresses.
    let taken = format!("{}:53", lab.mesh_ip(GW));
    let o = lab.meshctl(GW, &["gateway", "enable", "--http", &taken]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("something else listens there") && err.contains("keeps its previous"),
        "{err}"
    );
    assert_eq!(
        gateway(&lab),
        (Some("0.0.0.0:443".into()), Some("0.0.0.0:80".into()))
    );
    served(&lab);

    // HTTP off: HTTPS goes on, port 80 is closed.
    let o = lab.meshctl(GW, &["gateway", "enable", "--http", "off"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(gateway(&lab), (Some("0.0.0.0:443".into()), None));
    served(&lab);
    let gw80 = SocketAddr::from((lab.addr(GW), 80));
    let refused = lab
        .ns(CLIENT)
        .run(move || std::net::TcpStream::connect_timeout(&gw80, Duration::from_secs(5)).is_err())
        .unwrap();
    assert!(refused, "port 80 still accepts connections");
}

/// Handoffs are taken only from member nodes' own addresses: a workload in a member's /24 (a
/// container) cannot hand a serving node a made-up client.
#[test]
fn handoffs_from_a_workload_address_are_refused() {
    use meshd::proxy::preamble::{encode, Handoff, Kind, HANDOFF_MAGIC};
    let mut lab = Lab::new("gwsrc", 3);
    let token = lab.init(GW, "gw", &[]);
    lab.join(S1, "s1", &token);
    lab.wait_all_pairs(&[GW, S1], Duration::from_secs(30));
    let _w = workloads::http(lab.ns(S1), local(8080), "s1");
    expose(
        &lab,
        S1,
        &[
            "h.example.test",
            "--to",
            "127.0.0.1:8443",
            "--http-to",
            "127.0.0.1:8080",
        ],
    );
    // A workload address in gw's /24, on gw's mesh interface.
    let gw_ip = lab.mesh_ip(GW);
    let o = gw_ip.octets();
    let workload = std::net::Ipv4Addr::new(o[0], o[1], o[2], 7);
    let cidr = format!("{workload}/32");
    let ip_ok = lab.sh(GW, "ip", &["addr", "add", &cidr, "dev", "mesh0"]);
    assert!(
        ip_ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ip_ok.stderr)
    );

    let target = SocketAddr::from((lab.mesh_ip(S1), meshd::proxy::SERVE_PORT));
    let mut msg = encode(
        HANDOFF_MAGIC,
        &Handoff {
            kind: Kind::Http,
            hostname: "h.example.test".into(),
            client: "203.0.113.66:1234".parse().unwrap(),
            gateway: SocketAddr::from((gw_ip, 80)),
        },
    );
    msg.extend_from_slice(b"GET /x HTTP/1.0\r\nHost: h.example.test\r\n\r\n");
    let handoff_from = |source: std::net::Ipv4Addr| {
        let msg = msg.clone();
        lab.ns(GW)
            .run(move || {
                let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                    .unwrap();
                sock.bind(&SocketAddr::from((source, 0)).into()).unwrap();
                sock.connect_timeout(&target.into(), Duration::from_secs(5))
                    .unwrap();
                let mut s: std::net::TcpStream = sock.into();
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                s.write_all(&msg).unwrap();
                let mut out = Vec::new();
                let _ = s.read_to_end(&mut out);
                String::from_utf8_lossy(&out).into_owned()
            })
            .unwrap()
    };
    // From the node itself: served (once s1 knows the name is exposed; it is local state).
    let mut from_node = String::new();
    lab.wait_for(
        "a handoff from gw's own address to be served",
        Duration::from_secs(15),
        || {
            from_node = handoff_from(gw_ip);
            from_node.contains("hello http from s1")
        },
    );
    // From the workload address: closed without an answer.
    assert_eq!(
        handoff_from(workload),
        "",
        "a workload's handoff was served"
    );

    // A live connection to an exposed name ends when the name is withdrawn.
    let _echo = workloads::echo(lab.ns(S1), local(9000));
    expose(&lab, S1, &["echo.example.test", "--to", "127.0.0.1:9000"]);
    let hello = encode(
        HANDOFF_MAGIC,
        &Handoff {
            kind: Kind::Tls,
            hostname: "echo.example.test".into(),
            client: "203.0.113.66:1234".parse().unwrap(),
            gateway: SocketAddr::from((gw_ip, 443)),
        },
    );
    let (echoed_tx, echoed) = std::sync::mpsc::channel::<()>();
    let (unexposed_tx, unexposed) = std::sync::mpsc::channel::<()>();
    let session = lab
        .ns(GW)
        .spawn(move || {
            let mut s =
                std::net::TcpStream::connect_timeout(&target, Duration::from_secs(5)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.write_all(&hello).unwrap();
            s.write_all(b"ping").unwrap();
            let mut b = [0u8; 4];
            s.read_exact(&mut b).unwrap();
            assert_eq!(&b, b"ping");
            echoed_tx.send(()).unwrap();
            unexposed.recv_timeout(Duration::from_secs(20)).unwrap();
            // Closed by the serving node: EOF, not the read timeout.
            let mut rest = Vec::new();
            s.read_to_end(&mut rest).is_ok()
        })
        .unwrap();
    echoed
        .recv_timeout(Duration::from_secs(15))
        .expect("the echo session works");
    let o = lab.meshctl(S1, &["unexpose", "echo.example.test"]);
    assert!(o.status.success());
    unexposed_tx.send(()).unwrap();
    assert!(
        session.join().unwrap().unwrap(),
        "the connection stayed open after unexpose"
    );
}
