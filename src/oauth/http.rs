//! The HTTP side of a refresh: one client for every token endpoint, one attempt, and one
//! refresh with its retries inside one deadline (PROTOCOL.md §14).
//!
//! - **Client**: reqwest over rustls with the Mozilla root set compiled in (no OpenSSL, no
//!   system TLS library at build or run time), HTTP/1.1, no redirects (a token endpoint
//!   that redirects is misconfigured, and following one would re-send the refresh token
//!   elsewhere), `HTTPS_PROXY`/`HTTP_PROXY`/`NO_PROXY` from the environment, except for a
//!   loopback endpoint, which is always reached directly (a plain-http request with a
//!   refresh token in it never goes through a proxy).
//! - **Timeouts**: connect 10 s, one attempt 20 s, one refresh with its retries 40 s.
//! - **Body cap**: a response over 64 KiB is refused as soon as it is known to be larger
//!   (its `Content-Length`, or the bytes read so far), never buffered whole.
//! - **Retries**: network errors, timeouts, 429 and 5xx, up to 3 attempts in all, after
//!   1 s then 3 s, or after a 429's `Retry-After` (seconds) when it fits in the deadline.
//!   Auth failures and other refusals are never retried.

use std::time::Duration;

use tokio::time::{timeout_at, Instant};

use super::epoch_seconds;
use super::grant::{classify, error_code, Grant, GrantRequest, ResponseError, Verdict};

/// The largest token response read, in bytes.
pub const MAX_RESPONSE: usize = 64 * 1024;

/// How long each part of a refresh may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Establishing the connection (TCP and TLS).
    pub connect: Duration,
    /// One attempt, from the request to the last byte of the response.
    pub attempt: Duration,
    /// One refresh, all attempts and pauses included.
    pub total: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(10),
            attempt: Duration::from_secs(20),
            total: Duration::from_secs(40),
        }
    }
}

/// How often and after what pauses a transient failure is tried again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub attempts: u32,
    /// The pause before the second attempt, before the third, ...; the last is reused.
    pub backoff: Vec<Duration>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 3,
            backoff: vec![Duration::from_secs(1), Duration::from_secs(3)],
        }
    }
}

impl RetryPolicy {
    fn pause(&self, after_attempt: u32) -> Duration {
        let i = (after_attempt as usize).saturating_sub(1);
        self.backoff
            .get(i)
            .or(self.backoff.last())
            .copied()
            .unwrap_or_default()
    }
}

/// Why a refresh failed. For the host's log and the wire mapping only; the text carries
/// the status, a plain OAuth error code and the kind of failure, never a token, a secret
/// or an upstream body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RefreshError {
    /// The endpoint refused the refresh token or the client (PROTOCOL.md §14 auth
    /// failure): the bucket needs a new login. Never retried.
    #[error("the token endpoint refused the refresh token (HTTP {status}{})", code_suffix(.code))]
    AuthFailure {
        /// The HTTP status.
        status: u16,
        /// The OAuth `error` code, when it was a plain code.
        code: Option<String>,
    },
    /// Another refusal (4xx, 3xx): not retried.
    #[error("the token endpoint refused the request (HTTP {status}{})", code_suffix(.code))]
    Rejected {
        /// The HTTP status.
        status: u16,
        /// The OAuth `error` code, when it was a plain code.
        code: Option<String>,
    },
    /// Transient failures until the attempts or the deadline ran out.
    #[error("the token endpoint could not be reached after {attempts} attempt(s): {last}")]
    Exhausted {
        /// Attempts made.
        attempts: u32,
        /// The last failure, in a few words.
        last: String,
    },
    /// A success status with a body that is not a token response.
    #[error("the token endpoint's answer was unusable: {0}")]
    BadResponse(String),
    /// The HTTP client could not be built (no TLS roots, ...).
    #[error("cannot set up the HTTP client: {0}")]
    Client(String),
}

fn code_suffix(code: &Option<String>) -> String {
    code.as_deref()
        .map(|c| format!(", {c}"))
        .unwrap_or_default()
}

impl RefreshError {
    /// True for an auth failure (the bucket needs a new login).
    pub fn is_auth_failure(&self) -> bool {
        matches!(self, RefreshError::AuthFailure { .. })
    }
}

/// The outcome of one attempt.
enum Attempt {
    Done(Grant),
    /// Retry after the policy's pause, or after this long (a 429's Retry-After).
    Retry {
        why: String,
        after: Option<Duration>,
    },
    Fail(RefreshError),
}

