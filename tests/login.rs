//! `credproxy login` and `credproxy logout`, real binary, real store, and a real
//! authorization server on 127.0.0.1 (tests/common/auth_server.rs), the test acting as the
//! browser:
//!
//! - the loopback flow: the URL read from the child's stderr, `/authorize` answered with a
//!   302 to the child's listener, the code exchanged with the PKCE verifier, the token
//!   stored and refreshable by `credproxy store token refresh` against the same server;
//! - a callback with a state that is not this login's ends it at once, nothing stored; a
//!   browser that never comes back times out; a denial ends it;
//! - the device flow: pending, slow_down (+5 s), approval, denial, expiry;
//! - the paste flow on a pty (Anthropic's preset, pointed at the test server), and refused
//!   when stdin is not a terminal;
//! - logout: removed and revoked (RFC 7009), a failed revocation reported, a second logout
//!   finds nothing;
//! - canaries: no code, verifier or token in any output.

mod common;

use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read, Write};
use std::process::Stdio;
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use common::auth_server::{self, AuthServer, AuthorizeMode, Config, DeviceStep};
use common::process::{self, drain, ChildGuard, Env, Fixture, Run, Stdin, BIN, DEADLINE};
use serde_json::Value;

/// Every code and token the test server issues contains this.
const CANARY: &str = "CANARY";

/// A login child: stderr read line by line (the URL is on it), stdout collected.
struct Running {
    child: ChildGuard,
    lines: Receiver<String>,
    stderr: Arc<Mutex<String>>,
    stderr_thread: JoinHandle<()>,
    stdout: JoinHandle<String>,
}

impl Running {
    fn start(args: &[&str], stdin: Stdio) -> Running {
        let mut cmd = Env::ISOLATED.command(BIN, args);
        // Never a real browser, whatever the flags say.
        cmd.env_remove("DISPLAY").env_remove("WAYLAND_DISPLAY");
        let mut child = cmd
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn credproxy login");
        let stdout = drain(child.stdout.take().expect("stdout"));
        let err = child.stderr.take().expect("stderr");
        let (tx, lines) = mpsc::channel();
        let stderr = Arc::new(Mutex::new(String::new()));
        let all = stderr.clone();
        let stderr_thread = thread::spawn(move || {
            let mut reader = BufReader::new(err);
            loop {
                let mut line = String::new();
                match reader.read_line(&mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        all.lock().unwrap().push_str(&line);
                        let _ = tx.send(line);
                    }
                }
            }
        });
        Running {
            child: ChildGuard::new(child, true),
            lines,
            stderr,
            stderr_thread,
            stdout,
        }
    }

    /// The first stderr line containing `needle`, trimmed.
    fn line_with(&self, needle: &str) -> String {
        loop {
            match self.lines.recv_timeout(DEADLINE) {
                Ok(line) if line.contains(needle) => return line.trim().to_owned(),
                Ok(_) => continue,
                Err(_) => panic!(
                    "no stderr line with {needle:?}; stderr: {}",
                    self.stderr.lock().unwrap()
                ),
            }
        }
    }

    fn finish(mut self) -> Run {
        let status = self.child.wait_exit("credproxy login");
        self.stderr_thread.join().expect("stderr thread");
        let stderr = self.stderr.lock().unwrap().clone();
        Run {
            status,
            stdout: self.stdout.join().expect("stdout thread"),
            stderr,
        }
    }
}

struct Setup {
    f: Fixture,
    server: AuthServer,
    profile: String,
}

impl Setup {
    /// A fixture and a server whose `acme` provider is in the profile (plus `extra`).
    fn new(config: Config, extra: &str) -> Setup {
        let f = Fixture::new();
        let server = AuthServer::start(config);
        let profile = f.tmp.path().join("profile.toml");
        fs::write(
            &profile,
            format!("{}{extra}", server.provider_table("acme")),
        )
        .expect("write profile");
        let profile = process::path_str(&profile);
        Setup { f, server, profile }
    }

