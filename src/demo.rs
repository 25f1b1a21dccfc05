//! `meshd demo` (to be written).

pub async fn run(_nodes: usize, _once: bool) -> anyhow::Result<std::process::ExitCode> {
    anyhow::bail!("not yet")
}
