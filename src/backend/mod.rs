//! Storage backends behind one trait: [`memory`] for tests and embedding, [`mod@file`] for
//! `credproxy serve` and `credproxy store`.
//!
//! A backend is synchronous. The [`CredentialStore`](crate::store::CredentialStore) actor
//! runs a blocking backend (the file backend) on tokio's blocking pool and a non-blocking
//! one (the memory backend) inline. Names reaching a backend are already validated
//! (PROTOCOL.md §6); backends check again and refuse invalid names, so no caller can make
//! one touch a path outside its directory.

pub mod etcd;
pub mod file;
pub mod keyring;
pub mod memory;
pub mod seal;
pub mod url;
pub mod watch;

use std::path::PathBuf;

use crate::secret::Secret;
use crate::token::{ServedToken, Token};

pub use etcd::EtcdBackend;
pub use file::FileBackend;
pub use keyring::KeyringBackend;
pub use memory::MemoryBackend;

/// An internal storage failure. Its text may name host paths: it goes to the host's log
/// and to the host program, never across the socket.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A filesystem call failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done (`read`, `write`, `rename`, `lock`, ...).
        op: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// A stored file could not be parsed; it is left untouched.
    #[error("corrupt store file {path}: {reason}")]
    Corrupt {
        /// The file concerned.
        path: PathBuf,
        /// What is wrong with it (never its content).
        reason: String,
    },
    /// A store directory (the root or one below it) is not safe to use: a symlink, not a
    /// directory, owned by another uid, writable by group or others, or below a directory
    /// another non-root uid controls. Nothing was read or written through it.
    #[error("store directory {path} refused: {reason}")]
    Untrusted {
        /// The directory concerned.
        path: PathBuf,
        /// What is wrong with it, and what to do.
        reason: String,
    },
    /// A name failed validation inside the backend.
    #[error("invalid name refused by the store")]
    InvalidName,
    /// The token to store is not complete: a partial token from the sandbox with nothing
    /// stored to merge it into. Nothing was written; the text names the missing field.
    #[error("invalid token: {0}")]
    InvalidToken(crate::token::TokenError),
    /// A token whose served form would be larger than a reply frame can carry
    /// ([`MAX_SERVED_TOKEN_LEN`](crate::protocol::MAX_SERVED_TOKEN_LEN)); nothing was
    /// written.
    #[error("the token is too large: served it would be {len} bytes, over the limit of {limit} bytes that one reply can carry")]
    TooLarge {
        /// The served form's length, merged with the stored token where it merges.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// The OS keyring failed, is locked, is absent or did not answer in time; the text
    /// says what to do (never a secret).
    #[error("OS keyring: {0}")]
    Keyring(String),
    /// The etcd store failed: unreachable, no leader, refused, timed out, a value that does
    /// not open with the data key, or too many lost compare-and-swap races; the text names
    /// the store and what happened (never a value).
    #[error("etcd store: {0}")]
    Etcd(String),
    /// The store was cleared by shutdown and holds nothing any more.
    #[error("the store has been cleared")]
    Cleared,
}

/// Refuses (nothing written) a token that is incomplete (a partial token with nothing
/// to merge it into), or that could not be served in one reply frame.
pub(crate) fn check_storable(token: &Token) -> Result<(), StoreError> {
    token.check_complete().map_err(StoreError::InvalidToken)?;
    let len = token.served_len();
    let limit = crate::protocol::MAX_SERVED_TOKEN_LEN;
    if len > limit {
        Err(StoreError::TooLarge { len, limit })
    } else {
        Ok(())
    }
}

/// What a save writes, decided from what is stored: the token (`incoming` merged into the
/// stored one, or replacing it) after [`check_storable`], and the bucket's refresh state
/// after it (a saved token clears the needs-login mark; a replaced one is a new login whose
/// bookkeeping starts over). Shared by the stores whose save is read, decide, write.
pub(crate) fn next_saved(
    stored: Option<Token>,
    incoming: &Token,
    mode: SaveMode,
    mut state: RefreshState,
) -> Result<(Token, RefreshState), StoreError> {
    let token = match (mode, stored) {
        (SaveMode::Merge, Some(stored)) => stored.merge(incoming),
        _ => incoming.clone(),
    };
    check_storable(&token)?;
    if mode == SaveMode::Replace {
        state = RefreshState::default();
    } else {
        state.needs_login = None;
    }
    Ok((token, state))
}

