//! Docker containers on the workloads bridge, so their names are answered in mesh DNS as
//! namespaces' are (`NAME.NODE.<domain>`). Asked of the Docker Engine API on its Unix socket:
//! the network whose bridge is ours, then the containers on it. No docker CLI, no client crate:
//! two HTTP/1.0 requests on a local socket, each bounded in time and size.

use serde::Deserialize;
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A container on the bridge: its name (as `docker ps` shows it) and address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Container {
    pub name: String,
    pub ip: Ipv4Addr,
}

/// Each request's time limit (connecting, sending, reading).
const TIMEOUT: Duration = Duration::from_secs(2);
/// The largest answer read (a network with a few thousand containers fits).
const MAX_ANSWER: u64 = 8 << 20;

/// The Docker socket: `DOCKER_HOST` when it names a Unix socket, else the default one. `None`
/// when `DOCKER_HOST` points elsewhere (TCP): meshd asks only a local daemon.
pub fn socket() -> Option<PathBuf> {
    socket_from(std::env::var("DOCKER_HOST").ok().as_deref())
}

fn socket_from(docker_host: Option<&str>) -> Option<PathBuf> {
    match docker_host.filter(|h| !h.is_empty()) {
        None => Some(PathBuf::from("/var/run/docker.sock")),
        Some(h) => h.strip_prefix("unix://").map(PathBuf::from),
    }
}

/// The containers on the Docker network whose bridge is `bridge`; none when there is no such
/// network, or no Docker daemon at `sock` (no socket file).
pub fn containers_on(sock: &Path, bridge: &str) -> io::Result<Vec<Container>> {
    if !sock.exists() {
        return Ok(Vec::new());
    }
    let Some(id) = network_on(&get(sock, "/networks")?, bridge)? else {
        return Ok(Vec::new());
    };
    containers(&get(sock, &format!("/networks/{id}"))?)
}

/// The body of a `GET path`, which must answer 200 within [`TIMEOUT`] in all.
fn get(sock: &Path, path: &str) -> io::Result<Vec<u8>> {
    let deadline = std::time::Instant::now() + TIMEOUT;
    let mut s = UnixStream::connect(sock)?;
    s.set_write_timeout(Some(TIMEOUT))?;
    // HTTP/1.0: the daemon closes the connection after one answer, never chunked.
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: docker\r\n\r\n").as_bytes())?;
    let mut answer = Vec::new();
    let mut chunk = [0u8; 16384];
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "Docker answered too slowly",
            ));
        }
        s.set_read_timeout(Some(left))?;
        match s.read(&mut chunk)? {
            0 => break,
            n if (answer.len() + n) as u64 > MAX_ANSWER => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "Docker's answer is too large",
                ));
            }
            n => answer.extend_from_slice(&chunk[..n]),
        }
    }
    body(&answer).map(<[u8]>::to_vec)
}

/// The body of an HTTP answer with status 200.
fn body(answer: &[u8]) -> io::Result<&[u8]> {
    let bad = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
    let end = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("an answer without a header end".into()))?;
    let status = answer[..end].split(|&b| b == b'\r').next().unwrap_or(&[]);
    let status = String::from_utf8_lossy(status);
    match status.split_whitespace().nth(1) {
        Some("200") => Ok(&answer[end + 4..]),
        _ => Err(bad(format!("Docker answered {status:?}"))),
    }
}

fn json<'a, T: Deserialize<'a>>(body: &'a [u8]) -> io::Result<T> {
    serde_json::from_slice(body).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

#[derive(Deserialize)]
struct Network {
    #[serde(rename = "Id")]
    id: String,
    #[serde(rename = "Options", default)]
    options: Option<HashMap<String, String>>,
    #[serde(rename = "Containers", default)]
    containers: Option<HashMap<String, Endpoint>>,
}

#[derive(Deserialize)]
struct Endpoint {
    #[serde(rename = "Name")]
    name: String,
    #[serde(rename = "IPv4Address", default)]
    ipv4: String,
}

/// The id of the network (from `GET /networks`) whose bridge is `bridge`.
fn network_on(body: &[u8], bridge: &str) -> io::Result<Option<String>> {
    let networks: Vec<Network> = json(body)?;
    Ok(networks
        .into_iter()
        .find(|n| {
            n.options
                .as_ref()
                .and_then(|o| o.get("com.docker.network.bridge.name"))
                .is_some_and(|b| b == bridge)
        })
        .map(|n| n.id)
        // An id is hexadecimal: nothing else goes into the next request's path.
        .filter(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_hexdigit())))
}

