//! `credproxy login PROVIDER` and `credproxy logout PROVIDER`, on the host.
//!
//! `login` runs the provider's flow ([`crate::oauth::login`]: loopback redirect, paste the
//! code, or device authorization), then stores the whole token (refresh token included)
//! with [`SaveMode::Replace`], atomically and under the store lock, which also clears a
//! needs-login mark. Nothing is stored before the code exchange succeeded, so a failed,
//! refused, timed-out or interrupted (Ctrl-C) login leaves the store as it was.
//!
//! `logout` removes the token, then revokes it where the provider has a revocation
//! endpoint (RFC 7009, best effort). A server refreshing the token meanwhile cannot bring
//! it back: a refresh's final write refuses a bucket removed while it ran
//! ([`crate::backend::Backend::finish_refresh`]).
//!
//! The URL and instructions go to stderr, the one-line result to stdout; never a token,
//! a code, a verifier or a client secret.

use std::io::{BufRead, IsTerminal, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use clap::Args;

use super::inside::exit;
use super::serve::{load_profile, open_store, profile_refresh_config};
use super::store::{relative_expiry, HostArgs};
use super::Failure;
use crate::backend::{Backend, SaveMode};
use crate::names::{self, NameKind, DEFAULT_BUCKET};
use crate::oauth::login::{self as flow, LoginError, Pkce};
use crate::oauth::provider::Redirect;
use crate::oauth::{ClientSecret, Endpoint, Grant, Upstream};
use crate::secret::Secret;

/// The exit statuses of `credproxy login`, shown by its `--help`.
const LOGIN_EXIT_HELP: &str = "\
Flows: a provider with a loopback redirect opens the browser (or, with --no-browser or
no display, prints the URL) and waits up to 5 minutes for it to come back; one whose
redirect is a page of its own (anthropic) prints the URL and reads the code#state the page
shows from the terminal; --device (or a provider with only a device authorization
endpoint) prints a verification URL and a code to enter on any device.

Exit status:
  0  logged in: the token is stored
  1  the login did not complete (refused or denied, a state that does not belong to this
     login, timed out, expired); nothing was stored
  2  usage error (a bad name, a bad --profile, no login flow known for PROVIDER, the
     paste flow without a terminal)
  5  the store failed
  6  cannot write the output
  8  the authorization server could not be reached or failed: try again later";

/// The exit statuses of `credproxy logout`, shown by its `--help`.
const LOGOUT_EXIT_HELP: &str = "\
Exit status:
  0  removed (a failed revocation is reported on stderr, and still exits 0: the token is
     gone from the store either way)
  1  no token stored for PROVIDER:BUCKET
  2  usage error (a bad name, a bad --profile)
  5  the store failed";

/// `credproxy login`.
#[derive(Args, Debug)]
#[command(after_help = LOGIN_EXIT_HELP)]
pub struct LoginArgs {
    /// Provider name: a preset (anthropic, codex, gemini) or a [provider.NAME] table of
    /// the profile
    provider: String,
    /// Bucket to store the token in
    #[arg(long, default_value = DEFAULT_BUCKET)]
    bucket: String,
    #[command(flatten)]
    host: HostArgs,
    /// Print the URL instead of opening a browser
    #[arg(long)]
    no_browser: bool,
    /// Use the device flow (the provider's device_authorization_url) even when it also
    /// has a browser flow
    #[arg(long)]
    device: bool,
    /// For tests only: wait this many seconds for the browser or the pasted code instead
    /// of 300
    #[arg(long, hide = true, value_name = "SECS")]
    test_timeout: Option<u64>,
}

/// `credproxy logout`.
#[derive(Args, Debug)]
#[command(after_help = LOGOUT_EXIT_HELP)]
pub struct LogoutArgs {
    /// Provider name
    provider: String,
    /// Bucket name
    #[arg(long, default_value = DEFAULT_BUCKET)]
    bucket: String,
    #[command(flatten)]
    host: HostArgs,
}

/// Which flow a login runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    Loopback,
    Paste,
    Device,
}

fn now() -> u64 {
    crate::oauth::epoch_seconds(std::time::SystemTime::now())
}

fn check_name(kind: NameKind, name: &str) -> Result<(), Failure> {
    names::check(kind, name).map_err(Failure::usage)
}

fn store_failed(e: impl std::fmt::Display) -> Failure {
    Failure::with_code(format!("the store failed: {e}"), exit::INTERNAL)
}

/// A login error with its exit status.
fn failed(e: LoginError) -> Failure {
    let code = match &e {
        LoginError::Unreachable(_) => exit::REFRESH_FAILED,
        _ => 1,
    };
    Failure::with_code(format!("login failed: {e}"), code)
}

