//! Canary secrets pushed through every operation and error path with logs captured at
//! `trace`: no canary appears in any log line or `Debug` output, and the refresh-token
//! canary never appears in any byte the server writes to a client.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use common::*;
use credproxy::backend::{Backend, FileBackend, MemoryBackend, SaveMode};
use credproxy::policy::Profile;
use credproxy::secret::Secret;
use credproxy::token::Token;
use serde_json::json;

const AT: &str = "CANARY-ACCESS-3b9f1c";
const RT: &str = "CANARY-REFRESH-a71e04";
const KEY: &str = "CANARY-APIKEY-5d20c8";
const AT2: &str = "CANARY-ACCESS2-e6d413";
const RT2: &str = "CANARY-REFRESH2-0c9b77";

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("capture").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn canary_token(access: &str, refresh: &str) -> Token {
    Token::from_value(json!({
        "access_token": access, "refresh_token": refresh, "expiry": 1_900_000_000,
        "token_type": "Bearer", "id_token": format!("{access}-id")
    }))
    .expect("token")
}

/// Every operation and error path, on one connection; returns every byte the server sent.
fn exchange(path: &std::path::Path) -> Vec<u8> {
    let mut raw = Raw::connect(path);
    raw.handshake();
    let t2 =
        json!({"access_token": AT2, "refresh_token": RT2, "expiry": 2, "token_type": "Bearer"});
    let bad = json!({"access_token": AT2, "refresh_token": RT2, "expiry": "soon", "token_type": "Bearer"});
    let requests = vec![
        json!({"id":"1","op":"get_token","payload":{"provider":"anthropic"}}),
        json!({"id":"2","op":"save_token","payload":{"provider":"anthropic","token":t2}}),
        json!({"id":"3","op":"get_token","payload":{"provider":"anthropic"}}),
        json!({"id":"4","op":"save_token","payload":{"provider":"anthropic","token":bad}}),
        json!({"id":"5","op":"save_token","payload":{"provider":"outside","token":t2}}),
        json!({"id":"6","op":"save_token","payload":{"provider":"../etc","token":t2}}),
        json!({"id":"7","op":"get_api_key","payload":{"name":"anthropic"}}),
        json!({"id":"8","op":"get_api_key","payload":{"name":"missing"}}),
        json!({"id":"9","op":"has_api_key","payload":{"name":"anthropic"}}),
        json!({"id":"10","op":"list_api_keys"}),
        json!({"id":"11","op":"list_providers"}),
        json!({"id":"12","op":"list_buckets","payload":{"provider":"anthropic"}}),
        json!({"id":"13","op":"get_bucket_stats","payload":{"provider":"anthropic"}}),
        json!({"id":"14","op":"remove_token","payload":{"provider":"anthropic","bucket":"other"}}),
        json!({"id":"15","op":"get_refresh_token","payload":{"provider":"anthropic"}}),
        json!({"id":"16","op":"get_token","payload":{"provider":"anthropic","bucket":"nope"}}),
    ];
    for r in &requests {
        raw.send(r);
    }
    let mut seen = Vec::new();
    for _ in &requests {
        let reply = raw.recv();
        seen.extend_from_slice(reply.to_string().as_bytes());
        // The one reply meant to carry the access token may; the key only in reply 7.
        let id = reply["id"].as_str().expect("id").to_owned();
        let text = reply.to_string();
        if id != "1" && id != "3" {
            assert!(
                !text.contains(AT) && !text.contains(AT2),
                "access token in reply {id}: {text}"
            );
        }
        if id != "7" {
            assert!(!text.contains(KEY), "API key in reply {id}: {text}");
        }
        if id == "15" {
            // There is no way to ask for a refresh token.
            assert_eq!(code(&reply), "INVALID_REQUEST");
        }
    }
    // A malformed frame and the close that follows.
    raw.send_body(format!("{{\"id\":\"x\",\"op\":\"{KEY}").as_bytes());
    let last = raw.recv();
    seen.extend_from_slice(last.to_string().as_bytes());
    raw.expect_closed();
    seen
}

