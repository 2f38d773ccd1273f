//! Path trust: may a directory be used for a socket or a credential store, given who can
//! change it and every directory above it?
//!
//! The rule is OpenSSH's `safe_path` (used for `authorized_keys` and `ssh-agent`'s
//! socket parents), with one relaxation for sticky directories:
//!
//! - every directory from the target's parent up to `/` must be owned by root or by us;
//! - and must not be writable by group or others, **unless it has the sticky bit**: in a
//!   sticky directory only the owner of an entry, the owner of the directory and root may
//!   rename or remove the entry, so when the sticky directory belongs to root (or to us)
//!   nobody else can move our directory aside. This is what lets `/tmp` (root, 1777)
//!   hold the default socket directory, while a sticky directory owned by *another
//!   non-root* uid (the review's attack: its owner renamed the victim's socket directory
//!   and bound a fake socket at the same path) is refused;
//! - a symlink on the way must be owned by root or by us (in a sticky directory the
//!   owner of a link may replace it), and its target is checked by the same rule: both
//!   the path as written and the resolved path are walked.
//!
//! Root's permission checks are skipped by the kernel, so these checks are about who
//! *owns* and who may *write*, never about whether we can.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use nix::unistd::geteuid;

/// The sticky bit (`S_ISVTX`).
const STICKY: u32 = 0o1000;

/// Checks that no uid other than ours and root can rename, replace or redirect any
/// directory above `path` (the directory itself is checked by its user, with its own
/// rule). `path` must be absolute. The error says which ancestor is wrong and why.
pub fn check_ancestors(path: &Path) -> Result<(), String> {
    if !path.is_absolute() {
        return Err(format!("{} is not an absolute path", path.display()));
    }
    let euid = geteuid().as_raw();
    let lexical = normalize(path);
    walk(&lexical, euid)?;
    // The resolved path, in case a (trusted) symlink on the way leads elsewhere. A path
    // that does not exist yet is resolved as far as it exists.
    let existing = existing_prefix(&lexical);
    // A prefix that exists but cannot be resolved (a dangling or looping symlink, a
    // directory we may not search) hides where it leads: refused, not skipped.
    let resolved = fs::canonicalize(existing).map_err(|e| {
        format!(
            "{} cannot be resolved ({e}); a dangling or looping symlink on the way could be \
             pointed anywhere later",
            existing.display()
        )
    })?;
    if resolved != existing {
        check_dir_entry(&resolved, euid, false)?;
        walk(&resolved, euid)?;
    }
    Ok(())
}

/// `path` with `.` components removed. `..` stays: every prefix is then the path the
/// kernel resolves (`link/..` is the link target's parent, not the link's), and a symlink
/// before a `..` is still checked as a prefix of its own.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::Normal(_) | Component::ParentDir => out.push(c),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

/// The longest prefix of `path` that exists.
fn existing_prefix(path: &Path) -> &Path {
    let mut cur = path;
    loop {
        if fs::symlink_metadata(cur).is_ok() {
            return cur;
        }
        match cur.parent() {
            Some(p) => cur = p,
            None => return cur,
        }
    }
}

/// Checks every ancestor of `path` (not `path` itself), from its parent up to `/`.
fn walk(path: &Path, euid: u32) -> Result<(), String> {
    for ancestor in path.ancestors().skip(1) {
        check_dir_entry(ancestor, euid, true)?;
    }
    Ok(())
}

/// One component: owned by root or us; a directory not writable by group/others unless
/// sticky; a symlink allowed only when `links` (the lexical walk) and owned by root or us.
fn check_dir_entry(path: &Path, euid: u32, links: bool) -> Result<(), String> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        // Not there yet: whoever creates it is checked when it exists (the store creates
        // missing directories itself, owned by us).
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("cannot inspect {} ({e})", path.display())),
    };
    let owner = meta.uid();
    if owner != 0 && owner != euid {
        return Err(format!(
            "{} is owned by uid {owner}, neither root nor us (uid {euid}): that user could \
             move or replace what is below it",
            path.display()
        ));
    }
    if meta.file_type().is_symlink() {
        return if links {
            Ok(())
        } else {
            Err(format!("{} is a symlink", path.display()))
        };
    }
    let mode = meta.mode();
    if mode & 0o022 != 0 && mode & STICKY == 0 {
        return Err(format!(
            "{} is writable by group or others without the sticky bit (mode {:o}): another \
             user could move or replace what is below it",
            path.display(),
            mode & 0o7777
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_drops_only_single_dots() {
        assert_eq!(normalize(Path::new("/a/./b/../c")), Path::new("/a/b/../c"));
        let prefixes: Vec<_> = normalize(Path::new("/a/link/../c"))
            .ancestors()
            .map(Path::to_owned)
            .collect();
        assert!(
            prefixes.contains(&PathBuf::from("/a/link")),
            "the link is checked"
        );
    }

    #[test]
    fn root_owned_sticky_tmp_is_trusted() {
        // /tmp is root-owned 1777 on every test machine.
        check_ancestors(Path::new("/tmp/credproxy-trust-test/x")).expect("trusted");
    }

    #[test]
    fn relative_paths_are_refused() {
        assert!(check_ancestors(Path::new("a/b")).is_err());
    }
}