    fn args<'a>(&'a self, command: &'a str, provider: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
        let mut args = vec![
            command,
            provider,
            "--store",
            self.f.store_str(),
            "--profile",
            &self.profile,
        ];
        args.extend_from_slice(extra);
        args
    }

    fn login(&self, extra: &[&str]) -> Running {
        let mut all = vec!["--no-browser"];
        all.extend_from_slice(extra);
        Running::start(&self.args("login", "acme", &all), Stdio::null())
    }

    fn run(&self, args: &[&str]) -> Run {
        process::run(BIN, args, Stdin::Null, Env::ISOLATED)
    }

    fn store(&self, args: &[&str]) -> Run {
        let mut all = vec!["store"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--store", self.f.store_str(), "--profile", &self.profile]);
        self.run(&all)
    }

    fn stored(&self, provider: &str, bucket: &str) -> Option<Value> {
        let path = self
            .f
            .store
            .join(format!("tokens/{provider}/{bucket}.json"));
        fs::read(path)
            .ok()
            .map(|b| serde_json::from_slice(&b).expect("stored json"))
    }

    fn nothing_stored(&self) {
        let list = self.store(&["token", "list"]);
        assert_eq!(list.stdout, "", "{list:?}");
    }

    /// Fails when any output of `run`, or anything the server saw as a verifier, shows.
    #[track_caller]
    fn no_secrets(&self, what: &str, run: &Run) {
        for text in [&run.stdout, &run.stderr] {
            assert!(!text.contains(CANARY), "{what} printed a secret: {run:?}");
            for r in self.server.received() {
                if let Some(v) = r.param("code_verifier") {
                    assert!(!text.contains(v), "{what} printed the verifier: {run:?}");
                }
            }
        }
    }
}

/// The authorization URL printed by a login.
fn authorize_url(login: &Running) -> String {
    let line = login.line_with("/authorize?");
    line.split_whitespace()
        .find(|w| w.contains("/authorize?"))
        .expect("url")
        .to_owned()
}

/// The browser: GET the authorization URL, expect a 302, follow it to the listener.
fn browse(url: &str) -> (u16, String) {
    let (status, location, body) = auth_server::get(url);
    assert_eq!(status, 302, "authorize answered {status}: {body}");
    let (status, _, page) = auth_server::get(&location.expect("Location"));
    (status, page)
}

#[test]
fn loopback_login_stores_a_token_the_refresh_engine_can_refresh() {
    let s = Setup::new(Config::default(), "");
    let login = s.login(&["--bucket", "work"]);
    let url = authorize_url(&login);
    assert!(
        url.starts_with(&format!("{}/authorize?", s.server.base())),
        "{url}"
    );
    let (status, page) = browse(&url);
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("Signed in"), "{page}");
    let run = login.finish();
    assert_eq!(run.code(), Some(0), "{run:?}");
    assert_eq!(
        run.stdout, "logged in: acme:work, expires in 8 h, refreshable\n",
        "{run:?}"
    );
    s.no_secrets("login", &run);
    assert!(s.server.authorize_errors().is_empty());

    let token = s.stored("acme", "work").expect("stored");
    assert_eq!(token["access_token"], "at-CANARY-2");
    assert_eq!(token["refresh_token"], "rt-CANARY-2");
    assert_eq!(token["token_type"], "Bearer");
    assert!(token["expiry"].as_u64().expect("expiry") > 1_700_000_000);
    // The exchange carried the verifier and the listener's redirect URI.
    let exchange = &s.server.received()[0];
    assert_eq!(exchange.param("grant_type"), Some("authorization_code"));
    let redirect = exchange.param("redirect_uri").expect("redirect_uri");
    assert!(redirect.starts_with("http://127.0.0.1:") && redirect.ends_with("/callback"));
    assert_eq!(exchange.param("code_verifier").map(str::len), Some(43));

    let status = s.store(&["token", "status", "acme", "--json"]);
    let v: Value = serde_json::from_str(&status.stdout).expect("json");
    assert_eq!(v[0]["refreshable"], true, "{status:?}");
    let refresh = s.store(&["token", "refresh", "acme", "--bucket", "work"]);
    assert_eq!(refresh.code(), Some(0), "{refresh:?}");
    assert!(
        refresh.stdout.starts_with("refreshed acme:work"),
        "{refresh:?}"
    );
    assert_eq!(
        s.stored("acme", "work").expect("t")["refresh_token"],
        "rt-CANARY-3"
    );
}

#[test]
fn a_callback_with_another_state_ends_the_login_and_stores_nothing() {
    let s = Setup::new(Config::default(), "");
    let login = s.login(&[]);
    let url = authorize_url(&login);
    let (_, location, _) = auth_server::get(&url);
    let location = location.expect("Location");
    // A stale tab: the same listener, the real code, another login's state.
    let (base, query) = location.split_once('?').expect("query");
    let code = query
        .split('&')
        .find(|p| p.starts_with("code="))
        .expect("code");
    let (status, _, page) = auth_server::get(&format!("{base}?{code}&state=stale-state-123"));
    assert_eq!(status, 400, "{page}");
    let run = login.finish();
    assert_eq!(run.code(), Some(1), "{run:?}");
    let last = run.stderr.lines().last().unwrap_or_default();
    assert!(
        last.contains("state that does not belong to this login")
            && last.contains("nothing was stored"),
        "{run:?}"
    );
    assert_eq!(run.stdout, "");
    s.no_secrets("login", &run);
    s.nothing_stored();
    // The code was never exchanged.
    assert!(s.server.received().is_empty());
}

