//! The local SOCKS5/HTTP proxy into the mesh, exit nodes, and `meshctl nc`.
//!
//! ```text
//!  [a] proxy on 127.0.0.1 --mesh--> [b] web server on its mesh address, service "web"
//!                         --mesh--> [e] exit node --veth 203.0.113.0/24--> [outside] web server
//!                         --mesh--> [n] member, not an exit
//! ```

mod common;

use common::workloads;
use common::Lab;
use std::net::SocketAddr;
use std::time::Duration;

const A: usize = 0;
const B: usize = 1;
const E: usize = 2;
const N: usize = 3;

fn curl(lab: &Lab, h: usize, args: &[&str]) -> (bool, String, String) {
    let mut a = vec!["-sS", "--max-time", "10"];
    a.extend_from_slice(args);
    let o = lab.sh(h, "curl", &a);
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn socks5_and_http_proxy_reach_mesh_names_and_exit_nodes_reach_the_rest() {
    let mut lab = Lab::new("proxy", 5);
    let token = lab.init(A, "a", &[]);
    lab.join(B, "b", &token);
    lab.join(E, "e", &token);
    lab.join(N, "n", &token);
    lab.wait_all_pairs(&[A, B, E, N], Duration::from_secs(30));

    // b serves HTTP on its mesh address and publishes it as service "web".
    let b_ip = lab.mesh_ip(B);
    let _web = workloads::http(lab.ns(B), SocketAddr::from((b_ip, 8080)), "b");
    assert!(lab
        .meshctl(B, &["service", "add", "web", "--port", "8080"])
        .status
        .success());

    // A network only e is attached to: host 5 (index 4) on a private link.
    let outside = lab.ns(4).name().to_string();
    for (h, args) in [
        (
            E,
            vec![
                "link", "add", "ext0", "type", "veth", "peer", "name", "ext1", "netns", &outside,
            ],
        ),
        (E, vec!["addr", "add", "203.0.113.1/24", "dev", "ext0"]),
        (E, vec!["link", "set", "ext0", "up"]),
        (4, vec!["addr", "add", "203.0.113.10/24", "dev", "ext1"]),
        (4, vec!["link", "set", "ext1", "up"]),
    ] {
        let o = lab.sh(h, "ip", &args);
        assert!(
            o.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let _far = workloads::http(lab.ns(4), "203.0.113.10:80".parse().unwrap(), "outside");

    // Binding the proxy beyond loopback needs an explicit flag.
    let o = lab.meshctl(A, &["proxy", "enable", "--socks5", "0.0.0.0:1080"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--allow-public"));
    let o = lab.meshctl(A, &["proxy", "enable"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // SOCKS5 with remote name resolution, and HTTP absolute-form and CONNECT, by mesh name.
    lab.wait_for(
        "the web service to be known at a",
        Duration::from_secs(15),
        || {
            curl(
                &lab,
                A,
                &[
                    "--socks5-hostname",
                    "127.0.0.1:1080",
                    "http://web.svc.mesh.internal:8080/s",
                ],
            )
            .1 == "hello http from b path=/s\n"
        },
    );
    assert_eq!(
        curl(
            &lab,
            A,
            &[
                "-x",
                "http://127.0.0.1:3128",
                "http://b.mesh.internal:8080/abs"
            ]
        )
        .1,
        "hello http from b path=/abs\n"
    );
    assert_eq!(
        curl(
            &lab,
            A,
            &["-p", "-x", "http://127.0.0.1:3128", "http://b:8080/tunnel"]
        )
        .1,
        "hello http from b path=/tunnel\n"
    );

    // Outside the mesh without an exit node: refused, saying why.
    let (ok, _, err) = curl(
        &lab,
        A,
        &[
            "--socks5-hostname",
            "127.0.0.1:1080",
            "http://203.0.113.10/",
        ],
    );
    assert!(!ok, "{err}");
    let (ok, body, _) = curl(
        &lab,
        A,
        &["-x", "http://127.0.0.1:3128", "http://203.0.113.10/"],
    );
    assert!(ok && body.contains("not a mesh name"), "{body}");
    // Through e before it is an exit node: refused by e.
    let (_, body, _) = curl(
        &lab,
        A,
        &["-x", "http://e:x@127.0.0.1:3128", "http://203.0.113.10/"],
    );
    assert!(body.contains("e is not an exit node"), "{body}");

    let o = lab.meshctl(E, &["exit-node", "enable"]);
    assert!(o.status.success());
    lab.wait_for("e to act as exit", Duration::from_secs(15), || {
        curl(
            &lab,
            A,
            &[
                "--socks5-hostname",
                "127.0.0.1:1080",
                "--proxy-user",
                "e:x",
                "http://203.0.113.10/via-socks",
            ],
        )
        .1 == "hello http from outside path=/via-socks\n"
    });
    assert_eq!(
        curl(
            &lab,
            A,
            &[
                "-x",
                "http://e:x@127.0.0.1:3128",
                "http://203.0.113.10/via-http"
            ]
        )
        .1,
        "hello http from outside path=/via-http\n"
    );
    // The exit node's own host is not reachable through it: neither its loopback nor its own
    // addresses (where local-only services listen), nor link-local (cloud metadata).
    let _e_local = workloads::http(lab.ns(E), "127.0.0.1:8081".parse().unwrap(), "e-local");
    let _e_own = workloads::http(lab.ns(E), "203.0.113.1:8082".parse().unwrap(), "e-own");
    for (target, why) in [
        ("http://127.0.0.1:8081/", "is the exit node itself"),
        ("http://203.0.113.1:8082/", "is the exit node itself"),
        ("http://169.254.169.254/", "is link-local"),
    ] {
        let (_, body, err) = curl(&lab, A, &["-x", "http://e:x@127.0.0.1:3128", target]);
        assert!(body.contains(why), "{target}: {body} {err}");
        assert!(!body.contains("hello http"), "{target}: {body}");
    }
    // n is not an exit node; the target is not reachable from it anyway.
    let (ok, _, err) = curl(
        &lab,
        A,
        &[
            "--socks5-hostname",
            "127.0.0.1:1080",
            "--proxy-user",
            "n:x",
            "http://203.0.113.10/",
        ],
    );
    assert!(!ok, "{err}");
    let (_, body, _) = curl(
        &lab,
        A,
        &["-x", "http://n:x@127.0.0.1:3128", "http://203.0.113.10/"],
    );
    assert!(body.contains("n is not an exit node"), "{body}");
    // The outside network is not reachable from a directly (the mesh does not route it).
    let (ok, _, _) = curl(&lab, A, &["--connect-timeout", "2", "http://203.0.113.10/"]);
    assert!(!ok);
    lab.wait_for(
        "a to learn that e is an exit node",
        Duration::from_secs(10),
        || {
            lab.status(A)
                .peers
                .iter()
                .any(|p| p.name == "e" && p.exit_node)
        },
    );

    // An open exit connection ends when e stops being an exit node.
    let _outside_echo = workloads::echo(lab.ns(4), "203.0.113.10:7".parse().unwrap());
    let mut nc = lab
        .ns(A)
        .command(common::MESHCTL)
        .args(["--socket", lab.socket(A).to_str().unwrap()])
        .args(["nc", "203.0.113.10", "7", "--exit", "e"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = nc.stdin.take().unwrap();
    let (tx, lines) = std::sync::mpsc::channel();
    let stdout = nc.stdout.take().unwrap();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines() {
            if tx.send(line.ok()).is_err() {
                break;
            }
        }
        let _ = tx.send(None); // EOF
    });
    {
        use std::io::Write;
        stdin.write_all(b"through e\n").unwrap();
    }
    let echoed = lines.recv_timeout(Duration::from_secs(10));
    assert_eq!(echoed, Ok(Some("through e".to_string())));
    let o = lab.meshctl(E, &["exit-node", "disable"]);
    assert!(o.status.success());
    assert_eq!(
        lines.recv_timeout(Duration::from_secs(10)),
        Ok(None),
        "the exit connection stays open after exit-node disable"
    );
    drop(stdin);
    let _ = nc.kill();
    let _ = nc.wait();

    // Settings survive a restart.
    lab.stop(A);
    lab.run(A);
    lab.wait_for("the proxy after a restart", Duration::from_secs(15), || {
        curl(
            &lab,
            A,
            &["--socks5-hostname", "127.0.0.1:1080", "http://b:8080/again"],
        )
        .1 == "hello http from b path=/again\n"
    });
}

#[test]
fn meshctl_nc_carries_a_session_both_ways_with_half_close() {
    let mut lab = Lab::new("nc", 2);
    let token = lab.init(A, "a", &[]);
    lab.join(B, "b", &token);
    lab.wait_all_pairs(&[A, B], Duration::from_secs(30));
    let _echo = workloads::echo(lab.ns(B), SocketAddr::from((lab.mesh_ip(B), 2222)));
    // As ssh runs it: ProxyCommand='meshctl nc %h %p' with %h = the node name.
    let script = format!(
        "printf 'SSH-2.0-meshd-test\\n' | {} --socket {} nc b 2222",
        common::MESHCTL,
        lab.socket(A).display()
    );
    let o = lab.sh(A, "sh", &["-c", &script]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "SSH-2.0-meshd-test\n");
    // The far side closing ends the session, also while stdin stays open (like nc).
    let bye = SocketAddr::from((lab.mesh_ip(B), 2223));
    let (bound, listening) = std::sync::mpsc::channel();
    let server = lab
        .ns(B)
        .spawn(move || {
            use std::io::Write;
            let l = std::net::TcpListener::bind(bye).unwrap();
            bound.send(()).unwrap();
            let (mut s, _) = l.accept().unwrap();
            s.write_all(b"bye\n").unwrap();
        })
        .unwrap();
    listening.recv_timeout(Duration::from_secs(10)).unwrap();
    let mut nc = lab
        .ns(A)
        .command(common::MESHCTL)
        .args(["--socket", lab.socket(A).to_str().unwrap()])
        .args(["nc", "b", "2223"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdin_kept_open = nc.stdin.take().unwrap();
    let mut exited = None;
    lab.wait_for(
        "meshctl nc to end after the far side closed",
        Duration::from_secs(10),
        || {
            exited = nc.try_wait().unwrap();
            exited.is_some()
        },
    );
    assert!(exited.unwrap().success());
    let mut out = String::new();
    std::io::Read::read_to_string(&mut nc.stdout.take().unwrap(), &mut out).unwrap();
    assert_eq!(out, "bye\n");
    drop(stdin_kept_open);
    server.join().unwrap().unwrap();

    // A name that is not in the mesh: a clear error, non-zero exit.
    let o = lab.meshctl(A, &["nc", "example.com", "22"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("not a mesh name"));
}
