//! The file backend's refresh bookkeeping on real files (PROTOCOL.md §14): the per-bucket
//! refresh lock excludes other threads and other processes and is taken through the
//! store's trusted directories; the refresh state round-trips, defaults when absent and
//! is reported (never quoted) when corrupt; `finish_refresh` writes what `decide` chose
//! under the store lock and nothing when a remove won; saves clear the needs-login mark
//! and removes delete the state; lists never see `refresh/`; `open` sweeps its leftover
//! temporary files; modes are 0600/0700 and planted symlinks are never followed.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use credproxy::backend::{
    Backend, FileBackend, NeedsLogin, RefreshState, RefreshWrite, SaveMode, StoreError,
};
use credproxy::token::Token;
use serde_json::{json, Value};

// ---- helpers ----

/// A file store on its own temporary directory.
struct Store {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    b: FileBackend,
}

impl Store {
    fn new() -> Store {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("store");
        let b = FileBackend::open(&dir).expect("open store");
        Store { _tmp: tmp, dir, b }
    }

    /// Another backend on the same directory, as another process would have.
    fn other(&self) -> FileBackend {
        FileBackend::open(&self.dir).expect("open store")
    }

    fn token_path(&self, provider: &str, bucket: &str) -> PathBuf {
        self.dir.join(format!("tokens/{provider}/{bucket}.json"))
    }

    fn state_path(&self, provider: &str, bucket: &str) -> PathBuf {
        self.dir.join(format!("refresh/{provider}/{bucket}.json"))
    }

    fn lock_path(&self, provider: &str, bucket: &str) -> PathBuf {
        self.dir.join(format!("refresh/{provider}/{bucket}.lock"))
    }

    fn seed(&self, provider: &str, bucket: &str, access: &str) {
        self.b
            .save_token(provider, bucket, &full(access, "rt-1"), SaveMode::Replace)
            .expect("seed");
    }

    fn access(&self, provider: &str, bucket: &str) -> Option<String> {
        self.b
            .get_token(provider, bucket)
            .expect("get")
            .map(|t| t.fields()["access_token"].as_str().expect("string").into())
    }

    fn state(&self, provider: &str, bucket: &str) -> RefreshState {
        self.b.refresh_state(provider, bucket).expect("state")
    }

    /// Every file and directory under the store with its content (directories: empty).
    fn snapshot(&self) -> BTreeMap<PathBuf, Vec<u8>> {
        fn walk(dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
            for entry in fs::read_dir(dir).expect("read_dir") {
                let path = entry.expect("entry").path();
                if path.is_dir() {
                    out.insert(path.clone(), Vec::new());
                    walk(&path, out);
                } else {
                    out.insert(path.clone(), fs::read(&path).expect("read"));
                }
            }
        }
        let mut out = BTreeMap::new();
        walk(&self.dir, &mut out);
        out
    }
}

fn full(access: &str, refresh: &str) -> Token {
    Token::from_value(json!({
        "access_token": access,
        "expiry": 1_900_000_000,
        "token_type": "Bearer",
        "refresh_token": refresh,
    }))
    .expect("valid token")
}

fn mark(since: u64) -> NeedsLogin {
    NeedsLogin {
        since,
        status: 400,
        code: Some("invalid_grant".into()),
    }
}

fn mode(path: &Path) -> u32 {
    fs::symlink_metadata(path)
        .expect("stat")
        .permissions()
        .mode()
        & 0o777
}

/// Runs `finish_refresh`, recording what `decide` saw (its access token, or None).
fn finish(
    b: &FileBackend,
    provider: &str,
    bucket: &str,
    write: RefreshWrite,
) -> (Result<bool, StoreError>, Vec<Option<String>>) {
    let mut write = Some(write);
    let mut seen = Vec::new();
    let result = b.finish_refresh(provider, bucket, &mut |stored| {
        seen.push(stored.map(|t| t.fields()["access_token"].as_str().unwrap_or("").into()));
        write.take().expect("decide is asked once")
    });
    (result, seen)
}

