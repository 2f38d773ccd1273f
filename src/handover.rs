//! Handing a capability token to a sandbox on an inherited descriptor, and reading it
//! back inside (PROTOCOL.md §13, "Delivery to the sandbox"; the llxprt-code convention).
//!
//! - The launcher side, [`Handover`]: the token's 64 hex characters and a newline are
//!   written into a pipe whose write end is closed at once, so the token never touches a
//!   disk, a command line or an environment. The read end is moved to descriptor `N` in
//!   the child between fork and exec, and the child's environment gets
//!   `LLXPRT_CAPABILITY_FD=N` ([`FD_ENV`]). The launcher closes its copy right after the
//!   spawn (drop the [`Handover`]).
//! - The sandbox side, [`read_fd`] and [`from_env`]: the descriptor named by
//!   `LLXPRT_CAPABILITY_FD` is read once, with a bound on its size and on the wait for its
//!   end, exactly one trailing newline is stripped, the text is parsed as a
//!   [`CapabilityToken`], and the descriptor is closed. No error ever shows what the
//!   descriptor (or the variable) held.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use zeroize::Zeroizing;

use crate::capability::{CapabilityToken, FD_ENV, TOKEN_HEX_LEN};

/// Bytes a descriptor holds: the token and one newline.
pub const CONTENT_LEN: usize = TOKEN_HEX_LEN + 1;

/// How long [`read_fd`] waits for the descriptor's end (a launcher that keeps a pipe's
/// write end open would otherwise hang the sandbox's first request forever).
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// The lowest descriptor a token may be handed over on: 0, 1 and 2 are stdin, stdout and
/// stderr.
pub const MIN_FD: RawFd = 3;

/// Why no capability token could be read from the descriptor. Never carries what the
/// descriptor or the variable held.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FdError {
    /// `LLXPRT_CAPABILITY_FD` is not a descriptor number.
    #[error("{FD_ENV} is not a descriptor number")]
    NotANumber,
    /// The variable names stdin, stdout or stderr.
    #[error("{FD_ENV} names descriptor {0}: 0, 1 and 2 are stdin, stdout and stderr, never a capability token")]
    Reserved(RawFd),
    /// The descriptor is not open in this process.
    #[error("{FD_ENV} names descriptor {0}, which is not open in this process (the launcher must pass it)")]
    NotOpen(RawFd),
    /// Reading the descriptor failed.
    #[error("cannot read the capability token from descriptor {fd}: {error}")]
    Read {
        /// The descriptor.
        fd: RawFd,
        /// The operating system's error (never the content).
        error: String,
    },
    /// The descriptor did not reach its end within [`READ_TIMEOUT`].
    #[error("descriptor {0} did not deliver a capability token within {READ_TIMEOUT:?} (is its write end still open?)")]
    Timeout(RawFd),
    /// Nothing at all: the descriptor was read already (by another process sharing it,
    /// or this one), or the launcher wrote nothing.
    #[error("descriptor {0} is empty: its capability token was read already (it can be read once) or never written")]
    Empty(RawFd),
    /// More than a token and a newline.
    #[error("descriptor {0} holds more than a capability token ({TOKEN_HEX_LEN} hex characters and a newline)")]
    TooLong(RawFd),
    /// Not a token.
    #[error("descriptor {fd} does not hold a capability token: {why}")]
    Invalid {
        /// The descriptor.
        fd: RawFd,
        /// What is wrong with the text.
        why: crate::capability::CapabilityError,
    },
}

/// The descriptor number named by a `LLXPRT_CAPABILITY_FD` value: a decimal number of at
/// least [`MIN_FD`].
pub fn parse_fd_var(value: &OsStr) -> Result<RawFd, FdError> {
    let text = value.to_str().ok_or(FdError::NotANumber)?;
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(FdError::NotANumber);
    }
    let fd: RawFd = text.parse().map_err(|_| FdError::NotANumber)?;
    if fd < MIN_FD {
        return Err(FdError::Reserved(fd));
    }
    Ok(fd)
}

