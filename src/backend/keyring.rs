//! The OS keyring store (`--store keyring:` / `keyring:SERVICE`): one Secret Service item
//! (D-Bus, the desktop's keyring: gnome-keyring, KWallet) per token, per API key and per
//! refresh state, in the default collection.
//!
//! Every item carries the attributes `application=credproxy`, `service=<SERVICE>`,
//! `kind=token|key|state` and `provider`+`bucket` or `name`, so the lists are answered from
//! attributes without reading a secret. The refresh state (never secret) is kept as its own
//! item (`kind=state`) so that everything of one store lives in one place.
//!
//! The backend is synchronous; every keyring call runs on a private tokio runtime and is
//! bounded by [`CALL_TIMEOUT`], so a hung daemon gives an error, never a hang. A locked
//! collection or a bus without a Secret Service gives [`StoreError::Keyring`] saying what
//! to do; the backend never asks the keyring to unlock (that would pop a password prompt).
//!
//! Read-merge-write is atomic against other processes through a `flock`ed lock file per
//! store, and the refresh lock is a lock file per provider:bucket, both in a private
//! directory holding nothing secret (`$XDG_RUNTIME_DIR/credproxy`, else
//! `/tmp/credproxy-<uid>`, 0700 and ours, as the file store's lock files).
//!
//! On platforms other than Linux, [`KeyringBackend::open`] returns an error: the macOS
//! Keychain is not supported yet.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::fcntl::Flock;
use zeroize::Zeroize;

use super::{
    check_name as check, Backend, RefreshLock, RefreshState, RefreshWrite, SaveMode, StoreError,
};
use crate::names::NameKind;
use crate::secret::Secret;
use crate::token::Token;

/// The bound on one keyring operation (connect, search, read or write): well under the
/// store's own 15 s timeout, long enough for a busy desktop daemon.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest wait for another holder's refresh lock (as the file store's).
const REFRESH_LOCK_WAIT: Duration = Duration::from_secs(50);

/// The service name used by `--store keyring:` without one.
pub const DEFAULT_SERVICE: &str = "credproxy";

/// How a locked-keyring error starts (it is not retried).
const LOCKED: &str = "the keyring is locked";

/// How a timed-out call's error starts (it is not retried).
const TIMED_OUT: &str = "the Secret Service did not answer within";

/// What to do, appended to every locked or unreachable keyring error.
const WHAT_TO_DO: &str = "unlock the keyring (log in to the desktop session or run gnome-keyring-daemon --unlock), or use --store DIR";

/// A credential store in the OS keyring.
pub struct KeyringBackend {
    service: String,
    /// A private runtime: zbus spawns its reader task on the runtime it connects from, and
    /// calls come from worker threads that must not be inside another runtime.
    rt: super::PrivateRuntime,
    /// The Secret Service session, kept between calls.
    conn: ops::Conn,
    lock_dir: PathBuf,
}

impl std::fmt::Debug for KeyringBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyringBackend")
            .field("service", &self.service)
            .finish_non_exhaustive()
    }
}

fn keyring_err(reason: impl Into<String>) -> StoreError {
    StoreError::Keyring(reason.into())
}

/// The directory of the lock files: `$XDG_RUNTIME_DIR/credproxy`, else
/// `/tmp/credproxy-<uid>`; created 0700, refused unless it is a directory of ours that no
/// one else can write.
fn lock_dir() -> Result<PathBuf, StoreError> {
    let uid = nix::unistd::getuid().as_raw();
    let dir = match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        Some(d) => PathBuf::from(d).join("credproxy"),
        None => PathBuf::from(format!("/tmp/credproxy-{uid}")),
    };
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => {
            return Err(StoreError::Io {
                op: "mkdir",
                path: dir,
                source: e,
            })
        }
    }
    let meta = std::fs::symlink_metadata(&dir).map_err(|e| StoreError::Io {
        op: "stat",
        path: dir.clone(),
        source: e,
    })?;
    if !meta.is_dir() || meta.uid() != uid || meta.permissions().mode() & 0o022 != 0 {
        return Err(StoreError::Untrusted {
            path: dir,
            reason: "not a directory of ours closed to group and others; remove it".into(),
        });
    }
    // As the socket and file store directories: no other non-root uid may control a
    // directory above it (and so swap the lock directory for one of theirs).
    crate::trust::check_ancestors(&dir).map_err(|reason| StoreError::Untrusted {
        path: dir.clone(),
        reason,
    })?;
    Ok(dir)
}

