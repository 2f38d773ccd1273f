//! Getting a first token on the host (`credproxy login`) and revoking one (`credproxy
//! logout`): the wire side of three flows, each with PKCE S256 (RFC 7636) and a `state`
//! checked on return.
//!
//! - **Loopback redirect** (RFC 8252 §7.3): [`Listener`] listens on the loopback
//!   interface, the browser is sent to [`authorization_url`], and the authorization server
//!   sends it back to the listener with `code` and `state`. A callback whose `state` does
//!   not match ends the login at once ([`LoginError::StateMismatch`]).
//! - **Paste the code**: the authorization server's own page shows `code#state`;
//!   [`parse_pasted`] reads what the person pasted.
//! - **Device authorization** (RFC 8628): [`device_start`] asks for a user code,
//!   [`device_poll`] polls the token endpoint at the server's interval (`slow_down` adds
//!   5 s) until the sign-in is approved, denied or expired.
//!
//! [`exchange`] trades a code for tokens; [`revoke`] revokes one (RFC 7009). Every request
//! goes through [`Upstream::post_once`] (no redirects, the body cap, plain http only on
//! loopback). Codes, verifiers, device codes, tokens and client secrets are held in
//! [`Secret`]s or wiped buffers; errors carry the status and a plain OAuth error code,
//! never a response body or a secret.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use base64::Engine as _;
use rand::RngCore;
use reqwest::Url;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use zeroize::Zeroizing;

use super::grant::{classify, content_type, error_code, params_body, Grant, Verdict};
use super::http::{Posted, Upstream};
use super::provider::{Endpoint, Redirect};
use crate::secret::Secret;

/// How long a login waits for the browser (or a pasted code) by default: five minutes.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// The most a callback request's head may take, in bytes.
const MAX_REQUEST_HEAD: usize = 16 * 1024;

/// How long one connection to the listener may take to send its request.
const REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// What `slow_down` adds to the device flow's poll interval (RFC 8628 §3.5).
pub const SLOW_DOWN_STEP: Duration = Duration::from_secs(5);

/// The device flow's interval when the server names none (RFC 8628 §3.2).
const DEFAULT_INTERVAL: u64 = 5;

/// How long a device code lives when the server does not say (its `expires_in` is
/// required, so this is only a bound).
const DEFAULT_DEVICE_EXPIRY: u64 = 900;

/// Transport failures or server errors in a row tolerated while polling.
const POLL_FAILURES_TOLERATED: u32 = 3;

/// Why a login or a revocation did not complete. The text is for the person at the
/// terminal: what happened and what to do, never a secret or a response body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoginError {
    /// A callback came back with another `state` than this login's.
    #[error("the browser came back with a state that does not belong to this login (a stale tab from an earlier login, or a request forged by another page); nothing was stored; run the login again")]
    StateMismatch,
    /// The person, or the authorization server, declined.
    #[error("the sign-in was refused{0}; nothing was stored")]
    Denied(String),
    /// Nothing came back in time.
    #[error("{0}; nothing was stored")]
    TimedOut(String),
    /// The device code expired before the sign-in was approved.
    #[error(
        "the code expired before the sign-in was approved; nothing was stored; run the login again"
    )]
    Expired,
    /// The token endpoint refused the request for good.
    #[error("{0}; nothing was stored")]
    Refused(String),
    /// The server could not be reached or failed; worth trying again later.
    #[error("{0}; nothing was stored; try again later")]
    Unreachable(String),
    /// Our side failed (the listener could not be bound, the terminal could not be read).
    #[error("{0}")]
    Local(String),
}

/// A PKCE pair (RFC 7636): the verifier stays here, the challenge goes in the URL.
pub struct Pkce {
    /// The verifier: 32 random bytes, base64url (43 characters).
    pub verifier: Secret,
    /// `BASE64URL(SHA256(verifier))`.
    pub challenge: String,
}

