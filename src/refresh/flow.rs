//! One refresh of one provider:bucket, start to end (PROTOCOL.md §14).
//!
//! 1. Take the bucket's refresh lock ([`Backend::refresh_lock`]): in a file store a
//!    `flock` shared with every process on the store, so two servers (or a server and the
//!    host's `credproxy store token refresh`) never refresh one bucket at once. The wait is
//!    bounded ([`lock_wait`]).
//! 2. Under it, read the stored token and the bucket's refresh state again, and decide:
//!    nothing stored; not refreshable; marked as needing a new login; no longer due
//!    (another server or process refreshed it meanwhile); in the cooldown. Each of these
//!    ends the refresh without a request upstream.
//! 3. Send the refresh-token grant ([`Upstream::refresh_counted`]: retries and deadline).
//! 4. End with [`Backend::finish_refresh`], under the short store lock: the result is
//!    written only if the stored token still carries the refresh token that was sent. A
//!    token removed meanwhile stays removed (removal wins); a token saved meanwhile with
//!    another refresh token (a new login) stays as saved. An auth failure marks the bucket
//!    as needing a new login, under the same condition.
//! 5. Release the lock.
//!
//! Saves and removes never wait for the token endpoint: they take the store lock only, and
//! step 4 re-checks under that same lock, which is what lets a removal win at once instead
//! of waiting up to the 40 s a refresh may take.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::schedule::{is_due, BucketKey, RefreshSettings};
use super::Clock;
use crate::backend::{Backend, NeedsLogin, RefreshLock, RefreshState, RefreshWrite, StoreError};
use crate::oauth::{ClientSecret, Endpoint, Grant, GrantRequest, RefreshError, Upstream};
use crate::secret::Secret;
use crate::token::{ServedToken, Token};

/// Why a refresh is asked for; it decides when one is skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// `get_token` found the token due (within the margin, or expired): skipped when the
    /// re-read token is no longer due.
    Due,
    /// An explicit refresh (`refresh_token`, `credproxy store token refresh`): skipped in
    /// the cooldown after a successful refresh.
    Explicit,
    /// A renewal timer for the token that expires at `expiry`: skipped when the stored
    /// token expires later (renewed elsewhere) or has expired.
    Renewal {
        /// The expiry the timer was set for.
        expiry: u64,
    },
}

impl Reason {
    fn as_str(self) -> &'static str {
        match self {
            Reason::Due => "due",
            Reason::Explicit => "explicit",
            Reason::Renewal { .. } => "renewal",
        }
    }
}

/// Why a refresh gave no fresh token. Each maps to one wire code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FlowError {
    /// The provider has no token endpoint, or the token no refresh token
    /// (`REFRESH_NOT_AVAILABLE`).
    #[error("the token cannot be refreshed on the host")]
    NotAvailable,
    /// The token endpoint refused the refresh token now or earlier (the bucket is marked):
    /// a new login is needed (`REAUTH_REQUIRED`).
    #[error("the refresh token was refused; a new login is needed")]
    Reauth,
    /// A transient failure after the retries, another refusal, an unusable answer, or the
    /// lock or deadline ran out (`REFRESH_FAILED`).
    #[error("the refresh failed")]
    Failed,
    /// The store failed (`INTERNAL_ERROR`).
    #[error("the credential store failed")]
    Store,
}

/// What one refresh ended with.
#[derive(Debug, Clone)]
pub struct FlowOutput {
    /// The token to answer with: the fresh one, the current one (skipped), or the stored
    /// one after a failure; `None` when no token is stored (or it was removed meanwhile).
    pub token: Option<ServedToken>,
    /// Why no fresh token came back, when that is the case.
    pub failure: Option<FlowError>,
    /// The whole lifetime of a token this refresh obtained and stored.
    pub renewed: Option<Duration>,
    /// True when a request went to the token endpoint.
    pub went_upstream: bool,
}

impl FlowOutput {
    fn skipped(token: Option<ServedToken>) -> FlowOutput {
        FlowOutput {
            token,
            failure: None,
            renewed: None,
            went_upstream: false,
        }
    }

