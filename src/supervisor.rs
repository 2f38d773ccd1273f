//! The `Supervisor` actor: owns the socket. It prepares the directory, binds the socket
//! 0600, sweeps stale sockets, accepts, checks each peer, spawns one `Session` per
//! connection, keeps the registry, and runs the shutdown sequence.
//!
//! [`Supervisor::start`] is the entry point of a host program. It runs the actor system on
//! a dedicated thread (so it works from a plain `fn main`, inside a tokio program and
//! inside an actix System alike), returns once the socket is listening, and hands back a
//! [`ServerHandle`].
//!
//! Shutdown sequence (PROTOCOL.md §12; ARCHITECTURE.md keeps the same numbered list):
//! 1. stop accepting: the listener is dropped, new connections are refused;
//! 2. every session stops reading and lets its requests in flight finish, for up to the
//!    shutdown grace time;
//! 3. every connection is closed (after its last reply is flushed);
//! 4. every timer is cancelled (they belong to the sessions, which have stopped);
//! 5. the `CredentialStore` wipes every secret it holds and stops, then the `ScopePolicy`
//!    forgets the profile and stops;
//! 6. the socket file is removed (the per-user directory stays);
//! 7. the [`ShutdownReport`] is returned and the actor system ends.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use actix::{
    Actor, ActorContext, ActorFutureExt, Addr, AsyncContext, Context, Handler, Message,
    ResponseActFuture, SpawnHandle, StreamHandler, WrapFuture,
};
use futures_util::future::join_all;
use futures_util::Stream;
use nix::unistd::geteuid;
use tokio::net::{UnixListener, UnixStream};
use tokio::time::Sleep;

use crate::config::{Config, Limits};
use crate::error::{Error, Result};
use crate::outbox::UnsentBudget;
use crate::policy::{self, ScopePolicy};
use crate::refresh::engine::{self, Refresher};
use crate::session::reader::InboundBudget;
use crate::session::{self, Budgets, Peer, RefreshGate, Session, SessionClosed, Shared};
use crate::socket;
use crate::source::engine::{Sources, StopSources};
use crate::source::{SourceIndex, SourceTarget};
use crate::store::{self, CredentialStore};

/// The supervisor actor. Named like actix's own `Supervisor`: do not glob-import
/// `actix::prelude` next to it.
pub struct Supervisor {
    path: PathBuf,
    inode: u64,
    listener: Option<UnixListener>,
    accept: Option<SpawnHandle>,
    allowed_uids: Vec<u32>,
    limits: Limits,
    store: Addr<CredentialStore>,
    policy: Addr<ScopePolicy>,
    refresher: Addr<Refresher>,
    refresh_gate: RefreshGate,
    sources: Option<Addr<Sources>>,
    source_index: Arc<SourceIndex>,
    shared: Option<Arc<Shared>>,
    sessions: HashMap<u64, Addr<Session>>,
    next_id: u64,
    rejected_peers: u64,
    /// Unsent reply bytes across every session (see [`crate::outbox`]), and large request
    /// frames held (see [`crate::session::reader`]).
    budgets: Budgets,
    /// The digest of the launch's capability token (PROTOCOL.md §13).
    capability: Option<crate::capability::CapabilityDigest>,
    /// The connection cap in force (see [`Limits::connection_cap`]).
    connection_cap: usize,
    /// The per-process cap in force (see [`Limits::per_pid_cap`]).
    per_pid_cap: usize,
    /// Peer pid of each session that has one, and open sessions per pid, for
    /// [`Limits::max_connections_per_pid`].
    session_pids: HashMap<u64, i32>,
    per_pid: HashMap<i32, usize>,
    /// Connections refused by the caps over the server's life.
    refused_connections: u64,
    /// Refusals not yet logged, and when the last refusal warning went out: one warning
    /// per burst, not one per connection.
    refused_unlogged: u64,
    last_refusal_log: Option<std::time::Instant>,
    shutting_down: bool,
    /// See [`Config::release_memory_when_idle`].
    release_memory_when_idle: bool,
    /// The idle tidy-up is scheduled.
    tidy_pending: bool,
    /// When memory was last given back.
    last_release: Option<std::time::Instant>,
}

