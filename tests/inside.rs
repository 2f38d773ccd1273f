//! The inside commands (`credproxy token ...`, `credproxy key ...`) run as real processes
//! against a real `credproxy serve` on a file store: their exact outputs, every documented
//! exit status (0 to 5) with the code named on stderr, `token save` from stdin with the
//! sandbox's refresh token dropped, and `--help` documenting the exit codes.

mod common;

use std::fs;
use std::ops::Deref;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::thread;

use common::process::{self, sanitized, token_json, Canaries, Env, Fixture, Run, Stdin, BIN};
use nix::sys::signal::Signal;
use serde_json::{json, Value};

/// Secret values. The access token and key may be printed by the commands that fetch
/// them (on stdout); the refresh tokens never anywhere, and nothing on stderr.
const CANARY_AT: &str = "CANARY-AT-1b6e";
const CANARY_RT: &str = "CANARY-RT-c4a0";
const CANARY_KEY: &str = "CANARY-KEY-8d13";
const SANDBOX_RT: &str = "CANARY-RT-SANDBOX-5e2f";

const CANARIES: Canaries = Canaries {
    never: &[CANARY_RT, SANDBOX_RT],
    not_logged: &[CANARY_AT, CANARY_KEY],
};

/// `serve` runs in its own process group (killed with it) and keeps the socket variable.
const SERVE_ENV: Env<'static> = Env {
    clear_socket: false,
    own_group: true,
    vars: &[],
};

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

impl Run {
    /// Asserts success with nothing on stderr.
    #[track_caller]
    fn ok(&self) -> &Self {
        assert_eq!(self.status.code(), Some(0), "expected success: {self:?}");
        assert_eq!(self.stderr, "", "nothing on stderr on success: {self:?}");
        self
    }

    /// Asserts exit `code`, nothing on stdout, and exactly one `credproxy: ` line on
    /// stderr containing every needle.
    #[track_caller]
    fn fails(&self, code: i32, needles: &[&str]) -> &Self {
        assert_eq!(self.status.code(), Some(code), "exit status: {self:?}");
        assert_eq!(self.stdout, "", "nothing on stdout on failure: {self:?}");
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "expected one stderr line: {self:?}");
        assert!(lines[0].starts_with("credproxy: "), "{self:?}");
        for needle in needles {
            assert!(
                lines[0].contains(needle),
                "stderr lacks {needle:?}: {self:?}"
            );
        }
        self
    }
}

/// Runs the binary with `args`, `stdin` fed in, and `envs` (RUST_LOG and the socket
/// variable removed unless set there). Checks that no secret leaked.
fn credproxy(args: &[&str], stdin: &[u8], envs: &[(&str, &str)]) -> Run {
    let run = process::run(BIN, args, Stdin::Pipe(stdin), Env::ISOLATED.with(envs));
    CANARIES.check_run(&format!("{args:?}"), &run);
    run
}

impl Fixture {
    /// The store: tokens gemini:default, anthropic:work, anthropic:default (canaries),
    /// openai:default (each with a refresh token), keys openai and anthropic (canary).
    fn seeded() -> Fixture {
        let f = Fixture::new();
        // Written out of order: the lists must come back sorted.
        f.set_token("gemini", "default", "at-gemini-default");
        f.set_token("anthropic", "work", "at-anthropic-work");
        f.set_token("anthropic", "default", CANARY_AT);
        f.set_token("openai", "default", "at-openai-default");
        f.set_key("openai", "sk-openai");
        f.set_key("anthropic", CANARY_KEY);
        f
    }

    fn set_token(&self, provider: &str, bucket: &str, access: &str) {
        let run = self.seed_token(provider, bucket, access, CANARY_RT);
        CANARIES.check_run("store token set", &run);
    }

    fn set_key(&self, name: &str, key: &str) {
        let run = self.seed_key(name, key);
        CANARIES.check_run("store key set", &run);
    }

    /// The token file of provider:bucket.
    fn token_file(&self, provider: &str, bucket: &str) -> PathBuf {
        self.store
            .join("tokens")
            .join(provider)
            .join(format!("{bucket}.json"))
    }

    /// The stored token file as JSON.
    fn stored(&self, provider: &str, bucket: &str) -> Value {
        let path = self.token_file(provider, bucket);
        let bytes = fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        serde_json::from_slice(&bytes).expect("stored token is JSON")
    }

