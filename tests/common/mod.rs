//! Shared test helpers: start a real server on a unique temporary directory with short
//! deadlines, and a raw-frame client that speaks bytes on the socket as an attacker would.
//! [`process`] drives the real binary as a child process.
#![allow(dead_code)]

pub mod as_user;
pub mod auth_server;
pub mod etcd;
pub mod hooked;
pub mod keyring;
pub mod probe;
pub mod process;
pub mod refresh;
pub mod token_endpoint;
pub mod unprivileged;
pub mod user_home;

use hooked::{Hooked, SlowGet};

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use credproxy::backend::MemoryBackend;
use credproxy::policy::Profile;
use credproxy::secret::Secret;
use credproxy::token::Token;
use credproxy::{Config, Limits, ServerHandle, Supervisor};
use serde_json::{json, Value};

/// How long a raw client waits for a reply before the test fails.
pub const REPLY_WAIT: Duration = Duration::from_secs(5);

/// Short limits so timer rules are tested in well under a second.
pub fn short_limits() -> Limits {
    Limits {
        partial_frame_timeout: Duration::from_millis(300),
        handshake_timeout: Duration::from_millis(300),
        shutdown_grace: Duration::from_millis(500),
        close_linger: Duration::from_millis(200),
        ..Limits::default()
    }
}

/// A test token with canary-like values.
pub fn token(access: &str, refresh: Option<&str>) -> Token {
    let mut v = json!({"access_token": access, "expiry": 1_900_000_000, "token_type": "Bearer", "scope": null});
    if let Some(r) = refresh {
        v["refresh_token"] = json!(r);
    }
    Token::from_value(v).expect("valid token")
}

/// A memory store with `anthropic:default`, `anthropic:work`, `gemini:default` tokens
/// (each with a refresh token) and the API keys `anthropic` and `openai`.
pub fn seeded() -> Arc<MemoryBackend> {
    let m = MemoryBackend::new();
    m.insert_token(
        "anthropic",
        "default",
        token("at-anthropic-default", Some("rt-anthropic-default")),
    )
    .expect("seed");
    m.insert_token(
        "anthropic",
        "work",
        token("at-anthropic-work", Some("rt-anthropic-work")),
    )
    .expect("seed");
    m.insert_token(
        "gemini",
        "default",
        token("at-gemini-default", Some("rt-gemini-default")),
    )
    .expect("seed");
    m.insert_key("anthropic", Secret::from("sk-anthropic"))
        .expect("seed");
    m.insert_key("openai", Secret::from("sk-openai"))
        .expect("seed");
    Arc::new(m)
}

/// A running server on its own temporary directory.
pub struct TestServer {
    pub handle: Option<ServerHandle>,
    pub path: PathBuf,
    pub dir: tempfile::TempDir,
    pub backend: Arc<MemoryBackend>,
}

impl TestServer {
    /// Starts a server with `profile`, `limits` and the seeded store.
    pub fn start_with(profile: Profile, limits: Limits, backend: Arc<MemoryBackend>) -> TestServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = Config::new(backend.clone());
        config.socket_dir = Some(dir.path().to_owned());
        config.profile = profile;
        config.limits = limits;
        offline(&mut config);
        let handle = Supervisor::start(config).expect("server starts");
        let path = handle.socket_path().to_owned();
        TestServer {
            handle: Some(handle),
            path,
            dir,
            backend,
        }
    }

    /// A server allowing everything, with short limits and the seeded store.
    pub fn start() -> TestServer {
        TestServer::start_with(allow_all(), short_limits(), seeded())
    }

    /// Raw connection, handshake done.
    pub fn connect(&self) -> Raw {
        let mut raw = Raw::connect(&self.path);
        raw.handshake();
        raw
    }

    /// Shuts the server down and returns the report.
    pub fn shutdown(&mut self) -> credproxy::ShutdownReport {
        self.handle
            .take()
            .expect("running")
            .shutdown_blocking()
            .expect("shutdown")
    }
}

pub fn allow_all() -> Profile {
    Profile {
        allow_all: true,
        ..Profile::default()
    }
}

/// A raw-frame client over a blocking Unix stream.
pub struct Raw {
    pub stream: UnixStream,
    /// The largest reply frame accepted: 65 536 until a version-2 handshake.
    pub limit: usize,
}

impl Raw {
    pub fn connect(path: &Path) -> Raw {
        let stream = UnixStream::connect(path).expect("connect");
        stream.set_read_timeout(Some(REPLY_WAIT)).expect("timeout");
        Raw {
            stream,
            limit: 65_536,
        }
    }

    /// Writes raw bytes.
    pub fn write(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write");
    }

    /// Writes one frame with `body`.
    pub fn send_body(&mut self, body: &[u8]) {
        self.write(&frame(body));
    }

    /// Writes one frame with a JSON value.
    pub fn send(&mut self, value: &Value) {
        self.send_body(value.to_string().as_bytes());
    }

    /// Reads one frame and parses it as JSON; panics on close or timeout.
    pub fn recv(&mut self) -> Value {
        self.try_recv().expect("a reply frame")
    }

    /// Reads one frame; `None` when the server closed the connection.
    pub fn try_recv(&mut self) -> Option<Value> {
        let mut header = [0u8; 4];
        match self.stream.read_exact(&mut header) {
            Ok(()) => {}
            Err(e)
                if e.kind() == ErrorKind::UnexpectedEof
                    || e.kind() == ErrorKind::ConnectionReset =>
            {
                return None
            }
            Err(e) => panic!("reading a reply header: {e}"),
        }
        let len = u32::from_be_bytes(header) as usize;
        assert!(len <= self.limit, "server wrote a frame of {len} bytes");
        let mut body = vec![0u8; len];
        self.stream.read_exact(&mut body).expect("reply body");
        Some(serde_json::from_slice(&body).expect("reply is JSON"))
    }

