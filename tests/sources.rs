//! Command-backed sources over the wire: every output form, failures, one run for many
//! requests, the last good value while the command fails, renewal ahead of expiry, and
//! shutdown killing a running command.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::refresh::{now, RefreshServer};
use common::{allow_all, assert_err, data, offline, short_limits, Raw};
use credproxy::backend::MemoryBackend;
use credproxy::source::{SourceSettings, SourceSpec, SourceTarget};
use credproxy::Config;
use serde_json::json;

fn sh(script: &str) -> Vec<String> {
    vec!["sh".into(), "-c".into(), script.into()]
}

fn token_source(provider: &str, command: Vec<String>, ttl: Option<u64>) -> SourceSpec {
    SourceSpec {
        target: SourceTarget::Token {
            provider: provider.into(),
            bucket: "default".into(),
        },
        command,
        ttl: ttl.map(Duration::from_secs),
    }
}

fn key_source(name: &str, command: Vec<String>) -> SourceSpec {
    SourceSpec {
        target: SourceTarget::Key { name: name.into() },
        command,
        ttl: None,
    }
}

/// A server with `sources` and no host-side refresh endpoints, and its memory store.
struct Server {
    server: RefreshServer,
    memory: Arc<MemoryBackend>,
}

impl std::ops::Deref for Server {
    type Target = RefreshServer;
    fn deref(&self) -> &RefreshServer {
        &self.server
    }
}

impl std::ops::DerefMut for Server {
    fn deref_mut(&mut self) -> &mut RefreshServer {
        &mut self.server
    }
}

impl Server {
    fn start(sources: Vec<SourceSpec>) -> Server {
        Server::start_with(sources, allow_all())
    }

    fn start_with(sources: Vec<SourceSpec>, profile: credproxy::policy::Profile) -> Server {
        let memory = Arc::new(MemoryBackend::new());
        let mut config = Config::new(memory.clone());
        offline(&mut config);
        config.profile = profile;
        config.limits = short_limits();
        config.limits.rate_limit = 0;
        config.sources = sources;
        config.source_settings = SourceSettings {
            timeout: Duration::from_millis(800),
            retry_min: Duration::from_millis(100),
            retry_max: Duration::from_millis(400),
            cooldown: Duration::from_secs(1),
            ..SourceSettings::default()
        };
        Server {
            server: RefreshServer::with(config),
            memory,
        }
    }
}

