//! Protocol version 2 (PROTOCOL.md §13), from the socket: the handshake matrix (with and
//! without a capability token), the per-version frame limits on both sides, and the
//! bound on what large frames may hold. The client here is written against §13 alone:
//! raw frames over a plain Unix stream, no credproxy client code.

mod common;
use common::*;

use std::io::Write;
use std::time::{Duration, Instant};

use credproxy::backend::{Backend, MemoryBackend};
use credproxy::capability::CapabilityToken;
use credproxy::secret::Secret;
use credproxy::supervisor::LargeFrameBytes;
use credproxy::token::Token;
use credproxy::{Config, Limits, Supervisor};
use serde_json::{json, Value};

const MIB4: usize = 4 * 1024 * 1024;

/// A server over `backend` allowing everything, with `limits` and an optional capability
/// token.
fn server(
    backend: std::sync::Arc<MemoryBackend>,
    limits: Limits,
    capability: Option<&CapabilityToken>,
) -> (credproxy::ServerHandle, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = Config::new(backend);
    config.socket_dir = Some(dir.path().to_owned());
    config.profile = allow_all();
    config.limits = limits;
    config.capability = capability.map(CapabilityToken::digest);
    offline(&mut config);
    (Supervisor::start(config).expect("server starts"), dir)
}

