//! Per-connection limits (PROTOCOL.md §5, §9, §7): the rate limit, the in-flight bound,
//! duplicate ids, slow operations not holding up fast ones, and the store timeout.
//!
//! Requests stay in flight only with a slow store, so the in-flight and timeout tests run
//! against [`SlowBackend`]: a seeded memory store whose `get_token` waits at a gate the
//! test opens (everything else is fast).

mod common;
use common::hooked::{Call, Hook, Hooked};
use common::*;

use std::collections::HashMap;
use std::io::Read;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use credproxy::backend::StoreError;
use credproxy::{Config, Limits, ServerHandle, Supervisor};
use serde_json::{json, Value};

// ---- helpers ----

/// Asserts an error reply with exactly the keys of PROTOCOL.md §5 (plus `retryAfter` for
/// `RATE_LIMITED`) and returns its message.
fn assert_err<'a>(reply: &'a Value, id: &str, code: &str) -> &'a str {
    let obj = reply.as_object().expect("reply is an object");
    let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    keys.sort_unstable();
    if code == "RATE_LIMITED" {
        assert_eq!(
            keys,
            ["code", "error", "id", "ok", "retryAfter", "v"],
            "{reply}"
        );
        let retry = reply["retryAfter"].as_u64();
        assert!(
            retry.is_some_and(|s| s >= 1),
            "retryAfter must be an integer >= 1: {reply}"
        );
    } else {
        assert_eq!(keys, ["code", "error", "id", "ok", "v"], "{reply}");
    }
    assert_eq!(reply["v"], json!(1), "{reply}");
    assert_eq!(reply["id"], json!(id), "{reply}");
    assert_eq!(reply["ok"], json!(false), "{reply}");
    assert_eq!(reply["code"], json!(code), "{reply}");
    let message = reply["error"].as_str().expect("error is a string");
    assert!(!message.is_empty(), "{reply}");
    message
}

/// The frames of `get_token` requests for `anthropic` with `ids`, as one buffer.
fn get_tokens(ids: impl IntoIterator<Item = String>) -> Vec<u8> {
    let mut bytes = Vec::new();
    for id in ids {
        let body =
            json!({"v": 1, "id": id, "op": "get_token", "payload": {"provider": "anthropic"}});
        bytes.extend_from_slice(&frame(body.to_string().as_bytes()));
    }
    bytes
}

fn request(id: &str, op: &str, payload: Value) -> Vec<u8> {
    let body = json!({"v": 1, "id": id, "op": op, "payload": payload});
    frame(body.to_string().as_bytes())
}

/// Reads `n` replies and returns them by id.
fn recv_by_id(raw: &mut Raw, n: usize) -> HashMap<String, Value> {
    let mut replies = HashMap::new();
    for _ in 0..n {
        let reply = raw.recv();
        let id = reply["id"].as_str().expect("reply has an id").to_owned();
        assert!(
            replies.insert(id.clone(), reply).is_none(),
            "two replies for id {id}"
        );
    }
    replies
}

/// Sends `n` pipelined get_token requests with ids `{prefix}{i}` in one write and returns
/// the ids answered ok and the ids answered `RATE_LIMITED`, in id order.
fn burst(raw: &mut Raw, prefix: &str, n: usize) -> (Vec<usize>, Vec<usize>) {
    raw.write(&get_tokens((0..n).map(|i| format!("{prefix}{i}"))));
    let replies = recv_by_id(raw, n);
    let (mut passed, mut limited) = (Vec::new(), Vec::new());
    for i in 0..n {
        let id = format!("{prefix}{i}");
        let reply = &replies[&id];
        if reply["ok"] == json!(true) {
            assert_eq!(reply, &ok(&id, seeded_token("at-anthropic-default")));
            passed.push(i);
        } else {
            assert_err(reply, &id, "RATE_LIMITED");
            limited.push(i);
        }
    }
    (passed, limited)
}

fn rate_limits(limit: u32, window: Duration) -> Limits {
    Limits {
        rate_limit: limit,
        rate_window: window,
        ..short_limits()
    }
}

fn sleep_until(deadline: Instant) {
    if let Some(left) = deadline.checked_duration_since(Instant::now()) {
        std::thread::sleep(left);
    }
}

