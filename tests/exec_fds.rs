//! CMD inherits no descriptor of `exec`'s except stdin, stdout and stderr (issue 12): not
//! the listening socket, the store's lock files or the read cache's inotify descriptor,
//! and not stray descriptors `exec` itself inherited from its parent (like ssh-agent,
//! which closes everything above stderr at start).

mod common;

use std::collections::BTreeSet;
use std::fs;

use common::process::{path_str, strings, ChildGuard, Fixture, BIN};
use nix::sys::signal::Signal;
use nix::unistd::Pid;

/// The descriptor numbers open in `pid`.
fn fds(pid: Pid) -> BTreeSet<i32> {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read /proc/PID/fd")
        .map(|e| {
            e.expect("entry")
                .file_name()
                .to_str()
                .expect("utf-8")
                .parse()
                .expect("a number")
        })
        .collect()
}

/// What each descriptor of `pid` points to.
fn targets(pid: Pid) -> Vec<String> {
    fds(pid)
        .into_iter()
        .filter_map(|fd| fs::read_link(format!("/proc/{pid}/fd/{fd}")).ok())
        .map(|t| t.to_string_lossy().into_owned())
        .collect()
}

/// Runs `sh -c PRELUDE; exec credproxy exec ... -- CMD` where CMD reads, saves and reads a
/// token through the file store (so the socket, the lock files and the inotify watch have
/// all been used), prints its pid and becomes `sleep`; returns CMD's descriptors, and
/// exec's.
fn cmd_descriptors(prelude: &str) -> (BTreeSet<i32>, Vec<String>) {
    let f = Fixture::new();
    f.seed_token("anthropic", "default", "at-fds", "rt-fds");
    // A read, then a write (which takes the store's lock file), then a read again.
    let cmd = "\"$1\" token get anthropic >/dev/null || exit 3\n\
               printf '{\"access_token\":\"at-2\",\"expiry\":1900000000,\"token_type\":\"Bearer\"}' \
                 | \"$1\" token save anthropic || exit 4\n\
               \"$1\" token get anthropic | grep -q at-2 || exit 5\n\
               echo \"pid=$$\"; exec sleep 30";
    let mut exec_args = strings(&["exec", "--store"]);
    exec_args.push(path_str(&f.store));
    exec_args.push("--socket-dir".into());
    exec_args.push(path_str(&f.sock));
    exec_args.extend(strings(&[
        "--allow",
        "anthropic",
        "--",
        "/bin/sh",
        "-c",
        cmd,
        "sh",
        BIN,
    ]));
    let script = format!("{prelude}\nexec \"$@\"");
    let mut command = std::process::Command::new("/bin/sh");
    command
        .arg("-c")
        .arg(script)
        .arg("sh")
        .arg(BIN)
        .args(&exec_args)
        .env_remove("RUST_LOG")
        .env_remove("LLXPRT_CREDENTIAL_SOCKET")
        .current_dir(f.tmp.path());
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    let mut child = common::process::spawn_piped(&mut command).expect("spawn");
    let stdout = child.stdout.take().expect("stdout");
    let mut guard = ChildGuard::new(child, true);
    // Wait for the `exec sleep`: the shell's own descriptors are not the point.
    let pid = common::process::sleeping_cmd(common::process::FirstLine::read(stdout));
    let cmd_fds = fds(pid);
    let exec_targets = targets(guard.pid());
    guard.signal(Signal::SIGTERM);
    let status = guard.wait_exit("credproxy exec");
    assert_eq!(status.code(), Some(143), "CMD got the forwarded SIGTERM");
    (cmd_fds, exec_targets)
}

#[test]
fn cmd_has_only_stdin_stdout_and_stderr() {
    let (cmd_fds, exec_targets) = cmd_descriptors("");
    // The test is only meaningful if exec really holds what CMD must not get.
    assert!(
        exec_targets.iter().any(|t| t == "anon_inode:inotify"),
        "exec has no inotify descriptor: {exec_targets:?}"
    );
    assert!(
        exec_targets.iter().any(|t| t.starts_with("socket:")),
        "exec has no socket: {exec_targets:?}"
    );
    assert_eq!(cmd_fds, BTreeSet::from([0, 1, 2]));
}

#[test]
fn descriptors_exec_inherited_do_not_reach_cmd() {
    // exec's parent leaves descriptors 7 and 9 open across its own exec (no close-on-exec).
    let (cmd_fds, exec_targets) = cmd_descriptors(": >stray.in; exec 7<stray.in 9>>stray.log");
    assert!(
        exec_targets.iter().any(|t| t.ends_with("/stray.in")),
        "exec did inherit the stray descriptor: {exec_targets:?}"
    );
    assert_eq!(cmd_fds, BTreeSet::from([0, 1, 2]));
}
