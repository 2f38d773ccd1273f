//! The `credproxy` command: `serve` runs the proxy on a file store until SIGINT/SIGTERM;
//! `store` manages that store from the host. Parsing and process plumbing only; the work
//! is in the library.

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};
use credproxy::backend::{Backend, FileBackend, SaveMode};
use credproxy::names::{self, NameKind, DEFAULT_BUCKET};
use credproxy::policy::Profile;
use credproxy::secret::{Secret, SecretBytes};
use credproxy::token::Token;
use credproxy::{Config, Supervisor};

/// Largest token JSON or API key read from stdin by `credproxy store`.
const MAX_STDIN: u64 = 64 * 1024;

#[derive(Parser)]
#[command(
    name = "credproxy",
    version,
    about = "Credential proxy for sandboxed processes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy: print LLXPRT_CREDENTIAL_SOCKET=<path> once listening, serve until
    /// SIGINT or SIGTERM, then clean up and exit 0.
    Serve(ServeArgs),
    /// Manage the host-side credential store (no server needed; safe while one runs).
    #[command(subcommand)]
    Store(StoreCommand),
}

#[derive(Args)]
struct StoreArg {
    /// Store directory [default: $XDG_DATA_HOME/credproxy, else ~/.local/share/credproxy]
    #[arg(long, value_name = "DIR")]
    store: Option<PathBuf>,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    store: StoreArg,
    /// Allow PROVIDER (every bucket) or PROVIDER:BUCKET[,BUCKET...], and the API key named PROVIDER
    #[arg(long, value_name = "PROVIDER[:BUCKETS]")]
    allow: Vec<String>,
    /// Allow one more API key name
    #[arg(long, value_name = "NAME")]
    allow_key: Vec<String>,
    /// Allow every provider, bucket and key
    #[arg(long)]
    allow_all: bool,
    /// Refuse save_token and remove_token with FORBIDDEN
    #[arg(long)]
    read_only: bool,
    /// Requests per second per connection; 0 turns the limit off
    #[arg(long, value_name = "N", default_value_t = 60)]
    rate_limit: u32,
    /// Directory for the socket (must exist, be ours, not group/other-writable)
    /// [default: {tmp}/llxprt-cred-{uid}]
    #[arg(long, value_name = "DIR")]
    socket_dir: Option<PathBuf>,
}

#[derive(Subcommand)]
enum StoreCommand {
    /// OAuth tokens
    #[command(subcommand)]
    Token(TokenCommand),
    /// API keys
    #[command(subcommand)]
    Key(KeyCommand),
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Store a full token (JSON with refresh_token) read from stdin, replacing any stored one
    Set {
        /// Provider name
        provider: String,
        /// Bucket name
        #[arg(long, default_value = DEFAULT_BUCKET)]
        bucket: String,
        /// Read from the terminal without echo instead of refusing an interactive stdin
        #[arg(long)]
        prompt: bool,
        #[command(flatten)]
        store: StoreArg,
    },
    /// Remove a stored token (exit 1 when none was stored)
    Remove {
        /// Provider name
        provider: String,
        /// Bucket name
        #[arg(long, default_value = DEFAULT_BUCKET)]
        bucket: String,
        #[command(flatten)]
        store: StoreArg,
    },
    /// List provider:bucket pairs, never values
    List {
        #[command(flatten)]
        store: StoreArg,
    },
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Store an API key read from stdin (one trailing newline dropped)
    Set {
        /// Key name
        name: String,
        /// Read from the terminal without echo instead of refusing an interactive stdin
        #[arg(long)]
        prompt: bool,
        #[command(flatten)]
        store: StoreArg,
    },
    /// Remove an API key (exit 1 when none was stored)
    Remove {
        /// Key name
        name: String,
        #[command(flatten)]
        store: StoreArg,
    },
    /// List API key names
    List {
        #[command(flatten)]
        store: StoreArg,
    },
}

/// A failure reported as one sentence on stderr, with the exit code to use.
struct Failure(String, u8);

fn fail(msg: impl Into<String>) -> Failure {
    Failure(msg.into(), 1)
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // One line instead of clap's usage block: what was wrong, and where to look.
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid usage");
            let first = first.strip_prefix("error: ").unwrap_or(first);
            eprintln!("credproxy: {first}; see 'credproxy --help'");
            return ExitCode::from(2);
        }
    };
    init_logging();
    let result = match cli.command {
        Command::Serve(args) => serve(args),
        Command::Store(cmd) => store(cmd),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(msg, code)) => {
            eprintln!("credproxy: {msg}");
            ExitCode::from(code)
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // `init` also installs the `log` bridge, so actix's own warnings are visible.
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn open_store(arg: &StoreArg) -> Result<FileBackend, Failure> {
    let dir = match &arg.store {
        Some(dir) => dir.clone(),
        None => FileBackend::default_dir().ok_or_else(|| {
            fail("cannot find a home for the store: set XDG_DATA_HOME or HOME, or pass --store DIR")
        })?,
    };
    FileBackend::open(&dir).map_err(|e| {
        fail(format!(
            "cannot open the store: {e}; check the directory or pass --store DIR"
        ))
    })
}

fn serve(args: ServeArgs) -> Result<(), Failure> {
    let mut profile = Profile {
        allow_all: args.allow_all,
        read_only: args.read_only,
        ..Profile::default()
    };
    for spec in &args.allow {
        profile.allow(spec).map_err(|e| Failure(e, 2))?;
    }
    for name in &args.allow_key {
        profile.allow_key(name).map_err(|e| Failure(e, 2))?;
    }
    let backend = open_store(&args.store)?;
    let mut config = Config::new(Arc::new(backend));
    config.profile = profile;
    config.socket_dir = args.socket_dir;
    config.limits.rate_limit = args.rate_limit;

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| fail(format!("cannot start the runtime: {e}")))?;
    runtime.block_on(async move {
        use tokio::signal::unix::{signal, SignalKind};
        // Handlers first, so a signal sent right after the socket line is never missed.
        let mut sigint = signal(SignalKind::interrupt())
            .map_err(|e| fail(format!("cannot handle SIGINT: {e}")))?;
        let mut sigterm = signal(SignalKind::terminate())
            .map_err(|e| fail(format!("cannot handle SIGTERM: {e}")))?;
        let handle = Supervisor::start(config).map_err(|e| fail(e.to_string()))?;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(
            out,
            "LLXPRT_CREDENTIAL_SOCKET={}",
            handle.socket_path().display()
        );
        let _ = out.flush();
        drop(out);
        let signal = tokio::select! {
            _ = sigint.recv() => "SIGINT",
            _ = sigterm.recv() => "SIGTERM",
        };
        tracing::info!(signal, "shutting down");
        handle.shutdown().await.map_err(|e| fail(e.to_string()))?;
        Ok(())
    })
}