#[test]
fn no_canary_in_logs_debug_or_replies() {
    let capture = Capture::default();
    let writer = capture.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .init();

    let backend = Arc::new(MemoryBackend::new());
    backend
        .insert_token("anthropic", "default", canary_token(AT, RT))
        .expect("seed");
    backend
        .insert_key("anthropic", Secret::from(KEY))
        .expect("seed");
    let mut profile = Profile::default();
    profile.allow("anthropic").expect("allow");
    let mut s = TestServer::start_with(profile, short_limits(), backend.clone());

    let wire = exchange(&s.path);
    let wire = String::from_utf8_lossy(&wire);
    assert!(
        !wire.contains(RT) && !wire.contains(RT2),
        "a refresh token crossed the socket"
    );
    assert!(wire.contains(AT2), "the saved access token was served back");

    // The refresh token survived the sandbox's save (merge) on the host side.
    let stored = backend
        .get_token("anthropic", "default")
        .expect("get")
        .expect("stored");
    assert_eq!(stored.fields()["refresh_token"], RT);

    // Debug output of every public type that holds a secret.
    let body = serde_json::to_vec(
        &json!({"id":"1","op":"save_token","payload":{"provider":"p",
        "token":{"access_token":AT,"refresh_token":RT,"expiry":1,"token_type":"B"}}}),
    )
    .expect("json");
    let frame = credproxy::protocol::parse_frame(&body).expect("frame");
    let frame_debug = format!("{frame:?}");
    let envelope = credproxy::protocol::parse_envelope(frame).expect("envelope");
    let envelope_debug = format!("{envelope:?}");
    let debug = format!(
        "{:?} {:?} {:?} {:?} {:?} {} {}",
        stored,
        stored.served(),
        Secret::from(KEY),
        canary_token(AT, RT),
        credproxy::protocol::Request::parse(credproxy::protocol::Op::SaveToken, envelope.payload),
        frame_debug,
        envelope_debug,
    );
    for canary in [AT, RT, KEY] {
        assert!(!debug.contains(canary), "{canary} in Debug output: {debug}");
    }

    // Client-side errors carry no secret either.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    let client = credproxy::client::Client::new(&s.path);
    let err = rt
        .block_on(client.save_token("outside", None, &canary_token(AT, RT)))
        .expect_err("outside the profile");
    for text in [err.to_string(), format!("{err:?}")] {
        assert!(!text.contains(AT) && !text.contains(RT), "{text}");
    }
    let key = rt
        .block_on(client.get_api_key("anthropic"))
        .expect("get")
        .expect("key");
    assert_eq!(key.expose(), KEY);
    assert!(!format!("{key:?}").contains(KEY));
    drop(client);

    s.shutdown();
    let logs = String::from_utf8_lossy(&capture.0.lock().expect("capture")).into_owned();
    assert!(
        logs.contains("TRACE") || logs.contains("DEBUG"),
        "trace logging was captured"
    );
    assert!(
        logs.contains("op=get_token"),
        "requests were logged at debug: {logs}"
    );
    for canary in [AT, RT, KEY, AT2, RT2] {
        assert!(!logs.contains(canary), "{canary} appears in the logs");
    }
}

#[test]
fn serve_binary_at_trace_logs_no_canary() {
    serve_binary_logs_no_canary("text");
}

#[test]
fn serve_binary_at_trace_in_json_logs_no_canary() {
    serve_binary_logs_no_canary("json");
}

fn serve_binary_logs_no_canary(format: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let backend = FileBackend::open(&store).expect("store");
    backend
        .save_token(
            "anthropic",
            "default",
            &canary_token(AT, RT),
            SaveMode::Replace,
        )
        .expect("seed");
    backend
        .set_key("anthropic", &Secret::from(KEY))
        .expect("seed");
    let sockets = tempfile::tempdir().expect("tempdir");

    let mut child = Command::new(env!("CARGO_BIN_EXE_credproxy"))
        .args([
            "serve",
            "--log-format",
            format,
            "--allow",
            "anthropic",
            "--store",
        ])
        .arg(&store)
        .arg("--socket-dir")
        .arg(sockets.path())
        .env("RUST_LOG", "trace")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn serve");
    let _guard = KillOnDrop(child.id() as i32);
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    stdout.read_line(&mut line).expect("socket line");
    let path = line
        .trim()
        .strip_prefix("LLXPRT_CREDENTIAL_SOCKET=")
        .expect("socket line")
        .to_owned();

    let wire = exchange(std::path::Path::new(&path));
    let wire = String::from_utf8_lossy(&wire);
    assert!(!wire.contains(RT) && !wire.contains(RT2));

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("signal");
    let status = child.wait().expect("wait");
    assert!(status.success());
    let mut logs = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut logs)
        .expect("logs");
    assert!(
        logs.contains("TRACE") || logs.contains("DEBUG"),
        "trace logs captured: {logs}"
    );
    for canary in [AT, RT, KEY, AT2, RT2] {
        assert!(!logs.contains(canary), "{canary} appears in the serve logs");
    }
    // The file store kept the host's refresh token through the sandbox's save.
    let stored = backend
        .get_token("anthropic", "default")
        .expect("get")
        .expect("stored");
    assert_eq!(stored.fields()["refresh_token"], RT);
}

/// Kills the server if the test fails before it has stopped it.
struct KillOnDrop(i32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.0),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}