impl std::fmt::Debug for Pkce {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pkce")
            .field("challenge", &self.challenge)
            .finish_non_exhaustive()
    }
}

impl Pkce {
    /// A new random pair.
    pub fn new() -> Pkce {
        let verifier = Secret::new(random_text(32));
        let challenge = challenge_of(verifier.expose());
        Pkce {
            verifier,
            challenge,
        }
    }
}

impl Default for Pkce {
    fn default() -> Self {
        Pkce::new()
    }
}

/// The S256 challenge of `verifier`.
pub fn challenge_of(verifier: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, verifier.as_bytes());
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest.as_ref())
}

/// `bytes` random bytes from the OS, base64url without padding (a state, a verifier).
pub fn random_text(bytes: usize) -> String {
    let mut raw = Zeroizing::new(vec![0u8; bytes]);
    rand::rngs::OsRng.fill_bytes(&mut raw);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&*raw)
}

/// The redirect URI of a login: the listener's (with its actual port) or the paste page.
pub fn redirect_uri(endpoint: &Endpoint, listener: Option<&Listener>) -> String {
    match (&endpoint.login.redirect, listener) {
        (_, Some(l)) => l.redirect_uri.clone(),
        (Redirect::Paste(url), None) => url.to_string(),
        (Redirect::Loopback { host, port, path }, None) => format!("http://{host}:{port}{path}"),
    }
}

/// The URL the browser is sent to: the authorization endpoint with `response_type=code`,
/// the client, the redirect, the scopes, the PKCE challenge (S256), the state and the
/// preset's extra parameters.
pub fn authorization_url(
    endpoint: &Endpoint,
    redirect_uri: &str,
    state: &str,
    pkce: &Pkce,
) -> Option<Url> {
    let login = &endpoint.login;
    let mut url = login.authorization_url.clone()?;
    {
        let mut q = url.query_pairs_mut();
        for (k, v) in &login.extra_params {
            q.append_pair(k, v);
        }
        q.append_pair("response_type", "code")
            .append_pair("client_id", &endpoint.client_id)
            .append_pair("redirect_uri", redirect_uri);
        if !login.scopes.is_empty() {
            q.append_pair("scope", &login.scopes.join(" "));
        }
        q.append_pair("code_challenge", &pkce.challenge)
            .append_pair("code_challenge_method", "S256")
            .append_pair("state", state);
    }
    Some(url)
}

/// Trades `code` for tokens at the token endpoint (RFC 6749 §4.1.3 with the PKCE
/// verifier), read as received at `now` (epoch seconds).
#[allow(clippy::too_many_arguments)]
pub async fn exchange(
    upstream: &Upstream,
    endpoint: &Endpoint,
    client_secret: Option<&Secret>,
    code: &Secret,
    pkce: &Pkce,
    redirect_uri: &str,
    state: &str,
    now: u64,
) -> Result<Grant, LoginError> {
    let mut params: Vec<(&str, &str)> = vec![
        ("grant_type", "authorization_code"),
        ("code", code.expose()),
        ("redirect_uri", redirect_uri),
        ("client_id", &endpoint.client_id),
        ("code_verifier", pkce.verifier.expose()),
    ];
    if endpoint.login.state_in_exchange {
        params.push(("state", state));
    }
    if let Some(secret) = client_secret {
        params.push(("client_secret", secret.expose()));
    }
    let posted = post(upstream, endpoint, &endpoint.token_url, &params).await?;
    token_answer(&posted, now, "exchanging the code")
}

/// A token endpoint's answer to a code exchange or a device poll that is not pending.
fn token_answer(posted: &Posted, now: u64, what: &str) -> Result<Grant, LoginError> {
    if (200..300).contains(&posted.status) {
        return Grant::parse(&posted.body, now).map_err(|e| {
            LoginError::Refused(format!("the token endpoint's answer was unusable: {e}"))
        });
    }
    let code = error_code(&posted.body);
    Err(refusal(posted.status, code.as_deref(), what))
}

