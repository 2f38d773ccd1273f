//! Request envelope rules (PROTOCOL.md §5): `id`, `op`, `payload` and `v`, the shape of
//! error replies, and that an envelope error never closes the connection.

mod common;
use common::*;

use serde_json::{json, Value};

fn providers_data() -> Value {
    json!({"providers": ["anthropic", "gemini"]})
}

/// Sends a raw request value and returns the next reply.
fn send_recv(raw: &mut Raw, request: &Value) -> Value {
    raw.send(request);
    raw.try_recv()
        .unwrap_or_else(|| panic!("connection closed after {request}"))
}

/// The connection still answers a normal request.
fn assert_open(raw: &mut Raw) {
    let reply = raw.call("still-open", "list_providers", json!({}));
    assert_eq!(
        reply,
        json!({"v":1,"id":"still-open","ok":true,"data":providers_data()})
    );
}

/// Sends `request`, expects `INVALID_REQUEST` for `id`, then checks the connection is open.
fn assert_invalid_then_open(raw: &mut Raw, request: Value, id: &str) {
    let reply = send_recv(raw, &request);
    assert_err(&reply, id, "INVALID_REQUEST");
    assert_open(raw);
}

#[test]
fn missing_id_is_invalid_request_with_unknown_id() {
    let server = TestServer::start();
    let mut raw = server.connect();
    assert_invalid_then_open(
        &mut raw,
        json!({"v":1,"op":"list_providers","payload":{}}),
        "unknown",
    );
}

#[test]
fn integer_id_is_echoed_as_its_decimal_string() {
    let server = TestServer::start();
    let mut raw = server.connect();
    let reply = send_recv(
        &mut raw,
        &json!({"v":1,"id":42,"op":"list_providers","payload":{}}),
    );
    assert_eq!(
        reply,
        json!({"v":1,"id":"42","ok":true,"data":providers_data()})
    );
}

#[test]
fn other_integer_ids_are_echoed_as_decimal_strings() {
    let server = TestServer::start();
    let mut raw = server.connect();
    for (id, echoed) in [
        (json!(0), "0"),
        (json!(-7), "-7"),
        (json!(u64::MAX), "18446744073709551615"),
    ] {
        let reply = send_recv(
            &mut raw,
            &json!({"v":1,"id":id,"op":"list_providers","payload":{}}),
        );
        assert_eq!(
            reply,
            json!({"v":1,"id":echoed,"ok":true,"data":providers_data()}),
            "id {id}"
        );
    }
}

#[test]
fn integer_id_is_echoed_in_error_replies_too() {
    let server = TestServer::start();
    let mut raw = server.connect();
    let reply = send_recv(&mut raw, &json!({"v":1,"id":42,"op":"nope","payload":{}}));
    assert_eq!(
        reply,
        json!({"v":1,"id":"42","ok":false,"code":"INVALID_REQUEST","error":"unknown operation: nope"})
    );
}

#[test]
fn empty_string_id_is_invalid_request_with_unknown_id() {
    let server = TestServer::start();
    let mut raw = server.connect();
    assert_invalid_then_open(
        &mut raw,
        json!({"v":1,"id":"","op":"list_providers","payload":{}}),
        "unknown",
    );
}

#[test]
fn id_of_128_bytes_is_accepted() {
    let server = TestServer::start();
    let mut raw = server.connect();
    let id = "i".repeat(128);
    let reply = send_recv(
        &mut raw,
        &json!({"v":1,"id":id,"op":"list_providers","payload":{}}),
    );
    assert_eq!(
        reply,
        json!({"v":1,"id":id,"ok":true,"data":providers_data()})
    );
}

#[test]
fn id_of_129_bytes_is_invalid_request_with_unknown_id() {
    let server = TestServer::start();
    let mut raw = server.connect();
    assert_invalid_then_open(
        &mut raw,
        json!({"v":1,"id":"i".repeat(129),"op":"list_providers","payload":{}}),
        "unknown",
    );
}

