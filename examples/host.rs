//! A host runtime embedding credproxy: start the proxy on a memory store seeded with demo
//! values, run a child process as the "sandbox" that reads a token through the socket,
//! show that the refresh token is absent, shut down, and show the socket is gone.
//!
//! Run: `cargo run --release --example host`
//!
//! The "sandbox" is this same program re-executed with `LLXPRT_CREDENTIAL_SOCKET` set, so
//! the example needs nothing else built. A real host would spawn `docker run`, `podman
//! run` or `bwrap` here instead, with the socket file (never its directory) mounted into
//! the sandbox, as README's recipes do.

use std::process::{Command, ExitCode};
use std::sync::Arc;

use credproxy::backend::MemoryBackend;
use credproxy::client::Client;
use credproxy::policy::Profile;
use credproxy::secret::Secret;
use credproxy::token::Token;
use credproxy::{Config, Supervisor};

const SANDBOX_ROLE: &str = "CREDPROXY_EXAMPLE_SANDBOX";

fn main() -> ExitCode {
    if std::env::var_os(SANDBOX_ROLE).is_some() {
        return sandbox();
    }
    match host() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("host: {e}");
            ExitCode::FAILURE
        }
    }
}

fn host() -> Result<(), Box<dyn std::error::Error>> {
    // 1. A store with demo credentials (a real host would use FileBackend).
    let store = MemoryBackend::new();
    store.insert_token(
        "anthropic",
        "default",
        Token::from_value(serde_json::json!({
            "access_token": "demo-access-token",
            "refresh_token": "demo-refresh-token-never-leaves-the-host",
            "expiry": 4_102_444_800u64,
            "token_type": "Bearer",
            "scope": "demo"
        }))?,
    )?;
    store.insert_key("anthropic", Secret::from("demo-api-key"))?;

    // 2. A profile: the sandbox may use anthropic (every bucket, and its API key), nothing else.
    let mut profile = Profile::default();
    profile.allow("anthropic")?;
    let mut config = Config::new(Arc::new(store));
    config.profile = profile;

    // 3. Start: returns once the socket is listening.
    let handle = Supervisor::start(config)?;
    let path = handle.socket_path().to_owned();
    println!("host: proxy listening on {}", path.display());

    // 4. The sandbox.
    let status = Command::new(std::env::current_exe()?)
        .env(SANDBOX_ROLE, "1")
        .env("LLXPRT_CREDENTIAL_SOCKET", &path)
        .status()?;
    println!("host: sandbox exited with {status}");

    // 5. Shutdown when the sandbox exits.
    let report = handle.shutdown_blocking()?;
    println!(
        "host: shutdown closed {} connection(s), store cleared: {}, socket removed: {}",
        report.connections_closed, report.store_cleared, report.socket_removed
    );
    println!("host: socket path exists afterwards: {}", path.exists());
    if status.success() && !path.exists() {
        Ok(())
    } else {
        Err("the sandbox failed or the socket is still there".into())
    }
}

/// The inside: what a sandboxed process does (see also `examples/sandbox_client.rs`).
fn sandbox() -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sandbox: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let client = match Client::from_env() {
            Ok(c) => c,
            Err(e) => {
                eprintln!("sandbox: {e}");
                return ExitCode::FAILURE;
            }
        };
        match client.get_token("anthropic", None).await {
            Ok(Some(token)) => {
                let fields: Vec<_> = token.fields().keys().cloned().collect();
                println!("sandbox: got a token with fields {fields:?}");
                println!(
                    "sandbox: refresh_token present: {}",
                    token.fields().contains_key("refresh_token")
                );
            }
            Ok(None) => println!("sandbox: no token stored"),
            Err(e) => {
                eprintln!("sandbox: {e}");
                return ExitCode::FAILURE;
            }
        }
        match client.get_token("openai", None).await {
            Err(e) => println!("sandbox: openai is outside the profile: {e}"),
            Ok(_) => println!("sandbox: unexpectedly reached openai"),
        }
        ExitCode::SUCCESS
    })
}