    /// `credproxy serve --store S --socket-dir D EXTRA...`, running until dropped.
    fn serve(&self, extra: &[&str]) -> Server {
        Server(self.start_serve(extra, SERVE_ENV))
    }
}

/// A running `credproxy serve`, killed when dropped, with the inside commands run against
/// it.
struct Server(process::Server);

impl Deref for Server {
    type Target = process::Server;
    fn deref(&self) -> &process::Server {
        &self.0
    }
}

impl Server {
    /// Runs an inside command with `--socket PATH` appended.
    fn run(&self, args: &[&str]) -> Run {
        self.run_stdin(args, b"")
    }

    fn run_stdin(&self, args: &[&str], stdin: &[u8]) -> Run {
        let mut all = args.to_vec();
        all.extend_from_slice(&["--socket", self.socket_str()]);
        credproxy(&all, stdin, &[])
    }

    /// Runs an inside command finding the socket through LLXPRT_CREDENTIAL_SOCKET.
    fn run_env(&self, args: &[&str]) -> Run {
        credproxy(
            args,
            b"",
            &[("LLXPRT_CREDENTIAL_SOCKET", self.socket_str())],
        )
    }

    /// SIGTERM, wait, and return the server's stderr (checked for secrets).
    fn stop(self) -> String {
        let stopped = self.0.stop(Signal::SIGTERM);
        let stderr = stopped.stderr;
        assert!(
            stopped.status.success(),
            "serve exit: {:?}; {stderr}",
            stopped.status
        );
        CANARIES.absent("serve stderr", &stderr);
        stderr
    }
}

/// Parses one line of JSON (the whole of `stdout`, newline-terminated).
#[track_caller]
fn one_json_line(run: &Run) -> Value {
    assert!(run.stdout.ends_with('\n'), "newline-terminated: {run:?}");
    assert_eq!(run.stdout.lines().count(), 1, "one line: {run:?}");
    serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {run:?}"))
}

// ---------------------------------------------------------------------------------------
// Outputs (exit 0)
// ---------------------------------------------------------------------------------------

#[test]
fn token_get_prints_the_sanitized_token_json() {
    let f = Fixture::seeded();
    let server = f.serve(&["--allow", "anthropic"]);
    let run = server.run(&["token", "get", "anthropic"]);
    run.ok();
    assert_eq!(one_json_line(&run), sanitized(CANARY_AT));
    assert!(!run.stdout.contains("refresh_token"), "{run:?}");

    let run = server.run(&["token", "get", "anthropic", "--bucket", "work"]);
    run.ok();
    assert_eq!(one_json_line(&run), sanitized("at-anthropic-work"));

    // The socket from the environment, and --socket before the subcommand.
    let run = server.run_env(&["token", "get", "anthropic"]);
    run.ok();
    assert_eq!(one_json_line(&run), sanitized(CANARY_AT));
    let run = credproxy(
        &["token", "--socket", server.socket_str(), "get", "anthropic"],
        b"",
        &[],
    );
    run.ok();
    assert_eq!(one_json_line(&run), sanitized(CANARY_AT));
    // --socket wins over the environment.
    let run = credproxy(
        &["token", "get", "anthropic", "--socket", server.socket_str()],
        b"",
        &[("LLXPRT_CREDENTIAL_SOCKET", "/nonexistent/credproxy.sock")],
    );
    run.ok();
    assert_eq!(one_json_line(&run), sanitized(CANARY_AT));

    // The host's store still has its refresh token: only the copy was sanitized.
    assert_eq!(f.stored("anthropic", "default")["refresh_token"], CANARY_RT);
    server.stop();
}

#[test]
fn key_get_prints_the_key_alone_newline_terminated() {
    let f = Fixture::seeded();
    let server = f.serve(&["--allow", "anthropic", "--allow-key", "openai"]);
    let run = server.run(&["key", "get", "anthropic"]);
    run.ok();
    assert_eq!(run.stdout, format!("{CANARY_KEY}\n"));
    let run = server.run_env(&["key", "get", "openai"]);
    run.ok();
    assert_eq!(run.stdout, "sk-openai\n");
    server.stop();
}

