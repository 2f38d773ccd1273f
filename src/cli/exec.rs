//! `credproxy exec [serve options] -- CMD [ARGS...]`: the proxy around one command.
//!
//! 1. Start the proxy; if it cannot start, CMD is never run (exit 1 with the reason).
//! 2. Run CMD with `LLXPRT_CREDENTIAL_SOCKET` in its environment (not found: 127, not
//!    executable: 126, like a shell, after cleaning up).
//!    CMD gets no descriptor of ours but stdin, stdout and stderr: ours are all opened
//!    close-on-exec, and the ones `exec` inherited above stderr are marked close-on-exec
//!    at start (ssh-agent closes them, `closefrom(3)`, for the same reason: a descriptor
//!    leaked in from a parent must not reach the sandbox).
//!    With `--clear-env`, CMD's environment is only the socket variable and the
//!    `--keep-env` names; otherwise it is `exec`'s own, and `exec` warns once, naming them,
//!    when variables that look like credentials would pass (see [`ExecArgs`]).
//!    With `--capability-token` (or `capability_token = true` in the profile), CMD also
//!    gets this launch's capability token on descriptor 3 (`--capability-fd N`), a pipe
//!    holding the 64 hex characters and a newline whose write end is already closed, and
//!    `LLXPRT_CAPABILITY_FD=3` in its environment (with `--clear-env` too); the token is
//!    in no environment, command line or file, and `exec` closes its copy of the pipe
//!    right after the spawn ([`crate::handover`]). Without it, an inherited
//!    `LLXPRT_CAPABILITY_FD` is taken out of CMD's environment: it would name a
//!    descriptor CMD does not have.
//! 3. Keep serving until CMD exits, relaying signals by the rules below.
//! 4. When CMD exits: `Shutdown`, wait for the cleanup, exit with CMD's status (128+N when
//!    CMD was killed by signal N).
//!
//! # Signals
//!
//! `exec` must never die before CMD (that would leave CMD running without its proxy, and
//! the socket behind), so every catchable signal whose default action would end `exec` is
//! either forwarded or dropped:
//!
//! - **Forwarded** to CMD: SIGHUP, SIGINT, SIGQUIT, SIGTERM (stop requests), SIGUSR1,
//!   SIGUSR2 (application messages: a log reopen, a status dump), SIGALRM (a supervisor's
//!   timer; `exec` sets none of its own) and SIGWINCH (a terminal resize). A signal the
//!   terminal generated (Ctrl-C, Ctrl-\, a resize: the kernel is its sender) already
//!   reached CMD when CMD is in the terminal's foreground process group, and is neither
//!   sent again nor counted; a CMD in its own session or group (`setsid`,
//!   `bwrap --new-session`) did not get it and is sent it.
//! - **Escalation**: a stop signal (SIGINT or SIGTERM) that `exec` forwarded itself, coming
//!   within [`ESCALATION_WINDOW`] (3 s) of the previous one `exec` forwarded, is turned into
//!   SIGKILL for CMD ("I mean it"), and for CMD's whole process group when CMD leads one
//!   (`setsid`), so nothing it started outlives the proxy. Terminal signals CMD already
//!   got never count, so an interactive CMD that uses Ctrl-C to cancel an operation
//!   survives any number of them;
//!   two stop signals further apart are both forwarded.
//! - **Dropped** (caught, logged at debug): SIGVTALRM, SIGPROF (profiling timers of
//!   `exec` itself), SIGXCPU, SIGXFSZ (resource limits of `exec` itself; a write past
//!   the file size limit then fails with an error instead), SIGIO, SIGPWR and SIGSTKFLT
//!   (nothing in `exec` asks for them, and they say nothing to CMD).
//! - **Left at their default**: SIGTSTP, SIGTTIN, SIGTTOU and SIGCONT (job control: Ctrl-Z
//!   stops the whole foreground group, `exec` and CMD together, and `fg` continues both;
//!   a stopped `exec` serves nobody, but the stopped CMD asks nothing), SIGCHLD and SIGURG
//!   (ignored by default; CMD's exit is watched with `waitid`), SIGPIPE (ignored by the
//!   Rust runtime in `exec`, whose writes then fail with an error; CMD starts with the
//!   default again), and the program-error signals SIGILL, SIGTRAP, SIGABRT, SIGBUS, SIGFPE,
//!   SIGSEGV and SIGSYS, which mean `exec` itself is broken. SIGKILL and SIGSTOP cannot be
//!   caught; real-time signals are not handled.
//!
//! Caught signals are handled by signal-hook's self-pipe, so their handlers are reset to
//! the default in CMD by `execve`: CMD starts with default dispositions.

