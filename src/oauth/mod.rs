//! The OAuth side of host-side refresh (PROTOCOL.md §14): which token endpoint a provider
//! uses, how one refresh-token grant is written and read, and the HTTP client that sends it
//! with the protocol's timeouts, retries and body cap.
//!
//! - [`provider`]: built-in presets (`anthropic`, `codex`, `gemini`) and profile overrides,
//!   resolved into an [`Endpoint`]; plain `http://` only for loopback addresses.
//! - [`grant`]: the request body (form or JSON) built in wiped buffers, the token response
//!   parsed into a [`Grant`], and the classification of a failed answer by status and the
//!   OAuth `error` member (never by message text).
//! - [`http`]: [`Upstream`], one HTTP/1.1 client (rustls, no system TLS library), and
//!   [`Upstream::refresh`], one refresh with its retries inside one deadline.
//!
//! Nothing here decides *when* to refresh or holds a lock: that is the refresh engine's
//! job. Nothing here ever logs or formats a refresh token, a client secret or an upstream
//! body: errors carry the status, the OAuth error code when it is a plain code, and what
//! was wrong with the response, nothing else.

pub mod grant;
pub mod http;
pub mod login;
pub mod provider;

pub use grant::{Grant, GrantRequest};
pub use http::{RefreshError, RetryPolicy, Timeouts, Upstream};
pub use provider::{BodyFormat, ClientSecret, Endpoint, EndpointOverride};

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch, the unit of a token's `expiry` (PROTOCOL.md §6).
pub fn epoch_seconds(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
