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
    let mut buf = SecretBytes(Vec::with_capacity(MAX_STDIN as usize + 1));
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
            let mut out = std::io::stdout().lock();
            for name in open_store(&store)?.list_keys().map_err(store_failed)? {
                let _ = writeln!(out, "{name}");
            }
        }
    }
    Ok(())
}
