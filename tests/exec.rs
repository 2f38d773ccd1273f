//! `credproxy exec [serve options] -- CMD [ARGS...]`, run as a real process around real
//! commands: the socket in CMD's environment once the proxy listens, CMD's exit status
//! (and 128+N for a signal), forwarded signals with the proxy still serving, escalation on
//! a second stop signal, the socket's removal, start failures that never run CMD, CMD not
//! found / not executable, `--profile` files, and the log formats.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread::{self, JoinHandle};
use std::time::Instant;

use common::process::{
    self, drain, path_str, sanitized, spawn_piped, strings, token_json, Canaries, ChildGuard, Env,
    Fixture, Run, Stdin, BIN, DEADLINE,
};
use nix::sys::signal::Signal;
use serde_json::{json, Value};

/// Secret values that must never appear in a log; the refresh token never anywhere.
const CANARY_AT: &str = "CANARY-AT-e1c0";
const CANARY_RT: &str = "CANARY-RT-4d27";
const CANARY_KEY: &str = "CANARY-KEY-9b3f";
/// The access and refresh token a sandbox saves in the logging test.
const CANARY_SAVED_AT: &str = "CANARY-AT-SAVED-77aa";
const CANARY_SAVED_RT: &str = "CANARY-RT-SAVED-0c1d";

/// The refresh tokens anywhere, any secret in a log.
const CANARIES: Canaries = Canaries {
    never: &[CANARY_RT, CANARY_SAVED_RT],
    not_logged: &[CANARY_AT, CANARY_KEY, CANARY_SAVED_AT],
};

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

impl Run {
    #[track_caller]
    fn assert_code(&self, code: i32) -> &Self {
        assert_eq!(self.code(), Some(code), "exit status: {self:?}");
        self
    }

    /// Asserts a failed start: non-zero exit (`code` when given), nothing on stdout (CMD
    /// never ran) and exactly one `credproxy: ` line on stderr containing every needle.
    #[track_caller]
    fn assert_start_failed(&self, code: Option<i32>, needles: &[&str]) {
        let got = self
            .code()
            .unwrap_or_else(|| panic!("killed by a signal: {self:?}"));
        assert_ne!(got, 0, "a failed start must exit non-zero: {self:?}");
        if let Some(code) = code {
            assert_eq!(got, code, "exit status: {self:?}");
        }
        assert_eq!(self.stdout, "", "CMD must not run: {self:?}");
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "expected one stderr line: {self:?}");
        assert!(lines[0].starts_with("credproxy: "), "{self:?}");
        for needle in needles {
            assert!(
                lines[0].contains(needle),
                "stderr lacks {needle:?}: {self:?}"
            );
        }
    }
}

/// Runs `program args` to its end with a deadline (stdin empty).
fn run_program(program: &str, args: &[String], envs: &[(&str, &str)]) -> Run {
    run_program_stdin(program, args, envs, b"")
}

/// Runs `program args` to its end with a deadline, `stdin` fed in, in its own process
/// group without an inherited RUST_LOG or socket variable.
fn run_program_stdin(program: &str, args: &[String], envs: &[(&str, &str)], stdin: &[u8]) -> Run {
    let run = process::run(program, args, Stdin::Pipe(stdin), Env::ISOLATED.with(envs));
    CANARIES.check_run(&format!("{args:?}"), &run);
    run
}

/// A running `credproxy exec` whose stdout is read line by line.
struct Live {
    child: ChildGuard,
    lines: Receiver<String>,
    seen: Vec<String>,
    stderr: Option<JoinHandle<String>>,
}

impl Live {
    fn spawn(args: &[String], envs: &[(&str, &str)]) -> Live {
        let env = Env::ISOLATED.with(envs);
        let mut child = spawn_piped(&mut env.command(BIN, args)).expect("spawn credproxy exec");
        let stdout = child.stdout.take().expect("stdout");
        let stderr = drain(child.stderr.take().expect("stderr"));
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Live {
            child: ChildGuard::new(child, env.own_group),
            lines,
            seen: Vec::new(),
            stderr: Some(stderr),
        }
    }

