//! The `CredentialStore` actor: owns the backend, sanitizes on the way out, merges on
//! save, keeps the per-bucket `get_token` counters, and wipes what it holds on `Clear`.
//!
//! Ordering: a save or remove of one `provider:bucket` holds that key's lock from before
//! it reads until after it writes, and locks are granted first come, first served, so
//! saves and removes of one key never interleave and a remove issued while a save runs
//! waits for it and then wins. A blocking backend (the file backend) runs on the store's
//! own worker threads; the memory backend runs inline on the actor, which orders it
//! trivially. Every operation is bounded by the store timeout; one that overruns is
//! answered with a failure (the blocking call itself finishes in the background, still
//! holding its lock).
//!
//! A `get_token` that misses the backend's read cache joins a read of the same key already
//! in flight instead of starting another (no stampede of identical file reads), unless a
//! save or removal completed since that read started: a read issued before a completed
//! save never answers a `get_token` sent after it.
//!
//! The workers are the blocking pool of a private runtime rather than the actix runtime's:
//! a runtime waits for its blocking pool when it is dropped, so one store call stuck in
//! the kernel (a hung network filesystem) would hold up shutdown without bound; the
//! private pool is released without waiting.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use actix::{
    fut, Actor, ActorFutureExt, ActorResponse, Context, Handler, Message, ResponseActFuture,
    WrapFuture,
};
use tokio::sync::Mutex as AsyncMutex;

use crate::backend::{Backend, SaveMode, StoreError};
use crate::secret::Secret;
use crate::token::{ServedToken, Token};

/// A store operation failed or timed out. The cause has been logged by the store; the
/// session answers `INTERNAL_ERROR` without details.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreFailed;

/// A store reply.
pub type StoreResult<T> = Result<T, StoreFailed>;

/// `get_bucket_stats` data.
#[derive(Debug, Clone, PartialEq)]
pub struct BucketStats {
    /// `get_token` calls answered for this provider:bucket.
    pub request_count: u64,
    /// Share of the provider's `get_token` calls, 0 to 100.
    pub percentage: f64,
    /// Epoch milliseconds of the last one.
    pub last_used: Option<u64>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Counter {
    count: u64,
    last_used_ms: u64,
}

/// The credential store actor.
#[derive(Debug)]
pub struct CredentialStore {
    backend: Arc<dyn Backend>,
    timeout: Duration,
    /// Per provider:bucket write locks for a blocking backend; an entry is dropped again
    /// when no operation holds or waits for it.
    locks: HashMap<(String, String), Arc<AsyncMutex<()>>>,
    /// provider → bucket → get_token counter.
    stats: HashMap<String, HashMap<String, Counter>>,
    /// Worker threads for a blocking backend, started on first use.
    workers: Option<Workers>,
    /// `get_token` reads of a blocking backend in flight, by provider:bucket: concurrent
    /// misses of one key share one read.
    reads: HashMap<(String, String), ReadFlight>,
    /// The waiters of every read in flight (joinable or superseded), by read id.
    read_waiters: HashMap<u64, Vec<ReadWaiter>>,
    /// Saves and removes completed by this store so far. A read shares a flight only if
    /// none completed since the flight started, so a read issued before a save never
    /// answers a `get_token` that came after it.
    writes_done: u64,
    next_read: u64,
}

/// The `get_token` read of a key that later misses may join.
#[derive(Debug)]
struct ReadFlight {
    id: u64,
    /// [`CredentialStore::writes_done`] when the read started.
    writes_done: u64,
}

type ReadWaiter = tokio::sync::oneshot::Sender<StoreResult<Option<ServedToken>>>;

/// Upper bound on threads running blocking backend calls at once. Calls past it queue;
/// it is far above what a healthy disk needs and bounds the damage of a hung one.
const MAX_BLOCKING_THREADS: usize = 256;

/// The blocking pool of a private tokio runtime that is never driven itself: it grows a
/// thread whenever every thread is busy (so a few stuck calls never hold up the others),
/// idle threads exit, and on shutdown it is released with `shutdown_background`, which
/// does not wait for calls stuck in the kernel.
pub(crate) struct Workers {
    runtime: tokio::runtime::Runtime,
}

impl std::fmt::Debug for Workers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Workers")
    }
}