/// Polls `cond` every few milliseconds for up to two seconds.
fn wait_for(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(2);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

// ---- a slow store ----

/// The longest a gated call waits if the test never opens the gate. Longer than
/// `REPLY_WAIT`, so a server that serializes requests fails on the client's read timeout.
const GATE_MAX: Duration = Duration::from_secs(10);

#[derive(Debug, Default)]
struct Gate {
    open: Mutex<bool>,
    cv: Condvar,
}

impl Gate {
    fn wait(&self) {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let _ = self.cv.wait_timeout_while(open, GATE_MAX, |open| !*open);
    }

    fn open(&self) {
        *self.open.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.cv.notify_all();
    }
}

/// How `SlowBackend::get_token` behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GetMode {
    /// Waits at the gate, then answers.
    Gated,
    /// Fails at once with an error naming a host path.
    Fails,
}

/// The hook of [`SlowBackend`]: `get_token` waits at the gate (or fails), and is counted.
#[derive(Debug)]
struct SlowGets {
    mode: GetMode,
    gate: Gate,
    /// `get_token` calls that reached the store.
    gets: AtomicUsize,
}

/// Text of the failure `GetMode::Fails` produces; none of it may cross the socket.
const FAIL_PATH: &str = "/home/someone/.llxprt/credstore/anthropic/default.json";
const FAIL_REASON: &str = "canary-internal-reason";

impl Hook for SlowGets {
    fn before(&self, call: Call<'_>) -> Result<(), StoreError> {
        if !matches!(call, Call::GetToken { .. }) {
            return Ok(());
        }
        self.gets.fetch_add(1, Ordering::SeqCst);
        match self.mode {
            GetMode::Fails => Err(StoreError::Corrupt {
                path: PathBuf::from(FAIL_PATH),
                reason: FAIL_REASON.into(),
            }),
            GetMode::Gated => {
                self.gate.wait();
                Ok(())
            }
        }
    }

    fn on_clear(&self) {
        self.gate.open();
    }
}

/// A seeded memory store run as a blocking backend, whose `get_token` is slow (or fails).
type SlowBackend = Hooked<SlowGets>;

impl SlowBackend {
    fn gets(&self) -> usize {
        self.hook.gets.load(Ordering::SeqCst)
    }

    fn open_gate(&self) {
        self.hook.gate.open();
    }
}

/// A server over a [`SlowBackend`], allowing everything. Dropping it opens the gate first,
/// so no store call is left waiting.
struct SlowServer {
    handle: Option<ServerHandle>,
    path: PathBuf,
    dir: tempfile::TempDir,
    backend: Arc<SlowBackend>,
}

impl SlowServer {
    fn start(mode: GetMode, limits: Limits) -> SlowServer {
        let backend = Arc::new(SlowBackend {
            inner: seeded(),
            hook: SlowGets {
                mode,
                gate: Gate::default(),
                gets: AtomicUsize::new(0),
            },
            blocking: true,
        });
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = Config::new(backend.clone());
        common::offline(&mut config);
        config.socket_dir = Some(dir.path().to_owned());
        config.profile = allow_all();
        config.limits = limits;
        let handle = Supervisor::start(config).expect("server starts");
        let path = handle.socket_path().to_owned();
        SlowServer {
            handle: Some(handle),
            path,
            dir,
            backend,
        }
    }

    fn connect(&self) -> Raw {
        let mut raw = Raw::connect(&self.path);
        raw.handshake();
        raw
    }
}

impl Drop for SlowServer {
    fn drop(&mut self) {
        self.backend.open_gate();
        drop(self.handle.take());
    }
}

// ---- rate limit ----

/// The in-flight bound is raised to 1000 here so that only the rate limit can refuse.
#[test]
fn burst_of_100_gets_60_ok_and_40_rate_limited() {
    let limits = Limits {
        max_in_flight: 1000,
        ..short_limits()
    };
    let ts = TestServer::start_with(allow_all(), limits, seeded());
    let mut a = ts.connect();
    let (passed, limited) = burst(&mut a, "a", 100);
    assert_eq!(passed, (0..60).collect::<Vec<_>>());
    assert_eq!(limited, (60..100).collect::<Vec<_>>());
}

#[test]
fn rate_limited_retry_after_is_whole_seconds_until_room() {
    let ts = TestServer::start_with(
        allow_all(),
        rate_limits(1, Duration::from_secs(3)),
        seeded(),
    );
    let mut c = ts.connect();
    let reply = c.call("1", "list_api_keys", json!({}));
    assert_eq!(reply["ok"], json!(true), "{reply}");
    let reply = c.call("2", "list_api_keys", json!({}));
    assert_err(&reply, "2", "RATE_LIMITED");
    // The first request left the window less than 3 s ago: room in at most 3 s.
    let retry = reply["retryAfter"].as_u64().expect("integer");
    assert!((1..=3).contains(&retry), "{reply}");
}