    /// Waits (up to `DEADLINE`) for a stdout line equal to `want`.
    fn wait_line(&mut self, want: &str) {
        let t0 = Instant::now();
        loop {
            let left = DEADLINE.saturating_sub(t0.elapsed());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let done = line == want;
                    self.seen.push(line);
                    if done {
                        return;
                    }
                }
                Err(e) => {
                    self.child.kill();
                    let stderr = self
                        .stderr
                        .take()
                        .map(|h| h.join().unwrap_or_default())
                        .unwrap_or_default();
                    panic!(
                        "no {want:?} line ({e:?}); stdout so far {:?}; stderr: {stderr}",
                        self.seen
                    );
                }
            }
        }
    }

    fn signal(&mut self, signal: Signal) {
        self.child.signal(signal);
    }

    /// Waits for the exit and collects the output.
    fn finish(mut self) -> Run {
        let status = self.child.wait_exit("credproxy exec");
        let t0 = Instant::now();
        loop {
            let left = DEADLINE.saturating_sub(t0.elapsed());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => panic!("stdout never closed: {:?}", self.seen),
            }
        }
        let mut stdout = self.seen.join("\n");
        if !self.seen.is_empty() {
            stdout.push('\n');
        }
        let run = Run {
            status,
            stdout,
            stderr: self
                .stderr
                .take()
                .expect("stderr not taken")
                .join()
                .expect("stderr thread"),
        };
        CANARIES.check_run("credproxy exec", &run);
        run
    }
}

impl Fixture {
    /// Store: anthropic:default (canaries), anthropic:work, openai:default, and the API
    /// keys anthropic (canary) and openai.
    fn seeded() -> Fixture {
        let f = Fixture::new();
        f.seed_token("anthropic", "default", CANARY_AT, CANARY_RT);
        f.seed_token("anthropic", "work", "at-anthropic-work", CANARY_RT);
        f.seed_token("openai", "default", "at-openai-default", CANARY_RT);
        f.seed_key("anthropic", CANARY_KEY);
        f.seed_key("openai", "sk-openai");
        f
    }

    /// `exec --store S --socket-dir D OPTS -- CMD...`
    fn exec_args(&self, opts: &[&str], cmd: &[&str]) -> Vec<String> {
        let mut args = vec![
            String::from("exec"),
            "--store".into(),
            path_str(&self.store),
            "--socket-dir".into(),
            path_str(&self.sock),
        ];
        args.extend(strings(opts));
        args.push("--".into());
        args.extend(strings(cmd));
        args
    }

    fn exec(&self, opts: &[&str], cmd: &[&str]) -> Run {
        self.exec_env(opts, cmd, &[])
    }

    fn exec_env(&self, opts: &[&str], cmd: &[&str], envs: &[(&str, &str)]) -> Run {
        run_program(BIN, &self.exec_args(opts, cmd), envs)
    }

    fn live(&self, opts: &[&str], cmd: &[&str]) -> Live {
        Live::spawn(&self.exec_args(opts, cmd), &[])
    }

    /// A file CMD creates when it runs.
    fn marker(&self) -> PathBuf {
        self.tmp.path().join("cmd-ran")
    }

    fn marker_cmd(&self) -> Vec<String> {
        vec![
            "/bin/sh".into(),
            "-c".into(),
            "touch \"$1\"".into(),
            "sh".into(),
            path_str(&self.marker()),
        ]
    }

    /// Writes a profile file and returns its path.
    fn profile(&self, name: &str, text: &str) -> String {
        let path = self.tmp.path().join(name);
        fs::write(&path, text).expect("write profile");
        path_str(&path)
    }
}