impl std::fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervisor")
            .field("path", &self.path)
            .field("sessions", &self.sessions.len())
            .finish_non_exhaustive()
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (what OpenSSH's sshd does not need
/// but any server holding many sockets does); a failure only leaves the lower cap.
fn raise_nofile_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::debug!(error = %e, soft, hard, "cannot raise RLIMIT_NOFILE");
            }
        }
        Ok(_) => {}
        Err(e) => tracing::debug!(error = %e, "cannot read RLIMIT_NOFILE"),
    }
}

/// Says at start which stored tokens and keys a command source hides.
fn warn_shadowed(backend: &dyn crate::backend::Backend, sources: &[crate::source::SourceSpec]) {
    for spec in sources {
        let shadowed = match &spec.target {
            SourceTarget::Token { provider, bucket } => backend
                .list_buckets(provider)
                .is_ok_and(|b| b.iter().any(|x| x == bucket)),
            SourceTarget::Key { name } => backend
                .list_keys()
                .is_ok_and(|k| k.iter().any(|x| x == name)),
        };
        if shadowed {
            tracing::warn!(source = %spec.target, "a command source shadows the stored credential of the same name; the store's is not served while the source is configured");
        }
        tracing::info!(source = %spec.target, program = %spec.command[0], "command source configured");
    }
}

/// At most one "connections refused" warning per this interval.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Extra time shutdown waits for sessions beyond their own grace and linger timers.
const DRAIN_MARGIN: Duration = Duration::from_millis(500);

/// What the shutdown sequence did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Connections open when shutdown began, all closed now.
    pub connections_closed: usize,
    /// Requests answered on those connections (including during the grace time).
    pub requests_answered: u64,
    /// Requests abandoned because the grace time ran out.
    pub requests_abandoned: u64,
    /// The refresh engine cancelled its timers and stopped.
    pub refresher_stopped: bool,
    /// Refreshes still running when the grace time ran out, abandoned.
    pub refreshes_abandoned: u64,
    /// The credential store was wiped and stopped.
    pub store_cleared: bool,
    /// The command sources' values were wiped, their commands killed and timers
    /// cancelled (true when there were none).
    pub sources_cleared: bool,
    /// The policy was cleared and stopped.
    pub policy_cleared: bool,
    /// The socket file was removed.
    pub socket_removed: bool,
    /// Connections refused by the peer check over the server's life.
    pub peers_refused: u64,
    /// Connections refused by the connection caps over the server's life.
    pub connections_refused: u64,
    /// The socket path.
    pub socket_path: PathBuf,
}

