//! `credproxy serve --capability-token` (PROTOCOL.md §13) as a real process: it prints
//! `LLXPRT_CAPABILITY_TOKEN=<hex>` right after the socket line; a raw-frame client (frames
//! written by hand, no credproxy client code) presenting it is served at version 2 and at
//! version 1; a wrong or missing token is refused with `UNAUTHORIZED` and the connection
//! closed; the log names the refused peer's uid and pid and holds neither the right nor
//! the wrong token. The profile key turns it on too. And the inside commands reading the
//! token from `LLXPRT_CAPABILITY_FD`: a good descriptor, a missing one, bad content, too
//! much content, an empty one, a bad variable, each with a clear error that never shows
//! what the descriptor or the variable held.

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver};
use std::thread::{self, JoinHandle};

use common::process::{
    drain, run, sanitized, spawn_piped, Canaries, ChildGuard, Env, Fixture, Run, Stdin, BIN,
    DEADLINE, SOCKET_PREFIX, SOCKET_VAR,
};
use common::Raw;
use credproxy::codec::encode_frame;
use nix::sys::signal::Signal;
use serde_json::{json, Value};

const CANARY_AT: &str = "CANARY-AT-0b9d";
const CANARY_RT: &str = "CANARY-RT-77c2";
/// A well-formed token that is not the launch's.
const WRONG_TOKEN: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
/// Content a descriptor holds that is not a token.
const BAD_CONTENT: &str = "CANARY-NOT-A-TOKEN-c3";

const CANARIES: Canaries = Canaries {
    never: &[CANARY_RT],
    not_logged: &[CANARY_AT, WRONG_TOKEN, BAD_CONTENT],
};

/// The start of the second line.
const TOKEN_PREFIX: &str = "LLXPRT_CAPABILITY_TOKEN=";

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// A running `credproxy serve` whose stdout is read line by line.
struct Serve {
    child: ChildGuard,
    lines: Receiver<String>,
    /// Reads stdout to its end, sending each line.
    reader: JoinHandle<()>,
    stderr: JoinHandle<String>,
    socket: PathBuf,
}

impl Serve {
    /// `credproxy serve --store S --socket-dir D --allow anthropic EXTRA...`, once its
    /// socket line is out.
    fn start(f: &Fixture, extra: &[&str]) -> Serve {
        let mut args = vec![
            "serve",
            "--store",
            f.store_str(),
            "--socket-dir",
            f.sock_str(),
        ];
        args.extend_from_slice(&["--allow", "anthropic"]);
        args.extend_from_slice(extra);
        let mut child = spawn_piped(&mut Env::ISOLATED.command(BIN, &args)).expect("spawn serve");
        let stdout = child.stdout.take().expect("stdout");
        let stderr = drain(child.stderr.take().expect("stderr"));
        let (tx, lines) = mpsc::channel();
        let reader = thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let child = ChildGuard::new(child, true);
        let first = lines.recv_timeout(DEADLINE).expect("the socket line");
        let socket = PathBuf::from(first.strip_prefix(SOCKET_PREFIX).expect("socket line"));
        Serve {
            child,
            lines,
            reader,
            stderr,
            socket,
        }
    }

    /// The token of the second line, which must follow the socket line at once.
    fn token_line(&self) -> String {
        let line = self.lines.recv_timeout(DEADLINE).expect("a second line");
        let token = line
            .strip_prefix(TOKEN_PREFIX)
            .unwrap_or_else(|| panic!("unexpected second line {line:?}"))
            .to_owned();
        assert_eq!(token.len(), 64, "{line:?}");
        assert!(
            token
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')),
            "{line:?}"
        );
        token
    }

    /// Stops the server; returns what else it printed on stdout, and its stderr.
    fn stop(mut self) -> (Vec<String>, String) {
        self.child.signal(Signal::SIGTERM);
        let status = self.child.wait_exit("serve");
        assert!(status.success(), "{status:?}");
        self.reader.join().expect("stdout reader");
        let rest = self.lines.try_iter().collect();
        (rest, self.stderr.join().expect("stderr"))
    }
}

/// Writes a handshake offering `min..=max` with `token` (if any) as a hand-made frame on a
/// fresh connection; returns the connection and the reply.
fn handshake(socket: &std::path::Path, min: u64, max: u64, token: Option<&str>) -> (Raw, Value) {
    let mut payload = json!({"minVersion": min, "maxVersion": max});
    if let Some(token) = token {
        payload["capabilityToken"] = json!(token);
    }
    let hello = json!({"v": 1, "op": "handshake", "payload": payload});
    let mut raw = Raw::connect(socket);
    raw.write(&encode_frame(hello.to_string().as_bytes()));
    let reply = raw.recv();
    (raw, reply)
}

