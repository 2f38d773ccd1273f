//! `credproxy store ...`: manage the host-side file store. Values are read from stdin (or
//! the terminal without echo with `--prompt`) and never printed; names and token JSON are
//! validated exactly as the server validates them, under the same lock.
//!
//! Every command takes `--profile FILE` besides `--store DIR`, so it sees the providers
//! (the presets with the profile's `[provider.NAME]` tables) that the servers on the store
//! see. `store token status` shows each token's expiry and refresh state, and
//! `store token refresh` runs the servers' refresh procedure ([`FlowEnv::run`]) under the
//! same bucket lock, so both are safe beside running servers (PROTOCOL.md §14).
//!
//! Two commands take no `--store`: `store migrate --from STORE --to STORE` (in
//! [`super::migrate`]) copies one store into another, and `store new-key FILE` writes a
//! data key for `--store-key`.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::sync::Arc;

use clap::{Args, Subcommand};
use serde::Serialize;

use super::inside::exit;
use super::serve::{load_profile, open_store, profile_refresh_config, StoreArg};
use super::Failure;
use crate::backend::{Backend, SaveMode, StoreError};
use crate::names::{self, NameKind, DEFAULT_BUCKET};
use crate::oauth::{Endpoint, Upstream};
use crate::refresh::flow::{FlowEnv, FlowError, FlowOutput, Reason};
use crate::refresh::{BucketKey, Clock, RefreshConfig};
use crate::secret::{Secret, SecretBytes};
use crate::token::Token;

/// `--store DIR` and `--profile FILE`: the store, and the profile of the servers on it.
#[derive(Args, Debug, Clone)]
pub struct HostArgs {
    /// Which store
    #[command(flatten)]
    pub store: StoreArg,
    /// The profile of the servers on this store (TOML, as for `serve`): its
    /// [provider.NAME] tables name the token endpoints the refresh commands use
    #[arg(long, value_name = "FILE")]
    pub profile: Option<PathBuf>,
}

/// The exit statuses of `credproxy store token refresh`, shown by its `--help`.
const REFRESH_EXIT_HELP: &str = "\
Exit status (the table of the token and key commands):
  0  refreshed, or refreshed within the last 30 s and left as it is (cooldown)
  1  not found: no token stored for PROVIDER:BUCKET
  2  usage error (a bad name, a bad --profile)
  3  refused: cannot be refreshed on the host (no token endpoint for the provider, or no
     refresh token in the stored token)
  5  the store failed (see the log above)
  6  cannot write the output
  7  a new login is needed: the token endpoint refused the refresh token (the message
     says what to run)
  8  the refresh failed for now (unreachable endpoint, server error, ...): try again later";

/// Largest token JSON or API key read from stdin: the version-2 frame limit (4 MiB,
/// PROTOCOL.md §13) and room for a refresh token. What is stored is then held to what a
/// version-2 reply can carry (a token's served form, a key).
const MAX_STDIN: u64 = (crate::codec::MAX_FRAME_LEN_V2 + (1 << 20)) as u64;

/// The longest API key stored: one whose `{"key":"..."}` reply fits a version-2 frame.
/// A longer one could never be served.
const MAX_KEY_LEN: usize = crate::protocol::MAX_SERVED_TOKEN_LEN - r#"{"key":""}"#.len();

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
        host: HostArgs,
    },
    /// Copy every token and API key from one store to another, and verify the copy
    ///
    /// Copies every token (refresh token included) and API key from --from to --to, then
    /// reads them back from the destination and compares; nothing is removed from either
    /// store. Prints one summary line, never a secret.
    Migrate(super::migrate::MigrateArgs),
    /// Write a fresh data key for an etcd store (--store-key) to a new file, or to the OS
    /// keyring
    ///
    /// Writes 32 random bytes to FILE, created with mode 0600; an existing FILE is never
    /// overwritten. With keyring:[SERVICE] the key becomes an item of the OS keyring
    /// (kind=datakey), never replacing one the service already has.
    #[command(after_help = NEW_KEY_HELP)]
    NewKey {
        /// The file to create, or keyring:[SERVICE]
        #[arg(value_name = "FILE|keyring:[SERVICE]")]
        file: PathBuf,
    },
}