/// The HTTP client of every token endpoint. Cheap to clone (one connection pool).
#[derive(Clone, Debug)]
pub struct Upstream {
    client: reqwest::Client,
    /// The same without any proxy, for loopback endpoints: a plain-http request to
    /// 127.0.0.1 must never travel through `HTTP_PROXY` with a refresh token in it.
    direct: reqwest::Client,
    timeouts: Timeouts,
    retry: RetryPolicy,
}

impl Upstream {
    /// A client with the protocol's timeouts and retries.
    pub fn new() -> Result<Upstream, RefreshError> {
        Upstream::with(Timeouts::default(), RetryPolicy::default())
    }

    /// A client with other timeouts and retries (tests, embedders).
    pub fn with(timeouts: Timeouts, retry: RetryPolicy) -> Result<Upstream, RefreshError> {
        let builder = || {
            reqwest::Client::builder()
                .connect_timeout(timeouts.connect)
                .timeout(timeouts.attempt)
                .redirect(reqwest::redirect::Policy::none())
                .http1_only()
                .user_agent(concat!("credproxy/", env!("CARGO_PKG_VERSION")))
        };
        let client = builder()
            .build()
            .map_err(|e| RefreshError::Client(e.to_string()))?;
        let direct = builder()
            .no_proxy()
            .build()
            .map_err(|e| RefreshError::Client(e.to_string()))?;
        Ok(Upstream {
            client,
            direct,
            timeouts,
            retry,
        })
    }

    /// The timeouts in force.
    pub fn timeouts(&self) -> Timeouts {
        self.timeouts
    }

    /// One refresh: attempts `request` until it succeeds, fails for good, or the attempts
    /// or the total deadline run out. `now` gives the epoch seconds a response's
    /// `expires_in` counts from (an injected clock in tests).
    pub async fn refresh(
        &self,
        request: &GrantRequest<'_>,
        now: &(dyn Fn() -> u64 + Sync),
    ) -> Result<Grant, RefreshError> {
        self.refresh_counted(request, now).await.0
    }

    /// [`Upstream::refresh`], also telling how many attempts were made (for the log).
    pub async fn refresh_counted(
        &self,
        request: &GrantRequest<'_>,
        now: &(dyn Fn() -> u64 + Sync),
    ) -> (Result<Grant, RefreshError>, u32) {
        let deadline = Instant::now() + self.timeouts.total;
        let mut attempts = 0;
        loop {
            attempts += 1;
            let outcome = match timeout_at(deadline, self.attempt(request, now)).await {
                Ok(outcome) => outcome,
                Err(_) => Attempt::Retry {
                    why: "the refresh deadline passed".into(),
                    after: None,
                },
            };
            let (why, after) = match outcome {
                Attempt::Done(grant) => return (Ok(grant), attempts),
                Attempt::Fail(e) => return (Err(e), attempts),
                Attempt::Retry { why, after } => (why, after),
            };
            let pause = after.unwrap_or_else(|| self.retry.pause(attempts));
            if attempts >= self.retry.attempts || Instant::now() + pause >= deadline {
                let e = RefreshError::Exhausted {
                    attempts,
                    last: why,
                };
                return (Err(e), attempts);
            }
            tracing::debug!(
                provider = %request.endpoint.provider,
                attempt = attempts,
                pause_ms = pause.as_millis() as u64,
                reason = %why,
                "token endpoint attempt failed; retrying"
            );
            tokio::time::sleep(pause).await;
        }
    }

