//! `credproxy serve`: the options shared with `exec`, building a [`Config`] from them (and
//! from a `--profile` file), logging set-up, and the serve loop.

use std::io::Write;
use std::path::PathBuf;

use clap::{Args, ValueEnum};

pub use super::open::{open_backend, open_store, StoreArg};
use super::Failure;
use crate::capability::CapabilityToken;
use crate::refresh::RefreshConfig;
use crate::{profile, Config, Supervisor};

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Largest `--idle-timeout`: one week (anything longer is "never" in practice; use 0).
const MAX_IDLE_TIMEOUT_SECS: u64 = 7 * 24 * 3600;

/// The options of `serve`, shared by `exec`.
#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// The file store.
    #[command(flatten)]
    pub store: StoreArg,
    /// Load a TOML profile (same meaning as the flags below; flags add to it)
    #[arg(long, value_name = "FILE")]
    pub profile: Option<PathBuf>,
    /// Allow PROVIDER (every bucket) or PROVIDER:BUCKET[,BUCKET...], and the API key named PROVIDER
    #[arg(long, value_name = "PROVIDER[:BUCKETS]")]
    pub allow: Vec<String>,
    /// Allow one more API key name
    #[arg(long, value_name = "NAME")]
    pub allow_key: Vec<String>,
    /// Allow every provider, bucket and key
    #[arg(long)]
    pub allow_all: bool,
    /// Refuse save_token and remove_token with FORBIDDEN
    #[arg(long)]
    pub read_only: bool,
    /// Requests per second per connection; 0 turns the limit off [default: 60]
    #[arg(long, value_name = "N")]
    pub rate_limit: Option<u32>,
    /// Directory for the socket (must exist, be ours, not group/other-writable)
    /// [default: {tmp}/llxprt-cred-{uid}]
    #[arg(long, value_name = "DIR")]
    pub socket_dir: Option<PathBuf>,
    /// Also accept connections from this uid (besides yours and root), e.g. a container's
    #[arg(long, value_name = "UID")]
    pub allow_uid: Vec<u32>,
    /// Close a connection that has sent nothing for SECS seconds (after its handshake,
    /// with no request in flight); 0 never closes [default: 900]
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(0..=MAX_IDLE_TIMEOUT_SECS))]
    pub idle_timeout: Option<u64>,
    /// Open connections at most (all peers); 0 derives it from the descriptor limit
    /// (RLIMIT_NOFILE, raised to its hard limit at start, minus a reserve) [default: 0,
    /// at most 4096]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    pub max_connections: Option<u64>,
    /// Open connections at most from one peer process; 0 means half the connection cap
    /// [default: 0]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    pub max_connections_per_pid: Option<u64>,
    /// Refresh a token that get_token finds expiring within SECS seconds (or expired)
    /// before answering [default: 60]
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(0..=profile::MAX_REFRESH_LEAD))]
    pub refresh_margin: Option<u64>,
    /// Renew every refreshable token SECS seconds before it expires, plus a random jitter
    /// of up to a fifth of that [default: 300]
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(0..=profile::MAX_REFRESH_LEAD))]
    pub renew_before: Option<u64>,
    /// Serve tokens as stored: no host-side refresh, no renewal (protocol version 1
    /// behaviour)
    #[arg(long)]
    pub no_refresh: bool,
    /// Bind the socket to this launch's sandbox: make a fresh capability token and refuse
    /// every handshake without it. `serve` prints it on a second line,
    /// LLXPRT_CAPABILITY_TOKEN=HEX; `exec` hands it to CMD on a descriptor
    /// (LLXPRT_CAPABILITY_FD)
    #[arg(long)]
    pub capability_token: bool,
    /// Log format on stderr (level from RUST_LOG, default info)
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// Installs the tracing subscriber on stderr; `RUST_LOG` sets the level (default `info`).
/// It also installs the `log` bridge, so actix's own warnings are visible.
pub fn init_logging(format: LogFormat) -> Result<(), Failure> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: escape codes in a log file break grep.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    result.map_err(|e| Failure::new(format!("cannot set up logging: {e}")))
}