/// The token of this process's sandbox: read once from the descriptor named by
/// `LLXPRT_CAPABILITY_FD` (see [`read_fd`]) and kept for the life of the process, so
/// every client, and every reconnect, presents the same token. `Ok(None)` when the
/// variable is unset or empty. The descriptor is read and closed at the first call only:
/// reading it again would find it closed, or a later file reusing its number.
pub fn from_env() -> Result<Option<Arc<CapabilityToken>>, FdError> {
    static TOKEN: OnceLock<Result<Option<Arc<CapabilityToken>>, FdError>> = OnceLock::new();
    TOKEN
        .get_or_init(|| match std::env::var_os(FD_ENV) {
            Some(value) if !value.is_empty() => {
                let fd = parse_fd_var(&value)?;
                read_fd(fd).map(|token| Some(Arc::new(token)))
            }
            _ => Ok(None),
        })
        .clone()
}

/// Reads a capability token from `fd` and closes it: everything up to its end (at most
/// [`CONTENT_LEN`] bytes, within [`READ_TIMEOUT`]), with exactly one trailing newline
/// stripped. The descriptor becomes this function's: it is closed whatever the outcome,
/// unless it was not open or is one of 0, 1 and 2.
pub fn read_fd(fd: RawFd) -> Result<CapabilityToken, FdError> {
    read_fd_within(fd, READ_TIMEOUT)
}

/// [`read_fd`] with another bound on the wait for the descriptor's end.
fn read_fd_within(fd: RawFd, timeout: Duration) -> Result<CapabilityToken, FdError> {
    if fd < MIN_FD {
        return Err(FdError::Reserved(fd));
    }
    if fcntl(fd, FcntlArg::F_GETFD).is_err() {
        return Err(FdError::NotOpen(fd));
    }
    // SAFETY: `fd` is open (checked just above) and, by the launcher convention this
    // function implements, handed to this process to be read once and closed: nothing
    // else in the process owns it, so taking ownership closes it exactly once.
    #[allow(unsafe_code)]
    let mut file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    // One byte more than a token and a newline, to tell "too long" from "exactly right".
    let mut buf = Zeroizing::new([0u8; CONTENT_LEN + 1]);
    let len = read_bounded(&mut file, &mut buf[..], fd, timeout)?;
    drop(file);
    if len == 0 {
        return Err(FdError::Empty(fd));
    }
    let mut content = &buf[..len];
    if let Some(stripped) = content.strip_suffix(b"\n") {
        content = stripped;
    }
    let invalid = |why| FdError::Invalid { fd, why };
    let text = std::str::from_utf8(content)
        .map_err(|_| invalid(crate::capability::CapabilityError::Character))?;
    CapabilityToken::parse(text).map_err(invalid)
}

/// Reads `file` to its end into `buf`; [`FdError::TooLong`] when it does not fit.
fn read_bounded(
    file: &mut File,
    buf: &mut [u8],
    fd: RawFd,
    timeout: Duration,
) -> Result<usize, FdError> {
    let deadline = Instant::now() + timeout;
    let failed = |e: &dyn std::fmt::Display| FdError::Read {
        fd,
        error: e.to_string(),
    };
    let mut len = 0;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(FdError::Timeout(fd));
        }
        // Rounded up: poll counts whole milliseconds.
        let wait =
            PollTimeout::try_from(left + Duration::from_micros(999)).unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(file.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, wait) {
            Ok(0) => continue,
            Ok(_) => {}
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(failed(&e)),
        }
        if len == buf.len() {
            return Err(FdError::TooLong(fd));
        }
        match file.read(&mut buf[len..]) {
            Ok(0) => return Ok(len),
            Ok(n) => len += n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
                ) => {}
            Err(e) => return Err(failed(&e)),
        }
    }
}

