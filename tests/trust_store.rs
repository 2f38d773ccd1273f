//! Issue 13 item 4: the store directory and every directory below it must be ours, not a
//! symlink and not writable by group or others; the store is walked with directory
//! descriptors (`O_DIRECTORY|O_NOFOLLOW` and `*at()` calls). The server and the store CLI
//! run as [`USER`]; the attacker's files are made by [`OTHER`] itself.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use common::as_user::{self, Served};
use common::process::token_json;
use common::unprivileged::{self, command, dir_owned_by, give, OTHER, USER};
use common::{assert_err, Raw};
use serde_json::json;

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8")
}

/// Runs `program args` as `uid`, which must succeed.
fn as_uid(uid: u32, program: &str, args: &[&str]) {
    let status = command(program, uid).args(args).status().expect("spawn");
    assert!(status.success(), "{program} {args:?} as {uid}");
}

/// A home for USER (0700) with a socket directory; the store path is `home/store`.
struct Home {
    _guard: tempfile::TempDir,
    home: PathBuf,
    store: PathBuf,
    sock: PathBuf,
}

impl Home {
    fn new() -> Home {
        let (guard, home) = dir_owned_by(USER, 0o711);
        let sock = home.join("sock");
        as_uid(USER, "mkdir", &["-m", "700", s(&sock)]);
        Home {
            _guard: guard,
            store: home.join("store"),
            home,
            sock,
        }
    }

    /// `credproxy store token set anthropic` as USER with a full token.
    fn set_token(&self, access: &str, refresh: &str) -> (Option<i32>, String, String) {
        as_user::run(
            USER,
            &[
                "store",
                "token",
                "set",
                "anthropic",
                "--store",
                s(&self.store),
            ],
            token_json(access, refresh).as_bytes(),
        )
    }

    fn serve(&self) -> Served {
        as_user::serve(USER, &self.args(), &[])
    }

    fn args(&self) -> Vec<&str> {
        vec![
            "--store",
            s(&self.store),
            "--socket-dir",
            s(&self.sock),
            "--allow-all",
        ]
    }
}

/// OTHER's own directory with an attacker's token for `anthropic:default`.
fn attacker_dir() -> (tempfile::TempDir, PathBuf) {
    let (guard, dir) = dir_owned_by(OTHER, 0o777);
    let file = dir.join("default.json");
    fs::write(&file, token_json("at-ATTACKER", "rt-ATTACKER")).expect("write");
    fs::set_permissions(&file, fs::Permissions::from_mode(0o666)).expect("chmod");
    give(&file, OTHER);
    (guard, dir)
}

#[test]
fn a_store_writable_by_others_is_refused_before_another_user_can_plant_a_provider() {
    if !unprivileged::root() {
        return unprivileged::skip("a_store_writable_by_others_is_refused");
    }
    // The review's attack: the store directory is world-writable; OTHER creates tokens/
    // and plants tokens/anthropic as a symlink to its own directory.
    let h = Home::new();
    as_uid(USER, "mkdir", &["-m", "777", s(&h.store)]);
    as_uid(USER, "chmod", &["777", s(&h.store)]);
    let (_g, evil) = attacker_dir();
    let tokens = h.store.join("tokens");
    as_uid(OTHER, "mkdir", &["-m", "777", s(&tokens)]);
    as_uid(OTHER, "ln", &["-s", s(&evil), s(&tokens.join("anthropic"))]);

    match h.serve() {
        Served::Refused(code, err) => {
            assert_ne!(code, Some(0));
            assert!(
                err.contains(s(&h.store)) && err.contains("writable by group or others"),
                "the refusal names the store and what is wrong: {err}"
            );
            assert!(!err.contains("ATTACKER"), "{err}");
        }
        Served::Listening(_) => panic!("served a store another user can write"),
    }
    let (code, _, err) = h.set_token("at-USER", "rt-USER-SECRET");
    assert_ne!(
        code,
        Some(0),
        "store token set wrote into a planted directory"
    );
    assert!(err.contains(s(&h.store)), "{err}");
    let leaked = fs::read_to_string(evil.join("default.json")).expect("read");
    assert!(
        !leaked.contains("rt-USER-SECRET"),
        "refresh token handed to OTHER"
    );
}

