//! A probe that tries, as an ordinary process, every way a process of the same uid has to
//! read another process's secrets: `/proc/PID/{mem,environ,cmdline,maps}`, the memory of
//! each thread (`/proc/PID/task/TID/mem`), the open descriptors (`/proc/PID/fd/N`, which
//! would reopen the store's files), `ptrace(PTRACE_ATTACH)` and `process_vm_readv`.
//!
//! The probe is the test binary itself, run again (as a non-root uid, from a copy any uid
//! can execute) with [`TARGET_VAR`] set: a test file calls [`run_if_probe`] from one test
//! function, which then probes, prints one `PROBE` line per means and one `CANARY` line
//! per canary found, and exits. Without the variable that function is an ordinary test
//! (the files use it for the probe's positive control), so no separate binary is needed
//! and the probe is plain Rust: no shell, python or gdb in between.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use nix::sys::uio::{process_vm_readv, RemoteIoVec};
use nix::unistd::Pid;

/// The pid to probe (or `parent`: the probe's parent process).
pub const TARGET_VAR: &str = "CREDPROXY_PROBE_TARGET";

/// A file with the canaries to look for, one per line (a file, so that no canary is in
/// the environment or the command line of the process under test).
pub const CANARIES_VAR: &str = "CREDPROXY_PROBE_CANARIES";

/// The most memory the probe reads from one mapping (the server's heap and its locked
/// pages are far smaller; huge reservations are skipped).
const MAX_RANGE: u64 = 64 << 20;

/// The test binary, copied once into a 0755 directory so that any uid can run it.
pub fn helper_binary() -> &'static Path {
    static COPY: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, path) = COPY.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("credproxy-probe-")
            .tempdir()
            .expect("tempdir for the probe");
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
        let path = dir.path().join("probe");
        fs::copy(std::env::current_exe().expect("test binary"), &path).expect("copy");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("chmod");
        (dir, path)
    });
    path
}

/// The arguments that make the copied test binary run only the test function `name`
/// (which calls [`run_if_probe`]) with its output uncaptured.
pub fn helper_args(name: &str) -> Vec<String> {
    ["--exact", name, "--nocapture", "--test-threads=1"]
        .iter()
        .map(|s| (*s).to_owned())
        .collect()
}

/// When this process was started as a probe, probes, prints the report and exits 0;
/// otherwise returns.
pub fn run_if_probe() {
    let Ok(target) = std::env::var(TARGET_VAR) else {
        return;
    };
    let pid = if target == "parent" {
        std::os::unix::process::parent_id()
    } else {
        target.parse().expect("pid")
    };
    let canaries: Vec<String> = match std::env::var(CANARIES_VAR) {
        Ok(path) => fs::read_to_string(path)
            .expect("canary file")
            .lines()
            .map(str::to_owned)
            .collect(),
        Err(_) => Vec::new(),
    };
    let report = probe(pid, &canaries);
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(report.as_bytes());
    let _ = out.flush();
    std::process::exit(0);
}