    /// True when the server closed the connection (EOF) within `REPLY_WAIT`, after
    /// discarding no frames: a frame arriving instead fails the test.
    pub fn expect_closed(&mut self) {
        if let Some(v) = self.try_recv() {
            panic!("expected a close, got {v}");
        }
    }

    /// Waits for EOF and returns how long it took.
    pub fn time_to_close(&mut self) -> Duration {
        let t0 = Instant::now();
        self.expect_closed();
        t0.elapsed()
    }

    pub fn handshake(&mut self) {
        self.send(&json!({"v":1,"op":"handshake","payload":{"minVersion":1,"maxVersion":1}}));
        assert_eq!(
            self.recv(),
            json!({"v":1,"op":"handshake","ok":true,"data":{"version":1}})
        );
    }

    /// Handshakes offering versions 1..2 (PROTOCOL.md §13) and expects version 2.
    pub fn handshake_v2(&mut self) {
        self.send(&json!({"v":1,"op":"handshake","payload":{"minVersion":1,"maxVersion":2}}));
        assert_eq!(
            self.recv(),
            json!({"v":2,"op":"handshake","ok":true,"data":{"version":2}})
        );
        self.limit = 4 << 20;
    }

    /// Sends a request and returns its reply (expects the next frame to answer it).
    pub fn call(&mut self, id: &str, op: &str, payload: Value) -> Value {
        self.send(&json!({"v":1,"id":id,"op":op,"payload":payload}));
        let reply = self.recv();
        assert_eq!(reply["id"], json!(id), "reply to another id: {reply}");
        reply
    }
}

/// Frames `body`.
pub fn frame(body: &[u8]) -> Vec<u8> {
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(body);
    out
}

/// The error code of a reply (panics on a success reply).
pub fn code(reply: &Value) -> &str {
    assert_eq!(
        reply["ok"],
        json!(false),
        "expected an error reply: {reply}"
    );
    reply["code"].as_str().expect("code")
}

/// Asserts a success reply and returns its data.
pub fn data(reply: &Value) -> &Value {
    assert_eq!(reply["ok"], json!(true), "expected success: {reply}");
    &reply["data"]
}

/// Asserts an error reply of exactly `{"v":1,"id":id,"ok":false,"code":code,"error":"..."}`
/// with a non-empty message, and returns the message.
pub fn assert_err<'a>(reply: &'a Value, id: &str, code: &str) -> &'a str {
    assert_err_v(reply, id, code, 1)
}

/// [`assert_err`] on a connection of protocol `version`.
pub fn assert_err_v<'a>(reply: &'a Value, id: &str, code: &str, version: i64) -> &'a str {
    let obj = reply.as_object().expect("reply is an object");
    let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["code", "error", "id", "ok", "v"], "{reply}");
    assert_eq!(reply["v"], json!(version), "{reply}");
    assert_eq!(reply["id"], json!(id), "{reply}");
    assert_eq!(reply["ok"], json!(false), "{reply}");
    assert_eq!(reply["code"], json!(code), "{reply}");
    let message = reply["error"].as_str().expect("error is a string");
    assert!(!message.is_empty(), "{reply}");
    message
}

/// Asserts the single error frame sent before a close on a malformed body (§3): exactly
/// `v`, `ok`, `code`, `error`, with no `id`; `v` is `version` (2 before the handshake).
pub fn assert_malformed_frame_reply(reply: &Value, version: i64) {
    let obj = reply.as_object().expect("reply is an object");
    let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["code", "error", "ok", "v"], "reply keys: {reply}");
    assert_eq!(reply["v"], json!(version));
    assert_eq!(reply["ok"], json!(false));
    assert_eq!(reply["code"], json!("INVALID_REQUEST"));
    let error = reply["error"].as_str().expect("error is a string");
    assert!(!error.is_empty(), "empty error message");
}

/// The exact success reply to `id` with `data`.
pub fn ok(id: &str, data: Value) -> Value {
    ok_v(id, data, 1)
}

/// The exact success reply to `id` with `data` on a connection of protocol `version`.
pub fn ok_v(id: &str, data: Value, version: i64) -> Value {
    json!({"v": version, "id": id, "ok": true, "data": data})
}

/// The sanitized form of the seeded tokens (`token` without its refresh token).
pub fn seeded_token(access: &str) -> Value {
    json!({"access_token": access, "expiry": 1_900_000_000, "token_type": "Bearer", "scope": null})
}

/// A blocking backend over `inner` whose `get_token` takes `delay` longer.
pub fn slow_backend(inner: Arc<MemoryBackend>, delay: Duration) -> Hooked<SlowGet> {
    Hooked {
        inner,
        hook: SlowGet(delay),
        blocking: true,
    }
}

/// Starts a server over any backend on a fresh temporary directory.
pub fn start_backend(
    backend: Arc<dyn credproxy::backend::Backend>,
    limits: Limits,
) -> (ServerHandle, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = Config::new(backend);
    config.socket_dir = Some(dir.path().to_owned());
    config.profile = allow_all();
    config.limits = limits;
    offline(&mut config);
    (Supervisor::start(config).expect("server starts"), dir)
}

/// Turns host-side refresh off in a test server's configuration: no provider has a token
/// endpoint, so tokens are served as stored (the version-1 behaviour these tests check)
/// and nothing is ever sent to a provider's real endpoint, whatever expiry a test token
/// has. The refresh tests set their own endpoints on 127.0.0.1 instead.
pub fn offline(config: &mut Config) {
    config.refresh.endpoints.clear();
    config.refresh.settings.enabled = false;
}

/// True when running as root (tests of foreign uids need it).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}
