//! The `credproxy` binary, run as a child process: `serve` (the socket line, the socket
//! file, signals, start failures, the profile flags) and `store` (tokens and keys on stdin,
//! lists, removal, file modes, no secret ever printed, the terminal refusal, and safety
//! next to a running server).

mod common;

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use common::process::{
    self, sanitized, sockets_in, token_json, Canaries, Env, Fixture, Run, Server, Stdin, BIN,
};
use common::{code, data, Raw};
use nix::sys::signal::Signal;
use serde_json::{json, Value};

/// Secret values that must never appear in any output.
const CANARY_AT: &str = "CANARY-AT-7f3a";
const CANARY_RT: &str = "CANARY-RT-91bc";
const CANARY_KEY: &str = "CANARY-KEY-55d2";

const CANARIES: Canaries = Canaries {
    never: &[CANARY_AT, CANARY_RT, CANARY_KEY],
    not_logged: &[],
};

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

impl Run {
    #[track_caller]
    fn assert_ok(&self) -> &Self {
        assert!(self.status.success(), "expected success: {self:?}");
        self
    }

    /// Asserts exit `code` and exactly one line on stderr containing every `needle`;
    /// returns that line.
    #[track_caller]
    fn assert_fails(&self, code: i32, needles: &[&str]) -> &str {
        assert_eq!(self.code(), Some(code), "exit code: {self:?}");
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "expected one stderr line: {self:?}");
        for needle in needles {
            assert!(
                lines[0].contains(needle),
                "stderr lacks {needle:?}: {self:?}"
            );
        }
        lines[0]
    }
}

/// Fails when any canary appears in `text`.
#[track_caller]
fn assert_no_canary(what: &str, text: &str) {
    CANARIES.absent(what, text);
}

/// Runs `program args` with `stdin` fed in, `RUST_LOG` unset unless `envs` sets it, and a
/// deadline. Every run is checked for leaked canaries.
fn run_program(program: &str, args: &[&str], stdin: &[u8], envs: &[(&str, &str)]) -> Run {
    let run = process::run(program, args, Stdin::Pipe(stdin), Env::PLAIN.with(envs));
    assert_no_canary(&format!("{args:?} stdout"), &run.stdout);
    assert_no_canary(&format!("{args:?} stderr"), &run.stderr);
    run
}

/// Runs the binary.
fn credproxy(args: &[&str], stdin: &[u8]) -> Run {
    run_program(BIN, args, stdin, &[])
}

