//! The etcd store's own promises, against a real cluster (tests/common/etcd.rs): the
//! watch-fed read cache follows another host's writes and is suspended while its watch is
//! down; a sealed value moved to another key does not open (and is not served); a wrong
//! data key is refused at open; every bad `--store-key`/`--etcd-*` input gets a clear
//! error and writes nothing; TLS with a client certificate and with a user and password.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::etcd::EtcdCluster;
use common::process::{run, Env, Stdin, BIN};
use credproxy::backend::etcd::{EtcdOptions, DEFAULT_LOCK_TTL};
use credproxy::backend::seal::DataKey;
use credproxy::backend::{Backend, EtcdBackend, SaveMode};
use credproxy::token::Token;
use serde_json::json;

const REFRESH: &str = "RT-CANARY-etcd-store-3b1f";

fn token(access: &str) -> Token {
    Token::from_value(json!({
        "access_token": access,
        "refresh_token": REFRESH,
        "expiry": 4_102_444_800u64,
        "token_type": "Bearer",
    }))
    .expect("token")
}

fn open(cluster: &EtcdCluster, key: &DataKey, cached: bool) -> Arc<EtcdBackend> {
    Arc::new(
        EtcdBackend::open(EtcdOptions {
            endpoints: cluster.endpoints(),
            prefix: "store".into(),
            data_key: DataKey::from_hex(&key.to_hex()).expect("key"),
            ca: None,
            client_cert: None,
            user: None,
            cached,
            lock_ttl: DEFAULT_LOCK_TTL,
        })
        .expect("open"),
    )
}

fn access(served: &credproxy::token::ServedToken) -> String {
    let v: serde_json::Value = serde_json::from_slice(served.json()).expect("json");
    v["access_token"].as_str().expect("access").to_owned()
}

fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    f()
}

/// Host A serves from its cache; host B writes; A's cache is dropped by the watch and A
/// serves B's token. Then the cluster goes down: A's cache is suspended (nothing is served
/// from memory while changes cannot be seen) and A's reads fail; back up, A caches again.
#[test]
fn the_read_cache_follows_other_hosts_and_is_suspended_without_its_watch() {
    let Some(mut cluster) = EtcdCluster::start(3) else {
        return;
    };
    let key = DataKey::generate().expect("key");
    let (a, b) = (open(&cluster, &key, true), open(&cluster, &key, false));
    b.save_token("anthropic", "default", &token("at-1"), SaveMode::Replace)
        .expect("save");
    // The watch is set up in the background: until then nothing is cached.
    assert!(eventually(Duration::from_secs(10), || {
        let served = a.get_served_token("anthropic", "default").expect("read");
        served.is_some() && a.cached_token("anthropic", "default").is_some()
    }));
    let cached = a
        .cached_token("anthropic", "default")
        .expect("cached")
        .expect("some");
    assert_eq!(access(&cached), "at-1");
    assert!(!String::from_utf8_lossy(cached.json()).contains(REFRESH));

    let written = Instant::now();
    b.save_token("anthropic", "default", &token("at-2"), SaveMode::Replace)
        .expect("save");
    assert!(
        eventually(Duration::from_secs(5), || {
            a.cached_token("anthropic", "default")
                .is_none_or(|t| t.is_some_and(|t| access(&t) == "at-2"))
        }),
        "another host's write dropped the cache"
    );
    eprintln!(
        "cache dropped {:?} after the other host's write",
        written.elapsed()
    );
    let served = a
        .get_served_token("anthropic", "default")
        .expect("read")
        .expect("some");
    assert_eq!(access(&served), "at-2");

    cluster.stop_all();
    assert!(
        eventually(Duration::from_secs(15), || a
            .cached_token("anthropic", "default")
            .is_none()),
        "the cache is suspended once the watch is down"
    );
    let started = Instant::now();
    assert!(a.get_served_token("anthropic", "default").is_err());
    assert!(started.elapsed() < Duration::from_secs(10), "bounded");

    cluster.start_all();
    assert!(
        eventually(Duration::from_secs(20), || {
            a.get_served_token("anthropic", "default").is_ok()
                && a.cached_token("anthropic", "default").is_some()
        }),
        "the watch is set up again and the cache answers"
    );
}

