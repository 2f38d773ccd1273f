//! The client library used inside the sandbox to ask the host's credential proxy for
//! tokens and API keys (PROTOCOL.md).
//!
//! # Connection lifecycle
//!
//! A [`Client`] is cheap to create and does no I/O until its first request. That request
//! connects to the Unix socket and performs the version handshake; later requests reuse the
//! connection, and any number of them may be in flight at once (replies are matched to
//! requests by a fresh UUID v4 `id`). Each connection has two tasks: a reader that hands
//! every reply to the waiting caller, and a writer that writes whole frames (so a caller
//! that is cancelled mid-request can never leave half a frame on the wire) and watches the
//! idle timer.
//!
//! - **Idle close.** When nothing has been in flight for [`ClientConfig::idle_timeout`]
//!   (5 minutes by default), the client shuts the connection down. The next request
//!   connects and handshakes again. [`Client::close`] does the same at once.
//! - **Lost connection.** If the proxy closes the connection, or reading or writing fails,
//!   while the client had not closed it itself, every pending request and every later
//!   one fails with [`ClientError::ConnectionLost`]. The client never reconnects after
//!   that: the proxy is gone or has cut this sandbox off, and the session must restart.
//! - **Connect failure.** A failure to connect or handshake is reported as
//!   [`ClientError::Connect`] (or the handshake's own error) and does not poison the
//!   client; the next request tries again.
//!
//! Every request, including any connect and handshake it needs, is bounded by
//! [`ClientConfig::request_timeout`] (30 seconds by default).
//!
//! # Versions and the capability token
//!
//! The handshake offers protocol versions 1 to 2 and the client speaks whichever the proxy
//! picks: replies may be up to 4 MiB on a version-2 connection, 65 536 bytes on a
//! version-1 one (an older proxy), and requests the same ([`crate::codec::frame_limit`]).
//! A client made with a capability token ([`Client::from_env`] reads it from the
//! descriptor named by `LLXPRT_CAPABILITY_FD`, see [`crate::handover`]) presents it in
//! the handshake of every connection it opens; a proxy that refuses it answers
//! [`ClientError::CapabilityRefused`].
//!
//! Secret material (tokens, API keys, the frames that carry them) is wiped from memory
//! when dropped, and no error or `Debug` output ever contains it.

use std::collections::HashMap;
use std::io::{self, Write};
use std::mem;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex as StdMutex, MutexGuard, PoisonError};
use std::time::Duration;
use std::{env, fmt};

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot, Mutex as AsyncMutex, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::{sleep_until, timeout, Instant};

use crate::capability::CapabilityToken;
use crate::codec::frame_limit;
use crate::handover::FdError;
use crate::protocol::{ErrorCode, Op};
use crate::secret::{wipe_json, Secret, SecretBytes};
use crate::token::{Token, REFRESH_TOKEN};

/// The environment variable that holds the proxy's socket path.
pub const SOCKET_ENV: &str = "LLXPRT_CREDENTIAL_SOCKET";

/// The largest frame body, in bytes, in either direction before the handshake and on a
/// version-1 connection (PROTOCOL.md §3); a version-2 connection allows
/// [`crate::codec::MAX_FRAME_LEN_V2`].
pub const MAX_FRAME: usize = crate::codec::MAX_FRAME_LEN;

/// A request timeout long enough for a request that may wait on a refresh (`get_token` of
/// a due token, `refresh_token`): the refresh's own 40 s deadline after up to 45 s waiting
/// for the bucket's refresh lock (another process refreshing it), and a margin
/// (PROTOCOL.md §14).
pub const REFRESH_REQUEST_TIMEOUT: Duration = Duration::from_secs(90);

/// The lowest protocol version this client speaks (and the `v` of its handshake frame:
/// before the handshake a connection follows version 1's rules).
const MIN_VERSION: u64 = 1;

/// The highest protocol version this client speaks.
const MAX_VERSION: u64 = 2;

/// Requests the proxy accepts in flight on one connection (PROTOCOL.md §5).
const MAX_IN_FLIGHT: usize = 16;

/// The result of a client call.
pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// Tuning for a [`Client`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientConfig {
    /// How long one request may take, including any connect and handshake it needs.
    pub request_timeout: Duration,
    /// How long a connection with nothing in flight stays open before the client closes it.
    pub idle_timeout: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            request_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(5 * 60),
        }
    }
}

/// Why a request failed. No variant ever carries a token or key value.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The proxy answered with an error. `Display` shows the proxy's message (a short,
    /// secret-free sentence by protocol).
    #[error("{message}")]
    Server {
        /// The wire code, kept as sent even when this version does not know it.
        code: String,
        /// The proxy's `error` text.
        message: String,
        /// For `RATE_LIMITED`: whole seconds to wait before retrying.
        retry_after: Option<u64>,
    },
    /// The connection broke while the client had not closed it itself. Permanent.
    #[error("Credential proxy connection lost. Restart the session.")]
    ConnectionLost,
    /// The proxy could not be reached (connect failed, or it hung up during the handshake).
    #[error("cannot reach the credential proxy at {}: {source}", path.display())]
    Connect {
        /// The socket path that was tried.
        path: PathBuf,
        /// The underlying failure.
        #[source]
        source: io::Error,
    },
    /// No reply within [`ClientConfig::request_timeout`].
    #[error("the credential proxy did not answer in time")]
    Timeout,
    /// The proxy sent a reply this client cannot understand.
    #[error("malformed reply from the credential proxy: {0}")]
    Protocol(String),
    /// The environment variable [`SOCKET_ENV`] is unset or empty.
    #[error("LLXPRT_CREDENTIAL_SOCKET is not set: no credential proxy is available")]
    NoSocket,
    /// The request would exceed the connection's frame limit (65 536 bytes at version 1,
    /// 4 MiB at version 2); it was not sent.
    #[error("request too large for the credential proxy's frame limit")]
    TooLarge,
    /// The request was cancelled because [`Client::close`] closed its connection.
    #[error("the credential proxy connection was closed by the client")]
    Closed,
    /// The proxy refused the handshake with `UNAUTHORIZED`: it was started with a
    /// capability token (PROTOCOL.md §13) and this client presented another one, or none.
    #[error("{}", if *.presented {
        "the credential proxy refused this sandbox's capability token"
    } else {
        "the credential proxy requires a capability token and this sandbox has none (LLXPRT_CAPABILITY_FD is not set)"
    })]
    CapabilityRefused {
        /// True when a token was presented.
        presented: bool,
    },
    /// `LLXPRT_CAPABILITY_FD` is set but no capability token could be read from it.
    #[error("no capability token: {0}")]
    Capability(#[from] FdError),
}

