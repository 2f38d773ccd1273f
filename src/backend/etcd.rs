//! The etcd store (`--store etcd://HOST:PORT[,HOST:PORT...]/PREFIX`): one store shared by a
//! fleet of hosts, kept consistent by etcd (linearizable compare-and-swap transactions,
//! leases, watches) rather than by any protocol between credproxy instances.
//!
//! **Keys** (all under `/PREFIX/`):
//!
//! | key | value |
//! |---|---|
//! | `tokens/<provider>/<bucket>` | the token, sealed |
//! | `keys/<name>` | the API key, sealed |
//! | `state/<provider>/<bucket>` | the refresh bookkeeping (JSON, never secret) |
//! | `locks/<provider>/<bucket>/…` | etcd lock keys of the refresh lock, on a lease |
//! | `meta/key-check` | a sealed marker that tells a wrong data key at open |
//!
//! **Sealed before they leave the host.** Tokens and keys are sealed with the data key
//! ([`seal`](super::seal): AES-256-GCM, the full etcd key as associated data), so
//! etcd's operators, its backups and anyone reading its disks see neither a refresh token
//! nor an API key, and a value copied to another key does not open. Every host of a fleet
//! loads the same data key (`--store-key FILE`); the first host to write records a sealed
//! marker at `meta/key-check`, and a host with another key is then refused at open
//! instead of failing on each value.
//!
//! **Writes are compare-and-swap** on the keys' `mod_revision`: a save reads the token and
//! its bookkeeping, merges, and writes both in one transaction that succeeds only if
//! neither changed meanwhile; a save that lost the race reads and merges again (bounded
//! tries). A refresh's write ([`Backend::finish_refresh`]) is the same transaction, so the
//! refresh token it compares against is the one stored at the moment of the write: a
//! host whose lock ran out cannot overwrite a newer token.
//!
//! **Refresh across hosts**: [`Backend::refresh_lock`] is an etcd lock (the v3 lock
//! service) on a lease per provider:bucket, taken by the refresh engine before it re-reads
//! the token, so one host in the whole fleet sends a refresh token at a time; the others
//! wait, re-read, and find the token already refreshed. The lease's TTL is a little above
//! the longest refresh (its HTTP deadline); a waiter keeps its lease alive while it waits
//! and renews it once on taking the lock, so a lock holder's whole request always fits in
//! its lease, and a host that dies (or hangs) holding the lock frees it when the lease
//! expires.
//! Dropping the lock releases it at once (unlock and lease revoke, spawned: a drop never
//! blocks).
//!
//! **Read cache**: with `serve`/`exec`, tokens and keys as served are kept in a
//! [`ReadCache`] that a watch on the prefix keeps honest: any change under `tokens/` or
//! `keys/`, by any host, drops it. When the watch fails (a member down, a compaction), the
//! cache is suspended (every read goes to etcd) until the watch is re-established from a
//! fresh revision.
//!
//! **Faults**: every operation is bounded by [`OP_TIMEOUT`]; with etcd unreachable a call
//! fails within it ([`StoreError::Etcd`], which the server answers `INTERNAL_ERROR`), and
//! the client reconnects by itself when a member is back. Errors never carry a value.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions,
    Identity, LockOptions, TlsOptions, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use zeroize::{Zeroize, Zeroizing};

use super::seal::DataKey;
use super::watch::ReadCache;
use super::{
    check_name as check, Backend, RefreshLock, RefreshState, RefreshWrite, SaveMode, StoreError,
};
use crate::names::NameKind;
use crate::secret::Secret;
use crate::token::{ServedToken, Token};

/// The bound on one store operation (all its round trips and retries): under the
/// `CredentialStore`'s and the refresh engine's own 15 s, so the worker thread is free
/// again before they give up.
pub const OP_TIMEOUT: Duration = Duration::from_secs(8);

/// The bound on connecting (and authenticating) at open.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Compare-and-swap attempts before a write gives up (another writer won every race).
const CAS_TRIES: u32 = 16;

/// The longest wait for another host's refresh lock: the refresh engine gives up after
/// the longest refresh plus 5 s ([`lock_wait`](crate::refresh)); past it the wait is
/// abandoned and its lease revoked.
const LOCK_WAIT: Duration = Duration::from_secs(45);

/// The first pause before the watch is set up again after an error; it doubles to
/// [`WATCH_RETRY_MAX`].
const WATCH_RETRY_MIN: Duration = Duration::from_millis(200);
const WATCH_RETRY_MAX: Duration = Duration::from_secs(5);

/// The refresh lock's lease TTL when none is given: the default refresh deadline (40 s,
/// all attempts) plus 2 s, so a holder's request always ends inside its lease, and the
/// lease runs out before a waiter's own wait (the deadline plus 5 s) does.
pub const DEFAULT_LOCK_TTL: Duration = Duration::from_secs(42);