/// Takes an exclusive `flock` on `file` (opened at `path`), polling without blocking
/// (5 ms doubling to 100 ms) until `wait` has passed: a wait is bounded and never parks a
/// worker thread for good behind a process that hangs holding the lock. Shared by the
/// file and keyring stores' store and refresh locks.
pub(crate) fn flock_polled(
    mut file: std::fs::File,
    path: &std::path::Path,
    wait: std::time::Duration,
) -> Result<nix::fcntl::Flock<std::fs::File>, StoreError> {
    use nix::errno::Errno;
    use nix::fcntl::{Flock, FlockArg};
    use std::time::{Duration, Instant};
    let deadline = Instant::now() + wait;
    let mut pause = Duration::from_millis(5);
    loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(lock),
            Err((f, Errno::EINTR)) => file = f,
            Err((f, Errno::EWOULDBLOCK)) if Instant::now() < deadline => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(100));
                file = f;
            }
            Err((_, errno)) => {
                return Err(StoreError::Io {
                    op: "lock",
                    path: path.to_owned(),
                    source: errno.into(),
                })
            }
        }
    }
}

/// The small runtime a backend over an async client (keyring, etcd) runs its calls on, so
/// that its synchronous methods can be called from any worker thread. Dropped, it shuts
/// down in the background: a backend may be dropped on an async thread, where dropping a
/// runtime the ordinary way would panic.
pub(crate) struct PrivateRuntime(Option<tokio::runtime::Runtime>);

impl PrivateRuntime {
    /// A one-worker runtime whose threads are called `name`.
    pub(crate) fn start(name: &str) -> Result<PrivateRuntime, StoreError> {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(name)
            .enable_all()
            .build()
            .map(|rt| PrivateRuntime(Some(rt)))
            .map_err(|e| StoreError::Io {
                op: "start a runtime",
                path: PathBuf::new(),
                source: e,
            })
    }
}

impl std::ops::Deref for PrivateRuntime {
    type Target = tokio::runtime::Runtime;

    fn deref(&self) -> &tokio::runtime::Runtime {
        self.0.as_ref().expect("the runtime lives until drop")
    }
}

impl Drop for PrivateRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// Refuses a name that is not valid for `kind`: every backend checks again, so no caller
/// can make one touch a path outside its directory.
pub(crate) fn check_name(kind: crate::names::NameKind, name: &str) -> Result<(), StoreError> {
    if crate::names::is_valid(kind, name) {
        Ok(())
    } else {
        Err(StoreError::InvalidName)
    }
}

/// How [`Backend::save_token`] combines the incoming token with a stored one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveMode {
    /// Merge into the stored token (PROTOCOL.md §6): what the sandbox's `save_token` does.
    Merge,
    /// Replace the stored token entirely: what the host's `credproxy store token set` does.
    Replace,
}

/// Per provider:bucket refresh bookkeeping kept in the store beside the token, so every
/// server and host command on one store sees it (PROTOCOL.md §14). Never a secret.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RefreshState {
    /// Epoch seconds of the last successful refresh, by any process: the cooldown counts
    /// from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refreshed_at: Option<u64>,
    /// Set by an auth failure: the refresh token was refused and the bucket needs a new
    /// login. Cleared when a token is saved for the bucket again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub needs_login: Option<NeedsLogin>,
}

/// Why a bucket needs a new login: what the token endpoint answered (no body text).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NeedsLogin {
    /// Epoch seconds of the refusal.
    pub since: u64,
    /// The HTTP status.
    pub status: u16,
    /// The OAuth `error` code, when it was a plain code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
}

/// What [`Backend::finish_refresh`] writes, decided under the store lock from the token
/// stored at that moment.
#[derive(Debug)]
pub enum RefreshWrite {
    /// Store this token (replacing the stored one) and record `refreshed_at = at`, clearing
    /// any needs-login mark.
    Token {
        /// The refreshed token, merged by the caller.
        token: Token,
        /// Epoch seconds of the refresh.
        at: u64,
    },
    /// Mark the bucket as needing a new login; the token is left as it is.
    NeedsLogin(NeedsLogin),
    /// Change nothing (the token was removed or replaced meanwhile).
    Nothing,
}

/// The refresh lock of one provider:bucket (see [`Backend::refresh_lock`]); released when
/// dropped.
pub struct RefreshLock(#[allow(dead_code)] Box<dyn Send + Sync>);

impl RefreshLock {
    /// Wraps whatever holds the lock (a `flock`ed file, a guard).
    pub fn new(held: impl Send + Sync + 'static) -> RefreshLock {
        RefreshLock(Box::new(held))
    }
}

impl std::fmt::Debug for RefreshLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RefreshLock")
    }
}