/// A failed answer in words, classified like a refresh's (status and error code only).
fn refusal(status: u16, code: Option<&str>, what: &str) -> LoginError {
    let detail = format!(
        "HTTP {status}{}",
        code.map(|c| format!(", {c}")).unwrap_or_default()
    );
    match classify(status, code) {
        Verdict::AuthFailure => LoginError::Refused(format!(
            "the token endpoint refused {what} ({detail}): the code may have expired or been \
             used already, or the client is not accepted"
        )),
        Verdict::Rejected => {
            LoginError::Refused(format!("the token endpoint refused {what} ({detail})"))
        }
        Verdict::Transient => {
            LoginError::Unreachable(format!("the token endpoint failed {what} ({detail})"))
        }
    }
}

/// One POST of `params` in the endpoint's login body format.
async fn post(
    upstream: &Upstream,
    endpoint: &Endpoint,
    url: &Url,
    params: &[(&str, &str)],
) -> Result<Posted, LoginError> {
    let format = endpoint.login.exchange_body;
    let body = params_body(format, params);
    upstream
        .post_once(url, content_type(format), body)
        .await
        .map_err(|why| {
            LoginError::Unreachable(format!(
                "the authorization server at {} could not be reached: {why}",
                host_of(url)
            ))
        })
}

/// `scheme://host[:port]` of `url`, for messages (never its path or query).
pub fn host_of(url: &Url) -> String {
    let mut text = format!("{}://{}", url.scheme(), url.host_str().unwrap_or(""));
    if let Some(port) = url.port() {
        text.push_str(&format!(":{port}"));
    }
    text
}

/// Reads what the person pasted from the provider's page: `code#state` (as Anthropic's
/// page shows it), or the whole redirect URL with `code` and `state` in its query. The
/// state must be this login's.
pub fn parse_pasted(input: &str, state: &str) -> Result<Secret, LoginError> {
    let input = input.trim();
    if input.is_empty() {
        return Err(LoginError::Denied(": no code was entered".into()));
    }
    let (code, got_state) = if input.starts_with("https://") || input.starts_with("http://") {
        let url = Url::parse(input).map_err(|_| {
            LoginError::Refused("what was pasted is not the code nor a valid URL".into())
        })?;
        let mut code = None;
        let mut got = None;
        for (k, v) in url.query_pairs() {
            match &*k {
                "code" => code = Some(Zeroizing::new(v.into_owned())),
                "state" => got = Some(v.into_owned()),
                _ => {}
            }
        }
        match code {
            Some(c) => (c, got),
            None => {
                return Err(LoginError::Refused(
                    "the pasted URL has no code in it".into(),
                ))
            }
        }
    } else {
        match input.split_once('#') {
            Some((c, s)) => (Zeroizing::new(c.to_owned()), Some(s.to_owned())),
            None => {
                return Err(LoginError::Refused(
                    "what was pasted is not CODE#STATE as the page shows it; copy the whole \
                     code with its #-part"
                        .into(),
                ))
            }
        }
    };
    if got_state.as_deref() != Some(state) {
        return Err(LoginError::StateMismatch);
    }
    if code.is_empty() || code.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(LoginError::Refused("the pasted code is malformed".into()));
    }
    Ok(Secret::from(code.as_str()))
}

// ---------------------------------------------------------------------------------------
// Loopback listener
// ---------------------------------------------------------------------------------------

/// The loopback listener of one login: bound before the browser is opened, so the
/// redirect URI names the actual port.
#[derive(Debug)]
pub struct Listener {
    sockets: Vec<TcpListener>,
    path: String,
    /// `http://HOST:PORT/PATH` as sent in the authorization request.
    pub redirect_uri: String,
}

