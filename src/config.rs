//! Server configuration: where the socket goes, which store, which profile, and every
//! limit and timer, so that tests can run with a unique directory and short deadlines.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::backend::Backend;
use crate::policy::Profile;
use crate::refresh::RefreshConfig;
use crate::source::{SourceSettings, SourceSpec};

/// Limits and timers (PROTOCOL.md §11). The defaults are the protocol's values.
#[derive(Debug, Clone)]
pub struct Limits {
    /// A frame that has started must be complete within this time of its first byte, so
    /// a slow-drip client cannot hold a half-read frame open.
    pub partial_frame_timeout: Duration,
    /// A connection must finish the handshake within this time of accept, so connections
    /// that never speak are closed.
    pub handshake_timeout: Duration,
    /// Requests accepted per connection per [`Limits::rate_window`]; 0 turns the limit off
    /// (for benchmarks).
    pub rate_limit: u32,
    /// The window of the rate limit.
    pub rate_window: Duration,
    /// Requests in flight per connection, so one connection cannot queue unbounded work.
    pub max_in_flight: usize,
    /// One store operation longer than this is answered with `INTERNAL_ERROR`, so a stuck
    /// disk cannot hang a client forever.
    pub store_timeout: Duration,
    /// How long shutdown lets requests in flight finish before closing their connections.
    pub shutdown_grace: Duration,
    /// After a session asks to close, how long it waits for the peer to take the last
    /// reply before it is dropped anyway (a peer that never reads cannot pin it).
    pub close_linger: Duration,
    /// First pause after a failed accept (EMFILE and the like); doubles up to
    /// [`Limits::accept_backoff_max`].
    pub accept_backoff_min: Duration,
    /// Longest pause between accept attempts while accept keeps failing.
    pub accept_backoff_max: Duration,
    /// A connection past the handshake that sends nothing (not one byte) for this long,
    /// with no request in flight, is closed, so idle connections cannot hold descriptors
    /// forever. A reply the peer does not read does not count as activity. The check
    /// ticks at a quarter of the timeout, so the close comes within 1.25 times it.
    /// [`Duration::ZERO`] turns it off. Default 15 minutes: three times the llxprt
    /// client's own 5-minute idle close, so a well-behaved client always closes first
    /// and never sees "connection lost" (PROTOCOL.md §11, §12).
    pub idle_timeout: Duration,
    /// Open connections at most, all peers together; one past it is accepted, sent a
    /// `RESOURCE_EXHAUSTED` handshake error and closed at once (never left hanging in the
    /// backlog). 0: derived from `RLIMIT_NOFILE` at start, the soft limit minus
    /// [`NOFILE_RESERVE`] descriptors kept for the store, the runtime and the host
    /// program (half the limit when that is less), and at most [`MAX_CONNECTIONS_CEILING`]. A value given here is still
    /// lowered to that descriptor budget.
    pub max_connections: usize,
    /// Open connections at most from one peer process (`SO_PEERCRED` pid), so one runaway
    /// process cannot take every slot. 0 (the default): half the connection cap in force,
    /// so another process can always still connect while a load test or a client pool in
    /// one process may use many. A value at or above the cap turns it off. A peer whose
    /// pid the kernel does not report (0) counts under the global cap only; peers in
    /// another pid namespace are seen with their pids in ours, so each still counts alone.
    pub max_connections_per_pid: usize,
    /// Unsent reply bytes at most across every connection of the server (0: no global
    /// bound; each connection is still bounded by its own watermark). While over it,
    /// every connection stops reading new requests; a connection holding more than its
    /// own watermark unsent when a reply takes the server over it is closed at once, its
    /// unsent bytes wiped and dropped (see [`crate::outbox`]). Default 64 MiB.
    pub max_unsent_total: usize,
    /// The most bytes of large frames (bodies over 65 536 bytes, which only version-2
    /// connections may send, PROTOCOL.md §13) that all connections together may hold at
    /// once: while a frame is read and until its request is answered. A connection whose
    /// large frame does not fit stops reading until it does; its partial-frame deadline
    /// keeps running, so it waits at most that long. 0: no bound. Default 64 MiB (see
    /// [`crate::session::reader`]).
    pub max_large_frames_total: usize,
    /// Raise the soft `RLIMIT_NOFILE` to the hard limit at start, before the connection
    /// cap is derived. It changes the whole process, so it is off by default for a host
    /// program embedding the server; `credproxy serve` and `exec` turn it on.
    pub raise_nofile_limit: bool,
}

/// Descriptors kept out of the connection budget: stdio, the listener, the runtime's
/// epoll and wakers, the store's files and lock files opened per operation by up to
/// 256 blocking workers, inotify, and the host program's own files when embedded.
pub const NOFILE_RESERVE: u64 = 384;

/// The largest derived connection cap, however high `RLIMIT_NOFILE` is: a sandbox needs
/// a handful of connections, and each costs memory.
pub const MAX_CONNECTIONS_CEILING: usize = 4096;

/// Default [`Limits::max_unsent_total`]: 64 MiB.
pub const DEFAULT_MAX_UNSENT_TOTAL: usize = 64 << 20;

