//! Driving the real `credproxy` binary as a child process: a guard that kills (and reaps)
//! the child on drop, commands with a controlled environment, output read on threads,
//! waits with a deadline, the `LLXPRT_CREDENTIAL_SOCKET=` line of `serve`, temporary store
//! and socket directories, seeding the store through `credproxy store`, and canary checks.

use std::ffi::OsStr;
use std::fmt::Debug;
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};

use super::Raw;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_credproxy");

/// How long any child gets to print its socket line or to exit.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// The variable the inside commands find the socket in.
pub const SOCKET_VAR: &str = "LLXPRT_CREDENTIAL_SOCKET";

/// The start of the one line `serve` prints on stdout.
pub const SOCKET_PREFIX: &str = "LLXPRT_CREDENTIAL_SOCKET=";

// ---------------------------------------------------------------------------------------
// Environment and process group
// ---------------------------------------------------------------------------------------

/// How a child is started. `RUST_LOG` is always removed from the inherited environment.
#[derive(Clone, Copy, Debug)]
pub struct Env<'a> {
    /// Also remove `LLXPRT_CREDENTIAL_SOCKET`.
    pub clear_socket: bool,
    /// Start the child in its own process group: its guard then kills the whole group.
    pub own_group: bool,
    /// Variables set after the removals.
    pub vars: &'a [(&'a str, &'a str)],
}

impl Env<'static> {
    /// Only `RUST_LOG` removed; the child stays in the test's process group.
    pub const PLAIN: Env<'static> = Env {
        clear_socket: false,
        own_group: false,
        vars: &[],
    };

    /// `RUST_LOG` and the socket variable removed; the child in its own process group.
    pub const ISOLATED: Env<'static> = Env {
        clear_socket: true,
        own_group: true,
        vars: &[],
    };
}

impl Env<'_> {
    /// The same environment with `vars` set.
    pub fn with<'b>(self, vars: &'b [(&'b str, &'b str)]) -> Env<'b> {
        Env {
            clear_socket: self.clear_socket,
            own_group: self.own_group,
            vars,
        }
    }

    /// Applies the environment and the process group to `cmd`.
    pub fn apply<'c>(&self, cmd: &'c mut Command) -> &'c mut Command {
        no_network(cmd);
        cmd.env_remove("RUST_LOG");
        if self.clear_socket {
            cmd.env_remove(SOCKET_VAR);
        }
        cmd.envs(self.vars.iter().copied());
        if self.own_group {
            cmd.process_group(0);
        }
        cmd
    }

    /// `program args` with this environment.
    pub fn command<S: AsRef<OsStr>>(&self, program: &str, args: &[S]) -> Command {
        let mut cmd = Command::new(program);
        cmd.args(args);
        self.apply(&mut cmd);
        cmd
    }
}

/// Points every proxy variable at a closed port on 127.0.0.1, loopback excepted, so
/// that a child that tries a provider's real token endpoint (a test token that looks
/// expired) fails at once instead of reaching the network. The token endpoints of the
/// tests are on 127.0.0.1 and are reached directly.
pub fn no_network(cmd: &mut Command) -> &mut Command {
    const NOWHERE: &str = "http://127.0.0.1:9";
    const LOOPBACK: &str = "127.0.0.1,localhost,::1";
    for name in [
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "ALL_PROXY",
        "all_proxy",
    ] {
        cmd.env(name, NOWHERE);
    }
    cmd.env("NO_PROXY", LOOPBACK).env("no_proxy", LOOPBACK)
}

/// Spawns `cmd` with stdin `/dev/null` and stdout and stderr piped.
pub fn spawn_piped(cmd: &mut Command) -> io::Result<Child> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
}

// ---------------------------------------------------------------------------------------
// Children
// ---------------------------------------------------------------------------------------

/// Kills (SIGKILL) and reaps the child when dropped before it was reaped, so no test leaves
/// a process behind even when it fails half-way. A child started in its own process group
/// (`Env::own_group`) is killed with its whole group (credproxy, CMD and its children).
pub struct ChildGuard {
    child: Option<Child>,
    group: bool,
}

impl ChildGuard {
    /// Guards `child`; `group` when it was started in its own process group.
    pub fn new(child: Child, group: bool) -> ChildGuard {
        ChildGuard {
            child: Some(child),
            group,
        }
    }