impl ClientError {
    /// The error code of a [`ClientError::Server`] error, if this version knows it.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Server { code, .. } => ErrorCode::parse(code),
            ClientError::CapabilityRefused { .. } => Some(ErrorCode::Unauthorized),
            _ => None,
        }
    }
}

/// Usage statistics of one bucket (the `get_bucket_stats` reply).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BucketStats {
    /// The bucket's name.
    pub bucket: String,
    /// How many `get_token` calls the proxy has answered for this bucket.
    pub request_count: u64,
    /// This bucket's share, 0 to 100, of the provider's `get_token` calls.
    pub percentage: f64,
    /// Epoch milliseconds of the last `get_token` call, if any.
    #[serde(default)]
    pub last_used: Option<u64>,
}

/// A credential proxy client. Clones share one connection; all methods take `&self` and
/// may be called from many tasks at once.
#[derive(Clone)]
pub struct Client {
    shared: Arc<Shared>,
}

struct Shared {
    path: PathBuf,
    config: ClientConfig,
    /// Presented in every handshake; kept for reconnects. Wiped when the last clone goes.
    capability: Option<Arc<CapabilityToken>>,
    /// Held across connect + handshake so that concurrent first requests share one connect.
    slot: AsyncMutex<Slot>,
    /// Queues requests beyond the proxy's in-flight limit instead of having them refused.
    in_flight: Semaphore,
}

enum Slot {
    Empty,
    Open(Arc<Conn>),
    Lost,
}

/// One connection. Dropping the last handle ends its writer task, which closes the socket.
struct Conn {
    state: Arc<StdMutex<ConnState>>,
    outgoing: mpsc::UnboundedSender<Outgoing>,
    /// The version the handshake agreed on.
    version: u64,
}

type Reply = Result<Value>;

struct ConnState {
    status: Status,
    pending: HashMap<String, oneshot::Sender<Reply>>,
    /// When a request last started or finished; the idle timer runs from here.
    last_active: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Open,
    /// Closed by the client (idle or [`Client::close`]): a reconnect is allowed.
    Closed,
    Lost,
}

enum Outgoing {
    Frame(SecretBytes),
    Close(oneshot::Sender<()>),
}

