//! The `Backend` contract, one suite parameterised by backend: every backend (memory, file,
//! and the file store with its read cache as `serve` runs it) must pass the same checks
//! of what PROTOCOL.md §6, §7 and §14 ask of a store: round trips, merge and replace, the
//! refusals that write nothing, removal, sorted lists, API keys, name checks, the refresh
//! state, `finish_refresh` (removal wins, the mark), the refresh lock, and no lost update
//! under concurrent merges through two handles on one store. A new backend adds one line
//! at the bottom: memory, file (with and without its read cache), the OS keyring (a real
//! Secret Service) and etcd (a real cluster; with and without the watch-fed cache).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[path = "common/etcd.rs"]
#[allow(dead_code)]
mod etcd_support;
#[path = "common/keyring.rs"]
mod keyring_support;

use credproxy::backend::etcd::{EtcdOptions, DEFAULT_LOCK_TTL};
use credproxy::backend::seal::DataKey;
use credproxy::backend::{
    Backend, EtcdBackend, FileBackend, KeyringBackend, MemoryBackend, NeedsLogin, RefreshState,
    RefreshWrite, SaveMode, StoreError,
};
use credproxy::secret::Secret;
use credproxy::token::Token;
use serde_json::{json, Value};

/// A store under test: two handles on the same stored data (for the file store, two
/// independent opens of one directory, as two processes would have).
trait Fixture {
    fn handle(&self) -> Arc<dyn Backend>;
    fn other(&self) -> Arc<dyn Backend>;
}

struct Memory(Arc<MemoryBackend>);

impl Fixture for Memory {
    fn handle(&self) -> Arc<dyn Backend> {
        self.0.clone()
    }
    fn other(&self) -> Arc<dyn Backend> {
        self.0.clone()
    }
}

fn memory() -> Memory {
    Memory(Arc::new(MemoryBackend::new()))
}

struct File {
    _dir: tempfile::TempDir,
    a: Arc<FileBackend>,
    b: Arc<FileBackend>,
}

impl Fixture for File {
    fn handle(&self) -> Arc<dyn Backend> {
        self.a.clone()
    }
    fn other(&self) -> Arc<dyn Backend> {
        self.b.clone()
    }
}

fn file(cached: bool) -> File {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let open = || {
        let b = FileBackend::open(&store).expect("open store");
        Arc::new(if cached { b.with_read_cache() } else { b })
    };
    let a = open();
    let b = open();
    File { _dir: dir, a, b }
}

fn file_plain() -> File {
    file(false)
}

fn file_cached() -> File {
    file(true)
}

fn tok(v: Value) -> Token {
    Token::from_value(v).expect("valid token")
}

fn full(access: &str, refresh: Option<&str>) -> Token {
    let mut v = json!({"access_token": access, "expiry": 1_900_000_000u64, "token_type": "Bearer"});
    if let Some(r) = refresh {
        v["refresh_token"] = json!(r);
    }
    tok(v)
}

fn fields(b: &dyn Backend, p: &str, bucket: &str) -> Option<Value> {
    b.get_token(p, bucket)
        .expect("read")
        .map(|t| Value::Object(t.fields().clone()))
}

fn mark(since: u64) -> NeedsLogin {
    NeedsLogin {
        since,
        status: 400,
        code: Some("invalid_grant".into()),
    }
}

// ---- the contract ----

fn round_trip_replace_and_served_form(f: &dyn Fixture) {
    let b = f.handle();
    assert_eq!(b.get_token("p", "default").expect("read"), None);
    let t = tok(
        json!({"access_token":"at-1","refresh_token":"rt-1","expiry":5,"token_type":"Bearer","scope":null,"account_id":"acct"}),
    );
    b.save_token("p", "default", &t, SaveMode::Replace)
        .expect("save");
    assert_eq!(
        fields(&*f.other(), "p", "default"),
        Some(
            json!({"access_token":"at-1","refresh_token":"rt-1","expiry":5,"token_type":"Bearer","scope":null,"account_id":"acct"})
        )
    );
    let served = b
        .get_served_token("p", "default")
        .expect("read")
        .expect("stored");
    let served: Value = serde_json::from_slice(served.json()).expect("json");
    assert_eq!(
        served,
        json!({"access_token":"at-1","expiry":5,"token_type":"Bearer","scope":null,"account_id":"acct"}),
        "served without refresh token"
    );
    // Replace drops fields the new token lacks, refresh token included.
    b.save_token("p", "default", &full("at-2", None), SaveMode::Replace)
        .expect("replace");
    assert_eq!(
        fields(&*f.other(), "p", "default"),
        Some(json!({"access_token":"at-2","expiry":1_900_000_000u64,"token_type":"Bearer"}))
    );
}

