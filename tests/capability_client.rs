//! The client library against a real server started with a capability token (PROTOCOL.md
//! §13): a client holding the token is served at version 2 (replies over the version-1
//! frame limit included) and presents the token again when it reconnects after its idle
//! close; one holding another token, or none, gets `ClientError::CapabilityRefused` with
//! a clear message, and never shows a token in its errors.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use credproxy::capability::CapabilityToken;
use credproxy::client::{Client, ClientConfig, ClientError};
use credproxy::protocol::ErrorCode;
use credproxy::secret::Secret;
use credproxy::supervisor::SessionCount;
use credproxy::Config;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// A server holding only the digest of `token`, with the seeded store and a 200 KiB API
/// key `big` (a reply only a version-2 connection can carry).
fn server(token: &CapabilityToken) -> (credproxy::ServerHandle, tempfile::TempDir) {
    let backend = seeded();
    backend
        .insert_key("big", Secret::from("k".repeat(200 << 10)))
        .expect("seed");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = Config::new(backend);
    config.socket_dir = Some(dir.path().to_owned());
    config.profile = allow_all();
    config.limits = short_limits();
    config.capability = Some(token.digest());
    offline(&mut config);
    (credproxy::Supervisor::start(config).expect("start"), dir)
}

fn client(handle: &credproxy::ServerHandle, token: Option<&Arc<CapabilityToken>>) -> Client {
    let config = ClientConfig {
        request_timeout: Duration::from_secs(5),
        idle_timeout: Duration::from_millis(200),
    };
    Client::with_capability(handle.socket_path(), config, token.cloned())
}

#[test]
fn the_holder_is_served_at_version_2_and_again_after_its_idle_close() {
    let token = Arc::new(CapabilityToken::generate());
    let (handle, _dir) = server(&token);
    let client = client(&handle, Some(&token));
    rt().block_on(async {
        let got = client.get_token("anthropic", None).await.expect("get");
        assert_eq!(
            got.expect("found").fields()["access_token"],
            "at-anthropic-default"
        );
        let big = client.get_api_key("big").await.expect("get").expect("key");
        assert_eq!(big.expose().len(), 200 << 10);
        // The idle close; the next request connects and handshakes again, with the token.
        let addr = handle.addr().clone();
        let t0 = std::time::Instant::now();
        while addr.send(SessionCount).await.expect("count") != 0 {
            assert!(t0.elapsed() < REPLY_WAIT, "the idle close never came");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(client.has_api_key("openai").await.expect("has"));
    });
    handle.shutdown_blocking().expect("shutdown");
}

#[test]
fn another_token_or_none_is_refused_clearly() {
    let token = CapabilityToken::generate();
    let (handle, _dir) = server(&token);
    let other = Arc::new(CapabilityToken::generate());
    rt().block_on(async {
        let err = client(&handle, Some(&other))
            .get_token("anthropic", None)
            .await
            .unwrap_err();
        assert!(
            matches!(err, ClientError::CapabilityRefused { presented: true }),
            "{err:?}"
        );
        assert_eq!(err.code(), Some(ErrorCode::Unauthorized));
        assert_eq!(
            err.to_string(),
            "the credential proxy refused this sandbox's capability token"
        );
        let shown = format!("{err} {err:?}");
        for t in [token.expose(), other.expose()] {
            assert!(!shown.contains(&t[..16]), "{shown}");
        }

        let err = client(&handle, None).list_providers().await.unwrap_err();
        assert!(
            matches!(err, ClientError::CapabilityRefused { presented: false }),
            "{err:?}"
        );
        assert!(err.to_string().contains("has none"), "{err}");
    });
    handle.shutdown_blocking().expect("shutdown");
}
