//! Shutdown with renewal timers set and a renewal in flight leaves nothing running: no
//! timer fires afterwards and no worker thread of the server is left. One test alone in
//! its binary, so that the thread count is its own.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::refresh::{now, refresh_config, stored, RefreshServer};
use common::token_endpoint::{Reply, TokenEndpoint};
use credproxy::backend::MemoryBackend;

/// Names of this process's threads that belong to a credproxy server.
fn server_threads() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|name| name.trim().to_owned())
        .filter(|name| name.starts_with("credproxy"))
        .collect()
}

#[test]
fn shutdown_during_a_renewal_is_clean() {
    let endpoint = TokenEndpoint::start("rt-0");
    endpoint.push([Reply::token("at-late", 3600, Some("rt-late")).after(Duration::from_secs(3))]);
    let memory = Arc::new(MemoryBackend::new());
    // One renewal soon (in flight at shutdown), one timer an hour out.
    memory
        .insert_token("anthropic", "default", stored("at-a", "rt-0", now() + 3))
        .unwrap();
    memory
        .insert_token("anthropic", "later", stored("at-b", "rt-b", now() + 3600))
        .unwrap();
    let mut config = refresh_config(&endpoint.url());
    config.settings.renew_before = Duration::from_secs(2);
    config.timeouts.attempt = Duration::from_secs(5);
    config.timeouts.total = Duration::from_secs(5);
    let mut server = RefreshServer::start(memory.clone(), config);
    assert_eq!(
        endpoint.wait_for(1, Duration::from_secs(3)),
        1,
        "renewal started"
    );
    assert!(!server_threads().is_empty());
    let started = Instant::now();
    let report = server.shutdown();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert!(report.refresher_stopped && report.store_cleared);
    assert_eq!(report.refreshes_abandoned, 1);
    // Worker threads exit once released; give them a moment.
    let deadline = Instant::now() + Duration::from_secs(3);
    while !server_threads().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(server_threads(), Vec::<String>::new());
    std::thread::sleep(Duration::from_millis(3500));
    assert_eq!(endpoint.count(), 1, "no timer fired after shutdown");
}