/// A callback that carried this login's state and a code: answer the browser with
/// [`Callback::answer`] once the code is exchanged.
pub struct Callback {
    /// The authorization code.
    pub code: Secret,
    stream: TcpStream,
}

impl std::fmt::Debug for Callback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Callback { .. }")
    }
}

impl Callback {
    /// Answers the browser with a short page saying how the login ended.
    pub async fn answer(mut self, ok: bool, message: &str) {
        let title = if ok { "Signed in" } else { "Sign-in failed" };
        respond(
            &mut self.stream,
            if ok { 200 } else { 400 },
            &page(title, message),
        )
        .await;
    }
}

impl Listener {
    /// Listens for `redirect` (host, port and path; port 0: an ephemeral one) on the
    /// loopback interface. `localhost` is served on 127.0.0.1 and, when it can be bound
    /// with the same port, on `[::1]`, since a browser may resolve it to either.
    pub async fn bind(redirect: &Redirect) -> Result<Listener, LoginError> {
        let Redirect::Loopback { host, port, path } = redirect else {
            return Err(LoginError::Local(
                "this provider's redirect is not a loopback listener".into(),
            ));
        };
        let v6 = host.starts_with('[');
        let first: SocketAddr = if v6 {
            (Ipv6Addr::LOCALHOST, *port).into()
        } else if host == "localhost" {
            (Ipv4Addr::LOCALHOST, *port).into()
        } else {
            let ip: Ipv4Addr = host
                .parse()
                .map_err(|_| LoginError::Local(format!("cannot listen on {host}")))?;
            (ip, *port).into()
        };
        let socket = TcpListener::bind(first).await.map_err(|e| {
            LoginError::Local(if *port != 0 && e.kind() == std::io::ErrorKind::AddrInUse {
                format!(
                    "cannot listen on {host}:{port} for the browser's return: the port is in use \
                     (another login, or the provider's own CLI logging in?); close it and try \
                     again"
                )
            } else {
                format!("cannot listen on {host}:{port} for the browser's return: {e}")
            })
        })?;
        let actual = socket
            .local_addr()
            .map_err(|e| LoginError::Local(format!("cannot read the listener's port: {e}")))?
            .port();
        let mut sockets = vec![socket];
        if host == "localhost" {
            // A browser may try [::1] first: if another local user holds that port there,
            // they would receive our code and state. Only a host without IPv6 may skip it.
            match TcpListener::bind((Ipv6Addr::LOCALHOST, actual)).await {
                Ok(extra) => sockets.push(extra),
                Err(e) if e.raw_os_error().is_some_and(no_ipv6) => {}
                Err(e) => {
                    return Err(LoginError::Local(format!(
                        "cannot listen on [::1]:{actual} for the browser's return ({e}); \
                         another program may hold that port: close it and try again"
                    )))
                }
            }
        }
        Ok(Listener {
            sockets,
            path: path.clone(),
            redirect_uri: format!("http://{host}:{actual}{path}"),
        })
    }

    /// The port the listener got.
    pub fn port(&self) -> u16 {
        self.sockets
            .first()
            .and_then(|s| s.local_addr().ok())
            .map_or(0, |a| a.port())
    }

