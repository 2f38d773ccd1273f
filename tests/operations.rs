//! Every operation of PROTOCOL.md §7 on the wire: success and error replies, the name and
//! token rules of §6 (sanitize, merge, refresh tokens never crossing the socket), payload
//! schema errors, and requests answered concurrently by id (§5).

mod common;
use common::hooked::{Call, Hook, Hooked};
use common::*;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use credproxy::backend::{Backend, MemoryBackend, StoreError};
use credproxy::policy::Profile;
use credproxy::secret::Secret;
use credproxy::token::Token;
use credproxy::{Config, ServerHandle, Supervisor};
use serde_json::{json, Value};

// ---- helpers ----

/// What the backend holds for `provider:bucket`, refresh token included.
fn stored(backend: &MemoryBackend, provider: &str, bucket: &str) -> Option<Value> {
    backend
        .get_token(provider, bucket)
        .expect("backend read")
        .map(|t| Value::Object(t.fields().clone()))
}

fn tok(v: Value) -> Token {
    Token::from_value(v).expect("valid token")
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64
}

/// Writes every request in one `write`, then reads as many replies and returns them by id.
fn batch(raw: &mut Raw, requests: &[(&str, &str, Value)]) -> HashMap<String, Value> {
    let mut bytes = Vec::new();
    for (id, op, payload) in requests {
        let body = json!({"v": 1, "id": id, "op": op, "payload": payload}).to_string();
        bytes.extend_from_slice(&frame(body.as_bytes()));
    }
    raw.write(&bytes);
    let mut replies = HashMap::new();
    for _ in requests {
        let reply = raw.recv();
        let id = reply["id"].as_str().expect("reply has an id").to_owned();
        assert!(
            replies.insert(id.clone(), reply).is_none(),
            "two replies for id {id}"
        );
    }
    replies
}

/// Names that are never valid (PROTOCOL.md §6).
fn invalid_names() -> Vec<String> {
    vec![
        String::new(),
        "a/b".into(),
        "../anthropic".into(),
        ".".into(),
        "..".into(),
        "anthropic\0".into(),
        "\u{ff41}nthropic".into(), // fullwidth 'ａ'
        "\u{430}nthropic".into(),  // Cyrillic 'а'
        "anthropic ".into(),
        "a".repeat(65),
    ]
}

// ---- a store that counts every call, to prove rejected requests never reach it ----

/// Counts every call that reaches the store.
#[derive(Debug, Default)]
struct Counter(AtomicUsize);