/// How an etcd store is reached. The password is a [`Secret`]; nothing here is logged.
pub struct EtcdOptions {
    /// `HOST:PORT` of each member.
    pub endpoints: Vec<String>,
    /// The key prefix, without leading or trailing `/`.
    pub prefix: String,
    /// The data key that seals every value.
    pub data_key: DataKey,
    /// TLS: the CA certificate (PEM) the members' certificates are checked against.
    pub ca: Option<PathBuf>,
    /// TLS client certificate and key (PEM) to authenticate with.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// User name and password to authenticate with.
    pub user: Option<(String, Secret)>,
    /// Keep a watch-fed read cache (`serve`, `exec`).
    pub cached: bool,
    /// The refresh lock's lease TTL ([`DEFAULT_LOCK_TTL`]).
    pub lock_ttl: Duration,
}

impl std::fmt::Debug for EtcdOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdOptions")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .field("tls", &self.ca.is_some())
            .field("user", &self.user.as_ref().map(|(u, _)| u))
            .finish_non_exhaustive()
    }
}

/// A credential store in an etcd cluster.
pub struct EtcdBackend {
    /// `/PREFIX/`.
    root: String,
    /// `etcd://HOST:PORT,.../PREFIX`, for messages.
    name: String,
    key: Arc<DataKey>,
    /// A private runtime: the gRPC connections and the watch live on it, and the
    /// synchronous trait methods (called from worker threads) wait on it.
    rt: super::PrivateRuntime,
    client: Client,
    cache: Option<Arc<ReadCache>>,
    lock_ttl: Duration,
    /// Set once the data key matched the store's marker (or this process recorded it).
    key_checked: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for EtcdBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdBackend")
            .field("store", &self.name)
            .finish_non_exhaustive()
    }
}

fn etcd_err(text: impl Into<String>) -> StoreError {
    StoreError::Etcd(text.into())
}

/// An etcd client error as a store error: the gRPC status's message (etcd's own words,
/// which never echo a value) or the transport's, with the causes below it (a TLS or
/// connection failure is only named there), and a hint for the usual mistakes.
fn rpc_err(what: &str, e: etcd_client::Error) -> StoreError {
    let mut text = match &e {
        etcd_client::Error::GRpcStatus(status) => {
            format!("{:?}: {}", status.code(), status.message())
        }
        other => other.to_string(),
    };
    let mut cause = match &e {
        etcd_client::Error::GRpcStatus(status) => std::error::Error::source(status),
        etcd_client::Error::TransportError(t) => std::error::Error::source(t),
        other => std::error::Error::source(other),
    };
    while let Some(c) = cause {
        let line = c.to_string();
        if !text.contains(&line) {
            text.push_str(": ");
            text.push_str(&line);
        }
        cause = c.source();
    }
    let hint = if text.contains("UnknownIssuer") || text.contains("certificate") {
        "; check --etcd-ca (the CA that signed the members' certificates, which need a \
         subjectAltName for the address given) and --etcd-cert/--etcd-key"
    } else if text.contains("permission denied") {
        "; the etcd user (or the client certificate's CN) needs readwrite on the prefix"
    } else if text.contains("authentication failed") || text.contains("invalid auth token") {
        "; check --etcd-user and --etcd-password-file"
    } else if text.contains("user name is empty") || text.contains("Unauthenticated") {
        "; the cluster has authentication on: give --etcd-user and --etcd-password-file, or a \
         client certificate"
    } else if text.contains("request is too large") {
        "; the cluster refuses requests over its --max-request-bytes (1.5 MiB by default): \
         raise it on every member for tokens that large"
    } else if text.contains("transport error") {
        "; if the cluster speaks TLS, give --etcd-ca (and --etcd-cert/--etcd-key if it \
         requires client certificates)"
    } else {
        ""
    };
    etcd_err(format!("{what}: {text}{hint}"))
}

/// How often an RPC refused as `Unavailable` (no connection to the member it went to, no
/// leader yet) is sent again, after pauses of 50, 100, 200, 400 and 800 ms: the client
/// balances over the members and reconnects in the background, so a member just down or
/// just back costs a retry, not an error, while a cluster that is down altogether still
/// fails in about 1.5 s.
const UNAVAILABLE_RETRIES: u32 = 5;

/// Runs `rpc` (on a clone of `client`), again while it fails with `Unavailable`, at most
/// [`UNAVAILABLE_RETRIES`] more times. Every write sent through it is idempotent or a
/// compare-and-swap, so a retried request that did land the first time changes nothing
/// more (a lost compare is read and decided again).
async fn retry<T, F, Fut>(client: &Client, mut rpc: F) -> Result<T, etcd_client::Error>
where
    F: FnMut(Client) -> Fut,
    Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
{
    let mut pause = Duration::from_millis(50);
    let mut tries = 0;
    loop {
        match rpc(client.clone()).await {
            Err(etcd_client::Error::GRpcStatus(status))
                if status.code() == tonic::Code::Unavailable && tries < UNAVAILABLE_RETRIES =>
            {
                tries += 1;
                tokio::time::sleep(pause).await;
                pause *= 2;
            }
            other => return other,
        }
    }
}

