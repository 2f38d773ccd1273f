//! `credproxy exec [serve options] -- CMD [ARGS...]`: the proxy around one command.
//!
//! 1. Start the proxy; if it cannot start, CMD is never run (exit 1 with the reason).
//! 2. Run CMD with `LLXPRT_CREDENTIAL_SOCKET` in its environment (not found: 127, not
//!    executable: 126, like a shell, after cleaning up).
//! 3. Forward SIGINT, SIGTERM, SIGHUP and SIGQUIT to CMD and keep serving until it exits;
//!    a second SIGINT/SIGTERM escalates to SIGKILL. A signal the terminal generated
//!    (Ctrl-C) is not sent a second time when CMD is in the terminal's foreground process
//!    group (it got it already); a CMD in its own session or group is sent it.
//! 4. When CMD exits: `Shutdown`, wait for the cleanup, exit with CMD's status (128+N when
//!    CMD was killed by signal N).

use std::ffi::OsString;
use std::io::ErrorKind;
use std::process::{Command, ExitStatus};
use std::sync::mpsc;

use clap::Args;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitid, Id, WaitPidFlag};
use nix::unistd::{getpgid, tcgetpgrp, Pid};
use signal_hook::consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM};
use signal_hook::iterator::exfiltrator::WithOrigin;
use signal_hook::iterator::SignalsInfo;
use signal_hook::low_level::siginfo::Cause;

use super::serve::{build_config, ServeArgs};
use super::Failure;
use crate::client::SOCKET_ENV;
use crate::Supervisor;

/// `credproxy exec` options.
#[derive(Args, Debug, Clone)]
pub struct ExecArgs {
    /// Every option of `serve`.
    #[command(flatten)]
    pub serve: ServeArgs,
    /// The command to run, after `--`
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<OsString>,
}

enum Event {
    Signal { signal: i32, from_terminal: bool },
    Exited(std::io::Result<()>),
}

/// Runs `exec`; returns CMD's exit status.
pub fn exec(args: ExecArgs) -> Result<u8, Failure> {
    let config = build_config(&args.serve)?;
    // Catch the signals before anything starts, so none can kill us between the proxy's
    // start and the child's.
    let mut signals = SignalsInfo::<WithOrigin>::new([SIGINT, SIGTERM, SIGHUP, SIGQUIT])
        .map_err(|e| Failure::new(format!("cannot handle signals: {e}")))?;
    let signals_handle = signals.handle();
    let handle = Supervisor::start(config).map_err(|e| Failure::new(e.to_string()))?;

    let (program, rest) = args
        .command
        .split_first()
        .ok_or_else(|| Failure::usage("no command given"))?;
    let child = Command::new(program)
        .args(rest)
        .env(SOCKET_ENV, handle.socket_path())
        .spawn();
    let child = match child {
        Ok(child) => child,
        Err(e) => {
            signals_handle.close();
            let _ = handle.shutdown_blocking();
            let shown = program.to_string_lossy();
            return Err(match e.kind() {
                ErrorKind::NotFound => {
                    Failure::with_code(format!("{shown}: command not found"), 127)
                }
                ErrorKind::PermissionDenied => {
                    Failure::with_code(format!("{shown}: permission denied (not executable)"), 126)
                }
                _ => Failure::with_code(format!("{shown}: cannot run: {e}"), 126),
            });
        }
    };
    let pid = Pid::from_raw(child.id() as i32);
    let mut child = child;
    tracing::info!(pid = child.id(), "command started");

    let (tx, rx) = mpsc::channel();
    let waiter_tx = tx.clone();
    std::thread::spawn(move || {
        // Wait WITHOUT reaping: until the main loop has stopped signalling and reaps the
        // child itself, its pid cannot be recycled for an unrelated process.
        let result = loop {
            match waitid(Id::Pid(pid), WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT) {
                Err(nix::errno::Errno::EINTR) => continue,
                other => break other.map(drop).map_err(std::io::Error::from),
            }
        };
        let _ = waiter_tx.send(Event::Exited(result));
    });
    std::thread::spawn(move || {
        for origin in signals.forever() {
            let from_terminal = matches!(origin.cause, Cause::Kernel);
            if tx
                .send(Event::Signal {
                    signal: origin.signal,
                    from_terminal,
                })
                .is_err()
            {
                break;
            }
        }
    });

    let mut stops = 0;
    let status = loop {
        match rx.recv() {
            Ok(Event::Signal {
                signal,
                from_terminal,
            }) => {
                let Ok(sig) = Signal::try_from(signal) else {
                    continue;
                };
                if sig == Signal::SIGINT || sig == Signal::SIGTERM {
                    stops += 1;
                }
                if stops >= 2 && (sig == Signal::SIGINT || sig == Signal::SIGTERM) {
                    tracing::warn!(signal = %sig, "second stop signal: killing the command");
                    let _ = kill(pid, Signal::SIGKILL);
                } else if !(from_terminal && in_terminal_foreground(pid)) {
                    tracing::info!(signal = %sig, "forwarding signal to the command");
                    let _ = kill(pid, sig);
                }
            }
            Ok(Event::Exited(waited)) => break waited,
            Err(_) => break Err(std::io::Error::other("command waiter vanished")),
        }
    };
    // Now reap (the waiter only observed the exit).
    let status = status.and_then(|()| child.wait());
    signals_handle.close();
    let report = handle.shutdown_blocking();
    if let Err(e) = &report {
        tracing::error!(error = %e, "shutdown failed");
    }
    let status = status.map_err(|e| Failure::new(format!("cannot wait for the command: {e}")))?;
    Ok(exit_code(status))
}

/// True when `pid`'s process group is the foreground group of our terminal: a signal the
/// terminal generated (Ctrl-C, hangup) has then reached it already. A child in its own
/// session or group (`setsid`, `bwrap --new-session`) did not get it and must be sent it.
fn in_terminal_foreground(pid: Pid) -> bool {
    let Ok(group) = getpgid(Some(pid)) else {
        return false;
    };
    [
        tcgetpgrp(std::io::stdin()),
        tcgetpgrp(std::io::stderr()),
        tcgetpgrp(std::io::stdout()),
    ]
    .into_iter()
    .flatten()
    .any(|foreground| foreground == group)
}

/// CMD's exit status as ours: its code, or 128+N when signal N killed it.
fn exit_code(status: ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => code as u8,
        (None, Some(signal)) => 128u8.saturating_add(signal as u8),
        (None, None) => 1,
    }
}
