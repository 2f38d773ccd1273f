//! The global bound on unsent reply bytes (issue 13 item 3): many connections that
//! pipeline a whole in-flight window of large replies and never read them cannot make the
//! server hold more than its budget (plus, per connection, the low watermark and one
//! reply). The review measured 929 MiB RSS for 1,000 such connections without it.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{data, frame, short_limits, token, Raw};
use credproxy::backend::MemoryBackend;
use credproxy::outbox::LOW_WATERMARK;
use credproxy::policy::Profile;
use credproxy::supervisor::UnsentBytes;
use credproxy::{Config, Limits, Supervisor};
use serde_json::json;

/// A token whose reply is about 60 kB.
fn big_store() -> Arc<MemoryBackend> {
    let m = MemoryBackend::new();
    let mut t = token("at-big", Some("rt-big")).fields().clone();
    t.insert("blob".into(), json!("x".repeat(60_000)));
    m.insert_token(
        "big",
        "default",
        credproxy::token::Token::from_map(t).expect("token"),
    )
    .expect("seed");
    Arc::new(m)
}

fn limits(budget: usize) -> Limits {
    Limits {
        max_unsent_total: budget,
        rate_limit: 0,
        max_connections: 1_000,
        max_connections_per_pid: 1_000,
        ..short_limits()
    }
}

/// Opens `n` connections, each sending a handshake and `per` get_token requests at once
/// and never reading.
fn flood(path: &std::path::Path, n: usize, per: usize) -> Vec<UnixStream> {
    let request = |i: usize| {
        frame(
            json!({"v":1,"id":format!("r{i}"),"op":"get_token","payload":{"provider":"big"}})
                .to_string()
                .as_bytes(),
        )
    };
    (0..n)
        .map(|_| {
            let mut s = UnixStream::connect(path).expect("connect");
            let mut burst =
                frame(br#"{"v":1,"op":"handshake","payload":{"minVersion":1,"maxVersion":1}}"#);
            for i in 0..per {
                burst.extend(request(i));
            }
            s.write_all(&burst).expect("write burst");
            s
        })
        .collect()
}

/// The largest unsent total seen while it settles (until it stops changing for 300 ms).
fn settle(handle: &credproxy::ServerHandle) -> usize {
    let unsent = || futures_executor::block_on(handle.addr().send(UnsentBytes)).expect("ask");
    let mut peak = 0;
    let mut last = usize::MAX;
    let mut stable_since = Instant::now();
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(10) {
        let now = unsent();
        peak = peak.max(now);
        if now != last {
            last = now;
            stable_since = Instant::now();
        } else if stable_since.elapsed() > Duration::from_millis(300) {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    peak
}

fn start(budget: usize) -> (credproxy::ServerHandle, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let profile = Profile {
        allow_all: true,
        ..Profile::default()
    };
    let mut config = Config::new(big_store());
    common::offline(&mut config);
    config.socket_dir = Some(dir.path().to_owned());
    config.profile = profile;
    config.limits = limits(budget);
    (Supervisor::start(config).expect("start"), dir)
}

const CONNS: usize = 30;
const PER: usize = 16;
const REPLY: usize = 60_200;

#[test]
fn peers_that_never_read_cannot_exceed_the_unsent_budget() {
    let budget = 1 << 20;
    let (handle, _dir) = start(budget);
    let conns = flood(handle.socket_path(), CONNS, PER);
    let peak = settle(&handle);
    // Without the budget each connection keeps its whole window minus what the kernel
    // buffers: about 30 x 16 x 60 kB.
    let bound = budget + CONNS * (LOW_WATERMARK + REPLY + 4);
    eprintln!("with a {budget}-byte budget: unsent peaked at {peak} bytes (bound {bound})");
    assert!(
        peak <= bound,
        "unsent peaked at {peak} bytes, over the bound of {bound}"
    );
    // Some floods were cut off: their connections end (EOF or reset) after the replies
    // the kernel held.
    let mut closed = 0;
    for mut s in conns {
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut sink = vec![0u8; 1 << 16];
        let mut total = 0usize;
        loop {
            match s.read(&mut sink) {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
            if total >= PER * REPLY {
                break;
            }
        }
        if total < PER * REPLY {
            closed += 1;
        }
    }
    assert!(closed > 0, "no flooding connection was closed");
    // The budget is given back: a client that reads is served.
    let mut raw = Raw::connect(handle.socket_path());
    raw.handshake();
    let reply = raw.call("ok", "get_token", json!({"provider":"big"}));
    assert_eq!(data(&reply)["access_token"], "at-big");
    let report = handle.shutdown_blocking().expect("shutdown");
    assert!(report.socket_removed);
}

/// The control: with the budget off, the same flood makes the server hold far more, so
/// the bound above is the budget's doing.
#[test]
fn without_the_budget_the_same_flood_is_held_whole() {
    let (handle, _dir) = start(0);
    let _conns = flood(handle.socket_path(), CONNS, PER);
    let peak = settle(&handle);
    let bound = (1 << 20) + CONNS * (LOW_WATERMARK + REPLY + 4);
    eprintln!("without a budget: unsent peaked at {peak} bytes");
    assert!(
        peak > bound,
        "unsent peaked at only {peak} bytes without a budget"
    );
    drop(handle);
}
