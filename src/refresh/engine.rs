//! The [`Refresher`] actor: host-side refresh in the supervision tree (PROTOCOL.md §14).
//!
//! - **Single flight.** At most one refresh per provider:bucket runs in this server; a
//!   request that needs one while it runs waits for it and shares its result
//!   ([`Refresh`]). Across processes the bucket's refresh lock in the store does the same
//!   (see [`super::flow`]).
//! - **Renewal.** Every refreshable token the profile allows gets a timer that refreshes
//!   it ahead of its expiry ([`super::schedule::renewal_delay`]). The engine learns of
//!   tokens from a scan of the store at start and every
//!   [`RefreshConfig::scan_interval`](super::RefreshConfig::scan_interval) (tokens saved
//!   by other processes), from [`Changed`] after a save or removal here, and from the
//!   result of each refresh. A failed renewal is tried again with a doubling pause until
//!   the token expires; an auth failure stops renewal of that bucket until a token is
//!   saved for it again.
//! - **Shutdown** ([`Stop`]): the scan and every timer are cancelled at once, refreshes in
//!   flight may finish within the grace time, and the rest are abandoned (their waiters
//!   get `REFRESH_FAILED`) and counted in the report.
//!
//! It is its own actor rather than a part of the `CredentialStore` so that a refresh,
//! which may wait 40 s on a token endpoint, never occupies the store's mailbox, and so
//! that the store stays a plain owner of the backend.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::{
    Actor, ActorContext, ActorFutureExt, AsyncContext, Context, Handler, Message,
    ResponseActFuture, SpawnHandle, WrapFuture,
};
use tokio::sync::oneshot;

use super::flow::{FlowEnv, FlowError, FlowOutput, Reason};
use super::schedule::{renewal_delay, BucketKey};
use super::RefreshConfig;
use crate::backend::{Backend, StoreError};
use crate::oauth::Upstream;
use crate::policy::Profile;
use crate::store::Workers;

/// A flight in progress and who waits for it.
struct Flight {
    id: u64,
    handle: SpawnHandle,
    waiters: Vec<oneshot::Sender<FlowOutput>>,
}

/// A renewal timer.
struct Timer {
    /// The expiry it was set for.
    expiry: u64,
    handle: SpawnHandle,
}

/// The refresh engine (see the module documentation).
pub struct Refresher {
    env: Option<FlowEnv>,
    /// What the env is built from, until it is (see [`Refresher::ensure_env`]).
    parts: Option<(Arc<dyn Backend>, RefreshConfig)>,
    /// Host-side refresh is on (renewal, scans).
    enabled: bool,
    workers: Option<Workers>,
    profile: Profile,
    /// Tokens served by command sources: the stored ones they hide are not renewed.
    shadowed: crate::source::SourceIndex,
    scan_interval: Duration,
    renewal_retry: Duration,
    flights: HashMap<BucketKey, Flight>,
    timers: HashMap<BucketKey, Timer>,
    /// Failed renewals in a row, per bucket, for the retry pause.
    renewal_failures: HashMap<BucketKey, u32>,
    /// Buckets whose last refresh failed: until when requests get the failure at once,
    /// and how many failed in a row.
    backoff: HashMap<BucketKey, (Instant, u32, FlowError)>,
    failure_backoff: Duration,
    next_flight: u64,
    stopping: bool,
    stop_waiter: Option<oneshot::Sender<()>>,
}

impl std::fmt::Debug for Refresher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Refresher")
            .field("flights", &self.flights.len())
            .field("timers", &self.timers.len())
            .field("stopping", &self.stopping)
            .finish_non_exhaustive()
    }
}

impl Refresher {
    /// An engine over `backend` for the tokens `profile` allows. Without an HTTP client or
    /// a worker pool (neither can fail on a sane system) it answers every refresh with
    /// `REFRESH_FAILED` and says why in the log.
    pub fn new(backend: Arc<dyn Backend>, profile: Profile, config: RefreshConfig) -> Refresher {
        Refresher::with_sources(
            backend,
            profile,
            config,
            crate::source::SourceIndex::default(),
        )
    }

