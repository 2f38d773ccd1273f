//! Fuzz target over the whole request path: the input is a byte stream a sandbox might
//! send. It is decoded in-process (codec + request parsing, split where the first byte
//! says), then written to a live server on a memory store (handshake first when the first
//! byte's low bit is set) and every reply is checked: a frame of at most 65 536 bytes, a
//! JSON object with `v` 1, a known error code on failure, and never the refresh-token
//! canary. Every decoded frame is also parsed twice, by the envelope parser and as a
//! `serde_json::Value`, and the two must agree on every member the rules read.

#![no_main]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, OnceLock};

use bytes::BytesMut;
use credproxy::backend::MemoryBackend;
use credproxy::codec::{FrameCodec, FrameEvent, MAX_FRAME_LEN};

/// One capability token for the whole run: handshakes are checked against it too.
static CAPABILITY: std::sync::LazyLock<credproxy::capability::CapabilityToken> =
    std::sync::LazyLock::new(credproxy::capability::CapabilityToken::generate);
use credproxy::envelope::{self, FrameError, PayloadField, Scalar};
use credproxy::protocol::{self, ErrorCode, Request};
use credproxy::secret::Secret;
use credproxy::token::Token;
use credproxy::{Config, ServerHandle, Supervisor};
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;

const REFRESH_CANARY: &str = "FUZZ-REFRESH-CANARY-7d1e";

struct Server {
    handle: ServerHandle,
    _dir: tempfile::TempDir,
}

fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        let backend = MemoryBackend::new();
        let token = Token::from_value(serde_json::json!({
            "access_token": "fuzz-access", "refresh_token": REFRESH_CANARY,
            "expiry": 1, "token_type": "Bearer"
        }))
        .expect("token");
        backend.insert_token("anthropic", "default", token).expect("seed");
        backend.insert_key("anthropic", Secret::from("fuzz-key")).expect("seed");
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = Config::new(Arc::new(backend));
        config.socket_dir = Some(dir.path().to_owned());
        config.profile.allow("anthropic:default").expect("allow");
        config.profile.allow_key("openai").expect("allow");
        config.limits.rate_limit = 0;
        config.limits.partial_frame_timeout = std::time::Duration::from_millis(200);
        config.limits.handshake_timeout = std::time::Duration::from_millis(200);
        config.limits.close_linger = std::time::Duration::from_millis(50);
        Server { handle: Supervisor::start(config).expect("start"), _dir: dir }
    })
}

fn parse_in_process(data: &[u8], split: usize) {
    let mut codec = FrameCodec::new();
    let mut buf = BytesMut::new();
    let split = split.min(data.len());
    for chunk in [&data[..split], &data[split..]] {
        buf.extend_from_slice(chunk);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(FrameEvent::Frame(body))) => {
                    assert!(body.len() <= MAX_FRAME_LEN);
                    check_frame_agrees(&body);
                    if let Ok(frame) = protocol::parse_frame(&body) {
                        let _ = protocol::negotiate(&frame, None);
                        let _ = protocol::negotiate(&frame, Some(&CAPABILITY.digest()));
                        if let Ok(env) = protocol::parse_envelope(frame) {
                            if let Ok(op) = protocol::parse_op(&env.op) {
                                let _ = Request::parse(op, env.payload);
                            }
                        }
                    }
                }
                Ok(Some(FrameEvent::Started)) => continue,
                Ok(None) | Err(_) => break,
            }
        }
    }
}

/// What a full `serde_json::Value` parse says a member is, in the envelope's terms.
fn scalar_of(v: &serde_json::Value) -> Scalar<'static> {
    match v {
        serde_json::Value::String(s) => Scalar::Str(s.clone().into()),
        serde_json::Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => Scalar::Int(i.into()),
            (None, Some(u)) => Scalar::Int(u.into()),
            _ => Scalar::Other,
        },
        serde_json::Value::Null => Scalar::Null,
        _ => Scalar::Other,
    }
}