#[test]
fn lists_print_one_name_per_line_sorted_or_a_json_array() {
    let f = Fixture::seeded();
    let server = f.serve(&["--allow-all"]);

    let run = server.run(&["token", "list"]);
    run.ok();
    assert_eq!(run.stdout, "anthropic\ngemini\nopenai\n");
    let run = server.run(&["token", "list", "--json"]);
    run.ok();
    assert_eq!(
        one_json_line(&run),
        json!(["anthropic", "gemini", "openai"])
    );

    let run = server.run(&["token", "buckets", "anthropic"]);
    run.ok();
    assert_eq!(run.stdout, "default\nwork\n");
    let run = server.run(&["token", "buckets", "anthropic", "--json"]);
    run.ok();
    assert_eq!(one_json_line(&run), json!(["default", "work"]));

    let run = server.run(&["key", "list"]);
    run.ok();
    assert_eq!(run.stdout, "anthropic\nopenai\n");
    let run = server.run(&["key", "list", "--json"]);
    run.ok();
    assert_eq!(one_json_line(&run), json!(["anthropic", "openai"]));
    server.stop();
}

#[test]
fn key_has_exits_0_when_the_key_exists_and_1_when_not() {
    let f = Fixture::seeded();
    let server = f.serve(&["--allow", "anthropic", "--allow-key", "mistral"]);
    let run = server.run(&["key", "has", "anthropic"]);
    run.ok();
    assert_eq!(run.stdout, "", "has prints nothing: {run:?}");
    let run = server.run(&["key", "has", "mistral"]);
    assert_eq!(run.status.code(), Some(1), "{run:?}");
    assert_eq!(run.stdout, "", "{run:?}");
    server.stop();
}

#[test]
fn token_stats_prints_the_bucket_usage_as_json() {
    let f = Fixture::seeded();
    let server = f.serve(&["--allow", "anthropic"]);
    for _ in 0..3 {
        server.run(&["token", "get", "anthropic"]).ok();
    }
    server
        .run(&["token", "get", "anthropic", "--bucket", "work"])
        .ok();

    let run = server.run(&["token", "stats", "anthropic"]);
    run.ok();
    let stats = one_json_line(&run);
    assert_eq!(stats["bucket"], "default", "{stats}");
    assert_eq!(stats["requestCount"], 3, "{stats}");
    assert_eq!(stats["percentage"].as_f64(), Some(75.0), "{stats}");
    assert!(stats["lastUsed"].is_u64(), "{stats}");

    let run = server.run(&["token", "stats", "anthropic", "--bucket", "work"]);
    run.ok();
    let stats = one_json_line(&run);
    assert_eq!(stats["bucket"], "work", "{stats}");
    assert_eq!(stats["requestCount"], 1, "{stats}");
    assert_eq!(stats["percentage"].as_f64(), Some(25.0), "{stats}");
    server.stop();
}

#[test]
fn token_save_reads_stdin_and_the_sandbox_refresh_token_is_not_stored() {
    let f = Fixture::seeded();
    let server = f.serve(&["--allow", "anthropic"]);
    let incoming = json!({
        "access_token": "at-from-sandbox",
        "refresh_token": SANDBOX_RT,
        "expiry": 1_950_000_000,
        "token_type": "Bearer",
    })
    .to_string();

    // Onto a stored token: the new access token, the host's refresh token kept.
    let run = server.run_stdin(&["token", "save", "anthropic"], incoming.as_bytes());
    run.ok();
    assert_eq!(run.stdout, "", "{run:?}");
    let stored = f.stored("anthropic", "default");
    assert_eq!(stored["access_token"], "at-from-sandbox", "{stored}");
    assert_eq!(stored["expiry"], 1_950_000_000, "{stored}");
    assert_eq!(
        stored["refresh_token"], CANARY_RT,
        "the host's refresh token"
    );
    let text = fs::read_to_string(f.token_file("anthropic", "default")).expect("read");
    assert!(
        !text.contains(SANDBOX_RT),
        "sandbox refresh token stored: {text}"
    );

    // Into a new bucket: stored without any refresh token.
    let run = server.run_stdin(
        &["token", "save", "anthropic", "--bucket", "fresh"],
        incoming.as_bytes(),
    );
    run.ok();
    let stored = f.stored("anthropic", "fresh");
    assert_eq!(stored["access_token"], "at-from-sandbox", "{stored}");
    assert!(stored.get("refresh_token").is_none(), "{stored}");

    // The sandbox reads back what it saved.
    let run = server.run(&["token", "get", "anthropic"]);
    run.ok();
    assert_eq!(
        one_json_line(&run),
        json!({"access_token": "at-from-sandbox", "expiry": 1_950_000_000, "token_type": "Bearer"})
    );
    server.stop();
}