fn lines(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

#[test]
fn every_output_form_is_served() {
    let exec = json!({"apiVersion": "client.authentication.k8s.io/v1", "kind": "ExecCredential",
        "status": {"token": "k8s-token", "expirationTimestamp": "2100-01-01T00:00:00Z"}});
    let mut server = Server::start(vec![
        token_source("plain", sh("printf 'plain-token\\nignored\\n'"), Some(2700)),
        token_source(
            "object",
            sh(
                r#"printf '{"access_token":"obj-token","expires_in":600,"refresh_token":"rt-x","scope":"s"}'"#,
            ),
            None,
        ),
        token_source(
            "wrapped",
            sh(r#"printf '{"token":"wrapped-token","expiry":4102444800}'"#),
            None,
        ),
        token_source("k8s", sh(&format!("printf '%s' '{exec}'")), None),
        key_source("openai", sh("echo sk-from-command")),
    ]);
    let mut raw = server.connect();
    let t0 = now();
    let reply = raw.call("1", "get_token", json!({"provider": "plain"}));
    assert_eq!(data(&reply)["access_token"], "plain-token", "{reply}");
    assert_eq!(data(&reply)["token_type"], "Bearer");
    let expiry = data(&reply)["expiry"].as_u64().unwrap();
    assert!(
        (t0 + 2690..=t0 + 2710).contains(&expiry),
        "ttl applies: {expiry}"
    );
    let reply = raw.call("2", "get_token", json!({"provider": "object"}));
    assert_eq!(data(&reply)["access_token"], "obj-token", "{reply}");
    assert_eq!(data(&reply)["scope"], "s");
    assert!(data(&reply).get("refresh_token").is_none());
    let expiry = data(&reply)["expiry"].as_u64().unwrap();
    assert!(
        (t0 + 590..=t0 + 610).contains(&expiry),
        "expires_in wins: {expiry}"
    );
    let reply = raw.call(
        "3",
        "get_token",
        json!({"provider": "wrapped", "bucket": "default"}),
    );
    assert_eq!(data(&reply)["access_token"], "wrapped-token");
    assert_eq!(data(&reply)["expiry"], 4_102_444_800u64);
    let reply = raw.call("4", "get_token", json!({"provider": "k8s"}));
    assert_eq!(data(&reply)["access_token"], "k8s-token", "{reply}");
    assert_eq!(data(&reply)["expiry"], 4_102_444_800u64);
    let reply = raw.call("5", "get_api_key", json!({"name": "openai"}));
    assert_eq!(data(&reply)["key"], "sk-from-command", "{reply}");
    let reply = raw.call("6", "has_api_key", json!({"name": "openai"}));
    assert_eq!(data(&reply)["exists"], true);
    // Lists include the sources; writes to a source are refused.
    let reply = raw.call("7", "list_providers", json!({}));
    assert_eq!(
        data(&reply)["providers"],
        json!(["k8s", "object", "plain", "wrapped"])
    );
    let reply = raw.call("8", "list_buckets", json!({"provider": "plain"}));
    assert_eq!(data(&reply)["buckets"], json!(["default"]));
    let reply = raw.call("9", "list_api_keys", json!({}));
    assert_eq!(data(&reply)["keys"], json!(["openai"]));
    let token = json!({"access_token": "x", "expiry": 1, "token_type": "Bearer"});
    let reply = raw.call(
        "10",
        "save_token",
        json!({"provider": "plain", "token": token}),
    );
    assert_err(&reply, "10", "FORBIDDEN");
    let reply = raw.call("11", "remove_token", json!({"provider": "plain"}));
    assert_err(&reply, "11", "FORBIDDEN");
    let reply = raw.call("12", "get_bucket_stats", json!({"provider": "plain"}));
    assert_eq!(data(&reply)["requestCount"], 1, "{reply}");
    // Nothing reached the store.
    use credproxy::backend::Backend;
    assert!(server.memory.list_providers().unwrap().is_empty());
    assert!(server.memory.list_keys().unwrap().is_empty());
    let report = server.shutdown();
    assert!(report.sources_cleared);
}

#[test]
fn failing_commands_give_refresh_failed_in_bounded_time() {
    let mut server = Server::start(vec![
        token_source("fails", sh("echo 'no credentials' >&2; exit 2"), None),
        token_source("hangs", sh("sleep 30"), None),
        token_source("huge", sh("head -c 10485760 /dev/zero | tr '\\0' a"), None),
        token_source("empty", sh("true"), None),
        token_source(
            "missing",
            vec!["/nonexistent/credential-helper".into()],
            None,
        ),
        token_source("badjson", sh(r#"printf '{"nothing": 1}'"#), None),
    ]);
    let mut raw = server.connect();
    for provider in ["fails", "hangs", "huge", "empty", "missing", "badjson"] {
        let started = Instant::now();
        let reply = raw.call(provider, "get_token", json!({"provider": provider}));
        let message = assert_err(&reply, provider, "REFRESH_FAILED");
        assert!(message.contains(provider), "{message}");
        assert!(
            !message.contains("no credentials"),
            "no command text on the wire"
        );
        assert!(started.elapsed() < Duration::from_secs(3), "{provider}");
    }
    server.shutdown();
}

#[test]
fn concurrent_requests_share_one_run() {
    let dir = tempfile::tempdir().unwrap();
    let count = dir.path().join("runs");
    let script = format!(
        "echo run >> '{}'; sleep 0.4; printf shared-token",
        count.display()
    );
    let mut server = Server::start(vec![token_source("slow", sh(&script), Some(3600))]);
    let mut conns: Vec<Raw> = (0..20).map(|_| server.connect()).collect();
    for (i, raw) in conns.iter_mut().enumerate() {
        raw.send(&json!({"id": i.to_string(), "op": "get_token", "payload": {"provider": "slow"}}));
    }
    for raw in &mut conns {
        let reply = raw.recv();
        assert_eq!(data(&reply)["access_token"], "shared-token", "{reply}");
    }
    assert_eq!(
        lines(&count),
        1,
        "one run for the start and all 20 requests"
    );
    server.shutdown();
}

/// The first run succeeds with a 10 s value; every later run fails. The value is served
/// until it expires, then REFRESH_FAILED; the command is retried in the background.
/// (Expiries are whole epoch seconds, so the value lives 9 to 10 s.)
#[test]
fn the_last_good_value_is_served_until_it_expires() {
    let dir = tempfile::tempdir().unwrap();
    let count = dir.path().join("runs");
    let script = format!(
        "echo run >> '{c}'; if [ $(wc -l < '{c}') -gt 1 ]; then exit 1; fi; \
         printf '{{\"token\":\"good\",\"expires_in\":10}}'",
        c = count.display()
    );
    let mut server = Server::start(vec![token_source("flaky", sh(&script), None)]);
    let mut raw = server.connect();
    let started = Instant::now();
    let reply = raw.call("1", "get_token", json!({"provider": "flaky"}));
    assert_eq!(data(&reply)["access_token"], "good");
    // Renewal comes a quarter of the life ahead (7 to 7.5 s), fails, and is retried.
    std::thread::sleep(Duration::from_millis(8300).saturating_sub(started.elapsed()));
    let reply = raw.call("2", "get_token", json!({"provider": "flaky"}));
    assert_eq!(data(&reply)["access_token"], "good", "still valid: {reply}");
    assert!(lines(&count) >= 2, "renewed ahead and retried");
    std::thread::sleep(Duration::from_millis(10_500).saturating_sub(started.elapsed()));
    let asked = Instant::now();
    let reply = raw.call("3", "get_token", json!({"provider": "flaky"}));
    assert_err(&reply, "3", "REFRESH_FAILED");
    assert!(
        asked.elapsed() < Duration::from_millis(200),
        "no waiting on a retry"
    );
    server.shutdown();
}

#[test]
fn a_source_is_renewed_ahead_of_expiry_without_requests() {
    let dir = tempfile::tempdir().unwrap();
    let count = dir.path().join("runs");
    let script = format!(
        "echo run >> '{}'; printf '{{\"token\":\"t\",\"expires_in\":4}}'",
        count.display()
    );
    let mut server = Server::start(vec![token_source("renew", sh(&script), None)]);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(lines(&count), 1, "run at start");
    // Lead: a quarter of 4 s; the second run comes about 3 s after the first.
    std::thread::sleep(Duration::from_millis(3500));
    let runs = lines(&count);
    assert!(
        (2..=3).contains(&runs),
        "renewed ahead, not in a loop: {runs}"
    );
    server.shutdown();
}

#[test]
fn shutdown_kills_a_running_command_and_wipes_values() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("pid");
    let script = format!("echo $$ > '{}'; exec sleep 30", pidfile.display());
    let mut server = Server::start(vec![token_source("long", sh(&script), None)]);
    let deadline = Instant::now() + Duration::from_secs(3);
    while !pidfile.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let started = Instant::now();
    let report = server.shutdown();
    assert!(report.sources_cleared);
    assert!(started.elapsed() < Duration::from_secs(2));
    let gone = Instant::now() + Duration::from_secs(2);
    while nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
        && Instant::now() < gone
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_err(),
        "the command was killed"
    );
}

/// Through the binary and a profile: the value is served, and never reaches the store's
/// files or a log line at trace level.
#[test]
fn a_profile_source_never_reaches_the_store_or_the_log() {
    use common::process::{Env, Fixture};
    let fx = Fixture::new();
    fx.seed_token("gcloud", "default", "at-stored-shadowed", "rt-stored");
    let profile = fx.tmp.path().join("profile.toml");
    std::fs::write(
        &profile,
        "allow_all = true\n\n[[token_command]]\nprovider = \"gcloud\"\n\
         command = [\"sh\", \"-c\", \"echo progress >&2; printf SRC-CANARY-7f3a\"]\nttl = 2700\n\n\
         [[key_command]]\nname = \"openai\"\ncommand = [\"printf\", \"KEY-CANARY-91\"]\n",
    )
    .unwrap();
    let env = Env::ISOLATED.with(&[("RUST_LOG", "trace")]);
    let server = fx.start_serve(&["--profile", profile.to_str().unwrap()], env);
    let mut raw = server.connect();
    let reply = raw.call("1", "get_token", json!({"provider": "gcloud"}));
    assert_eq!(data(&reply)["access_token"], "SRC-CANARY-7f3a", "{reply}");
    let reply = raw.call("2", "get_api_key", json!({"name": "openai"}));
    assert_eq!(data(&reply)["key"], "KEY-CANARY-91", "{reply}");
    let stopped = server.stop(nix::sys::signal::Signal::SIGTERM);
    assert!(stopped.status.success(), "{stopped:?}");
    assert!(
        stopped.stderr.contains("shadows the stored credential"),
        "{}",
        stopped.stderr
    );
    assert!(stopped.stderr.contains("source command ran"));
    for canary in ["SRC-CANARY-7f3a", "KEY-CANARY-91"] {
        assert!(!stopped.stderr.contains(canary), "{canary} logged");
        for entry in walk(&fx.store) {
            let bytes = std::fs::read(&entry).unwrap_or_default();
            assert!(
                !String::from_utf8_lossy(&bytes).contains(canary),
                "{canary} in {}",
                entry.display()
            );
        }
    }
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// A failing helper is not run on demand: neither `get_token` nor a looping
/// `refresh_token` starts it while it waits for its retry, and a value that comes out
/// already expired counts as a failure.
#[test]
fn requests_never_run_a_failing_command_in_a_loop() {
    let dir = tempfile::tempdir().unwrap();
    let fails = dir.path().join("fails");
    let expired = dir.path().join("expired");
    let mut server = Server::start(vec![
        token_source(
            "fails",
            sh(&format!("echo run >> '{}'; exit 1", fails.display())),
            None,
        ),
        token_source(
            "expired",
            sh(&format!(
                "echo run >> '{}'; printf '{{\"token\":\"t\",\"expires_in\":0}}'",
                expired.display()
            )),
            None,
        ),
    ]);
    let mut raw = server.connect();
    std::thread::sleep(Duration::from_millis(200));
    for i in 0..30 {
        for (provider, op) in [
            ("fails", "get_token"),
            ("fails", "refresh_token"),
            ("expired", "get_token"),
            ("expired", "refresh_token"),
        ] {
            let id = format!("{provider}-{op}-{i}");
            let reply = raw.call(&id, op, json!({"provider": provider}));
            assert_err(&reply, &id, "REFRESH_FAILED");
        }
    }
    // 120 requests in about a second: only the start and the background retries (100 ms
    // doubling to 400 ms) ran the commands.
    for path in [&fails, &expired] {
        let runs = lines(path);
        assert!((1..=6).contains(&runs), "{}: {runs} runs", path.display());
    }
    server.shutdown();
}

/// The profile decides who reads a source, as for stored credentials.
#[test]
fn sources_outside_the_profile_are_unauthorized_and_unlisted() {
    let mut profile = credproxy::policy::Profile::default();
    profile.allow("gcloud").unwrap();
    let mut server = Server::start_with(
        vec![
            token_source("gcloud", sh("printf in-scope"), None),
            token_source("secret", sh("printf out-of-scope"), None),
            key_source("hidden", sh("printf key")),
        ],
        profile,
    );
    let mut raw = server.connect();
    let reply = raw.call("1", "get_token", json!({"provider": "gcloud"}));
    assert_eq!(data(&reply)["access_token"], "in-scope");
    let reply = raw.call("2", "get_token", json!({"provider": "secret"}));
    assert_err(&reply, "2", "UNAUTHORIZED");
    let reply = raw.call("3", "refresh_token", json!({"provider": "secret"}));
    assert_err(&reply, "3", "UNAUTHORIZED");
    let reply = raw.call("4", "get_api_key", json!({"name": "hidden"}));
    assert_err(&reply, "4", "UNAUTHORIZED");
    let reply = raw.call("5", "list_providers", json!({}));
    assert_eq!(data(&reply)["providers"], json!(["gcloud"]));
    let reply = raw.call("6", "list_api_keys", json!({}));
    assert_eq!(data(&reply)["keys"], json!([]));
    server.shutdown();
}
