//! `cancel` (PROTOCOL.md §13) from the socket, with raw frames: exactly one reply per id,
//! a cancelled write applied whole or not at all, waits that stop for the cancelled
//! request only, the in-flight bound and the rate limit.

mod common;
use common::hooked::{Call, Hook, Hooked};
use common::refresh::{access, now, refresh_config, stored, RefreshServer};
use common::token_endpoint::{Reply, TokenEndpoint};
use common::*;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use credproxy::backend::{Backend, MemoryBackend, StoreError};
use credproxy::Limits;
use serde_json::{json, Value};

/// Makes `save_token` take `0` longer (after the store decided to write).
#[derive(Debug)]
struct SlowSave(Duration);

impl Hook for SlowSave {
    fn before(&self, call: Call<'_>) -> Result<(), StoreError> {
        if let Call::SaveToken { .. } = call {
            std::thread::sleep(self.0);
        }
        Ok(())
    }
}

fn cancel(raw: &mut Raw, id: &str, target: &str) {
    raw.send(&json!({"id":id,"op":"cancel","payload":{"targetId":target}}));
}

fn get(raw: &mut Raw, id: &str) {
    raw.send(&json!({"id":id,"op":"get_token","payload":{"provider":"anthropic"}}));
}

/// Reads `n` frames and returns them by id (a second reply for one id fails the test).
fn replies(raw: &mut Raw, n: usize) -> HashMap<String, Value> {
    let mut out = HashMap::new();
    for _ in 0..n {
        let reply = raw.recv();
        let id = reply["id"].as_str().expect("id").to_owned();
        assert!(
            out.insert(id.clone(), reply).is_none(),
            "two replies for {id}"
        );
    }
    out
}

/// After everything settled, the next frame is the answer to a fresh request: no late
/// reply for a cancelled id is on its way.
fn assert_nothing_else(raw: &mut Raw, settle: Duration) {
    std::thread::sleep(settle);
    let reply = raw.call("probe", "list_providers", json!({}));
    assert_eq!(reply["id"], json!("probe"));
}

fn slow_get_server(
    delay: Duration,
    limits: Limits,
) -> (credproxy::ServerHandle, tempfile::TempDir) {
    start_backend(Arc::new(slow_backend(seeded(), delay)), limits)
}

#[test]
fn a_request_waiting_on_the_store_is_cancelled_with_one_reply() {
    let (s, _d) = slow_get_server(Duration::from_millis(700), short_limits());
    for v2 in [true, false] {
        let mut raw = Raw::connect(s.socket_path());
        if v2 {
            raw.handshake_v2();
        } else {
            raw.handshake();
        }
        let v = if v2 { 2 } else { 1 };
        get(&mut raw, "g");
        std::thread::sleep(Duration::from_millis(100));
        cancel(&mut raw, "c", "g");
        let first = raw.recv();
        assert_eq!(first["id"], json!("g"), "{first}");
        assert_eq!(first["v"], json!(v));
        assert_err_v(&first, "g", "CANCELLED", v);
        assert_eq!(
            raw.recv(),
            json!({"v":v,"id":"c","ok":true,"data":{"cancelled":true}})
        );
        // The store read went on (it cannot be stopped) but its answer is never sent.
        assert_nothing_else(&mut raw, Duration::from_millis(900));
    }
    s.shutdown_blocking().expect("shutdown");
}

#[test]
fn a_cancelled_write_is_applied_whole_or_not_at_all() {
    let memory = seeded();
    let backend = Hooked {
        inner: memory.clone() as Arc<dyn Backend>,
        hook: SlowSave(Duration::from_millis(800)),
        blocking: true,
    };
    let (s, _d) = start_backend(Arc::new(backend), short_limits());
    let mut raw = Raw::connect(s.socket_path());
    raw.handshake_v2();
    let save = |raw: &mut Raw, id: &str, access: &str| {
        raw.send(
            &json!({"id":id,"op":"save_token","payload":{"provider":"anthropic",
            "token":{"access_token":access,"expiry":1_900_000_000u64,"token_type":"Bearer"}}}),
        );
    };
    // s1 is in the backend (its write has begun); s2 waits for the key's lock behind it.
    save(&mut raw, "s1", "at-first");
    std::thread::sleep(Duration::from_millis(200));
    save(&mut raw, "s2", "at-second");
    std::thread::sleep(Duration::from_millis(100));
    cancel(&mut raw, "c2", "s2");
    cancel(&mut raw, "c1", "s1");
    let got = replies(&mut raw, 4);
    assert_err_v(&got["s2"], "s2", "CANCELLED", 2);
    assert_eq!(
        got["c2"],
        json!({"v":2,"id":"c2","ok":true,"data":{"cancelled":true}})
    );
    // Too late for s1: its write had begun; it keeps its own reply.
    assert_eq!(
        got["c1"],
        json!({"v":2,"id":"c1","ok":true,"data":{"cancelled":false}})
    );
    assert_eq!(got["s1"], json!({"v":2,"id":"s1","ok":true,"data":{}}));
    assert_nothing_else(&mut raw, Duration::from_millis(1200));
    let stored = memory
        .get_token("anthropic", "default")
        .expect("read")
        .expect("token");
    assert_eq!(
        stored.fields()["access_token"],
        json!("at-first"),
        "s2 was never written"
    );
    assert_eq!(
        stored.refresh_token(),
        Some("rt-anthropic-default"),
        "the merge kept the refresh token"
    );
    s.shutdown_blocking().expect("shutdown");
}