#[test]
fn id_length_is_counted_in_bytes_not_characters() {
    let server = TestServer::start();
    let mut raw = server.connect();
    // 64 two-byte characters: 128 bytes, accepted.
    let fits = "é".repeat(64);
    assert_eq!(fits.len(), 128);
    let reply = send_recv(
        &mut raw,
        &json!({"v":1,"id":fits,"op":"list_providers","payload":{}}),
    );
    assert_eq!(
        reply,
        json!({"v":1,"id":fits,"ok":true,"data":providers_data()})
    );
    // 43 three-byte characters: 129 bytes in 43 characters, refused.
    let too_long = "€".repeat(43);
    assert_eq!(too_long.len(), 129);
    assert_invalid_then_open(
        &mut raw,
        json!({"v":1,"id":too_long,"op":"list_providers","payload":{}}),
        "unknown",
    );
}

#[test]
fn float_id_is_invalid_request_with_unknown_id() {
    let server = TestServer::start();
    let mut raw = server.connect();
    assert_invalid_then_open(
        &mut raw,
        json!({"v":1,"id":1.5,"op":"list_providers","payload":{}}),
        "unknown",
    );
}

#[test]
fn bool_id_is_invalid_request_with_unknown_id() {
    let server = TestServer::start();
    let mut raw = server.connect();
    assert_invalid_then_open(
        &mut raw,
        json!({"v":1,"id":true,"op":"list_providers","payload":{}}),
        "unknown",
    );
}

#[test]
fn object_id_is_invalid_request_with_unknown_id() {
    let server = TestServer::start();
    let mut raw = server.connect();
    assert_invalid_then_open(
        &mut raw,
        json!({"v":1,"id":{"id":"x"},"op":"list_providers","payload":{}}),
        "unknown",
    );
}

#[test]
fn array_and_null_ids_are_invalid_request_with_unknown_id() {
    let server = TestServer::start();
    let mut raw = server.connect();
    assert_invalid_then_open(
        &mut raw,
        json!({"v":1,"id":["x"],"op":"list_providers","payload":{}}),
        "unknown",
    );
    assert_invalid_then_open(
        &mut raw,
        json!({"v":1,"id":null,"op":"list_providers","payload":{}}),
        "unknown",
    );
}

#[test]
fn unknown_operation_names_are_invalid_request_naming_the_operation() {
    let server = TestServer::start();
    let mut raw = server.connect();
    for op in [
        "toString",
        "constructor",
        "__proto__",
        "hasOwnProperty",
        "GET_TOKEN",
        "get_token ",
        "handshake",
    ] {
        let reply = send_recv(&mut raw, &json!({"v":1,"id":"op","op":op,"payload":{}}));
        assert_eq!(
            reply,
            json!({"v":1,"id":"op","ok":false,"code":"INVALID_REQUEST","error":format!("unknown operation: {op}")}),
            "op {op:?}"
        );
    }
    assert_open(&mut raw);
}

#[test]
fn empty_operation_name_is_invalid_request() {
    let server = TestServer::start();
    let mut raw = server.connect();
    assert_invalid_then_open(&mut raw, json!({"v":1,"id":"e","op":"","payload":{}}), "e");
}

#[test]
fn non_string_op_is_invalid_request_with_the_id() {
    let server = TestServer::start();
    let mut raw = server.connect();
    for op in [
        json!(1),
        json!(null),
        json!(true),
        json!(["get_token"]),
        json!({"name":"get_token"}),
    ] {
        assert_invalid_then_open(
            &mut raw,
            json!({"v":1,"id":"nso","op":op,"payload":{}}),
            "nso",
        );
    }
}

#[test]
fn missing_op_is_invalid_request_with_the_id() {
    let server = TestServer::start();
    let mut raw = server.connect();
    assert_invalid_then_open(&mut raw, json!({"v":1,"id":"mo","payload":{}}), "mo");
}

