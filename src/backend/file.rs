//! The file backend: one JSON file per credential in a private store directory, shared
//! safely by every `credproxy serve` and `credproxy store` process that opens it.
//!
//! # Layout
//!
//! ```text
//! DIR/                          0700
//! ├── .lock                     0600, empty; the store's advisory lock
//! ├── tokens/<provider>/        0700
//! │   └── <bucket>.json         0600, the token object (with refresh_token) as plain JSON
//! ├── keys/<name>.json          0600, {"key":"..."}
//! └── refresh/<provider>/       0700
//!     ├── <bucket>.lock         0600, empty; the bucket's refresh lock (never deleted)
//!     └── <bucket>.json         0600, the bucket's RefreshState (absent: the default)
//! ```
//!
//! `refresh/` is a tree of its own, apart from `tokens/`: lists never see it, and a
//! provider's `tokens/<provider>/` still empties (and is removed) with its last token. A
//! refresh lock file is never deleted (deleting a file others may be `flock`ing lets two
//! holders lock two different files). The state file holds no secret; it is removed
//! with the bucket's token, and when it falls back to the default state.
//!
//! Every name is checked with [`is_valid`] inside every method, so it is always a single
//! path component (no `/`, never `.` or `..`) and nothing can reach outside `DIR`. Files
//! whose names are not `<valid name>.json` (temporary files, notes, backups) are ignored.
//!
//! # Trust
//!
//! `DIR` and every directory below it must be owned by our euid, not be a symlink and not
//! be writable by group or others; every directory above `DIR` must pass
//! [`crate::trust::check_ancestors`] (OpenSSH's `safe_path` rule). The ancestors are
//! checked once, at [`FileBackend::open`]; `DIR` itself and each subdirectory on every
//! walk. Each operation opens `DIR` afresh with `O_DIRECTORY|O_NOFOLLOW`, then reaches
//! `tokens/`, `tokens/<provider>/`, `keys/`, `refresh/`, `refresh/<provider>/`, the lock
//! files, the token, key and refresh state files and the temporary files only through
//! directory descriptors (`openat` with `O_NOFOLLOW`,
//! `mkdirat`, `renameat`, `unlinkat`, `fstat`), so a symlink or a directory swapped in
//! anywhere below `DIR` is never followed. A directory that fails a check is
//! [`StoreError::Untrusted`]: the store refuses to open (`serve` does not start,
//! `credproxy store` exits) when it is `DIR` or an ancestor, and the one request fails
//! (`INTERNAL_ERROR` on the wire, the reason in the host's log) when it is below `DIR`.
//! Missing subdirectories are created 0700 through their parent's descriptor; a missing
//! `DIR` is created 0700 with its missing parents (after the ancestors check).
//! The descriptors come from `rustix`: nix 0.29's `openat` returns a raw descriptor,
//! which could only be owned with `unsafe` code.
//!
//! # Atomicity
//!
//! A file is never written in place. The new content goes to a temporary file in the same
//! directory (`.<name>.json.<8 hex>.tmp`, created exclusively with mode 0600), which is
//! flushed with `fsync`, renamed over the target, and the directory is then flushed too.
//! A crash at any instant leaves either the old or the new file, never a torn or empty one
//! (at worst a stray `.tmp` file, which every read and list ignores, and which the next
//! [`FileBackend::open`] overwrites with zeros and removes: it may hold a refresh token).
//!
//! # Locking
//!
//! Every write and every read-modify-write (`save_token`, `remove_token`, `set_key`,
//! `remove_key`, `finish_refresh`) runs under an exclusive `flock` on `DIR/.lock`, taken
//! through a fresh open of that file each time, so it excludes other threads of this
//! process and other processes alike and no merge ever loses a concurrent update. Reads
//! (`refresh_state` included) take no lock: thanks to the atomic rename they always see
//! one complete version of a file.
//!
//! A refresh of `provider:bucket` also holds that bucket's refresh lock, an exclusive
//! `flock` on `DIR/refresh/<provider>/<bucket>.lock` (again through a fresh open each
//! time, so it excludes threads and processes alike), from its re-read of the token,
//! across the call to the token endpoint, to `finish_refresh`. `refresh_lock` takes that
//! lock only; the store lock is only ever taken while it is held, never the other way
//! round, so the two cannot deadlock, and saves and removes (store lock only) are never
//! held up by a slow token endpoint.
//!
//! A corrupt refresh state file is reported by `refresh_state` ([`StoreError::Corrupt`]);
//! a write that changes the state (a save clearing a needs-login mark, a refresh
//! recording its outcome) replaces it, with a warning: it holds no secret, and losing it
//! costs at most one refresh before the cooldown ends.

use std::ffi::CStr;
use std::fs::{self, DirBuilder, File, Permissions};
use std::io::{self, ErrorKind, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use rustix::fs::{AtFlags, FileType, Mode, OFlags, Stat, CWD};
use serde_json::Value;

use super::watch::ReadCache;
use super::{
    check_name as check, Backend, RefreshLock, RefreshState, RefreshWrite, SaveMode, StoreError,
};
use crate::names::{is_valid, NameKind};
use crate::secret::{wipe_json, Secret, SecretBytes};
use crate::token::{ServedToken, Token};

const TOKENS: &str = "tokens";
const KEYS: &str = "keys";
const REFRESH: &str = "refresh";
const LOCK_FILE: &str = ".lock";
const EXT: &str = ".json";
/// The suffix of a bucket's refresh lock file in `refresh/<provider>/`.
const LOCK_EXT: &str = ".lock";
const FILE_MODE: u32 = 0o600;
const DIR_MODE: u32 = 0o700;
/// Store files are small (a token, a key); anything larger than the largest servable
/// token (4 MiB, PROTOCOL.md §13) with room for its refresh token is refused rather than
/// read into memory.
const MAX_FILE_LEN: u64 = (crate::codec::MAX_FRAME_LEN_V2 + (1 << 20)) as u64;

/// The longest [`Backend::refresh_lock`] waits for another holder: a refresh holds it for
/// its 40 s deadline and a few store calls at most.
const REFRESH_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(50);

/// Spare capacity kept in a buffer that `read_to_end` fills with secrets: with less than
/// 32 bytes spare, std reads into a 32-byte stack buffer first (never wiped).
pub(crate) const PROBE_SLACK: usize = 64;

/// A credential store kept as files under one directory (see the module documentation).
///
/// A stored file that is unreadable or corrupt is reported as [`StoreError::Corrupt`] (or
/// `Io`) and never silently overwritten by a merge; only [`SaveMode::Replace`] (the host's
/// explicit `credproxy store token set`) or a remove replaces it.
#[derive(Debug)]
pub struct FileBackend {
    dir: PathBuf,
    /// Set once a group/other-readable store file has been reported, to warn only once.
    warned_mode: AtomicBool,
    /// The inotify-validated read cache, when enabled (see [`super::watch`]).
    cache: Option<ReadCache>,
}

/// The key file's shape; borrowing the secret avoids an extra copy of it.
#[derive(serde::Serialize)]
struct KeyFile<'a> {
    key: &'a str,
}

/// A store directory opened `O_DIRECTORY|O_NOFOLLOW` and checked (ours, not writable by
/// group or others); everything below it is reached through its descriptor.
struct DirFd {
    fd: OwnedFd,
    /// For error messages and logs only; never used to reach the directory.
    path: PathBuf,
}

