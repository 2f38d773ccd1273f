//! `credproxy store migrate` and `credproxy store new-key`, run as the real binary: a
//! file-to-file migration checked through the CLI and the raw files with the source left
//! byte for byte as it was, the same-store refusal however the directory is written, the
//! conflict policy (refused with nothing written, `--dry-run`, `--overwrite`, a second run
//! that changes nothing), a destination that fails half-way, the keyring as destination
//! (when a Secret Service is reachable), and new-key's file; no secret in any output.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use common::process::{self, token_json, Canaries, Env, Run, Stdin, BIN};
use serde_json::Value;

const AT_1: &str = "CANARY-AT-mig-1a";
const RT_1: &str = "CANARY-RT-mig-1b";
const AT_2: &str = "CANARY-AT-mig-2a";
const RT_2: &str = "CANARY-RT-mig-2b";
const AT_3: &str = "CANARY-AT-mig-3a";
const RT_3: &str = "CANARY-RT-mig-3b";
const KEY_1: &str = "CANARY-KEY-mig-k1";
const KEY_2: &str = "CANARY-KEY-mig-k2";
const OTHER: &str = "CANARY-OTHER-mig-x";

const CANARIES: Canaries = Canaries {
    never: &[AT_1, RT_1, AT_2, RT_2, AT_3, RT_3, KEY_1, KEY_2, OTHER],
    not_logged: &[],
};

/// `credproxy ARGS` with `stdin`; every run is checked for leaked secrets.
fn credproxy(args: &[&str], stdin: &[u8]) -> Run {
    let run = process::run(BIN, args, Stdin::PipeAll(stdin), Env::ISOLATED);
    CANARIES.check_run(&format!("{args:?}"), &run);
    run
}

/// `credproxy store ARGS --store STORE`, which must succeed.
fn store_ok(store: &str, args: &[&str], stdin: &[u8]) -> Run {
    let mut all = vec!["store"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--store", store]);
    let run = credproxy(&all, stdin);
    assert!(run.status.success(), "{all:?}: {run:?}");
    run
}

/// `credproxy store migrate --from FROM --to TO EXTRA...`
fn migrate(from: &str, to: &str, extra: &[&str]) -> Run {
    let mut args = vec!["store", "migrate", "--from", from, "--to", to];
    args.extend_from_slice(extra);
    credproxy(&args, b"")
}

fn s(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// Every regular file below `dir` (the lock file aside) with its bytes.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for entry in fs::read_dir(dir).expect("read_dir") {
            let path = entry.expect("entry").path();
            let meta = fs::symlink_metadata(&path).expect("stat");
            if meta.is_dir() {
                walk(root, &path, out);
            } else if path.file_name().is_some_and(|n| n != ".lock") {
                let rel = path.strip_prefix(root).expect("below").to_owned();
                out.insert(rel, fs::read(&path).expect("read"));
            }
        }
    }
    let mut out = BTreeMap::new();
    if dir.exists() {
        walk(dir, dir, &mut out);
    }
    out
}

fn json_file(path: &Path) -> Value {
    serde_json::from_slice(&fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .expect("json")
}

/// A needs-login mark written as the file store keeps it.
fn mark_needs_login(store: &Path, provider: &str, bucket: &str) {
    let dir = store.join("refresh").join(provider);
    fs::create_dir_all(&dir).expect("mkdir");
    fs::set_permissions(store.join("refresh"), fs::Permissions::from_mode(0o700)).expect("chmod");
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).expect("chmod");
    let file = dir.join(format!("{bucket}.json"));
    fs::write(
        &file,
        r#"{"needs_login":{"since":1700000000,"status":400,"code":"invalid_grant"}}"#,
    )
    .expect("write state");
    fs::set_permissions(&file, fs::Permissions::from_mode(0o600)).expect("chmod");
}

/// A source store with tokens in two providers (three buckets, one marked needs-login)
/// and two keys.
fn seeded_source(tmp: &Path) -> PathBuf {
    let src = tmp.join("src");
    let src_s = s(&src);
    store_ok(
        src_s,
        &["token", "set", "anthropic"],
        token_json(AT_1, RT_1).as_bytes(),
    );
    store_ok(
        src_s,
        &["token", "set", "anthropic", "--bucket", "work"],
        token_json(AT_2, RT_2).as_bytes(),
    );
    store_ok(
        src_s,
        &["token", "set", "codex"],
        token_json(AT_3, RT_3).as_bytes(),
    );
    store_ok(
        src_s,
        &["key", "set", "openai"],
        format!("{KEY_1}\n").as_bytes(),
    );
    store_ok(
        src_s,
        &["key", "set", "gemini"],
        format!("{KEY_2}\n").as_bytes(),
    );
    mark_needs_login(&src, "anthropic", "work");
    src
}