    /// [`Refresher::new`], leaving alone the stored tokens that the command sources of
    /// `shadowed` hide (they are never served, so never renewed).
    pub fn with_sources(
        backend: Arc<dyn Backend>,
        profile: Profile,
        config: RefreshConfig,
        shadowed: crate::source::SourceIndex,
    ) -> Refresher {
        Refresher {
            env: None,
            workers: None,
            enabled: config.settings.enabled,
            scan_interval: config.scan_interval,
            renewal_retry: config.renewal_retry,
            failure_backoff: config.failure_backoff,
            parts: Some((backend, config)),
            profile,
            shadowed,
            flights: HashMap::new(),
            timers: HashMap::new(),
            renewal_failures: HashMap::new(),
            backoff: HashMap::new(),
            next_flight: 0,
            stopping: false,
            stop_waiter: None,
        }
    }

    fn renewing(&self) -> bool {
        !self.stopping && self.enabled && (self.env.is_some() || self.parts.is_some())
    }

    /// Builds the HTTP client and the worker pool on first use, so that a server that
    /// never refreshes (`--no-refresh`, nothing refreshable asked for) holds no thread or
    /// descriptor for them.
    fn ensure_env(&mut self) {
        let Some((backend, config)) = self.parts.take() else {
            return;
        };
        let workers = Workers::start("credproxy-refresh");
        let upstream = match Upstream::with(config.timeouts, config.retry.clone()) {
            Ok(upstream) => Some(upstream),
            Err(e) => {
                tracing::error!(error = %e, "host-side refresh is unavailable");
                None
            }
        };
        self.env = match (&workers, upstream) {
            (Some(workers), Some(upstream)) => Some(FlowEnv {
                backend,
                endpoints: Arc::new(config.endpoints),
                upstream,
                settings: config.settings,
                clock: config.clock,
                pool: workers.handle(),
            }),
            _ => None,
        };
        self.workers = workers;
    }

    /// Starts a flight for `key`, or joins the one running, and hands the result to
    /// `waiter`.
    fn join(
        &mut self,
        key: BucketKey,
        reason: Reason,
        waiter: Option<oneshot::Sender<FlowOutput>>,
        ctx: &mut Context<Self>,
    ) {
        if let Some(flight) = self.flights.get_mut(&key) {
            flight.waiters.extend(waiter);
            return;
        }
        self.ensure_env();
        let Some(env) = self.env.clone() else {
            if let Some(tx) = waiter {
                let _ = tx.send(failed());
            }
            return;
        };
        self.next_flight += 1;
        let id = self.next_flight;
        let flight_key = key.clone();
        let work = async move { env.run(&flight_key, reason).await };
        let landing_key = key.clone();
        let handle = ctx.spawn(
            work.into_actor(self)
                .map(move |output, act, ctx| act.land(landing_key, id, reason, output, ctx)),
        );
        self.flights.insert(
            key,
            Flight {
                id,
                handle,
                waiters: waiter.into_iter().collect(),
            },
        );
    }