/// Opens (creating it 0600, never through a symlink) the lock file `path`.
fn open_lock_file(path: &Path) -> Result<File, StoreError> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| StoreError::Io {
            op: "open",
            path: path.to_owned(),
            source: e,
        })
}

/// Takes an exclusive `flock` on `path`, polling without blocking until `wait` has passed.
fn flock(path: &Path, wait: Duration) -> Result<Flock<File>, StoreError> {
    super::flock_polled(open_lock_file(path)?, path, wait)
}

/// The attributes of one item (or, without the last pair, of a search).
type Attrs = Vec<(&'static str, String)>;

impl KeyringBackend {
    /// Opens the keyring store `service` (`None`: [`DEFAULT_SERVICE`]). Nothing is asked of
    /// the keyring yet: the first call reports a locked or absent one.
    pub fn open(service: Option<&str>) -> Result<KeyringBackend, StoreError> {
        if !cfg!(target_os = "linux") {
            return Err(keyring_err(
                "the OS keyring store is not supported on this platform yet; use --store DIR",
            ));
        }
        let service = service.filter(|s| !s.is_empty()).unwrap_or(DEFAULT_SERVICE);
        if service.contains(['/', '\0']) || service.len() > 200 {
            return Err(StoreError::InvalidName);
        }
        let rt = super::PrivateRuntime::start("credproxy-keyring")?;
        Ok(KeyringBackend {
            service: service.to_owned(),
            rt,
            conn: ops::Conn::default(),
            lock_dir: lock_dir()?,
        })
    }

    /// The data key of a shared (etcd) store kept in this keyring (`--store-key
    /// keyring:SERVICE`): the item `kind=datakey` of the service, 64 hex characters.
    /// `None` when there is none.
    pub fn data_key(&self) -> Result<Option<super::seal::DataKey>, StoreError> {
        let Some(mut bytes) = self.read(self.attrs("datakey"))? else {
            return Ok(None);
        };
        let key = std::str::from_utf8(&bytes)
            .ok()
            .and_then(super::seal::DataKey::from_hex);
        bytes.zeroize();
        key.map(Some).ok_or_else(|| {
            keyring_err(format!(
                "the data key item of service {} is not 64 hex characters",
                self.service
            ))
        })
    }

    /// Stores `key` as this service's data key; refused (nothing written) when the
    /// service already has one, so a key that sealed a store is never overwritten.
    pub fn create_data_key(&self, key: &super::seal::DataKey) -> Result<(), StoreError> {
        let _lock = self.store_lock()?;
        if self.read(self.attrs("datakey"))?.is_some() {
            return Err(keyring_err(format!(
                "service {} already has a data key; it is kept (remove it with \
                 secret-tool clear application credproxy service {} kind datakey only if \
                 no store is sealed with it)",
                self.service, self.service
            )));
        }
        self.write(
            format!("credproxy {}: data key", self.service),
            self.attrs("datakey"),
            key.to_hex().as_bytes().to_vec(),
        )
    }

    /// The service name whose items this store holds.
    pub fn service(&self) -> &str {
        &self.service
    }

    fn attrs(&self, kind: &'static str) -> Attrs {
        vec![
            ("application", "credproxy".to_owned()),
            ("service", self.service.clone()),
            ("kind", kind.to_owned()),
        ]
    }

    fn token_attrs(&self, kind: &'static str, provider: &str, bucket: &str) -> Attrs {
        let mut a = self.attrs(kind);
        a.push(("provider", provider.to_owned()));
        a.push(("bucket", bucket.to_owned()));
        a
    }

    fn key_attrs(&self, name: &str) -> Attrs {
        let mut a = self.attrs("key");
        a.push(("name", name.to_owned()));
        a
    }

    /// Runs `op` on the private runtime, bounded by [`CALL_TIMEOUT`].
    fn call<T: Send + 'static>(
        &self,
        op: impl std::future::Future<Output = Result<T, StoreError>> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.rt.spawn(async move {
            let r = match tokio::time::timeout(CALL_TIMEOUT, op).await {
                Ok(r) => r,
                Err(_) => Err(keyring_err(format!(
                    "{TIMED_OUT} {} s (is the keyring daemon hung?); {WHAT_TO_DO}",
                    CALL_TIMEOUT.as_secs()
                ))),
            };
            let _ = tx.send(r);
        });
        rx.recv_timeout(CALL_TIMEOUT + Duration::from_secs(1))
            .unwrap_or_else(|_| {
                Err(keyring_err(format!(
                    "{TIMED_OUT} {} s; {WHAT_TO_DO}",
                    CALL_TIMEOUT.as_secs() + 1
                )))
            })
    }

    /// The store's lock, held around each read-modify-write.
    fn store_lock(&self) -> Result<Flock<File>, StoreError> {
        let path = self.lock_dir.join(format!("keyring-{}.lock", self.service));
        flock(&path, REFRESH_LOCK_WAIT)
    }

    /// Runs one keyring operation on the kept session; after a failure the session is
    /// dropped, and an operation that failed on a session kept from before (the daemon
    /// restarted, the bus connection broke) is tried once more on a fresh one. A locked
    /// keyring or a timeout is not tried again.
    fn op<T: Send + 'static, F>(&self, make: impl Fn(ops::Conn) -> F) -> Result<T, StoreError>
    where
        F: std::future::Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        let was_kept = self.conn.is_kept();
        match self.call(make(self.conn.clone())) {
            Ok(v) => Ok(v),
            Err(e) => {
                self.conn.reset();
                let retry = was_kept
                    && !matches!(&e, StoreError::Keyring(t) if t.starts_with(LOCKED) || t.starts_with(TIMED_OUT));
                if retry {
                    let again = self.call(make(self.conn.clone()));
                    if again.is_err() {
                        self.conn.reset();
                    }
                    again
                } else {
                    Err(e)
                }
            }
        }
    }

    fn read(&self, attrs: Attrs) -> Result<Option<Vec<u8>>, StoreError> {
        self.op(|c| ops::read(c, attrs.clone()))
    }

    fn write(&self, label: String, attrs: Attrs, secret: Vec<u8>) -> Result<(), StoreError> {
        let secret = zeroize::Zeroizing::new(secret);
        self.op(|c| ops::write(c, label.clone(), attrs.clone(), secret.to_vec()))
    }

    fn delete(&self, attrs: Attrs) -> Result<bool, StoreError> {
        self.op(|c| ops::delete(c, attrs.clone()))
    }

    fn names(&self, attrs: Attrs, field: &'static str) -> Result<Vec<String>, StoreError> {
        let mut names = self.op(|c| ops::attribute_values(c, attrs.clone(), field))?;
        names.sort();
        names.dedup();
        Ok(names)
    }

    fn read_token(&self, provider: &str, bucket: &str) -> Result<Option<Token>, StoreError> {
        let Some(mut bytes) = self.read(self.token_attrs("token", provider, bucket))? else {
            return Ok(None);
        };
        let token = Token::from_json(&bytes);
        bytes.zeroize();
        token.map(Some).map_err(|e| {
            keyring_err(format!(
                "a stored token of {provider}:{bucket} is corrupt: {e}"
            ))
        })
    }

    fn write_token(&self, provider: &str, bucket: &str, token: &Token) -> Result<(), StoreError> {
        self.write(
            format!("credproxy {}: token {provider}:{bucket}", self.service),
            self.token_attrs("token", provider, bucket),
            token.to_json(),
        )
    }

    fn read_state(&self, provider: &str, bucket: &str) -> Result<RefreshState, StoreError> {
        match self.read(self.token_attrs("state", provider, bucket))? {
            None => Ok(RefreshState::default()),
            Some(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                keyring_err(format!(
                    "the refresh state of {provider}:{bucket} is corrupt: {e}"
                ))
            }),
        }
    }

    fn write_state(
        &self,
        provider: &str,
        bucket: &str,
        s: &RefreshState,
    ) -> Result<(), StoreError> {
        if *s == RefreshState::default() {
            self.delete(self.token_attrs("state", provider, bucket))?;
            return Ok(());
        }
        let json = serde_json::to_vec(s).map_err(|e| keyring_err(e.to_string()))?;
        self.write(
            format!(
                "credproxy {}: refresh state {provider}:{bucket}",
                self.service
            ),
            self.token_attrs("state", provider, bucket),
            json,
        )
    }
}

