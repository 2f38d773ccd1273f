//! Property tests: the frame codec against any split of any byte stream, and a live server
//! against any JSON value sent as a request.

mod common;
use common::{allow_all, seeded, short_limits, Raw, TestServer};

use std::cell::RefCell;
use std::time::Duration;

use bytes::BytesMut;
use credproxy::codec::{encode_frame, CodecError, FrameCodec, FrameEvent, MAX_FRAME_LEN};
use credproxy::Limits;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config as ProptestConfig, TestRunner};
use serde_json::{json, Map, Number, Value};
use tokio_util::codec::{Decoder, Encoder};

/// No regression files: this suite writes nothing into the source tree.
fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------------------
// Codec.
// ---------------------------------------------------------------------------------------

/// What feeding a stream to the decoder produced.
#[derive(Debug, PartialEq, Eq)]
struct Decoded {
    /// The frame bodies, in order.
    frames: Vec<Vec<u8>>,
    /// The announced length when the decoder stopped on an oversize header.
    oversize: Option<u32>,
    /// Bytes left in the buffer at the end (a frame not complete yet).
    pending: usize,
}

/// True when `buf` starts with a whole frame of an acceptable length.
fn holds_a_whole_frame(buf: &[u8]) -> bool {
    if buf.len() < 4 {
        return false;
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    len <= MAX_FRAME_LEN && buf.len() >= 4 + len
}

/// The frames a correct decoder finds in `stream` (the reference for the properties).
fn reference(stream: &[u8]) -> Decoded {
    let mut frames = Vec::new();
    let mut at = 0;
    while stream.len() - at >= 4 {
        let len = u32::from_be_bytes([stream[at], stream[at + 1], stream[at + 2], stream[at + 3]]);
        if len as usize > MAX_FRAME_LEN {
            return Decoded {
                frames,
                oversize: Some(len),
                pending: stream.len() - at,
            };
        }
        if stream.len() - at - 4 < len as usize {
            break;
        }
        frames.push(stream[at + 4..at + 4 + len as usize].to_vec());
        at += 4 + len as usize;
    }
    Decoded {
        frames,
        oversize: None,
        pending: stream.len() - at,
    }
}

/// Feeds `stream` to a fresh decoder in chunks ending at `cuts` (then the rest), calling
/// `decode` until it has nothing more after each chunk, and checks the event rules on the
/// way: `Started` only with bytes of an incomplete frame in the buffer, at most once per
/// frame; `None` never while a whole frame is buffered; no error but `Oversize`. At the
/// end (no error) `decode_eof` must be `Ok(None)` on an empty buffer, `Truncated` else.
fn feed(stream: &[u8], cuts: &[usize]) -> Result<Decoded, TestCaseError> {
    let mut points: Vec<usize> = cuts.iter().map(|c| (*c).min(stream.len())).collect();
    points.push(stream.len());
    points.sort_unstable();
    let mut codec = FrameCodec::new();
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    let mut started_for_this_frame = false;
    let mut prev = 0;
    for point in points {
        buf.extend_from_slice(&stream[prev..point]);
        prev = point;
        loop {
            match codec.decode(&mut buf) {
                Ok(None) => {
                    prop_assert!(
                        !holds_a_whole_frame(&buf),
                        "decode waits with a whole frame buffered"
                    );
                    break;
                }
                Ok(Some(FrameEvent::Started)) => {
                    prop_assert!(!buf.is_empty(), "Started with nothing buffered");
                    prop_assert!(
                        !holds_a_whole_frame(&buf),
                        "Started instead of a whole frame"
                    );
                    prop_assert!(!started_for_this_frame, "Started twice for one frame");
                    started_for_this_frame = true;
                }
                Ok(Some(FrameEvent::Frame(body))) => {
                    frames.push(body.to_vec());
                    started_for_this_frame = false;
                }
                Err(CodecError::Oversize(len)) => {
                    prop_assert!(len as usize > MAX_FRAME_LEN, "Oversize({len})");
                    return Ok(Decoded {
                        frames,
                        oversize: Some(len),
                        pending: buf.len(),
                    });
                }
                Err(e) => return Err(TestCaseError::fail(format!("decode error: {e}"))),
            }
        }
    }
    let pending = buf.len();
    match codec.decode_eof(&mut buf) {
        Ok(None) => prop_assert_eq!(pending, 0, "decode_eof accepted a partial frame"),
        Err(CodecError::Truncated) => prop_assert!(pending > 0, "Truncated on an empty buffer"),
        other => {
            return Err(TestCaseError::fail(format!(
                "decode_eof after draining: {other:?}"
            )))
        }
    }
    Ok(Decoded {
        frames,
        oversize: None,
        pending,
    })
}

fn cut_points(len: usize, idx: &[Index]) -> Vec<usize> {
    idx.iter().map(|i| i.index(len + 1)).collect()
}

/// Streams that exercise the decoder: whole frames, random bytes, bare headers near the
/// limit and oversize headers, concatenated.
fn hostile_stream() -> impl Strategy<Value = Vec<u8>> {
    let segment = prop_oneof![
        4 => prop::collection::vec(any::<u8>(), 0..200).prop_map(|b| encode_frame(&b)),
        2 => prop::collection::vec(any::<u8>(), 0..64),
        1 => (0u32..=70_000).prop_map(|n| n.to_be_bytes().to_vec()),
        1 => (65_530u32..=65_540).prop_map(|n| n.to_be_bytes().to_vec()),
        1 => any::<u32>().prop_map(|n| n.to_be_bytes().to_vec()),
        1 => (0u32..8).prop_map(|n| n.to_be_bytes()[..(n % 4) as usize].to_vec()),
    ];
    prop_oneof![
        prop::collection::vec(segment, 0..16).prop_map(|s| {
            let mut v = s.concat();
            v.truncate(4096);
            v
        }),
        prop::collection::vec(any::<u8>(), 0..4096),
    ]
}

proptest! {
    #![proptest_config(config(256))]

    /// Encoded frames, concatenated and split anywhere, decode to exactly those frames.
    #[test]
    fn encoded_frames_split_anywhere_decode_to_the_same_frames(
        bodies in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..=2000), 0..8),
        idx in prop::collection::vec(any::<Index>(), 0..24),
    ) {
        let stream: Vec<u8> = bodies.iter().flat_map(|b| encode_frame(b)).collect();
        let decoded = feed(&stream, &cut_points(stream.len(), &idx))?;
        prop_assert_eq!(decoded, Decoded { frames: bodies, oversize: None, pending: 0 });
    }

    /// The `Encoder` writes exactly what `encode_frame` does.
    #[test]
    fn encoder_matches_encode_frame(body in prop::collection::vec(any::<u8>(), 0..=2000)) {
        let mut dst = BytesMut::new();
        FrameCodec::new().encode(body.clone(), &mut dst).expect("encode");
        prop_assert_eq!(dst.to_vec(), encode_frame(&body));
    }

    /// Any byte stream in any chunks: no panic, and the decoder finds exactly the frames a
    /// reference parser finds, stopping with `Oversize` at the first oversize header.
    #[test]
    fn any_byte_stream_in_any_chunks_decodes_like_the_reference(
        stream in hostile_stream(),
        idx in prop::collection::vec(any::<Index>(), 0..32),
    ) {
        let decoded = feed(&stream, &cut_points(stream.len(), &idx))?;
        let expected = reference(&stream);
        prop_assert_eq!(&decoded.frames, &expected.frames);
        prop_assert_eq!(decoded.oversize, expected.oversize);
        if decoded.oversize.is_none() {
            prop_assert_eq!(decoded.pending, expected.pending);
        }
    }
}