impl Workers {
    pub(crate) fn start(name: &str) -> Option<Workers> {
        match tokio::runtime::Builder::new_current_thread()
            .thread_name(name)
            .max_blocking_threads(MAX_BLOCKING_THREADS)
            .build()
        {
            Ok(runtime) => Some(Workers { runtime }),
            Err(e) => {
                tracing::error!(error = %e, pool = name, "cannot start a worker pool");
                None
            }
        }
    }

    pub(crate) fn handle(&self) -> tokio::runtime::Handle {
        self.runtime.handle().clone()
    }

    pub(crate) fn release(self) {
        self.runtime.shutdown_background();
    }
}

impl CredentialStore {
    /// A store over `backend`, bounding each operation by `timeout`.
    pub fn new(backend: Arc<dyn Backend>, timeout: Duration) -> Self {
        CredentialStore {
            backend,
            timeout,
            locks: HashMap::new(),
            stats: HashMap::new(),
            workers: None,
            reads: HashMap::new(),
            read_waiters: HashMap::new(),
            writes_done: 0,
            next_read: 0,
        }
    }

    /// Runs `op` against the backend: inline for a non-blocking backend, else on the
    /// blocking pool under the key's lock (when `key` is given), bounded by the timeout.
    fn run<T, F>(
        &mut self,
        what: &'static str,
        key: Option<(&str, &str)>,
        op: F,
    ) -> ResponseActFuture<Self, StoreResult<T>>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Backend) -> Result<T, StoreError> + Send + 'static,
    {
        if !self.backend.is_blocking() {
            let result = op(self.backend.as_ref()).map_err(|e| failed(what, &e));
            return Box::pin(fut::ready(result));
        }
        if self.workers.is_none() {
            self.workers = Workers::start("credproxy-store");
        }
        let Some(pool) = self.workers.as_ref().map(Workers::handle) else {
            return Box::pin(fut::ready(Err(StoreFailed)));
        };
        let backend = Arc::clone(&self.backend);
        let lock = key
            .map(|(p, b)| Arc::clone(self.locks.entry((p.to_owned(), b.to_owned())).or_default()));
        let key = key.map(|(p, b)| (p.to_owned(), b.to_owned()));
        let timeout = self.timeout;
        let work = async move {
            let guard = match lock {
                Some(lock) => Some(lock.lock_owned().await),
                None => None,
            };
            let job = pool.spawn_blocking(move || {
                let _held = guard;
                op(backend.as_ref())
            });
            match job.await {
                Ok(result) => result.map_err(|e| failed(what, &e)),
                Err(_) => {
                    tracing::error!(op = what, "store operation panicked");
                    Err(StoreFailed)
                }
            }
        };
        Box::pin(
            with_timeout(timeout, what, work)
                .into_actor(self)
                .map(move |result, act, _| {
                    if let Some(key) = key {
                        if act
                            .locks
                            .get(&key)
                            .is_some_and(|l| Arc::strong_count(l) == 1)
                        {
                            act.locks.remove(&key);
                        }
                    }
                    result
                }),
        )
    }

    fn record_get(&mut self, provider: &str, bucket: &str) {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        // Look up before inserting: the hot path must neither allocate the key nor hash
        // it twice.
        let buckets = match self.stats.get_mut(provider) {
            Some(buckets) => buckets,
            None => self.stats.entry(provider.to_owned()).or_default(),
        };
        let counter = match buckets.get_mut(bucket) {
            Some(counter) => counter,
            None => buckets.entry(bucket.to_owned()).or_default(),
        };
        counter.count += 1;
        counter.last_used_ms = now_ms;
    }

    fn stats_for(&self, provider: &str, bucket: &str) -> BucketStats {
        let buckets = self.stats.get(provider);
        let total: u64 = buckets.map_or(0, |b| b.values().map(|c| c.count).sum());
        let counter = buckets
            .and_then(|b| b.get(bucket))
            .copied()
            .unwrap_or_default();
        BucketStats {
            request_count: counter.count,
            percentage: if total == 0 {
                0.0
            } else {
                counter.count as f64 * 100.0 / total as f64
            },
            last_used: (counter.count > 0).then_some(counter.last_used_ms),
        }
    }
}

fn failed(what: &'static str, e: &StoreError) -> StoreFailed {
    tracing::error!(op = what, error = %e, "store operation failed");
    StoreFailed
}