/// Asserts the refusal of a handshake (§13): UNAUTHORIZED at the server's highest
/// version, no id, then the connection closed.
#[track_caller]
fn assert_refused(mut raw: Raw, reply: &Value) {
    let obj = reply.as_object().expect("object");
    let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["code", "error", "ok", "op", "v"], "{reply}");
    assert_eq!(
        (&reply["v"], &reply["op"], &reply["ok"], &reply["code"]),
        (
            &json!(2),
            &json!("handshake"),
            &json!(false),
            &json!("UNAUTHORIZED")
        ),
        "{reply}"
    );
    raw.expect_closed();
}

/// A `get_token` for anthropic as a hand-made frame; returns the reply.
fn get_token(raw: &mut Raw, v: u64) -> Value {
    let req = json!({"v": v, "id": "1", "op": "get_token", "payload": {"provider": "anthropic"}});
    raw.write(&encode_frame(req.to_string().as_bytes()));
    raw.recv()
}

impl Fixture {
    fn seeded() -> Fixture {
        let f = Fixture::new();
        f.seed_token("anthropic", "default", CANARY_AT, CANARY_RT);
        f
    }
}

// ---------------------------------------------------------------------------------------
// serve
// ---------------------------------------------------------------------------------------

#[test]
fn serve_prints_the_token_and_serves_only_those_who_present_it() {
    let f = Fixture::seeded();
    let server = Serve::start(&f, &["--capability-token"]);
    let token = server.token_line();

    // The holder, at version 2 and at version 1.
    let (mut raw, reply) = handshake(&server.socket, 1, 2, Some(&token));
    assert_eq!(
        reply,
        json!({"v":2,"op":"handshake","ok":true,"data":{"version":2}})
    );
    let got = get_token(&mut raw, 2);
    assert_eq!(
        got,
        json!({"v":2,"id":"1","ok":true,"data":sanitized(CANARY_AT)})
    );
    let (mut raw, reply) = handshake(&server.socket, 1, 1, Some(&token));
    assert_eq!(
        reply,
        json!({"v":1,"op":"handshake","ok":true,"data":{"version":1}})
    );
    assert_eq!(get_token(&mut raw, 1)["data"], sanitized(CANARY_AT));

    // Everyone else: another token, none, the right one in upper case or with its newline.
    let upper = token.to_uppercase();
    let with_newline = format!("{token}\n");
    for presented in [Some(WRONG_TOKEN), None, Some(&upper), Some(&with_newline)] {
        let (raw, reply) = handshake(&server.socket, 1, 2, presented);
        assert_refused(raw, &reply);
    }
    // A version-1 client without one too.
    let (raw, reply) = handshake(&server.socket, 1, 1, None);
    assert_refused(raw, &reply);

    let (rest, stderr) = server.stop();
    assert!(rest.is_empty(), "more on stdout: {rest:?}");
    CANARIES.absent("serve's log", &stderr);
    for secret in [&token, &upper] {
        assert!(
            !stderr.contains(secret.as_str()),
            "the token is in the log: {stderr}"
        );
    }
    let peer = format!("uid={} pid={}", nix::unistd::getuid(), std::process::id());
    let refusals: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("capability token refused"))
        .collect();
    assert_eq!(refusals.len(), 5, "{stderr}");
    assert!(
        refusals.iter().all(|l| l.contains(&peer)),
        "{peer}: {refusals:?}"
    );
}

#[test]
fn serve_without_the_flag_prints_one_line_and_ignores_a_token() {
    let f = Fixture::seeded();
    let server = Serve::start(&f, &[]);
    let (mut raw, reply) = handshake(&server.socket, 1, 2, Some(WRONG_TOKEN));
    assert_eq!(
        reply,
        json!({"v":2,"op":"handshake","ok":true,"data":{"version":2}})
    );
    assert_eq!(get_token(&mut raw, 2)["data"], sanitized(CANARY_AT));
    let (rest, stderr) = server.stop();
    assert!(rest.is_empty(), "a second line without the flag: {rest:?}");
    CANARIES.absent("serve's log", &stderr);
}

#[test]
fn the_profile_key_turns_it_on_and_a_wrong_type_is_refused() {
    let f = Fixture::seeded();
    let profile = f.tmp.path().join("p.toml");
    std::fs::write(&profile, "capability_token = true\n").expect("write profile");
    let server = Serve::start(&f, &["--profile", profile.to_str().expect("utf-8")]);
    let token = server.token_line();
    let (raw, reply) = handshake(&server.socket, 1, 2, None);
    assert_refused(raw, &reply);
    let (_raw, reply) = handshake(&server.socket, 1, 2, Some(&token));
    assert_eq!(reply["ok"], json!(true), "{reply}");
    server.stop();

    std::fs::write(&profile, "\ncapability_token = \"yes\"\n").expect("write profile");
    let args = [
        "serve",
        "--store",
        f.store_str(),
        "--socket-dir",
        f.sock_str(),
        "--profile",
        profile.to_str().expect("utf-8"),
    ];
    let run = run(BIN, &args, Stdin::Null, Env::ISOLATED);
    assert_eq!(run.code(), Some(2), "{run:?}");
    assert_eq!(run.stdout, "", "{run:?}");
    assert!(
        run.stderr
            .contains("p.toml, line 2: `capability_token`: invalid type: string"),
        "{run:?}"
    );
}

