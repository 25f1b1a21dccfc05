fn main() -> std::process::ExitCode {
    meshd::cli::meshctl_main()
}
