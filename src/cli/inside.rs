//! `credproxy token ...` and `credproxy key ...`: the commands a sandboxed process runs,
//! thin wrappers over [`Client`] with documented exit codes.

use std::io::{Read, Write};
use std::path::PathBuf;

use clap::{Args, Subcommand};
use serde_json::Value;

use super::Failure;
use crate::client::{Client, ClientConfig, ClientError, REFRESH_REQUEST_TIMEOUT, SOCKET_ENV};
use crate::protocol::ErrorCode;
use crate::secret::SecretBytes;
use crate::token::Token;

/// The exit statuses of the inside commands.
pub mod exit {
    /// Success.
    pub const OK: u8 = 0;
    /// Not found (`NOT_FOUND`, or `has` answering false).
    pub const NOT_FOUND: u8 = 1;
    /// Usage error.
    pub const USAGE: u8 = 2;
    /// Refused by the proxy (`UNAUTHORIZED`, `FORBIDDEN`, `RATE_LIMITED`, `INVALID_REQUEST`, ...).
    pub const REFUSED: u8 = 3;
    /// Proxy unreachable or connection lost, or `LLXPRT_CAPABILITY_FD` is set and its
    /// descriptor holds no capability token.
    pub const UNREACHABLE: u8 = 4;
    /// Proxy internal error.
    pub const INTERNAL: u8 = 5;
    /// The output could not be written (stdout full, closed, or a pipe with no reader):
    /// the caller did not get what it asked for, so this is never success.
    pub const OUTPUT: u8 = 6;
    /// The host's login is no longer valid (`REAUTH_REQUIRED`): a person must log in again
    /// on the host; retrying will not help.
    pub const REAUTH: u8 = 7;
    /// A refresh failed for now (`REFRESH_FAILED`): try again later.
    pub const REFRESH_FAILED: u8 = 8;
}

/// The exit code table, shown by `--help`.
pub const EXIT_CODES_HELP: &str = "\
Exit status of the token and key commands:
  0  success
  1  not found (NOT_FOUND, or `key has` answering false)
  2  usage error
  3  refused by the proxy (UNAUTHORIZED, FORBIDDEN, RATE_LIMITED, INVALID_REQUEST,
     REFRESH_NOT_AVAILABLE, ...; UNAUTHORIZED also for a refused capability token)
  4  proxy unreachable or connection lost, or no capability token on the descriptor
     named by LLXPRT_CAPABILITY_FD
  5  proxy internal error
  6  cannot write the output (stdout full, closed, or a pipe with no reader)
  7  a new login is needed on the host (REAUTH_REQUIRED): retrying will not help
  8  the refresh failed for now (REFRESH_FAILED): try again later";

/// Largest token JSON read from stdin by `token save`.
const MAX_STDIN: u64 = 64 * 1024;

/// Where the proxy is.
#[derive(Args, Debug, Clone)]
pub struct SocketArg {
    /// The proxy's socket [default: $LLXPRT_CREDENTIAL_SOCKET]
    #[arg(long, value_name = "PATH", global = true)]
    pub socket: Option<PathBuf>,
}

/// `credproxy token ...`
#[derive(Args, Debug)]
#[command(after_help = EXIT_CODES_HELP)]
pub struct TokenArgs {
    #[command(flatten)]
    socket: SocketArg,
    #[command(subcommand)]
    command: TokenCommand,
}

/// `credproxy key ...`
#[derive(Args, Debug)]
#[command(after_help = EXIT_CODES_HELP)]
pub struct KeyArgs {
    #[command(flatten)]
    socket: SocketArg,
    #[command(subcommand)]
    command: KeyCommand,
}

/// Token commands.
#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Print the sanitized token JSON
    Get {
        /// Provider name
        provider: String,
        /// Bucket name [default: default]
        #[arg(long)]
        bucket: Option<String>,
    },
    /// Have the host refresh the token now and print the new sanitized token JSON (the
    /// current one when it was refreshed in the last 30 s)
    Refresh {
        /// Provider name
        provider: String,
        /// Bucket name [default: default]
        #[arg(long)]
        bucket: Option<String>,
    },
    /// Save a token read from stdin as JSON (its refresh_token is dropped by the proxy)
    Save {
        /// Provider name
        provider: String,
        /// Bucket name [default: default]
        #[arg(long)]
        bucket: Option<String>,
    },
    /// Remove a token
    Remove {
        /// Provider name
        provider: String,
        /// Bucket name [default: default]
        #[arg(long)]
        bucket: Option<String>,
    },
    /// List providers, one per line
    List {
        /// Print a JSON array instead of lines
        #[arg(long)]
        json: bool,
    },
    /// List a provider's buckets, one per line
    Buckets {
        /// Provider name
        provider: String,
        /// Print a JSON array instead of lines
        #[arg(long)]
        json: bool,
    },
    /// Print a bucket's usage statistics as JSON
    Stats {
        /// Provider name
        provider: String,
        /// Bucket name [default: default]
        #[arg(long)]
        bucket: Option<String>,
    },
}

