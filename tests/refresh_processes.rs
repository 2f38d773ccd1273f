//! Host-side refresh with the real binary: two `credproxy serve` on one file store never
//! both refresh (the store's per-bucket lock), and no refresh token, client secret, access
//! token or upstream body reaches a log line at trace level, in text or JSON, or the wire.

mod common;

use std::time::Duration;

use common::process::{Env, Fixture};
use common::refresh::now;
use common::token_endpoint::{Reply, TokenEndpoint};
use common::{data, Raw};
use credproxy::backend::{Backend, FileBackend};
use serde_json::{json, Value};

impl Fixture {
    /// Stores an expired token for provider:bucket with refresh token `refresh`.
    fn seed_expired(&self, provider: &str, bucket: &str, refresh: &str) {
        let token = json!({"access_token": format!("at-old-{bucket}"), "refresh_token": refresh,
            "expiry": now() - 10, "token_type": "Bearer"});
        self.seed(
            &["token", "set", provider, "--bucket", bucket],
            token.to_string().as_bytes(),
        );
    }

    /// Writes a profile pointing `anthropic` (and `acme`, with a client secret from the
    /// store key `acme-secret`, JSON body) at `url`; returns its path.
    fn refresh_profile(&self, url: &str) -> String {
        let path = self.tmp.path().join("profile.toml");
        let text = format!(
            "allow_all = true\nrate_limit = 0\n\n[provider.anthropic]\ntoken_url = \"{url}\"\n\n\
             [provider.acme]\ntoken_url = \"{url}\"\nclient_id = \"acme-cli\"\n\
             client_secret_key = \"acme-secret\"\nbody = \"json\"\n"
        );
        std::fs::write(&path, text).expect("profile");
        path.to_str().unwrap().to_owned()
    }

    fn stored_refresh(&self, provider: &str, bucket: &str) -> Option<String> {
        let store = FileBackend::open(&self.store).expect("open");
        store
            .get_token(provider, bucket)
            .expect("read")
            .and_then(|t| t.refresh_token().map(str::to_owned))
    }
}