#[test]
fn non_object_payload_is_invalid_request_with_the_id() {
    let server = TestServer::start();
    let mut raw = server.connect();
    for payload in [
        json!([]),
        json!(["anthropic"]),
        json!("anthropic"),
        json!(7),
        json!(true),
        json!(null),
    ] {
        assert_invalid_then_open(
            &mut raw,
            json!({"v":1,"id":"nop","op":"list_providers","payload":payload}),
            "nop",
        );
    }
}

#[test]
fn payload_type_is_checked_before_the_operation_name() {
    // Order of checks (§5): envelope before known operation.
    let server = TestServer::start();
    let mut raw = server.connect();
    let reply = send_recv(
        &mut raw,
        &json!({"v":1,"id":"ord","op":"no_such_op","payload":[]}),
    );
    assert_err(&reply, "ord", "INVALID_REQUEST");
    assert_ne!(
        reply["error"],
        json!("unknown operation: no_such_op"),
        "the payload type is an envelope check and comes first: {reply}"
    );
}

#[test]
fn missing_payload_means_empty_object() {
    let server = TestServer::start();
    let mut raw = server.connect();
    let reply = send_recv(&mut raw, &json!({"v":1,"id":"np","op":"list_providers"}));
    assert_eq!(
        reply,
        json!({"v":1,"id":"np","ok":true,"data":providers_data()})
    );
    let reply = send_recv(&mut raw, &json!({"v":1,"id":"nk","op":"list_api_keys"}));
    assert_eq!(
        reply,
        json!({"v":1,"id":"nk","ok":true,"data":{"keys":["anthropic","openai"]}})
    );
}

#[test]
fn v_is_ignored_after_the_handshake() {
    let server = TestServer::start();
    let mut raw = server.connect();
    for (id, v) in [
        ("v99", json!(99)),
        ("v0", json!(0)),
        ("vstr", json!("1")),
        ("vnull", json!(null)),
    ] {
        let reply = send_recv(
            &mut raw,
            &json!({"v":v,"id":id,"op":"list_providers","payload":{}}),
        );
        assert_eq!(
            reply,
            json!({"v":1,"id":id,"ok":true,"data":providers_data()}),
            "v {v}"
        );
    }
    let reply = send_recv(
        &mut raw,
        &json!({"id":"nov","op":"list_providers","payload":{}}),
    );
    assert_eq!(
        reply,
        json!({"v":1,"id":"nov","ok":true,"data":providers_data()})
    );
}

#[test]
fn unknown_top_level_fields_are_ignored() {
    let server = TestServer::start();
    let mut raw = server.connect();
    let reply = send_recv(
        &mut raw,
        &json!({"v":1,"id":"x","op":"list_providers","payload":{},"extra":{"a":1}}),
    );
    assert_eq!(
        reply,
        json!({"v":1,"id":"x","ok":true,"data":providers_data()})
    );
}

#[test]
fn connection_stays_open_across_a_run_of_envelope_errors() {
    let server = TestServer::start();
    let mut raw = server.connect();
    let bad = [
        (json!({"v":1,"op":"list_providers"}), "unknown"),
        (json!({"v":1,"id":"","op":"list_providers"}), "unknown"),
        (json!({"v":1,"id":false,"op":"list_providers"}), "unknown"),
        (json!({"v":1,"id":"a","op":7}), "a"),
        (json!({"v":1,"id":"b","op":"nope"}), "b"),
        (
            json!({"v":1,"id":"c","op":"list_providers","payload":"x"}),
            "c",
        ),
    ];
    for (request, id) in &bad {
        let reply = send_recv(&mut raw, request);
        assert_err(&reply, id, "INVALID_REQUEST");
    }
    assert_open(&mut raw);
    let reply = raw.call("tok", "get_token", json!({"provider":"anthropic"}));
    assert_eq!(data(&reply)["access_token"], json!("at-anthropic-default"));
}