    /// Waits until `deadline` for the callback of the login whose state is `state`.
    /// Requests for other paths (a favicon) get a 404 and are otherwise ignored. A callback
    /// with another state, or with an `error`, is answered with a page and ends the wait
    /// with an error; one with the state and a code is returned unanswered.
    pub async fn wait(&self, state: &str, deadline: Instant) -> Result<Callback, LoginError> {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<(TcpStream, Request)>(8);
        let acceptors = futures_util::future::join_all(
            self.sockets
                .iter()
                .map(|socket| accept_loop(socket, tx.clone())),
        );
        tokio::pin!(acceptors);
        loop {
            let (mut stream, request) = tokio::select! {
                _ = &mut acceptors => unreachable!("the accept loops never end"),
                got = rx.recv() => match got {
                    Some(got) => got,
                    None => continue,
                },
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(LoginError::TimedOut(
                        "the browser did not come back in time".into(),
                    ));
                }
            };
            if request.path != self.path {
                respond(&mut stream, 404, &page("Not found", "Nothing here.")).await;
                continue;
            }
            if request.state.as_deref() != Some(state) {
                respond(
                    &mut stream,
                    400,
                    &page(
                        "Sign-in refused",
                        "This sign-in does not belong to the login that is waiting (a stale tab \
                         from an earlier login?). Nothing was stored. Run the login again.",
                    ),
                )
                .await;
                return Err(LoginError::StateMismatch);
            }
            if let Some(error) = request.error {
                let code = error.map(|c| format!(" ({c})")).unwrap_or_default();
                respond(
                    &mut stream,
                    400,
                    &page(
                        "Sign-in refused",
                        &format!(
                            "The authorization server refused the sign-in{code}. Nothing was \
                             stored. You can close this tab."
                        ),
                    ),
                )
                .await;
                return Err(LoginError::Denied(format!(
                    " by the authorization server{code}"
                )));
            }
            match request.code {
                Some(code) => return Ok(Callback { code, stream }),
                None => {
                    respond(
                        &mut stream,
                        400,
                        &page("Sign-in failed", "The callback carried no code."),
                    )
                    .await;
                    return Err(LoginError::Refused(
                        "the browser came back without a code".into(),
                    ));
                }
            }
        }
    }
}

/// Accepts connections on `socket` for ever, each read on its own task (a browser's idle
/// preconnect must not hold up the real request) and handed to `tx` once its request head
/// is in.
async fn accept_loop(socket: &TcpListener, tx: tokio::sync::mpsc::Sender<(TcpStream, Request)>) {
    loop {
        let Ok((mut stream, _)) = socket.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let tx = tx.clone();
        tokio::spawn(async move {
            if let Ok(Some(request)) =
                tokio::time::timeout(REQUEST_READ_TIMEOUT, read_request(&mut stream)).await
            {
                let _ = tx.send((stream, request)).await;
            }
        });
    }
}

/// What a callback request carried.
struct Request {
    path: String,
    state: Option<String>,
    code: Option<Secret>,
    /// `Some` when an `error` parameter was present: its value when it is a plain code.
    error: Option<Option<String>>,
}

/// Reads one request head (at most [`MAX_REQUEST_HEAD`] bytes); `None` for anything but a
/// `GET` with a target.
async fn read_request(stream: &mut TcpStream) -> Option<Request> {
    let mut head = Zeroizing::new(Vec::with_capacity(MAX_REQUEST_HEAD));
    let mut chunk = Zeroizing::new([0u8; 2048]);
    loop {
        let n = stream.read(&mut chunk[..]).await.ok()?;
        if n == 0 {
            return None;
        }
        if head.len() + n > MAX_REQUEST_HEAD {
            respond(stream, 431, &page("Too large", "Request too large.")).await;
            return None;
        }
        head.extend_from_slice(&chunk[..n]);
        if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
            break;
        }
    }
    let line_end = head.iter().position(|&b| b == b'\n')?;
    let line = std::str::from_utf8(&head[..line_end]).ok()?.trim_end();
    let mut parts = line.split(' ');
    let (method, target) = (parts.next()?, parts.next()?);
    if method != "GET" {
        respond(stream, 405, &page("Not allowed", "Only GET is served.")).await;
        return None;
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut request = Request {
        path: path.to_owned(),
        state: None,
        code: None,
        error: None,
    };
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        match &*k {
            "state" => request.state = Some(v.into_owned()),
            "code" => request.code = Some(Secret::from(&*v)).filter(|c| !c.is_empty()),
            "error" => request.error = Some(plain_code(&v)),
            _ => {}
        }
    }
    Some(request)
}