#[test]
fn a_busy_connection_does_not_limit_another() {
    let limits = Limits {
        max_in_flight: 1000,
        ..short_limits()
    };
    let ts = TestServer::start_with(allow_all(), limits, seeded());
    let mut a = ts.connect();
    let mut b = ts.connect();
    let (passed, limited) = burst(&mut a, "a", 70);
    assert_eq!((passed.len(), limited.len()), (60, 10));
    // Within the same second, b still has its whole allowance.
    let (passed, limited) = burst(&mut b, "b", 60);
    assert_eq!((passed.len(), limited.len()), (60, 0));
    // And a is still limited.
    let reply = a.call("again", "get_token", json!({"provider": "anthropic"}));
    assert_err(&reply, "again", "RATE_LIMITED");
}

#[test]
fn rate_limit_recovers_after_the_window() {
    let window = Duration::from_millis(300);
    let ts = TestServer::start_with(allow_all(), rate_limits(5, window), seeded());
    let mut c = ts.connect();
    let t0 = Instant::now();
    let (passed, limited) = burst(&mut c, "x", 6);
    assert_eq!((passed, limited), (vec![0, 1, 2, 3, 4], vec![5]));
    sleep_until(t0 + window + Duration::from_millis(50));
    let (passed, limited) = burst(&mut c, "y", 6);
    assert_eq!((passed, limited), (vec![0, 1, 2, 3, 4], vec![5]));
}

#[test]
fn handshake_does_not_count_against_the_rate() {
    let ts = TestServer::start_with(
        allow_all(),
        rate_limits(5, Duration::from_secs(10)),
        seeded(),
    );
    let mut c = Raw::connect(&ts.path);
    // Handshake and six requests in one write: all arrive inside one window.
    let mut bytes = frame(
        json!({"v": 1, "op": "handshake", "payload": {"minVersion": 1, "maxVersion": 1}})
            .to_string()
            .as_bytes(),
    );
    bytes.extend(get_tokens((0..6).map(|i| i.to_string())));
    c.write(&bytes);
    assert_eq!(
        c.recv(),
        json!({"v": 1, "op": "handshake", "ok": true, "data": {"version": 1}})
    );
    let replies = recv_by_id(&mut c, 6);
    for i in 0..5 {
        let id = i.to_string();
        assert_eq!(replies[&id], ok(&id, seeded_token("at-anthropic-default")));
    }
    assert_err(&replies["5"], "5", "RATE_LIMITED");
}

#[test]
fn rate_limited_requests_do_not_use_up_the_allowance() {
    // 5 accepted at t0, 10 refused at t0 + w/2, then at t0 + w + w/8 the first five have
    // left the window. Had the refusals been counted, they would still fill it.
    let window = Duration::from_millis(800);
    let ts = TestServer::start_with(allow_all(), rate_limits(5, window), seeded());
    let mut c = ts.connect();
    let t0 = Instant::now();
    let (passed, limited) = burst(&mut c, "a", 5);
    assert_eq!((passed.len(), limited.len()), (5, 0));
    sleep_until(t0 + window / 2);
    let (passed, limited) = burst(&mut c, "b", 10);
    assert_eq!((passed.len(), limited.len()), (0, 10));
    sleep_until(t0 + window + window / 8);
    let (passed, limited) = burst(&mut c, "c", 6);
    assert_eq!((passed, limited), (vec![0, 1, 2, 3, 4], vec![5]));
}

#[test]
fn envelope_errors_do_not_count_against_the_rate() {
    // Envelope → rate limit: a request refused for its envelope never reaches the limiter.
    let ts = TestServer::start_with(
        allow_all(),
        rate_limits(5, Duration::from_secs(10)),
        seeded(),
    );
    let mut c = ts.connect();
    let mut bytes = Vec::new();
    for i in 0..10 {
        let body = json!({"v": 1, "id": format!("bad{i}"), "payload": {}});
        bytes.extend(frame(body.to_string().as_bytes()));
    }
    bytes.extend(get_tokens((0..6).map(|i| i.to_string())));
    c.write(&bytes);
    let replies = recv_by_id(&mut c, 16);
    for i in 0..10 {
        let id = format!("bad{i}");
        assert_err(&replies[&id], &id, "INVALID_REQUEST");
    }
    for i in 0..5 {
        let id = i.to_string();
        assert_eq!(replies[&id]["ok"], json!(true), "{}", replies[&id]);
    }
    assert_err(&replies["5"], "5", "RATE_LIMITED");
}