/// The exit statuses of `credproxy store new-key`, shown by its `--help`.
const NEW_KEY_HELP: &str = "\
Every host of a fleet that shares an etcd store uses the same data key: copy the file to
each over a safe channel (it stays 0600 and yours), and keep a backup where the store's
operators cannot read it. Without it nothing in the store can be read again.

Exit status:
  0  written
  1  cannot be written (the message says why); nothing is left behind
  2  usage error
  3  refused: FILE already exists (it is left as it is)";

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
        host: HostArgs,
    },
    /// Remove a stored token (exit 1 when none was stored)
    Remove {
        /// Provider name
        provider: String,
        /// Bucket name
        #[arg(long, default_value = DEFAULT_BUCKET)]
        bucket: String,
        #[command(flatten)]
        host: HostArgs,
    },
    /// List provider:bucket pairs, never values
    List {
        #[command(flatten)]
        host: HostArgs,
    },
    /// Show each stored token's expiry and refresh state, one provider:bucket a line
    /// (never a token or a secret)
    Status {
        /// Only this provider's buckets
        provider: Option<String>,
        /// Print a JSON array of objects instead of lines
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        host: HostArgs,
    },
    /// Refresh a stored token now with its refresh token, at the provider's token endpoint
    /// (safe beside running servers: it takes their lock); prints one status line, never
    /// the token
    #[command(after_help = REFRESH_EXIT_HELP)]
    Refresh {
        /// Provider name
        provider: String,
        /// Bucket name
        #[arg(long, default_value = DEFAULT_BUCKET)]
        bucket: String,
        #[command(flatten)]
        host: HostArgs,
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
        host: HostArgs,
    },
    /// Remove an API key (exit 1 when none was stored)
    Remove {
        /// Key name
        name: String,
        #[command(flatten)]
        host: HostArgs,
    },
    /// List API key names
    List {
        #[command(flatten)]
        host: HostArgs,
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

/// `seconds` for a person: "42 s", "42 min", "3 h", "2 days".
fn span(seconds: u64) -> String {
    match seconds {
        0..=59 => format!("{seconds} s"),
        60..=5_399 => format!("{} min", (seconds + 30) / 60),
        5_400..=172_799 => format!("{} h", (seconds + 1_800) / 3_600),
        _ => format!("{} days", (seconds + 43_200) / 86_400),
    }
}

/// `at` (epoch seconds) relative to `now`: "5 min ago" (or "in 5 min" for a time ahead of
/// this clock).
fn ago(at: u64, now: u64) -> String {
    if at <= now {
        format!("{} ago", span(now - at))
    } else {
        format!("in {}", span(at - now))
    }
}

/// `expiry` (epoch seconds) relative to `now`, for a person: "expires in 42 min",
/// "expired 3 h ago", "expiry unknown (treated as expired)" for 0.
pub fn relative_expiry(expiry: u64, now: u64) -> String {
    if expiry == 0 {
        "expiry unknown (treated as expired)".to_owned()
    } else if expiry > now {
        format!("expires in {}", span(expiry - now))
    } else {
        format!("expired {} ago", span(now - expiry))
    }
}

fn now() -> u64 {
    crate::oauth::epoch_seconds(std::time::SystemTime::now())
}

impl StoreCommand {
    /// The `--store` and `--profile` of the command; `None` for the commands without
    /// them (`migrate` names two stores, `new-key` none).
    fn host(&self) -> Option<&HostArgs> {
        Some(match self {
            StoreCommand::Token(cmd) => match cmd {
                TokenCommand::Set { host, .. }
                | TokenCommand::Remove { host, .. }
                | TokenCommand::List { host }
                | TokenCommand::Status { host, .. }
                | TokenCommand::Refresh { host, .. } => host,
            },
            StoreCommand::Key(cmd) => match cmd {
                KeyCommand::Set { host, .. }
                | KeyCommand::Remove { host, .. }
                | KeyCommand::List { host } => host,
            },
            StoreCommand::Import { host, .. } => host,
            StoreCommand::Migrate(_) | StoreCommand::NewKey { .. } => return None,
        })
    }
}

/// Runs a `credproxy store` command.
pub fn run(cmd: StoreCommand) -> Result<(), Failure> {
    // The profile first: a bad one is a usage error before anything is read or written.
    let profile = cmd.host().and_then(|h| h.profile.as_deref());
    let refresh = profile_refresh_config(&load_profile(profile)?);
    let store_failed = |e: StoreError| Failure::new(format!("the store failed: {e}"));
    match cmd {
        StoreCommand::Token(TokenCommand::Set {
            provider,
            bucket,
            prompt,
            host,
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
            let backend = open_store(&host.store)?;
            backend
                .save_token(&provider, &bucket, &token, SaveMode::Replace)
                .map_err(store_failed)?;
            let note = match (
                token.has_refresh_token(),
                refresh.endpoints.contains_key(&provider),
            ) {
                (true, true) => "with a refresh token".to_owned(),
                (true, false) => format!(
                    "with a refresh token, but no token endpoint is known for {provider}: \
                     it will not be refreshed (add [provider.{provider}] to the profile)"
                ),
                (false, _) => "without a refresh token".to_owned(),
            };
            eprintln!("stored the token for {provider}:{bucket} ({note})");
        }
        StoreCommand::Token(TokenCommand::Remove {
            provider,
            bucket,
            host,
        }) => {
            check_name(NameKind::Provider, &provider)?;
            check_name(NameKind::Bucket, &bucket)?;
            if !open_store(&host.store)?
                .remove_token(&provider, &bucket)
                .map_err(store_failed)?
            {
                return Err(Failure::new(format!(
                    "no token stored for {provider}:{bucket}"
                )));
            }
            eprintln!("removed the token for {provider}:{bucket}");
        }
        StoreCommand::Token(TokenCommand::List { host }) => {
            let backend = open_store(&host.store)?;
            let mut text = String::new();
            for provider in backend.list_providers().map_err(store_failed)? {
                for bucket in backend.list_buckets(&provider).map_err(store_failed)? {
                    text.push_str(&format!("{provider}:{bucket}\n"));
                }
            }
            emit(&text)?;
        }
        StoreCommand::Key(KeyCommand::Set { name, prompt, host }) => {
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
            if text.len() > MAX_KEY_LEN {
                let mut text = text;
                zeroize::Zeroize::zeroize(&mut text);
                return Err(Failure::usage(format!(
                    "the API key is over {MAX_KEY_LEN} bytes, more than a reply can carry"
                )));
            }
            let key = Secret::new(text);
            if key.is_empty() {
                return Err(Failure::usage("the API key is empty"));
            }
            open_store(&host.store)?
                .set_key(&name, &key)
                .map_err(store_failed)?;
            eprintln!("stored the API key {name}");
        }
        StoreCommand::Key(KeyCommand::Remove { name, host }) => {
            check_name(NameKind::Key, &name)?;
            if !open_store(&host.store)?
                .remove_key(&name)
                .map_err(store_failed)?
            {
                return Err(Failure::new(format!("no API key named {name} is stored")));
            }
            eprintln!("removed the API key {name}");
        }
        StoreCommand::Key(KeyCommand::List { host }) => {
            let mut text = String::new();
            for name in open_store(&host.store)?.list_keys().map_err(store_failed)? {
                text.push_str(&name);
                text.push('\n');
            }
            emit(&text)?;
        }
        StoreCommand::Import {
            source,
            from,
            bucket,
            host,
        } => import(&source, from, &bucket, &host.store)?,
        StoreCommand::Token(TokenCommand::Status {
            provider,
            json,
            host,
        }) => {
            if let Some(provider) = &provider {
                check_name(NameKind::Provider, provider)?;
            }
            let backend = open_store(&host.store)?;
            let entries = status_entries(&*backend, provider.as_deref(), &refresh.endpoints, now())
                .map_err(store_failed)?;
            if json {
                let mut text = serde_json::to_string(&entries)
                    .map_err(|e| Failure::new(format!("cannot write the output: {e}")))?;
                text.push('\n');
                emit(&text)?;
            } else if entries.is_empty() {
                match &provider {
                    Some(p) => eprintln!("no tokens stored for {p}"),
                    None => eprintln!("no tokens stored"),
                }
            } else {
                emit(&entries.iter().map(StatusEntry::line).collect::<String>())?;
            }
        }
        StoreCommand::Token(TokenCommand::Refresh {
            provider,
            bucket,
            host,
        }) => refresh_now(&provider, &bucket, &host, refresh)?,
        StoreCommand::Migrate(args) => super::migrate::migrate(args)?,
        StoreCommand::NewKey { file } => new_key(&file)?,
    }
    Ok(())
}

/// `credproxy store new-key FILE`: a fresh data key in a new 0600 file, checked by loading
/// it back as `--store-key` does.
fn new_key(file: &std::path::Path) -> Result<(), Failure> {
    use crate::backend::seal::{DataKey, KEY_LEN};
    let key =
        DataKey::generate().map_err(|e| Failure::new(format!("cannot make a data key: {e}")))?;
    if let Some(service) = file.to_str().and_then(|v| v.strip_prefix("keyring:")) {
        let keyring =
            crate::backend::KeyringBackend::open((!service.is_empty()).then_some(service))
                .map_err(|e| Failure::new(format!("cannot open the keyring: {e}")))?;
        keyring.create_data_key(&key).map_err(|e| {
            let text = e.to_string();
            if text.contains("already has a data key") {
                Failure::with_code(text, exit::REFUSED)
            } else {
                Failure::new(format!("cannot store the data key: {text}"))
            }
        })?;
        super::open::load_data_key(file)?;
        eprintln!(
            "stored a new data key in the OS keyring (service {}); pass it to an etcd store \
             with --store-key {}; other hosts need the same key (a key file is easier to \
             share: store new-key FILE)",
            keyring.service(),
            file.display()
        );
        return Ok(());
    }
    key.write_new(file).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            Failure::with_code(
                format!(
                    "{} already exists: new-key never overwrites a file (a data key replaced \
                     is every value sealed with it lost); choose another name",
                    file.display()
                ),
                exit::REFUSED,
            )
        } else {
            Failure::new(format!(
                "cannot write the data key to {}: {e}; nothing was left behind",
                file.display()
            ))
        }
    })?;
    DataKey::load(file).map_err(|e| {
        Failure::new(format!(
            "wrote a data key, but it would not be accepted as --store-key: {e}"
        ))
    })?;
    eprintln!(
        "wrote a new data key to {} ({KEY_LEN} random bytes, mode 0600); pass it to an etcd \
         store with --store-key, give every host of the fleet the same file, and keep a \
         backup: without it the store cannot be read",
        file.display()
    );
    Ok(())
}