#[test]
fn a_denied_sign_in_and_a_browser_that_never_returns_store_nothing() {
    let s = Setup::new(
        Config {
            mode: AuthorizeMode::Deny,
            ..Config::default()
        },
        "",
    );
    let login = s.login(&[]);
    let (status, page) = browse(&authorize_url(&login));
    assert_eq!(status, 400, "{page}");
    let run = login.finish();
    assert_eq!(run.code(), Some(1), "{run:?}");
    assert!(run.stderr.contains("access_denied"), "{run:?}");
    s.nothing_stored();

    s.server.set_mode(AuthorizeMode::Redirect);
    let login = s.login(&["--test-timeout", "1"]);
    let _ = authorize_url(&login);
    let run = login.finish();
    assert_eq!(run.code(), Some(1), "{run:?}");
    assert!(
        run.stderr
            .contains("did not come back within 1 s; nothing was stored"),
        "{run:?}"
    );
    s.nothing_stored();
}

#[test]
fn device_flow_waits_through_pending_and_slow_down_until_approved() {
    let s = Setup::new(Config::default(), "");
    s.server.script_device(&[
        DeviceStep::Pending,
        DeviceStep::SlowDown,
        DeviceStep::Approve,
    ]);
    let login = s.login(&["--device"]);
    let shown = login.line_with("WDJB-MJHT");
    assert_eq!(shown, "WDJB-MJHT");
    let run = login.finish();
    assert_eq!(run.code(), Some(0), "{run:?}");
    assert!(
        run.stderr
            .contains(&format!("{}/activate", s.server.base())),
        "{run:?}"
    );
    assert_eq!(
        run.stdout,
        "logged in: acme:default, expires in 8 h, refreshable\n"
    );
    s.no_secrets("device login", &run);
    let polls = s.server.polls();
    assert_eq!(polls.len(), 3, "{polls:?}");
    // 1 s between the first polls, 1 + 5 s after slow_down.
    assert!(polls[1] - polls[0] >= Duration::from_millis(900));
    assert!(
        polls[2] - polls[1] >= Duration::from_millis(5_900),
        "{polls:?}"
    );
    assert_eq!(
        s.stored("acme", "default").expect("stored")["refresh_token"],
        "rt-CANARY-1"
    );
}

#[test]
fn device_flow_stops_on_denial_and_on_expiry() {
    let s = Setup::new(Config::default(), "");
    s.server
        .script_device(&[DeviceStep::Pending, DeviceStep::Deny]);
    let run = s.login(&["--device"]).finish();
    assert_eq!(run.code(), Some(1), "{run:?}");
    assert!(
        run.stderr
            .contains("the sign-in was refused at the verification page"),
        "{run:?}"
    );
    s.nothing_stored();

    s.server.script_device(&[DeviceStep::Expire]);
    let run = s.login(&["--device"]).finish();
    assert_eq!(run.code(), Some(1), "{run:?}");
    assert!(run.stderr.contains("the code expired"), "{run:?}");
    s.nothing_stored();
    s.no_secrets("device login", &run);
}

#[test]
fn device_flow_gives_up_when_the_code_outlives_its_expiry() {
    let s = Setup::new(
        Config {
            device_expires_in: 2,
            ..Config::default()
        },
        "",
    );
    // Pending for ever: the client stops at the code's expiry.
    let run = s.login(&["--device"]).finish();
    assert_eq!(run.code(), Some(1), "{run:?}");
    assert!(run.stderr.contains("the code expired"), "{run:?}");
    s.nothing_stored();
}

#[test]
fn a_provider_without_a_flow_and_bad_flags_are_usage_errors() {
    let s = Setup::new(
        Config::default(),
        "[provider.plain]\ntoken_url = \"http://127.0.0.1:9/t\"\nclient_id = \"c\"\n",
    );
    let run = s.run(&s.args("login", "plain", &["--no-browser"]));
    assert_eq!(run.code(), Some(2), "{run:?}");
    assert!(
        run.stderr.contains("no login flow is configured for plain"),
        "{run:?}"
    );
    let run = s.run(&s.args("login", "plain", &["--device"]));
    assert_eq!(run.code(), Some(2), "{run:?}");
    assert!(run.stderr.contains("plain has no device flow"), "{run:?}");
    let run = s.run(&s.args("login", "nosuch", &[]));
    assert_eq!(run.code(), Some(2), "{run:?}");
    assert!(
        run.stderr.contains("no login is known for nosuch"),
        "{run:?}"
    );
    let run = s.run(&s.args("login", "acme", &["--bucket", "a/b"]));
    assert_eq!(run.code(), Some(2), "{run:?}");
}