/// The endpoint of `provider`: its preset with the profile's table, or the table alone.
fn endpoint_of(provider: &str, host: &HostArgs) -> Result<Endpoint, Failure> {
    let loaded = load_profile(host.profile.as_deref())?;
    let mut endpoints = profile_refresh_config(&loaded).endpoints;
    endpoints.remove(provider).ok_or_else(|| {
        Failure::usage(format!(
            "no login is known for {provider}: it has no preset; add a [provider.{provider}] \
             table (token_url, client_id, authorization_url or device_authorization_url) to \
             a profile and pass it with --profile"
        ))
    })
}

/// The client secret the requests carry: the published one, or the store key's.
fn client_secret(endpoint: &Endpoint, backend: &dyn Backend) -> Result<Option<Secret>, Failure> {
    match &endpoint.client_secret {
        None => Ok(None),
        Some(ClientSecret::Published(secret)) => Ok(Some(secret.clone())),
        Some(ClientSecret::StoreKey(name)) => match backend.get_key(name).map_err(store_failed)? {
            Some(secret) => Ok(Some(secret)),
            None => Err(Failure::usage(format!(
                "{}'s client secret is read from the API key {name}, which is not stored; \
                 store it with `credproxy store key set {name}`",
                endpoint.provider
            ))),
        },
    }
}

fn pick_flow(endpoint: &Endpoint, device: bool) -> Result<Flow, Failure> {
    let login = &endpoint.login;
    let p = &endpoint.provider;
    if device {
        return match login.device_authorization_url {
            Some(_) => Ok(Flow::Device),
            None => Err(Failure::usage(format!(
                "{p} has no device flow: add device_authorization_url to [provider.{p}] in the \
                 profile"
            ))),
        };
    }
    match (&login.authorization_url, &login.device_authorization_url) {
        (Some(_), _) => Ok(match login.redirect {
            Redirect::Paste(_) => Flow::Paste,
            Redirect::Loopback { .. } => Flow::Loopback,
        }),
        (None, Some(_)) => Ok(Flow::Device),
        (None, None) => Err(Failure::usage(format!(
            "no login flow is configured for {p}: add authorization_url (browser) or \
             device_authorization_url (device code) to [provider.{p}] in the profile"
        ))),
    }
}

/// `credproxy login`.
pub fn login(args: LoginArgs) -> Result<u8, Failure> {
    check_name(NameKind::Provider, &args.provider)?;
    check_name(NameKind::Bucket, &args.bucket)?;
    let endpoint = endpoint_of(&args.provider, &args.host)?;
    let flow = pick_flow(&endpoint, args.device)?;
    // The store first: a login that cannot be saved should not ask for a browser.
    let backend =
        open_store(&args.host.store).map_err(|f| Failure::with_code(f.message, exit::INTERNAL))?;
    let secret = client_secret(&endpoint, &*backend)?;
    if flow == Flow::Paste && !std::io::stdin().is_terminal() {
        return Err(Failure::usage(format!(
            "{} shows the code on its own page for you to paste here, and stdin is not a \
             terminal: run `credproxy login {}` in a terminal",
            endpoint.provider, endpoint.provider
        )));
    }
    let timeout = args
        .test_timeout
        .map_or(flow::DEFAULT_TIMEOUT, Duration::from_secs);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::new(format!("cannot start the runtime: {e}")))?;
    let key = format!("{}:{}", args.provider, args.bucket);
    let mut grant = runtime.block_on(async {
        let upstream = Upstream::new().map_err(|e| Failure::new(e.to_string()))?;
        let ctx = Ctx {
            upstream: &upstream,
            endpoint: &endpoint,
            secret: secret.as_ref(),
            no_browser: args.no_browser,
            timeout,
        };
        let result = match flow {
            Flow::Loopback => loopback(&ctx).await,
            Flow::Paste => paste(&ctx).await,
            Flow::Device => device(&ctx).await,
        };
        result.map_err(failed)
    })?;
    drop(runtime);
    if let Some(id) = grant
        .get_str("id_token")
        .and_then(crate::import::chatgpt_account_id)
    {
        grant.insert("account_id", serde_json::Value::from(id));
    }
    let token = grant.into_token().map_err(|e| {
        Failure::new(format!(
            "login failed: the token endpoint's answer is not a usable token ({e}); nothing was \
             stored"
        ))
    })?;
    backend
        .save_token(&args.provider, &args.bucket, &token, SaveMode::Replace)
        .map_err(store_failed)?;
    let refreshable = if token.has_refresh_token() {
        "refreshable".to_owned()
    } else {
        "not refreshable: the provider returned no refresh token".to_owned()
    };
    let line = format!(
        "logged in: {key}, {}, {refreshable}\n",
        relative_expiry(token.expiry(), now())
    );
    let mut out = std::io::stdout().lock();
    out.write_all(line.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|e| Failure::with_code(format!("cannot write the output: {e}"), exit::OUTPUT))?;
    Ok(0)
}