impl Supervisor {
    /// Starts the proxy and returns once the socket is listening. A directory, path or
    /// bind failure is returned here, before the host spawns any sandbox.
    ///
    /// This inherent function is unrelated to `actix::Supervisor` and to
    /// `Actor::start(self)`; path syntax (`Supervisor::start(config)`) resolves to it.
    pub fn start(config: Config) -> Result<ServerHandle> {
        if config.harden_process {
            crate::harden::process();
        }
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("credproxy".into())
            .spawn(move || {
                let system = actix::System::new();
                match system.block_on(async { Supervisor::launch(config) }) {
                    Ok(started) => {
                        let _ = tx.send(Ok(started));
                        let _ = system.run();
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                }
            })
            .map_err(|source| Error::Io {
                what: "cannot start the credential proxy thread".into(),
                source,
            })?;
        match rx.recv() {
            Ok(Ok((addr, path))) => Ok(ServerHandle {
                addr,
                path,
                thread: Some(thread),
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                Err(Error::NotRunning)
            }
        }
    }

    /// Prepares the socket and starts the actors on the current System.
    fn launch(config: Config) -> Result<(Addr<Supervisor>, PathBuf)> {
        let dir = match &config.socket_dir {
            Some(dir) => {
                socket::check_caller_dir(dir)?;
                dir.clone()
            }
            None => {
                let dir = socket::default_dir()?;
                socket::prepare_default_dir(&dir)?;
                dir
            }
        };
        let path = socket::socket_path(&dir)?;
        let (std_listener, inode) = socket::bind(&path)?;
        socket::sweep_stale(&dir, &path);
        let listener = UnixListener::from_std(std_listener).map_err(|source| Error::Bind {
            path: path.clone(),
            source,
        })?;
        if config.profile.allows_nothing() {
            tracing::warn!("the profile allows nothing: every credential request will be refused (use --allow, --allow-key or --allow-all)");
        }
        let euid = geteuid().as_raw();
        let mut allowed_uids = vec![euid, 0];
        allowed_uids.extend(&config.extra_uids);
        if config.limits.raise_nofile_limit {
            raise_nofile_limit();
        }
        let connection_cap = config.limits.connection_cap();
        tracing::debug!(connection_cap, "connection cap");
        let per_pid_cap = config.limits.per_pid_cap(connection_cap);
        let refresh_gate = RefreshGate {
            enabled: config.refresh.settings.enabled,
            providers: Arc::new(config.refresh.endpoints.keys().cloned().collect()),
            margin: config.refresh.settings.margin,
            clock: config.refresh.clock.clone(),
        };
        let source_index = Arc::new(SourceIndex::new(&config.sources));
        warn_shadowed(config.backend.as_ref(), &config.sources);
        let sources = (!config.sources.is_empty()).then(|| {
            Sources::new(
                config.sources.clone(),
                config.source_settings,
                config.refresh.settings,
                config.refresh.clock.clone(),
            )
            .start()
        });
        let refresher = Refresher::with_sources(
            Arc::clone(&config.backend),
            config.profile.clone(),
            config.refresh,
            (*source_index).clone(),
        )
        .start();
        let store = CredentialStore::new(config.backend, config.limits.store_timeout).start();
        let policy = ScopePolicy::new(config.profile).start();
        let budgets = Budgets {
            unsent: UnsentBudget::new(config.limits.max_unsent_total),
            inbound: InboundBudget::new(config.limits.max_large_frames_total),
        };
        let supervisor = Supervisor {
            path: path.clone(),
            inode,
            listener: Some(listener),
            accept: None,
            allowed_uids,
            limits: config.limits,
            store,
            policy,
            refresher,
            refresh_gate,
            sources,
            source_index,
            shared: None,
            sessions: HashMap::new(),
            next_id: 0,
            rejected_peers: 0,
            budgets,
            capability: config.capability,
            connection_cap,
            per_pid_cap,
            session_pids: HashMap::new(),
            per_pid: HashMap::new(),
            refused_connections: 0,
            refused_unlogged: 0,
            last_refusal_log: None,
            shutting_down: false,
            release_memory_when_idle: config.release_memory_when_idle,
            tidy_pending: false,
            last_release: None,
        }
        .start();
        tracing::info!(socket = %path.display(), "credential proxy listening");
        Ok((supervisor, path))
    }

    /// Refuses a connection over a cap: one handshake error frame written without waiting
    /// (a fresh socket's send buffer always takes it; if not, nothing is sent), then the
    /// stream is dropped, so the client sees the reason and EOF at once instead of hanging
    /// in the listen backlog, which is what not accepting would do. Logged once per burst:
    /// a warning at most every [`REFUSAL_LOG_INTERVAL`] with the count since the last one.
    fn refuse_connection(&mut self, stream: UnixStream, peer: &Peer, per_pid: bool) {
        self.refused_connections += 1;
        self.refused_unlogged += 1;
        let message = if per_pid {
            "too many connections from this process"
        } else {
            "too many connections"
        };
        let body = crate::protocol::error_reply(
            crate::protocol::HIGHEST_VERSION,
            None,
            Some("handshake"),
            crate::protocol::ErrorCode::ResourceExhausted,
            message,
            None,
        );
        let mut frame = Vec::with_capacity(4 + body.len());
        frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
        frame.extend_from_slice(&body);
        let _ = stream.try_write(&frame);
        drop(stream);
        let now = std::time::Instant::now();
        if self
            .last_refusal_log
            .is_none_or(|t| now.duration_since(t) >= REFUSAL_LOG_INTERVAL)
        {
            tracing::warn!(
                refused = self.refused_unlogged,
                open = self.sessions.len(),
                cap = self.connection_cap,
                per_pid_cap = self.per_pid_cap,
                last_uid = peer.uid,
                last_pid = peer.pid,
                "connections refused: over the connection cap"
            );
            self.refused_unlogged = 0;
            self.last_refusal_log = Some(now);
        }
    }

    /// The peer check of PROTOCOL.md §2. On Linux `SO_PEERCRED` is a gate: our euid, root
    /// or a configured uid. Elsewhere (macOS: uids and pids across the Docker Desktop VM
    /// boundary mean nothing) it is only logged; the 0700 directory, the 0600 socket and
    /// the nonce are the defence there.
    fn peer_allowed(&self, peer: &Peer) -> bool {
        if cfg!(target_os = "linux") {
            self.allowed_uids.contains(&peer.uid)
        } else {
            tracing::debug!(
                uid = peer.uid,
                pid = peer.pid,
                "peer (not a gate on this platform)"
            );
            true
        }
    }
}

impl Actor for Supervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.shared = Some(Arc::new(Shared {
            store: self.store.clone(),
            policy: self.policy.clone(),
            closed: ctx.address().recipient(),
            limits: self.limits.clone(),
            refresher: self.refresher.clone(),
            refresh: self.refresh_gate.clone(),
            sources: self.sources.clone(),
            source_index: Arc::clone(&self.source_index),
            capability: self.capability.clone(),
        }));
        if let Some(listener) = self.listener.take() {
            let stream = AcceptStream {
                listener,
                pause: None,
                backoff: self.limits.accept_backoff_min,
                min: self.limits.accept_backoff_min,
                max: self.limits.accept_backoff_max,
            };
            self.accept = Some(ctx.add_stream(stream));
        }
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        // The socket goes whatever way we stop; Shutdown already removed it normally.
        socket::remove_socket(&self.path, self.inode);
        actix::System::current().stop();
    }
}