#[test]
fn cancel_answers_false_for_answered_or_unknown_ids_and_checks_its_payload() {
    let s = TestServer::start();
    let mut raw = s.connect();
    let reply = raw.call("a", "get_token", json!({"provider":"anthropic"}));
    assert_eq!(data(&reply)["access_token"], json!("at-anthropic-default"));
    let r = raw.call("c1", "cancel", json!({"targetId":"a"}));
    assert_eq!(
        r,
        json!({"v":1,"id":"c1","ok":true,"data":{"cancelled":false}})
    );
    let r = raw.call("c2", "cancel", json!({"targetId":"never-sent"}));
    assert_eq!(data(&r), &json!({"cancelled":false}));
    let r = raw.call("c3", "cancel", json!({}));
    assert_err(&r, "c3", "INVALID_REQUEST");
    let r = raw.call("c4", "cancel", json!({"targetId":5}));
    assert_err(&r, "c4", "INVALID_REQUEST");
    let r = raw.call("c5", "cancel", json!({"targetId":null}));
    assert_err(&r, "c5", "INVALID_REQUEST");
    // A cancel never cancels itself or another cancel.
    let r = raw.call("c6", "cancel", json!({"targetId":"c6"}));
    assert_eq!(data(&r), &json!({"cancelled":false}));
}

#[test]
fn cancel_is_accepted_with_16_in_flight_and_is_exempt_from_the_duplicate_check() {
    let limits = Limits {
        rate_limit: 0,
        ..short_limits()
    };
    let (s, _d) = slow_get_server(Duration::from_millis(600), limits);
    let mut raw = Raw::connect(s.socket_path());
    raw.handshake_v2();
    for n in 0..16 {
        get(&mut raw, &format!("g{n}"));
    }
    get(&mut raw, "g16");
    let over = raw.recv();
    assert_err_v(&over, "g16", "RESOURCE_EXHAUSTED", 2);
    cancel(&mut raw, "c", "g3");
    // Its id equals one in flight: still answered (exempt from the duplicate-id check).
    cancel(&mut raw, "g5", "none");
    let got = replies(&mut raw, 2 + 1);
    assert_err_v(&got["g3"], "g3", "CANCELLED", 2);
    assert_eq!(data(&got["c"]), &json!({"cancelled":true}));
    assert_eq!(data(&got["g5"]), &json!({"cancelled":false}));
    let rest = replies(&mut raw, 15);
    for n in (0..16).filter(|n| *n != 3) {
        let reply = &rest[&format!("g{n}")];
        assert_eq!(data(reply)["access_token"], json!("at-anthropic-default"));
    }
    assert_nothing_else(&mut raw, Duration::from_millis(100));
    s.shutdown_blocking().expect("shutdown");
}

#[test]
fn cancel_counts_toward_the_rate_limit() {
    let limits = Limits {
        rate_limit: 3,
        rate_window: Duration::from_secs(1),
        ..short_limits()
    };
    let s = TestServer::start_with(allow_all(), limits, seeded());
    let mut raw = s.connect();
    for n in 0..3 {
        let r = raw.call(&format!("c{n}"), "cancel", json!({"targetId":"x"}));
        assert_eq!(data(&r), &json!({"cancelled":false}));
    }
    let r = raw.call("c3", "cancel", json!({"targetId":"x"}));
    assert_eq!(code(&r), "RATE_LIMITED");
    assert!(r["retryAfter"].as_u64().is_some_and(|s| s >= 1), "{r}");
}

/// Sixteen `get_token` wait on one refresh; cancelling one stops that one only: the
/// refresh goes on, and the other fifteen get the new token from one upstream call.
#[test]
fn cancelling_one_of_16_refresh_waiters_leaves_the_others_answered() {
    let endpoint = TokenEndpoint::start("rt-0");
    endpoint.push([Reply::token("at-fresh", 3600, Some("rt-1")).after(Duration::from_millis(700))]);
    let memory = Arc::new(MemoryBackend::new());
    memory
        .insert_token("anthropic", "default", stored("at-old", "rt-0", now() - 10))
        .expect("seed");
    let mut server = RefreshServer::start(memory.clone(), refresh_config(&endpoint.url()));
    let mut raw = Raw::connect(&server.path);
    raw.handshake_v2();
    for n in 0..16 {
        get(&mut raw, &format!("r{n}"));
    }
    std::thread::sleep(Duration::from_millis(200));
    cancel(&mut raw, "c", "r7");
    let first = replies(&mut raw, 2);
    assert_err_v(&first["r7"], "r7", "CANCELLED", 2);
    assert_eq!(data(&first["c"]), &json!({"cancelled":true}));
    let rest = replies(&mut raw, 15);
    for n in (0..16).filter(|n| *n != 7) {
        assert_eq!(access(&rest[&format!("r{n}")]), "at-fresh");
    }
    assert_eq!(endpoint.count(), 1);
    assert_eq!(
        memory
            .get_token("anthropic", "default")
            .expect("read")
            .and_then(|t| t.refresh_token().map(str::to_owned))
            .as_deref(),
        Some("rt-1"),
        "the refresh completed and was stored"
    );
    assert_nothing_else(&mut raw, Duration::from_millis(100));
    server.shutdown();
}