/// The refresh lock taken on another thread, reported on the returned channel when held;
/// the thread keeps it until `release` is sent (or dropped).
fn take_on_thread(
    dir: &Path,
    provider: &'static str,
    bucket: &'static str,
) -> (
    mpsc::Receiver<()>,
    mpsc::Sender<()>,
    std::thread::JoinHandle<()>,
) {
    let (held_tx, held_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let dir = dir.to_owned();
    let handle = std::thread::spawn(move || {
        let b = FileBackend::open(dir).expect("open");
        let guard = b.refresh_lock(provider, bucket).expect("refresh lock");
        held_tx.send(()).expect("send");
        let _ = release_rx.recv();
        drop(guard);
    });
    (held_rx, release_tx, handle)
}

// ---- refresh state ----

#[test]
fn state_defaults_when_missing_and_round_trips() {
    let s = Store::new();
    assert_eq!(s.state("p", "default"), RefreshState::default());
    assert!(
        !s.dir.join("refresh").exists(),
        "reading the state creates nothing"
    );
    s.seed("p", "default", "at-1");
    let (r, _) = finish(&s.b, "p", "default", RefreshWrite::NeedsLogin(mark(7)));
    assert!(r.expect("finish"));
    let want = RefreshState {
        refreshed_at: None,
        needs_login: Some(mark(7)),
    };
    assert_eq!(s.state("p", "default"), want);
    assert_eq!(
        s.other().refresh_state("p", "default").expect("state"),
        want,
        "another process reads it too"
    );
    let on_disk: Value =
        serde_json::from_slice(&fs::read(s.state_path("p", "default")).expect("read"))
            .expect("json");
    assert_eq!(
        on_disk,
        json!({"needs_login": {"since": 7, "status": 400, "code": "invalid_grant"}})
    );
    // A state written by hand (as another version would) is read back.
    fs::write(
        s.state_path("p", "default"),
        br#"{"refreshed_at": 42, "needs_login": {"since": 9, "status": 401}}"#,
    )
    .expect("write");
    assert_eq!(
        s.state("p", "default"),
        RefreshState {
            refreshed_at: Some(42),
            needs_login: Some(NeedsLogin {
                since: 9,
                status: 401,
                code: None
            }),
        }
    );
    assert_eq!(s.state("p", "other"), RefreshState::default());
    assert_eq!(s.state("q", "default"), RefreshState::default());
}

#[test]
fn corrupt_state_file_is_corrupt_without_its_content_and_left_as_is() {
    let s = Store::new();
    s.seed("p", "default", "at-1");
    let path = s.state_path("p", "default");
    fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    let cases: [&[u8]; 7] = [
        br#"{"refreshed_at":"CANARY"}"#,
        br#"{"CANARY":1}"#,
        br#"{"needs_login":{"since":1,"status":400,"code":"x","CANARY":2}}"#,
        br#"{"refreshed_at":1,"#,
        br#"["CANARY"]"#,
        b"",
        b"\"CANARY\"",
    ];
    for content in cases {
        fs::write(&path, content).expect("write");
        let err = s.b.refresh_state("p", "default").unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{text}");
        assert!(!text.contains("CANARY"), "{text}");
        assert!(text.contains(&path.display().to_string()), "{text}");
        assert_eq!(fs::read(&path).expect("read"), content, "left as it is");
    }
    // A write that changes the state replaces it (nothing secret, nothing to lose).
    let (r, _) = finish(&s.b, "p", "default", RefreshWrite::NeedsLogin(mark(3)));
    assert!(r.expect("finish"));
    assert_eq!(s.state("p", "default").needs_login, Some(mark(3)));
    fs::write(&path, b"{").expect("write");
    s.b.save_token("p", "default", &full("at-2", "rt-2"), SaveMode::Merge)
        .expect("a corrupt state does not stop a save");
    assert_eq!(s.state("p", "default"), RefreshState::default());
    assert!(!path.exists(), "replaced by the default state");
    // A directory in its place is reported too, and stops nothing but itself.
    fs::create_dir(&path).expect("mkdir");
    let err = s.b.refresh_state("p", "default").unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
}

// ---- finish_refresh ----

#[test]
fn finish_refresh_token_writes_the_token_and_refreshed_at_and_clears_the_mark() {
    let s = Store::new();
    s.seed("p", "default", "at-1");
    let (r, _) = finish(&s.b, "p", "default", RefreshWrite::NeedsLogin(mark(5)));
    assert!(r.expect("mark"));
    let (r, seen) = finish(
        &s.b,
        "p",
        "default",
        RefreshWrite::Token {
            token: full("at-2", "rt-2"),
            at: 100,
        },
    );
    assert!(r.expect("finish"));
    assert_eq!(seen, [Some("at-1".to_owned())]);
    let stored = s.b.get_token("p", "default").expect("get").expect("stored");
    assert_eq!(stored, full("at-2", "rt-2"));
    assert_eq!(stored.refresh_token(), Some("rt-2"));
    assert_eq!(
        s.state("p", "default"),
        RefreshState {
            refreshed_at: Some(100),
            needs_login: None
        }
    );
    let on_disk: Value =
        serde_json::from_slice(&fs::read(s.state_path("p", "default")).expect("read"))
            .expect("json");
    assert_eq!(on_disk, json!({"refreshed_at": 100}));
    // A later refresh moves refreshed_at on.
    let (r, _) = finish(
        &s.b,
        "p",
        "default",
        RefreshWrite::Token {
            token: full("at-3", "rt-3"),
            at: 200,
        },
    );
    assert!(r.expect("finish"));
    assert_eq!(s.state("p", "default").refreshed_at, Some(200));
    assert_eq!(s.access("p", "default").as_deref(), Some("at-3"));
}

#[test]
fn finish_refresh_needs_login_keeps_the_token_and_refreshed_at_and_sets_the_mark() {
    let s = Store::new();
    s.seed("p", "default", "at-1");
    let token_before = fs::read(s.token_path("p", "default")).expect("read");
    let (r, _) = finish(
        &s.b,
        "p",
        "default",
        RefreshWrite::Token {
            token: full("at-2", "rt-2"),
            at: 50,
        },
    );
    assert!(r.expect("finish"));
    let token_before_mark = fs::read(s.token_path("p", "default")).expect("read");
    assert_ne!(token_before, token_before_mark);
    let (r, seen) = finish(&s.b, "p", "default", RefreshWrite::NeedsLogin(mark(60)));
    assert!(r.expect("finish"));
    assert_eq!(seen, [Some("at-2".to_owned())]);
    assert_eq!(
        fs::read(s.token_path("p", "default")).expect("read"),
        token_before_mark,
        "the token is left as it is"
    );
    assert_eq!(
        s.state("p", "default"),
        RefreshState {
            refreshed_at: Some(50),
            needs_login: Some(mark(60))
        }
    );
}

#[test]
fn finish_refresh_nothing_changes_nothing() {
    let s = Store::new();
    s.seed("p", "default", "at-1");
    let before = s.snapshot();
    let (r, seen) = finish(&s.b, "p", "default", RefreshWrite::Nothing);
    assert!(!r.expect("finish"));
    assert_eq!(seen, [Some("at-1".to_owned())]);
    assert_eq!(s.snapshot(), before, "no file or directory written");
    // With a state recorded too.
    let (r, _) = finish(&s.b, "p", "default", RefreshWrite::NeedsLogin(mark(1)));
    assert!(r.expect("finish"));
    let before = s.snapshot();
    let (r, _) = finish(&s.b, "p", "default", RefreshWrite::Nothing);
    assert!(!r.expect("finish"));
    assert_eq!(s.snapshot(), before);
}

#[test]
fn decide_sees_none_after_a_remove_and_the_removal_wins() {
    let s = Store::new();
    s.seed("p", "default", "at-1");
    // A refresh is under way (its lock held) when the host removes the token: the remove
    // is not held up by it.
    let guard = s.b.refresh_lock("p", "default").expect("refresh lock");
    let (r, _) = finish(&s.b, "p", "default", RefreshWrite::NeedsLogin(mark(1)));
    assert!(r.expect("mark"));
    assert!(s.other().remove_token("p", "default").expect("remove"));
    let before = s.snapshot();
    let (r, seen) = finish(&s.b, "p", "default", RefreshWrite::Nothing);
    assert!(!r.expect("finish"));
    assert_eq!(seen, [None], "decide sees the removal");
    drop(guard);
    assert_eq!(s.snapshot(), before, "nothing written");
    assert_eq!(s.access("p", "default"), None);
    assert_eq!(s.state("p", "default"), RefreshState::default());
    assert!(s.b.list_providers().expect("list").is_empty());
    // Never stored at all: None as well.
    let (r, seen) = finish(&s.b, "q", "default", RefreshWrite::Nothing);
    assert!(!r.expect("finish"));
    assert_eq!(seen, [None]);
}

#[test]
fn a_corrupt_stored_token_fails_finish_refresh_before_decide_and_writes_nothing() {
    let s = Store::new();
    s.seed("p", "default", "at-1");
    fs::write(s.token_path("p", "default"), br#"{"access_token":"CANARY""#).expect("write");
    let before = s.snapshot();
    let mut asked = false;
    let err =
        s.b.finish_refresh("p", "default", &mut |_| {
            asked = true;
            RefreshWrite::Token {
                token: full("at-2", "rt-2"),
                at: 1,
            }
        })
        .unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    assert!(!err.to_string().contains("CANARY"));
    assert!(!asked, "decide is not asked");
    assert_eq!(s.snapshot(), before);
}

#[test]
fn finish_refresh_refuses_a_token_that_cannot_be_stored_and_writes_nothing() {
    let s = Store::new();
    s.seed("p", "default", "at-1");
    let before = s.snapshot();
    let partial = Token::from_client(json!({"access_token": "at-2"})).expect("partial");
    let (r, _) = finish(
        &s.b,
        "p",
        "default",
        RefreshWrite::Token {
            token: partial,
            at: 1,
        },
    );
    assert!(matches!(r, Err(StoreError::InvalidToken(_))), "{r:?}");
    let huge = Token::from_value(json!({
        "access_token": "x".repeat(credproxy::protocol::MAX_SERVED_TOKEN_LEN),
        "expiry": 1,
        "token_type": "Bearer",
    }))
    .expect("token");
    let (r, _) = finish(
        &s.b,
        "p",
        "default",
        RefreshWrite::Token { token: huge, at: 1 },
    );
    assert!(matches!(r, Err(StoreError::TooLarge { .. })), "{r:?}");
    assert_eq!(s.snapshot(), before);
}

#[test]
fn finish_refresh_token_is_seen_at_once_through_the_read_cache() {
    let s = Store::new();
    let cached = s.other().with_read_cache();
    s.seed("p", "default", "at-0");
    let served = |b: &FileBackend| {
        b.get_served_token("p", "default")
            .expect("get")
            .map(|t| t.to_token().expect("token").fields()["access_token"].clone())
    };
    // Each round warms the cache (the previous write's own events may still be
    // arriving), refreshes through the cached backend and reads back at once: the
    // watcher alone may be a moment late, the write's own invalidation never is.
    for round in 1..=40 {
        let until = std::time::Instant::now() + Duration::from_secs(5);
        while cached.cached_token("p", "default").is_none() && std::time::Instant::now() < until {
            served(&cached);
            std::thread::sleep(Duration::from_millis(1));
        }
        let access = format!("at-{round}");
        let (r, _) = finish(
            &cached,
            "p",
            "default",
            RefreshWrite::Token {
                token: full(&access, "rt"),
                at: round,
            },
        );
        assert!(r.expect("finish"));
        assert_eq!(served(&cached), Some(json!(access)), "round {round}");
    }
}

// ---- saves and removes ----

#[test]
fn save_token_clears_the_mark_in_both_modes_and_a_replace_starts_over() {
    for mode in [SaveMode::Merge, SaveMode::Replace] {
        let s = Store::new();
        s.seed("p", "default", "at-1");
        let (r, _) = finish(
            &s.b,
            "p",
            "default",
            RefreshWrite::Token {
                token: full("at-2", "rt-2"),
                at: 10,
            },
        );
        assert!(r.expect("finish"));
        let (r, _) = finish(&s.b, "p", "default", RefreshWrite::NeedsLogin(mark(20)));
        assert!(r.expect("finish"));
        s.other()
            .save_token("p", "default", &full("at-3", "rt-3"), mode)
            .expect("save");
        // A merge (the sandbox) keeps the cooldown's `refreshed_at`; a replace (a new
        // login on the host) starts the bookkeeping over.
        let refreshed_at = (mode == SaveMode::Merge).then_some(10);
        assert_eq!(
            s.state("p", "default"),
            RefreshState {
                refreshed_at,
                needs_login: None
            },
            "{mode:?}"
        );
        // A mark alone: the state file goes (the default state).
        s.b.save_token("p", "other", &full("at-0", "rt-0"), mode)
            .expect("save");
        let (r, _) = finish(&s.b, "p", "other", RefreshWrite::NeedsLogin(mark(30)));
        assert!(r.expect("finish"));
        assert!(s.state_path("p", "other").exists());
        s.b.save_token("p", "other", &full("at-o", "rt-o"), mode)
            .expect("save");
        assert_eq!(s.state("p", "other"), RefreshState::default(), "{mode:?}");
        assert!(!s.state_path("p", "other").exists(), "{mode:?}");
        // Without a mark a merge does not touch the state file (a replace removed it).
        if mode == SaveMode::Merge {
            let before = fs::read(s.state_path("p", "default")).expect("read");
            s.b.save_token("p", "default", &full("at-4", "rt-4"), mode)
                .expect("save");
            assert_eq!(
                fs::read(s.state_path("p", "default")).expect("read"),
                before
            );
        } else {
            assert!(!s.state_path("p", "default").exists());
        }
    }
}

#[test]
fn a_refused_save_leaves_the_mark() {
    let s = Store::new();
    s.seed("p", "default", "at-1");
    let (r, _) = finish(&s.b, "p", "default", RefreshWrite::NeedsLogin(mark(20)));
    assert!(r.expect("finish"));
    let before = s.snapshot();
    let partial = Token::from_client(json!({"access_token": "x"})).expect("partial");
    let err =
        s.b.save_token("p", "default", &partial, SaveMode::Replace)
            .unwrap_err();
    assert!(matches!(err, StoreError::InvalidToken(_)), "{err}");
    let huge = Token::from_client(
        json!({"access_token": "x".repeat(credproxy::protocol::MAX_SERVED_TOKEN_LEN)}),
    )
    .expect("huge");
    let err =
        s.b.save_token("p", "default", &huge, SaveMode::Merge)
            .unwrap_err();
    assert!(matches!(err, StoreError::TooLarge { .. }), "{err}");
    assert_eq!(s.snapshot(), before, "nothing written");
    assert_eq!(s.state("p", "default").needs_login, Some(mark(20)));
}

#[test]
fn remove_token_deletes_the_state_but_not_the_lock_file() {
    let s = Store::new();
    s.seed("p", "a", "at-a");
    s.seed("p", "b", "at-b");
    drop(s.b.refresh_lock("p", "a").expect("lock"));
    for bucket in ["a", "b"] {
        let (r, _) = finish(
            &s.b,
            "p",
            bucket,
            RefreshWrite::Token {
                token: full("at-2", "rt-2"),
                at: 9,
            },
        );
        assert!(r.expect("finish"));
    }
    assert!(s.b.remove_token("p", "a").expect("remove"));
    assert!(!s.state_path("p", "a").exists(), "state removed");
    assert!(s.lock_path("p", "a").exists(), "lock file kept");
    assert_eq!(s.state("p", "a"), RefreshState::default());
    assert_eq!(s.state("p", "b").refreshed_at, Some(9), "others kept");
    assert!(s.b.remove_token("p", "b").expect("remove"));
    assert!(
        !s.dir.join("tokens/p").exists(),
        "the provider's token directory still goes with its last token"
    );
    assert!(s.b.list_providers().expect("list").is_empty());
    // A state without a token goes too.
    fs::write(s.state_path("p", "c"), br#"{"refreshed_at": 1}"#).expect("write");
    assert!(!s.b.remove_token("p", "c").expect("remove"));
    assert!(!s.state_path("p", "c").exists());
}

#[test]
fn lists_ignore_refresh() {
    let s = Store::new();
    s.seed("p", "a", "at-a");
    drop(s.b.refresh_lock("p", "b").expect("lock"));
    drop(s.b.refresh_lock("q", "a").expect("lock"));
    let (r, _) = finish(&s.b, "p", "a", RefreshWrite::NeedsLogin(mark(1)));
    assert!(r.expect("finish"));
    for (p, bucket) in [("p", "b"), ("q", "a")] {
        fs::write(s.state_path(p, bucket), br#"{"refreshed_at": 1}"#).expect("write");
    }
    assert_eq!(s.b.list_providers().expect("list"), ["p"]);
    assert_eq!(s.b.list_buckets("p").expect("list"), ["a"]);
    assert!(s.b.list_buckets("q").expect("list").is_empty());
    assert!(s.b.list_buckets("refresh").expect("list").is_empty());
}

// ---- the refresh lock ----

#[test]
fn the_refresh_lock_excludes_another_thread_until_dropped() {
    let s = Store::new();
    let (held, release, holder) = take_on_thread(&s.dir, "p", "default");
    held.recv_timeout(Duration::from_secs(10)).expect("held");
    let (tx, rx) = mpsc::channel();
    let dir = s.dir.clone();
    let waiter = std::thread::spawn(move || {
        let b = FileBackend::open(dir).expect("open");
        let guard = b.refresh_lock("p", "default").expect("refresh lock");
        tx.send(()).expect("send");
        drop(guard);
    });
    assert!(
        rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "a second refresh lock was taken while the first was held"
    );
    // Other buckets and the store lock are not held up meanwhile.
    drop(s.b.refresh_lock("p", "other").expect("other bucket"));
    s.seed("p", "default", "at-1");
    let (r, _) = finish(&s.b, "p", "default", RefreshWrite::NeedsLogin(mark(1)));
    assert!(r.expect("finish"));
    release.send(()).expect("release");
    rx.recv_timeout(Duration::from_secs(10))
        .expect("taken once released");
    holder.join().expect("holder");
    waiter.join().expect("waiter");
    // The same backend from two threads excludes as well.
    let guard = s.b.refresh_lock("p", "default").expect("lock");
    let (tx, rx) = mpsc::channel();
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let g = s.b.refresh_lock("p", "default").expect("lock");
            tx.send(()).expect("send");
            drop(g);
        });
        assert!(rx.recv_timeout(Duration::from_millis(300)).is_err());
        drop(guard);
        rx.recv_timeout(Duration::from_secs(10)).expect("taken");
    });
}