    /// A flight ended: answer its waiters and set the bucket's next renewal.
    fn land(
        &mut self,
        key: BucketKey,
        id: u64,
        reason: Reason,
        output: FlowOutput,
        ctx: &mut Context<Self>,
    ) {
        if self.flights.get(&key).is_some_and(|f| f.id == id) {
            if let Some(flight) = self.flights.remove(&key) {
                for waiter in flight.waiters {
                    let _ = waiter.send(output.clone());
                }
            }
        }
        if self.stopping {
            if self.flights.is_empty() {
                if let Some(tx) = self.stop_waiter.take() {
                    let _ = tx.send(());
                }
            }
            return;
        }
        // A refusal of the login is kept by the needs-login mark in the store, which any
        // process's save clears; only the other failures back off here.
        match output.failure {
            None | Some(FlowError::NotAvailable | FlowError::Reauth) => {
                self.backoff.remove(&key);
            }
            Some(kind @ (FlowError::Failed | FlowError::Store)) => {
                let failures = self.backoff.get(&key).map_or(0, |(_, n, _)| *n) + 1;
                let pause = self
                    .failure_backoff
                    .checked_mul(2u32.saturating_pow((failures - 1).min(8)))
                    .unwrap_or(Duration::MAX)
                    .min(Duration::from_secs(60).max(self.failure_backoff));
                self.backoff
                    .insert(key.clone(), (Instant::now() + pause, failures, kind));
            }
        }
        match (&output.failure, &output.token) {
            (None, Some(token)) => {
                self.renewal_failures.remove(&key);
                let has_rt = token.has_refresh_token();
                self.plan(key, token.expiry(), has_rt, output.renewed, ctx);
            }
            (None, None) | (Some(FlowError::Reauth | FlowError::NotAvailable), _) => {
                self.renewal_failures.remove(&key);
                self.cancel_timer(&key, ctx);
            }
            (Some(FlowError::Failed | FlowError::Store), token) => {
                if let (Reason::Renewal { .. }, Some(token)) = (reason, token) {
                    self.retry_renewal(key, token.expiry(), ctx);
                }
            }
        }
    }

    fn cancel_timer(&mut self, key: &BucketKey, ctx: &mut Context<Self>) {
        if let Some(timer) = self.timers.remove(key) {
            ctx.cancel_future(timer.handle);
        }
    }

    /// Sets (or keeps) the renewal timer of `key` for a token expiring at `expiry`.
    /// `lifetime` is the whole lifetime of a token just obtained.
    fn plan(
        &mut self,
        key: BucketKey,
        expiry: u64,
        refreshable: bool,
        lifetime: Option<Duration>,
        ctx: &mut Context<Self>,
    ) {
        let Some((known, now, renew_before)) = self.env.as_ref().map(|env| {
            (
                env.knows(&key.provider),
                env.clock.now(),
                env.settings.renew_before,
            )
        }) else {
            return;
        };
        if !self.renewing() || !refreshable || !known {
            self.cancel_timer(&key, ctx);
            return;
        }
        if self.timers.get(&key).is_some_and(|t| t.expiry == expiry) {
            return;
        }
        self.cancel_timer(&key, ctx);
        let jitter = rand::random::<f64>();
        let Some(delay) = renewal_delay(expiry, now, renew_before, jitter, lifetime) else {
            // Expired: renewal never runs after expiry; the next get_token refreshes it.
            return;
        };
        self.arm(key, expiry, delay, ctx);
    }

    /// Arms the timer of `key` to fire after `delay` (at most a day: a far expiry is
    /// planned again then, so an injected or corrected clock is followed).
    fn arm(&mut self, key: BucketKey, expiry: u64, delay: Duration, ctx: &mut Context<Self>) {
        const LONGEST: Duration = Duration::from_secs(24 * 3600);
        let timer_key = key.clone();
        let handle = ctx.run_later(delay.min(LONGEST), move |act, ctx| {
            act.timers.remove(&timer_key);
            if !act.renewing() {
                return;
            }
            if delay > LONGEST {
                act.plan(timer_key, expiry, true, None, ctx);
                return;
            }
            tracing::debug!(provider = %timer_key.provider, bucket = %timer_key.bucket, "renewal due");
            act.join(timer_key, Reason::Renewal { expiry }, None, ctx);
        });
        self.timers.insert(key, Timer { expiry, handle });
    }

