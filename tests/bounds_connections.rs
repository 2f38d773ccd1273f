//! Issue 13 item 3, connection caps: past [`Limits::max_connections`] (all peers) or
//! [`Limits::max_connections_per_pid`] (one peer process), a new connection is accepted
//! and closed at once with one handshake error frame (`RESOURCE_EXHAUSTED`), never left
//! hanging in the backlog; a slot freed by a close is usable again.

mod common;
use common::*;

use std::time::{Duration, Instant};

use credproxy::Limits;
use serde_json::json;

/// Connects and expects the refusal frame then EOF, promptly.
fn expect_refused(server: &TestServer) {
    let t0 = Instant::now();
    let mut c = Raw::connect(&server.path);
    let frame = c.try_recv().expect("a refusal frame before the close");
    assert_eq!(frame["ok"], json!(false), "{frame}");
    assert_eq!(frame["op"], json!("handshake"), "{frame}");
    assert_eq!(frame["code"], json!("RESOURCE_EXHAUSTED"), "{frame}");
    c.expect_closed();
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
}

/// Connects with the handshake, retrying until `deadline` while refused (a closed slot
/// is freed when the supervisor hears of the close, a moment later).
fn connect_when_free(server: &TestServer, deadline: Duration) -> Raw {
    let t0 = Instant::now();
    loop {
        let mut c = Raw::connect(&server.path);
        let hello = json!({"v":1,"op":"handshake","payload":{"minVersion":1,"maxVersion":1}});
        // A refused connection may be closed before the handshake is written (EPIPE):
        // that is a refusal too, tried again.
        let written =
            std::io::Write::write_all(&mut c.stream, &frame(hello.to_string().as_bytes()));
        let answer = if written.is_ok() { c.try_recv() } else { None };
        match answer {
            Some(v) if v["ok"] == json!(true) => return c,
            other => assert!(t0.elapsed() < deadline, "still refused: {other:?}"),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn connections_over_the_global_cap_are_refused_at_once() {
    let limits = Limits {
        max_connections: 3,
        max_connections_per_pid: 100,
        ..short_limits()
    };
    let mut server = TestServer::start_with(allow_all(), limits, seeded());
    let mut open: Vec<Raw> = (0..3).map(|_| server.connect()).collect();
    expect_refused(&server);
    expect_refused(&server);
    // The open ones still work.
    let reply = open[0].call("1", "list_providers", json!({}));
    data(&reply);
    drop(open.pop());
    let mut again = connect_when_free(&server, Duration::from_secs(3));
    data(&again.call("2", "list_providers", json!({})));
    expect_refused(&server);
    let report = server.shutdown();
    assert!(report.connections_refused >= 3, "{report:?}");
}

#[test]
fn connections_over_the_per_pid_cap_are_refused() {
    // Every connection of this test comes from this process: one pid.
    let limits = Limits {
        max_connections: 100,
        max_connections_per_pid: 2,
        ..short_limits()
    };
    let server = TestServer::start_with(allow_all(), limits, seeded());
    let mut open: Vec<Raw> = (0..2).map(|_| server.connect()).collect();
    expect_refused(&server);
    drop(open.pop());
    let _again = connect_when_free(&server, Duration::from_secs(3));
    expect_refused(&server);
}