/// The anthropic preset, its authorization and token endpoints pointed at the test server
/// (its paste redirect, JSON exchange and `code=true` kept).
fn anthropic_setup() -> Setup {
    let config = Config {
        client_id: "9d1c250a-e61b-44d9-88ed-5944d1962f5e".into(),
        redirect_uri: "https://console.anthropic.com/oauth/code/callback".into(),
        mode: AuthorizeMode::Paste,
        ..Config::default()
    };
    let s = Setup::new(config, "");
    let b = s.server.base();
    fs::write(
        &s.profile,
        format!(
            "[provider.anthropic]\ntoken_url = \"{b}/token\"\nauthorization_url = \"{b}/authorize\"\n"
        ),
    )
    .expect("profile");
    s
}

#[test]
fn paste_flow_reads_code_and_state_from_the_terminal() {
    let s = anthropic_setup();
    let pty = nix::pty::openpty(None, None).expect("openpty");
    let slave = File::from(pty.slave);
    let mut master = File::from(pty.master);
    // What the terminal shows (the echo) is drained so the pty never fills.
    let mut echo_reader = master.try_clone().expect("dup");
    let echo = thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = echo_reader.read_to_end(&mut buf);
        buf
    });
    let login = Running::start(
        &s.args("login", "anthropic", &["--no-browser", "--bucket", "work"]),
        Stdio::from(slave),
    );
    let url = authorize_url(&login);
    let (status, _, page) = auth_server::get(&url);
    assert_eq!(status, 200, "{page}");
    let q: std::collections::HashMap<String, String> = url::Url::parse(&url)
        .expect("url")
        .query_pairs()
        .into_owned()
        .collect();
    assert_eq!(q["code"], "true");
    assert_eq!(q["scope"], "org:create_api_key user:profile user:inference");
    assert!(page.starts_with("code-CANARY-1#"), "{page}");
    master
        .write_all(format!("{page}\n").as_bytes())
        .expect("type the code");
    let run = login.finish();
    drop(master);
    drop(echo);
    assert_eq!(run.code(), Some(0), "{run:?}");
    assert_eq!(
        run.stdout,
        "logged in: anthropic:work, expires in 8 h, refreshable\n"
    );
    s.no_secrets("paste login", &run);
    let exchange = &s.server.received()[0];
    // Anthropic's exchange: JSON, with the state.
    assert!(
        exchange
            .header("content-type")
            .is_some_and(|c| c.contains("json")),
        "{exchange:?}"
    );
    assert_eq!(exchange.param("state"), Some(q["state"].as_str()));
    assert_eq!(
        s.stored("anthropic", "work").expect("stored")["refresh_token"],
        "rt-CANARY-2"
    );
}

#[test]
fn paste_flow_refuses_a_stale_state_and_a_stdin_that_is_not_a_terminal() {
    let s = anthropic_setup();
    let run = s.run(&s.args("login", "anthropic", &["--no-browser"]));
    assert_eq!(run.code(), Some(2), "{run:?}");
    assert!(run.stderr.contains("stdin is not a terminal"), "{run:?}");

    let pty = nix::pty::openpty(None, None).expect("openpty");
    let slave = File::from(pty.slave);
    let mut master = File::from(pty.master);
    let mut echo_reader = master.try_clone().expect("dup");
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = echo_reader.read_to_end(&mut buf);
    });
    let login = Running::start(
        &s.args("login", "anthropic", &["--no-browser"]),
        Stdio::from(slave),
    );
    let url = authorize_url(&login);
    let (_, _, page) = auth_server::get(&url);
    let code = page.split('#').next().expect("code");
    master
        .write_all(format!("{code}#some-other-state\n").as_bytes())
        .expect("type");
    let run = login.finish();
    assert_eq!(run.code(), Some(1), "{run:?}");
    assert!(
        run.stderr.contains("does not belong to this login"),
        "{run:?}"
    );
    s.no_secrets("paste login", &run);
    s.nothing_stored();
}

