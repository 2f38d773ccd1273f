//! The `credproxy` binary; everything is in [`credproxy::cli`].

fn main() -> std::process::ExitCode {
    credproxy::cli::main()
}