/// `sh -c SCRIPT sh BIN`: the script reaches the binary as "$1".
fn sh(script: &str) -> Vec<String> {
    vec![
        "/bin/sh".into(),
        "-c".into(),
        script.into(),
        "sh".into(),
        BIN.into(),
    ]
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Removes ANSI escape sequences (CSI ... final byte) from `text`.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// The socket in CMD's environment, exit statuses
// ---------------------------------------------------------------------------------------

#[test]
fn cmd_runs_only_once_the_proxy_listens_with_the_socket_in_its_environment() {
    let f = Fixture::seeded();
    // CMD connects at once, with no retry of its own: it must find a listening socket.
    for round in 0..5 {
        let run = f.exec(
            &["--allow", "anthropic"],
            &[BIN, "token", "get", "anthropic"],
        );
        run.assert_code(0);
        let got: Value = serde_json::from_str(&run.stdout)
            .unwrap_or_else(|e| panic!("round {round}: not JSON ({e}): {run:?}"));
        assert_eq!(got, sanitized(CANARY_AT), "round {round}");
        assert_eq!(run.stdout.lines().count(), 1, "{run:?}");
    }

    let run = f.exec(
        &["--allow", "anthropic"],
        &refs(&sh(r#"echo "$LLXPRT_CREDENTIAL_SOCKET"
test -S "$LLXPRT_CREDENTIAL_SOCKET" && echo is-a-socket
exec "$1" token get anthropic"#)),
    );
    run.assert_code(0);
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{run:?}");
    let path = Path::new(lines[0]);
    assert_eq!(path.parent(), Some(f.sock.as_path()), "{run:?}");
    let name = path.file_name().and_then(|n| n.to_str()).expect("name");
    assert!(
        name.starts_with("llxprt-cred-") && name.ends_with(".sock"),
        "{name}"
    );
    assert_eq!(lines[1], "is-a-socket");
    assert_eq!(
        serde_json::from_str::<Value>(lines[2]).expect("json"),
        sanitized(CANARY_AT)
    );
}

#[test]
fn exec_exits_with_the_exit_status_of_cmd() {
    let f = Fixture::seeded();
    for (script, want) in [
        ("exit 0", 0),
        ("exit 7", 7),
        ("exit 255", 255),
        ("false", 1),
    ] {
        let run = f.exec(&["--allow", "anthropic"], &["/bin/sh", "-c", script]);
        assert_eq!(run.code(), Some(want), "{script}: {run:?}");
    }
    // A failing inside command's status comes through unchanged too (3: refused).
    let run = f.exec(&["--allow", "anthropic"], &[BIN, "token", "get", "openai"]);
    run.assert_code(3);
    assert!(run.stderr.contains("UNAUTHORIZED"), "{run:?}");
}

#[test]
fn exec_exits_128_plus_n_when_cmd_is_killed_by_signal_n() {
    let f = Fixture::seeded();
    for (script, want) in [
        ("kill -TERM $$", 143),
        ("kill -KILL $$", 137),
        ("kill -HUP $$", 129),
        ("kill -USR1 $$", 138),
    ] {
        let run = f.exec(&["--allow", "anthropic"], &["/bin/sh", "-c", script]);
        assert_eq!(run.code(), Some(want), "{script}: {run:?}");
        assert_eq!(f.sockets(), Vec::<PathBuf>::new(), "{script}: socket left");
    }
}

#[test]
fn the_socket_file_is_gone_after_exec_exits() {
    let f = Fixture::seeded();
    for end in ["exit 0", "exit 7", "kill -TERM $$"] {
        let script = format!("echo \"$LLXPRT_CREDENTIAL_SOCKET\"\n{end}");
        let run = f.exec(&["--allow", "anthropic"], &["/bin/sh", "-c", &script]);
        assert_ne!(run.code(), None, "{run:?}");
        let path = PathBuf::from(run.stdout.trim_end());
        assert!(path.starts_with(&f.sock), "{run:?}");
        assert!(
            fs::symlink_metadata(&path).is_err(),
            "{end}: socket {} still exists",
            path.display()
        );
        assert_eq!(f.sockets(), Vec::<PathBuf>::new(), "{end}");
        assert!(f.sock.is_dir(), "the socket directory stays");
    }
}

#[test]
fn cmd_inherits_the_stdin_and_the_environment_of_exec() {
    let f = Fixture::seeded();
    // CMD reads exec's stdin and sees exec's environment besides the socket variable.
    let script = "read line; echo \"got:$line:$CREDPROXY_TEST_VAR\"";
    let args = f.exec_args(&["--allow", "anthropic"], &["/bin/sh", "-c", script]);
    let run = run_program_stdin(BIN, &args, &[("CREDPROXY_TEST_VAR", "v1")], b"hello\n");
    run.assert_code(0);
    assert_eq!(run.stdout, "got:hello:v1\n", "{run:?}");

    // A sandbox saving a token through exec's stdin.
    let saved = token_json("at-saved-through-stdin", "rt-from-the-sandbox");
    let args = f.exec_args(
        &["--allow", "anthropic"],
        &[BIN, "token", "save", "anthropic"],
    );
    let run = run_program_stdin(BIN, &args, &[], saved.as_bytes());
    run.assert_code(0);
    let stored: Value = serde_json::from_slice(
        &fs::read(f.store.join("tokens/anthropic/default.json")).expect("read"),
    )
    .expect("json");
    assert_eq!(stored["access_token"], "at-saved-through-stdin");
    assert_eq!(
        stored["refresh_token"], CANARY_RT,
        "the host's refresh token stays"
    );
}

#[test]
fn exec_takes_the_other_serve_options() {
    let f = Fixture::seeded();
    let script = probes(&["token list", "key list", "token get openai"]);
    let run = f.exec(
        &["--allow-all", "--rate-limit", "0", "--log-format", "text"],
        &refs(&sh(&script)),
    );
    run.assert_code(0);
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(
        lines[..6],
        ["anthropic", "openai", "rc=0", "anthropic", "openai", "rc=0"],
        "{run:?}"
    );
    assert_eq!(
        serde_json::from_str::<Value>(lines[6]).expect("json"),
        sanitized("at-openai-default")
    );
    assert_eq!(lines[7..], ["rc=0"], "{run:?}");
}

#[test]
fn without_socket_dir_exec_uses_the_per_user_directory_in_tmpdir() {
    let f = Fixture::seeded();
    let tmpdir = f.tmp.path().join("tmpdir");
    fs::create_dir(&tmpdir).expect("mkdir");
    let args = vec![
        String::from("exec"),
        "--store".into(),
        path_str(&f.store),
        "--allow".into(),
        "anthropic".into(),
        "--".into(),
        "/bin/sh".into(),
        "-c".into(),
        "echo \"$LLXPRT_CREDENTIAL_SOCKET\"; exec \"$1\" token get anthropic".into(),
        "sh".into(),
        BIN.into(),
    ];
    let tmp_str = path_str(&tmpdir);
    let run = run_program(BIN, &args, &[("TMPDIR", &tmp_str)]);
    run.assert_code(0);
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{run:?}");
    let dir = fs::canonicalize(&tmpdir)
        .expect("canonical")
        .join(format!("llxprt-cred-{}", nix::unistd::geteuid().as_raw()));
    let socket = PathBuf::from(lines[0]);
    assert_eq!(socket.parent(), Some(dir.as_path()), "{run:?}");
    assert_eq!(
        serde_json::from_str::<Value>(lines[1]).expect("json"),
        sanitized(CANARY_AT)
    );
    let mode = fs::metadata(&dir)
        .expect("the directory stays")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700, "per-user directory mode");
    assert!(fs::symlink_metadata(&socket).is_err(), "socket left behind");
}

// ---------------------------------------------------------------------------------------
// Signals
// ---------------------------------------------------------------------------------------

/// CMD traps `name`, says ready, and loops; `signal` sent to credproxy must reach it.
fn assert_forwarded(signal: Signal, name: &str) {
    let f = Fixture::seeded();
    let script =
        format!("trap 'echo got-{name}; exit 9' {name}\necho ready\nwhile :; do sleep 0.05; done");
    let mut live = f.live(&["--allow", "anthropic"], &["/bin/sh", "-c", &script]);
    live.wait_line("ready");
    live.signal(signal);
    let run = live.finish();
    run.assert_code(9);
    assert_eq!(run.stdout, format!("ready\ngot-{name}\n"), "{run:?}");
    assert_eq!(f.sockets(), Vec::<PathBuf>::new(), "socket left");
}

#[test]
fn sigterm_is_forwarded_to_cmd() {
    assert_forwarded(Signal::SIGTERM, "TERM");
}

#[test]
fn sighup_is_forwarded_to_cmd() {
    assert_forwarded(Signal::SIGHUP, "HUP");
}

#[test]
fn sigquit_is_forwarded_to_cmd() {
    assert_forwarded(Signal::SIGQUIT, "QUIT");
}

#[test]
fn sigint_is_forwarded_to_cmd() {
    assert_forwarded(Signal::SIGINT, "INT");
}

#[test]
fn the_proxy_keeps_serving_while_cmd_handles_a_forwarded_signal() {
    for (signal, name) in [(Signal::SIGTERM, "TERM"), (Signal::SIGINT, "INT")] {
        let f = Fixture::seeded();
        let script = format!(
            "trap '\"$1\" token get anthropic; echo \"rc=$?\"; exit 9' {name}\n\
             echo ready\nwhile :; do sleep 0.05; done"
        );
        let mut live = f.live(&["--allow", "anthropic"], &refs(&sh(&script)));
        live.wait_line("ready");
        live.signal(signal);
        let run = live.finish();
        run.assert_code(9);
        let lines: Vec<&str> = run.stdout.lines().collect();
        assert_eq!(lines.len(), 3, "{name}: {run:?}");
        assert_eq!(
            serde_json::from_str::<Value>(lines[1]).expect("json"),
            sanitized(CANARY_AT),
            "{name}: {run:?}"
        );
        assert_eq!(lines[2], "rc=0", "{name}: {run:?}");
    }
}

/// CMD traps and ignores the stop signals; the second one makes credproxy kill it.
fn assert_escalates(first: Signal, second: Signal) {
    let f = Fixture::seeded();
    let script = "trap 'echo got-stop' TERM INT\necho ready\nwhile :; do sleep 0.05; done";
    let mut live = f.live(&["--allow", "anthropic"], &["/bin/sh", "-c", script]);
    live.wait_line("ready");
    live.signal(first);
    // The first one was forwarded and ignored: CMD is still running.
    live.wait_line("got-stop");
    live.signal(second);
    let run = live.finish();
    assert_eq!(run.code(), Some(137), "{first} then {second}: {run:?}");
    assert!(
        run.stdout.starts_with("ready\ngot-stop\n"),
        "{first} then {second}: {run:?}"
    );
    assert_eq!(f.sockets(), Vec::<PathBuf>::new(), "socket left");
}

#[test]
fn a_second_sigterm_kills_cmd_and_exits_137() {
    assert_escalates(Signal::SIGTERM, Signal::SIGTERM);
}

#[test]
fn a_second_sigint_kills_cmd_and_exits_137() {
    assert_escalates(Signal::SIGINT, Signal::SIGINT);
}

#[test]
fn sighup_does_not_count_towards_escalation() {
    let f = Fixture::seeded();
    let script = "trap 'echo got-hup' HUP\ntrap 'echo got-term; exit 5' TERM\necho ready\n\
                  while :; do sleep 0.05; done";
    let mut live = f.live(&["--allow", "anthropic"], &["/bin/sh", "-c", script]);
    live.wait_line("ready");
    live.signal(Signal::SIGHUP);
    live.wait_line("got-hup");
    // One stop signal after a HUP is a first stop signal: forwarded, not SIGKILL.
    live.signal(Signal::SIGTERM);
    let run = live.finish();
    run.assert_code(5);
    assert_eq!(run.stdout, "ready\ngot-hup\ngot-term\n", "{run:?}");
}

// ---------------------------------------------------------------------------------------
// Start failures, CMD not runnable
// ---------------------------------------------------------------------------------------

#[test]
fn a_proxy_that_cannot_start_never_runs_cmd() {
    let f = Fixture::seeded();
    let cmd = f.marker_cmd();
    let cmd = refs(&cmd);

    // The socket directory does not exist.
    let missing = f.tmp.path().join("missing");
    let mut args = f.exec_args(&["--allow", "anthropic"], &cmd);
    args[4] = path_str(&missing);
    let run = run_program(BIN, &args, &[]);
    run.assert_start_failed(None, &["missing"]);
    assert!(!f.marker().exists(), "CMD ran: {run:?}");
    assert!(!missing.exists());

    // The socket directory is writable by others.
    let open = f.tmp.path().join("open");
    fs::create_dir(&open).expect("mkdir");
    fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).expect("chmod");
    let mut args = f.exec_args(&["--allow", "anthropic"], &cmd);
    args[4] = path_str(&open);
    let run = run_program(BIN, &args, &[]);
    run.assert_start_failed(None, &["writable by group or others"]);
    assert!(!f.marker().exists(), "CMD ran: {run:?}");

    // An invalid --allow name: a usage error.
    let run = f.exec(&["--allow", "bad/name"], &cmd);
    run.assert_start_failed(Some(2), &["bad/name"]);
    assert!(!f.marker().exists(), "CMD ran: {run:?}");

    // An invalid --allow-key name.
    let run = f.exec(&["--allow-key", "a@b"], &cmd);
    run.assert_start_failed(Some(2), &["a@b"]);
    assert!(!f.marker().exists(), "CMD ran: {run:?}");

    // A profile file that does not exist.
    let absent = f.tmp.path().join("absent.toml");
    let run = f.exec(&["--profile", &path_str(&absent)], &cmd);
    run.assert_start_failed(None, &["absent.toml"]);
    assert!(!f.marker().exists(), "CMD ran: {run:?}");

    // A bad profile file.
    let bad = f.profile(
        "bad.toml",
        "allow = [\"anthropic\"]\nallow_everything = true\n",
    );
    let run = f.exec(&["--profile", &bad], &cmd);
    run.assert_start_failed(Some(2), &[&bad, "line 2", "allow_everything"]);
    assert!(!f.marker().exists(), "CMD ran: {run:?}");

    assert_eq!(f.sockets(), Vec::<PathBuf>::new());
    // The control: the same CMD does run when the proxy starts.
    f.exec(&["--allow", "anthropic"], &cmd).assert_code(0);
    assert!(f.marker().exists(), "the marker command works");
}

#[test]
fn exec_without_a_command_is_a_usage_error() {
    let f = Fixture::seeded();
    let mut args = f.exec_args(&["--allow", "anthropic"], &[]);
    args.pop(); // "--"
    let run = run_program(BIN, &args, &[]);
    run.assert_code(2);
    assert_eq!(run.stderr.lines().count(), 1, "{run:?}");
    assert_eq!(f.sockets(), Vec::<PathBuf>::new());
}

#[test]
fn a_cmd_that_is_not_found_exits_127_after_cleaning_up() {
    let f = Fixture::seeded();
    let absolute = f.tmp.path().join("no-such-command");
    let absolute = path_str(&absolute);
    for cmd in [absolute.as_str(), "credproxy-no-such-command-3f9e"] {
        let run = f.exec(&["--allow", "anthropic"], &[cmd, "arg"]);
        run.assert_code(127);
        assert!(
            run.stderr.contains(cmd) && run.stderr.contains("not found"),
            "{run:?}"
        );
        assert_eq!(run.stdout, "", "{run:?}");
        assert_eq!(f.sockets(), Vec::<PathBuf>::new(), "{cmd}: socket left");
    }
}

#[test]
fn a_cmd_that_is_not_executable_exits_126_after_cleaning_up() {
    let f = Fixture::seeded();
    let script = f.tmp.path().join("script.sh");
    fs::write(
        &script,
        format!("#!/bin/sh\ntouch '{}'\n", f.marker().display()),
    )
    .expect("write script");
    fs::set_permissions(&script, fs::Permissions::from_mode(0o644)).expect("chmod 0644");
    let script = path_str(&script);
    let run = f.exec(&["--allow", "anthropic"], &[&script]);
    run.assert_code(126);
    assert!(run.stderr.contains(&script), "{run:?}");
    assert!(!f.marker().exists(), "the script ran: {run:?}");
    assert_eq!(f.sockets(), Vec::<PathBuf>::new(), "socket left");

    // A directory is not executable either.
    let dir = path_str(f.tmp.path());
    let run = f.exec(&["--allow", "anthropic"], &[&dir]);
    run.assert_code(126);
    assert_eq!(f.sockets(), Vec::<PathBuf>::new(), "socket left");
}

// ---------------------------------------------------------------------------------------
// Profiles
// ---------------------------------------------------------------------------------------

/// Runs each `credproxy` command line inside exec and prints `rc=<status>` after it
/// (inside commands' stderr goes to stdout, so refusals are visible).
fn probes(commands: &[&str]) -> String {
    commands
        .iter()
        .map(|c| format!("\"$1\" {c} 2>&1; echo \"rc=$?\"\n"))
        .collect()
}

#[test]
fn a_profile_allows_what_it_lists_and_nothing_else() {
    let f = Fixture::seeded();
    let profile = f.profile(
        "p.toml",
        "# the sandbox's grants\nallow = [\"anthropic\"]\n",
    );
    let script = probes(&["token get anthropic", "token get openai", "key get openai"]);
    let run = f.exec(&["--profile", &profile], &refs(&sh(&script)));
    run.assert_code(0);
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), 6, "{run:?}");
    assert_eq!(
        serde_json::from_str::<Value>(lines[0]).expect("json"),
        sanitized(CANARY_AT)
    );
    assert_eq!(lines[1], "rc=0");
    assert!(lines[2].contains("UNAUTHORIZED"), "{run:?}");
    assert_eq!(lines[3], "rc=3", "{run:?}");
    assert!(lines[4].contains("UNAUTHORIZED"), "{run:?}");
    assert_eq!(lines[5], "rc=3", "{run:?}");
}