/// The `store` and `serve` commands run on the fixture's directories.
impl Fixture {
    /// `credproxy store ARGS --store DIR` with optional extra env (RUST_LOG).
    fn store_env(&self, args: &[&str], stdin: &[u8], envs: &[(&str, &str)]) -> Run {
        let mut all = vec!["store"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--store", self.store_str()]);
        run_program(BIN, &all, stdin, envs)
    }

    fn store(&self, args: &[&str], stdin: &[u8]) -> Run {
        self.store_env(args, stdin, &[])
    }

    /// Stores a full token (with a refresh token) for provider:bucket.
    fn set_token(&self, provider: &str, bucket: &str, access: &str, refresh: &str) {
        self.store(
            &["token", "set", provider, "--bucket", bucket],
            token_json(access, refresh).as_bytes(),
        )
        .assert_ok();
    }

    fn set_key(&self, name: &str, key: &[u8]) {
        self.store(&["key", "set", name], key).assert_ok();
    }

    /// `credproxy serve --store DIR --socket-dir SOCK EXTRA...`
    fn serve(&self, extra: &[&str]) -> Server {
        self.serve_env(extra, &[])
    }

    fn serve_env(&self, extra: &[&str], envs: &[(&str, &str)]) -> Server {
        self.start_serve(extra, Env::PLAIN.with(envs))
    }
}

fn mode(path: &Path) -> u32 {
    fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .mode()
        & 0o7777
}

/// `get_token` for provider's default bucket.
fn get_token(raw: &mut Raw, id: &str, provider: &str) -> Value {
    raw.call(id, "get_token", json!({"provider": provider}))
}

// ---------------------------------------------------------------------------------------
// serve
// ---------------------------------------------------------------------------------------

#[test]
fn serve_prints_one_socket_line_for_a_0600_socket_that_serves_sanitized_tokens() {
    let f = Fixture::new();
    f.set_token("anthropic", "default", CANARY_AT, CANARY_RT);
    let server = f.serve(&["--allow", "anthropic"]);

    let path = server.socket.clone();
    assert!(path.is_absolute(), "{}", path.display());
    assert_eq!(path.parent(), Some(f.sock.as_path()));
    let meta = fs::symlink_metadata(&path).expect("socket exists");
    assert!(meta.file_type().is_socket(), "not a socket: {meta:?}");
    assert_eq!(meta.mode() & 0o777, 0o600);

    let mut raw = server.connect();
    let reply = get_token(&mut raw, "t1", "anthropic");
    assert_eq!(
        reply,
        json!({"v": 1, "id": "t1", "ok": true, "data": sanitized(CANARY_AT)})
    );
    assert!(data(&reply).get("refresh_token").is_none(), "{reply}");
    drop(raw);

    let stopped = server.stop(Signal::SIGTERM);
    assert!(stopped.status.success(), "{stopped:?}");
    assert_eq!(stopped.stdout_rest, "", "only one stdout line");
    assert_no_canary("serve stderr", &stopped.stderr);
}

fn assert_signal_stops_cleanly(signal: Signal) {
    let f = Fixture::new();
    let server = f.serve(&["--allow", "anthropic"]);
    let path = server.socket.clone();
    // A connected, handshaken client does not hold the shutdown up.
    let _raw = server.connect();
    let stopped = server.stop(signal);
    assert_eq!(stopped.status.code(), Some(0), "{stopped:?}");
    assert!(
        fs::symlink_metadata(&path).is_err(),
        "socket {} still exists after {signal}",
        path.display()
    );
    assert_eq!(f.sockets(), Vec::<PathBuf>::new());
    assert!(f.sock.is_dir(), "the socket directory stays");
    assert_eq!(stopped.stdout_rest, "");
}

#[test]
fn sigterm_exits_0_and_removes_the_socket() {
    assert_signal_stops_cleanly(Signal::SIGTERM);
}

#[test]
fn sigint_exits_0_and_removes_the_socket() {
    assert_signal_stops_cleanly(Signal::SIGINT);
}

/// A closed terminal or a `kill -HUP` must not leave the socket behind (issue 13 item 8).
#[test]
fn sighup_exits_0_and_removes_the_socket() {
    assert_signal_stops_cleanly(Signal::SIGHUP);
}

/// SIGQUIT's default would dump core (with whatever secrets the server holds) and leave
/// the socket: serve shuts down cleanly instead.
#[test]
fn sigquit_exits_0_and_removes_the_socket() {
    assert_signal_stops_cleanly(Signal::SIGQUIT);
}

/// Signals whose default would kill serve without cleanup, and that ask nothing of it,
/// are ignored: it goes on serving, then stops cleanly on SIGTERM.
#[test]
fn serve_ignores_user_and_timer_signals() {
    let f = Fixture::new();
    let mut server = f.serve(&["--allow", "anthropic"]);
    for signal in [
        Signal::SIGUSR1,
        Signal::SIGUSR2,
        Signal::SIGALRM,
        Signal::SIGVTALRM,
        Signal::SIGPROF,
    ] {
        server.signal(signal);
        // A round trip needs serve to run, and a pending signal is delivered first.
        let _raw = server.connect();
        assert!(server.child.running(), "serve died of {signal}");
    }
    let path = server.socket.clone();
    let stopped = server.stop(Signal::SIGTERM);
    assert_eq!(stopped.status.code(), Some(0), "{stopped:?}");
    assert!(fs::symlink_metadata(&path).is_err(), "socket left behind");
}

/// A start that must fail: no socket line, exit `code` (any non-zero one when `None`),
/// and one stderr line containing every needle.
#[track_caller]
fn assert_start_fails(run: &Run, code: Option<i32>, needles: &[&str]) {
    assert_eq!(run.stdout, "", "no socket line on a failed start: {run:?}");
    let got = run
        .code()
        .unwrap_or_else(|| panic!("killed by a signal: {run:?}"));
    match code {
        Some(code) => assert_eq!(got, code, "exit code: {run:?}"),
        None => assert_ne!(got, 0, "a failed start must exit non-zero: {run:?}"),
    }
    run.assert_fails(got, needles);
}

#[test]
fn serve_refuses_a_socket_dir_that_does_not_exist() {
    let f = Fixture::new();
    let missing = f.tmp.path().join("missing");
    let run = credproxy(
        &[
            "serve",
            "--store",
            f.store_str(),
            "--socket-dir",
            missing.to_str().expect("utf-8"),
            "--allow",
            "anthropic",
        ],
        b"",
    );
    assert_start_fails(&run, None, &["credproxy: ", "missing"]);
    assert!(!missing.exists(), "the directory is not created");
}

#[test]
fn serve_refuses_a_group_and_other_writable_socket_dir() {
    let f = Fixture::new();
    fs::set_permissions(&f.sock, fs::Permissions::from_mode(0o777)).expect("chmod 0777");
    let run = credproxy(
        &[
            "serve",
            "--store",
            f.store_str(),
            "--socket-dir",
            f.sock_str(),
            "--allow",
            "anthropic",
        ],
        b"",
    );
    assert_start_fails(&run, None, &["credproxy: ", "writable by group or others"]);
    assert_eq!(f.sockets(), Vec::<PathBuf>::new());
    assert_eq!(
        mode(&f.sock),
        0o777,
        "a caller's directory is used as it is"
    );
}

#[test]
fn serve_refuses_a_socket_path_over_107_bytes_and_names_the_limit() {
    let f = Fixture::new();
    // The socket file name is at least 31 bytes; with this directory the path is far over.
    let long = f.tmp.path().join("d".repeat(100));
    fs::create_dir(&long).expect("mkdir long");
    fs::set_permissions(&long, fs::Permissions::from_mode(0o700)).expect("chmod");
    assert!(long.as_os_str().len() + 31 > 107);
    let run = credproxy(
        &[
            "serve",
            "--store",
            f.store_str(),
            "--socket-dir",
            long.to_str().expect("utf-8"),
            "--allow",
            "anthropic",
        ],
        b"",
    );
    assert_start_fails(
        &run,
        None,
        &["credproxy: ", "107", "shorter socket directory"],
    );
    assert_eq!(sockets_in(&long), Vec::<PathBuf>::new());
}

#[test]
fn serve_rejects_an_invalid_allow_name_with_exit_2() {
    let f = Fixture::new();
    let run = credproxy(
        &[
            "serve",
            "--store",
            f.store_str(),
            "--socket-dir",
            f.sock_str(),
            "--allow",
            "bad/name",
        ],
        b"",
    );
    assert_start_fails(
        &run,
        Some(2),
        &["credproxy: ", "bad/name", "invalid provider"],
    );
    assert_eq!(f.sockets(), Vec::<PathBuf>::new());
}

#[test]
fn serve_rejects_an_unknown_option_with_exit_2() {
    let f = Fixture::new();
    let run = credproxy(
        &[
            "serve",
            "--store",
            f.store_str(),
            "--socket-dir",
            f.sock_str(),
            "--bogus-option",
        ],
        b"",
    );
    assert_eq!(run.code(), Some(2), "{run:?}");
    assert_eq!(run.stdout, "", "no socket line: {run:?}");
    // One line naming the option and where to look.
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{run:?}");
    assert!(lines[0].starts_with("credproxy: "), "{run:?}");
    assert!(
        lines[0].contains("--bogus-option") && lines[0].contains("--help"),
        "{run:?}"
    );
    assert_eq!(f.sockets(), Vec::<PathBuf>::new());
}

#[test]
fn serve_without_allow_warns_and_answers_unauthorized() {
    let f = Fixture::new();
    f.set_token("anthropic", "default", CANARY_AT, CANARY_RT);
    f.set_key("anthropic", b"CANARY-KEY-55d2\n");
    let server = f.serve(&[]);
    let mut raw = server.connect();
    assert_eq!(
        code(&get_token(&mut raw, "t1", "anthropic")),
        "UNAUTHORIZED"
    );
    assert_eq!(
        code(&raw.call("k1", "get_api_key", json!({"name": "anthropic"}))),
        "UNAUTHORIZED"
    );
    assert_eq!(
        data(&raw.call("l1", "list_providers", json!({}))),
        &json!({"providers": []})
    );
    drop(raw);
    let stopped = server.stop(Signal::SIGTERM);
    assert!(stopped.status.success(), "{stopped:?}");
    assert!(
        stopped.stderr.contains("allows nothing"),
        "no warning that nothing is allowed: {stopped:?}"
    );
}

#[test]
fn serve_read_only_answers_save_and_remove_token_with_forbidden() {
    let f = Fixture::new();
    f.set_token("anthropic", "default", CANARY_AT, CANARY_RT);
    let server = f.serve(&["--allow", "anthropic", "--read-only"]);
    let mut raw = server.connect();
    let new = json!({"access_token": "at-new", "expiry": 1_950_000_000, "token_type": "Bearer"});
    let reply = raw.call(
        "s1",
        "save_token",
        json!({"provider": "anthropic", "token": new}),
    );
    assert_eq!(code(&reply), "FORBIDDEN");
    let reply = raw.call("r1", "remove_token", json!({"provider": "anthropic"}));
    assert_eq!(code(&reply), "FORBIDDEN");
    // Reads still work, and the store is unchanged.
    assert_eq!(
        data(&get_token(&mut raw, "t1", "anthropic")),
        &sanitized(CANARY_AT)
    );
    drop(raw);
    assert!(server.stop(Signal::SIGTERM).status.success());
}

#[test]
fn serve_with_rate_limit_0_answers_200_fast_requests_on_one_connection() {
    let f = Fixture::new();
    f.set_token("anthropic", "default", CANARY_AT, CANARY_RT);
    let server = f.serve(&["--allow", "anthropic", "--rate-limit", "0"]);
    let mut raw = server.connect();
    let mut answered = 0;
    for batch in 0..(200 / 16 + 1) {
        let ids: Vec<String> = (batch * 16..(batch * 16 + 16).min(200))
            .map(|i| format!("r{i}"))
            .collect();
        for id in &ids {
            raw.send(
                &json!({"v": 1, "id": id, "op": "get_token", "payload": {"provider": "anthropic"}}),
            );
        }
        let mut seen: Vec<String> = Vec::new();
        for _ in &ids {
            let reply = raw.recv();
            assert_eq!(data(&reply), &sanitized(CANARY_AT), "{reply}");
            seen.push(reply["id"].as_str().expect("id").to_owned());
        }
        seen.sort();
        let mut want = ids.clone();
        want.sort();
        assert_eq!(seen, want);
        answered += ids.len();
    }
    assert_eq!(answered, 200);
    drop(raw);
    assert!(server.stop(Signal::SIGTERM).status.success());
}

#[test]
fn serve_logs_no_secret_even_at_trace() {
    let f = Fixture::new();
    f.set_token("anthropic", "default", CANARY_AT, CANARY_RT);
    f.set_key("anthropic", format!("{CANARY_KEY}\n").as_bytes());
    let server = f.serve_env(&["--allow", "anthropic"], &[("RUST_LOG", "trace")]);
    let mut raw = server.connect();
    assert_eq!(
        data(&get_token(&mut raw, "t1", "anthropic")),
        &sanitized(CANARY_AT)
    );
    assert_eq!(
        data(&raw.call("k1", "get_api_key", json!({"name": "anthropic"}))),
        &json!({"key": CANARY_KEY})
    );
    let incoming = json!({"access_token": CANARY_AT, "refresh_token": CANARY_RT,
        "expiry": 1_900_000_001, "token_type": "Bearer"});
    let reply = raw.call(
        "s1",
        "save_token",
        json!({"provider": "anthropic", "token": incoming}),
    );
    assert_eq!(data(&reply), &json!({}));
    drop(raw);
    let stopped = server.stop(Signal::SIGTERM);
    assert!(stopped.status.success(), "{stopped:?}");
    assert!(
        !stopped.stderr.is_empty(),
        "trace logging produced nothing on stderr"
    );
    assert_no_canary("serve stdout", &stopped.stdout_rest);
    assert_no_canary("serve stderr at trace", &stopped.stderr);
}

// ---------------------------------------------------------------------------------------
// store
// ---------------------------------------------------------------------------------------

#[test]
fn store_token_set_list_remove() {
    let f = Fixture::new();
    assert_eq!(f.store(&["token", "list"], b"").assert_ok().stdout, "");
    f.set_token("gemini", "default", CANARY_AT, CANARY_RT);
    f.set_token("anthropic", "work", CANARY_AT, CANARY_RT);
    // Default bucket without --bucket.
    f.store(
        &["token", "set", "anthropic"],
        token_json(CANARY_AT, CANARY_RT).as_bytes(),
    )
    .assert_ok();
    assert!(f.store.join("tokens/anthropic/default.json").is_file());

    let list = f.store(&["token", "list"], b"");
    list.assert_ok();
    assert_eq!(
        list.stdout,
        "anthropic:default\nanthropic:work\ngemini:default\n"
    );

    f.store(&["token", "remove", "anthropic", "--bucket", "work"], b"")
        .assert_ok();
    assert!(!f.store.join("tokens/anthropic/work.json").exists());
    assert_eq!(
        f.store(&["token", "list"], b"").assert_ok().stdout,
        "anthropic:default\ngemini:default\n"
    );

    let again = f.store(&["token", "remove", "anthropic", "--bucket", "work"], b"");
    again.assert_fails(1, &["anthropic:work"]);
    let never = f.store(&["token", "remove", "openai"], b"");
    never.assert_fails(1, &["openai:default"]);

    f.store(&["token", "remove", "gemini"], b"").assert_ok();
    assert_eq!(
        f.store(&["token", "list"], b"").assert_ok().stdout,
        "anthropic:default\n"
    );
}

#[test]
fn store_token_set_rejects_invalid_token_json_with_exit_2_without_echoing_it() {
    let f = Fixture::new();
    let missing_at =
        json!({"refresh_token": CANARY_RT, "expiry": 1, "token_type": "Bearer"}).to_string();
    let run = f.store(&["token", "set", "anthropic"], missing_at.as_bytes());
    run.assert_fails(2, &["invalid token", "access_token"]);

    let not_json = format!("{CANARY_AT} {CANARY_RT} is not json");
    let run = f.store(&["token", "set", "anthropic"], not_json.as_bytes());
    run.assert_fails(2, &["invalid token", "JSON"]);

    let empty_at = json!({"access_token": "", "refresh_token": CANARY_RT, "expiry": 1,
        "token_type": "Bearer"})
    .to_string();
    let run = f.store(&["token", "set", "anthropic"], empty_at.as_bytes());
    run.assert_fails(2, &["invalid token", "access_token"]);

    let run = f.store(&["token", "set", "anthropic"], b"");
    run.assert_fails(2, &["invalid token"]);

    assert_eq!(f.store(&["token", "list"], b"").assert_ok().stdout, "");
    assert!(!f.store.join("tokens/anthropic").exists());
}

#[test]
fn store_commands_reject_invalid_names_with_exit_2() {
    let f = Fixture::new();
    let tok = token_json(CANARY_AT, CANARY_RT);
    let key = format!("{CANARY_KEY}\n");
    for bad in ["../x", "a/b"] {
        let cases: Vec<(Vec<&str>, &[u8])> = vec![
            (vec!["token", "set", bad], tok.as_bytes()),
            (
                vec!["token", "set", "anthropic", "--bucket", bad],
                tok.as_bytes(),
            ),
            (vec!["token", "remove", bad], b""),
            (vec!["token", "remove", "anthropic", "--bucket", bad], b""),
            (vec!["key", "set", bad], key.as_bytes()),
            (vec!["key", "remove", bad], b""),
        ];
        for (args, stdin) in cases {
            let run = f.store(&args, stdin);
            assert_eq!(run.code(), Some(2), "{args:?}: {run:?}");
            run.assert_fails(2, &["invalid"]);
        }
    }
    // Nothing was written anywhere, inside the store or next to it.
    assert!(!f.tmp.path().join("x").exists());
    assert!(!f.tmp.path().join("x.json").exists());
    assert_eq!(f.store(&["token", "list"], b"").assert_ok().stdout, "");
    assert_eq!(f.store(&["key", "list"], b"").assert_ok().stdout, "");
}

#[test]
fn store_key_set_drops_exactly_one_trailing_newline() {
    let f = Fixture::new();
    f.set_key("one", b"sk-abc\n");
    f.set_key("two", b"sk-abc\n\n");
    f.set_key("bare", b"sk-abc");
    let server = f.serve(&[
        "--allow-key",
        "one",
        "--allow-key",
        "two",
        "--allow-key",
        "bare",
    ]);
    let mut raw = server.connect();
    for (id, name, want) in [
        ("k1", "one", "sk-abc"),
        ("k2", "two", "sk-abc\n"),
        ("k3", "bare", "sk-abc"),
    ] {
        let reply = raw.call(id, "get_api_key", json!({"name": name}));
        assert_eq!(data(&reply), &json!({"key": want}), "{name}");
    }
    drop(raw);
    assert!(server.stop(Signal::SIGTERM).status.success());
}

#[test]
fn store_key_set_list_remove() {
    let f = Fixture::new();
    assert_eq!(f.store(&["key", "list"], b"").assert_ok().stdout, "");
    f.set_key("beta", format!("{CANARY_KEY}\n").as_bytes());
    f.set_key("alpha", CANARY_KEY.as_bytes());
    assert_eq!(
        f.store(&["key", "list"], b"").assert_ok().stdout,
        "alpha\nbeta\n"
    );
    f.store(&["key", "remove", "alpha"], b"").assert_ok();
    assert!(!f.store.join("keys/alpha.json").exists());
    assert_eq!(f.store(&["key", "list"], b"").assert_ok().stdout, "beta\n");
    f.store(&["key", "remove", "alpha"], b"")
        .assert_fails(1, &["alpha"]);
    // Keys and tokens are separate namespaces.
    assert_eq!(f.store(&["token", "list"], b"").assert_ok().stdout, "");
}

#[test]
fn store_set_creates_a_0700_store_with_0600_files() {
    let f = Fixture::new();
    f.set_token("anthropic", "work", CANARY_AT, CANARY_RT);
    f.set_key("openai", CANARY_KEY.as_bytes());

    assert_eq!(mode(&f.store), 0o700, "store dir");
    assert_eq!(mode(&f.store.join("tokens")), 0o700);
    assert_eq!(mode(&f.store.join("tokens/anthropic")), 0o700);
    let token_file = f.store.join("tokens/anthropic/work.json");
    assert_eq!(mode(&token_file), 0o600, "token file");
    assert_eq!(mode(&f.store.join("keys")), 0o700);
    let key_file = f.store.join("keys/openai.json");
    assert_eq!(mode(&key_file), 0o600, "key file");

    // The host store keeps the full token, refresh token included.
    let stored: Value =
        serde_json::from_slice(&fs::read(&token_file).expect("read token")).expect("json");
    assert_eq!(
        stored,
        serde_json::from_str::<Value>(&token_json(CANARY_AT, CANARY_RT)).expect("json")
    );
    let stored: Value =
        serde_json::from_slice(&fs::read(&key_file).expect("read key")).expect("json");
    assert_eq!(stored, json!({"key": CANARY_KEY}));
}

#[test]
fn no_store_command_prints_a_secret_even_at_trace() {
    let f = Fixture::new();
    let trace = [("RUST_LOG", "trace")];
    let tok = token_json(CANARY_AT, CANARY_RT);
    let key_nl = format!("{CANARY_KEY}\n");
    let mut not_utf8 = CANARY_KEY.as_bytes().to_vec();
    not_utf8.extend_from_slice(&[0xff, 0xfe, b'\n']);
    let mut too_big = token_json(CANARY_AT, CANARY_RT).into_bytes();
    too_big.extend(std::iter::repeat_n(b' ', 6 << 20));
    let bad_type = json!({"access_token": 5, "refresh_token": CANARY_RT, "expiry": 1,
        "token_type": "Bearer"})
    .to_string();
    let no_at =
        json!({"refresh_token": CANARY_RT, "expiry": 1, "token_type": "Bearer"}).to_string();
    let not_json =
        format!("{{\"access_token\": \"{CANARY_AT}\", \"refresh_token\": \"{CANARY_RT}\"");

    // (args, stdin, expected exit code); `run_program` checks every output for canaries.
    let cases: Vec<(Vec<&str>, Vec<u8>, i32)> = vec![
        (
            vec!["token", "set", "anthropic"],
            tok.clone().into_bytes(),
            0,
        ),
        (
            vec!["token", "set", "anthropic", "--bucket", "work"],
            tok.clone().into_bytes(),
            0,
        ),
        (vec!["token", "set", "anthropic"], no_at.into_bytes(), 2),
        (vec!["token", "set", "anthropic"], bad_type.into_bytes(), 2),
        (vec!["token", "set", "anthropic"], not_json.into_bytes(), 2),
        (vec!["token", "set", "anthropic"], too_big.clone(), 1),
        (vec!["token", "set", "a/b"], tok.clone().into_bytes(), 2),
        (vec!["token", "list"], vec![], 0),
        (
            vec!["token", "remove", "anthropic", "--bucket", "work"],
            vec![],
            0,
        ),
        (
            vec!["token", "remove", "anthropic", "--bucket", "work"],
            vec![],
            1,
        ),
        (
            vec!["key", "set", "anthropic"],
            key_nl.clone().into_bytes(),
            0,
        ),
        (vec!["key", "set", "other"], not_utf8, 2),
        (vec!["key", "set", "other"], too_big, 1),
        (vec!["key", "set", "a/b"], key_nl.into_bytes(), 2),
        (vec!["key", "list"], vec![], 0),
        (vec!["key", "remove", "anthropic"], vec![], 0),
        (vec!["key", "remove", "anthropic"], vec![], 1),
        (vec!["token", "list"], vec![], 0),
        (vec!["token", "remove", "anthropic"], vec![], 0),
    ];
    for (args, stdin, want) in cases {
        let run = f.store_env(&args, &stdin, &trace);
        assert_eq!(run.code(), Some(want), "{args:?}: {run:?}");
    }
    // Every valid set above was removed again.
    assert_eq!(f.store(&["token", "list"], b"").assert_ok().stdout, "");
}

#[test]
fn store_set_refuses_an_interactive_stdin_without_prompt() {
    let script = ["/usr/bin/script", "/bin/script"]
        .into_iter()
        .find(|p| Path::new(p).exists());
    let Some(script) = script else {
        println!("skipped: `script` (util-linux) is not installed, no way to get a pty");
        return;
    };
    let f = Fixture::new();
    for (args, what) in [
        ("key set x", "API key"),
        ("token set anthropic", "token JSON"),
    ] {
        let cmd = format!("'{BIN}' store {args} --store '{}'", f.store_str());
        let run = run_program(script, &["-qec", &cmd, "/dev/null"], b"", &[]);
        assert_eq!(run.code(), Some(2), "{cmd}: {run:?}");
        // Through the pty, the child's stderr arrives on script's stdout.
        let out = format!("{}{}", run.stdout, run.stderr);
        assert!(
            out.contains(&format!(
                "refusing to read the {what} from an interactive terminal"
            )) && out.contains("--prompt"),
            "{cmd}: {run:?}"
        );
    }
    assert_eq!(f.store(&["key", "list"], b"").assert_ok().stdout, "");
    assert_eq!(f.store(&["token", "list"], b"").assert_ok().stdout, "");
}

#[test]
fn store_commands_are_seen_by_a_server_running_on_the_same_store() {
    let f = Fixture::new();
    f.set_token("anthropic", "default", "at-old", CANARY_RT);
    let server = f.serve(&["--allow", "anthropic"]);
    let mut raw = server.connect();
    assert_eq!(
        data(&get_token(&mut raw, "t1", "anthropic")),
        &sanitized("at-old")
    );

    f.set_token("anthropic", "default", CANARY_AT, CANARY_RT);
    assert_eq!(
        data(&get_token(&mut raw, "t2", "anthropic")),
        &sanitized(CANARY_AT)
    );

    f.set_key("anthropic", format!("{CANARY_KEY}\n").as_bytes());
    assert_eq!(
        data(&raw.call("k1", "get_api_key", json!({"name": "anthropic"}))),
        &json!({"key": CANARY_KEY})
    );

    f.store(&["token", "remove", "anthropic"], b"").assert_ok();
    assert_eq!(code(&get_token(&mut raw, "t3", "anthropic")), "NOT_FOUND");
    drop(raw);
    let stopped = server.stop(Signal::SIGTERM);
    assert!(stopped.status.success(), "{stopped:?}");
    assert_no_canary("serve stderr", &stopped.stderr);
}

/// A profile written for host-side refresh is accepted, and serve says plainly that this
/// version does not refresh yet.
#[test]
fn refresh_settings_in_a_profile_are_in_force_and_checked() {
    let f = Fixture::new();
    let expired = serde_json::json!({"access_token": "at-stored", "refresh_token": "rt-x",
        "expiry": 1_000, "token_type": "Bearer"});
    f.seed(
        &["token", "set", "anthropic"],
        expired.to_string().as_bytes(),
    );
    let profile = f.tmp.path().join("p.toml");
    std::fs::write(
        &profile,
        "allow = [\"anthropic\"]\nrefresh = false\nrenew_before = 600\n[provider.anthropic]\ntoken_url = \"http://127.0.0.1:9/t\"\n",
    )
    .expect("write profile");
    let server = f.start_serve(
        &["--profile", profile.to_str().expect("utf-8")],
        Env::ISOLATED,
    );
    // `refresh = false`: the expired token is served as stored, nothing is refreshed.
    let mut raw = server.connect();
    let reply = raw.call("1", "get_token", json!({"provider": "anthropic"}));
    assert_eq!(reply["data"]["access_token"], "at-stored", "{reply}");
    let reply = raw.call("2", "refresh_token", json!({"provider": "anthropic"}));
    assert_eq!(reply["code"], "REFRESH_NOT_AVAILABLE", "{reply}");
    let stopped = server.stop(nix::sys::signal::Signal::SIGTERM);
    assert!(stopped.status.success(), "{stopped:?}");
    // And a bad one is refused with its line, like any profile error.
    std::fs::write(
        &profile,
        "[provider.anthropic]\ntoken_url = \"http://example.com/t\"\n",
    )
    .expect("write profile");
    let run = common::process::run(
        BIN,
        &[
            "serve",
            "--profile",
            profile.to_str().expect("utf-8"),
            "--store",
            f.store_str(),
        ],
        Stdin::Null,
        Env::ISOLATED,
    );
    assert_eq!(run.code(), Some(2), "{run:?}");
    assert!(
        run.stderr.contains("line 2") && run.stderr.contains("https://"),
        "{run:?}"
    );
}