async fn with_timeout<T>(
    timeout: Duration,
    what: &'static str,
    work: impl Future<Output = StoreResult<T>>,
) -> StoreResult<T> {
    match tokio::time::timeout(timeout, work).await {
        Ok(result) => result,
        Err(_) => {
            tracing::error!(
                op = what,
                timeout_ms = timeout.as_millis() as u64,
                "store operation timed out"
            );
            Err(StoreFailed)
        }
    }
}

impl Actor for CredentialStore {
    type Context = Context<Self>;

    fn stopped(&mut self, _: &mut Context<Self>) {
        // Safety net for a System stopped without the Shutdown sequence. Dropping a
        // runtime on an async thread would panic and would wait for stuck calls.
        self.backend.clear();
        if let Some(workers) = self.workers.take() {
            workers.release();
        }
    }
}

/// Reads the token of `provider:bucket` as served (sanitized, serialized once); counts
/// the call for stats when found.
#[derive(Debug, Message)]
#[rtype(result = "StoreResult<Option<ServedToken>>")]
pub struct GetToken {
    /// Provider.
    pub provider: String,
    /// Bucket.
    pub bucket: String,
}

impl Handler<GetToken> for CredentialStore {
    type Result = ActorResponse<Self, StoreResult<Option<ServedToken>>>;

    fn handle(&mut self, msg: GetToken, _: &mut Context<Self>) -> Self::Result {
        // A cached answer (file store with its read cache) is given on this thread, with
        // no allocation: the served bytes are shared with the cache.
        if let Some(hit) = self.backend.cached_token(&msg.provider, &msg.bucket) {
            if hit.is_some() {
                self.record_get(&msg.provider, &msg.bucket);
            }
            return ActorResponse::reply(Ok(hit));
        }
        let key = (msg.provider, msg.bucket);
        if let Some(flight) = self.reads.get(&key) {
            if flight.writes_done == self.writes_done {
                let (tx, rx) = tokio::sync::oneshot::channel();
                self.read_waiters.entry(flight.id).or_default().push(tx);
                let wait = async move { rx.await.unwrap_or(Err(StoreFailed)) };
                return ActorResponse::r#async(Box::pin(wait.into_actor(self).map(
                    move |result, act, _| {
                        if let Ok(Some(_)) = &result {
                            act.record_get(&key.0, &key.1);
                        }
                        result
                    },
                )));
            }
        }
        self.next_read += 1;
        let id = self.next_read;
        let flight = ReadFlight {
            id,
            writes_done: self.writes_done,
        };
        // A newer flight replaces an older one for later joiners; the older one still
        // answers the waiters that joined it.
        self.reads.insert(key.clone(), flight);
        let (p, b) = key.clone();
        let read = self.run("get_token", None, move |s| s.get_served_token(&p, &b));
        ActorResponse::r#async(read.map(move |result, act, _| {
            if act.reads.get(&key).is_some_and(|f| f.id == id) {
                act.reads.remove(&key);
            }
            for waiter in act.read_waiters.remove(&id).unwrap_or_default() {
                let _ = waiter.send(result.clone());
            }
            if let Ok(Some(_)) = &result {
                act.record_get(&key.0, &key.1);
            }
            result
        }))
    }
}

/// What became of a [`SaveToken`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Saved {
    /// The merged token was written.
    Written,
    /// The merged token's served form would exceed
    /// [`MAX_SERVED_TOKEN_LEN`](crate::protocol::MAX_SERVED_TOKEN_LEN), so it could never be
    /// served; nothing was written. The session answers `INVALID_REQUEST`.
    TooLarge,
    /// A partial token with nothing stored to merge it into (or a merge that is still
    /// incomplete); nothing was written. The session answers `INVALID_REQUEST` naming the
    /// missing field.
    Invalid(crate::token::TokenError),
    /// The request was cancelled before the write began; nothing was written and nobody
    /// waits for this answer.
    Cancelled,
}

/// Merges a token from the sandbox (already without refresh token) into the store, unless
/// the merged token could no longer be served in one frame (then nothing is written).
///
/// The backend checks the size under the same lock as its read and write
/// ([`Backend::save_token`]), so no other save, of this server or another process, slips
/// between the check and the write.
#[derive(Debug, Message)]
#[rtype(result = "StoreResult<Saved>")]
pub struct SaveToken {
    /// Provider.
    pub provider: String,
    /// Bucket.
    pub bucket: String,
    /// The incoming token.
    pub token: Token,
    /// For a request the client may cancel: the write happens only if the gate is still
    /// open when it begins (see [`WriteGate`]).
    pub gate: Option<WriteGate>,
}

