//! Host-side refresh through `get_token` and `refresh_token` (PROTOCOL.md §14), against a
//! real token endpoint on 127.0.0.1, over raw frames on the real socket.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::refresh::{access, now, refresh_config, stored, RefreshServer};
use common::token_endpoint::{Reply, TokenEndpoint};
use common::{assert_err, data};
use credproxy::backend::{Backend, MemoryBackend, SaveMode};
use credproxy::refresh::Clock;
use serde_json::{json, Value};

/// A memory store holding `anthropic:default` = (`at-old`, `rt-0`, `expiry`).
fn store_with(expiry: u64) -> Arc<MemoryBackend> {
    let memory = Arc::new(MemoryBackend::new());
    memory
        .insert_token("anthropic", "default", stored("at-old", "rt-0", expiry))
        .expect("seed");
    memory
}

fn stored_access(memory: &MemoryBackend) -> Option<String> {
    memory
        .get_token("anthropic", "default")
        .expect("read")
        .map(|t| t.fields()["access_token"].as_str().unwrap().to_owned())
}

fn stored_refresh(memory: &MemoryBackend) -> Option<String> {
    memory
        .get_token("anthropic", "default")
        .expect("read")
        .and_then(|t| t.refresh_token().map(str::to_owned))
}

#[test]
fn an_expired_token_is_refreshed_once_and_the_rotated_refresh_token_stored() {
    let endpoint = TokenEndpoint::start("rt-0");
    let memory = store_with(now() - 10);
    let mut server = RefreshServer::start(memory.clone(), refresh_config(&endpoint.url()));
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
    assert_eq!(stored_refresh(&memory).as_deref(), Some("rt-1"));
    assert_eq!(stored_access(&memory).as_deref(), Some("at-1"));
    // Fresh now: served from the store, nothing upstream.
    let reply = raw.call(
        "2",
        "get_token",
        json!({"provider": "anthropic", "bucket": "default"}),
    );
    assert_eq!(access(&reply), "at-1");
    // An explicit refresh within the cooldown does not go upstream either.
    let reply = raw.call("3", "refresh_token", json!({"provider": "anthropic"}));
    assert_eq!(access(&reply), "at-1", "{reply}");
    assert!(data(&reply).get("refresh_token").is_none());
    assert_eq!(endpoint.count(), 1);
    assert_eq!(endpoint.reused(), 0, "no refresh token was sent twice");
    let report = server.shutdown();
    assert!(report.refresher_stopped);
    assert_eq!(report.refreshes_abandoned, 0);
}

/// The llxprt v1 client asks `get_token` with a UUID id and no bucket, a little before
/// the token expires: it gets a fresh token.
#[test]
fn a_v1_client_gets_a_fresh_token_for_a_nearly_expired_one() {
    let endpoint = TokenEndpoint::start("rt-0");
    let memory = store_with(now() + 30);
    let mut server = RefreshServer::start(memory.clone(), refresh_config(&endpoint.url()));
    let mut raw = server.connect();
    let id = "3f0c5d2e-8f6a-4d8e-9a1b-2c3d4e5f6a7b";
    raw.send(&json!({"v": 1, "id": id, "op": "get_token", "payload": {"provider": "anthropic"}}));
    let reply = raw.recv();
    assert_eq!(reply["id"], id);
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(access(&reply), "at-1");
    assert_eq!(endpoint.count(), 1);
    server.shutdown();
}