#[derive(Serialize)]
struct Envelope<'a> {
    v: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    op: &'a str,
    payload: &'a Value,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("path", &self.shared.path)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A client for the proxy at `socket_path`, with the default [`ClientConfig`]. No I/O
    /// happens until the first request.
    pub fn new(socket_path: impl Into<PathBuf>) -> Client {
        Client::with_config(socket_path, ClientConfig::default())
    }

    /// A client for the proxy at `socket_path` with the given timeouts.
    pub fn with_config(socket_path: impl Into<PathBuf>, config: ClientConfig) -> Client {
        Client::with_capability(socket_path, config, None)
    }

    /// A client for the proxy at `socket_path` with the given timeouts that presents
    /// `capability` (when given) in the handshake of every connection it opens.
    pub fn with_capability(
        socket_path: impl Into<PathBuf>,
        config: ClientConfig,
        capability: Option<Arc<CapabilityToken>>,
    ) -> Client {
        Client {
            shared: Arc::new(Shared {
                path: socket_path.into(),
                config,
                capability,
                slot: AsyncMutex::new(Slot::Empty),
                in_flight: Semaphore::new(MAX_IN_FLIGHT),
            }),
        }
    }

    /// A client for the socket named by `LLXPRT_CREDENTIAL_SOCKET`, presenting the
    /// capability token of the descriptor named by `LLXPRT_CAPABILITY_FD` when that is set
    /// (read once per process, [`crate::handover::from_env`]). [`ClientError::NoSocket`]
    /// when the socket variable is unset or empty; [`ClientError::Capability`] when the
    /// descriptor holds no token.
    pub fn from_env() -> Result<Client> {
        let path = env::var_os(SOCKET_ENV)
            .filter(|path| !path.is_empty())
            .ok_or(ClientError::NoSocket)?;
        let capability = crate::handover::from_env()?;
        Ok(Client::with_capability(
            path,
            ClientConfig::default(),
            capability,
        ))
    }

    /// The socket path this client connects to.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// Fetches the (sanitized) token of `provider`/`bucket`; `None` when none is stored.
    /// A missing `bucket` means `default`.
    pub async fn get_token(&self, provider: &str, bucket: Option<&str>) -> Result<Option<Token>> {
        let reply = self.request(Op::GetToken.as_str(), scoped(provider, bucket));
        let Some(data) = not_found_to_none(reply.await)? else {
            return Ok(None);
        };
        Token::from_value(data)
            .map(Some)
            .map_err(|e| malformed(format!("get_token reply: {e}")))
    }

    /// Asks the host to refresh the token of `provider`/`bucket` now (PROTOCOL.md §14) and
    /// returns the (sanitized) token after the refresh, or the current one when it was
    /// refreshed within the last 30 seconds; `None` when none is stored. A missing `bucket`
    /// means `default`.
    ///
    /// The refresh itself may fail with [`ErrorCode::RefreshNotAvailable`] (the host
    /// cannot refresh this token), [`ErrorCode::ReauthRequired`] (a new login is needed on
    /// the host; the message says what to run) or [`ErrorCode::RefreshFailed`] (try again
    /// later). A refresh may take up to 40 seconds upstream, after waiting for one that
    /// another process is running: give the client a [`ClientConfig::request_timeout`] of
    /// [`REFRESH_REQUEST_TIMEOUT`] to see the proxy's own answer instead of
    /// [`ClientError::Timeout`].
    pub async fn refresh_token(
        &self,
        provider: &str,
        bucket: Option<&str>,
    ) -> Result<Option<Token>> {
        let reply = self.request(Op::RefreshToken.as_str(), scoped(provider, bucket));
        let Some(data) = not_found_to_none(reply.await)? else {
            return Ok(None);
        };
        Token::from_value(data)
            .map(Some)
            .map_err(|e| malformed(format!("refresh_token reply: {e}")))
    }

    /// Stores `token` for `provider`/`bucket`, merged into what is stored. Its
    /// `refresh_token`, if any, is never sent.
    pub async fn save_token(
        &self,
        provider: &str,
        bucket: Option<&str>,
        token: &Token,
    ) -> Result<()> {
        let mut fields = token.fields().clone();
        if let Some(mut refresh) = fields.remove(REFRESH_TOKEN) {
            wipe_json(&mut refresh);
        }
        let mut payload = scoped(provider, bucket);
        payload["token"] = Value::Object(fields);
        self.request(Op::SaveToken.as_str(), payload).await?;
        Ok(())
    }

    /// Removes the token of `provider`/`bucket` (succeeds when none was stored).
    pub async fn remove_token(&self, provider: &str, bucket: Option<&str>) -> Result<()> {
        self.request(Op::RemoveToken.as_str(), scoped(provider, bucket))
            .await?;
        Ok(())
    }

    /// The providers with stored tokens that this sandbox may use, sorted.
    pub async fn list_providers(&self) -> Result<Vec<String>> {
        let data = self.request(Op::ListProviders.as_str(), json!({})).await?;
        string_list(data, "providers")
    }

    /// The buckets of `provider` that this sandbox may use, sorted.
    pub async fn list_buckets(&self, provider: &str) -> Result<Vec<String>> {
        let data = self.request(Op::ListBuckets.as_str(), json!({ "provider": provider }));
        string_list(data.await?, "buckets")
    }

    /// Usage statistics of `provider`/`bucket`; `None` when no token is stored there.
    pub async fn get_bucket_stats(
        &self,
        provider: &str,
        bucket: Option<&str>,
    ) -> Result<Option<BucketStats>> {
        let reply = self.request(Op::GetBucketStats.as_str(), scoped(provider, bucket));
        let Some(data) = not_found_to_none(reply.await)? else {
            return Ok(None);
        };
        serde_json::from_value(data)
            .map(Some)
            .map_err(|_| malformed("get_bucket_stats reply has the wrong shape"))
    }

    /// The API key called `name`; `None` when there is none.
    pub async fn get_api_key(&self, name: &str) -> Result<Option<Secret>> {
        let reply = self.request(Op::GetApiKey.as_str(), json!({ "name": name }));
        let Some(mut data) = not_found_to_none(reply.await)? else {
            return Ok(None);
        };
        match data.get_mut("key").map(Value::take) {
            Some(Value::String(key)) => Ok(Some(Secret::new(key))),
            other => {
                other
                    .into_iter()
                    .chain([data])
                    .for_each(|mut v| wipe_json(&mut v));
                Err(malformed("get_api_key reply has no key string"))
            }
        }
    }

    /// The API key names this sandbox may read, sorted.
    pub async fn list_api_keys(&self) -> Result<Vec<String>> {
        let data = self.request(Op::ListApiKeys.as_str(), json!({})).await?;
        string_list(data, "keys")
    }

    /// True when an API key called `name` exists (and this sandbox may read it).
    pub async fn has_api_key(&self, name: &str) -> Result<bool> {
        let data = self.request(Op::HasApiKey.as_str(), json!({ "name": name }));
        match data.await?.get("exists") {
            Some(Value::Bool(exists)) => Ok(*exists),
            _ => Err(malformed("has_api_key reply has no exists flag")),
        }
    }

    /// Sends one request and returns the reply's `data` object. Low level: `op` and
    /// `payload` are sent as given, and the payload is wiped once it has been encoded.
    pub async fn request(&self, op: &str, mut payload: Value) -> Result<Value> {
        let id = uuid::Uuid::new_v4().to_string();
        let limit = self.shared.config.request_timeout;
        let reply = timeout(limit, self.exchange(&id, op, &mut payload)).await;
        // Wiped already once encoded; this covers a timeout before that.
        wipe_json(&mut payload);
        reply.unwrap_or(Err(ClientError::Timeout))
    }

    /// Closes the connection now, if one is open. Requests in flight on it fail with
    /// [`ClientError::Closed`]; the next request connects again. After a lost connection
    /// this does nothing (the client stays unusable).
    pub async fn close(&self) {
        let mut slot = self.shared.slot.lock().await;
        let Slot::Open(conn) = &*slot else { return };
        let conn = Arc::clone(conn);
        let (was, pending) = {
            let mut st = lock(&conn.state);
            let was = st.status;
            if was == Status::Open {
                st.status = Status::Closed;
            }
            (was, mem::take(&mut st.pending))
        };
        *slot = if was == Status::Lost {
            Slot::Lost
        } else {
            Slot::Empty
        };
        drop(slot);
        for tx in pending.into_values() {
            let _ = tx.send(Err(ClientError::Closed));
        }
        let (ack, done) = oneshot::channel();
        if conn.outgoing.send(Outgoing::Close(ack)).is_ok() {
            // Resolves once the writer has shut the socket down (sent or dropped).
            let _ = done.await;
        }
    }

    /// Sends one request on the connection (opened first when needed): encoded at the
    /// connection's version and frame limit, the payload wiped once encoded.
    async fn exchange(&self, id: &str, op: &str, payload: &mut Value) -> Reply {
        let _permit = self
            .shared
            .in_flight
            .acquire()
            .await
            .map_err(|_| ClientError::Closed)?;
        let (conn, rx) = loop {
            let conn = self.connection().await?;
            if let Some(rx) = conn.register(id)? {
                break (conn, rx);
            }
            // Closed by us between lookup and registration: connect again.
        };
        let _guard = PendingGuard {
            state: &conn.state,
            id,
        };
        let frame = encode(
            &Envelope {
                v: conn.version,
                id: Some(id),
                op,
                payload,
            },
            frame_limit(conn.version as i64),
        );
        wipe_json(payload);
        let frame = frame?;
        // If the writer is gone, the connection left `Open` after we registered, so our
        // entry has been (or is being) answered with the reason.
        let _ = conn.outgoing.send(Outgoing::Frame(frame));
        rx.await.unwrap_or(Err(ClientError::ConnectionLost))
    }

    async fn connection(&self) -> Result<Arc<Conn>> {
        let mut slot = self.shared.slot.lock().await;
        if let Slot::Open(conn) = &*slot {
            let status = lock(&conn.state).status;
            match status {
                Status::Open => return Ok(Arc::clone(conn)),
                Status::Closed => *slot = Slot::Empty,
                Status::Lost => *slot = Slot::Lost,
            }
        }
        if let Slot::Lost = *slot {
            return Err(ClientError::ConnectionLost);
        }
        let shared = &self.shared;
        let conn = Conn::connect(
            &shared.path,
            shared.config.idle_timeout,
            shared.capability.as_deref(),
        );
        let conn = Arc::new(conn.await?);
        *slot = Slot::Open(Arc::clone(&conn));
        Ok(conn)
    }

    #[cfg(test)]
    async fn pending_len(&self) -> usize {
        match &*self.shared.slot.lock().await {
            Slot::Open(conn) => lock(&conn.state).pending.len(),
            _ => 0,
        }
    }
}

