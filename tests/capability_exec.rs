//! `credproxy exec --capability-token` (PROTOCOL.md §13, "Delivery to the sandbox"), run
//! as real processes: CMD gets the token on descriptor 3 (or `--capability-fd N`) as a
//! pipe holding exactly the 64 hex characters and a newline whose write end is closed
//! everywhere, `LLXPRT_CAPABILITY_FD` in its environment (also under `--clear-env`), and
//! nothing else changes: its other descriptors are exec's stdin, stdout and stderr, the
//! token is in neither its environment nor its command line, and exec keeps no copy of
//! the pipe. End to end, through a plain child and through bubblewrap, the inside command
//! that reads the descriptor gets its token; one started without the descriptor, with it
//! closed, or with another token is refused with a clear error.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::io::{ErrorKind, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::thread;
use std::time::{Duration, Instant};

use common::process::{
    path_str, sanitized, spawn_piped, strings, try_run, Canaries, ChildGuard, Env, FirstLine,
    Fixture, Run, Stdin, BIN, DEADLINE,
};
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use serde_json::Value;

const CANARY_AT: &str = "CANARY-AT-5f0a";
const CANARY_RT: &str = "CANARY-RT-e61b";
/// A well-formed token that is not the launch's.
const WRONG_TOKEN: &str = "deadbeefdeadbeefdeadbeefdeadbeefdeadbeefdeadbeefdeadbeefdeadbeef";

/// The refresh token anywhere; the access token and the wrong token in no log.
const CANARIES: Canaries = Canaries {
    never: &[CANARY_RT],
    not_logged: &[CANARY_AT, WRONG_TOKEN],
};

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

impl Fixture {
    /// The store: anthropic:default with canaries.
    fn seeded() -> Fixture {
        let f = Fixture::new();
        f.seed_token("anthropic", "default", CANARY_AT, CANARY_RT);
        f
    }

    /// `credproxy exec --store S --socket-dir D --allow anthropic EXTRA... -- CMD...`
    fn exec_args(&self, extra: &[&str], cmd: &[String]) -> Vec<String> {
        let mut args = strings(&["exec", "--store"]);
        args.push(path_str(&self.store));
        args.push("--socket-dir".into());
        args.push(path_str(&self.sock));
        args.extend(strings(&["--allow", "anthropic"]));
        args.extend(strings(extra));
        args.push("--".into());
        args.extend_from_slice(cmd);
        args
    }

    /// Runs `credproxy exec ... -- CMD` to its end; checks the canaries and the cleanup.
    fn exec(&self, extra: &[&str], cmd: &[String]) -> Run {
        let args = self.exec_args(extra, cmd);
        let run = try_run(BIN, &args, Stdin::Null, Env::ISOLATED).expect("spawn credproxy exec");
        CANARIES.check_run("credproxy exec", &run);
        assert!(self.sockets().is_empty(), "socket left behind: {run:?}");
        run
    }
}

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

/// What descriptor `fd` of `pid` points to.
fn target(pid: Pid, fd: i32) -> String {
    fs::read_link(format!("/proc/{pid}/fd/{fd}"))
        .unwrap_or_else(|e| panic!("readlink /proc/{pid}/fd/{fd}: {e}"))
        .to_string_lossy()
        .into_owned()
}

/// `/proc/PID/FILE` as text (NULs kept).
fn proc_text(pid: Pid, file: &str) -> String {
    let bytes = fs::read(format!("/proc/{pid}/{file}")).expect("read /proc file");
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Everything the pipe at descriptor `fd` of `pid` holds, read through a fresh
/// non-blocking open of it: the read stops at its end, which a pipe only has when no
/// process holds its write end any more (otherwise the read would block: a failure here).
fn pipe_content(pid: Pid, fd: i32) -> Vec<u8> {
    let mut pipe = fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK)
        .open(format!("/proc/{pid}/fd/{fd}"))
        .expect("open the descriptor's pipe");
    let mut out = Vec::new();
    let mut buf = [0u8; 256];
    loop {
        match pipe.read(&mut buf) {
            Ok(0) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                panic!("the pipe has no end: some process still holds its write end")
            }
            Err(e) => panic!("read the pipe: {e}"),
        }
    }
}

