//! The [`Sources`] actor: serves command-backed credentials (see [`super`]).
//!
//! - **Memory only.** A value lives in this actor (a [`ServedToken`] or a [`Secret`], both
//!   on locked, undumpable pages), never in the store's files; it is wiped at shutdown.
//! - **One run at a time** per source: requests that need a value while the command runs
//!   wait for that run and share its result.
//! - **Ahead of time.** Every source runs once at start, and again before its value
//!   expires: `renew_before` ahead (a `get_token` that finds it within the refresh margin
//!   starts the run at once), both capped at a quarter of the value's lifetime so a short
//!   TTL is not always due. The requests meanwhile get the current value.
//! - **Failures.** A failed run keeps the last good value in service until it expires
//!   (then `REFRESH_FAILED`), and the source is run again in the background after a pause
//!   that doubles from [`SourceSettings::retry_min`] to [`SourceSettings::retry_max`]; a
//!   request never waits for a retry.
//! - **Shutdown** ([`StopSources`]): timers cancelled, running commands killed (their
//!   process groups), values wiped, waiters answered with a failure.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use actix::{
    Actor, ActorContext, ActorFutureExt, AsyncContext, Context, Handler, Message, SpawnHandle,
    WrapFuture,
};
use serde_json::Value;
use tokio::sync::oneshot;

use super::output::{self, Parsed};
use super::run::{self, Running};
use super::{SourceSettings, SourceSpec, SourceTarget};
use crate::refresh::{Clock, RefreshSettings};
use crate::secret::Secret;
use crate::store::Workers;
use crate::token::{ServedToken, Token};

/// A value a source produced.
#[derive(Debug, Clone)]
pub enum Held {
    /// For a token source: the token as `get_token` serves it.
    Token(ServedToken),
    /// For a key source.
    Key(Secret),
}

/// No value can be served: the command failed (or never ran) and nothing valid is left.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the source command gave no valid value")]
pub struct SourceFailed;

struct Current {
    held: Held,
    expiry: u64,
    lifetime: u64,
}

type Waiter = oneshot::Sender<Result<Held, SourceFailed>>;

struct Entry {
    spec: SourceSpec,
    value: Option<Current>,
    /// Some while the command runs: who waits for it.
    running: Option<Vec<Waiter>>,
    failures: u32,
    /// When the command last started, for the cooldown of explicit refreshes.
    last_attempt: Option<Instant>,
    timer: Option<SpawnHandle>,
}

/// The command-backed sources actor.
pub struct Sources {
    entries: HashMap<SourceTarget, Entry>,
    settings: SourceSettings,
    refresh: RefreshSettings,
    clock: Clock,
    workers: Option<Workers>,
    running: Running,
    stopping: bool,
}

impl std::fmt::Debug for Sources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sources")
            .field("sources", &self.entries.len())
            .finish_non_exhaustive()
    }
}

impl Sources {
    /// The actor for `specs` (the later of two specs for one target wins; the profile
    /// refuses duplicates).
    pub fn new(
        specs: Vec<SourceSpec>,
        settings: SourceSettings,
        refresh: RefreshSettings,
        clock: Clock,
    ) -> Sources {
        let entries = specs
            .into_iter()
            .map(|spec| {
                (
                    spec.target.clone(),
                    Entry {
                        spec,
                        value: None,
                        running: None,
                        failures: 0,
                        last_attempt: None,
                        timer: None,
                    },
                )
            })
            .collect();
        Sources {
            entries,
            settings,
            refresh,
            clock,
            workers: None,
            running: Running::default(),
            stopping: false,
        }
    }

    /// The lead of a value living `lifetime` seconds: `lead`, at most a quarter of it.
    fn lead(lead: Duration, lifetime: u64) -> Duration {
        lead.min(Duration::from_secs(lifetime) / 4)
    }

    /// Starts the command of `target` unless it runs already.
    fn start(&mut self, target: &SourceTarget, ctx: &mut Context<Self>) {
        if self.stopping {
            return;
        }
        let Some(entry) = self.entries.get_mut(target) else {
            return;
        };
        if entry.running.is_some() {
            return;
        }
        if self.workers.is_none() {
            self.workers = Workers::start("credproxy-source");
        }
        let Some(pool) = self.workers.as_ref().map(Workers::handle) else {
            return;
        };
        entry.running = Some(Vec::new());
        entry.last_attempt = Some(Instant::now());
        if let Some(timer) = entry.timer.take() {
            ctx.cancel_future(timer);
        }
        let command = entry.spec.command.clone();
        let timeout = self.settings.timeout;
        let running = self.running.clone();
        let started = Instant::now();
        let work = async move {
            pool.spawn_blocking(move || run::run(&command, timeout, &running))
                .await
        };
        let target = target.clone();
        ctx.spawn(work.into_actor(self).map(move |result, act, ctx| {
            let result = match result {
                Ok(r) => r.map_err(|e| e.to_string()),
                Err(_) => Err("the run was abandoned".to_owned()),
            };
            act.finished(&target, result, started, ctx);
        }));
    }

