//! `credproxy store ...`: manage the host-side file store. Values are read from stdin (or
//! the terminal without echo with `--prompt`) and never printed; names and token JSON are
//! validated exactly as the server validates them, under the same lock.

use std::io::{IsTerminal, Read, Write};

use clap::Subcommand;

use super::serve::{open_store, StoreArg};
use super::Failure;
use crate::backend::{Backend, SaveMode, StoreError};
use crate::names::{self, NameKind, DEFAULT_BUCKET};
use crate::secret::{Secret, SecretBytes};
use crate::token::Token;

/// Largest token JSON or API key read from stdin.
const MAX_STDIN: u64 = 64 * 1024;

/// `credproxy store ...`
#[derive(Subcommand)]
pub enum StoreCommand {
    /// OAuth tokens
    #[command(subcommand)]
    Token(TokenCommand),
    /// API keys
    #[command(subcommand)]
    Key(KeyCommand),
    /// Import the login another CLI made on this machine (claude-code, codex, gemini-cli)
    Import {
        /// Which CLI's login: claude-code (stored as anthropic), codex (codex), gemini-cli (gemini)
        #[arg(value_parser = ["claude-code", "codex", "gemini-cli"])]
        source: String,
        /// Read this file instead of the CLI's own (~/.claude/.credentials.json,
        /// ~/.codex/auth.json, ~/.gemini/oauth_creds.json)
        #[arg(long, value_name = "FILE")]
        from: Option<std::path::PathBuf>,
        /// Bucket to store it in
        #[arg(long, default_value = DEFAULT_BUCKET)]
        bucket: String,
        /// Which store
        #[command(flatten)]
        store: StoreArg,
    },
}

/// `credproxy store token ...`
#[derive(Subcommand)]
pub enum TokenCommand {
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

/// `credproxy store key ...`
#[derive(Subcommand)]
pub enum KeyCommand {
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

/// Reads a secret from stdin (or the terminal without echo with `--prompt`).
fn read_secret_input(prompt: bool, what: &str) -> Result<SecretBytes, Failure> {
    if prompt {
        let text = rpassword::prompt_password(format!("{what}: "))
            .map_err(|e| Failure::new(format!("cannot read from the terminal: {e}")))?;
        return Ok(SecretBytes(text.into_bytes()));
    }
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        return Err(Failure::usage(format!("refusing to read the {what} from an interactive terminal (it would echo); pipe it in, or pass --prompt")));
    }
    // Allocated once at the limit: growing by reallocation would leave unwiped copies.
    let mut buf = SecretBytes(Vec::with_capacity(
        MAX_STDIN as usize + 1 + crate::backend::file::PROBE_SLACK,
    ));
    stdin
        .lock()
        .take(MAX_STDIN + 1)
        .read_to_end(&mut buf.0)
        .map_err(|e| Failure::new(format!("cannot read stdin: {e}")))?;
    if buf.0.len() as u64 > MAX_STDIN {
        return Err(Failure::new(format!(
            "the {what} on stdin is over {MAX_STDIN} bytes"
        )));
    }
    Ok(buf)
}

fn check_name(kind: NameKind, name: &str) -> Result<(), Failure> {
    names::check(kind, name).map_err(Failure::usage)
}

/// Writes `text` to stdout and flushes; a failed write (a full device, a closed pipe) is
/// an error, never a silent success.
fn emit(text: &str) -> Result<(), Failure> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|e| Failure::new(format!("cannot write the output: {e}")))
}

/// `expiry` (epoch seconds) relative to `now`, for a person: "expires in 42 min",
/// "expired 3 h ago", "expiry unknown (treated as expired)" for 0.
pub fn relative_expiry(expiry: u64, now: u64) -> String {
    fn span(seconds: u64) -> String {
        match seconds {
            0..=59 => format!("{seconds} s"),
            60..=5_399 => format!("{} min", (seconds + 30) / 60),
            5_400..=172_799 => format!("{} h", (seconds + 1_800) / 3_600),
            _ => format!("{} days", (seconds + 43_200) / 86_400),
        }
    }
    if expiry == 0 {
        "expiry unknown (treated as expired)".to_owned()
    } else if expiry > now {
        format!("expires in {}", span(expiry - now))
    } else {
        format!("expired {} ago", span(now - expiry))
    }
}