/// Differential check: the envelope parser (its scanner or serde_json) reads exactly
/// what a full `Value` parse of the same body holds.
fn check_frame_agrees(body: &[u8]) {
    let reference = serde_json::from_slice::<serde_json::Value>(body);
    match (reference, envelope::parse_frame(body)) {
        (Err(_), Err(FrameError::NotJson)) => {}
        (Ok(v), Err(FrameError::NotObject)) => assert!(!v.is_object()),
        (Ok(serde_json::Value::Object(map)), Ok(mut frame)) => {
            let get = |k: &str| map.get(k).map(scalar_of);
            assert_eq!(frame.v, get("v"));
            assert_eq!(frame.id, get("id"));
            assert_eq!(frame.op, get("op"));
            match (map.get("payload"), frame.payload.as_mut()) {
                (None, None) => {}
                (Some(serde_json::Value::Object(p)), Some(PayloadField::Object(q))) => {
                    let get = |k: &str| p.get(k).map(scalar_of);
                    assert_eq!(q.provider, get("provider"));
                    assert_eq!(q.bucket, get("bucket"));
                    assert_eq!(q.name, get("name"));
                    assert_eq!(q.min_version, get("minVersion"));
                    assert_eq!(q.max_version, get("maxVersion"));
                    assert_eq!(q.take_token().as_ref(), p.get("token"));
                }
                (Some(v), Some(PayloadField::NotObject)) => assert!(!v.is_object()),
                (reference, parsed) => panic!("payload: {reference:?} against {parsed:?}"),
            }
        }
        (reference, parsed) => panic!(
            "{:?}: Value parse {:?}, envelope parse {:?}",
            String::from_utf8_lossy(body),
            reference.map(|_| ()),
            parsed.map(|_| ())
        ),
    }
}

fn check_reply(body: &[u8]) {
    let text = String::from_utf8_lossy(body);
    assert!(!text.contains(REFRESH_CANARY), "refresh token crossed the socket: {text}");
    let v: serde_json::Value = serde_json::from_slice(body).expect("reply is JSON");
    assert_eq!(v["v"], 1, "{text}");
    match v["ok"].as_bool() {
        Some(true) => assert!(v["data"].is_object(), "{text}"),
        Some(false) => {
            let code = v["code"].as_str().expect("code");
            assert!(ErrorCode::parse(code).is_some(), "unknown code {code}");
        }
        None => panic!("reply without ok: {text}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, rest)) = data.split_first() else { return };
    parse_in_process(rest, usize::from(control >> 1) * 8);

    let mut stream = UnixStream::connect(server().handle.socket_path()).expect("connect");
    stream.set_read_timeout(Some(std::time::Duration::from_secs(10))).expect("timeout");
    if control & 1 == 1 {
        let hs = br#"{"v":1,"op":"handshake","payload":{"minVersion":1,"maxVersion":1}}"#;
        let _ = stream.write_all(&(hs.len() as u32).to_be_bytes());
        let _ = stream.write_all(hs);
    }
    let _ = stream.write_all(rest);
    let _ = stream.shutdown(std::net::Shutdown::Write);
    // Read every reply until the server closes: it must close (EOF after our half-close,
    // or a deadline), never hang, and every frame must be well formed.
    let mut all = Vec::new();
    if stream.read_to_end(&mut all).is_err() {
        return; // a reset after a close is fine
    }
    let mut at = 0;
    while at + 4 <= all.len() {
        let len = u32::from_be_bytes([all[at], all[at + 1], all[at + 2], all[at + 3]]) as usize;
        assert!(len <= MAX_FRAME_LEN, "server wrote a frame of {len} bytes");
        assert!(at + 4 + len <= all.len(), "server wrote a torn frame");
        check_reply(&all[at + 4..at + 4 + len]);
        at += 4 + len;
    }
    assert_eq!(at, all.len(), "trailing bytes after the last reply frame");
});