use std::ffi::OsString;
use std::io::ErrorKind;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, ExitStatus};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use clap::Args;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitid, Id, WaitPidFlag};
use nix::unistd::{getpgid, tcgetpgrp, Pid};
use signal_hook::iterator::exfiltrator::WithOrigin;
use signal_hook::iterator::SignalsInfo;
use signal_hook::low_level::siginfo::Cause;

use super::serve::{build_config, ServeArgs};
use super::Failure;
use crate::capability::{DEFAULT_FD, FD_ENV};
use crate::client::SOCKET_ENV;
use crate::handover::{Handover, MIN_FD};
use crate::Supervisor;

/// `credproxy exec` options.
#[derive(Args, Debug, Clone)]
pub struct ExecArgs {
    /// Every option of `serve`.
    #[command(flatten)]
    pub serve: ServeArgs,
    /// Start CMD from an empty environment (like `env -i`): it gets LLXPRT_CREDENTIAL_SOCKET
    /// and the --keep-env variables only, not even PATH, HOME or TERM; CMD itself is still
    /// found through exec's PATH
    #[arg(long)]
    pub clear_env: bool,
    /// With --clear-env: also pass NAME from exec's environment (repeatable; an unset NAME
    /// is skipped)
    #[arg(long, value_name = "NAME", requires = "clear_env")]
    pub keep_env: Vec<String>,
    /// With --capability-token: the descriptor CMD reads the token from, 3 or more
    /// [default: 3]
    #[arg(long, value_name = "N", value_parser = parse_capability_fd)]
    pub capability_fd: Option<i32>,
    /// The command to run, after `--`
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<OsString>,
}

/// How soon after a stop signal `exec` forwarded another one turns into SIGKILL for CMD.
/// Long enough for a person pressing Ctrl-C again because nothing happened, or a
/// supervisor's TERM-then-TERM; short enough that a later, separate stop request is
/// forwarded as a request again.
pub const ESCALATION_WINDOW: Duration = Duration::from_secs(3);

/// The signals forwarded to CMD (see the module doc).
const FORWARDED: [Signal; 8] = [
    Signal::SIGHUP,
    Signal::SIGINT,
    Signal::SIGQUIT,
    Signal::SIGTERM,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGALRM,
    Signal::SIGWINCH,
];

/// The signals caught and dropped: they concern `exec` alone (see the module doc).
const DROPPED: &[Signal] = &[
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
];

enum Event {
    Signal { signal: i32, from_terminal: bool },
    Exited(std::io::Result<()>),
}

/// Name endings (compared in upper case) of variables that look like credentials; a whole
/// name equal to one without its `_` counts too (`TOKEN`, `API_KEY`).
const CREDENTIAL_SUFFIXES: [&str; 8] = [
    "_API_KEY",
    "_APIKEY",
    "_TOKEN",
    "_SECRET",
    "_SECRET_KEY",
    "_ACCESS_KEY",
    "_PASSWORD",
    "_CREDENTIALS",
];

/// Whole names (upper case) that carry a credential without such an ending: a live SSH
/// agent, which would sign for the sandbox.
const CREDENTIAL_NAMES: [&str; 1] = ["SSH_AUTH_SOCK"];

/// True when the variable `name` looks like it holds a credential.
fn looks_like_credential(name: &str) -> bool {
    let name = name.to_ascii_uppercase();
    CREDENTIAL_NAMES.contains(&name.as_str())
        || CREDENTIAL_SUFFIXES
            .iter()
            .any(|suffix| name.ends_with(suffix) || name == suffix[1..])
}

