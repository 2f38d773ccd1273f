//! Issue 13 item 6, with version 2's 4 MiB frames (PROTOCOL.md §13): merged saves must not
//! build a token whose served form no longer fits in a version-2 `get_token` reply. A
//! `save_token` whose merged result would be too large is refused with `INVALID_REQUEST`
//! and nothing is written; the last accepted token is still served whole at version 2,
//! even to a request with the longest, most expensive id the protocol allows, and is
//! `RESPONSE_TOO_LARGE` on a version-1 connection, which stays open.

mod common;
use common::*;

use credproxy::backend::Backend;
use credproxy::Limits;
use serde_json::{json, Value};

/// Saves `{field: "x" * len}` into `anthropic:default` (merged into what is stored).
fn save_field(c: &mut Raw, id: &str, field: &str, len: usize) -> Value {
    let token = json!({"access_token": "at-grown", "expiry": 1_900_000_000, "token_type": "Bearer", field: "x".repeat(len)});
    c.call(
        id,
        "save_token",
        json!({"provider":"anthropic","bucket":"default","token": token}),
    )
}

#[test]
fn merged_save_that_would_not_fit_a_reply_is_refused_and_nothing_is_written() {
    // No rate limit: the test takes a hundred small steps towards the limit.
    let limits = Limits {
        rate_limit: 0,
        ..short_limits()
    };
    let server = TestServer::start_with(allow_all(), limits, seeded());
    let mut c = Raw::connect(&server.path);
    c.handshake_v2();

    // Grow the stored token by merged saves with shrinking steps, so that it ends within
    // a few bytes of the largest size that can still be served.
    let mut n = 0;
    let mut refused = 0;
    for step in [1_000_000, 100_000, 10_000, 1_000, 50, 1] {
        loop {
            n += 1;
            let reply = save_field(&mut c, &format!("s{n}"), &format!("f{n:04}"), step);
            if reply["ok"] == json!(true) {
                assert_eq!(reply, ok_v(&format!("s{n}"), json!({}), 2));
                assert!(n < 200, "the token grew without bound");
                continue;
            }
            let msg = assert_err_v(&reply, &format!("s{n}"), "INVALID_REQUEST", 2);
            assert!(msg.contains("too large"), "{msg}");
            assert!(
                !msg.contains("xxxx"),
                "no token content in the message: {msg}"
            );
            refused += 1;
            break;
        }
    }
    assert_eq!(refused, 6);

    // Nothing of the refused saves was written: the stored token holds exactly the
    // accepted fields (the last refused one of each step is absent).
    let stored = server
        .backend
        .get_token("anthropic", "default")
        .expect("store readable")
        .expect("token stored");
    let fields = stored.fields();
    assert!(!fields.contains_key(&format!("f{n:04}")));
    assert!(fields.contains_key(&format!("f{:04}", n - 1)));
    assert_eq!(
        fields.get("refresh_token"),
        Some(&json!("rt-anthropic-default")),
        "the refresh token survives the merges"
    );

    // The id that costs most in a reply: 128 bytes that each escape to six.
    let worst_id: String = "\u{1}".repeat(credproxy::protocol::MAX_ID_LEN);
    let reply = c.call(
        &worst_id,
        "get_token",
        json!({"provider":"anthropic","bucket":"default"}),
    );
    let served = data(&reply);
    assert_eq!(served["access_token"], json!("at-grown"));
    assert!(served.get(format!("f{:04}", n - 1)).is_some());
    assert!(served.get(format!("f{n:04}")).is_none());
    assert!(served.get("refresh_token").is_none());

    // On a version-1 connection the same token is too large for a reply; the connection
    // stays.
    let mut v1 = server.connect();
    let reply = v1.call("v1", "get_token", json!({"provider":"anthropic"}));
    let msg = assert_err(&reply, "v1", "RESPONSE_TOO_LARGE");
    assert!(!msg.contains("xxxx") && !msg.contains("at-grown"), "{msg}");
    let reply = v1.call("v1b", "get_token", json!({"provider":"gemini"}));
    assert_eq!(data(&reply)["access_token"], json!("at-gemini-default"));

    // A save that shrinks a field is still accepted at the limit.
    let reply = save_field(&mut c, "shrink", "f0001", 10);
    assert_eq!(reply, ok_v("shrink", json!({}), 2));
}