/// One line of `credproxy store token status`: never a token or a secret.
#[derive(Debug, Serialize)]
struct StatusEntry {
    provider: String,
    bucket: String,
    /// Epoch seconds; 0 when unknown (treated as expired).
    expiry: u64,
    /// Seconds until the expiry, negative once expired.
    expires_in: i64,
    /// The provider has a token endpoint and the token a non-empty refresh token.
    refreshable: bool,
    needs_login: Option<NeedsLoginEntry>,
    /// Epoch seconds of the last successful refresh, when one is recorded.
    refreshed_at: Option<u64>,
    /// Why it is not refreshable (text only).
    #[serde(skip)]
    why_not: Vec<String>,
    #[serde(skip)]
    now: u64,
}

/// The needs-login mark as `status --json` shows it (`code` always present, maybe null).
#[derive(Debug, Serialize)]
struct NeedsLoginEntry {
    since: u64,
    status: u16,
    code: Option<String>,
}

impl StatusEntry {
    /// The text line: `provider:bucket: expiry; refreshable; needs login; last refreshed`.
    fn line(&self) -> String {
        let mut parts = vec![relative_expiry(self.expiry, self.now)];
        if self.refreshable {
            parts.push("refreshable".to_owned());
        } else {
            parts.push(format!("not refreshable ({})", self.why_not.join(", ")));
        }
        if let Some(n) = &self.needs_login {
            let code = n
                .code
                .as_deref()
                .map(|c| format!(" {c}"))
                .unwrap_or_default();
            parts.push(format!(
                "needs login (HTTP {}{code}, since {})",
                n.status,
                ago(n.since, self.now)
            ));
        }
        if let Some(at) = self.refreshed_at {
            parts.push(format!("last refreshed {}", ago(at, self.now)));
        }
        format!("{}:{}: {}\n", self.provider, self.bucket, parts.join("; "))
    }
}

