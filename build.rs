//! Names the commit in `--version` (MESHD_COMMIT: `git rev-parse --short HEAD`, with `-dirty`
//! for uncommitted changes; "unknown" outside a git checkout, e.g. from a source tarball).
use std::process::Command;

fn main() {
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let commit = match (
        std::env::var("MESHD_COMMIT").ok(),
        git(&["rev-parse", "--short=12", "HEAD"]),
    ) {
        (Some(c), _) if !c.is_empty() => c,
        (_, Some(c)) => {
            let dirty = git(&["status", "--porcelain", "--untracked-files=no"])
                .is_some_and(|s| !s.is_empty());
            if dirty {
                format!("{c}-dirty")
            } else {
                c
            }
        }
        _ => "unknown".into(),
    };
    println!("cargo:rustc-env=MESHD_COMMIT={commit}");
    println!("cargo:rerun-if-env-changed=MESHD_COMMIT");
    for f in [".git/HEAD", ".git/index", ".git/refs/heads"] {
        if std::path::Path::new(f).exists() {
            println!("cargo:rerun-if-changed={f}");
        }
    }
}
