//! The `Session` actor: one per connection. It owns the framing and its deadlines, the
//! handshake, the connection's rate limiter and in-flight bound, the envelope and payload
//! checks, and dispatch to the `ScopePolicy` and `CredentialStore` actors.
//!
//! Every request runs as its own future on the session (`ctx.spawn`), so a slow store call
//! never holds up a fast one behind it; replies go out by id as they complete. A reply
//! that ends the connection is written, then the writer is closed, and the actor stops
//! once the bytes are flushed (or after the linger time for a peer that never reads).

use std::collections::HashSet;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use actix::{
    Actor, ActorContext, ActorFutureExt, Addr, AsyncContext, Context, Handler, Message, Recipient,
    SpawnHandle, StreamHandler, WrapFuture,
};
use bytes::Bytes;
use serde_json::json;
use tokio::net::UnixStream;
use tokio::sync::oneshot;
use tokio_util::codec::FramedRead;

use crate::codec::{CodecError, FrameCodec, FrameEvent, MAX_FRAME_LEN};
use crate::config::Limits;
use crate::envelope::Frame;
use crate::outbox::{Outbox, UnsentBudget};
use crate::policy::{self, Decision, ListKind, ScopePolicy, Subject};
use crate::protocol::{
    self, ErrorCode, Handshake, Op, Rejection, ReplyData, Request, MAX_SERVED_TOKEN_LEN,
};
use crate::rate_limit::RateLimiter;
use crate::refresh::engine::{Changed, Refresh, Refresher};
use crate::refresh::flow::{FlowError, FlowOutput, Reason};
use crate::refresh::BucketKey;
use crate::source::engine::{Fetch, Held, Sources};
use crate::source::{SourceIndex, SourceTarget};
use crate::store::{self, CredentialStore};

/// Read buffer a new connection starts with; it grows to fit the frames actually sent.
const INITIAL_READ_BUFFER: usize = 1024;

/// Allowed subjects a session remembers; a client that uses more is asked about again
/// (a sandbox uses a handful of provider:bucket pairs and keys).
pub const MAX_REMEMBERED: usize = 8;

/// What a session needs from the rest of the server; shared by every session.
#[derive(Debug)]
pub struct Shared {
    /// The credential store.
    pub store: Addr<CredentialStore>,
    /// The scope policy.
    pub policy: Addr<ScopePolicy>,
    /// Told when a session has stopped.
    pub closed: Recipient<SessionClosed>,
    /// Limits and timers.
    pub limits: Limits,
    /// The refresh engine.
    pub refresher: Addr<Refresher>,
    /// When `get_token` asks the refresh engine first.
    pub refresh: RefreshGate,
    /// The command sources actor, when the profile has sources.
    pub sources: Option<Addr<Sources>>,
    /// Which tokens and keys the command sources serve.
    pub source_index: Arc<SourceIndex>,
}

/// What a session needs to tell, without asking anyone, whether a token `get_token` read
/// must be refreshed first (PROTOCOL.md §14).
#[derive(Debug, Clone)]
pub struct RefreshGate {
    /// Host-side refresh is on.
    pub enabled: bool,
    /// The providers with a token endpoint.
    pub providers: Arc<std::collections::BTreeSet<String>>,
    /// A token expiring within this margin (or expired) is refreshed first.
    pub margin: std::time::Duration,
    /// Epoch seconds.
    pub clock: crate::refresh::Clock,
}

impl RefreshGate {
    /// True when tokens of `provider` may be refreshed by `get_token`.
    fn covers(&self, provider: &str) -> bool {
        self.enabled && self.providers.contains(provider)
    }
}

/// Who is on the other end, from `SO_PEERCRED`.
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    /// Peer uid.
    pub uid: u32,
    /// Peer pid, when the kernel reports one.
    pub pid: Option<i32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for the handshake frame.
    Handshake,
    /// Serving requests.
    Ready,
    /// Reading stopped; close once the requests in flight are answered.
    Draining,
    /// Writer closing; nothing more is read or written.
    Closing,
}

