//! Refresh storm benchmark (BENCHMARKS.md): N concurrent `get_token` for one expired token
//! against a token endpoint on 127.0.0.1 that answers after a fixed latency. It reports
//! the requests that reached the endpoint (must be 1) and the p50/p99/max of the answers,
//! beside the same storm for a fresh token (no refresh), so that the refresh's own cost
//! shows: the goal is p99(storm) <= 1.2 x (latency + p99(fresh)).
//!
//! ```text
//! cargo run --release --example refresh_storm -- [LATENCY_MS] [ROUNDS]
//! ```
//!
//! N = 1, 100 and 1000. The requests go over 100 connections at most (1000 = 100
//! connections x 10 requests in flight each, under the 16 in-flight limit), all written
//! before any answer is read, from one thread per connection released together.

#[path = "support/storm.rs"]
mod storm;

#[path = "../tests/common/token_endpoint.rs"]
#[allow(dead_code)]
mod token_endpoint;

use std::sync::Arc;
use std::time::Duration;

use credproxy::backend::MemoryBackend;
use credproxy::oauth::{Endpoint, EndpointOverride};
use credproxy::refresh::RefreshConfig;
use credproxy::token::Token;
use credproxy::{Config, Supervisor};
use serde_json::json;
use storm::{ms, percentile};
use token_endpoint::{Reply, TokenEndpoint};

fn now() -> u64 {
    credproxy::oauth::epoch_seconds(std::time::SystemTime::now())
}

struct Storm {
    latencies: Vec<Duration>,
    upstream: usize,
    distinct_tokens: usize,
}

/// One storm of `n` get_token; `expired` picks an expired or a fresh stored token.
fn storm(n: usize, latency: Duration, expired: bool) -> Storm {
    let endpoint = TokenEndpoint::start("rt-0");
    endpoint.push([Reply::token("at-new", 3600, Some("rt-new")).after(latency)]);
    let memory = Arc::new(MemoryBackend::new());
    let expiry = if expired { now() - 10 } else { now() + 3600 };
    let token = Token::from_value(json!({"access_token": "at-old", "refresh_token": "rt-0",
        "expiry": expiry, "token_type": "Bearer"}))
    .expect("token");
    memory
        .insert_token("anthropic", "default", token)
        .expect("seed");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = Config::new(memory);
    config.socket_dir = Some(dir.path().to_owned());
    config.profile.allow_all = true;
    config.limits.rate_limit = 0;
    let endpoint_url = endpoint.url();
    let anthropic = Endpoint::resolve(
        "anthropic",
        &EndpointOverride {
            token_url: Some(endpoint_url),
            ..EndpointOverride::default()
        },
    )
    .expect("endpoint");
    config.refresh = RefreshConfig {
        endpoints: [("anthropic".into(), anthropic)].into(),
        ..RefreshConfig::default()
    };
    let server = Supervisor::start(config).expect("start");
    let path = server.socket_path().to_owned();
    let conns = n.min(100);
    let answers: Vec<(Duration, String)> = storm::fire(&[path], conns, n / conns)
        .into_iter()
        .map(|(d, answer)| (d, answer.unwrap_or_else(|code| panic!("answered {code}"))))
        .collect();
    let mut tokens: Vec<&String> = answers.iter().map(|(_, t)| t).collect();
    tokens.sort();
    tokens.dedup();
    let result = Storm {
        latencies: answers.iter().map(|(d, _)| *d).collect(),
        upstream: endpoint.count(),
        distinct_tokens: tokens.len(),
    };
    server.shutdown_blocking().expect("shutdown");
    result
}

fn main() {
    let mut args = std::env::args().skip(1);
    let latency_ms: u64 = args.next().map_or(50, |a| a.parse().expect("LATENCY_MS"));
    let rounds: usize = args.next().map_or(5, |a| a.parse().expect("ROUNDS"));
    let latency = Duration::from_millis(latency_ms);
    println!("upstream latency {latency_ms} ms, {rounds} rounds per N (all answers pooled)");
    println!(
        "{:>5} {:>9} {:>7} | {:>9} {:>9} {:>9} | {:>10} {:>10} | {:>6}",
        "N", "upstream", "tokens", "p50 ms", "p99 ms", "max ms", "fresh p50", "fresh p99", "ratio"
    );
    for n in [1, 100, 1000] {
        let mut storm_lat = Vec::new();
        let mut fresh_lat = Vec::new();
        let mut upstream = Vec::new();
        let mut distinct = 0;
        for _ in 0..rounds {
            let s = storm(n, latency, true);
            upstream.push(s.upstream);
            distinct = distinct.max(s.distinct_tokens);
            storm_lat.extend(s.latencies);
            fresh_lat.extend(storm(n, latency, false).latencies);
        }
        storm_lat.sort();
        fresh_lat.sort();
        let p99 = percentile(&storm_lat, 0.99);
        let fresh_p99 = percentile(&fresh_lat, 0.99);
        let ratio = ms(p99) / (ms(latency) + ms(fresh_p99));
        println!(
            "{:>5} {:>9} {:>7} | {:>9.2} {:>9.2} {:>9.2} | {:>10.3} {:>10.3} | {:>6.3}",
            n,
            format!("{:?}", upstream.iter().max().unwrap()),
            distinct,
            ms(percentile(&storm_lat, 0.5)),
            ms(p99),
            ms(*storm_lat.last().unwrap()),
            ms(percentile(&fresh_lat, 0.5)),
            ms(fresh_p99),
            ratio
        );
    }
}
