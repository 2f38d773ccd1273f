//! Issue 13 item 5: a socket directory any of whose ancestors another non-root uid can
//! change (own, or write without a root-owned sticky bit) is refused; `/tmp`-like
//! ancestors (root, sticky) are trusted. Every test runs the real binary as [`USER`].

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::as_user::{self, Served};
use common::unprivileged::{self, dir_owned_by, give, OTHER, USER};

/// A 0700 directory `name` in `parent`, owned by `uid`.
fn private_dir(parent: &Path, name: &str, uid: u32) -> std::path::PathBuf {
    let dir = parent.join(name);
    fs::create_dir(&dir).expect("mkdir");
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).expect("chmod");
    give(&dir, uid);
    dir
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8")
}

#[test]
fn socket_dir_below_a_sticky_dir_of_another_user_is_refused() {
    if !unprivileged::root() {
        return unprivileged::skip("socket_dir_below_a_sticky_dir_of_another_user_is_refused");
    }
    // The review's setup: OTHER owns a sticky, world-writable directory (its own "/tmp"),
    // the user made its socket directory in it. OTHER can rename the user's directory
    // aside (it owns the parent) and bind a fake socket at the same path.
    let (_g1, shared) = dir_owned_by(OTHER, 0o1777);
    let sock = private_dir(&shared, "sock", USER);
    let (_g2, home) = dir_owned_by(USER, 0o700);
    let store = home.join("store");
    match as_user::serve(USER, &["--store", s(&store), "--socket-dir", s(&sock)], &[]) {
        Served::Refused(code, err) => {
            assert_ne!(code, Some(0));
            assert!(
                err.contains(s(&shared)) && err.contains(&format!("uid {OTHER}")),
                "the refusal names the ancestor and its owner: {err}"
            );
        }
        Served::Listening(path) => panic!(
            "served at {} below another user's directory",
            path.display()
        ),
    }
}

#[test]
fn default_socket_dir_in_a_tmpdir_of_another_user_is_refused() {
    if !unprivileged::root() {
        return unprivileged::skip("default_socket_dir_in_a_tmpdir_of_another_user_is_refused");
    }
    // TMPDIR names a sticky directory owned by OTHER: the default `{tmp}/llxprt-cred-{uid}`
    // would be created in it.
    let (_g1, tmp) = dir_owned_by(OTHER, 0o1777);
    let (_g2, home) = dir_owned_by(USER, 0o700);
    let store = home.join("store");
    match as_user::serve(USER, &["--store", s(&store)], &[("TMPDIR", s(&tmp))]) {
        Served::Refused(code, err) => {
            assert_ne!(code, Some(0));
            assert!(err.contains(s(&tmp)), "names the temp directory: {err}");
        }
        Served::Listening(path) => panic!("served at {}", path.display()),
    }
}

#[test]
fn socket_dir_below_a_writable_non_sticky_dir_is_refused() {
    if !unprivileged::root() {
        return unprivileged::skip("socket_dir_below_a_writable_non_sticky_dir_is_refused");
    }
    // Root-owned but world-writable without the sticky bit: anyone can rename entries.
    let (_g1, shared) = dir_owned_by(0, 0o777);
    let sock = private_dir(&shared, "sock", USER);
    let (_g2, home) = dir_owned_by(USER, 0o700);
    let store = home.join("store");
    match as_user::serve(USER, &["--store", s(&store), "--socket-dir", s(&sock)], &[]) {
        Served::Refused(_, err) => {
            assert!(err.contains(s(&shared)) && err.contains("sticky"), "{err}")
        }
        Served::Listening(path) => panic!("served at {}", path.display()),
    }
}

#[test]
fn trusted_ancestors_are_accepted() {
    if !unprivileged::root() {
        return unprivileged::skip("trusted_ancestors_are_accepted");
    }
    let (_g2, home) = dir_owned_by(USER, 0o700);
    let store = home.join("store");
    // Below a root-owned sticky directory (/tmp itself), the default directory.
    let (_g1, root_sticky) = dir_owned_by(0, 0o1777);
    let served = as_user::serve(
        USER,
        &["--store", s(&store)],
        &[("TMPDIR", s(&root_sticky))],
    );
    assert!(matches!(served, Served::Listening(_)), "{served:?}");
    // Below the user's own sticky directory, a named directory.
    let (_g3, own_sticky) = dir_owned_by(USER, 0o1777);
    let sock = private_dir(&own_sticky, "sock", USER);
    let served = as_user::serve(USER, &["--store", s(&store), "--socket-dir", s(&sock)], &[]);
    assert!(matches!(served, Served::Listening(_)), "{served:?}");
}

#[test]
fn a_symlink_of_another_user_on_the_way_is_refused() {
    if !unprivileged::root() {
        return unprivileged::skip("a_symlink_of_another_user_on_the_way_is_refused");
    }
    // The user's real directory is fine, but the path named goes through a link that
    // OTHER owns in a sticky directory: OTHER may replace the link at any time.
    let (_g1, home) = dir_owned_by(USER, 0o700);
    let real = private_dir(&home, "real", USER);
    let _sock = private_dir(&real, "sock", USER);
    let (_g2, shared) = dir_owned_by(0, 0o1777);
    let link = shared.join("link");
    std::os::unix::fs::symlink(&real, &link).expect("symlink");
    give(&link, OTHER);
    let named = link.join("sock");
    let store = home.join("store");
    match as_user::serve(
        USER,
        &["--store", s(&store), "--socket-dir", s(&named)],
        &[],
    ) {
        Served::Refused(_, err) => assert!(err.contains(s(&link)), "{err}"),
        Served::Listening(path) => panic!("served at {}", path.display()),
    }
}