#[test]
fn the_refresh_lock_excludes_another_process_using_flock_1() {
    let s = Store::new();
    // Created by us first: flock(1) would otherwise create it with its own mode.
    drop(s.b.refresh_lock("p", "default").expect("lock"));
    let path = s.lock_path("p", "default");
    // The child holds the lock until its stdin closes.
    let child = Command::new("flock")
        .arg("--exclusive")
        .arg(&path)
        .args(["sh", "-c", "echo held; read x"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("SKIPPED: flock(1) from util-linux is not installed");
            return;
        }
        Err(e) => panic!("spawn flock: {e}"),
    };
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    out.read_line(&mut line).expect("read");
    assert_eq!(line, "held\n");
    let (tx, rx) = mpsc::channel();
    let dir = s.dir.clone();
    let waiter = std::thread::spawn(move || {
        let b = FileBackend::open(dir).expect("open");
        let guard = b.refresh_lock("p", "default").expect("refresh lock");
        tx.send(()).expect("send");
        guard
    });
    assert!(
        rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "refresh_lock was taken while another process held it"
    );
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(b"\n").expect("release");
    drop(stdin);
    assert!(child.wait().expect("wait").success());
    rx.recv_timeout(Duration::from_secs(10))
        .expect("taken once the other process released it");
    let guard = waiter.join().expect("waiter");
    // And the other way round: while we hold it, another process cannot take it.
    let status = Command::new("flock")
        .args(["--exclusive", "--nonblock"])
        .arg(&path)
        .arg("true")
        .status()
        .expect("flock");
    assert!(!status.success(), "flock(1) took the lock we hold");
    drop(guard);
    let status = Command::new("flock")
        .args(["--exclusive", "--nonblock"])
        .arg(&path)
        .arg("true")
        .status()
        .expect("flock");
    assert!(status.success(), "released when the guard drops");
}

