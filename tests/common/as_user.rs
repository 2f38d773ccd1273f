//! Running the real binary as another uid (see [`super::unprivileged`]): `serve` until it
//! prints its socket line or exits, and one-shot commands with stdin.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;

use super::process::{drain, socket_path, ChildGuard, DEADLINE, SOCKET_PREFIX};
use super::unprivileged;

/// What a `credproxy serve` run as another uid did.
#[derive(Debug)]
pub enum Served {
    /// It printed its socket line (then it was stopped); the socket path.
    Listening(std::path::PathBuf),
    /// It exited without serving; its exit code and stderr.
    Refused(Option<i32>, String),
}

/// A command running `credproxy ARGS` as `uid` with `vars` set and `RUST_LOG` removed.
pub fn command(uid: u32, args: &[&str], vars: &[(&str, &str)]) -> Command {
    let mut cmd = unprivileged::command(unprivileged::binary(), uid);
    cmd.args(args)
        .env_remove("RUST_LOG")
        .env_remove("LLXPRT_CREDENTIAL_SOCKET")
        .envs(vars.iter().copied());
    cmd
}

/// A running child killed (and reaped) on drop.
pub struct Running(pub Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `credproxy serve ARGS` as `uid`; returns the child and the socket path when it
/// printed its socket line, or its exit code and stderr when it exited instead.
pub fn start_serve(
    uid: u32,
    args: &[&str],
    vars: &[(&str, &str)],
) -> Result<(Running, std::path::PathBuf), (Option<i32>, String)> {
    let mut all = vec!["serve"];
    all.extend_from_slice(args);
    let mut child = command(uid, &all, vars)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn credproxy serve");
    let stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx.recv_timeout(DEADLINE).unwrap_or_default();
    if line.starts_with(SOCKET_PREFIX) {
        // Keep stderr drained so the server never blocks on a full pipe.
        thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
        return Ok((Running(child), socket_path(&line)));
    }
    let mut err = String::new();
    let _ = child.kill();
    let status = child.wait().expect("wait");
    let _ = stderr.read_to_string(&mut err);
    Err((status.code(), err))
}

/// Starts `credproxy serve ARGS` as `uid` and stops it at once: what it did.
pub fn serve(uid: u32, args: &[&str], vars: &[(&str, &str)]) -> Served {
    match start_serve(uid, args, vars) {
        Ok((_running, path)) => Served::Listening(path),
        Err((code, err)) => Served::Refused(code, err),
    }
}

/// Runs `credproxy ARGS` as `uid` with `stdin` to its end: exit code, stdout, stderr.
/// A child still running after [`DEADLINE`] is killed and the test fails.
pub fn run(uid: u32, args: &[&str], stdin: &[u8]) -> (Option<i32>, String, String) {
    let mut child = command(uid, args, &[])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn credproxy");
    let mut pipe = child.stdin.take().expect("stdin");
    let input = stdin.to_vec();
    let writer = thread::spawn(move || pipe.write_all(&input));
    let stdout = drain(child.stdout.take().expect("stdout"));
    let stderr = drain(child.stderr.take().expect("stderr"));
    let mut guard = ChildGuard::new(child, false);
    let status = guard.wait_exit(&format!("credproxy {args:?} as uid {uid}"));
    let _ = writer.join();
    (
        status.code(),
        stdout.join().expect("stdout thread"),
        stderr.join().expect("stderr thread"),
    )
}