fn merge_keeps_what_the_incoming_token_lacks(f: &dyn Fixture) {
    let b = f.handle();
    b.save_token("p", "b1", &full("at-1", Some("rt-1")), SaveMode::Replace)
        .expect("seed");
    let partial = Token::from_client(json!({"access_token":"at-2","extra":"x"})).expect("partial");
    b.save_token("p", "b1", &partial, SaveMode::Merge)
        .expect("merge");
    assert_eq!(
        fields(&*f.other(), "p", "b1"),
        Some(
            json!({"access_token":"at-2","refresh_token":"rt-1","expiry":1_900_000_000u64,"token_type":"Bearer","extra":"x"})
        )
    );
    // With nothing stored, a partial token is refused and nothing is written.
    let err = b
        .save_token("p", "empty", &partial, SaveMode::Merge)
        .unwrap_err();
    assert!(matches!(err, StoreError::InvalidToken(_)), "{err}");
    assert_eq!(b.get_token("p", "empty").expect("read"), None);
    assert_eq!(b.list_buckets("p").expect("list"), ["b1"]);
}

fn a_token_too_large_to_serve_is_refused_and_nothing_written(f: &dyn Fixture) {
    let b = f.handle();
    b.save_token(
        "p",
        "default",
        &full("at-1", Some("rt-1")),
        SaveMode::Replace,
    )
    .expect("seed");
    let huge =
        Token::from_client(json!({"blob": "x".repeat(credproxy::protocol::MAX_SERVED_TOKEN_LEN)}))
            .expect("partial");
    let err = b
        .save_token("p", "default", &huge, SaveMode::Merge)
        .unwrap_err();
    assert!(matches!(err, StoreError::TooLarge { .. }), "{err}");
    assert_eq!(
        fields(&*f.other(), "p", "default"),
        Some(
            json!({"access_token":"at-1","refresh_token":"rt-1","expiry":1_900_000_000u64,"token_type":"Bearer"})
        )
    );
}

fn remove_and_sorted_lists(f: &dyn Fixture) {
    let b = f.handle();
    for (p, bucket) in [
        ("zeta", "default"),
        ("alpha", "work"),
        ("alpha", "default"),
        ("alpha", "a@b.c"),
    ] {
        b.save_token(p, bucket, &full("at", None), SaveMode::Replace)
            .expect("save");
    }
    let o = f.other();
    assert_eq!(o.list_providers().expect("list"), ["alpha", "zeta"]);
    assert_eq!(
        o.list_buckets("alpha").expect("list"),
        ["a@b.c", "default", "work"]
    );
    assert!(o.list_buckets("nobody").expect("list").is_empty());
    assert!(b.remove_token("zeta", "default").expect("remove"));
    assert!(!b.remove_token("zeta", "default").expect("remove again"));
    assert_eq!(o.get_token("zeta", "default").expect("read"), None);
    assert_eq!(o.list_providers().expect("list"), ["alpha"]);
}

fn api_keys(f: &dyn Fixture) {
    let b = f.handle();
    assert_eq!(
        b.get_key("openai")
            .expect("read")
            .map(|k| k.expose().to_owned()),
        None
    );
    b.set_key("openai", &Secret::new("sk-1".to_owned()))
        .expect("set");
    b.set_key("anthropic", &Secret::new("sk-a".to_owned()))
        .expect("set");
    b.set_key("openai", &Secret::new("sk-2".to_owned()))
        .expect("replace");
    let o = f.other();
    assert_eq!(
        o.get_key("openai")
            .expect("read")
            .map(|k| k.expose().to_owned())
            .as_deref(),
        Some("sk-2")
    );
    assert_eq!(o.list_keys().expect("list"), ["anthropic", "openai"]);
    assert!(b.remove_key("openai").expect("remove"));
    assert!(!b.remove_key("openai").expect("remove again"));
    assert_eq!(o.list_keys().expect("list"), ["anthropic"]);
    // Keys and tokens are apart.
    assert!(o.list_providers().expect("list").is_empty());
}

