//! A signal `serve` or `exec` was started with ignored stays ignored (review finding):
//! `nohup credproxy exec -- job &` and `nohup credproxy serve &` must survive the terminal
//! closing, and `exec`'s command inherits the ignore, as it would without credproxy.

mod common;

use std::thread;
use std::time::Duration;

use common::process::{drain, run, spawn_piped, ChildGuard, Env, FirstLine, Fixture, Stdin, BIN};
use nix::sys::signal::{kill, Signal};

#[test]
fn exec_leaves_an_inherited_ignored_hangup_ignored_for_itself_and_cmd() {
    let f = Fixture::new();
    // The parent ignores HUP and INT (nohup; a background job); CMD sends both to exec,
    // then HUP to itself.
    let script = format!(
        "trap '' HUP INT; exec {BIN} exec --store {} --socket-dir {} -- \
         sh -c 'kill -HUP $PPID; kill -INT $PPID; sleep 0.3; kill -HUP $$; echo child-alive'",
        f.store_str(),
        f.sock_str()
    );
    let run = run("sh", &["-c", &script], Stdin::Null, Env::ISOLATED);
    assert_eq!(run.code(), Some(0), "{run:?}");
    assert_eq!(run.stdout, "child-alive\n", "{run:?}");
}

#[test]
fn serve_started_with_hangup_ignored_keeps_serving_through_it() {
    let f = Fixture::new();
    let script = format!(
        "trap '' HUP; exec {BIN} serve --store {} --socket-dir {}",
        f.store_str(),
        f.sock_str()
    );
    let mut cmd = Env::ISOLATED.command("sh", &["-c", &script]);
    let mut child = spawn_piped(&mut cmd).expect("spawn");
    let stdout = FirstLine::read(child.stdout.take().expect("stdout"));
    let stderr = drain(child.stderr.take().expect("stderr"));
    let mut guard = ChildGuard::new(child, true);
    let line = stdout.wait().expect("socket line");
    let socket = common::process::socket_path(&line);
    let pid = guard.pid();
    kill(pid, Signal::SIGHUP).expect("HUP");
    thread::sleep(Duration::from_millis(300));
    assert!(guard.running(), "serve ended on an ignored SIGHUP");
    assert!(socket.exists(), "the socket is gone");
    // SIGTERM still shuts it down cleanly.
    kill(pid, Signal::SIGTERM).expect("TERM");
    let status = guard.wait_exit("serve after SIGTERM");
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert!(!socket.exists());
    let log = stderr.join().expect("stderr");
    assert!(!log.contains("signal=\"SIGHUP\""), "{log}");
}