/// Marks every descriptor above stderr that `exec` inherited close-on-exec, so CMD does not
/// get it (ours are opened close-on-exec already). Marked rather than closed: `exec` runs
/// Rust code that may own a descriptor, and closing one it owns would be a double close.
fn keep_inherited_descriptors_from_cmd() {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        tracing::warn!(
            "cannot list /proc/self/fd: descriptors exec inherited may reach the command"
        );
        return;
    };
    let inherited: Vec<i32> = dir
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd > 2)
        .collect();
    // The directory's own descriptor is among them and closed by now: EBADF, ignored.
    for fd in inherited {
        let _ = fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC));
    }
}

/// `--capability-fd N`: a descriptor number of at least 3.
fn parse_capability_fd(text: &str) -> Result<i32, String> {
    let fd: i32 = text
        .parse()
        .map_err(|_| "not a descriptor number".to_owned())?;
    if fd < MIN_FD {
        return Err(
            "descriptors 0, 1 and 2 are CMD's stdin, stdout and stderr; use 3 or more".to_owned(),
        );
    }
    Ok(fd)
}

/// The descriptor CMD gets the token on: `--capability-fd` (which needs a token) or 3,
/// below the hard descriptor limit CMD will have.
fn capability_fd(args: &ExecArgs, token_on: bool) -> Result<i32, Failure> {
    let Some(fd) = args.capability_fd else {
        return Ok(DEFAULT_FD);
    };
    if !token_on {
        return Err(Failure::usage(
            "--capability-fd needs --capability-token (or capability_token = true in the profile)",
        ));
    }
    let resource = nix::sys::resource::Resource::RLIMIT_NOFILE;
    if let Ok((_, hard)) = nix::sys::resource::getrlimit(resource) {
        if fd as u64 >= hard {
            return Err(Failure::usage(format!(
                "--capability-fd {fd}: over the descriptor limit (RLIMIT_NOFILE {hard})"
            )));
        }
    }
    Ok(fd)
}

/// Checks the `--keep-env` names: non-empty, no `=` or NUL.
fn check_keep_env(names: &[String]) -> Result<(), Failure> {
    for name in names {
        if name.is_empty() || name.contains(['=', '\0']) {
            return Err(Failure::usage(format!(
                "--keep-env {name:?}: not a variable name"
            )));
        }
    }
    Ok(())
}