#[test]
fn frames_of_exactly_the_limit_decode_in_any_split_and_one_more_byte_is_refused() {
    let body: Vec<u8> = (0..MAX_FRAME_LEN).map(|i| (i % 251) as u8).collect();
    let mut stream = encode_frame(&body);
    stream.extend(encode_frame(b"{}"));
    stream.extend(encode_frame(&body));
    for cuts in [
        vec![],
        vec![1],
        vec![3, 4, 5],
        vec![MAX_FRAME_LEN + 3, MAX_FRAME_LEN + 4, MAX_FRAME_LEN + 5],
        (0..stream.len()).step_by(997).collect(),
    ] {
        let decoded = feed(&stream, &cuts).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(decoded.frames.len(), 3);
        assert!(decoded.frames[0] == body && decoded.frames[2] == body);
        assert_eq!(decoded.frames[1], b"{}");
    }
    let mut dst = BytesMut::new();
    FrameCodec::new()
        .encode(body.clone(), &mut dst)
        .expect("a body of exactly the limit encodes");
    assert_eq!(dst.len(), MAX_FRAME_LEN + 4);

    let over = vec![b' '; MAX_FRAME_LEN + 1];
    assert!(FrameCodec::new()
        .encode(over.clone(), &mut BytesMut::new())
        .is_err());
    // The decoder refuses as soon as the 4 header bytes are there, before any body.
    let stream = encode_frame(&over);
    let decoded = feed(&stream[..4], &[]).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(decoded.oversize, Some(MAX_FRAME_LEN as u32 + 1));
}

