//! The loaded profile (PROTOCOL.md §8): what is outside it is `UNAUTHORIZED`, lists leave
//! it out, read-only mode refuses writes with `FORBIDDEN`, and the payload schema is
//! checked before scope (§5).

mod common;
use common::*;

use credproxy::backend::Backend;
use credproxy::policy::Profile;
use credproxy::secret::Secret;
use serde_json::{json, Value};

// ---- helpers ----

fn profile(allows: &[&str], keys: &[&str]) -> Profile {
    let mut p = Profile::default();
    for spec in allows {
        p.allow(spec).expect("valid --allow spec");
    }
    for key in keys {
        p.allow_key(key).expect("valid --allow-key name");
    }
    p
}

fn serve(p: Profile) -> TestServer {
    TestServer::start_with(p, short_limits(), seeded())
}

/// Asserts `UNAUTHORIZED` with a message starting with `UNAUTHORIZED: ` (llxprt clients
/// look for that word).
fn assert_unauthorized(reply: &Value, id: &str) {
    let message = assert_err(reply, id, "UNAUTHORIZED");
    assert!(
        message.starts_with("UNAUTHORIZED: "),
        "message must start with `UNAUTHORIZED: `: {message:?}"
    );
}

fn stored(ts: &TestServer, provider: &str, bucket: &str) -> Option<Value> {
    ts.backend
        .get_token(provider, bucket)
        .expect("backend read")
        .map(|t| Value::Object(t.fields().clone()))
}

fn new_token() -> Value {
    json!({"access_token": "at-new", "expiry": 1, "token_type": "Bearer"})
}

// ---- providers, buckets, keys ----

#[test]
fn provider_outside_the_profile_is_unauthorized() {
    let ts = serve(profile(&["anthropic"], &[]));
    let mut c = ts.connect();
    let reply = c.call("1", "get_token", json!({"provider": "gemini"}));
    assert_unauthorized(&reply, "1");
    let reply = c.call(
        "2",
        "save_token",
        json!({"provider": "gemini", "token": new_token()}),
    );
    assert_unauthorized(&reply, "2");
    let reply = c.call("3", "remove_token", json!({"provider": "gemini"}));
    assert_unauthorized(&reply, "3");
    assert_eq!(
        stored(&ts, "gemini", "default").map(|t| t["access_token"].clone()),
        Some(json!("at-gemini-default")),
        "an out-of-scope write changed the store"
    );
    // The allowed provider works.
    let reply = c.call("4", "get_token", json!({"provider": "anthropic"}));
    assert_eq!(reply, ok("4", seeded_token("at-anthropic-default")));
}

#[test]
fn unauthorized_message_does_not_reveal_a_secret() {
    let ts = serve(profile(&["anthropic:default"], &[]));
    let mut c = ts.connect();
    let reply = c.call(
        "1",
        "get_token",
        json!({"provider": "anthropic", "bucket": "work"}),
    );
    assert_unauthorized(&reply, "1");
    let text = reply.to_string();
    assert!(
        !text.contains("at-anthropic-work") && !text.contains("rt-"),
        "{text}"
    );
}

#[test]
fn bucket_outside_the_profile_is_unauthorized() {
    let ts = serve(profile(&["anthropic:default"], &[]));
    let mut c = ts.connect();
    let reply = c.call(
        "1",
        "get_token",
        json!({"provider": "anthropic", "bucket": "work"}),
    );
    assert_unauthorized(&reply, "1");
    let reply = c.call(
        "2",
        "save_token",
        json!({"provider": "anthropic", "bucket": "work", "token": new_token()}),
    );
    assert_unauthorized(&reply, "2");
    let reply = c.call(
        "3",
        "remove_token",
        json!({"provider": "anthropic", "bucket": "work"}),
    );
    assert_unauthorized(&reply, "3");
    assert_eq!(
        stored(&ts, "anthropic", "work").map(|t| t["access_token"].clone()),
        Some(json!("at-anthropic-work"))
    );
    // The allowed bucket, named or implied.
    let reply = c.call(
        "4",
        "get_token",
        json!({"provider": "anthropic", "bucket": "default"}),
    );
    assert_eq!(reply, ok("4", seeded_token("at-anthropic-default")));
    let reply = c.call("5", "get_token", json!({"provider": "anthropic"}));
    assert_eq!(reply, ok("5", seeded_token("at-anthropic-default")));
}