/// Reads a secret from stdin (or the terminal without echo with `--prompt`).
fn read_secret_input(prompt: bool, what: &str) -> Result<SecretBytes, Failure> {
    if prompt {
        let text = rpassword::prompt_password(format!("{what}: "))
            .map_err(|e| fail(format!("cannot read from the terminal: {e}")))?;
        return Ok(SecretBytes(text.into_bytes()));
    }
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        return Err(Failure(format!("refusing to read the {what} from an interactive terminal (it would echo); pipe it in, or pass --prompt"), 2));
    }
    let mut buf = SecretBytes::default();
    stdin
        .lock()
        .take(MAX_STDIN + 1)
        .read_to_end(&mut buf.0)
        .map_err(|e| fail(format!("cannot read stdin: {e}")))?;
    if buf.0.len() as u64 > MAX_STDIN {
        return Err(fail(format!(
            "the {what} on stdin is over {MAX_STDIN} bytes"
        )));
    }
    Ok(buf)
}

fn check_name(kind: NameKind, name: &str) -> Result<(), Failure> {
    names::check(kind, name).map_err(|e| Failure(e, 2))
}

fn store(cmd: StoreCommand) -> Result<(), Failure> {
    let store_failed = |e: credproxy::backend::StoreError| fail(format!("the store failed: {e}"));
    match cmd {
        StoreCommand::Token(TokenCommand::Set {
            provider,
            bucket,
            prompt,
            store,
        }) => {
            check_name(NameKind::Provider, &provider)?;
            check_name(NameKind::Bucket, &bucket)?;
            let input = read_secret_input(prompt, "token JSON")?;
            let token = Token::from_json(&input.0)
                .map_err(|e| Failure(format!("invalid token: {e}"), 2))?;
            let backend = open_store(&store)?;
            backend
                .save_token(&provider, &bucket, &token, SaveMode::Replace)
                .map_err(store_failed)?;
            let rt = if token.has_refresh_token() {
                "with"
            } else {
                "without"
            };
            eprintln!("stored the token for {provider}:{bucket} ({rt} a refresh token)");
        }
        StoreCommand::Token(TokenCommand::Remove {
            provider,
            bucket,
            store,
        }) => {
            check_name(NameKind::Provider, &provider)?;
            check_name(NameKind::Bucket, &bucket)?;
            if !open_store(&store)?
                .remove_token(&provider, &bucket)
                .map_err(store_failed)?
            {
                return Err(fail(format!("no token stored for {provider}:{bucket}")));
            }
            eprintln!("removed the token for {provider}:{bucket}");
        }
        StoreCommand::Token(TokenCommand::List { store }) => {
            let backend = open_store(&store)?;
            let mut out = std::io::stdout().lock();
            for provider in backend.list_providers().map_err(store_failed)? {
                for bucket in backend.list_buckets(&provider).map_err(store_failed)? {
                    let _ = writeln!(out, "{provider}:{bucket}");
                }
            }
        }
        StoreCommand::Key(KeyCommand::Set {
            name,
            prompt,
            store,
        }) => {
            check_name(NameKind::Key, &name)?;
            let mut input = read_secret_input(prompt, "API key")?;
            let bytes = &mut input.0;
            if bytes.last() == Some(&b'\n') {
                bytes.pop();
                if bytes.last() == Some(&b'\r') {
                    bytes.pop();
                }
            }
            let text = String::from_utf8(std::mem::take(bytes)).map_err(|e| {
                let mut raw = e.into_bytes();
                zeroize::Zeroize::zeroize(&mut raw);
                Failure("the API key is not valid UTF-8".into(), 2)
            })?;
            let key = Secret::new(text);
            if key.is_empty() {
                return Err(Failure("the API key is empty".into(), 2));
            }
            open_store(&store)?
                .set_key(&name, &key)
                .map_err(store_failed)?;
            eprintln!("stored the API key {name}");
        }
        StoreCommand::Key(KeyCommand::Remove { name, store }) => {
            check_name(NameKind::Key, &name)?;
            if !open_store(&store)?
                .remove_key(&name)
                .map_err(store_failed)?
            {
                return Err(fail(format!("no API key named {name} is stored")));
            }
            eprintln!("removed the API key {name}");
        }
        StoreCommand::Key(KeyCommand::List { store }) => {
            let mut out = std::io::stdout().lock();
            for name in open_store(&store)?.list_keys().map_err(store_failed)? {
                let _ = writeln!(out, "{name}");
            }
        }
    }
    Ok(())
}
