//! Issue 12 (hardening): reading a stored token through the file backend leaves no copy
//! of its refresh token in this process's memory once the token is dropped: not the
//! file's bytes as read, not the JSON parse's buffers (an escaped string's unescaping, a
//! value replaced by a duplicate key).
//!
//! The proof scans this process's own writable anonymous memory (`/proc/self/maps` and
//! `/proc/self/mem`: the heap, anonymous mappings, stacks) for the canaries. It runs in
//! its own test binary, with one test, so no other test's threads add noise. The canaries
//! are built at run time (never in the binary's read-only data), and the test's own
//! copies of the file content are wiped before the scan; the needles themselves are the
//! only live copies, and their addresses are skipped.

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};

use credproxy::backend::{Backend, FileBackend};
use zeroize::Zeroize;

/// Random lowercase hex, `n` characters, in a buffer allocated once.
fn random_hex(n: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let digit = (rand::random::<u8>() % 16) as u32;
        out.push(char::from_digit(digit, 16).expect("hex digit") as u8);
    }
    out
}

/// Appends `text` to `out` with every character written as a `\u00XX` escape.
fn push_escaped(out: &mut Vec<u8>, text: &[u8]) {
    for &b in text {
        out.extend_from_slice(b"\\u00");
        for nibble in [b >> 4, b & 0xf] {
            out.push(char::from_digit(u32::from(nibble), 16).expect("hex") as u8);
        }
    }
}

/// Where `needle` occurs in this process's writable anonymous memory, other than at the
/// addresses in `skip` (the live copies: the needles themselves).
fn occurrences(needle: &[u8], skip: &[usize]) -> Vec<(usize, String)> {
    let maps = fs::read_to_string("/proc/self/maps").expect("maps");
    let mut mem = File::open("/proc/self/mem").expect("mem");
    // Over glibc's mmap threshold: its own mapping, which is skipped (it holds copies of
    // what it reads). It is wiped after each chunk anyway.
    // The buffer the memory is read into holds copies of what it reads: its own address
    // range is never scanned (glibc may place it in the heap), and it is wiped after each
    // chunk.
    let mut chunk = vec![0u8; 4 << 20];
    let own = (
        chunk.as_ptr() as usize,
        chunk.as_ptr() as usize + chunk.len(),
    );
    let mut found = Vec::new();
    for line in maps.lines() {
        let mut parts = line.split_whitespace();
        let (Some(range), Some(perms)) = (parts.next(), parts.next()) else {
            continue;
        };
        let name = parts.nth(3).unwrap_or("");
        let anonymous = name.is_empty() || name == "[heap]" || name.starts_with("[stack");
        if !perms.starts_with("rw") || !anonymous {
            continue;
        }
        let (start, end) = range.split_once('-').expect("range");
        let start = usize::from_str_radix(start, 16).expect("start");
        let end = usize::from_str_radix(end, 16).expect("end");
        // The region without the read buffer.
        let pieces = if own.0 < end && start < own.1 {
            vec![(start, own.0.max(start)), (own.1.min(end), end)]
        } else {
            vec![(start, end)]
        };
        for (start, end) in pieces {
            let mut at = start;
            while at + needle.len() <= end {
                let len = (end - at).min(chunk.len());
                if mem.seek(SeekFrom::Start(at as u64)).is_err() {
                    break;
                }
                let Ok(got) = mem.read(&mut chunk[..len]) else {
                    break;
                };
                if got < needle.len() {
                    break;
                }
                for (i, window) in chunk[..got].windows(needle.len()).enumerate() {
                    if window == needle && !skip.contains(&(at + i)) {
                        found.push((at + i, name.to_owned()));
                    }
                }
                chunk[..got].zeroize();
                if at + got >= end {
                    break;
                }
                // Overlap chunks so a needle across a boundary is still seen.
                at += got - needle.len() + 1;
            }
        }
    }
    found
}

#[test]
fn a_loaded_token_leaves_no_copy_of_its_refresh_token_once_dropped() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = FileBackend::open(tmp.path().join("store")).expect("open");
    // Two refresh tokens: `old` is replaced by a later duplicate key, `live` is the one
    // kept. Each has a plain part (contiguous in the file's bytes) and an escaped part
    // (contiguous only once unescaped).
    let needles = [
        random_hex(24),
        random_hex(24),
        random_hex(24),
        random_hex(24),
    ];
    let [old_plain, old_escaped, live_plain, live_escaped] = &needles;
    let mut content = Vec::with_capacity(4096);
    content.extend_from_slice(b"{\"refresh_token\":\"rt-");
    content.extend_from_slice(old_plain);
    content.extend_from_slice(b"\\n\\/");
    push_escaped(&mut content, old_escaped);
    content.extend_from_slice(
        b"\",\"access_token\":\"at\",\"expiry\":1900000000,\"token_type\":\"Bearer\",\
          \"refresh_token\":\"rt-",
    );
    content.extend_from_slice(live_plain);
    content.extend_from_slice(b"\\t");
    push_escaped(&mut content, live_escaped);
    content.extend_from_slice(b"\"}");
    let dir = tmp.path().join("store/tokens/anthropic");
    fs::create_dir_all(&dir).expect("mkdir");
    fs::write(dir.join("default.json"), &content).expect("write");
    content.zeroize();

    let skip: Vec<usize> = needles.iter().map(|n| n.as_ptr() as usize).collect();
    for round in 0..3 {
        let token = store
            .get_token("anthropic", "default")
            .expect("get")
            .expect("stored");
        assert!(token.has_refresh_token());
        // While the token is alive, its refresh token is in memory (the scan works).
        let live = occurrences(live_escaped, &skip);
        assert!(
            !live.is_empty(),
            "the scan must find the live refresh token (round {round})"
        );
        drop(token);
        for (what, needle) in [
            ("the replaced duplicate (plain part)", old_plain),
            ("the replaced duplicate (escaped part)", old_escaped),
            ("the refresh token (plain part)", live_plain),
            ("the refresh token (escaped part)", live_escaped),
        ] {
            let left = occurrences(needle, &skip);
            assert!(
                left.is_empty(),
                "round {round}: {what} is still in memory after the token was dropped, at {left:x?}"
            );
        }
    }
}