/// Default [`Limits::max_large_frames_total`]: 64 MiB (sixteen 4 MiB frames).
pub const DEFAULT_MAX_LARGE_FRAMES_TOTAL: usize = 64 << 20;

/// Default [`Limits::idle_timeout`]: 15 minutes.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(15 * 60);

impl Limits {
    /// The connection cap in force: [`Limits::max_connections`] (or the ceiling when 0),
    /// lowered to the soft `RLIMIT_NOFILE` minus [`NOFILE_RESERVE`] (or half the limit,
    /// when that is less), and at least 1.
    pub fn connection_cap(&self) -> usize {
        let budget =
            match nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE) {
                Ok((soft, _)) => {
                    // A low limit keeps half for the store rather than leaving one slot.
                    let reserve = NOFILE_RESERVE.min(soft / 2);
                    usize::try_from(soft.saturating_sub(reserve)).unwrap_or(usize::MAX)
                }
                Err(_) => MAX_CONNECTIONS_CEILING,
            };
        let wanted = if self.max_connections == 0 {
            MAX_CONNECTIONS_CEILING
        } else {
            self.max_connections
        };
        wanted.min(budget).max(1)
    }
}

impl Limits {
    /// The per-process cap in force for a connection cap of `cap`.
    pub fn per_pid_cap(&self, cap: usize) -> usize {
        if self.max_connections_per_pid == 0 {
            (cap / 2).max(1)
        } else {
            self.max_connections_per_pid
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            partial_frame_timeout: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(5),
            rate_limit: 60,
            rate_window: Duration::from_secs(1),
            max_in_flight: 16,
            store_timeout: Duration::from_secs(15),
            shutdown_grace: Duration::from_secs(5),
            close_linger: Duration::from_secs(1),
            accept_backoff_min: Duration::from_millis(100),
            accept_backoff_max: Duration::from_secs(1),
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_connections: 0,
            max_connections_per_pid: 0,
            max_unsent_total: DEFAULT_MAX_UNSENT_TOTAL,
            max_large_frames_total: DEFAULT_MAX_LARGE_FRAMES_TOTAL,
            raise_nofile_limit: false,
        }
    }
}

/// Everything [`Supervisor::start`](crate::Supervisor::start) needs.
#[derive(Debug, Clone)]
pub struct Config {
    /// A directory chosen by the caller for the socket. It must exist, not be a symlink,
    /// be owned by this uid and not be writable by group or others. `None`: the per-user
    /// directory `{tmp}/llxprt-cred-{uid}` (created 0700 when missing).
    pub socket_dir: Option<PathBuf>,
    /// The credential store.
    pub backend: Arc<dyn Backend>,
    /// What the sandbox may reach.
    pub profile: Profile,
    /// Peer uids allowed besides this process's effective uid and root.
    pub extra_uids: Vec<u32>,
    /// Limits and timers.
    pub limits: Limits,
    /// Give freed heap memory back to the system (glibc `malloc_trim`, see
    /// [`crate::memory`]) shortly after the last connection closes. It acts on the whole
    /// process, so it is off by default; `credproxy serve` and `exec` turn it on.
    pub release_memory_when_idle: bool,
    /// Harden the process at [`Supervisor::start`](crate::Supervisor::start) (see
    /// [`crate::harden`]): on Linux no other process of this uid may `ptrace` it or read
    /// its memory through `/proc`, and it writes no core file (macOS: `PT_DENY_ATTACH`
    /// and no core file). On by default because the store's secrets are in this process's
    /// memory; it acts on the whole host process (its own debugging and crash dumps
    /// too), so an embedder that needs those may turn it off. Children the host starts
    /// afterwards inherit the core limit 0 unless started through
    /// [`crate::harden::restore_core_limit`]; they are dumpable again after `execve`.
    /// `credproxy serve`, `exec` and `store` always harden.
    pub harden_process: bool,
    /// Host-side refresh (PROTOCOL.md §14): on by default with the built-in provider
    /// presets; an embedding host may add its own token endpoints and inject a clock.
    pub refresh: RefreshConfig,
    /// Command-backed sources (the profile's `[[token_command]]` and `[[key_command]]`):
    /// credentials produced by a program on the host, held in memory only.
    pub sources: Vec<SourceSpec>,
    /// How sources run (timeout, default TTL, retry pauses).
    pub source_settings: SourceSettings,
    /// The digest of this launch's capability token (PROTOCOL.md §13): when set, every
    /// handshake must present the token. `None`: no token is asked for, and one a client
    /// presents is ignored.
    pub capability: Option<crate::capability::CapabilityDigest>,
}

impl Config {
    /// A configuration with the default socket directory, an empty profile (nothing
    /// allowed) and the protocol's limits.
    pub fn new(backend: Arc<dyn Backend>) -> Self {
        Config {
            socket_dir: None,
            backend,
            profile: Profile::default(),
            extra_uids: Vec::new(),
            limits: Limits::default(),
            release_memory_when_idle: false,
            harden_process: true,
            refresh: RefreshConfig::default(),
            sources: Vec::new(),
            source_settings: SourceSettings::default(),
            capability: None,
        }
    }
}
