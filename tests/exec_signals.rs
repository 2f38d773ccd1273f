//! `credproxy exec`'s signal rules, driven on the real binary.
//!
//! - Ctrl-C on a terminal reaches CMD from the kernel (it shares the foreground process
//!   group); `exec` neither forwards nor counts it, so an interactive CMD that uses Ctrl-C
//!   to cancel an operation survives any number of them (issue 13 item 2). Tested on a
//!   pty that is the controlling terminal of `exec`'s session (`setsid --ctty`).
//! - A stop signal (SIGINT, SIGTERM) that `exec` forwarded itself escalates to SIGKILL
//!   only when another one comes within the escalation window (3 s) after it; that
//!   includes the terminal's Ctrl-C when CMD runs in its own session (it did not get it,
//!   so `exec` forwards it).
//! - The other catchable signals whose default would kill `exec` are forwarded (SIGUSR1,
//!   SIGUSR2, SIGALRM, SIGWINCH) or dropped (SIGVTALRM, SIGPROF, SIGXCPU, SIGXFSZ, SIGIO,
//!   SIGPWR, SIGSTKFLT): `exec` never dies before CMD (issue 13 item 8).

mod common;

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::thread;
use std::time::{Duration, Instant};

use common::process::{path_str, strings, ChildGuard, Fixture, BIN, DEADLINE};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// `exec`'s escalation window, as documented.
const WINDOW: Duration = Duration::from_secs(3);

/// `exec --store S --socket-dir D --allow anthropic -- /bin/sh -c SCRIPT`.
fn exec_args(f: &Fixture, script: &str) -> Vec<String> {
    let mut args = strings(&["exec", "--store"]);
    args.push(path_str(&f.store));
    args.push("--socket-dir".into());
    args.push(path_str(&f.sock));
    args.extend(strings(&[
        "--allow",
        "anthropic",
        "--",
        "/bin/sh",
        "-c",
        script,
    ]));
    args
}

/// `credproxy exec ... -- /bin/sh -c SCRIPT` under `setsid --ctty` on a new pty: exec
/// leads a new session whose controlling terminal is the pty, so it and CMD are the pty's
/// foreground process group, as under an interactive shell. Returns the guard, the pty's
/// master (to type on) and what the terminal shows.
fn exec_on_pty(f: &Fixture, script: &str) -> (ChildGuard, File, Output) {
    let pty = nix::pty::openpty(None, None).expect("openpty");
    let slave = File::from(pty.slave);
    let mut cmd = Command::new("setsid");
    cmd.arg("--ctty")
        .arg(BIN)
        .args(exec_args(f, script))
        .env_remove("RUST_LOG")
        .env_remove("LLXPRT_CREDENTIAL_SOCKET")
        .stdin(Stdio::from(slave.try_clone().expect("dup")))
        .stdout(Stdio::from(slave.try_clone().expect("dup")))
        .stderr(Stdio::from(slave));
    let child = cmd.spawn().expect("spawn setsid --ctty credproxy exec");
    drop(cmd);
    let guard = ChildGuard::new(child, false);
    let master = File::from(pty.master);
    let out = Output::read(master.try_clone().expect("dup master"));
    (guard, master, out)
}

/// Everything a child wrote on its output, read on a thread and matched against.
struct Output {
    chunks: Receiver<Vec<u8>>,
    text: String,
}

