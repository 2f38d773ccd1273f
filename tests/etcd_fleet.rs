//! A fleet on one etcd store, with the real binary: several `credproxy serve` on one
//! 3-member etcd cluster (tests/common/etcd.rs) and a real token endpoint on 127.0.0.1.
//!
//! - one refresh across the fleet for 300 concurrent `get_token`, every answer the new token;
//! - a lock holder SIGKILLed mid-refresh: another server finishes once its lease runs out;
//! - a leader stopped during a stream of `store token set`: every acknowledged write stays;
//! - every member stopped: `INTERNAL_ERROR` within a bound, the server stays up and
//!   answers again by itself once the members are back;
//! - no refresh token, access token or API key in etcd's raw values or the server's log.
//!
//! Without etcd they skip (a failure under CI), like the rest of the etcd tests. The
//! lock-holder test found a real bug on its first run: a waiter's lease ran out while it
//! waited, so the lock, once had, was lost at once and two servers sent one refresh token
//! (fixed: the lease is kept alive while waiting and renewed on taking the lock).
//!
//! What they assume of the interface (see each helper):
//! - every command takes `--store etcd://127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3/PREFIX`
//!   and `--store-key FILE` (32 random bytes, 0600), `serve` as well;
//! - `store token set PROVIDER --bucket B` reads the token JSON on stdin and exits 0 once
//!   the write is acknowledged; `store key set NAME` reads the key's line on stdin;
//!   `store token list` prints one `provider:bucket` a line;
//! - with etcd unreachable a request is answered `INTERNAL_ERROR` (not left hanging) and
//!   the server reconnects by itself;
//! - the refresh lock is an etcd lock on a lease of at most about 42 s;
//! - the values live under `/PREFIX/` and a token is under a key naming its provider.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::etcd::EtcdCluster;
use common::process::{run, Env, Server, Stdin, BIN};
use common::refresh::now;
use common::token_endpoint::{Reply, TokenEndpoint};
use common::{data, Raw};
use nix::sys::signal::Signal;
use serde_json::{json, Value};

/// The etcd prefix every test uses (each has its own cluster).
const PREFIX: &str = "fleet";

/// How long a reply may take while a server waits for a lock or for etcd.
const SLOW_REPLY: Duration = Duration::from_secs(90);

/// A cluster, a data key, a socket directory and a profile: what the servers and the
/// store commands of one test share.
struct Fleet {
    cluster: EtcdCluster,
    tmp: tempfile::TempDir,
    key: PathBuf,
    sock: PathBuf,
    url: String,
}

impl Fleet {
    /// A 3-member cluster and a fresh data key; `None` without etcd.
    fn start() -> Option<Fleet> {
        let cluster = EtcdCluster::start(3)?;
        let tmp = tempfile::tempdir().expect("tempdir");
        let key = tmp.path().join("store.key");
        let mut bytes = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut bytes);
        fs::write(&key, bytes).expect("write the data key");
        fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).expect("chmod key");
        let sock = tmp.path().join("sock");
        fs::create_dir(&sock).expect("mkdir sock");
        fs::set_permissions(&sock, fs::Permissions::from_mode(0o700)).expect("chmod sock");
        let url = cluster.store_url(PREFIX);
        Some(Fleet {
            cluster,
            tmp,
            key,
            sock,
            url,
        })
    }

    fn key_str(&self) -> &str {
        self.key.to_str().expect("utf-8")
    }

    /// `credproxy store ARGS --store URL --store-key KEY` with `stdin`, to its end.
    fn store(&self, args: &[&str], stdin: &[u8]) -> common::process::Run {
        let mut all = vec!["store"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--store", &self.url, "--store-key", self.key_str()]);
        run(BIN, &all, Stdin::PipeAll(stdin), Env::ISOLATED)
    }

    /// Stores `token` as provider:bucket; panics unless acknowledged.
    fn set_token(&self, provider: &str, bucket: &str, token: &Value) {
        let run = self.store(
            &["token", "set", provider, "--bucket", bucket],
            token.to_string().as_bytes(),
        );
        assert!(run.status.success(), "store token set: {run:?}");
    }

    /// Stores an already expired token with `refresh` for anthropic:default.
    fn set_expired(&self, access: &str, refresh: &str) {
        self.set_token(
            "anthropic",
            "default",
            &json!({"access_token": access, "refresh_token": refresh,
                "expiry": now() - 10, "token_type": "Bearer"}),
        );
    }

    /// A profile allowing everything, no rate limit, `anthropic` refreshed at `url`.
    fn profile(&self, url: &str) -> String {
        let path = self.tmp.path().join("profile.toml");
        let text = format!(
            "allow_all = true\nrate_limit = 0\n\n[provider.anthropic]\ntoken_url = \"{url}\"\n"
        );
        fs::write(&path, text).expect("profile");
        path.to_str().expect("utf-8").to_owned()
    }

    /// `credproxy serve --store URL --store-key KEY --socket-dir SOCK EXTRA...`.
    fn serve(&self, extra: &[&str], env: Env) -> Server {
        let mut args = vec![
            "serve",
            "--store",
            &self.url,
            "--store-key",
            self.key_str(),
            "--socket-dir",
            self.sock.to_str().expect("utf-8"),
        ];
        args.extend_from_slice(extra);
        Server::start(&args, env)
    }

    /// Every raw value under `/PREFIX/`, with its key.
    fn raw(&self) -> Vec<(String, Vec<u8>)> {
        self.cluster.raw_get_prefix(&format!("/{PREFIX}/"))
    }
}

