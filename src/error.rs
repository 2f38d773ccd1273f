//! The internal error type. It is for the host program and the host's log: its text may
//! name paths and carry operating-system errors. It never crosses the socket; the wire
//! has its own [`ErrorCode`](crate::protocol::ErrorCode).

use std::path::PathBuf;

use crate::backend::StoreError;

/// A failure to start, run or stop the proxy.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The socket directory is unsafe or unusable.
    #[error("socket directory {path} refused: {reason}")]
    SocketDir {
        /// The directory.
        path: PathBuf,
        /// Why, and what to do.
        reason: String,
    },
    /// The socket path does not fit in `sun_path`.
    #[error(
        "socket path {path} is {len} bytes, over the limit of {limit} bytes for a Unix socket \
         path on this system; choose a shorter socket directory (--socket-dir)"
    )]
    PathTooLong {
        /// The path that did not fit.
        path: PathBuf,
        /// Its length in bytes.
        len: usize,
        /// The limit in bytes, not counting the terminating NUL.
        limit: usize,
    },
    /// Creating, binding or listening on the socket failed.
    #[error("cannot listen on {path}: {source}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// Another I/O failure, with what was being done.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The credential store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The configuration is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The server's runtime thread is gone (it panicked or was already shut down).
    #[error("the credential proxy is not running")]
    NotRunning,
}

/// A `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