    pub fn child(&mut self) -> &mut Child {
        self.child.as_mut().expect("child still owned")
    }

    pub fn pid(&mut self) -> Pid {
        Pid::from_raw(self.child().id() as i32)
    }

    /// Sends `signal` to the child.
    pub fn signal(&mut self, signal: Signal) {
        let pid = self.pid();
        kill(pid, signal).expect("send signal");
    }

    /// True while the child has not exited (an exited child is reaped, so this is only for
    /// guards without a process group).
    pub fn running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Waits (polling every 20 ms for up to `DEADLINE`) for the child to exit; kills it and
    /// fails the test when it does not.
    pub fn wait_exit(&mut self, what: &str) -> ExitStatus {
        let t0 = Instant::now();
        loop {
            if let Some(status) = self.child().try_wait().expect("try_wait") {
                self.child = None;
                return status;
            }
            if t0.elapsed() > DEADLINE {
                self.kill();
                panic!("{what} did not exit within {DEADLINE:?}");
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL (to the group first when there is one), then reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            if self.group {
                // Not reaped yet: the pid (= the group id) is still ours.
                let _ = killpg(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Reads a pipe to its end on a thread.
pub fn drain(mut pipe: impl Read + Send + 'static) -> JoinHandle<String> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = pipe.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// What a command reads on stdin.
#[derive(Clone, Copy, Debug)]
pub enum Stdin<'a> {
    /// `/dev/null`.
    Null,
    /// A pipe fed these bytes (then closed); the child may exit without reading them all,
    /// so a broken pipe is fine.
    Pipe(&'a [u8]),
    /// A pipe fed these bytes (then closed); writing them must succeed.
    PipeAll(&'a [u8]),
}

/// The outcome of a finished command.
#[derive(Debug)]
pub struct Run {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }
}

/// Runs `program args` to its end (`DEADLINE` at most) with `stdin` and `env`, stdout and
/// stderr collected; panics when it cannot be spawned.
pub fn run<S: AsRef<OsStr> + Debug>(program: &str, args: &[S], stdin: Stdin, env: Env) -> Run {
    try_run(program, args, stdin, env).unwrap_or_else(|e| panic!("spawn {program}: {e}"))
}

/// As [`run`], but `Err` when `program` cannot be spawned.
pub fn try_run<S: AsRef<OsStr> + Debug>(
    program: &str,
    args: &[S],
    stdin: Stdin,
    env: Env,
) -> io::Result<Run> {
    let (input, strict) = match stdin {
        Stdin::Null => (None, false),
        Stdin::Pipe(bytes) => (Some(bytes.to_vec()), false),
        Stdin::PipeAll(bytes) => (Some(bytes.to_vec()), true),
    };
    let mut child = env
        .command(program, args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let pipe = child.stdin.take();
    let stdout = drain(child.stdout.take().expect("stdout"));
    let stderr = drain(child.stderr.take().expect("stderr"));
    let mut guard = ChildGuard::new(child, env.own_group);
    let writer = pipe.zip(input).map(|(mut pipe, bytes)| {
        // Written on a thread so a child that does not read cannot block the test.
        thread::spawn(move || pipe.write_all(&bytes))
    });
    let status = guard.wait_exit(&format!("{program} {args:?}"));
    if let Some(writer) = writer {
        let written = writer.join().expect("stdin thread");
        if strict {
            written.expect("write stdin");
        }
    }
    Ok(Run {
        status,
        stdout: stdout.join().expect("stdout thread"),
        stderr: stderr.join().expect("stderr thread"),
    })
}

// ---------------------------------------------------------------------------------------
// `credproxy serve`
// ---------------------------------------------------------------------------------------

/// The pid of a CMD that printed `pid=N` as its first line and then became `exec sleep`:
/// reads the line and waits (up to [`DEADLINE`]) until `/proc/N/comm` is `sleep`, so the
/// shell's own state is not what a test looks at.
pub fn sleeping_cmd(first: FirstLine) -> Pid {
    let line = first.wait().expect("CMD's pid line");
    let pid: i32 = line
        .trim_end()
        .strip_prefix("pid=")
        .unwrap_or_else(|| panic!("unexpected line {line:?}"))
        .parse()
        .expect("pid");
    let pid = Pid::from_raw(pid);
    let t0 = Instant::now();
    while fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .as_deref()
        != Some("sleep\n")
    {
        assert!(t0.elapsed() < DEADLINE, "CMD never became sleep");
        thread::sleep(Duration::from_millis(10));
    }
    pid
}

/// A child's stdout: its first line, handed over as soon as it is read, and the rest read
/// to its end on the same thread.
pub struct FirstLine {
    line: Receiver<io::Result<String>>,
    /// Everything after the first line.
    pub rest: JoinHandle<String>,
}

impl FirstLine {
    pub fn read(stdout: ChildStdout) -> FirstLine {
        let (tx, line) = mpsc::channel();
        let rest = thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            let read = reader.read_line(&mut line).map(|_| line);
            let _ = tx.send(read);
            let mut rest = Vec::new();
            let _ = reader.read_to_end(&mut rest);
            String::from_utf8_lossy(&rest).into_owned()
        });
        FirstLine { line, rest }
    }

    /// The first line (newline included) once it arrives within `DEADLINE`; otherwise what
    /// came instead (an error, an empty read at EOF, or the timeout).
    pub fn wait(&self) -> Result<String, String> {
        match self.line.recv_timeout(DEADLINE) {
            Ok(Ok(line)) if !line.is_empty() => Ok(line),
            other => Err(format!("{other:?}")),
        }
    }
}

/// The socket path of a `LLXPRT_CREDENTIAL_SOCKET=PATH\n` line; fails on anything else.
#[track_caller]
pub fn socket_path(line: &str) -> PathBuf {
    let path = line
        .strip_suffix('\n')
        .and_then(|l| l.strip_prefix(SOCKET_PREFIX))
        .unwrap_or_else(|| panic!("unexpected first stdout line {line:?}"));
    PathBuf::from(path)
}

/// A running `credproxy serve`, killed when dropped.
pub struct Server {
    pub child: ChildGuard,
    pub socket: PathBuf,
    stdout_rest: JoinHandle<String>,
    stderr: JoinHandle<String>,
}

/// What a stopped server left behind.
#[derive(Debug)]
pub struct Stopped {
    pub status: ExitStatus,
    /// Everything on stdout after the socket line.
    pub stdout_rest: String,
    pub stderr: String,
}

impl Server {
    /// Spawns `credproxy ARGS` (stdin `/dev/null`) and waits (up to `DEADLINE`) for its
    /// socket line.
    pub fn start(args: &[&str], env: Env) -> Server {
        let mut child = spawn_piped(&mut env.command(BIN, args)).expect("spawn credproxy serve");
        let stdout = FirstLine::read(child.stdout.take().expect("stdout"));
        let stderr = drain(child.stderr.take().expect("stderr"));
        let mut child = ChildGuard::new(child, env.own_group);
        let line = match stdout.wait() {
            Ok(line) => line,
            Err(other) => {
                child.kill();
                let err = stderr.join().unwrap_or_default();
                panic!("serve {args:?} printed no socket line ({other}); stderr: {err}");
            }
        };
        Server {
            child,
            socket: socket_path(&line),
            stdout_rest: stdout.rest,
            stderr,
        }
    }

    pub fn socket_str(&self) -> &str {
        self.socket.to_str().expect("utf-8")
    }

    /// A raw client with the handshake done.
    pub fn connect(&self) -> Raw {
        let mut raw = Raw::connect(&self.socket);
        raw.handshake();
        raw
    }

    pub fn signal(&mut self, signal: Signal) {
        self.child.signal(signal);
    }

    /// Sends `signal`, waits for the exit and collects the output.
    pub fn stop(mut self, signal: Signal) -> Stopped {
        self.signal(signal);
        let status = self.child.wait_exit(&format!("serve after {signal}"));
        Stopped {
            status,
            stdout_rest: self.stdout_rest.join().expect("stdout thread"),
            stderr: self.stderr.join().expect("stderr thread"),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Directories and the store
// ---------------------------------------------------------------------------------------

/// A private temporary directory with a store path (`store`, not created) and a 0700
/// socket directory (`sock`). Test files add their own methods (seeded constructors, the
/// commands they run on it) in their own `impl Fixture` blocks.
pub struct Fixture {
    pub tmp: tempfile::TempDir,
    pub store: PathBuf,
    pub sock: PathBuf,
}

impl Fixture {
    pub fn new() -> Fixture {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = tmp.path().join("store");
        let sock = tmp.path().join("sock");
        fs::create_dir(&sock).expect("mkdir sock");
        fs::set_permissions(&sock, fs::Permissions::from_mode(0o700)).expect("chmod sock");
        Fixture { tmp, store, sock }
    }

    pub fn store_str(&self) -> &str {
        self.store.to_str().expect("utf-8 path")
    }

    pub fn sock_str(&self) -> &str {
        self.sock.to_str().expect("utf-8 path")
    }

    /// The `.sock` files in the socket directory.
    pub fn sockets(&self) -> Vec<PathBuf> {
        sockets_in(&self.sock)
    }

    /// Starts `credproxy serve --store DIR --socket-dir SOCK EXTRA...` with `env`.
    pub fn start_serve(&self, extra: &[&str], env: Env) -> Server {
        let mut args = vec![
            "serve",
            "--store",
            self.store_str(),
            "--socket-dir",
            self.sock_str(),
        ];
        args.extend_from_slice(extra);
        Server::start(&args, env)
    }

    /// `credproxy store ARGS --store DIR` with `stdin` (`Env::ISOLATED`), which must exit 0.
    pub fn seed(&self, args: &[&str], stdin: &[u8]) -> Run {
        let mut all = vec!["store"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--store", self.store_str()]);
        let run = run(BIN, &all, Stdin::PipeAll(stdin), Env::ISOLATED);
        assert!(run.status.success(), "seeding {all:?}: {run:?}");
        run
    }

    /// Stores `token_json(access, refresh)` as provider:bucket.
    pub fn seed_token(&self, provider: &str, bucket: &str, access: &str, refresh: &str) -> Run {
        self.seed(
            &["token", "set", provider, "--bucket", bucket],
            token_json(access, refresh).as_bytes(),
        )
    }

    /// Stores the API key `name` (given on a line).
    pub fn seed_key(&self, name: &str, key: &str) -> Run {
        self.seed(&["key", "set", name], format!("{key}\n").as_bytes())
    }
}

/// The `.sock` files in `dir`.
pub fn sockets_in(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .expect("read socket dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "sock"))
        .collect()
}

/// Full token JSON as the host stores it.
pub fn token_json(access: &str, refresh: &str) -> String {
    json!({
        "access_token": access,
        "refresh_token": refresh,
        "expiry": 1_900_000_000,
        "token_type": "Bearer",
    })
    .to_string()
}

/// The sanitized copy of `token_json(access, _)`: what `get_token` answers.
pub fn sanitized(access: &str) -> Value {
    json!({"access_token": access, "expiry": 1_900_000_000, "token_type": "Bearer"})
}

pub fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

pub fn path_str(path: &Path) -> String {
    path.to_str().expect("utf-8 path").to_owned()
}

// ---------------------------------------------------------------------------------------
// Canaries
// ---------------------------------------------------------------------------------------

/// The secret values of a test file and where they may appear.
pub struct Canaries {
    /// Never printed anywhere (the refresh tokens).
    pub never: &'static [&'static str],
    /// Printed on stdout at most, by the commands that fetch them; never on stderr.
    pub not_logged: &'static [&'static str],
}

impl Canaries {
    /// Fails when `never` appears in either stream or `not_logged` on stderr.
    #[track_caller]
    pub fn check(&self, what: &str, stdout: &str, stderr: &str) {
        for canary in self.never {
            assert!(
                !stdout.contains(canary) && !stderr.contains(canary),
                "{what} printed the secret {canary}: stdout {stdout:?} stderr {stderr:?}"
            );
        }
        for canary in self.not_logged {
            assert!(!stderr.contains(canary), "{what} logged {canary}: {stderr}");
        }
    }

    #[track_caller]
    pub fn check_run(&self, what: &str, run: &Run) {
        self.check(what, &run.stdout, &run.stderr);
    }

    /// Fails when any of them appears in `text` (a log, or an output that fetched nothing).
    #[track_caller]
    pub fn absent(&self, what: &str, text: &str) {
        for canary in self.never.iter().chain(self.not_logged) {
            assert!(!text.contains(canary), "{what} printed {canary}: {text}");
        }
    }
}
