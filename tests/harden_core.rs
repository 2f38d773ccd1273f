//! Issue 12: `credproxy serve` started under `ulimit -c unlimited` runs with a core-file
//! limit of 0, and SIGQUIT and SIGABRT (an induced abort) leave no core file holding a
//! canary (none at all). (A SIGSEGV sent with kill is no crash: std's stack-overflow
//! handler takes it, restores the default action and returns, so it is not tested that
//! way.)
//!
//! Everything runs as the non-root uid `USER`, in a directory it owns. Whether a file
//! can appear depends on `kernel.core_pattern`, which the tests read and never change: a
//! pattern naming a file (this machine: `core`, in the crashing process's directory) is
//! checked with a control first — a plain process of the same uid under the same ulimit
//! does leave a core holding its canary — so "no core" means credproxy wrote none. With a
//! pipe pattern (systemd-coredump, apport) no file can be observed here: the tests then
//! say so and check the limit only.

mod common;

use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use common::probe::contains;
use common::unprivileged::{self, USER};
use common::user_home::UserHome;

const ACCESS: &str = "canary-core-access-c41e";
const REFRESH: &str = "canary-core-refresh-77a0";

/// Where a core file of a process whose directory is `dir` would be written, when the
/// pattern names a file there (`None` for a pipe or an absolute directory).
fn core_dir(dir: &Path) -> Option<PathBuf> {
    let pattern = fs::read_to_string("/proc/sys/kernel/core_pattern").ok()?;
    let pattern = pattern.trim();
    if pattern.is_empty() || pattern.starts_with('|') || pattern.contains('/') {
        eprintln!("core_pattern {pattern:?} writes no file in the process's directory: only the limit is checked");
        return None;
    }
    Some(dir.to_owned())
}

/// Files in `dir` other than `known`, waiting up to 2 s for a dump in progress.
fn new_files(dir: &Path, known: &[&str], expect_one: bool) -> Vec<PathBuf> {
    let t0 = Instant::now();
    loop {
        let files: Vec<PathBuf> = fs::read_dir(dir)
            .expect("read dir")
            .map(|e| e.expect("entry").path())
            .filter(|p| !known.iter().any(|k| p.file_name().is_some_and(|n| n == *k)))
            .collect();
        if !expect_one || !files.is_empty() || t0.elapsed() > Duration::from_secs(2) {
            return files;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The directory's own entries (store, socket directory, canary list).
const KNOWN: &[&str] = &["store", "sock", "canaries"];

/// The control: a plain process of the same uid under `ulimit -c unlimited`, with a
/// canary in its environment, does leave a core holding it, so the pattern, the
/// directory and the uid allow a file here.
#[test]
fn a_plain_process_under_the_same_ulimit_dumps_core() {
    if !unprivileged::root() {
        return unprivileged::skip("a_plain_process_under_the_same_ulimit_dumps_core");
    }
    let home = UserHome::new(&[ACCESS]);
    let Some(dir) = core_dir(&home.dir) else {
        return;
    };
    let mut cmd = unprivileged::command("sh", USER);
    cmd.args(["-c", "ulimit -c unlimited && exec sleep 30"])
        .env("CONTROL_CANARY", ACCESS)
        .current_dir(&home.dir);
    let mut child = common::process::ChildGuard::new(cmd.spawn().expect("spawn"), false);
    let comm = format!("/proc/{}/comm", child.pid());
    let t0 = Instant::now();
    while fs::read_to_string(&comm).unwrap_or_default() != "sleep\n" {
        assert!(
            t0.elapsed() < common::process::DEADLINE,
            "the control never ran"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.signal(Signal::SIGQUIT);
    let status = child.wait_exit("the control after SIGQUIT");
    assert!(status.core_dumped(), "the control dumped core: {status:?}");
    let files = new_files(&dir, KNOWN, true);
    assert!(
        files
            .iter()
            .any(|f| contains(&fs::read(f).unwrap_or_default(), ACCESS.as_bytes())),
        "a core holding the control's canary in {files:?}"
    );
}

/// `serve` under `ulimit -c unlimited`, after serving the token, killed by `signal`.
fn serve_leaves_no_core(signal: Signal) {
    let home = UserHome::new(&[ACCESS, REFRESH]);
    home.seed_token("anthropic", ACCESS, REFRESH);
    let mut server = home.serve(&["--allow", "anthropic"], Some("-c unlimited"));
    assert!(server.fetch_token("anthropic").contains(ACCESS));

    let limits =
        fs::read_to_string(format!("/proc/{}/limits", server.child.pid())).expect("read limits");
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .expect("core limit line");
    let soft = core.split_whitespace().nth(4);
    assert_eq!(soft, Some("0"), "soft core limit of serve: {core}");

    server.child.signal(signal);
    let status = server.child.wait_exit(&format!("serve after {signal}"));
    if signal == Signal::SIGQUIT {
        // serve catches SIGQUIT and shuts down cleanly, as on SIGTERM (cli::serve).
        assert_eq!(status.code(), Some(0), "{status:?}");
    } else {
        assert_eq!(status.signal(), Some(signal as i32), "{status:?}");
    }
    assert!(!status.core_dumped(), "serve dumped core on {signal}");
    if let Some(dir) = core_dir(&home.dir) {
        let files = new_files(&dir, KNOWN, false);
        assert!(files.is_empty(), "files left by {signal}: {files:?}");
    }
    let stderr = server.stderr.join().expect("stderr");
    assert!(
        !stderr.contains(ACCESS) && !stderr.contains(REFRESH),
        "{stderr}"
    );
    assert!(!stderr.contains("WARN"), "hardening warned: {stderr}");
}

#[test]
fn sigquit_leaves_no_core() {
    if !unprivileged::root() {
        return unprivileged::skip("sigquit_leaves_no_core");
    }
    serve_leaves_no_core(Signal::SIGQUIT);
}

#[test]
fn an_induced_abort_leaves_no_core() {
    if !unprivileged::root() {
        return unprivileged::skip("an_induced_abort_leaves_no_core");
    }
    serve_leaves_no_core(Signal::SIGABRT);
}
