//! A real OAuth authorization server for the login tests: HTTP/1.1 on 127.0.0.1 (threads,
//! `Connection: close`).
//!
//! - `GET /authorize`: checks `response_type=code`, the client id, the redirect URI (the
//!   registered one, or any `http://127.0.0.1:PORT` with the registered path for a
//!   loopback client), `code_challenge_method=S256` with a challenge, and a state; then
//!   answers `302` to the redirect with `code` and `state` (loopback), or a page showing
//!   `code#state` (paste mode), or a `302` with `error=access_denied` when told to deny.
//! - `POST /token`: `authorization_code` (the code once, the same client and redirect URI,
//!   and the PKCE verifier whose S256 is the challenge) and `refresh_token` (rotating: the
//!   last issued refresh token only), both answering tokens with a refresh token; the
//!   device code grant answers from a script ([`DeviceStep`]).
//! - `POST /device`: a device authorization (RFC 8628) with the configured interval.
//! - `POST /revoke`: records the token and answers the configured status.
//!
//! Every token and code it issues contains `CANARY`, so a test can check that no output
//! carries one.

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};

use super::token_endpoint::{read_request, write_reply, Received, Reply};

/// What a device poll is answered, in order; once the script is used up, pending.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceStep {
    Pending,
    SlowDown,
    Approve,
    Deny,
    Expire,
}

/// How `/authorize` answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthorizeMode {
    /// 302 to the redirect URI with `code` and `state`.
    Redirect,
    /// A page showing `code#state` (Anthropic's console callback page).
    Paste,
    /// 302 to the redirect URI with `error=access_denied` and `state`.
    Deny,
}

struct Pending {
    challenge: String,
    redirect_uri: String,
    client_id: String,
    used: bool,
}

pub struct Config {
    pub client_id: String,
    /// The registered redirect URI; for a loopback client, `http://127.0.0.1/PATH`
    /// matches any port.
    pub redirect_uri: String,
    pub mode: AuthorizeMode,
    /// Lifetime of the access tokens issued.
    pub expires_in: u64,
    /// An id token to send with the first tokens (codex's account id).
    pub id_token: Option<String>,
    /// The device flow's `interval` and `expires_in`.
    pub device_interval: u64,
    pub device_expires_in: u64,
    /// What `/revoke` answers.
    pub revoke_status: u16,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            client_id: "cli-test".into(),
            redirect_uri: "http://127.0.0.1/callback".into(),
            mode: AuthorizeMode::Redirect,
            expires_in: 8 * 3600,
            id_token: None,
            device_interval: 1,
            device_expires_in: 60,
            revoke_status: 200,
        }
    }
}

#[derive(Default)]
struct State {
    codes: HashMap<String, Pending>,
    issued: u64,
    current_refresh: Option<String>,
    device: VecDeque<DeviceStep>,
    polls: Vec<Instant>,
    revoked: Vec<(String, String)>,
    received: Vec<Received>,
    authorize_errors: Vec<String>,
}

/// A running authorization server; stopped when dropped.
pub struct AuthServer {
    addr: SocketAddr,
    config: Arc<Mutex<Config>>,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl AuthServer {
    pub fn start(config: Config) -> AuthServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        let addr = listener.local_addr().expect("addr");
        let config = Arc::new(Mutex::new(config));
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let accept = {
            let (config, state, stop) = (config.clone(), state.clone(), stop.clone());
            thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let (config, state) = (config.clone(), state.clone());
                    thread::spawn(move || serve(conn, addr, &config, &state));
                }
            })
        };
        AuthServer {
            addr,
            config,
            state,
            stop,
            accept: Some(accept),
        }
    }

    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A `[provider.NAME]` table naming every endpoint of this server.
    pub fn provider_table(&self, name: &str) -> String {
        let b = self.base();
        let c = self.config.lock().unwrap();
        format!(
            "[provider.{name}]\ntoken_url = \"{b}/token\"\nauthorization_url = \"{b}/authorize\"\n\
             device_authorization_url = \"{b}/device\"\nrevocation_url = \"{b}/revoke\"\n\
             client_id = \"{}\"\nscopes = [\"openid\", \"offline_access\"]\n",
            c.client_id
        )
    }

    pub fn script_device(&self, steps: &[DeviceStep]) {
        self.state
            .lock()
            .unwrap()
            .device
            .extend(steps.iter().copied());
    }

    pub fn set_mode(&self, mode: AuthorizeMode) {
        self.config.lock().unwrap().mode = mode;
    }

    pub fn set_revoke_status(&self, status: u16) {
        self.config.lock().unwrap().revoke_status = status;
    }

    /// The instants of the device polls.
    pub fn polls(&self) -> Vec<Instant> {
        self.state.lock().unwrap().polls.clone()
    }

    /// `(token, token_type_hint)` of every revocation.
    pub fn revoked(&self) -> Vec<(String, String)> {
        self.state.lock().unwrap().revoked.clone()
    }

    /// Every POST received.
    pub fn received(&self) -> Vec<Received> {
        self.state.lock().unwrap().received.clone()
    }

    /// Why `/authorize` refused requests, if it did.
    pub fn authorize_errors(&self) -> Vec<String> {
        self.state.lock().unwrap().authorize_errors.clone()
    }
}

