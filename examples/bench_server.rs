//! A proxy on a memory store (or a file store with `--file DIR`), seeded with one token and
//! one key, rate limit off, for load generators: prints `LLXPRT_CREDENTIAL_SOCKET=<path>`
//! and `PID=<pid>`, serves until stdin closes or reads a line, then shuts down and prints
//! the time `Shutdown` took.
//!
//! `cargo run --release --example bench_server [-- --file DIR]`

use std::io::BufRead;
use std::sync::Arc;
use std::time::Instant;

use credproxy::backend::{Backend, FileBackend, MemoryBackend, SaveMode};
use credproxy::secret::Secret;
use credproxy::token::Token;
use credproxy::{Config, Supervisor};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let backend: Arc<dyn Backend> = match args.iter().position(|a| a == "--file") {
        Some(i) => {
            Arc::new(FileBackend::open(args.get(i + 1).ok_or("--file DIR")?)?.with_read_cache())
        }
        None => Arc::new(MemoryBackend::new()),
    };
    let token = Token::from_value(serde_json::json!({
        "access_token": "bench-access-token", "refresh_token": "bench-refresh-token",
        "expiry": 4_102_444_800u64, "token_type": "Bearer"
    }))?;
    backend.save_token("anthropic", "default", &token, SaveMode::Replace)?;
    backend.set_key("anthropic", &Secret::from("bench-key"))?;
    let mut config = Config::new(backend);
    config.profile.allow_all = true;
    config.limits.rate_limit = 0;
    let t0 = Instant::now();
    let handle = Supervisor::start(config)?;
    let started = t0.elapsed();
    println!(
        "LLXPRT_CREDENTIAL_SOCKET={}",
        handle.socket_path().display()
    );
    println!("PID={}", std::process::id());
    println!("START_US={}", started.as_micros());
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
    let t0 = Instant::now();
    let report = handle.shutdown_blocking()?;
    println!(
        "SHUTDOWN_US={} CONNECTIONS={}",
        t0.elapsed().as_micros(),
        report.connections_closed
    );
    Ok(())
}
