//! The `Session` actor: one per connection. It owns the framing and its deadlines, the
//! handshake, the connection's rate limiter and in-flight bound, and the envelope and
//! payload checks; [`ops`] runs each checked request against the `ScopePolicy`, the
//! `CredentialStore`, the `Refresher` and the command `Sources`.
//!
//! - this module: the connection (frames, deadlines, handshake, in-flight table, outbox);
//! - [`ops`]: the operations (scope, store calls, refresh and source waits, replies).
//!
//! Every request runs as its own future on the session (`ctx.spawn`), so a slow store call
//! never holds up a fast one behind it; replies go out by id as they complete. A reply
//! that ends the connection is written, then the writer is closed, and the actor stops
//! once the bytes are flushed (or after the linger time for a peer that never reads).

use std::cell::Cell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use actix::{
    Actor, ActorContext, ActorFutureExt, Addr, AsyncContext, Context, Handler, Message, Recipient,
    SpawnHandle, StreamHandler, WrapFuture,
};
use tokio::net::UnixStream;
use tokio::sync::oneshot;

use crate::capability::CapabilityDigest;
use crate::codec::{frame_limit, CodecError, MAX_FRAME_LEN};
use crate::config::Limits;
use crate::envelope::Frame;
use crate::outbox::{Outbox, UnsentBudget};
use crate::policy::{ScopePolicy, Subject};
use crate::protocol::{
    self, ErrorCode, Handshake, Op, Rejection, ReplyData, Request, HIGHEST_VERSION,
};
use crate::rate_limit::RateLimiter;
use crate::refresh::engine::Refresher;
use crate::source::engine::Sources;
use crate::source::SourceIndex;
use crate::store::{CredentialStore, WriteGate};
use reader::{Body, FrameReader, Inbound, InboundBudget, InboundPermit};

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
    /// The digest of the launch's capability token; every handshake must present the
    /// token when set (PROTOCOL.md §13).
    pub capability: Option<CapabilityDigest>,
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

/// A request in flight: its future on the session, and for a write, the gate that decides
/// between the write and a cancel.
struct Running {
    handle: SpawnHandle,
    gate: Option<WriteGate>,
}

/// The requests in flight on one connection, by id: at most
/// [`Limits::max_in_flight`] (16) entries in a short vector. A scan of so few string
/// comparisons costs less than hashing the id on every insert and removal (the request
/// path's hottest table), and the bound keeps it short whatever ids a client picks.
#[derive(Default)]
struct InFlight(Vec<(String, Option<Running>)>);

impl InFlight {
    fn len(&self) -> usize {
        self.0.len()
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn position(&self, id: &str) -> Option<usize> {
        self.0.iter().position(|(k, _)| k == id)
    }

    /// Adds `id` (not yet spawned); false when it is already in flight.
    fn insert(&mut self, id: &str) -> bool {
        if self.position(id).is_some() {
            return false;
        }
        self.0.push((id.to_owned(), None));
        true
    }

    /// Records the spawned future of the request added last.
    fn set_last(&mut self, running: Running) {
        if let Some((_, slot)) = self.0.last_mut() {
            *slot = Some(running);
        }
    }

    fn get(&self, id: &str) -> Option<&Running> {
        self.0
            .iter()
            .find(|(k, _)| k == id)
            .and_then(|(_, r)| r.as_ref())
    }

    /// Removes `id`; `None` when it was not in flight.
    fn remove(&mut self, id: &str) -> Option<Option<Running>> {
        let at = self.position(id)?;
        Some(self.0.swap_remove(at).1)
    }
}

/// The server-wide budgets a session draws on.
#[derive(Debug, Clone)]
pub struct Budgets {
    /// Unsent reply bytes (see [`crate::outbox`]).
    pub unsent: Rc<UnsentBudget>,
    /// Large request frames (see [`reader`]).
    pub inbound: Rc<InboundBudget>,
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
    /// The negotiated version; 0 until the handshake is done.
    version: i64,
    /// The connection's frame limit, shared with the reader: raised at a version-2
    /// handshake.
    limit: Rc<Cell<usize>>,
    handshake_timer: Option<SpawnHandle>,
    partial_timer: Option<SpawnHandle>,
    /// Ticks at a quarter of [`Limits::idle_timeout`] once the handshake is done.
    idle_timer: Option<SpawnHandle>,
    /// Idle-timer ticks since the last byte received with nothing in flight; reset by
    /// every frame start and frame (one store, nothing per request beyond it).
    quiet_ticks: u8,
    limiter: RateLimiter,
    /// The requests in flight by id, for the in-flight bound, duplicate ids and `cancel`.
    in_flight: InFlight,
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
    /// `budgets` are the server's, shared by every session.
    pub fn spawn(
        stream: UnixStream,
        id: u64,
        peer: Peer,
        shared: Arc<Shared>,
        budgets: Budgets,
    ) -> Addr<Session> {
        Session::create(move |ctx| Session::new(stream, id, peer, shared, budgets, ctx))
    }