    async fn attempt(&self, request: &GrantRequest<'_>, now: &(dyn Fn() -> u64 + Sync)) -> Attempt {
        let body = request.body();
        let sent = self
            .client_for(&request.endpoint.token_url)
            .post(request.endpoint.token_url.clone())
            .header(reqwest::header::CONTENT_TYPE, request.content_type())
            .header(reqwest::header::ACCEPT, "application/json")
            // reqwest takes its own copy; ours is wiped when `body` drops.
            .body(body.to_vec())
            .send()
            .await;
        drop(body);
        let mut response = match sent {
            Ok(r) => r,
            Err(e) => {
                return Attempt::Retry {
                    why: transport_failure(&e),
                    after: None,
                }
            }
        };
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let body = match read_capped(&mut response).await {
            Ok(body) => body,
            Err(ReadFailure::TooLarge) => {
                return Attempt::Fail(RefreshError::BadResponse(format!(
                    "the response is over {} KiB",
                    MAX_RESPONSE / 1024
                )))
            }
            Err(ReadFailure::Transport(e)) => {
                return Attempt::Retry {
                    why: transport_failure(&e),
                    after: None,
                }
            }
        };
        if (200..300).contains(&status) {
            return match Grant::parse(&body, now()) {
                Ok(grant) => Attempt::Done(grant),
                Err(e) => Attempt::Fail(RefreshError::BadResponse(describe(&e))),
            };
        }
        let code = error_code(&body);
        match classify(status, code.as_deref()) {
            Verdict::AuthFailure => Attempt::Fail(RefreshError::AuthFailure { status, code }),
            Verdict::Rejected => Attempt::Fail(RefreshError::Rejected { status, code }),
            Verdict::Transient => Attempt::Retry {
                why: format!("HTTP {status}"),
                after: if status == 429 { retry_after } else { None },
            },
        }
    }
}

/// The answer to one POST: its status and its body (at most [`MAX_RESPONSE`] bytes, wiped
/// on drop).
pub struct Posted {
    /// The HTTP status.
    pub status: u16,
    /// The body.
    pub body: zeroize::Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for Posted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Posted")
            .field("status", &self.status)
            .field("body_len", &self.body.len())
            .finish()
    }
}

impl Upstream {
    /// The client for `url`: without any proxy for a loopback address, so that a
    /// plain-http request carrying a secret never travels through `HTTP_PROXY`.
    fn client_for(&self, url: &reqwest::Url) -> &reqwest::Client {
        if super::provider::is_loopback(url) {
            &self.direct
        } else {
            &self.client
        }
    }

    /// One POST of `body` (already written in `content_type`) to `url`, no retry, no
    /// redirect followed, the body cap and the attempt timeout applied: the login's code
    /// exchange, device polls and revocation. The error is a few words, never a URL or a
    /// body.
    pub async fn post_once(
        &self,
        url: &reqwest::Url,
        content_type: &str,
        body: zeroize::Zeroizing<Vec<u8>>,
    ) -> Result<Posted, String> {
        let sent = self
            .client_for(url)
            .post(url.clone())
            .header(reqwest::header::CONTENT_TYPE, content_type)
            .header(reqwest::header::ACCEPT, "application/json")
            // reqwest takes its own copy; ours is wiped when `body` drops.
            .body(body.to_vec())
            .send()
            .await;
        drop(body);
        let mut response = sent.map_err(|e| transport_failure(&e))?;
        let status = response.status().as_u16();
        match read_capped(&mut response).await {
            Ok(body) => Ok(Posted { status, body }),
            Err(ReadFailure::TooLarge) => {
                Err(format!("the response is over {} KiB", MAX_RESPONSE / 1024))
            }
            Err(ReadFailure::Transport(e)) => Err(transport_failure(&e)),
        }
    }
}

fn describe(e: &ResponseError) -> String {
    e.to_string()
}

/// A transport failure in a few words, without the URL's query or any body.
fn transport_failure(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timed out".into()
    } else if e.is_connect() {
        "could not connect".into()
    } else if e.is_body() || e.is_decode() {
        "the response broke off".into()
    } else {
        "the request failed".into()
    }
}

enum ReadFailure {
    TooLarge,
    Transport(reqwest::Error),
}

/// The response body, at most [`MAX_RESPONSE`] bytes, in a buffer wiped on drop.
async fn read_capped(
    response: &mut reqwest::Response,
) -> Result<zeroize::Zeroizing<Vec<u8>>, ReadFailure> {
    if response
        .content_length()
        .is_some_and(|n| n > MAX_RESPONSE as u64)
    {
        return Err(ReadFailure::TooLarge);
    }
    // Sized once: growing would leave unwiped copies of the tokens behind.
    let mut body = zeroize::Zeroizing::new(Vec::with_capacity(MAX_RESPONSE));
    while let Some(chunk) = response.chunk().await.map_err(ReadFailure::Transport)? {
        if body.len() + chunk.len() > MAX_RESPONSE {
            return Err(ReadFailure::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The system clock in epoch seconds, for [`Upstream::refresh`].
pub fn system_now() -> u64 {
    epoch_seconds(std::time::SystemTime::now())
}
