//! Fleet refresh storm (BENCHMARKS.md): N `credproxy serve` processes sharing one etcd
//! store, one EXPIRED token (with a refresh token) in it, and a token endpoint on
//! 127.0.0.1 that answers after a fixed latency. REQUESTS concurrent `get_token` are
//! spread evenly over the servers' sockets (raw frames, all written before any answer is
//! read, from one thread per connection released together). Reported per N: the requests
//! that reached the token endpoint in each round (expected: exactly 1 in the whole
//! fleet), the distinct access tokens answered (expected: 1), the answers other than the
//! token the round's first upstream request issued ("other", expected: 0), errors, and
//! p50/p99/max of the answers; beside it the same storm for a token
//! that is not due (no refresh), so the refresh's own cost shows.
//!
//! Between rounds a fresh expired token is stored again (`credproxy store token set`),
//! with the servers running: their read caches learn it through the etcd watch, given
//! `SETTLE_MS` (1 s) before the storm.
//!
//! The cluster, the store and its key are the caller's; `bench/fleet.sh` starts a
//! 3-member cluster and runs this:
//!
//! ```text
//! fleet_storm BIN etcd://H:P,H:P,H:P/PREFIX KEYFILE [LATENCY_MS=100] [REQUESTS=300] [ROUNDS=5] [SERVERS=1,3,10]
//! ```

#[path = "support/storm.rs"]
mod storm;

#[path = "../tests/common/token_endpoint.rs"]
#[allow(dead_code)]
mod token_endpoint;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};
use storm::{ms, percentile, Answer};
use token_endpoint::{read_request, write_reply, Reply};

/// Connections per storm, spread over the servers (connection c goes to server c % N).
const CONNECTIONS: usize = 60;

/// The pause between storing a token and the storm, for the servers' watches.
const SETTLE_MS: u64 = 1000;

fn now() -> u64 {
    credproxy::oauth::epoch_seconds(std::time::SystemTime::now())
}

// ---------------------------------------------------------------------------------------
// The token endpoint: every request answered after `latency` with a token named after the
// round and the request's number in it, so a second refresh shows as a second token.
// ---------------------------------------------------------------------------------------