#[test]
fn two_servers_on_one_store_refresh_once() {
    let endpoint = TokenEndpoint::start("rt-0");
    endpoint
        .push([Reply::token("at-storm", 3600, Some("rt-storm")).after(Duration::from_millis(400))]);
    let fx = Fixture::new();
    fx.seed_expired("anthropic", "default", "rt-0");
    let profile = fx.refresh_profile(&endpoint.url());
    let args = ["--profile", profile.as_str()];
    let a = fx.start_serve(&args, Env::ISOLATED);
    let b = fx.start_serve(&args, Env::ISOLATED);
    let mut conns: Vec<Raw> = (0..50)
        .map(|i| if i % 2 == 0 { a.connect() } else { b.connect() })
        .collect();
    let replies: Vec<Value> = std::thread::scope(|s| {
        let handles: Vec<_> = conns
            .iter_mut()
            .enumerate()
            .map(|(c, raw)| {
                s.spawn(move || {
                    for i in 0..4 {
                        raw.send(&json!({"id": format!("{c}-{i}"), "op": "get_token",
                            "payload": {"provider": "anthropic"}}));
                    }
                    (0..4).map(|_| raw.recv()).collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    assert_eq!(replies.len(), 200);
    for reply in &replies {
        assert_eq!(data(reply)["access_token"], "at-storm", "{reply}");
    }
    assert_eq!(endpoint.count(), 1, "one refresh across both servers");
    assert_eq!(endpoint.reused(), 0);
    assert_eq!(
        fx.stored_refresh("anthropic", "default").as_deref(),
        Some("rt-storm")
    );
    for server in [a, b] {
        let stopped = server.stop(nix::sys::signal::Signal::SIGTERM);
        assert!(stopped.status.success(), "{stopped:?}");
    }
}

/// Every secret of a refresh, and the provider's answer, stay out of the logs at trace
/// level in both formats and off the wire.
#[test]
fn no_secret_or_upstream_body_in_trace_logs_or_on_the_wire() {
    const NEVER: [&str; 7] = [
        "rt-CANARY-0",
        "rt-CANARY-ROTATED",
        "rt-CANARY-B2",
        "rt-CANARY-ACME",
        "CLIENT-SECRET-CANARY",
        "BODY-CANARY",
        "at-CANARY-ACCESS",
    ];
    for format in ["text", "json"] {
        let endpoint = TokenEndpoint::start("unused");
        endpoint.push([
            Reply::token("at-CANARY-ACCESS", 3600, Some("rt-CANARY-ROTATED")),
            Reply::error(400, "invalid_grant", "BODY-CANARY rt-CANARY-B2"),
            Reply::json(
                200,
                json!({"access_token": "at-acme", "expires_in": 60,
                "refresh_token": "rt-CANARY-ACME"}),
            ),
        ]);
        let fx = Fixture::new();
        fx.seed_expired("anthropic", "default", "rt-CANARY-0");
        fx.seed_expired("anthropic", "b2", "rt-CANARY-B2");
        fx.seed_expired("acme", "default", "rt-CANARY-ACME");
        fx.seed_key("acme-secret", "CLIENT-SECRET-CANARY");
        let profile = fx.refresh_profile(&endpoint.url());
        let env = Env::ISOLATED.with(&[("RUST_LOG", "trace")]);
        let server = fx.start_serve(
            &["--profile", profile.as_str(), "--log-format", format],
            env,
        );
        let mut raw = server.connect();
        let mut wire = Vec::new();
        let reply = raw.call("1", "get_token", json!({"provider": "anthropic"}));
        assert_eq!(data(&reply)["access_token"], "at-CANARY-ACCESS", "{reply}");
        wire.push(reply);
        let reply = raw.call(
            "2",
            "get_token",
            json!({"provider": "anthropic", "bucket": "b2"}),
        );
        assert_eq!(reply["code"], "REAUTH_REQUIRED", "{reply}");
        wire.push(reply);
        let reply = raw.call("3", "get_token", json!({"provider": "acme"}));
        assert_eq!(data(&reply)["access_token"], "at-acme", "{reply}");
        wire.push(reply);
        let stopped = server.stop(nix::sys::signal::Signal::SIGTERM);
        let received = endpoint.received();
        assert_eq!(received.len(), 3);
        assert_eq!(
            received[2].param("client_secret"),
            Some("CLIENT-SECRET-CANARY")
        );
        assert!(
            stopped.stderr.contains("token refreshed"),
            "{format}: refreshes are logged"
        );
        assert!(
            stopped.stderr.contains("TRACE") || stopped.stderr.contains("\"TRACE\""),
            "{format}: trace on"
        );
        for canary in NEVER {
            assert!(
                !stopped.stderr.contains(canary),
                "{format}: {canary} logged"
            );
            assert!(
                !stopped.stdout_rest.contains(canary),
                "{format}: {canary} printed"
            );
        }
        for reply in &wire {
            let text = reply.to_string();
            assert!(!text.contains("refresh_token"), "{text}");
            for canary in NEVER.iter().filter(|c| **c != "at-CANARY-ACCESS") {
                assert!(!text.contains(canary), "{canary} on the wire: {text}");
            }
        }
        // The wire never carried the rotated refresh token, but the store keeps it.
        assert_eq!(
            fx.stored_refresh("anthropic", "default").as_deref(),
            Some("rt-CANARY-ROTATED")
        );
    }
}

/// A plain-http loopback token endpoint is reached directly even when the environment
/// names a proxy (and no NO_PROXY): the refresh token never travels through a proxy.
#[test]
fn a_loopback_endpoint_is_never_reached_through_a_proxy() {
    use std::net::TcpListener;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let proxy = TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy_url = format!("http://{}", proxy.local_addr().unwrap());
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    std::thread::spawn(move || {
        for conn in proxy.incoming() {
            if conn.is_ok() {
                counter.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
    let endpoint = TokenEndpoint::start("rt-0");
    let fx = Fixture::new();
    fx.seed_expired("anthropic", "default", "rt-0");
    let profile = fx.refresh_profile(&endpoint.url());
    let vars = [
        ("HTTP_PROXY", proxy_url.as_str()),
        ("http_proxy", proxy_url.as_str()),
        ("HTTPS_PROXY", proxy_url.as_str()),
        ("ALL_PROXY", proxy_url.as_str()),
        ("NO_PROXY", ""),
        ("no_proxy", ""),
    ];
    let server = fx.start_serve(&["--profile", profile.as_str()], Env::ISOLATED.with(&vars));
    let mut raw = server.connect();
    let reply = raw.call("1", "get_token", json!({"provider": "anthropic"}));
    assert_eq!(data(&reply)["access_token"], "at-1", "{reply}");
    assert_eq!(endpoint.count(), 1);
    assert_eq!(hits.load(Ordering::SeqCst), 0, "nothing went to the proxy");
    server.stop(nix::sys::signal::Signal::SIGTERM);
}

/// `credproxy logout` on the host while a running server refreshes the same bucket: once
/// logout has exited, the token is gone for good; the refresh's answer is discarded.
#[test]
fn logout_during_a_running_servers_refresh_wins() {
    use common::process::{run, Stdin, BIN};
    let endpoint = TokenEndpoint::start("rt-0");
    endpoint
        .push([Reply::token("at-late", 3600, Some("rt-late")).after(Duration::from_millis(900))]);
    let fx = Fixture::new();
    fx.seed_expired("anthropic", "default", "rt-0");
    let profile = fx.refresh_profile(&endpoint.url());
    let server = fx.start_serve(&["--profile", profile.as_str()], Env::ISOLATED);
    let mut raw = server.connect();
    raw.send(&json!({"id": "g", "op": "get_token", "payload": {"provider": "anthropic"}}));
    assert_eq!(
        endpoint.wait_for(1, Duration::from_secs(3)),
        1,
        "refresh on its way"
    );
    let out = run(
        BIN,
        &[
            "logout",
            "anthropic",
            "--store",
            fx.store_str(),
            "--profile",
            profile.as_str(),
        ],
        Stdin::Null,
        Env::ISOLATED,
    );
    assert_eq!(out.code(), Some(0), "{out:?}");
    let reply = raw.recv();
    assert_eq!(
        reply["code"], "NOT_FOUND",
        "the refresh found the token removed: {reply}"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        fx.stored_refresh("anthropic", "default"),
        None,
        "still removed"
    );
    let reply = raw.call("2", "get_token", json!({"provider": "anthropic"}));
    assert_eq!(reply["code"], "NOT_FOUND", "{reply}");
    let stopped = server.stop(nix::sys::signal::Signal::SIGTERM);
    assert!(
        stopped.stderr.contains("removed meanwhile"),
        "{}",
        stopped.stderr
    );
}
