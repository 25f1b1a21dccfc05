//! The two binaries' command lines. `src/bin/*.rs` only call [`meshd_main`] and [`meshctl_main`];
//! parsing lives in [`args`], commands in [`meshd`] and [`meshctl`], output formatting in
//! [`format`].

pub mod args;
pub mod demo;
pub mod format;
pub mod meshctl;
pub mod meshd;
pub mod service;

pub use meshctl::main as meshctl_main;
pub use meshd::main as meshd_main;

/// Logs go to stderr; `spec` (`--log-level`, `MESHD_LOG`), else `RUST_LOG`, else `default`.
pub fn init_logging(default: &str, spec: Option<&str>) {
    crate::logging::init(default, spec);
}

/// Shell completions and man pages, from the clap definitions (so they never drift).
pub mod docs {
    use super::args::{MeshctlCli, MeshdCli};
    use clap::CommandFactory;
    use std::path::Path;

    /// The completion script of `bin` ("meshd" or "meshctl") for `shell`, on `out`.
    pub fn completions(bin: &str, shell: clap_complete::Shell, out: &mut dyn std::io::Write) {
        let mut cmd = match bin {
            "meshd" => MeshdCli::command(),
            _ => MeshctlCli::command(),
        };
        clap_complete::generate(shell, &mut cmd, bin, out);
    }

    /// The completion script of `bin` for `shell` on standard output. A reader that closes
    /// early (`| head`) ends it quietly, as it does for other tools.
    pub fn print_completions(bin: &str, shell: clap_complete::Shell) -> std::io::Result<()> {
        use std::io::Write;
        // clap_complete panics when a write fails: it writes into memory, the copy out may fail.
        let mut script = Vec::new();
        completions(bin, shell, &mut script);
        let mut out = std::io::stdout().lock();
        match out.write_all(&script).and_then(|()| out.flush()) {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
            other => other,
        }
    }

    /// Write `meshd.1`, `meshctl.1` and a page per subcommand (`meshctl-status.1`, ...) into
    /// `dir`; the names written.
    pub fn manpages(dir: &Path) -> std::io::Result<Vec<String>> {
        std::fs::create_dir_all(dir)?;
        let mut written = Vec::new();
        for cmd in [MeshdCli::command(), MeshctlCli::command()] {
            let cmd = cmd.version(crate::constants::VERSION);
            page(&cmd, cmd.get_name(), dir, &mut written)?;
            for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
                let name = format!("{}-{}", cmd.get_name(), sub.get_name());
                let sub = sub
                    .clone()
                    .name(name.clone())
                    .version(crate::constants::VERSION);
                page(&sub, &name, dir, &mut written)?;
            }
        }
        Ok(written)
    }

    fn page(
        cmd: &clap::Command,
        name: &str,
        dir: &Path,
        written: &mut Vec<String>,
    ) -> std::io::Result<()> {
        let mut buf = Vec::new();
        clap_mangen::Man::new(cmd.clone()).render(&mut buf)?;
        let file = format!("{name}.1");
        std::fs::write(dir.join(&file), buf)?;
        written.push(file);
        Ok(())
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn completions_and_man_pages_cover_every_command() {
            let mut out = Vec::new();
            super::completions("meshctl", clap_complete::Shell::Bash, &mut out);
            let bash = String::from_utf8(out).unwrap();
            for sub in ["status", "netcheck", "relay", "metrics", "version"] {
                assert!(bash.contains(sub), "bash completion lacks {sub}");
            }
            let mut out = Vec::new();
            super::completions("meshd", clap_complete::Shell::Zsh, &mut out);
            assert!(String::from_utf8(out).unwrap().contains("--state-dir"));
            let dir = tempfile::tempdir().unwrap();
            let pages = super::manpages(dir.path()).unwrap();
            for p in ["meshd.1", "meshctl.1", "meshd-join.1", "meshctl-netcheck.1"] {
                assert!(pages.contains(&p.to_string()), "{p} in {pages:?}");
            }
            assert!(
                !pages.iter().any(|p| p.contains("manpages")),
                "hidden stays hidden"
            );
            let man = std::fs::read_to_string(dir.path().join("meshctl.1")).unwrap();
            assert!(
                man.starts_with(".ie") || man.contains(".TH meshctl"),
                "{}",
                &man[..200]
            );
            assert!(man.contains("netcheck"));
        }
    }
}