/// A `credproxy exec` whose CMD printed its pid and became `sleep`, for inspection.
struct Sleeping {
    exec: ChildGuard,
    cmd: Pid,
}

impl Sleeping {
    /// Runs `sh -c 'PRELUDE; exec credproxy exec EXTRA... -- sh -c "echo pid; exec sleep"'`
    /// (the prelude lets exec inherit stray descriptors) and waits for CMD's `exec sleep`.
    fn start(f: &Fixture, prelude: &str, extra: &[&str]) -> Sleeping {
        let cmd = strings(&["/bin/sh", "-c", "echo \"pid=$$\"; exec sleep 30"]);
        let exec_args = f.exec_args(extra, &cmd);
        let mut command = std::process::Command::new("/bin/sh");
        command
            .arg("-c")
            .arg(format!("{prelude}\nexec \"$@\""))
            .arg("sh")
            .arg(BIN)
            .args(&exec_args)
            .current_dir(f.tmp.path());
        Env::ISOLATED.apply(&mut command);
        let mut child = spawn_piped(&mut command).expect("spawn");
        let stdout = FirstLine::read(child.stdout.take().expect("stdout"));
        let exec = ChildGuard::new(child, true);
        let cmd = common::process::sleeping_cmd(stdout);
        Sleeping { exec, cmd }
    }

    /// Stops CMD (exec forwards SIGTERM) and waits for exec.
    fn stop(mut self) {
        self.exec.signal(Signal::SIGTERM);
        let status = self.exec.wait_exit("credproxy exec");
        assert_eq!(status.code(), Some(143), "CMD got the forwarded SIGTERM");
    }
}

/// Checks what CMD got on descriptor `fd`, and that nothing else of it changed; returns
/// the token.
#[track_caller]
fn assert_handed_over(s: &mut Sleeping, fd: i32) -> String {
    let (cmd, exec) = (s.cmd, s.exec.pid());
    assert_eq!(fds(cmd), BTreeSet::from([0, 1, 2, fd]), "CMD's descriptors");
    for std in 0..3 {
        assert_eq!(
            target(cmd, std),
            target(exec, std),
            "CMD's descriptor {std} is exec's"
        );
    }
    let pipe = target(cmd, fd);
    assert!(pipe.starts_with("pipe:["), "a pipe, not a file: {pipe}");
    // exec closes its copy right after the spawn returns, which CMD may outrun.
    let t0 = Instant::now();
    while holds(exec, &pipe) {
        assert!(t0.elapsed() < DEADLINE, "exec still holds the token's pipe");
        thread::sleep(Duration::from_millis(10));
    }
    let content = pipe_content(cmd, fd);
    assert_eq!(content.len(), 65, "{content:?}");
    assert_eq!(content[64], b'\n');
    let token = String::from_utf8(content[..64].to_vec()).expect("text");
    assert!(
        token
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')),
        "{token}"
    );
    for pid in [cmd, exec] {
        for file in ["environ", "cmdline"] {
            let text = proc_text(pid, file);
            assert!(!text.contains(&token), "the token is in /proc/{pid}/{file}");
        }
    }
    token
}

/// True when a descriptor of `pid` points to `target` (a `pipe:[inode]`).
fn holds(pid: Pid, target: &str) -> bool {
    fds(pid).into_iter().any(|n| {
        fs::read_link(format!("/proc/{pid}/fd/{n}")).is_ok_and(|t| t.to_string_lossy() == target)
    })
}

/// The variables of CMD's environment, sorted.
fn environ(pid: Pid) -> Vec<String> {
    let mut vars: Vec<String> = proc_text(pid, "environ")
        .split('\0')
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
        .collect();
    vars.sort();
    vars
}

// ---------------------------------------------------------------------------------------
// The descriptor
// ---------------------------------------------------------------------------------------