    /// A failure with no token to answer with (the asker's own read may stand in).
    pub fn failed_without_token(failure: FlowError) -> FlowOutput {
        FlowOutput::failed(None, failure)
    }

    fn failed(token: Option<ServedToken>, failure: FlowError) -> FlowOutput {
        FlowOutput {
            token,
            failure: Some(failure),
            renewed: None,
            went_upstream: false,
        }
    }

    /// The answer for a request that asked with `reason` at `now` (epoch seconds):
    /// `Ok(None)` is `NOT_FOUND`.
    ///
    /// An explicit refresh reports every failure. A due `get_token` is answered with the
    /// stored token when it is not refreshable (served as stored, as in version 1) or when
    /// the refresh failed but the token is still valid; an expired one gets the failure.
    ///
    /// `read` is the token the asker read before it asked (a due `get_token`'s): when the
    /// refresh failed without a token of its own (the lock was busy too long, the engine
    /// stopped), that one stands in for it. A failure never answers `NOT_FOUND`: only a
    /// refresh that found no token stored does.
    pub fn answer(
        &self,
        reason: Reason,
        now: u64,
        read: Option<&ServedToken>,
    ) -> Result<Option<ServedToken>, FlowError> {
        match (self.failure, self.token.as_ref().or(read)) {
            (None, _) => Ok(self.token.clone()),
            (Some(FlowError::Store), _) => Err(FlowError::Store),
            (Some(f), _) if reason == Reason::Explicit => Err(f),
            (Some(f), None) => Err(f),
            (Some(FlowError::NotAvailable), Some(t)) => Ok(Some(t.clone())),
            (Some(f), Some(t)) => {
                if t.expiry() > now {
                    Ok(Some(t.clone()))
                } else {
                    Err(f)
                }
            }
        }
    }
}

/// What a refresh works with.
#[derive(Clone)]
pub struct FlowEnv {
    /// The store.
    pub backend: Arc<dyn Backend>,
    /// Provider → token endpoint.
    pub endpoints: Arc<BTreeMap<String, Endpoint>>,
    /// The HTTP client.
    pub upstream: Upstream,
    /// Margin, lead, cooldown.
    pub settings: RefreshSettings,
    /// Epoch seconds.
    pub clock: Clock,
    /// Where blocking store calls run (the engine's private pool, or the command's
    /// runtime).
    pub pool: tokio::runtime::Handle,
}

impl std::fmt::Debug for FlowEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlowEnv")
            .field("providers", &self.endpoints.keys().collect::<Vec<_>>())
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// The longest one store call of a refresh may take (PROTOCOL.md §7's store limit).
const STORE_CALL_LIMIT: Duration = Duration::from_secs(15);

/// Seconds a `refreshed_at` may lie ahead of the clock (another process's clock read a
/// moment later) and still count for the cooldown.
const CLOCK_SLACK: u64 = 5;

/// How long a refresh waits for the bucket's refresh lock: a refresh elsewhere holds it at
/// most for its own deadline, plus the store calls around it.
pub fn lock_wait(upstream: &Upstream) -> Duration {
    upstream.timeouts().total + Duration::from_secs(5)
}

/// What is read under the lock.
struct Locked {
    /// Moved into the final write's blocking call, so that the lock is held until the
    /// write has landed even if this refresh is dropped meanwhile (shutdown).
    lock: Option<RefreshLock>,
    stored: Option<Token>,
    state: RefreshState,
    client_secret: Option<Secret>,
    missing_secret_key: Option<String>,
}

impl FlowEnv {
    /// True when `provider` has a token endpoint.
    pub fn knows(&self, provider: &str) -> bool {
        self.endpoints.contains_key(provider)
    }

