//! Framing rules (PROTOCOL.md §3): split and coalesced frames, the 65 536-byte limit, the
//! partial-frame deadline, idle connections, and malformed bodies.

mod common;
use common::*;

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Pause between two writes so that the server sees them as separate reads. Not an
/// assertion: the tests pass the same way if the kernel happens to coalesce the writes.
const GAP: Duration = Duration::from_millis(50);

/// Slack under a deadline for timer rounding; timers never fire early, this is margin only.
const EARLY_SLACK: Duration = Duration::from_millis(20);

/// A deadline that is enforced is enforced well within this (correctness, not speed).
const LATE_BOUND: Duration = Duration::from_millis(2500);

/// The largest frame body the protocol allows.
const MAX_BODY: usize = 65_536;

fn partial_deadline() -> Duration {
    short_limits().partial_frame_timeout
}

/// The sanitized `anthropic:default` token of the seeded store.
fn anthropic_default() -> Value {
    json!({"access_token":"at-anthropic-default","expiry":1_900_000_000,"token_type":"Bearer","scope":null})
}

fn get_token_request(id: &str) -> Value {
    json!({"v":1,"id":id,"op":"get_token","payload":{"provider":"anthropic"}})
}

fn get_token_reply(id: &str) -> Value {
    json!({"v":1,"id":id,"ok":true,"data":anthropic_default()})
}

/// Asserts that a close measured from before the first byte of the offending input came at
/// the configured deadline: not before it, and not absurdly after it.
fn assert_closed_at_deadline(elapsed: Duration, deadline: Duration) {
    assert!(
        elapsed + EARLY_SLACK >= deadline,
        "closed after {elapsed:?}, before the {deadline:?} deadline"
    );
    assert!(
        elapsed < LATE_BOUND,
        "closed after {elapsed:?}, far past the {deadline:?} deadline"
    );
}

/// Sends `body` as one frame on a fresh handshaken connection and expects the §3 error
/// frame, then a close.
fn assert_rejected_and_closed(server: &TestServer, body: &[u8]) {
    let mut raw = server.connect();
    raw.send_body(body);
    let reply = raw
        .try_recv()
        .unwrap_or_else(|| panic!("closed without the error frame for body {body:?}"));
    assert_malformed_frame_reply(&reply, 1);
    raw.expect_closed();
}

/// Asserts that the server still answers on a fresh connection.
fn assert_still_serving(server: &TestServer) {
    let mut raw = server.connect();
    assert_eq!(
        raw.call("fresh", "get_token", json!({"provider":"anthropic"})),
        get_token_reply("fresh")
    );
}

/// A `get_token` request body padded with trailing whitespace to exactly `len` bytes.
fn whitespace_padded_request(id: &str, len: usize) -> Vec<u8> {
    let mut body = get_token_request(id).to_string().into_bytes();
    assert!(body.len() <= len);
    body.resize(len, b' ');
    body
}

#[test]
fn header_split_one_and_three_bytes_is_reassembled() {
    let server = TestServer::start();
    let mut raw = server.connect();
    let bytes = frame(get_token_request("split13").to_string().as_bytes());
    raw.write(&bytes[..1]);
    thread::sleep(GAP);
    raw.write(&bytes[1..4]);
    thread::sleep(GAP);
    raw.write(&bytes[4..]);
    assert_eq!(raw.recv(), get_token_reply("split13"));
}

#[test]
fn header_split_two_and_two_bytes_is_reassembled() {
    let server = TestServer::start();
    let mut raw = server.connect();
    let bytes = frame(get_token_request("split22").to_string().as_bytes());
    raw.write(&bytes[..2]);
    thread::sleep(GAP);
    raw.write(&bytes[2..4]);
    thread::sleep(GAP);
    raw.write(&bytes[4..]);
    assert_eq!(raw.recv(), get_token_reply("split22"));
}