/// The session actor.
pub struct Session {
    id: u64,
    peer: Peer,
    shared: Arc<Shared>,
    /// Outgoing bytes; reading pauses while too much is unsent (see [`crate::outbox`]).
    outbox: Outbox,
    reader: Option<SpawnHandle>,
    phase: Phase,
    handshake_timer: Option<SpawnHandle>,
    partial_timer: Option<SpawnHandle>,
    /// Ticks at a quarter of [`Limits::idle_timeout`] once the handshake is done.
    idle_timer: Option<SpawnHandle>,
    /// Idle-timer ticks since the last byte received with nothing in flight; reset by
    /// every frame start and frame (one store, nothing per request beyond it).
    quiet_ticks: u8,
    limiter: RateLimiter,
    /// Ids of the requests in flight, for the in-flight bound and duplicate ids.
    in_flight: HashSet<String>,
    /// Subjects the `ScopePolicy` allowed on this connection (at most
    /// [`MAX_REMEMBERED`]). The profile cannot change while the server runs, so the
    /// policy's answer for a subject cannot change either: asking again would only cost a
    /// round trip per request. Refusals are never remembered.
    allowed: Vec<Subject>,
    /// Why the session is ending, for the close log line and the drain report.
    close_reason: &'static str,
    /// Requests answered on this connection.
    answered: u64,
    /// Shutdown waiting for this session to stop.
    drain_waiters: Vec<oneshot::Sender<SessionReport>>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("id", &self.id)
            .field("peer", &self.peer)
            .field("phase", &self.phase)
            .field("in_flight", &self.in_flight.len())
            .finish_non_exhaustive()
    }
}

impl Session {
    /// Starts a session actor on the current arbiter for an accepted, peer-checked stream.
    /// `budget` is the server's unsent-bytes budget, shared by every session.
    pub fn spawn(
        stream: UnixStream,
        id: u64,
        peer: Peer,
        shared: Arc<Shared>,
        budget: Rc<UnsentBudget>,
    ) -> Addr<Session> {
        Session::create(move |ctx| Session::new(stream, id, peer, shared, budget, ctx))
    }

    fn new(
        stream: UnixStream,
        id: u64,
        peer: Peer,
        shared: Arc<Shared>,
        budget: Rc<UnsentBudget>,
        ctx: &mut Context<Session>,
    ) -> Session {
        let (read, write) = stream.into_split();
        let outbox = Outbox::new(budget);
        let frames = FramedRead::with_capacity(read, FrameCodec::new(), INITIAL_READ_BUFFER);
        let reader = ctx.add_stream(outbox.pause_reads(frames));
        ctx.spawn(outbox.writer(
            write,
            |act: &mut Session, ctx: &mut Context<Session>, result| {
                if let Err(e) = result {
                    tracing::debug!(session = act.id, error = %e, "write failed");
                    if act.outbox.aborted() {
                        act.close_reason = "unsent-budget";
                    } else if act.phase != Phase::Closing {
                        act.close_reason = "io-error";
                    }
                }
                // Flushed after a close, or the peer is gone: either way this session ends.
                ctx.stop();
            },
        ));
        let limits = &shared.limits;
        Session {
            id,
            peer,
            outbox,
            reader: Some(reader),
            phase: Phase::Handshake,
            handshake_timer: None,
            partial_timer: None,
            idle_timer: None,
            quiet_ticks: 0,
            limiter: RateLimiter::new(limits.rate_limit, limits.rate_window),
            in_flight: HashSet::new(),
            allowed: Vec::new(),
            close_reason: "eof",
            answered: 0,
            drain_waiters: Vec::new(),
            shared,
        }
    }

    /// Frames and queues `body`, then wipes it (it may hold a secret). The caller checks
    /// the size against [`MAX_FRAME_LEN`] first.
    fn send(&mut self, mut body: Vec<u8>) {
        self.outbox.push_frame(&body);
        zeroize::Zeroize::zeroize(&mut body);
    }

    /// Sends a reply to request `id`, replacing one that would exceed the frame limit.
    fn send_reply(&mut self, id: &str, body: Vec<u8>) {
        if body.len() > MAX_FRAME_LEN {
            let mut body = body;
            zeroize::Zeroize::zeroize(&mut body);
            tracing::warn!(
                session = self.id,
                "reply over the frame limit replaced by INTERNAL_ERROR"
            );
            self.send(protocol::error_reply(
                Some(id),
                None,
                ErrorCode::InternalError,
                "response too large",
                None,
            ));
        } else {
            self.send(body);
        }
    }

    fn reject(&mut self, id: &str, rejection: &Rejection, retry_after: Option<u64>) {
        let body = protocol::error_reply(
            Some(id),
            None,
            rejection.code,
            &rejection.message,
            retry_after,
        );
        self.send(body);
    }

    /// Rejects a request before it reaches the policy or the store, with a debug line.
    fn refuse(&mut self, id: &str, rejection: &Rejection, retry_after: Option<u64>) {
        tracing::debug!(
            session = self.id,
            uid = self.peer.uid,
            pid = self.peer.pid,
            outcome = rejection.code.as_str(),
            "request refused before dispatch"
        );
        self.reject(id, rejection, retry_after);
    }

