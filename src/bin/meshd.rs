fn main() -> std::process::ExitCode {
    meshd::cli::meshd_main()
}
