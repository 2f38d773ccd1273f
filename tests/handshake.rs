//! Handshake rules (PROTOCOL.md §4, with §13's version 2): negotiation, the replies, the
//! first-frame rule and the handshake deadline. A rejected handshake carries `"v":2`, the
//! server's highest version. tests/protocol_v2.rs has the full version-2 matrix.

mod common;
use common::*;

use std::thread;
use std::time::{Duration, Instant};

use credproxy::backend::Backend;
use credproxy::Limits;
use serde_json::{json, Value};

/// Slack under a deadline for timer rounding; timers never fire early, this is margin only.
const EARLY_SLACK: Duration = Duration::from_millis(20);

/// A deadline that is enforced is enforced well within this (correctness, not speed).
const LATE_BOUND: Duration = Duration::from_millis(2500);

fn handshake_ok() -> Value {
    json!({"v":1,"op":"handshake","ok":true,"data":{"version":1}})
}

fn unknown_version() -> Value {
    json!({"v":2,"op":"handshake","ok":false,"code":"UNKNOWN_VERSION","error":"unsupported protocol version"})
}

fn handshake_required() -> Value {
    json!({"v":2,"op":"handshake","ok":false,"code":"INVALID_REQUEST","error":"handshake required"})
}

/// Sends `first` as the first frame of a fresh connection and returns the connection and
/// the reply.
fn first_frame(server: &TestServer, first: &Value) -> (Raw, Value) {
    let mut raw = Raw::connect(&server.path);
    raw.send(first);
    let reply = raw
        .try_recv()
        .unwrap_or_else(|| panic!("closed without a reply to {first}"));
    (raw, reply)
}

/// The first frame is answered with `expected` and the connection is then closed.
fn assert_refused(server: &TestServer, first: Value, expected: Value) {
    let (mut raw, reply) = first_frame(server, &first);
    assert_eq!(reply, expected, "reply to {first}");
    raw.expect_closed();
}

/// The first frame is accepted as a handshake for version 1 and requests are served.
fn assert_accepted(server: &TestServer, first: Value) {
    assert_accepted_at(server, first, 1);
}

/// The first frame is accepted as a handshake for `version` and requests are served.
fn assert_accepted_at(server: &TestServer, first: Value, version: i64) {
    let (mut raw, reply) = first_frame(server, &first);
    let expected = json!({"v":version,"op":"handshake","ok":true,"data":{"version":version}});
    assert_eq!(reply, expected, "reply to {first}");
    let providers = raw.call("after-hs", "list_providers", json!({}));
    assert_eq!(
        data(&providers),
        &json!({"providers":["anthropic","gemini"]})
    );
}

fn stored_access_token(server: &TestServer, provider: &str, bucket: &str) -> Option<Value> {
    server
        .backend
        .get_token(provider, bucket)
        .expect("memory store answers")
        .map(|t| t.fields()["access_token"].clone())
}

#[test]
fn handshake_for_version_1_succeeds() {
    let server = TestServer::start();
    assert_accepted(
        &server,
        json!({"v":1,"op":"handshake","payload":{"minVersion":1,"maxVersion":1}}),
    );
}

#[test]
fn handshake_reply_has_no_id() {
    let server = TestServer::start();
    let (_raw, reply) = first_frame(
        &server,
        &json!({"v":1,"op":"handshake","payload":{"minVersion":1,"maxVersion":1}}),
    );
    assert!(
        reply.get("id").is_none(),
        "handshake reply has an id: {reply}"
    );
    assert_eq!(reply, handshake_ok());
}

#[test]
fn handshake_reply_has_no_id_even_when_the_handshake_carries_one() {
    let server = TestServer::start();
    let (_raw, reply) = first_frame(
        &server,
        &json!({"v":1,"id":"hs-1","op":"handshake","payload":{"minVersion":1,"maxVersion":1}}),
    );
    assert_eq!(reply, handshake_ok());
}

#[test]
fn wider_range_negotiates_the_highest_supported_version() {
    let server = TestServer::start();
    assert_accepted_at(
        &server,
        json!({"v":1,"op":"handshake","payload":{"minVersion":1,"maxVersion":5}}),
        2,
    );
    assert_accepted(
        &server,
        json!({"v":1,"op":"handshake","payload":{"minVersion":0,"maxVersion":1}}),
    );
}