impl Hook for Counter {
    fn before(&self, _: Call<'_>) -> Result<(), StoreError> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

type CountingBackend = Hooked<Counter>;

/// A server over a [`CountingBackend`] seeded with `anthropic:default` and key `anthropic`.
struct CountingServer {
    _handle: ServerHandle,
    path: PathBuf,
    backend: Arc<CountingBackend>,
    _dir: tempfile::TempDir,
}

impl CountingServer {
    fn start(profile: Profile) -> CountingServer {
        let inner = MemoryBackend::new();
        inner
            .insert_token("anthropic", "default", token("at-a", Some("rt-a")))
            .expect("seed");
        inner
            .insert_key("anthropic", Secret::from("sk-anthropic"))
            .expect("seed");
        let backend = Arc::new(CountingBackend {
            inner: Arc::new(inner),
            hook: Counter::default(),
            blocking: false,
        });
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = Config::new(backend.clone());
        common::offline(&mut config);
        config.socket_dir = Some(dir.path().to_owned());
        config.profile = profile;
        config.limits = short_limits();
        let handle = Supervisor::start(config).expect("server starts");
        let path = handle.socket_path().to_owned();
        CountingServer {
            _handle: handle,
            path,
            backend,
            _dir: dir,
        }
    }

    fn connect(&self) -> Raw {
        let mut raw = Raw::connect(&self.path);
        raw.handshake();
        raw
    }
}

// ---- get_token ----

#[test]
fn get_token_returns_the_sanitized_token() {
    let ts = TestServer::start();
    let mut c = ts.connect();
    let reply = c.call(
        "1",
        "get_token",
        json!({"provider": "anthropic", "bucket": "work"}),
    );
    assert_eq!(reply, ok("1", seeded_token("at-anthropic-work")));
    assert!(!data(&reply)
        .as_object()
        .unwrap()
        .contains_key("refresh_token"));
}

#[test]
fn get_token_strips_refresh_token_whatever_its_value() {
    let ts = TestServer::start();
    for (bucket, rt) in [
        ("null", json!(null)),
        ("empty", json!("")),
        ("set", json!("rt-x")),
    ] {
        let t = tok(
            json!({"access_token": "at", "expiry": 5, "token_type": "Bearer",
            "refresh_token": rt, "resource_url": "https://r.example"}),
        );
        ts.backend.insert_token("qwen", bucket, t).expect("seed");
    }
    let mut c = ts.connect();
    for bucket in ["null", "empty", "set"] {
        let reply = c.call(
            bucket,
            "get_token",
            json!({"provider": "qwen", "bucket": bucket}),
        );
        assert_eq!(
            reply,
            ok(
                bucket,
                json!({"access_token": "at", "expiry": 5, "token_type": "Bearer",
                    "resource_url": "https://r.example"})
            )
        );
    }
}

#[test]
fn get_token_missing_bucket_is_not_found() {
    let ts = TestServer::start();
    let mut c = ts.connect();
    let reply = c.call(
        "1",
        "get_token",
        json!({"provider": "anthropic", "bucket": "nope"}),
    );
    assert_err(&reply, "1", "NOT_FOUND");
    let reply = c.call("2", "get_token", json!({"provider": "openai"}));
    assert_err(&reply, "2", "NOT_FOUND");
}

#[test]
fn get_token_omitted_bucket_means_default() {
    let ts = TestServer::start();
    let mut c = ts.connect();
    let reply = c.call("1", "get_token", json!({"provider": "anthropic"}));
    assert_eq!(reply, ok("1", seeded_token("at-anthropic-default")));
}

#[test]
fn get_token_null_bucket_means_default() {
    let ts = TestServer::start();
    let mut c = ts.connect();
    let reply = c.call(
        "1",
        "get_token",
        json!({"provider": "anthropic", "bucket": null}),
    );
    assert_eq!(reply, ok("1", seeded_token("at-anthropic-default")));
}

// ---- save_token ----

#[test]
fn save_token_then_get_token_shows_the_new_token() {
    let ts = TestServer::start();
    let mut c = ts.connect();
    let new = json!({"access_token": "at-new", "expiry": 1_950_000_000, "token_type": "Bearer"});
    let reply = c.call(
        "1",
        "save_token",
        json!({"provider": "anthropic", "bucket": "work", "token": new}),
    );
    assert_eq!(reply, ok("1", json!({})));
    let reply = c.call(
        "2",
        "get_token",
        json!({"provider": "anthropic", "bucket": "work"}),
    );
    // `scope: null` was stored and the incoming token lacks it: merge keeps it.
    assert_eq!(
        reply,
        ok(
            "2",
            json!({"access_token": "at-new", "expiry": 1_950_000_000, "token_type": "Bearer",
                "scope": null})
        )
    );
}

#[test]
fn save_token_omitted_bucket_saves_to_default() {
    let ts = TestServer::start();
    let mut c = ts.connect();
    let new = json!({"access_token": "at-new", "expiry": 7, "token_type": "Bearer"});
    let reply = c.call(
        "1",
        "save_token",
        json!({"provider": "gemini", "token": new}),
    );
    assert_eq!(reply, ok("1", json!({})));
    let held = stored(&ts.backend, "gemini", "default").expect("stored");
    assert_eq!(held["access_token"], json!("at-new"));
}

#[test]
fn save_token_merge_keeps_stored_fields_the_incoming_token_lacks() {
    let ts = TestServer::start();
    let seeded = tok(
        json!({"access_token": "at-old", "expiry": 1, "token_type": "Bearer",
        "refresh_token": "rt-qwen", "resource_url": "https://portal.qwen.ai", "account_id": "acc-1"}),
    );
    ts.backend
        .insert_token("qwen", "default", seeded)
        .expect("seed");
    let mut c = ts.connect();
    let incoming = json!({"access_token": "at-new", "expiry": 2, "token_type": "Bearer",
        "account_id": "acc-2"});
    let reply = c.call(
        "1",
        "save_token",
        json!({"provider": "qwen", "token": incoming}),
    );
    assert_eq!(reply, ok("1", json!({})));
    let reply = c.call("2", "get_token", json!({"provider": "qwen"}));
    assert_eq!(
        reply,
        ok(
            "2",
            json!({"access_token": "at-new", "expiry": 2, "token_type": "Bearer",
                "resource_url": "https://portal.qwen.ai", "account_id": "acc-2"})
        )
    );
    assert_eq!(
        stored(&ts.backend, "qwen", "default"),
        Some(
            json!({"access_token": "at-new", "expiry": 2, "token_type": "Bearer",
            "refresh_token": "rt-qwen", "resource_url": "https://portal.qwen.ai",
            "account_id": "acc-2"})
        )
    );
}

#[test]
fn save_token_keeps_the_stored_refresh_token() {
    let ts = TestServer::start();
    let mut c = ts.connect();
    let new = json!({"access_token": "at-new", "expiry": 3, "token_type": "Bearer"});
    let reply = c.call(
        "1",
        "save_token",
        json!({"provider": "anthropic", "token": new}),
    );
    assert_eq!(reply, ok("1", json!({})));
    let held = stored(&ts.backend, "anthropic", "default").expect("stored");
    assert_eq!(held["access_token"], json!("at-new"));
    assert_eq!(held["refresh_token"], json!("rt-anthropic-default"));
}

#[test]
fn save_token_drops_a_refresh_token_sent_by_the_client() {
    let ts = TestServer::start();
    let mut c = ts.connect();
    for (i, rt) in [json!("rt-from-sandbox"), json!(""), json!(null), json!(5)]
        .into_iter()
        .enumerate()
    {
        let id = i.to_string();
        let new = json!({"access_token": "at-new", "expiry": 3, "token_type": "Bearer",
            "refresh_token": rt});
        let reply = c.call(
            &id,
            "save_token",
            json!({"provider": "anthropic", "token": new}),
        );
        assert_eq!(reply, ok(&id, json!({})), "refresh_token {rt}");
        let held = stored(&ts.backend, "anthropic", "default").expect("stored");
        assert_eq!(
            held["refresh_token"],
            json!("rt-anthropic-default"),
            "refresh_token {rt}"
        );
    }
    let reply = c.call("get", "get_token", json!({"provider": "anthropic"}));
    assert_eq!(
        reply,
        ok(
            "get",
            json!({"access_token": "at-new", "expiry": 3, "token_type": "Bearer", "scope": null})
        )
    );
}

#[test]
fn save_token_with_nothing_stored_drops_the_client_refresh_token() {
    let ts = TestServer::start();
    let mut c = ts.connect();
    let new = json!({"access_token": "at-fresh", "expiry": 9, "token_type": "Bearer",
        "refresh_token": "rt-from-sandbox", "resource_url": "u"});
    let reply = c.call(
        "1",
        "save_token",
        json!({"provider": "qwen", "bucket": "fresh", "token": new}),
    );
    assert_eq!(reply, ok("1", json!({})));
    assert_eq!(
        stored(&ts.backend, "qwen", "fresh"),
        Some(
            json!({"access_token": "at-fresh", "expiry": 9, "token_type": "Bearer",
            "resource_url": "u"})
        )
    );
    let reply = c.call(
        "2",
        "get_token",
        json!({"provider": "qwen", "bucket": "fresh"}),
    );
    assert_eq!(
        reply,
        ok(
            "2",
            json!({"access_token": "at-fresh", "expiry": 9, "token_type": "Bearer",
                "resource_url": "u"})
        )
    );
}

#[test]
fn save_token_invalid_token_is_invalid_request_and_store_unchanged() {
    let ts = TestServer::start();
    let before = stored(&ts.backend, "anthropic", "default");
    let mut c = ts.connect();
    let cases = [
        (
            "missing access_token, nothing stored to merge into",
            json!({"provider": "fresh",
            "token": {"expiry": 1, "token_type": "Bearer"}}),
        ),
        (
            "empty access_token",
            json!({"provider": "anthropic",
            "token": {"access_token": "", "expiry": 1, "token_type": "Bearer"}}),
        ),
        (
            "access_token not a string",
            json!({"provider": "anthropic",
            "token": {"access_token": 7, "expiry": 1, "token_type": "Bearer"}}),
        ),
        (
            "expiry as string",
            json!({"provider": "anthropic",
            "token": {"access_token": "at-bad", "expiry": "1900000000", "token_type": "Bearer"}}),
        ),
        (
            "missing expiry, nothing stored to merge into",
            json!({"provider": "fresh",
            "token": {"access_token": "at-bad", "token_type": "Bearer"}}),
        ),
        (
            "missing token_type, nothing stored to merge into",
            json!({"provider": "fresh",
            "token": {"access_token": "at-bad", "expiry": 1}}),
        ),
        (
            "scope a number",
            json!({"provider": "anthropic",
            "token": {"access_token": "at-bad", "expiry": 1, "token_type": "Bearer", "scope": 3}}),
        ),
        (
            "token a string",
            json!({"provider": "anthropic", "token": "at-bad"}),
        ),
        (
            "token an array",
            json!({"provider": "anthropic", "token": ["at-bad"]}),
        ),
        (
            "token null",
            json!({"provider": "anthropic", "token": null}),
        ),
        ("missing token", json!({"provider": "anthropic"})),
    ];
    for (i, (what, payload)) in cases.into_iter().enumerate() {
        let id = i.to_string();
        let reply = c.call(&id, "save_token", payload);
        let message = assert_err(&reply, &id, "INVALID_REQUEST");
        assert!(
            !message.contains("at-bad"),
            "{what}: message echoes a value: {message}"
        );
        assert_eq!(
            stored(&ts.backend, "anthropic", "default"),
            before,
            "{what}"
        );
    }
    assert_eq!(
        ts.backend.list_buckets("anthropic").unwrap(),
        ["default", "work"]
    );
    assert!(ts.backend.list_buckets("fresh").unwrap().is_empty());
}

/// PROTOCOL.md §7: a partial token (only a new `access_token`) is merged into the stored
/// one, as the llxprt-code reference server does; the missing field is named when there
/// is nothing to merge it into.
#[test]
fn a_partial_token_is_merged_into_the_stored_one() {
    let ts = TestServer::start();
    let before = stored(&ts.backend, "anthropic", "default").expect("seeded");
    let mut c = ts.connect();
    let reply = c.call(
        "1",
        "save_token",
        json!({"provider": "anthropic", "token": {"access_token": "at-partial"}}),
    );
    assert_eq!(data(&reply), &json!({}));
    let after = stored(&ts.backend, "anthropic", "default").expect("still stored");
    assert_eq!(after["access_token"], "at-partial");
    for kept in ["expiry", "token_type", "refresh_token"] {
        assert_eq!(after[kept], before[kept], "{kept} kept");
    }
    let reply = c.call("2", "get_token", json!({"provider": "anthropic"}));
    assert_eq!(data(&reply)["access_token"], "at-partial");
    assert!(data(&reply).get("refresh_token").is_none());

    let reply = c.call(
        "3",
        "save_token",
        json!({"provider": "anthropic", "bucket": "nothing-here", "token": {"access_token": "x"}}),
    );
    let message = assert_err(&reply, "3", "INVALID_REQUEST");
    assert!(message.contains("expiry"), "{message}");
    // A present field of the wrong type is refused before the store, stored or not.
    let reply = c.call(
        "4",
        "save_token",
        json!({"provider": "anthropic", "token": {"expiry": "soon"}}),
    );
    assert_err(&reply, "4", "INVALID_REQUEST");
    assert_eq!(
        stored(&ts.backend, "anthropic", "default").expect("kept")["access_token"],
        "at-partial"
    );
}

// ---- remove_token ----

#[test]
fn remove_token_then_get_token_is_not_found() {
    let ts = TestServer::start();
    let mut c = ts.connect();
    let reply = c.call(
        "1",
        "remove_token",
        json!({"provider": "anthropic", "bucket": "work"}),
    );
    assert_eq!(reply, ok("1", json!({})));
    assert_eq!(stored(&ts.backend, "anthropic", "work"), None);
    let reply = c.call(
        "2",
        "get_token",
        json!({"provider": "anthropic", "bucket": "work"}),
    );
    assert_err(&reply, "2", "NOT_FOUND");
    // The other bucket is untouched.
    assert!(stored(&ts.backend, "anthropic", "default").is_some());
}

#[test]
fn remove_token_omitted_bucket_removes_default() {
    let ts = TestServer::start();
    let mut c = ts.connect();
    let reply = c.call("1", "remove_token", json!({"provider": "gemini"}));
    assert_eq!(reply, ok("1", json!({})));
    assert_eq!(stored(&ts.backend, "gemini", "default"), None);
}

#[test]
fn remove_token_of_nothing_stored_succeeds() {
    let ts = TestServer::start();
    let mut c = ts.connect();
    let reply = c.call(
        "1",
        "remove_token",
        json!({"provider": "anthropic", "bucket": "never"}),
    );
    assert_eq!(reply, ok("1", json!({})));
    let reply = c.call("2", "remove_token", json!({"provider": "nobody"}));
    assert_eq!(reply, ok("2", json!({})));
}

// ---- lists ----

#[test]
fn list_providers_is_sorted() {
    let ts = TestServer::start();
    for p in ["zeta", "Alpha", "mistral", "0day"] {
        ts.backend
            .insert_token(p, "default", token("at", None))
            .expect("seed");
    }
    let mut c = ts.connect();
    let reply = c.call("1", "list_providers", json!({}));
    assert_eq!(
        reply,
        ok(
            "1",
            json!({"providers": ["0day", "Alpha", "anthropic", "gemini", "mistral", "zeta"]})
        )
    );
}

#[test]
fn list_providers_without_payload() {
    let ts = TestServer::start();
    let mut c = ts.connect();
    c.send(&json!({"v": 1, "id": "1", "op": "list_providers"}));
    assert_eq!(
        c.recv(),
        ok("1", json!({"providers": ["anthropic", "gemini"]}))
    );
}

#[test]
fn list_buckets_is_sorted() {
    let ts = TestServer::start();
    for b in ["zz", "Beta", "alpha@example.com"] {
        ts.backend
            .insert_token("anthropic", b, token("at", None))
            .expect("seed");
    }
    let mut c = ts.connect();
    let reply = c.call("1", "list_buckets", json!({"provider": "anthropic"}));
    assert_eq!(
        reply,
        ok(
            "1",
            json!({"buckets": ["Beta", "alpha@example.com", "default", "work", "zz"]})
        )
    );
}

#[test]
fn list_buckets_of_unknown_provider_is_empty() {
    let ts = TestServer::start();
    let mut c = ts.connect();
    let reply = c.call("1", "list_buckets", json!({"provider": "openai"}));
    assert_eq!(reply, ok("1", json!({"buckets": []})));
}

#[test]
fn list_buckets_requires_a_provider() {
    let ts = TestServer::start();
    let mut c = ts.connect();
    let reply = c.call("1", "list_buckets", json!({}));
    assert_err(&reply, "1", "INVALID_REQUEST");
}

// ---- get_bucket_stats ----

#[test]
fn get_bucket_stats_without_a_token_is_not_found() {
    let ts = TestServer::start();
    let mut c = ts.connect();
    let reply = c.call(
        "1",
        "get_bucket_stats",
        json!({"provider": "anthropic", "bucket": "nope"}),
    );
    assert_err(&reply, "1", "NOT_FOUND");
    let reply = c.call("2", "get_bucket_stats", json!({"provider": "openai"}));
    assert_err(&reply, "2", "NOT_FOUND");
}

#[test]
fn get_bucket_stats_counts_get_token_calls() {
    let ts = TestServer::start();
    let mut c = ts.connect();
    for i in 0..3 {
        let id = format!("d{i}");
        let reply = c.call(&id, "get_token", json!({"provider": "anthropic"}));
        assert_eq!(reply["ok"], json!(true), "{reply}");
    }
    let before = now_ms();
    let reply = c.call(
        "w",
        "get_token",
        json!({"provider": "anthropic", "bucket": "work"}),
    );
    assert_eq!(reply["ok"], json!(true), "{reply}");
    // The last get_token on default happened before `before`; on work, after it.
    let reply = c.call("s1", "get_bucket_stats", json!({"provider": "anthropic"}));
    let after = now_ms();
    let stats = data(&reply);
    let mut keys: Vec<&str> = stats
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        ["bucket", "lastUsed", "percentage", "requestCount"],
        "{reply}"
    );
    assert_eq!(stats["bucket"], json!("default"));
    assert_eq!(stats["requestCount"], json!(3));
    assert_eq!(stats["percentage"].as_f64(), Some(75.0), "{reply}");
    let last = stats["lastUsed"].as_u64().expect("lastUsed is an integer");
    assert!(
        last <= before && last + 60_000 > before,
        "lastUsed {last} not near now ({before})"
    );

    let reply = c.call(
        "s2",
        "get_bucket_stats",
        json!({"provider": "anthropic", "bucket": "work"}),
    );
    let stats = data(&reply);
    assert_eq!(stats["bucket"], json!("work"));
    assert_eq!(stats["requestCount"], json!(1));
    assert_eq!(stats["percentage"].as_f64(), Some(25.0), "{reply}");
    let last = stats["lastUsed"].as_u64().expect("lastUsed is an integer");
    assert!(
        (before..=after).contains(&last),
        "lastUsed {last} outside [{before}, {after}]"
    );
}

#[test]
fn get_bucket_stats_of_an_unused_bucket_has_zero_and_no_last_used() {
    let ts = TestServer::start();
    let mut c = ts.connect();
    // Calls on another provider do not count for gemini.
    let reply = c.call("1", "get_token", json!({"provider": "anthropic"}));
    assert_eq!(reply["ok"], json!(true), "{reply}");
    let reply = c.call("2", "get_bucket_stats", json!({"provider": "gemini"}));
    let stats = data(&reply);
    let mut keys: Vec<&str> = stats
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(keys, ["bucket", "percentage", "requestCount"], "{reply}");
    assert_eq!(stats["bucket"], json!("default"));
    assert_eq!(stats["requestCount"], json!(0));
    assert_eq!(stats["percentage"].as_f64(), Some(0.0), "{reply}");
}

// ---- API keys ----

#[test]
fn get_api_key_returns_the_key() {
    let ts = TestServer::start();
    let mut c = ts.connect();
    let reply = c.call("1", "get_api_key", json!({"name": "anthropic"}));
    assert_eq!(reply, ok("1", json!({"key": "sk-anthropic"})));
}

#[test]
fn get_api_key_missing_is_not_found() {
    let ts = TestServer::start();
    let mut c = ts.connect();
    let reply = c.call("1", "get_api_key", json!({"name": "gemini"}));
    assert_err(&reply, "1", "NOT_FOUND");
}

#[test]
fn list_api_keys_is_sorted() {
    let ts = TestServer::start();
    ts.backend
        .insert_key("Zed", Secret::from("sk-z"))
        .expect("seed");
    ts.backend
        .insert_key("mistral", Secret::from("sk-m"))
        .expect("seed");
    let mut c = ts.connect();
    let reply = c.call("1", "list_api_keys", json!({}));
    assert_eq!(
        reply,
        ok(
            "1",
            json!({"keys": ["Zed", "anthropic", "mistral", "openai"]})
        )
    );
}

#[test]
fn has_api_key_answers_true_or_false() {
    let ts = TestServer::start();
    let mut c = ts.connect();
    let reply = c.call("1", "has_api_key", json!({"name": "openai"}));
    assert_eq!(reply, ok("1", json!({"exists": true})));
    let reply = c.call("2", "has_api_key", json!({"name": "gemini"}));
    assert_eq!(reply, ok("2", json!({"exists": false})));
}

// ---- payload schema ----

#[test]
fn missing_provider_is_invalid_request() {
    let ts = TestServer::start();
    let mut c = ts.connect();
    for op in [
        "get_token",
        "save_token",
        "remove_token",
        "list_buckets",
        "get_bucket_stats",
    ] {
        let reply = c.call(op, op, json!({"bucket": "default"}));
        assert_err(&reply, op, "INVALID_REQUEST");
    }
}

#[test]
fn provider_not_a_string_is_invalid_request() {
    let ts = TestServer::start();
    let mut c = ts.connect();
    for (i, provider) in [
        json!(1),
        json!(null),
        json!(true),
        json!(["anthropic"]),
        json!({"a": 1}),
    ]
    .into_iter()
    .enumerate()
    {
        for op in [
            "get_token",
            "remove_token",
            "list_buckets",
            "get_bucket_stats",
        ] {
            let id = format!("{op}-{i}");
            let reply = c.call(&id, op, json!({"provider": provider}));
            assert_err(&reply, &id, "INVALID_REQUEST");
        }
    }
}

#[test]
fn invalid_provider_names_are_invalid_request() {
    let ts = TestServer::start();
    let mut c = ts.connect();
    let t = json!({"access_token": "at", "expiry": 1, "token_type": "Bearer"});
    for (i, name) in invalid_names().iter().enumerate() {
        for op in [
            "get_token",
            "save_token",
            "remove_token",
            "list_buckets",
            "get_bucket_stats",
        ] {
            let id = format!("{op}-{i}");
            let reply = c.call(&id, op, json!({"provider": name, "token": t}));
            assert_err(&reply, &id, "INVALID_REQUEST");
        }
    }
    assert_eq!(
        ts.backend.list_providers().unwrap(),
        ["anthropic", "gemini"]
    );
}

#[test]
fn invalid_bucket_names_are_invalid_request() {
    let ts = TestServer::start();
    let mut c = ts.connect();
    let t = json!({"access_token": "at", "expiry": 1, "token_type": "Bearer"});
    let mut buckets: Vec<Value> = invalid_names().into_iter().map(Value::from).collect();
    buckets.extend([json!(5), json!(["default"]), json!(false)]);
    for (i, bucket) in buckets.iter().enumerate() {
        for op in [
            "get_token",
            "save_token",
            "remove_token",
            "get_bucket_stats",
        ] {
            let id = format!("{op}-{i}");
            let reply = c.call(
                &id,
                op,
                json!({"provider": "anthropic", "bucket": bucket, "token": t}),
            );
            assert_err(&reply, &id, "INVALID_REQUEST");
        }
    }
    assert_eq!(
        ts.backend.list_buckets("anthropic").unwrap(),
        ["default", "work"]
    );
}

#[test]
fn invalid_key_names_are_invalid_request() {
    let ts = TestServer::start();
    let mut c = ts.connect();
    let mut names: Vec<Value> = invalid_names().into_iter().map(Value::from).collect();
    names.extend([json!("anthropic@work"), json!("@"), json!(1), json!(null)]);
    for (i, name) in names.iter().enumerate() {
        for op in ["get_api_key", "has_api_key"] {
            let id = format!("{op}-{i}");
            let reply = c.call(&id, op, json!({"name": name}));
            assert_err(&reply, &id, "INVALID_REQUEST");
        }
    }
    for op in ["get_api_key", "has_api_key"] {
        let reply = c.call(op, op, json!({}));
        assert_err(&reply, op, "INVALID_REQUEST");
    }
}

#[test]
fn names_of_64_valid_characters_pass_the_schema() {
    let ts = TestServer::start();
    let mut c = ts.connect();
    let long = "a".repeat(64);
    let reply = c.call("1", "get_token", json!({"provider": long}));
    assert_err(&reply, "1", "NOT_FOUND");
    let reply = c.call(
        "2",
        "get_token",
        json!({"provider": "anthropic", "bucket": long}),
    );
    assert_err(&reply, "2", "NOT_FOUND");
    let reply = c.call("3", "get_api_key", json!({"name": long}));
    assert_err(&reply, "3", "NOT_FOUND");
    let reply = c.call("4", "has_api_key", json!({"name": long}));
    assert_eq!(reply, ok("4", json!({"exists": false})));
    // Every allowed character, including '@' in provider and bucket names and "..." (only
    // "." and ".." are refused).
    let reply = c.call(
        "5",
        "get_token",
        json!({"provider": "A-z_0.9@x", "bucket": "..."}),
    );
    assert_err(&reply, "5", "NOT_FOUND");
    let reply = c.call("6", "get_api_key", json!({"name": "A-z_0.9"}));
    assert_err(&reply, "6", "NOT_FOUND");
}

#[test]
fn requests_rejected_before_the_operation_never_touch_the_store() {
    let mut profile = Profile::default();
    profile.allow("anthropic:default").expect("spec");
    profile.read_only = true;
    let ts = CountingServer::start(profile);
    let mut c = ts.connect();
    let good = json!({"access_token": "at-new", "expiry": 1, "token_type": "Bearer"});
    let rejected = [
        (
            "bad-token",
            "save_token",
            json!({"provider": "anthropic", "token": {"access_token": "", "expiry": 1, "token_type": "B"}}),
        ),
        ("no-token", "save_token", json!({"provider": "anthropic"})),
        ("bad-provider", "get_token", json!({"provider": "../etc"})),
        (
            "bad-bucket",
            "remove_token",
            json!({"provider": "anthropic", "bucket": "a/b"}),
        ),
        ("bad-key", "get_api_key", json!({"name": "a@b"})),
        ("no-provider", "list_buckets", json!({})),
        (
            "unknown-op",
            "delete_everything",
            json!({"provider": "anthropic"}),
        ),
        ("out-of-scope", "get_token", json!({"provider": "gemini"})),
        (
            "out-of-scope-stats",
            "get_bucket_stats",
            json!({"provider": "anthropic", "bucket": "work"}),
        ),
        ("out-of-scope-key", "has_api_key", json!({"name": "openai"})),
        (
            "read-only-save",
            "save_token",
            json!({"provider": "anthropic", "token": good}),
        ),
        (
            "read-only-remove",
            "remove_token",
            json!({"provider": "anthropic"}),
        ),
    ];
    for (id, op, payload) in rejected {
        let reply = c.call(id, op, payload);
        assert_eq!(reply["ok"], json!(false), "{id}: {reply}");
    }
    c.send(&json!({"v": 1, "id": "payload-not-object", "op": "get_token", "payload": "anthropic"}));
    let reply = c.recv();
    assert_err(&reply, "payload-not-object", "INVALID_REQUEST");
    assert_eq!(
        ts.backend.hook.0.load(Ordering::SeqCst),
        0,
        "a rejected request reached the store"
    );
    // The counter works: an accepted request does reach it.
    let reply = c.call("good", "get_token", json!({"provider": "anthropic"}));
    assert_eq!(reply["ok"], json!(true), "{reply}");
    assert_eq!(ts.backend.hook.0.load(Ordering::SeqCst), 1);
}

// ---- concurrency ----

#[test]
fn pipelined_requests_are_all_answered_by_id() {
    let ts = TestServer::start();
    let mut c = ts.connect();
    let replies = batch(
        &mut c,
        &[
            ("a", "get_token", json!({"provider": "anthropic"})),
            ("b", "get_api_key", json!({"name": "openai"})),
            ("c", "list_providers", json!({})),
            ("d", "has_api_key", json!({"name": "nope"})),
            ("e", "get_token", json!({"provider": "nope"})),
            ("f", "list_buckets", json!({"provider": "anthropic"})),
            (
                "g",
                "get_token",
                json!({"provider": "gemini", "bucket": "default"}),
            ),
            ("h", "list_api_keys", json!({})),
            ("i", "get_token", json!({"provider": "a/b"})),
            (
                "j",
                "get_token",
                json!({"provider": "anthropic", "bucket": "work"}),
            ),
        ],
    );
    assert_eq!(replies.len(), 10);
    assert_eq!(replies["a"], ok("a", seeded_token("at-anthropic-default")));
    assert_eq!(replies["b"], ok("b", json!({"key": "sk-openai"})));
    assert_eq!(
        replies["c"],
        ok("c", json!({"providers": ["anthropic", "gemini"]}))
    );
    assert_eq!(replies["d"], ok("d", json!({"exists": false})));
    assert_err(&replies["e"], "e", "NOT_FOUND");
    assert_eq!(
        replies["f"],
        ok("f", json!({"buckets": ["default", "work"]}))
    );
    assert_eq!(replies["g"], ok("g", seeded_token("at-gemini-default")));
    assert_eq!(
        replies["h"],
        ok("h", json!({"keys": ["anthropic", "openai"]}))
    );
    assert_err(&replies["i"], "i", "INVALID_REQUEST");
    assert_eq!(replies["j"], ok("j", seeded_token("at-anthropic-work")));
}

#[test]
fn integer_ids_are_echoed_as_strings() {
    let ts = TestServer::start();
    let mut c = ts.connect();
    c.send(&json!({"v": 1, "id": 42, "op": "has_api_key", "payload": {"name": "openai"}}));
    assert_eq!(c.recv(), ok("42", json!({"exists": true})));
}
