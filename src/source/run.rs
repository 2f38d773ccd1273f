//! Running one source command: no shell, stdin closed, stdout read into a wiped buffer of
//! at most [`MAX_OUTPUT`] bytes, stderr kept as one trimmed line for the log, killed (its
//! whole process group) when it outruns its timeout or prints too much, or when the
//! server shuts down. Blocking: the engine runs it on its own worker pool.

use std::collections::HashSet;
use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

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
    let pgid = child.id() as i32;
    running
        .groups
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(pgid);
    let kill = || {
        let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
    };
    // A watchdog kills the group at the deadline unless told the command is done.
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let timed_out = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watchdog = {
        let timed_out = timed_out.clone();
        std::thread::Builder::new()
            .name("credproxy-source-watch".into())
            .spawn(move || {
                if let Err(mpsc::RecvTimeoutError::Timeout) = done_rx.recv_timeout(timeout) {
                    timed_out.store(true, std::sync::atomic::Ordering::SeqCst);
                    let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
                }
            })
    };
    let stderr = child.stderr.take().map(|mut err| {
        std::thread::spawn(move || {
            let mut buf = Vec::with_capacity(MAX_STDERR);
            let _ = (&mut err).take(MAX_STDERR as u64).read_to_end(&mut buf);
            // Drain the rest so the command never blocks on a full stderr pipe.
            let _ = std::io::copy(&mut err, &mut std::io::sink());
            buf
        })
    });
    // Sized once (never reallocated: no unwiped copy left behind), read up to one byte
    // past the cap.
    let mut out = Zeroizing::new(Vec::with_capacity(
        MAX_OUTPUT + 1 + crate::backend::file::PROBE_SLACK,
    ));
    let mut too_large = false;
    if let Some(stdout) = child.stdout.take() {
        let _ = stdout.take(MAX_OUTPUT as u64 + 1).read_to_end(&mut out);
        if out.len() > MAX_OUTPUT {
            too_large = true;
            kill();
        }
    }
    let status = child.wait();
    let _ = done_tx.send(());
    if let Ok(w) = watchdog {
        let _ = w.join();
    }
    running
        .groups
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&pgid);
    // Whatever the command left running in its group goes too.
    kill();
    let stderr = stderr
        .and_then(|t| t.join().ok())
        .map(|bytes| first_line(&bytes, &out))
        .unwrap_or_default();
    if running.stopped() {
        return Err(RunError::Stopped { program });
    }
    if timed_out.load(std::sync::atomic::Ordering::SeqCst) {
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

/// The first non-empty line of `stderr`, trimmed, at most 200 characters, printable only;
/// empty when it contains any line of `stdout` (a command that echoes its secret there).
fn first_line(stderr: &[u8], stdout: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("");
    let out = String::from_utf8_lossy(stdout);
    if out
        .lines()
        .map(str::trim)
        .any(|l| l.len() >= 4 && text.contains(l))
    {
        return "(stderr withheld: it repeats the output)".to_owned();
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
    fn a_background_child_holding_stdout_is_killed_with_the_group() {
        let r = Running::default();
        let started = std::time::Instant::now();
        let out = run(&sh("printf v; sleep 30 &"), Duration::from_secs(2), &r);
        // The background sleep keeps stdout open until the watchdog kills the group.
        assert!(started.elapsed() < Duration::from_secs(4));
        assert!(out.is_err() || &out.unwrap()[..] == b"v");
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