    /// Writes `last` (if any), then closes: nothing more is read, the writer flushes and
    /// the actor stops when it is done or after the linger time.
    fn close(&mut self, ctx: &mut Context<Self>, reason: &'static str, last: Option<Vec<u8>>) {
        if self.phase == Phase::Closing {
            return;
        }
        if let Some(body) = last {
            self.send(body);
        }
        self.phase = Phase::Closing;
        self.close_reason = reason;
        for handle in [
            self.reader.take(),
            self.handshake_timer.take(),
            self.partial_timer.take(),
            self.idle_timer.take(),
        ]
        .into_iter()
        .flatten()
        {
            ctx.cancel_future(handle);
        }
        self.outbox.close();
        ctx.run_later(self.shared.limits.close_linger, |_, ctx| ctx.stop());
    }

    /// Stops reading and closes once every request in flight has been answered.
    fn drain(&mut self, ctx: &mut Context<Self>, reason: &'static str) {
        if matches!(self.phase, Phase::Closing | Phase::Draining) {
            return;
        }
        self.phase = Phase::Draining;
        self.close_reason = reason;
        // Nothing more is read, so no partial frame can complete: its deadline must not
        // cut the grace time short.
        for handle in [
            self.reader.take(),
            self.partial_timer.take(),
            self.idle_timer.take(),
        ]
        .into_iter()
        .flatten()
        {
            ctx.cancel_future(handle);
        }
        if self.in_flight.is_empty() {
            self.close(ctx, reason, None);
        }
    }

    fn on_frame(&mut self, body: Bytes, ctx: &mut Context<Self>) {
        let frame = match protocol::parse_frame(&body) {
            Ok(frame) => frame,
            Err(message) => {
                tracing::debug!(session = self.id, "malformed frame; closing");
                let last =
                    protocol::error_reply(None, None, ErrorCode::InvalidRequest, message, None);
                return self.close(ctx, "malformed-frame", Some(last));
            }
        };
        match self.phase {
            Phase::Handshake => self.on_handshake(&frame, ctx),
            Phase::Ready => self.on_request(frame, ctx),
            // Frames already buffered when draining began are not executed.
            Phase::Draining | Phase::Closing => {}
        }
    }

    fn on_handshake(&mut self, frame: &Frame<'_>, ctx: &mut Context<Self>) {
        let (code, message, reason) = match protocol::negotiate(frame) {
            Handshake::Agreed(version) => {
                if let Some(timer) = self.handshake_timer.take() {
                    ctx.cancel_future(timer);
                }
                self.phase = Phase::Ready;
                self.start_idle_timer(ctx);
                tracing::debug!(session = self.id, version, "handshake done");
                return self.send(protocol::handshake_ok(version));
            }
            Handshake::NotHandshake => (
                ErrorCode::InvalidRequest,
                "handshake required",
                "no-handshake",
            ),
            Handshake::NoVersion => (
                ErrorCode::UnknownVersion,
                "unsupported protocol version",
                "unknown-version",
            ),
        };
        let last = protocol::error_reply(None, Some("handshake"), code, message, None);
        self.close(ctx, reason, Some(last));
    }

    /// Starts the idle check (unless [`Limits::idle_timeout`] is zero): one timer per
    /// connection ticking at a quarter of the timeout, rather than a timer reset per
    /// request, so the request path only clears a counter. Four quiet ticks in a row with
    /// nothing in flight close the connection without a frame: the client sees EOF, as
    /// after any server-side close (PROTOCOL.md §12).
    fn start_idle_timer(&mut self, ctx: &mut Context<Self>) {
        let timeout = self.shared.limits.idle_timeout;
        if timeout.is_zero() {
            return;
        }
        self.idle_timer = Some(ctx.run_interval(timeout / 4, |act, ctx| {
            if !act.in_flight.is_empty() {
                act.quiet_ticks = 0;
                return;
            }
            act.quiet_ticks = act.quiet_ticks.saturating_add(1);
            if act.quiet_ticks >= 4 {
                tracing::debug!(session = act.id, "idle timeout; closing");
                act.close(ctx, "idle-timeout", None);
            }
        }));
    }