#[test]
fn range_without_version_1_or_2_is_unknown_version_then_close() {
    let server = TestServer::start();
    assert_refused(
        &server,
        json!({"v":1,"op":"handshake","payload":{"minVersion":3,"maxVersion":4}}),
        unknown_version(),
    );
    assert_accepted_at(
        &server,
        json!({"v":1,"op":"handshake","payload":{"minVersion":2,"maxVersion":3}}),
        2,
    );
}

#[test]
fn inverted_range_is_unknown_version_then_close() {
    let server = TestServer::start();
    assert_refused(
        &server,
        json!({"v":1,"op":"handshake","payload":{"minVersion":2,"maxVersion":1}}),
        unknown_version(),
    );
}

#[test]
fn non_integer_range_bounds_are_unknown_version_then_close() {
    let server = TestServer::start();
    assert_refused(
        &server,
        json!({"v":1,"op":"handshake","payload":{"minVersion":"1","maxVersion":1}}),
        unknown_version(),
    );
    assert_refused(
        &server,
        json!({"v":1,"op":"handshake","payload":{"minVersion":1,"maxVersion":null}}),
        unknown_version(),
    );
}

#[test]
fn missing_range_falls_back_to_v_1() {
    let server = TestServer::start();
    assert_accepted(&server, json!({"v":1,"op":"handshake"}));
    assert_accepted(&server, json!({"v":1,"op":"handshake","payload":{}}));
}

#[test]
fn half_range_falls_back_to_v() {
    let server = TestServer::start();
    assert_accepted(
        &server,
        json!({"v":1,"op":"handshake","payload":{"minVersion":1}}),
    );
    assert_accepted(
        &server,
        json!({"v":1,"op":"handshake","payload":{"maxVersion":7}}),
    );
    assert_accepted_at(
        &server,
        json!({"v":2,"op":"handshake","payload":{"minVersion":1}}),
        2,
    );
    assert_refused(
        &server,
        json!({"v":3,"op":"handshake","payload":{"minVersion":1}}),
        unknown_version(),
    );
}

#[test]
fn missing_range_with_v_3_is_unknown_version_then_close() {
    let server = TestServer::start();
    assert_refused(&server, json!({"v":3,"op":"handshake"}), unknown_version());
    assert_accepted_at(&server, json!({"v":2,"op":"handshake"}), 2);
}

#[test]
fn missing_range_and_missing_v_is_unknown_version_then_close() {
    let server = TestServer::start();
    assert_refused(&server, json!({"op":"handshake"}), unknown_version());
}

#[test]
fn missing_range_with_non_integer_v_is_unknown_version_then_close() {
    let server = TestServer::start();
    assert_refused(
        &server,
        json!({"v":"1","op":"handshake"}),
        unknown_version(),
    );
}

#[test]
fn remove_token_before_handshake_is_refused_and_never_executed() {
    let server = TestServer::start();
    assert_refused(
        &server,
        json!({"v":1,"id":"r1","op":"remove_token","payload":{"provider":"anthropic"}}),
        handshake_required(),
    );
    assert_eq!(
        stored_access_token(&server, "anthropic", "default"),
        Some(json!("at-anthropic-default"))
    );
    let mut raw = server.connect();
    let reply = raw.call("g1", "get_token", json!({"provider":"anthropic"}));
    assert_eq!(data(&reply)["access_token"], json!("at-anthropic-default"));
}

#[test]
fn save_token_before_handshake_is_refused_and_never_executed() {
    let server = TestServer::start();
    let token = json!({"access_token":"at-intruder","expiry":1_900_000_000,"token_type":"Bearer"});
    assert_refused(
        &server,
        json!({"v":1,"id":"s1","op":"save_token","payload":{"provider":"anthropic","token":token}}),
        handshake_required(),
    );
    assert_refused(
        &server,
        json!({"v":1,"id":"s2","op":"save_token","payload":{"provider":"newprov","token":token}}),
        handshake_required(),
    );
    assert_eq!(
        stored_access_token(&server, "anthropic", "default"),
        Some(json!("at-anthropic-default"))
    );
    assert_eq!(stored_access_token(&server, "newprov", "default"), None);
    let mut raw = server.connect();
    let reply = raw.call("g1", "get_token", json!({"provider":"newprov"}));
    assert_eq!(code(&reply), "NOT_FOUND");
}

