//! `meshd demo` runs a real mesh and leaves nothing behind.

use std::process::Command;

#[test]
fn demo_shows_every_pair_reachable_and_cleans_up() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "meshd demo needs root");
    let child = Command::new(env!("CARGO_BIN_EXE_meshd"))
        .args(["demo", "--once", "--nodes", "3"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run meshd demo");
    let pid = child.id();
    let out = child.wait_with_output().expect("demo output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("6 of 6 pairs reachable"), "{stdout}");
    assert!(stdout.contains("$ meshctl status   # on node1"), "{stdout}");
    assert_eq!(
        stdout.matches("online").count(),
        6,
        "every node shows two online peers:\n{stdout}"
    );
    assert!(!stdout.contains("FAIL"), "{stdout}");
    // Nothing left: no namespaces, hence no processes or TUN devices in them.
    assert!(
        meshd::cli::demo::lab::Netns::list("meshd-demo").is_empty(),
        "namespaces left behind"
    );
    // Its working directory (state, sockets, logs) is gone too.
    let dir = std::env::temp_dir().join(format!("meshd-demo-{pid}"));
    assert!(!dir.exists(), "{} left behind", dir.display());
}