/// Runs every means against `pid`; the report's lines are `PROBE means ok|denied ERRNO`
/// and `CANARY canary means`.
fn probe(pid: u32, canaries: &[String]) -> String {
    let mut lines = Vec::new();
    let found = |means: &str, bytes: &[u8], lines: &mut Vec<String>| {
        for c in canaries {
            if contains(bytes, c.as_bytes()) {
                lines.push(format!("CANARY {c} {means}"));
            }
        }
    };
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));

    let maps = read(&proc_dir.join("maps"));
    for name in ["environ", "cmdline", "maps"] {
        let result = read(&proc_dir.join(name));
        if let Ok(bytes) = &result {
            found(name, bytes, &mut lines);
        }
        lines.push(format!("PROBE {name} {}", outcome(&result.map(|_| ()))));
    }
    let ranges = maps.as_deref().map(readable_ranges).unwrap_or_default();

    // The memory, through /proc of the process and of each of its threads.
    let mut mems = vec![("mem".to_owned(), proc_dir.join("mem"))];
    if let Ok(tasks) = fs::read_dir(proc_dir.join("task")) {
        for task in tasks.flatten() {
            let tid = task.file_name().to_string_lossy().into_owned();
            mems.push((format!("task-mem-{tid}"), task.path().join("mem")));
        }
    }
    for (means, path) in mems {
        let result = fs::File::open(&path);
        if let Ok(file) = &result {
            for &(start, len) in &ranges {
                let mut buf = vec![0; len as usize];
                if let Ok(n) = file.read_at(&mut buf, start) {
                    found(&means, &buf[..n], &mut lines);
                }
            }
        }
        let means = if means.starts_with("task-mem") {
            "task-mem"
        } else {
            "mem"
        };
        lines.push(format!("PROBE {means} {}", outcome(&result.map(|_| ()))));
    }

    // The descriptors: the directory, then each number directly (a store file reopened).
    let listed = fs::read_dir(proc_dir.join("fd")).map(|_| ());
    lines.push(format!("PROBE fd-list {}", outcome(&listed)));
    let mut opened = Err(std::io::Error::from_raw_os_error(nix::libc::ENOENT));
    for n in 0..64 {
        match fs::File::open(proc_dir.join("fd").join(n.to_string())) {
            Ok(mut file) => {
                let mut bytes = Vec::new();
                let _ = (&mut file).take(1 << 20).read_to_end(&mut bytes);
                found("fd", &bytes, &mut lines);
                opened = Ok(());
            }
            Err(e) if opened.is_err() && e.raw_os_error() != Some(nix::libc::ENOENT) => {
                opened = Err(e);
            }
            Err(_) => {}
        }
    }
    lines.push(format!("PROBE fd-open {}", outcome(&opened)));

    // process_vm_readv: over the mappings if we could read them, else one page at a low
    // address (EPERM when refused; EFAULT would mean allowed but unmapped).
    let target = Pid::from_raw(pid as i32);
    let probe_ranges = if ranges.is_empty() {
        vec![(0x1000, 4096)]
    } else {
        ranges.clone()
    };
    let mut vm = Err(std::io::Error::from_raw_os_error(nix::libc::EFAULT));
    for (start, len) in probe_ranges {
        let mut buf = vec![0u8; len as usize];
        let remote = [RemoteIoVec {
            base: start as usize,
            len: len as usize,
        }];
        match process_vm_readv(target, &mut [std::io::IoSliceMut::new(&mut buf)], &remote) {
            Ok(n) => {
                found("process_vm_readv", &buf[..n], &mut lines);
                vm = Ok(());
            }
            Err(e) if vm.is_err() => vm = Err(std::io::Error::from_raw_os_error(e as i32)),
            Err(_) => {}
        }
    }
    lines.push(format!("PROBE process_vm_readv {}", outcome(&vm)));

    // ptrace: attach, and let go at once if that worked.
    let attached = nix::sys::ptrace::attach(target);
    if attached.is_ok() {
        let _ = nix::sys::wait::waitpid(target, None);
        let _ = nix::sys::ptrace::detach(target, None);
    }
    let attached = attached.map_err(|e| std::io::Error::from_raw_os_error(e as i32));
    lines.push(format!("PROBE ptrace {}", outcome(&attached)));

    // On a line of its own: libtest has printed "test NAME ... " without a newline.
    let mut text = String::from("\n");
    text.push_str(&lines.join("\n"));
    text.push('\n');
    text
}

fn read(path: &Path) -> std::io::Result<Vec<u8>> {
    fs::read(path)
}

fn outcome(result: &std::io::Result<()>) -> String {
    match result {
        Ok(()) => "ok".to_owned(),
        Err(e) => format!("denied {}", errno_name(e.raw_os_error().unwrap_or(0))),
    }
}

fn errno_name(errno: i32) -> String {
    match errno {
        nix::libc::EACCES => "EACCES".to_owned(),
        nix::libc::EPERM => "EPERM".to_owned(),
        other => format!("errno{other}"),
    }
}

/// The readable mappings (start, length) listed in a `maps` file, each at most
/// [`MAX_RANGE`] bytes; `[vvar]` and the like (unreadable through mem) left out.
fn readable_ranges(maps: &[u8]) -> Vec<(u64, u64)> {
    String::from_utf8_lossy(maps)
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (range, perms) = (fields.next()?, fields.next()?);
            let name = fields.nth(3).unwrap_or("");
            if !perms.starts_with('r') || name.starts_with("[v") {
                return None;
            }
            let (start, end) = range.split_once('-')?;
            let start = u64::from_str_radix(start, 16).ok()?;
            let end = u64::from_str_radix(end, 16).ok()?;
            Some((start, (end - start).min(MAX_RANGE)))
        })
        .collect()
}

/// True when `needle` occurs in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// A probe's report: each means and its outcome, and the canaries found (with where).
#[derive(Debug)]
pub struct Report {
    /// means → `ok` or `denied ERRNO` (the first thread's for `task-mem`).
    pub means: BTreeMap<String, String>,
    /// `canary means` for every canary found.
    pub canaries: Vec<String>,
}

impl Report {
    /// Parses the probe's stdout (libtest's own lines are ignored); fails when the probe
    /// printed no report at all.
    #[track_caller]
    pub fn parse(stdout: &str) -> Report {
        let mut means = BTreeMap::new();
        let mut canaries = Vec::new();
        for line in stdout.lines() {
            if let Some(rest) = line.strip_prefix("PROBE ") {
                let (name, result) = rest.split_once(' ').expect("PROBE means result");
                means
                    .entry(name.to_owned())
                    .or_insert_with(|| result.to_owned());
            } else if let Some(rest) = line.strip_prefix("CANARY ") {
                canaries.push(rest.to_owned());
            }
        }
        assert!(
            means.len() >= 9,
            "the probe did not report every means: {stdout}"
        );
        Report { means, canaries }
    }

    /// The outcome of `means`.
    #[track_caller]
    pub fn get(&self, means: &str) -> &str {
        self.means
            .get(means)
            .unwrap_or_else(|| panic!("no {means} in {self:?}"))
    }
}