impl Conn {
    async fn connect(
        path: &Path,
        idle: Duration,
        capability: Option<&CapabilityToken>,
    ) -> Result<Conn> {
        let unreachable = |source| ClientError::Connect {
            path: path.to_owned(),
            source,
        };
        let mut stream = UnixStream::connect(path).await.map_err(unreachable)?;
        let mut offer = json!({ "minVersion": MIN_VERSION, "maxVersion": MAX_VERSION });
        if let Some(token) = capability {
            offer["capabilityToken"] = Value::String(token.expose().to_owned());
        }
        let hello = encode(
            &Envelope {
                v: MIN_VERSION,
                id: None,
                op: "handshake",
                payload: &offer,
            },
            MAX_FRAME,
        );
        wipe_json(&mut offer);
        stream.write_all(&hello?.0).await.map_err(unreachable)?;
        let body = match read_frame(&mut stream, MAX_FRAME).await {
            Ok(Some(body)) => body,
            Ok(None) => {
                let why = "the proxy closed the connection during the handshake";
                return Err(unreachable(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    why,
                )));
            }
            Err(e) => return Err(unreachable(e)),
        };
        // The reply's own `v` is not checked: an older proxy answers 1, a newer one 2.
        let (_, outcome) = parse_reply(&body.0).map_err(malformed)?;
        let agreed = match outcome {
            Ok(data) => data.get("version").and_then(Value::as_u64),
            Err(e) if e.code() == Some(ErrorCode::Unauthorized) => {
                return Err(ClientError::CapabilityRefused {
                    presented: capability.is_some(),
                })
            }
            Err(e) => return Err(e),
        };
        let version = match agreed {
            Some(v) if (MIN_VERSION..=MAX_VERSION).contains(&v) => v,
            _ => return Err(malformed("handshake chose an unsupported version")),
        };
        tracing::debug!(path = %path.display(), version, "connected to the credential proxy");

        let (rd, wr) = stream.into_split();
        let state = Arc::new(StdMutex::new(ConnState {
            status: Status::Open,
            pending: HashMap::new(),
            last_active: Instant::now(),
        }));
        let limit = frame_limit(version as i64);
        let reader = tokio::spawn(read_loop(rd, Arc::clone(&state), limit));
        let (outgoing, rx) = mpsc::unbounded_channel();
        tokio::spawn(write_loop(wr, rx, Arc::clone(&state), idle, reader));
        Ok(Conn {
            state,
            outgoing,
            version,
        })
    }

    /// Registers a pending request: `None` if we closed this connection meanwhile.
    fn register(&self, id: &str) -> Result<Option<oneshot::Receiver<Reply>>> {
        let mut st = lock(&self.state);
        match st.status {
            Status::Open => {}
            Status::Closed => return Ok(None),
            Status::Lost => return Err(ClientError::ConnectionLost),
        }
        let (tx, rx) = oneshot::channel();
        st.pending.insert(id.to_owned(), tx);
        st.last_active = Instant::now();
        Ok(Some(rx))
    }
}

/// Removes a request's pending entry when it ends for any reason (reply, timeout, or the
/// caller dropping the future), so it never holds off the idle close.
struct PendingGuard<'a> {
    state: &'a StdMutex<ConnState>,
    id: &'a str,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        let mut st = lock(self.state);
        if st.pending.remove(self.id).is_some() {
            st.last_active = Instant::now();
        }
    }
}

fn lock(state: &StdMutex<ConnState>) -> MutexGuard<'_, ConnState> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Marks the connection lost (unless we closed it) and fails every pending request.
fn mark_lost(state: &StdMutex<ConnState>, why: &str) {
    let pending = {
        let mut st = lock(state);
        if st.status != Status::Open {
            return;
        }
        st.status = Status::Lost;
        mem::take(&mut st.pending)
    };
    tracing::warn!(reason = why, "credential proxy connection lost");
    for tx in pending.into_values() {
        let _ = tx.send(Err(ClientError::ConnectionLost));
    }
}

async fn read_loop(mut rd: OwnedReadHalf, state: Arc<StdMutex<ConnState>>, limit: usize) {
    let why = loop {
        let body = match read_frame(&mut rd, limit).await {
            Ok(Some(body)) => body,
            Ok(None) => break "the proxy closed the connection".to_owned(),
            Err(e) => break format!("read failed: {e}"),
        };
        match parse_reply(&body.0) {
            Ok((Some(id), outcome)) => deliver(&state, &id, outcome),
            // The one frame without an id is the error sent just before the proxy closes.
            Ok((None, Err(e))) => {
                tracing::warn!(error = %e, "credential proxy refused the connection")
            }
            Ok((None, Ok(mut data))) => wipe_json(&mut data),
            Err(e) => break e,
        }
    };
    mark_lost(&state, &why);
}