#[test]
fn cmd_gets_the_token_on_descriptor_3_and_nothing_else_changes() {
    let f = Fixture::seeded();
    // exec inherits stray descriptors 3 and 7: neither reaches CMD, whose descriptor 3 is
    // the token's pipe all the same.
    let prelude = ": >stray.in; exec 3<stray.in 7<stray.in";
    let mut s = Sleeping::start(&f, prelude, &["--capability-token"]);
    let token = assert_handed_over(&mut s, 3);
    let vars = environ(s.cmd);
    assert!(
        vars.contains(&"LLXPRT_CAPABILITY_FD=3".to_owned()),
        "{vars:?}"
    );
    assert!(
        vars.iter()
            .any(|v| v.starts_with("LLXPRT_CREDENTIAL_SOCKET=")),
        "{vars:?}"
    );
    let exec = s.exec.pid();
    for stray in [3, 7] {
        assert!(
            target(exec, stray).ends_with("/stray.in"),
            "exec has {stray}"
        );
    }
    s.stop();
    assert_eq!(token.len(), 64);
}

#[test]
fn capability_fd_and_clear_env_keep_the_variable() {
    let f = Fixture::seeded();
    let extra = ["--capability-token", "--capability-fd", "9", "--clear-env"];
    let mut s = Sleeping::start(&f, "", &extra);
    assert_handed_over(&mut s, 9);
    // CMD is a shell, which sets PWD itself.
    let vars: Vec<String> = environ(s.cmd)
        .into_iter()
        .filter(|v| !v.starts_with("PWD="))
        .collect();
    assert_eq!(vars.len(), 2, "{vars:?}");
    assert_eq!(vars[0], "LLXPRT_CAPABILITY_FD=9");
    assert!(vars[1].starts_with("LLXPRT_CREDENTIAL_SOCKET="), "{vars:?}");
    s.stop();
}

#[test]
fn without_a_token_an_inherited_variable_does_not_reach_cmd() {
    let f = Fixture::seeded();
    let s = Sleeping::start(&f, "export LLXPRT_CAPABILITY_FD=3", &[]);
    assert_eq!(fds(s.cmd), BTreeSet::from([0, 1, 2]));
    let vars = environ(s.cmd);
    assert!(
        !vars.iter().any(|v| v.starts_with("LLXPRT_CAPABILITY_FD=")),
        "{vars:?}"
    );
    s.stop();
}

#[test]
fn a_profile_key_turns_it_on() {
    let f = Fixture::seeded();
    let profile = f.tmp.path().join("p.toml");
    fs::write(&profile, "capability_token = true\n").expect("write profile");
    let mut s = Sleeping::start(&f, "", &["--profile", profile.to_str().expect("utf-8")]);
    assert_handed_over(&mut s, 3);
    s.stop();
}

#[test]
fn capability_fd_refuses_stdio_and_needs_a_token() {
    let f = Fixture::seeded();
    let cmd = strings(&["/bin/echo", "ran"]);
    for fd in ["0", "1", "2"] {
        let run = f.exec(&["--capability-token", "--capability-fd", fd], &cmd);
        assert_eq!(run.code(), Some(2), "{run:?}");
        assert_eq!(run.stdout, "", "CMD must not run: {run:?}");
        assert!(
            run.stderr
                .contains("descriptors 0, 1 and 2 are CMD's stdin, stdout and stderr"),
            "{run:?}"
        );
    }
    let run = f.exec(&["--capability-fd", "5"], &cmd);
    assert_eq!(run.code(), Some(2), "{run:?}");
    assert!(
        run.stderr
            .contains("--capability-fd needs --capability-token"),
        "{run:?}"
    );
    let run = f.exec(&["--capability-token", "--capability-fd", "5"], &cmd);
    assert_eq!(
        (run.code(), run.stdout.as_str()),
        (Some(0), "ran\n"),
        "{run:?}"
    );
}

// ---------------------------------------------------------------------------------------
// End to end
// ---------------------------------------------------------------------------------------

/// Inside the sandbox (`$1` is the binary, `$2` another well-formed token): three
/// processes that do not have the launch's token, then the one that reads descriptor 3.
const INSIDE: &str = r#"b=$1
env -u LLXPRT_CAPABILITY_FD "$b" token get anthropic 3<&-; echo "none-rc=$?"
"$b" token get anthropic 3<&-; echo "closed-rc=$?"
printf '%s\n' "$2" | "$b" token get anthropic 3<&0 </dev/null; echo "wrong-rc=$?"
"$b" token get anthropic; echo "rc=$?""#;

