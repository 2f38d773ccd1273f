//! The inside commands fail loudly when they cannot write what they fetched: stdout on a
//! full device (`/dev/full`) or a pipe whose reader is gone. They exit
//! [`OUTPUT_FAILED`] with one `credproxy: cannot write the output: ...` line naming the
//! cause (never the secret), instead of exiting 0 as if the sandbox had the value.

mod common;

use std::fs::OpenOptions;
use std::process::{Command, Stdio};

use common::process::{drain, Canaries, ChildGuard, Env, Fixture, Server, BIN};

const CANARY_AT: &str = "CANARY-AT-0f31";
const CANARY_RT: &str = "CANARY-RT-77c2";
const CANARY_KEY: &str = "CANARY-KEY-5a90";

const CANARIES: Canaries = Canaries {
    never: &[CANARY_RT],
    not_logged: &[CANARY_AT, CANARY_KEY],
};

/// The documented exit status for "cannot write the output".
const OUTPUT_FAILED: i32 = 6;

/// Every inside command that prints something.
const PRINTING: &[&[&str]] = &[
    &["key", "get", "openai"],
    &["key", "list"],
    &["key", "list", "--json"],
    &["token", "get", "anthropic"],
    &["token", "list"],
    &["token", "list", "--json"],
    &["token", "buckets", "anthropic"],
    &["token", "buckets", "anthropic", "--json"],
    &["token", "stats", "anthropic"],
];

fn serve() -> (Fixture, Server) {
    let f = Fixture::new();
    f.seed_token("anthropic", "default", CANARY_AT, CANARY_RT);
    f.seed_key("openai", CANARY_KEY);
    let server = f.start_serve(&["--allow-all", "--rate-limit", "0"], Env::ISOLATED);
    (f, server)
}

/// Runs `credproxy ARGS` against `server` with stdout `out`; returns (exit code, stderr).
fn run_into(server: &Server, args: &[&str], out: Stdio) -> (Option<i32>, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_remove("RUST_LOG")
        .env("LLXPRT_CREDENTIAL_SOCKET", server.socket_str())
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn");
    let stderr = drain(child.stderr.take().expect("stderr"));
    let mut guard = ChildGuard::new(child, false);
    let status = guard.wait_exit(&format!("{args:?}"));
    let stderr = stderr.join().expect("stderr thread");
    CANARIES.check(&format!("{args:?}"), "", &stderr);
    (status.code(), stderr)
}

#[track_caller]
fn assert_output_failed(args: &[&str], got: (Option<i32>, String), cause: &str) {
    let (code, stderr) = got;
    assert_eq!(code, Some(OUTPUT_FAILED), "{args:?}: stderr {stderr:?}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{args:?}: one stderr line: {stderr:?}");
    assert!(
        lines[0].starts_with("credproxy: cannot write the output: "),
        "{args:?}: {stderr:?}"
    );
    assert!(
        lines[0].contains(cause),
        "{args:?}: {cause:?} in {stderr:?}"
    );
}

#[test]
fn a_full_stdout_fails_every_printing_command() {
    let (_f, server) = serve();
    for args in PRINTING {
        let full = OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .expect("/dev/full");
        let got = run_into(&server, args, Stdio::from(full));
        assert_output_failed(args, got, "No space left on device");
    }
}

#[test]
fn a_closed_pipe_fails_every_printing_command() {
    let (_f, server) = serve();
    for args in PRINTING {
        let (read, write) = nix::unistd::pipe().expect("pipe");
        // Nobody will ever read: the write end is a pipe with no reader.
        drop(read);
        let got = run_into(&server, args, Stdio::from(write));
        assert_output_failed(args, got, "Broken pipe");
    }
}

#[test]
fn the_same_commands_succeed_on_a_working_stdout() {
    // The control: the failures above come from the output, not from the requests.
    let (_f, server) = serve();
    for args in PRINTING {
        let (code, stderr) = run_into(&server, args, Stdio::null());
        assert_eq!(code, Some(0), "{args:?}: {stderr:?}");
        assert_eq!(stderr, "", "{args:?}");
    }
}
