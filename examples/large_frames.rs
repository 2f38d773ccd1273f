//! What version 2's 4 MiB frames (PROTOCOL.md §13) cost the server: the memory of one
//! session holding a frame one byte short of complete, the resident set of 500 connections
//! each one byte short of a 4 MiB frame (the large-frame budget at work), and the time to take in
//! and answer a 4 MiB request. The server is the real `credproxy serve` (release build),
//! its memory read from `/proc/<pid>/status`.
//!
//!     cargo build --release --bin credproxy --example large_frames
//!     target/release/examples/large_frames [--connections 500]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;
const FRAME: usize = 4 * MIB;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .expect("VmRSS")
}

fn frame(body: &[u8]) -> Vec<u8> {
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(body);
    out
}

fn recv(s: &mut UnixStream) -> serde_json::Value {
    let mut h = [0u8; 4];
    s.read_exact(&mut h).expect("header");
    let mut body = vec![0u8; u32::from_be_bytes(h) as usize];
    s.read_exact(&mut body).expect("body");
    serde_json::from_slice(&body).expect("json")
}

fn connect_v2(path: &str) -> UnixStream {
    let mut s = UnixStream::connect(path).expect("connect");
    s.write_all(&frame(
        br#"{"v":1,"op":"handshake","payload":{"minVersion":1,"maxVersion":2}}"#,
    ))
    .expect("handshake");
    assert_eq!(recv(&mut s)["data"]["version"], 2);
    s
}

/// A `get_token` request padded with an unknown field to exactly `len` bytes.
fn padded(id: &str, len: usize) -> Vec<u8> {
    let head =
        format!(r#"{{"id":"{id}","op":"get_token","payload":{{"provider":"anthropic","pad":""#);
    let mut body = head.into_bytes();
    body.resize(len - 3, b'x');
    body.extend_from_slice(br#""}}"#);
    body
}

/// Writes what the socket takes of `bytes` without blocking; returns the count.
fn write_some(s: &mut UnixStream, bytes: &[u8]) -> usize {
    s.set_nonblocking(true).expect("nonblocking");
    let mut n = 0;
    while n < bytes.len() {
        match s.write(&bytes[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(2));
                match s.write(&bytes[n..]) {
                    Ok(k) if k > 0 => n += k,
                    _ => break,
                }
            }
            Err(_) => break,
        }
    }
    s.set_nonblocking(false).expect("blocking");
    n
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let conns: usize = args
        .iter()
        .position(|a| a == "--connections")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    let (soft, hard) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).expect("rl");
    let want = (conns as u64 * 2 + 64).min(hard);
    if soft < want {
        nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, want, hard)
            .expect("raise nofile");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let sock = dir.path().join("sock");
    std::fs::create_dir(&sock).expect("mkdir");
    std::fs::set_permissions(&sock, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .expect("chmod");
    let bin = std::env::current_exe()
        .expect("exe")
        .parent()
        .and_then(|p| p.parent())
        .expect("target dir")
        .join("credproxy");
    let mut set = Command::new(&bin)
        .args(["store", "token", "set", "anthropic", "--store"])
        .arg(&store)
        .stdin(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("store set");
    set.stdin
        .take()
        .expect("stdin")
        .write_all(br#"{"access_token":"bench-at","expiry":4102444800,"token_type":"Bearer"}"#)
        .expect("write");
    assert!(set.wait().expect("wait").success());
    let mut server = Command::new(&bin)
        .args(["serve", "--allow-all", "--rate-limit", "0", "--store"])
        .arg(&store)
        .arg("--socket-dir")
        .arg(&sock)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("serve");
    let mut line = String::new();
    {
        let out = server.stdout.as_mut().expect("stdout");
        let mut byte = [0u8; 1];
        while out.read(&mut byte).expect("read") == 1 && byte[0] != b'\n' {
            line.push(char::from(byte[0]));
        }
    }
    let path = line
        .strip_prefix("LLXPRT_CREDENTIAL_SOCKET=")
        .expect("socket line")
        .to_owned();
    let pid = server.id();
    std::thread::sleep(Duration::from_millis(300));
    let base = rss_kib(pid);
    println!("server RSS at start: {base} KiB");

    // One session holding a 4 MiB frame that is one byte short.
    let before = rss_kib(pid);
    let mut one = connect_v2(&path);
    let bytes = frame(&padded("h", FRAME));
    let writer = {
        let mut w = one.try_clone().expect("clone");
        let part = bytes[..bytes.len() - 1].to_vec();
        std::thread::spawn(move || w.write_all(&part))
    };
    writer.join().expect("join").expect("write");
    std::thread::sleep(Duration::from_millis(300));
    let holding = rss_kib(pid);
    println!(
        "one session holding a 4 MiB frame one byte short: RSS +{} KiB",
        holding.saturating_sub(before)
    );
    one.write_all(&bytes[bytes.len() - 1..]).expect("last byte");
    assert_eq!(recv(&mut one)["ok"], true);
    drop(one);
    std::thread::sleep(Duration::from_millis(500));

    // `conns` connections, each one byte short of a 4 MiB frame.
    let mut all: Vec<UnixStream> = (0..conns).map(|_| connect_v2(&path)).collect();
    std::thread::sleep(Duration::from_millis(200));
    let idle = rss_kib(pid);
    let t0 = Instant::now();
    // All but the last byte: every connection that gets budget fills its whole buffer.
    let whole = frame(&padded("m", FRAME));
    let half = whole[..whole.len() - 1].to_vec();
    let mut taken = 0usize;
    for s in &mut all {
        taken += write_some(s, &half);
    }
    let wrote = t0.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let mid = rss_kib(pid);
    println!(
        "{conns} idle v2 connections: RSS {idle} KiB; each sending a 4 MiB frame but its \
         last byte ({} MiB taken by the server's sockets in {:.1} s): RSS {mid} KiB (+{} KiB)",
        taken / MIB,
        wrote.as_secs_f64(),
        mid.saturating_sub(idle)
    );
    drop(all);
    std::thread::sleep(Duration::from_millis(500));

    // Time to take in and answer one 4 MiB request (and a 64 KiB one for scale).
    let mut c = connect_v2(&path);
    for (label, len) in [("64 KiB", 65_536), ("1 MiB", MIB), ("4 MiB", FRAME)] {
        let bytes = frame(&padded("t", len));
        let mut times = Vec::new();
        for _ in 0..11 {
            let t0 = Instant::now();
            c.write_all(&bytes).expect("write");
            let reply = recv(&mut c);
            times.push(t0.elapsed());
            assert_eq!(reply["ok"], true, "{reply}");
        }
        times.sort();
        println!(
            "{label} get_token request, write to reply: median {:.2} ms, max {:.2} ms",
            times[5].as_secs_f64() * 1e3,
            times[10].as_secs_f64() * 1e3
        );
    }
    drop(c);

    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = server.wait();
}