/// A raw connection whose replies may take [`SLOW_REPLY`].
fn patient(server: &Server) -> Raw {
    let raw = server.connect();
    raw.stream
        .set_read_timeout(Some(SLOW_REPLY))
        .expect("read timeout");
    raw
}

/// The refresh token of every request the endpoint received, in order.
fn sent(endpoint: &TokenEndpoint) -> Vec<Option<String>> {
    endpoint
        .received()
        .iter()
        .map(|r| r.param("refresh_token").map(str::to_owned))
        .collect()
}

fn get_token(raw: &mut Raw, id: &str, bucket: &str) -> Value {
    raw.call(
        id,
        "get_token",
        json!({"provider": "anthropic", "bucket": bucket}),
    )
}

/// (a) 300 concurrent `get_token` over three servers on one expired token: exactly one
/// request reaches the token endpoint, and every answer is the new access token.
#[test]
fn three_servers_refresh_once_for_300_concurrent_requests() {
    let Some(fleet) = Fleet::start() else {
        return;
    };
    let endpoint = TokenEndpoint::start("rt-0");
    endpoint
        .push([Reply::token("at-fleet", 3600, Some("rt-fleet")).after(Duration::from_millis(400))]);
    fleet.set_expired("at-old", "rt-0");
    let profile = fleet.profile(&endpoint.url());
    let servers: Vec<Server> = (0..3)
        .map(|_| fleet.serve(&["--profile", &profile], Env::ISOLATED))
        .collect();
    let mut conns: Vec<Raw> = (0..75).map(|i| patient(&servers[i % 3])).collect();
    let replies: Vec<Value> = thread::scope(|s| {
        let handles: Vec<_> = conns
            .iter_mut()
            .enumerate()
            .map(|(c, raw)| {
                s.spawn(move || {
                    for i in 0..4 {
                        raw.send(&json!({"id": format!("{c}-{i}"), "op": "get_token",
                            "payload": {"provider": "anthropic"}}));
                    }
                    (0..4).map(|_| raw.recv()).collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("client thread"))
            .collect()
    });
    assert_eq!(replies.len(), 300);
    for reply in &replies {
        assert_eq!(data(reply)["access_token"], "at-fleet", "{reply}");
    }
    assert_eq!(endpoint.count(), 1, "one refresh across the fleet");
    assert_eq!(endpoint.reused(), 0);
    assert_eq!(endpoint.received()[0].param("refresh_token"), Some("rt-0"));
    // Each server answers the new token again (from its cache or from etcd).
    for (i, server) in servers.iter().enumerate() {
        let mut raw = server.connect();
        let reply = get_token(&mut raw, &format!("again-{i}"), "default");
        assert_eq!(data(&reply)["access_token"], "at-fleet", "{reply}");
    }
    assert_eq!(endpoint.count(), 1);
    for server in servers {
        let stopped = server.stop(Signal::SIGTERM);
        assert!(stopped.status.success(), "{stopped:?}");
    }
}

/// (b) The server whose refresh reached the endpoint holds the fleet's refresh lock; it is
/// SIGKILLed while the endpoint holds its request. Another server takes the lock once the
/// dead holder's lease runs out (up to about 42 s), refreshes with the same refresh token,
/// and every server then answers the new token. Slow: about 45 s.
#[test]
fn a_lock_holder_killed_mid_refresh_is_replaced_after_its_lease() {
    let Some(fleet) = Fleet::start() else {
        return;
    };
    let endpoint = TokenEndpoint::start("rt-0");
    // The first request is held far longer than the test: its sender dies meanwhile.
    endpoint
        .push([Reply::token("at-never", 3600, Some("rt-never")).after(Duration::from_secs(600))]);
    fleet.set_expired("at-old", "rt-0");
    let profile = fleet.profile(&endpoint.url());
    let mut holder = fleet.serve(&["--profile", &profile], Env::ISOLATED);
    let others: Vec<Server> = (0..2)
        .map(|_| fleet.serve(&["--profile", &profile], Env::ISOLATED))
        .collect();

    // Only the holder is asked first, so the request at the endpoint is its own.
    let mut raw = patient(&holder);
    raw.send(&json!({"id": "held", "op": "get_token", "payload": {"provider": "anthropic"}}));
    assert_eq!(
        endpoint.wait_for(1, Duration::from_secs(10)),
        1,
        "the holder's refresh reached the endpoint"
    );
    // The others ask meanwhile: they wait for the lock, they do not refresh.
    let waiting: Vec<thread::JoinHandle<Value>> = others
        .iter()
        .enumerate()
        .map(|(i, server)| {
            let mut raw = patient(server);
            thread::spawn(move || get_token(&mut raw, &format!("waiting-{i}"), "default"))
        })
        .collect();
    thread::sleep(Duration::from_millis(500));
    assert_eq!(
        endpoint.count(),
        1,
        "a server refreshed while the lock was held"
    );

    let killed_at = Instant::now();
    holder.child.kill();
    drop(raw);

    // Another server finishes the refresh once the lease has run out. A waiting request
    // may have given up first (its own lock wait): then ask again.
    let mut answers = Vec::new();
    for (i, handle) in waiting.into_iter().enumerate() {
        let mut reply = handle.join().expect("waiting client");
        let mut tries = 0;
        while reply["ok"] != json!(true) {
            // A refresh token sent twice (a rotated one refused as invalid_grant) shows
            // as REAUTH_REQUIRED: that is the failure this test is about, not a wait.
            assert_ne!(
                reply["code"],
                json!("REAUTH_REQUIRED"),
                "server {i} took the login for revoked; the endpoint saw the refresh \
                 tokens {:?} ({} reused)",
                sent(&endpoint),
                endpoint.reused()
            );
            tries += 1;
            assert!(
                killed_at.elapsed() < Duration::from_secs(120),
                "no server finished the refresh within 120 s: {reply}"
            );
            thread::sleep(Duration::from_millis(200));
            let mut raw = patient(&others[i]);
            reply = get_token(&mut raw, &format!("retry-{i}-{tries}"), "default");
        }
        answers.push(reply);
    }
    eprintln!(
        "the refresh finished {:?} after the holder was killed",
        killed_at.elapsed()
    );
    for reply in &answers {
        // The rotating endpoint's first own answer: the held request never completed.
        assert_eq!(data(reply)["access_token"], "at-1", "{reply}");
    }
    let received = endpoint.received();
    assert_eq!(
        received.len(),
        2,
        "the held refresh and one replacement, not {:?}",
        sent(&endpoint)
    );
    assert_eq!(received[1].param("refresh_token"), Some("rt-0"));
    assert_eq!(endpoint.reused(), 0);
    for (i, server) in others.iter().enumerate() {
        let mut raw = server.connect();
        let reply = get_token(&mut raw, &format!("after-{i}"), "default");
        assert_eq!(data(&reply)["access_token"], "at-1", "{reply}");
    }
    assert_eq!(endpoint.count(), 2);
}

/// (c) The leader is stopped (and later started again) during a stream of
/// `store token set`: some writes may fail while a new leader is elected, but every
/// write that was acknowledged (exit 0) is there afterwards, with its value.
#[test]
fn every_acknowledged_write_survives_a_leader_change() {
    let Some(mut fleet) = Fleet::start() else {
        return;
    };
    let stop = Arc::new(AtomicBool::new(false));
    let acknowledged = Arc::new(Mutex::new(Vec::<usize>::new()));
    let failed = Arc::new(Mutex::new(Vec::<(usize, String)>::new()));
    let writer = {
        let stop = stop.clone();
        let acknowledged = acknowledged.clone();
        let failed = failed.clone();
        let url = fleet.url.clone();
        let key = fleet.key_str().to_owned();
        thread::spawn(move || {
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                let bucket = format!("b{i}");
                let token = json!({"access_token": format!("at-{i}"),
                    "refresh_token": format!("rt-{i}"), "expiry": 1_900_000_000,
                    "token_type": "Bearer"});
                let run = run(
                    BIN,
                    &[
                        "store",
                        "token",
                        "set",
                        "anthropic",
                        "--bucket",
                        &bucket,
                        "--store",
                        &url,
                        "--store-key",
                        &key,
                    ],
                    Stdin::PipeAll(token.to_string().as_bytes()),
                    Env::ISOLATED,
                );
                if run.status.success() {
                    acknowledged.lock().unwrap().push(i);
                } else {
                    failed.lock().unwrap().push((i, run.stderr));
                }
                i += 1;
            }
        })
    };
    let count = |v: &Arc<Mutex<Vec<usize>>>| v.lock().unwrap().len();
    let wait_for = |n: usize| {
        let t0 = Instant::now();
        while count(&acknowledged) < n {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "writes stalled at {} acknowledged",
                count(&acknowledged)
            );
            thread::sleep(Duration::from_millis(20));
        }
    };
    wait_for(5);
    let leader = fleet.cluster.leader();
    fleet.cluster.stop_member(leader);
    let before = count(&acknowledged);
    wait_for(before + 5);
    fleet.cluster.start_member(leader);
    let before = count(&acknowledged);
    wait_for(before + 3);
    // And once more, the new leader.
    let leader = fleet.cluster.leader();
    fleet.cluster.kill_member(leader);
    let before = count(&acknowledged);
    wait_for(before + 5);
    stop.store(true, Ordering::SeqCst);
    writer.join().expect("writer thread");
    fleet.cluster.start_member(leader);

    let acknowledged = acknowledged.lock().unwrap().clone();
    let failed = failed.lock().unwrap().clone();
    eprintln!(
        "{} writes acknowledged, {} failed",
        acknowledged.len(),
        failed.len()
    );
    for (i, stderr) in &failed {
        assert!(
            !stderr.contains(&format!("rt-{i}")),
            "an error named the token: {stderr}"
        );
    }
    let list = fleet.store(&["token", "list"], b"");
    assert!(list.status.success(), "{list:?}");
    let listed: Vec<&str> = list.stdout.lines().collect();
    for i in &acknowledged {
        assert!(
            listed.contains(&format!("anthropic:b{i}").as_str()),
            "acknowledged write b{i} is missing: {listed:?}"
        );
    }
    // The values too: a server reads each acknowledged token back.
    let server = fleet.serve(&["--allow-all"], Env::ISOLATED);
    let mut raw = server.connect();
    for i in &acknowledged {
        let reply = get_token(&mut raw, &format!("read-{i}"), &format!("b{i}"));
        assert_eq!(
            data(&reply)["access_token"],
            json!(format!("at-{i}")),
            "{reply}"
        );
    }
}

/// (d) With every member stopped, requests are answered `INTERNAL_ERROR` within 20 s
/// (none hangs) and the server stays up; once the members are back it answers correctly
/// again by itself.
#[test]
fn a_cluster_down_gives_internal_error_then_recovers_by_itself() {
    let Some(mut fleet) = Fleet::start() else {
        return;
    };
    fleet.set_token(
        "anthropic",
        "default",
        &json!({"access_token": "at-kept", "refresh_token": "rt-kept",
            "expiry": 1_900_000_000, "token_type": "Bearer"}),
    );
    let mut server = fleet.serve(&["--allow-all"], Env::ISOLATED);
    let mut raw = server.connect();
    let reply = get_token(&mut raw, "before", "default");
    assert_eq!(data(&reply)["access_token"], "at-kept", "{reply}");

    fleet.cluster.stop_all();
    // A token read before may still be served from memory until the server notices the
    // cluster is gone; every answer is either that token or INTERNAL_ERROR, each within
    // 20 s, and INTERNAL_ERROR comes within 30 s of the stop.
    let bound = Duration::from_secs(20);
    raw.stream.set_read_timeout(Some(bound)).expect("timeout");
    let stopped_at = Instant::now();
    let mut n = 0;
    loop {
        n += 1;
        let asked = Instant::now();
        let reply = get_token(&mut raw, &format!("down-{n}"), "default");
        assert!(
            asked.elapsed() < bound,
            "a reply took {:?}",
            asked.elapsed()
        );
        if reply["ok"] == json!(true) {
            assert_eq!(data(&reply)["access_token"], "at-kept", "{reply}");
        } else {
            assert_eq!(reply["code"], "INTERNAL_ERROR", "{reply}");
            let message = reply["error"].as_str().unwrap_or_default();
            assert!(!message.contains("rt-kept"), "{reply}");
            break;
        }
        assert!(
            stopped_at.elapsed() < Duration::from_secs(30),
            "still served from memory 30 s after the cluster stopped"
        );
        thread::sleep(Duration::from_millis(200));
    }
    eprintln!("INTERNAL_ERROR {:?} after the stop", stopped_at.elapsed());
    // Another bucket (never cached) fails as well, within the bound.
    let asked = Instant::now();
    let reply = get_token(&mut raw, "down-other", "other");
    assert!(asked.elapsed() < bound);
    assert_eq!(reply["code"], "INTERNAL_ERROR", "{reply}");
    assert!(
        server.child.running(),
        "the server exited with the cluster down"
    );

    fleet.cluster.start_all();
    let t0 = Instant::now();
    loop {
        n += 1;
        let reply = get_token(&mut raw, &format!("back-{n}"), "default");
        if reply["ok"] == json!(true) {
            assert_eq!(data(&reply)["access_token"], "at-kept", "{reply}");
            break;
        }
        assert_eq!(reply["code"], "INTERNAL_ERROR", "{reply}");
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the server did not recover within 30 s of the cluster's return"
        );
        thread::sleep(Duration::from_millis(200));
    }
    eprintln!("answering again {:?} after the restart", t0.elapsed());
    // A fresh connection works too, and the server still runs.
    let mut fresh = server.connect();
    let reply = get_token(&mut fresh, "fresh", "default");
    assert_eq!(data(&reply)["access_token"], "at-kept", "{reply}");
    drop(raw);
    drop(fresh);
    let stopped = server.stop(Signal::SIGTERM);
    assert!(stopped.status.success(), "{stopped:?}");
}

