//! A real OAuth token endpoint for the tests: an HTTP/1.1 server on 127.0.0.1 (threads,
//! `Connection: close`), scriptable per test.
//!
//! - [`TokenEndpoint::push`] queues the next answers (status, headers, body, a delay before
//!   answering, a body streamed larger than declared); when the queue is empty the server
//!   answers in its default mode.
//! - The default mode is a provider that **rotates** refresh tokens: it accepts only the
//!   refresh token it issued last (or the one it was seeded with), answers it with a new
//!   access token `at-N` and refresh token `rt-N`, and answers any other (an old, already
//!   used one) with `400 invalid_grant`, counting it as a reuse.
//! - Every request is recorded: method, path, headers, body and its parameters (form or
//!   JSON), so a test can check what was sent and that no refresh token went twice.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// One scripted answer.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Wait this long before answering (a slow or hanging endpoint).
    pub delay: Duration,
    /// Stream this many bytes of body with no `Content-Length` (an endless body).
    pub stream: Option<usize>,
}

impl Reply {
    /// `status` with a JSON body.
    pub fn json(status: u16, body: Value) -> Reply {
        Reply {
            status,
            headers: vec![("Content-Type".into(), "application/json".into())],
            body: body.to_string().into_bytes(),
            delay: Duration::ZERO,
            stream: None,
        }
    }

    /// `status` with a raw body.
    pub fn raw(status: u16, body: &[u8]) -> Reply {
        Reply {
            status,
            headers: vec![("Content-Type".into(), "text/plain".into())],
            body: body.to_vec(),
            delay: Duration::ZERO,
            stream: None,
        }
    }

    /// 200 with a token response.
    pub fn token(access: &str, expires_in: u64, refresh: Option<&str>) -> Reply {
        let mut body =
            json!({"access_token": access, "token_type": "Bearer", "expires_in": expires_in});
        if let Some(r) = refresh {
            body["refresh_token"] = json!(r);
        }
        Reply::json(200, body)
    }

    /// An OAuth error answer: `{"error": code, "error_description": description}`.
    pub fn error(status: u16, code: &str, description: &str) -> Reply {
        Reply::json(
            status,
            json!({"error": code, "error_description": description}),
        )
    }

    /// The same answer after `delay`.
    pub fn after(mut self, delay: Duration) -> Reply {
        self.delay = delay;
        self
    }

    /// The same answer with one more header.
    pub fn header(mut self, name: &str, value: &str) -> Reply {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// 200 whose body is `len` bytes streamed with no declared length.
    pub fn endless(len: usize) -> Reply {
        Reply {
            stream: Some(len),
            ..Reply::raw(200, b"")
        }
    }
}

/// One request as the endpoint received it.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The parameters of a form or JSON body, in order.
    pub params: Vec<(String, String)>,
}

impl Received {
    /// The parameter `name`.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Default)]
struct State {
    queue: VecDeque<Reply>,
    received: Vec<Received>,
    /// The refresh token the rotating mode accepts next.
    current: Option<String>,
    issued: u64,
    reused: u64,
    /// Lifetime of the tokens the rotating mode issues.
    expires_in: u64,
}

/// A running token endpoint; stopped when dropped.
pub struct TokenEndpoint {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl TokenEndpoint {
    /// Starts an endpoint on 127.0.0.1 whose rotating mode accepts `first_refresh`.
    pub fn start(first_refresh: &str) -> TokenEndpoint {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(Mutex::new(State {
            current: Some(first_refresh.to_owned()),
            expires_in: 3600,
            ..State::default()
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let accept = {
            let state = state.clone();
            let stop = stop.clone();
            thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let state = state.clone();
                    let stop = stop.clone();
                    thread::spawn(move || serve(conn, &state, &stop));
                }
            })
        };
        TokenEndpoint {
            addr,
            state,
            stop,
            accept: Some(accept),
        }
    }

    /// `http://127.0.0.1:PORT/oauth/token`.
    pub fn url(&self) -> String {
        format!("http://{}/oauth/token", self.addr)
    }