/// The child half of [`the_refresh_lock_excludes_another_process_using_refresh_lock`]: does
/// nothing unless started by it.
#[test]
fn refresh_lock_child() {
    let Some(dir) = std::env::var_os("CREDPROXY_TEST_REFRESH_LOCK_DIR") else {
        return;
    };
    let b = FileBackend::open(PathBuf::from(dir)).expect("open");
    let guard = b.refresh_lock("p", "default").expect("refresh lock");
    println!("held");
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).expect("read");
    drop(guard);
}

#[test]
fn the_refresh_lock_excludes_another_process_using_refresh_lock() {
    let s = Store::new();
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "refresh_lock_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("CREDPROXY_TEST_REFRESH_LOCK_DIR", &s.dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn the test binary");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    // libtest may print the test's name on the same line first.
    while !line.trim_end().ends_with("held") {
        line.clear();
        assert_ne!(out.read_line(&mut line).expect("read"), 0, "child ended");
    }
    let (tx, rx) = mpsc::channel();
    let dir = s.dir.clone();
    let waiter = std::thread::spawn(move || {
        let b = FileBackend::open(dir).expect("open");
        drop(b.refresh_lock("p", "default").expect("refresh lock"));
        tx.send(()).expect("send");
    });
    assert!(
        rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "refresh_lock was taken while another process held it"
    );
    drop(child.stdin.take());
    rx.recv_timeout(Duration::from_secs(10))
        .expect("taken once the other process released it");
    waiter.join().expect("waiter");
    std::io::copy(&mut out, &mut std::io::sink()).expect("drain");
    assert!(child.wait().expect("wait").success());
}