#[test]
fn body_split_across_writes_is_reassembled() {
    let server = TestServer::start();
    let mut raw = server.connect();
    let bytes = frame(get_token_request("splitbody").to_string().as_bytes());
    let mid = 4 + (bytes.len() - 4) / 2;
    raw.write(&bytes[..mid]);
    thread::sleep(GAP);
    raw.write(&bytes[mid..]);
    assert_eq!(raw.recv(), get_token_reply("splitbody"));
}

#[test]
fn many_frames_in_one_write_are_all_answered() {
    let server = TestServer::start();
    let mut raw = server.connect();
    let ids: Vec<String> = (0..10).map(|i| format!("many-{i}")).collect();
    let mut bytes = Vec::new();
    for id in &ids {
        bytes.extend(frame(get_token_request(id).to_string().as_bytes()));
    }
    raw.write(&bytes);
    // Replies may come in any order (§5); match them by id.
    let mut replies = BTreeMap::new();
    for _ in &ids {
        let reply = raw.recv();
        let id = reply["id"]
            .as_str()
            .expect("reply has a string id")
            .to_owned();
        assert!(
            replies.insert(id, reply).is_none(),
            "two replies for one id"
        );
    }
    for id in &ids {
        assert_eq!(
            replies.get(id),
            Some(&get_token_reply(id)),
            "reply for {id}"
        );
    }
}

#[test]
fn handshake_and_request_in_one_write_are_both_answered() {
    let server = TestServer::start();
    let mut raw = Raw::connect(&server.path);
    let mut bytes = frame(
        json!({"v":1,"op":"handshake","payload":{"minVersion":1,"maxVersion":1}})
            .to_string()
            .as_bytes(),
    );
    bytes.extend(frame(get_token_request("pipelined").to_string().as_bytes()));
    raw.write(&bytes);
    assert_eq!(
        raw.recv(),
        json!({"v":1,"op":"handshake","ok":true,"data":{"version":1}})
    );
    assert_eq!(raw.recv(), get_token_reply("pipelined"));
}

#[test]
fn frame_and_a_half_in_one_write_then_the_rest() {
    let server = TestServer::start();
    let mut raw = server.connect();
    let mut bytes = frame(get_token_request("first").to_string().as_bytes());
    let second = frame(get_token_request("second").to_string().as_bytes());
    let cut = second.len() / 2;
    bytes.extend_from_slice(&second[..cut]);
    raw.write(&bytes);
    assert_eq!(raw.recv(), get_token_reply("first"));
    raw.write(&second[cut..]);
    assert_eq!(raw.recv(), get_token_reply("second"));
}

#[test]
fn body_of_exactly_65536_bytes_padded_with_whitespace_is_accepted() {
    let server = TestServer::start();
    let mut raw = server.connect();
    let body = whitespace_padded_request("max-ws", MAX_BODY);
    assert_eq!(body.len(), MAX_BODY);
    raw.send_body(&body);
    assert_eq!(raw.recv(), get_token_reply("max-ws"));
}

#[test]
fn body_of_exactly_65536_bytes_with_an_ignored_payload_field_is_accepted() {
    let server = TestServer::start();
    let mut raw = server.connect();
    let empty =
        json!({"v":1,"id":"max-pad","op":"get_token","payload":{"provider":"anthropic","pad":""}});
    let pad = "x".repeat(MAX_BODY - empty.to_string().len());
    let request =
        json!({"v":1,"id":"max-pad","op":"get_token","payload":{"provider":"anthropic","pad":pad}});
    let body = request.to_string().into_bytes();
    assert_eq!(body.len(), MAX_BODY);
    raw.send_body(&body);
    assert_eq!(raw.recv(), get_token_reply("max-pad"));
}