// ---------------------------------------------------------------------------------------
// Any JSON value as a request to a live server.
// ---------------------------------------------------------------------------------------

const OPS: &[&str] = &[
    "get_token",
    "save_token",
    "remove_token",
    "list_providers",
    "list_buckets",
    "get_bucket_stats",
    "get_api_key",
    "list_api_keys",
    "has_api_key",
    "handshake",
    "toString",
    "__proto__",
    "constructor",
    "",
    "GET_TOKEN",
    "get_token\u{0}",
];

const CODES: &[&str] = &[
    "INVALID_REQUEST",
    "UNKNOWN_VERSION",
    "UNAUTHORIZED",
    "FORBIDDEN",
    "NOT_FOUND",
    "RATE_LIMITED",
    "RESOURCE_EXHAUSTED",
    "INTERNAL_ERROR",
];

fn text() -> BoxedStrategy<String> {
    prop_oneof![
        "[a-z0-9._@-]{0,12}",
        ".{0,16}",
        "\\PC{0,8}",
        prop::sample::select(vec![
            "anthropic",
            "gemini",
            "openai",
            "default",
            "work",
            ".",
            "..",
            "a/b",
            "a\u{0}b",
            "\u{430}nthropic",
        ])
        .prop_map(str::to_owned),
        (0usize..3).prop_map(|n| "x".repeat(127 + n)),
    ]
    .boxed()
}

fn number() -> BoxedStrategy<Value> {
    prop_oneof![
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-3i64..3).prop_map(Value::from),
        any::<f64>().prop_filter_map("finite", |f| Number::from_f64(f).map(Value::Number)),
    ]
    .boxed()
}