    fn new(
        stream: UnixStream,
        id: u64,
        peer: Peer,
        shared: Arc<Shared>,
        budgets: Budgets,
        ctx: &mut Context<Session>,
    ) -> Session {
        let (read, write) = stream.into_split();
        let outbox = Outbox::new(budgets.unsent);
        let limit = Rc::new(Cell::new(MAX_FRAME_LEN));
        let frames = FrameReader::new(read, Rc::clone(&limit), budgets.inbound);
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
            version: 0,
            limit,
            handshake_timer: None,
            partial_timer: None,
            idle_timer: None,
            quiet_ticks: 0,
            limiter: RateLimiter::new(limits.rate_limit, limits.rate_window),
            in_flight: InFlight::default(),
            allowed: Vec::new(),
            close_reason: "eof",
            answered: 0,
            drain_waiters: Vec::new(),
            shared,
        }
    }

    /// The `v` of replies: the negotiated version, or the highest before the handshake
    /// (PROTOCOL.md §13).
    fn v(&self) -> i64 {
        if self.version == 0 {
            HIGHEST_VERSION
        } else {
            self.version
        }
    }

    /// Frames and queues `body`, then wipes it (it may hold a secret). The caller checks
    /// the size against the connection's limit first.
    fn send(&mut self, mut body: Vec<u8>) {
        self.outbox.push_frame(&body);
        zeroize::Zeroize::zeroize(&mut body);
    }

    /// Sends a reply to request `id`, replacing one that would exceed the connection's
    /// frame limit by `RESPONSE_TOO_LARGE` (PROTOCOL.md §3, §13); the connection stays.
    fn send_reply(&mut self, id: &str, body: Vec<u8>) {
        if body.len() > self.limit.get() {
            let mut body = body;
            let len = body.len();
            zeroize::Zeroize::zeroize(&mut body);
            tracing::warn!(
                session = self.id,
                version = self.version,
                len,
                "reply over the connection's frame limit replaced by RESPONSE_TOO_LARGE"
            );
            let message = if self.version >= 2 {
                "the reply would exceed the frame limit of 4 MiB"
            } else {
                "the reply would exceed the version-1 frame limit of 65536 bytes; \
                 a client that speaks protocol version 2 can receive it"
            };
            let r = Rejection::new(ErrorCode::ResponseTooLarge, message);
            self.reject(id, &r, None);
        } else {
            self.send(body);
        }
    }