/// Key commands.
#[derive(Subcommand, Debug)]
pub enum KeyCommand {
    /// Print the key alone, newline-terminated
    Get {
        /// Key name
        name: String,
    },
    /// List key names, one per line
    List {
        /// Print a JSON array instead of lines
        #[arg(long)]
        json: bool,
    },
    /// Exit 0 when the key exists, 1 when it does not
    Has {
        /// Key name
        name: String,
    },
}

/// The client for `--socket` or the environment, with the capability token of the
/// descriptor named by `LLXPRT_CAPABILITY_FD` when that is set. `may_refresh`: the
/// request may wait on a host-side refresh, so it gets [`REFRESH_REQUEST_TIMEOUT`] to see
/// the proxy's own answer.
fn client(arg: &SocketArg, may_refresh: bool) -> Result<Client, Failure> {
    let path = match &arg.socket {
        Some(path) => path.clone(),
        None => std::env::var_os(SOCKET_ENV)
            .filter(|path| !path.is_empty())
            .map(PathBuf::from)
            .ok_or_else(|| {
                Failure::with_code(
                    format!("no proxy socket: set {SOCKET_ENV} or pass --socket PATH"),
                    exit::UNREACHABLE,
                )
            })?,
    };
    let capability = crate::handover::from_env().map_err(|e| failure(e.into()))?;
    let mut config = ClientConfig::default();
    if may_refresh {
        config.request_timeout = REFRESH_REQUEST_TIMEOUT;
    }
    Ok(Client::with_capability(path, config, capability))
}

/// Maps a client error to the documented exit status and a line naming the code.
fn failure(e: ClientError) -> Failure {
    match &e {
        ClientError::Server { code, message, .. } => {
            let status = match e.code() {
                Some(ErrorCode::NotFound) => exit::NOT_FOUND,
                Some(ErrorCode::InternalError) => exit::INTERNAL,
                Some(ErrorCode::ReauthRequired) => exit::REAUTH,
                Some(ErrorCode::RefreshFailed) => exit::REFRESH_FAILED,
                _ => exit::REFUSED,
            };
            // The proxy's sentence already says what happened; name the code once.
            let line = if message.starts_with(code.as_str()) {
                message.clone()
            } else {
                format!("{code}: {message}")
            };
            Failure::with_code(line, status)
        }
        ClientError::TooLarge | ClientError::Protocol(_) => {
            Failure::with_code(format!("PROTOCOL: {e}"), exit::REFUSED)
        }
        ClientError::CapabilityRefused { .. } => {
            Failure::with_code(format!("UNAUTHORIZED: {e}"), exit::REFUSED)
        }
        _ => Failure::with_code(format!("UNREACHABLE: {e}"), exit::UNREACHABLE),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::new(format!("cannot start the runtime: {e}")))
}

/// Writes `bytes` to stdout and flushes: a write error (a full device, a pipe whose reader
/// is gone) is a failure with [`exit::OUTPUT`], never a silent success. The message names
/// the cause only, never the bytes.
fn emit(bytes: &[u8]) -> Result<(), Failure> {
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)
        .and_then(|()| out.flush())
        .map_err(|e| Failure::with_code(format!("cannot write the output: {e}"), exit::OUTPUT))
}

fn print_names(names: &[String], json: bool) -> Result<(), Failure> {
    let mut text = String::new();
    if json {
        text.push_str(&serde_json::to_string(names).unwrap_or_default());
        text.push('\n');
    } else {
        for name in names {
            text.push_str(name);
            text.push('\n');
        }
    }
    emit(text.as_bytes())
}

/// Prints the sanitized token JSON on one line.
fn print_token(token: &Token) -> Result<(), Failure> {
    // Sized first: growing by reallocation would leave unwiped copies.
    let mut text = SecretBytes(Vec::with_capacity(crate::token::json_len(token) + 1));
    let _ = serde_json::to_writer(&mut text.0, token);
    text.0.push(b'\n');
    emit(&text.0)
}