    /// Queues answers, used before the rotating mode.
    pub fn push(&self, replies: impl IntoIterator<Item = Reply>) {
        self.state.lock().unwrap().queue.extend(replies);
    }

    /// Sets the lifetime (`expires_in`) of the tokens the rotating mode issues.
    pub fn set_expires_in(&self, seconds: u64) {
        self.state.lock().unwrap().expires_in = seconds;
    }

    /// Every request received so far.
    pub fn received(&self) -> Vec<Received> {
        self.state.lock().unwrap().received.clone()
    }

    /// How many requests arrived.
    pub fn count(&self) -> usize {
        self.state.lock().unwrap().received.len()
    }

    /// How many requests carried a refresh token that had already been used.
    pub fn reused(&self) -> u64 {
        self.state.lock().unwrap().reused
    }

    /// Waits up to `limit` for `n` requests; returns how many arrived.
    pub fn wait_for(&self, n: usize, limit: Duration) -> usize {
        let end = Instant::now() + limit;
        loop {
            let count = self.count();
            if count >= n || Instant::now() >= end {
                return count;
            }
            thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for TokenEndpoint {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

fn serve(conn: TcpStream, state: &Mutex<State>, stop: &AtomicBool) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
    let Some(request) = read_request(&conn) else {
        return;
    };
    let reply = {
        let mut st = state.lock().unwrap();
        st.received.push(request.clone());
        match st.queue.pop_front() {
            Some(reply) => reply,
            None => rotate(&mut st, request.param("refresh_token")),
        }
    };
    // A delay that a stopping endpoint cuts short.
    let end = Instant::now() + reply.delay;
    while Instant::now() < end {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        thread::sleep(Duration::from_millis(10).min(end - Instant::now()));
    }
    let _ = write_reply(conn, &reply);
}

/// The rotating provider.
fn rotate(st: &mut State, refresh: Option<&str>) -> Reply {
    match (refresh, st.current.as_deref()) {
        (Some(got), Some(current)) if got == current => {
            st.issued += 1;
            let n = st.issued;
            st.current = Some(format!("rt-{n}"));
            Reply::token(&format!("at-{n}"), st.expires_in, Some(&format!("rt-{n}")))
        }
        _ => {
            st.reused += 1;
            Reply::error(400, "invalid_grant", "refresh token already used")
        }
    }
}

pub fn read_request(conn: &TcpStream) -> Option<Received> {
    let mut reader = BufReader::new(conn);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_owned();
    let path = parts.next()?.to_owned();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).ok()? == 0 {
            return None;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':')?;
        headers.push((k.trim().to_owned(), v.trim().to_owned()));
    }
    let len = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse::<usize>().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    reader.read_exact(&mut body).ok()?;
    let json_body = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("content-type") && v.contains("json"));
    let params = if json_body {
        match serde_json::from_slice::<Value>(&body) {
            Ok(Value::Object(map)) => map
                .into_iter()
                .map(|(k, v)| (k, v.as_str().map(str::to_owned).unwrap_or(v.to_string())))
                .collect(),
            _ => Vec::new(),
        }
    } else {
        form_urlencoded::parse(&body)
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect()
    };
    Some(Received {
        method,
        path,
        headers,
        body,
        params,
    })
}

pub fn write_reply(mut conn: TcpStream, reply: &Reply) -> std::io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {} Scripted\r\nConnection: close\r\n",
        reply.status
    );
    for (k, v) in &reply.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if reply.stream.is_none() {
        head.push_str(&format!("Content-Length: {}\r\n", reply.body.len()));
    }
    head.push_str("\r\n");
    conn.write_all(head.as_bytes())?;
    match reply.stream {
        None => conn.write_all(&reply.body)?,
        Some(len) => {
            let chunk = vec![b'x'; 16 * 1024];
            let mut sent = 0;
            while sent < len {
                let n = chunk.len().min(len - sent);
                conn.write_all(&chunk[..n])?;
                sent += n;
            }
        }
    }
    conn.flush()
}
