//! The `credproxy` command line. `main.rs` only calls [`main`].
//!
//! Host side: `serve` (run the proxy until a signal), `exec` (run the proxy around a
//! command, the way `ssh-agent cmd` or `aws-vault exec` do), `store` (manage the file
//! store), and `login` / `logout` (get a provider's token with a browser or device code, or
//! remove and revoke it). Inside the sandbox: `token` and `key`, thin commands over
//! [`crate::client::Client`] with documented exit codes.

mod exec;
pub mod inside;
mod login;
mod migrate;
mod open;
mod serve;
mod store;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub use serve::{LogFormat, ServeArgs};
pub use store::StoreCommand;

/// Exit status for a usage error (bad option, bad name, bad input).
pub const EXIT_USAGE: u8 = 2;

#[derive(Parser)]
#[command(
    name = "credproxy",
    version,
    about = "Credential proxy for sandboxed processes",
    after_help = inside::EXIT_CODES_HELP
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy: print LLXPRT_CREDENTIAL_SOCKET=<path> once listening, serve until
    /// SIGINT, SIGTERM, SIGHUP or SIGQUIT, then clean up and exit 0.
    Serve(ServeArgs),
    /// Run the proxy around CMD: CMD gets LLXPRT_CREDENTIAL_SOCKET in its environment; when
    /// it exits the proxy is shut down and its exit status is returned.
    Exec(exec::ExecArgs),
    /// Manage the host-side credential store (no server needed; safe while one runs).
    #[command(subcommand)]
    Store(StoreCommand),
    /// Log in to PROVIDER on the host (browser, pasted code or device code) and store the
    /// token with its refresh token
    Login(login::LoginArgs),
    /// Remove PROVIDER's stored token and revoke it where the provider allows
    Logout(login::LogoutArgs),
    /// Inside the sandbox: OAuth tokens through the proxy.
    Token(inside::TokenArgs),
    /// Inside the sandbox: API keys through the proxy.
    Key(inside::KeyArgs),
}

/// A failure reported as one line on stderr, with the exit status to use.
#[derive(Debug)]
pub struct Failure {
    /// The line (without the `credproxy: ` prefix).
    pub message: String,
    /// The exit status.
    pub code: u8,
}

impl Failure {
    /// A failure with exit status 1.
    pub fn new(message: impl Into<String>) -> Failure {
        Failure::with_code(message, 1)
    }

    /// A failure with `code`.
    pub fn with_code(message: impl Into<String>, code: u8) -> Failure {
        Failure {
            message: message.into(),
            code,
        }
    }

    /// A usage failure (exit 2).
    pub fn usage(message: impl Into<String>) -> Failure {
        Failure::with_code(message, EXIT_USAGE)
    }
}

/// Runs the command line and returns the process's exit status.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // One line instead of clap's usage block: what was wrong (everything before
            // the usage text, joined), and where to look.
            let text = e.to_string();
            let what: Vec<&str> = text
                .lines()
                .take_while(|l| !l.starts_with("Usage:"))
                .map(str::trim)
                .filter(|l| {
                    !l.is_empty()
                        && !l.starts_with("tip:")
                        && !l.starts_with("For more information")
                })
                .collect();
            let what = what.join(" ");
            let what = what.strip_prefix("error: ").unwrap_or(&what);
            eprintln!("credproxy: {what}; see 'credproxy --help'");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    // The host commands hold secrets: hardened before they read any (crate::harden), once
    // logging can carry a warning. The inside commands hold only what the sandbox gets.
    let result = match cli.command {
        Command::Serve(args) => serve::init_logging(args.log_format)
            .map(|()| crate::harden::process())
            .and_then(|_| serve::serve(args))
            .map(|()| 0),
        Command::Exec(args) => serve::init_logging(args.serve.log_format)
            .map(|()| crate::harden::process())
            .and_then(|_| exec::exec(args)),
        Command::Store(cmd) => serve::init_logging(LogFormat::Text)
            .map(|()| crate::harden::process())
            .and_then(|_| store::run(cmd))
            .map(|()| 0),
        Command::Login(args) => serve::init_logging(LogFormat::Text)
            .map(|()| crate::harden::process())
            .and_then(|_| login::login(args)),
        Command::Logout(args) => serve::init_logging(LogFormat::Text)
            .map(|()| crate::harden::process())
            .and_then(|_| login::logout(args)),
        Command::Token(args) => inside::run_token(args),
        Command::Key(args) => inside::run_key(args),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(failure) => {
            eprintln!("credproxy: {}", failure.message);
            ExitCode::from(failure.code)
        }
    }
}

/// True when this process was started with `sig` set to "ignore" (Linux: the `SigIgn`
/// mask of `/proc/self/status`; `nohup` ignores SIGHUP, a shell's `cmd &` without job
/// control ignores SIGINT and SIGQUIT). `serve` and `exec` leave such a signal ignored, as
/// shells and ssh-agent do: catching it would undo the launcher's choice for the proxy
/// and, through `exec`, for CMD (a caught signal is reset to its default by `execve`, an
/// ignored one stays ignored). Read it before any handler is installed.
pub(crate) fn ignored_at_start(sig: i32) -> bool {
    if !cfg!(target_os = "linux") || !(1..=64).contains(&sig) {
        return false;
    }
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigIgn:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .is_some_and(|mask| mask & (1u64 << (sig - 1)) != 0)
}