/// `store token status --json` as provider:bucket -> needs_login.
fn needs_login_marks(store: &str) -> BTreeMap<String, Value> {
    let run = store_ok(store, &["token", "status", "--json"], b"");
    let entries: Vec<Value> = serde_json::from_str(&run.stdout).expect("status json");
    entries
        .iter()
        .map(|e| {
            (
                format!(
                    "{}:{}",
                    e["provider"].as_str().expect("provider"),
                    e["bucket"].as_str().expect("bucket")
                ),
                e["needs_login"].clone(),
            )
        })
        .collect()
}

/// Everything in the source is in the destination, equal: the token and key listings, the
/// needs-login marks, and the raw token, key and state files (parsed), each 0600.
#[track_caller]
fn assert_same_contents(src: &Path, dst: &Path) {
    for args in [&["token", "list"][..], &["key", "list"][..]] {
        let there = store_ok(s(dst), args, b"").stdout;
        for line in store_ok(s(src), args, b"").stdout.lines() {
            assert!(
                there.lines().any(|l| l == line),
                "{args:?}: {line} not in {there}"
            );
        }
    }
    let marks = needs_login_marks(s(dst));
    for (name, mark) in needs_login_marks(s(src)) {
        assert_eq!(marks.get(&name), Some(&mark), "{name}");
    }
    for (rel, _) in snapshot(src) {
        let (a, b) = (src.join(&rel), dst.join(&rel));
        assert_eq!(json_file(&a), json_file(&b), "{}", rel.display());
        assert_eq!(fs::metadata(&b).expect("stat").mode() & 0o777, 0o600);
    }
}

#[test]
fn file_to_file_copies_every_token_key_and_mark_and_leaves_the_source_alone() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = seeded_source(tmp.path());
    let dst = tmp.path().join("new/dst");
    let before = snapshot(&src);

    let run = migrate(s(&src), s(&dst), &[]);
    assert!(run.status.success(), "{run:?}");
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), 1, "one summary line: {run:?}");
    assert!(
        lines[0].starts_with("copied 3 tokens and 2 keys from file:")
            && lines[0].contains("verified 3 tokens and 2 keys")
            && lines[0].contains("1 needs-login mark carried")
            && lines[0].ends_with("nothing removed"),
        "{run:?}"
    );
    assert_eq!(run.stderr, "", "{run:?}");

    assert_eq!(
        store_ok(s(&dst), &["token", "list"], b"").stdout,
        "anthropic:default\nanthropic:work\ncodex:default\n"
    );
    assert_eq!(
        store_ok(s(&dst), &["key", "list"], b"").stdout,
        "gemini\nopenai\n"
    );
    let marks = needs_login_marks(s(&dst));
    assert_eq!(marks["anthropic:work"]["code"], "invalid_grant");
    assert_eq!(marks["anthropic:work"]["since"], 1_700_000_000);
    assert_eq!(marks["anthropic:default"], Value::Null);
    // The raw files: the whole token, refresh token included.
    let work = json_file(&dst.join("tokens/anthropic/work.json"));
    assert_eq!(work["refresh_token"], RT_2);
    assert_eq!(work["access_token"], AT_2);
    assert_eq!(
        json_file(&dst.join("keys/openai.json"))["key"],
        Value::from(KEY_1)
    );
    assert_same_contents(&src, &dst);
    assert_eq!(snapshot(&src), before, "the source is unchanged");

    // Again: nothing to write, everything verified.
    let dst_before = snapshot(&dst);
    let run = migrate(s(&src), s(&dst), &[]);
    assert!(run.status.success(), "{run:?}");
    assert!(
        run.stdout.starts_with("copied 0 tokens and 0 keys")
            && run.stdout.contains("5 already there, equal"),
        "{run:?}"
    );
    assert_eq!(snapshot(&dst), dst_before);
    assert_eq!(snapshot(&src), before);
}