    fn reject(&mut self, id: &str, rejection: &Rejection, retry_after: Option<u64>) {
        let body = protocol::error_reply(
            self.v(),
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

    fn on_frame(&mut self, body: Body, ctx: &mut Context<Self>) {
        let (bytes, permit) = match body {
            Body::Small(bytes) => (BodyBytes::Shared(bytes), None),
            Body::Large(bytes, permit) => (BodyBytes::Owned(bytes), Some(permit)),
        };
        let frame = match protocol::parse_frame(bytes.as_slice()) {
            Ok(frame) => frame,
            Err(message) => {
                tracing::debug!(session = self.id, "malformed frame; closing");
                let last = protocol::error_reply(
                    self.v(),
                    None,
                    None,
                    ErrorCode::InvalidRequest,
                    message,
                    None,
                );
                return self.close(ctx, "malformed-frame", Some(last));
            }
        };
        match self.phase {
            Phase::Handshake => self.on_handshake(&frame, ctx),
            Phase::Ready => self.on_request(frame, permit, ctx),
            // Frames already buffered when draining began are not executed.
            Phase::Draining | Phase::Closing => {}
        }
    }

    fn on_handshake(&mut self, frame: &Frame<'_>, ctx: &mut Context<Self>) {
        let (code, message, reason) =
            match protocol::negotiate(frame, self.shared.capability.as_ref()) {
                Handshake::Agreed(version) => {
                    if let Some(timer) = self.handshake_timer.take() {
                        ctx.cancel_future(timer);
                    }
                    self.phase = Phase::Ready;
                    self.version = version;
                    self.limit.set(frame_limit(version));
                    self.start_idle_timer(ctx);
                    tracing::debug!(session = self.id, version, "handshake done");
                    return self.send(protocol::handshake_ok(version));
                }
                Handshake::Unauthorized => {
                    // The peer only: neither the presented text nor the token is logged.
                    tracing::warn!(
                        session = self.id,
                        uid = self.peer.uid,
                        pid = self.peer.pid,
                        "handshake without this server's capability token refused"
                    );
                    (
                        ErrorCode::Unauthorized,
                        "UNAUTHORIZED: this credential proxy requires its capability token, \
                     and the handshake did not present it",
                        "bad-capability-token",
                    )
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
        let last = protocol::error_reply(
            HIGHEST_VERSION,
            None,
            Some("handshake"),
            code,
            message,
            None,
        );
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

    /// Runs the checks of PROTOCOL.md §5 in order, then spawns the operation. `permit`
    /// is a large frame's share of the inbound budget: it stays with the request until
    /// the request is answered or cancelled.
    fn on_request(
        &mut self,
        frame: Frame<'_>,
        permit: Option<InboundPermit>,
        ctx: &mut Context<Self>,
    ) {
        let envelope = match protocol::parse_envelope(frame) {
            Ok(envelope) => envelope,
            Err((id, rejection)) => return self.refuse(&id, &rejection, None),
        };
        let id = envelope.id;
        if let Err(retry_after) = self.limiter.check(Instant::now()) {
            let r = Rejection::new(ErrorCode::RateLimited, "rate limit exceeded; retry later");
            return self.refuse(&id, &r, Some(retry_after));
        }
        // `cancel` counts toward the rate limit but not toward the in-flight bound, and
        // is exempt from the duplicate-id check (§13).
        if envelope.op == Op::Cancel.as_str() {
            return match Request::parse(Op::Cancel, envelope.payload) {
                Ok(Request::Cancel { target_id }) => self.cancel(&id, &target_id, ctx),
                Ok(_) => {}
                Err(rejection) => self.refuse(&id, &rejection, None),
            };
        }
        if self.in_flight.len() >= self.shared.limits.max_in_flight {
            let r = Rejection::new(
                ErrorCode::ResourceExhausted,
                "too many requests in flight on this connection",
            );
            return self.refuse(&id, &r, None);
        }
        // One scan for the duplicate check and the insert; undone if the request fails.
        if !self.in_flight.insert(&id) {
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
        let gate = matches!(op, Op::SaveToken | Op::RemoveToken).then(WriteGate::default);
        let work = execute(Arc::clone(&self.shared), request, known, gate.clone());
        let handle = ctx.spawn(
            work.into_actor(self)
                .map(move |(result, allowed), act, ctx| {
                    drop(permit);
                    // Remembered only when the policy itself answered Allow for this subject.
                    if let Some(subject) = remember.filter(|_| allowed) {
                        if act.allowed.len() < MAX_REMEMBERED && !act.allowed.contains(&subject) {
                            act.allowed.push(subject);
                        }
                    }
                    act.finish(&id, op, target, result, ctx);
                }),
        );
        // `ctx.spawn` only queues the future: this request's entry is still the last one.
        self.in_flight.set_last(Running { handle, gate });
    }

    /// `cancel` (PROTOCOL.md §13): a request of this connection still in flight is
    /// stopped and answered `CANCELLED`, and nothing else is ever sent for its id; a
    /// write that has begun is not stopped (it is applied whole, and answers for itself),
    /// so the cancel answers `false`, as for a request already answered or never seen.
    fn cancel(&mut self, id: &str, target_id: &str, ctx: &mut Context<Self>) {
        let cancelled = match self.in_flight.get(target_id) {
            Some(running) => running.gate.as_ref().is_none_or(WriteGate::cancel),
            None => false,
        };
        if cancelled {
            if let Some(Some(running)) = self.in_flight.remove(target_id) {
                // Dropping the request's future ends its waits: a store read, a refresh or
                // a command source it waited on goes on for everyone else.
                ctx.cancel_future(running.handle);
            }
            self.answered += 1;
            tracing::debug!(
                session = self.id,
                uid = self.peer.uid,
                pid = self.peer.pid,
                outcome = ErrorCode::Cancelled.as_str(),
                "request cancelled"
            );
            let r = Rejection::new(
                ErrorCode::Cancelled,
                "the request was cancelled by the client",
            );
            self.reject(target_id, &r, None);
        }
        let data = ReplyData::Json(serde_json::json!({ "cancelled": cancelled }));
        let body = protocol::ok_reply(self.v(), id, &data);
        self.send(body);
    }

    fn finish(
        &mut self,
        id: &str,
        op: Op,
        target: Option<[Option<String>; 3]>,
        result: Result<ReplyData, Rejection>,
        ctx: &mut Context<Self>,
    ) {
        if self.in_flight.remove(id).is_none() {
            // Cancelled meanwhile: its one reply was `CANCELLED`.
            return;
        }
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
                let body = protocol::ok_reply(self.v(), id, &data);
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

impl StreamHandler<Result<Inbound, CodecError>> for Session {
    fn handle(&mut self, item: Result<Inbound, CodecError>, ctx: &mut Context<Self>) {
        match item {
            Ok(Inbound::Started) => {
                self.quiet_ticks = 0;
                let timeout = self.shared.limits.partial_frame_timeout;
                self.partial_timer = Some(ctx.run_later(timeout, |act, ctx| {
                    act.partial_timer = None;
                    tracing::debug!(session = act.id, "partial frame not completed in time");
                    act.close(ctx, "partial-frame-timeout", None);
                }));
            }
            Ok(Inbound::Frame(body)) => {
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

/// A frame's bytes while it is parsed, wiped afterwards: the handshake's capability
/// token, a `save_token`'s access token and whatever else a client sent do not stay in
/// the read buffer's memory.
enum BodyBytes {
    Shared(bytes::BytesMut),
    Owned(Vec<u8>),
}

impl BodyBytes {
    fn as_slice(&self) -> &[u8] {
        match self {
            BodyBytes::Shared(b) => b,
            BodyBytes::Owned(v) => v,
        }
    }
}

impl Drop for BodyBytes {
    fn drop(&mut self) {
        match self {
            // Every request's frame: one memset (`zeroize` writes a byte at a time), kept
            // from being elided by `black_box`, since the region is freed right after.
            BodyBytes::Shared(b) => {
                b.fill(0);
                std::hint::black_box(&b[..]);
            }
            BodyBytes::Owned(v) => zeroize::Zeroize::zeroize(v),
        }
    }
}

pub mod ops;
pub mod reader;

use ops::{execute, is_subject_of, subject_of};