/// The host's `credproxy store token set` is held to the same bound (the check sits in the
/// backend, under the store's lock): a token that could never be served is refused with a
/// clear message, and nothing is written.
#[test]
fn the_host_cannot_store_a_token_too_large_to_serve() {
    use common::process::{run, Env, Fixture, Stdin, BIN};
    let f = Fixture::new();
    let huge = serde_json::json!({
        "access_token": "a".repeat(credproxy::protocol::MAX_SERVED_TOKEN_LEN),
        "refresh_token": "rt-host-canary",
        "expiry": 1_900_000_000u64,
        "token_type": "Bearer",
    })
    .to_string();
    let run = run(
        BIN,
        &[
            "store",
            "token",
            "set",
            "anthropic",
            "--store",
            f.store_str(),
        ],
        Stdin::PipeAll(huge.as_bytes()),
        Env::ISOLATED,
    );
    assert_eq!(run.code(), Some(1), "{run:?}");
    assert!(
        run.stderr.contains("the token is too large") && !run.stderr.contains("rt-host-canary"),
        "{run:?}"
    );
    assert!(
        !f.store.join("tokens/anthropic/default.json").exists(),
        "a refused token was written"
    );
}

/// `credproxy store token set` and `store key set` take values up to the version-2 limit
/// (PROTOCOL.md §13): a 3 MiB token and a 2 MiB key are stored by the host, served whole to
/// a version-2 client by `credproxy serve`, and answered `RESPONSE_TOO_LARGE` to a
/// version-1 client, whose connection stays; the refresh token never crosses.
#[test]
fn the_host_stores_large_values_that_version_2_clients_get_whole() {
    use common::process::{run, Env, Fixture, Stdin, BIN};
    let f = Fixture::new();
    let blob = "y".repeat(3 << 20);
    let big = serde_json::json!({
        "access_token": "at-large", "refresh_token": "rt-large-canary",
        "expiry": 1_900_000_000u64, "token_type": "Bearer", "id_token": blob,
    })
    .to_string();
    let set = |args: &[&str], stdin: &[u8]| {
        let mut all = vec!["store"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--store", f.store_str()]);
        run(BIN, &all, Stdin::PipeAll(stdin), Env::ISOLATED)
    };
    let r = set(&["token", "set", "anthropic"], big.as_bytes());
    assert_eq!(r.code(), Some(0), "{r:?}");
    let key = "k".repeat(2 << 20);
    let r = set(&["key", "set", "openai"], key.as_bytes());
    assert_eq!(r.code(), Some(0), "{r:?}");
    // A key that no reply could carry is refused and not stored.
    let r = set(&["key", "set", "huge"], "h".repeat(4 << 20).as_bytes());
    assert_eq!(r.code(), Some(2), "{r:?}");
    assert!(r.stderr.contains("more than a reply can carry"), "{r:?}");
    assert!(!r.stderr.contains("hhhh"), "{r:?}");

    let server = f.start_serve(&["--allow-all", "--no-refresh"], Env::ISOLATED);
    let mut v2 = Raw::connect(&server.socket);
    v2.handshake_v2();
    let reply = v2.call("t", "get_token", json!({"provider":"anthropic"}));
    let served = data(&reply);
    assert_eq!(served["access_token"], json!("at-large"));
    assert_eq!(served["id_token"].as_str().map(str::len), Some(3 << 20));
    assert!(served.get("refresh_token").is_none());
    let reply = v2.call("k", "get_api_key", json!({"name":"openai"}));
    assert_eq!(data(&reply)["key"].as_str().map(str::len), Some(2 << 20));

    let mut v1 = Raw::connect(&server.socket);
    v1.handshake();
    let reply = v1.call("t", "get_token", json!({"provider":"anthropic"}));
    assert_err(&reply, "t", "RESPONSE_TOO_LARGE");
    let reply = v1.call("l", "list_api_keys", json!({}));
    assert_eq!(data(&reply), &json!({"keys":["openai"]}));
}
