//! Running one source command: no shell, stdin closed, stdout read into a wiped buffer of
//! at most [`MAX_OUTPUT`] bytes, stderr kept as one trimmed line for the log, killed (its
//! whole process group) when it outruns its timeout or prints too much, or when the
//! server shuts down. Blocking: the engine runs it on its own worker pool.

use std::collections::HashSet;
use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use zeroize::Zeroizing;

/// The most a command may print on stdout, in bytes.
pub const MAX_OUTPUT: usize = 64 * 1024;

/// The most of stderr kept (the first line of it goes to the log).
const MAX_STDERR: usize = 4096;

/// Why a command gave no output to read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RunError {
    /// The program could not be started (not found, not executable).
    #[error("cannot start {program}: {reason}")]
    Start {
        /// The program (argv\[0\]).
        program: String,
        /// The operating system's reason.
        reason: String,
    },
    /// It exited unsuccessfully.
    #[error("{program} {status}{}", stderr_suffix(.stderr))]
    Failed {
        /// The program.
        program: String,
        /// "exited with status N" or "was killed by signal N".
        status: String,
        /// The first line of its stderr, trimmed (never containing the credential it may
        /// have printed on stdout).
        stderr: String,
    },
    /// It did not finish within the timeout and was killed.
    #[error("{program} did not finish within {} s and was killed", .timeout.as_secs())]
    Timeout {
        /// The program.
        program: String,
        /// The timeout.
        timeout: Duration,
    },
    /// It printed more than [`MAX_OUTPUT`] bytes and was killed.
    #[error("{program} printed more than {} KiB and was killed", MAX_OUTPUT / 1024)]
    TooLarge {
        /// The program.
        program: String,
    },
    /// The server is shutting down; the command was killed.
    #[error("{program} was stopped by shutdown")]
    Stopped {
        /// The program.
        program: String,
    },
}

fn stderr_suffix(line: &str) -> String {
    if line.is_empty() {
        String::new()
    } else {
        format!(": {line}")
    }
}

/// The process groups of commands running now, so shutdown can kill them.
#[derive(Debug, Default, Clone)]
pub struct Running {
    groups: Arc<Mutex<HashSet<i32>>>,
    stopped: Arc<std::sync::atomic::AtomicBool>,
}

impl Running {
    /// Kills every command running and refuses to start more.
    pub fn stop_all(&self) {
        self.stopped
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let groups = self.groups.lock().unwrap_or_else(|e| e.into_inner());
        for pgid in groups.iter() {
            let _ = killpg(Pid::from_raw(*pgid), Signal::SIGKILL);
        }
    }