/// A sealed token copied (raw, as an operator with etcd access could) to another bucket's
/// key does not open there: the bucket is refused with an error naming the key, never
/// served; the original still opens. Raw values hold no refresh token.
#[test]
fn a_sealed_value_moved_to_another_key_does_not_open() {
    let Some(cluster) = EtcdCluster::start(1) else {
        return;
    };
    let key = DataKey::generate().expect("key");
    let store = open(&cluster, &key, false);
    store
        .save_token("anthropic", "work", &token("at-work"), SaveMode::Replace)
        .expect("save");
    let raw = cluster.raw_get_prefix("/store/");
    let (_, sealed) = raw
        .iter()
        .find(|(k, _)| k == "/store/tokens/anthropic/work")
        .expect("the sealed token");
    for (k, v) in &raw {
        let text = String::from_utf8_lossy(v);
        assert!(!text.contains(REFRESH), "{k} holds the refresh token");
        assert!(!text.contains("at-work"), "{k} holds the access token");
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    rt.block_on(async {
        let mut c = etcd_client::Client::connect(cluster.endpoints(), None)
            .await
            .expect("connect");
        c.put("/store/tokens/anthropic/moved", sealed.clone(), None)
            .await
            .expect("put");
    });
    let err = store.get_token("anthropic", "moved").expect_err("refused");
    let text = err.to_string();
    assert!(text.contains("does not open with the data key"), "{text}");
    assert!(text.contains("/store/tokens/anthropic/moved"), "{text}");
    assert!(!text.contains(REFRESH));
    let kept = store
        .get_token("anthropic", "work")
        .expect("read")
        .expect("some");
    assert_eq!(kept.refresh_token(), Some(REFRESH));
}

fn write_key(dir: &Path, name: &str, bytes: &[u8], mode: u32) -> String {
    let path = dir.join(name);
    std::fs::write(&path, bytes).expect("write key");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    path.to_str().expect("utf-8").to_owned()
}

/// Through the CLI: a store written with one data key refuses a host with another, and
/// every bad input is a clear error, exit 2 for usage and 1 otherwise, with nothing
/// written and no secret printed.
#[test]
fn wrong_keys_and_bad_options_are_refused_clearly() {
    let Some(cluster) = EtcdCluster::start(1) else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let good = write_key(dir.path(), "good.key", &[7u8; 32], 0o600);
    let other = write_key(dir.path(), "other.key", &[9u8; 32], 0o600);
    let short = write_key(dir.path(), "short.key", &[7u8; 31], 0o600);
    let open_mode = write_key(dir.path(), "open.key", &[7u8; 32], 0o644);
    let url = cluster.store_url("cli");
    let body = format!(
        r#"{{"access_token":"AT-cli","refresh_token":"{REFRESH}","expiry":4102444800,"token_type":"Bearer"}}"#
    );
    let set = |args: &[&str]| {
        let mut all = vec!["store", "token", "set", "anthropic", "--store", &url];
        all.extend_from_slice(args);
        run(BIN, &all, Stdin::Pipe(body.as_bytes()), Env::ISOLATED)
    };
    // Reading an empty store with some key records nothing: the first write decides.
    let empty = run(
        BIN,
        &[
            "store",
            "token",
            "list",
            "--store",
            &url,
            "--store-key",
            &other,
        ],
        Stdin::Null,
        Env::ISOLATED,
    );
    assert_eq!(
        (empty.code(), empty.stdout.as_str()),
        (Some(0), ""),
        "{}",
        empty.stderr
    );
    let ok = set(&["--store-key", &good]);
    assert_eq!(ok.code(), Some(0), "{}", ok.stderr);

    let cases: Vec<(Vec<&str>, i32, &str)> = vec![
        (vec!["--store-key", &other], 1, "another data key"),
        (vec![], 2, "--store-key FILE"),
        (vec!["--store-key", &short], 1, "31 bytes"),
        (vec!["--store-key", &open_mode], 1, "chmod 600"),
        (
            vec!["--store-key", &good, "--etcd-user", "cp"],
            2,
            "--etcd-password-file",
        ),
    ];
    for (args, code, says) in cases {
        let r = set(&args);
        assert_eq!(r.code(), Some(code), "{args:?}: {}", r.stderr);
        assert!(r.stderr.contains(says), "{args:?}: {}", r.stderr);
        assert!(!r.stderr.contains(REFRESH) && !r.stderr.contains("AT-cli"));
    }
    // The etcd options are refused for a directory store.
    let d = dir.path().join("files");
    let r = run(
        BIN,
        &[
            "store",
            "token",
            "list",
            "--store",
            d.to_str().unwrap(),
            "--store-key",
            &good,
        ],
        Stdin::Null,
        Env::ISOLATED,
    );
    assert_eq!(r.code(), Some(2), "{}", r.stderr);
    assert!(r.stderr.contains("is for an etcd store"), "{}", r.stderr);
    // Nothing was written by the refused runs: the one token, sealed with the good key.
    let list = run(
        BIN,
        &[
            "store",
            "token",
            "list",
            "--store",
            &url,
            "--store-key",
            &good,
        ],
        Stdin::Null,
        Env::ISOLATED,
    );
    assert_eq!(list.stdout, "anthropic:default\n", "{}", list.stderr);
    // No member at all: a clear error within seconds, not a hang.
    let started = Instant::now();
    let r = run(
        BIN,
        &[
            "store",
            "token",
            "list",
            "--store",
            "etcd://127.0.0.1:9/cli",
            "--store-key",
            &good,
        ],
        Stdin::Null,
        Env::ISOLATED,
    );
    assert_eq!(r.code(), Some(1), "{}", r.stderr);
    assert!(
        r.stderr.contains("cannot open the etcd store"),
        "{}",
        r.stderr
    );
    assert!(started.elapsed() < Duration::from_secs(15));
}

/// TLS with client certificates and a user confined to its prefix: the store works with
/// the certificate, with the user and password on top of it, is refused outside the
/// user's prefix (saying what to grant) and without the CA (saying which option).
#[test]
fn tls_with_a_client_certificate_and_a_password() {
    let Some((cluster, tls)) = EtcdCluster::start_tls(1) else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let key = write_key(dir.path(), "k", &[3u8; 32], 0o600);
    let prefix = tls.prefix.trim_matches('/').to_owned();
    let url = cluster.store_url(&prefix);
    let (ca, cert, ckey, pw) = (
        tls.ca.to_str().unwrap(),
        tls.client_cert.to_str().unwrap(),
        tls.client_key.to_str().unwrap(),
        tls.password_file.to_str().unwrap(),
    );
    let body = format!(
        r#"{{"access_token":"AT-tls","refresh_token":"{REFRESH}","expiry":4102444800,"token_type":"Bearer"}}"#
    );
    let with_cert = [
        "--store-key",
        &key,
        "--etcd-ca",
        ca,
        "--etcd-cert",
        cert,
        "--etcd-key",
        ckey,
    ];
    let mut args = vec!["store", "token", "set", "anthropic", "--store", &url];
    args.extend_from_slice(&with_cert);
    let r = run(BIN, &args, Stdin::Pipe(body.as_bytes()), Env::ISOLATED);
    assert_eq!(r.code(), Some(0), "{}", r.stderr);

    let mut args = vec!["store", "token", "list", "--store", &url];
    args.extend_from_slice(&with_cert);
    args.extend_from_slice(&["--etcd-user", &tls.user, "--etcd-password-file", pw]);
    let r = run(BIN, &args, Stdin::Null, Env::ISOLATED);
    assert_eq!(r.stdout, "anthropic:default\n", "{}", r.stderr);

    let outside = cluster.store_url("elsewhere");
    let mut args = vec!["store", "token", "list", "--store", &outside];
    args.extend_from_slice(&with_cert);
    let r = run(BIN, &args, Stdin::Null, Env::ISOLATED);
    assert_eq!(r.code(), Some(1));
    assert!(
        r.stderr.contains("needs readwrite on the prefix"),
        "{}",
        r.stderr
    );

    let r = run(
        BIN,
        &[
            "store",
            "token",
            "list",
            "--store",
            &url,
            "--store-key",
            &key,
            "--etcd-cert",
            cert,
            "--etcd-key",
            ckey,
        ],
        Stdin::Null,
        Env::ISOLATED,
    );
    assert_eq!(r.code(), Some(1));
    assert!(r.stderr.contains("--etcd-ca"), "{}", r.stderr);
    assert!(!r.stderr.contains(&tls.password()));
}

/// Every host store command on an etcd store: `token set/list/status/refresh/remove`,
/// `key set/list/remove`, with a real token endpoint on 127.0.0.1 for the refresh (one
/// request, the rotated refresh token stored sealed), never a secret in any output.
#[test]
fn every_store_command_works_on_etcd() {
    let Some(cluster) = EtcdCluster::start(1) else {
        return;
    };
    let endpoint = common::token_endpoint::TokenEndpoint::start(REFRESH);
    let dir = tempfile::tempdir().expect("tempdir");
    let key = write_key(dir.path(), "k", &[5u8; 32], 0o600);
    let profile = dir.path().join("profile.toml");
    std::fs::write(
        &profile,
        format!("[provider.anthropic]\ntoken_url = \"{}\"\n", endpoint.url()),
    )
    .expect("profile");
    let url = cluster.store_url("cmds");
    let p = profile.to_str().expect("utf-8");
    let cmd = |args: &[&str], stdin: &[u8]| {
        let mut all: Vec<&str> = vec!["store"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--store", &url, "--store-key", &key]);
        let r = run(BIN, &all, Stdin::Pipe(stdin), Env::ISOLATED);
        for secret in [REFRESH, "AT-old", "KEY-CANARY-cmds", "at-1", "rt-1"] {
            assert!(
                !r.stdout.contains(secret) && !r.stderr.contains(secret),
                "{args:?} printed {secret}: {r:?}"
            );
        }
        r
    };
    let expired = format!(
        r#"{{"access_token":"AT-old","refresh_token":"{REFRESH}","expiry":1000,"token_type":"Bearer"}}"#
    );
    assert_eq!(
        cmd(&["token", "set", "anthropic"], expired.as_bytes()).code(),
        Some(0)
    );
    assert_eq!(cmd(&["token", "list"], b"").stdout, "anthropic:default\n");
    let status = cmd(&["token", "status", "--profile", p], b"");
    assert!(
        status.stdout.contains("anthropic:default: expired"),
        "{status:?}"
    );
    let refreshed = cmd(&["token", "refresh", "anthropic", "--profile", p], b"");
    assert_eq!(refreshed.code(), Some(0), "{refreshed:?}");
    assert_eq!(endpoint.count(), 1);
    let raw = cluster.raw_get_prefix("/cmds/");
    assert!(raw
        .iter()
        .all(|(_, v)| !String::from_utf8_lossy(v).contains("rt-1")));
    let again = cmd(&["token", "refresh", "anthropic", "--profile", p], b"");
    assert!(
        again.stdout.contains("within the 30 s cooldown"),
        "{again:?}"
    );
    assert_eq!(
        endpoint.count(),
        1,
        "the cooldown is read from the shared state"
    );

    assert_eq!(
        cmd(&["key", "set", "openai"], b"KEY-CANARY-cmds").code(),
        Some(0)
    );
    assert_eq!(cmd(&["key", "list"], b"").stdout, "openai\n");
    assert_eq!(cmd(&["key", "remove", "openai"], b"").code(), Some(0));
    assert_eq!(cmd(&["key", "list"], b"").stdout, "");
    assert_eq!(cmd(&["token", "remove", "anthropic"], b"").code(), Some(0));
    assert_eq!(cmd(&["token", "list"], b"").stdout, "");
    assert!(
        cluster
            .raw_get_prefix("/cmds/")
            .iter()
            .all(|(k, _)| k.starts_with("/cmds/meta/")),
        "token, state and key all gone"
    );
}