#[test]
fn omitted_bucket_is_scope_checked_as_default() {
    let ts = serve(profile(&["anthropic:work"], &[]));
    let mut c = ts.connect();
    let reply = c.call("1", "get_token", json!({"provider": "anthropic"}));
    assert_unauthorized(&reply, "1");
    let reply = c.call(
        "2",
        "get_token",
        json!({"provider": "anthropic", "bucket": null}),
    );
    assert_unauthorized(&reply, "2");
    let reply = c.call(
        "3",
        "get_token",
        json!({"provider": "anthropic", "bucket": "work"}),
    );
    assert_eq!(reply, ok("3", seeded_token("at-anthropic-work")));
}

#[test]
fn key_outside_the_profile_is_unauthorized() {
    let ts = serve(profile(&[], &["openai"]));
    let mut c = ts.connect();
    let reply = c.call("1", "get_api_key", json!({"name": "anthropic"}));
    assert_unauthorized(&reply, "1");
    let reply = c.call("2", "get_api_key", json!({"name": "openai"}));
    assert_eq!(reply, ok("2", json!({"key": "sk-openai"})));
}

#[test]
fn allowing_a_provider_grants_its_api_key() {
    let ts = serve(profile(&["anthropic"], &[]));
    let mut c = ts.connect();
    let reply = c.call("1", "get_api_key", json!({"name": "anthropic"}));
    assert_eq!(reply, ok("1", json!({"key": "sk-anthropic"})));
    let reply = c.call("2", "get_api_key", json!({"name": "openai"}));
    assert_unauthorized(&reply, "2");
    // `--allow anthropic` means every bucket.
    let reply = c.call(
        "3",
        "get_token",
        json!({"provider": "anthropic", "bucket": "work"}),
    );
    assert_eq!(reply, ok("3", seeded_token("at-anthropic-work")));
}

#[test]
fn allowing_a_provider_bucket_also_grants_its_api_key() {
    let ts = serve(profile(&["anthropic:work"], &[]));
    let mut c = ts.connect();
    let reply = c.call("1", "get_api_key", json!({"name": "anthropic"}));
    assert_eq!(reply, ok("1", json!({"key": "sk-anthropic"})));
}

#[test]
fn get_bucket_stats_is_scope_checked() {
    let ts = serve(profile(&["anthropic:default"], &[]));
    let mut c = ts.connect();
    let reply = c.call(
        "1",
        "get_bucket_stats",
        json!({"provider": "anthropic", "bucket": "work"}),
    );
    assert_unauthorized(&reply, "1");
    let reply = c.call("2", "get_bucket_stats", json!({"provider": "gemini"}));
    assert_unauthorized(&reply, "2");
    // Outside the profile is UNAUTHORIZED even where nothing is stored (no NOT_FOUND probe).
    let reply = c.call("3", "get_bucket_stats", json!({"provider": "openai"}));
    assert_unauthorized(&reply, "3");
    let reply = c.call("4", "get_bucket_stats", json!({"provider": "anthropic"}));
    let stats = data(&reply);
    assert_eq!(stats["bucket"], json!("default"), "{reply}");
    assert_eq!(stats["requestCount"], json!(0), "{reply}");
    assert_eq!(stats["percentage"].as_f64(), Some(0.0), "{reply}");
}

