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
fn max_connections_option_caps_connections() {
    let fx = Fixture::new();
    let server = fx.start_serve(&["--max-connections", "1"], Env::ISOLATED);
    let _first = server.connect();
    let mut second = common::Raw::connect(&server.socket);
    let frame = second.try_recv().expect("a refusal frame");
    assert_eq!(frame["code"], "RESOURCE_EXHAUSTED", "{frame}");
    second.expect_closed();
}

#[test]
fn bad_bound_options_are_usage_errors() {
    for (opt, bad) in [
        ("--max-connections", "x"),
        ("--max-connections", "-1"),
        ("--max-connections-per-pid", "1.5"),
    ] {
        let arg = format!("{opt}={bad}");
        let out = run(BIN, &["serve", &arg], Stdin::Null, Env::ISOLATED);
        assert_eq!(out.code(), Some(2), "{arg}: {}", out.stderr);
        assert!(out.stderr.contains(opt), "{arg}: {}", out.stderr);
    }
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