    fn stopped(&self) -> bool {
        self.stopped.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Runs `command` (argv; `command[0]` looked up in `PATH`) and returns its stdout.
///
/// Both pipes are read with `poll` against one deadline, and the run ends when the command
/// has exited and nothing more is ready, or at the deadline: a process the command left
/// behind (in its group or in a session of its own) that keeps a pipe open cannot hold the
/// run past its timeout. The command is never reaped before its group is signalled, so a
/// reused pid can never make us signal an unrelated group.
pub fn run(
    command: &[String],
    timeout: Duration,
    running: &Running,
) -> Result<Zeroizing<Vec<u8>>, RunError> {
    let program = command.first().cloned().unwrap_or_default();
    if running.stopped() {
        return Err(RunError::Stopped { program });
    }
    let mut cmd = Command::new(&program);
    cmd.args(&command[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    crate::harden::restore_core_limit(&mut cmd);
    let mut child = cmd.spawn().map_err(|e| RunError::Start {
        program: program.clone(),
        reason: e.to_string(),
    })?;
    let pid = child.id() as i32;
    {
        let mut groups = running.groups.lock().unwrap_or_else(|e| e.into_inner());
        groups.insert(pid);
        // Stopped between the check above and the insert: stop_all did not see it.
        if running.stopped() {
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
    let deadline = Instant::now() + timeout;
    // Sized once (never reallocated: no unwiped copy left behind), read up to one byte
    // past the cap.
    let mut out = Zeroizing::new(vec![0u8; MAX_OUTPUT + 1]);
    let mut filled = 0;
    let mut err = Zeroizing::new(vec![0u8; MAX_STDERR]);
    let mut err_filled = 0;
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let mut timed_out = false;
    let mut too_large = false;
    loop {
        if running.stopped() {
            break;
        }
        let exited = has_exited(pid);
        let now = Instant::now();
        if now >= deadline {
            timed_out = !exited;
            break;
        }
        if stdout.is_none() && stderr.is_none() {
            if exited {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
            continue;
        }
        // Short slices: the stop flag and the command's exit are looked at often. Once
        // the command has exited, only what is ready now is still read.
        let slice = if exited {
            Duration::ZERO
        } else {
            (deadline - now).min(Duration::from_millis(100))
        };
        let mut fds = Vec::with_capacity(2);
        if let Some(o) = &stdout {
            fds.push(PollFd::new(o.as_fd(), PollFlags::POLLIN));
        }
        if let Some(e) = &stderr {
            fds.push(PollFd::new(e.as_fd(), PollFlags::POLLIN));
        }
        let ms = u16::try_from(slice.as_millis()).unwrap_or(u16::MAX);
        let ready = match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => break,
        };
        let flags: Vec<bool> = fds
            .iter()
            .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
            .collect();
        drop(fds);
        if ready == 0 {
            if exited {
                break;
            }
            continue;
        }
        let mut i = 0;
        if stdout.is_some() {
            if flags[i] {
                let o = stdout.as_mut().map(|o| o.read(&mut out[filled..]));
                match o {
                    Some(Ok(0)) | Some(Err(_)) | None => stdout = None,
                    Some(Ok(n)) => filled += n,
                }
                if filled > MAX_OUTPUT {
                    too_large = true;
                    break;
                }
            }
            i += 1;
        }
        if stderr.is_some() && flags[i] {
            let room = MAX_STDERR - err_filled;
            if room == 0 {
                // Kept what the log needs; the rest is read and dropped.
                let mut sink = [0u8; 512];
                match stderr.as_mut().map(|e| e.read(&mut sink)) {
                    Some(Ok(0)) | Some(Err(_)) | None => stderr = None,
                    Some(Ok(_)) => {}
                }
            } else {
                match stderr.as_mut().map(|e| e.read(&mut err[err_filled..])) {
                    Some(Ok(0)) | Some(Err(_)) | None => stderr = None,
                    Some(Ok(n)) => err_filled += n,
                }
            }
        }
    }
    // Signalled while the command is not yet reaped (a zombie at worst): its pid, and so
    // its group id, cannot have been reused. Leftovers of a command that finished in time
    // are left alone.
    let stopped = running.stopped();
    if timed_out || too_large || stopped {
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
    }
    drop(stdout);
    drop(stderr);
    running
        .groups
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&pid);
    let status = child.wait();
    out.truncate(filled);
    let stderr = first_line(&err[..err_filled], &out);
    if stopped {
        return Err(RunError::Stopped { program });
    }
    if timed_out {
        return Err(RunError::Timeout { program, timeout });
    }
    if too_large {
        return Err(RunError::TooLarge { program });
    }
    let status = status.map_err(|e| RunError::Start {
        program: program.clone(),
        reason: e.to_string(),
    })?;
    if !status.success() {
        let status = match (status.code(), status.signal()) {
            (Some(code), _) => format!("exited with status {code}"),
            (None, Some(sig)) => format!("was killed by signal {sig}"),
            _ => "failed".to_owned(),
        };
        return Err(RunError::Failed {
            program,
            status,
            stderr,
        });
    }
    Ok(out)
}

/// True when the process `pid` (our child) has exited; it is left unreaped.
fn has_exited(pid: i32) -> bool {
    use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};
    matches!(
        waitid(
            Id::Pid(Pid::from_raw(pid)),
            WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT,
        ),
        Ok(WaitStatus::Exited(..) | WaitStatus::Signaled(..)) | Err(_)
    )
}

/// The first non-empty line of `stderr`, trimmed, at most 200 characters, printable only;
/// withheld when stderr repeats any run of 8 or more credential-like characters of
/// `stdout` (a command that echoes its secret, or part of a JSON answer, there too).
fn first_line(stderr: &[u8], stdout: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("");
    let credential_char = |b: &u8| b.is_ascii_alphanumeric() || b"._~+/=-".contains(b);
    let repeats = stdout
        .split(|b| !credential_char(b))
        .filter(|w| w.len() >= 8)
        .any(|w| text.contains(&*String::from_utf8_lossy(w)));
    if repeats {
        return "(stderr withheld: it repeats part of the output)".to_owned();
    }
    line.chars().filter(|c| !c.is_control()).take(200).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Vec<String> {
        vec!["sh".into(), "-c".into(), script.into()]
    }

    #[test]
    fn output_failures_and_limits() {
        let r = Running::default();
        let t = Duration::from_secs(5);
        assert_eq!(&run(&sh("printf v1"), t, &r).unwrap()[..], b"v1");
        match run(&sh("echo oops >&2; exit 3"), t, &r).unwrap_err() {
            RunError::Failed { status, stderr, .. } => {
                assert_eq!(status, "exited with status 3");
                assert_eq!(stderr, "oops");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            run(&["/nonexistent/cmd".to_owned()], t, &r),
            Err(RunError::Start { .. })
        ));
        let started = std::time::Instant::now();
        assert!(matches!(
            run(&sh("sleep 30"), Duration::from_millis(300), &r),
            Err(RunError::Timeout { .. })
        ));
        assert!(started.elapsed() < Duration::from_secs(3));
        assert!(matches!(
            run(&sh("head -c 10485760 /dev/zero"), t, &r),
            Err(RunError::TooLarge { .. })
        ));
        // A secret echoed on stderr is not kept for the log.
        match run(
            &sh("echo secret-value; echo secret-value >&2; exit 1"),
            t,
            &r,
        )
        .unwrap_err()
        {
            RunError::Failed { stderr, .. } => assert!(!stderr.contains("secret-value")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_left_behind_process_holding_the_pipes_cannot_hold_the_run() {
        let r = Running::default();
        for script in [
            "printf v; sleep 30 &",
            "printf v; setsid sleep 30 &",
            "printf v; setsid sh -c 'sleep 30' 2>&1 &",
        ] {
            let started = std::time::Instant::now();
            let out = run(&sh(script), Duration::from_secs(2), &r).expect(script);
            assert_eq!(&out[..], b"v", "{script}");
            assert!(
                started.elapsed() < Duration::from_secs(1),
                "{script}: {:?}",
                started.elapsed()
            );
        }
        // A command that itself never ends is killed at the deadline, pipes held or not.
        let started = std::time::Instant::now();
        assert!(matches!(
            run(
                &sh("setsid sleep 30 & sleep 30"),
                Duration::from_millis(500),
                &r
            ),
            Err(RunError::Timeout { .. })
        ));
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn stderr_repeating_part_of_a_json_output_is_withheld() {
        let r = Running::default();
        let script = r#"printf '{"token":"abcdefgh123"}'; echo 'token is abcdefgh123' >&2; exit 1"#;
        match run(&sh(script), Duration::from_secs(5), &r).unwrap_err() {
            RunError::Failed { stderr, .. } => {
                assert!(!stderr.contains("abcdefgh123"), "{stderr}");
                assert!(stderr.contains("withheld"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn stop_all_kills_running_commands() {
        let r = Running::default();
        let r2 = r.clone();
        let t = std::thread::spawn(move || run(&sh("sleep 30"), Duration::from_secs(20), &r2));
        std::thread::sleep(Duration::from_millis(300));
        r.stop_all();
        assert!(matches!(t.join().unwrap(), Err(RunError::Stopped { .. })));
        assert!(matches!(
            run(&sh("printf x"), Duration::from_secs(1), &r),
            Err(RunError::Stopped { .. })
        ));
    }
}