impl Drop for AuthServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

fn s256(verifier: &str) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, verifier.as_bytes());
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(d.as_ref())
}

/// A JWT (unsigned) with `claims`.
pub fn jwt(claims: Value) -> String {
    let enc = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    format!("{}.{}.sig", enc(&json!({"alg": "none"})), enc(&claims))
}

fn serve(conn: TcpStream, addr: SocketAddr, config: &Mutex<Config>, state: &Mutex<State>) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
    let Some(request) = read_request(&conn) else {
        return;
    };
    let (path, query) = request
        .path
        .split_once('?')
        .map(|(p, q)| (p.to_owned(), q.to_owned()))
        .unwrap_or((request.path.clone(), String::new()));
    let reply = match (request.method.as_str(), path.as_str()) {
        ("GET", "/authorize") => authorize(&query, config, state),
        ("POST", _) => {
            state.lock().unwrap().received.push(request.clone());
            match path.as_str() {
                "/token" => token(&request, config, state),
                "/device" => Reply::json(
                    200,
                    json!({
                        "device_code": "dc-CANARY-device",
                        "user_code": "WDJB-MJHT",
                        "verification_uri": format!("http://{addr}/activate"),
                        "expires_in": config.lock().unwrap().device_expires_in,
                        "interval": config.lock().unwrap().device_interval,
                    }),
                ),
                "/revoke" => {
                    let mut st = state.lock().unwrap();
                    st.revoked.push((
                        request.param("token").unwrap_or_default().to_owned(),
                        request
                            .param("token_type_hint")
                            .unwrap_or_default()
                            .to_owned(),
                    ));
                    let status = config.lock().unwrap().revoke_status;
                    if status == 200 {
                        Reply::raw(200, b"")
                    } else {
                        Reply::error(status, "temporarily_unavailable", "rt-CANARY-body")
                    }
                }
                _ => Reply::raw(404, b"not found"),
            }
        }
        _ => Reply::raw(404, b"not found"),
    };
    let _ = write_reply(conn, &reply);
}

fn authorize(query: &str, config: &Mutex<Config>, state: &Mutex<State>) -> Reply {
    let q: HashMap<String, String> = form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect();
    let c = config.lock().unwrap();
    let get = |k: &str| q.get(k).cloned().unwrap_or_default();
    let redirect = get("redirect_uri");
    let registered_loopback = c.redirect_uri.starts_with("http://127.0.0.1/");
    let redirect_ok = if registered_loopback {
        let path = &c.redirect_uri["http://127.0.0.1".len()..];
        url::Url::parse(&redirect).is_ok_and(|u| {
            u.scheme() == "http"
                && u.host_str() == Some("127.0.0.1")
                && u.port().is_some()
                && u.path() == path
        })
    } else {
        redirect == c.redirect_uri
    };
    let problems: Vec<&str> = [
        (get("response_type") != "code", "response_type"),
        (get("client_id") != c.client_id, "client_id"),
        (!redirect_ok, "redirect_uri"),
        (
            get("code_challenge_method") != "S256",
            "code_challenge_method",
        ),
        (get("code_challenge").len() != 43, "code_challenge"),
        (get("state").len() < 16, "state"),
    ]
    .into_iter()
    .filter_map(|(bad, what)| bad.then_some(what))
    .collect();
    if !problems.is_empty() {
        let why = format!("bad {}", problems.join(", "));
        state.lock().unwrap().authorize_errors.push(why.clone());
        return Reply::raw(400, why.as_bytes());
    }
    let st_value = get("state");
    let mut st = state.lock().unwrap();
    st.issued += 1;
    let code = format!("code-CANARY-{}", st.issued);
    st.codes.insert(
        code.clone(),
        Pending {
            challenge: get("code_challenge"),
            redirect_uri: redirect.clone(),
            client_id: get("client_id"),
            used: false,
        },
    );
    let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    match c.mode {
        AuthorizeMode::Redirect => Reply::raw(302, b"").header(
            "Location",
            &format!("{redirect}?code={}&state={}", enc(&code), enc(&st_value)),
        ),
        AuthorizeMode::Deny => Reply::raw(302, b"").header(
            "Location",
            &format!("{redirect}?error=access_denied&state={}", enc(&st_value)),
        ),
        AuthorizeMode::Paste => Reply::raw(200, format!("{code}#{st_value}").as_bytes()),
    }
}