#[test]
fn token_remove_deletes_the_stored_token() {
    let f = Fixture::seeded();
    let server = f.serve(&["--allow", "anthropic"]);
    let run = server.run(&["token", "remove", "anthropic", "--bucket", "work"]);
    run.ok();
    assert_eq!(run.stdout, "");
    assert!(!f.token_file("anthropic", "work").exists());
    assert!(f.token_file("anthropic", "default").exists());
    let run = server.run(&["token", "buckets", "anthropic"]);
    run.ok();
    assert_eq!(run.stdout, "default\n");
    server
        .run(&["token", "get", "anthropic", "--bucket", "work"])
        .fails(1, &["NOT_FOUND"]);
    server.stop();
}

// ---------------------------------------------------------------------------------------
// Exit statuses 1 to 5
// ---------------------------------------------------------------------------------------

#[test]
fn exit_1_for_not_found() {
    let f = Fixture::seeded();
    let server = f.serve(&["--allow", "anthropic", "--allow-key", "mistral"]);
    server
        .run(&["token", "get", "anthropic", "--bucket", "nosuch"])
        .fails(1, &["NOT_FOUND"]);
    server
        .run(&["token", "stats", "anthropic", "--bucket", "nosuch"])
        .fails(1, &["NOT_FOUND"]);
    server
        .run(&["key", "get", "mistral"])
        .fails(1, &["NOT_FOUND"]);
    let run = server.run(&["key", "has", "mistral"]);
    assert_eq!(run.status.code(), Some(1), "{run:?}");
    server.stop();
}

#[test]
fn exit_2_for_usage_errors() {
    let f = Fixture::seeded();
    let server = f.serve(&["--allow", "anthropic"]);
    for args in [
        vec!["token", "get"],
        vec!["key", "get"],
        vec!["token", "stats"],
        vec!["token", "frobnicate", "anthropic"],
        vec!["key"],
        vec!["token", "get", "anthropic", "--bogus"],
    ] {
        let run = server.run(&args);
        run.fails(2, &[]);
    }
    // Invalid token JSON on stdin for `token save`: refused before anything is sent.
    let before = f.stored("anthropic", "default");
    for bad in [
        "not json at all".to_owned(),
        json!({"refresh_token": SANDBOX_RT, "expiry": 1, "token_type": "Bearer"}).to_string(),
        json!({"access_token": 5, "expiry": 1, "token_type": "Bearer"}).to_string(),
        String::new(),
    ] {
        let run = server.run_stdin(&["token", "save", "anthropic"], bad.as_bytes());
        run.fails(2, &["invalid token"]);
    }
    assert_eq!(f.stored("anthropic", "default"), before, "store changed");
    server.stop();
}

#[test]
fn a_usage_error_names_the_missing_argument_on_its_one_line() {
    // The one stderr line must say what is wrong, not only that something is.
    credproxy(&["token", "get"], b"", &[]).fails(2, &["PROVIDER"]);
    credproxy(&["key", "has"], b"", &[]).fails(2, &["NAME"]);
}

#[test]
fn exit_3_for_refusals_naming_the_code() {
    let f = Fixture::seeded();
    let server = f.serve(&["--allow", "anthropic"]);
    server
        .run(&["token", "get", "openai"])
        .fails(3, &["UNAUTHORIZED"]);
    server
        .run(&["key", "get", "openai"])
        .fails(3, &["UNAUTHORIZED"]);
    server
        .run(&["token", "stats", "gemini"])
        .fails(3, &["UNAUTHORIZED"]);
    server
        .run(&["token", "get", "bad/name"])
        .fails(3, &["INVALID_REQUEST"]);
    server.stop();

    let server = f.serve(&["--allow", "anthropic", "--read-only"]);
    let before = f.stored("anthropic", "default");
    let incoming = token_json("at-from-sandbox", SANDBOX_RT);
    server
        .run_stdin(&["token", "save", "anthropic"], incoming.as_bytes())
        .fails(3, &["FORBIDDEN"]);
    server
        .run(&["token", "remove", "anthropic"])
        .fails(3, &["FORBIDDEN"]);
    assert_eq!(f.stored("anthropic", "default"), before, "store changed");
    // Reads still work.
    server.run(&["token", "get", "anthropic"]).ok();
    server.stop();
}

