//! The library denies `unsafe` code with one audited exception, `src/memory.rs` (glibc's
//! `malloc_trim`). `deny` (unlike `forbid`) can be overridden by any module, so this test
//! keeps the exception from growing: `unsafe` appears in exactly one place in `src/`.

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

#[test]
fn unsafe_code_only_in_the_audited_memory_release() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    assert!(files.len() > 10, "found the sources: {files:?}");
    let mut uses = Vec::new();
    for file in &files {
        let text = fs::read_to_string(file).expect("read");
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or_default();
            if code.contains("unsafe") && code.trim() != "#![deny(unsafe_code)]" {
                let rel = file.strip_prefix(root).expect("under the root");
                uses.push(format!("{}:{}: {}", rel.display(), n + 1, line.trim()));
            }
        }
    }
    assert_eq!(
        uses,
        vec![
            "src/memory.rs:18: #[allow(unsafe_code)]".to_owned(),
            "src/memory.rs:22: unsafe { nix::libc::malloc_trim(0) == 1 }".to_owned(),
        ],
        "unsafe code outside the one audited call"
    );
    let lib = fs::read_to_string(root.join("src/lib.rs")).expect("lib.rs");
    assert!(
        lib.contains("\n#![deny(unsafe_code)]\n"),
        "the crate denies unsafe code"
    );
}