impl FileBackend {
    /// Opens the store in `dir`, creating it (and any missing parent) with mode 0700 when
    /// it does not exist. The process umask is never changed.
    ///
    /// Refused with [`StoreError::Untrusted`] (the server does not start, `credproxy
    /// store` exits): a store directory that is a symlink, is not owned by us, or is
    /// writable by group or others; a directory above it that another non-root uid owns or
    /// can write (see [`crate::trust`]); a subdirectory that fails the same checks, found
    /// by the sweep of leftover temporary files (in `keys/`, `tokens/<provider>/`,
    /// `refresh/` and `refresh/<provider>/`). A store readable by group or others is
    /// accepted with a warning.
    pub fn open(dir: impl Into<PathBuf>) -> Result<FileBackend, StoreError> {
        let dir = dir.into();
        let dir = if dir.is_absolute() {
            dir
        } else {
            std::env::current_dir()
                .map_err(io_err("resolve", &dir))?
                .join(dir)
        };
        crate::trust::check_ancestors(&dir).map_err(|reason| untrusted(&dir, reason))?;
        create_dirs(&dir)?;
        // Checked again now that every missing parent exists (created by us).
        crate::trust::check_ancestors(&dir).map_err(|reason| untrusted(&dir, reason))?;
        let backend = FileBackend {
            dir,
            warned_mode: AtomicBool::new(false),
            cache: None,
        };
        backend.root()?;
        backend.sweep_temp_files()?;
        Ok(backend)
    }

    /// Removes the temporary files a crashed writer left behind (they may hold secrets).
    /// Runs under the store lock: every writer holds it while its temporary file exists,
    /// so no write in progress in another process can lose its file.
    fn sweep_temp_files(&self) -> Result<(), StoreError> {
        let root = self.root()?;
        // A store we may not write (a read-only mount) can still be served; a crashed
        // writer cannot have left anything there since it became read-only.
        let _lock = match self.lock(&root) {
            Ok(lock) => lock,
            Err(e) => {
                tracing::debug!(error = %e, "store not writable: temp-file sweep skipped");
                return Ok(());
            }
        };
        let mut dirs = Vec::new();
        dirs.extend(sub_dir(&root, KEYS, false)?);
        for top in [TOKENS, REFRESH] {
            let Some(parent) = sub_dir(&root, top, false)? else {
                continue;
            };
            for (name, file_type) in entries(&parent)? {
                // A symlink named as a provider is checked too (and refused): a planted
                // redirect stops the start, with its path, rather than one request later.
                let planted_link =
                    file_type == FileType::Symlink && is_valid(NameKind::Provider, &name);
                if file_type == FileType::Directory || planted_link {
                    dirs.extend(sub_dir(&parent, &name, false)?);
                }
            }
            if top == REFRESH {
                dirs.push(parent);
            }
        }
        for dir in dirs {
            for (name, file_type) in entries(&dir)? {
                if !(name.starts_with('.') && name.ends_with(".tmp"))
                    || file_type != FileType::RegularFile
                {
                    continue;
                }
                let path = dir.path.join(&name);
                if let Ok(fd) = rustix::fs::openat(
                    &dir.fd,
                    name.as_str(),
                    OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
                    Mode::empty(),
                ) {
                    let mut f = File::from(fd);
                    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
                    if len <= MAX_FILE_LEN && f.metadata().is_ok_and(|m| m.is_file()) {
                        let _ = f.write_all(&vec![0u8; len as usize]);
                        let _ = f.sync_all();
                    }
                }
                match rustix::fs::unlinkat(&dir.fd, name.as_str(), AtFlags::empty()) {
                    Ok(()) => {
                        tracing::info!(path = %path.display(), "removed a temporary file left by an interrupted write")
                    }
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "cannot remove a leftover temporary file")
                    }
                }
            }
        }
        Ok(())
    }

    /// Enables the read cache (for a long-running server; one-shot commands need none):
    /// repeated reads are answered from memory, and any change to the store's files, by
    /// this or any other process, invalidates it (see [`super::watch`]). Without inotify it
    /// stays off.
    pub fn with_read_cache(mut self) -> Self {
        self.cache = ReadCache::start(&self.dir);
        self
    }

    fn invalidate(&self) {
        if let Some(cache) = &self.cache {
            cache.invalidate();
        }
    }

    /// The default store directory: `$XDG_DATA_HOME/credproxy` when `XDG_DATA_HOME` is set
    /// to an absolute path, else `$HOME/.local/share/credproxy`; `None` when `HOME` is
    /// unset or not absolute either.
    pub fn default_dir() -> Option<PathBuf> {
        if let Some(xdg) = std::env::var_os("XDG_DATA_HOME").map(PathBuf::from) {
            if xdg.is_absolute() {
                return Some(xdg.join("credproxy"));
            }
        }
        let home = PathBuf::from(std::env::var_os("HOME")?);
        home.is_absolute()
            .then(|| home.join(".local/share/credproxy"))
    }

    /// The store directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Opens and checks the store directory itself, afresh for every operation, so that a
    /// store directory replaced while we run is checked again (and its ancestors were
    /// checked at [`FileBackend::open`]).
    fn root(&self) -> Result<DirFd, StoreError> {
        match open_dir(CWD, self.dir.as_path(), &self.dir)? {
            Some(root) => Ok(root),
            None => Err(StoreError::Io {
                op: "open store",
                path: self.dir.clone(),
                source: Errno::ENOENT.into(),
            }),
        }
    }

    /// `tokens/<provider>/`, created 0700 when `create`; `None` when absent.
    fn token_dir(
        &self,
        root: &DirFd,
        provider: &str,
        create: bool,
    ) -> Result<Option<DirFd>, StoreError> {
        provider_dir(root, TOKENS, provider, create)
    }

    /// `refresh/<provider>/`, created 0700 when `create`; `None` when absent.
    fn refresh_dir(
        &self,
        root: &DirFd,
        provider: &str,
        create: bool,
    ) -> Result<Option<DirFd>, StoreError> {
        provider_dir(root, REFRESH, provider, create)
    }

    /// `refresh/<provider>/`, created 0700 when missing.
    fn refresh_dir_created(&self, root: &DirFd, provider: &str) -> Result<DirFd, StoreError> {
        self.refresh_dir(root, provider, true)?
            .ok_or_else(|| StoreError::Io {
                op: "mkdir",
                path: root.path.join(REFRESH).join(provider),
                source: Errno::ENOENT.into(),
            })
    }

    /// The refresh state recorded in `dir` (a `refresh/<provider>/`) for `bucket`; `None`
    /// when none is. A state file that is not a valid [`RefreshState`] (or is a symlink)
    /// is [`StoreError::Corrupt`], whose reason never quotes the file.
    fn read_state(&self, dir: &DirFd, bucket: &str) -> Result<Option<RefreshState>, StoreError> {
        let name = format!("{bucket}{EXT}");
        let path = dir.path.join(&name);
        let bytes = match self.read_file(dir, &name) {
            Ok(Some(bytes)) => bytes,
            Ok(None) => return Ok(None),
            // O_NOFOLLOW met a symlink: not followed, and not a state file either.
            Err(StoreError::Io { source, .. })
                if source.raw_os_error() == Some(Errno::ELOOP as i32) =>
            {
                return Err(corrupt(&path, "a symlink, not a regular file"));
            }
            Err(e) => return Err(e),
        };
        let value = parse_json(&path, &bytes)?;
        // serde's own messages may quote the file (an unknown field, a wrong value).
        serde_json::from_value(value)
            .map(Some)
            .map_err(|_| corrupt(&path, "not a refresh state (refreshed_at, needs_login)"))
    }

    /// The refresh state of `bucket` about to be changed by a write, and whether its file
    /// must be rewritten whatever changes: a corrupt file is replaced (see the module
    /// documentation), starting from the default state.
    fn state_to_update(
        &self,
        dir: &DirFd,
        bucket: &str,
    ) -> Result<(RefreshState, bool), StoreError> {
        match self.read_state(dir, bucket) {
            Ok(state) => Ok((state.unwrap_or_default(), false)),
            Err(StoreError::Corrupt { path, reason }) => {
                tracing::warn!(path = %path.display(), %reason, "corrupt refresh state replaced");
                Ok((RefreshState::default(), true))
            }
            Err(e) => Err(e),
        }
    }

    /// Takes the store's exclusive lock; it is released when the returned value drops.
    fn lock(&self, root: &DirFd) -> Result<Flock<File>, StoreError> {
        let path = root.path.join(LOCK_FILE);
        let fd = rustix::fs::openat(
            &root.fd,
            LOCK_FILE,
            OFlags::RDWR | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
            Mode::from_raw_mode(FILE_MODE),
        )
        .map_err(|e| io_err("open", &path)(e.into()))?;
        let mut file = File::from(fd);
        loop {
            match Flock::lock(file, FlockArg::LockExclusive) {
                Ok(lock) => return Ok(lock),
                Err((f, Errno::EINTR)) => file = f,
                Err((_, errno)) => return Err(io_err("lock", &path)(errno.into())),
            }
        }
    }

    /// Warns (once per backend) when a store file is open to group or others.
    fn check_mode(&self, mode: u32, path: &Path) {
        if mode & 0o077 != 0 && !self.warned_mode.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                path = %path.display(),
                mode = format_args!("{:o}", mode & 0o7777),
                "credproxy store entry is accessible by group or others (expected 0600 files, 0700 directories)"
            );
        }
    }

    /// The bytes of `dir/name`; `None` when it does not exist. Symlinks are not followed.
    fn read_file(&self, dir: &DirFd, name: &str) -> Result<Option<SecretBytes>, StoreError> {
        let path = dir.path.join(name);
        let fd = match rustix::fs::openat(
            &dir.fd,
            name,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::NOENT) => return Ok(None),
            Err(e) => return Err(io_err("open", &path)(e.into())),
        };
        let stat = rustix::fs::fstat(&fd).map_err(|e| io_err("stat", &path)(e.into()))?;
        if FileType::from_raw_mode(stat.st_mode) != FileType::RegularFile {
            return Err(corrupt(&path, "not a regular file"));
        }
        self.check_mode(stat.st_mode, &path);
        let len = u64::try_from(stat.st_size).unwrap_or(0);
        // Sized up front, and never read past its capacity, so that the buffer is never
        // reallocated (which would leave an unwiped copy of the file in freed memory).
        let cap = len.min(MAX_FILE_LEN) + 1;
        // PROBE_SLACK more than is ever read: std's `read_to_end` reads into a small
        // unwiped stack buffer when less than that is spare.
        let mut buf = SecretBytes(Vec::with_capacity(cap as usize + PROBE_SLACK));
        File::from(fd)
            .take(cap)
            .read_to_end(&mut buf.0)
            .map_err(io_err("read", &path))?;
        if buf.0.len() as u64 >= cap {
            // Longer than its size said: over the limit, or written in place meanwhile
            // (never by us: we replace files by rename).
            let why = if len >= MAX_FILE_LEN {
                "larger than 1 MiB"
            } else {
                "it grew while it was read"
            };
            return Err(corrupt(&path, why));
        }
        Ok(Some(buf))
    }

    fn read_token(&self, dir: &DirFd, name: &str) -> Result<Option<Token>, StoreError> {
        let Some(bytes) = self.read_file(dir, name)? else {
            return Ok(None);
        };
        let path = dir.path.join(name);
        let value = parse_json(&path, &bytes)?;
        Token::from_value(value)
            .map(Some)
            .map_err(|e| corrupt(&path, e.to_string()))
    }
}