/// Reads a PEM file named by an option, with a message naming the option.
fn read_pem(option: &str, path: &Path) -> Result<Zeroizing<Vec<u8>>, StoreError> {
    std::fs::read(path)
        .map(Zeroizing::new)
        .map_err(|e| etcd_err(format!("{option} {}: {e}", path.display())))
}

/// One value of a transaction's read: its bytes and `mod_revision` (0: absent).
struct Read {
    value: Option<Zeroizing<Vec<u8>>>,
    rev: i64,
}

fn take_get(resp: Option<TxnOpResponse>) -> Read {
    match resp {
        Some(TxnOpResponse::Get(mut get)) => match get.take_kvs().into_iter().next() {
            Some(kv) => {
                let rev = kv.mod_revision();
                let (_, value) = kv.into_key_value();
                Read {
                    value: Some(Zeroizing::new(value)),
                    rev,
                }
            }
            None => Read {
                value: None,
                rev: 0,
            },
        },
        _ => Read {
            value: None,
            rev: 0,
        },
    }
}

impl EtcdBackend {
    /// Connects to the cluster (bounded by a few seconds), checks that the store can be
    /// read and that `options.data_key` is this store's key (when a host has written
    /// one: the first write records it), and starts the read cache's watch when
    /// `options.cached`. It blocks the calling thread (never call it inside an async
    /// task); the backend's own runtime does the work.
    pub fn open(options: EtcdOptions) -> Result<EtcdBackend, StoreError> {
        let rt = super::PrivateRuntime::start("credproxy-etcd")?;
        let name = format!("etcd://{}/{}", options.endpoints.join(","), options.prefix);
        let mut connect = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3))
            .with_keep_alive_while_idle(true);
        if options.ca.is_some() || options.client_cert.is_some() {
            let mut tls = TlsOptions::new();
            if let Some(ca) = &options.ca {
                tls = tls.ca_certificate(Certificate::from_pem(&*read_pem("--etcd-ca", ca)?));
            }
            if let Some((cert, key)) = &options.client_cert {
                let cert = read_pem("--etcd-cert", cert)?;
                let key = read_pem("--etcd-key", key)?;
                tls = tls.identity(Identity::from_pem(&*cert, &*key));
            }
            connect = connect.with_tls(tls);
        }
        if let Some((user, password)) = &options.user {
            // The crate keeps the password as a plain String inside its options, which we
            // never format; etcd's auth tokens expire, so they are renewed on demand.
            connect = connect
                .with_user(user.clone(), password.expose().to_owned())
                .with_auto_token_refresh(true);
        }
        let endpoints = options.endpoints.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        rt.spawn(async move {
            let _ = tx.send(
                tokio::time::timeout(CONNECT_TIMEOUT, Client::connect(endpoints, Some(connect)))
                    .await,
            );
        });
        let no_answer = || {
            etcd_err(format!(
                "{name}: no member answered within {} s",
                CONNECT_TIMEOUT.as_secs()
            ))
        };
        let client = match rx.recv_timeout(CONNECT_TIMEOUT + Duration::from_secs(1)) {
            Ok(Ok(Ok(client))) => client,
            Ok(Ok(Err(e))) => return Err(rpc_err(&format!("{name}: cannot connect"), e)),
            Ok(Err(_)) | Err(_) => return Err(no_answer()),
        };
        let backend = EtcdBackend {
            root: format!("/{}/", options.prefix),
            name,
            key: Arc::new(options.data_key),
            rt,
            client,
            cache: options.cached.then(|| Arc::new(ReadCache::detached())),
            lock_ttl: options.lock_ttl,
            key_checked: std::sync::atomic::AtomicBool::new(false),
        };
        backend.check_data_key(false)?;
        if let Some(cache) = &backend.cache {
            backend.rt.spawn(watch_loop(
                backend.client.clone(),
                backend.root.clone(),
                Arc::clone(cache),
            ));
        }
        Ok(backend)
    }

    /// The store's URL (no credentials).
    pub fn name(&self) -> &str {
        &self.name
    }

    fn token_key(&self, provider: &str, bucket: &str) -> String {
        format!("{}tokens/{provider}/{bucket}", self.root)
    }

    fn state_key(&self, provider: &str, bucket: &str) -> String {
        format!("{}state/{provider}/{bucket}", self.root)
    }

    fn api_key(&self, name: &str) -> String {
        format!("{}keys/{name}", self.root)
    }

    /// Runs `op` on the private runtime, bounded by [`OP_TIMEOUT`]; `what` names the
    /// operation in the error.
    fn call<T: Send + 'static>(
        &self,
        what: &str,
        op: impl std::future::Future<Output = Result<T, StoreError>> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.call_within(what, OP_TIMEOUT, op)
    }

    fn call_within<T: Send + 'static>(
        &self,
        what: &str,
        limit: Duration,
        op: impl std::future::Future<Output = Result<T, StoreError>> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.rt.spawn(async move {
            let _ = tx.send(tokio::time::timeout(limit, op).await);
        });
        let timed_out = || {
            etcd_err(format!(
                "{}: {what} got no answer within {} s (is the cluster reachable and does it \
                 have a leader?)",
                self.name,
                limit.as_secs()
            ))
        };
        match rx.recv_timeout(limit + Duration::from_secs(1)) {
            Ok(Ok(result)) => result,
            Ok(Err(_)) | Err(_) => Err(timed_out()),
        }
    }

    /// Opens a sealed value read from `key`.
    fn open_value(&self, key: &str, sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, StoreError> {
        self.key.open(key, sealed).map_err(|_| {
            etcd_err(format!(
                "{}: the value at {key} does not open with the data key (written with \
                 another key, or altered); nothing was changed",
                self.name
            ))
        })
    }

    fn seal_value(&self, key: &str, plain: &[u8]) -> Result<Vec<u8>, StoreError> {
        self.key
            .seal(key, plain)
            .map_err(|e| etcd_err(format!("{}: sealing failed: {e}", self.name)))
    }

    fn parse_token(&self, key: &str, sealed: &[u8]) -> Result<Token, StoreError> {
        let plain = self.open_value(key, sealed)?;
        Token::from_json(&plain)
            .map_err(|e| etcd_err(format!("{}: the token at {key} is corrupt: {e}", self.name)))
    }

    fn parse_state(&self, key: &str, bytes: Option<&[u8]>) -> Result<RefreshState, StoreError> {
        match bytes {
            None => Ok(RefreshState::default()),
            Some(bytes) => serde_json::from_slice(bytes).map_err(|e| {
                etcd_err(format!(
                    "{}: the refresh state at {key} is corrupt: {e}",
                    self.name
                ))
            }),
        }
    }

    /// Reads the token and the refresh state of `provider:bucket` at one revision.
    fn read_pair(&self, provider: &str, bucket: &str) -> Result<(Read, Read), StoreError> {
        let (tk, sk) = (
            self.token_key(provider, bucket),
            self.state_key(provider, bucket),
        );
        let client = self.client.clone();
        self.call("read", async move {
            let txn = Txn::new().and_then([TxnOp::get(tk, None), TxnOp::get(sk, None)]);
            let resp = retry(&client, |mut c| {
                let t = txn.clone();
                async move { c.txn(t).await }
            })
            .await
            .map_err(|e| rpc_err("read", e))?;
            let mut ops = resp.op_responses().into_iter();
            Ok((take_get(ops.next()), take_get(ops.next())))
        })
    }

    /// Writes `token` (sealed; `None`: leave it) and `state` (default: delete) of
    /// `provider:bucket` if neither changed since the revisions read. False: lost a race.
    fn write_pair(
        &self,
        provider: &str,
        bucket: &str,
        read: (&Read, &Read),
        token: Option<&Token>,
        state: &RefreshState,
    ) -> Result<bool, StoreError> {
        let (tk, sk) = (
            self.token_key(provider, bucket),
            self.state_key(provider, bucket),
        );
        let mut ops = Vec::with_capacity(2);
        if let Some(token) = token {
            let mut json = token.to_json();
            let sealed = self.seal_value(&tk, &json);
            json.zeroize();
            ops.push(TxnOp::put(tk.clone(), sealed?, None));
        }
        if *state == RefreshState::default() {
            if read.1.rev != 0 {
                ops.push(TxnOp::delete(sk.clone(), None));
            }
        } else {
            let json =
                serde_json::to_vec(state).map_err(|e| etcd_err(format!("{}: {e}", self.name)))?;
            ops.push(TxnOp::put(sk.clone(), json, None));
        }
        if ops.is_empty() {
            return Ok(true);
        }
        let compares = vec![
            Compare::mod_revision(tk, CompareOp::Equal, read.0.rev),
            Compare::mod_revision(sk, CompareOp::Equal, read.1.rev),
        ];
        let client = self.client.clone();
        let won = self.call("write", async move {
            let txn = Txn::new().when(compares).and_then(ops);
            let resp = retry(&client, |mut c| {
                let t = txn.clone();
                async move { c.txn(t).await }
            })
            .await
            .map_err(|e| rpc_err("write", e))?;
            Ok(resp.succeeded())
        })?;
        if won {
            self.invalidate();
        }
        Ok(won)
    }

    fn invalidate(&self) {
        if let Some(cache) = &self.cache {
            cache.invalidate();
        }
    }

    /// A short random pause after a lost compare-and-swap, so that racing writers spread.
    fn backoff(attempt: u32) {
        use rand::Rng;
        let cap = 5u64 << attempt.min(4);
        std::thread::sleep(Duration::from_millis(rand::thread_rng().gen_range(1..=cap)));
    }

    fn conflict(&self, what: &str) -> StoreError {
        etcd_err(format!(
            "{}: {what} lost {CAS_TRIES} compare-and-swap races in a row to other writers; \
             nothing was written",
            self.name
        ))
    }

    /// The value at `key` (linearizable read), wiped when dropped.
    fn get_value(&self, key: &str) -> Result<Option<Zeroizing<Vec<u8>>>, StoreError> {
        let client = self.client.clone();
        let k = key.to_owned();
        self.call("read", async move {
            let mut resp = retry(&client, |mut c| {
                let k = k.clone();
                async move { c.get(k, None).await }
            })
            .await
            .map_err(|e| rpc_err("read", e))?;
            Ok(resp
                .take_kvs()
                .into_iter()
                .next()
                .map(|kv| Zeroizing::new(kv.into_key_value().1)))
        })
    }

    fn read_token(&self, provider: &str, bucket: &str) -> Result<Option<Token>, StoreError> {
        let key = self.token_key(provider, bucket);
        self.get_value(&key)?
            .map(|v| self.parse_token(&key, &v))
            .transpose()
    }

    fn read_key(&self, name: &str) -> Result<Option<Secret>, StoreError> {
        let key = self.api_key(name);
        let value = self.get_value(&key)?;
        let Some(sealed) = value else {
            return Ok(None);
        };
        let plain = self.open_value(&key, &sealed)?;
        match std::str::from_utf8(&plain) {
            Ok(text) => Ok(Some(Secret::new(text.to_owned()))),
            Err(_) => Err(etcd_err(format!(
                "{}: the API key at {key} is not UTF-8",
                self.name
            ))),
        }
    }

    /// The names one level below `dir` (`tokens/`, `tokens/<provider>/`, `keys/`), sorted.
    fn names_below(&self, dir: String, depth: usize) -> Result<Vec<String>, StoreError> {
        let client = self.client.clone();
        let d = dir.clone();
        let keys = self.call("list", async move {
            let resp = retry(&client, |mut c| {
                let d = d.clone();
                async move {
                    c.get(d, Some(GetOptions::new().with_prefix().with_keys_only()))
                        .await
                }
            })
            .await
            .map_err(|e| rpc_err("list", e))?;
            Ok(resp
                .kvs()
                .iter()
                .map(|kv| kv.key().to_vec())
                .collect::<Vec<_>>())
        })?;
        let mut names: Vec<String> = keys
            .iter()
            .filter_map(|k| std::str::from_utf8(k).ok()?.strip_prefix(&dir))
            .filter_map(|rest| rest.split('/').nth(depth).map(str::to_owned))
            .collect();
        names.sort();
        names.dedup();
        Ok(names)
    }

    /// Refuses a data key other than the one this store was first written with, checked
    /// against a sealed marker. `record`: a write is coming, and a store without a marker
    /// gets one (the first host to write a value decides the key; a host that only reads
    /// an empty store records nothing). Once the marker has been seen, writes skip this.
    fn check_data_key(&self, record: bool) -> Result<(), StoreError> {
        use std::sync::atomic::Ordering;
        const MARKER: &[u8] = b"credproxy data key check v1";
        if self.key_checked.load(Ordering::Acquire) {
            return Ok(());
        }
        let key = format!("{}meta/key-check", self.root);
        let sealed = self.seal_value(&key, MARKER)?;
        let client = self.client.clone();
        let k = key.clone();
        let stored = self.call("open", async move {
            let put = if record {
                vec![TxnOp::put(k.clone(), sealed, None)]
            } else {
                Vec::new()
            };
            let txn = Txn::new()
                .when([Compare::create_revision(k.clone(), CompareOp::Equal, 0)])
                .and_then(put)
                .or_else([TxnOp::get(k, None)]);
            let resp = retry(&client, |mut c| {
                let t = txn.clone();
                async move { c.txn(t).await }
            })
            .await
            .map_err(|e| rpc_err("open", e))?;
            if resp.succeeded() {
                return Ok(None);
            }
            Ok(take_get(resp.op_responses().into_iter().next()).value)
        })?;
        match stored {
            None => {
                if record {
                    self.key_checked.store(true, Ordering::Release);
                }
                Ok(())
            }
            Some(sealed) => match self.key.open(&key, &sealed) {
                Ok(plain) if plain.as_slice() == MARKER => {
                    self.key_checked.store(true, Ordering::Release);
                    Ok(())
                }
                _ => Err(etcd_err(format!(
                    "{}: this store was written with another data key; give every host the \
                     same --store-key file",
                    self.name
                ))),
            },
        }
    }
}