#[test]
fn flags_add_to_the_profile() {
    let f = Fixture::seeded();
    let profile = f.profile("p.toml", "allow = [\"anthropic\"]\n");
    let script = probes(&[
        "key get openai",
        "key get anthropic",
        "token get anthropic --bucket work",
        "token get openai",
    ]);
    let run = f.exec(
        &["--profile", &profile, "--allow-key", "openai"],
        &refs(&sh(&script)),
    );
    run.assert_code(0);
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), 8, "{run:?}");
    assert_eq!(lines[..2], ["sk-openai", "rc=0"], "{run:?}");
    assert_eq!(lines[2..4], [CANARY_KEY, "rc=0"], "{run:?}");
    assert_eq!(
        serde_json::from_str::<Value>(lines[4]).expect("json"),
        sanitized("at-anthropic-work")
    );
    assert_eq!(lines[5], "rc=0");
    // --allow-key grants the key only, not the provider's tokens.
    assert!(lines[6].contains("UNAUTHORIZED"), "{run:?}");
    assert_eq!(lines[7], "rc=3", "{run:?}");

    // --read-only adds to a profile that leaves it off.
    let save = "printf '%s' '{\"access_token\":\"x\",\"expiry\":1,\"token_type\":\"B\"}' \
                | \"$1\" token save anthropic 2>&1; echo \"rc=$?\"";
    let run = f.exec(&["--profile", &profile, "--read-only"], &refs(&sh(save)));
    run.assert_code(0);
    assert!(run.stdout.contains("FORBIDDEN"), "{run:?}");
    assert!(run.stdout.ends_with("rc=3\n"), "{run:?}");
}