/// `code` when it is a plain OAuth error code (as [`error_code`] keeps them).
fn plain_code(code: &str) -> Option<String> {
    let plain = !code.is_empty()
        && code.len() <= 64
        && code
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b));
    plain.then(|| code.to_owned())
}

fn page(title: &str, message: &str) -> String {
    format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>credproxy: {title}</title>\
         </head><body style=\"font-family:sans-serif;margin:3em\"><h1>{title}</h1><p>{message}\
         </p><p>You can close this tab and return to the terminal.</p></body></html>"
    )
}

async fn respond(stream: &mut TcpStream, status: u16, body: &str) {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Request Header Fields Too Large",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/html; charset=utf-8\r\n\
         Content-Length: {}\r\nCache-Control: no-store\r\nReferrer-Policy: no-referrer\r\n\
         Connection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(body.as_bytes()).await;
    let _ = stream.flush().await;
    let _ = stream.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Device authorization (RFC 8628)
// ---------------------------------------------------------------------------------------

/// A device authorization: what to show, and the device code to poll with.
pub struct DeviceAuthorization {
    device_code: Secret,
    /// The code the person types at the verification page.
    pub user_code: String,
    /// Where to type it.
    pub verification_uri: Url,
    /// The verification page with the code filled in, when the server gives one.
    pub verification_uri_complete: Option<Url>,
    /// How long the codes live.
    pub expires_in: Duration,
    /// The poll interval.
    pub interval: Duration,
}

impl std::fmt::Debug for DeviceAuthorization {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceAuthorization")
            .field("user_code", &self.user_code)
            .field("verification_uri", &self.verification_uri.as_str())
            .finish_non_exhaustive()
    }
}

/// Asks the device authorization endpoint for a device code and a user code (RFC 8628
/// §3.1-3.2). What the server sends to show is checked: a URL that parses (https, or http
/// on loopback) and a user code of printable ASCII, so nothing can reach the terminal as
/// control characters.
pub async fn device_start(
    upstream: &Upstream,
    endpoint: &Endpoint,
    client_secret: Option<&Secret>,
) -> Result<DeviceAuthorization, LoginError> {
    let Some(url) = &endpoint.login.device_authorization_url else {
        return Err(LoginError::Local(
            "no device authorization endpoint is configured".into(),
        ));
    };
    let scope = endpoint.login.scopes.join(" ");
    let mut params: Vec<(&str, &str)> = vec![("client_id", &endpoint.client_id)];
    if !scope.is_empty() {
        params.push(("scope", &scope));
    }
    if let Some(secret) = client_secret {
        params.push(("client_secret", secret.expose()));
    }
    let posted = post(upstream, endpoint, url, &params).await?;
    if !(200..300).contains(&posted.status) {
        let code = error_code(&posted.body);
        return Err(refusal(
            posted.status,
            code.as_deref(),
            "the device authorization request",
        ));
    }
    let bad = |what: &str| {
        LoginError::Refused(format!(
            "the device authorization endpoint's answer was unusable: {what}"
        ))
    };
    let mut value: serde_json::Value =
        crate::secret_json::parse(&posted.body).map_err(|_| bad("not JSON"))?;
    let result = (|| {
        let text = |key: &str| value.get(key).and_then(serde_json::Value::as_str);
        let device_code = text("device_code")
            .filter(|c| !c.is_empty())
            .ok_or_else(|| bad("no device_code"))?;
        let user_code = text("user_code")
            .filter(|c| !c.is_empty() && c.len() <= 64 && c.bytes().all(|b| b.is_ascii_graphic()))
            .ok_or_else(|| bad("no usable user_code"))?;
        // Google names it verification_url.
        let shown = |key: &str| {
            text(key).map(|u| {
                super::provider::parse_url("verification_uri", u)
                    .map_err(|_| bad("the verification URI is not an https:// URL"))
            })
        };
        let verification_uri = shown("verification_uri")
            .or_else(|| shown("verification_url"))
            .ok_or_else(|| bad("no verification_uri"))??;
        let verification_uri_complete = shown("verification_uri_complete").transpose()?;
        let number = |key: &str| value.get(key).and_then(serde_json::Value::as_u64);
        let expires_in = number("expires_in")
            .unwrap_or(DEFAULT_DEVICE_EXPIRY)
            .clamp(1, 3600);
        let interval = number("interval").unwrap_or(DEFAULT_INTERVAL).clamp(1, 60);
        Ok(DeviceAuthorization {
            device_code: Secret::from(device_code),
            user_code: user_code.to_owned(),
            verification_uri,
            verification_uri_complete,
            expires_in: Duration::from_secs(expires_in),
            interval: Duration::from_secs(interval),
        })
    })();
    crate::secret::wipe_json(&mut value);
    result
}