#[test]
fn header_announcing_65537_bytes_closes_without_reply() {
    let server = TestServer::start();
    let mut raw = server.connect();
    let t0 = Instant::now();
    raw.write(&65_537u32.to_be_bytes());
    raw.write(b"{\"v\":1");
    raw.expect_closed();
    // The length is checked on the header alone: no waiting for the partial deadline.
    let elapsed = t0.elapsed();
    assert!(
        elapsed < partial_deadline(),
        "oversize header closed only after {elapsed:?} (the partial-frame deadline is {:?})",
        partial_deadline()
    );
}

#[test]
fn header_announcing_u32_max_closes_without_reply() {
    let server = TestServer::start();
    let mut raw = server.connect();
    raw.write(&u32::MAX.to_be_bytes());
    raw.expect_closed();
}

#[test]
fn oversize_header_before_handshake_closes_without_reply() {
    let server = TestServer::start();
    let mut raw = Raw::connect(&server.path);
    raw.write(&65_537u32.to_be_bytes());
    raw.expect_closed();
}

#[test]
fn partial_body_is_closed_at_the_partial_frame_deadline() {
    let server = TestServer::start();
    let mut raw = server.connect();
    let bytes = frame(get_token_request("partial").to_string().as_bytes());
    let t0 = Instant::now();
    raw.write(&bytes[..14]);
    raw.expect_closed();
    assert_closed_at_deadline(t0.elapsed(), partial_deadline());
}

#[test]
fn partial_header_is_closed_at_the_partial_frame_deadline() {
    let server = TestServer::start();
    let mut raw = server.connect();
    let t0 = Instant::now();
    raw.write(&[0, 0]);
    raw.expect_closed();
    assert_closed_at_deadline(t0.elapsed(), partial_deadline());
}

#[test]
fn slow_drip_is_cut_at_the_deadline_of_the_first_byte() {
    let server = TestServer::start();
    let mut raw = server.connect();
    let bytes = frame(get_token_request("drip").to_string().as_bytes());
    let step = Duration::from_millis(100);
    // The whole drip would take several times the deadline.
    assert!(step * bytes.len() as u32 > partial_deadline() * 10);
    let mut writer = raw.stream.try_clone().expect("clone the stream");
    let stop = Arc::new(AtomicBool::new(false));
    let stop_writer = Arc::clone(&stop);
    let t0 = Instant::now();
    let dripper = thread::spawn(move || {
        for byte in bytes {
            if stop_writer.load(Ordering::SeqCst) || writer.write_all(&[byte]).is_err() {
                return;
            }
            thread::sleep(step);
        }
    });
    // A reply here (the frame completed) or a read timeout fails the test.
    raw.expect_closed();
    let elapsed = t0.elapsed();
    stop.store(true, Ordering::SeqCst);
    dripper.join().expect("dripper thread");
    assert_closed_at_deadline(elapsed, partial_deadline());
}

#[test]
fn idle_connection_after_handshake_is_not_closed() {
    let server = TestServer::start();
    let mut raw = server.connect();
    thread::sleep(partial_deadline() * 2 + Duration::from_millis(100));
    assert_eq!(
        raw.call("after-idle", "get_token", json!({"provider":"anthropic"})),
        get_token_reply("after-idle")
    );
}

#[test]
fn idle_connection_between_requests_is_not_closed() {
    let server = TestServer::start();
    let mut raw = server.connect();
    assert_eq!(
        raw.call("before", "get_token", json!({"provider":"anthropic"})),
        get_token_reply("before")
    );
    thread::sleep(partial_deadline() * 2 + Duration::from_millis(100));
    assert_eq!(
        raw.call("after", "get_token", json!({"provider":"anthropic"})),
        get_token_reply("after")
    );
}