    /// Runs the checks of PROTOCOL.md §5 in order, then spawns the operation.
    fn on_request(&mut self, frame: Frame<'_>, ctx: &mut Context<Self>) {
        let envelope = match protocol::parse_envelope(frame) {
            Ok(envelope) => envelope,
            Err((id, rejection)) => return self.refuse(&id, &rejection, None),
        };
        let id = envelope.id;
        if let Err(retry_after) = self.limiter.check(Instant::now()) {
            let r = Rejection::new(ErrorCode::RateLimited, "rate limit exceeded; retry later");
            return self.refuse(&id, &r, Some(retry_after));
        }
        if self.in_flight.len() >= self.shared.limits.max_in_flight {
            let r = Rejection::new(
                ErrorCode::ResourceExhausted,
                "too many requests in flight on this connection",
            );
            return self.refuse(&id, &r, None);
        }
        // One hash for the duplicate check and the insert; undone if the request fails.
        if !self.in_flight.insert(id.clone()) {
            return self.refuse(&id, &Rejection::invalid("duplicate request id"), None);
        }
        let request = match protocol::parse_op(&envelope.op)
            .and_then(|op| Request::parse(op, envelope.payload))
        {
            Ok(request) => request,
            Err(rejection) => {
                self.in_flight.remove(&id);
                return self.refuse(&id, &rejection, None);
            }
        };
        let op = request.op();
        let target = tracing::enabled!(tracing::Level::DEBUG).then(|| {
            let t = request.target();
            let own = |s: Option<&str>| s.map(str::to_owned);
            [own(t.provider), own(t.bucket), own(t.key)]
        });
        // A subject the policy already allowed on this connection is not asked about
        // again (see `allowed`); a new one is remembered if the policy allows it.
        let known = self.allowed.iter().any(|s| is_subject_of(s, &request));
        let remember = if known { None } else { subject_of(&request) };
        let work = execute(Arc::clone(&self.shared), request, known);
        ctx.spawn(
            work.into_actor(self)
                .map(move |(result, allowed), act, ctx| {
                    // Remembered only when the policy itself answered Allow for this subject.
                    if let Some(subject) = remember.filter(|_| allowed) {
                        if act.allowed.len() < MAX_REMEMBERED && !act.allowed.contains(&subject) {
                            act.allowed.push(subject);
                        }
                    }
                    act.finish(&id, op, target, result, ctx);
                }),
        );
    }

    fn finish(
        &mut self,
        id: &str,
        op: Op,
        target: Option<[Option<String>; 3]>,
        result: Result<ReplyData, Rejection>,
        ctx: &mut Context<Self>,
    ) {
        self.in_flight.remove(id);
        self.answered += 1;
        if let Some([provider, bucket, key]) = target {
            let outcome = result.as_ref().map_or_else(|r| r.code.as_str(), |_| "ok");
            tracing::debug!(
                session = self.id,
                uid = self.peer.uid,
                pid = self.peer.pid,
                op = %op,
                provider = provider.as_deref(),
                bucket = bucket.as_deref(),
                key = key.as_deref(),
                outcome,
                "request"
            );
        }
        if self.phase == Phase::Closing {
            return;
        }
        match result {
            Ok(data) => {
                let body = protocol::ok_reply(id, &data);
                self.send_reply(id, body);
            }
            Err(rejection) => self.reject(id, &rejection, None),
        }
        if self.phase == Phase::Draining && self.in_flight.is_empty() {
            let reason = self.close_reason;
            self.close(ctx, reason, None);
        }
    }
}

impl Actor for Session {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        tracing::debug!(
            session = self.id,
            uid = self.peer.uid,
            pid = self.peer.pid,
            "connection opened"
        );
        let timeout = self.shared.limits.handshake_timeout;
        self.handshake_timer = Some(ctx.run_later(timeout, |act, ctx| {
            act.handshake_timer = None;
            if act.phase == Phase::Handshake {
                act.close(ctx, "handshake-timeout", None);
            }
        }));
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        let abandoned = self.in_flight.len() as u64;
        tracing::debug!(
            session = self.id,
            uid = self.peer.uid,
            pid = self.peer.pid,
            reason = self.close_reason,
            answered = self.answered,
            abandoned,
            "connection closed"
        );
        self.shared.closed.do_send(SessionClosed { id: self.id });
        for waiter in self.drain_waiters.drain(..) {
            let _ = waiter.send(SessionReport {
                answered: self.answered,
                abandoned,
            });
        }
    }
}

impl StreamHandler<Result<FrameEvent, CodecError>> for Session {
    fn handle(&mut self, item: Result<FrameEvent, CodecError>, ctx: &mut Context<Self>) {
        match item {
            Ok(FrameEvent::Started) => {
                self.quiet_ticks = 0;
                let timeout = self.shared.limits.partial_frame_timeout;
                self.partial_timer = Some(ctx.run_later(timeout, |act, ctx| {
                    act.partial_timer = None;
                    tracing::debug!(session = act.id, "partial frame not completed in time");
                    act.close(ctx, "partial-frame-timeout", None);
                }));
            }
            Ok(FrameEvent::Frame(body)) => {
                self.quiet_ticks = 0;
                if let Some(timer) = self.partial_timer.take() {
                    ctx.cancel_future(timer);
                }
                self.on_frame(body, ctx);
            }
            Err(CodecError::Oversize(len)) => {
                // The stream cannot be resynchronised: read nothing more, but answer what
                // was already accepted, then close.
                tracing::warn!(session = self.id, len, "frame over the size limit; closing");
                self.drain(ctx, "oversize-frame");
            }
            Err(CodecError::Truncated) => self.drain(ctx, "eof-mid-frame"),
            Err(CodecError::Io(e)) => {
                tracing::debug!(session = self.id, error = %e, "read failed");
                self.close(ctx, "io-error", None);
            }
        }
    }

