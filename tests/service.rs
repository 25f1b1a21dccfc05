//! meshd as a Linux service: readiness to systemd, exit codes a unit does not restart, first
//! runs that fail without leaving state behind, damaged tokens, and the unit's hardening.

mod common;

use common::{Lab, MESHCTL, MESHD};
use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::Duration;

/// A copy of the test build of `name` (meshd or meshctl) that any user may run: the build tree
/// may sit where other users cannot reach (a checkout under /root).
fn for_anyone(name: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let d = tempfile::tempdir().unwrap();
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        for (n, from) in [("meshd", MESHD), ("meshctl", common::MESHCTL)] {
            let to = d.path().join(n);
            std::fs::copy(from, &to).unwrap();
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        d
    });
    dir.path().join(name)
}

/// A meshd started with `$NOTIFY_SOCKET` says READY=1 (with a STATUS= line) once it serves:
/// its control socket answers and its TUN device has the node's address.
#[test]
fn readiness_is_sent_once_the_node_serves() {
    let mut lab = Lab::new("ready", 1);
    let path = lab.dir.path().join("notify.sock");
    let listener = UnixDatagram::bind(&path).unwrap();
    listener
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    lab.env
        .push(("NOTIFY_SOCKET".into(), path.to_string_lossy().into_owned()));
    lab.spawn(0, &["init", "--name", "a"]);
    let mut buf = [0u8; 512];
    let n = listener.recv(&mut buf).expect("READY=1 within 30 s");
    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(msg.starts_with("READY=1\nSTATUS=node a at "), "{msg}");
    // Ready means serving: the API answers at once, with the address the STATUS line gave.
    let status = lab.try_status(0).expect("status right after READY");
    assert!(msg.contains(&status.me.mesh_ip), "{msg}");
    let o = lab.sh(0, "ip", &["-4", "addr", "show", "dev", "mesh0"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains(&status.me.mesh_ip));
    // `meshctl` alone is `meshctl status`; `meshctl version` names both builds.
    let o = lab.meshctl(0, &[]);
    assert!(o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stdout).starts_with("a  "),
        "{o:?}"
    );
    let o = lab.meshctl(0, &["version"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success());
    assert!(
        out.contains(&format!("meshd {}", status.me.version)),
        "{out}"
    );
    assert!(!status.me.version.is_empty());
    assert!(o.stderr.is_empty(), "same build, no warning: {o:?}");
    // A user without access to the control socket is told why, not to start meshd.
    let o = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(for_anyone("meshctl"))
        .arg("--socket")
        .arg(lab.socket(0))
        .arg("status")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("run meshctl with sudo"), "{err}");
    lab.stop(0);
    let n = listener.recv(&mut buf).expect("STOPPING=1");
    assert_eq!(&buf[..n], b"STOPPING=1");
}