/// `program` as `execvp` would find it in exec's own `PATH` (used under `--clear-env`,
/// where CMD's environment has no `PATH`); unchanged when it has a `/` or is not found.
fn resolve(program: &OsString) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let as_is = PathBuf::from(program);
    if program.as_bytes().contains(&b'/') {
        return as_is;
    }
    let Some(path) = std::env::var_os("PATH") else {
        return as_is;
    };
    std::env::split_paths(&path)
        .filter(|dir| !dir.as_os_str().is_empty())
        .map(|dir| dir.join(program))
        .find(|candidate| {
            std::fs::metadata(candidate)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .unwrap_or(as_is)
}

/// CMD's command: `exec`'s environment, or only the socket variable and the kept names
/// under `--clear-env`, and the capability token's descriptor when there is one. Warns
/// once, naming them, about credential-like variables that pass through the inherited
/// environment.
fn command(
    args: &ExecArgs,
    program: &OsString,
    rest: &[OsString],
    socket: &std::path::Path,
    handover: Option<&Handover>,
) -> Command {
    let mut cmd;
    if args.clear_env {
        cmd = Command::new(resolve(program));
        cmd.env_clear();
        for name in &args.keep_env {
            if let Some(value) = std::env::var_os(name) {
                cmd.env(name, value);
            }
        }
    } else {
        cmd = Command::new(program);
        let mut names: Vec<String> = std::env::vars_os()
            .map(|(name, _)| name.to_string_lossy().into_owned())
            .filter(|name| name != SOCKET_ENV && looks_like_credential(name))
            .collect();
        if !names.is_empty() {
            names.sort();
            tracing::warn!(
                variables = %names.join(" "),
                "host variables that look like credentials pass to the command; \
                 --clear-env keeps them out (add --keep-env NAME for what it needs), \
                 or unset them"
            );
        }
    }
    cmd.arg0(program).args(rest).env(SOCKET_ENV, socket);
    match handover {
        Some(handover) => handover.apply(&mut cmd),
        None => {
            cmd.env_remove(FD_ENV);
        }
    }
    // CMD is the user's program: the core-file limit exec dropped for itself
    // (crate::harden) is given back, as if CMD had been started without credproxy.
    crate::harden::restore_core_limit(&mut cmd);
    cmd
}

/// Runs `exec`; returns CMD's exit status.
pub fn exec(args: ExecArgs) -> Result<u8, Failure> {
    keep_inherited_descriptors_from_cmd();
    check_keep_env(&args.keep_env)?;
    let (program, rest) = args
        .command
        .split_first()
        .ok_or_else(|| Failure::usage("no command given"))?;
    let (config, capability) = build_config(&args.serve)?;
    let fd = capability_fd(&args, capability.is_some())?;
    // The token goes into the pipe now and is dropped (wiped): only the pipe holds it.
    let handover = capability
        .map(|token| Handover::new(&token, fd))
        .transpose()
        .map_err(|e| Failure::new(format!("cannot prepare the capability token's pipe: {e}")))?;
    // Catch the signals before anything starts, so none can kill us between the proxy's
    // start and the child's.
    // A signal exec was started with ignored (`nohup`, a background job) stays ignored,
    // for exec and so for CMD.
    let caught: Vec<i32> = FORWARDED
        .iter()
        .chain(DROPPED)
        .map(|&s| s as i32)
        .filter(|&s| !super::ignored_at_start(s))
        .collect();
    let mut signals = SignalsInfo::<WithOrigin>::new(caught)
        .map_err(|e| Failure::new(format!("cannot handle signals: {e}")))?;
    let signals_handle = signals.handle();
    let handle = Supervisor::start(config).map_err(|e| Failure::new(e.to_string()))?;

    let child = command(
        &args,
        program,
        rest,
        handle.socket_path(),
        handover.as_ref(),
    )
    .spawn();
    // CMD has its copy (or never will): close ours.
    drop(handover);
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

    let mut relay = Relay {
        pid,
        last_stop: None,
    };
    let status = loop {
        match rx.recv() {
            Ok(Event::Signal {
                signal,
                from_terminal,
            }) => relay.signal(signal, from_terminal),
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

/// The signal rules of the module doc, for one CMD.
struct Relay {
    /// CMD; not reaped while signals are relayed, so the pid cannot be recycled.
    pid: Pid,
    /// When `exec` last forwarded a stop signal (SIGINT, SIGTERM) itself.
    last_stop: Option<Instant>,
}

impl Relay {
    fn signal(&mut self, signal: i32, from_terminal: bool) {
        let Ok(sig) = Signal::try_from(signal) else {
            return;
        };
        if DROPPED.contains(&sig) {
            tracing::debug!(signal = %sig, "dropping a signal that concerns exec alone");
            return;
        }
        if from_terminal && in_terminal_foreground(self.pid) {
            // CMD got it from the terminal already; it is not ours to count either.
            tracing::debug!(signal = %sig, "terminal signal already delivered to the command");
            return;
        }
        let now = Instant::now();
        let stop = matches!(sig, Signal::SIGINT | Signal::SIGTERM);
        if stop
            && self
                .last_stop
                .is_some_and(|last| now.duration_since(last) <= ESCALATION_WINDOW)
        {
            tracing::warn!(signal = %sig, window = ?ESCALATION_WINDOW,
                "second stop signal within the window: killing the command");
            // A CMD that made itself a group leader (`setsid`, `bwrap --new-session`) has
            // children that no signal of ours reaches otherwise: the kill takes its whole
            // group, so nothing it started outlives the proxy.
            if getpgid(Some(self.pid)) == Ok(self.pid) {
                let _ = nix::sys::signal::killpg(self.pid, Signal::SIGKILL);
            }
            let _ = kill(self.pid, Signal::SIGKILL);
            return;
        }
        tracing::info!(signal = %sig, "forwarding signal to the command");
        let _ = kill(self.pid, sig);
        if stop {
            self.last_stop = Some(now);
        }
    }
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