/// What every flow needs.
struct Ctx<'a> {
    upstream: &'a Upstream,
    endpoint: &'a Endpoint,
    secret: Option<&'a Secret>,
    no_browser: bool,
    timeout: Duration,
}

/// Writes `text` to stderr (the instructions; stdout carries the result line only).
fn say(text: &str) {
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(text.as_bytes());
    let _ = err.flush();
}

fn minutes(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 60 && s.is_multiple_of(60) {
        format!("{} minute{}", s / 60, if s == 60 { "" } else { "s" })
    } else {
        format!("{s} s")
    }
}

async fn loopback(ctx: &Ctx<'_>) -> Result<Grant, LoginError> {
    let listener = flow::Listener::bind(&ctx.endpoint.login.redirect).await?;
    let pkce = Pkce::new();
    let state = flow::random_text(32);
    let redirect = flow::redirect_uri(ctx.endpoint, Some(&listener));
    let url = flow::authorization_url(ctx.endpoint, &redirect, &state, &pkce)
        .ok_or_else(|| LoginError::Local("no authorization_url".into()))?;
    let opened = !ctx.no_browser && open_browser(url.as_str());
    let p = &ctx.endpoint.provider;
    if opened {
        say(&format!(
            "Opening your browser to sign in to {p}. If it does not open, visit:\n\n  {url}\n\n"
        ));
    } else {
        say(&format!(
            "To sign in to {p}, open this URL in a browser on this machine:\n\n  {url}\n\n\
             (The browser returns to {} on this machine; from another machine, forward that \
             port, e.g. ssh -L {port}:127.0.0.1:{port}.)\n",
            redirect,
            port = listener.port()
        ));
    }
    say(&format!(
        "Waiting up to {} for the browser...\n",
        minutes(ctx.timeout)
    ));
    let deadline = tokio::time::Instant::now() + ctx.timeout;
    let callback = listener.wait(&state, deadline).await.map_err(|e| match e {
        LoginError::TimedOut(_) => LoginError::TimedOut(format!(
            "the browser did not come back within {}",
            minutes(ctx.timeout)
        )),
        other => other,
    })?;
    let result = flow::exchange(
        ctx.upstream,
        ctx.endpoint,
        ctx.secret,
        &callback.code,
        &pkce,
        &redirect,
        &state,
        now(),
    )
    .await;
    match &result {
        Ok(_) => {
            callback
                .answer(true, &format!("credproxy is signed in to {p}."))
                .await
        }
        Err(_) => {
            callback
                .answer(
                    false,
                    "The code could not be exchanged for a token; see the terminal.",
                )
                .await
        }
    }
    result
}

async fn paste(ctx: &Ctx<'_>) -> Result<Grant, LoginError> {
    let pkce = Pkce::new();
    let state = flow::random_text(32);
    let redirect = flow::redirect_uri(ctx.endpoint, None);
    let url = flow::authorization_url(ctx.endpoint, &redirect, &state, &pkce)
        .ok_or_else(|| LoginError::Local("no authorization_url".into()))?;
    let p = &ctx.endpoint.provider;
    let opened = !ctx.no_browser && open_browser(url.as_str());
    say(&format!(
        "{} sign in to {p}:\n\n  {url}\n\nAfter you approve, the page shows a code. Paste it \
         here (within {}) and press Enter.\nCode: ",
        if opened {
            "A browser was opened; if it did not open, visit this URL to"
        } else {
            "Open this URL in a browser to"
        },
        minutes(ctx.timeout)
    ));
    // Read on a thread: a blocked terminal read cannot be cancelled, and the process exits
    // past it when the time is up.
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        // Bounded: a pasted `code#state` is a few hundred bytes.
        let mut line = zeroize::Zeroizing::new(String::with_capacity(8192));
        let read = std::io::Read::take(std::io::stdin().lock(), 8191).read_line(&mut line);
        let _ = tx.send(read.map(|_| line));
    });
    let line = match tokio::time::timeout(ctx.timeout, rx).await {
        Err(_) => {
            return Err(LoginError::TimedOut(format!(
                "no code was pasted within {}",
                minutes(ctx.timeout)
            )))
        }
        Ok(Err(_)) => return Err(LoginError::Local("cannot read the terminal".into())),
        Ok(Ok(Err(e))) => return Err(LoginError::Local(format!("cannot read the terminal: {e}"))),
        Ok(Ok(Ok(line))) => line,
    };
    let code = flow::parse_pasted(&line, &state)?;
    drop(line);
    flow::exchange(
        ctx.upstream,
        ctx.endpoint,
        ctx.secret,
        &code,
        &pkce,
        &redirect,
        &state,
        now(),
    )
    .await
}