impl Backend for FileBackend {
    fn is_blocking(&self) -> bool {
        true
    }

    fn get_token(&self, provider: &str, bucket: &str) -> Result<Option<Token>, StoreError> {
        check(NameKind::Provider, provider)?;
        check(NameKind::Bucket, bucket)?;
        let root = self.root()?;
        let Some(dir) = self.token_dir(&root, provider, false)? else {
            return Ok(None);
        };
        self.read_token(&dir, &format!("{bucket}{EXT}"))
    }

    /// Read through the cache, which holds served tokens only: no refresh token is kept
    /// in memory between requests.
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

    /// In [`SaveMode::Merge`] a stored file that cannot be read or is not a valid token
    /// fails the call with [`StoreError::Corrupt`] (or `Io`) and is left untouched: it is
    /// never silently overwritten. [`SaveMode::Replace`] (the host's explicit
    /// `credproxy store token set`) does not read the stored file and overwrites it.
    ///
    /// A saved token is a new login: once it is written, the bucket's needs-login mark is
    /// cleared (its `refreshed_at` is kept), still under the store lock.
    fn save_token(
        &self,
        provider: &str,
        bucket: &str,
        incoming: &Token,
        mode: SaveMode,
    ) -> Result<(), StoreError> {
        check(NameKind::Provider, provider)?;
        check(NameKind::Bucket, bucket)?;
        let root = self.root()?;
        let _lock = self.lock(&root)?;
        // Read before anything is written, so that a refresh directory or state file that
        // cannot be used fails the call with nothing written.
        let refresh = match self.refresh_dir(&root, provider, false)? {
            Some(refresh) => {
                let (mut state, rewrite) = self.state_to_update(&refresh, bucket)?;
                // A replaced token is a new login: its bookkeeping starts over (no mark,
                // no cooldown from the old login's refresh). A merge from the sandbox
                // clears the mark only.
                let reset = mode == SaveMode::Replace && state.refreshed_at.is_some();
                let rewrite = rewrite || reset || state.needs_login.is_some();
                state.needs_login = None;
                if mode == SaveMode::Replace {
                    state.refreshed_at = None;
                }
                rewrite.then_some((refresh, state))
            }
            None => None,
        };
        let Some(dir) = self.token_dir(&root, provider, true)? else {
            return Err(StoreError::Io {
                op: "mkdir",
                path: root.path.join(TOKENS).join(provider),
                source: Errno::ENOENT.into(),
            });
        };
        let file_name = format!("{bucket}{EXT}");
        let merged;
        let next = match mode {
            SaveMode::Replace => incoming,
            SaveMode::Merge => match self.read_token(&dir, &file_name)? {
                Some(stored) => {
                    merged = stored.merge(incoming);
                    &merged
                }
                None => incoming,
            },
        };
        super::check_storable(next)?;
        let written = write_json(&dir, &file_name, next);
        self.invalidate();
        written?;
        match refresh {
            Some((refresh, state)) => write_state(&refresh, bucket, &state),
            None => Ok(()),
        }
    }