/// Any JSON value, depth-limited.
fn any_json() -> BoxedStrategy<Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        number(),
        text().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(text(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
    .boxed()
}

/// A value for a name field: mostly strings, some valid, sometimes anything.
fn name_value() -> BoxedStrategy<Value> {
    prop_oneof![
        4 => prop::sample::select(vec!["anthropic", "gemini", "openai", "default", "work", "x@y.z"])
            .prop_map(Value::from),
        2 => text().prop_map(Value::String),
        1 => any_json(),
    ]
    .boxed()
}

/// A token: objects with the token fields of random types, or anything.
fn token_value() -> BoxedStrategy<Value> {
    let field = |values: BoxedStrategy<Value>| prop::option::weighted(0.8, values);
    let object = (
        field(
            prop_oneof![
                3 => "[a-zA-Z0-9._-]{1,24}".prop_map(Value::String),
                1 => text().prop_map(Value::String),
                1 => any_json(),
            ]
            .boxed(),
        ),
        field(prop_oneof![4 => number(), 1 => any_json()].boxed()),
        field(prop_oneof![3 => Just(json!("Bearer")), 1 => any_json()].boxed()),
        field(any_json()),
        field(any_json()),
    )
        .prop_map(|(access, expiry, kind, scope, refresh)| {
            let mut m = Map::new();
            for (k, v) in [
                ("access_token", access),
                ("expiry", expiry),
                ("token_type", kind),
                ("scope", scope),
                ("refresh_token", refresh),
            ] {
                if let Some(v) = v {
                    m.insert(k.to_owned(), v);
                }
            }
            Value::Object(m)
        });
    prop_oneof![4 => object, 1 => any_json()].boxed()
}

fn payload_value() -> BoxedStrategy<Value> {
    let opt = |p: f64, s: BoxedStrategy<Value>| prop::option::weighted(p, s);
    let object = (
        opt(0.85, name_value()),
        opt(0.5, name_value()),
        opt(0.85, name_value()),
        opt(0.7, token_value()),
        prop::collection::btree_map(text(), any_json(), 0..3),
    )
        .prop_map(|(provider, bucket, name, token, extra)| {
            let mut m: Map<String, Value> = extra.into_iter().collect();
            for (k, v) in [
                ("provider", provider),
                ("bucket", bucket),
                ("name", name),
                ("token", token),
            ] {
                if let Some(v) = v {
                    m.insert(k.to_owned(), v);
                }
            }
            Value::Object(m)
        });
    prop_oneof![4 => object, 1 => any_json()].boxed()
}

/// Objects shaped like envelopes (random id, op and payload types, real and junk ops).
fn envelope() -> BoxedStrategy<Value> {
    let id = prop_oneof![
        3 => "[a-zA-Z0-9-]{1,36}".prop_map(Value::String),
        1 => text().prop_map(Value::String),
        1 => number(),
        1 => any_json(),
    ];
    let op = prop_oneof![
        6 => prop::sample::select(&OPS[..9]).prop_map(Value::from),
        2 => prop::sample::select(OPS).prop_map(Value::from),
        1 => any_json(),
    ];
    let v = prop_oneof![Just(json!(1)), any_json()];
    (
        prop::option::weighted(0.9, id),
        prop::option::weighted(0.9, op),
        prop::option::weighted(0.8, payload_value()),
        prop::option::weighted(0.5, v),
        prop::collection::btree_map(text(), any_json(), 0..2),
    )
        .prop_map(|(id, op, payload, v, extra)| {
            let mut m: Map<String, Value> = extra.into_iter().collect();
            for (k, val) in [("id", id), ("op", op), ("payload", payload), ("v", v)] {
                if let Some(val) = val {
                    m.insert(k.to_owned(), val);
                }
            }
            Value::Object(m)
        })
        .boxed()
}

fn request_value() -> BoxedStrategy<Value> {
    prop_oneof![3 => envelope(), 1 => any_json()].boxed()
}

/// The id the server must answer with (§5).
fn expected_id(request: &Map<String, Value>) -> String {
    match request.get("id") {
        Some(Value::String(s)) if !s.is_empty() && s.len() <= 128 => s.clone(),
        Some(Value::Number(n)) if n.is_i64() || n.is_u64() => n.to_string(),
        _ => "unknown".to_owned(),
    }
}

fn keys(v: &Value) -> Vec<&str> {
    let mut k: Vec<&str> = v
        .as_object()
        .map(|o| o.keys().map(String::as_str).collect())
        .unwrap_or_default();
    k.sort_unstable();
    k
}

/// A connection to the shared server, opened again after a close.
struct Conn<'a> {
    server: &'a TestServer,
    raw: Option<Raw>,
    pings: u64,
}

