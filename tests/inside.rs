//! The inside commands (`credproxy token ...`, `credproxy key ...`) run as real processes
//! against a real `credproxy serve` on a file store: their exact outputs, every documented
//! exit status (0 to 5) with the code named on stderr, `token save` from stdin with the
//! sandbox's refresh token dropped, and `--help` documenting the exit codes.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};

/// The binary under test.
const BIN: &str = env!("CARGO_BIN_EXE_credproxy");

/// How long any child gets to print its socket line or to exit.
const DEADLINE: Duration = Duration::from_secs(10);

/// Secret values. The access token and key may be printed by the commands that fetch
/// them (on stdout); the refresh tokens never anywhere, and nothing on stderr.
const CANARY_AT: &str = "CANARY-AT-1b6e";
const CANARY_RT: &str = "CANARY-RT-c4a0";
const CANARY_KEY: &str = "CANARY-KEY-8d13";
const SANDBOX_RT: &str = "CANARY-RT-SANDBOX-5e2f";

const SOCKET_PREFIX: &str = "LLXPRT_CREDENTIAL_SOCKET=";

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// A child in its own process group, killed (with its group) and reaped when dropped
/// before it exited.
struct ChildGuard(Option<Child>);

impl ChildGuard {
    fn child(&mut self) -> &mut Child {
        self.0.as_mut().expect("child still owned")
    }

