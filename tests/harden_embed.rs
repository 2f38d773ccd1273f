//! Issue 12, for host programs that embed the proxy: `Supervisor::start` hardens the whole
//! process when `Config::harden_process` is set (the default) and leaves it alone when it
//! is not; `harden::restore_core_limit` gives a child the core limit the host had, and the
//! child is an ordinary dumpable process again.
//!
//! Hardening cannot be undone within a process, so this file holds one test that walks
//! through the steps in order (its own process: nothing else runs in it).

mod common;

use std::os::unix::fs::MetadataExt;
use std::process::Command;
use std::sync::Arc;

use credproxy::backend::MemoryBackend;
use credproxy::{harden, Config, Supervisor};
use nix::sys::prctl::get_dumpable;
use nix::sys::resource::{getrlimit, setrlimit, Resource};

use common::unprivileged::{self, USER};

/// The soft core limit the "host" sets for itself.
const HOST_CORE: u64 = 400 * 1024;

fn start(harden_process: bool) -> credproxy::ServerHandle {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = Config::new(Arc::new(MemoryBackend::new()));
    common::offline(&mut config);
    assert!(config.harden_process, "on by default");
    config.harden_process = harden_process;
    config.socket_dir = Some(dir.path().to_owned());
    let handle = Supervisor::start(config).expect("start");
    std::mem::forget(dir); // the socket lives there until shutdown
    handle
}

/// A child's soft core limit in bytes (from its `/proc/self/limits`), with or without
/// the restored limit.
fn child_core_limit(restore: bool) -> String {
    let mut cmd = Command::new("cat");
    cmd.arg("/proc/self/limits");
    if restore {
        harden::restore_core_limit(&mut cmd);
    }
    let out = cmd.output().expect("cat");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = text
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .expect("core line");
    line.split_whitespace().nth(4).expect("soft").to_owned()
}

#[test]
fn supervisor_start_hardens_the_host_only_when_asked() {
    let (_, hard) = getrlimit(Resource::RLIMIT_CORE).expect("getrlimit");
    setrlimit(Resource::RLIMIT_CORE, HOST_CORE.min(hard), hard).expect("setrlimit");
    let host = HOST_CORE.min(hard).to_string();

    // Switched off: the host stays as it was.
    let handle = start(false);
    assert!(get_dumpable().expect("get_dumpable"), "still dumpable");
    assert_eq!(
        getrlimit(Resource::RLIMIT_CORE).unwrap().0,
        HOST_CORE.min(hard)
    );
    assert_eq!(harden::original_core_limit(), None, "never hardened");
    assert_eq!(child_core_limit(true), host, "nothing to restore yet");
    handle.shutdown_blocking().expect("shutdown");

    // The default: not dumpable, no core files; the original limit is kept for children.
    let handle = start(true);
    assert!(!get_dumpable().expect("get_dumpable"), "not dumpable");
    assert_eq!(getrlimit(Resource::RLIMIT_CORE).unwrap(), (0, hard));
    assert_eq!(
        harden::original_core_limit(),
        Some((HOST_CORE.min(hard), hard))
    );
    assert_eq!(child_core_limit(false), "0", "children inherit the limit");
    assert_eq!(child_core_limit(true), host, "unless it is given back");

    // A child is an ordinary process again after execve: dumpable, so its /proc files
    // belong to its own uid, not to root.
    if unprivileged::root() {
        let mut sleeper = unprivileged::command("sleep", USER);
        sleeper.arg("30");
        harden::restore_core_limit(&mut sleeper);
        let mut child = common::process::ChildGuard::new(sleeper.spawn().expect("spawn"), false);
        let comm = format!("/proc/{}/comm", child.pid());
        let t0 = std::time::Instant::now();
        while std::fs::read_to_string(&comm).unwrap_or_default() != "sleep\n" {
            assert!(t0.elapsed() < common::process::DEADLINE, "sleep never ran");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let mem = std::fs::metadata(format!("/proc/{}/mem", child.pid())).expect("stat mem");
        assert_eq!(mem.uid(), USER, "the child is dumpable");
        child.kill();
    }
    handle.shutdown_blocking().expect("shutdown");
}