#[test]
fn has_api_key_is_scope_checked() {
    let ts = serve(profile(&["anthropic"], &[]));
    let mut c = ts.connect();
    // openai exists in the store, but its existence is not revealed.
    let reply = c.call("1", "has_api_key", json!({"name": "openai"}));
    assert_unauthorized(&reply, "1");
    let reply = c.call("2", "has_api_key", json!({"name": "missing"}));
    assert_unauthorized(&reply, "2");
    let reply = c.call("3", "has_api_key", json!({"name": "anthropic"}));
    assert_eq!(reply, ok("3", json!({"exists": true})));
}

// ---- filtered lists ----

#[test]
fn lists_leave_out_what_the_profile_does_not_allow() {
    let backend = seeded();
    backend
        .insert_key("mistral", Secret::from("sk-mistral"))
        .expect("seed");
    backend
        .insert_token("openai", "default", token("at-openai", None))
        .expect("seed");
    let ts = TestServer::start_with(
        profile(&["anthropic:work", "openai"], &["mistral"]),
        short_limits(),
        backend,
    );
    let mut c = ts.connect();
    let reply = c.call("1", "list_providers", json!({}));
    assert_eq!(
        reply,
        ok("1", json!({"providers": ["anthropic", "openai"]}))
    );
    let reply = c.call("2", "list_buckets", json!({"provider": "anthropic"}));
    assert_eq!(reply, ok("2", json!({"buckets": ["work"]})));
    let reply = c.call("3", "list_buckets", json!({"provider": "openai"}));
    assert_eq!(reply, ok("3", json!({"buckets": ["default"]})));
    let reply = c.call("4", "list_api_keys", json!({}));
    assert_eq!(
        reply,
        ok("4", json!({"keys": ["anthropic", "mistral", "openai"]}))
    );
}

#[test]
fn list_api_keys_leaves_out_keys_outside_the_profile() {
    let ts = serve(profile(&["gemini"], &["openai"]));
    let mut c = ts.connect();
    // gemini is granted but has no stored key; anthropic is stored but not granted.
    let reply = c.call("1", "list_api_keys", json!({}));
    assert_eq!(reply, ok("1", json!({"keys": ["openai"]})));
}

#[test]
fn list_buckets_of_a_provider_outside_is_unauthorized() {
    let ts = serve(profile(&["anthropic:default"], &[]));
    let mut c = ts.connect();
    let reply = c.call("1", "list_buckets", json!({"provider": "gemini"}));
    assert_unauthorized(&reply, "1");
    // Also for a provider with nothing stored.
    let reply = c.call("2", "list_buckets", json!({"provider": "openai"}));
    assert_unauthorized(&reply, "2");
}

// ---- read-only ----

fn read_only_all() -> Profile {
    Profile {
        read_only: true,
        ..allow_all()
    }
}

#[test]
fn read_only_save_token_is_forbidden_and_store_unchanged() {
    let ts = serve(read_only_all());
    let before = stored(&ts, "anthropic", "default");
    let mut c = ts.connect();
    let reply = c.call(
        "1",
        "save_token",
        json!({"provider": "anthropic", "token": new_token()}),
    );
    assert_err(&reply, "1", "FORBIDDEN");
    assert_eq!(stored(&ts, "anthropic", "default"), before);
    let reply = c.call(
        "2",
        "save_token",
        json!({"provider": "anthropic", "bucket": "new", "token": new_token()}),
    );
    assert_err(&reply, "2", "FORBIDDEN");
    assert_eq!(stored(&ts, "anthropic", "new"), None);
}

#[test]
fn read_only_remove_token_is_forbidden_and_store_unchanged() {
    let ts = serve(read_only_all());
    let before = stored(&ts, "anthropic", "work");
    assert!(before.is_some());
    let mut c = ts.connect();
    let reply = c.call(
        "1",
        "remove_token",
        json!({"provider": "anthropic", "bucket": "work"}),
    );
    assert_err(&reply, "1", "FORBIDDEN");
    assert_eq!(stored(&ts, "anthropic", "work"), before);
    // Also where nothing is stored: the mode refuses, not the store.
    let reply = c.call("2", "remove_token", json!({"provider": "nobody"}));
    assert_err(&reply, "2", "FORBIDDEN");
}