/// Builds the server configuration: the profile file first, then the flags added to it.
/// With `--capability-token` (or `capability_token = true` in the profile) it also makes
/// this launch's capability token, returned for the caller to hand over (its digest is in
/// the configuration); drop it once handed over.
pub fn build_config(args: &ServeArgs) -> Result<(Config, Option<CapabilityToken>), Failure> {
    let loaded = load_profile(args.profile.as_deref())?;
    let refresh = refresh_config(&loaded, args);
    let sources = loaded.sources.clone();
    let (mut profile, file_rate) = (loaded.profile, loaded.rate_limit);
    profile.allow_all |= args.allow_all;
    profile.read_only |= args.read_only;
    for spec in &args.allow {
        profile.allow(spec).map_err(Failure::usage)?;
    }
    for name in &args.allow_key {
        profile.allow_key(name).map_err(Failure::usage)?;
    }
    let backend = open_backend(&args.store, true)?;
    let mut config = Config::new(backend);
    config.profile = profile;
    config.refresh = refresh;
    config.sources = sources;
    config.socket_dir = args.socket_dir.clone();
    config.extra_uids = args.allow_uid.clone();
    // The server is the whole process here: give memory back after a burst.
    config.release_memory_when_idle = true;
    if let Some(rate) = args.rate_limit.or(file_rate) {
        config.limits.rate_limit = rate;
    }
    // The server is the whole process here: use every descriptor the hard limit allows.
    config.limits.raise_nofile_limit = true;
    if let Some(n) = args.max_connections {
        config.limits.max_connections = n as usize;
    }
    if let Some(n) = args.max_connections_per_pid {
        config.limits.max_connections_per_pid = n as usize;
    }
    if let Some(secs) = args.idle_timeout {
        config.limits.idle_timeout = std::time::Duration::from_secs(secs);
    }
    let capability = (args.capability_token || loaded.capability_token == Some(true))
        .then(CapabilityToken::generate);
    config.capability = capability.as_ref().map(CapabilityToken::digest);
    Ok((config, capability))
}

/// Writes `LLXPRT_CAPABILITY_TOKEN=<hex>` and a newline to `out` in one write and flushes.
/// The line is built in a buffer of its exact size that is wiped afterwards, and written
/// whole, so a line-buffered stdout passes it straight through without keeping a copy.
pub fn print_token_line(out: &mut impl Write, token: &CapabilityToken) -> std::io::Result<()> {
    let var = crate::capability::TOKEN_VAR;
    let mut line =
        zeroize::Zeroizing::new(Vec::with_capacity(var.len() + 2 + token.expose().len()));
    line.extend_from_slice(var.as_bytes());
    line.push(b'=');
    line.extend_from_slice(token.expose().as_bytes());
    line.push(b'\n');
    out.write_all(&line)?;
    out.flush()
}

/// The profile file named by `--profile`, or an empty one.
pub fn load_profile(path: Option<&std::path::Path>) -> Result<profile::ProfileFile, Failure> {
    match path {
        Some(path) => profile::load(path).map_err(|e| Failure::usage(e.to_string())),
        None => Ok(profile::ProfileFile::default()),
    }
}

/// The refresh configuration: the presets with the profile's `[provider.NAME]` tables, the
/// profile's `refresh`, `refresh_margin` and `renew_before`, then the flags over them.
pub fn refresh_config(loaded: &profile::ProfileFile, args: &ServeArgs) -> RefreshConfig {
    let mut config = profile_refresh_config(loaded);
    let settings = &mut config.settings;
    if args.no_refresh {
        settings.enabled = false;
    }
    if let Some(secs) = args.refresh_margin {
        settings.margin = std::time::Duration::from_secs(secs);
    }
    if let Some(secs) = args.renew_before {
        settings.renew_before = std::time::Duration::from_secs(secs);
    }
    config
}

