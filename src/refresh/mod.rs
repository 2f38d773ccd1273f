//! Host-side refresh (PROTOCOL.md §14): keeping OAuth access tokens fresh on the host so
//! the sandbox never holds a refresh token and never sees an expired token.
//!
//! - [`schedule`]: the settings and the timing rules (due within the margin, renewal lead
//!   with jitter), pure functions of the clock.
//! - [`flow`]: one refresh of one provider:bucket, start to end: the bucket's refresh
//!   lock, the re-read under it, the call upstream, the write that removal and a new
//!   login win against. Plain async code, used by the engine and by the host's
//!   `credproxy store token refresh` alike.
//! - [`engine`]: the [`Refresher`] actor of the supervision tree: single flight per
//!   provider:bucket, renewal timers, the periodic scan of the store, and its part of the
//!   shutdown sequence.
//!
//! The HTTP side (presets, the grant, the retrying client) is [`crate::oauth`].

pub mod engine;
pub mod flow;
pub mod schedule;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

pub use engine::Refresher;
pub use flow::{FlowError, Reason};
pub use schedule::{BucketKey, RefreshSettings};

use crate::oauth::{Endpoint, RetryPolicy, Timeouts};

/// A clock in epoch seconds: the system clock, or one a test or an embedding host injects
/// to move time without waiting.
#[derive(Clone)]
pub struct Clock(Arc<dyn Fn() -> u64 + Send + Sync>);

impl Clock {
    /// The system clock.
    pub fn system() -> Clock {
        Clock(Arc::new(crate::oauth::http::system_now))
    }

    /// A clock that reads `now`.
    pub fn from_fn(now: impl Fn() -> u64 + Send + Sync + 'static) -> Clock {
        Clock(Arc::new(now))
    }

    /// The time now, in epoch seconds.
    pub fn now(&self) -> u64 {
        (self.0)()
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::system()
    }
}

impl fmt::Debug for Clock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Clock")
    }
}

/// Everything host-side refresh needs: part of [`crate::Config`].
#[derive(Debug, Clone)]
pub struct RefreshConfig {
    /// On or off, the margin, the renewal lead and the cooldown.
    pub settings: RefreshSettings,
    /// Provider → token endpoint: the built-in presets, with the profile's
    /// `[provider.NAME]` tables applied. A provider missing here is not refreshable.
    pub endpoints: BTreeMap<String, Endpoint>,
    /// Timeouts of the HTTP side.
    pub timeouts: Timeouts,
    /// Retries of the HTTP side.
    pub retry: RetryPolicy,
    /// The clock that expiries are compared with.
    pub clock: Clock,
    /// How often the engine looks at the store for tokens to renew that it has not seen
    /// (saved by another process); renewals it knows of are timed exactly.
    pub scan_interval: Duration,
    /// The pause before a failed renewal is tried again; it doubles after each failure,
    /// up to the token's expiry.
    pub renewal_retry: Duration,
    /// After a refresh failed (transient failure or refusal), requests for that bucket
    /// get the failure at once, without a request upstream, for this long; it doubles
    /// with each failure in a row, up to a minute. A sandbox polling an expired token
    /// cannot make the host hammer the provider.
    pub failure_backoff: Duration,
}

impl Default for RefreshConfig {
    fn default() -> Self {
        RefreshConfig {
            settings: RefreshSettings::default(),
            endpoints: presets(),
            timeouts: Timeouts::default(),
            retry: RetryPolicy::default(),
            clock: Clock::system(),
            scan_interval: Duration::from_secs(60),
            renewal_retry: Duration::from_secs(15),
            failure_backoff: Duration::from_secs(5),
        }
    }
}

/// Every built-in preset, by provider name.
pub fn presets() -> BTreeMap<String, Endpoint> {
    crate::oauth::provider::PRESETS
        .iter()
        .filter_map(|p| crate::oauth::provider::preset(p).map(|e| (p.to_string(), e)))
        .collect()
}

impl RefreshConfig {
    /// The endpoints with `overrides` (the profile's resolved `[provider.NAME]` tables)
    /// laid over the presets.
    pub fn with_endpoints(mut self, overrides: BTreeMap<String, Endpoint>) -> Self {
        self.endpoints.extend(overrides);
        self
    }
}