// ---- modes, symlinks, sweep ----

#[test]
fn refresh_files_are_0600_and_directories_0700() {
    let s = Store::new();
    s.seed("p", "default", "at-1");
    drop(s.b.refresh_lock("p", "default").expect("lock"));
    let (r, _) = finish(&s.b, "p", "default", RefreshWrite::NeedsLogin(mark(1)));
    assert!(r.expect("finish"));
    assert_eq!(mode(&s.dir.join("refresh")), 0o700);
    assert_eq!(mode(&s.dir.join("refresh/p")), 0o700);
    assert_eq!(mode(&s.lock_path("p", "default")), 0o600);
    assert_eq!(mode(&s.state_path("p", "default")), 0o600);
    // Created by finish_refresh alone too.
    s.seed("q", "default", "at-q");
    let (r, _) = finish(&s.b, "q", "default", RefreshWrite::NeedsLogin(mark(1)));
    assert!(r.expect("finish"));
    assert_eq!(mode(&s.dir.join("refresh/q")), 0o700);
    assert_eq!(mode(&s.state_path("q", "default")), 0o600);
    let mut names: Vec<_> = fs::read_dir(s.dir.join("refresh/p"))
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
        .collect();
    names.sort();
    assert_eq!(names, ["default.json", "default.lock"], "no temp file left");
}

