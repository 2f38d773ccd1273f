//! The library denies `unsafe` code with audited exceptions in three small modules:
//! `src/memory.rs` (glibc's `malloc_trim`; the mapping, advice, locking, slices and
//! unmapping of `LockedBytes`, the pages secrets live on), `src/harden.rs` (the
//! `pre_exec` hook that gives a child the original core limit; `PT_DENY_ATTACH` on
//! macOS) and `src/handover.rs` (owning the capability token's inherited descriptor; the
//! `pre_exec` hook that moves it to its number in the child). `deny` (unlike `forbid`)
//! can be overridden by any module, so this test keeps the exceptions from growing: `unsafe` appears in exactly these places in `src/`, and
//! every `unsafe` block or impl has a `SAFETY` comment right above it.

use std::fs;
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).expect("read src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Every line of code (comments cut off) that says `unsafe`, as `file: line`.
const AUDITED: &[&str] = &[
    "src/handover.rs: #[allow(unsafe_code)]",
    "src/handover.rs: let mut file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });",
    "src/handover.rs: #[allow(unsafe_code)]",
    "src/handover.rs: let copy = unsafe { OwnedFd::from_raw_fd(fd) };",
    "src/handover.rs: #[allow(unsafe_code)]",
    "src/handover.rs: unsafe {",
    "src/harden.rs: #[allow(unsafe_code)]",
    "src/harden.rs: unsafe { nix::libc::ptrace(nix::libc::PT_DENY_ATTACH, 0, std::ptr::null_mut(), 0) };",
    "src/harden.rs: #[allow(unsafe_code)]",
    "src/harden.rs: unsafe {",
    "src/memory.rs: #[allow(unsafe_code)]",
    "src/memory.rs: unsafe { nix::libc::malloc_trim(0) == 1 }",
    "src/memory.rs: #[allow(unsafe_code)]",
    "src/memory.rs: unsafe impl Send for LockedBytes {}",
    "src/memory.rs: #[allow(unsafe_code)]",
    "src/memory.rs: unsafe impl Sync for LockedBytes {}",
    "src/memory.rs: #[allow(unsafe_code)]",
    "src/memory.rs: Storage::Mapped { ptr, .. } => unsafe {",
    "src/memory.rs: #[allow(unsafe_code)]",
    "src/memory.rs: Storage::Mapped { ptr, .. } => unsafe {",
    "src/memory.rs: #[allow(unsafe_code)]",
    "src/memory.rs: let mapped = unsafe {",
    "src/memory.rs: if let Err(e) = unsafe { madvise(ptr, map_len, MmapAdvise::MADV_DONTDUMP) } {",
    "src/memory.rs: match unsafe { mlock(ptr, map_len) } {",
    "src/memory.rs: #[allow(unsafe_code)]",
    "src/memory.rs: let _ = unsafe { nix::sys::mman::munlock(ptr, map_len) };",
    "src/memory.rs: let _ = unsafe { nix::sys::mman::munmap(ptr, map_len) };",
];

#[test]
fn unsafe_code_only_in_the_audited_places() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    files.sort();
    assert!(files.len() > 10, "found the sources: {files:?}");
    let mut uses = Vec::new();
    let mut unexplained = Vec::new();
    for file in &files {
        let text = fs::read_to_string(file).expect("read");
        let lines: Vec<&str> = text.lines().collect();
        let rel = file.strip_prefix(root).expect("under the root");
        for (n, line) in lines.iter().enumerate() {
            let code = line.split("//").next().unwrap_or_default();
            if !code.contains("unsafe") || code.trim() == "#![deny(unsafe_code)]" {
                continue;
            }
            uses.push(format!("{}: {}", rel.display(), line.trim()));
            if code.contains("unsafe_code") {
                continue;
            }
            // The SAFETY comment is on one of the few lines above the block or impl.
            let above = &lines[n.saturating_sub(4)..n];
            if !above
                .iter()
                .any(|l| l.trim_start().starts_with("// SAFETY:"))
            {
                unexplained.push(format!("{}:{}", rel.display(), n + 1));
            }
        }
    }
    assert_eq!(uses, AUDITED, "unsafe code outside the audited places");
    assert!(
        unexplained.is_empty(),
        "unsafe without a SAFETY comment: {unexplained:?}"
    );
    let lib = fs::read_to_string(root.join("src/lib.rs")).expect("lib.rs");
    assert!(
        lib.contains("\n#![deny(unsafe_code)]\n"),
        "the crate denies unsafe code"
    );
}