async fn device(ctx: &Ctx<'_>) -> Result<Grant, LoginError> {
    let device = flow::device_start(ctx.upstream, ctx.endpoint, ctx.secret).await?;
    let p = &ctx.endpoint.provider;
    let mut text = format!(
        "To sign in to {p}, visit\n\n  {}\n\nand enter the code\n\n  {}\n\n",
        device.verification_uri, device.user_code
    );
    if let Some(complete) = &device.verification_uri_complete {
        text.push_str(&format!("(or open {complete} with the code filled in)\n"));
    }
    text.push_str(&format!(
        "Waiting for the sign-in (the code expires in {})...\n",
        minutes(device.expires_in)
    ));
    say(&text);
    if !ctx.no_browser {
        let target = device
            .verification_uri_complete
            .as_ref()
            .unwrap_or(&device.verification_uri);
        open_browser(target.as_str());
    }
    flow::device_poll(ctx.upstream, ctx.endpoint, ctx.secret, &device, &now).await
}

/// Opens `url` in the desktop's browser (`open` on macOS, `xdg-open` elsewhere), when there
/// is a display; false when it was not tried or could not be started. The opener's output
/// is discarded and it is reaped on a thread.
fn open_browser(url: &str) -> bool {
    let opener = if cfg!(target_os = "macos") {
        "open"
    } else {
        let has = |var: &str| std::env::var_os(var).is_some_and(|v| !v.is_empty());
        if !has("DISPLAY") && !has("WAYLAND_DISPLAY") {
            return false;
        }
        "xdg-open"
    };
    match Command::new(opener)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
    {
        Ok(mut child) => {
            std::thread::spawn(move || child.wait());
            true
        }
        Err(_) => false,
    }
}

/// `credproxy logout`.
pub fn logout(args: LogoutArgs) -> Result<u8, Failure> {
    check_name(NameKind::Provider, &args.provider)?;
    check_name(NameKind::Bucket, &args.bucket)?;
    let key = format!("{}:{}", args.provider, args.bucket);
    let loaded = load_profile(args.host.profile.as_deref())?;
    let endpoint = profile_refresh_config(&loaded)
        .endpoints
        .remove(&args.provider);
    let backend =
        open_store(&args.host.store).map_err(|f| Failure::with_code(f.message, exit::INTERNAL))?;
    let Some(token) = backend
        .get_token(&args.provider, &args.bucket)
        .map_err(store_failed)?
    else {
        return Err(Failure::with_code(
            format!("no token stored for {key}"),
            exit::NOT_FOUND,
        ));
    };
    // What to revoke: the refresh token (revoking it ends the grant), else the access
    // token. Taken before the removal; the token itself is dropped (and wiped) here.
    let revocable = match token.refresh_token() {
        Some(rt) => Some((Secret::from(rt), "refresh_token")),
        None => token
            .fields()
            .get("access_token")
            .and_then(serde_json::Value::as_str)
            .map(|at| (Secret::from(at), "access_token")),
    };
    drop(token);
    if !backend
        .remove_token(&args.provider, &args.bucket)
        .map_err(store_failed)?
    {
        return Err(Failure::with_code(
            format!("no token stored for {key} (it was removed meanwhile)"),
            exit::NOT_FOUND,
        ));
    }
    let revocation = match (&endpoint, revocable) {
        (Some(e), Some((token, hint))) if e.login.revocation_url.is_some() => {
            let secret = match client_secret(e, &*backend) {
                Ok(secret) => secret,
                Err(f) => {
                    say(&format!(
                        "credproxy: warning: {key} was removed, but not revoked at the provider: \
                         {}\n",
                        f.message
                    ));
                    None
                }
            };
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| Failure::new(format!("cannot start the runtime: {e}")))?;
            Some(runtime.block_on(async {
                let upstream = Upstream::new().map_err(|e| LoginError::Local(e.to_string()))?;
                flow::revoke(&upstream, e, secret.as_ref(), &token, hint).await
            }))
        }
        _ => None,
    };
    let line = match revocation {
        Some(Ok(_)) => format!("logged out: {key} removed and revoked at the provider\n"),
        Some(Err(e)) => {
            say(&format!(
                "credproxy: warning: {key} was removed from the store, but revoking it at the \
                 provider failed: {e}; it stays valid there until it expires or you revoke it in \
                 the provider's account settings\n"
            ));
            format!("logged out: {key} removed (not revoked)\n")
        }
        None => format!(
            "logged out: {key} removed (no revocation endpoint is known for {}: it stays valid \
             at the provider until it expires)\n",
            args.provider
        ),
    };
    let mut out = std::io::stdout().lock();
    out.write_all(line.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|e| Failure::with_code(format!("cannot write the output: {e}"), exit::OUTPUT))?;
    Ok(0)
}
