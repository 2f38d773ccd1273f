//! Concurrent `get_token` misses of one key share one read of a blocking store, but a
//! read that started before a save completed never answers a `get_token` sent after it.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::hooked::{Call, Hook, Hooked};
use common::{allow_all, data, seeded, short_limits, Raw};
use credproxy::backend::StoreError;
use serde_json::json;

/// Counts `get_token` reads and makes each take 300 ms.
#[derive(Debug, Default)]
struct CountedSlowGet(AtomicUsize);

impl Hook for CountedSlowGet {
    fn before(&self, call: Call<'_>) -> Result<(), StoreError> {
        if let Call::GetToken { .. } = call {
            self.0.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(300));
        }
        Ok(())
    }
}

/// A server over `backend` without host-side refresh, whose renewal scan would read the
/// store too.
fn start_backend(
    backend: Arc<dyn credproxy::backend::Backend>,
) -> (credproxy::ServerHandle, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = credproxy::Config::new(backend);
    config.socket_dir = Some(dir.path().to_owned());
    config.profile = allow_all();
    config.limits = short_limits();
    config.refresh.settings.enabled = false;
    (credproxy::Supervisor::start(config).expect("start"), dir)
}

fn connect(path: &std::path::Path) -> Raw {
    let mut raw = Raw::connect(path);
    raw.handshake();
    raw
}

#[test]
fn concurrent_misses_share_one_read() {
    let backend = Arc::new(Hooked {
        inner: seeded(),
        hook: CountedSlowGet::default(),
        blocking: true,
    });
    let (handle, _dir) = start_backend(backend.clone());
    let path = handle.socket_path().to_owned();
    let mut conns: Vec<Raw> = (0..20).map(|_| connect(&path)).collect();
    for (i, raw) in conns.iter_mut().enumerate() {
        raw.send(
            &json!({"id": i.to_string(), "op": "get_token", "payload": {"provider": "anthropic"}}),
        );
    }
    for raw in &mut conns {
        let reply = raw.recv();
        assert_eq!(
            data(&reply)["access_token"],
            "at-anthropic-default",
            "{reply}"
        );
    }
    assert_eq!(backend.hook.0.load(Ordering::SeqCst), 1);
    // Stats count every answered get_token, shared read or not.
    let reply = conns[0].call("s", "get_bucket_stats", json!({"provider": "anthropic"}));
    assert_eq!(data(&reply)["requestCount"], 20, "{reply}");
    handle.shutdown_blocking().unwrap();
}

#[test]
fn a_read_older_than_a_completed_save_is_not_shared() {
    let backend = Arc::new(Hooked {
        inner: seeded(),
        hook: CountedSlowGet::default(),
        blocking: true,
    });
    let (handle, _dir) = start_backend(backend.clone());
    let path = handle.socket_path().to_owned();
    let mut early = connect(&path);
    let mut writer = connect(&path);
    let mut late = connect(&path);
    // A read starts (300 ms), a save completes meanwhile, then another get_token.
    early.send(&json!({"id": "e", "op": "get_token", "payload": {"provider": "anthropic"}}));
    std::thread::sleep(Duration::from_millis(50));
    let token =
        json!({"access_token": "at-saved", "expiry": 1_900_000_000, "token_type": "Bearer"});
    let reply = writer.call(
        "w",
        "save_token",
        json!({"provider": "anthropic", "token": token}),
    );
    assert_eq!(reply["ok"], true, "{reply}");
    let reply = late.call("l", "get_token", json!({"provider": "anthropic"}));
    assert_eq!(data(&reply)["access_token"], "at-saved", "{reply}");
    let reply = early.recv();
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(backend.hook.0.load(Ordering::SeqCst), 2);
    handle.shutdown_blocking().unwrap();
}
