//! A read cache for the file backend, kept honest by inotify.
//!
//! Reading a token file costs a trip to the blocking pool, four syscalls and a JSON parse;
//! the cache lets the `CredentialStore` answer a repeated `get_token`/`get_api_key` on
//! its own thread. Every store directory that holds tokens or keys is watched (the root,
//! `tokens/`, `tokens/*/`, `keys/`; not `refresh/`, whose lock and state files feed no
//! cached value, though creating it changes the root and so invalidates), and ANY change
//! in any of them (a write by this process, by `credproxy store`, or by another server
//! sharing the store) drops the whole cache and bumps a generation counter. A read that
//! started before a change is not cached (its generation is stale), so a value read
//! before a write can never be stored after that write's invalidation. Writes made
//! through this backend invalidate synchronously as well, so this process never serves
//! its own stale value. The watcher adds a watch for a new directory before it
//! invalidates, so no change inside it can be missed. An inotify queue overflow also
//! drops everything. When the store directory itself is moved or removed, its watch is
//! gone and a directory created later at the same path would be unwatched: the cache is
//! then disabled for good (every read goes to disk), never left answering blind.
//!
//! The cache holds secrets (tokens as served, already without their refresh tokens, and
//! API keys): they are wiped when dropped, and [`ReadCache::shutdown`] wipes and disables
//! it and stops the watcher.
//! When inotify is unavailable there is no cache and every read goes to disk.

use std::collections::{HashMap, HashSet};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};

use crate::secret::Secret;
use crate::token::ServedToken;

/// How often the watcher thread checks whether it should stop.
const STOP_CHECK: Duration = Duration::from_millis(250);

/// Entries kept at most; past it the cache starts over (a store has a handful of entries).
const MAX_ENTRIES: usize = 4096;

/// The cache starts over at least this often, whatever the watcher saw: a backstop that
/// bounds staleness if an event is ever missed (a writer on another machine sharing a
/// network filesystem produces none).
const MAX_AGE: Duration = Duration::from_secs(2);

struct State {
    generation: u64,
    /// When the cache last started over.
    since: Instant,
    enabled: bool,
    /// False while whatever keeps the cache honest is not running (the etcd store's watch
    /// between an error and its re-establishment): nothing is answered or filled.
    live: bool,
    /// provider → bucket → what the file held.
    tokens: HashMap<String, HashMap<String, Option<ServedToken>>>,
    keys: HashMap<String, Option<Secret>>,
}

impl State {
    fn entries(&self) -> usize {
        self.tokens.values().map(HashMap::len).sum::<usize>() + self.keys.len()
    }

    fn new() -> State {
        State {
            generation: 0,
            since: Instant::now(),
            enabled: true,
            live: true,
            tokens: HashMap::new(),
            keys: HashMap::new(),
        }
    }

    /// Starts over when the entries are older than [`MAX_AGE`].
    fn expire(&mut self) {
        if self.since.elapsed() > MAX_AGE {
            self.invalidate();
        }
    }

    fn invalidate(&mut self) {
        self.generation += 1;
        self.since = Instant::now();
        // Dropping the ServedTokens and Secrets wipes them.
        self.tokens.clear();
        self.keys.clear();
    }
}

/// The cache and its watcher thread.
#[derive(Debug)]
pub struct ReadCache {
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "State(gen {}, {} tokens, {} keys)",
            self.generation,
            self.tokens.len(),
            self.keys.len()
        )
    }
}

impl ReadCache {
    /// Watches `store_dir` (and `tokens/`, `tokens/*/`, `keys/`) and starts the watcher
    /// thread; `None` when inotify or the thread is unavailable.
    pub fn start(store_dir: &Path) -> Option<ReadCache> {
        let inotify = match Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC) {
            Ok(i) => i,
            Err(e) => {
                tracing::info!(error = %e, "no inotify: the file store is read from disk every time");
                return None;
            }
        };
        let mut watcher = Watcher {
            inotify,
            root: store_dir.to_owned(),
            watched: HashMap::new(),
        };
        if let Err(e) = watcher.rescan() {
            tracing::info!(error = %e, "cannot watch the store: it is read from disk every time");
            return None;
        }
        let state = Arc::new(Mutex::new(State::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (thread_state, thread_stop) = (Arc::clone(&state), Arc::clone(&stop));
        let spawned = std::thread::Builder::new()
            .name("credproxy-watch".into())
            .spawn(move || watcher.run(&thread_state, &thread_stop));
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the store watcher: no read cache");
            return None;
        }
        Some(ReadCache { state, stop })
    }