/// Keeps `cache` honest: a watch on everything under `root`, from a fresh revision; any
/// change under `tokens/` or `keys/` drops the cache. On an error, a cancel or a
/// compaction the cache is suspended and the watch set up again (backing off), until the
/// cache is shut down.
async fn watch_loop(client: Client, root: String, cache: Arc<ReadCache>) {
    let (tokens, keys) = (format!("{root}tokens/"), format!("{root}keys/"));
    let mut pause = WATCH_RETRY_MIN;
    while !cache.is_shut_down() {
        let mut c = client.clone();
        let started = async {
            // A linearizable read gives the revision everything cached from now on is at
            // least as new as; the watch starts right after it.
            let head = c
                .get(
                    root.clone(),
                    Some(
                        GetOptions::new()
                            .with_prefix()
                            .with_keys_only()
                            .with_limit(1),
                    ),
                )
                .await?;
            let rev = head.header().map_or(0, |h| h.revision());
            let stream = c
                .watch(
                    root.clone(),
                    Some(
                        WatchOptions::new()
                            .with_prefix()
                            .with_start_revision(rev + 1),
                    ),
                )
                .await?;
            Ok::<_, etcd_client::Error>(stream)
        };
        let mut stream = match tokio::time::timeout(OP_TIMEOUT, started).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                tracing::debug!(error = %rpc_err("watch", e), "etcd store: the watch cannot be set up; reads go to etcd");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(WATCH_RETRY_MAX);
                continue;
            }
            Err(_) => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(WATCH_RETRY_MAX);
                continue;
            }
        };
        cache.resume();
        pause = WATCH_RETRY_MIN;
        loop {
            if cache.is_shut_down() {
                return;
            }
            // Bounded, so a shutdown is noticed while nothing changes.
            let msg = match tokio::time::timeout(Duration::from_secs(1), stream.message()).await {
                Err(_) => continue,
                Ok(msg) => msg,
            };
            match msg {
                Ok(Some(resp)) => {
                    if resp.canceled() || resp.compact_revision() > 0 {
                        tracing::info!(
                            reason = resp.cancel_reason(),
                            "etcd store: the watch was cancelled; setting it up again"
                        );
                        break;
                    }
                    let relevant = resp.events().iter().any(|ev| {
                        ev.kv().is_some_and(|kv| {
                            let k = kv.key();
                            k.starts_with(tokens.as_bytes()) || k.starts_with(keys.as_bytes())
                        }) || !matches!(ev.event_type(), EventType::Put | EventType::Delete)
                    });
                    if relevant {
                        cache.invalidate();
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::info!(error = %rpc_err("watch", e), "etcd store: the watch failed; reads go to etcd until it is back");
                    break;
                }
            }
        }
        cache.suspend();
        tokio::time::sleep(pause).await;
    }
}