impl StreamHandler<UnixStream> for Supervisor {
    fn handle(&mut self, stream: UnixStream, _: &mut Context<Self>) {
        let peer = match stream.peer_cred() {
            Ok(cred) => Peer {
                uid: cred.uid(),
                pid: cred.pid(),
            },
            Err(e) => {
                tracing::warn!(error = %e, "cannot read peer credentials; connection dropped");
                return;
            }
        };
        if !self.peer_allowed(&peer) {
            self.rejected_peers += 1;
            tracing::warn!(
                uid = peer.uid,
                pid = peer.pid,
                "connection from a foreign uid refused"
            );
            return;
        }
        let pid = peer.pid.filter(|&p| p > 0);
        let over_pid =
            pid.is_some_and(|p| self.per_pid.get(&p).copied().unwrap_or(0) >= self.per_pid_cap);
        if self.sessions.len() >= self.connection_cap || over_pid {
            return self.refuse_connection(stream, &peer, over_pid);
        }
        let Some(shared) = self.shared.clone() else {
            return;
        };
        self.next_id += 1;
        let id = self.next_id;
        if let Some(p) = pid {
            *self.per_pid.entry(p).or_default() += 1;
            self.session_pids.insert(id, p);
        }
        self.sessions.insert(
            id,
            Session::spawn(stream, id, peer, shared, self.budgets.clone()),
        );
    }

    fn finished(&mut self, _: &mut Context<Self>) {
        // The accept stream never ends by itself; it is only cancelled by Shutdown.
    }
}

/// How long the server must have had no connection before the idle tidy-up runs: a
/// client that connects once per command must not pay for a trim every time.
const IDLE_TIDY_DELAY: Duration = Duration::from_millis(250);

/// Memory is given back at most this often, however often a client makes the server
/// idle (a sandbox that connects and disconnects in a loop).
const MIN_RELEASE_INTERVAL: Duration = Duration::from_secs(2);

impl Handler<SessionClosed> for Supervisor {
    type Result = ();

    fn handle(&mut self, msg: SessionClosed, ctx: &mut Context<Self>) {
        self.sessions.remove(&msg.id);
        if let Some(p) = self.session_pids.remove(&msg.id) {
            if let Some(n) = self.per_pid.get_mut(&p) {
                *n -= 1;
                if *n == 0 {
                    self.per_pid.remove(&p);
                }
            }
        }
        if self.sessions.is_empty() && !self.tidy_pending && !self.shutting_down {
            self.tidy_pending = true;
            ctx.run_later(IDLE_TIDY_DELAY, |act, ctx| act.tidy_if_idle(ctx));
        }
    }
}