fn invalid_names_are_refused_everywhere(f: &dyn Fixture) {
    // Writes refuse an invalid name; reads refuse it or find nothing (a backend whose
    // names never become paths may skip the check on reads): nothing is ever written or
    // read under one.
    let b = f.handle();
    let t = full("at", None);
    b.save_token("p", "default", &t, SaveMode::Replace)
        .expect("seed");
    for bad in [
        "",
        ".",
        "..",
        "a/b",
        "../x",
        "a\0b",
        "../p",
        &"x".repeat(65),
    ] {
        let refused = |r: Result<(), StoreError>| matches!(r, Err(StoreError::InvalidName));
        let nothing =
            |r: Result<bool, StoreError>| matches!(r, Err(StoreError::InvalidName) | Ok(false));
        assert!(
            refused(b.save_token(bad, "default", &t, SaveMode::Replace)),
            "{bad:?}"
        );
        assert!(
            refused(b.save_token("p", bad, &t, SaveMode::Replace)),
            "{bad:?}"
        );
        assert!(
            refused(b.set_key(bad, &Secret::new("k".to_owned()))),
            "{bad:?}"
        );
        assert!(
            nothing(b.get_token(bad, "default").map(|t| t.is_some())),
            "{bad:?}"
        );
        assert!(
            nothing(b.get_token("p", bad).map(|t| t.is_some())),
            "{bad:?}"
        );
        assert!(nothing(b.remove_token(bad, "default")), "{bad:?}");
        assert!(nothing(b.remove_token("p", bad)), "{bad:?}");
        assert!(
            nothing(b.list_buckets(bad).map(|l| !l.is_empty())),
            "{bad:?}"
        );
        assert!(nothing(b.get_key(bad).map(|k| k.is_some())), "{bad:?}");
        assert!(nothing(b.remove_key(bad)), "{bad:?}");
        assert!(
            nothing(
                b.refresh_state(bad, "default")
                    .map(|s| s != RefreshState::default())
            ),
            "{bad:?}"
        );
    }
    assert!(matches!(
        b.set_key("a@b", &Secret::new("k".to_owned())),
        Err(StoreError::InvalidName)
    ));
    assert_eq!(b.list_providers().expect("list"), ["p"], "nothing written");
    assert_eq!(
        b.list_buckets("p").expect("list"),
        ["default"],
        "nothing written"
    );
    assert!(b.list_keys().expect("list").is_empty(), "nothing written");
}

fn finish_refresh_writes_marks_and_yields_to_removal(f: &dyn Fixture) {
    let b = f.handle();
    let o = f.other();
    assert_eq!(
        b.refresh_state("p", "default").expect("state"),
        RefreshState::default()
    );
    b.save_token(
        "p",
        "default",
        &full("at-1", Some("rt-1")),
        SaveMode::Replace,
    )
    .expect("seed");

    // An auth failure marks the bucket and keeps the token.
    let mut seen = None;
    let wrote = b
        .finish_refresh("p", "default", &mut |stored| {
            seen = stored.and_then(|t| t.refresh_token().map(str::to_owned));
            RefreshWrite::NeedsLogin(mark(10))
        })
        .expect("finish");
    assert!(wrote);
    assert_eq!(
        seen.as_deref(),
        Some("rt-1"),
        "decide sees the stored token"
    );
    assert_eq!(
        o.refresh_state("p", "default").expect("state").needs_login,
        Some(mark(10))
    );
    assert_eq!(
        fields(&*o, "p", "default").expect("kept")["access_token"],
        json!("at-1")
    );

    // A refreshed token is written with refreshed_at, and the mark is cleared.
    let wrote = b
        .finish_refresh("p", "default", &mut |_| RefreshWrite::Token {
            token: full("at-2", Some("rt-2")),
            at: 20,
        })
        .expect("finish");
    assert!(wrote);
    assert_eq!(
        o.refresh_state("p", "default").expect("state"),
        RefreshState {
            refreshed_at: Some(20),
            needs_login: None
        }
    );
    assert_eq!(
        o.get_token("p", "default")
            .expect("read")
            .and_then(|t| t.refresh_token().map(str::to_owned))
            .as_deref(),
        Some("rt-2")
    );

    // Nothing changes nothing.
    assert!(!b
        .finish_refresh("p", "default", &mut |_| RefreshWrite::Nothing)
        .expect("finish"));
    assert_eq!(
        fields(&*o, "p", "default").expect("kept")["access_token"],
        json!("at-2")
    );

    // A merge clears the mark; a replace starts the state over.
    b.finish_refresh("p", "default", &mut |_| RefreshWrite::NeedsLogin(mark(30)))
        .expect("mark");
    let partial = Token::from_client(json!({"access_token":"at-3"})).expect("partial");
    b.save_token("p", "default", &partial, SaveMode::Merge)
        .expect("merge");
    let state = o.refresh_state("p", "default").expect("state");
    assert_eq!(state.needs_login, None);
    assert_eq!(state.refreshed_at, Some(20));
    b.save_token(
        "p",
        "default",
        &full("at-4", Some("rt-4")),
        SaveMode::Replace,
    )
    .expect("replace");
    assert_eq!(
        o.refresh_state("p", "default").expect("state"),
        RefreshState::default()
    );

    // Removal wins: decide sees nothing and nothing is written whatever it answers.
    b.finish_refresh("p", "default", &mut |_| RefreshWrite::NeedsLogin(mark(40)))
        .expect("mark");
    assert!(o.remove_token("p", "default").expect("remove"));
    assert_eq!(
        o.refresh_state("p", "default").expect("state"),
        RefreshState::default(),
        "removal deletes the state"
    );
    let mut saw_none = false;
    let wrote = b
        .finish_refresh("p", "default", &mut |stored| {
            saw_none = stored.is_none();
            RefreshWrite::Token {
                token: full("at-zombie", Some("rt-zombie")),
                at: 50,
            }
        })
        .expect("finish");
    assert!(saw_none);
    assert!(!wrote);
    assert_eq!(o.get_token("p", "default").expect("read"), None);
    assert!(o.list_providers().expect("list").is_empty());
}