struct Upstream {
    addr: SocketAddr,
    count: Arc<AtomicUsize>,
    label: Arc<Mutex<String>>,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl Upstream {
    fn start(latency: Duration) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        let addr = listener.local_addr().expect("addr");
        let count = Arc::new(AtomicUsize::new(0));
        let label = Arc::new(Mutex::new(String::from("none")));
        let stop = Arc::new(AtomicBool::new(false));
        let accept = {
            let (count, label, stop) = (count.clone(), label.clone(), stop.clone());
            thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let (count, label) = (count.clone(), label.clone());
                    thread::spawn(move || {
                        let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
                        if read_request(&conn).is_none() {
                            return;
                        }
                        let n = count.fetch_add(1, Ordering::SeqCst) + 1;
                        let label = label.lock().unwrap().clone();
                        thread::sleep(latency);
                        let reply = Reply::token(
                            &format!("at-{label}-{n}"),
                            3600,
                            Some(&format!("rt-{label}-{n}")),
                        );
                        let _ = write_reply(conn, &reply);
                    });
                }
            })
        };
        Upstream {
            addr,
            count,
            label,
            stop,
            accept: Some(accept),
        }
    }

    fn url(&self) -> String {
        format!("http://{}/oauth/token", self.addr)
    }

    fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    fn set_label(&self, label: &str) {
        *self.label.lock().unwrap() = label.to_owned();
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------------------
// The servers
// ---------------------------------------------------------------------------------------

struct Store {
    bin: PathBuf,
    url: String,
    key: PathBuf,
}

impl Store {
    /// `credproxy store token set anthropic` with `token` on stdin.
    fn set(&self, token: &Value) {
        let mut child = Command::new(&self.bin)
            .args(["store", "token", "set", "anthropic", "--store", &self.url])
            .arg("--store-key")
            .arg(&self.key)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn store token set");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(token.to_string().as_bytes())
            .expect("write token");
        let out = child.wait_with_output().expect("store token set");
        assert!(
            out.status.success(),
            "store token set failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A running `credproxy serve`: TERM on drop, KILL after 5 s.
struct Server {
    child: Child,
    _stdout: BufReader<ChildStdout>,
    socket: PathBuf,
}

impl Server {
    fn start(store: &Store, profile: &Path, dir: &Path, i: usize) -> Server {
        let sockets = dir.join(format!("sock-{i}"));
        std::fs::create_dir(&sockets).expect("socket dir");
        std::fs::set_permissions(
            &sockets,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .expect("chmod");
        let log = std::fs::File::create(dir.join(format!("serve-{i}.err"))).expect("log");
        let mut child = Command::new(&store.bin)
            .args(["serve", "--store", &store.url])
            .arg("--store-key")
            .arg(&store.key)
            .arg("--profile")
            .arg(profile)
            .arg("--socket-dir")
            .arg(&sockets)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn serve");
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).expect("read serve stdout");
        let Some(path) = line.trim_end().strip_prefix("LLXPRT_CREDENTIAL_SOCKET=") else {
            let _ = child.kill();
            let _ = child.wait();
            let err =
                std::fs::read_to_string(dir.join(format!("serve-{i}.err"))).unwrap_or_default();
            panic!("serve {i} did not start: {line:?}\n{err}");
        };
        Server {
            socket: PathBuf::from(path),
            child,
            _stdout: stdout,
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let pid = Pid::from_raw(self.child.id() as i32);
        let _ = kill(pid, Signal::SIGTERM);
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------
// The storm
// ---------------------------------------------------------------------------------------

/// `requests` get_token over CONNECTIONS connections spread over `sockets`.
fn storm(sockets: &[PathBuf], requests: usize) -> Vec<Answer> {
    let conns = CONNECTIONS.min(requests);
    assert_eq!(
        requests % conns,
        0,
        "REQUESTS must be a multiple of {conns}"
    );
    storm::fire(sockets, conns, requests / conns)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 3 {
        eprintln!(
            "usage: fleet_storm BIN STORE_URL KEYFILE [LATENCY_MS] [REQUESTS] [ROUNDS] [SERVERS]"
        );
        std::process::exit(2);
    }
    let store = Store {
        bin: PathBuf::from(&args[0]),
        url: args[1].clone(),
        key: PathBuf::from(&args[2]),
    };
    let latency_ms: u64 = args.get(3).map_or(100, |a| a.parse().expect("LATENCY_MS"));
    let requests: usize = args.get(4).map_or(300, |a| a.parse().expect("REQUESTS"));
    let rounds: usize = args.get(5).map_or(5, |a| a.parse().expect("ROUNDS"));
    let fleets: Vec<usize> = args.get(6).map_or(vec![1, 3, 10], |a| {
        a.split(',').map(|n| n.parse().expect("SERVERS")).collect()
    });
    let latency = Duration::from_millis(latency_ms);
    println!(
        "upstream latency {latency_ms} ms, {requests} get_token per storm over {} connections, \
         {rounds} rounds per N (answers pooled), {SETTLE_MS} ms after each store",
        CONNECTIONS.min(requests)
    );
    let mut summary = Vec::new();
    for &n in &fleets {
        let upstream = Upstream::start(latency);
        let dir = tempfile::tempdir().expect("tempdir");
        let profile = dir.path().join("profile.toml");
        std::fs::write(
            &profile,
            format!(
                "allow_all = true\nrate_limit = 0\n\n[provider.anthropic]\ntoken_url = \"{}\"\n",
                upstream.url()
            ),
        )
        .expect("profile");
        // A token not due while the servers start.
        store.set(
            &json!({"access_token": "at-start", "refresh_token": "rt-start",
            "expiry": now() + 3600, "token_type": "Bearer"}),
        );
        let servers: Vec<Server> = (0..n)
            .map(|i| Server::start(&store, &profile, dir.path(), i))
            .collect();
        let sockets: Vec<PathBuf> = servers.iter().map(|s| s.socket.clone()).collect();

        let mut storm_lat = Vec::new();
        let mut per_round = Vec::new();
        let mut distinct_max = 0;
        let mut wrong = 0; // answers other than the token the round's first refresh issued
        let mut errors: Vec<String> = Vec::new();
        for round in 1..=rounds {
            let label = format!("n{n}r{round}");
            upstream.set_label(&label);
            store.set(&json!({"access_token": format!("at-old-{label}"),
                "refresh_token": format!("rt-old-{label}"), "expiry": now() - 10,
                "token_type": "Bearer"}));
            thread::sleep(Duration::from_millis(SETTLE_MS));
            let before = upstream.count();
            let answers = storm(&sockets, requests);
            thread::sleep(Duration::from_millis(100));
            let calls = upstream.count() - before;
            let mut tokens: Vec<&str> = answers
                .iter()
                .filter_map(|(_, a)| a.as_ref().ok().map(String::as_str))
                .collect();
            tokens.sort();
            tokens.dedup();
            // The endpoint numbers its answers from its start: the round's first is this.
            let expected = format!("at-{label}-{}", before + 1);
            let off = answers
                .iter()
                .filter(|(_, a)| matches!(a, Ok(t) if *t != expected))
                .count();
            let errs: Vec<String> = answers
                .iter()
                .filter_map(|(_, a)| a.as_ref().err().cloned())
                .collect();
            println!(
                "  N={n} round {round}: upstream {calls}, distinct tokens {:?}, other than {expected}: {off}, errors {}",
                tokens,
                errs.len()
            );
            per_round.push(calls);
            distinct_max = distinct_max.max(tokens.len());
            wrong += off;
            errors.extend(errs);
            storm_lat.extend(answers.iter().map(|(d, _)| *d));
        }
        // The same storm for a token that is not due: no refresh.
        let mut fresh_lat = Vec::new();
        let mut fresh_calls = 0;
        for round in 1..=rounds {
            store.set(&json!({"access_token": format!("at-fresh-{round}"),
                "refresh_token": "rt-fresh", "expiry": now() + 3600, "token_type": "Bearer"}));
            thread::sleep(Duration::from_millis(SETTLE_MS));
            let before = upstream.count();
            let answers = storm(&sockets, requests);
            fresh_calls += upstream.count() - before;
            for (d, a) in &answers {
                match a {
                    Ok(t) if *t == format!("at-fresh-{round}") => {}
                    other => errors.push(format!("fresh round {round}: {other:?}")),
                }
                fresh_lat.push(*d);
            }
        }
        drop(servers);
        storm_lat.sort();
        fresh_lat.sort();
        summary.push((
            n,
            per_round,
            distinct_max,
            wrong,
            errors,
            storm_lat,
            fresh_lat,
            fresh_calls,
        ));
    }
    println!();
    println!(
        "{:>3} {:>18} {:>7} {:>6} {:>6} | {:>8} {:>8} {:>8} | {:>9} {:>9} {:>8}",
        "N",
        "upstream/round",
        "tokens",
        "other",
        "errors",
        "p50 ms",
        "p99 ms",
        "max ms",
        "fresh p50",
        "fresh p99",
        "fresh up"
    );
    for (n, per_round, distinct, wrong, errors, storm_lat, fresh_lat, fresh_calls) in &summary {
        println!(
            "{:>3} {:>18} {:>7} {:>6} {:>6} | {:>8.2} {:>8.2} {:>8.2} | {:>9.3} {:>9.3} {:>8}",
            n,
            format!("{per_round:?}"),
            distinct,
            wrong,
            errors.len(),
            ms(percentile(storm_lat, 0.5)),
            ms(percentile(storm_lat, 0.99)),
            ms(*storm_lat.last().unwrap()),
            ms(percentile(fresh_lat, 0.5)),
            ms(percentile(fresh_lat, 0.99)),
            fresh_calls
        );
        if !errors.is_empty() {
            let mut shown = errors.clone();
            shown.sort();
            shown.dedup();
            println!("    errors: {shown:?}");
        }
    }
}