impl Backend for KeyringBackend {
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
        let _lock = self.store_lock()?;
        let stored = match mode {
            SaveMode::Merge => self.read_token(provider, bucket)?,
            SaveMode::Replace => None,
        };
        let state = self.read_state(provider, bucket)?;
        let (token, state) = super::next_saved(stored, incoming, mode, state)?;
        self.write_token(provider, bucket, &token)?;
        self.write_state(provider, bucket, &state)
    }

    fn remove_token(&self, provider: &str, bucket: &str) -> Result<bool, StoreError> {
        check(NameKind::Provider, provider)?;
        check(NameKind::Bucket, bucket)?;
        let _lock = self.store_lock()?;
        self.delete(self.token_attrs("state", provider, bucket))?;
        self.delete(self.token_attrs("token", provider, bucket))
    }

    fn list_providers(&self) -> Result<Vec<String>, StoreError> {
        self.names(self.attrs("token"), "provider")
    }

    fn list_buckets(&self, provider: &str) -> Result<Vec<String>, StoreError> {
        check(NameKind::Provider, provider)?;
        let mut attrs = self.attrs("token");
        attrs.push(("provider", provider.to_owned()));
        self.names(attrs, "bucket")
    }

    fn get_key(&self, name: &str) -> Result<Option<Secret>, StoreError> {
        check(NameKind::Key, name)?;
        let Some(bytes) = self.read(self.key_attrs(name))? else {
            return Ok(None);
        };
        match String::from_utf8(bytes) {
            Ok(text) => Ok(Some(Secret::new(text))),
            Err(e) => {
                e.into_bytes().zeroize();
                Err(keyring_err(format!(
                    "the stored API key {name} is not UTF-8"
                )))
            }
        }
    }

    fn set_key(&self, name: &str, key: &Secret) -> Result<(), StoreError> {
        check(NameKind::Key, name)?;
        let _lock = self.store_lock()?;
        self.write(
            format!("credproxy {}: API key {name}", self.service),
            self.key_attrs(name),
            key.expose().as_bytes().to_vec(),
        )
    }

    fn remove_key(&self, name: &str) -> Result<bool, StoreError> {
        check(NameKind::Key, name)?;
        let _lock = self.store_lock()?;
        self.delete(self.key_attrs(name))
    }

    fn list_keys(&self) -> Result<Vec<String>, StoreError> {
        self.names(self.attrs("key"), "name")
    }

    /// A `flock`ed lock file per provider:bucket in the lock directory, polled for at most
    /// 50 s as the file store's; the store lock is not taken.
    fn refresh_lock(&self, provider: &str, bucket: &str) -> Result<RefreshLock, StoreError> {
        check(NameKind::Provider, provider)?;
        check(NameKind::Bucket, bucket)?;
        let path = self.lock_dir.join(format!(
            "keyring-{}.refresh.{provider}.{bucket}.lock",
            self.service
        ));
        Ok(RefreshLock::new(flock(&path, REFRESH_LOCK_WAIT)?))
    }

    fn refresh_state(&self, provider: &str, bucket: &str) -> Result<RefreshState, StoreError> {
        check(NameKind::Provider, provider)?;
        check(NameKind::Bucket, bucket)?;
        self.read_state(provider, bucket)
    }

    fn finish_refresh(
        &self,
        provider: &str,
        bucket: &str,
        decide: &mut dyn FnMut(Option<&Token>) -> RefreshWrite,
    ) -> Result<bool, StoreError> {
        check(NameKind::Provider, provider)?;
        check(NameKind::Bucket, bucket)?;
        let _lock = self.store_lock()?;
        let stored = self.read_token(provider, bucket)?;
        let decided = decide(stored.as_ref());
        if stored.is_none() {
            // Removal wins.
            return Ok(false);
        }
        let mut state = self.read_state(provider, bucket)?;
        match decided {
            RefreshWrite::Nothing => Ok(false),
            RefreshWrite::NeedsLogin(mark) => {
                state.needs_login = Some(mark);
                self.write_state(provider, bucket, &state)?;
                Ok(true)
            }
            RefreshWrite::Token { token, at } => {
                super::check_storable(&token)?;
                self.write_token(provider, bucket, &token)?;
                state.refreshed_at = Some(at);
                state.needs_login = None;
                self.write_state(provider, bucket, &state)?;
                Ok(true)
            }
        }
    }

    /// Nothing is held in memory between calls.
    fn clear(&self) {}
}