/// Without CAP_NET_ADMIN: one clear sentence, exit status 77, and nothing written.
#[test]
fn without_root_meshd_says_so_and_writes_nothing() {
    common::preflight();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let o = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(for_anyone("meshd"))
        .args(["init", "--name", "a", "--state-dir"])
        .arg(&state)
        .output()
        .expect("setpriv (util-linux)");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(77), "{err}");
    assert!(err.contains("needs root") && err.contains("sudo"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(!state.exists(), "nothing written");
}

/// A first `init` that cannot start (its port is taken) keeps no state, says so, and the
/// advised retry with another port works.
#[test]
fn a_failed_first_run_leaves_nothing_and_the_retry_works() {
    let mut lab = Lab::new("firstrun", 1);
    // Something else holds UDP 51820 in this machine.
    let _busy = lab
        .ns(0)
        .run(|| std::net::UdpSocket::bind("0.0.0.0:51820").unwrap())
        .unwrap();
    let o = lab.meshd_cmd(0, &["init", "--name", "a"]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success());
    assert!(err.contains("nothing was kept"), "{err}");
    assert!(err.contains("51820"), "says which port: {err}");
    assert!(
        !lab.state_dir(0).join("node.json").exists() && !lab.state_dir(0).join("root.key").exists(),
        "no state left behind"
    );
    // The retry the message advises.
    let token = lab.init(0, "a", &["--port", "51821"]);
    assert!(token.starts_with("mj2_"));
    assert_eq!(lab.status(0).me.port, 51821);

    // Later its port is taken while it is stopped: `meshd run` says so and how to move, and
    // `meshd run --port` moves it for good (no running meshd needed to be told).
    lab.stop(0);
    let _busy2 = lab
        .ns(0)
        .run(|| std::net::UdpSocket::bind("0.0.0.0:51821").unwrap())
        .unwrap();
    let o = lab.meshd_cmd(0, &["run"]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("51821") && err.contains("run saves it"),
        "{err}"
    );
    lab.spawn(0, &["run", "--port", "51822"]);
    lab.wait_for("the node on its new port", Duration::from_secs(20), || {
        lab.try_status(0).is_some_and(|s| s.me.port == 51822)
    });
    lab.stop(0);
    lab.run(0);
    lab.wait_for("the new port kept", Duration::from_secs(20), || {
        lab.try_status(0).is_some_and(|s| s.me.port == 51822)
    });
}

/// A truncated or mistyped token is refused in words, with exit status 78 (not restarted),
/// and leaves no state.
#[test]
fn a_damaged_token_says_what_is_wrong() {
    let mut lab = Lab::new("badtoken", 2);
    let token = lab.init(0, "a", &[]);
    let cut = &token[..token.len() - 7];
    let (code, err) = meshd_once(&lab, 1, &["join", cut, "--name", "b"]);
    assert_eq!(code, Some(78), "{err}");
    assert!(err.contains("truncated"), "{err}");
    assert!(!err.contains("Unexpected") && !err.contains('{'), "{err}");
    let mut typo = token.clone().into_bytes();
    let i = token.len() / 2;
    typo[i] = if typo[i] == b'x' { b'y' } else { b'x' };
    let typo = std::str::from_utf8(&typo).unwrap();
    let (code, err) = meshd_once(&lab, 1, &["join", typo, "--name", "b"]);
    assert_eq!(code, Some(78), "{err}");
    assert!(err.contains("checksum"), "{err}");
    assert!(!lab.state_dir(1).join("node.json").exists());
}

/// `meshd ARGS` on host `h` run to its end with no input: its exit status and what it said on
/// standard error.
fn meshd_once(lab: &Lab, h: usize, args: &[&str]) -> (Option<i32>, String) {
    let o = lab
        .meshd_cmd(h, args)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// A value meshd cannot use is refused before anything is written or asked of the mesh, with
/// exit status 78 and what to give instead; the seed never hears of the join (no member left
/// behind to hold the name), and the same command fixed works.
#[test]
fn values_meshd_cannot_use_are_refused_at_once() {
    let mut lab = Lab::new("badvalue", 2);
    let token = lab.init(0, "a", &[]);
    let cases: [(&[&str], &str); 9] = [
        (
            &["join", &token, "--name", "Web_1"],
            "not a valid node name",
        ),
        (
            &["join", &token, "--name", "b", "--tun", "Bad Tun"],
            "not an interface name",
        ),
        (
            &["join", &token, "--name", "b", "--tun", "eth0eth0eth0eth0"],
            "not an interface name",
        ),
        (
            &["join", &token, "--name", "b", "--dns-upstream", "foo"],
            "203.0.113.7:53",
        ),
        (
            &["join", &token, "--name", "b", "--endpoint", "a:b:c"],
            "not an address",
        ),
        (
            &["join", "-", "--name", "b"],
            "no join token on standard input",
        ),
        (&["init", "--name", "c", "--cidr", "10.0.0.0/25"], "--cidr"),
        (
            &["init", "--name", "c", "--domain", "com"],
            "--domain \"com\"",
        ),
        (
            &["init", "--name", "c", "--tun", "Bad Tun"],
            "not an interface name",
        ),
    ];
    for (args, says) in cases {
        let (code, err) = meshd_once(&lab, 1, args);
        assert_eq!(code, Some(78), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
        assert!(!lab.state_dir(1).join("node.json").exists(), "{args:?}");
    }
    // A name the kernel cannot make a TUN device with (an Ethernet interface has it): found
    // before the join is asked for.
    let (code, err) = meshd_once(&lab, 1, &["join", &token, "--name", "b", "--tun", "eth0"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("eth0 is another kind of interface"), "{err}");
    assert!(!lab.state_dir(1).join("node.json").exists());
    assert_eq!(lab.status(0).peers.len(), 0, "the seed heard of no join");
    lab.join(1, "b", &token);
    lab.wait_all_pairs(&[0, 1], Duration::from_secs(30));
}

/// Completions into a pipe whose reader is gone (`| head`, `| true`) end quietly with success,
/// not a panic; meshctl with no meshd to talk to says why once.
#[test]
fn command_line_output_ends_cleanly() {
    for bin in [MESHD, MESHCTL] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let o = Command::new(bin)
            .args(["completions", "zsh"])
            .stdout(writer)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success() && err.is_empty(), "{bin}: {err}");
    }
    let o = Command::new(MESHCTL)
        .args(["--socket", "/nonexistent/meshd.sock", "status"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
}

/// The shipped unit's hardening, as systemd rates it: exposure 3.0 or less.
#[test]
fn the_systemd_unit_is_hardened() {
    common::preflight();
    let dir = tempfile::tempdir().unwrap();
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/packaging/meshd.service"
    ))
    .unwrap();
    for needed in [
        "Type=notify",
        "RestartPreventExitStatus=3 77 78",
        "EnvironmentFile=-/etc/default/meshd",
    ] {
        assert!(unit.contains(needed), "the unit has {needed}");
    }
    // systemd-analyze wants the ExecStart binary to exist.
    let unit = unit.replace("/usr/local/bin/meshd", MESHD);
    let path = dir.path().join("meshd.service");
    std::fs::write(&path, unit).unwrap();
    let o = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&path)
        .output()
        .expect("systemd-analyze (Debian package systemd)");
    let out = String::from_utf8_lossy(&o.stdout);
    let line = out
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no rating: {out}{}", String::from_utf8_lossy(&o.stderr)));
    let level: f64 = line
        .split("level for meshd.service:")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    println!("systemd-analyze security: {level}");
    assert!(level <= 3.0, "{line}");
}

/// Under journald (stderr is the stream `$JOURNAL_STREAM` names), log lines carry their
/// priority as `<N>` and no timestamp of meshd's own, so `journalctl -p warning` works.
#[test]
fn logs_under_journald_carry_priorities_and_no_timestamps() {
    use std::os::unix::fs::MetadataExt;
    let lab = Lab::new("journal", 1);
    let log = lab.dir.path().join("journal.log");
    let file = std::fs::File::create(&log).unwrap();
    let meta = file.metadata().unwrap();
    let _child = common::Kill(
        lab.meshd_cmd(0, &["init", "--name", "a"])
            .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
            .stdout(std::process::Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap(),
    );
    let mut text = String::new();
    lab.wait_for("meshd running, logged", Duration::from_secs(30), || {
        text = std::fs::read_to_string(&log).unwrap_or_default();
        text.contains("meshd running")
    });
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with('<')).collect();
    let running = lines
        .iter()
        .find(|l| l.contains("meshd running"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(running.starts_with("<6>meshd running name=a"), "{running}");
    // Every line has a priority (debug ones too: 7), none a timestamp or a level word.
    assert!(lines.iter().any(|l| l.starts_with("<7>")), "{text}");
    // (The human lines `meshd init` prints for the operator go at journald's default, info.)
    let human = |l: &str| l.starts_with("created mesh") || l.starts_with("meshd join");
    for l in text.lines().filter(|l| !l.is_empty() && !human(l)) {
        assert!(l.starts_with('<'), "{l}");
        assert!(!l.contains("Z ") && !l.contains("INFO"), "{l}");
    }
}

/// On a machine without the tools the end-to-end tests use, the first test says at once which
/// packages to install, in one command.
#[test]
fn a_machine_without_the_test_tools_is_told_the_one_line_that_installs_them() {
    if std::env::var_os("MESHD_PREFLIGHT_CHILD").is_some() {
        common::preflight();
        return;
    }
    let o = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "a_machine_without_the_test_tools_is_told_the_one_line_that_installs_them",
            "--nocapture",
        ])
        .env("MESHD_PREFLIGHT_CHILD", "1")
        .env("PATH", "/nonexistent")
        .output()
        .unwrap();
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!o.status.success(), "{out}");
    let line = out
        .lines()
        .find(|l| l.contains("sudo apt-get install -y --no-install-recommends"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        line.contains("curl") && line.contains("prometheus"),
        "{line}"
    );
    assert_eq!(
        line.matches("prometheus").count(),
        1,
        "each package once: {line}"
    );
}

/// Members of the reader group (`MESHD_GROUP`, default `meshd`) may read through the control
/// socket, and are told that changes need root.
#[test]
fn the_reader_group_may_read_but_not_change() {
    use std::os::unix::fs::PermissionsExt;
    let mut lab = Lab::new("readers", 1);
    // "nogroup" exists everywhere; a real install makes a `meshd` group instead.
    lab.env.push(("MESHD_GROUP".into(), "nogroup".into()));
    std::fs::set_permissions(lab.dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    lab.init(0, "a", &[]);
    let as_nobody = |args: &[&str]| {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(for_anyone("meshctl"))
            .arg("--socket")
            .arg(lab.socket(0))
            .args(args)
            .output()
            .unwrap()
    };
    let o = as_nobody(&["status"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("a  "));
    let o = as_nobody(&["metrics"]);
    assert!(o.status.success());
    let o = as_nobody(&["invite"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("needs root") && err.contains("sudo"), "{err}");
    // Root still may.
    assert!(lab.meshctl(0, &["invite"]).status.success());
}

/// `meshd leave` with the daemon stopped still tells the members: they drop the node.
#[test]
fn leave_works_with_the_daemon_stopped() {
    let mut lab = Lab::new("leaveoff", 2);
    lab.form(&["a", "b"]);
    lab.stop(1);
    let o = lab.meshd_cmd(1, &["leave"]).output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.contains("b left the mesh"), "{out}");
    assert!(
        !lab.state_dir(1).join("node.key").exists(),
        "identity deleted"
    );
    lab.wait_for("a to drop b", Duration::from_secs(15), || {
        lab.status(0).peers.is_empty()
    });
}

/// `meshctl set` changes the port, endpoints and DNS upstreams after setup (checked first: a
/// bad value changes nothing): endpoints and upstreams at once, the port after a restart.
#[test]
fn settings_made_at_setup_can_be_changed_later() {
    let mut lab = Lab::new("setcfg", 1);
    lab.init(0, "a", &[]);
    let before = std::fs::read_to_string(lab.state_dir(0).join("node.json")).unwrap();
    let o = lab.meshctl(
        0,
        &["set", "--port", "51830", "--endpoint", "not an address"],
    );
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--endpoint"),
        "{o:?}"
    );
    let after = std::fs::read_to_string(lab.state_dir(0).join("node.json")).unwrap();
    assert_eq!(before, after, "a bad value changes nothing");

    // Endpoints and DNS upstreams: applied while running.
    let o = lab.meshctl(
        0,
        &[
            "set",
            "--endpoint",
            "192.0.2.77:51820",
            "--dns-upstream",
            "192.0.2.53",
        ],
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{o:?}");
    assert!(out.contains("saved and applied"), "{out}");
    lab.wait_for(
        "the new endpoint published",
        Duration::from_secs(10),
        || lab.status(0).me.endpoints.first().map(String::as_str) == Some("192.0.2.77:51820"),
    );
    let dns = lab.status(0).dns;
    assert_eq!(dns.upstreams, ["192.0.2.53:53"], "{dns:?}");
    assert!(dns.listen.is_some(), "DNS serving again: {dns:?}");

    // The port: saved, used after a restart; a later set keeps it.
    let o = lab.meshctl(0, &["set", "--port", "51830"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{o:?}");
    assert!(out.contains("port: 51820 -> 51830"), "{out}");
    assert!(out.contains("restart"), "{out}");
    assert_eq!(
        lab.status(0).me.port,
        51820,
        "the running port until the restart"
    );
    let o = lab.meshctl(0, &["set", "--port", "51830", "--default-endpoints"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(!out.contains("port:"), "already saved: {out}");
    lab.stop(0);
    lab.run(0);
    lab.wait_for("a back on its new port", Duration::from_secs(30), || {
        lab.try_status(0).is_some_and(|s| s.me.port == 51830)
    });
    let s = lab.status(0);
    assert_eq!(s.dns.upstreams, ["192.0.2.53:53"]);
    assert!(
        !s.me.endpoints.iter().any(|e| e.starts_with("192.0.2.77")),
        "back to the machine's addresses: {:?}",
        s.me.endpoints
    );
}

/// `meshctl log-level` changes what the running meshd logs; a bad filter is refused in words.
#[test]
fn the_log_level_changes_while_running() {
    let mut lab = Lab::new("loglevel", 1);
    lab.init(0, "a", &[]);
    let o = lab.meshctl(0, &["log-level", "info,meshd=[bad"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("is not a log level"),
        "{o:?}"
    );
    let o = lab.meshctl(0, &["log-level", "warn"]);
    assert!(o.status.success(), "{o:?}");
    assert!(lab.meshctl(0, &["relay", "disable"]).status.success());
    assert!(lab.meshctl(0, &["log-level", "info"]).status.success());
    assert!(lab.meshctl(0, &["relay", "enable"]).status.success());
    lab.wait_for(
        "the info line after info is back",
        Duration::from_secs(10),
        || lab.log_text(0).contains("enabled=true"),
    );
    let log = lab.log_text(0);
    assert!(
        !log.contains("relay setting changed enabled=false"),
        "logged at warn level: {log}"
    );
}