impl Output {
    fn read(mut from: impl Read + Send + 'static) -> Output {
        let (tx, chunks) = mpsc::channel();
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // A pty master reads EIO once every slave is closed: that is the end too.
            while let Ok(n) = from.read(&mut buf) {
                if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        Output {
            chunks,
            text: String::new(),
        }
    }

    /// Waits (up to `DEADLINE`) until the output contains `want`.
    #[track_caller]
    fn wait_for(&mut self, want: &str) {
        let t0 = Instant::now();
        while !self.text.contains(want) {
            let left = DEADLINE.saturating_sub(t0.elapsed());
            match self.chunks.recv_timeout(left) {
                Ok(chunk) => self.text.push_str(&String::from_utf8_lossy(&chunk)),
                Err(e) => panic!("no {want:?} ({e:?}); output so far: {:?}", self.text),
            }
        }
    }

    /// Waits (up to `DEADLINE`) until the output holds a whole line from `prefix` on.
    #[track_caller]
    fn wait_for_line(&mut self, prefix: &str) {
        let t0 = Instant::now();
        while !self
            .text
            .find(prefix)
            .is_some_and(|at| self.text[at..].contains('\n'))
        {
            let left = DEADLINE.saturating_sub(t0.elapsed());
            match self.chunks.recv_timeout(left) {
                Ok(chunk) => self.text.push_str(&String::from_utf8_lossy(&chunk)),
                Err(e) => panic!("no {prefix:?} line ({e:?}); output so far: {:?}", self.text),
            }
        }
    }

    /// The number after `prefix` on its line (the output must contain it).
    fn number_after(&self, prefix: &str) -> i32 {
        let start = self.text.find(prefix).expect("prefix") + prefix.len();
        let digits: String = self.text[start..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().expect("a number")
    }
}

#[track_caller]
fn assert_alive(pid: Pid, what: &str) {
    assert!(kill(pid, None).is_ok(), "{what} (pid {pid}) is gone");
}

#[test]
fn ctrl_c_on_the_terminal_never_kills_an_interactive_cmd() {
    let f = Fixture::new();
    let script = "n=0\n\
                  trap 'n=$((n+1)); echo \"int-$n\"' INT\n\
                  trap 'echo \"term-after-$n\"; exit 9' TERM\n\
                  echo \"ready-$$-$PPID\"\n\
                  while kill -0 $PPID 2>/dev/null; do sleep 0.05; done";
    let (mut guard, mut master, mut out) = exec_on_pty(&f, script);
    out.wait_for_line("ready-");
    let cmd_pid = Pid::from_raw(out.number_after("ready-"));
    let exec_pid = guard.pid();
    assert_eq!(
        out.number_after(&format!("ready-{cmd_pid}-")),
        exec_pid.as_raw(),
        "CMD is exec's child (setsid did not fork)"
    );

    for n in 1..=4 {
        master.write_all(b"\x03").expect("write Ctrl-C");
        out.wait_for(&format!("int-{n}"));
        assert_alive(exec_pid, "credproxy exec");
        assert_alive(cmd_pid, "CMD");
    }
    // exec still forwards what it is sent itself, and kept serving throughout.
    kill(exec_pid, Signal::SIGTERM).expect("SIGTERM");
    out.wait_for("term-after-4");
    let status = guard.wait_exit("credproxy exec");
    assert_eq!(status.code(), Some(9), "output: {:?}", out.text);
    assert_eq!(f.sockets(), Vec::<std::path::PathBuf>::new(), "socket left");
}

/// A running `exec` around `script` with stdout and stderr piped into one `Output`.
fn spawn_exec(f: &Fixture, script: &str) -> (ChildGuard, Output) {
    spawn_exec_env(f, script, &[])
}

/// As [`spawn_exec`], with `envs` set for exec.
fn spawn_exec_env(f: &Fixture, script: &str, envs: &[(&str, &str)]) -> (ChildGuard, Output) {
    let (read, write) = nix::unistd::pipe().expect("pipe");
    let write = File::from(write);
    let mut cmd = Command::new(BIN);
    cmd.args(exec_args(f, script))
        .env_remove("RUST_LOG")
        .env_remove("LLXPRT_CREDENTIAL_SOCKET")
        .envs(envs.iter().copied())
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::from(write.try_clone().expect("dup")))
        .stderr(Stdio::from(write));
    let child = cmd.spawn().expect("spawn credproxy exec");
    // Our copies of the write end go with `cmd`, so the output ends when exec's group does.
    drop(cmd);
    let out = Output::read(File::from(read));
    (ChildGuard::new(child, true), out)
}

#[test]
fn stop_signals_far_apart_are_each_forwarded_and_never_escalate() {
    let f = Fixture::new();
    let script = "n=0\n\
                  trap 'n=$((n+1)); echo \"term-$n\"; [ $n = 2 ] && exit 9' TERM\n\
                  echo ready\n\
                  while :; do sleep 0.05; done";
    let (mut guard, mut out) = spawn_exec(&f, script);
    out.wait_for("ready");
    guard.signal(Signal::SIGTERM);
    out.wait_for("term-1");
    let first = Instant::now();
    // Past the window (a fixed wait is the point here: time must pass).
    thread::sleep(WINDOW + Duration::from_millis(500));
    assert!(first.elapsed() > WINDOW);
    guard.signal(Signal::SIGTERM);
    out.wait_for("term-2");
    let status = guard.wait_exit("credproxy exec");
    assert_eq!(status.code(), Some(9), "output: {:?}", out.text);
}

#[test]
fn a_second_stop_signal_within_the_window_still_kills() {
    let f = Fixture::new();
    let script = "trap 'echo got-stop' TERM INT\necho ready\nwhile :; do sleep 0.05; done";
    let (mut guard, mut out) = spawn_exec(&f, script);
    out.wait_for("ready");
    // Back to back, so even a loaded machine keeps them well inside the window; two
    // different signals, so neither can merge into the other while pending.
    guard.signal(Signal::SIGTERM);
    guard.signal(Signal::SIGINT);
    let status = guard.wait_exit("credproxy exec");
    assert_eq!(status.code(), Some(137), "output: {:?}", out.text);
    assert_eq!(f.sockets(), Vec::<std::path::PathBuf>::new(), "socket left");
}

#[test]
fn terminal_ctrl_c_is_forwarded_to_a_cmd_in_its_own_session_and_counts() {
    // CMD calls setsid: the terminal's Ctrl-C reaches exec only, which must pass it on;
    // since exec forwarded it, two within the window escalate.
    let f = Fixture::new();
    let inner = f.tmp.path().join("own-session.sh");
    std::fs::write(
        &inner,
        "n=0\ntrap 'n=$((n+1)); echo \"int-$n\"' INT\necho \"ready-$$\"\n\
         while :; do sleep 0.05; done\n",
    )
    .expect("write script");
    let script = format!("exec setsid /bin/sh {}", path_str(&inner));
    let script = script.as_str();
    let (mut guard, mut master, mut out) = exec_on_pty(&f, script);
    out.wait_for_line("ready-");
    let cmd_pid = Pid::from_raw(out.number_after("ready-"));
    master.write_all(b"\x03").expect("write Ctrl-C");
    out.wait_for("int-1");
    assert_alive(cmd_pid, "CMD");
    master.write_all(b"\x03").expect("write Ctrl-C");
    let status = guard.wait_exit("credproxy exec");
    assert_eq!(status.code(), Some(137), "output: {:?}", out.text);
}

#[test]
fn user_and_message_signals_are_forwarded_to_cmd() {
    for (signal, name) in [
        (Signal::SIGUSR1, "USR1"),
        (Signal::SIGUSR2, "USR2"),
        (Signal::SIGALRM, "ALRM"),
        (Signal::SIGWINCH, "WINCH"),
    ] {
        let f = Fixture::new();
        let script = format!(
            "trap 'echo got-{name}; exit 9' {name}\necho ready\nwhile :; do sleep 0.05; done"
        );
        let (mut guard, mut out) = spawn_exec(&f, &script);
        out.wait_for("ready");
        guard.signal(signal);
        out.wait_for(&format!("got-{name}"));
        let status = guard.wait_exit("credproxy exec");
        assert_eq!(status.code(), Some(9), "{name}: output: {:?}", out.text);
        assert_eq!(f.sockets(), Vec::<std::path::PathBuf>::new(), "socket left");
    }
}

#[test]
fn signals_that_concern_exec_alone_are_dropped_and_never_kill_it() {
    for signal in [
        Signal::SIGVTALRM,
        Signal::SIGPROF,
        Signal::SIGXCPU,
        Signal::SIGXFSZ,
        Signal::SIGIO,
        #[cfg(target_os = "linux")]
        Signal::SIGPWR,
        #[cfg(all(
            target_os = "linux",
            not(any(target_arch = "mips", target_arch = "mips64", target_arch = "sparc64"))
        ))]
        Signal::SIGSTKFLT,
    ] {
        let f = Fixture::new();
        // CMD keeps every default: had the signal reached it, it would die of it.
        let script = "trap 'echo got-TERM; exit 9' TERM\necho ready\nwhile :; do sleep 0.05; done";
        let debug = [("RUST_LOG", "credproxy::cli::exec=debug")];
        let (mut guard, mut out) = spawn_exec_env(&f, script, &debug);
        out.wait_for("ready");
        guard.signal(signal);
        out.wait_for(&format!(
            "dropping a signal that concerns exec alone signal={signal}"
        ));
        assert_alive(guard.pid(), "credproxy exec");
        // exec goes on relaying: CMD, untouched by the first signal, gets this one.
        guard.signal(Signal::SIGTERM);
        out.wait_for("got-TERM");
        let status = guard.wait_exit("credproxy exec");
        assert_eq!(status.code(), Some(9), "{signal}: output: {:?}", out.text);
    }
}

