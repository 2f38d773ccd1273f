//! Running parts of a test as uids other than root.
//!
//! The test machine (and CI) runs as root, and root passes every permission check: a test
//! of "another user cannot ..." or "a process of the same non-root uid cannot ..." has to
//! drop to a real non-root uid. No account is needed for that: a process can take any uid
//! (`Command::uid`, the same `setresuid` that `setpriv --reuid` does; std also drops the
//! supplementary groups when it is root). Two fixed uids stand for two local users:
//!
//! - [`USER`]: the user who runs credproxy (its server, its sandboxed children);
//! - [`OTHER`]: another local user, the attacker of the directory-trust findings.
//!
//! When the tests do not run as root, [`root`] is false: tests that need another uid say
//! so on stderr and return (a developer's laptop); CI runs as root and runs them all.

use std::fs;
use std::os::unix::fs::{chown, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use super::process::BIN;

/// The uid (and gid) that plays the user who runs credproxy.
pub const USER: u32 = 61_001;

/// The uid (and gid) that plays another local user.
pub const OTHER: u32 = 61_002;

/// True when this test process is root, so it can run children as [`USER`] and [`OTHER`].
pub fn root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Says why a test that needs root returns early; use as
/// `if !unprivileged::root() { return unprivileged::skip("name"); }`.
pub fn skip(test: &str) {
    eprintln!("{test}: skipped, needs root to run children as other uids");
}

/// `cmd` will run as `uid`:`uid` with no supplementary groups.
pub fn as_uid(cmd: &mut Command, uid: u32) -> &mut Command {
    cmd.uid(uid).gid(uid)
}

/// A new `Command` for `program` that runs as `uid`.
pub fn command(program: impl AsRef<std::ffi::OsStr>, uid: u32) -> Command {
    let mut cmd = Command::new(program);
    as_uid(&mut cmd, uid);
    cmd
}

/// A copy of the `credproxy` binary that any uid can execute. The build directory may sit
/// under a path other uids cannot traverse (a CI clone under a 0700 home), so the binary
/// is linked (or copied) once per test process into a 0755 directory.
pub fn binary() -> &'static Path {
    static COPY: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, path) = COPY.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("credproxy-bin-")
            .tempdir()
            .expect("tempdir for the binary");
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
        let path = dir.path().join("credproxy");
        // A hard link where it can be (the same file system): the directory outlives the
        // test process (a static is never dropped), and a link leaves no copy behind.
        if fs::hard_link(BIN, &path).is_err() {
            fs::copy(BIN, &path).expect("copy the binary");
        }
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("chmod");
        (dir, path)
    });
    path
}

/// A temporary directory owned by `uid` with `mode`, in a 0711 parent that every uid can
/// traverse (root removes it on drop). Returns the guard and the directory's path.
pub fn dir_owned_by(uid: u32, mode: u32) -> (tempfile::TempDir, PathBuf) {
    let parent = tempfile::Builder::new()
        .prefix("credproxy-uid-")
        .tempdir()
        .expect("tempdir");
    fs::set_permissions(parent.path(), fs::Permissions::from_mode(0o711)).expect("chmod");
    let dir = parent.path().join(format!("u{uid}"));
    fs::create_dir(&dir).expect("mkdir");
    chown(&dir, Some(uid), Some(uid)).expect("chown");
    fs::set_permissions(&dir, fs::Permissions::from_mode(mode)).expect("chmod");
    (parent, dir)
}

/// Gives `path` (file or directory, not following a symlink) to `uid`.
pub fn give(path: &Path, uid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), Some(uid)).expect("lchown");
}

/// Gives `path` and everything below it to `uid`.
pub fn give_tree(path: &Path, uid: u32) {
    give(path, uid);
    if path.is_dir() && !path.is_symlink() {
        for entry in fs::read_dir(path).expect("read_dir") {
            give_tree(&entry.expect("entry").path(), uid);
        }
    }
}
