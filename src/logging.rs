//! Logs on stderr (under journald: `<N>` priorities, no timestamps), with a filter that can be
//! changed while running (`meshctl log-level`).

use std::sync::OnceLock;
use tracing_subscriber::EnvFilter;

type Reload = Box<dyn Fn(EnvFilter) -> Result<(), String> + Send + Sync>;
static RELOAD: OnceLock<Reload> = OnceLock::new();

/// netlink-packet-route warns about every attribute newer kernels add, and hickory's server
/// logs every DNS query at info; that is noise here (`hickory_server=info` brings it back).
fn filter(spec: &str) -> Result<EnvFilter, String> {
    EnvFilter::try_new(format!(
        "netlink_packet_route=error,netlink_packet_core=error,hickory_server=warn,{spec}"
    ))
    .map_err(|e| {
        format!(
            "{spec:?} is not a log level ({e}): use error, warn, info, debug or trace, or a \
             filter such as info,meshd=debug"
        )
    })
}

/// Install the logger: `spec` if given, else `RUST_LOG`, else `default`.
pub fn init(default: &str, spec: Option<&str>) {
    let spec = spec
        .map(str::to_string)
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| default.to_string());
    let f = filter(&spec).unwrap_or_else(|e| {
        eprintln!("meshd: {e}; using {default}");
        filter(default).expect("default filter")
    });
    if crate::cli::service::under_journald() {
        // journald stamps each line itself and reads the priority (the level) from `<N>`.
        let format = tracing_subscriber::fmt::format()
            .without_time()
            .with_level(false)
            .with_target(false)
            .with_ansi(false);
        let b = tracing_subscriber::fmt()
            .with_env_filter(f)
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .event_format(crate::cli::service::Journald(format))
            .with_filter_reloading();
        let h = b.reload_handle();
        let _ = RELOAD.set(Box::new(move |f| h.reload(f).map_err(|e| e.to_string())));
        let _ = b.try_init();
        return;
    }
    let b = tracing_subscriber::fmt()
        .with_env_filter(f)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .with_filter_reloading();
    let h = b.reload_handle();
    let _ = RELOAD.set(Box::new(move |f| h.reload(f).map_err(|e| e.to_string())));
    let _ = b.try_init();
}

/// Change the filter of the running process (`meshctl log-level`).
pub fn set(spec: &str) -> Result<(), String> {
    let f = filter(spec)?;
    match RELOAD.get() {
        Some(reload) => reload(f),
        None => Err("this process has no reloadable logger".into()),
    }
}
