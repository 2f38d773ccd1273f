//! Start and shutdown: the socket's directory and modes, the path limit, stale sockets,
//! the peer check, each step of the shutdown sequence, and starting from every kind of
//! host (plain thread, tokio, actix).

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use credproxy::backend::{Backend, MemoryBackend};
use credproxy::supervisor::SessionCount;
use credproxy::{Config, Error, Supervisor};
use serde_json::json;

fn config_in(dir: &std::path::Path) -> Config {
    let mut config = Config::new(Arc::new(MemoryBackend::new()));
    common::offline(&mut config);
    config.socket_dir = Some(dir.to_owned());
    config.limits = short_limits();
    config
}

#[test]
fn socket_is_0600_and_named_by_the_rule() {
    let s = TestServer::start();
    let meta = fs::symlink_metadata(&s.path).expect("socket exists");
    assert_eq!(meta.mode() & 0o777, 0o600);
    let name = s
        .path
        .file_name()
        .expect("name")
        .to_string_lossy()
        .into_owned();
    let prefix = format!("llxprt-cred-{}-", std::process::id());
    let nonce = name
        .strip_prefix(&prefix)
        .and_then(|n| n.strip_suffix(".sock"))
        .expect("name shape");
    assert!(
        nonce.len() == 8
            && nonce
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
        "{name}"
    );
    assert!(s.path.is_absolute());
}

#[test]
fn default_directory_is_created_0700_and_tightened() {
    // The default directory lives in the system temp dir; point TMPDIR at a private one
    // would race with other tests in this process, so check the real default instead.
    let mut config = Config::new(Arc::new(MemoryBackend::new()));
    common::offline(&mut config);
    config.limits = short_limits();
    let handle = Supervisor::start(config).expect("start");
    let dir = handle.socket_path().parent().expect("dir").to_owned();
    let tmp = fs::canonicalize(std::env::temp_dir()).expect("tmp");
    assert_eq!(
        dir,
        tmp.join(format!("llxprt-cred-{}", nix::unistd::geteuid()))
    );
    let meta = fs::symlink_metadata(&dir).expect("dir");
    assert_eq!(meta.mode() & 0o777, 0o700);
    assert_eq!(meta.uid(), nix::unistd::geteuid().as_raw());
    handle.shutdown_blocking().expect("shutdown");
    assert!(dir.exists(), "the per-user directory stays after shutdown");
}

#[test]
fn caller_directory_must_be_safe() {
    let base = tempfile::tempdir().expect("tempdir");
    // group/other writable
    let open = base.path().join("open");
    fs::create_dir(&open).expect("mkdir");
    fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).expect("chmod");
    assert!(matches!(
        Supervisor::start(config_in(&open)),
        Err(Error::SocketDir { .. })
    ));
    // a symlink to a good directory
    let good = base.path().join("good");
    fs::create_dir(&good).expect("mkdir");
    fs::set_permissions(&good, fs::Permissions::from_mode(0o700)).expect("chmod");
    let link = base.path().join("link");
    std::os::unix::fs::symlink(&good, &link).expect("symlink");
    let err = Supervisor::start(config_in(&link)).expect_err("symlink refused");
    assert!(err.to_string().contains("symlink"), "{err}");
    // missing
    assert!(matches!(
        Supervisor::start(config_in(&base.path().join("missing"))),
        Err(Error::SocketDir { .. })
    ));
    // the good one works, and 0755 (not group/other writable) is accepted as it is
    fs::set_permissions(&good, fs::Permissions::from_mode(0o755)).expect("chmod");
    let handle = Supervisor::start(config_in(&good)).expect("good dir accepted");
    assert_eq!(
        fs::symlink_metadata(&good).expect("dir").mode() & 0o777,
        0o755,
        "used as it is"
    );
    handle.shutdown_blocking().expect("shutdown");
}

#[test]
fn foreign_owned_directory_is_refused() {
    if !is_root() {
        eprintln!("skipped: needs root to chown a directory to another uid");
        return;
    }
    let base = tempfile::tempdir().expect("tempdir");
    let dir = base.path().join("foreign");
    fs::create_dir(&dir).expect("mkdir");
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).expect("chmod");
    nix::unistd::chown(&dir, Some(nix::unistd::Uid::from_raw(65534)), None).expect("chown");
    let err = Supervisor::start(config_in(&dir)).expect_err("foreign owner refused");
    assert!(err.to_string().contains("owned by uid 65534"), "{err}");
}

#[test]
fn path_too_long_is_refused_before_binding() {
    let base = tempfile::tempdir().expect("tempdir");
    let mut dir = base.path().to_owned();
    while dir.as_os_str().len() < 90 {
        dir = dir.join("dddddddddd");
    }
    fs::create_dir_all(&dir).expect("mkdir");
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).expect("chmod");
    let err = Supervisor::start(config_in(&dir)).expect_err("too long");
    assert!(
        matches!(err, Error::PathTooLong { limit: 107, .. }),
        "{err}"
    );
    let text = err.to_string();
    assert!(
        text.contains("107") && text.contains("shorter socket directory"),
        "{text}"
    );
    assert_eq!(
        fs::read_dir(&dir).expect("read").count(),
        0,
        "nothing was bound"
    );
}