    /// Waits (polling every 20 ms for up to `DEADLINE`) for the exit; kills the child and
    /// fails the test when it does not come.
    fn wait_exit(&mut self, what: &str) -> ExitStatus {
        let t0 = Instant::now();
        loop {
            if let Some(status) = self.child().try_wait().expect("try_wait") {
                self.0 = None;
                return status;
            }
            if t0.elapsed() > DEADLINE {
                self.kill();
                panic!("{what} did not exit within {DEADLINE:?}");
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.0.take() {
            // Not reaped yet: the pid (= the group id) is still ours.
            let _ = killpg(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

fn drain(mut pipe: impl Read + Send + 'static) -> JoinHandle<String> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = pipe.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// The outcome of a finished command.
#[derive(Debug)]
struct Run {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

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
    let mut child = Command::new(BIN)
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("LLXPRT_CREDENTIAL_SOCKET")
        .envs(envs.iter().copied())
        .process_group(0)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn credproxy");
    let mut input = child.stdin.take().expect("stdin");
    let stdout = drain(child.stdout.take().expect("stdout"));
    let stderr = drain(child.stderr.take().expect("stderr"));
    let mut guard = ChildGuard(Some(child));
    let bytes = stdin.to_vec();
    // The child may exit without reading everything: a broken pipe is fine.
    let writer = thread::spawn(move || {
        let _ = input.write_all(&bytes);
    });
    let status = guard.wait_exit(&format!("credproxy {args:?}"));
    let _ = writer.join();
    let run = Run {
        status,
        stdout: stdout.join().expect("stdout thread"),
        stderr: stderr.join().expect("stderr thread"),
    };
    for canary in [CANARY_RT, SANDBOX_RT] {
        assert!(
            !run.stdout.contains(canary) && !run.stderr.contains(canary),
            "{args:?} printed a refresh token: {run:?}"
        );
    }
    for canary in [CANARY_AT, CANARY_KEY] {
        assert!(
            !run.stderr.contains(canary),
            "{args:?} put a secret on stderr: {run:?}"
        );
    }
    run
}

/// A private temporary directory with a file store and a 0700 socket directory.
struct Fixture {
    tmp: tempfile::TempDir,
    store: PathBuf,
    sock: PathBuf,
}

impl Fixture {
    /// The store: tokens gemini:default, anthropic:work, anthropic:default (canaries),
    /// openai:default (each with a refresh token), keys openai and anthropic (canary).
    fn new() -> Fixture {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = tmp.path().join("store");
        let sock = tmp.path().join("sock");
        fs::create_dir(&sock).expect("mkdir sock");
        fs::set_permissions(&sock, fs::Permissions::from_mode(0o700)).expect("chmod sock");
        let f = Fixture { tmp, store, sock };
        // Written out of order: the lists must come back sorted.
        f.set_token("gemini", "default", "at-gemini-default");
        f.set_token("anthropic", "work", "at-anthropic-work");
        f.set_token("anthropic", "default", CANARY_AT);
        f.set_token("openai", "default", "at-openai-default");
        f.set_key("openai", "sk-openai");
        f.set_key("anthropic", CANARY_KEY);
        f
    }

    fn store_str(&self) -> &str {
        self.store.to_str().expect("utf-8 path")
    }

    fn store_cmd(&self, args: &[&str], stdin: &[u8]) {
        let mut all = vec!["store"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--store", self.store_str()]);
        let run = credproxy(&all, stdin, &[]);
        assert_eq!(run.status.code(), Some(0), "{all:?}: {run:?}");
    }

    fn set_token(&self, provider: &str, bucket: &str, access: &str) {
        self.store_cmd(
            &["token", "set", provider, "--bucket", bucket],
            token_json(access, CANARY_RT).as_bytes(),
        );
    }

    fn set_key(&self, name: &str, key: &str) {
        self.store_cmd(&["key", "set", name], format!("{key}\n").as_bytes());
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
        let mut args = vec![
            "serve",
            "--store",
            self.store_str(),
            "--socket-dir",
            self.sock.to_str().expect("utf-8"),
        ];
        args.extend_from_slice(extra);
        Server::start(&args)
    }
}

/// Full token JSON as the host stores it.
fn token_json(access: &str, refresh: &str) -> String {
    json!({
        "access_token": access,
        "refresh_token": refresh,
        "expiry": 1_900_000_000,
        "token_type": "Bearer",
    })
    .to_string()
}

/// What `token get` prints for `token_json(access, _)`.
fn sanitized(access: &str) -> Value {
    json!({"access_token": access, "expiry": 1_900_000_000, "token_type": "Bearer"})
}

/// A running `credproxy serve`, killed when dropped.
struct Server {
    child: ChildGuard,
    socket: PathBuf,
    stderr: Option<JoinHandle<String>>,
}

impl Server {
    /// Spawns the binary and waits (up to `DEADLINE`) for its socket line.
    fn start(args: &[&str]) -> Server {
        let mut child = Command::new(BIN)
            .args(args)
            .env_remove("RUST_LOG")
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn credproxy serve");
        let stdout = child.stdout.take().expect("stdout");
        let stderr = drain(child.stderr.take().expect("stderr"));
        let mut child = ChildGuard(Some(child));
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            let read = reader.read_line(&mut line).map(|_| line);
            let _ = tx.send(read);
            let _ = reader.read_to_end(&mut Vec::new());
        });
        let line = match rx.recv_timeout(DEADLINE) {
            Ok(Ok(line)) if !line.is_empty() => line,
            other => {
                child.kill();
                let err = stderr.join().unwrap_or_default();
                panic!("serve {args:?} printed no socket line ({other:?}); stderr: {err}");
            }
        };
        let path = line
            .strip_suffix('\n')
            .and_then(|l| l.strip_prefix(SOCKET_PREFIX))
            .unwrap_or_else(|| panic!("unexpected first stdout line {line:?}"));
        Server {
            child,
            socket: PathBuf::from(path),
            stderr: Some(stderr),
        }
    }

    fn socket_str(&self) -> &str {
        self.socket.to_str().expect("utf-8")
    }

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
    fn stop(mut self) -> String {
        let pid = Pid::from_raw(self.child.child().id() as i32);
        kill(pid, Signal::SIGTERM).expect("signal serve");
        let status = self.child.wait_exit("serve after SIGTERM");
        let stderr = self
            .stderr
            .take()
            .expect("stderr")
            .join()
            .expect("stderr thread");
        assert!(status.success(), "serve exit: {status:?}; {stderr}");
        for canary in [CANARY_AT, CANARY_RT, CANARY_KEY, SANDBOX_RT] {
            assert!(!stderr.contains(canary), "serve logged {canary}: {stderr}");
        }
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
    let f = Fixture::new();
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
    let f = Fixture::new();
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
    let f = Fixture::new();
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
    let f = Fixture::new();
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
    let f = Fixture::new();
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
    let f = Fixture::new();
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
    let f = Fixture::new();
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
    let f = Fixture::new();
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
    let f = Fixture::new();
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
    let f = Fixture::new();
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
    let f = Fixture::new();
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
    let f = Fixture::new();
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
    let f = Fixture::new();
    let server = f.serve(&["--allow", "anthropic"]);
    assert_eq!(server.socket.parent(), Some(Path::new(&f.sock)));
    let dir = f.sock.to_str().expect("utf-8");
    credproxy(&["token", "get", "anthropic", "--socket", dir], b"", &[]).fails(4, &[dir]);
    server.stop();
}
