//! The client library against a real server: lazy connect, concurrent requests on one
//! connection, typed results and errors, idle close and reconnect, and "connection lost"
//! with no automatic reconnect.

mod common;

use std::time::Duration;

use common::*;
use credproxy::client::{Client, ClientConfig, ClientError};
use credproxy::protocol::ErrorCode;
use credproxy::supervisor::SessionCount;
use serde_json::json;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn sessions(s: &TestServer) -> usize {
    rt().block_on(sessions_async(s))
}

/// Counted from inside the client's runtime: the client's connection lives as long as
/// the runtime driving it.
async fn sessions_async(s: &TestServer) -> usize {
    let addr = s.handle.as_ref().expect("running").addr().clone();
    addr.send(SessionCount).await.expect("count")
}

#[test]
fn lazy_connect_and_typed_operations() {
    let s = TestServer::start();
    let client = Client::new(&s.path);
    assert_eq!(sessions(&s), 0, "no connection before the first request");
    rt().block_on(async {
        let t = client
            .get_token("anthropic", Some("work"))
            .await
            .expect("get")
            .expect("found");
        assert_eq!(t.fields()["access_token"], "at-anthropic-work");
        assert!(!t.fields().contains_key("refresh_token"));
        assert!(client
            .get_token("anthropic", Some("nope"))
            .await
            .expect("get")
            .is_none());
        assert!(client.get_api_key("missing").await.expect("get").is_none());
        assert_eq!(
            client
                .get_api_key("openai")
                .await
                .expect("get")
                .expect("key")
                .expose(),
            "sk-openai"
        );
        assert!(client.has_api_key("anthropic").await.expect("has"));
        assert_eq!(
            client.list_providers().await.expect("list"),
            vec!["anthropic", "gemini"]
        );
        assert_eq!(
            client.list_buckets("anthropic").await.expect("list"),
            vec!["default", "work"]
        );
        assert_eq!(
            client.list_api_keys().await.expect("list"),
            vec!["anthropic", "openai"]
        );
        client
            .save_token("newp", None, &token("at-new", Some("rt-from-sandbox")))
            .await
            .expect("save");
        let saved = client
            .get_token("newp", None)
            .await
            .expect("get")
            .expect("saved");
        assert_eq!(saved.fields()["access_token"], "at-new");
        let stats = client
            .get_bucket_stats("newp", None)
            .await
            .expect("stats")
            .expect("found");
        assert_eq!((stats.request_count, stats.percentage), (1, 100.0));
        client.remove_token("newp", None).await.expect("remove");
        assert!(client.get_token("newp", None).await.expect("get").is_none());
        let err = client
            .get_token("../x", None)
            .await
            .expect_err("invalid name");
        assert_eq!(err.code(), Some(ErrorCode::InvalidRequest));
        assert_eq!(
            sessions_async(&s).await,
            1,
            "one connection served everything"
        );
    });
}

#[test]
fn many_requests_in_flight_on_one_connection() {
    let s = TestServer::start();
    let client = Client::new(&s.path);
    rt().block_on(async {
        let calls = (0..40).map(|i| {
            let c = client.clone();
            async move {
                let bucket = if i % 2 == 0 { "default" } else { "work" };
                c.get_token("anthropic", Some(bucket))
                    .await
                    .expect("get")
                    .expect("found")
            }
        });
        let results = futures_util::future::join_all(calls).await;
        assert_eq!(results.len(), 40);
        assert_eq!(sessions_async(&s).await, 1);
    });
}

#[test]
fn unauthorized_is_a_typed_error_with_the_word() {
    let mut profile = credproxy::policy::Profile::default();
    profile.allow("gemini").expect("allow");
    let s = TestServer::start_with(profile, short_limits(), seeded());
    let client = Client::new(&s.path);
    let err = rt()
        .block_on(client.get_token("anthropic", None))
        .expect_err("outside");
    assert_eq!(err.code(), Some(ErrorCode::Unauthorized));
    assert!(err.to_string().starts_with("UNAUTHORIZED: "), "{err}");
}

#[test]
fn idle_close_then_fresh_connect_and_handshake() {
    let s = TestServer::start();
    let config = ClientConfig {
        idle_timeout: Duration::from_millis(150),
        ..ClientConfig::default()
    };
    let client = Client::with_config(&s.path, config);
    let runtime = rt();
    runtime.block_on(async {
        assert!(client.has_api_key("openai").await.expect("has"));
        tokio::time::sleep(Duration::from_millis(400)).await;
    });
    assert_eq!(sessions(&s), 0, "the client closed its idle connection");
    runtime.block_on(async {
        assert!(client
            .has_api_key("openai")
            .await
            .expect("reconnects after its own idle close"));
        assert_eq!(sessions_async(&s).await, 1);
    });
}

#[test]
fn lost_connection_fails_every_later_call_without_reconnecting() {
    let mut s = TestServer::start();
    let client = Client::new(&s.path);
    let runtime = rt();
    runtime.block_on(async {
        assert!(client.has_api_key("openai").await.expect("has"));
    });
    s.shutdown();
    // A new server on the same path would be reachable; the client must not reconnect.
    runtime.block_on(async {
        for _ in 0..2 {
            let err = client.list_providers().await.expect_err("lost");
            assert!(matches!(err, ClientError::ConnectionLost), "{err:?}");
            assert_eq!(
                err.to_string(),
                "Credential proxy connection lost. Restart the session."
            );
        }
    });
}

#[test]
fn unreachable_proxy_is_a_connect_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let client = Client::new(dir.path().join("none.sock"));
    let err = rt()
        .block_on(client.list_providers())
        .expect_err("no server");
    assert!(matches!(err, ClientError::Connect { .. }), "{err:?}");
}

/// A stored token too large for a version-1 reply (written by hand here; a version-2
/// client could save one too) is answered `RESPONSE_TOO_LARGE` on a version-1
/// connection (PROTOCOL.md §3, §13), and the connection stays usable.
#[test]
fn oversize_reply_becomes_response_too_large_and_the_connection_stays() {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let store = tempfile::tempdir().expect("store");
    let backend = credproxy::backend::FileBackend::open(store.path()).expect("open store");
    let big = "x".repeat(65_500);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .recursive(true)
        .create(store.path().join("tokens/big"))
        .expect("mkdir");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(store.path().join("tokens/big/default.json"))
        .expect("create");
    std::io::Write::write_all(
        &mut file,
        json!({"access_token": "at", "expiry": 1, "token_type": "Bearer", "blob": big})
            .to_string()
            .as_bytes(),
    )
    .expect("write");
    credproxy::backend::Backend::set_key(&backend, "openai", &"sk-openai".into()).expect("key");
    let dir = tempfile::tempdir().expect("sock dir");
    let mut config = credproxy::Config::new(std::sync::Arc::new(backend));
    common::offline(&mut config);
    config.socket_dir = Some(dir.path().to_owned());
    config.profile = allow_all();
    config.limits = short_limits();
    let handle = credproxy::Supervisor::start(config).expect("server starts");
    let mut raw = common::Raw::connect(handle.socket_path());
    raw.handshake();
    let reply = raw.call("1", "get_token", json!({"provider":"big"}));
    common::assert_err(&reply, "1", "RESPONSE_TOO_LARGE");
    assert_eq!(
        data(&raw.call("2", "has_api_key", json!({"name":"openai"})))["exists"],
        true
    );
    handle.shutdown_blocking().expect("shutdown");
}