impl Conn<'_> {
    fn raw(&mut self) -> &mut Raw {
        let server = self.server;
        self.raw.get_or_insert_with(|| {
            let raw = server.connect();
            raw.stream
                .set_read_timeout(Some(Duration::from_secs(3)))
                .expect("timeout");
            raw
        })
    }

    /// Sends `request` and checks the outcome (see the test's documentation).
    fn check(&mut self, request: &Value) -> Result<(), TestCaseError> {
        let body = request.to_string();
        prop_assume!(body.len() <= MAX_FRAME_LEN);
        let raw = self.raw();
        raw.send(request);
        let reply = raw.try_recv();
        let Some(reply) = reply else {
            return Err(TestCaseError::fail(format!(
                "closed without a reply to {body}"
            )));
        };
        prop_assert_eq!(&reply["v"], &json!(1), "reply {}", reply);
        let Some(obj) = request.as_object() else {
            // §3: one error frame without id, then a close.
            prop_assert_eq!(
                keys(&reply),
                vec!["code", "error", "ok", "v"],
                "reply {}",
                reply
            );
            prop_assert_eq!(&reply["code"], &json!("INVALID_REQUEST"));
            let closed = raw.try_recv();
            prop_assert!(closed.is_none(), "frame after the §3 error: {:?}", closed);
            self.raw = None;
            return Ok(());
        };
        let id = expected_id(obj);
        prop_assert_eq!(&reply["id"], &json!(id), "reply {} to {}", reply, body);
        match reply["ok"].as_bool() {
            Some(true) => {
                prop_assert_eq!(
                    keys(&reply),
                    vec!["data", "id", "ok", "v"],
                    "reply {}",
                    reply
                );
                prop_assert!(reply["data"].is_object(), "data: {}", reply);
                prop_assert!(
                    id != "unknown" || obj.get("id") == Some(&json!("unknown")),
                    "success without a usable id: {}",
                    reply
                );
                prop_assert!(
                    !reply.to_string().contains("refresh_token"),
                    "refresh token in {}",
                    reply
                );
            }
            Some(false) => {
                prop_assert_eq!(
                    keys(&reply),
                    vec!["code", "error", "id", "ok", "v"],
                    "reply {}",
                    reply
                );
                let code = reply["code"].as_str().unwrap_or_default();
                prop_assert!(CODES.contains(&code), "unknown code in {}", reply);
                prop_assert_ne!(code, "RATE_LIMITED", "rate limit is off: {}", reply);
                prop_assert_ne!(code, "UNKNOWN_VERSION", "handshake only: {}", reply);
                prop_assert!(
                    reply["error"].as_str().is_some_and(|e| !e.is_empty()),
                    "error text: {}",
                    reply
                );
                if id == "unknown" && obj.get("id") != Some(&json!("unknown")) {
                    prop_assert_eq!(code, "INVALID_REQUEST");
                }
            }
            None => return Err(TestCaseError::fail(format!("ok is not a bool: {reply}"))),
        }
        // Exactly one reply: the next frame answers the next request.
        self.pings += 1;
        let ping = format!("ping-{}", self.pings);
        let raw = self.raw();
        raw.send(&json!({"v":1,"id":ping,"op":"list_api_keys"}));
        let pong = raw.try_recv();
        prop_assert!(pong.is_some(), "closed after a reply with an id");
        let pong = pong.unwrap_or_default();
        prop_assert_eq!(&pong["id"], &json!(ping), "extra frame {}", pong);
        prop_assert_eq!(&pong["ok"], &json!(true), "ping {}", pong);
        Ok(())
    }
}

#[test]
fn any_json_request_gets_exactly_one_well_formed_reply_or_the_close_frame() {
    let server = TestServer::start_with(
        allow_all(),
        Limits {
            rate_limit: 0,
            ..short_limits()
        },
        seeded(),
    );
    let conn = RefCell::new(Conn {
        server: &server,
        raw: None,
        pings: 0,
    });
    let mut runner = TestRunner::new(config(256));
    let result = runner.run(&request_value(), |request| {
        conn.borrow_mut().check(&request)
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    // And the server is still fine.
    drop(conn);
    let mut raw = server.connect();
    let reply = raw.call("end", "list_api_keys", json!({}));
    assert_eq!(reply["ok"], json!(true), "{reply}");
}