impl Supervisor {
    /// After a burst of connections: the session table keeps the capacity of its peak
    /// unless shrunk, and glibc keeps freed pages (see [`crate::memory`]).
    fn tidy_if_idle(&mut self, ctx: &mut Context<Self>) {
        self.tidy_pending = false;
        if !self.sessions.is_empty() || self.shutting_down {
            return;
        }
        self.sessions.shrink_to_fit();
        if !self.release_memory_when_idle {
            return;
        }
        let since = self.last_release.map(|t| t.elapsed());
        if let Some(wait) = since.and_then(|s| MIN_RELEASE_INTERVAL.checked_sub(s)) {
            // Too soon after the last one: try again when the interval is over.
            self.tidy_pending = true;
            ctx.run_later(wait, |act, ctx| act.tidy_if_idle(ctx));
            return;
        }
        self.last_release = Some(std::time::Instant::now());
        let released = crate::memory::release_free_memory();
        tracing::debug!(released, "idle: freed memory returned to the system");
    }
}

/// Asks how many sessions are open (for tests and monitoring).
#[derive(Debug, Message)]
#[rtype(result = "usize")]
pub struct SessionCount;

impl Handler<SessionCount> for Supervisor {
    type Result = usize;

    fn handle(&mut self, _: SessionCount, _: &mut Context<Self>) -> usize {
        self.sessions.len()
    }
}

/// Asks how many reply bytes are queued unsent across every session (for tests and
/// monitoring; see [`crate::Limits::max_unsent_total`]).
#[derive(Debug, Message)]
#[rtype(result = "usize")]
pub struct UnsentBytes;

impl Handler<UnsentBytes> for Supervisor {
    type Result = usize;

    fn handle(&mut self, _: UnsentBytes, _: &mut Context<Self>) -> usize {
        self.budgets.unsent.total()
    }
}

/// Asks how many bytes of large request frames are held now, and the most held at once
/// since the start (for tests and measurements; see
/// [`crate::Limits::max_large_frames_total`]).
#[derive(Debug, Message)]
#[rtype(result = "(usize, usize)")]
pub struct LargeFrameBytes;

impl Handler<LargeFrameBytes> for Supervisor {
    type Result = actix::MessageResult<LargeFrameBytes>;

    fn handle(&mut self, _: LargeFrameBytes, _: &mut Context<Self>) -> Self::Result {
        let inbound = &self.budgets.inbound;
        actix::MessageResult((inbound.held(), inbound.peak()))
    }
}

/// Runs the shutdown sequence (see the module doc) and answers with its report. A second
/// `Shutdown` while one runs gets an empty report.
#[derive(Debug, Message)]
#[rtype(result = "ShutdownReport")]
pub struct Shutdown;

impl Handler<Shutdown> for Supervisor {
    type Result = ResponseActFuture<Self, ShutdownReport>;

    fn handle(&mut self, _: Shutdown, ctx: &mut Context<Self>) -> Self::Result {
        if self.shutting_down {
            return Box::pin(actix::fut::ready(ShutdownReport::default()));
        }
        self.shutting_down = true;
        tracing::info!(sessions = self.sessions.len(), "shutdown: stop accepting");
        // 1. stop accepting: cancelling the stream drops the listener.
        if let Some(handle) = self.accept.take() {
            ctx.cancel_future(handle);
        }
        self.listener = None;
        // 2-4. drain and close every session (each bounds itself by the grace time).
        let sessions: Vec<_> = self.sessions.values().cloned().collect();
        let count = sessions.len();
        let drained = join_all(sessions.into_iter().map(|s| s.send(session::Drain)));
        // A session paused by write backpressure (a peer that never reads) cannot even
        // take its Drain; do not wait for it past the grace time. It is dropped with the
        // System at step 7.
        let wait = self.limits.shutdown_grace + self.limits.close_linger + DRAIN_MARGIN;
        let drained = tokio::time::timeout(wait, drained);
        let (store, policy) = (self.store.clone(), self.policy.clone());
        let sources = self.sources.clone();
        // 2 (refresh): the scan and the renewal timers stop at once; refreshes in flight
        // share the sessions' grace time, alongside the drain.
        // The engine gives up a little before the sessions do, so that a request waiting
        // on an abandoned refresh is still answered (REFRESH_FAILED) before its
        // connection closes.
        let grace = self.limits.shutdown_grace;
        let refresher = self.refresher.send(engine::Stop {
            grace: grace.saturating_sub((grace / 5).min(Duration::from_secs(1))),
        });
        let work = async move {
            let mut report = ShutdownReport {
                connections_closed: count,
                ..ShutdownReport::default()
            };
            let (drained, refresher) = tokio::join!(drained, refresher);
            match refresher {
                Ok(abandoned) => {
                    report.refresher_stopped = true;
                    report.refreshes_abandoned = abandoned;
                }
                Err(_) => tracing::warn!("the refresh engine did not answer the shutdown"),
            }
            match drained {
                Ok(results) => {
                    for r in results.into_iter().flatten() {
                        report.requests_answered += r.answered;
                        report.requests_abandoned += r.abandoned;
                    }
                }
                Err(_) => tracing::warn!("some sessions did not drain in time; dropping them"),
            }
            // 5. wipe the store and the sources' values, then the policy.
            report.store_cleared = store.send(store::Clear).await.is_ok();
            report.sources_cleared = match sources {
                Some(sources) => sources.send(StopSources).await.is_ok(),
                None => true,
            };
            report.policy_cleared = policy.send(policy::Clear).await.is_ok();
            report
        };
        Box::pin(work.into_actor(self).map(|mut report, act, ctx| {
            // 6. remove the socket file; 7. report, and stop (which ends the System).
            report.socket_removed = socket::remove_socket(&act.path, act.inode);
            report.peers_refused = act.rejected_peers;
            report.connections_refused = act.refused_connections;
            report.socket_path = act.path.clone();
            tracing::info!(?report, "shutdown complete");
            ctx.stop();
            report
        }))
    }
}