#[test]
fn read_only_reads_still_work() {
    let ts = serve(read_only_all());
    let mut c = ts.connect();
    let reply = c.call("1", "get_token", json!({"provider": "anthropic"}));
    assert_eq!(reply, ok("1", seeded_token("at-anthropic-default")));
    let reply = c.call("2", "list_providers", json!({}));
    assert_eq!(
        reply,
        ok("2", json!({"providers": ["anthropic", "gemini"]}))
    );
    let reply = c.call("3", "list_buckets", json!({"provider": "anthropic"}));
    assert_eq!(reply, ok("3", json!({"buckets": ["default", "work"]})));
    let reply = c.call("4", "get_api_key", json!({"name": "openai"}));
    assert_eq!(reply, ok("4", json!({"key": "sk-openai"})));
    let reply = c.call("5", "has_api_key", json!({"name": "openai"}));
    assert_eq!(reply, ok("5", json!({"exists": true})));
    let reply = c.call("6", "list_api_keys", json!({}));
    assert_eq!(reply, ok("6", json!({"keys": ["anthropic", "openai"]})));
    let reply = c.call("7", "get_bucket_stats", json!({"provider": "anthropic"}));
    assert_eq!(data(&reply)["requestCount"], json!(1), "{reply}");
}

// ---- empty profile ----

#[test]
fn empty_profile_refuses_everything() {
    let ts = serve(Profile::default());
    let mut c = ts.connect();
    let requests = [
        ("get_token", json!({"provider": "anthropic"})),
        (
            "save_token",
            json!({"provider": "anthropic", "token": new_token()}),
        ),
        ("remove_token", json!({"provider": "anthropic"})),
        ("list_buckets", json!({"provider": "anthropic"})),
        ("get_bucket_stats", json!({"provider": "anthropic"})),
        ("get_api_key", json!({"name": "anthropic"})),
        ("has_api_key", json!({"name": "anthropic"})),
    ];
    for (op, payload) in requests {
        let reply = c.call(op, op, payload);
        assert_unauthorized(&reply, op);
    }
    assert_eq!(
        stored(&ts, "anthropic", "default").map(|t| t["access_token"].clone()),
        Some(json!("at-anthropic-default"))
    );
}

#[test]
fn empty_profile_lists_are_empty() {
    let ts = serve(Profile::default());
    let mut c = ts.connect();
    let reply = c.call("1", "list_providers", json!({}));
    assert_eq!(reply, ok("1", json!({"providers": []})));
    let reply = c.call("2", "list_api_keys", json!({}));
    assert_eq!(reply, ok("2", json!({"keys": []})));
}

// ---- order of checks ----

#[test]
fn schema_is_checked_before_scope() {
    let ts = serve(profile(&["anthropic:default"], &[]));
    let mut c = ts.connect();
    let requests = [
        (
            "bad-bucket",
            "get_token",
            json!({"provider": "gemini", "bucket": "../x"}),
        ),
        ("no-token", "save_token", json!({"provider": "gemini"})),
        (
            "bad-token",
            "save_token",
            json!({"provider": "gemini", "token": {"access_token": "at", "expiry": "1", "token_type": "B"}}),
        ),
        (
            "bad-bucket-stats",
            "get_bucket_stats",
            json!({"provider": "gemini", "bucket": 5}),
        ),
        (
            "bad-remove",
            "remove_token",
            json!({"provider": "gemini", "bucket": "a/b"}),
        ),
        ("bad-key", "get_api_key", json!({"name": "openai@x"})),
        ("bad-has", "has_api_key", json!({"name": ".."})),
    ];
    for (id, op, payload) in requests {
        let reply = c.call(id, op, payload);
        assert_err(&reply, id, "INVALID_REQUEST");
    }
}