#[test]
fn a_malformed_profile_names_the_file_and_the_line() {
    let f = Fixture::seeded();
    let cmd = f.marker_cmd();
    for (name, text, line, needle) in [
        (
            "unknown.toml",
            "allow = [\"anthropic\"]\n\nproviders = [\"x\"]\n",
            3,
            "providers",
        ),
        (
            "badname.toml",
            "allow = [\n  \"anthropic\",\n  \"bad/name\",\n]\n",
            3,
            "bad/name",
        ),
        (
            "syntax.toml",
            "read_only = true\nallow = [\"a\" \"b\"]\n",
            2,
            "",
        ),
        ("type.toml", "\nrate_limit = \"fast\"\n", 2, "rate_limit"),
    ] {
        let path = f.profile(name, text);
        let run = f.exec(&["--profile", &path, "--allow", "anthropic"], &refs(&cmd));
        run.assert_start_failed(Some(2), &[&path, &format!("line {line}"), needle]);
        assert!(!f.marker().exists(), "{name}: CMD ran: {run:?}");
        assert_eq!(f.sockets(), Vec::<PathBuf>::new(), "{name}");
    }
}

// ---------------------------------------------------------------------------------------
// Logging
// ---------------------------------------------------------------------------------------

#[test]
fn json_logs_are_one_object_per_line_with_request_lines_and_no_secret() {
    let f = Fixture::seeded();
    let saved = f.tmp.path().join("saved.json");
    fs::write(&saved, token_json(CANARY_SAVED_AT, CANARY_SAVED_RT)).expect("write");
    let script = format!(
        "\"$1\" token get anthropic >/dev/null || exit 11
\"$1\" token get anthropic --bucket work >/dev/null || exit 12
\"$1\" key get anthropic >/dev/null || exit 13
\"$1\" token get openai >/dev/null 2>&1; test $? = 3 || exit 14
\"$1\" token save anthropic --bucket work < '{}' || exit 15
echo \"pid=$$\"
exec \"$1\" token list >/dev/null",
        saved.display()
    );
    let run = f.exec_env(
        &["--allow", "anthropic", "--log-format", "json"],
        &refs(&sh(&script)),
        &[("RUST_LOG", "debug")],
    );
    run.assert_code(0);
    let pid: u64 = run
        .stdout
        .trim_end()
        .strip_prefix("pid=")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("{run:?}"));

    let mut events = Vec::new();
    for line in run.stderr.lines() {
        let v: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("stderr line is not JSON ({e}): {line:?}"));
        assert!(v.is_object(), "not an object: {line}");
        events.push(v);
    }
    assert!(!events.is_empty(), "no log at debug: {run:?}");

    let requests: Vec<&Value> = events
        .iter()
        .filter(|v| v.get("op").is_some() && v.get("outcome").is_some())
        .collect();
    let seen: BTreeSet<(String, String)> = requests
        .iter()
        .map(|v| {
            (
                v["op"].as_str().unwrap_or_default().to_owned(),
                v["outcome"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    for want in [
        ("get_token", "ok"),
        ("get_token", "UNAUTHORIZED"),
        ("get_api_key", "ok"),
        ("save_token", "ok"),
        ("list_providers", "ok"),
    ] {
        assert!(
            seen.contains(&(want.0.to_owned(), want.1.to_owned())),
            "no request line for {want:?}; saw {seen:?}; stderr: {}",
            run.stderr
        );
    }
    for v in &requests {
        for field in ["uid", "pid", "session"] {
            assert!(v[field].is_u64(), "request line without {field}: {v}");
        }
    }
    // Token requests name the provider and the bucket (never a value).
    let work = requests
        .iter()
        .find(|v| v["op"] == "get_token" && v["bucket"] == "work")
        .unwrap_or_else(|| panic!("no get_token line with bucket work: {}", run.stderr));
    let fields: Vec<&Value> = work.as_object().expect("object").values().collect();
    assert!(
        fields.contains(&&json!("anthropic")),
        "the provider is not named: {work}"
    );
    // The last command ran as the shell's pid (exec): its connection is logged with it.
    assert!(
        requests
            .iter()
            .any(|v| v["op"] == "list_providers" && v["pid"] == json!(pid)),
        "no list_providers line with pid {pid}: {}",
        run.stderr
    );
    for message in ["connection opened", "connection closed"] {
        assert!(
            events.iter().any(|v| v.to_string().contains(message)),
            "no {message:?} event: {}",
            run.stderr
        );
    }
    // The saved token reached the store (the request really was served).
    let stored = fs::read_to_string(f.store.join("tokens/anthropic/work.json")).expect("read");
    assert!(stored.contains(CANARY_SAVED_AT), "{stored}");
}

#[test]
fn text_logs_at_debug_show_connections_with_peer_uid_and_pid() {
    let f = Fixture::seeded();
    let run = f.exec_env(
        &["--allow", "anthropic"],
        &refs(&sh(
            "echo \"pid=$$\"; exec \"$1\" token get anthropic >/dev/null",
        )),
        &[("RUST_LOG", "debug")],
    );
    run.assert_code(0);
    let pid = run
        .stdout
        .trim_end()
        .strip_prefix("pid=")
        .unwrap_or_else(|| panic!("{run:?}"))
        .to_owned();
    let uid = nix::unistd::geteuid().as_raw();
    let text = strip_ansi(&run.stderr);
    for message in ["connection opened", "connection closed"] {
        let line = text
            .lines()
            .find(|l| l.contains(message) && l.contains(&format!("pid={pid}")))
            .unwrap_or_else(|| panic!("no {message:?} line for pid {pid}: {text}"));
        assert!(line.contains(&format!("uid={uid}")), "{line}");
        assert!(line.contains("DEBUG"), "{line}");
    }
    let request = text
        .lines()
        .find(|l| l.contains("op=get_token"))
        .unwrap_or_else(|| panic!("no request line: {text}"));
    assert!(
        request.contains("outcome=\"ok\"") || request.contains("outcome=ok"),
        "{request}"
    );
    assert!(request.contains("anthropic"), "{request}");
    assert!(request.contains(&format!("pid={pid}")), "{request}");
    // Without RUST_LOG the level is info: no per-connection lines.
    let run = f.exec(
        &["--allow", "anthropic"],
        &[BIN, "token", "get", "anthropic"],
    );
    run.assert_code(0);
    assert!(!run.stderr.contains("connection opened"), "{run:?}");
}