#[test]
fn the_same_store_is_refused_however_it_is_written() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = seeded_source(tmp.path());
    let link = tmp.path().join("link");
    std::os::unix::fs::symlink(&src, &link).expect("symlink");
    let before = snapshot(&src);
    let variants = [
        s(&src).to_owned(),
        format!("file:{}", s(&src)),
        s(&link).to_owned(),
        format!("{}/../src/.", s(&src)),
    ];
    for to in &variants {
        let run = migrate(s(&src), to, &[]);
        assert_eq!(run.code(), Some(2), "{to}: {run:?}");
        assert!(run.stderr.contains("the same store"), "{run:?}");
        assert_eq!(run.stdout, "");
    }
    let run = migrate("keyring:x", "keyring:x", &[]);
    assert_eq!(run.code(), Some(2), "{run:?}");
    assert_eq!(snapshot(&src), before);

    // A source directory that does not exist is not created.
    let missing = tmp.path().join("missing");
    let run = migrate(s(&missing), s(&tmp.path().join("d")), &[]);
    assert_eq!(run.code(), Some(2), "{run:?}");
    assert!(run.stderr.contains("no such directory"), "{run:?}");
    assert!(!missing.exists() && !tmp.path().join("d").exists());

    // The etcd options are for an etcd store.
    let run = migrate(
        s(&src),
        s(&tmp.path().join("d")),
        &["--store-key", "/nonexistent"],
    );
    assert_eq!(run.code(), Some(2), "{run:?}");
    assert!(run.stderr.contains("--store-key"), "{run:?}");
}

#[test]
fn a_destination_holding_different_values_is_refused_unless_overwrite() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = seeded_source(tmp.path());
    let dst = tmp.path().join("dst");
    // The same token as the source (equal), a different one, a different key, and an
    // entry the source does not have.
    store_ok(
        s(&dst),
        &["token", "set", "anthropic"],
        token_json(AT_1, RT_1).as_bytes(),
    );
    store_ok(
        s(&dst),
        &["token", "set", "codex"],
        token_json(OTHER, OTHER).as_bytes(),
    );
    store_ok(s(&dst), &["key", "set", "openai"], OTHER.as_bytes());
    store_ok(s(&dst), &["key", "set", "extra"], OTHER.as_bytes());
    let src_before = snapshot(&src);
    let dst_before = snapshot(&dst);

    let run = migrate(s(&src), s(&dst), &[]);
    assert_eq!(run.code(), Some(3), "{run:?}");
    assert_eq!(run.stdout, "");
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{run:?}");
    assert!(
        lines[0].contains("2 entries: token codex:default, key openai")
            && lines[0].contains("nothing was written")
            && lines[0].contains("--overwrite"),
        "{run:?}"
    );
    assert_eq!(snapshot(&dst), dst_before, "nothing written");

    // --dry-run: the plan, names only, and the same refusal.
    let run = migrate(s(&src), s(&dst), &["--dry-run"]);
    assert_eq!(run.code(), Some(3), "{run:?}");
    assert_eq!(
        run.stdout.lines().take(5).collect::<Vec<_>>(),
        [
            "token anthropic:default: already there, equal: left as it is",
            "token anthropic:work (marked needs-login): copy",
            "token codex:default: conflict: the destination holds a different value",
            "key gemini: copy",
            "key openai: conflict: the destination holds a different value",
        ],
        "{run:?}"
    );
    assert!(
        run.stdout
            .contains("would copy nothing (2 conflicts in the way)"),
        "{run:?}"
    );
    let run = migrate(s(&src), s(&dst), &["--dry-run", "--overwrite"]);
    assert!(run.status.success(), "{run:?}");
    assert!(
        run.stdout.contains("would copy 2 tokens and 2 keys"),
        "{run:?}"
    );
    assert_eq!(snapshot(&dst), dst_before, "a dry run writes nothing");

    let run = migrate(s(&src), s(&dst), &["--overwrite"]);
    assert!(run.status.success(), "{run:?}");
    assert!(
        run.stdout.starts_with("copied 2 tokens and 2 keys")
            && run.stdout.contains("2 replaced a different value")
            && run.stdout.contains("1 already there, equal"),
        "{run:?}"
    );
    assert_same_contents(&src, &dst);
    // The destination's own entry stays.
    assert_eq!(
        store_ok(s(&dst), &["key", "list"], b"").stdout,
        "extra\ngemini\nopenai\n"
    );
    assert_eq!(snapshot(&src), src_before);
}