#[test]
fn tokens_that_cannot_be_refreshed_are_served_as_stored() {
    let endpoint = TokenEndpoint::start("rt-0");
    let memory = Arc::new(MemoryBackend::new());
    // A provider without a token endpoint, and a token without a refresh token.
    memory
        .insert_token("acme", "default", stored("at-acme", "rt-acme", now() - 100))
        .unwrap();
    let mut bare = stored("at-bare", "x", now() - 100);
    bare = credproxy::token::Token::from_value(json!({
        "access_token": bare.fields()["access_token"], "expiry": now() - 100, "token_type": "Bearer"
    }))
    .unwrap();
    memory.insert_token("anthropic", "bare", bare).unwrap();
    let mut server = RefreshServer::start(memory.clone(), refresh_config(&endpoint.url()));
    let mut raw = server.connect();
    let reply = raw.call("1", "get_token", json!({"provider": "acme"}));
    assert_eq!(access(&reply), "at-acme", "expired, served as stored");
    let reply = raw.call(
        "2",
        "get_token",
        json!({"provider": "anthropic", "bucket": "bare"}),
    );
    assert_eq!(access(&reply), "at-bare");
    let reply = raw.call("3", "refresh_token", json!({"provider": "acme"}));
    assert_err(&reply, "3", "REFRESH_NOT_AVAILABLE");
    let reply = raw.call(
        "4",
        "refresh_token",
        json!({"provider": "anthropic", "bucket": "bare"}),
    );
    assert_err(&reply, "4", "REFRESH_NOT_AVAILABLE");
    let reply = raw.call(
        "5",
        "refresh_token",
        json!({"provider": "anthropic", "bucket": "none"}),
    );
    assert_err(&reply, "5", "NOT_FOUND");
    let reply = raw.call(
        "6",
        "refresh_token",
        json!({"provider": "anthropic", "bucket": 7}),
    );
    assert_err(&reply, "6", "INVALID_REQUEST");
    assert_eq!(endpoint.count(), 0);
    server.shutdown();
}

#[test]
fn no_refresh_serves_tokens_as_stored() {
    let endpoint = TokenEndpoint::start("rt-0");
    let memory = store_with(now() - 10);
    let mut config = refresh_config(&endpoint.url());
    config.settings.enabled = false;
    let mut server = RefreshServer::start(memory.clone(), config);
    let mut raw = server.connect();
    let reply = raw.call("1", "get_token", json!({"provider": "anthropic"}));
    assert_eq!(access(&reply), "at-old");
    let reply = raw.call("2", "refresh_token", json!({"provider": "anthropic"}));
    assert_err(&reply, "2", "REFRESH_NOT_AVAILABLE");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(endpoint.count(), 0);
    server.shutdown();
}

