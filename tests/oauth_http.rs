//! The HTTP side of host-side refresh (PROTOCOL.md §14) against a real token endpoint on
//! 127.0.0.1 (`tests/common/token_endpoint.rs`): what one grant sends, how answers are
//! read and classified, retries and their pauses, deadlines, the body cap, and that no
//! refresh token, client secret or upstream body reaches an error or a log line.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::token_endpoint::{Reply, TokenEndpoint};
use credproxy::oauth::provider::EndpointOverride;
use credproxy::oauth::{
    BodyFormat, Endpoint, Grant, GrantRequest, RefreshError, RetryPolicy, Timeouts, Upstream,
};
use credproxy::secret::Secret;

const RT_CANARY: &str = "CANARY-RT-7f3e";
const SECRET_CANARY: &str = "CANARY-CLIENT-SECRET-44ab";
const BODY_CANARY: &str = "CANARY-UPSTREAM-BODY-c0de";
const NOW: u64 = 1_000_000;

/// Short pauses and deadlines, so retry tests take milliseconds.
fn fast() -> Upstream {
    Upstream::with(
        Timeouts {
            connect: Duration::from_millis(500),
            attempt: Duration::from_millis(800),
            total: Duration::from_secs(3),
        },
        RetryPolicy {
            attempts: 3,
            backoff: vec![Duration::from_millis(10), Duration::from_millis(30)],
        },
    )
    .expect("client")
}

fn endpoint(provider: &str, url: &str) -> Endpoint {
    Endpoint::resolve(
        provider,
        &EndpointOverride {
            token_url: Some(url.to_owned()),
            ..EndpointOverride::default()
        },
    )
    .expect("endpoint")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// One refresh of `refresh_token` against `endpoint` with `upstream`.
fn refresh(
    upstream: &Upstream,
    endpoint: &Endpoint,
    refresh_token: &str,
    client_secret: Option<&str>,
) -> Result<Grant, RefreshError> {
    let rt = Secret::from(refresh_token);
    let secret = client_secret.map(Secret::from);
    let request = GrantRequest {
        endpoint,
        refresh_token: &rt,
        client_secret: secret.as_ref(),
    };
    runtime().block_on(upstream.refresh(&request, &|| NOW))
}

#[test]
fn a_grant_is_form_encoded_and_a_rotated_token_is_read() {
    let server = TokenEndpoint::start("rt-0");
    let e = endpoint("anthropic", &server.url());
    let grant = refresh(&fast(), &e, "rt-0", None).expect("refresh");
    assert!(grant.rotated());
    assert_eq!(grant.expiry(), NOW + 3600);

    let got = server.received();
    assert_eq!(got.len(), 1);
    let r = &got[0];
    assert_eq!(
        (r.method.as_str(), r.path.as_str()),
        ("POST", "/oauth/token")
    );
    assert_eq!(
        r.header("content-type"),
        Some("application/x-www-form-urlencoded")
    );
    assert_eq!(r.param("grant_type"), Some("refresh_token"));
    assert_eq!(r.param("refresh_token"), Some("rt-0"));
    assert_eq!(
        r.param("client_id"),
        Some("9d1c250a-e61b-44d9-88ed-5944d1962f5e")
    );
    assert_eq!(r.param("client_secret"), None);

    // The old refresh token is dead now: the provider refuses it as an auth failure.
    let again = refresh(&fast(), &e, "rt-0", None).expect_err("reuse");
    assert!(again.is_auth_failure(), "{again:?}");
    assert_eq!(server.reused(), 1);
    // The rotated one works.
    refresh(&fast(), &e, "rt-1", None).expect("rt-1");
}

#[test]
fn a_json_provider_gets_its_client_secret_in_a_json_body() {
    let server = TokenEndpoint::start("rt-0");
    let mut e = endpoint("gemini", &server.url());
    e.body = BodyFormat::Json;
    refresh(&fast(), &e, "rt-0", Some("the-secret")).expect("refresh");
    let r = &server.received()[0];
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.param("refresh_token"), Some("rt-0"));
    assert_eq!(r.param("client_secret"), Some("the-secret"));
    assert!(r
        .param("client_id")
        .is_some_and(|c| c.ends_with(".apps.googleusercontent.com")));
}