/// The status of every stored token (of `only` when given), sorted by provider then
/// bucket. A token removed between the listing and its read is left out.
fn status_entries(
    backend: &dyn Backend,
    only: Option<&str>,
    endpoints: &BTreeMap<String, Endpoint>,
    now: u64,
) -> Result<Vec<StatusEntry>, StoreError> {
    let providers = match only {
        Some(p) => vec![p.to_owned()],
        None => backend.list_providers()?,
    };
    let mut entries = Vec::new();
    for provider in providers {
        for bucket in backend.list_buckets(&provider)? {
            // Only what is shown is kept; the token (with its refresh token) is dropped,
            // and wiped, at the end of this block.
            let (expiry, has_refresh_token) = match backend.get_token(&provider, &bucket)? {
                Some(token) => (token.expiry(), token.has_refresh_token()),
                None => continue,
            };
            let state = backend.refresh_state(&provider, &bucket)?;
            let has_endpoint = endpoints.contains_key(&provider);
            let mut why_not = Vec::new();
            if !has_endpoint {
                why_not.push(format!("no token endpoint for {provider}"));
            }
            if !has_refresh_token {
                why_not.push("no refresh token".to_owned());
            }
            entries.push(StatusEntry {
                expiry,
                expires_in: expiry as i64 - now as i64,
                refreshable: has_endpoint && has_refresh_token,
                needs_login: state.needs_login.map(|n| NeedsLoginEntry {
                    since: n.since,
                    status: n.status,
                    code: n.code,
                }),
                refreshed_at: state.refreshed_at,
                why_not,
                now,
                provider: provider.clone(),
                bucket,
            });
        }
    }
    Ok(entries)
}

