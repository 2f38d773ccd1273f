//! Process hardening for every process that holds secrets, as ssh-agent and gpg-agent do
//! at start.
//!
//! [`process`] makes this process unreadable to other processes of the same uid and keeps
//! it from writing core files:
//!
//! - Linux: `prctl(PR_SET_DUMPABLE, 0)`. The kernel then refuses `ptrace` and
//!   `process_vm_readv` from any process without `CAP_SYS_PTRACE` (whatever
//!   `kernel.yama.ptrace_scope` says), makes `/proc/PID/{mem,environ,maps,fd,...}` owned
//!   by root, and writes no core file (with `fs.suid_dumpable` 0; with 2, only a
//!   root-owned one).
//! - macOS: `ptrace(PT_DENY_ATTACH)`: no debugger may attach.
//! - Both: the soft `RLIMIT_CORE` set to 0. The hard limit is left as it was, so that
//!   `credproxy exec` can give the command it runs the user's own core limit back
//!   ([`restore_core_limit`]); what stops the dump on Linux is the dumpable flag.
//!
//! A step that fails is logged once as a warning and the proxy goes on. `credproxy serve`,
//! `exec` and the host `store` commands call [`process`] first thing;
//! [`crate::Supervisor::start`] calls it when [`crate::Config::harden_process`] is set
//! (the default), and it then acts on the whole host process.
//!
//! What this does not stop: root (or anything with `CAP_SYS_PTRACE`), our parent when it
//! is root or traced us before we started, and kernels where these protections are off.
//! The inside-the-sandbox commands (`credproxy token`/`key`) are not hardened: they hold
//! only what the sandbox is given anyway.

use std::process::Command;
use std::sync::OnceLock;

use nix::sys::resource::{getrlimit, setrlimit, Resource};

/// The core-file limit (soft, hard) this process had before [`process`] changed it.
static ORIGINAL_CORE_LIMIT: OnceLock<Option<(u64, u64)>> = OnceLock::new();

/// What [`process`] achieved; each false was logged as a warning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hardened {
    /// Other processes of our uid can neither trace nor read us (Linux: not dumpable;
    /// macOS: `PT_DENY_ATTACH`). Always false elsewhere.
    pub untraceable: bool,
    /// The soft `RLIMIT_CORE` is 0.
    pub no_core_files: bool,
}

/// Hardens this process (see the [module doc](self)). Runs once per process; later calls
/// return the first result and log nothing.
pub fn process() -> Hardened {
    static DONE: OnceLock<Hardened> = OnceLock::new();
    *DONE.get_or_init(|| {
        let original = getrlimit(Resource::RLIMIT_CORE).ok();
        let _ = ORIGINAL_CORE_LIMIT.set(original);
        let hardened = Hardened {
            untraceable: deny_tracing(),
            no_core_files: match original {
                Some((_, hard)) => match setrlimit(Resource::RLIMIT_CORE, 0, hard) {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot turn core files off (RLIMIT_CORE); a crash may write secrets to disk");
                        false
                    }
                },
                None => {
                    tracing::warn!("cannot read RLIMIT_CORE; a crash may write secrets to disk");
                    false
                }
            },
        };
        tracing::debug!(
            untraceable = hardened.untraceable,
            no_core_files = hardened.no_core_files,
            "process hardened"
        );
        hardened
    })
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn deny_tracing() -> bool {
    match nix::sys::prctl::set_dumpable(false) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(error = %e, "cannot make the process non-dumpable (PR_SET_DUMPABLE); processes of this uid may read its memory");
            false
        }
    }
}

#[cfg(target_os = "macos")]
#[allow(unsafe_code)]
fn deny_tracing() -> bool {
    // SAFETY: PT_DENY_ATTACH takes no address or data (null and 0) and only sets a flag on
    // this process; it touches none of our memory.
    let result =
        unsafe { nix::libc::ptrace(nix::libc::PT_DENY_ATTACH, 0, std::ptr::null_mut(), 0) };
    if result == 0 {
        true
    } else {
        tracing::warn!(error = %nix::Error::last(), "cannot deny debugger attach (PT_DENY_ATTACH); processes of this uid may read its memory");
        false
    }
}

#[cfg(not(any(target_os = "linux", target_os = "android", target_os = "macos")))]
fn deny_tracing() -> bool {
    tracing::warn!("no way to keep processes of this uid from tracing this one on this system");
    false
}

/// The core-file limit (soft, hard) this process had before [`process`], if it ran and
/// could read it.
pub fn original_core_limit() -> Option<(u64, u64)> {
    ORIGINAL_CORE_LIMIT.get().copied().flatten()
}

/// Gives a child that `cmd` will start the core-file limit this process had before
/// [`process`] (the user's program, e.g. the command of `credproxy exec`, should behave as
/// if started without credproxy; as ssh-agent's command does). Nothing changes when
/// [`process`] has not run. The child is dumpable anyway: `execve` of an ordinary binary
/// resets the flag.
#[allow(unsafe_code)]
pub fn restore_core_limit(cmd: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    let Some((soft, hard)) = original_core_limit() else {
        return cmd;
    };
    // SAFETY: the hook runs in the child between fork and exec, where only
    // async-signal-safe calls are allowed: it makes one setrlimit system call with values
    // captured by copy, allocates nothing and takes no lock. Its failure is ignored (the
    // child keeps limit 0), so it never makes the spawn fail.
    unsafe {
        cmd.pre_exec(move || {
            let _ = setrlimit(Resource::RLIMIT_CORE, soft, hard);
            Ok(())
        })
    }
}