/// Polls the token endpoint with the device code (RFC 8628 §3.4-3.5) until the sign-in is
/// approved (the tokens, read as received at `now()`), denied, or expired.
/// `authorization_pending` waits one interval more, `slow_down` adds
/// [`SLOW_DOWN_STEP`] to the interval for good. A few transport failures or server errors
/// in a row are waited out like a pending answer.
pub async fn device_poll(
    upstream: &Upstream,
    endpoint: &Endpoint,
    client_secret: Option<&Secret>,
    device: &DeviceAuthorization,
    now: &(dyn Fn() -> u64 + Sync),
) -> Result<Grant, LoginError> {
    let deadline = Instant::now() + device.expires_in;
    let mut interval = device.interval;
    let mut failures = 0;
    loop {
        if Instant::now() + interval >= deadline {
            return Err(LoginError::Expired);
        }
        tokio::time::sleep(interval).await;
        let mut params: Vec<(&str, &str)> = vec![
            ("grant_type", "urn:ietf:params:oauth:grant-type:device_code"),
            ("device_code", device.device_code.expose()),
            ("client_id", &endpoint.client_id),
        ];
        if let Some(secret) = client_secret {
            params.push(("client_secret", secret.expose()));
        }
        let posted = match post(upstream, endpoint, &endpoint.token_url, &params).await {
            Ok(posted) => posted,
            Err(e) => {
                failures += 1;
                if failures >= POLL_FAILURES_TOLERATED {
                    return Err(e);
                }
                continue;
            }
        };
        let code = error_code(&posted.body);
        // Some servers answer "pending" with a 2xx and an `error` member.
        if (200..300).contains(&posted.status) && code.is_none() {
            return token_answer(&posted, now(), "the device code");
        }
        match code.as_deref() {
            Some("authorization_pending") => failures = 0,
            Some("slow_down") => {
                failures = 0;
                interval += SLOW_DOWN_STEP;
            }
            Some("access_denied") => {
                return Err(LoginError::Denied(" at the verification page".into()))
            }
            Some("expired_token") => return Err(LoginError::Expired),
            other => match refusal(posted.status, other, "the device code") {
                LoginError::Unreachable(why) => {
                    failures += 1;
                    if failures >= POLL_FAILURES_TOLERATED {
                        return Err(LoginError::Unreachable(why));
                    }
                }
                e => return Err(e),
            },
        }
    }
}

// ---------------------------------------------------------------------------------------
// Revocation (RFC 7009)
// ---------------------------------------------------------------------------------------

