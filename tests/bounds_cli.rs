//! `credproxy serve` options for the global bounds (issue 13 item 3): they reach the
//! server, and bad values are refused with a usage error naming the option.

mod common;
use common::process::{run, Env, Fixture, Stdin, BIN};

use std::time::{Duration, Instant};

#[test]
fn idle_timeout_option_closes_an_idle_connection() {
    let fx = Fixture::new();
    let server = fx.start_serve(&["--idle-timeout", "1"], Env::ISOLATED);
    let mut c = server.connect();
    let t0 = Instant::now();
    c.expect_closed();
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(950) && waited < Duration::from_secs(4),
        "closed after {waited:?}"
    );
}

#[test]
fn bad_idle_timeout_is_a_usage_error() {
    for bad in ["abc", "-1", "604801"] {
        let arg = format!("--idle-timeout={bad}");
        let out = run(BIN, &["serve", &arg], Stdin::Null, Env::ISOLATED);
        assert_eq!(out.code(), Some(2), "{bad}: {}", out.stderr);
        assert!(
            out.stderr.contains("--idle-timeout"),
            "{bad}: {}",
            out.stderr
        );
    }
}