    fn remove_token(&self, provider: &str, bucket: &str) -> Result<bool, StoreError> {
        check(NameKind::Provider, provider)?;
        check(NameKind::Bucket, bucket)?;
        let root = self.root()?;
        let _lock = self.lock(&root)?;
        // The bucket's refresh state goes with its token (its refresh lock file stays).
        if let Some(refresh) = self.refresh_dir(&root, provider, false)? {
            if remove_file(&refresh, &format!("{bucket}{EXT}"))? {
                sync_dir(&refresh)?;
            }
        }
        let Some(tokens) = sub_dir(&root, TOKENS, false)? else {
            return Ok(false);
        };
        let Some(dir) = sub_dir(&tokens, provider, false)? else {
            return Ok(false);
        };
        let removed = remove_file(&dir, &format!("{bucket}{EXT}"));
        self.invalidate();
        let removed = removed?;
        // Drop the provider directory once its last token is gone (under the lock, so no
        // concurrent save is about to write into it).
        match rustix::fs::unlinkat(&tokens.fd, provider, AtFlags::REMOVEDIR) {
            Ok(()) => sync_dir(&tokens)?,
            Err(rustix::io::Errno::NOENT) => {}
            Err(rustix::io::Errno::NOTEMPTY | rustix::io::Errno::EXIST) => {
                if removed {
                    sync_dir(&dir)?;
                }
            }
            Err(e) => {
                tracing::warn!(path = %dir.path.display(), error = %e, "could not remove an empty provider directory")
            }
        }
        Ok(removed)
    }

    fn list_providers(&self) -> Result<Vec<String>, StoreError> {
        let root = self.root()?;
        let Some(tokens) = sub_dir(&root, TOKENS, false)? else {
            return Ok(Vec::new());
        };
        let mut providers = Vec::new();
        for (name, file_type) in entries(&tokens)? {
            if file_type != FileType::Directory || !is_valid(NameKind::Provider, &name) {
                continue;
            }
            let Some(dir) = sub_dir(&tokens, &name, false)? else {
                continue;
            };
            if !list_json(&dir, NameKind::Bucket)?.is_empty() {
                providers.push(name);
            }
        }
        providers.sort();
        Ok(providers)
    }

    fn list_buckets(&self, provider: &str) -> Result<Vec<String>, StoreError> {
        check(NameKind::Provider, provider)?;
        let root = self.root()?;
        match self.token_dir(&root, provider, false)? {
            Some(dir) => list_json(&dir, NameKind::Bucket),
            None => Ok(Vec::new()),
        }
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
        let root = self.root()?;
        let _lock = self.lock(&root)?;
        let Some(dir) = sub_dir(&root, KEYS, true)? else {
            return Err(StoreError::Io {
                op: "mkdir",
                path: root.path.join(KEYS),
                source: Errno::ENOENT.into(),
            });
        };
        let key = KeyFile { key: key.expose() };
        let written = write_json(&dir, &format!("{name}{EXT}"), &key);
        self.invalidate();
        written
    }

    fn remove_key(&self, name: &str) -> Result<bool, StoreError> {
        check(NameKind::Key, name)?;
        let root = self.root()?;
        let _lock = self.lock(&root)?;
        let Some(dir) = sub_dir(&root, KEYS, false)? else {
            return Ok(false);
        };
        let removed = remove_file(&dir, &format!("{name}{EXT}"));
        self.invalidate();
        let removed = removed?;
        if removed {
            sync_dir(&dir)?;
        }
        Ok(removed)
    }

    fn list_keys(&self) -> Result<Vec<String>, StoreError> {
        let root = self.root()?;
        match sub_dir(&root, KEYS, false)? {
            Some(dir) => list_json(&dir, NameKind::Key),
            None => Ok(Vec::new()),
        }
    }

    /// An exclusive `flock` on `refresh/<provider>/<bucket>.lock` (created 0600 when
    /// missing, through the directories' descriptors), taken through a fresh open of the
    /// file: it excludes other threads of this process and other processes alike. The
    /// store lock is not taken.
    fn refresh_lock(&self, provider: &str, bucket: &str) -> Result<RefreshLock, StoreError> {
        check(NameKind::Provider, provider)?;
        check(NameKind::Bucket, bucket)?;
        let root = self.root()?;
        let dir = self.refresh_dir_created(&root, provider)?;
        let name = format!("{bucket}{LOCK_EXT}");
        let path = dir.path.join(&name);
        let fd = rustix::fs::openat(
            &dir.fd,
            name.as_str(),
            OFlags::RDWR | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
            Mode::from_raw_mode(FILE_MODE),
        )
        .map_err(|e| io_err("open", &path)(e.into()))?;
        let stat = rustix::fs::fstat(&fd).map_err(|e| io_err("stat", &path)(e.into()))?;
        if FileType::from_raw_mode(stat.st_mode) != FileType::RegularFile {
            return Err(corrupt(&path, "not a regular file"));
        }
        // Polled without blocking, so that a wait is bounded (REFRESH_LOCK_WAIT).
        super::flock_polled(File::from(fd), &path, REFRESH_LOCK_WAIT).map(RefreshLock::new)
    }

    /// Read without a lock (state files are replaced by rename); a corrupt state file is
    /// [`StoreError::Corrupt`] and is left as it is.
    fn refresh_state(&self, provider: &str, bucket: &str) -> Result<RefreshState, StoreError> {
        check(NameKind::Provider, provider)?;
        check(NameKind::Bucket, bucket)?;
        let root = self.root()?;
        let Some(dir) = self.refresh_dir(&root, provider, false)? else {
            return Ok(RefreshState::default());
        };
        Ok(self.read_state(&dir, bucket)?.unwrap_or_default())
    }

    /// The stored token is read as [`SaveMode::Merge`] reads it: one that cannot be read or
    /// parsed fails the call before `decide` is asked, and nothing is written.
    fn finish_refresh(
        &self,
        provider: &str,
        bucket: &str,
        decide: &mut dyn FnMut(Option<&Token>) -> RefreshWrite,
    ) -> Result<bool, StoreError> {
        check(NameKind::Provider, provider)?;
        check(NameKind::Bucket, bucket)?;
        let root = self.root()?;
        let _lock = self.lock(&root)?;
        let file_name = format!("{bucket}{EXT}");
        let stored = match self.token_dir(&root, provider, false)? {
            Some(dir) => self.read_token(&dir, &file_name)?,
            None => None,
        };
        let decided = decide(stored.as_ref());
        if stored.is_none() {
            // Removal wins: nothing is written for a bucket without a token, whatever
            // the caller decided.
            return Ok(false);
        }
        match decided {
            RefreshWrite::Nothing => Ok(false),
            RefreshWrite::NeedsLogin(mark) => {
                let refresh = self.refresh_dir_created(&root, provider)?;
                let (mut state, _) = self.state_to_update(&refresh, bucket)?;
                state.needs_login = Some(mark);
                write_state(&refresh, bucket, &state)?;
                Ok(true)
            }
            RefreshWrite::Token { token, at } => {
                super::check_storable(&token)?;
                // Both directories are ready (and trusted) before the token is written.
                let refresh = self.refresh_dir_created(&root, provider)?;
                let Some(dir) = self.token_dir(&root, provider, true)? else {
                    return Err(StoreError::Io {
                        op: "mkdir",
                        path: root.path.join(TOKENS).join(provider),
                        source: Errno::ENOENT.into(),
                    });
                };
                let written = write_json(&dir, &file_name, &token);
                self.invalidate();
                written?;
                let state = RefreshState {
                    refreshed_at: Some(at),
                    needs_login: None,
                };
                write_state(&refresh, bucket, &state)?;
                Ok(true)
            }
        }
    }

    fn clear(&self) {
        if let Some(cache) = &self.cache {
            cache.shutdown();
        }
    }
}

