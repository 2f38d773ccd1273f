//! The socket's directory, path and file (PROTOCOL.md §1): the per-user 0700 directory,
//! the `llxprt-cred-{pid}-{nonce}.sock` name, a listener created 0600 with no window, and
//! the sweep of stale sockets left by dead servers.

use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, UnixAddr};
use nix::sys::stat::{fchmod, Mode};
use nix::unistd::{geteuid, Pid};
use rand::RngCore;

use crate::error::{Error, Result};
use crate::trust;

/// The longest socket path in bytes, without the terminating NUL: `sun_path` holds 108
/// bytes on Linux and 104 on macOS.
#[cfg(target_os = "macos")]
pub const MAX_SOCKET_PATH: usize = 103;
/// The longest socket path in bytes, without the terminating NUL: `sun_path` holds 108
/// bytes on Linux and 104 on macOS.
#[cfg(not(target_os = "macos"))]
pub const MAX_SOCKET_PATH: usize = 107;

/// Listen backlog: a sandbox may open many connections at once.
const BACKLOG: i32 = 1024;

/// The file name prefix shared by every server's socket.
pub const SOCKET_PREFIX: &str = "llxprt-cred-";

/// The default per-user directory: `{canonical tmp}/llxprt-cred-{euid}`.
pub fn default_dir() -> Result<PathBuf> {
    let tmp = std::env::temp_dir();
    let tmp = fs::canonicalize(&tmp).map_err(|source| Error::Io {
        what: format!("cannot resolve the temp directory {}", tmp.display()),
        source,
    })?;
    Ok(tmp.join(format!("{SOCKET_PREFIX}{}", geteuid().as_raw())))
}