/// Decides, once, between a write and the cancellation of the request that asked for it
/// (PROTOCOL.md §13: a cancelled write is applied whole or not at all). The store commits
/// the gate just before the backend call that writes; a cancel closes it only while it is
/// still open. Whichever comes first wins, and the other learns it: a cancel that comes
/// too late answers `false` and the request keeps its own reply.
#[derive(Debug, Clone, Default)]
pub struct WriteGate(Arc<std::sync::atomic::AtomicU8>);

impl WriteGate {
    const OPEN: u8 = 0;
    const COMMITTED: u8 = 1;
    const CANCELLED: u8 = 2;

    fn swap_from_open(&self, to: u8) -> bool {
        use std::sync::atomic::Ordering::AcqRel;
        match self
            .0
            .compare_exchange(Self::OPEN, to, AcqRel, std::sync::atomic::Ordering::Acquire)
        {
            Ok(_) => true,
            Err(now) => now == to,
        }
    }

    /// The write begins: true unless the request was cancelled first.
    pub fn commit(&self) -> bool {
        self.swap_from_open(Self::COMMITTED)
    }

    /// The request is cancelled: true unless its write has begun.
    pub fn cancel(&self) -> bool {
        self.swap_from_open(Self::CANCELLED)
    }
}

/// True when `gate` lets the write go ahead (no gate: always).
fn may_write(gate: Option<&WriteGate>) -> bool {
    gate.is_none_or(WriteGate::commit)
}

impl Handler<SaveToken> for CredentialStore {
    type Result = ResponseActFuture<Self, StoreResult<Saved>>;

    fn handle(&mut self, msg: SaveToken, _: &mut Context<Self>) -> Self::Result {
        let key = (msg.provider.clone(), msg.bucket.clone());
        let save = self.run("save_token", Some((&key.0, &key.1)), move |s| {
            if !may_write(msg.gate.as_ref()) {
                return Ok(Saved::Cancelled);
            }
            // The backend measures the merged token under its own lock (the file store's
            // flock, shared with every process on the store), so no save slips in between.
            match s.save_token(&msg.provider, &msg.bucket, &msg.token, SaveMode::Merge) {
                Ok(()) => Ok(Saved::Written),
                Err(StoreError::InvalidToken(e)) => Ok(Saved::Invalid(e)),
                Err(StoreError::TooLarge { len, limit }) => {
                    tracing::warn!(
                        provider = %msg.provider,
                        bucket = %msg.bucket,
                        served_len = len,
                        limit,
                        "save_token refused: the merged token would be too large to serve"
                    );
                    Ok(Saved::TooLarge)
                }
                Err(e) => Err(e),
            }
        });
        Box::pin(save.map(|result, act, _| {
            act.writes_done += 1;
            result
        }))
    }
}

/// Deletes a token. A failing delete is logged and still reported as done (PROTOCOL.md §7).
#[derive(Debug, Message)]
#[rtype(result = "StoreResult<()>")]
pub struct RemoveToken {
    /// Provider.
    pub provider: String,
    /// Bucket.
    pub bucket: String,
    /// For a request the client may cancel (see [`WriteGate`]).
    pub gate: Option<WriteGate>,
}

impl Handler<RemoveToken> for CredentialStore {
    type Result = ResponseActFuture<Self, StoreResult<()>>;

    fn handle(&mut self, msg: RemoveToken, _: &mut Context<Self>) -> Self::Result {
        let key = (msg.provider.clone(), msg.bucket.clone());
        let remove = self.run("remove_token", Some((&key.0, &key.1)), move |s| {
            if !may_write(msg.gate.as_ref()) {
                return Ok(());
            }
            s.remove_token(&msg.provider, &msg.bucket).map(drop)
        });
        // The failure itself was logged by `run`; the protocol answers success.
        Box::pin(remove.map(|_, act, _| {
            act.writes_done += 1;
            Ok(())
        }))
    }
}

/// Lists providers holding tokens (unfiltered; the session asks the policy to filter).
/// A store that cannot be listed gives an empty list and a logged warning.
#[derive(Debug, Message)]
#[rtype(result = "Vec<String>")]
pub struct ListProviders;

impl Handler<ListProviders> for CredentialStore {
    type Result = ResponseActFuture<Self, Vec<String>>;

