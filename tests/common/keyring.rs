//! Is a Secret Service reachable on the D-Bus session bus? The keyring tests need a real
//! one (gnome-keyring-daemon, unlocked). Without it they skip with a printed note, except
//! under CI (`CI` set), where a missing keyring is a failure: `.ci/run` starts one.

use std::sync::atomic::{AtomicU64, Ordering};

use credproxy::backend::{Backend, KeyringBackend};

/// True when a Secret Service answers; prints why not and returns false otherwise.
/// Panics under CI when none is reachable.
pub fn available() -> bool {
    let probe = KeyringBackend::open(Some(&unique_service("probe"))).and_then(|b| b.list_keys());
    match probe {
        Ok(_) => true,
        Err(e) if std::env::var_os("CI").is_some() => panic!(
            "CI is set but no usable Secret Service is on the session bus ({e}); run the \
             tests through .ci/run, which starts gnome-keyring-daemon inside dbus-run-session"
        ),
        Err(e) => {
            eprintln!(
                "note: skipping a keyring test: no usable Secret Service ({e}); run under \
                 dbus-run-session with gnome-keyring-daemon unlocked (see .ci/run)"
            );
            false
        }
    }
}

/// A keyring service name no other test (nor an earlier run) uses.
pub fn unique_service(what: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "credproxy-test-{what}-{}-{nanos}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}
