//! A server over the keyring store answers a raw-frame `get_token` and `get_api_key` from the
//! real Secret Service (on the session bus; skipped with a note without one, a failure
//! under CI): the store's worker threads drive the backend's private runtime, and the
//! reply never carries the refresh token.

mod common;

use std::sync::Arc;

use common::{data, keyring, ok, short_limits, start_backend, Raw};
use credproxy::backend::{Backend, KeyringBackend, SaveMode};
use credproxy::secret::Secret;
use serde_json::json;

#[test]
fn get_token_and_get_api_key_are_served_from_the_keyring() {
    if !keyring::available() {
        return;
    }
    let service = keyring::unique_service("serve");
    let backend = Arc::new(KeyringBackend::open(Some(&service)).expect("open"));
    let token = common::token("at-keyring", Some("rt-keyring-canary"));
    backend
        .save_token("anthropic", "work", &token, SaveMode::Replace)
        .expect("save");
    backend
        .set_key("openai", &Secret::from("sk-keyring"))
        .expect("set key");
    let (handle, _dir) = start_backend(backend.clone(), short_limits());
    let mut c = Raw::connect(handle.socket_path());
    c.handshake();
    let reply = c.call(
        "1",
        "get_token",
        json!({"provider": "anthropic", "bucket": "work"}),
    );
    assert_eq!(reply["ok"], json!(true), "{reply}");
    assert_eq!(data(&reply)["access_token"], json!("at-keyring"));
    assert!(!reply.to_string().contains("rt-keyring-canary"));
    let reply = c.call("2", "get_api_key", json!({"name": "openai"}));
    assert_eq!(reply, ok("2", json!({"key": "sk-keyring"})));
    drop(c);
    handle.shutdown_blocking().expect("shutdown");
    backend.remove_token("anthropic", "work").expect("cleanup");
    backend.remove_key("openai").expect("cleanup");
}