/// The containers of one network (from `GET /networks/ID`), by name.
fn containers(body: &[u8]) -> io::Result<Vec<Container>> {
    let network: Network = json(body)?;
    let mut found: Vec<Container> = network
        .containers
        .unwrap_or_default()
        .into_values()
        .filter_map(|e| {
            let ip = e.ipv4.split('/').next()?.parse().ok()?;
            Some(Container { name: e.name, ip })
        })
        .collect();
    found.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `GET /networks` as Docker 26 answers it (trimmed): the default bridge and ours.
    const NETWORKS: &str = r#"[
      {"Name":"bridge","Id":"4f1e0c","Driver":"bridge",
       "Options":{"com.docker.network.bridge.name":"docker0"},"Containers":{}},
      {"Name":"mesh","Id":"9a8b7c6d","Driver":"bridge","Scope":"local",
       "Options":{"com.docker.network.bridge.enable_ip_masquerade":"false",
                  "com.docker.network.bridge.name":"meshbr0",
                  "com.docker.network.driver.mtu":"1420"},
       "Containers":{}},
      {"Name":"host","Id":"77aa","Driver":"host","Options":null}
    ]"#;

    /// `GET /networks/9a8b7c6d` with two containers (and one without an IPv4 address).
    const MESH: &str = r#"{"Name":"mesh","Id":"9a8b7c6d","Driver":"bridge",
      "Options":{"com.docker.network.bridge.name":"meshbr0"},
      "Containers":{
        "e1":{"Name":"web","EndpointID":"x","MacAddress":"02:42:0a:d2:05:80",
              "IPv4Address":"10.210.5.128/24","IPv6Address":""},
        "e2":{"Name":"Db_1","IPv4Address":"10.210.5.129/24"},
        "e3":{"Name":"v6only","IPv4Address":"","IPv6Address":"fd00::2/64"}
      }}"#;

    #[test]
    fn the_network_on_our_bridge_and_its_containers() {
        assert_eq!(
            network_on(NETWORKS.as_bytes(), "meshbr0").unwrap(),
            Some("9a8b7c6d".into())
        );
        assert_eq!(network_on(NETWORKS.as_bytes(), "other0").unwrap(), None);
        assert_eq!(
            containers(MESH.as_bytes()).unwrap(),
            vec![
                Container {
                    name: "Db_1".into(),
                    ip: Ipv4Addr::new(10, 210, 5, 129)
                },
                Container {
                    name: "web".into(),
                    ip: Ipv4Addr::new(10, 210, 5, 128)
                },
            ]
        );
    }

    #[test]
    fn an_id_that_is_not_hexadecimal_is_not_asked_for() {
        let body = r#"[{"Id":"../../containers/json","Options":{"com.docker.network.bridge.name":"meshbr0"}}]"#;
        assert_eq!(network_on(body.as_bytes(), "meshbr0").unwrap(), None);
    }

    #[test]
    fn answers_other_than_200_and_broken_json_are_errors() {
        let ok = b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n[]";
        assert_eq!(body(ok).unwrap(), b"[]");
        let e = body(b"HTTP/1.0 404 Not Found\r\n\r\n{\"message\":\"no\"}").unwrap_err();
        assert!(e.to_string().contains("404"), "{e}");
        assert!(body(b"HTTP/1.0 200 OK\r\n").is_err(), "no header end");
        assert!(network_on(b"{not json", "meshbr0").is_err());
    }

    #[test]
    fn the_socket_is_local_only() {
        assert_eq!(
            socket_from(None),
            Some(PathBuf::from("/var/run/docker.sock"))
        );
        assert_eq!(
            socket_from(Some("unix:///tmp/d.sock")),
            Some(PathBuf::from("/tmp/d.sock"))
        );
        assert_eq!(socket_from(Some("tcp://10.0.0.1:2375")), None);
    }

    /// A daemon on a real Unix socket, answering the two requests as Docker does: the names
    /// come back.
    #[test]
    fn asks_a_daemon_on_its_socket() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("docker.sock");
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let daemon = std::thread::spawn(move || {
            let mut asked = Vec::new();
            for answer in [NETWORKS, MESH] {
                let (mut c, _) = listener.accept().unwrap();
                let mut req = [0u8; 1024];
                let n = c.read(&mut req).unwrap();
                asked.push(
                    String::from_utf8_lossy(&req[..n])
                        .lines()
                        .next()
                        .unwrap()
                        .to_string(),
                );
                write!(
                    c,
                    "HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{answer}"
                )
                .unwrap();
            }
            asked
        });
        let found = containers_on(&sock, "meshbr0").unwrap();
        assert_eq!(
            found.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
            ["Db_1", "web"]
        );
        assert_eq!(
            daemon.join().unwrap(),
            ["GET /networks HTTP/1.0", "GET /networks/9a8b7c6d HTTP/1.0"]
        );
        // No daemon: nothing, and no error.
        assert!(containers_on(&dir.path().join("none.sock"), "meshbr0")
            .unwrap()
            .is_empty());
    }
}