/// The listener as a stream of accepted connections. A failed accept (EMFILE, ENFILE,
/// ENOMEM, ...) is logged and pauses accepting for a backoff that doubles from `min` to
/// `max`, so a persistent error cannot spin the thread; a success resets it.
struct AcceptStream {
    listener: UnixListener,
    pause: Option<Pin<Box<Sleep>>>,
    backoff: Duration,
    min: Duration,
    max: Duration,
}

impl Stream for AcceptStream {
    type Item = UnixStream;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<UnixStream>> {
        let this = &mut *self;
        loop {
            if let Some(pause) = this.pause.as_mut() {
                if pause.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                this.pause = None;
            }
            match this.listener.poll_accept(cx) {
                Poll::Ready(Ok((stream, _))) => {
                    this.backoff = this.min;
                    return Poll::Ready(Some(stream));
                }
                Poll::Ready(Err(e)) if is_transient(&e) => continue,
                Poll::Ready(Err(e)) => {
                    tracing::warn!(error = %e, backoff_ms = this.backoff.as_millis() as u64, "accept failed; pausing");
                    this.pause = Some(Box::pin(tokio::time::sleep(this.backoff)));
                    this.backoff = (this.backoff * 2).min(this.max);
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted | io::ErrorKind::Interrupted
    )
}

/// A running proxy, returned by [`Supervisor::start`]. Dropping it shuts the proxy down.
#[derive(Debug)]
pub struct ServerHandle {
    addr: Addr<Supervisor>,
    path: PathBuf,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ServerHandle {
    /// The socket's absolute path (what `LLXPRT_CREDENTIAL_SOCKET` should say).
    pub fn socket_path(&self) -> &Path {
        &self.path
    }

    /// The supervisor's address, to send it messages from any executor.
    pub fn addr(&self) -> &Addr<Supervisor> {
        &self.addr
    }

    /// Runs the shutdown sequence and waits until the proxy's thread has ended. For async
    /// callers (any executor).
    pub async fn shutdown(mut self) -> Result<ShutdownReport> {
        let report = self
            .addr
            .send(Shutdown)
            .await
            .map_err(|_| Error::NotRunning);
        let thread = self.thread.take();
        // The System stops right after the reply; joining only waits for the thread to exit.
        if let Some(thread) = thread {
            let (tx, rx) = tokio::sync::oneshot::channel();
            std::thread::spawn(move || {
                let _ = tx.send(thread.join());
            });
            let _ = rx.await;
        }
        report
    }

    /// [`ServerHandle::shutdown`] for synchronous callers. Do not call it on an async
    /// executor's thread; await `shutdown()` there.
    pub fn shutdown_blocking(self) -> Result<ShutdownReport> {
        futures_executor::block_on(self.shutdown())
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        if let Some(thread) = self.thread.take() {
            let reply = self.addr.send(Shutdown);
            let _ = futures_executor::block_on(reply);
            let _ = thread.join();
        }
    }
}