    /// A run ended: keep its value (or count the failure), answer the waiters, and set
    /// the next run.
    fn finished(
        &mut self,
        target: &SourceTarget,
        result: Result<zeroize::Zeroizing<Vec<u8>>, String>,
        started: Instant,
        ctx: &mut Context<Self>,
    ) {
        let now = self.clock.now();
        let settings = self.settings;
        let renew_before = self.refresh.renew_before;
        let Some(entry) = self.entries.get_mut(target) else {
            return;
        };
        let waiters = entry.running.take().unwrap_or_default();
        let made = result.and_then(|stdout| {
            let parsed = output::parse(&stdout, now).map_err(|e| e.to_string())?;
            value_of(&entry.spec, parsed, now, settings.default_ttl)
        });
        let duration_ms = started.elapsed().as_millis() as u64;
        let next = match made {
            Ok(current) => {
                tracing::info!(
                    source = %target,
                    program = %entry.spec.command[0],
                    duration_ms,
                    expiry = current.expiry,
                    expires_in_s = current.lifetime,
                    "source command ran"
                );
                entry.failures = 0;
                let lead = Self::lead(renew_before, current.lifetime);
                let wait =
                    Duration::from_secs(current.expiry.saturating_sub(now)).saturating_sub(lead);
                entry.value = Some(current);
                // Renewed ahead at most once per cooldown: a value that lives less than
                // that is run again only when a request needs it, never in a loop.
                (wait >= settings.cooldown).then_some(wait)
            }
            Err(why) => {
                entry.failures += 1;
                let pause = settings
                    .retry_min
                    .checked_mul(2u32.saturating_pow((entry.failures - 1).min(16)))
                    .unwrap_or(settings.retry_max)
                    .min(settings.retry_max);
                tracing::warn!(
                    source = %target,
                    program = %entry.spec.command[0],
                    duration_ms,
                    failures = entry.failures,
                    retry_in_s = pause.as_secs(),
                    error = %why,
                    "source command failed; serving the last good value while it is valid"
                );
                Some(pause)
            }
        };
        let valid = entry
            .value
            .as_ref()
            .filter(|c| c.expiry > now)
            .map(|c| c.held.clone());
        for waiter in waiters {
            let _ = waiter.send(valid.clone().ok_or(SourceFailed));
        }
        if let Some(after) = next {
            let timer_target = target.clone();
            entry.timer = Some(ctx.run_later(after, move |act, ctx| {
                if let Some(e) = act.entries.get_mut(&timer_target) {
                    e.timer = None;
                }
                act.start(&timer_target, ctx);
            }));
        }
    }
}

/// The value `parsed` gives `spec` at `now`.
fn value_of(
    spec: &SourceSpec,
    parsed: Parsed,
    now: u64,
    default_ttl: Duration,
) -> Result<Current, String> {
    let ttl = spec.ttl.unwrap_or(default_ttl).as_secs();
    let (held, expiry) = match (&spec.target, parsed) {
        (SourceTarget::Token { .. }, Parsed::Value { value, expiry }) => {
            let expiry = expiry.unwrap_or(now.saturating_add(ttl));
            let token = Token::from_value(serde_json::json!({
                "access_token": value.expose(),
                "expiry": expiry,
                "token_type": "Bearer",
            }))
            .map_err(|e| e.to_string())?;
            (Held::Token(token.served()), expiry)
        }
        (SourceTarget::Token { .. }, Parsed::Token(parsed)) => {
            let mut fields = parsed.take();
            let expiry = match fields.get("expiry").and_then(Value::as_u64) {
                Some(e) => e,
                None => {
                    let e = now.saturating_add(ttl);
                    fields.insert("expiry".into(), Value::from(e));
                    e
                }
            };
            if !fields.contains_key("token_type") {
                fields.insert("token_type".into(), Value::from("Bearer"));
            }
            let token = Token::from_map(fields).map_err(|e| e.to_string())?;
            (Held::Token(token.served()), expiry)
        }
        (SourceTarget::Key { .. }, Parsed::Value { value, expiry }) => {
            (Held::Key(value), expiry.unwrap_or(now.saturating_add(ttl)))
        }
        (SourceTarget::Key { .. }, Parsed::Token(fields)) => {
            let fields = fields.get();
            let key = fields
                .get("access_token")
                .and_then(Value::as_str)
                .map(Secret::from)
                .ok_or("the output has no access_token")?;
            let expiry = fields
                .get("expiry")
                .and_then(Value::as_u64)
                .unwrap_or(now.saturating_add(ttl));
            (Held::Key(key), expiry)
        }
    };
    if expiry <= now.saturating_add(1) {
        return Err("the command gave a value that has already expired".to_owned());
    }
    if let Held::Token(token) = &held {
        if token.json().len() > crate::protocol::MAX_SERVED_TOKEN_LEN {
            return Err(format!(
                "the command's token is too large to serve (over {} bytes)",
                crate::protocol::MAX_SERVED_TOKEN_LEN
            ));
        }
    }
    Ok(Current {
        held,
        expiry,
        lifetime: expiry.saturating_sub(now),
    })
}