    /// Runs a store call on the pool, bounded by [`STORE_CALL_LIMIT`] (a stuck disk
    /// fails the refresh instead of holding it, and every request joined to it, forever).
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Backend) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let backend = Arc::clone(&self.backend);
        let call = self.pool.spawn_blocking(move || f(backend.as_ref()));
        match tokio::time::timeout(STORE_CALL_LIMIT, call).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(StoreError::Cleared),
            Err(_) => Err(StoreError::Io {
                op: "refresh store call",
                path: std::path::PathBuf::new(),
                source: std::io::ErrorKind::TimedOut.into(),
            }),
        }
    }

    /// Runs one refresh of `key` (see the module documentation).
    pub async fn run(&self, key: &BucketKey, reason: Reason) -> FlowOutput {
        let started = Instant::now();
        let (p, b) = (key.provider.clone(), key.bucket.clone());
        let secret_key = match self.endpoints.get(&key.provider).map(|e| &e.client_secret) {
            Some(Some(ClientSecret::StoreKey(name))) => Some(name.clone()),
            _ => None,
        };
        let backend = Arc::clone(&self.backend);
        let locked = self.pool.spawn_blocking(move || {
            let s = backend.as_ref();
            let lock = s.refresh_lock(&p, &b)?;
            let stored = s.get_token(&p, &b)?;
            let state = s.refresh_state(&p, &b)?;
            let (client_secret, missing_secret_key) = match secret_key {
                Some(name) => match s.get_key(&name)? {
                    Some(secret) => (Some(secret), None),
                    None => (None, Some(name)),
                },
                None => (None, None),
            };
            Ok::<_, StoreError>(Locked {
                lock: Some(lock),
                stored,
                state,
                client_secret,
                missing_secret_key,
            })
        });
        let mut locked = match tokio::time::timeout(lock_wait(&self.upstream), locked).await {
            Ok(Ok(Ok(locked))) => locked,
            Ok(Err(_)) => return FlowOutput::failed(None, FlowError::Store),
            Ok(Ok(Err(e))) => {
                // The lock or the state cannot be had (a read-only store, a full disk):
                // no refresh, but the stored token can still be the answer while valid.
                tracing::error!(provider = %key.provider, bucket = %key.bucket, error = %e, "refresh: the store failed; serving the token as stored");
                let (p, b) = (key.provider.clone(), key.bucket.clone());
                return match self.blocking(move |s| s.get_token(&p, &b)).await {
                    Ok(Some(token)) => FlowOutput::failed(Some(token.served()), FlowError::Failed),
                    Ok(None) => FlowOutput::skipped(None),
                    Err(_) => FlowOutput::failed(None, FlowError::Store),
                };
            }
            Err(_) => {
                tracing::warn!(provider = %key.provider, bucket = %key.bucket, waited_ms = started.elapsed().as_millis() as u64, "refresh: another refresh of this bucket held its lock too long");
                return FlowOutput::failed(None, FlowError::Failed);
            }
        };
        let now = self.clock.now();
        let Some(stored) = &locked.stored else {
            return FlowOutput::skipped(None);
        };
        let current = stored.served();
        if !self.settings.enabled {
            return FlowOutput::failed(Some(current), FlowError::NotAvailable);
        }
        let endpoint = match (self.endpoints.get(&key.provider), stored.refresh_token()) {
            (Some(endpoint), Some(_)) => endpoint,
            _ => return FlowOutput::failed(Some(current), FlowError::NotAvailable),
        };
        if locked.state.needs_login.is_some() {
            return FlowOutput::failed(Some(current), FlowError::Reauth);
        }
        // In the cooldown after a successful refresh (by any process): no request upstream,
        // even for a token the provider issued already expired (`expires_in` 0), which would
        // otherwise send every get_token upstream. A `refreshed_at` in the future (the
        // clock was set back) does not count, or refresh would stop until the clock caught
        // up.
        let cooling = locked.state.refreshed_at.is_some_and(|at| {
            at <= now.saturating_add(CLOCK_SLACK)
                && now < at.saturating_add(self.settings.cooldown.as_secs())
        });
        let skip = match reason {
            Reason::Due => cooling || !is_due(stored.expiry(), now, self.settings.margin),
            Reason::Explicit => cooling,
            // Renewed elsewhere meanwhile, or refreshed a moment ago by another server.
            // An expired token is refreshed (a get_token may have joined this flight).
            Reason::Renewal { expiry } => stored.expiry() > expiry || cooling,
        };
        if skip {
            return FlowOutput::skipped(Some(current));
        }
        if let Some(name) = &locked.missing_secret_key {
            tracing::error!(provider = %key.provider, bucket = %key.bucket, client_secret_key = %name, "refresh: the profile names a client secret key that is not in the store");
            return FlowOutput::failed(Some(current), FlowError::Failed);
        }
        let sent = Secret::from(stored.refresh_token().unwrap_or_default());
        let request = GrantRequest {
            endpoint,
            refresh_token: &sent,
            client_secret: match (&endpoint.client_secret, &locked.client_secret) {
                (Some(ClientSecret::Published(secret)), _) => Some(secret),
                (Some(ClientSecret::StoreKey(_)), Some(secret)) => Some(secret),
                _ => None,
            },
        };
        let clock = self.clock.clone();
        let (result, attempts) = self
            .upstream
            .refresh_counted(&request, &move || clock.now())
            .await;
        let after = self.clock.now();
        let elapsed_ms = started.elapsed().as_millis() as u64;
        let grant = match result {
            Ok(grant) => {
                if grant.expires_in_defaulted() {
                    tracing::warn!(provider = %key.provider, bucket = %key.bucket, "refresh: the token endpoint gave no expires_in; assuming one hour");
                }
                Some(grant)
            }
            Err(e) => {
                return self
                    .fail(key, reason, locked, current, e, attempts, elapsed_ms, after)
                    .await
            }
        };
        let new_expiry = grant.as_ref().map_or(0, |g| g.expiry());
        let rotated = grant.as_ref().is_some_and(|g| g.rotated());
        let (p, b) = (key.provider.clone(), key.bucket.clone());
        let sent_for_check = sent.clone();
        let lock = locked.lock.take();
        // The essential fields, kept aside: if the whole answer merged would be too large
        // to serve, these still go in, so a rotated refresh token is never thrown away.
        let essential = grant.as_ref().map(Grant::essential);
        let finished = self
            .blocking(move |s| {
                let _held = lock;
                let essential = essential;
                let mut served = None;
                let mut superseded = false;
                let mut invalid = false;
                let wrote = s.finish_refresh(&p, &b, &mut |cur| match cur {
                    None => RefreshWrite::Nothing,
                    Some(cur) if cur.refresh_token() != Some(sent_for_check.expose()) => {
                        superseded = true;
                        served = Some(cur.served());
                        RefreshWrite::Nothing
                    }
                    // `decide` may be asked again (a store that lost a compare-and-swap
                    // reads and decides anew), so each call merges a copy.
                    Some(cur) => match grant.as_ref().map(|g| g.duplicate().merge_into(cur)) {
                        Some(Ok(token)) => {
                            let token = match crate::backend::check_storable(&token) {
                                Err(_) => match essential.as_ref().map(|g| g.duplicate().merge_into(cur)) {
                                    Some(Ok(small)) => {
                                        tracing::warn!(provider = %p, bucket = %b, "refresh: the token endpoint's answer is too large to serve whole; only its essential fields were kept");
                                        small
                                    }
                                    _ => token,
                                },
                                Ok(()) => token,
                            };
                            served = Some(token.served());
                            RefreshWrite::Token { token, at: after }
                        }
                        _ => {
                            invalid = true;
                            served = Some(cur.served());
                            RefreshWrite::Nothing
                        }
                    },
                })?;
                Ok((wrote, served, superseded, invalid))
            })
            .await;
        drop(locked);
        match finished {
            Ok((true, served, _, _)) => {
                tracing::info!(
                    provider = %key.provider,
                    bucket = %key.bucket,
                    reason = reason.as_str(),
                    outcome = "refreshed",
                    attempts,
                    duration_ms = elapsed_ms,
                    expiry = new_expiry,
                    expires_in_s = new_expiry.saturating_sub(after),
                    rotated,
                    "token refreshed"
                );
                FlowOutput {
                    token: served,
                    failure: None,
                    renewed: Some(Duration::from_secs(new_expiry.saturating_sub(after))),
                    went_upstream: true,
                }
            }
            Ok((false, None, _, _)) => {
                tracing::info!(provider = %key.provider, bucket = %key.bucket, reason = reason.as_str(), outcome = "discarded-removed", attempts, duration_ms = elapsed_ms, "token refreshed, but it was removed meanwhile; the removal stands");
                FlowOutput {
                    went_upstream: true,
                    ..FlowOutput::skipped(None)
                }
            }
            Ok((false, served, superseded, invalid)) => {
                if invalid {
                    tracing::warn!(provider = %key.provider, bucket = %key.bucket, reason = reason.as_str(), outcome = "failed", attempts, duration_ms = elapsed_ms, "refresh: the token endpoint's answer could not be merged into the stored token");
                    return FlowOutput {
                        went_upstream: true,
                        ..FlowOutput::failed(served, FlowError::Failed)
                    };
                }
                debug_assert!(superseded);
                tracing::info!(provider = %key.provider, bucket = %key.bucket, reason = reason.as_str(), outcome = "discarded-superseded", attempts, duration_ms = elapsed_ms, "token refreshed, but a new token was saved meanwhile; the saved token stands");
                FlowOutput {
                    went_upstream: true,
                    ..FlowOutput::skipped(served)
                }
            }
            Err(e) => {
                tracing::error!(provider = %key.provider, bucket = %key.bucket, error = %e, "refresh: the store failed writing the refreshed token");
                FlowOutput {
                    went_upstream: true,
                    ..FlowOutput::failed(Some(current), FlowError::Store)
                }
            }
        }
    }

    /// A failed call upstream: logs it, marks the bucket after an auth failure (unless a
    /// new token was saved meanwhile), and says what to answer.
    #[allow(clippy::too_many_arguments)]
    async fn fail(
        &self,
        key: &BucketKey,
        reason: Reason,
        mut locked: Locked,
        current: ServedToken,
        error: RefreshError,
        attempts: u32,
        elapsed_ms: u64,
        after: u64,
    ) -> FlowOutput {
        let failure = if error.is_auth_failure() {
            FlowError::Reauth
        } else {
            FlowError::Failed
        };
        let outcome = if error.is_auth_failure() {
            "needs-login"
        } else {
            "failed"
        };
        tracing::warn!(
            provider = %key.provider,
            bucket = %key.bucket,
            reason = reason.as_str(),
            outcome,
            attempts,
            duration_ms = elapsed_ms,
            error = %error,
            "token refresh failed"
        );
        if let RefreshError::AuthFailure { status, code } = &error {
            tracing::warn!(
                provider = %key.provider,
                bucket = %key.bucket,
                "the host's login for {key} is no longer valid: log in again with the provider's own CLI and run `credproxy store import`, or save a new token with `credproxy store token set {} --bucket {}`",
                key.provider,
                key.bucket
            );
            let sent = locked
                .stored
                .as_ref()
                .and_then(Token::refresh_token)
                .map(Secret::from);
            let mark = NeedsLogin {
                since: after,
                status: *status,
                code: code.clone(),
            };
            let (p, b) = (key.provider.clone(), key.bucket.clone());
            let lock = locked.lock.take();
            let marked = self
                .blocking(move |s| {
                    let _held = lock;
                    // Asked again after a lost compare-and-swap: the mark is cloned.
                    s.finish_refresh(&p, &b, &mut |cur| match (cur, &sent) {
                        (Some(cur), Some(sent)) if cur.refresh_token() == Some(sent.expose()) => {
                            RefreshWrite::NeedsLogin(mark.clone())
                        }
                        _ => RefreshWrite::Nothing,
                    })
                })
                .await;
            if let Err(e) = marked {
                tracing::error!(provider = %key.provider, bucket = %key.bucket, error = %e, "refresh: the store failed recording that a new login is needed");
            }
        }
        drop(locked);
        FlowOutput {
            went_upstream: true,
            ..FlowOutput::failed(Some(current), failure)
        }
    }
}