/// (e) What etcd holds and what the server logs (at trace level) carry none of the
/// secrets: neither the stored nor the refreshed refresh token, access token, nor the API
/// key, in any raw value or key under the prefix.
#[test]
fn no_secret_in_etcd_or_in_the_log() {
    const CANARIES: [&str; 5] = [
        "rt-CANARY-STORED",
        "at-CANARY-STORED",
        "rt-CANARY-ROTATED",
        "at-CANARY-REFRESHED",
        "sk-CANARY-APIKEY",
    ];
    let Some(fleet) = Fleet::start() else {
        return;
    };
    let endpoint = TokenEndpoint::start("unused");
    endpoint.push([Reply::token(
        "at-CANARY-REFRESHED",
        3600,
        Some("rt-CANARY-ROTATED"),
    )]);
    fleet.set_expired("at-CANARY-STORED", "rt-CANARY-STORED");
    let run = fleet.store(&["key", "set", "anthropic"], b"sk-CANARY-APIKEY\n");
    assert!(run.status.success(), "store key set: {run:?}");
    let profile = fleet.profile(&endpoint.url());
    let env = Env::ISOLATED.with(&[("RUST_LOG", "trace")]);
    let server = fleet.serve(&["--profile", &profile], env);
    let mut raw = server.connect();
    let reply = get_token(&mut raw, "1", "default");
    assert_eq!(
        data(&reply)["access_token"],
        "at-CANARY-REFRESHED",
        "{reply}"
    );
    let reply = raw.call("2", "get_api_key", json!({"name": "anthropic"}));
    assert_eq!(data(&reply)["key"], "sk-CANARY-APIKEY", "{reply}");
    assert_eq!(endpoint.count(), 1);
    assert_eq!(
        endpoint.received()[0].param("refresh_token"),
        Some("rt-CANARY-STORED")
    );
    drop(raw);
    let stopped = server.stop(Signal::SIGTERM);
    assert!(stopped.status.success(), "{stopped:?}");

    let values = fleet.raw();
    assert!(
        values.iter().any(|(k, _)| k.contains("anthropic")),
        "nothing stored for anthropic under /{PREFIX}/: {:?}",
        values.iter().map(|(k, _)| k).collect::<Vec<_>>()
    );
    for (key, value) in &values {
        for canary in CANARIES {
            assert!(!key.contains(canary), "etcd key {key} holds {canary}");
            assert!(
                !value.windows(canary.len()).any(|w| w == canary.as_bytes()),
                "etcd value of {key} holds {canary} in the clear"
            );
        }
        // Nothing stored in the clear as JSON either (the refresh bookkeeping aside).
        if key.contains("tokens/") || key.contains("keys/") {
            assert!(
                serde_json::from_slice::<Value>(value).is_err(),
                "{key} holds readable JSON"
            );
        }
    }
    for canary in CANARIES {
        assert!(
            !stopped.stderr.contains(canary),
            "the server logged {canary}"
        );
    }
    assert!(
        stopped.stderr.contains("TRACE"),
        "the log is at trace level"
    );
}
