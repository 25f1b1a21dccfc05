//! Membership changes: leave, remove, and tokens that must be refused.

mod common;

use common::Lab;
use meshd::trust::Token;
use std::time::Duration;

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn leave_releases_the_subnet_for_the_next_joiner() {
    let mut lab = Lab::new("leave", 3);
    // A range of exactly two /24s: the mesh is full with two nodes.
    let token = lab.init(0, "a", &["--cidr", "10.210.0.0/23"]);
    lab.join(1, "b", &token);
    lab.wait_all_pairs(&[0, 1], Duration::from_secs(30));
    let b_subnet = lab.status(1).me.subnet;

    // A third node finds no free subnet, and is told so.
    let o = lab
        .meshd_cmd(2, &["join", &token, "--name", "c"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("no free /24"), "{}", stderr(&o));
    assert!(!lab.state_dir(2).join("node.json").exists());

    // b leaves: the others drop it within 15 s.
    let o = lab.meshd_cmd(1, &["leave"]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains(&format!("subnet {b_subnet} released")),
        "{out}"
    );
    // When `meshd leave` returns, the identity is gone and the daemon has exited.
    assert!(
        !lab.state_dir(1).join("node.key").exists(),
        "identity deleted"
    );
    assert!(
        !lab.is_running(1),
        "meshd still running after leave returned"
    );
    assert_eq!(
        lab.wait_exit(1, Duration::from_secs(10)),
        Some(0),
        "meshd exits after leave"
    );
    lab.wait_for("a to drop b", Duration::from_secs(15), || {
        lab.status(0).peers.is_empty()
    });

    // Its subnet is free: the next joiner gets it.
    lab.join(2, "c", &token);
    lab.wait_all_pairs(&[0, 2], Duration::from_secs(30));
    assert_eq!(lab.status(2).me.subnet, b_subnet);
}

#[test]
fn a_removed_node_loses_every_tunnel_and_cannot_come_back() {
    let mut lab = Lab::new("remove", 3);
    lab.form(&["a", "b", "c"]);
    let c_ip = lab.mesh_ip(2);
    // Keep a copy of c's state as it was, to try coming back with the old identity later.
    let saved = lab.dir.path().join("c-saved");
    let st = std::process::Command::new("cp")
        .arg("-a")
        .arg(lab.state_dir(2))
        .arg(&saved)
        .status()
        .unwrap();
    assert!(st.success());

    // Only an admin node can remove.
    let o = lab.meshctl(1, &["remove", "c"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("root key"), "{}", stderr(&o));

    let o = lab.meshctl(0, &["remove", "c"]);
    assert!(o.status.success(), "{}", stderr(&o));
    for h in [0, 1] {
        lab.wait_for(
            &format!("host {h} to drop every tunnel to c"),
            Duration::from_secs(15),
            || !lab.status(h).peers.iter().any(|p| p.name == "c"),
        );
    }
    assert!(!lab.ping(0, c_ip));
    // c is told (by a member it knocks on, or by gossip) and stops.
    assert_eq!(
        lab.wait_exit(2, Duration::from_secs(40)),
        Some(3),
        "removed node exits with 3"
    );
    assert!(lab.log_text(2).contains("removed"));
    // It refuses to start again from its state, with the status systemd does not restart.
    let o = lab.meshd_cmd(2, &["run"]).output().unwrap();
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(stderr(&o).contains("was removed"), "{}", stderr(&o));

    // The others restart; the old identity, restored from before the removal, still gets nowhere.
    lab.stop(0);
    lab.stop(1);
    lab.run(0);
    lab.run(1);
    lab.wait_all_pairs(&[0, 1], Duration::from_secs(30));
    std::fs::remove_dir_all(lab.state_dir(2)).unwrap();
    std::fs::rename(&saved, lab.state_dir(2)).unwrap();
    lab.run(2);
    assert_eq!(
        lab.wait_exit(2, Duration::from_secs(40)),
        Some(3),
        "the restored old identity is told it was removed"
    );
    for h in [0, 1] {
        let s = lab.status(h);
        assert!(!s.peers.iter().any(|p| p.name == "c"), "host {h}: {s:?}");
        assert_eq!(s.mesh.revoked, 1);
    }
}

#[test]
fn bad_tokens_are_refused_with_a_clear_message_and_change_nothing() {
    let mut lab = Lab::new("tokens", 5);
    let token = lab.form(&["a", "b"]);
    assert_eq!(lab.status(0).mesh.members, 2);
    let refused = |lab: &Lab, o: &std::process::Output, needle: &str| {
        assert!(!o.status.success(), "expected a refusal");
        let e = stderr(o);
        assert!(
            e.to_lowercase().contains(needle),
            "expected {needle:?} in: {e}"
        );
        assert!(
            !lab.state_dir(2).join("node.json").exists(),
            "no node state written"
        );
        assert_eq!(lab.status(0).mesh.members, 2, "the mesh is unchanged");
    };

    // Expired.
    let short = lab.invite(0, &["--expires", "1s"]);
    let exp = Token::decode(&short).unwrap().invite.expires_at;
    lab.wait_for("the short token to expire", Duration::from_secs(5), || {
        meshd::util::unix_now() > exp
    });
    let o = lab
        .meshd_cmd(2, &["join", &short, "--name", "c"])
        .output()
        .unwrap();
    refused(&lab, &o, "expired");

    // `-` with nothing on standard input.
    let o = lab
        .meshd_cmd(2, &["join", "-", "--name", "c"])
        .output()
        .unwrap();
    refused(&lab, &o, "no join token on standard input");

    // Tampered: one character changed in the middle.
    let mut t: Vec<char> = token.chars().collect();
    let mid = t.len() / 2;
    t[mid] = if t[mid] == 'A' { 'B' } else { 'A' };
    let tampered: String = t.into_iter().collect();
    let o = lab
        .meshd_cmd(2, &["join", &tampered, "--name", "c"])
        .output()
        .unwrap();
    refused(&lab, &o, "not usable");

    // A token of another mesh, presented to a member of this one.
    let other = lab.init(3, "x", &[]);
    let seed = format!("{}:51820", lab.addr(0));
    let o = lab
        .meshd_cmd(2, &["join", &other, "--name", "c", "--bootstrap", &seed])
        .output()
        .unwrap();
    refused(&lab, &o, "belongs to mesh");
    // And a member of this mesh refuses to join another one.
    let o = lab
        .meshd_cmd(1, &["join", &other, "--name", "b2"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("already a member of mesh"),
        "{}",
        stderr(&o)
    );

    // A one-use token works once.
    let once = lab.invite(0, &["--uses", "1"]);
    lab.join(2, "c", &once);
    lab.wait_all_pairs(&[0, 1, 2], Duration::from_secs(30));
    let o = lab
        .meshd_cmd(4, &["join", &once, "--name", "d"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("has been used"), "{}", stderr(&o));
    assert!(!lab.state_dir(4).join("node.json").exists());
    assert_eq!(lab.status(0).mesh.members, 3, "only c was admitted");
}