#[test]
fn stale_sockets_are_swept_but_live_ones_never() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A dead pid's socket that refuses connections: bind, then drop the listener.
    let dead_pid = {
        let mut child = std::process::Command::new("true").spawn().expect("spawn");
        let pid = child.id();
        child.wait().expect("wait");
        pid
    };
    let stale = dir
        .path()
        .join(format!("llxprt-cred-{dead_pid}-0badf00d.sock"));
    drop(std::os::unix::net::UnixListener::bind(&stale).expect("bind stale"));
    assert!(stale.exists());
    // A dead pid's socket that still accepts (someone else listens on it): kept.
    let live = dir
        .path()
        .join(format!("llxprt-cred-{dead_pid}-11111111.sock"));
    let _live_listener = std::os::unix::net::UnixListener::bind(&live).expect("bind live");
    // A live pid's socket (ours), not listening: kept, the pid is alive.
    let ours = dir
        .path()
        .join(format!("llxprt-cred-{}-22222222.sock", std::process::id()));
    drop(std::os::unix::net::UnixListener::bind(&ours).expect("bind ours"));
    // Some other file: kept.
    let other = dir.path().join("unrelated.sock");
    fs::write(&other, b"x").expect("write");

    let handle = Supervisor::start(config_in(dir.path())).expect("start");
    assert!(!stale.exists(), "stale socket swept");
    assert!(live.exists(), "a socket that accepts is never removed");
    assert!(ours.exists(), "a socket of a live pid is kept");
    assert!(other.exists());
    handle.shutdown_blocking().expect("shutdown");
}

#[test]
fn shutdown_runs_every_step() {
    let mut s = TestServer::start();
    let mut a = s.connect();
    let mut b = s.connect();
    assert_eq!(
        data(&a.call("1", "get_api_key", json!({"name":"openai"})))["key"],
        "sk-openai"
    );
    let addr = s.handle.as_ref().expect("running").addr().clone();
    let sessions = block_on(addr.send(SessionCount)).expect("count");
    assert_eq!(sessions, 2);
    let report = s.shutdown();
    // 1. no longer accepting, 6. socket file removed (the directory stays)
    assert!(UnixStream::connect(&s.path).is_err());
    assert!(!s.path.exists());
    assert!(s.dir.path().exists());
    // 2-3. connections closed
    a.expect_closed();
    b.expect_closed();
    // 5. store wiped
    assert!(s.backend.list_keys().is_err(), "memory backend cleared");
    // 7. report
    assert_eq!(report.connections_closed, 2);
    assert_eq!(report.requests_answered, 1);
    assert_eq!(report.requests_abandoned, 0);
    assert!(report.store_cleared && report.policy_cleared && report.socket_removed);
    assert_eq!(report.socket_path, s.path);
    // Afterwards nothing of the server runs: its mailbox is closed.
    assert!(!addr.connected());
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt")
        .block_on(f)
}

#[test]
fn in_flight_requests_finish_within_the_grace_time() {
    let slow = Arc::new(slow_backend(seeded(), Duration::from_millis(200)));
    let (handle, _dir) = start_backend(slow, short_limits());
    let mut c = Raw::connect(handle.socket_path());
    c.handshake();
    c.send(&json!({"v":1,"id":"slow","op":"get_token","payload":{"provider":"anthropic"}}));
    std::thread::sleep(Duration::from_millis(50)); // let the request reach the store
    let report = handle.shutdown_blocking().expect("shutdown");
    let reply = c.recv();
    assert_eq!(reply["id"], "slow");
    assert_eq!(data(&reply)["access_token"], "at-anthropic-default");
    c.expect_closed();
    assert_eq!(
        (report.requests_answered, report.requests_abandoned),
        (1, 0)
    );
}

#[test]
fn grace_time_bounds_shutdown() {
    let slow = Arc::new(slow_backend(seeded(), Duration::from_secs(3)));
    let (handle, _dir) = start_backend(slow, short_limits()); // grace 500 ms
    let mut c = Raw::connect(handle.socket_path());
    c.handshake();
    c.send(&json!({"v":1,"id":"stuck","op":"get_token","payload":{"provider":"anthropic"}}));
    std::thread::sleep(Duration::from_millis(50));
    let t0 = std::time::Instant::now();
    let report = handle.shutdown_blocking().expect("shutdown");
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "shutdown waited for the stuck request"
    );
    c.expect_closed();
    assert_eq!(report.requests_abandoned, 1);
}

#[test]
fn dropping_the_handle_shuts_down() {
    let dir = tempfile::tempdir().expect("tempdir");
    let handle = Supervisor::start(config_in(dir.path())).expect("start");
    let path = handle.socket_path().to_owned();
    drop(handle);
    assert!(!path.exists());
}

