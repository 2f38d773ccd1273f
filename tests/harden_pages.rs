//! Issue 12: the secrets `credproxy serve` keeps (the file store's read cache of served
//! tokens) sit on pages excluded from core dumps (`MADV_DONTDUMP`, `dd` in smaps) and
//! locked against swap (`lo`); with a memlock limit too small to lock them, the server
//! warns once, still excludes them from dumps, and serves as before.
//!
//! The server runs as the non-root uid `USER` (root ignores `RLIMIT_MEMLOCK`); the test,
//! as root, reads its mappings through `/proc/PID/{smaps,mem}`.

mod common;

use std::fs;
use std::os::unix::fs::FileExt;

use nix::sys::signal::Signal;

use common::probe::contains;
use common::unprivileged;
use common::user_home::{UserHome, UserServer};

const ACCESS_A: &str = "canary-pages-access-a-31c9";
const ACCESS_B: &str = "canary-pages-access-b-8e02";
const REFRESH: &str = "canary-pages-refresh-d4f6";

/// One mapping of the server: its range and its `VmFlags`.
#[derive(Debug)]
struct Mapping {
    start: u64,
    end: u64,
    flags: Vec<String>,
}

fn mappings(pid: u32) -> Vec<Mapping> {
    let smaps = fs::read_to_string(format!("/proc/{pid}/smaps")).expect("read smaps");
    let mut out: Vec<Mapping> = Vec::new();
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or_default();
        if let Some((start, end)) = first.split_once('-') {
            if let (Ok(start), Ok(end)) =
                (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
            {
                out.push(Mapping {
                    start,
                    end,
                    flags: Vec::new(),
                });
                continue;
            }
        }
        if let (Some(flags), Some(last)) = (line.strip_prefix("VmFlags:"), out.last_mut()) {
            last.flags = flags.split_whitespace().map(str::to_owned).collect();
        }
    }
    out
}

/// The flags of every undumpable mapping that holds `canary`.
fn undumpable_holding(pid: u32, canary: &str) -> Vec<Vec<String>> {
    let mem = fs::File::open(format!("/proc/{pid}/mem")).expect("open mem as root");
    mappings(pid)
        .into_iter()
        .filter(|m| m.flags.iter().any(|f| f == "dd") && m.end - m.start <= 1 << 20)
        .filter(|m| {
            let mut buf = vec![0; (m.end - m.start) as usize];
            mem.read_at(&mut buf, m.start).is_ok() && contains(&buf, canary.as_bytes())
        })
        .map(|m| m.flags)
        .collect()
}

fn start(home: &UserHome, ulimit: Option<&str>) -> UserServer {
    home.seed_token("anthropic", ACCESS_A, REFRESH);
    home.seed_token("gemini", ACCESS_B, REFRESH);
    let server = home.serve(&["--allow", "anthropic", "--allow", "gemini"], ulimit);
    assert!(server.fetch_token("anthropic").contains(ACCESS_A));
    assert!(server.fetch_token("gemini").contains(ACCESS_B));
    server
}

#[test]
fn served_tokens_sit_on_locked_undumpable_pages() {
    if !unprivileged::root() {
        return unprivileged::skip("served_tokens_sit_on_locked_undumpable_pages");
    }
    let home = UserHome::new(&[]);
    let mut server = start(&home, None);
    let pid = server.child.pid().as_raw() as u32;
    for canary in [ACCESS_A, ACCESS_B] {
        let holding = undumpable_holding(pid, canary);
        assert!(
            !holding.is_empty(),
            "{canary} on no undumpable page: {:?}",
            mappings(pid)
        );
        for flags in &holding {
            assert!(flags.iter().any(|f| f == "lo"), "not locked: {flags:?}");
        }
    }
    server.child.signal(Signal::SIGTERM);
    server.child.wait_exit("serve after SIGTERM");
    let stderr = server.stderr.join().expect("stderr");
    assert!(!stderr.contains("WARN"), "{stderr}");
}

#[test]
fn a_memlock_limit_too_small_warns_once_and_still_serves() {
    if !unprivileged::root() {
        return unprivileged::skip("a_memlock_limit_too_small_warns_once_and_still_serves");
    }
    let home = UserHome::new(&[]);
    let mut server = start(&home, Some("-l 0"));
    let pid = server.child.pid().as_raw() as u32;
    for canary in [ACCESS_A, ACCESS_B] {
        let holding = undumpable_holding(pid, canary);
        assert!(!holding.is_empty(), "{canary} on no undumpable page");
        for flags in &holding {
            assert!(!flags.iter().any(|f| f == "lo"), "locked: {flags:?}");
        }
    }
    // Served again from the cache, and once more after the cache was dropped.
    assert!(server.fetch_token("anthropic").contains(ACCESS_A));
    home.seed_token("anthropic", ACCESS_A, REFRESH);
    assert!(server.fetch_token("anthropic").contains(ACCESS_A));
    server.child.signal(Signal::SIGTERM);
    let status = server.child.wait_exit("serve after SIGTERM");
    assert!(status.success(), "{status:?}");
    let stderr = server.stderr.join().expect("stderr");
    let warnings = stderr.matches("RLIMIT_MEMLOCK").count();
    assert_eq!(warnings, 1, "one warning: {stderr}");
    for canary in [ACCESS_A, ACCESS_B, REFRESH] {
        assert!(!stderr.contains(canary), "{stderr}");
    }
}