/// A credential store. Every method is atomic with respect to every other caller,
/// including other processes sharing a file store.
pub trait Backend: Send + Sync + std::fmt::Debug + 'static {
    /// True when calls may block on I/O and must run off the actor thread.
    fn is_blocking(&self) -> bool;

    /// The token stored for `provider:bucket`, with its refresh token.
    fn get_token(&self, provider: &str, bucket: &str) -> Result<Option<Token>, StoreError>;

    /// Stores `incoming` for `provider:bucket` (read, merge or replace, write, as one atomic
    /// step under the store's lock). `incoming` may be partial (PROTOCOL.md §7) when it is
    /// merged into a stored token; an incomplete result is refused with
    /// [`StoreError::InvalidToken`]. A result whose served form would exceed
    /// [`MAX_SERVED_TOKEN_LEN`](crate::protocol::MAX_SERVED_TOKEN_LEN) is refused with
    /// [`StoreError::TooLarge`] and nothing is written, so every stored token can be served.
    fn save_token(
        &self,
        provider: &str,
        bucket: &str,
        incoming: &Token,
        mode: SaveMode,
    ) -> Result<(), StoreError>;

    /// Deletes the token of `provider:bucket`; `Ok(false)` when there was none.
    fn remove_token(&self, provider: &str, bucket: &str) -> Result<bool, StoreError>;

    /// Every provider with at least one stored token, sorted.
    fn list_providers(&self) -> Result<Vec<String>, StoreError>;

    /// Every bucket of `provider` holding a token, sorted.
    fn list_buckets(&self, provider: &str) -> Result<Vec<String>, StoreError>;

    /// The API key called `name`.
    fn get_key(&self, name: &str) -> Result<Option<Secret>, StoreError>;

    /// Stores (or replaces) the API key called `name`.
    fn set_key(&self, name: &str, key: &Secret) -> Result<(), StoreError>;

    /// Deletes the API key called `name`; `Ok(false)` when there was none.
    fn remove_key(&self, name: &str) -> Result<bool, StoreError>;

    /// Every API key name, sorted.
    fn list_keys(&self) -> Result<Vec<String>, StoreError>;

    /// Takes the refresh lock of `provider:bucket`, waiting while another refresh of the
    /// same bucket holds it, in this process or in any other process sharing the store.
    /// A refresh holds it from the re-read of the stored token, across the call to the
    /// token endpoint, to [`Backend::finish_refresh`], so two refreshes of one bucket never
    /// send the same refresh token. Saves and removes do not take it (they take the short
    /// store lock only, and are never held up by a slow token endpoint); a refresh
    /// therefore writes through [`Backend::finish_refresh`], which re-checks the stored
    /// token under the store lock.
    fn refresh_lock(&self, provider: &str, bucket: &str) -> Result<RefreshLock, StoreError>;

    /// The refresh bookkeeping of `provider:bucket` (default when none is recorded).
    fn refresh_state(&self, provider: &str, bucket: &str) -> Result<RefreshState, StoreError>;

    /// Ends a refresh, as one atomic step under the store lock: reads the stored token,
    /// asks `decide` what to write, and writes it (a token through the same checks as
    /// [`Backend::save_token`]). `decide` sees `None` when no token is stored (it was
    /// removed meanwhile: removal wins, and the backend then writes nothing whatever
    /// `decide` answers). `decide` may be asked more than once: a store whose write is a
    /// compare-and-swap (etcd) reads and asks again after losing a race, and writes only
    /// the last answer.
    /// Returns what was decided was written: true when something was written.
    fn finish_refresh(
        &self,
        provider: &str,
        bucket: &str,
        decide: &mut dyn FnMut(Option<&Token>) -> RefreshWrite,
    ) -> Result<bool, StoreError>;

    /// Wipes every secret this backend holds in memory (called by shutdown): the memory
    /// backend's contents, the file backend's read cache.
    fn clear(&self);

    /// The token of `provider:bucket` as a `get_token` reply carries it (without refresh
    /// token, serialized). A backend with a read cache answers it from there.
    fn get_served_token(
        &self,
        provider: &str,
        bucket: &str,
    ) -> Result<Option<ServedToken>, StoreError> {
        Ok(self.get_token(provider, bucket)?.map(|t| t.served()))
    }

    /// A served token answered from memory without blocking, when the backend has it
    /// cached: `Some(None)` means "known not stored". `None`: ask
    /// [`Backend::get_served_token`].
    fn cached_token(&self, _provider: &str, _bucket: &str) -> Option<Option<ServedToken>> {
        None
    }

    /// An API key answered from memory without blocking (see [`Backend::cached_token`]).
    fn cached_key(&self, _name: &str) -> Option<Option<Secret>> {
        None
    }
}