    fn finished(&mut self, ctx: &mut Context<Self>) {
        // End of stream (the read side was not cancelled by us): answer what is in flight.
        self.reader = None;
        self.drain(ctx, "eof");
    }
}

/// Told to the supervisor when a session has stopped.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct SessionClosed {
    /// The session id.
    pub id: u64,
}

/// What a drained session did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionReport {
    /// Requests answered on the connection.
    pub answered: u64,
    /// Requests still in flight when the connection was closed (past the grace time).
    pub abandoned: u64,
}

/// Shutdown step: stop reading, let the requests in flight finish for up to the grace
/// time, close. Answers when the session has stopped.
#[derive(Debug, Message)]
#[rtype(result = "SessionReport")]
pub struct Drain;

impl Handler<Drain> for Session {
    type Result = actix::ResponseFuture<SessionReport>;

    fn handle(&mut self, _: Drain, ctx: &mut Context<Self>) -> Self::Result {
        let (tx, rx) = oneshot::channel();
        self.drain_waiters.push(tx);
        self.drain(ctx, "shutdown");
        let grace = self.shared.limits.shutdown_grace;
        ctx.run_later(grace, |act, ctx| {
            act.close(ctx, "shutdown-grace-expired", None)
        });
        Box::pin(async move { rx.await.unwrap_or_default() })
    }
}

// ---- dispatch: plain async functions over typed messages ----

fn internal() -> Rejection {
    Rejection::new(
        ErrorCode::InternalError,
        "the credential store failed; see the host's log",
    )
}

fn not_found(what: &str) -> Rejection {
    Rejection::new(ErrorCode::NotFound, format!("no {what} stored"))
}

/// Asks the policy about `subject`; on `Allow` the subject comes back, so the names in it
/// move on to the store without a copy.
async fn scope(shared: &Shared, subject: Subject) -> Result<Subject, Rejection> {
    let checked = shared
        .policy
        .send(policy::Check(subject))
        .await
        .map_err(|_| internal())?;
    let subject = checked.subject;
    match checked.decision {
        Decision::Allow => Ok(subject),
        // The names are only formatted on a refusal.
        Decision::Unauthorized => Err(Rejection::new(
            ErrorCode::Unauthorized,
            format!(
                "UNAUTHORIZED: {} is outside the loaded profile",
                match &subject {
                    Subject::Read { provider, bucket } | Subject::Write { provider, bucket } => {
                        format!("{provider}:{bucket}")
                    }
                    Subject::Provider(p) => format!("provider {p}"),
                    Subject::Key(k) => format!("API key {k}"),
                }
            ),
        )),
        Decision::Forbidden => Err(Rejection::new(
            ErrorCode::Forbidden,
            "the credential proxy is read-only",
        )),
    }
}

async fn filtered(
    shared: &Shared,
    kind: ListKind,
    names: Vec<String>,
) -> Result<Vec<String>, Rejection> {
    shared
        .policy
        .send(policy::Filter { kind, names })
        .await
        .map_err(|_| internal())
}

/// The subject the policy decides on for `request` (`None` for the lists, which the
/// policy filters instead).
fn subject_of(request: &Request) -> Option<Subject> {
    Some(match request {
        Request::GetToken { provider, bucket }
        | Request::GetBucketStats { provider, bucket }
        | Request::RefreshToken { provider, bucket } => Subject::Read {
            provider: provider.clone(),
            bucket: bucket.clone(),
        },
        Request::SaveToken {
            provider, bucket, ..
        }
        | Request::RemoveToken { provider, bucket } => Subject::Write {
            provider: provider.clone(),
            bucket: bucket.clone(),
        },
        Request::ListBuckets { provider } => Subject::Provider(provider.clone()),
        Request::GetApiKey { name } | Request::HasApiKey { name } => Subject::Key(name.clone()),
        Request::ListProviders | Request::ListApiKeys => return None,
    })
}

/// True when `subject` is what the policy decides on for `request` (no copy).
fn is_subject_of(subject: &Subject, request: &Request) -> bool {
    match (subject, request) {
        (
            Subject::Read { provider, bucket },
            Request::GetToken {
                provider: p,
                bucket: b,
            }
            | Request::GetBucketStats {
                provider: p,
                bucket: b,
            }
            | Request::RefreshToken {
                provider: p,
                bucket: b,
            },
        )
        | (
            Subject::Write { provider, bucket },
            Request::SaveToken {
                provider: p,
                bucket: b,
                ..
            }
            | Request::RemoveToken {
                provider: p,
                bucket: b,
            },
        ) => provider == p && bucket == b,
        (Subject::Provider(provider), Request::ListBuckets { provider: p }) => provider == p,
        (Subject::Key(name), Request::GetApiKey { name: n } | Request::HasApiKey { name: n }) => {
            name == n
        }
        _ => false,
    }
}