fn issue(st: &mut State, c: &Config, with_id_token: bool) -> Reply {
    st.issued += 1;
    let n = st.issued;
    let refresh = format!("rt-CANARY-{n}");
    st.current_refresh = Some(refresh.clone());
    let mut body = json!({
        "access_token": format!("at-CANARY-{n}"),
        "refresh_token": refresh,
        "token_type": "Bearer",
        "expires_in": c.expires_in,
        "scope": "openid offline_access",
    });
    if let (true, Some(id)) = (with_id_token, &c.id_token) {
        body["id_token"] = json!(id);
    }
    Reply::json(200, body)
}

fn token(request: &Received, config: &Mutex<Config>, state: &Mutex<State>) -> Reply {
    let c = config.lock().unwrap();
    let mut st = state.lock().unwrap();
    let p = |k: &str| request.param(k).unwrap_or_default().to_owned();
    match p("grant_type").as_str() {
        "authorization_code" => {
            let code = p("code");
            let ok = match st.codes.get_mut(&code) {
                Some(pending) => {
                    let good = !pending.used
                        && pending.client_id == p("client_id")
                        && pending.redirect_uri == p("redirect_uri")
                        && s256(&p("code_verifier")) == pending.challenge;
                    pending.used = true;
                    good
                }
                None => false,
            };
            if ok {
                issue(&mut st, &c, true)
            } else {
                Reply::error(400, "invalid_grant", "bad code code-CANARY-x")
            }
        }
        "refresh_token" => {
            if st.current_refresh.as_deref() == Some(p("refresh_token").as_str()) {
                issue(&mut st, &c, false)
            } else {
                Reply::error(400, "invalid_grant", "refresh token already used")
            }
        }
        "urn:ietf:params:oauth:grant-type:device_code" => {
            st.polls.push(Instant::now());
            if p("device_code") != "dc-CANARY-device" || p("client_id") != c.client_id {
                return Reply::error(400, "invalid_grant", "unknown device code");
            }
            match st.device.pop_front().unwrap_or(DeviceStep::Pending) {
                DeviceStep::Pending => Reply::error(400, "authorization_pending", "wait"),
                DeviceStep::SlowDown => Reply::error(400, "slow_down", "slower"),
                DeviceStep::Deny => Reply::error(400, "access_denied", "no"),
                DeviceStep::Expire => Reply::error(400, "expired_token", "too late"),
                DeviceStep::Approve => issue(&mut st, &c, true),
            }
        }
        _ => Reply::error(400, "unsupported_grant_type", "?"),
    }
}

/// The browser's side: one GET of `url` (http only); the status, the `Location` header
/// and the body.
pub fn get(url: &str) -> (u16, Option<String>, String) {
    let u = url::Url::parse(url).expect("url");
    let addr = format!(
        "{}:{}",
        u.host_str().expect("host"),
        u.port().expect("port")
    );
    let mut conn = TcpStream::connect(addr).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let target = match u.query() {
        Some(q) => format!("{}?{q}", u.path()),
        None => u.path().to_owned(),
    };
    write!(
        conn,
        "GET {target} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        u.host_str().unwrap()
    )
    .expect("write");
    let mut reader = BufReader::new(conn);
    let mut line = String::new();
    reader.read_line(&mut line).expect("status line");
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {line:?}"));
    let mut location = None;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).expect("header") == 0 {
            break;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("location") {
                location = Some(v.trim().to_owned());
            }
        }
    }
    let mut body = String::new();
    let _ = reader.read_to_string(&mut body);
    (status, location, body)
}