// ---- in-flight bound and duplicate ids ----

#[test]
fn seventeenth_request_in_flight_is_resource_exhausted() {
    let ts = SlowServer::start(GetMode::Gated, short_limits());
    let mut c = ts.connect();
    c.write(&get_tokens((0..17).map(|i| i.to_string())));
    // Sixteen wait at the gate; the seventeenth is refused at once.
    let reply = c.recv();
    assert_err(&reply, "16", "RESOURCE_EXHAUSTED");
    ts.backend.open_gate();
    let replies = recv_by_id(&mut c, 16);
    for i in 0..16 {
        let id = i.to_string();
        assert_eq!(replies[&id], ok(&id, seeded_token("at-anthropic-default")));
    }
    // The sixteen admitted requests for one key share one read of the store (its single
    // flight); the refused one added none.
    assert_eq!(ts.backend.gets(), 1, "one shared read");
    // With nothing in flight any more, a new request is accepted.
    let reply = c.call("again", "get_token", json!({"provider": "anthropic"}));
    assert_eq!(reply, ok("again", seeded_token("at-anthropic-default")));
}

#[test]
fn in_flight_bound_is_per_connection() {
    let ts = SlowServer::start(GetMode::Gated, short_limits());
    let mut a = ts.connect();
    let mut b = ts.connect();
    // a fills its bound (its seventeenth is refused), then b still gets sixteen of its own.
    for (raw, prefix) in [(&mut a, "a"), (&mut b, "b")] {
        raw.write(&get_tokens((0..17).map(|i| format!("{prefix}{i}"))));
        let id = format!("{prefix}16");
        assert_err(&raw.recv(), &id, "RESOURCE_EXHAUSTED");
    }
    ts.backend.open_gate();
    for (raw, prefix) in [(&mut a, "a"), (&mut b, "b")] {
        let replies = recv_by_id(raw, 16);
        for i in 0..16 {
            let id = format!("{prefix}{i}");
            assert_eq!(replies[&id], ok(&id, seeded_token("at-anthropic-default")));
        }
    }
}

#[test]
fn duplicate_id_in_flight_is_invalid_request() {
    let ts = SlowServer::start(GetMode::Gated, short_limits());
    let mut c = ts.connect();
    c.write(&get_tokens(["dup".to_owned(), "dup".to_owned()]));
    assert_eq!(
        c.recv(),
        json!({"v": 1, "id": "dup", "ok": false, "code": "INVALID_REQUEST",
            "error": "duplicate request id"})
    );
    ts.backend.open_gate();
    // The first request still gets its answer.
    assert_eq!(c.recv(), ok("dup", seeded_token("at-anthropic-default")));
    assert_eq!(ts.backend.gets(), 1, "the duplicate reached the store");
    // Once answered, the id may be used again.
    let reply = c.call("dup", "get_token", json!({"provider": "anthropic"}));
    assert_eq!(reply, ok("dup", seeded_token("at-anthropic-default")));
}

#[test]
fn duplicate_id_of_a_finished_request_is_accepted() {
    let ts = TestServer::start();
    let mut c = ts.connect();
    for _ in 0..3 {
        let reply = c.call("same", "has_api_key", json!({"name": "openai"}));
        assert_eq!(reply, ok("same", json!({"exists": true})));
    }
}

// ---- slow and fast operations ----

#[test]
fn slow_operation_does_not_hold_up_a_fast_one() {
    let ts = SlowServer::start(GetMode::Gated, short_limits());
    let mut c = ts.connect();
    c.write(&request(
        "slow",
        "get_token",
        json!({"provider": "anthropic"}),
    ));
    wait_for("the slow get_token to reach the store", || {
        ts.backend.gets() == 1
    });
    c.write(&request("fast", "list_api_keys", json!({})));
    assert_eq!(
        c.recv(),
        ok("fast", json!({"keys": ["anthropic", "openai"]}))
    );
    ts.backend.open_gate();
    assert_eq!(c.recv(), ok("slow", seeded_token("at-anthropic-default")));
}

/// Reads one reply, failing with `why` (not a bare read error) when none comes in time.
fn recv_or(raw: &mut Raw, why: &str) -> Value {
    let mut header = [0u8; 4];
    if let Err(e) = raw.stream.read_exact(&mut header) {
        panic!("{why}: no reply within {REPLY_WAIT:?} ({e})");
    }
    let mut body = vec![0u8; u32::from_be_bytes(header) as usize];
    raw.stream.read_exact(&mut body).expect("reply body");
    serde_json::from_slice(&body).expect("reply is JSON")
}