#[test]
fn logout_removes_and_revokes_and_reports_a_failed_revocation() {
    let s = Setup::new(Config::default(), "");
    s.server.script_device(&[DeviceStep::Approve]);
    let run = s.login(&["--device"]).finish();
    assert_eq!(run.code(), Some(0), "{run:?}");

    let run = s.run(&s.args("logout", "acme", &[]));
    assert_eq!(run.code(), Some(0), "{run:?}");
    assert_eq!(
        run.stdout,
        "logged out: acme:default removed and revoked at the provider\n"
    );
    assert_eq!(
        s.server.revoked(),
        [("rt-CANARY-1".to_owned(), "refresh_token".to_owned())]
    );
    s.no_secrets("logout", &run);
    s.nothing_stored();
    let again = s.run(&s.args("logout", "acme", &[]));
    assert_eq!(again.code(), Some(1), "{again:?}");
    assert!(again.stderr.contains("no token stored for acme:default"));

    // A revocation endpoint that fails: removed all the same, and said so.
    s.f.seed_token("acme", "b2", "at-CANARY-x", "rt-CANARY-x");
    s.server.set_revoke_status(503);
    let run = s.run(&s.args("logout", "acme", &["--bucket", "b2"]));
    assert_eq!(run.code(), Some(0), "{run:?}");
    assert_eq!(run.stdout, "logged out: acme:b2 removed (not revoked)\n");
    assert!(
        run.stderr.contains("revoking it at the provider failed")
            && run.stderr.contains("HTTP 503"),
        "{run:?}"
    );
    s.no_secrets("logout", &run);
    s.nothing_stored();

    // No revocation endpoint known: removed, and said so.
    s.f.seed_token("codex", "default", "at-CANARY-y", "rt-CANARY-y");
    let run = s.run(&s.args("logout", "codex", &[]));
    assert_eq!(run.code(), Some(0), "{run:?}");
    assert!(run
        .stdout
        .contains("no revocation endpoint is known for codex"));
}

#[test]
fn an_id_token_with_a_chatgpt_account_gives_the_account_id() {
    let id = auth_server::jwt(serde_json::json!({
        "https://api.openai.com/auth": {"chatgpt_account_id": "acct-42"}
    }));
    let s = Setup::new(
        Config {
            id_token: Some(id),
            ..Config::default()
        },
        "",
    );
    s.server.script_device(&[DeviceStep::Approve]);
    let run = s.login(&["--device"]).finish();
    assert_eq!(run.code(), Some(0), "{run:?}");
    let token = s.stored("acme", "default").expect("stored");
    assert_eq!(token["account_id"], "acct-42");
}

#[test]
fn a_refused_code_exchange_is_named_without_the_response_body() {
    let s = Setup::new(Config::default(), "");
    let login = s.login(&[]);
    let url = authorize_url(&login);
    let (_, location, _) = auth_server::get(&url);
    let location = location.expect("Location");
    // The right state with a code the server never issued: the exchange is refused.
    let forged = location.replace("code=code-CANARY-1", "code=forged");
    let (status, _, page) = auth_server::get(&forged);
    assert_eq!(status, 400, "{page}");
    let run = login.finish();
    assert_eq!(run.code(), Some(1), "{run:?}");
    assert!(
        run.stderr
            .contains("the token endpoint refused exchanging the code (HTTP 400, invalid_grant)"),
        "{run:?}"
    );
    // The error body ("bad code code-CANARY-x") is never shown.
    s.no_secrets("login", &run);
    s.nothing_stored();
}

#[test]
fn a_fixed_localhost_port_is_served_and_ctrl_c_stores_nothing() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("probe")
        .local_addr()
        .expect("addr")
        .port();
    let redirect = format!("http://localhost:{port}/auth/callback");
    let s = Setup::new(
        Config {
            redirect_uri: redirect.clone(),
            ..Config::default()
        },
        &format!("redirect_uri = \"{redirect}\"\n"),
    );
    let login = s.login(&[]);
    let url = authorize_url(&login);
    let q: std::collections::HashMap<String, String> = url::Url::parse(&url)
        .expect("url")
        .query_pairs()
        .into_owned()
        .collect();
    assert_eq!(q["redirect_uri"], redirect);
    let (status, page) = browse(&url);
    assert_eq!(status, 200, "{page}");
    let run = login.finish();
    assert_eq!(run.code(), Some(0), "{run:?}");

    // Ctrl-C while waiting for the browser: the process ends, nothing more is stored.
    let mut login = Running::start(
        &s.args("login", "acme", &["--no-browser", "--bucket", "other"]),
        Stdio::null(),
    );
    let _ = authorize_url(&login);
    login.child.signal(nix::sys::signal::Signal::SIGINT);
    let run = login.finish();
    assert_ne!(run.code(), Some(0), "{run:?}");
    assert!(s.stored("acme", "other").is_none());
    let list = s.store(&["token", "list"]);
    assert_eq!(list.stdout, "acme:default\n", "{list:?}");
}
