//! Issue 12: a process of the same non-root uid — a plain child of `credproxy exec`, or a
//! sibling of `credproxy serve` — cannot read credproxy's memory by any means open to it
//! (`/proc/PID/{mem,environ,maps,fd/*}`, each thread's `mem`, `ptrace`,
//! `process_vm_readv`) and finds no canary anywhere it can read.
//!
//! Everything runs as the non-root uid `USER` (root passes every one of these checks), on
//! a machine without Yama, where that uid can read the memory of any dumpable process of
//! its own: [`probe_helper`] proves it, so a pass here is the hardening's doing.

mod common;

use std::ffi::OsStr;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;

use common::probe::{self, Report};
use common::unprivileged::{self, USER};
use common::user_home::{run_as, UserHome};

const ACCESS: &str = "canary-harden-access-5f1d";
const REFRESH: &str = "canary-harden-refresh-9b27";

/// Every means that reads memory, descriptors or the environment.
const READING: &[&str] = &[
    "environ",
    "maps",
    "mem",
    "task-mem",
    "fd-list",
    "fd-open",
    "process_vm_readv",
    "ptrace",
];

/// The probe itself (when started with its target) and its positive control: against a
/// plain process of the same uid holding a canary in its environment, every means works
/// and finds the canary, so the denials below are credproxy's doing, not the machine's.
/// Runs the probe helper as [`USER`] against process `pid`, looking for `home`'s canaries.
fn probe_pid(home: &UserHome, pid: &str) -> common::process::Run {
    run_as(
        probe::helper_binary(),
        &probe::helper_args("probe_helper"),
        b"",
        &[
            (probe::TARGET_VAR, OsStr::new(pid)),
            (probe::CANARIES_VAR, home.canaries.as_os_str()),
        ],
    )
}

#[test]
fn probe_helper() {
    probe::run_if_probe();
    if !unprivileged::root() {
        return unprivileged::skip("probe_helper");
    }
    let home = UserHome::new(&[ACCESS]);
    let mut control = unprivileged::command("sleep", USER);
    control.arg("30").env(format!("CONTROL_{ACCESS}"), "1");
    let control = control.spawn().expect("spawn the control");
    let mut control = common::process::ChildGuard::new(control, false);
    let pid = control.pid().to_string();
    // Probed once it is `sleep`, not the test process between fork and exec.
    let comm = format!("/proc/{pid}/comm");
    let t0 = std::time::Instant::now();
    while std::fs::read_to_string(&comm).unwrap_or_default() != "sleep\n" {
        assert!(
            t0.elapsed() < common::process::DEADLINE,
            "the control never ran"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let run = probe_pid(&home, &pid);
    control.kill();
    let report = Report::parse(&run.stdout);
    for means in READING {
        assert_eq!(
            report.get(means),
            "ok",
            "{means} on the control: {report:?}"
        );
    }
    for means in ["environ", "mem", "process_vm_readv"] {
        let hit = format!("{ACCESS} {means}");
        assert!(report.canaries.contains(&hit), "{hit}: {report:?}");
    }
}

/// Fails unless every reading means was refused with a permission error and no canary
/// was seen anywhere (`cmdline` stays readable, as for any process, and holds none).
#[track_caller]
fn assert_sealed(what: &str, report: &Report) {
    for means in READING {
        let outcome = report.get(means);
        assert!(
            outcome == "denied EACCES" || outcome == "denied EPERM",
            "{what}: {means} was {outcome}: {report:?}"
        );
    }
    assert!(
        report.canaries.is_empty(),
        "{what}: canaries found: {report:?}"
    );
}

#[test]
fn a_plain_child_of_exec_cannot_read_credproxy() {
    if !unprivileged::root() {
        return unprivileged::skip("a_plain_child_of_exec_cannot_read_credproxy");
    }
    let home = UserHome::new(&[ACCESS, REFRESH]);
    home.seed_token("anthropic", ACCESS, REFRESH);
    // CMD fetches the token (so the proxy has read the store and served it), then becomes
    // the probe, a plain child of credproxy with no namespace in between.
    let script = "\"$0\" token get anthropic >/dev/null && exec \"$@\"";
    let mut cmd = unprivileged::command(unprivileged::binary(), USER);
    cmd.args([
        "exec",
        "--store",
        home.store_str(),
        "--socket-dir",
        home.sock_str(),
        "--allow",
        "anthropic",
        "--",
        "sh",
        "-c",
        script,
    ])
    .arg(unprivileged::binary())
    .arg(probe::helper_binary())
    .args(probe::helper_args("probe_helper"))
    .env(probe::TARGET_VAR, "parent")
    .env(probe::CANARIES_VAR, &home.canaries)
    .env_remove("RUST_LOG")
    .process_group(0);
    let run = common::user_home::run_command(&mut cmd, b"");
    assert!(run.status.success(), "exec: {run:?}");
    assert_sealed("child of exec", &Report::parse(&run.stdout));
}

#[test]
fn a_sibling_of_serve_cannot_read_it() {
    if !unprivileged::root() {
        return unprivileged::skip("a_sibling_of_serve_cannot_read_it");
    }
    let home = UserHome::new(&[ACCESS, REFRESH]);
    home.seed_token("anthropic", ACCESS, REFRESH);
    let mut server = home.serve(&["--allow", "anthropic"], None);
    let served = server.fetch_token("anthropic");
    assert!(served.contains(ACCESS), "served: {served}");
    let pid = server.child.pid().to_string();
    let run = probe_pid(&home, &pid);
    assert_sealed("sibling of serve", &Report::parse(&run.stdout));
    assert!(server.child.running(), "the server survived the probe");
}

#[test]
fn the_store_command_is_sealed_while_it_reads_the_secret() {
    if !unprivileged::root() {
        return unprivileged::skip("the_store_command_is_sealed_while_it_reads_the_secret");
    }
    let home = UserHome::new(&[ACCESS, REFRESH]);
    let mut cmd = unprivileged::command(unprivileged::binary(), USER);
    cmd.args(["store", "token", "set", "anthropic", "--store"])
        .arg(&home.store)
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("spawn store");
    let mut stdin = child.stdin.take().expect("stdin");
    let stderr = common::process::drain(child.stderr.take().expect("stderr"));
    let mut child = common::process::ChildGuard::new(child, false);
    // The whole token, stdin left open: the command holds the secret and waits for EOF.
    std::io::Write::write_all(
        &mut stdin,
        common::process::token_json(ACCESS, REFRESH).as_bytes(),
    )
    .expect("write the token");
    let pid = child.pid().to_string();
    // Probed once it is credproxy and has hardened itself (its /proc files turn root's),
    // not while it is still starting.
    let t0 = std::time::Instant::now();
    loop {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        let owner = std::fs::metadata(format!("/proc/{pid}/mem")).map(|m| m.uid());
        if comm == "credproxy\n" && owner.as_ref().is_ok_and(|&uid| uid == 0) {
            break;
        }
        assert!(
            t0.elapsed() < common::process::DEADLINE,
            "store token set never hardened itself ({comm:?}, mem owned by {owner:?})"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let run = probe_pid(&home, &pid);
    assert_sealed("store token set", &Report::parse(&run.stdout));
    drop(stdin);
    let status = child.wait_exit("store token set");
    assert!(
        status.success(),
        "{status:?}: {}",
        stderr.join().unwrap_or_default()
    );
}
