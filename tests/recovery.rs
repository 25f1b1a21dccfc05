//! Coming back from any state a crash or an outage can leave (issue: a crash right after a
//! membership change cut a node off): a member cache whose records never reached the disk, and
//! one whose every endpoint went stale while the node was down.

mod common;

use common::Lab;
use std::time::Duration;

/// The node that made the mesh is killed right after the others joined, before their records
/// reached its member cache: it restarts knowing their certificates only (no claim, no
/// endpoint), and has no token to fall back to. The members' handshakes reach it; it asks them.
#[test]
fn a_node_restarted_from_a_cache_without_records_comes_back() {
    let mut lab = Lab::new("norecords", 4);
    let token = lab.init(0, "a", &[]);
    for (h, name) in [(1, "b"), (2, "c"), (3, "d")] {
        lab.join(h, name, &token);
    }
    lab.wait_all_pairs(&[0, 1, 2, 3], Duration::from_secs(30));
    // The tick writes the cache within a second of a change; crash once it holds all three.
    let path = lab.state_dir(0).join("members.json");
    let cached = || -> usize {
        std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v["members"].as_array().map(|a| a.len()))
            .unwrap_or(0)
    };
    lab.wait_for(
        "three members in the cache",
        Duration::from_secs(10),
        || cached() == 3,
    );
    lab.kill9(0);
    // What a crash in the second between an admission and the next cache write leaves.
    let mut cache: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let members = cache["members"].as_array_mut().expect("members");
    assert_eq!(members.len(), 3);
    for m in members.iter_mut() {
        let m = m.as_object_mut().unwrap();
        m.insert("record".into(), serde_json::Value::Null);
        m.remove("admitted_k");
        m.remove("admitted_from");
    }
    std::fs::write(&path, serde_json::to_vec_pretty(&cache).unwrap()).unwrap();
    lab.run(0);
    let took = lab.wait_all_pairs(&[0, 1, 2, 3], Duration::from_secs(40));
    println!(
        "a back in the mesh {:.1}s after restarting from a cache without records",
        took.as_secs_f64()
    );
    assert!(
        lab.log_text(0)
            .contains("back in touch through a member it asked"),
        "{}",
        lab.log_text(0)
    );
    let s = lab.status(0);
    assert_eq!(s.peers.len(), 3);
    assert!(s.peers.iter().all(|p| p.online), "{:?}", s.peers);
}

/// A node is down while every other member moves to a new address (one after the other: two
/// members that move at the same moment with nobody else up lose each other, whatever the
/// mesh does): its cache and its token name only stale endpoints. The members find it down,
/// keep knocking with fresh handshakes, and it follows their authenticated packets to where
/// they are now.
#[test]
fn a_node_restarted_after_every_member_moved_comes_back() {
    let mut lab = Lab::new("stale", 3);
    lab.form(&["a", "b", "c"]);
    lab.stop(2);
    for (h, new) in [(0, "198.51.100.71/24"), (1, "198.51.100.72/24")] {
        let old = format!("{}/24", lab.addr(h));
        for args in [
            vec!["addr", "del", old.as_str(), "dev", "eth0"],
            vec!["addr", "add", new, "dev", "eth0"],
        ] {
            let o = lab.sh(h, "ip", &args);
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        }
        // The one that stayed follows the one that moved.
        lab.wait_all_pairs(&[0, 1], Duration::from_secs(40));
    }
    lab.run(2);
    let took = lab.wait_all_pairs(&[0, 1, 2], Duration::from_secs(40));
    println!(
        "c back in the mesh {:.1}s after restarting with only stale endpoints",
        took.as_secs_f64()
    );
    let endpoints: Vec<String> = lab
        .status(2)
        .peers
        .iter()
        .filter_map(|p| p.endpoint.clone())
        .collect();
    assert!(
        endpoints.contains(&"198.51.100.71:51820".to_string())
            && endpoints.contains(&"198.51.100.72:51820".to_string()),
        "{endpoints:?}"
    );
}
