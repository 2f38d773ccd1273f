//! Issue 13 item 3, idle part: a connection that has finished the handshake and then
//! sends nothing for [`Limits::idle_timeout`] is closed (a request in flight keeps it
//! open), so idle connections cannot hold descriptors forever. The timer ticks at a
//! quarter of the timeout, so the close comes between 1 and 1.25 times the timeout.

mod common;
use common::*;

use std::time::{Duration, Instant};

use credproxy::Limits;
use serde_json::json;

const IDLE: Duration = Duration::from_millis(400);

fn idle_limits() -> Limits {
    Limits {
        idle_timeout: IDLE,
        ..short_limits()
    }
}

#[test]
fn an_idle_connection_after_the_handshake_is_closed() {
    let server = TestServer::start_with(allow_all(), idle_limits(), seeded());
    let mut c = server.connect();
    let reply = c.call("1", "list_providers", json!({}));
    data(&reply);
    let waited = c.time_to_close();
    assert!(
        waited >= IDLE - Duration::from_millis(20),
        "closed after {waited:?}"
    );
    // Ticks are IDLE/4 apart; allow generously for a loaded machine, but well under the
    // REPLY_WAIT that would mean "never".
    assert!(waited < IDLE * 4, "closed only after {waited:?}");
}

#[test]
fn requests_keep_a_connection_open() {
    let server = TestServer::start_with(allow_all(), idle_limits(), seeded());
    let mut c = server.connect();
    let t0 = Instant::now();
    let mut n = 0;
    while t0.elapsed() < IDLE * 3 {
        n += 1;
        let reply = c.call(&format!("r{n}"), "list_providers", json!({}));
        data(&reply);
        std::thread::sleep(IDLE / 4);
    }
    // Still open after three idle timeouts of wall time.
    let reply = c.call("last", "list_providers", json!({}));
    data(&reply);
}
