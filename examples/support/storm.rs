//! The storm the refresh benchmarks share (`refresh_storm`, `fleet_storm`): raw protocol
//! frames over Unix sockets, `get_token` requests all written before any answer is read,
//! one thread per connection released together, and the latency statistics.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// One answer: its latency and the access token, or the error code.
pub type Answer = (Duration, Result<String, String>);

/// Writes one frame.
pub fn send(stream: &mut UnixStream, value: &Value) {
    let body = value.to_string();
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(body.as_bytes());
    stream.write_all(&frame).expect("write");
}

/// Reads one frame.
pub fn recv(stream: &mut UnixStream) -> Value {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).expect("read");
    let mut body = vec![0; u32::from_be_bytes(len) as usize];
    stream.read_exact(&mut body).expect("read");
    serde_json::from_slice(&body).expect("json")
}

/// A connection to `path`, past a version-1 handshake.
pub fn connect(path: &Path) -> UnixStream {
    let mut s = UnixStream::connect(path).expect("connect");
    send(
        &mut s,
        &json!({"v":1,"op":"handshake","payload":{"minVersion":1,"maxVersion":1}}),
    );
    let reply = recv(&mut s);
    assert_eq!(reply["ok"], true, "{reply}");
    s
}

/// `conns` connections spread over `sockets` in turn, each sending `per_conn` get_token
/// for anthropic at once, released together; every answer with its latency.
pub fn fire(sockets: &[PathBuf], conns: usize, per_conn: usize) -> Vec<Answer> {
    let streams: Vec<UnixStream> = (0..conns)
        .map(|c| connect(&sockets[c % sockets.len()]))
        .collect();
    let barrier = Arc::new(Barrier::new(conns));
    let threads: Vec<_> = streams
        .into_iter()
        .enumerate()
        .map(|(c, mut s)| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                let mut sent = Vec::with_capacity(per_conn);
                for i in 0..per_conn {
                    sent.push(Instant::now());
                    send(
                        &mut s,
                        &json!({"id": format!("{c}-{i}"), "op": "get_token",
                                "payload": {"provider": "anthropic"}}),
                    );
                }
                let mut out = Vec::with_capacity(per_conn);
                for _ in 0..per_conn {
                    let reply = recv(&mut s);
                    let id = reply["id"].as_str().expect("id");
                    let i: usize = id.split('-').nth(1).unwrap().parse().unwrap();
                    let answer = match reply["data"]["access_token"].as_str() {
                        Some(t) if reply["ok"] == true => Ok(t.to_owned()),
                        _ => Err(reply["code"].as_str().unwrap_or("?").to_owned()),
                    };
                    out.push((sent[i].elapsed(), answer));
                }
                out
            })
        })
        .collect();
    threads
        .into_iter()
        .flat_map(|t| t.join().expect("thread"))
        .collect()
}

/// The `p` quantile of sorted latencies (nearest rank).
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// Milliseconds.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