#[test]
fn a_destination_failing_half_way_says_what_was_copied_and_removes_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = seeded_source(tmp.path());
    let dst = tmp.path().join("dst");
    // refresh/codex is a file: writing the codex token fails (the anthropic ones, first,
    // are written).
    fs::create_dir_all(dst.join("refresh")).expect("mkdir");
    for dir in [&dst, &dst.join("refresh")] {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).expect("chmod");
    }
    fs::write(dst.join("refresh/codex"), "x").expect("write");
    fs::set_permissions(dst.join("refresh/codex"), fs::Permissions::from_mode(0o600))
        .expect("chmod");
    let before = snapshot(&src);

    let run = migrate(s(&src), s(&dst), &[]);
    assert_eq!(run.code(), Some(5), "{run:?}");
    assert_eq!(run.stdout, "");
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{run:?}");
    assert!(
        lines[0].contains("writing the token codex:default to file:")
            && lines[0]
                .contains("copied before that: token anthropic:default, token anthropic:work;")
            && lines[0].contains("not copied: token codex:default, key gemini, key openai;")
            && lines[0].contains("nothing was removed from either store"),
        "{run:?}"
    );
    assert_eq!(snapshot(&src), before);
    assert_eq!(
        store_ok(s(&dst), &["token", "list"], b"").stdout,
        "anthropic:default\nanthropic:work\n"
    );

    // Fixed, the same command finishes the job.
    fs::remove_file(dst.join("refresh/codex")).expect("rm");
    let run = migrate(s(&src), s(&dst), &[]);
    assert!(run.status.success(), "{run:?}");
    assert!(
        run.stdout.starts_with("copied 1 token and 2 keys")
            && run.stdout.contains("2 already there, equal"),
        "{run:?}"
    );
    assert_same_contents(&src, &dst);
}

/// file -> keyring -> file: the keyring holds every token, key and mark (read through the
/// CLI), and a copy back out equals the source.
#[test]
fn the_keyring_as_destination_and_back() {
    if !common::keyring::available() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = seeded_source(tmp.path());
    let service = common::keyring::unique_service("migrate");
    let keyring = format!("keyring:{service}");
    let before = snapshot(&src);

    let run = migrate(s(&src), &keyring, &[]);
    assert!(run.status.success(), "{run:?}");
    assert!(
        run.stdout
            .starts_with(&format!("copied 3 tokens and 2 keys from file:{}", s(&src)))
            && run.stdout.contains(&format!("to {keyring}; verified")),
        "{run:?}"
    );
    assert_eq!(
        store_ok(&keyring, &["token", "list"], b"").stdout,
        "anthropic:default\nanthropic:work\ncodex:default\n"
    );
    assert_eq!(
        store_ok(&keyring, &["key", "list"], b"").stdout,
        "gemini\nopenai\n"
    );
    assert_eq!(needs_login_marks(&keyring), needs_login_marks(s(&src)));

    let back = tmp.path().join("back");
    let run = migrate(&keyring, s(&back), &[]);
    assert!(run.status.success(), "{run:?}");
    assert_same_contents(&src, &back);
    assert_eq!(snapshot(&src), before);

    // Tidy up the session's keyring.
    for (provider, bucket) in [
        ("anthropic", "default"),
        ("anthropic", "work"),
        ("codex", "default"),
    ] {
        store_ok(
            &keyring,
            &["token", "remove", provider, "--bucket", bucket],
            b"",
        );
    }
    for name in ["gemini", "openai"] {
        store_ok(&keyring, &["key", "remove", name], b"");
    }
}

#[test]
fn new_key_writes_a_0600_32_byte_key_that_loads_and_never_overwrites() {
    use credproxy::backend::seal::DataKey;
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("data.key");
    let run = credproxy(&["store", "new-key", s(&path)], b"");
    assert!(run.status.success(), "{run:?}");
    assert_eq!(run.stdout, "");
    assert!(run.stderr.contains("--store-key"), "{run:?}");
    let meta = fs::symlink_metadata(&path).expect("stat");
    assert!(meta.is_file());
    assert_eq!(meta.mode() & 0o7777, 0o600);
    assert_eq!(meta.len(), 32);
    DataKey::load(&path).expect("--store-key accepts it");
    let key = fs::read(&path).expect("read");

    // A second key is another key.
    let other = tmp.path().join("other.key");
    assert!(credproxy(&["store", "new-key", s(&other)], b"")
        .status
        .success());
    assert_ne!(fs::read(&other).expect("read"), key);

    // Never over an existing file, or through a symlink.
    let run = credproxy(&["store", "new-key", s(&path)], b"");
    assert_eq!(run.code(), Some(3), "{run:?}");
    assert!(run.stderr.contains("already exists"), "{run:?}");
    assert_eq!(fs::read(&path).expect("read"), key, "left as it was");
    let link = tmp.path().join("link.key");
    std::os::unix::fs::symlink(tmp.path().join("target"), &link).expect("symlink");
    let run = credproxy(&["store", "new-key", s(&link)], b"");
    assert_eq!(run.code(), Some(3), "{run:?}");
    assert!(!tmp.path().join("target").exists());

    // A directory that does not exist: exit 1, nothing left behind.
    let run = credproxy(
        &["store", "new-key", s(&tmp.path().join("no/such.key"))],
        b"",
    );
    assert_eq!(run.code(), Some(1), "{run:?}");
    assert!(!tmp.path().join("no").exists());
}