    /// A renewal failed for a transient reason: try again after a pause that doubles with
    /// each failure, while the token has not expired.
    fn retry_renewal(&mut self, key: BucketKey, expiry: u64, ctx: &mut Context<Self>) {
        let Some(now) = self.env.as_ref().map(|e| e.clock.now()) else {
            return;
        };
        if expiry <= now {
            self.renewal_failures.remove(&key);
            return;
        }
        let failures = self.renewal_failures.entry(key.clone()).or_insert(0);
        *failures += 1;
        let pause = self
            .renewal_retry
            .checked_mul(2u32.saturating_pow((*failures - 1).min(10)))
            .unwrap_or(Duration::MAX);
        let pause = pause.min(Duration::from_secs(expiry - now));
        tracing::debug!(provider = %key.provider, bucket = %key.bucket, pause_s = pause.as_secs(), "renewal failed; trying again later");
        self.cancel_timer(&key, ctx);
        self.arm(key, expiry, pause, ctx);
    }

    /// Reads what the store holds for the allowed, refreshable providers (or for `only`)
    /// and plans their renewals.
    fn scan(&mut self, only: Option<BucketKey>, ctx: &mut Context<Self>) {
        if !self.renewing() {
            return;
        }
        self.ensure_env();
        let Some(env) = self.env.clone() else { return };
        let profile = self.profile.clone();
        let shadowed = self.shadowed.clone();
        let providers: Vec<String> = env
            .endpoints
            .keys()
            .filter(|p| profile.allows_provider(p))
            .cloned()
            .collect();
        let backend = Arc::clone(&env.backend);
        let work = async move {
            let read = move || -> Result<Vec<Seen>, StoreError> {
                let mut seen = Vec::new();
                let keys: Vec<BucketKey> = match only {
                    Some(key) => vec![key],
                    None => {
                        let mut keys = Vec::new();
                        let stored = backend.list_providers()?;
                        for provider in providers.iter().filter(|p| stored.contains(p)) {
                            for bucket in backend.list_buckets(provider)? {
                                keys.push(BucketKey::new(provider, Some(&bucket)));
                            }
                        }
                        keys
                    }
                };
                for key in keys {
                    if !profile.allows_bucket(&key.provider, &key.bucket)
                        || shadowed.has_token(&key.provider, &key.bucket)
                    {
                        continue;
                    }
                    // One unreadable token or state file costs that bucket its renewal,
                    // not every other bucket's.
                    let token = match backend.get_served_token(&key.provider, &key.bucket) {
                        Ok(token) => token,
                        Err(e) => {
                            tracing::warn!(provider = %key.provider, bucket = %key.bucket, error = %e, "refresh: cannot read a token to plan its renewal");
                            continue;
                        }
                    };
                    let marked = backend
                        .refresh_state(&key.provider, &key.bucket)
                        .map(|s| s.needs_login.is_some())
                        .unwrap_or(false);
                    seen.push(Seen {
                        key,
                        token: token.map(|t| (t.expiry(), t.has_refresh_token())),
                        marked,
                    });
                }
                Ok(seen)
            };
            env.pool.spawn_blocking(read).await
        };
        ctx.spawn(work.into_actor(self).map(|result, act, ctx| {
            let seen = match result {
                Ok(Ok(seen)) => seen,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "refresh: cannot scan the store for tokens to renew");
                    return;
                }
                Err(_) => return,
            };
            for s in seen {
                match s.token {
                    Some((expiry, has_rt)) if !s.marked => {
                        if act.flights.contains_key(&s.key) {
                            continue;
                        }
                        act.plan(s.key, expiry, has_rt, None, ctx)
                    }
                    _ => act.cancel_timer(&s.key, ctx),
                }
            }
        }));
    }
}

/// What a scan found for one bucket.
struct Seen {
    key: BucketKey,
    /// Expiry and whether it has a refresh token; `None`: nothing stored.
    token: Option<(u64, bool)>,
    marked: bool,
}

fn failed() -> FlowOutput {
    FlowOutput {
        token: None,
        failure: Some(FlowError::Failed),
        renewed: None,
        went_upstream: false,
    }
}

