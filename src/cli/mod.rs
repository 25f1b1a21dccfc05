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

/// Logs go to stderr; `MESHD_LOG` (or `RUST_LOG`) sets the filter, default `info`.
pub fn init_logging(default: &str) {
    let filter = std::env::var("MESHD_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| default.to_string());
    // netlink-packet-route warns about every attribute newer kernels add; that is noise here.
    let filter = format!("netlink_packet_route=error,netlink_packet_core=error,{filter}");
    let filter = tracing_subscriber::EnvFilter::new(filter);
    if service::under_journald() {
        // journald stamps each line itself and reads the priority (the level) from a `<N>` prefix.
        let format = tracing_subscriber::fmt::format()
            .without_time()
            .with_level(false)
            .with_target(false)
            .with_ansi(false);
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .event_format(service::Journald(format))
            .try_init();
        return;
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}