#[test]
fn auth_failures_are_never_retried() {
    for reply in [
        Reply::error(400, "invalid_grant", "expired"),
        Reply::error(400, "invalid_client", "no"),
        Reply::error(400, "unauthorized_client", "no"),
        Reply::error(401, "something_else", "no"),
        Reply::raw(401, b"<html>go away</html>"),
    ] {
        let server = TokenEndpoint::start("unused");
        server.push([reply.clone()]);
        let err = refresh(&fast(), &endpoint("anthropic", &server.url()), "rt", None)
            .expect_err("refused");
        assert!(err.is_auth_failure(), "{reply:?}: {err:?}");
        assert_eq!(server.count(), 1, "retried {reply:?}");
    }
}

#[test]
fn other_refusals_and_bad_answers_are_not_retried() {
    let cases: Vec<(Reply, &str)> = vec![
        (
            Reply::error(400, "invalid_request", "no"),
            "HTTP 400, invalid_request",
        ),
        (
            Reply::error(403, "invalid_grant", "no"),
            "HTTP 403, invalid_grant",
        ),
        (
            Reply::raw(302, b"").header("Location", "http://127.0.0.1:1/"),
            "HTTP 302",
        ),
        (Reply::raw(200, b"this is not json"), "not a JSON object"),
        (
            Reply::json(200, serde_json::json!({"token_type": "Bearer"})),
            "no access_token",
        ),
        (Reply::endless(10 << 20), "over 64 KiB"),
        (Reply::raw(200, &vec![b' '; 70 * 1024]), "over 64 KiB"),
    ];
    for (reply, says) in cases {
        let server = TokenEndpoint::start("unused");
        server.push([reply]);
        let err = refresh(&fast(), &endpoint("anthropic", &server.url()), "rt", None)
            .expect_err("refused");
        assert!(
            matches!(
                err,
                RefreshError::Rejected { .. } | RefreshError::BadResponse(_)
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains(says), "{err} lacks {says}");
        assert_eq!(server.count(), 1, "retried: {err}");
    }
}

#[test]
fn transient_failures_are_retried_up_to_three_attempts() {
    let server = TokenEndpoint::start("rt-0");
    server.push([Reply::raw(500, b"oops"), Reply::raw(503, b"busy")]);
    let e = endpoint("anthropic", &server.url());
    let grant = refresh(&fast(), &e, "rt-0", None).expect("third attempt");
    assert!(grant.rotated());
    assert_eq!(server.count(), 3);

    let server = TokenEndpoint::start("rt-0");
    server.push([
        Reply::raw(500, b""),
        Reply::raw(502, b""),
        Reply::raw(500, b""),
        Reply::raw(200, b"never asked"),
    ]);
    let err = refresh(&fast(), &endpoint("anthropic", &server.url()), "rt-0", None)
        .expect_err("exhausted");
    assert_eq!(
        err,
        RefreshError::Exhausted {
            attempts: 3,
            last: "HTTP 500".into()
        }
    );
    assert_eq!(server.count(), 3);
}

#[test]
fn a_429_waits_for_its_retry_after_when_it_fits_the_deadline() {
    let server = TokenEndpoint::start("rt-0");
    server.push([Reply::raw(429, b"slow down").header("Retry-After", "1")]);
    let start = Instant::now();
    refresh(&fast(), &endpoint("anthropic", &server.url()), "rt-0", None).expect("after wait");
    // The policy's pause is 10 ms: the second attempt waited for Retry-After.
    assert!(
        start.elapsed() >= Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(server.count(), 2);

    // A Retry-After past the deadline ends the refresh at once instead of sleeping.
    let server = TokenEndpoint::start("rt-0");
    server.push([Reply::raw(429, b"").header("Retry-After", "3600")]);
    let start = Instant::now();
    let err =
        refresh(&fast(), &endpoint("anthropic", &server.url()), "rt-0", None).expect_err("no wait");
    assert!(
        matches!(err, RefreshError::Exhausted { attempts: 1, .. }),
        "{err:?}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn a_hanging_endpoint_ends_in_bounded_time() {
    let server = TokenEndpoint::start("rt-0");
    let hang = Reply::token("late", 60, None).after(Duration::from_secs(30));
    server.push([hang.clone(), hang.clone(), hang]);
    let upstream = Upstream::with(
        Timeouts {
            connect: Duration::from_millis(200),
            attempt: Duration::from_millis(300),
            total: Duration::from_millis(800),
        },
        RetryPolicy {
            attempts: 3,
            backoff: vec![Duration::from_millis(10)],
        },
    )
    .expect("client");
    let start = Instant::now();
    let err = refresh(
        &upstream,
        &endpoint("anthropic", &server.url()),
        "rt-0",
        None,
    )
    .expect_err("timed out");
    let took = start.elapsed();
    assert!(matches!(err, RefreshError::Exhausted { .. }), "{err:?}");
    assert!(
        err.to_string().contains("timed out") || err.to_string().contains("deadline"),
        "{err}"
    );
    // The total deadline (800 ms) bounds it, with room for a loaded machine.
    assert!(took < Duration::from_secs(3), "{took:?}");
}

#[test]
fn an_unreachable_endpoint_is_transient() {
    // A port that was just free: connection refused.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let e = endpoint("anthropic", &format!("http://127.0.0.1:{port}/token"));
    let err = refresh(&fast(), &e, "rt-0", None).expect_err("refused");
    assert_eq!(
        err,
        RefreshError::Exhausted {
            attempts: 3,
            last: "could not connect".into()
        }
    );
}

/// A `tracing` writer that keeps everything in memory.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn no_refresh_token_client_secret_or_upstream_body_in_errors_or_logs() {
    let server = TokenEndpoint::start(RT_CANARY);
    let body_error =
        format!(r#"{{"error":"{BODY_CANARY}","error_description":"{BODY_CANARY} {RT_CANARY}"}}"#);
    server.push([
        Reply::raw(500, BODY_CANARY.as_bytes()),
        Reply::raw(500, body_error.as_bytes()),
        Reply::raw(500, body_error.as_bytes()),
        Reply::raw(400, body_error.as_bytes()),
        Reply::raw(401, body_error.as_bytes()),
        Reply::raw(200, format!("{BODY_CANARY} {RT_CANARY}").as_bytes()),
        Reply::json(
            200,
            serde_json::json!({"access_token": 5, "note": BODY_CANARY}),
        ),
    ]);
    let mut e = endpoint("gemini", &server.url());
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .finish();
    let mut errors = Vec::new();
    tracing::subscriber::with_default(subscriber, || {
        for format in [
            BodyFormat::Form,
            BodyFormat::Form,
            BodyFormat::Json,
            BodyFormat::Json,
            BodyFormat::Form,
        ] {
            e.body = format;
            let err = refresh(&fast(), &e, RT_CANARY, Some(SECRET_CANARY)).expect_err("fails");
            errors.push(format!("{err} {err:?}"));
        }
    });
    assert_eq!(server.count(), 7);
    // It really sent them (to the endpoint, the one place they belong).
    assert!(server
        .received()
        .iter()
        .all(|r| r.param("refresh_token") == Some(RT_CANARY)
            && r.param("client_secret") == Some(SECRET_CANARY)));
    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).expect("utf-8");
    assert!(logs.contains("retrying"), "the retries were logged: {logs}");
    for text in errors.iter().chain([&logs]) {
        for canary in [RT_CANARY, SECRET_CANARY, BODY_CANARY] {
            assert!(!text.contains(canary), "{canary} in {text}");
        }
    }
}