/// Runs a `credproxy store` command.
pub fn run(cmd: StoreCommand) -> Result<(), Failure> {
    let store_failed = |e: StoreError| Failure::new(format!("the store failed: {e}"));
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
            // Parsed as the store parses its files: no copy of the refresh token is left
            // in freed memory (`Token::from_json` uses serde_json's unwiped scratch).
            let value = crate::secret_json::parse(&input.0)
                .map_err(|e| Failure::usage(format!("invalid token: token is {e}")))?;
            let token = Token::from_value(value)
                .map_err(|e| Failure::usage(format!("invalid token: {e}")))?;
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
                return Err(Failure::new(format!(
                    "no token stored for {provider}:{bucket}"
                )));
            }
            eprintln!("removed the token for {provider}:{bucket}");
        }
        StoreCommand::Token(TokenCommand::List { store }) => {
            let backend = open_store(&store)?;
            let mut text = String::new();
            for provider in backend.list_providers().map_err(store_failed)? {
                for bucket in backend.list_buckets(&provider).map_err(store_failed)? {
                    text.push_str(&format!("{provider}:{bucket}\n"));
                }
            }
            emit(&text)?;
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
                Failure::usage("the API key is not valid UTF-8")
            })?;
            let key = Secret::new(text);
            if key.is_empty() {
                return Err(Failure::usage("the API key is empty"));
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
                return Err(Failure::new(format!("no API key named {name} is stored")));
            }
            eprintln!("removed the API key {name}");
        }
        StoreCommand::Key(KeyCommand::List { store }) => {
            let mut text = String::new();
            for name in open_store(&store)?.list_keys().map_err(store_failed)? {
                text.push_str(&name);
                text.push('\n');
            }
            emit(&text)?;
        }
        StoreCommand::Import {
            source,
            from,
            bucket,
            store,
        } => import(&source, from, &bucket, &store)?,
    }
    Ok(())
}

/// `credproxy store import SOURCE`: reads another CLI's login (never changing its file),
/// stores it whole (refresh token included) under the source's provider, and says what it
/// stored without a secret.
fn import(
    source: &str,
    from: Option<std::path::PathBuf>,
    bucket: &str,
    store: &StoreArg,
) -> Result<(), Failure> {
    use crate::import::Source;
    let source =
        Source::parse(source).ok_or_else(|| Failure::usage(format!("unknown source {source}")))?;
    check_name(NameKind::Bucket, bucket)?;
    let path = match from {
        Some(path) => path,
        None => {
            let home = std::env::var_os("HOME")
                .filter(|h| !h.is_empty())
                .ok_or_else(|| Failure::usage("HOME is not set: name the file with --from"))?;
            source.default_path(std::path::Path::new(&home))
        }
    };
    let token = source.read(&path).map_err(|e| {
        Failure::new(format!(
            "cannot import the {} login from {}: {e}; nothing was stored",
            source.name(),
            path.display()
        ))
    })?;
    let provider = source.provider();
    let backend = open_store(store)?;
    backend
        .save_token(provider, bucket, &token, SaveMode::Replace)
        .map_err(|e| Failure::new(format!("the store failed: {e}")))?;
    let now = crate::oauth::epoch_seconds(std::time::SystemTime::now());
    let expiry = token
        .fields()
        .get("expiry")
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(0);
    let refreshable = if token.has_refresh_token() {
        "refreshable"
    } else {
        "not refreshable: no refresh token in the file"
    };
    eprintln!(
        "imported the {} login as {provider}:{bucket} ({}, {refreshable})",
        source.name(),
        relative_expiry(expiry, now)
    );
    if token.has_refresh_token() {
        eprintln!(
            "note: {provider} rotates refresh tokens (a used one stops working). From now on let \
             only one tool refresh this login, credproxy or {}, or the other one will be \
             logged out at its next refresh.",
            source.name()
        );
    }
    Ok(())
}