/// Keeps `lease` alive (a keep-alive every third of its TTL) until aborted or the stream
/// fails.
async fn keep_alive(mut client: Client, lease: i64, ttl: i64) {
    let every = Duration::from_secs((ttl as u64 / 3).max(1));
    let Ok((mut keeper, mut stream)) = client.lease_keep_alive(lease).await else {
        return;
    };
    loop {
        tokio::time::sleep(every).await;
        if keeper.keep_alive().await.is_err() {
            return;
        }
        match stream.message().await {
            Ok(Some(_)) => {}
            _ => return,
        }
    }
}

/// One keep-alive of `lease` (its TTL starts again), bounded; a failure leaves the lease
/// with what it had left from the last one (at least two thirds of its TTL).
async fn renew_once(client: &Client, lease: i64) {
    let mut c = client.clone();
    let renewed = tokio::time::timeout(OP_TIMEOUT, async move {
        let (mut keeper, mut stream) = c.lease_keep_alive(lease).await?;
        keeper.keep_alive().await?;
        stream.message().await
    })
    .await;
    if !matches!(renewed, Ok(Ok(Some(_)))) {
        tracing::debug!("etcd store: the refresh lock's lease could not be renewed on taking it");
    }
}

/// A held refresh lock: released (unlock, lease revoke) when dropped, by a task spawned on
/// the backend's runtime, so a drop never blocks; should that not run, the lease's TTL
/// frees it.
struct HeldLock {
    client: Client,
    handle: tokio::runtime::Handle,
    lease: i64,
    key: Vec<u8>,
}