/// Runs one checked request: scope (unless the session knows the policy allows its
/// subject), then the store. The flag is true when the policy answered `Allow` for the
/// request's subject during this call.
async fn execute(
    shared: Arc<Shared>,
    request: Request,
    known: bool,
) -> (Result<ReplyData, Rejection>, bool) {
    let allowed = std::cell::Cell::new(false);
    let result = run(&shared, request, known, &allowed).await;
    (result, allowed.get())
}

async fn run(
    sh: &Shared,
    request: Request,
    known: bool,
    allowed: &std::cell::Cell<bool>,
) -> Result<ReplyData, Rejection> {
    let store = &sh.store;
    let check = |subject: Subject| async move {
        if known {
            return Ok(subject);
        }
        let subject = scope(sh, subject).await?;
        allowed.set(true);
        Ok(subject)
    };
    let read = |provider, bucket| Subject::Read { provider, bucket };
    let write = |provider, bucket| Subject::Write { provider, bucket };
    match request {
        Request::GetToken { provider, bucket } => {
            let (provider, bucket) = check(read(provider, bucket)).await?.into_names();
            if is_sourced_token(sh, &provider, &bucket) {
                return sourced_token(sh, provider, bucket, false).await;
            }
            // The names are kept (copied) only for a provider that may need a refresh.
            let gate = Some(&sh.refresh).filter(|g| g.covers(&provider));
            let names = gate.map(|_| (provider.clone(), bucket.clone()));
            let token = match store.send(store::GetToken { provider, bucket }).await {
                Ok(Ok(Some(token))) => token,
                Ok(Ok(None)) => return Err(not_found("token")),
                _ => return Err(internal()),
            };
            if let (Some(gate), Some((provider, bucket))) = (gate, names) {
                let now = gate.clock.now();
                if token.has_refresh_token()
                    && crate::refresh::schedule::is_due(token.expiry(), now, gate.margin)
                {
                    return refresh(sh, provider, bucket, Reason::Due, Some(token)).await;
                }
            }
            Ok(ReplyData::Token(token))
        }
        Request::RefreshToken { provider, bucket } => {
            let (provider, bucket) = check(read(provider, bucket)).await?.into_names();
            if is_sourced_token(sh, &provider, &bucket) {
                return sourced_token(sh, provider, bucket, true).await;
            }
            refresh(sh, provider, bucket, Reason::Explicit, None).await
        }
        Request::SaveToken {
            provider,
            bucket,
            token,
        } => {
            let (provider, bucket) = check(write(provider, bucket)).await?.into_names();
            if is_sourced_token(sh, &provider, &bucket) {
                return Err(sourced_write(&provider, &bucket));
            }
            let save = store::SaveToken {
                provider,
                bucket,
                token,
            };
            let key = BucketKey {
                provider: save.provider.clone(),
                bucket: save.bucket.clone(),
            };
            match store.send(save).await {
                Ok(Ok(store::Saved::Written)) => {
                    sh.refresher.do_send(Changed { key });
                    Ok(ReplyData::Json(json!({})))
                }
                Ok(Ok(store::Saved::Invalid(e))) => {
                    Err(Rejection::new(ErrorCode::InvalidRequest, e.to_string()))
                }
                Ok(Ok(store::Saved::TooLarge)) => Err(Rejection::new(
                    ErrorCode::InvalidRequest,
                    format!(
                        "token too large: merged with the stored token it would exceed \
                         {MAX_SERVED_TOKEN_LEN} bytes and could not be served"
                    ),
                )),
                _ => Err(internal()),
            }
        }
        Request::RemoveToken { provider, bucket } => {
            let (provider, bucket) = check(write(provider, bucket)).await?.into_names();
            if is_sourced_token(sh, &provider, &bucket) {
                return Err(sourced_write(&provider, &bucket));
            }
            let key = BucketKey {
                provider: provider.clone(),
                bucket: bucket.clone(),
            };
            match store.send(store::RemoveToken { provider, bucket }).await {
                Ok(Ok(())) => {
                    sh.refresher.do_send(Changed { key });
                    Ok(ReplyData::Json(json!({})))
                }
                _ => Err(internal()),
            }
        }
        Request::ListProviders => {
            let mut all = store
                .send(store::ListProviders)
                .await
                .map_err(|_| internal())?;
            merge_names(&mut all, sh.source_index.providers());
            let providers = filtered(sh, ListKind::Providers, all).await?;
            Ok(ReplyData::Json(json!({ "providers": providers })))
        }
        Request::ListBuckets { provider } => {
            let (provider, _) = check(Subject::Provider(provider)).await?.into_names();
            let mut all = store
                .send(store::ListBuckets {
                    provider: provider.clone(),
                })
                .await
                .map_err(|_| internal())?;
            merge_names(&mut all, sh.source_index.buckets(&provider));
            let buckets = filtered(sh, ListKind::Buckets(provider), all).await?;
            Ok(ReplyData::Json(json!({ "buckets": buckets })))
        }
        Request::GetBucketStats { provider, bucket } => {
            let (provider, bucket) = check(read(provider, bucket)).await?.into_names();
            let sourced = is_sourced_token(sh, &provider, &bucket);
            match store
                .send(store::GetStats {
                    provider,
                    bucket: bucket.clone(),
                    sourced,
                })
                .await
            {
                Ok(Ok(Some(stats))) => {
                    let mut data = json!({
                        "bucket": bucket,
                        "requestCount": stats.request_count,
                        "percentage": stats.percentage,
                    });
                    if let Some(ms) = stats.last_used {
                        data["lastUsed"] = json!(ms);
                    }
                    Ok(ReplyData::Json(data))
                }
                Ok(Ok(None)) => Err(not_found("token")),
                _ => Err(internal()),
            }
        }
        Request::GetApiKey { name } => {
            let (name, _) = check(Subject::Key(name)).await?.into_names();
            if sh.source_index.has_key(&name) {
                let target = SourceTarget::Key { name };
                return match fetch(sh, target.clone(), false).await? {
                    Held::Key(key) => Ok(ReplyData::Json(json!({ "key": key.expose() }))),
                    Held::Token(_) => Err(internal()),
                };
            }
            match store.send(store::GetKey { name }).await {
                Ok(Ok(Some(key))) => Ok(ReplyData::Json(json!({ "key": key.expose() }))),
                Ok(Ok(None)) => Err(not_found("API key")),
                _ => Err(internal()),
            }
        }
        Request::ListApiKeys => {
            let mut all = store.send(store::ListKeys).await.map_err(|_| internal())?;
            merge_names(&mut all, sh.source_index.keys());
            let keys = filtered(sh, ListKind::Keys, all).await?;
            Ok(ReplyData::Json(json!({ "keys": keys })))
        }
        Request::HasApiKey { name } => {
            let (name, _) = check(Subject::Key(name)).await?.into_names();
            if sh.source_index.has_key(&name) {
                return Ok(ReplyData::Json(json!({ "exists": true })));
            }
            match store.send(store::GetKey { name }).await {
                Ok(Ok(key)) => Ok(ReplyData::Json(json!({ "exists": key.is_some() }))),
                _ => Err(internal()),
            }
        }
    }
}

