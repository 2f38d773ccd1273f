//! Proactive renewal (PROTOCOL.md §14): tokens are refreshed ahead of their expiry with no
//! client asking, failed renewals are tried again, an auth failure stops them.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::refresh::{now, refresh_config, stored, RefreshServer};
use common::token_endpoint::{Reply, TokenEndpoint};
use credproxy::backend::{Backend, MemoryBackend};

fn refresh_token_of(memory: &MemoryBackend) -> Option<String> {
    memory
        .get_token("anthropic", "default")
        .ok()
        .flatten()
        .and_then(|t| t.refresh_token().map(str::to_owned))
}

/// `renew_before` 2 s: a token expiring in 3 s is renewed within about a second.
fn fast_renewal(url: &str) -> credproxy::refresh::RefreshConfig {
    let mut config = refresh_config(url);
    config.settings.renew_before = Duration::from_secs(2);
    config.scan_interval = Duration::from_millis(200);
    config.renewal_retry = Duration::from_millis(200);
    config
}

#[test]
fn a_token_is_renewed_before_it_expires_with_no_client_asking() {
    let endpoint = TokenEndpoint::start("rt-0");
    let memory = Arc::new(MemoryBackend::new());
    let expiry = now() + 3;
    memory
        .insert_token("anthropic", "default", stored("at-old", "rt-0", expiry))
        .unwrap();
    let mut server = RefreshServer::start(memory.clone(), fast_renewal(&endpoint.url()));
    assert_eq!(endpoint.wait_for(1, Duration::from_secs(3)), 1, "renewed");
    assert!(now() < expiry, "before expiry");
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(refresh_token_of(&memory).as_deref(), Some("rt-1"));
    let t = memory.get_token("anthropic", "default").unwrap().unwrap();
    assert!(t.expiry() > now() + 3000);
    // The new token is not due for an hour: nothing more goes upstream.
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(endpoint.count(), 1);
    let report = server.shutdown();
    assert!(report.refresher_stopped);
    assert_eq!(report.refreshes_abandoned, 0);
}

#[test]
fn a_token_saved_by_another_process_is_found_by_the_scan_and_renewed() {
    let endpoint = TokenEndpoint::start("rt-0");
    let memory = Arc::new(MemoryBackend::new());
    let mut server = RefreshServer::start(memory.clone(), fast_renewal(&endpoint.url()));
    std::thread::sleep(Duration::from_millis(100));
    // Saved straight into the store, as `credproxy store token set` would.
    memory
        .insert_token("anthropic", "default", stored("at-old", "rt-0", now() + 3))
        .unwrap();
    assert_eq!(endpoint.wait_for(1, Duration::from_secs(3)), 1);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(refresh_token_of(&memory).as_deref(), Some("rt-1"));
    server.shutdown();
}

#[test]
fn a_failed_renewal_is_tried_again() {
    let endpoint = TokenEndpoint::start("rt-0");
    endpoint.push([
        Reply::raw(503, b""),
        Reply::raw(503, b""),
        Reply::raw(503, b""),
    ]);
    let memory = Arc::new(MemoryBackend::new());
    memory
        .insert_token("anthropic", "default", stored("at-old", "rt-0", now() + 4))
        .unwrap();
    let mut server = RefreshServer::start(memory.clone(), fast_renewal(&endpoint.url()));
    // Three attempts fail; the retry 200 ms later succeeds.
    assert_eq!(endpoint.wait_for(4, Duration::from_secs(4)), 4);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(refresh_token_of(&memory).as_deref(), Some("rt-1"));
    assert_eq!(endpoint.reused(), 0);
    server.shutdown();
}

#[test]
fn an_auth_failure_stops_renewal() {
    let endpoint = TokenEndpoint::start("rt-0");
    endpoint.push([Reply::error(400, "invalid_grant", "gone")]);
    let memory = Arc::new(MemoryBackend::new());
    memory
        .insert_token("anthropic", "default", stored("at-old", "rt-0", now() + 3))
        .unwrap();
    let mut server = RefreshServer::start(memory.clone(), fast_renewal(&endpoint.url()));
    assert_eq!(endpoint.wait_for(1, Duration::from_secs(3)), 1);
    // Scans keep running every 200 ms; the mark keeps them from renewing again.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(endpoint.count(), 1);
    assert!(memory
        .refresh_state("anthropic", "default")
        .unwrap()
        .needs_login
        .is_some());
    assert_eq!(refresh_token_of(&memory).as_deref(), Some("rt-0"));
    server.shutdown();
}

#[test]
fn profiles_limit_what_is_renewed() {
    let endpoint = TokenEndpoint::start("rt-0");
    let memory = Arc::new(MemoryBackend::new());
    memory
        .insert_token("anthropic", "work", stored("at-old", "rt-0", now() + 3))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = credproxy::Config::new(memory.clone());
    config.socket_dir = Some(dir.path().to_owned());
    config.profile.allow("anthropic:default").unwrap();
    config.refresh = fast_renewal(&endpoint.url());
    let handle = credproxy::Supervisor::start(config).unwrap();
    std::thread::sleep(Duration::from_millis(1800));
    assert_eq!(endpoint.count(), 0, "anthropic:work is outside the profile");
    handle.shutdown_blocking().unwrap();
}