/// Revokes `token` (a refresh token when `hint` says so) at the endpoint's revocation URL,
/// always form-encoded as RFC 7009 §2.1 has it. `Ok(false)` when no revocation endpoint is
/// configured.
pub async fn revoke(
    upstream: &Upstream,
    endpoint: &Endpoint,
    client_secret: Option<&Secret>,
    token: &Secret,
    hint: &str,
) -> Result<bool, LoginError> {
    let Some(url) = &endpoint.login.revocation_url else {
        return Ok(false);
    };
    let mut params: Vec<(&str, &str)> = vec![
        ("token", token.expose()),
        ("token_type_hint", hint),
        ("client_id", &endpoint.client_id),
    ];
    if let Some(secret) = client_secret {
        params.push(("client_secret", secret.expose()));
    }
    let format = super::BodyFormat::Form;
    let posted = upstream
        .post_once(url, content_type(format), params_body(format, &params))
        .await
        .map_err(|why| {
            LoginError::Unreachable(format!(
                "the revocation endpoint at {} could not be reached: {why}",
                host_of(url)
            ))
        })?;
    if (200..300).contains(&posted.status) {
        return Ok(true);
    }
    let code = error_code(&posted.body);
    Err(LoginError::Refused(format!(
        "the revocation endpoint refused (HTTP {}{})",
        posted.status,
        code.map(|c| format!(", {c}")).unwrap_or_default()
    )))
}

/// True for the errors of a host without IPv6 loopback.
fn no_ipv6(code: i32) -> bool {
    code == nix::errno::Errno::EAFNOSUPPORT as i32
        || code == nix::errno::Errno::EADDRNOTAVAIL as i32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oauth::provider::preset;

    #[test]
    fn pkce_matches_rfc_7636_appendix_b() {
        assert_eq!(
            challenge_of("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
        let p = Pkce::new();
        assert_eq!(p.verifier.expose().len(), 43);
        assert_eq!(p.challenge, challenge_of(p.verifier.expose()));
        assert!(!format!("{p:?}").contains(p.verifier.expose()));
        assert_ne!(random_text(32), random_text(32));
    }

    #[test]
    fn the_authorization_url_carries_every_parameter() {
        let e = preset("anthropic").expect("anthropic");
        let pkce = Pkce::new();
        let redirect = redirect_uri(&e, None);
        assert_eq!(
            redirect,
            "https://console.anthropic.com/oauth/code/callback"
        );
        let url = authorization_url(&e, &redirect, "st-1", &pkce).expect("url");
        let q: std::collections::HashMap<String, String> = url.query_pairs().into_owned().collect();
        assert_eq!(url.host_str(), Some("claude.ai"));
        assert_eq!(q["response_type"], "code");
        assert_eq!(q["client_id"], e.client_id);
        assert_eq!(q["redirect_uri"], redirect);
        assert_eq!(q["scope"], "org:create_api_key user:profile user:inference");
        assert_eq!(q["code_challenge"], pkce.challenge);
        assert_eq!(q["code_challenge_method"], "S256");
        assert_eq!(q["state"], "st-1");
        assert_eq!(q["code"], "true");
        assert!(!url.as_str().contains(pkce.verifier.expose()));
    }

    #[test]
    fn pasted_codes() {
        assert_eq!(
            parse_pasted(" abc#st \n", "st").expect("ok").expose(),
            "abc"
        );
        assert_eq!(
            parse_pasted("https://x.example/cb?code=abc&state=st", "st")
                .expect("ok")
                .expose(),
            "abc"
        );
        assert_eq!(
            parse_pasted("abc#other", "st").expect_err("stale"),
            LoginError::StateMismatch
        );
        assert!(matches!(
            parse_pasted("abc", "st"),
            Err(LoginError::Refused(_))
        ));
        assert!(matches!(
            parse_pasted("  ", "st"),
            Err(LoginError::Denied(_))
        ));
        assert!(matches!(
            parse_pasted("a b#st", "st"),
            Err(LoginError::Refused(_))
        ));
    }

    #[test]
    fn refusals_are_classified_without_bodies() {
        assert!(matches!(
            refusal(400, Some("invalid_grant"), "x"),
            LoginError::Refused(m) if m.contains("invalid_grant")
        ));
        assert!(matches!(
            refusal(503, None, "x"),
            LoginError::Unreachable(_)
        ));
        assert!(matches!(refusal(403, None, "x"), LoginError::Refused(_)));
    }
}