impl Actor for Refresher {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        if !self.renewing() {
            return;
        }
        self.scan(None, ctx);
        let interval = self.scan_interval;
        if !interval.is_zero() {
            ctx.run_interval(interval, |act, ctx| act.scan(None, ctx));
        }
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        // Safety net for a System stopped without the shutdown sequence.
        if let Some(workers) = self.workers.take() {
            workers.release();
        }
    }
}

/// Refreshes `key` (single flight) and answers with how it ended; the asker turns that
/// into its answer with [`FlowOutput::answer`].
#[derive(Debug, Message)]
#[rtype(result = "FlowOutput")]
pub struct Refresh {
    /// The provider:bucket.
    pub key: BucketKey,
    /// Why.
    pub reason: Reason,
}

impl Handler<Refresh> for Refresher {
    type Result = actix::ResponseFuture<FlowOutput>;

    fn handle(&mut self, msg: Refresh, ctx: &mut Context<Self>) -> Self::Result {
        if self.stopping {
            return Box::pin(async { failed() });
        }
        // A bucket whose refresh just failed answers with the failure at once (the asker
        // falls back to the token it read while that is valid), unless a flight runs.
        let backing_off = self
            .backoff
            .get(&msg.key)
            .filter(|(until, _, _)| Instant::now() < *until)
            .map(|(_, _, kind)| *kind);
        if let Some(kind) = backing_off {
            if !self.flights.contains_key(&msg.key) {
                return Box::pin(async move { FlowOutput::failed_without_token(kind) });
            }
        }
        let (tx, rx) = oneshot::channel();
        self.join(msg.key, msg.reason, Some(tx), ctx);
        Box::pin(async move { rx.await.unwrap_or_else(|_| failed()) })
    }
}

/// A token of `key` was saved or removed by this server: its renewal is planned again
/// from what the store now holds.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Changed {
    /// The provider:bucket.
    pub key: BucketKey,
}

impl Handler<Changed> for Refresher {
    type Result = ();

    fn handle(&mut self, msg: Changed, ctx: &mut Context<Self>) {
        self.renewal_failures.remove(&msg.key);
        self.backoff.remove(&msg.key);
        self.cancel_timer(&msg.key, ctx);
        self.scan(Some(msg.key), ctx);
    }
}

/// Shutdown step: cancel the scan and every renewal timer, let refreshes in flight
/// finish for up to `grace`, abandon the rest, release the worker pool and stop. Answers
/// with the number of refreshes abandoned.
#[derive(Debug, Message)]
#[rtype(result = "u64")]
pub struct Stop {
    /// How long refreshes in flight may still run.
    pub grace: Duration,
}

impl Handler<Stop> for Refresher {
    type Result = ResponseActFuture<Self, u64>;

    fn handle(&mut self, msg: Stop, ctx: &mut Context<Self>) -> Self::Result {
        self.stopping = true;
        for (_, timer) in self.timers.drain() {
            ctx.cancel_future(timer.handle);
        }
        self.renewal_failures.clear();
        let (tx, rx) = oneshot::channel();
        if self.flights.is_empty() {
            let _ = tx.send(());
        } else {
            self.stop_waiter = Some(tx);
        }
        let wait = async move {
            let _ = tokio::time::timeout(msg.grace, rx).await;
        };
        Box::pin(wait.into_actor(self).map(|(), act, ctx| {
            let abandoned = act.flights.len() as u64;
            for (key, flight) in act.flights.drain() {
                ctx.cancel_future(flight.handle);
                tracing::warn!(provider = %key.provider, bucket = %key.bucket, "shutdown: refresh abandoned");
                for waiter in flight.waiters {
                    let _ = waiter.send(failed());
                }
            }
            act.env = None;
            act.parts = None;
            if let Some(workers) = act.workers.take() {
                workers.release();
            }
            ctx.stop();
            abandoned
        }))
    }
}