impl FileBackend {
    fn read_key(&self, name: &str) -> Result<Option<Secret>, StoreError> {
        let root = self.root()?;
        let Some(dir) = sub_dir(&root, KEYS, false)? else {
            return Ok(None);
        };
        let file_name = format!("{name}{EXT}");
        let Some(bytes) = self.read_file(&dir, &file_name)? else {
            return Ok(None);
        };
        let path = dir.path.join(&file_name);
        let mut map = match parse_json(&path, &bytes)? {
            Value::Object(map) => map,
            mut other => {
                wipe_json(&mut other);
                return Err(corrupt(&path, "not a JSON object"));
            }
        };
        let key = map.remove("key");
        map.values_mut().for_each(wipe_json);
        match key {
            Some(Value::String(s)) => Ok(Some(Secret::new(s))),
            None => Err(corrupt(&path, "missing key")),
            Some(mut other) => {
                wipe_json(&mut other);
                Err(corrupt(&path, "key must be a string"))
            }
        }
    }
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

fn corrupt(path: &Path, reason: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

fn untrusted(path: &Path, reason: impl Into<String>) -> StoreError {
    StoreError::Untrusted {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

/// Opens `name` in `parent` as a store directory: `O_DIRECTORY|O_NOFOLLOW`, then checks
/// that it is ours and not writable by group or others. `None` when it does not exist;
/// [`StoreError::Untrusted`] for a symlink, a non-directory, another owner or a
/// group/other-writable mode.
fn open_dir(parent: impl AsFd, name: &Path, path: &Path) -> Result<Option<DirFd>, StoreError> {
    let fd = match rustix::fs::openat(
        &parent,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::NOENT) => return Ok(None),
        Err(e @ (rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR)) => {
            let what = match rustix::fs::statat(&parent, name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Symlink => {
                    "it is a symlink; a store directory must be a real directory".to_owned()
                }
                Ok(_) => "it is not a directory".to_owned(),
                Err(_) => format!("cannot open it ({})", io::Error::from(e)),
            };
            return Err(untrusted(path, what));
        }
        Err(e) => return Err(io_err("open", path)(e.into())),
    };
    let stat = rustix::fs::fstat(&fd).map_err(|e| io_err("stat", path)(e.into()))?;
    check_dir_stat(&stat, path)?;
    Ok(Some(DirFd {
        fd,
        path: path.to_owned(),
    }))
}

/// A store directory must be owned by our euid and not writable by group or others.
fn check_dir_stat(stat: &Stat, path: &Path) -> Result<(), StoreError> {
    let euid = nix::unistd::geteuid().as_raw();
    if stat.st_uid != euid {
        return Err(untrusted(
            path,
            format!(
                "it is owned by uid {} instead of {euid}; only the user who runs credproxy may own the store",
                stat.st_uid
            ),
        ));
    }
    if stat.st_mode & 0o022 != 0 {
        return Err(untrusted(
            path,
            format!(
                "it is writable by group or others (mode {:o}); chmod 700 it",
                stat.st_mode & 0o7777
            ),
        ));
    }
    Ok(())
}

/// The subdirectory `name` of `parent` (a single valid path component), checked as
/// [`open_dir`] does; created 0700 first when missing and `create` (the new entry's
/// parent is flushed so that it survives a crash).
fn sub_dir(parent: &DirFd, name: &str, create: bool) -> Result<Option<DirFd>, StoreError> {
    let path = parent.path.join(name);
    if let Some(dir) = open_dir(&parent.fd, Path::new(name), &path)? {
        return Ok(Some(dir));
    }
    if !create {
        return Ok(None);
    }
    match rustix::fs::mkdirat(&parent.fd, name, Mode::from_raw_mode(DIR_MODE)) {
        Ok(()) => {
            // Exactly 0700 whatever the umask; then the new entry is made durable.
            let dir = open_dir(&parent.fd, Path::new(name), &path)?;
            if let Some(dir) = &dir {
                rustix::fs::fchmod(&dir.fd, Mode::from_raw_mode(DIR_MODE))
                    .map_err(|e| io_err("chmod", &path)(e.into()))?;
            }
            sync_dir(parent)?;
            Ok(dir)
        }
        Err(rustix::io::Errno::EXIST) => open_dir(&parent.fd, Path::new(name), &path),
        Err(e) => Err(io_err("mkdir", &path)(e.into())),
    }
}

/// `<top>/<provider>/` below the store root (`top` is `tokens` or `refresh`), each checked
/// as [`sub_dir`] does and created 0700 when `create`; `None` when absent.
fn provider_dir(
    root: &DirFd,
    top: &str,
    provider: &str,
    create: bool,
) -> Result<Option<DirFd>, StoreError> {
    let Some(parent) = sub_dir(root, top, create)? else {
        return Ok(None);
    };
    sub_dir(&parent, provider, create)
}

/// Records `state` as the refresh state of `bucket` in `dir` (a `refresh/<provider>/`):
/// written atomically, or its file removed when it is the default state.
fn write_state(dir: &DirFd, bucket: &str, state: &RefreshState) -> Result<(), StoreError> {
    let name = format!("{bucket}{EXT}");
    if *state != RefreshState::default() {
        return write_json(dir, &name, state);
    }
    if remove_file(dir, &name)? {
        sync_dir(dir)?;
    }
    Ok(())
}

/// The entries of `dir` (not `.` and `..`) with their type, which is read with
/// `fstatat(AT_SYMLINK_NOFOLLOW)` when the file system does not report it. Names that
/// are not UTF-8 are skipped (no valid store name is).
fn entries(dir: &DirFd) -> Result<Vec<(String, FileType)>, StoreError> {
    let list_err = |e: rustix::io::Errno| io_err("list", &dir.path)(e.into());
    // `Dir` reads through its own descriptor (it opens `.` relative to ours).
    let reader = rustix::fs::Dir::read_from(&dir.fd).map_err(list_err)?;
    let mut out = Vec::new();
    for entry in reader {
        let entry = entry.map_err(list_err)?;
        let name: &CStr = entry.file_name();
        let Ok(name) = name.to_str() else {
            continue;
        };
        if name == "." || name == ".." {
            continue;
        }
        let file_type = match entry.file_type() {
            FileType::Unknown => {
                match rustix::fs::statat(&dir.fd, name, AtFlags::SYMLINK_NOFOLLOW) {
                    Ok(st) => FileType::from_raw_mode(st.st_mode),
                    Err(rustix::io::Errno::NOENT) => continue,
                    Err(e) => return Err(io_err("stat", &dir.path.join(name))(e.into())),
                }
            }
            known => known,
        };
        out.push((name.to_owned(), file_type));
    }
    Ok(out)
}

/// The names of the regular files `<valid name>.json` in `dir`, sorted.
fn list_json(dir: &DirFd, kind: NameKind) -> Result<Vec<String>, StoreError> {
    let mut names: Vec<String> = entries(dir)?
        .into_iter()
        .filter(|(_, t)| *t == FileType::RegularFile)
        .filter_map(|(name, _)| {
            let stem = name.strip_suffix(EXT)?;
            is_valid(kind, stem).then(|| stem.to_owned())
        })
        .collect();
    names.sort();
    Ok(names)
}

/// Parses a store file; the error names the position only, never the content. No copy
/// of a string of the file is left in freed memory (see [`crate::secret_json`]).
fn parse_json(path: &Path, bytes: &SecretBytes) -> Result<Value, StoreError> {
    crate::secret_json::parse(&bytes.0).map_err(|e| corrupt(path, e.to_string()))
}

/// Creates `dir` and any missing parent with mode 0700 (set by chmod, whatever the umask),
/// flushing each new directory's parent so that the new entry survives a crash. Only the
/// store root and its parents are created by path; their ancestors were checked first
/// ([`crate::trust::check_ancestors`]), so no other uid can redirect them.
fn create_dirs(dir: &Path) -> Result<(), StoreError> {
    let mut missing = Vec::new();
    let mut cur = dir;
    loop {
        match fs::symlink_metadata(cur) {
            Ok(_) => break,
            Err(e) if e.kind() == ErrorKind::NotFound => missing.push(cur),
            Err(e) => return Err(io_err("stat", cur)(e)),
        }
        match cur.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => cur = parent,
            _ => break,
        }
    }
    for path in missing.into_iter().rev() {
        match DirBuilder::new().mode(DIR_MODE).create(path) {
            Ok(()) => {
                fs::set_permissions(path, Permissions::from_mode(DIR_MODE))
                    .map_err(io_err("chmod", path))?;
                let parent = match path.parent() {
                    Some(parent) if !parent.as_os_str().is_empty() => parent,
                    _ => Path::new("."),
                };
                File::open(parent)
                    .and_then(|d| d.sync_all())
                    .map_err(io_err("fsync", parent))?;
            }
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err("mkdir", path)(e)),
        }
    }
    Ok(())
}

fn sync_dir(dir: &DirFd) -> Result<(), StoreError> {
    rustix::fs::fsync(&dir.fd).map_err(|e| io_err("fsync", &dir.path)(e.into()))
}

/// Deletes `dir/name`; `Ok(false)` when it did not exist.
fn remove_file(dir: &DirFd, name: &str) -> Result<bool, StoreError> {
    match rustix::fs::unlinkat(&dir.fd, name, AtFlags::empty()) {
        Ok(()) => Ok(true),
        Err(rustix::io::Errno::NOENT) => Ok(false),
        Err(e) => Err(io_err("remove", &dir.path.join(name))(e.into())),
    }
}

/// Serializes `value` into a buffer sized in advance, so that no reallocation leaves an
/// unwiped partial copy behind; the buffer is wiped when dropped.
fn to_json(value: &impl serde::Serialize) -> serde_json::Result<SecretBytes> {
    struct Count(usize);
    impl Write for Count {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    serde_json::to_writer(&mut count, value)?;
    let mut buf = SecretBytes(Vec::with_capacity(count.0));
    serde_json::to_writer(&mut buf.0, value)?;
    Ok(buf)
}

/// Replaces `dir/name` with `value` as JSON, atomically (see the module documentation).
/// An error from the final directory flush means the new file is in place but might not
/// survive a crash.
fn write_json(dir: &DirFd, name: &str, value: &impl serde::Serialize) -> Result<(), StoreError> {
    let target = dir.path.join(name);
    let data = to_json(value).map_err(|e| io_err("serialize", &target)(e.into()))?;
    let mut attempt = 0;
    let (tmp, mut file) = loop {
        let tmp = format!(".{name}.{:08x}.tmp", rand::random::<u32>());
        match rustix::fs::openat(
            &dir.fd,
            tmp.as_str(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(FILE_MODE),
        ) {
            Ok(fd) => break (tmp, File::from(fd)),
            Err(rustix::io::Errno::EXIST) if attempt < 8 => attempt += 1,
            Err(e) => return Err(io_err("create", &dir.path.join(&tmp))(e.into())),
        }
    };
    let tmp_path = dir.path.join(&tmp);
    let result = file
        .set_permissions(Permissions::from_mode(FILE_MODE))
        .map_err(io_err("chmod", &tmp_path))
        .and_then(|()| file.write_all(&data.0).map_err(io_err("write", &tmp_path)))
        .and_then(|()| file.sync_all().map_err(io_err("fsync", &tmp_path)))
        .and_then(|()| {
            rustix::fs::renameat(&dir.fd, tmp.as_str(), &dir.fd, name)
                .map_err(|e| io_err("rename", &target)(e.into()))
        });
    drop(file);
    if let Err(e) = result {
        if let Err(rm) = rustix::fs::unlinkat(&dir.fd, tmp.as_str(), AtFlags::empty()) {
            tracing::warn!(path = %tmp_path.display(), error = %rm, "could not remove a temporary store file");
        }
        return Err(e);
    }
    sync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::sync::{mpsc, Barrier};
    use std::time::Duration;

    fn tok(v: Value) -> Token {
        Token::from_value(v).expect("valid token")
    }

    fn basic(access: &str) -> Token {
        tok(json!({"access_token": access, "expiry": 1, "token_type": "Bearer"}))
    }

    fn put(b: &FileBackend, provider: &str, bucket: &str, token: &Token, mode: SaveMode) {
        b.save_token(provider, bucket, token, mode).unwrap();
    }

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    fn count(dir: &Path) -> usize {
        fs::read_dir(dir).unwrap().count()
    }

    fn store() -> (tempfile::TempDir, FileBackend) {
        let t = tempfile::tempdir().unwrap();
        let b = FileBackend::open(t.path().join("store")).unwrap();
        (t, b)
    }

    #[test]
    fn open_creates_missing_dirs_0700() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("a/b/store");
        let b = FileBackend::open(&dir).unwrap();
        assert_eq!(b.dir(), dir);
        for p in ["a", "a/b", "a/b/store"] {
            assert_eq!(mode(&t.path().join(p)), 0o700, "{p}");
        }
        assert!(b.is_blocking());
        FileBackend::open(&dir).unwrap();
        fs::write(t.path().join("f"), "").unwrap();
        let err = FileBackend::open(t.path().join("f")).unwrap_err();
        assert!(
            matches!(err, StoreError::Untrusted { .. })
                && err.to_string().contains("not a directory"),
            "{err}"
        );
    }

    #[test]
    fn token_round_trip_merge_replace_and_modes() {
        let (_t, b) = store();
        assert!(b.get_token("p", "default").unwrap().is_none());
        let first = tok(
            json!({"access_token":"A1","expiry":1,"token_type":"B","refresh_token":"R","x":"y"}),
        );
        put(&b, "p", "default", &first, SaveMode::Merge);
        assert_eq!(b.get_token("p", "default").unwrap().unwrap(), first);
        put(&b, "p", "default", &basic("A2"), SaveMode::Merge);
        let got = b.get_token("p", "default").unwrap().unwrap();
        assert_eq!(got.fields()["access_token"], "A2");
        assert_eq!(got.fields()["refresh_token"], "R");
        assert_eq!(got.fields()["x"], "y");
        put(&b, "p", "default", &basic("A3"), SaveMode::Replace);
        assert_eq!(b.get_token("p", "default").unwrap().unwrap(), basic("A3"));

        let (tokens, file) = (b.dir().join(TOKENS), b.dir().join("tokens/p/default.json"));
        for dir in [b.dir(), &tokens, &tokens.join("p")] {
            assert_eq!(mode(dir), 0o700);
        }
        assert_eq!(mode(&file), 0o600);
        let v: Value = serde_json::from_slice(&fs::read(&file).unwrap()).unwrap();
        assert_eq!(v["access_token"], "A3");
        assert_eq!(count(&tokens.join("p")), 1, "no temp file left");
        // A file opened up by hand is still read; clear() drops nothing on disk.
        fs::set_permissions(&file, Permissions::from_mode(0o644)).unwrap();
        b.clear();
        assert!(b.get_token("p", "default").unwrap().is_some());
    }

    #[test]
    fn key_round_trip() {
        let (_t, b) = store();
        assert!(b.get_key("k").unwrap().is_none());
        b.set_key("k", &Secret::from("S1")).unwrap();
        let path = b.dir().join("keys/k.json");
        assert_eq!(fs::read(&path).unwrap(), br#"{"key":"S1"}"#);
        assert_eq!((mode(&path), mode(&b.dir().join(KEYS))), (0o600, 0o700));
        let odd = "q\"uote\\slash\nnewline";
        b.set_key("k", &Secret::from(odd)).unwrap();
        assert_eq!(b.get_key("k").unwrap().unwrap().expose(), odd);
        assert_eq!(b.list_keys().unwrap(), ["k"]);
        assert!(b.remove_key("k").unwrap());
        assert!(!b.remove_key("k").unwrap());
        assert!(b.get_key("k").unwrap().is_none());
        assert!(b.list_keys().unwrap().is_empty());
    }

    #[test]
    fn corrupt_files_are_reported_and_kept() {
        let (_t, b) = store();
        let path = b.dir().join("tokens/p/b.json");
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        let cases: [(&[u8], &str); 4] = [
            (
                b"{\"access_token\": \"CANARY\",\n  ",
                "not valid JSON at line 2",
            ),
            (
                br#"{"access_token":"CANARY","expiry":1}"#,
                "missing token_type",
            ),
            (br#"["CANARY"]"#, "JSON object"),
            (b"", "not valid JSON"),
        ];
        for (content, reason) in cases {
            fs::write(&path, content).unwrap();
            let err = b.get_token("p", "b").unwrap_err();
            let text = err.to_string();
            assert!(matches!(err, StoreError::Corrupt { .. }), "{text}");
            assert!(text.contains(reason) && !text.contains("CANARY"), "{text}");
            let err = b.save_token("p", "b", &basic("new"), SaveMode::Merge);
            assert!(matches!(err, Err(StoreError::Corrupt { .. })));
            assert_eq!(
                fs::read(&path).unwrap(),
                content,
                "corrupt file overwritten"
            );
        }
        put(&b, "p", "b", &basic("new"), SaveMode::Replace);
        assert_eq!(b.get_token("p", "b").unwrap().unwrap(), basic("new"));

        fs::create_dir_all(b.dir().join(KEYS)).unwrap();
        for content in ["[\"CANARY\"]", r#"{"key":5}"#, r#"{"other":"CANARY"}"#, "{"] {
            fs::write(b.dir().join("keys/k.json"), content).unwrap();
            let err = b.get_key("k").unwrap_err();
            assert!(matches!(err, StoreError::Corrupt { .. }));
            assert!(!err.to_string().contains("CANARY"));
        }
    }

    #[test]
    fn failed_write_leaves_no_temp_file() {
        let (_t, b) = store();
        let dir = b.dir().join("tokens/p");
        fs::create_dir_all(dir.join("b.json/inner")).unwrap();
        let err = b.save_token("p", "b", &basic("a"), SaveMode::Replace);
        assert!(matches!(err, Err(StoreError::Io { op: "rename", .. })));
        assert_eq!(count(&dir), 1);
    }

    #[test]
    fn invalid_names_are_refused() {
        let (t, b) = store();
        let (tk, key) = (basic("a"), Secret::from("s"));
        for bad in ["../x", "a/b", ".", "..", "", "a\0b"] {
            let results = [
                b.save_token(bad, "b", &tk, SaveMode::Merge),
                b.save_token("p", bad, &tk, SaveMode::Replace),
                b.get_token(bad, "b").map(drop),
                b.get_token("p", bad).map(drop),
                b.remove_token(bad, "b").map(drop),
                b.remove_token("p", bad).map(drop),
                b.list_buckets(bad).map(drop),
                b.set_key(bad, &key),
                b.get_key(bad).map(drop),
                b.remove_key(bad).map(drop),
                b.refresh_lock(bad, "b").map(drop),
                b.refresh_lock("p", bad).map(drop),
                b.refresh_state(bad, "b").map(drop),
                b.refresh_state("p", bad).map(drop),
                b.finish_refresh(bad, "b", &mut |_| RefreshWrite::Nothing)
                    .map(drop),
                b.finish_refresh("p", bad, &mut |_| RefreshWrite::Nothing)
                    .map(drop),
            ];
            for r in results {
                assert!(matches!(r, Err(StoreError::InvalidName)), "{bad:?}");
            }
        }
        assert!(matches!(
            b.set_key("a@b", &key),
            Err(StoreError::InvalidName)
        ));
        assert_eq!(count(t.path()), 1);
        assert!(!b.dir().join(TOKENS).exists() && !b.dir().join(KEYS).exists());
        assert!(!b.dir().join(REFRESH).exists());
    }

    #[test]
    fn refresh_lock_takes_no_store_lock_and_finish_refresh_takes_it() {
        let (_t, b) = store();
        put(&b, "p", "b", &basic("a"), SaveMode::Replace);
        let held = b.lock(&b.root().unwrap()).unwrap();
        // Taken at once while the store lock is held elsewhere: refresh_lock never waits
        // for the store lock, so the order (refresh lock, then store lock) cannot invert.
        let refresh = b.refresh_lock("p", "b").unwrap();
        assert_eq!(b.refresh_state("p", "b").unwrap(), RefreshState::default());
        let (tx, rx) = mpsc::channel();
        let b = &b;
        std::thread::scope(|s| {
            s.spawn(move || {
                tx.send(b.finish_refresh("p", "b", &mut |stored| {
                    assert!(stored.is_some());
                    RefreshWrite::Token {
                        token: basic("new"),
                        at: 5,
                    }
                }))
            });
            let early = rx.recv_timeout(Duration::from_millis(150));
            assert!(
                early.is_err(),
                "finish_refresh ran while the store lock was held"
            );
            drop(held);
            assert!(rx.recv_timeout(Duration::from_secs(10)).unwrap().unwrap());
        });
        drop(refresh);
        assert_eq!(b.get_token("p", "b").unwrap().unwrap(), basic("new"));
        assert_eq!(b.refresh_state("p", "b").unwrap().refreshed_at, Some(5));
    }

    #[test]
    fn lists_are_sorted_and_skip_junk() {
        let (_t, b) = store();
        for (p, bucket) in [
            ("p2", "b"),
            ("p1", "zeta"),
            ("p1", "alpha"),
            ("p1", "x@y.z"),
        ] {
            put(&b, p, bucket, &basic("a"), SaveMode::Merge);
        }
        b.set_key("z", &Secret::from("1")).unwrap();
        b.set_key("a", &Secret::from("2")).unwrap();
        for dir in [
            "tokens/p1/sub.json",
            "tokens/empty",
            "tokens/bad name",
            "keys/d.json",
        ] {
            fs::create_dir_all(b.dir().join(dir)).unwrap();
        }
        let junk = [
            "tokens/p1/.alpha.json.deadbeef.tmp",
            "tokens/p1/notes.txt",
            "tokens/p1/bad name.json",
            "tokens/empty/.x.json.00000000.tmp",
            "tokens/bad name/x.json",
            "tokens/file.json",
            "keys/.k.json.0000abcd.tmp",
            "keys/a@b.json",
            "keys/readme",
        ];
        for file in junk {
            fs::write(b.dir().join(file), "junk").unwrap();
        }
        assert_eq!(b.list_providers().unwrap(), ["p1", "p2"]);
        assert_eq!(b.list_buckets("p1").unwrap(), ["alpha", "x@y.z", "zeta"]);
        assert!(b.list_buckets("none").unwrap().is_empty());
        assert_eq!(b.list_keys().unwrap(), ["a", "z"]);
    }

    #[test]
    fn remove_then_list() {
        let (_t, b) = store();
        assert!(b.list_providers().unwrap().is_empty() && b.list_keys().unwrap().is_empty());
        put(&b, "p", "a", &basic("a"), SaveMode::Merge);
        put(&b, "p", "b", &basic("b"), SaveMode::Merge);
        assert!(b.remove_token("p", "a").unwrap());
        assert!(!b.remove_token("p", "a").unwrap());
        assert_eq!(b.list_buckets("p").unwrap(), ["b"]);
        assert!(b.remove_token("p", "b").unwrap());
        assert!(b.list_providers().unwrap().is_empty());
        assert!(!b.dir().join("tokens/p").exists());
        assert!(!b.remove_token("q", "a").unwrap());
    }

    #[test]
    fn concurrent_merges_lose_no_update() {
        let (_t, b) = store();
        let seed = tok(json!({"access_token":"a","expiry":0,"token_type":"B","refresh_token":"R"}));
        put(&b, "p", "b", &seed, SaveMode::Replace);
        let barrier = Barrier::new(8);
        std::thread::scope(|s| {
            for i in 0..8 {
                let (dir, barrier) = (b.dir().to_owned(), &barrier);
                s.spawn(move || {
                    // A backend per thread, as separate processes would have.
                    let own = FileBackend::open(dir).unwrap();
                    barrier.wait();
                    for round in 0..4 {
                        let field = format!("f{i}");
                        let t = tok(
                            json!({"access_token":"a","expiry":round,"token_type":"B",field:round}),
                        );
                        put(&own, "p", "b", &t, SaveMode::Merge);
                    }
                });
            }
        });
        let got = b.get_token("p", "b").unwrap().unwrap();
        for i in 0..8 {
            assert_eq!(
                got.fields()[&format!("f{i}")],
                3,
                "lost update of thread {i}"
            );
        }
        assert_eq!(got.fields()["refresh_token"], "R");
        assert_eq!(count(&b.dir().join("tokens/p")), 1);
    }

    #[test]
    fn writers_wait_for_the_store_lock() {
        let (_t, b) = store();
        // Each lock() opens .lock afresh: the same exclusion another process would see.
        let held = b.lock(&b.root().unwrap()).unwrap();
        let (tx, rx) = mpsc::channel();
        let b = &b;
        std::thread::scope(|s| {
            s.spawn(move || tx.send(b.save_token("p", "b", &basic("a"), SaveMode::Merge)));
            let early = rx.recv_timeout(Duration::from_millis(150));
            assert!(early.is_err(), "save ran while the lock was held");
            assert!(
                b.get_token("p", "b").unwrap().is_none(),
                "reads take no lock"
            );
            drop(held);
            rx.recv_timeout(Duration::from_secs(10)).unwrap().unwrap();
        });
        assert!(b.get_token("p", "b").unwrap().is_some());
    }

    #[test]
    fn open_sweeps_temp_files_left_by_a_crash() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = FileBackend::open(dir.path()).expect("open");
        store
            .save_token("p", "default", &basic("a"), SaveMode::Replace)
            .expect("save");
        let stray = dir.path().join("tokens/p/.default.json.deadbeef.tmp");
        fs::write(&stray, b"{\"refresh_token\":\"left-behind\"}").expect("write");
        let key_stray = dir.path().join("keys/.k.json.00000001.tmp");
        fs::create_dir_all(key_stray.parent().expect("parent")).expect("mkdir");
        fs::write(&key_stray, b"secret").expect("write");
        let kept = dir.path().join("tokens/p/notes.tmp");
        fs::write(&kept, b"not ours").expect("write");
        drop(store);
        let store = FileBackend::open(dir.path()).expect("reopen");
        assert!(!stray.exists() && !key_stray.exists(), "temp files swept");
        assert!(kept.exists(), "files that are not our temp files stay");
        assert!(store.get_token("p", "default").expect("get").is_some());
    }

    /// Polls `f` until it is true or 5 s pass (the watcher reacts in microseconds; the
    /// bound only keeps a broken cache from hanging the test).
    fn eventually(mut f: impl FnMut() -> bool) -> bool {
        let until = std::time::Instant::now() + Duration::from_secs(5);
        while std::time::Instant::now() < until {
            if f() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        false
    }

    /// The access token served for `provider:default`, through the read cache when on.
    fn access(b: &FileBackend, provider: &str) -> Option<String> {
        b.get_served_token(provider, "default")
            .expect("get")
            .map(|t| {
                t.to_token().expect("served token parses").fields()["access_token"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned()
            })
    }

    #[test]
    fn read_cache_sees_writes_by_this_and_other_processes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cached = FileBackend::open(dir.path())
            .expect("open")
            .with_read_cache();
        assert!(cached.cache.is_some(), "inotify is available on Linux");
        let other = FileBackend::open(dir.path()).expect("open");
        // Opening `other` took the store lock (its sweep): the events of that may still be
        // arriving, and each one drops the cache.
        assert!(
            eventually(|| access(&cached, "p").is_none()
                && cached.cached_token("p", "default").map(|t| t.is_none()) == Some(true)),
            "\"not stored\" is cached"
        );
        // A new provider directory and file written by someone else.
        put(&other, "p", "default", &basic("one"), SaveMode::Replace);
        assert!(eventually(|| access(&cached, "p").as_deref() == Some("one")));
        // The write's own events may still be arriving; once they settle, reads are
        // answered from memory.
        assert!(
            eventually(
                || access(&cached, "p").is_some() && cached.cached_token("p", "default").is_some()
            ),
            "now answered from memory"
        );
        // Changed by someone else.
        put(&other, "p", "default", &basic("two"), SaveMode::Replace);
        assert!(eventually(|| access(&cached, "p").as_deref() == Some("two")));
        // Written through the cached backend: visible at once.
        put(&cached, "p", "default", &basic("three"), SaveMode::Replace);
        assert_eq!(access(&cached, "p").as_deref(), Some("three"));
        // Removed by someone else.
        assert!(other.remove_token("p", "default").expect("remove"));
        assert!(eventually(|| access(&cached, "p").is_none()));
        // Keys too.
        other.set_key("k", &Secret::from("v1")).expect("set");
        assert!(eventually(|| cached
            .get_key("k")
            .expect("get")
            .map(|k| k.expose() == "v1")
            == Some(true)));
        other.set_key("k", &Secret::from("v2")).expect("set");
        assert!(eventually(|| cached
            .get_key("k")
            .expect("get")
            .map(|k| k.expose() == "v2")
            == Some(true)));
    }

    #[test]
    fn read_cache_never_stays_stale_under_concurrent_writes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cached = std::sync::Arc::new(
            FileBackend::open(dir.path())
                .expect("open")
                .with_read_cache(),
        );
        let other = FileBackend::open(dir.path()).expect("open");
        put(&other, "p", "default", &basic("v0"), SaveMode::Replace);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let (c, stop) = (cached.clone(), stop.clone());
                std::thread::spawn(move || {
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let _ = access(&c, "p");
                    }
                })
            })
            .collect();
        for i in 1..=200 {
            put(
                &other,
                "p",
                "default",
                &basic(&format!("v{i}")),
                SaveMode::Replace,
            );
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for r in readers {
            r.join().expect("reader");
        }
        assert!(
            eventually(|| access(&cached, "p").as_deref() == Some("v200")),
            "the last write wins"
        );
    }

    #[test]
    fn clear_wipes_and_disables_the_read_cache() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cached = FileBackend::open(dir.path())
            .expect("open")
            .with_read_cache();
        put(&cached, "p", "default", &basic("a"), SaveMode::Replace);
        assert!(eventually(|| access(&cached, "p").as_deref() == Some("a")
            && cached.cached_token("p", "default").is_some()));
        cached.clear();
        assert!(
            cached.cached_token("p", "default").is_none(),
            "nothing held after clear"
        );
        assert_eq!(
            access(&cached, "p").as_deref(),
            Some("a"),
            "still served from disk"
        );
        assert!(
            cached.cached_token("p", "default").is_none(),
            "and not cached again"
        );
    }
}