/// A token on its way to a child: the read end of a pipe holding the token and a newline
/// (the write end is already closed), to become descriptor `target` in the child. Drop it
/// right after the spawn: that closes the launcher's copy.
#[derive(Debug)]
pub struct Handover {
    /// The pipe's read end, close-on-exec in this process.
    read: OwnedFd,
    /// A close-on-exec copy of the read end at exactly `target`, when that number was free
    /// here. Holding the number keeps anything the spawn itself opens (the standard
    /// library's exec-error pipe) off it, so the child's `dup2` cannot clobber it.
    at_target: Option<OwnedFd>,
    /// The descriptor number the child gets.
    target: RawFd,
}

impl Handover {
    /// Writes `token` and a newline into a fresh pipe and closes its write end. The token
    /// is not needed after this returns. `target` must be at least [`MIN_FD`].
    pub fn new(token: &CapabilityToken, target: RawFd) -> io::Result<Handover> {
        if target < MIN_FD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "descriptors 0, 1 and 2 are the child's stdin, stdout and stderr",
            ));
        }
        let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
        let mut content = Zeroizing::new([0u8; CONTENT_LEN]);
        content[..TOKEN_HEX_LEN].copy_from_slice(token.expose().as_bytes());
        content[TOKEN_HEX_LEN] = b'\n';
        // 65 bytes fit in any pipe buffer (and are below PIPE_BUF, so written at once).
        let mut written = 0;
        while written < content.len() {
            match nix::unistd::write(&write, &content[written..]) {
                Ok(n) => written += n,
                Err(Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        drop(write);
        let at_target = if read.as_raw_fd() == target {
            None
        } else {
            match fcntl(read.as_raw_fd(), FcntlArg::F_DUPFD_CLOEXEC(target)) {
                Ok(fd) => {
                    // SAFETY: `fd` was just returned by F_DUPFD_CLOEXEC: a new descriptor
                    // that nothing else in the process knows of.
                    #[allow(unsafe_code)]
                    let copy = unsafe { OwnedFd::from_raw_fd(fd) };
                    (fd == target).then_some(copy)
                }
                Err(_) => None,
            }
        };
        Ok(Handover {
            read,
            at_target,
            target,
        })
    }

    /// The descriptor number the child gets.
    pub fn target(&self) -> RawFd {
        self.target
    }

    /// Makes `cmd`'s child get the token on descriptor [`Handover::target`] and sets
    /// `LLXPRT_CAPABILITY_FD` in its environment (call it after any `env_clear`). The
    /// child's other descriptors are untouched. `self` must live until the spawn.
    #[allow(unsafe_code)]
    pub fn apply(&self, cmd: &mut Command) {
        use std::os::unix::process::CommandExt;
        let target = self.target;
        let source = match &self.at_target {
            Some(copy) => copy.as_raw_fd(),
            None => self.read.as_raw_fd(),
        };
        cmd.env(FD_ENV, target.to_string());
        // SAFETY: runs in the child between fork and exec (async-signal-safe calls only):
        // one dup2, or one fcntl clearing close-on-exec when the pipe has the number
        // already, on numbers captured by copy; no allocation, no lock, a raw OS error.
        unsafe {
            cmd.pre_exec(move || {
                let done = if source == target {
                    fcntl(target, FcntlArg::F_SETFD(FdFlag::empty())).map(drop)
                } else {
                    nix::unistd::dup2(source, target).map(drop)
                };
                done.map_err(|e| io::Error::from_raw_os_error(e as i32))
            })
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::IntoRawFd;

    /// A pipe holding `bytes`: its read end as a raw descriptor, and its write end, still
    /// open unless `close` (tests run in parallel and reuse descriptor numbers, so a closed
    /// read end is seen as EPIPE on the write end, not as EBADF on the number).
    fn pipe_with(bytes: &[u8]) -> (RawFd, OwnedFd) {
        let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC).unwrap();
        nix::unistd::write(&write, bytes).unwrap();
        (read.into_raw_fd(), write)
    }

    #[track_caller]
    fn assert_read_end_closed(write: &OwnedFd) {
        assert_eq!(nix::unistd::write(write, b"x"), Err(Errno::EPIPE));
    }

    #[test]
    fn the_variable_is_a_descriptor_number_of_three_or_more() {
        assert_eq!(parse_fd_var(OsStr::new("3")), Ok(3));
        assert_eq!(parse_fd_var(OsStr::new("17")), Ok(17));
        assert_eq!(parse_fd_var(OsStr::new("2")), Err(FdError::Reserved(2)));
        for bad in ["", " 3", "3\n", "-3", "+3", "x", "99999999999999"] {
            assert_eq!(
                parse_fd_var(OsStr::new(bad)),
                Err(FdError::NotANumber),
                "{bad:?}"
            );
        }
        let token = CapabilityToken::generate();
        let shown = parse_fd_var(OsStr::new(token.expose()))
            .unwrap_err()
            .to_string();
        assert!(!shown.contains(&token.expose()[..8]), "{shown}");
    }

    #[test]
    fn a_handed_over_token_reads_back() {
        let token = CapabilityToken::generate();
        let handover = Handover::new(&token, 200).unwrap();
        let fd = nix::unistd::dup(handover.read.as_raw_fd()).unwrap();
        assert_eq!(handover.target(), 200);
        drop(handover);
        assert_eq!(read_fd(fd).unwrap().expose(), token.expose());
        assert!(Handover::new(&token, 2).is_err());
    }

    #[test]
    fn good_content_reads_with_or_without_its_newline_once_the_writer_is_gone() {
        let token = CapabilityToken::generate();
        for content in [format!("{}\n", token.expose()), token.expose().to_owned()] {
            let (fd, write) = pipe_with(content.as_bytes());
            drop(write);
            assert_eq!(read_fd(fd).unwrap().expose(), token.expose());
        }
        let (fd, write) = pipe_with(format!("{}\n", token.expose()).as_bytes());
        // The writer still open: the read waits for the end, then times out.
        let err = read_fd_within(fd, Duration::from_millis(100)).unwrap_err();
        assert_eq!(err, FdError::Timeout(fd));
        assert_read_end_closed(&write);
    }

    #[test]
    fn bad_content_is_refused_without_echoing_it() {
        let token = CapabilityToken::generate();
        let good = token.expose().as_bytes();
        let cases: [(Vec<u8>, &str); 8] = [
            ([good, b"\n\n"].concat(), "more than"),
            ([good, b"\nx"].concat(), "more than"),
            ([good, b"0\n"].concat(), "more than"),
            ([&good[..63], b"\n\n"].concat(), "does not hold"),
            (good.to_ascii_uppercase(), "does not hold"),
            (b"\n".to_vec(), "does not hold"),
            (Vec::new(), "is empty"),
            (vec![0xff; 64], "does not hold"),
        ];
        for (bytes, needle) in cases {
            let (fd, write) = pipe_with(&bytes);
            drop(write);
            let err = read_fd(fd).unwrap_err().to_string();
            assert!(err.contains(needle), "{err}");
            assert!(!err.contains(&token.expose()[..8]), "{err}");
        }
        assert_eq!(read_fd(1).unwrap_err(), FdError::Reserved(1));
    }

    #[test]
    fn a_pipe_whose_writer_stays_open_times_out_and_is_closed() {
        let (fd, write) = pipe_with(b"abc");
        let t0 = Instant::now();
        let wait = Duration::from_millis(200);
        assert_eq!(read_fd_within(fd, wait).unwrap_err(), FdError::Timeout(fd));
        assert!(t0.elapsed() >= wait);
        assert_read_end_closed(&write);
    }
}