#[test]
fn exit_4_when_the_proxy_is_unreachable() {
    let f = Fixture::seeded();
    let missing = f.tmp.path().join("no-such.sock");
    let missing = missing.to_str().expect("utf-8");
    for args in [
        vec!["token", "get", "anthropic", "--socket", missing],
        vec!["key", "list", "--socket", missing],
        vec!["key", "has", "anthropic", "--socket", missing],
    ] {
        credproxy(&args, b"", &[]).fails(4, &[missing]);
    }
    let run = credproxy(
        &["token", "list"],
        b"",
        &[("LLXPRT_CREDENTIAL_SOCKET", missing)],
    );
    run.fails(4, &[missing]);

    // No socket anywhere: unset, or set to the empty string.
    credproxy(&["token", "get", "anthropic"], b"", &[]).fails(4, &["LLXPRT_CREDENTIAL_SOCKET"]);
    credproxy(
        &["key", "get", "anthropic"],
        b"",
        &[("LLXPRT_CREDENTIAL_SOCKET", "")],
    )
    .fails(4, &["LLXPRT_CREDENTIAL_SOCKET"]);

    // A server that has gone away.
    let server = f.serve(&["--allow", "anthropic"]);
    let path = server.socket_str().to_owned();
    server.stop();
    credproxy(&["token", "get", "anthropic", "--socket", &path], b"", &[]).fails(4, &[&path]);
}

#[test]
fn exit_4_when_the_connection_is_lost() {
    // A listener that accepts every connection and hangs up at once.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("hangup.sock");
    let listener = UnixListener::bind(&path).expect("bind");
    let accepted = thread::spawn(move || {
        let mut n = 0;
        for stream in listener.incoming() {
            let Ok(stream) = stream else { break };
            drop(stream);
            n += 1;
            if n == 2 {
                break;
            }
        }
        n
    });
    let path = path.to_str().expect("utf-8").to_owned();
    credproxy(&["token", "get", "anthropic", "--socket", &path], b"", &[]).fails(4, &[]);
    credproxy(&["key", "get", "anthropic", "--socket", &path], b"", &[]).fails(4, &[]);
    assert_eq!(accepted.join().expect("listener"), 2);
}

#[test]
fn exit_5_when_the_proxy_fails_internally() {
    let f = Fixture::seeded();
    let server = f.serve(&["--allow", "anthropic"]);
    // A corrupted file in the host's store: the proxy cannot read it.
    fs::write(
        f.token_file("anthropic", "work"),
        b"{\"access_token\": truncated",
    )
    .expect("corrupt");
    server
        .run(&["token", "get", "anthropic", "--bucket", "work"])
        .fails(5, &["INTERNAL_ERROR"]);
    // The other buckets are still served.
    server.run(&["token", "get", "anthropic"]).ok();
    server.stop();
}

// ---------------------------------------------------------------------------------------
// Help
// ---------------------------------------------------------------------------------------

#[test]
fn help_documents_the_exit_codes() {
    for args in [
        vec!["token", "--help"],
        vec!["key", "--help"],
        vec!["--help"],
    ] {
        let run = credproxy(&args, b"", &[]);
        run.ok();
        let out = &run.stdout;
        assert!(out.contains("Exit status"), "{args:?}: {out}");
        for (code, words) in [
            ("0", "success"),
            ("1", "not found"),
            ("2", "usage"),
            ("3", "refused"),
            ("4", "unreachable"),
            ("5", "internal"),
        ] {
            assert!(
                out.lines()
                    .any(|l| l.trim_start().starts_with(code) && l.contains(words)),
                "{args:?}: no line for exit {code} ({words}): {out}"
            );
        }
    }
    // And every subcommand is documented.
    let run = credproxy(&["token", "--help"], b"", &[]);
    for sub in ["get", "save", "remove", "list", "buckets", "stats"] {
        assert!(run.stdout.contains(sub), "token --help lacks {sub}");
    }
    let run = credproxy(&["key", "--help"], b"", &[]);
    for sub in ["get", "list", "has"] {
        assert!(run.stdout.contains(sub), "key --help lacks {sub}");
    }
}

#[test]
fn exit_4_when_the_socket_path_is_a_directory() {
    let f = Fixture::seeded();
    let server = f.serve(&["--allow", "anthropic"]);
    assert_eq!(server.socket.parent(), Some(Path::new(&f.sock)));
    let dir = f.sock.to_str().expect("utf-8");
    credproxy(&["token", "get", "anthropic", "--socket", dir], b"", &[]).fails(4, &[dir]);
    server.stop();
}