fn refuse(path: &Path, reason: impl Into<String>) -> Error {
    Error::SocketDir {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

/// Prepares the default per-user directory: creates it 0700, or checks an existing one
/// (a symlink or a foreign owner is refused; group/other bits are removed with a warning).
///
/// Every directory above it (the temp directory and its parents) must pass
/// [`trust::check_ancestors`]: a temp directory another non-root uid owns or can write
/// without a root-owned sticky bit is refused.
pub fn prepare_default_dir(dir: &Path) -> Result<()> {
    trust::check_ancestors(dir).map_err(|r| {
        refuse(
            dir,
            format!(
                "{r}; set TMPDIR to a directory only you and root control, or pass --socket-dir"
            ),
        )
    })?;
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(source) => {
            return Err(refuse(dir, format!("cannot create it ({source}); check the temp directory's permissions or pass --socket-dir")))
        }
    }
    let meta =
        fs::symlink_metadata(dir).map_err(|e| refuse(dir, format!("cannot inspect it ({e})")))?;
    if meta.file_type().is_symlink() {
        return Err(refuse(
            dir,
            "it is a symlink; remove it or pass --socket-dir",
        ));
    }
    if !meta.is_dir() {
        return Err(refuse(
            dir,
            "it is not a directory; remove it or pass --socket-dir",
        ));
    }
    let euid = geteuid().as_raw();
    if meta.uid() != euid {
        return Err(refuse(
            dir,
            format!(
                "it is owned by uid {} instead of {euid}; remove it or pass --socket-dir",
                meta.uid()
            ),
        ));
    }
    if meta.mode() & 0o777 != 0o700 {
        if meta.mode() & 0o077 != 0 {
            tracing::warn!(dir = %dir.display(), mode = format!("{:o}", meta.mode() & 0o777), "socket directory was open to group or others; tightened to 0700");
        }
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .map_err(|e| refuse(dir, format!("cannot set its mode to 0700 ({e})")))?;
    }
    Ok(())
}

/// Checks a directory named by the caller: it must exist, not be a symlink, be owned by
/// this uid and not be writable by group or others, and every directory above it must
/// pass [`trust::check_ancestors`] (OpenSSH's `safe_path` rule: owned by root or us, not
/// writable by others unless root's or our sticky directory). It is used as it is.
pub fn check_caller_dir(dir: &Path) -> Result<()> {
    if !dir.is_absolute() {
        return Err(refuse(dir, "it must be an absolute path"));
    }
    trust::check_ancestors(dir).map_err(|r| refuse(dir, r))?;
    let meta = fs::symlink_metadata(dir).map_err(|e| {
        refuse(
            dir,
            format!("cannot inspect it ({e}); create it first with mode 0700"),
        )
    })?;
    if meta.file_type().is_symlink() {
        return Err(refuse(dir, "it is a symlink; name the real directory"));
    }
    if !meta.is_dir() {
        return Err(refuse(dir, "it is not a directory"));
    }
    let euid = geteuid().as_raw();
    if meta.uid() != euid {
        return Err(refuse(
            dir,
            format!("it is owned by uid {} instead of {euid}", meta.uid()),
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(refuse(
            dir,
            format!(
                "it is writable by group or others (mode {:o}); chmod go-w it",
                meta.mode() & 0o777
            ),
        ));
    }
    Ok(())
}

/// A fresh socket path in `dir`: `llxprt-cred-{pid}-{8 hex}.sock`, checked against the
/// `sun_path` limit.
pub fn socket_path(dir: &Path) -> Result<PathBuf> {
    let mut nonce = [0u8; 4];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    let hex: String = nonce.iter().map(|b| format!("{b:02x}")).collect();
    let path = dir.join(format!("{SOCKET_PREFIX}{}-{hex}.sock", std::process::id()));
    let len = path.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        return Err(Error::PathTooLong {
            path,
            len,
            limit: MAX_SOCKET_PATH,
        });
    }
    Ok(path)
}

/// Creates a listening socket at `path` with mode 0600 from the moment the file exists
/// (`socket` → `fchmod 0600` → `bind` → `listen`), removing a stale file there first.
/// Returns the listener and the socket file's inode (so shutdown removes only our file).
pub fn bind(path: &Path) -> Result<(UnixListener, u64)> {
    let bind_err = |source: io::Error| Error::Bind {
        path: path.to_owned(),
        source,
    };
    match fs::symlink_metadata(path) {
        Ok(_) => {
            tracing::warn!(path = %path.display(), "removing a stale file at the socket path");
            fs::remove_file(path).map_err(bind_err)?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(bind_err(e)),
    }
    let fd = socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| bind_err(e.into()))?;
    fchmod(fd.as_raw_fd(), Mode::from_bits_truncate(0o600)).map_err(|e| bind_err(e.into()))?;
    let addr = UnixAddr::new(path).map_err(|e| bind_err(e.into()))?;
    socket::bind(fd.as_raw_fd(), &addr).map_err(|e| bind_err(e.into()))?;
    let cleanup = |e: nix::Error| {
        let _ = fs::remove_file(path);
        bind_err(e.into())
    };
    socket::listen(&fd, socket::Backlog::new(BACKLOG).map_err(cleanup)?).map_err(cleanup)?;
    let meta = fs::symlink_metadata(path).map_err(bind_err)?;
    if meta.mode() & 0o777 != 0o600 {
        let _ = fs::remove_file(path);
        return Err(bind_err(io::Error::other(format!(
            "socket mode is {:o}, not 0600",
            meta.mode() & 0o777
        ))));
    }
    let listener = UnixListener::from(fd);
    listener.set_nonblocking(true).map_err(bind_err)?;
    Ok((listener, meta.ino()))
}

/// Removes the socket file at `path` if it is still the one we bound (same inode).
/// Returns whether a file was removed.
pub fn remove_socket(path: &Path, inode: u64) -> bool {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.ino() == inode => fs::remove_file(path).is_ok(),
        Ok(_) => {
            tracing::warn!(path = %path.display(), "socket path now holds another file; left in place");
            false
        }
        Err(_) => false,
    }
}

/// Removes `llxprt-cred-{pid}-*.sock` files in `dir` whose pid is dead and whose socket
/// refuses a connection; a socket that still accepts is never removed. Returns the paths
/// removed.
pub fn sweep_stale(dir: &Path, own: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if path == own {
            continue;
        }
        let Some(pid) = stale_candidate_pid(&entry.file_name().to_string_lossy()) else {
            continue;
        };
        if pid_alive(pid) || UnixStream::connect(&path).is_ok() {
            continue;
        }
        let is_socket = entry.file_type().map(|t| {
            use std::os::unix::fs::FileTypeExt;
            t.is_socket()
        });
        if is_socket.unwrap_or(false) && fs::remove_file(&path).is_ok() {
            tracing::info!(path = %path.display(), pid, "removed a stale socket");
            removed.push(path);
        }
    }
    removed
}

/// The pid in a `llxprt-cred-{pid}-{nonce}.sock` file name.
fn stale_candidate_pid(name: &str) -> Option<i32> {
    let rest = name.strip_prefix(SOCKET_PREFIX)?.strip_suffix(".sock")?;
    let (pid, _nonce) = rest.split_once('-')?;
    pid.parse().ok()
}

fn pid_alive(pid: i32) -> bool {
    match nix::sys::signal::kill(Pid::from_raw(pid), None) {
        Ok(()) => true,
        Err(nix::errno::Errno::ESRCH) => false,
        // EPERM: it exists but belongs to someone else.
        Err(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidate_names() {
        assert_eq!(
            stale_candidate_pid("llxprt-cred-123-deadbeef.sock"),
            Some(123)
        );
        assert_eq!(stale_candidate_pid("llxprt-cred-x-deadbeef.sock"), None);
        assert_eq!(stale_candidate_pid("other-123-a.sock"), None);
        assert_eq!(stale_candidate_pid("llxprt-cred-123-a.txt"), None);
    }

    #[test]
    fn socket_name_shape() {
        let p = socket_path(Path::new("/tmp")).expect("fits");
        let name = p.file_name().expect("name").to_string_lossy().into_owned();
        let nonce = name
            .rsplit('-')
            .next()
            .expect("nonce")
            .trim_end_matches(".sock");
        assert_eq!(nonce.len(), 8);
        assert!(nonce
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        let long = PathBuf::from(format!("/{}", "d".repeat(100)));
        assert!(matches!(socket_path(&long), Err(Error::PathTooLong { .. })));
    }
}
