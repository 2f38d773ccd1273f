//! The whole setup run as the non-root [`USER`]: a home directory it owns (store, socket
//! directory, canary file), its store seeded through `credproxy store`, and `credproxy
//! serve` run as that uid (optionally under `ulimit -c unlimited`), since root passes
//! every check the hardening tests are about.

use std::ffi::OsStr;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{chown, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread::JoinHandle;

use super::process::{drain, socket_path, spawn_piped, token_json, ChildGuard, FirstLine, Run};
use super::unprivileged::{self, USER};

/// A directory owned by [`USER`] (mode 0700) with `store` (made by `credproxy store`),
/// `sock` (0700) and a `canaries` file listing the secrets to look for.
pub struct UserHome {
    _parent: tempfile::TempDir,
    pub dir: PathBuf,
    pub store: PathBuf,
    pub sock: PathBuf,
    pub canaries: PathBuf,
}

impl UserHome {
    /// A fresh home whose `canaries` file lists `canaries`.
    pub fn new(canaries: &[&str]) -> UserHome {
        let (parent, dir) = unprivileged::dir_owned_by(USER, 0o700);
        let sock = dir.join("sock");
        fs::create_dir(&sock).expect("mkdir sock");
        fs::set_permissions(&sock, fs::Permissions::from_mode(0o700)).expect("chmod");
        chown(&sock, Some(USER), Some(USER)).expect("chown");
        let list = dir.join("canaries");
        fs::write(&list, canaries.join("\n")).expect("write canaries");
        chown(&list, Some(USER), Some(USER)).expect("chown");
        UserHome {
            _parent: parent,
            store: dir.join("store"),
            dir,
            sock,
            canaries: list,
        }
    }

    pub fn store_str(&self) -> &str {
        self.store.to_str().expect("utf-8")
    }

    pub fn sock_str(&self) -> &str {
        self.sock.to_str().expect("utf-8")
    }

    /// Stores a full token for `provider` (default bucket) as [`USER`].
    pub fn seed_token(&self, provider: &str, access: &str, refresh: &str) {
        let run = run_as(
            unprivileged::binary(),
            &[
                "store",
                "token",
                "set",
                provider,
                "--store",
                self.store_str(),
            ],
            token_json(access, refresh).as_bytes(),
            &[],
        );
        assert!(run.status.success(), "seeding as {USER}: {run:?}");
    }

    /// Starts `credproxy serve --store S --socket-dir SOCK EXTRA...` as [`USER`], in this
    /// directory, after `ulimit ULIMIT` when given (e.g. `-c unlimited`).
    pub fn serve(&self, extra: &[&str], ulimit: Option<&str>) -> UserServer {
        let mut args = vec![
            "serve",
            "--store",
            self.store_str(),
            "--socket-dir",
            self.sock_str(),
        ];
        args.extend_from_slice(extra);
        let bin = unprivileged::binary();
        let mut cmd = if let Some(ulimit) = ulimit {
            let mut cmd = unprivileged::command("sh", USER);
            cmd.arg("-c")
                .arg(format!("ulimit {ulimit} && exec \"$0\" \"$@\""))
                .arg(bin)
                .args(&args);
            cmd
        } else {
            let mut cmd = unprivileged::command(bin, USER);
            cmd.args(&args);
            cmd
        };
        cmd.current_dir(&self.dir).env_remove("RUST_LOG");
        let mut child = spawn_piped(&mut cmd).expect("spawn serve");
        let stdout = FirstLine::read(child.stdout.take().expect("stdout"));
        let stderr = drain(child.stderr.take().expect("stderr"));
        let mut child = ChildGuard::new(child, false);
        let line = match stdout.wait() {
            Ok(line) => line,
            Err(other) => {
                child.kill();
                panic!(
                    "serve as {USER} printed no socket line ({other}); stderr: {}",
                    stderr.join().unwrap_or_default()
                );
            }
        };
        UserServer {
            child,
            socket: socket_path(&line),
            stderr,
        }
    }
}

/// `credproxy serve` running as [`USER`]; killed when dropped.
pub struct UserServer {
    pub child: ChildGuard,
    pub socket: PathBuf,
    pub stderr: JoinHandle<String>,
}

impl UserServer {
    /// `credproxy token get PROVIDER` through this server, as [`USER`] (so the server has
    /// read and served the token); returns its stdout.
    pub fn fetch_token(&self, provider: &str) -> String {
        let run = run_as(
            unprivileged::binary(),
            &["token", "get", provider],
            b"",
            &[("LLXPRT_CREDENTIAL_SOCKET", self.socket.as_os_str())],
        );
        assert!(run.status.success(), "token get: {run:?}");
        run.stdout
    }
}

/// Runs `program args` as [`USER`] with `stdin` and `vars`, to its end (`DEADLINE`).
pub fn run_as<S: AsRef<OsStr>>(
    program: &Path,
    args: &[S],
    stdin: &[u8],
    vars: &[(&str, &OsStr)],
) -> Run {
    let mut cmd = unprivileged::command(program, USER);
    cmd.args(args).env_remove("RUST_LOG");
    for (k, v) in vars {
        cmd.env(k, v);
    }
    run_command(&mut cmd, stdin)
}

/// Runs `cmd` to its end (`DEADLINE`) with `stdin`, output collected.
pub fn run_command(cmd: &mut Command, stdin: &[u8]) -> Run {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut input = child.stdin.take().expect("stdin");
    let stdout = drain(child.stdout.take().expect("stdout"));
    let stderr = drain(child.stderr.take().expect("stderr"));
    let _ = input.write_all(stdin);
    drop(input);
    let mut guard = ChildGuard::new(child, false);
    let status = guard.wait_exit("command as the user");
    Run {
        status,
        stdout: stdout.join().expect("stdout"),
        stderr: stderr.join().expect("stderr"),
    }
}