#[test]
fn a_symlink_planted_at_refresh_or_its_provider_directory_is_refused() {
    for planted in ["refresh", "refresh/p"] {
        let s = Store::new();
        s.seed("p", "default", "at-1");
        let outside = s.dir.parent().expect("parent").join("outside");
        fs::create_dir(&outside).expect("mkdir");
        fs::create_dir_all(s.dir.join(planted).parent().expect("parent")).expect("mkdir");
        std::os::unix::fs::symlink(&outside, s.dir.join(planted)).expect("symlink");
        let token_before = fs::read(s.token_path("p", "default")).expect("read");
        let untrusted = |r: Result<(), StoreError>, what: &str| match r {
            Err(StoreError::Untrusted { reason, .. }) => {
                assert!(reason.contains("symlink"), "{planted} {what}: {reason}")
            }
            other => panic!("{planted} {what}: {other:?}"),
        };
        untrusted(s.b.refresh_lock("p", "default").map(drop), "lock");
        untrusted(s.b.refresh_state("p", "default").map(drop), "state");
        let (r, _) = finish(&s.b, "p", "default", RefreshWrite::NeedsLogin(mark(1)));
        untrusted(r.map(drop), "needs login");
        let (r, _) = finish(
            &s.b,
            "p",
            "default",
            RefreshWrite::Token {
                token: full("at-2", "rt-2"),
                at: 1,
            },
        );
        untrusted(r.map(drop), "token");
        untrusted(
            s.b.save_token("p", "default", &full("at-3", "rt-3"), SaveMode::Replace),
            "save",
        );
        untrusted(s.b.remove_token("p", "default").map(drop), "remove");
        untrusted(FileBackend::open(&s.dir).map(drop), "open (sweep)");
        assert_eq!(
            fs::read_dir(&outside).expect("read_dir").count(),
            0,
            "{planted}: nothing written through the link"
        );
        assert_eq!(
            fs::read(s.token_path("p", "default")).expect("read"),
            token_before,
            "{planted}: the token is left as it is"
        );
        // Lists do not look there.
        assert_eq!(s.b.list_providers().expect("list"), ["p"]);
    }
}