#[test]
fn completed_frame_disarms_the_partial_frame_deadline() {
    let server = TestServer::start();
    let mut raw = server.connect();
    let bytes = frame(get_token_request("slow-but-ok").to_string().as_bytes());
    let cut = bytes.len() / 2;
    raw.write(&bytes[..cut]);
    thread::sleep(partial_deadline() / 2);
    raw.write(&bytes[cut..]);
    assert_eq!(raw.recv(), get_token_reply("slow-but-ok"));
    // Past the deadline the first frame's timer would have had: the connection is idle now.
    thread::sleep(partial_deadline());
    assert_eq!(
        raw.call("next", "get_token", json!({"provider":"anthropic"})),
        get_token_reply("next")
    );
}

#[test]
fn zero_length_body_gets_invalid_request_without_id_then_close() {
    let server = TestServer::start();
    assert_rejected_and_closed(&server, b"");
}

#[test]
fn non_utf8_body_gets_invalid_request_without_id_then_close() {
    let server = TestServer::start();
    assert_rejected_and_closed(&server, b"\xff\xfe\xfd");
}

#[test]
fn non_utf8_inside_an_otherwise_valid_request_gets_invalid_request_then_close() {
    let server = TestServer::start();
    assert_rejected_and_closed(
        &server,
        b"{\"v\":1,\"id\":\"\xff\",\"op\":\"get_token\",\"payload\":{\"provider\":\"anthropic\"}}",
    );
}

#[test]
fn invalid_json_body_gets_invalid_request_without_id_then_close() {
    let server = TestServer::start();
    assert_rejected_and_closed(&server, b"{\"v\":1,\"id\":\"a\",");
}

#[test]
fn json_array_body_gets_invalid_request_without_id_then_close() {
    let server = TestServer::start();
    assert_rejected_and_closed(
        &server,
        b"[{\"v\":1,\"id\":\"a\",\"op\":\"list_providers\"}]",
    );
}

#[test]
fn json_number_body_gets_invalid_request_without_id_then_close() {
    let server = TestServer::start();
    assert_rejected_and_closed(&server, b"42");
}

#[test]
fn json_null_body_gets_invalid_request_without_id_then_close() {
    let server = TestServer::start();
    assert_rejected_and_closed(&server, b"null");
}

#[test]
fn json_string_body_gets_invalid_request_without_id_then_close() {
    let server = TestServer::start();
    assert_rejected_and_closed(&server, b"\"get_token\"");
}

#[test]
fn json_bool_body_gets_invalid_request_without_id_then_close() {
    let server = TestServer::start();
    assert_rejected_and_closed(&server, b"true");
}

#[test]
fn malformed_first_frame_gets_invalid_request_without_id_then_close() {
    // Before the handshake, §3 and §4 both apply; either way: INVALID_REQUEST, no id, close.
    let server = TestServer::start();
    let mut raw = Raw::connect(&server.path);
    raw.send_body(b"not json");
    let reply = raw.try_recv().expect("an error frame before the close");
    assert_eq!(code(&reply), "INVALID_REQUEST");
    assert!(reply.get("id").is_none(), "error frame has an id: {reply}");
    raw.expect_closed();
}

#[test]
fn frames_after_a_malformed_one_in_the_same_write_are_not_answered() {
    let server = TestServer::start();
    let mut raw = server.connect();
    let mut bytes = frame(b"[]");
    bytes.extend(frame(get_token_request("after-bad").to_string().as_bytes()));
    raw.write(&bytes);
    assert_malformed_frame_reply(&raw.recv(), 1);
    raw.expect_closed();
}

#[test]
fn server_still_serves_a_fresh_connection_after_each_kind_of_close() {
    let server = TestServer::start();

    let mut oversize = server.connect();
    oversize.write(&65_537u32.to_be_bytes());
    oversize.expect_closed();
    assert_still_serving(&server);

    let mut partial = server.connect();
    partial.write(&[0, 0, 0]);
    partial.expect_closed();
    assert_still_serving(&server);

    assert_rejected_and_closed(&server, b"null");
    assert_still_serving(&server);

    let mut silent = Raw::connect(&server.path);
    silent.expect_closed();
    assert_still_serving(&server);
}