/// A store whose root is fine and a server already running on it when `plant` plants a
/// provider directory: `get_token` and `save_token` get `INTERNAL_ERROR` (no path on the
/// wire), never the attacker's token, and nothing reaches the attacker's directory. A new
/// server then refuses to start (its sweep of temporary files walks the tree) and `store
/// token set` refuses, both with `expect` in their message.
fn planted_subdirectory_is_refused(plant: impl FnOnce(&Home, &Path), expect: &str) {
    let h = Home::new();
    let (code, _, err) = h.set_token("at-USER", "rt-USER");
    assert_eq!(code, Some(0), "seed: {err}");
    let (_g, evil) = attacker_dir();
    let (running, socket) = as_user::start_serve(USER, &h.args(), &[]).expect("serve starts");
    let mut raw = Raw::connect(&socket);
    raw.handshake();
    let reply = raw.call("g0", "get_token", json!({"provider": "anthropic"}));
    assert_eq!(reply["data"]["access_token"], "at-USER", "{reply}");
    plant(&h, &evil);
    let reply = raw.call("g", "get_token", json!({"provider": "anthropic"}));
    let message = assert_err(&reply, "g", "INTERNAL_ERROR").to_owned();
    assert!(!message.contains('/'), "no path on the wire: {message}");
    let token = json!({"access_token": "at-SANDBOX", "expiry": 1, "token_type": "Bearer"});
    let reply = raw.call(
        "s",
        "save_token",
        json!({"provider": "anthropic", "token": token}),
    );
    assert_err(&reply, "s", "INTERNAL_ERROR");
    drop(running);

    match h.serve() {
        Served::Refused(code, err) => {
            assert_ne!(code, Some(0));
            assert!(
                err.contains(expect),
                "clear refusal expected ({expect}): {err}"
            );
        }
        Served::Listening(_) => panic!("a new server started on a planted store"),
    }
    let (code, _, err) = h.set_token("at-USER-2", "rt-USER-SECRET");
    assert_ne!(
        code,
        Some(0),
        "store token set went through a planted directory"
    );
    assert!(
        err.contains(expect),
        "clear refusal expected ({expect}): {err}"
    );
    let leaked = fs::read_to_string(evil.join("default.json")).expect("read");
    assert!(
        !leaked.contains("rt-USER-SECRET") && !leaked.contains("at-SANDBOX"),
        "a token handed to OTHER"
    );
}

#[test]
fn a_provider_directory_that_is_a_symlink_is_refused() {
    if !unprivileged::root() {
        return unprivileged::skip("a_provider_directory_that_is_a_symlink_is_refused");
    }
    planted_subdirectory_is_refused(
        |h, evil| {
            let link = h.store.join("tokens/anthropic");
            fs::remove_dir_all(&link).expect("rm");
            std::os::unix::fs::symlink(evil, &link).expect("symlink");
            give(&link, USER);
        },
        "symlink",
    );
}

#[test]
fn a_provider_directory_owned_by_another_user_is_refused() {
    if !unprivileged::root() {
        return unprivileged::skip("a_provider_directory_owned_by_another_user_is_refused");
    }
    planted_subdirectory_is_refused(
        |h, evil| {
            let dir = h.store.join("tokens/anthropic");
            fs::remove_dir_all(&dir).expect("rm");
            fs::create_dir(&dir).expect("mkdir");
            fs::copy(evil.join("default.json"), dir.join("default.json")).expect("copy");
            unprivileged::give_tree(&dir, OTHER);
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).expect("chmod");
            // OTHER keeps a way to read what the user writes there.
            fs::remove_dir_all(evil).expect("rm");
            std::os::unix::fs::symlink(&dir, evil).expect("link");
        },
        &format!("uid {OTHER}"),
    );
}

#[test]
fn a_tokens_directory_writable_by_others_is_refused() {
    if !unprivileged::root() {
        return unprivileged::skip("a_tokens_directory_writable_by_others_is_refused");
    }
    planted_subdirectory_is_refused(
        |h, evil| {
            let tokens = h.store.join("tokens");
            as_uid(USER, "chmod", &["777", s(&tokens)]);
            as_uid(USER, "chmod", &["711", s(&h.store)]);
            // The provider had no directory yet; OTHER plants one, a link to its own.
            fs::remove_dir_all(tokens.join("anthropic")).expect("rm");
            as_uid(OTHER, "ln", &["-s", s(evil), s(&tokens.join("anthropic"))]);
        },
        "writable by group or others",
    );
}