fn deliver(state: &StdMutex<ConnState>, id: &str, outcome: Reply) {
    let waiter = {
        let mut st = lock(state);
        let waiter = st.pending.remove(id);
        if waiter.is_some() {
            st.last_active = Instant::now();
        }
        waiter
    };
    let unclaimed = match waiter {
        Some(tx) => tx.send(outcome).err(),
        None => {
            tracing::debug!("ignoring a reply for a request that is no longer waiting");
            Some(outcome)
        }
    };
    if let Some(Ok(mut data)) = unclaimed {
        wipe_json(&mut data);
    }
}

async fn write_loop(
    mut wr: OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    state: Arc<StdMutex<ConnState>>,
    idle: Duration,
    mut reader: JoinHandle<()>,
) {
    let mut ack = None;
    loop {
        let deadline = {
            let st = lock(&state);
            if st.status != Status::Open {
                break;
            }
            match st.pending.is_empty() {
                true => st.last_active + idle,
                // Rechecked when it fires; a finished request moves `last_active` on.
                false => Instant::now() + idle,
            }
        };
        tokio::select! {
            msg = rx.recv() => match msg {
                Some(Outgoing::Frame(frame)) => {
                    if let Err(e) = wr.write_all(&frame.0).await {
                        mark_lost(&state, &format!("write failed: {e}"));
                        break;
                    }
                }
                Some(Outgoing::Close(done)) => {
                    ack = Some(done);
                    break;
                }
                None => break, // every handle to the connection is gone
            },
            _ = &mut reader => {
                mark_lost(&state, "the reader stopped"); // no-op unless it panicked
                break;
            }
            () = sleep_until(deadline) => {
                let mut st = lock(&state);
                let idle_now = st.pending.is_empty() && Instant::now() >= st.last_active + idle;
                if st.status == Status::Open && idle_now {
                    tracing::debug!("closing the idle credential proxy connection");
                    st.status = Status::Closed;
                    break;
                }
            }
        }
    }
    {
        let mut st = lock(&state);
        if st.status == Status::Open {
            st.status = Status::Closed;
        }
    }
    let _ = wr.shutdown().await;
    reader.abort();
    if let Some(done) = ack {
        let _ = done.send(());
    }
}

/// Reads one frame of at most `limit` bytes into a buffer sized once from its header;
/// `None` on a clean end of stream before a header.
async fn read_frame<R: AsyncRead + Unpin>(
    rd: &mut R,
    limit: usize,
) -> io::Result<Option<SecretBytes>> {
    let mut header = [0u8; 4];
    match rd.read_exact(&mut header).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(header) as usize;
    if len > limit {
        let why = format!("frame of {len} bytes announced, the limit is {limit}");
        return Err(io::Error::new(io::ErrorKind::InvalidData, why));
    }
    let mut body = SecretBytes(vec![0; len]);
    rd.read_exact(&mut body.0).await?;
    Ok(Some(body))
}