/// True when provider:bucket is served by a command source.
fn is_sourced_token(sh: &Shared, provider: &str, bucket: &str) -> bool {
    !sh.source_index.is_empty() && sh.source_index.has_token(provider, bucket)
}

/// Adds the names `sources` serve to a store list, sorted, without duplicates.
fn merge_names<'a>(all: &mut Vec<String>, sources: impl Iterator<Item = &'a String>) {
    let before = all.len();
    all.extend(sources.cloned());
    if all.len() != before {
        all.sort();
        all.dedup();
    }
}

/// The refusal of a save or removal of a token a command source serves.
fn sourced_write(provider: &str, bucket: &str) -> Rejection {
    Rejection::new(
        ErrorCode::Forbidden,
        format!(
            "{provider}:{bucket} is served from a command on the host (the profile's \
             token_command); it cannot be changed from the sandbox"
        ),
    )
}

/// The value of a command source.
async fn fetch(sh: &Shared, target: SourceTarget, explicit: bool) -> Result<Held, Rejection> {
    let Some(sources) = &sh.sources else {
        return Err(internal());
    };
    let label = target.to_string();
    // A run is bounded by its own timeout; this bounds the wait whatever happens to it.
    let fetch = sources.send(Fetch { target, explicit });
    match tokio::time::timeout(SOURCE_WAIT, fetch).await {
        Err(_) => Err(Rejection::new(
            ErrorCode::RefreshFailed,
            format!("the command on the host that provides {label} did not answer in time"),
        )),
        Ok(Ok(Ok(held))) => Ok(held),
        Ok(Ok(Err(_))) => Err(Rejection::new(
            ErrorCode::RefreshFailed,
            format!(
                "the command on the host that provides {label} failed and no valid value is \
                 left; it is retried in the background (the host's log says why)"
            ),
        )),
        Ok(Err(_)) => Err(internal()),
    }
}

/// The longest a request waits for a command source (its run is bounded by 30 s).
const SOURCE_WAIT: std::time::Duration = std::time::Duration::from_secs(45);