impl Drop for HeldLock {
    fn drop(&mut self) {
        let (mut client, lease, key) = (
            self.client.clone(),
            self.lease,
            std::mem::take(&mut self.key),
        );
        self.handle.spawn(async move {
            let _ = tokio::time::timeout(OP_TIMEOUT, async {
                let _ = client.unlock(key).await;
                let _ = client.lease_revoke(lease).await;
            })
            .await;
        });
    }
}

impl Backend for EtcdBackend {
    fn is_blocking(&self) -> bool {
        true
    }

    fn get_token(&self, provider: &str, bucket: &str) -> Result<Option<Token>, StoreError> {
        check(NameKind::Provider, provider)?;
        check(NameKind::Bucket, bucket)?;
        self.read_token(provider, bucket)
    }

    fn save_token(
        &self,
        provider: &str,
        bucket: &str,
        incoming: &Token,
        mode: SaveMode,
    ) -> Result<(), StoreError> {
        check(NameKind::Provider, provider)?;
        check(NameKind::Bucket, bucket)?;
        self.check_data_key(true)?;
        let tk = self.token_key(provider, bucket);
        let sk = self.state_key(provider, bucket);
        for attempt in 0..CAS_TRIES {
            let (token_read, state_read) = self.read_pair(provider, bucket)?;
            let stored = match (mode, &token_read.value) {
                (SaveMode::Merge, Some(sealed)) => Some(self.parse_token(&tk, sealed)?),
                _ => None,
            };
            let state = self.parse_state(&sk, state_read.value.as_deref().map(|v| &v[..]))?;
            let (token, state) = super::next_saved(stored, incoming, mode, state)?;
            if self.write_pair(
                provider,
                bucket,
                (&token_read, &state_read),
                Some(&token),
                &state,
            )? {
                return Ok(());
            }
            Self::backoff(attempt);
        }
        Err(self.conflict("a save"))
    }