// ---------------------------------------------------------------------------------------
// The inside commands reading the descriptor
// ---------------------------------------------------------------------------------------

/// Runs `sh -c SCRIPT sh BIN` (the script runs `credproxy token get anthropic` with some
/// descriptor 3) with the socket variable and `vars`; checks that nothing leaked.
fn inside(server: &Serve, script: &str, stdin: &[u8], vars: &[(&str, &str)]) -> Run {
    let socket = server.socket.to_str().expect("utf-8");
    let mut all = vec![(SOCKET_VAR, socket)];
    all.extend_from_slice(vars);
    let run = run(
        "/bin/sh",
        &["-c", script, "sh", BIN],
        Stdin::Pipe(stdin),
        Env::ISOLATED.with(&all),
    );
    CANARIES.check_run(script, &run);
    run
}

/// `credproxy token get anthropic` reading its token from descriptor 3 = the test's stdin.
const FROM_STDIN: &str = r#"exec "$1" token get anthropic 3<&0 </dev/null"#;

/// Asserts a failure before any connection: exit 4 and one line with `needle`.
#[track_caller]
fn assert_no_token(run: &Run, needle: &str) {
    assert_eq!(run.code(), Some(4), "{run:?}");
    assert_eq!(run.stdout, "", "{run:?}");
    assert_eq!(run.stderr.lines().count(), 1, "{run:?}");
    assert!(
        run.stderr
            .starts_with("credproxy: UNREACHABLE: no capability token: "),
        "{run:?}"
    );
    assert!(run.stderr.contains(needle), "{needle}: {run:?}");
}

#[test]
fn inside_commands_read_the_descriptor_once_and_say_clearly_what_is_wrong() {
    let f = Fixture::seeded();
    let server = Serve::start(&f, &["--capability-token"]);
    let token = server.token_line();
    let fd3 = [("LLXPRT_CAPABILITY_FD", "3")];

    // Good, with its newline and without.
    for content in [format!("{token}\n"), token.clone()] {
        let run = inside(&server, FROM_STDIN, content.as_bytes(), &fd3);
        assert_eq!(run.code(), Some(0), "{run:?}");
        let got: Value = serde_json::from_str(&run.stdout).expect("token JSON");
        assert_eq!(got, sanitized(CANARY_AT));
        assert_eq!(run.stderr, "", "{run:?}");
    }
    // The same descriptor is read once: a process reading it after another finds it empty.
    let twice =
        r#"exec 3<&0 </dev/null; "$1" token get anthropic >/dev/null && "$1" token get anthropic"#;
    let run = inside(&server, twice, format!("{token}\n").as_bytes(), &fd3);
    assert_no_token(
        &run,
        "descriptor 3 is empty: its capability token was read already",
    );

    // No descriptor 7 at all.
    let run = inside(&server, FROM_STDIN, b"", &[("LLXPRT_CAPABILITY_FD", "7")]);
    assert_no_token(
        &run,
        "names descriptor 7, which is not open in this process",
    );
    // Not a token, and more than one.
    let bad = format!("{BAD_CONTENT}\n");
    let run = inside(&server, FROM_STDIN, bad.as_bytes(), &fd3);
    assert_no_token(&run, "descriptor 3 does not hold a capability token");
    let long = format!("{token}\n{token}\n");
    let run = inside(&server, FROM_STDIN, long.as_bytes(), &fd3);
    assert_no_token(&run, "descriptor 3 holds more than a capability token");
    assert!(!run.stderr.contains(&token[..16]), "{run:?}");
    let run = inside(&server, FROM_STDIN, b"", &fd3);
    assert_no_token(&run, "descriptor 3 is empty");
    // A bad variable: stdio, or not a number (here the token itself, which is not shown).
    let run = inside(&server, FROM_STDIN, b"", &[("LLXPRT_CAPABILITY_FD", "2")]);
    assert_no_token(&run, "0, 1 and 2 are stdin, stdout and stderr");
    let run = inside(
        &server,
        FROM_STDIN,
        b"",
        &[("LLXPRT_CAPABILITY_FD", &token)],
    );
    assert_no_token(&run, "LLXPRT_CAPABILITY_FD is not a descriptor number");
    assert!(!run.stderr.contains(&token[..16]), "{run:?}");

    let (_, stderr) = server.stop();
    assert!(
        !stderr.contains(&token),
        "the token is in the log: {stderr}"
    );
    CANARIES.absent("serve's log", &stderr);
}