/// Encodes a frame (header + JSON body of at most `limit` bytes) into a buffer that never
/// reallocates, so no stray copy of a secret is left behind: the body is measured first
/// (stopping at the limit), then written into a buffer of exactly its size.
/// [`ClientError::TooLarge`] past the limit.
fn encode(envelope: &Envelope<'_>, limit: usize) -> Result<SecretBytes> {
    /// Counts bytes, failing past the limit.
    struct Measure {
        len: usize,
        limit: usize,
    }
    impl Write for Measure {
        fn write(&mut self, data: &[u8]) -> io::Result<usize> {
            if self.len + data.len() > self.limit {
                return Err(io::Error::other("frame too large"));
            }
            self.len += data.len();
            Ok(data.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let unencodable = |e: serde_json::Error| match e.is_io() {
        true => ClientError::TooLarge,
        false => malformed("request could not be encoded"),
    };
    let mut measure = Measure { len: 0, limit };
    serde_json::to_writer(&mut measure, envelope).map_err(unencodable)?;
    let mut frame = SecretBytes(Vec::with_capacity(4 + measure.len));
    frame
        .0
        .extend_from_slice(&(measure.len as u32).to_be_bytes());
    serde_json::to_writer(&mut frame.0, envelope).map_err(unencodable)?;
    if frame.0.len() != 4 + measure.len {
        return Err(malformed("request encoded differently twice"));
    }
    Ok(frame)
}

/// Splits a reply into its id and outcome; `Err` when it is not a JSON object at all
/// (a protocol violation that ends the connection).
fn parse_reply(body: &[u8]) -> Result<(Option<String>, Reply), String> {
    let Ok(Value::Object(mut reply)) = serde_json::from_slice::<Value>(body) else {
        return Err("a reply is not a JSON object".into());
    };
    let id = match reply.remove("id") {
        Some(Value::String(id)) => Some(id),
        Some(Value::Number(id)) => Some(id.to_string()),
        _ => None,
    };
    let outcome = match reply.get("ok") {
        Some(Value::Bool(true)) => match reply.remove("data") {
            None => Ok(Value::Object(Map::new())),
            Some(data @ Value::Object(_)) => Ok(data),
            Some(mut other) => {
                wipe_json(&mut other);
                Err(malformed("reply data is not an object"))
            }
        },
        Some(Value::Bool(false)) => match reply.get("code").and_then(Value::as_str) {
            Some(code) => Err(ClientError::Server {
                code: code.to_owned(),
                message: match reply.get("error").and_then(Value::as_str) {
                    Some(message) => message.to_owned(),
                    None => format!("credential proxy error {code}"),
                },
                retry_after: reply.get("retryAfter").and_then(Value::as_u64),
            }),
            None => Err(malformed("error reply has no code")),
        },
        _ => Err(malformed("reply has no ok flag")),
    };
    Ok((id, outcome))
}

/// The payload `{"provider", "bucket"?}`.
fn scoped(provider: &str, bucket: Option<&str>) -> Value {
    match bucket {
        Some(bucket) => json!({ "provider": provider, "bucket": bucket }),
        None => json!({ "provider": provider }),
    }
}

fn malformed(why: impl Into<String>) -> ClientError {
    ClientError::Protocol(why.into())
}

fn not_found_to_none(reply: Reply) -> Result<Option<Value>> {
    match reply {
        Ok(data) => Ok(Some(data)),
        Err(e) if e.code() == Some(ErrorCode::NotFound) => Ok(None),
        Err(e) => Err(e),
    }
}

fn string_list(mut data: Value, field: &str) -> Result<Vec<String>> {
    let bad = || malformed(format!("reply has no {field} list"));
    match data.get_mut(field).map(Value::take) {
        Some(Value::Array(items)) => items
            .into_iter()
            .map(|item| match item {
                Value::String(s) => Ok(s),
                _ => Err(bad()),
            })
            .collect(),
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    const LOST: &str = "Credential proxy connection lost. Restart the session.";
    const SHORT: Duration = Duration::from_millis(200);
    const LONG: Duration = Duration::from_secs(5);

    /// A fake proxy: each test drives the server side of its connections by hand.
    struct Server(UnixListener, PathBuf, #[allow(dead_code)] tempfile::TempDir);

    struct Peer(UnixStream);

    impl Server {
        fn new() -> Server {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("proxy.sock");
            Server(UnixListener::bind(&path).unwrap(), path, dir)
        }

        fn client(&self, request_timeout: Duration, idle_timeout: Duration) -> Client {
            let config = ClientConfig {
                request_timeout,
                idle_timeout,
            };
            Client::with_config(&self.1, config)
        }

        async fn accept_raw(&self) -> Peer {
            let accepted = timeout(LONG, self.0.accept()).await.expect("no connection");
            Peer(accepted.unwrap().0)
        }

        /// Accepts a connection and completes the handshake at version 1 (an older proxy),
        /// checking the client's frame: it offers 1..2 and no capability token.
        async fn accept(&self) -> Peer {
            self.accept_at(1, None).await
        }

        /// Accepts a connection and completes the handshake at `version`, checking the
        /// client's frame: it offers 1..2, with `token` when given.
        async fn accept_at(&self, version: u64, token: Option<&str>) -> Peer {
            let mut peer = self.accept_raw().await;
            let mut hello =
                json!({"v":1,"op":"handshake","payload":{"minVersion":1,"maxVersion":2}});
            if let Some(token) = token {
                hello["payload"]["capabilityToken"] = json!(token);
            }
            assert_eq!(peer.recv().await, Some(hello));
            peer.send(json!({"v":version,"op":"handshake","ok":true,"data":{"version":version}}))
                .await;
            peer
        }
    }

    impl Peer {
        /// The next frame, or `None` at end of stream.
        async fn recv(&mut self) -> Option<Value> {
            let frame = timeout(
                LONG,
                read_frame(&mut self.0, crate::codec::MAX_FRAME_LEN_V2),
            )
            .await
            .expect("stalled");
            Some(serde_json::from_slice(&frame.ok()??.0).unwrap())
        }

        async fn send(&mut self, reply: Value) {
            let body = serde_json::to_vec(&reply).unwrap();
            let frame = [&(body.len() as u32).to_be_bytes()[..], &body].concat();
            self.0.write_all(&frame).await.unwrap();
        }

        async fn ok(&mut self, req: &Value, data: Value) {
            self.send(json!({"v":1,"id":req["id"],"ok":true,"data":data}))
                .await;
        }

        async fn fail(&mut self, req: &Value, code: &str, extra: Value) {
            let mut reply = json!({"v":1,"id":req["id"],"ok":false,"code":code,"error":"nope"});
            reply
                .as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            self.send(reply).await;
        }
    }

    #[tokio::test]
    async fn handshake_then_request() {
        let server = Server::new();
        let client = server.client(LONG, LONG);
        let serve = async {
            let mut peer = server.accept().await;
            let req = peer.recv().await.unwrap();
            assert_eq!(
                (&req["v"], &req["op"], &req["payload"]),
                (&json!(1), &json!("list_providers"), &json!({}))
            );
            assert!(uuid::Uuid::parse_str(req["id"].as_str().unwrap()).is_ok());
            peer.ok(&req, json!({"providers":["anthropic","openai"]}))
                .await;
            peer
        };
        let (listed, _peer) = tokio::join!(client.list_providers(), serve);
        assert_eq!(listed.unwrap(), ["anthropic", "openai"]);
        assert_eq!(
            format!("{client:?}"),
            format!("Client {{ path: {:?}, .. }}", server.1)
        );
    }

    #[tokio::test]
    async fn concurrent_replies_in_reverse_order() {
        let server = Server::new();
        let client = server.client(LONG, LONG);
        let serve = async {
            let mut peer = server.accept().await;
            let (first, second) = (peer.recv().await.unwrap(), peer.recv().await.unwrap());
            assert_ne!(first["id"], second["id"]);
            for req in [second, first] {
                let data = match req["op"].as_str().unwrap() {
                    "get_api_key" => json!({"key":"sk-one"}),
                    _ => json!({"exists":false}),
                };
                peer.ok(&req, data).await;
            }
            peer
        };
        let (key, has, _peer) =
            tokio::join!(client.get_api_key("one"), client.has_api_key("two"), serve);
        assert_eq!(key.unwrap().unwrap().expose(), "sk-one");
        assert!(!has.unwrap());
    }

    #[tokio::test]
    async fn typed_operations() {
        let server = Server::new();
        let client = server.client(LONG, LONG);
        let serve = async {
            let mut peer = server.accept().await;
            let req = peer.recv().await.unwrap();
            assert_eq!(req["payload"], json!({"provider":"anthropic"}));
            peer.fail(&req, "NOT_FOUND", json!({})).await;
            let req = peer.recv().await.unwrap();
            assert_eq!(
                req["payload"],
                json!({"provider":"anthropic","bucket":"work"})
            );
            let token = json!({"access_token":"at","expiry":5,"token_type":"Bearer","x":1});
            peer.ok(&req, token).await;
            let req = peer.recv().await.unwrap();
            let token = &req["payload"]["token"];
            assert_eq!(req["op"], "save_token");
            assert!(token.get("refresh_token").is_none() && token["access_token"] == "at2");
            peer.ok(&req, json!({})).await;
            let req = peer.recv().await.unwrap();
            peer.ok(
                &req,
                json!({"bucket":"work","requestCount":3,"percentage":75.0}),
            )
            .await;
            peer
        };
        let calls = async {
            assert!(client.get_token("anthropic", None).await.unwrap().is_none());
            let token = client.get_token("anthropic", Some("work")).await.unwrap();
            assert_eq!(token.unwrap().fields()["x"], 1);
            let token =
                json!({"access_token":"at2","expiry":6,"token_type":"B","refresh_token":"r"});
            let token = Token::from_value(token).unwrap();
            client
                .save_token("anthropic", Some("work"), &token)
                .await
                .unwrap();
            let stats = client
                .get_bucket_stats("anthropic", Some("work"))
                .await
                .unwrap();
            let stats = stats.unwrap();
            assert_eq!((stats.request_count, stats.last_used), (3, None));
        };
        tokio::join!(calls, serve);
    }

    #[tokio::test]
    async fn refresh_token_sends_its_op_and_answers_the_token() {
        let server = Server::new();
        let client = server.client(LONG, LONG);
        let serve = async {
            let mut peer = server.accept().await;
            let req = peer.recv().await.unwrap();
            assert_eq!(
                (&req["op"], &req["payload"]),
                (
                    &json!("refresh_token"),
                    &json!({"provider":"anthropic","bucket":"work"})
                )
            );
            let token = json!({"access_token":"at-2","expiry":9,"token_type":"Bearer"});
            peer.ok(&req, token).await;
            let req = peer.recv().await.unwrap();
            assert_eq!(req["payload"], json!({"provider":"anthropic"}));
            peer.fail(&req, "NOT_FOUND", json!({})).await;
            let req = peer.recv().await.unwrap();
            peer.fail(&req, "REAUTH_REQUIRED", json!({})).await;
            peer
        };
        let calls = async {
            let token = client.refresh_token("anthropic", Some("work")).await;
            assert_eq!(token.unwrap().unwrap().fields()["access_token"], "at-2");
            assert!(client
                .refresh_token("anthropic", None)
                .await
                .unwrap()
                .is_none());
            let err = client.refresh_token("anthropic", None).await.unwrap_err();
            assert_eq!(err.code(), Some(ErrorCode::ReauthRequired));
        };
        tokio::join!(calls, serve);
    }

    #[tokio::test]
    async fn server_errors_are_typed() {
        let server = Server::new();
        let client = server.client(LONG, LONG);
        let serve = async {
            let mut peer = server.accept().await;
            let req = peer.recv().await.unwrap();
            peer.fail(&req, "RATE_LIMITED", json!({"retryAfter":3}))
                .await;
            peer
        };
        let (err, _peer) = tokio::join!(client.list_api_keys(), serve);
        let err = err.unwrap_err();
        assert_eq!(
            (err.code(), err.to_string()),
            (Some(ErrorCode::RateLimited), "nope".into())
        );
        assert!(matches!(
            err,
            ClientError::Server {
                retry_after: Some(3),
                ..
            }
        ));
    }

    #[tokio::test]
    async fn lost_connection_is_permanent() {
        let server = Server::new();
        let client = server.client(LONG, LONG);
        let serve = async { server.accept().await.recv().await.unwrap() }; // then drops it
        let (err, _) = tokio::join!(client.list_buckets("anthropic"), serve);
        let err = err.unwrap_err();
        assert!(matches!(err, ClientError::ConnectionLost));
        assert_eq!(err.to_string(), LOST);
        assert_eq!(client.has_api_key("k").await.unwrap_err().to_string(), LOST);
        assert!(
            timeout(SHORT, server.0.accept()).await.is_err(),
            "reconnected"
        );
    }

    #[tokio::test]
    async fn idle_close_then_reconnect() {
        let server = Server::new();
        let client = server.client(LONG, SHORT);
        let serve = async {
            let mut peer = server.accept().await;
            let req = peer.recv().await.unwrap();
            peer.ok(&req, json!({"exists":true})).await;
            peer
        };
        let (has, mut peer) = tokio::join!(client.has_api_key("k"), serve);
        assert!(has.unwrap());
        let started = Instant::now();
        assert_eq!(
            peer.recv().await,
            None,
            "expected EOF after the idle timeout"
        );
        assert!(started.elapsed() >= SHORT / 2);
        let serve = async {
            let mut peer = server.accept().await; // a second handshake
            let req = peer.recv().await.unwrap();
            peer.ok(&req, json!({"keys":["a"]})).await;
            peer
        };
        let (keys, mut peer) = tokio::join!(client.list_api_keys(), serve);
        assert_eq!(keys.unwrap(), ["a"]);
        client.close().await;
        assert_eq!(peer.recv().await, None, "expected EOF after close");
    }

    #[tokio::test]
    async fn request_timeout_removes_pending() {
        let server = Server::new();
        let client = server.client(SHORT, LONG);
        let serve = async {
            let mut peer = server.accept().await;
            let req = peer.recv().await.unwrap();
            (peer, req)
        };
        let (err, (mut peer, late)) = tokio::join!(client.list_providers(), serve);
        assert!(matches!(err.unwrap_err(), ClientError::Timeout));
        assert_eq!(client.pending_len().await, 0);
        peer.ok(&late, json!({"providers":["stale"]})).await; // ignored
        let serve = async {
            let req = peer.recv().await.unwrap();
            peer.ok(&req, json!({"providers":["fresh"]})).await;
        };
        let (listed, ()) = tokio::join!(client.list_providers(), serve);
        assert_eq!(listed.unwrap(), ["fresh"]);
    }

    #[tokio::test]
    async fn handshake_failure_is_typed() {
        let server = Server::new();
        let client = server.client(LONG, LONG);
        let serve = async {
            let mut peer = server.accept_raw().await;
            let hello = peer.recv().await.unwrap();
            peer.fail(&hello, "UNKNOWN_VERSION", json!({"op":"handshake"}))
                .await;
        };
        let (err, ()) = tokio::join!(client.list_providers(), serve);
        assert_eq!(err.unwrap_err().code(), Some(ErrorCode::UnknownVersion));
    }

    #[tokio::test]
    async fn missing_socket() {
        let dir = tempfile::tempdir().unwrap();
        let client = Client::new(dir.path().join("missing.sock"));
        for _ in 0..2 {
            let err = client.list_providers().await.unwrap_err();
            assert!(matches!(err, ClientError::Connect { .. }), "{err:?}");
            assert!(err.to_string().contains("missing.sock"), "{err}");
        }
    }

    #[tokio::test]
    async fn oversized_requests_are_not_sent() {
        let server = Server::new();
        let client = server.client(LONG, LONG);
        let serve = async {
            let mut peer = server.accept().await;
            // The next frame is the small request: the huge one never reached the wire.
            let req = peer.recv().await.unwrap();
            assert_eq!(req["op"], "list_api_keys");
            peer.ok(&req, json!({"keys":[]})).await;
            peer
        };
        let calls = async {
            let huge = json!({ "name": "x".repeat(MAX_FRAME) });
            let err = client.request("has_api_key", huge).await.unwrap_err();
            assert!(matches!(err, ClientError::TooLarge), "{err:?}");
            client.list_api_keys().await.unwrap()
        };
        let (keys, _peer) = tokio::join!(calls, serve);
        assert!(keys.is_empty());
    }

    /// A key of `len` bytes: its reply frame is a little larger.
    fn big_key(len: usize) -> String {
        "k".repeat(len)
    }

    #[tokio::test]
    async fn version_2_carries_frames_up_to_4_mib_and_the_negotiated_v() {
        let server = Server::new();
        let client = server.client(LONG, LONG);
        let key = big_key(crate::codec::MAX_FRAME_LEN_V2 - 100);
        let serve = async {
            let mut peer = server.accept_at(2, None).await;
            let req = peer.recv().await.unwrap();
            assert_eq!(req["v"], 2, "requests carry the agreed version");
            assert_eq!(req["payload"]["name"].as_str().unwrap().len(), 100_000);
            peer.send(json!({"v":2,"id":req["id"],"ok":true,"data":{"key":key}}))
                .await;
            peer
        };
        let calls = async {
            // A request over the version-1 limit is fine at version 2.
            let name = "n".repeat(100_000);
            client.get_api_key(&name).await
        };
        let (got, _peer) = tokio::join!(calls, serve);
        assert_eq!(got.unwrap().unwrap().expose().len(), key.len());
    }

    #[tokio::test]
    async fn version_1_keeps_the_65536_byte_limit() {
        let server = Server::new();
        let client = server.client(LONG, LONG);
        let serve = async {
            let mut peer = server.accept_at(1, None).await;
            let req = peer.recv().await.unwrap();
            assert_eq!(req["v"], 1);
            let key = big_key(MAX_FRAME);
            peer.send(json!({"v":1,"id":req["id"],"ok":true,"data":{"key":key}}))
                .await;
            peer
        };
        let (got, _peer) = tokio::join!(client.get_api_key("k"), serve);
        assert!(matches!(got, Err(ClientError::ConnectionLost)), "{got:?}");
    }

    #[tokio::test]
    async fn an_unknown_agreed_version_is_refused() {
        let server = Server::new();
        let client = server.client(LONG, LONG);
        let serve = async {
            let mut peer = server.accept_raw().await;
            peer.recv().await.unwrap();
            peer.send(json!({"v":3,"op":"handshake","ok":true,"data":{"version":3}}))
                .await;
            peer
        };
        let (err, _peer) = tokio::join!(client.list_providers(), serve);
        assert!(matches!(err, Err(ClientError::Protocol(_))), "{err:?}");
    }

    fn client_with(server: &Server, token: &Arc<CapabilityToken>) -> Client {
        let config = ClientConfig {
            request_timeout: LONG,
            idle_timeout: SHORT,
        };
        Client::with_capability(&server.1, config, Some(Arc::clone(token)))
    }

    #[tokio::test]
    async fn the_capability_token_is_presented_on_every_connection() {
        let server = Server::new();
        let token = Arc::new(CapabilityToken::generate());
        let client = client_with(&server, &token);
        for round in 0..2 {
            let serve = async {
                let mut peer = server.accept_at(2, Some(token.expose())).await;
                let req = peer.recv().await.unwrap();
                peer.ok(&req, json!({"keys":[round.to_string()]})).await;
                peer
            };
            let (keys, mut peer) = tokio::join!(client.list_api_keys(), serve);
            assert_eq!(keys.unwrap(), [round.to_string()]);
            // The idle close; the next round reconnects with the same token.
            assert_eq!(peer.recv().await, None);
        }
        assert!(!format!("{client:?}").contains(&token.expose()[..8]));
    }

    /// The refusal of a proxy started with another token: `UNAUTHORIZED` (with the `v` of
    /// a version-2 proxy) and a close.
    async fn refuse(server: &Server) {
        let mut peer = server.accept_raw().await;
        peer.recv().await.unwrap();
        peer.send(json!({"v":2,"op":"handshake","ok":false,"code":"UNAUTHORIZED","error":"x"}))
            .await;
    }

    #[tokio::test]
    async fn a_refused_capability_token_is_a_clear_error() {
        let server = Server::new();
        let token = Arc::new(CapabilityToken::generate());
        let client = client_with(&server, &token);
        let (err, ()) = tokio::join!(client.list_providers(), refuse(&server));
        let err = err.unwrap_err();
        assert!(
            matches!(err, ClientError::CapabilityRefused { presented: true }),
            "{err:?}"
        );
        assert_eq!(err.code(), Some(ErrorCode::Unauthorized));
        assert_eq!(
            err.to_string(),
            "the credential proxy refused this sandbox's capability token"
        );
        assert!(!format!("{err:?}").contains(&token.expose()[..8]));

        let plain = server.client(LONG, LONG);
        let (err, ()) = tokio::join!(plain.list_providers(), refuse(&server));
        let err = err.unwrap_err();
        assert!(
            matches!(err, ClientError::CapabilityRefused { presented: false }),
            "{err:?}"
        );
        assert!(err.to_string().contains("LLXPRT_CAPABILITY_FD"), "{err}");
        // Not a lost connection: the next request tries again.
        let (err, ()) = tokio::join!(plain.list_providers(), refuse(&server));
        assert!(matches!(
            err,
            Err(ClientError::CapabilityRefused { presented: false })
        ));
    }
}
