//! Prometheus metrics with real meshd processes: the text passes `promtool check metrics`,
//! `/sd` on any node lists every member, and a real Prometheus on one node discovers and
//! scrapes the whole mesh through it.

mod common;

use common::{Kill, Lab};
use std::process::{Command, Stdio};
use std::time::Duration;

fn curl(lab: &Lab, h: usize, url: &str) -> Option<String> {
    let o = lab.sh(h, "curl", &["-sf", "--max-time", "2", url]);
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).into_owned())
}

#[test]
fn prometheus_discovers_and_scrapes_the_whole_mesh_through_one_node() {
    let mut lab = Lab::new("metrics", 3);
    // One receive lane and one seal lane on every node (none by default on two cores): the
    // mesh works with them, and the metrics say so.
    lab.env.push(("MESHD_RX_LANES".into(), "1".into()));
    lab.env.push(("MESHD_TX_LANES".into(), "1".into()));
    let token = lab.init(0, "a", &[]);
    lab.join(1, "b", &token);
    lab.join(2, "c", &token);
    lab.wait_all_pairs(&[0, 1, 2], Duration::from_secs(60));
    let a_ip = lab.mesh_ip(0);

    // The text on the control socket is valid Prometheus text, and says what it should.
    let o = lab.meshctl(0, &["metrics"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus)");
    use std::io::Write;
    check
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let checked = check.wait_with_output().unwrap();
    assert!(
        checked.status.success(),
        "promtool: {}{}\n{text}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    for want in [
        "meshd_build_info{version=",
        "meshd_members{state=\"online\"} 2",
        "meshd_peer_receive_bytes_total{peer=\"b\"}",
        "meshd_peer_path{peer=\"c\",path=\"direct\"} 1",
        "meshd_dropped_packets_total{reason=\"bad_source\"}",
        "meshd_lanes{direction=\"receive\"} 1",
        "meshd_lanes{direction=\"seal\"} 1",
        "meshd_lane_reads_total{direction=\"receive\"}",
        "meshd_dns_answers_total{result=\"noerror\"}",
    ] {
        assert!(text.contains(want), "{want} in:\n{text}");
    }

    let value = |text: &str, sample: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{sample} in:\n{text}"))
    };
    // Gossip rode the tunnels both ways, and was counted.
    for dir in ["sent", "received"] {
        assert!(
            value(
                &text,
                &format!("meshd_gossip_messages_total{{direction=\"{dir}\"}}")
            ) > 0.0
        );
        assert!(
            value(
                &text,
                &format!("meshd_gossip_bytes_total{{direction=\"{dir}\"}}")
            ) > 100.0
        );
    }

    // Status carries the round trips, and every peer's version as its about record says: the
    // same build everywhere here, so no skew is reported.
    lab.wait_for(
        "round trips and versions in status",
        Duration::from_secs(30),
        || {
            let s = lab.status(0);
            s.peers
                .iter()
                .all(|p| p.rtt_ms.is_some_and(|r| r > 0.0) && p.version.is_some())
        },
    );
    let s = lab.status(0);
    assert!(!s.me.version.is_empty());
    for p in &s.peers {
        assert_eq!(
            p.version.as_deref(),
            Some(s.me.version.as_str()),
            "{}",
            p.name
        );
    }
    let text = String::from_utf8_lossy(&lab.meshctl(0, &["metrics"]).stdout).into_owned();
    assert!(
        text.contains(&format!(
            "meshd_peer_info{{peer=\"b\",version=\"{}\"}} 1",
            s.me.version
        )),
        "{text}"
    );
    let human = lab.meshctl(0, &["status"]);
    let human = String::from_utf8_lossy(&human.stdout).into_owned();
    let header = human.lines().find(|l| l.starts_with("NAME")).expect(&human);
    assert!(
        header.contains("RTT") && header.contains("VERSION"),
        "{human}"
    );
    assert!(!human.contains("warning"), "{human}");
    let v = lab.meshctl(0, &["version"]);
    let (out, err) = (
        String::from_utf8_lossy(&v.stdout).into_owned(),
        String::from_utf8_lossy(&v.stderr).into_owned(),
    );
    assert!(
        v.status.success() && out.contains("peers: 2 on the same build"),
        "{out}{err}"
    );
    assert!(!err.contains("warning"), "{err}");

    // Through the mesh, from another node: the same text, and the fleet's targets.
    let url = format!("http://{a_ip}:9586");
    let remote = curl(&lab, 2, &format!("{url}/metrics")).expect("metrics through the mesh");
    assert!(remote.contains("meshd_build_info"));
    let sd: serde_json::Value =
        serde_json::from_str(&curl(&lab, 2, &format!("{url}/sd")).expect("sd")).unwrap();
    let mut nodes: Vec<String> = sd
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["labels"]["node"].as_str().unwrap().to_string())
        .collect();
    nodes.sort();
    assert_eq!(nodes, ["a", "b", "c"]);
    assert!(
        curl(&lab, 2, &format!("{url}/v1/status")).is_none(),
        "read-only: metrics and sd only"
    );

    // A real Prometheus on b, told only of a's /sd, scrapes all three nodes.
    let dir = lab.dir.path().join("prom");
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: meshd\n    http_sd_configs:\n      - url: {url}/sd\n        refresh_interval: 1s\n"
        ),
    )
    .unwrap();
    let _prom = Kill(
        lab.ns(1)
            .command("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg("--web.listen-address=127.0.0.1:9090")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
            .spawn()
            .expect("prometheus (Debian package prometheus)"),
    );
    let query = |q: &str| {
        let out = curl(
            &lab,
            1,
            &format!("http://127.0.0.1:9090/api/v1/query?query={q}"),
        )?;
        let v: serde_json::Value = serde_json::from_str(&out).ok()?;
        v["data"]["result"][0]["value"][1]
            .as_str()
            .map(|s| s.to_string())
    };
    lab.wait_for(
        "Prometheus to scrape three nodes",
        Duration::from_secs(60),
        || {
            query("count(up%3D%3D1)").as_deref() == Some("3")
                && query("count(meshd_build_info)").as_deref() == Some("3")
        },
    );
    // Labels from discovery come along.
    let out = curl(
        &lab,
        1,
        "http://127.0.0.1:9090/api/v1/query?query=meshd_build_info%7Bnode%3D%22c%22%7D",
    )
    .unwrap();
    assert!(out.contains("\"subnet\""), "{out}");
}