#[test]
fn many_slow_operations_do_not_hold_up_a_fast_one() {
    // Fifteen slow requests fill the connection's allowance but one; the sixteenth is fast
    // and must not wait behind them, whatever the store's worker count.
    let ts = SlowServer::start(GetMode::Gated, short_limits());
    let mut c = ts.connect();
    c.write(&get_tokens((0..15).map(|i| format!("slow{i}"))));
    wait_for("a slow get_token to reach the store", || {
        ts.backend.gets() >= 1
    });
    c.write(&request("fast-keys", "list_api_keys", json!({})));
    let why = "list_api_keys held up behind 15 slow get_token (PROTOCOL.md §5)";
    assert_eq!(
        recv_or(&mut c, why),
        ok("fast-keys", json!({"keys": ["anthropic", "openai"]}))
    );
    c.write(&request(
        "fast-key",
        "get_api_key",
        json!({"name": "openai"}),
    ));
    let why = "get_api_key held up behind 15 slow get_token (PROTOCOL.md §5)";
    assert_eq!(
        recv_or(&mut c, why),
        ok("fast-key", json!({"key": "sk-openai"}))
    );
    ts.backend.open_gate();
    let replies = recv_by_id(&mut c, 15);
    for i in 0..15 {
        let id = format!("slow{i}");
        assert_eq!(replies[&id], ok(&id, seeded_token("at-anthropic-default")));
    }
}

#[test]
fn slow_operations_on_one_connection_do_not_hold_up_another() {
    let ts = SlowServer::start(GetMode::Gated, short_limits());
    let mut busy = ts.connect();
    let mut other = ts.connect();
    busy.write(&get_tokens((0..16).map(|i| format!("slow{i}"))));
    wait_for("a slow get_token to reach the store", || {
        ts.backend.gets() >= 1
    });
    other.write(&request("fast", "list_api_keys", json!({})));
    let why = "another connection's list_api_keys held up behind 16 slow get_token";
    assert_eq!(
        recv_or(&mut other, why),
        ok("fast", json!({"keys": ["anthropic", "openai"]}))
    );
    ts.backend.open_gate();
    let replies = recv_by_id(&mut busy, 16);
    assert!(replies.values().all(|r| r["ok"] == json!(true)));
}

// ---- store timeout and failure ----

/// The message of an `INTERNAL_ERROR` carries no path and no internal error text.
fn assert_no_details(message: &str, ts: &SlowServer) {
    let dir = ts.dir.path().to_string_lossy();
    for leak in [
        "/",
        dir.as_ref(),
        FAIL_PATH,
        FAIL_REASON,
        "canary",
        "deadline has elapsed",
        "Elapsed",
        "corrupt",
        "panicked",
    ] {
        assert!(
            !message.contains(leak),
            "INTERNAL_ERROR message leaks {leak:?}: {message:?}"
        );
    }
}

#[test]
fn store_timeout_is_internal_error_without_details() {
    let limits = Limits {
        store_timeout: Duration::from_millis(200),
        ..short_limits()
    };
    let ts = SlowServer::start(GetMode::Gated, limits);
    let mut c = ts.connect();
    let t0 = Instant::now();
    // The gate stays shut: only the timeout can answer this.
    let reply = c.call("1", "get_token", json!({"provider": "anthropic"}));
    let waited = t0.elapsed();
    let message = assert_err(&reply, "1", "INTERNAL_ERROR");
    assert_no_details(message, &ts);
    assert!(
        waited >= Duration::from_millis(200),
        "answered before the store timeout: {waited:?}"
    );
    // The connection goes on working.
    let reply = c.call("2", "has_api_key", json!({"name": "openai"}));
    assert_eq!(reply, ok("2", json!({"exists": true})));
}

#[test]
fn store_failure_is_internal_error_without_details() {
    let ts = SlowServer::start(GetMode::Fails, short_limits());
    let mut c = ts.connect();
    let reply = c.call("1", "get_token", json!({"provider": "anthropic"}));
    let message = assert_err(&reply, "1", "INTERNAL_ERROR");
    assert_no_details(message, &ts);
    let reply = c.call("2", "list_api_keys", json!({}));
    assert_eq!(reply, ok("2", json!({"keys": ["anthropic", "openai"]})));
}