/// The refresh configuration of the profile alone: the presets with its `[provider.NAME]`
/// tables, and its `refresh`, `refresh_margin` and `renew_before` (what the host's
/// `credproxy store` commands see, with no serve flags).
pub fn profile_refresh_config(loaded: &profile::ProfileFile) -> RefreshConfig {
    let mut config = RefreshConfig::default().with_endpoints(loaded.providers.clone());
    let settings = &mut config.settings;
    if let Some(on) = loaded.refresh {
        settings.enabled = on;
    }
    if let Some(secs) = loaded.refresh_margin {
        settings.margin = std::time::Duration::from_secs(secs);
    }
    if let Some(secs) = loaded.renew_before {
        settings.renew_before = std::time::Duration::from_secs(secs);
    }
    config
}

/// The next delivery of an optional signal stream; never, for one left ignored.
async fn recv(signal: &mut Option<tokio::signal::unix::Signal>) {
    match signal {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending().await,
    }
}

/// `credproxy serve`.
pub fn serve(args: ServeArgs) -> Result<(), Failure> {
    let (config, capability) = build_config(&args)?;
    // A stop signal serve was started with ignored (`nohup credproxy serve &` ignores
    // SIGHUP) stays ignored: the launcher asked for it.
    use nix::sys::signal::Signal;
    let wanted = |sig: Signal| !super::ignored_at_start(sig as i32);
    let (want_int, want_hup, want_quit) = (
        wanted(Signal::SIGINT),
        wanted(Signal::SIGHUP),
        wanted(Signal::SIGQUIT),
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::new(format!("cannot start the runtime: {e}")))?;
    runtime.block_on(async move {
        use tokio::signal::unix::{signal, SignalKind};
        // Handlers first, so a signal sent right after the socket line is never missed.
        let handler = |kind, name| {
            signal(kind).map_err(|e| Failure::new(format!("cannot handle {name}: {e}")))
        };
        let optional = |want: bool, kind, name| match want {
            true => handler(kind, name).map(Some),
            false => Ok(None),
        };
        let mut sigint = optional(want_int, SignalKind::interrupt(), "SIGINT")?;
        let mut sigterm = handler(SignalKind::terminate(), "SIGTERM")?;
        // A closed terminal or `kill -HUP` ends the server like SIGTERM: with the cleanup
        // (the socket removed), never by the default action that would leave it behind.
        let mut sighup = optional(want_hup, SignalKind::hangup(), "SIGHUP")?;
        // SIGQUIT's default dumps core, with whatever secrets the server holds: a clean
        // shutdown instead.
        let mut sigquit = optional(want_quit, SignalKind::quit(), "SIGQUIT")?;
        // Signals whose default would kill the server without cleanup and that ask
        // nothing of it: caught (tokio keeps its handler installed) and never read, so
        // they are ignored.
        let _ignored = [
            (SignalKind::user_defined1(), "SIGUSR1"),
            (SignalKind::user_defined2(), "SIGUSR2"),
            (SignalKind::alarm(), "SIGALRM"),
            (
                SignalKind::from_raw(nix::sys::signal::Signal::SIGVTALRM as i32),
                "SIGVTALRM",
            ),
            (
                SignalKind::from_raw(nix::sys::signal::Signal::SIGPROF as i32),
                "SIGPROF",
            ),
        ]
        .into_iter()
        .map(|(kind, name)| handler(kind, name))
        .collect::<Result<Vec<_>, _>>()?;
        let handle = Supervisor::start(config).map_err(|e| Failure::new(e.to_string()))?;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(
            out,
            "{}={}",
            crate::client::SOCKET_ENV,
            handle.socket_path().display()
        );
        let _ = out.flush();
        if let Some(token) = capability {
            // For a launcher that passes the token on itself; not kept after this.
            let _ = print_token_line(&mut out, &token);
        }
        drop(out);
        let signal = tokio::select! {
            _ = recv(&mut sigint) => "SIGINT",
            _ = sigterm.recv() => "SIGTERM",
            _ = recv(&mut sighup) => "SIGHUP",
            _ = recv(&mut sigquit) => "SIGQUIT",
        };
        tracing::info!(signal, "shutting down");
        handle
            .shutdown()
            .await
            .map_err(|e| Failure::new(e.to_string()))?;
        Ok(())
    })
}
