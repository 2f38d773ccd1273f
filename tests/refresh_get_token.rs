//! Host-side refresh through `get_token` and `refresh_token` (PROTOCOL.md §14), against a
//! real token endpoint on 127.0.0.1, over raw frames on the real socket.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::token_endpoint::{Reply, TokenEndpoint};
use common::{allow_all, assert_err, data, short_limits, Raw};
use credproxy::backend::{Backend, MemoryBackend};
use credproxy::oauth::{Endpoint, EndpointOverride, RetryPolicy, Timeouts};
use credproxy::refresh::RefreshConfig;
use credproxy::token::Token;
use credproxy::{Config, ServerHandle, Supervisor};
use serde_json::{json, Value};

fn now() -> u64 {
    credproxy::oauth::epoch_seconds(std::time::SystemTime::now())
}

fn stored(access: &str, refresh: &str, expiry: u64) -> Token {
    Token::from_value(json!({
        "access_token": access, "refresh_token": refresh, "expiry": expiry,
        "token_type": "Bearer", "account_id": "acct-1"
    }))
    .expect("token")
}

/// Refresh settings for the tests: the endpoint at `url` for `anthropic`, short retries.
fn refresh_config(url: &str) -> RefreshConfig {
    let endpoint = Endpoint::resolve(
        "anthropic",
        &EndpointOverride {
            token_url: Some(url.to_owned()),
            ..EndpointOverride::default()
        },
    )
    .expect("endpoint");
    let mut config =
        RefreshConfig::default().with_endpoints([("anthropic".into(), endpoint)].into());
    config.timeouts = Timeouts {
        connect: Duration::from_secs(2),
        attempt: Duration::from_secs(2),
        total: Duration::from_secs(4),
    };
    config.retry = RetryPolicy {
        attempts: 3,
        backoff: vec![Duration::from_millis(50), Duration::from_millis(100)],
    };
    config
}

struct Server {
    handle: Option<ServerHandle>,
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
}

impl Server {
    fn start(backend: Arc<dyn Backend>, refresh: RefreshConfig) -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = Config::new(backend);
        config.socket_dir = Some(dir.path().to_owned());
        config.profile = allow_all();
        config.limits = short_limits();
        config.refresh = refresh;
        let handle = Supervisor::start(config).expect("start");
        let path = handle.socket_path().to_owned();
        Server {
            handle: Some(handle),
            _dir: dir,
            path,
        }
    }

    fn connect(&self) -> Raw {
        let mut raw = Raw::connect(&self.path);
        raw.handshake();
        raw
    }

    fn shutdown(&mut self) -> credproxy::ShutdownReport {
        self.handle
            .take()
            .expect("running")
            .shutdown_blocking()
            .expect("shutdown")
    }
}

fn access(reply: &Value) -> String {
    data(reply)["access_token"]
        .as_str()
        .expect("access_token")
        .to_owned()
}

#[test]
fn an_expired_token_is_refreshed_once_and_the_rotated_refresh_token_stored() {
    let endpoint = TokenEndpoint::start("rt-0");
    let memory = Arc::new(MemoryBackend::new());
    memory
        .insert_token("anthropic", "default", stored("at-old", "rt-0", now() - 10))
        .expect("seed");
    let mut server = Server::start(memory.clone(), refresh_config(&endpoint.url()));
    let mut raw = server.connect();
    let reply = raw.call("1", "get_token", json!({"provider": "anthropic"}));
    assert_eq!(access(&reply), "at-1", "{reply}");
    assert!(data(&reply).get("refresh_token").is_none());
    assert_eq!(data(&reply)["account_id"], "acct-1", "other fields kept");
    assert!(data(&reply)["expiry"].as_u64().unwrap() > now() + 3000);
    assert_eq!(endpoint.count(), 1);
    let sent = endpoint.received();
    assert_eq!(sent[0].param("refresh_token"), Some("rt-0"));
    assert_eq!(sent[0].param("grant_type"), Some("refresh_token"));
    let t = memory.get_token("anthropic", "default").unwrap().unwrap();
    assert_eq!(t.refresh_token(), Some("rt-1"));
    // Fresh now: served from the store, nothing upstream.
    let reply = raw.call(
        "2",
        "get_token",
        json!({"provider": "anthropic", "bucket": "default"}),
    );
    assert_eq!(access(&reply), "at-1");
    assert_eq!(endpoint.count(), 1);
    // An explicit refresh within the cooldown does not go upstream either.
    let reply = raw.call("3", "refresh_token", json!({"provider": "anthropic"}));
    assert_eq!(access(&reply), "at-1", "{reply}");
    assert_eq!(endpoint.count(), 1);
    assert_eq!(endpoint.reused(), 0);
    let report = server.shutdown();
    assert!(report.refresher_stopped);
    assert_eq!(report.refreshes_abandoned, 0);
}

#[test]
fn invalid_grant_needs_login_until_a_token_is_saved() {
    let endpoint = TokenEndpoint::start("rt-0");
    endpoint.push([Reply::error(400, "invalid_grant", "revoked")]);
    let memory = Arc::new(MemoryBackend::new());
    memory
        .insert_token("anthropic", "default", stored("at-old", "rt-0", now() - 10))
        .expect("seed");
    let mut server = Server::start(memory.clone(), refresh_config(&endpoint.url()));
    let mut raw = server.connect();
    let started = Instant::now();
    let reply = raw.call("1", "get_token", json!({"provider": "anthropic"}));
    let message = assert_err(&reply, "1", "REAUTH_REQUIRED");
    assert!(message.contains("anthropic:default"), "{message}");
    assert!(started.elapsed() < Duration::from_secs(2), "no retry");
    assert_eq!(endpoint.count(), 1);
    // Marked: no second request upstream.
    let reply = raw.call("2", "refresh_token", json!({"provider": "anthropic"}));
    assert_err(&reply, "2", "REAUTH_REQUIRED");
    assert_eq!(endpoint.count(), 1);
    assert!(memory
        .refresh_state("anthropic", "default")
        .unwrap()
        .needs_login
        .is_some());
    // A save clears the mark.
    memory
        .save_token(
            "anthropic",
            "default",
            &stored("at-new", "rt-0", now() - 5),
            credproxy::backend::SaveMode::Replace,
        )
        .unwrap();
    let reply = raw.call("3", "get_token", json!({"provider": "anthropic"}));
    assert_eq!(access(&reply), "at-1", "{reply}");
    server.shutdown();
}
