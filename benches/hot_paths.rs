//! Micro-benchmarks of the request path's hot pieces: frame decode/encode, request
//! parsing, sanitize/merge, the policy decision, and a full dispatch (one request and its
//! reply over a real socket) against the memory backend.
//!
//! `cargo bench --bench hot_paths`; the figures are recorded in BENCHMARKS.md.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use bytes::BytesMut;
use credproxy::backend::MemoryBackend;
use credproxy::codec::{encode_frame, FrameCodec};
use credproxy::policy::Profile;
use credproxy::protocol::{self, Op, Request};
use credproxy::token::Token;
use credproxy::{Config, Supervisor};
use criterion::{black_box, criterion_group, criterion_main, Criterion};
use serde_json::json;
use tokio_util::codec::{Decoder, Encoder};

const REQUEST: &[u8] =
    br#"{"v":1,"id":"0f8fad5b-d9cb-469f-a165-70867728950e","op":"get_token","payload":{"provider":"anthropic","bucket":"default"}}"#;

fn token() -> Token {
    Token::from_value(json!({
        "access_token": "ya29.a0AfH6SMBx-example-access-token-of-typical-length-0123456789",
        "refresh_token": "1//0example-refresh-token-of-typical-length-0123456789",
        "expiry": 1_900_000_000, "token_type": "Bearer", "scope": "openid email"
    }))
    .expect("token")
}

fn codec(c: &mut Criterion) {
    let frame = encode_frame(REQUEST);
    c.bench_function("frame_decode", |b| {
        b.iter(|| {
            let mut codec = FrameCodec::new();
            let mut buf = BytesMut::from(&frame[..]);
            black_box(codec.decode(&mut buf).expect("decode"))
        })
    });
    c.bench_function("frame_encode", |b| {
        let mut dst = BytesMut::with_capacity(4096);
        b.iter(|| {
            dst.clear();
            FrameCodec::new()
                .encode(REQUEST.to_vec(), &mut dst)
                .expect("encode");
            black_box(dst.len())
        })
    });
}

fn parse(c: &mut Criterion) {
    c.bench_function("request_parse", |b| {
        b.iter(|| {
            let frame = protocol::parse_frame(black_box(REQUEST)).expect("object");
            let env = protocol::parse_envelope(frame).expect("envelope");
            let op = protocol::parse_op(&env.op).expect("op");
            black_box(Request::parse(op, env.payload).expect("payload"))
        })
    });
    c.bench_function("reply_serialize_token", |b| {
        let data = protocol::ReplyData::Token(token().served());
        b.iter(|| {
            black_box(protocol::ok_reply(
                1,
                "0f8fad5b-d9cb-469f-a165-70867728950e",
                &data,
            ))
        })
    });
    let _ = Op::GetToken;
}

fn token_rules(c: &mut Criterion) {
    let stored = token();
    let incoming = Token::from_client(json!({
        "access_token": "new-access", "refresh_token": "dropped", "expiry": 1_900_000_100, "token_type": "Bearer"
    }))
    .expect("incoming");
    c.bench_function("sanitize", |b| b.iter(|| black_box(stored.sanitized())));
    c.bench_function("serve_token", |b| b.iter(|| black_box(stored.served())));
    c.bench_function("merge", |b| b.iter(|| black_box(stored.merge(&incoming))));
}

fn policy(c: &mut Criterion) {
    let mut profile = Profile::default();
    for p in [
        "anthropic",
        "gemini:default,work",
        "openai",
        "qwen",
        "codex:a,b,c",
    ] {
        profile.allow(p).expect("allow");
    }
    c.bench_function("policy_decide", |b| {
        b.iter(|| black_box(profile.decide_token(black_box("gemini"), black_box("work"), false)))
    });
}

fn dispatch(c: &mut Criterion) {
    let backend = MemoryBackend::new();
    backend
        .insert_token("anthropic", "default", token())
        .expect("seed");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = Config::new(Arc::new(backend));
    config.socket_dir = Some(dir.path().to_owned());
    config.profile.allow("anthropic").expect("allow");
    config.limits.rate_limit = 0;
    let handle = Supervisor::start(config).expect("start");
    let mut s = UnixStream::connect(handle.socket_path()).expect("connect");
    let roundtrip = |body: &[u8], s: &mut UnixStream| {
        s.write_all(&encode_frame(body)).expect("write");
        let mut header = [0u8; 4];
        s.read_exact(&mut header).expect("header");
        let mut reply = vec![0u8; u32::from_be_bytes(header) as usize];
        s.read_exact(&mut reply).expect("body");
        reply
    };
    roundtrip(
        br#"{"v":1,"op":"handshake","payload":{"minVersion":1,"maxVersion":1}}"#,
        &mut s,
    );
    c.bench_function("dispatch_get_token_roundtrip", |b| {
        b.iter(|| black_box(roundtrip(REQUEST, &mut s)))
    });
    drop(s);
    handle.shutdown_blocking().expect("shutdown");
}

criterion_group!(benches, codec, parse, token_rules, policy, dispatch);
criterion_main!(benches);