fn not_found(what: String) -> Failure {
    Failure::with_code(format!("NOT_FOUND: {what}"), exit::NOT_FOUND)
}

/// Runs a `credproxy token` command; returns the exit status.
pub fn run_token(args: TokenArgs) -> Result<u8, Failure> {
    let may_refresh = matches!(
        args.command,
        TokenCommand::Get { .. } | TokenCommand::Refresh { .. }
    );
    let client = client(&args.socket, may_refresh)?;
    runtime()?.block_on(async move {
        match args.command {
            TokenCommand::Get { provider, bucket } => {
                let token = client
                    .get_token(&provider, bucket.as_deref())
                    .await
                    .map_err(failure)?;
                let token = token.ok_or_else(|| not_found(format!("no token for {provider}")))?;
                print_token(&token)?;
            }
            TokenCommand::Refresh { provider, bucket } => {
                let token = client
                    .refresh_token(&provider, bucket.as_deref())
                    .await
                    .map_err(failure)?;
                let token = token.ok_or_else(|| not_found(format!("no token for {provider}")))?;
                print_token(&token)?;
            }
            TokenCommand::Save { provider, bucket } => {
                // Allocated once: growing by reallocation would leave unwiped copies.
                let mut input = SecretBytes(Vec::with_capacity(
                    MAX_STDIN as usize + 1 + crate::backend::file::PROBE_SLACK,
                ));
                std::io::stdin()
                    .lock()
                    .take(MAX_STDIN + 1)
                    .read_to_end(&mut input.0)
                    .map_err(|e| Failure::new(format!("cannot read stdin: {e}")))?;
                if input.0.len() as u64 > MAX_STDIN {
                    return Err(Failure::usage(format!(
                        "the token on stdin is over {MAX_STDIN} bytes"
                    )));
                }
                let token = Token::from_json(&input.0)
                    .map_err(|e| Failure::usage(format!("invalid token: {e}")))?;
                client
                    .save_token(&provider, bucket.as_deref(), &token)
                    .await
                    .map_err(failure)?;
            }
            TokenCommand::Remove { provider, bucket } => {
                client
                    .remove_token(&provider, bucket.as_deref())
                    .await
                    .map_err(failure)?;
            }
            TokenCommand::List { json } => {
                print_names(&client.list_providers().await.map_err(failure)?, json)?;
            }
            TokenCommand::Buckets { provider, json } => {
                print_names(
                    &client.list_buckets(&provider).await.map_err(failure)?,
                    json,
                )?;
            }
            TokenCommand::Stats { provider, bucket } => {
                let stats = client
                    .get_bucket_stats(&provider, bucket.as_deref())
                    .await
                    .map_err(failure)?;
                let stats = stats.ok_or_else(|| not_found(format!("no token for {provider}")))?;
                let mut value = serde_json::json!({
                    "bucket": stats.bucket,
                    "requestCount": stats.request_count,
                    "percentage": stats.percentage,
                });
                if let Some(ms) = stats.last_used {
                    value["lastUsed"] = Value::from(ms);
                }
                emit(format!("{value}\n").as_bytes())?;
            }
        }
        client.close().await;
        Ok(exit::OK)
    })
}

/// Runs a `credproxy key` command; returns the exit status.
pub fn run_key(args: KeyArgs) -> Result<u8, Failure> {
    let client = client(&args.socket, false)?;
    runtime()?.block_on(async move {
        let status = match args.command {
            KeyCommand::Get { name } => {
                let key = client.get_api_key(&name).await.map_err(failure)?;
                let key = key.ok_or_else(|| not_found(format!("no API key named {name}")))?;
                let mut line = SecretBytes(Vec::with_capacity(key.expose().len() + 1));
                line.0.extend_from_slice(key.expose().as_bytes());
                line.0.push(b'\n');
                emit(&line.0)?;
                exit::OK
            }
            KeyCommand::List { json } => {
                print_names(&client.list_api_keys().await.map_err(failure)?, json)?;
                exit::OK
            }
            KeyCommand::Has { name } => {
                if client.has_api_key(&name).await.map_err(failure)? {
                    exit::OK
                } else {
                    exit::NOT_FOUND
                }
            }
        };
        client.close().await;
        Ok(status)
    })
}