fn finish_refresh_refuses_what_save_refuses(f: &dyn Fixture) {
    let b = f.handle();
    b.save_token(
        "p",
        "default",
        &full("at-1", Some("rt-1")),
        SaveMode::Replace,
    )
    .expect("seed");
    let huge = tok(
        json!({"access_token":"x".repeat(credproxy::protocol::MAX_SERVED_TOKEN_LEN),"expiry":1,"token_type":"B"}),
    );
    let r = b.finish_refresh("p", "default", &mut |_| RefreshWrite::Token {
        token: huge.clone(),
        at: 1,
    });
    assert!(matches!(r, Err(StoreError::TooLarge { .. })), "{r:?}");
    assert_eq!(
        fields(&*f.other(), "p", "default").expect("kept")["access_token"],
        json!("at-1")
    );
    assert_eq!(
        f.other()
            .refresh_state("p", "default")
            .expect("state")
            .refreshed_at,
        None
    );
}

fn the_refresh_lock_excludes_other_holders_until_dropped(f: &dyn Fixture) {
    let b = f.handle();
    let o = f.other();
    let held = b.refresh_lock("p", "default").expect("lock");
    let taken = Arc::new(AtomicBool::new(false));
    let waiter = {
        let taken = taken.clone();
        std::thread::spawn(move || {
            let lock = o.refresh_lock("p", "default").expect("lock");
            taken.store(true, Ordering::SeqCst);
            drop(lock);
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    assert!(!taken.load(Ordering::SeqCst), "the second holder waits");
    // Another bucket's lock is independent.
    drop(b.refresh_lock("p", "other").expect("other bucket"));
    drop(held);
    waiter.join().expect("waiter");
    assert!(taken.load(Ordering::SeqCst));
}

fn concurrent_merges_through_two_handles_lose_no_update(f: &dyn Fixture) {
    let b = f.handle();
    b.save_token("p", "default", &full("at", Some("rt")), SaveMode::Replace)
        .expect("seed");
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let h = if t % 2 == 0 { f.handle() } else { f.other() };
            std::thread::spawn(move || {
                for i in 0..25 {
                    let partial =
                        Token::from_client(json!({ format!("f{t}_{i}"): i })).expect("partial");
                    h.save_token("p", "default", &partial, SaveMode::Merge)
                        .expect("merge");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("thread");
    }
    let stored = fields(&*f.other(), "p", "default").expect("stored");
    let keys: BTreeSet<&String> = stored.as_object().expect("object").keys().collect();
    for t in 0..4 {
        for i in 0..25 {
            assert!(keys.contains(&format!("f{t}_{i}")), "lost f{t}_{i}");
        }
    }
    assert_eq!(stored["refresh_token"], json!("rt"));
}

/// Two handles on one keyring service (a unique one per test), as two processes would
/// have. `None` when no Secret Service is reachable (the test then skips, or fails under
/// CI: see `keyring_support::available`).
struct Keyring {
    a: Arc<KeyringBackend>,
    b: Arc<KeyringBackend>,
}

impl Fixture for Keyring {
    fn handle(&self) -> Arc<dyn Backend> {
        self.a.clone()
    }
    fn other(&self) -> Arc<dyn Backend> {
        self.b.clone()
    }
}

impl Drop for Keyring {
    /// Leaves nothing behind in the keyring.
    fn drop(&mut self) {
        for provider in self.a.list_providers().unwrap_or_default() {
            for bucket in self.a.list_buckets(&provider).unwrap_or_default() {
                let _ = self.a.remove_token(&provider, &bucket);
            }
        }
        for key in self.a.list_keys().unwrap_or_default() {
            let _ = self.a.remove_key(&key);
        }
    }
}

fn keyring() -> Option<Keyring> {
    if !keyring_support::available() {
        return None;
    }
    let service = keyring_support::unique_service("contract");
    let open = || Arc::new(KeyringBackend::open(Some(&service)).expect("open keyring store"));
    let a = open();
    let b = open();
    Some(Keyring { a, b })
}

/// Two handles (as two hosts would have) on one etcd store, on a one-member cluster of
/// this test's own (tests/common/etcd.rs); `cached`: both keep the watch-fed read cache,
/// as `serve` runs the store. `None` when etcd is not installed (a failure under CI).
struct Etcd {
    a: Arc<EtcdBackend>,
    b: Arc<EtcdBackend>,
    /// Declared last: the cluster stops after the handles are gone.
    _cluster: etcd_support::EtcdCluster,
}

impl Fixture for Etcd {
    fn handle(&self) -> Arc<dyn Backend> {
        self.a.clone()
    }
    fn other(&self) -> Arc<dyn Backend> {
        self.b.clone()
    }
}

fn etcd(cached: bool) -> Option<Etcd> {
    let cluster = etcd_support::EtcdCluster::start(1)?;
    let key = DataKey::generate().expect("data key");
    let hex = key.to_hex();
    let open = || {
        Arc::new(
            EtcdBackend::open(EtcdOptions {
                endpoints: cluster.endpoints(),
                prefix: "contract".into(),
                data_key: DataKey::from_hex(&hex).expect("same key"),
                ca: None,
                client_cert: None,
                user: None,
                cached,
                lock_ttl: DEFAULT_LOCK_TTL,
            })
            .expect("open the etcd store"),
        )
    };
    let (a, b) = (open(), open());
    Some(Etcd {
        a,
        b,
        _cluster: cluster,
    })
}

/// One `#[test]` per contract check and backend.
macro_rules! contract {
    ($backend:ident, $make:expr) => {
        mod $backend {
            use super::*;
            contract!(@tests $make;
                round_trip_replace_and_served_form,
                merge_keeps_what_the_incoming_token_lacks,
                a_token_too_large_to_serve_is_refused_and_nothing_written,
                remove_and_sorted_lists,
                api_keys,
                invalid_names_are_refused_everywhere,
                finish_refresh_writes_marks_and_yields_to_removal,
                finish_refresh_refuses_what_save_refuses,
                the_refresh_lock_excludes_other_holders_until_dropped,
                concurrent_merges_through_two_handles_lose_no_update
            );
        }
    };
    (@tests $make:expr; $($check:ident),*) => {
        $(
            #[test]
            fn $check() {
                let fixture = $make;
                super::$check(&fixture);
            }
        )*
    };
    // A backend that needs a service which may be absent: `$make` gives an Option, and
    // `None` skips (keyring_support::available printed why, or failed under CI).
    (optional $backend:ident, $make:expr) => {
        mod $backend {
            use super::*;
            contract!(@optional $make;
                round_trip_replace_and_served_form,
                merge_keeps_what_the_incoming_token_lacks,
                a_token_too_large_to_serve_is_refused_and_nothing_written,
                remove_and_sorted_lists,
                api_keys,
                invalid_names_are_refused_everywhere,
                finish_refresh_writes_marks_and_yields_to_removal,
                finish_refresh_refuses_what_save_refuses,
                the_refresh_lock_excludes_other_holders_until_dropped,
                concurrent_merges_through_two_handles_lose_no_update
            );
        }
    };
    (@optional $make:expr; $($check:ident),*) => {
        $(
            #[test]
            fn $check() {
                if let Some(fixture) = $make {
                    super::$check(&fixture);
                }
            }
        )*
    };
}

contract!(memory_store, memory());
contract!(file_store, file_plain());
contract!(file_store_with_read_cache, file_cached());
contract!(optional keyring_store, keyring());
contract!(optional etcd_store, etcd(false));
contract!(optional etcd_store_with_read_cache, etcd(true));