    fn remove_token(&self, provider: &str, bucket: &str) -> Result<bool, StoreError> {
        check(NameKind::Provider, provider)?;
        check(NameKind::Bucket, bucket)?;
        let (tk, sk) = (
            self.token_key(provider, bucket),
            self.state_key(provider, bucket),
        );
        let client = self.client.clone();
        let removed = self.call("remove", async move {
            let txn = Txn::new().and_then([
                TxnOp::delete(tk, None::<DeleteOptions>),
                TxnOp::delete(sk, None::<DeleteOptions>),
            ]);
            let resp = retry(&client, |mut c| {
                let t = txn.clone();
                async move { c.txn(t).await }
            })
            .await
            .map_err(|e| rpc_err("remove", e))?;
            Ok(matches!(
                resp.op_responses().first(),
                Some(TxnOpResponse::Delete(d)) if d.deleted() > 0
            ))
        })?;
        self.invalidate();
        Ok(removed)
    }

    fn list_providers(&self) -> Result<Vec<String>, StoreError> {
        self.names_below(format!("{}tokens/", self.root), 0)
    }

    fn list_buckets(&self, provider: &str) -> Result<Vec<String>, StoreError> {
        check(NameKind::Provider, provider)?;
        self.names_below(format!("{}tokens/{provider}/", self.root), 0)
    }

    fn get_key(&self, name: &str) -> Result<Option<Secret>, StoreError> {
        check(NameKind::Key, name)?;
        match &self.cache {
            Some(cache) => cache.key_through(name, || self.read_key(name)),
            None => self.read_key(name),
        }
    }

    fn set_key(&self, name: &str, key: &Secret) -> Result<(), StoreError> {
        check(NameKind::Key, name)?;
        self.check_data_key(true)?;
        let k = self.api_key(name);
        let sealed = self.seal_value(&k, key.expose().as_bytes())?;
        let client = self.client.clone();
        self.call("write", async move {
            retry(&client, |mut c| {
                let (k, v) = (k.clone(), sealed.clone());
                async move { c.put(k, v, None).await }
            })
            .await
            .map_err(|e| rpc_err("write", e))?;
            Ok(())
        })?;
        self.invalidate();
        Ok(())
    }

    fn remove_key(&self, name: &str) -> Result<bool, StoreError> {
        check(NameKind::Key, name)?;
        let k = self.api_key(name);
        let client = self.client.clone();
        let removed = self.call("remove", async move {
            let resp = retry(&client, |mut c| {
                let k = k.clone();
                async move { c.delete(k, None).await }
            })
            .await
            .map_err(|e| rpc_err("remove", e))?;
            Ok(resp.deleted() > 0)
        })?;
        self.invalidate();
        Ok(removed)
    }

    fn list_keys(&self) -> Result<Vec<String>, StoreError> {
        self.names_below(format!("{}keys/", self.root), 0)
    }