    fn handle(&mut self, _: ListProviders, _: &mut Context<Self>) -> Self::Result {
        Box::pin(
            self.run("list_providers", None, |s| s.list_providers())
                .map(|r, _, _| r.unwrap_or_default()),
        )
    }
}

/// Lists the buckets of a provider (unfiltered).
#[derive(Debug, Message)]
#[rtype(result = "Vec<String>")]
pub struct ListBuckets {
    /// Provider.
    pub provider: String,
}

impl Handler<ListBuckets> for CredentialStore {
    type Result = ResponseActFuture<Self, Vec<String>>;

    fn handle(&mut self, msg: ListBuckets, _: &mut Context<Self>) -> Self::Result {
        let list = self.run("list_buckets", None, move |s| s.list_buckets(&msg.provider));
        Box::pin(list.map(|r, _, _| r.unwrap_or_default()))
    }
}

/// Stats of `provider:bucket`; `None` when no token is stored there (and it is not
/// `sourced`).
#[derive(Debug, Message)]
#[rtype(result = "StoreResult<Option<BucketStats>>")]
pub struct GetStats {
    /// Provider.
    pub provider: String,
    /// Bucket.
    pub bucket: String,
    /// Served by a command source: it exists whatever the store holds.
    pub sourced: bool,
}

/// Something else (a refresh) wrote a token: reads begun before now are not shared with
/// later `get_token`s.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Wrote;

impl Handler<Wrote> for CredentialStore {
    type Result = ();

    fn handle(&mut self, _: Wrote, _: &mut Context<Self>) {
        self.writes_done += 1;
    }
}

/// Counts a `get_token` answered from elsewhere (a command source) in the stats.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct CountGet {
    /// Provider.
    pub provider: String,
    /// Bucket.
    pub bucket: String,
}

impl Handler<CountGet> for CredentialStore {
    type Result = ();

    fn handle(&mut self, msg: CountGet, _: &mut Context<Self>) {
        self.record_get(&msg.provider, &msg.bucket);
    }
}

impl Handler<GetStats> for CredentialStore {
    type Result = ResponseActFuture<Self, StoreResult<Option<BucketStats>>>;

    fn handle(&mut self, msg: GetStats, _: &mut Context<Self>) -> Self::Result {
        if msg.sourced {
            return Box::pin(fut::ready(Ok(Some(
                self.stats_for(&msg.provider, &msg.bucket),
            ))));
        }
        let (p, b) = (msg.provider.clone(), msg.bucket.clone());
        let exists = self.run("get_bucket_stats", None, move |s| {
            Ok(s.get_served_token(&p, &b)?.is_some())
        });
        Box::pin(exists.map(move |r, act, _| {
            r.map(|found| found.then(|| act.stats_for(&msg.provider, &msg.bucket)))
        }))
    }
}

/// Reads an API key.
#[derive(Debug, Message)]
#[rtype(result = "StoreResult<Option<Secret>>")]
pub struct GetKey {
    /// Key name.
    pub name: String,
}

impl Handler<GetKey> for CredentialStore {
    type Result = ActorResponse<Self, StoreResult<Option<Secret>>>;

    fn handle(&mut self, msg: GetKey, _: &mut Context<Self>) -> Self::Result {
        if let Some(hit) = self.backend.cached_key(&msg.name) {
            return ActorResponse::reply(Ok(hit));
        }
        ActorResponse::r#async(self.run("get_api_key", None, move |s| s.get_key(&msg.name)))
    }
}

/// Lists API key names (unfiltered).
#[derive(Debug, Message)]
#[rtype(result = "Vec<String>")]
pub struct ListKeys;

impl Handler<ListKeys> for CredentialStore {
    type Result = ResponseActFuture<Self, Vec<String>>;

    fn handle(&mut self, _: ListKeys, _: &mut Context<Self>) -> Self::Result {
        Box::pin(
            self.run("list_api_keys", None, |s| s.list_keys())
                .map(|r, _, _| r.unwrap_or_default()),
        )
    }
}

/// Shutdown step: wipe every secret held in memory (backend contents, counters) and stop.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Clear;

impl Handler<Clear> for CredentialStore {
    type Result = ();

    fn handle(&mut self, _: Clear, ctx: &mut Context<Self>) {
        self.backend.clear();
        self.stats.clear();
        self.locks.clear();
        self.reads.clear();
        self.read_waiters.clear();
        if let Some(workers) = self.workers.take() {
            workers.release();
        }
        actix::ActorContext::stop(ctx);
    }
}