/// The escalation kills CMD's whole group when CMD leads one (it called setsid): a child
/// it started does not outlive exec and its proxy (review finding).
#[test]
fn escalation_kills_the_group_of_a_cmd_that_leads_one() {
    let f = Fixture::new();
    // CMD ignores the stop signals (so the first cannot end it before the second comes),
    // leads its own group, and has a child in it.
    let script = "exec setsid /bin/sh -c 'trap \"\" TERM INT; sleep 300 & echo \"child-$!\"; wait'";
    let (mut guard, mut out) = spawn_exec(&f, script);
    out.wait_for_line("child-");
    let child = Pid::from_raw(out.number_after("child-"));
    assert!(kill(child, None).is_ok(), "the grandchild runs");
    guard.signal(Signal::SIGTERM);
    guard.signal(Signal::SIGINT);
    let status = guard.wait_exit("credproxy exec");
    assert_eq!(status.code(), Some(137), "output: {:?}", out.text);
    // Killed with its group (reaped by init, so wait until it is gone).
    let t0 = Instant::now();
    while kill(child, None).is_ok() && t0.elapsed() < DEADLINE {
        thread::sleep(Duration::from_millis(20));
    }
    let alive = kill(child, None).is_ok();
    if alive {
        let _ = kill(child, Signal::SIGKILL);
    }
    assert!(!alive, "the grandchild outlived the escalation");
}