#[test]
fn schema_is_checked_before_read_only() {
    let ts = serve(read_only_all());
    let mut c = ts.connect();
    let reply = c.call(
        "1",
        "save_token",
        json!({"provider": "anthropic", "token": {"access_token": ""}}),
    );
    assert_err(&reply, "1", "INVALID_REQUEST");
    let reply = c.call(
        "2",
        "remove_token",
        json!({"provider": "anthropic", "bucket": ".."}),
    );
    assert_err(&reply, "2", "INVALID_REQUEST");
}

// ---- decisions remembered by a session ----

/// A session remembers the subjects the policy allowed; what it remembers must never
/// widen what the profile allows: a read of `provider:bucket` allows no write of it, a
/// refusal is asked about again every time, and a session that uses more subjects than
/// it remembers is still answered right.
#[test]
fn remembered_decisions_never_widen_the_profile() {
    let mut p = profile(&["anthropic:default"], &["allowed-key"]);
    p.read_only = true;
    let ts = TestServer::start_with(p, short_limits(), seeded());
    ts.backend
        .set_key("allowed-key", &Secret::from("k"))
        .expect("seed key");
    let mut c = ts.connect();
    for round in 0..3 {
        let id = |n: u32| format!("{round}-{n}");
        let reply = c.call(&id(1), "get_token", json!({"provider": "anthropic"}));
        assert_eq!(reply, ok(&id(1), seeded_token("at-anthropic-default")));
        let reply = c.call(
            &id(2),
            "save_token",
            json!({"provider": "anthropic", "token": new_token()}),
        );
        assert_err(&reply, &id(2), "FORBIDDEN");
        let reply = c.call(&id(3), "remove_token", json!({"provider": "anthropic"}));
        assert_err(&reply, &id(3), "FORBIDDEN");
        let reply = c.call(
            &id(4),
            "get_token",
            json!({"provider": "anthropic", "bucket": "work"}),
        );
        assert_unauthorized(&reply, &id(4));
        let reply = c.call(&id(5), "list_buckets", json!({"provider": "anthropic"}));
        assert_eq!(reply, ok(&id(5), json!({"buckets": ["default"]})));
        let reply = c.call(&id(9), "list_buckets", json!({"provider": "gemini"}));
        assert_unauthorized(&reply, &id(9));
        let reply = c.call(&id(6), "get_api_key", json!({"name": "allowed-key"}));
        assert_eq!(reply, ok(&id(6), json!({"key": "k"})));
        let reply = c.call(&id(7), "get_api_key", json!({"name": "openai"}));
        assert_unauthorized(&reply, &id(7));
        let reply = c.call(&id(8), "has_api_key", json!({"name": "allowed-key"}));
        assert_eq!(reply, ok(&id(8), json!({"exists": true})));
    }
    assert_eq!(
        stored(&ts, "anthropic", "default").map(|t| t["access_token"].clone()),
        Some(json!("at-anthropic-default")),
        "nothing was written"
    );
}

#[test]
fn more_subjects_than_a_session_remembers_are_all_decided_right() {
    let n = credproxy::session::MAX_REMEMBERED + 4;
    let buckets: Vec<String> = (0..n).map(|i| format!("b{i}")).collect();
    let spec = format!("anthropic:{}", buckets[..n - 1].join(","));
    let ts = serve(profile(&[spec.as_str()], &[]));
    for b in &buckets {
        ts.backend
            .save_token(
                "anthropic",
                b,
                &token(&format!("at-{b}"), None),
                credproxy::backend::SaveMode::Replace,
            )
            .expect("seed");
    }
    let mut c = ts.connect();
    for round in 0..2 {
        for (i, b) in buckets.iter().enumerate() {
            let id = format!("{round}-{i}");
            let reply = c.call(
                &id,
                "get_token",
                json!({"provider": "anthropic", "bucket": b}),
            );
            if i < n - 1 {
                assert_eq!(data(&reply)["access_token"], json!(format!("at-{b}")));
            } else {
                assert_unauthorized(&reply, &id);
            }
        }
    }
}