/// 200 `get_token` on 50 connections for one expired token: one request upstream, and
/// every answer is the same new token. Half omit the bucket, half name `"default"`.
#[test]
fn a_storm_of_get_token_makes_one_refresh() {
    let endpoint = TokenEndpoint::start("rt-0");
    endpoint
        .push([Reply::token("at-storm", 3600, Some("rt-storm")).after(Duration::from_millis(300))]);
    let memory = store_with(now() - 10);
    let mut server = RefreshServer::start(memory.clone(), refresh_config(&endpoint.url()));
    let mut conns: Vec<_> = (0..50).map(|_| server.connect()).collect();
    let answers: Vec<Vec<Value>> = std::thread::scope(|s| {
        let handles: Vec<_> = conns
            .iter_mut()
            .enumerate()
            .map(|(c, raw)| {
                s.spawn(move || {
                    for i in 0..4 {
                        let payload = if (c + i) % 2 == 0 {
                            json!({"provider": "anthropic"})
                        } else {
                            json!({"provider": "anthropic", "bucket": "default"})
                        };
                        raw.send(&json!({"id": format!("{c}-{i}"), "op": "get_token", "payload": payload}));
                    }
                    (0..4).map(|_| raw.recv()).collect()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let replies: Vec<&Value> = answers.iter().flatten().collect();
    assert_eq!(replies.len(), 200);
    for reply in replies {
        assert_eq!(access(reply), "at-storm", "{reply}");
    }
    assert_eq!(endpoint.count(), 1);
    assert_eq!(stored_refresh(&memory).as_deref(), Some("rt-storm"));
    server.shutdown();
}

/// What the server answers and stores for each scripted failure of the token endpoint.
#[test]
fn failures_are_classified_retried_or_not_and_leave_the_store_unchanged() {
    struct Case {
        name: &'static str,
        replies: Vec<Reply>,
        code: &'static str,
        calls: usize,
    }
    let big = vec![b'x'; 10 << 20];
    let cases = vec![
        Case {
            name: "invalid_grant",
            replies: vec![Reply::error(400, "invalid_grant", "desc-canary")],
            code: "REAUTH_REQUIRED",
            calls: 1,
        },
        Case {
            name: "any 401",
            replies: vec![Reply::error(401, "whatever", "no")],
            code: "REAUTH_REQUIRED",
            calls: 1,
        },
        Case {
            name: "other 4xx",
            replies: vec![Reply::error(400, "invalid_request", "bad")],
            code: "REFRESH_FAILED",
            calls: 1,
        },
        Case {
            name: "three 500s",
            replies: vec![
                Reply::raw(500, b"oops"),
                Reply::raw(502, b""),
                Reply::raw(503, b""),
            ],
            code: "REFRESH_FAILED",
            calls: 3,
        },
        Case {
            name: "10 MiB body",
            replies: vec![Reply::raw(200, &big)],
            code: "REFRESH_FAILED",
            calls: 1,
        },
        Case {
            name: "10 MiB streamed",
            replies: vec![Reply::endless(10 << 20)],
            code: "REFRESH_FAILED",
            calls: 1,
        },
        Case {
            name: "not JSON",
            replies: vec![Reply::raw(200, b"<html>hello</html>")],
            code: "REFRESH_FAILED",
            calls: 1,
        },
        Case {
            name: "no access_token",
            replies: vec![Reply::json(
                200,
                json!({"token_type": "Bearer", "expires_in": 60}),
            )],
            code: "REFRESH_FAILED",
            calls: 1,
        },
    ];
    for case in cases {
        let endpoint = TokenEndpoint::start("rt-0");
        endpoint.push(case.replies);
        let memory = store_with(now() - 10);
        let mut server = RefreshServer::start(memory.clone(), refresh_config(&endpoint.url()));
        let mut raw = server.connect();
        let started = Instant::now();
        let reply = raw.call("1", "get_token", json!({"provider": "anthropic"}));
        assert_err(&reply, "1", case.code);
        assert!(started.elapsed() < Duration::from_secs(3), "{}", case.name);
        assert_eq!(endpoint.count(), case.calls, "{}", case.name);
        assert_eq!(
            stored_access(&memory).as_deref(),
            Some("at-old"),
            "{}",
            case.name
        );
        assert_eq!(
            stored_refresh(&memory).as_deref(),
            Some("rt-0"),
            "{}",
            case.name
        );
        let message = reply["error"].as_str().unwrap();
        assert!(message.contains("anthropic:default"), "{message}");
        for leak in ["oops", "desc-canary", "html", "rt-0", "127.0.0.1"] {
            assert!(!message.contains(leak), "{}: {message}", case.name);
        }
        server.shutdown();
    }
}

#[test]
fn transient_failures_are_retried_and_a_429_waits_for_retry_after() {
    let endpoint = TokenEndpoint::start("rt-0");
    endpoint.push([Reply::raw(500, b""), Reply::raw(500, b"")]);
    let memory = store_with(now() - 10);
    let mut server = RefreshServer::start(memory.clone(), refresh_config(&endpoint.url()));
    let mut raw = server.connect();
    let reply = raw.call("1", "get_token", json!({"provider": "anthropic"}));
    assert_eq!(access(&reply), "at-1", "third attempt: {reply}");
    assert_eq!(endpoint.count(), 3);
    server.shutdown();

    let endpoint = TokenEndpoint::start("rt-0");
    endpoint.push([Reply::error(429, "slow_down", "").header("Retry-After", "1")]);
    let memory = store_with(now() - 10);
    let mut server = RefreshServer::start(memory.clone(), refresh_config(&endpoint.url()));
    let mut raw = server.connect();
    let started = Instant::now();
    let reply = raw.call("1", "get_token", json!({"provider": "anthropic"}));
    assert_eq!(access(&reply), "at-1", "{reply}");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "Retry-After honoured"
    );
    assert_eq!(endpoint.count(), 2);
    server.shutdown();
}

#[test]
fn a_hanging_endpoint_gives_refresh_failed_in_bounded_time() {
    let endpoint = TokenEndpoint::start("rt-0");
    let hang = Reply::token("at-late", 3600, None).after(Duration::from_secs(8));
    endpoint.push([hang.clone(), hang.clone(), hang]);
    let memory = store_with(now() - 10);
    let mut server = RefreshServer::start(memory.clone(), refresh_config(&endpoint.url()));
    let mut raw = server.connect();
    let started = Instant::now();
    let reply = raw.call("1", "get_token", json!({"provider": "anthropic"}));
    assert_err(&reply, "1", "REFRESH_FAILED");
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(3500),
        "bounded by the 2 s deadline: {took:?}"
    );
    assert_eq!(stored_access(&memory).as_deref(), Some("at-old"));
    server.shutdown();
}

/// A due token that is still valid is served when its refresh fails; an explicit refresh
/// reports the failure.
#[test]
fn a_failed_refresh_of_a_still_valid_token_serves_the_stored_one() {
    let endpoint = TokenEndpoint::start("rt-0");
    endpoint.push((0..6).map(|_| Reply::raw(503, b"")));
    let memory = store_with(now() + 30);
    let mut server = RefreshServer::start(memory.clone(), refresh_config(&endpoint.url()));
    let mut raw = server.connect();
    let reply = raw.call("1", "get_token", json!({"provider": "anthropic"}));
    assert_eq!(access(&reply), "at-old", "{reply}");
    assert_eq!(endpoint.count(), 3, "three attempts");
    // Within the failure back-off: the stored token while valid, the failure for an
    // explicit refresh, and nothing more upstream however often the sandbox asks.
    for i in 0..20 {
        let reply = raw.call(
            &format!("g{i}"),
            "get_token",
            json!({"provider": "anthropic"}),
        );
        assert_eq!(access(&reply), "at-old", "{reply}");
    }
    let reply = raw.call("2", "refresh_token", json!({"provider": "anthropic"}));
    assert_err(&reply, "2", "REFRESH_FAILED");
    assert_eq!(endpoint.count(), 3);
    server.shutdown();
}

/// An expired token whose refresh keeps failing: a sandbox polling it gets REFRESH_FAILED
/// at once and the provider sees one refresh (3 attempts) per back-off period, not one
/// per request.
#[test]
fn a_polling_sandbox_cannot_make_the_host_hammer_the_provider() {
    let endpoint = TokenEndpoint::start("rt-0");
    endpoint.push((0..30).map(|_| Reply::error(400, "invalid_request", "x")));
    let memory = store_with(now() - 10);
    let mut config = refresh_config(&endpoint.url());
    config.failure_backoff = std::time::Duration::from_millis(500);
    let mut server = RefreshServer::start(memory.clone(), config);
    let mut raw = server.connect();
    for i in 0..20 {
        let reply = raw.call(
            &i.to_string(),
            "get_token",
            json!({"provider": "anthropic"}),
        );
        assert_err(&reply, &i.to_string(), "REFRESH_FAILED");
    }
    assert_eq!(
        endpoint.count(),
        1,
        "a refusal is not retried, and then backed off"
    );
    std::thread::sleep(std::time::Duration::from_millis(600));
    let reply = raw.call("again", "get_token", json!({"provider": "anthropic"}));
    assert_err(&reply, "again", "REFRESH_FAILED");
    assert_eq!(endpoint.count(), 2, "tried again after the back-off");
    server.shutdown();
}

/// A refresh that cannot get the bucket's lock in time answers with the token read while
/// it is valid, REFRESH_FAILED once expired; never NOT_FOUND for a stored token.
#[test]
fn a_busy_refresh_lock_never_answers_not_found() {
    let endpoint = TokenEndpoint::start("rt-0");
    for (expiry, expect_valid) in [(now() + 25, true), (now() - 25, false)] {
        let memory = store_with(expiry);
        let mut config = refresh_config(&endpoint.url());
        // lock wait = total + 5 s: keep it short.
        config.timeouts.total = std::time::Duration::from_millis(100);
        let mut server = RefreshServer::start(memory.clone(), config);
        let held = memory.refresh_lock("anthropic", "default").unwrap();
        let mut raw = server.connect();
        // The lock wait is the refresh deadline plus 5 s.
        raw.stream
            .set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let reply = raw.call("1", "get_token", json!({"provider": "anthropic"}));
        if expect_valid {
            assert_eq!(access(&reply), "at-old", "{reply}");
        } else {
            assert_err(&reply, "1", "REFRESH_FAILED");
        }
        drop(held);
        server.shutdown();
    }
    assert_eq!(endpoint.count(), 0);
}

#[test]
fn invalid_grant_needs_login_until_a_token_is_saved() {
    let endpoint = TokenEndpoint::start("rt-0");
    endpoint.push([Reply::error(400, "invalid_grant", "desc-canary")]);
    let memory = store_with(now() - 10);
    let mut server = RefreshServer::start(memory.clone(), refresh_config(&endpoint.url()));
    let mut raw = server.connect();
    let reply = raw.call("1", "get_token", json!({"provider": "anthropic"}));
    let message = assert_err(&reply, "1", "REAUTH_REQUIRED");
    assert!(message.contains("log in again on the host"), "{message}");
    // Marked: no second request upstream, from get_token or refresh_token.
    let reply = raw.call("2", "refresh_token", json!({"provider": "anthropic"}));
    assert_err(&reply, "2", "REAUTH_REQUIRED");
    let reply = raw.call("3", "get_token", json!({"provider": "anthropic"}));
    assert_err(&reply, "3", "REAUTH_REQUIRED");
    assert_eq!(endpoint.count(), 1);
    let mark = memory.refresh_state("anthropic", "default").unwrap();
    let mark = mark.needs_login.expect("marked");
    assert_eq!(
        (mark.status, mark.code.as_deref()),
        (400, Some("invalid_grant"))
    );
    // A save from the sandbox (a new token, still expired here) clears the mark...
    let token = json!({"access_token": "at-saved", "expiry": now() - 5, "token_type": "Bearer"});
    let reply = raw.call(
        "4",
        "save_token",
        json!({"provider": "anthropic", "token": token}),
    );
    assert_eq!(reply["ok"], true, "{reply}");
    assert!(memory
        .refresh_state("anthropic", "default")
        .unwrap()
        .needs_login
        .is_none());
    // ... so the stored refresh token is tried again.
    let reply = raw.call("5", "get_token", json!({"provider": "anthropic"}));
    assert_eq!(access(&reply), "at-1", "{reply}");
    server.shutdown();
}

/// After `remove_token` has answered, no refresh that was running brings the token back;
/// the removal does not wait for the slow token endpoint.
#[test]
fn removal_during_a_slow_refresh_wins() {
    let endpoint = TokenEndpoint::start("rt-0");
    endpoint
        .push([Reply::token("at-late", 3600, Some("rt-late")).after(Duration::from_millis(800))]);
    let memory = store_with(now() - 10);
    let mut server = RefreshServer::start(memory.clone(), refresh_config(&endpoint.url()));
    let mut getter = server.connect();
    let mut remover = server.connect();
    getter.send(&json!({"id": "g", "op": "get_token", "payload": {"provider": "anthropic"}}));
    assert_eq!(endpoint.wait_for(1, Duration::from_secs(2)), 1);
    let started = Instant::now();
    let reply = remover.call("r", "remove_token", json!({"provider": "anthropic"}));
    assert_eq!(reply["ok"], true, "{reply}");
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "the removal did not wait"
    );
    assert_eq!(stored_access(&memory), None);
    let reply = getter.recv();
    assert_err(&reply, "g", "NOT_FOUND");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        stored_access(&memory),
        None,
        "the refresh did not bring it back"
    );
    let reply = remover.call("g2", "get_token", json!({"provider": "anthropic"}));
    assert_err(&reply, "g2", "NOT_FOUND");
    server.shutdown();
}

/// A new login saved while a refresh is on its way stays as saved.
#[test]
fn a_token_saved_during_a_refresh_wins() {
    let endpoint = TokenEndpoint::start("rt-0");
    endpoint
        .push([Reply::token("at-late", 3600, Some("rt-late")).after(Duration::from_millis(600))]);
    let memory = store_with(now() - 10);
    let mut server = RefreshServer::start(memory.clone(), refresh_config(&endpoint.url()));
    let mut getter = server.connect();
    getter.send(&json!({"id": "g", "op": "get_token", "payload": {"provider": "anthropic"}}));
    assert_eq!(endpoint.wait_for(1, Duration::from_secs(2)), 1);
    memory
        .save_token(
            "anthropic",
            "default",
            &stored("at-login", "rt-login", now() + 7200),
            SaveMode::Replace,
        )
        .unwrap();
    let reply = getter.recv();
    assert_eq!(access(&reply), "at-login", "{reply}");
    assert_eq!(stored_refresh(&memory).as_deref(), Some("rt-login"));
    server.shutdown();
}

/// The cooldown counts from the last successful refresh; an injected clock moves past it.
#[test]
fn explicit_refreshes_are_cooled_down_for_30_seconds() {
    let endpoint = TokenEndpoint::start("rt-0");
    let memory = store_with(now() + 3600);
    let offset = Arc::new(AtomicU64::new(0));
    let mut config = refresh_config(&endpoint.url());
    let clock_offset = offset.clone();
    config.clock = Clock::from_fn(move || now() + clock_offset.load(Ordering::SeqCst));
    let mut server = RefreshServer::start(memory.clone(), config);
    let mut raw = server.connect();
    let reply = raw.call("1", "refresh_token", json!({"provider": "anthropic"}));
    assert_eq!(access(&reply), "at-1", "not due, but explicit: {reply}");
    let reply = raw.call(
        "2",
        "refresh_token",
        json!({"provider": "anthropic", "bucket": "default"}),
    );
    assert_eq!(access(&reply), "at-1");
    assert_eq!(endpoint.count(), 1, "in the cooldown");
    offset.store(31, Ordering::SeqCst);
    let reply = raw.call("3", "refresh_token", json!({"provider": "anthropic"}));
    assert_eq!(access(&reply), "at-2");
    assert_eq!(endpoint.count(), 2);
    assert_eq!(endpoint.reused(), 0);
    server.shutdown();
}

/// A refresh in flight at shutdown is abandoned when the grace time runs out, and counted.
#[test]
fn shutdown_abandons_a_refresh_that_outlives_the_grace_time() {
    let endpoint = TokenEndpoint::start("rt-0");
    endpoint.push([Reply::token("at-late", 3600, None).after(Duration::from_secs(5))]);
    let memory = store_with(now() - 10);
    let mut server = RefreshServer::start(memory.clone(), refresh_config(&endpoint.url()));
    let mut raw = server.connect();
    raw.send(&json!({"id": "g", "op": "get_token", "payload": {"provider": "anthropic"}}));
    assert_eq!(endpoint.wait_for(1, Duration::from_secs(2)), 1);
    let started = Instant::now();
    let report = server.shutdown();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert!(report.refresher_stopped);
    assert_eq!(report.refreshes_abandoned, 1);
    // The request was answered before the connection closed: the refresh failed.
    let reply = raw.try_recv().expect("an answer before the close");
    assert_err(&reply, "g", "REFRESH_FAILED");
    assert!(
        memory.get_token("anthropic", "default").is_err(),
        "the store was cleared at shutdown"
    );
}

/// Fails the refresh lock, as a read-only or full store does.
#[derive(Debug)]
struct NoRefreshLock;

impl common::hooked::Hook for NoRefreshLock {
    fn before(&self, call: common::hooked::Call<'_>) -> Result<(), credproxy::backend::StoreError> {
        match call {
            common::hooked::Call::RefreshLock => Err(credproxy::backend::StoreError::Io {
                op: "open",
                path: "/store/refresh/anthropic/default.lock".into(),
                source: std::io::Error::from_raw_os_error(30),
            }),
            _ => Ok(()),
        }
    }
}

/// A store that cannot take the refresh lock still serves a valid token; an expired one
/// gets `REFRESH_FAILED`, never an internal error with the host path.
#[test]
fn a_store_that_cannot_lock_serves_the_token_while_it_is_valid() {
    let endpoint = TokenEndpoint::start("rt-0");
    for (expiry, expect) in [(now() + 30, None), (now() - 30, Some("REFRESH_FAILED"))] {
        let backend = Arc::new(common::hooked::Hooked {
            inner: store_with(expiry),
            hook: NoRefreshLock,
            blocking: true,
        });
        let mut server = RefreshServer::start(backend, refresh_config(&endpoint.url()));
        let mut raw = server.connect();
        let reply = raw.call("1", "get_token", json!({"provider": "anthropic"}));
        match expect {
            None => assert_eq!(access(&reply), "at-old", "{reply}"),
            Some(code) => {
                let message = assert_err(&reply, "1", code);
                assert!(!message.contains("/store"), "{message}");
            }
        }
        server.shutdown();
    }
    assert_eq!(endpoint.count(), 0);
}

/// A provider that issues tokens already expired (`expires_in` 0) is not asked again on
/// every get_token: the cooldown holds it off.
#[test]
fn tokens_issued_expired_do_not_send_every_get_token_upstream() {
    let endpoint = TokenEndpoint::start("rt-0");
    endpoint.set_expires_in(0);
    let memory = store_with(now() - 10);
    let mut server = RefreshServer::start(memory.clone(), refresh_config(&endpoint.url()));
    let mut raw = server.connect();
    for i in 0..20 {
        let reply = raw.call(
            &i.to_string(),
            "get_token",
            json!({"provider": "anthropic"}),
        );
        assert_eq!(access(&reply), "at-1", "{reply}");
    }
    assert_eq!(endpoint.count(), 1);
    server.shutdown();
}
