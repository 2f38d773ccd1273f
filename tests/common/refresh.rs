//! A server with host-side refresh against a [`TokenEndpoint`](super::token_endpoint),
//! with short retries so failure paths run in well under a second.

use std::sync::Arc;
use std::time::Duration;

use credproxy::backend::Backend;
use credproxy::oauth::{Endpoint, EndpointOverride, RetryPolicy, Timeouts};
use credproxy::refresh::RefreshConfig;
use credproxy::token::Token;
use credproxy::{Config, ServerHandle, Supervisor};
use serde_json::{json, Value};

use super::{allow_all, data, short_limits, Raw};

/// Epoch seconds now.
pub fn now() -> u64 {
    credproxy::oauth::epoch_seconds(std::time::SystemTime::now())
}

/// A stored token with a refresh token, expiring at `expiry`.
pub fn stored(access: &str, refresh: &str, expiry: u64) -> Token {
    Token::from_value(json!({
        "access_token": access, "refresh_token": refresh, "expiry": expiry,
        "token_type": "Bearer", "account_id": "acct-1"
    }))
    .expect("token")
}

/// Refresh settings: `anthropic` posts to `url`; 3 attempts after 50 ms and 100 ms;
/// attempts of 1 s, a refresh of 2 s at most.
pub fn refresh_config(url: &str) -> RefreshConfig {
    let endpoint = Endpoint::resolve(
        "anthropic",
        &EndpointOverride {
            token_url: Some(url.to_owned()),
            ..EndpointOverride::default()
        },
    )
    .expect("endpoint");
    // No built-in preset: only the endpoint on 127.0.0.1 is known.
    let mut config = RefreshConfig {
        endpoints: [("anthropic".into(), endpoint)].into(),
        ..RefreshConfig::default()
    };
    config.timeouts = Timeouts {
        connect: Duration::from_secs(1),
        attempt: Duration::from_secs(1),
        total: Duration::from_secs(2),
    };
    config.retry = RetryPolicy {
        attempts: 3,
        backoff: vec![Duration::from_millis(50), Duration::from_millis(100)],
    };
    config
}

/// A running server with refresh.
pub struct RefreshServer {
    pub handle: Option<ServerHandle>,
    pub dir: tempfile::TempDir,
    pub path: std::path::PathBuf,
}

impl RefreshServer {
    /// Allows everything, short limits, no rate limit, `refresh` as given.
    pub fn start(backend: Arc<dyn Backend>, refresh: RefreshConfig) -> RefreshServer {
        let mut config = Config::new(backend);
        config.profile = allow_all();
        config.limits = short_limits();
        config.limits.rate_limit = 0;
        config.refresh = refresh;
        RefreshServer::with(config)
    }

    /// `config` as it is, on a fresh socket directory.
    pub fn with(mut config: Config) -> RefreshServer {
        let dir = tempfile::tempdir().expect("tempdir");
        config.socket_dir = Some(dir.path().to_owned());
        let handle = Supervisor::start(config).expect("start");
        let path = handle.socket_path().to_owned();
        RefreshServer {
            handle: Some(handle),
            dir,
            path,
        }
    }

    pub fn connect(&self) -> Raw {
        let mut raw = Raw::connect(&self.path);
        raw.handshake();
        raw
    }

    pub fn shutdown(&mut self) -> credproxy::ShutdownReport {
        self.handle
            .take()
            .expect("running")
            .shutdown_blocking()
            .expect("shutdown")
    }
}

/// The `access_token` of a successful token reply.
pub fn access(reply: &Value) -> String {
    data(reply)["access_token"]
        .as_str()
        .unwrap_or_else(|| panic!("no access_token in {reply}"))
        .to_owned()
}