#[test]
fn start_from_inside_a_tokio_runtime() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("rt");
    rt.block_on(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let handle = Supervisor::start(config_in(dir.path())).expect("start");
        let path = handle.socket_path().to_owned();
        let client = credproxy::client::Client::new(&path);
        assert_eq!(
            client.list_api_keys().await.expect("list"),
            Vec::<String>::new()
        );
        let report = handle.shutdown().await.expect("shutdown");
        assert!(report.socket_removed && !path.exists());
    });
}

#[actix_rt::test]
async fn start_from_inside_an_actix_system() {
    let dir = tempfile::tempdir().expect("tempdir");
    let handle = Supervisor::start(config_in(dir.path())).expect("start");
    let path = handle.socket_path().to_owned();
    let client = credproxy::client::Client::new(&path);
    assert!(client.list_providers().await.expect("list").is_empty());
    handle.shutdown().await.expect("shutdown");
    assert!(!path.exists());
    // The test's own System is untouched by our shutdown: it still runs new work.
    assert_eq!(
        actix_rt::spawn(async { 7 }).await.expect("still running"),
        7
    );
}

#[test]
fn several_servers_in_one_process() {
    let servers: Vec<_> = (0..4).map(|_| TestServer::start()).collect();
    let paths: std::collections::HashSet<_> = servers.iter().map(|s| s.path.clone()).collect();
    assert_eq!(paths.len(), 4);
    for s in &servers {
        let mut c = s.connect();
        assert_eq!(
            data(&c.call("1", "has_api_key", json!({"name":"openai"})))["exists"],
            true
        );
    }
}

/// Child side of the peer check test: runs only when re-executed with the env var set.
#[test]
fn peer_probe_child() {
    let Ok(path) = std::env::var("CREDPROXY_PEER_PROBE") else {
        return;
    };
    let mut stream = UnixStream::connect(&path).expect("connect as the foreign uid");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    use std::io::{Read, Write};
    let hs = frame(br#"{"v":1,"op":"handshake","payload":{"minVersion":1,"maxVersion":1}}"#);
    let _ = stream.write_all(&hs);
    let mut buf = [0u8; 64];
    let n = stream.read(&mut buf).unwrap_or(0);
    println!("PEER-PROBE-READ={n}");
}

/// Runs the probe child as uid 65534 against `s` (modes relaxed so that only the peer
/// check stands); `None` (skip, with the reason printed) when it cannot run.
fn probe_as_nobody(s: &TestServer) -> Option<String> {
    fs::set_permissions(s.dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod dir");
    fs::set_permissions(&s.path, fs::Permissions::from_mode(0o777)).expect("chmod socket");
    let exe = std::env::current_exe().expect("test binary");
    let out = std::process::Command::new(&exe)
        .args([
            "--exact",
            "peer_probe_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("CREDPROXY_PEER_PROBE", &s.path)
        .uid(65534)
        .gid(65534)
        .output();
    let out = match out {
        Ok(out) => out,
        Err(e) => {
            eprintln!("skipped: cannot run the test binary as uid 65534: {e}");
            return None;
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !stdout.contains("PEER-PROBE-READ=") {
        eprintln!(
            "skipped: the uid 65534 child could not run the probe: {stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return None;
    }
    Some(stdout)
}

#[test]
fn configured_extra_uid_is_accepted() {
    if !is_root() {
        eprintln!("skipped: needs root to run a child as uid 65534");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let backend = seeded();
    let mut config = Config::new(backend.clone());
    common::offline(&mut config);
    config.socket_dir = Some(dir.path().to_owned());
    config.profile = allow_all();
    config.limits = short_limits();
    config.extra_uids = vec![65534];
    let handle = Supervisor::start(config).expect("start");
    let s = TestServer {
        path: handle.socket_path().to_owned(),
        handle: Some(handle),
        dir,
        backend,
    };
    let Some(stdout) = probe_as_nobody(&s) else {
        return;
    };
    assert!(
        !stdout.contains("PEER-PROBE-READ=0"),
        "an allowed uid was dropped: {stdout}"
    );
}

#[test]
fn foreign_uid_is_dropped_at_accept() {
    if !is_root() {
        eprintln!("skipped: needs root to run a child as uid 65534");
        return;
    }
    let mut s = TestServer::start();
    let Some(stdout) = probe_as_nobody(&s) else {
        return;
    };
    assert!(
        stdout.contains("PEER-PROBE-READ=0"),
        "a foreign uid got a reply: {stdout}"
    );
    // The server still serves its own uid.
    let mut c = s.connect();
    assert_eq!(
        data(&c.call("1", "has_api_key", json!({"name":"openai"})))["exists"],
        true
    );
    let report = s.shutdown();
    assert_eq!(
        report.peers_refused, 1,
        "the refusal is counted in the report"
    );
}