#[test]
fn get_token_before_handshake_is_refused_and_never_executed() {
    let server = TestServer::start();
    assert_refused(
        &server,
        json!({"v":1,"id":"g0","op":"get_token","payload":{"provider":"anthropic"}}),
        handshake_required(),
    );
    // A get_token that ran would have been counted in the bucket stats (§7).
    let mut raw = server.connect();
    let stats = raw.call(
        "st",
        "get_bucket_stats",
        json!({"provider":"anthropic","bucket":"default"}),
    );
    assert_eq!(data(&stats)["requestCount"], json!(0), "stats: {stats}");
}

#[test]
fn first_frame_without_op_is_handshake_required_then_close() {
    let server = TestServer::start();
    assert_refused(
        &server,
        json!({"v":1,"payload":{"minVersion":1,"maxVersion":1}}),
        handshake_required(),
    );
}

#[test]
fn first_frame_with_other_spelling_of_handshake_is_handshake_required_then_close() {
    let server = TestServer::start();
    assert_refused(
        &server,
        json!({"v":1,"op":"HANDSHAKE","payload":{"minVersion":1,"maxVersion":1}}),
        handshake_required(),
    );
}

#[test]
fn handshake_deadline_closes_a_silent_connection() {
    let server = TestServer::start();
    let deadline = short_limits().handshake_timeout;
    let t0 = Instant::now();
    let mut raw = Raw::connect(&server.path);
    raw.expect_closed();
    let elapsed = t0.elapsed();
    assert!(
        elapsed + EARLY_SLACK >= deadline,
        "closed after {elapsed:?}, before the {deadline:?} handshake deadline"
    );
    assert!(
        elapsed < LATE_BOUND,
        "closed after {elapsed:?}, far past the {deadline:?} handshake deadline"
    );
}

#[test]
fn handshake_deadline_counts_from_accept_not_from_the_first_byte() {
    // A long partial-frame deadline, so only the handshake deadline can close in time.
    let limits = Limits {
        partial_frame_timeout: Duration::from_secs(4),
        ..short_limits()
    };
    let deadline = limits.handshake_timeout;
    let server = TestServer::start_with(allow_all(), limits, seeded());
    let t0 = Instant::now();
    let mut raw = Raw::connect(&server.path);
    thread::sleep(deadline / 2);
    raw.write(&[0, 0]);
    raw.expect_closed();
    let elapsed = t0.elapsed();
    assert!(
        elapsed + EARLY_SLACK >= deadline,
        "closed after {elapsed:?}, before the {deadline:?} handshake deadline"
    );
    assert!(
        elapsed < Duration::from_secs(2),
        "closed after {elapsed:?}: the handshake deadline ({deadline:?} from accept) was not applied"
    );
}

#[test]
fn completed_handshake_is_not_closed_by_the_handshake_deadline() {
    let server = TestServer::start();
    let mut raw = server.connect();
    thread::sleep(short_limits().handshake_timeout * 2);
    let reply = raw.call("late", "list_providers", json!({}));
    assert_eq!(data(&reply), &json!({"providers":["anthropic","gemini"]}));
}

#[test]
fn second_handshake_is_an_unknown_operation_and_keeps_the_connection() {
    let server = TestServer::start();
    let mut raw = server.connect();
    raw.send(&json!({"v":1,"id":"hs2","op":"handshake","payload":{"minVersion":1,"maxVersion":1}}));
    assert_eq!(
        raw.recv(),
        json!({"v":1,"id":"hs2","ok":false,"code":"INVALID_REQUEST","error":"unknown operation: handshake"})
    );
    let reply = raw.call("after", "list_providers", json!({}));
    assert_eq!(data(&reply), &json!({"providers":["anthropic","gemini"]}));
}