    /// An etcd lock on a lease of [`EtcdOptions::lock_ttl`], named
    /// `/PREFIX/locks/<provider>/<bucket>`, shared by every host on the store. The wait is
    /// bounded (45 s, the refresh engine's own bound); a wait given up revokes its lease,
    /// so its place in the lock's queue goes with it.
    fn refresh_lock(&self, provider: &str, bucket: &str) -> Result<RefreshLock, StoreError> {
        check(NameKind::Provider, provider)?;
        check(NameKind::Bucket, bucket)?;
        let name = format!("{}locks/{provider}/{bucket}", self.root);
        let ttl = self.lock_ttl.as_secs().max(2) as i64;
        let client = self.client.clone();
        let handle = self.rt.handle().clone();
        let store = self.name.clone();
        self.call_within("refresh lock", LOCK_WAIT + OP_TIMEOUT, async move {
            let grant = retry(
                &client,
                |mut c| async move { c.lease_grant(ttl, None).await },
            );
            let lease = tokio::time::timeout(OP_TIMEOUT, grant)
                .await
                .map_err(|_| etcd_err(format!("{store}: lease grant got no answer")))?
                .map_err(|e| rpc_err("lease grant", e))?
                .id();
            // While waiting, the lease is kept alive: otherwise it would run out during
            // a long wait (another host's whole refresh) and the lock, once had, would be
            // lost at once, letting the next waiter in beside us.
            let waiting = tokio::spawn(keep_alive(client.clone(), lease, ttl));
            let asked = tokio::time::Instant::now();
            let locked = tokio::time::timeout(
                LOCK_WAIT,
                retry(&client, |mut c| {
                    let name = name.clone();
                    async move {
                        c.lock(name, Some(LockOptions::new().with_lease(lease)))
                            .await
                    }
                }),
            )
            .await;
            waiting.abort();
            match locked {
                Ok(Ok(resp)) => {
                    // Held: the lease gets its whole TTL from now, and no more, so a
                    // holder that hangs or dies loses the lock TTL after taking it. A lock
                    // had within a second of the grant has all but that second left (the
                    // TTL is 2 s above the longest refresh): no round trip for it.
                    if asked.elapsed() > Duration::from_secs(1) {
                        renew_once(&client, lease).await;
                    }
                    Ok(RefreshLock::new(HeldLock {
                        client,
                        handle,
                        lease,
                        key: resp.key().to_vec(),
                    }))
                }
                failed => {
                    // Give up our place in the queue now, not when the lease runs out.
                    let mut c = client.clone();
                    tokio::spawn(async move {
                        let _ = tokio::time::timeout(OP_TIMEOUT, c.lease_revoke(lease)).await;
                    });
                    Err(match failed {
                        Ok(Err(e)) => rpc_err("refresh lock", e),
                        _ => etcd_err(format!(
                            "{store}: another host held the refresh lock for over {} s",
                            LOCK_WAIT.as_secs()
                        )),
                    })
                }
            }
        })
    }

    fn refresh_state(&self, provider: &str, bucket: &str) -> Result<RefreshState, StoreError> {
        check(NameKind::Provider, provider)?;
        check(NameKind::Bucket, bucket)?;
        let sk = self.state_key(provider, bucket);
        let bytes = self.get_value(&sk)?;
        self.parse_state(&sk, bytes.as_deref().map(|v| &v[..]))
    }

    /// Read, decide and write as one compare-and-swap on the token and its bookkeeping;
    /// after a lost race `decide` is asked again about what is stored then.
    fn finish_refresh(
        &self,
        provider: &str,
        bucket: &str,
        decide: &mut dyn FnMut(Option<&Token>) -> RefreshWrite,
    ) -> Result<bool, StoreError> {
        check(NameKind::Provider, provider)?;
        check(NameKind::Bucket, bucket)?;
        let (tk, sk) = (
            self.token_key(provider, bucket),
            self.state_key(provider, bucket),
        );
        for attempt in 0..CAS_TRIES {
            let (token_read, state_read) = self.read_pair(provider, bucket)?;
            let stored = token_read
                .value
                .as_ref()
                .map(|sealed| self.parse_token(&tk, sealed))
                .transpose()?;
            let decided = decide(stored.as_ref());
            if stored.is_none() {
                // Removal wins.
                return Ok(false);
            }
            let mut state = self.parse_state(&sk, state_read.value.as_deref().map(|v| &v[..]))?;
            let won = match decided {
                RefreshWrite::Nothing => return Ok(false),
                RefreshWrite::NeedsLogin(mark) => {
                    state.needs_login = Some(mark);
                    self.write_pair(provider, bucket, (&token_read, &state_read), None, &state)?
                }
                RefreshWrite::Token { token, at } => {
                    super::check_storable(&token)?;
                    state.refreshed_at = Some(at);
                    state.needs_login = None;
                    self.write_pair(
                        provider,
                        bucket,
                        (&token_read, &state_read),
                        Some(&token),
                        &state,
                    )?
                }
            };
            if won {
                return Ok(true);
            }
            Self::backoff(attempt);
        }
        Err(self.conflict("a refresh's write"))
    }

    /// Wipes the read cache and stops its watch.
    fn clear(&self) {
        if let Some(cache) = &self.cache {
            cache.shutdown();
        }
    }

    fn get_served_token(
        &self,
        provider: &str,
        bucket: &str,
    ) -> Result<Option<ServedToken>, StoreError> {
        let read = || Ok(self.get_token(provider, bucket)?.map(|t| t.served()));
        match &self.cache {
            Some(cache) => cache.token_through(provider, bucket, read),
            None => read(),
        }
    }

    fn cached_token(&self, provider: &str, bucket: &str) -> Option<Option<ServedToken>> {
        self.cache.as_ref()?.token(provider, bucket)
    }

    fn cached_key(&self, name: &str) -> Option<Option<Secret>> {
        self.cache.as_ref()?.key(name)
    }
}

impl Drop for EtcdBackend {
    fn drop(&mut self) {
        self.clear();
    }
}