#[test]
fn a_keys_directory_that_is_a_symlink_is_refused() {
    if !unprivileged::root() {
        return unprivileged::skip("a_keys_directory_that_is_a_symlink_is_refused");
    }
    let h = Home::new();
    let (code, _, err) = as_user::run(
        USER,
        &["store", "key", "set", "anthropic", "--store", s(&h.store)],
        b"sk-USER\n",
    );
    assert_eq!(code, Some(0), "{err}");
    let (_g, evil) = dir_owned_by(OTHER, 0o777);
    fs::write(evil.join("anthropic.json"), r#"{"key":"sk-ATTACKER"}"#).expect("write");
    let keys = h.store.join("keys");
    fs::remove_dir_all(&keys).expect("rm");
    std::os::unix::fs::symlink(&evil, &keys).expect("symlink");
    give(&keys, USER);
    let (code, _, err) = as_user::run(
        USER,
        &["store", "key", "set", "anthropic", "--store", s(&h.store)],
        b"sk-USER-2\n",
    );
    assert_ne!(code, Some(0));
    assert!(err.contains("symlink") && err.contains(s(&keys)), "{err}");
    let there = fs::read_to_string(evil.join("anthropic.json")).expect("read");
    assert!(!there.contains("sk-USER-2"), "key written through the link");
}

#[test]
fn a_missing_store_is_created_private_with_its_parents() {
    if !unprivileged::root() {
        return unprivileged::skip("a_missing_store_is_created_private_with_its_parents");
    }
    let h = Home::new();
    let deep = h.home.join("a/b/store");
    let (code, _, err) = as_user::run(
        USER,
        &["store", "key", "set", "k", "--store", s(&deep)],
        b"v\n",
    );
    assert_eq!(code, Some(0), "{err}");
    for dir in [
        h.home.join("a"),
        h.home.join("a/b"),
        deep.clone(),
        deep.join("keys"),
    ] {
        let meta = fs::metadata(&dir).expect("stat");
        assert_eq!(
            meta.permissions().mode() & 0o7777,
            0o700,
            "{}",
            dir.display()
        );
        assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), USER);
    }
}

#[test]
fn a_store_owned_by_another_user_is_refused() {
    if !unprivileged::root() {
        return unprivileged::skip("a_store_owned_by_another_user_is_refused");
    }
    let h = Home::new();
    as_uid(USER, "mkdir", &["-m", "755", s(&h.store)]);
    give(&h.store, OTHER);
    match h.serve() {
        Served::Refused(_, err) => {
            assert!(
                err.contains(s(&h.store)) && err.contains(&format!("uid {OTHER}")),
                "{err}"
            )
        }
        Served::Listening(_) => panic!("served another user's store"),
    }
}

#[test]
fn a_store_below_another_users_directory_is_refused() {
    if !unprivileged::root() {
        return unprivileged::skip("a_store_below_another_users_directory_is_refused");
    }
    let h = Home::new();
    let (_g, shared) = dir_owned_by(OTHER, 0o1777);
    let store = shared.join("store");
    as_uid(USER, "mkdir", &["-m", "700", s(&store)]);
    let served = as_user::serve(
        USER,
        &["--store", s(&store), "--socket-dir", s(&h.sock)],
        &[],
    );
    match served {
        Served::Refused(_, err) => assert!(err.contains(s(&shared)), "{err}"),
        Served::Listening(_) => panic!("served a store another user can move"),
    }
}

#[test]
fn a_read_only_store_is_served() {
    if !unprivileged::root() {
        return unprivileged::skip("a_read_only_store_is_served");
    }
    // Not writable even by its owner (as on a read-only mount): reads work, writes fail
    // with the reason, nothing is refused for trust.
    let h = Home::new();
    let (code, _, err) = h.set_token("at-USER", "rt-USER");
    assert_eq!(code, Some(0), "seed: {err}");
    for dir in [
        h.store.join("tokens/anthropic"),
        h.store.join("tokens"),
        h.store.clone(),
    ] {
        as_uid(USER, "chmod", &["500", s(&dir)]);
    }
    let (_running, socket) = as_user::start_serve(USER, &h.args(), &[]).expect("serve starts");
    let mut raw = Raw::connect(&socket);
    raw.handshake();
    let reply = raw.call("g", "get_token", json!({"provider": "anthropic"}));
    assert_eq!(reply["data"]["access_token"], "at-USER", "{reply}");
    let (code, _, err) = h.set_token("at-2", "rt-2");
    assert_ne!(code, Some(0));
    assert!(
        err.contains("Permission denied") && !err.contains("refused"),
        "{err}"
    );
    as_uid(USER, "chmod", &["-R", "u+w", s(&h.store)]);
}