/// `get_token` (or `refresh_token`) of a token a command source serves; counted for
/// stats like a stored one.
async fn sourced_token(
    sh: &Shared,
    provider: String,
    bucket: String,
    explicit: bool,
) -> Result<ReplyData, Rejection> {
    let target = SourceTarget::Token {
        provider: provider.clone(),
        bucket: bucket.clone(),
    };
    match fetch(sh, target, explicit).await? {
        Held::Token(token) => {
            sh.store.do_send(store::CountGet { provider, bucket });
            Ok(ReplyData::Token(token))
        }
        Held::Key(_) => Err(internal()),
    }
}

/// Refreshes `provider:bucket` through the engine (single flight) and answers as
/// PROTOCOL.md §14 says for `reason`.
async fn refresh(
    sh: &Shared,
    provider: String,
    bucket: String,
    reason: Reason,
    read: Option<crate::token::ServedToken>,
) -> Result<ReplyData, Rejection> {
    let key = BucketKey { provider, bucket };
    let output = match sh
        .refresher
        .send(Refresh {
            key: key.clone(),
            reason,
        })
        .await
    {
        Ok(output) => output,
        // The engine is gone (shutdown): the token read stands in, while valid.
        Err(_) => FlowOutput::failed_without_token(FlowError::Failed),
    };
    if output.went_upstream {
        // A read of the store begun before this refresh wrote must not answer a later
        // get_token.
        sh.store.do_send(store::Wrote);
    }
    match output.answer(reason, sh.refresh.clock.now(), read.as_ref()) {
        Ok(Some(token)) => Ok(ReplyData::Token(token)),
        Ok(None) => Err(not_found("token")),
        Err(e) => Err(refresh_rejection(e, &key)),
    }
}

/// The wire answer for a refresh that gave no token. The sentences name the
/// provider:bucket and what to do, never a cause from upstream.
fn refresh_rejection(e: FlowError, key: &BucketKey) -> Rejection {
    match e {
        FlowError::NotAvailable => Rejection::new(
            ErrorCode::RefreshNotAvailable,
            format!(
                "{key} cannot be refreshed on the host: the provider has no token endpoint \
                 configured, the stored token has no refresh token, or refresh is turned off"
            ),
        ),
        FlowError::Reauth => {
            let import = crate::import::Source::ALL
                .into_iter()
                .find(|s| s.provider() == key.provider)
                .map(|s| {
                    format!(
                        "log in with the {0} CLI, then run `credproxy store import {0} --bucket {1}`, or ",
                        s.name(),
                        key.bucket
                    )
                })
                .unwrap_or_default();
            Rejection::new(
                ErrorCode::ReauthRequired,
                format!(
                    "the host's login for {key} has expired or was revoked: log in again on \
                     the host ({import}save a new token with `credproxy store token set {} \
                     --bucket {}`)",
                    key.provider, key.bucket
                ),
            )
        }
        FlowError::Failed => Rejection::new(
            ErrorCode::RefreshFailed,
            format!("refreshing {key} failed; try again later (the host's log says why)"),
        ),
        FlowError::Store => internal(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::Token;

    fn requests() -> Vec<Request> {
        let token = || {
            Token::from_value(serde_json::json!({"access_token":"a","expiry":1,"token_type":"B"}))
                .expect("token")
        };
        let (p, b) = (|| "p".to_owned(), || "b".to_owned());
        vec![
            Request::GetToken {
                provider: p(),
                bucket: b(),
            },
            Request::GetBucketStats {
                provider: p(),
                bucket: b(),
            },
            Request::SaveToken {
                provider: p(),
                bucket: b(),
                token: token(),
            },
            Request::RemoveToken {
                provider: p(),
                bucket: b(),
            },
            Request::ListBuckets { provider: p() },
            Request::GetApiKey { name: p() },
            Request::HasApiKey { name: p() },
            Request::ListProviders,
            Request::ListApiKeys,
        ]
    }

    /// The remembered-subject check matches exactly the subject the policy was asked
    /// about: a subject remembered for one request kind never stands in for another
    /// (a read for a write, a provider for a key of the same name).
    #[test]
    fn a_remembered_subject_matches_only_its_own_kind_of_request() {
        for request in requests() {
            let Some(subject) = subject_of(&request) else {
                assert!(matches!(
                    request,
                    Request::ListProviders | Request::ListApiKeys
                ));
                continue;
            };
            for other in requests() {
                let same_subject = subject_of(&other).as_ref() == Some(&subject);
                assert_eq!(
                    is_subject_of(&subject, &other),
                    same_subject,
                    "{subject:?} against {:?}",
                    other.op()
                );
            }
        }
        let read = Subject::Read {
            provider: "p".into(),
            bucket: "other".into(),
        };
        assert!(!is_subject_of(&read, &requests()[0]), "bucket compared");
    }
}