/// `word` as one shell word: as it is when it has no special character, else quoted.
fn shell_word(word: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "/._-+=:,@%".contains(c);
    if !word.is_empty() && word.chars().all(plain) {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// What to run to log in again for `key`: `store import` for a provider another CLI logs
/// in to, and `store token set`; with `--store DIR` when the command was given one.
fn login_again(key: &BucketKey, store: &StoreArg) -> String {
    use crate::import::Source;
    let store = store
        .store
        .as_ref()
        .map(|dir| format!(" --store {}", shell_word(&dir.to_string_lossy())))
        .unwrap_or_default();
    let set = format!(
        "`credproxy store token set {} --bucket {}{store}` (token JSON on stdin)",
        key.provider, key.bucket
    );
    let source = ["claude-code", "codex", "gemini-cli"]
        .into_iter()
        .filter_map(Source::parse)
        .find(|s| s.provider() == key.provider);
    match source {
        Some(source) => format!(
            "log in again with the {} CLI, then run `credproxy store import {} --bucket {}{store}`; \
             or save a new token with {set}",
            source.name(),
            source.name(),
            key.bucket
        ),
        None => format!("log in again and save the new token with {set}"),
    }
}

/// `credproxy store token refresh`: one run of the servers' refresh procedure, explicit
/// (so it runs even when the profile says `refresh = false`, and is skipped only in the
/// cooldown), under the bucket's refresh lock in the store.
fn refresh_now(
    provider: &str,
    bucket: &str,
    host: &HostArgs,
    mut config: RefreshConfig,
) -> Result<(), Failure> {
    check_name(NameKind::Provider, provider)?;
    check_name(NameKind::Bucket, bucket)?;
    let internal = |message: String| Failure::with_code(message, exit::INTERNAL);
    let backend: Arc<dyn Backend> =
        open_store(&host.store).map_err(|f| Failure::with_code(f.message, exit::INTERNAL))?;
    config.settings.enabled = true;
    let settings = config.settings;
    let endpoints = Arc::new(config.endpoints);
    let key = BucketKey::new(provider, Some(bucket));
    let clock = Clock::system();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| internal(format!("cannot start the runtime: {e}")))?;
    let output = runtime.block_on(async {
        let upstream =
            Upstream::with(config.timeouts, config.retry).map_err(|e| internal(e.to_string()))?;
        let env = FlowEnv {
            backend: Arc::clone(&backend),
            endpoints: Arc::clone(&endpoints),
            upstream,
            settings,
            clock: clock.clone(),
            pool: tokio::runtime::Handle::current(),
        };
        Ok::<FlowOutput, Failure>(env.run(&key, Reason::Explicit).await)
    })?;
    // A store call stuck in the kernel must not hold the command's exit.
    runtime.shutdown_background();
    let now = clock.now();
    let state = || backend.refresh_state(&key.provider, &key.bucket).ok();
    let line = match output.answer(Reason::Explicit, now, None) {
        Ok(Some(token)) if output.renewed.is_some() => format!(
            "refreshed {key}: the new token {}",
            relative_expiry(token.expiry(), now)
        ),
        Ok(Some(token)) if output.went_upstream => format!(
            "{key} was not refreshed: a new token was saved for it meanwhile, and it stands \
             ({})",
            relative_expiry(token.expiry(), now)
        ),
        Ok(Some(token)) => {
            let cooldown = settings.cooldown.as_secs();
            let when = match state().and_then(|s| s.refreshed_at) {
                Some(at) => format!("refreshed {} s ago", now.saturating_sub(at)),
                None => "refreshed moments ago".to_owned(),
            };
            format!(
                "{key} was {when}, within the {cooldown} s cooldown: not refreshed again ({})",
                relative_expiry(token.expiry(), now)
            )
        }
        Ok(None) if output.went_upstream => {
            let why = "was removed while it was being refreshed; it stays removed";
            return Err(Failure::with_code(
                format!("the token for {key} {why}"),
                exit::NOT_FOUND,
            ));
        }
        Ok(None) => {
            return Err(Failure::with_code(
                format!("no token stored for {key}"),
                exit::NOT_FOUND,
            ))
        }
        Err(FlowError::NotAvailable) => {
            let why = if !endpoints.contains_key(&key.provider) {
                format!(
                    "no token endpoint is known for {p}; add a [provider.{p}] table (token_url, \
                     client_id) to the servers' profile and pass it with --profile",
                    p = key.provider
                )
            } else {
                format!(
                    "the stored token has no refresh token; {}",
                    login_again(&key, &host.store)
                )
            };
            return Err(Failure::with_code(
                format!("{key} cannot be refreshed on the host: {why}"),
                exit::REFUSED,
            ));
        }
        Err(FlowError::Reauth) => {
            let mark = state().and_then(|s| s.needs_login);
            let what = match (&mark, output.went_upstream) {
                (Some(n), fresh) => format!(
                    " (HTTP {}{}, {})",
                    n.status,
                    n.code
                        .as_deref()
                        .map(|c| format!(" {c}"))
                        .unwrap_or_default(),
                    if fresh {
                        "just now".to_owned()
                    } else {
                        format!("since {}", ago(n.since, now))
                    }
                ),
                (None, _) => String::new(),
            };
            return Err(Failure::with_code(
                format!(
                    "the host's login for {key} is no longer valid: the token endpoint refused \
                     its refresh token{what}; {}",
                    login_again(&key, &host.store)
                ),
                exit::REAUTH,
            ));
        }
        Err(FlowError::Failed) => {
            return Err(Failure::with_code(
                format!("refreshing {key} failed; try again later; see the log above"),
                exit::REFRESH_FAILED,
            ))
        }
        Err(FlowError::Store) => {
            return Err(internal(format!(
                "refreshing {key} failed: the store failed; see the log above"
            )))
        }
    };
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")
        .and_then(|()| out.flush())
        .map_err(|e| Failure::with_code(format!("cannot write the output: {e}"), exit::OUTPUT))
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