/// Asserts what [`INSIDE`] printed and said: the three refused clearly, the last one got
/// the token; the proxy logged each refused handshake with the peer, never a token.
#[track_caller]
fn assert_inside(run: &Run) {
    assert_eq!(run.code(), Some(0), "{run:?}");
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), 5, "{run:?}");
    assert_eq!(
        lines[..3],
        ["none-rc=3", "closed-rc=4", "wrong-rc=3"],
        "{run:?}"
    );
    let got: Value = serde_json::from_str(lines[3]).unwrap_or_else(|e| panic!("{e}: {run:?}"));
    assert_eq!((got, lines[4]), (sanitized(CANARY_AT), "rc=0"), "{run:?}");
    let said: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| l.starts_with("credproxy: "))
        .collect();
    assert_eq!(
        said,
        [
            "credproxy: UNAUTHORIZED: the credential proxy requires a capability token and \
             this sandbox has none (LLXPRT_CAPABILITY_FD is not set)",
            "credproxy: UNREACHABLE: no capability token: LLXPRT_CAPABILITY_FD names \
             descriptor 3, which is not open in this process (the launcher must pass it)",
            "credproxy: UNAUTHORIZED: the credential proxy refused this sandbox's capability \
             token",
        ],
        "{run:?}"
    );
    let refusals = run
        .stderr
        .lines()
        .filter(|l| l.contains("capability token refused") && l.contains("pid="))
        .count();
    assert_eq!(refusals, 2, "{run:?}");
}

#[test]
fn end_to_end_through_a_plain_child() {
    let f = Fixture::seeded();
    let cmd = strings(&["/bin/sh", "-c", INSIDE, "sh", BIN, WRONG_TOKEN]);
    let run = f.exec(&["--capability-token"], &cmd);
    assert_inside(&run);
}

/// The sandbox of tests/sandbox.rs (a fresh mount namespace, /usr read-only, the binary at
/// /credproxy) with the README's recipe, which also passes `LLXPRT_CAPABILITY_FD` on;
/// bubblewrap passes inherited descriptors through.
const RECIPE: &str = r#"s=$LLXPRT_CREDENTIAL_SOCKET
exec bwrap --bind "$s" "$s" --clearenv --setenv PATH /usr/bin:/bin \
    --setenv LLXPRT_CREDENTIAL_SOCKET "$s" \
    --setenv LLXPRT_CAPABILITY_FD "$LLXPRT_CAPABILITY_FD" \
    --ro-bind /usr /usr --symlink usr/lib /lib --symlink usr/lib64 /lib64 \
    --symlink usr/bin /bin --ro-bind "$0" /credproxy --proc /proc --dev /dev \
    --unshare-all --die-with-parent -- "$@""#;

/// Why bubblewrap cannot run the sandbox here, if it cannot.
fn bwrap_unavailable() -> Option<String> {
    let args = strings(&[
        "--ro-bind",
        "/usr",
        "/usr",
        "--symlink",
        "usr/lib",
        "/lib",
        "--symlink",
        "usr/lib64",
        "/lib64",
        "--ro-bind",
        BIN,
        "/credproxy",
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--unshare-all",
        "--",
        "/credproxy",
        "--version",
    ]);
    match try_run("bwrap", &args, Stdin::Null, Env::ISOLATED) {
        Err(e) => Some(format!("cannot run bwrap: {e}")),
        Ok(run) if run.status.success() => None,
        Ok(run) => Some(format!(
            "bwrap cannot build the sandbox: {}",
            run.stderr.trim_end()
        )),
    }
}

#[test]
fn end_to_end_through_bubblewrap() {
    if let Some(why) = bwrap_unavailable() {
        println!("skipped end_to_end_through_bubblewrap: {why}");
        return;
    }
    let f = Fixture::seeded();
    let mut cmd = strings(&["/bin/sh", "-c", RECIPE, BIN]);
    cmd.extend(strings(&[
        "/bin/sh",
        "-c",
        INSIDE,
        "sh",
        "/credproxy",
        WRONG_TOKEN,
    ]));
    let run = f.exec(&["--capability-token"], &cmd);
    assert_inside(&run);
}