#[test]
fn a_symlink_planted_at_the_lock_or_state_file_is_not_followed() {
    let s = Store::new();
    s.seed("p", "default", "at-1");
    fs::create_dir_all(s.dir.join("refresh/p")).expect("mkdir");
    let outside = s.dir.parent().expect("parent");
    // The lock file: refused, its target never created.
    let target = outside.join("lock-target");
    std::os::unix::fs::symlink(&target, s.lock_path("p", "default")).expect("symlink");
    let err = s.b.refresh_lock("p", "default").unwrap_err();
    assert!(matches!(err, StoreError::Io { op: "open", .. }), "{err}");
    assert!(!target.exists(), "not created through the link");
    fs::write(&target, b"kept").expect("write");
    let err = s.b.refresh_lock("p", "default").unwrap_err();
    assert!(matches!(err, StoreError::Io { op: "open", .. }), "{err}");
    assert_eq!(fs::read(&target).expect("read"), b"kept");
    // The state file: reported, and replaced (not written through) by a refresh.
    let target = outside.join("state-target");
    fs::write(&target, br#"{"refreshed_at": 1}"#).expect("write");
    std::os::unix::fs::symlink(&target, s.state_path("p", "default")).expect("symlink");
    let err = s.b.refresh_state("p", "default").unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    let (r, _) = finish(
        &s.b,
        "p",
        "default",
        RefreshWrite::Token {
            token: full("at-2", "rt-2"),
            at: 77,
        },
    );
    assert!(r.expect("finish"));
    assert_eq!(fs::read(&target).expect("read"), br#"{"refreshed_at": 1}"#);
    assert!(!fs::symlink_metadata(s.state_path("p", "default"))
        .expect("stat")
        .file_type()
        .is_symlink());
    assert_eq!(s.state("p", "default").refreshed_at, Some(77));
    // A link planted again is removed with the token, never followed.
    fs::remove_file(s.state_path("p", "default")).expect("rm");
    std::os::unix::fs::symlink(&target, s.state_path("p", "default")).expect("symlink");
    assert!(s.b.remove_token("p", "default").expect("remove"));
    assert!(fs::symlink_metadata(s.state_path("p", "default")).is_err());
    assert_eq!(fs::read(&target).expect("read"), br#"{"refreshed_at": 1}"#);
}

#[test]
fn open_sweeps_temp_files_left_under_refresh() {
    let s = Store::new();
    s.seed("p", "default", "at-1");
    drop(s.b.refresh_lock("p", "default").expect("lock"));
    let (r, _) = finish(&s.b, "p", "default", RefreshWrite::NeedsLogin(mark(1)));
    assert!(r.expect("finish"));
    let strays = [
        s.dir.join("refresh/p/.x.json.deadbeef.tmp"),
        s.dir.join("refresh/p/.default.json.0badf00d.tmp"),
        s.dir.join("refresh/.y.json.00000000.tmp"),
    ];
    fs::create_dir_all(s.dir.join("refresh/empty")).expect("mkdir");
    let stray_empty = s.dir.join("refresh/empty/.z.json.12345678.tmp");
    for stray in strays.iter().chain([&stray_empty]) {
        fs::write(stray, b"{\"refreshed_at\":").expect("write");
    }
    let kept = s.dir.join("refresh/p/notes.tmp");
    fs::write(&kept, b"not ours").expect("write");
    let reopened = s.other();
    for stray in strays.iter().chain([&stray_empty]) {
        assert!(!stray.exists(), "{} swept", stray.display());
    }
    assert!(kept.exists(), "files that are not our temp files stay");
    assert!(s.lock_path("p", "default").exists());
    assert_eq!(
        reopened
            .refresh_state("p", "default")
            .expect("state")
            .needs_login,
        Some(mark(1))
    );
}