impl Actor for Sources {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let targets: Vec<SourceTarget> = self.entries.keys().cloned().collect();
        for target in targets {
            self.start(&target, ctx);
        }
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        self.running.stop_all();
        self.entries.clear();
        if let Some(workers) = self.workers.take() {
            workers.release();
        }
    }
}

/// The value of a source for a request; `explicit` for `refresh_token` (run now unless
/// the last good run is within the cooldown).
#[derive(Debug, Message)]
#[rtype(result = "Result<Held, SourceFailed>")]
pub struct Fetch {
    /// Which source.
    pub target: SourceTarget,
    /// An explicit refresh.
    pub explicit: bool,
}

impl Handler<Fetch> for Sources {
    type Result = actix::ResponseFuture<Result<Held, SourceFailed>>;

    fn handle(&mut self, msg: Fetch, ctx: &mut Context<Self>) -> Self::Result {
        let now = self.clock.now();
        let margin = self.refresh.margin;
        let cooldown = self.settings.cooldown;
        let Some(entry) = self.entries.get_mut(&msg.target) else {
            return Box::pin(async { Err(SourceFailed) });
        };
        let valid = entry.value.as_ref().filter(|c| c.expiry > now);
        // Explicit refreshes start the command at most once per cooldown, counted from
        // its last start whatever its outcome; while a failed source waits for its retry,
        // no request starts it.
        let cooling = entry.last_attempt.is_some_and(|t| t.elapsed() < cooldown);
        let failing = entry.failures > 0;
        let due = valid
            .is_some_and(|c| Duration::from_secs(c.expiry - now) <= Self::lead(margin, c.lifetime));
        let wait = match (valid, msg.explicit) {
            _ if entry.running.is_some() => valid.is_none() || msg.explicit,
            (Some(_), true) => !cooling && !failing,
            (Some(_), false) => false,
            (None, _) => !failing,
        };
        if !wait {
            let answer = valid.map(|c| c.held.clone()).ok_or(SourceFailed);
            if due && entry.running.is_none() && entry.failures == 0 {
                self.start(&msg.target, ctx);
            }
            return Box::pin(async move { answer });
        }
        if entry.running.is_none() {
            self.start(&msg.target, ctx);
        }
        let (tx, rx) = oneshot::channel();
        match self
            .entries
            .get_mut(&msg.target)
            .and_then(|e| e.running.as_mut())
        {
            Some(waiters) => waiters.push(tx),
            None => return Box::pin(async { Err(SourceFailed) }),
        }
        Box::pin(async move { rx.await.unwrap_or(Err(SourceFailed)) })
    }
}

/// Shutdown step: cancel every timer, kill running commands, wipe every value, stop.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct StopSources;

impl Handler<StopSources> for Sources {
    type Result = ();

    fn handle(&mut self, _: StopSources, ctx: &mut Context<Self>) {
        self.stopping = true;
        self.running.stop_all();
        for (_, mut entry) in self.entries.drain() {
            if let Some(timer) = entry.timer.take() {
                ctx.cancel_future(timer);
            }
            for waiter in entry.running.take().unwrap_or_default() {
                let _ = waiter.send(Err(SourceFailed));
            }
        }
        if let Some(workers) = self.workers.take() {
            workers.release();
        }
        ctx.stop();
    }
}