/// What a first frame must get: the exact reply (the `error` text of a refusal is checked
/// separately) and whether the connection stays open.
enum Expect {
    /// `{"v":N,"op":"handshake","ok":true,"data":{"version":N}}`, then requests are served
    /// with `"v":N`.
    Agreed(i64),
    /// `{"v":2,"op":"handshake","ok":false,"code":CODE,"error":...}`, then a close.
    Refused(&'static str),
}

fn check_first_frame(path: &std::path::Path, first: &Value, expect: &Expect) {
    let mut raw = Raw::connect(path);
    raw.send(first);
    let reply = raw
        .try_recv()
        .unwrap_or_else(|| panic!("closed without a reply to {first}"));
    match *expect {
        Expect::Agreed(v) => {
            assert_eq!(
                reply,
                json!({"v":v,"op":"handshake","ok":true,"data":{"version":v}}),
                "reply to {first}"
            );
            let r = raw.call("after", "list_api_keys", json!({}));
            assert_eq!(
                r,
                json!({"v":v,"id":"after","ok":true,"data":{"keys":["anthropic","openai"]}})
            );
        }
        Expect::Refused(code) => {
            let obj = reply.as_object().expect("object");
            let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
            keys.sort_unstable();
            assert_eq!(
                keys,
                ["code", "error", "ok", "op", "v"],
                "{first} -> {reply}"
            );
            assert_eq!(reply["v"], json!(2), "{first} -> {reply}");
            assert_eq!(reply["op"], json!("handshake"));
            assert_eq!(reply["ok"], json!(false));
            assert_eq!(reply["code"], json!(code), "{first} -> {reply}");
            if code == "UNAUTHORIZED" {
                let text = reply["error"].as_str().expect("text");
                assert!(text.starts_with("UNAUTHORIZED: "), "{text}");
            }
            raw.expect_closed();
        }
    }
}

fn hs(v: Option<i64>, min: Option<Value>, max: Option<Value>, token: Option<&str>) -> Value {
    let mut payload = json!({});
    if let Some(min) = min {
        payload["minVersion"] = min;
    }
    if let Some(max) = max {
        payload["maxVersion"] = max;
    }
    if let Some(token) = token {
        payload["capabilityToken"] = json!(token);
    }
    let mut frame = json!({"op":"handshake","payload":payload});
    if let Some(v) = v {
        frame["v"] = json!(v);
    }
    frame
}

/// The offers of the issue's matrix, on a server without a capability token (where a
/// presented token is ignored) and on one with a token (right, missing, wrong, wrong
/// length, wrong case, not a string; the version is checked first).
#[test]
fn handshake_matrix() {
    let i = |n: i64| Some(json!(n));
    let (plain, _d1) = server(seeded(), short_limits(), None);
    let token = CapabilityToken::generate();
    let (guarded, _d2) = server(seeded(), short_limits(), Some(&token));
    let right = token.expose().to_owned();
    let other = CapabilityToken::generate().expose().to_owned();
    let upper = right.to_uppercase();
    let short = right[..63].to_owned();
    let long = format!("{right}0");
    let newline = format!("{right}\n");

    let versions: Vec<(Value, Expect)> = vec![
        (hs(Some(1), i(1), i(1), None), Expect::Agreed(1)),
        (hs(Some(1), i(1), i(2), None), Expect::Agreed(2)),
        (hs(Some(2), i(2), i(2), None), Expect::Agreed(2)),
        (hs(Some(1), i(2), i(5), None), Expect::Agreed(2)),
        (
            hs(Some(1), i(3), i(4), None),
            Expect::Refused("UNKNOWN_VERSION"),
        ),
        (
            hs(Some(1), i(2), i(1), None),
            Expect::Refused("UNKNOWN_VERSION"),
        ),
        (
            hs(Some(1), i(0), i(0), None),
            Expect::Refused("UNKNOWN_VERSION"),
        ),
        (
            hs(Some(1), Some(json!("1")), i(2), None),
            Expect::Refused("UNKNOWN_VERSION"),
        ),
        (hs(Some(1), None, None, None), Expect::Agreed(1)),
        (hs(Some(2), None, None, None), Expect::Agreed(2)),
        (
            hs(Some(3), None, None, None),
            Expect::Refused("UNKNOWN_VERSION"),
        ),
        (
            hs(None, None, None, None),
            Expect::Refused("UNKNOWN_VERSION"),
        ),
        // Only one bound: the frame's `v` decides.
        (hs(Some(2), i(1), None, None), Expect::Agreed(2)),
        (
            json!({"v":1,"id":"x","op":"get_token","payload":{"provider":"anthropic"}}),
            Expect::Refused("INVALID_REQUEST"),
        ),
    ];
    for (first, expect) in &versions {
        check_first_frame(plain.socket_path(), first, expect);
    }
    // A token presented to a server without one is ignored.
    check_first_frame(
        plain.socket_path(),
        &hs(Some(1), i(1), i(2), Some(&right)),
        &Expect::Agreed(2),
    );
    check_first_frame(
        plain.socket_path(),
        &hs(Some(1), i(1), i(2), Some("not even hex")),
        &Expect::Agreed(2),
    );

    let guarded_cases: Vec<(Value, Expect)> = vec![
        (hs(Some(1), i(1), i(2), Some(&right)), Expect::Agreed(2)),
        (hs(Some(1), i(1), i(1), Some(&right)), Expect::Agreed(1)),
        (hs(Some(2), None, None, Some(&right)), Expect::Agreed(2)),
        (
            hs(Some(1), i(1), i(2), None),
            Expect::Refused("UNAUTHORIZED"),
        ),
        (
            hs(Some(1), i(1), i(1), None),
            Expect::Refused("UNAUTHORIZED"),
        ),
        (
            hs(Some(1), i(1), i(2), Some(&other)),
            Expect::Refused("UNAUTHORIZED"),
        ),
        (
            hs(Some(1), i(1), i(2), Some(&upper)),
            Expect::Refused("UNAUTHORIZED"),
        ),
        (
            hs(Some(1), i(1), i(2), Some(&short)),
            Expect::Refused("UNAUTHORIZED"),
        ),
        (
            hs(Some(1), i(1), i(2), Some(&long)),
            Expect::Refused("UNAUTHORIZED"),
        ),
        (
            hs(Some(1), i(1), i(2), Some(&newline)),
            Expect::Refused("UNAUTHORIZED"),
        ),
        (
            hs(Some(1), i(1), i(2), Some("")),
            Expect::Refused("UNAUTHORIZED"),
        ),
        (
            json!({"v":1,"op":"handshake","payload":{"minVersion":1,"maxVersion":2,"capabilityToken":7}}),
            Expect::Refused("UNAUTHORIZED"),
        ),
        // Version first: no common version is UNKNOWN_VERSION even with the right token.
        (
            hs(Some(1), i(3), i(4), Some(&right)),
            Expect::Refused("UNKNOWN_VERSION"),
        ),
        (
            hs(Some(1), i(3), i(4), None),
            Expect::Refused("UNKNOWN_VERSION"),
        ),
        (
            json!({"v":1,"id":"x","op":"list_providers"}),
            Expect::Refused("INVALID_REQUEST"),
        ),
    ];
    for (first, expect) in &guarded_cases {
        check_first_frame(guarded.socket_path(), first, expect);
    }
    // The token in an escaped form is the same string once parsed: accepted.
    let escaped = format!(
        r#"{{"v":1,"op":"handshake","payload":{{"minVersion":1,"maxVersion":2,"capabilityToken":"\u00{:x}{}"}}}}"#,
        right.as_bytes()[0],
        &right[1..]
    );
    let mut raw = Raw::connect(guarded.socket_path());
    raw.send_body(escaped.as_bytes());
    assert_eq!(raw.recv()["ok"], json!(true));
    guarded.shutdown_blocking().expect("shutdown");
    plain.shutdown_blocking().expect("shutdown");
}

/// The frame before the handshake and the error frame before a close on a connection
/// without a version carry `"v":2`; after a version-1 handshake, `"v":1`.
#[test]
fn error_frames_carry_the_highest_version_before_the_handshake() {
    let (s, _d) = server(seeded(), short_limits(), None);
    let mut raw = Raw::connect(s.socket_path());
    raw.send_body(b"[1]");
    let reply = raw.recv();
    assert_eq!(reply["v"], json!(2), "{reply}");
    assert_eq!(reply["code"], json!("INVALID_REQUEST"));
    raw.expect_closed();

    let mut raw = Raw::connect(s.socket_path());
    raw.handshake();
    raw.send_body(b"not json");
    let reply = raw.recv();
    assert_eq!(reply["v"], json!(1), "{reply}");
    raw.expect_closed();

    let mut raw = Raw::connect(s.socket_path());
    raw.handshake_v2();
    raw.send_body(b"not json");
    let reply = raw.recv();
    assert_eq!(reply["v"], json!(2), "{reply}");
    raw.expect_closed();
    s.shutdown_blocking().expect("shutdown");
}

/// A `get_token` request padded with an unknown payload field to exactly `len` bytes.
fn padded_request(id: &str, len: usize) -> Vec<u8> {
    let head =
        format!(r#"{{"id":"{id}","op":"get_token","payload":{{"provider":"anthropic","pad":""#);
    let tail = r#""}}"#;
    let mut body = head.into_bytes();
    body.resize(len - tail.len(), b'x');
    body.extend_from_slice(tail.as_bytes());
    assert_eq!(body.len(), len);
    body
}

#[test]
fn frame_limits_per_version_on_the_read_side() {
    let limits = Limits {
        partial_frame_timeout: Duration::from_secs(5),
        ..short_limits()
    };
    let (s, _d) = server(seeded(), limits, None);

    // Exactly 4 MiB is accepted at v2 and answered.
    let mut raw = Raw::connect(s.socket_path());
    raw.handshake_v2();
    raw.send_body(&padded_request("big", MIB4));
    let reply = raw.recv();
    assert_eq!(reply["id"], json!("big"));
    assert_eq!(data(&reply)["access_token"], json!("at-anthropic-default"));
    // 65 537 is a normal (large) frame at v2.
    raw.send_body(&padded_request("mid", 65_537));
    assert_eq!(raw.recv()["id"], json!("mid"));

    // 4 MiB + 1 is closed at the header: nothing of the body is needed.
    raw.write(&((MIB4 + 1) as u32).to_be_bytes());
    let t0 = Instant::now();
    raw.expect_closed();
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "closed at the header"
    );

    // 65 537 before the handshake, and on a version-1 connection, is closed at the header.
    let mut raw = Raw::connect(s.socket_path());
    raw.write(&65_537u32.to_be_bytes());
    raw.expect_closed();
    let mut raw = Raw::connect(s.socket_path());
    raw.handshake();
    raw.write(&65_537u32.to_be_bytes());
    raw.expect_closed();
    // 65 536 at v1 is still a frame.
    let mut raw = Raw::connect(s.socket_path());
    raw.handshake();
    raw.send_body(&padded_request("edge", 65_536));
    assert_eq!(raw.recv()["id"], json!("edge"));
    s.shutdown_blocking().expect("shutdown");
}

/// A stored token whose served form is `len` bytes or so.
fn big_token(access: &str, len: usize) -> Token {
    Token::from_value(json!({
        "access_token": access, "refresh_token": "rt-big-canary", "expiry": 1_900_000_000u64,
        "token_type": "Bearer", "blob": "b".repeat(len)
    }))
    .expect("token")
}

#[test]
fn replies_over_the_limit_are_response_too_large_and_the_connection_stays() {
    let backend = seeded();
    backend
        .save_token(
            "anthropic",
            "big",
            &big_token("at-big", 200_000),
            credproxy::backend::SaveMode::Replace,
        )
        .expect("saved");
    // An API key too large for any reply (a hand-edited store can hold one).
    backend
        .set_key("huge", &Secret::new("k".repeat(MIB4 + 10)))
        .expect("saved");
    let (s, _d) = server(backend, short_limits(), None);

    let mut v1 = Raw::connect(s.socket_path());
    v1.handshake();
    let reply = v1.call(
        "t",
        "get_token",
        json!({"provider":"anthropic","bucket":"big"}),
    );
    let text = assert_err(&reply, "t", "RESPONSE_TOO_LARGE");
    assert!(!text.contains("bbbb") && !text.contains("at-big"), "{text}");
    // The connection is kept.
    let reply = v1.call("after", "get_token", json!({"provider":"anthropic"}));
    assert_eq!(data(&reply)["access_token"], json!("at-anthropic-default"));

    // At v2 the same token is served whole, without its refresh token.
    let mut v2 = Raw::connect(s.socket_path());
    v2.handshake_v2();
    let reply = v2.call(
        "t",
        "get_token",
        json!({"provider":"anthropic","bucket":"big"}),
    );
    assert_eq!(reply["v"], json!(2));
    let served = data(&reply);
    assert_eq!(served["access_token"], json!("at-big"));
    assert_eq!(served["blob"].as_str().map(str::len), Some(200_000));
    assert!(served.get("refresh_token").is_none());

    // A reply over 4 MiB at v2: RESPONSE_TOO_LARGE, and the connection stays.
    let reply = v2.call("k", "get_api_key", json!({"name":"huge"}));
    assert_eq!(reply["v"], json!(2));
    assert_eq!(code(&reply), "RESPONSE_TOO_LARGE");
    assert!(!reply.to_string().contains("kkkk"));
    let reply = v2.call("k2", "get_api_key", json!({"name":"openai"}));
    assert_eq!(data(&reply)["key"], json!("sk-openai"));
    s.shutdown_blocking().expect("shutdown");
}

/// Many connections each sending a large frame slowly: what the server holds of large
/// frames never exceeds its budget; connections over it wait (reading nothing) and are cut
/// by the partial-frame deadline; once the budget is free, a large frame is served again.
#[test]
fn large_frames_stay_within_the_budget() {
    const BUDGET: usize = 6 << 20;
    const FRAME: usize = 1 << 20;
    let limits = Limits {
        max_large_frames_total: BUDGET,
        partial_frame_timeout: Duration::from_millis(1500),
        rate_limit: 0,
        ..short_limits()
    };
    let (s, _d) = server(seeded(), limits, None);
    let ask = || futures_executor::block_on(s.addr().send(LargeFrameBytes)).expect("ask");

    // 40 connections start a 1 MiB frame each and stall after a few kilobytes.
    let mut stalled = Vec::new();
    for n in 0..40 {
        let mut raw = Raw::connect(s.socket_path());
        raw.handshake_v2();
        let body = padded_request(&format!("s{n}"), FRAME);
        raw.write(&frame(&body)[..8192]);
        stalled.push(raw);
    }
    std::thread::sleep(Duration::from_millis(500));
    let (held, peak) = ask();
    assert!(held <= BUDGET && peak <= BUDGET, "held {held}, peak {peak}");
    assert_eq!(held, 6 * FRAME, "the budget is used, not more");

    // A frame larger than the whole budget can never fit: closed at the header.
    let mut raw = Raw::connect(s.socket_path());
    raw.handshake_v2();
    raw.write(&((BUDGET + 1) as u32).to_be_bytes());
    raw.expect_closed();

    // Every stalled connection is closed by its partial-frame deadline (the ones waiting
    // for the budget too), and everything is given back.
    for raw in &mut stalled {
        raw.expect_closed();
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while ask().0 != 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(ask().0, 0, "every permit is released");

    // A complete large frame is served again.
    let mut raw = Raw::connect(s.socket_path());
    raw.handshake_v2();
    raw.send_body(&padded_request("after", FRAME));
    assert_eq!(raw.recv()["id"], json!("after"));
    assert!(ask().1 <= BUDGET);
    s.shutdown_blocking().expect("shutdown");
}

/// A connection waiting for the budget is served as soon as another frame's request is
/// answered (it does not have to wait for a close).
#[test]
fn a_frame_waiting_for_the_budget_proceeds_when_it_is_released() {
    const FRAME: usize = 2 << 20;
    let limits = Limits {
        max_large_frames_total: FRAME,
        partial_frame_timeout: Duration::from_secs(3),
        rate_limit: 0,
        ..short_limits()
    };
    let (s, _d) = server(seeded(), limits, None);
    let mut first = Raw::connect(s.socket_path());
    first.handshake_v2();
    let mut second = Raw::connect(s.socket_path());
    second.handshake_v2();
    let a = frame(&padded_request("a", FRAME));
    let b = frame(&padded_request("b", FRAME));
    // The first holds the budget with half a frame; the second's frame must wait.
    first.write(&a[..FRAME / 2]);
    std::thread::sleep(Duration::from_millis(200));
    let mut writer = second.stream.try_clone().expect("clone");
    let sender = std::thread::spawn(move || writer.write_all(&b));
    std::thread::sleep(Duration::from_millis(300));
    first.write(&a[FRAME / 2..]);
    assert_eq!(first.recv()["id"], json!("a"));
    assert_eq!(second.recv()["id"], json!("b"));
    sender.join().expect("join").expect("written");
    s.shutdown_blocking().expect("shutdown");
}

/// `save_token` (§7): a partial token merges into the stored one, as the llxprt-code
/// reference accepts it; with nothing stored it must be valid alone. At v2, a large
/// token is saved and served whole.
#[test]
fn partial_saves_merge_and_large_saves_work_at_v2() {
    let (s, _d) = server(seeded(), short_limits(), None);
    let mut raw = Raw::connect(s.socket_path());
    raw.handshake_v2();
    let reply = raw.call(
        "p",
        "save_token",
        json!({"provider":"anthropic","token":{"access_token":"at-new-only"}}),
    );
    assert_eq!(reply, json!({"v":2,"id":"p","ok":true,"data":{}}));
    let reply = raw.call("g", "get_token", json!({"provider":"anthropic"}));
    assert_eq!(
        data(&reply),
        &json!({"access_token":"at-new-only","expiry":1_900_000_000u64,"token_type":"Bearer","scope":null})
    );
    let reply = raw.call(
        "n",
        "save_token",
        json!({"provider":"anthropic","bucket":"fresh","token":{"access_token":"x"}}),
    );
    let text = reply["error"].as_str().unwrap_or_default().to_owned();
    assert_eq!(code(&reply), "INVALID_REQUEST");
    assert!(
        text.contains("expiry") || text.contains("token_type"),
        "{text}"
    );

    let blob = "z".repeat(3 << 20);
    let reply = raw.call(
        "big",
        "save_token",
        json!({"provider":"gemini","bucket":"large","token":{"access_token":"at-large","expiry":1_900_000_000u64,"token_type":"Bearer","blob":blob}}),
    );
    assert_eq!(data(&reply), &json!({}));
    let reply = raw.call(
        "gl",
        "get_token",
        json!({"provider":"gemini","bucket":"large"}),
    );
    assert_eq!(data(&reply)["blob"].as_str().map(str::len), Some(3 << 20));
    s.shutdown_blocking().expect("shutdown");
}