/// The keyring calls, each a whole connect-and-act sequence run under one timeout.
#[cfg(target_os = "linux")]
mod ops {
    use super::*;
    use secret_service::{Collection, EncryptionType, SecretService};
    use std::sync::{Arc, Mutex};

    fn map(attrs: &Attrs) -> HashMap<&str, &str> {
        attrs.iter().map(|(k, v)| (*k, v.as_str())).collect()
    }

    /// Maps a Secret Service error to a store error that says what to do (the crate's
    /// errors never carry a secret).
    fn err(e: secret_service::Error) -> StoreError {
        let text = e.to_string();
        if matches!(
            e,
            secret_service::Error::Locked | secret_service::Error::Prompt
        ) || text.contains("IsLocked")
        {
            keyring_err(format!("{LOCKED}; {WHAT_TO_DO}"))
        } else if text.contains("ServiceUnknown") || text.contains("NotFound") {
            keyring_err(format!(
                "no Secret Service on the D-Bus session bus ({text}); {WHAT_TO_DO}"
            ))
        } else {
            keyring_err(format!("Secret Service: {text}; {WHAT_TO_DO}"))
        }
    }

    /// A session with the Secret Service (the secrets travel encrypted over the bus).
    async fn connect() -> Result<SecretService<'static>, StoreError> {
        SecretService::connect(EncryptionType::Dh)
            .await
            .map_err(err)
    }

    /// The backend's Secret Service session, opened on first use and kept (a session is
    /// a D-Bus connection and a Diffie-Hellman exchange: milliseconds that every call
    /// would pay otherwise); dropped after any failure.
    #[derive(Clone, Default)]
    pub(crate) struct Conn(Arc<Mutex<Option<Arc<SecretService<'static>>>>>);

    impl Conn {
        fn slot(&self) -> std::sync::MutexGuard<'_, Option<Arc<SecretService<'static>>>> {
            self.0.lock().unwrap_or_else(|e| e.into_inner())
        }

        async fn get(&self) -> Result<Arc<SecretService<'static>>, StoreError> {
            if let Some(ss) = self.slot().clone() {
                return Ok(ss);
            }
            let ss = Arc::new(connect().await?);
            *self.slot() = Some(Arc::clone(&ss));
            Ok(ss)
        }

        /// True when a session is kept from an earlier call.
        pub(super) fn is_kept(&self) -> bool {
            self.slot().is_some()
        }

        /// Drops the kept session.
        pub(super) fn reset(&self) {
            *self.slot() = None;
        }
    }

    /// The default collection, refused (never unlocked: that would prompt) when locked.
    async fn unlocked<'s>(ss: &'s SecretService<'_>) -> Result<Collection<'s>, StoreError> {
        let coll = ss.get_default_collection().await.map_err(err)?;
        if coll.is_locked().await.map_err(err)? {
            return Err(keyring_err(format!("{LOCKED}; {WHAT_TO_DO}")));
        }
        Ok(coll)
    }

    pub(super) async fn read(conn: Conn, attrs: Attrs) -> Result<Option<Vec<u8>>, StoreError> {
        let ss = conn.get().await?;
        let coll = unlocked(&ss).await?;
        let items = coll.search_items(map(&attrs)).await.map_err(err)?;
        match items.first() {
            None => Ok(None),
            Some(item) => Ok(Some(item.get_secret().await.map_err(err)?)),
        }
    }

    pub(super) async fn write(
        conn: Conn,
        label: String,
        attrs: Attrs,
        mut secret: Vec<u8>,
    ) -> Result<(), StoreError> {
        let r = async {
            let ss = conn.get().await?;
            let coll = unlocked(&ss).await?;
            coll.create_item(&label, map(&attrs), &secret, true, "text/plain")
                .await
                .map_err(err)?;
            Ok(())
        }
        .await;
        secret.zeroize();
        r
    }

    pub(super) async fn delete(conn: Conn, attrs: Attrs) -> Result<bool, StoreError> {
        let ss = conn.get().await?;
        let coll = unlocked(&ss).await?;
        let items = coll.search_items(map(&attrs)).await.map_err(err)?;
        for item in &items {
            item.delete().await.map_err(err)?;
        }
        Ok(!items.is_empty())
    }

    pub(super) async fn attribute_values(
        conn: Conn,
        attrs: Attrs,
        field: &'static str,
    ) -> Result<Vec<String>, StoreError> {
        let ss = conn.get().await?;
        let coll = unlocked(&ss).await?;
        let items = coll.search_items(map(&attrs)).await.map_err(err)?;
        let mut out = Vec::with_capacity(items.len());
        for item in &items {
            if let Some(v) = item.get_attributes().await.map_err(err)?.remove(field) {
                out.push(v);
            }
        }
        Ok(out)
    }
}

/// Elsewhere: every call fails (`open` already refuses).
#[cfg(not(target_os = "linux"))]
mod ops {
    use super::*;

    fn unsupported<T>() -> Result<T, StoreError> {
        Err(keyring_err(
            "the OS keyring store is not supported on this platform yet",
        ))
    }
    /// No session elsewhere.
    #[derive(Clone, Default)]
    pub(crate) struct Conn;
    impl Conn {
        pub(super) fn is_kept(&self) -> bool {
            false
        }
        pub(super) fn reset(&self) {}
    }
    pub(super) async fn read(_: Conn, _: Attrs) -> Result<Option<Vec<u8>>, StoreError> {
        unsupported()
    }
    pub(super) async fn write(_: Conn, _: String, _: Attrs, _: Vec<u8>) -> Result<(), StoreError> {
        unsupported()
    }
    pub(super) async fn delete(_: Conn, _: Attrs) -> Result<bool, StoreError> {
        unsupported()
    }
    pub(super) async fn attribute_values(
        _: Conn,
        _: Attrs,
        _: &'static str,
    ) -> Result<Vec<String>, StoreError> {
        unsupported()
    }
}