    /// A cache with no watcher of its own: whoever creates it keeps it honest, calling
    /// [`ReadCache::invalidate`] on every change and [`ReadCache::suspend`] while it
    /// cannot see changes (the etcd store's watch). It starts suspended.
    pub fn detached() -> ReadCache {
        let mut state = State::new();
        state.live = false;
        ReadCache {
            state: Arc::new(Mutex::new(state)),
            stop: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Drops everything and answers nothing until [`ReadCache::resume`]: changes can no
    /// longer be seen.
    pub fn suspend(&self) {
        let mut state = self.lock();
        state.invalidate();
        state.live = false;
    }

    /// Answers again after [`ReadCache::suspend`] (from empty; a read begun while suspended
    /// is not cached). No effect after [`ReadCache::shutdown`].
    pub fn resume(&self) {
        let mut state = self.lock();
        state.invalidate();
        state.live = true;
    }

    /// True once [`ReadCache::shutdown`] has run: a watcher of a detached cache ends.
    pub fn is_shut_down(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current generation: take it before a read, pass it to the `fill_*` call after.
    pub fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// A cached token read: `Some(None)` for a cached "not stored".
    pub fn token(&self, provider: &str, bucket: &str) -> Option<Option<ServedToken>> {
        let mut state = self.lock();
        state.expire();
        if !(state.enabled && state.live) {
            return None;
        }
        state.tokens.get(provider)?.get(bucket).cloned()
    }

    /// Caches a token read that started at `generation`, unless anything changed since.
    pub fn fill_token(
        &self,
        generation: u64,
        provider: &str,
        bucket: &str,
        value: &Option<ServedToken>,
    ) {
        let mut state = self.lock();
        if !(state.enabled && state.live) || state.generation != generation {
            return;
        }
        if state.entries() >= MAX_ENTRIES {
            state.invalidate();
            return;
        }
        state
            .tokens
            .entry(provider.to_owned())
            .or_default()
            .insert(bucket.to_owned(), value.clone());
    }

    /// A cached key read: `Some(None)` for a cached "not stored".
    pub fn key(&self, name: &str) -> Option<Option<Secret>> {
        let mut state = self.lock();
        state.expire();
        if !(state.enabled && state.live) {
            return None;
        }
        state.keys.get(name).cloned()
    }

    /// Caches a key read that started at `generation`, unless anything changed since.
    pub fn fill_key(&self, generation: u64, name: &str, value: &Option<Secret>) {
        let mut state = self.lock();
        if !(state.enabled && state.live) || state.generation != generation {
            return;
        }
        if state.entries() >= MAX_ENTRIES {
            state.invalidate();
            return;
        }
        state.keys.insert(name.to_owned(), value.clone());
    }

    /// A served token from the cache, or else from `read` (cached unless something
    /// changed while it ran): the read path of every store with a cache.
    pub fn token_through<E>(
        &self,
        provider: &str,
        bucket: &str,
        read: impl FnOnce() -> Result<Option<ServedToken>, E>,
    ) -> Result<Option<ServedToken>, E> {
        if let Some(hit) = self.token(provider, bucket) {
            return Ok(hit);
        }
        let generation = self.generation();
        let value = read()?;
        self.fill_token(generation, provider, bucket, &value);
        Ok(value)
    }

    /// An API key from the cache, or else from `read` (as [`ReadCache::token_through`]).
    pub fn key_through<E>(
        &self,
        name: &str,
        read: impl FnOnce() -> Result<Option<Secret>, E>,
    ) -> Result<Option<Secret>, E> {
        if let Some(hit) = self.key(name) {
            return Ok(hit);
        }
        let generation = self.generation();
        let value = read()?;
        self.fill_key(generation, name, &value);
        Ok(value)
    }

    /// Drops everything (a write through this backend calls it before returning).
    pub fn invalidate(&self) {
        self.lock().invalidate();
    }

    /// Wipes and disables the cache and stops the watcher thread.
    pub fn shutdown(&self) {
        let mut state = self.lock();
        state.invalidate();
        state.enabled = false;
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Drop for ReadCache {
    fn drop(&mut self) {
        self.shutdown();
    }
}

struct Watcher {
    inotify: Inotify,
    root: PathBuf,
    watched: HashMap<WatchDescriptor, PathBuf>,
}

impl Watcher {
    fn mask() -> AddWatchFlags {
        AddWatchFlags::IN_CREATE
            | AddWatchFlags::IN_DELETE
            | AddWatchFlags::IN_MODIFY
            | AddWatchFlags::IN_CLOSE_WRITE
            | AddWatchFlags::IN_MOVED_FROM
            | AddWatchFlags::IN_MOVED_TO
            | AddWatchFlags::IN_ATTRIB
            | AddWatchFlags::IN_DELETE_SELF
            | AddWatchFlags::IN_MOVE_SELF
            | AddWatchFlags::IN_DONT_FOLLOW
            | AddWatchFlags::IN_ONLYDIR
    }

    /// Adds a watch for every store directory that exists and is not watched yet.
    fn rescan(&mut self) -> nix::Result<()> {
        let have: HashSet<PathBuf> = self.watched.values().cloned().collect();
        let mut dirs = vec![
            self.root.clone(),
            self.root.join("tokens"),
            self.root.join("keys"),
        ];
        if let Ok(entries) = std::fs::read_dir(self.root.join("tokens")) {
            dirs.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
        for dir in dirs {
            if have.contains(&dir) || !dir.is_dir() {
                continue;
            }
            match self.inotify.add_watch(&dir, Self::mask()) {
                Ok(wd) => {
                    self.watched.insert(wd, dir);
                }
                // A directory that exists but cannot be watched (watch limit reached, a
                // symlink) would leave changes unseen: give the cache up. One that
                // vanished meanwhile is fine.
                Err(e) if dir == self.root || dir.is_dir() => return Err(e),
                Err(_) => {}
            }
        }
        Ok(())
    }

    fn run(mut self, state: &Mutex<State>, stop: &AtomicBool) {
        let timeout =
            PollTimeout::try_from(STOP_CHECK.as_millis() as i32).unwrap_or(PollTimeout::NONE);
        while !stop.load(Ordering::Relaxed) {
            let ready = {
                let mut fds = [PollFd::new(self.inotify.as_fd(), PollFlags::POLLIN)];
                poll(&mut fds, timeout).unwrap_or(0)
            };
            if ready == 0 {
                continue;
            }
            let events = match self.inotify.read_events() {
                Ok(events) => events,
                Err(nix::errno::Errno::EAGAIN) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "store watcher failed: read cache disabled");
                    let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
                    s.invalidate();
                    s.enabled = false;
                    return;
                }
            };
            if events.is_empty() {
                continue;
            }
            let mut root_lost = false;
            for event in &events {
                let gone = AddWatchFlags::IN_IGNORED
                    | AddWatchFlags::IN_MOVE_SELF
                    | AddWatchFlags::IN_DELETE_SELF;
                if event.mask.intersects(gone) {
                    root_lost |= self.watched.get(&event.wd) == Some(&self.root);
                    // The path may now name another directory: forget this watch so the
                    // rescan watches whatever is there now.
                    if self.watched.remove(&event.wd).is_some()
                        && !event.mask.contains(AddWatchFlags::IN_IGNORED)
                    {
                        let _ = self.inotify.rm_watch(event.wd);
                    }
                }
            }
            if root_lost {
                // The store directory was moved or removed: its path may name a new
                // directory at any moment, and nothing would tell us about changes in it
                // (no watch on it, and its parent may not be ours to watch). The cache is
                // an optimisation: give it up for the life of this backend, every read
                // goes to disk from now on.
                tracing::warn!(
                    dir = %self.root.display(),
                    "store directory moved or removed: read cache disabled"
                );
                let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
                s.invalidate();
                s.enabled = false;
                return;
            }
            // Watch new directories first, then invalidate: nothing can slip in between.
            let rescanned = self.rescan();
            let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
            s.invalidate();
            if let Err(e) = rescanned {
                tracing::warn!(error = %e, "cannot watch a store directory: read cache disabled");
                s.enabled = false;
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_expire_even_without_events() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = ReadCache::start(dir.path()).expect("inotify on Linux");
        let generation = cache.generation();
        cache.fill_key(generation, "k", &Some(Secret::from("v")));
        assert!(cache.key("k").is_some());
        std::thread::sleep(MAX_AGE + Duration::from_millis(100));
        assert!(
            cache.key("k").is_none(),
            "a missed event cannot keep a value past MAX_AGE"
        );
    }

    #[test]
    fn a_fill_that_raced_a_change_is_not_cached() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = ReadCache::start(dir.path()).expect("inotify on Linux");
        let generation = cache.generation();
        cache.invalidate(); // a change lands while the read is in progress
        cache.fill_key(generation, "k", &Some(Secret::from("old")));
        assert!(cache.key("k").is_none());
        cache.shutdown();
        cache.fill_key(cache.generation(), "k", &Some(Secret::from("v")));
        assert!(cache.key("k").is_none(), "disabled after shutdown");
    }
}
