//! A catalogue of malformed and hostile traffic over a real socket (PROTOCOL.md §3 to §9).
//!
//! Every case of the tables below is a name, the bytes a hostile client sends (after a
//! completed handshake, or as the very first bytes of a connection for the cases about the
//! first frame) and the outcome PROTOCOL.md prescribes. For every case the runner also
//! checks that
//! - the server still serves a fresh connection afterwards (handshake + `get_token`), and
//! - the store, a file store seeded before the server started, is byte-for-byte unchanged
//!   (every file and directory under it, with its mode).
//!
//! The runner goes through a whole table and reports every failing case by name at once.
//! The floods (thousands of frames in one write, a reconnect storm, handshake spam, idle
//! connections) are separate tests under the same two checks.

mod common;
use common::{
    allow_all, assert_err, assert_malformed_frame_reply, frame, short_limits, token, Raw,
    REPLY_WAIT,
};

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use credproxy::backend::{Backend, FileBackend, SaveMode};
use credproxy::policy::Profile;
use credproxy::secret::Secret;
use credproxy::supervisor::SessionCount;
use credproxy::{Config, Limits, ServerHandle, Supervisor};
use serde_json::{json, Value};

// ---------------------------------------------------------------------------------------
// The server under attack: a file store seeded before start, and the two global checks.
// ---------------------------------------------------------------------------------------

/// Which profile a case runs under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Prof {
    /// Everything allowed.
    AllowAll,
    /// Only the provider `anthropic` (every bucket) and the API key `anthropic`.
    OnlyAnthropic,
    /// Everything allowed, read-only.
    ReadOnly,
}

impl Prof {
    fn profile(self) -> Profile {
        match self {
            Prof::AllowAll => allow_all(),
            Prof::OnlyAnthropic => {
                let mut p = Profile::default();
                p.allow("anthropic").expect("allow anthropic");
                p
            }
            Prof::ReadOnly => Profile {
                read_only: true,
                ..allow_all()
            },
        }
    }
}

/// Every file and directory under the store: relative path → (mode, bytes; `None` for a
/// directory, the link target for a symlink).
type Snapshot = BTreeMap<PathBuf, (u32, Option<Vec<u8>>)>;

fn snapshot(root: &Path) -> Snapshot {
    fn walk(root: &Path, dir: &Path, out: &mut Snapshot) {
        for entry in fs::read_dir(dir).expect("read store dir") {
            let path = entry.expect("dir entry").path();
            let meta = fs::symlink_metadata(&path).expect("stat store entry");
            let rel = path.strip_prefix(root).expect("under root").to_owned();
            let mode = meta.permissions().mode();
            if meta.file_type().is_symlink() {
                let target = fs::read_link(&path).expect("read link");
                out.insert(
                    rel,
                    (mode, Some(target.into_os_string().into_encoded_bytes())),
                );
            } else if meta.is_dir() {
                out.insert(rel, (mode, None));
                walk(root, &path, out);
            } else {
                out.insert(rel, (mode, Some(fs::read(&path).expect("read store file"))));
            }
        }
    }
    let mut out = Snapshot::new();
    walk(root, root, &mut out);
    out
}

/// Names the entries that differ between two snapshots (never their content).
fn assert_same_store(before: &Snapshot, after: &Snapshot, when: &str) {
    if before == after {
        return;
    }
    let mut diffs = Vec::new();
    for (path, entry) in before {
        match after.get(path) {
            None => diffs.push(format!("removed {}", path.display())),
            Some(other) if other != entry => diffs.push(format!("changed {}", path.display())),
            Some(_) => {}
        }
    }
    for path in after.keys().filter(|p| !before.contains_key(*p)) {
        diffs.push(format!("added {}", path.display()));
    }
    panic!("the store changed {when}: {}", diffs.join(", "));
}

/// The sanitized `anthropic:default` token as the server serves it.
fn anthropic_default() -> Value {
    json!({"access_token":"at-anthropic-default","expiry":1_900_000_000,"token_type":"Bearer","scope":null})
}

/// A running server over a seeded file store.
struct Harness {
    handle: Option<ServerHandle>,
    path: PathBuf,
    store_dir: PathBuf,
    _socket_dir: tempfile::TempDir,
    _store_root: tempfile::TempDir,
    rt: tokio::runtime::Runtime,
}

impl Harness {
    fn start(prof: Prof) -> Harness {
        Harness::start_with(prof, short_limits())
    }

    fn start_with(prof: Prof, limits: Limits) -> Harness {
        let store_root = tempfile::tempdir().expect("tempdir");
        let store_dir = store_root.path().join("store");
        let backend = FileBackend::open(&store_dir).expect("open file store");
        for (provider, bucket) in [
            ("anthropic", "default"),
            ("anthropic", "work"),
            ("gemini", "default"),
        ] {
            let t = token(
                &format!("at-{provider}-{bucket}"),
                Some(&format!("rt-{provider}-{bucket}")),
            );
            backend
                .save_token(provider, bucket, &t, SaveMode::Replace)
                .expect("seed token");
        }
        backend
            .set_key("anthropic", &Secret::from("sk-anthropic"))
            .expect("seed key");
        backend
            .set_key("openai", &Secret::from("sk-openai"))
            .expect("seed key");
        let socket_dir = tempfile::tempdir().expect("tempdir");
        let mut config = Config::new(Arc::new(backend));
        common::offline(&mut config);
        config.socket_dir = Some(socket_dir.path().to_owned());
        config.profile = prof.profile();
        config.limits = limits;
        let handle = Supervisor::start(config).expect("server starts");
        let path = handle.socket_path().to_owned();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        Harness {
            handle: Some(handle),
            path,
            store_dir,
            _socket_dir: socket_dir,
            _store_root: store_root,
            rt,
        }
    }

    fn snapshot(&self) -> Snapshot {
        snapshot(&self.store_dir)
    }

    /// A connection with the handshake done.
    fn connect(&self) -> Raw {
        let mut raw = Raw::connect(&self.path);
        raw.handshake();
        raw
    }

    /// Check (a): a fresh connection gets through the handshake and a `get_token`.
    fn assert_serves(&self) {
        let mut raw = self.connect();
        let reply = raw.call("fresh", "get_token", json!({"provider":"anthropic"}));
        assert_eq!(
            reply,
            json!({"v":1,"id":"fresh","ok":true,"data":anthropic_default()}),
            "a fresh connection is not served"
        );
    }

    /// Open sessions, as the supervisor counts them.
    fn sessions(&self) -> usize {
        let addr = self.handle.as_ref().expect("running").addr().clone();
        self.rt
            .block_on(addr.send(SessionCount))
            .expect("supervisor answers")
    }

    /// Waits until every session has ended (a hostile connection must not leak one).
    fn wait_no_sessions(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let n = self.sessions();
            if n == 0 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{n} sessions still open {within:?} after every client closed"
            );
            thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            let _ = handle.shutdown_blocking();
        }
    }
}

// ---------------------------------------------------------------------------------------
// Cases.
// ---------------------------------------------------------------------------------------

/// What PROTOCOL.md says must happen.
#[derive(Debug, Clone)]
enum Expect {
    /// One error reply `{"v":1,"id":id,"ok":false,"code":code,"error":...}` (the error
    /// containing `msg` when given); the connection stays open and the next frame on it
    /// answers the next request (so there was exactly one reply).
    Reply {
        id: String,
        code: &'static str,
        msg: Option<String>,
    },
    /// One success reply for `id` with `data` (when given); the connection stays open.
    Ok { id: String, data: Option<Value> },
    /// The handshake success reply for this version; the connection stays open.
    HandshakeOk(i64),
    /// The §3 error frame (`v`, `ok`, `code` INVALID_REQUEST, `error`; no `id`), then EOF.
    ErrorThenClose,
    /// The §4 handshake error frame, exactly, then EOF.
    HandshakeErrorThenClose {
        code: &'static str,
        error: &'static str,
    },
    /// EOF without any frame.
    Close,
}

#[derive(Debug, Clone)]
struct Case {
    name: String,
    prof: Prof,
    /// The bytes go out as the first bytes of the connection (no handshake before).
    first: bool,
    bytes: Vec<u8>,
    expect: Expect,
}

fn case(name: impl Into<String>, bytes: Vec<u8>, expect: Expect) -> Case {
    Case {
        name: name.into(),
        prof: Prof::AllowAll,
        first: false,
        bytes,
        expect,
    }
}

fn first(name: impl Into<String>, bytes: Vec<u8>, expect: Expect) -> Case {
    Case {
        first: true,
        ..case(name, bytes, expect)
    }
}

fn under(prof: Prof, c: Case) -> Case {
    Case { prof, ..c }
}

fn err(id: &str, code: &'static str) -> Expect {
    Expect::Reply {
        id: id.to_owned(),
        code,
        msg: None,
    }
}

fn err_msg(id: &str, code: &'static str, msg: &str) -> Expect {
    Expect::Reply {
        id: id.to_owned(),
        code,
        msg: Some(msg.to_owned()),
    }
}

fn invalid(id: &str) -> Expect {
    err(id, "INVALID_REQUEST")
}

fn ok_data(id: &str, data: Value) -> Expect {
    Expect::Ok {
        id: id.to_owned(),
        data: Some(data),
    }
}

fn handshake_error(code: &'static str, error: &'static str) -> Expect {
    Expect::HandshakeErrorThenClose { code, error }
}

/// A frame with a raw body.
fn body(text: impl AsRef<[u8]>) -> Vec<u8> {
    frame(text.as_ref())
}

/// A frame with a JSON request.
fn req(id: impl Into<Value>, op: &str, payload: Value) -> Vec<u8> {
    let v = json!({"v":1,"id":id.into(),"op":op,"payload":payload});
    frame(v.to_string().as_bytes())
}

fn json_frame(v: Value) -> Vec<u8> {
    frame(v.to_string().as_bytes())
}

fn header(len: u32) -> Vec<u8> {
    len.to_be_bytes().to_vec()
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

fn get_anthropic(id: impl Into<Value>) -> Vec<u8> {
    req(id, "get_token", json!({"provider":"anthropic"}))
}

fn valid_token(access: &str) -> Value {
    json!({"access_token":access,"expiry":2_000_000_000,"token_type":"Bearer","scope":"s"})
}

const HANDSHAKE: &str = r#"{"v":1,"op":"handshake","payload":{"minVersion":1,"maxVersion":1}}"#;
const GET: &str = r#""op":"get_token","payload":{"provider":"anthropic"}"#;

fn framing_cases() -> Vec<Case> {
    let nested_arrays = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
    let nested_objects = |n: usize| format!("{}1{}", "{\"a\":".repeat(n), "}".repeat(n));
    vec![
        // Oversize headers: the stream cannot be resynchronised, so a silent close (§3).
        case("header_65537_closes", header(65_537), Expect::Close),
        case("header_2pow31_closes", header(1 << 31), Expect::Close),
        case("header_u32_max_closes", header(u32::MAX), Expect::Close),
        case(
            "header_near_u32_max_with_short_body_closes",
            cat(&[&header(u32::MAX - 15), b"{}"]),
            Expect::Close,
        ),
        case(
            "header_u32_max_with_a_valid_request_body_is_not_executed",
            cat(&[
                &header(u32::MAX),
                br#"{"v":1,"id":"x","op":"remove_token","payload":{"provider":"anthropic"}}"#,
            ]),
            Expect::Close,
        ),
        case(
            "header_65537_followed_by_65537_bytes_closes",
            cat(&[&header(65_537), &vec![b' '; 65_537]]),
            Expect::Close,
        ),
        first(
            "header_65537_before_handshake_closes",
            header(65_537),
            Expect::Close,
        ),
        first(
            "header_u32_max_before_handshake_closes",
            header(u32::MAX),
            Expect::Close,
        ),
        // Partial frames: closed at the partial-frame deadline, silently.
        case(
            "header_65536_with_short_body_then_silence_closes",
            cat(&[&header(65_536), b"{\"id\":"]),
            Expect::Close,
        ),
        case(
            "two_header_bytes_then_silence_closes",
            vec![0, 0],
            Expect::Close,
        ),
        first(
            "one_byte_then_silence_before_handshake_closes",
            vec![0],
            Expect::Close,
        ),
        // Bodies that are not a JSON object: the §3 error frame, then a close.
        case("zero_length_body", body(""), Expect::ErrorThenClose),
        first(
            "zero_length_body_before_handshake",
            body(""),
            Expect::ErrorThenClose,
        ),
        case(
            "body_not_utf8",
            body([0xff, 0xfe, 0xfd]),
            Expect::ErrorThenClose,
        ),
        case(
            "body_invalid_utf8_inside_a_string",
            body(b"{\"v\":1,\"id\":\"\xc3\x28\",\"op\":\"list_providers\"}"),
            Expect::ErrorThenClose,
        ),
        case("body_not_json", body("hello"), Expect::ErrorThenClose),
        case(
            "body_truncated_json",
            body(r#"{"v":1,"id":"t","op":"get_token","payload":{"#),
            Expect::ErrorThenClose,
        ),
        case("body_json_null", body("null"), Expect::ErrorThenClose),
        case("body_json_array", body("[]"), Expect::ErrorThenClose),
        case(
            "body_json_array_of_requests",
            body(format!(r#"[{{"v":1,"id":"a",{GET}}}]"#)),
            Expect::ErrorThenClose,
        ),
        case("body_json_number", body("42"), Expect::ErrorThenClose),
        case(
            "body_json_string",
            body(r#""get_token""#),
            Expect::ErrorThenClose,
        ),
        case("body_json_true", body("true"), Expect::ErrorThenClose),
        first(
            "body_json_array_before_handshake",
            body("[]"),
            Expect::ErrorThenClose,
        ),
        first(
            "body_not_json_before_handshake",
            body("hello"),
            Expect::ErrorThenClose,
        ),
        // serde_json refuses nesting deeper than 128: the body is then "not valid JSON" to
        // the server; what matters is no stack overflow and the §3 close.
        case(
            "body_10000_nested_arrays",
            body(nested_arrays(10_000)),
            Expect::ErrorThenClose,
        ),
        case(
            "body_10000_nested_objects",
            body(nested_objects(10_000)),
            Expect::ErrorThenClose,
        ),
        case(
            "payload_field_10000_nested_arrays",
            body(format!(
                r#"{{"v":1,"id":"deep","op":"get_token","payload":{{"provider":"anthropic","x":{}}}}}"#,
                nested_arrays(10_000)
            )),
            Expect::ErrorThenClose,
        ),
        case(
            "payload_field_100_nested_arrays_is_ignored",
            body(format!(
                r#"{{"v":1,"id":"deep100","op":"get_token","payload":{{"provider":"anthropic","x":{}}}}}"#,
                nested_arrays(100)
            )),
            ok_data("deep100", anthropic_default()),
        ),
        case(
            "unclosed_10000_nested_arrays",
            body("[".repeat(10_000)),
            Expect::ErrorThenClose,
        ),
        case(
            "raw_nul_between_fields",
            body(format!("{{\"v\":1,\"id\":\"n\",\0{GET}}}")),
            Expect::ErrorThenClose,
        ),
        case(
            "raw_nul_inside_a_string",
            body(format!("{{\"v\":1,\"id\":\"a\0b\",{GET}}}")),
            Expect::ErrorThenClose,
        ),
        case(
            "body_all_nul_bytes",
            body([0u8; 64]),
            Expect::ErrorThenClose,
        ),
        case(
            "trailing_garbage_after_the_object",
            body(format!(r#"{{"v":1,"id":"tg",{GET}}}xyz"#)),
            Expect::ErrorThenClose,
        ),
        case(
            "two_objects_in_one_body",
            body(format!(
                r#"{{"v":1,"id":"o1",{GET}}}{{"v":1,"id":"o2",{GET}}}"#
            )),
            Expect::ErrorThenClose,
        ),
        case(
            "trailing_whitespace_is_fine",
            body(format!("{{\"v\":1,\"id\":\"ws\",{GET}}} \n\t\r")),
            ok_data("ws", anthropic_default()),
        ),
        case(
            "utf8_bom_before_the_object",
            body(format!("\u{feff}{{\"v\":1,\"id\":\"bom\",{GET}}}")),
            Expect::ErrorThenClose,
        ),
        case(
            "lone_surrogate_escape_in_id",
            body(format!(r#"{{"v":1,"id":"\ud800",{GET}}}"#)),
            Expect::ErrorThenClose,
        ),
        case(
            "comment_inside_the_object",
            body(format!(r#"{{"v":1,"id":"c" /* hi */,{GET}}}"#)),
            Expect::ErrorThenClose,
        ),
        case(
            "single_quoted_json",
            body("{'v':1,'id':'sq','op':'list_providers'}"),
            Expect::ErrorThenClose,
        ),
        case(
            "nan_literal",
            body(format!(r#"{{"v":NaN,"id":"nan",{GET}}}"#)),
            Expect::ErrorThenClose,
        ),
        // Escaped NUL is valid JSON and a valid id (non-empty, at most 128 bytes): echoed.
        case(
            "escaped_nul_in_id_is_echoed",
            body(format!(r#"{{"v":1,"id":"a\u0000b",{GET}}}"#)),
            ok_data("a\u{0}b", anthropic_default()),
        ),
        case(
            "escaped_nul_in_provider",
            body(r#"{"v":1,"id":"np","op":"get_token","payload":{"provider":"anthropic\u0000"}}"#),
            invalid("np"),
        ),
        // Huge strings (60 KB) inside a frame that is still under the limit.
        case(
            "huge_string_in_an_ignored_payload_field",
            req(
                "huge-pad",
                "get_token",
                json!({"provider":"anthropic","pad":"x".repeat(60_000)}),
            ),
            ok_data("huge-pad", anthropic_default()),
        ),
        case(
            "huge_string_as_provider",
            req(
                "huge-p",
                "get_token",
                json!({"provider":"a".repeat(60_000)}),
            ),
            invalid("huge-p"),
        ),
        case(
            "huge_string_as_id",
            req(
                "i".repeat(60_000),
                "get_token",
                json!({"provider":"anthropic"}),
            ),
            invalid("unknown"),
        ),
        case(
            "huge_string_as_access_token",
            req(
                "huge-at",
                "save_token",
                json!({"provider":"anthropic","token":{"access_token":"a".repeat(60_000),"expiry":"x","token_type":"Bearer"}}),
            ),
            invalid("huge-at"),
        ),
        case(
            "huge_op_name_near_the_frame_limit",
            req("huge-op", &"o".repeat(65_000), json!({})),
            err_msg("huge-op", "INVALID_REQUEST", "unknown operation: oooo"),
        ),
        case(
            "body_of_exactly_65536_bytes",
            {
                let mut b = format!(r#"{{"v":1,"id":"max",{GET}}}"#).into_bytes();
                b.resize(65_536, b' ');
                body(b)
            },
            ok_data("max", anthropic_default()),
        ),
        // Duplicate keys: serde_json keeps the LAST value of a repeated key; the server
        // answers once, as if only the last occurrence had been sent.
        case(
            "duplicate_id_keys_last_wins",
            body(format!(r#"{{"v":1,"id":"1","id":"2",{GET}}}"#)),
            ok_data("2", anthropic_default()),
        ),
        case(
            "duplicate_id_keys_valid_then_invalid",
            body(format!(r#"{{"v":1,"id":"good","id":null,{GET}}}"#)),
            invalid("unknown"),
        ),
        case(
            "duplicate_op_keys_last_wins",
            body(
                r#"{"v":1,"id":"dop","op":"remove_token","op":"get_token","payload":{"provider":"anthropic"}}"#,
            ),
            ok_data("dop", anthropic_default()),
        ),
        under(
            Prof::ReadOnly,
            case(
                "duplicate_op_keys_get_then_save_is_a_save",
                body(format!(
                    r#"{{"v":1,"id":"dsave","op":"get_token","op":"save_token","payload":{{"provider":"anthropic","token":{}}}}}"#,
                    valid_token("at-dup")
                )),
                err("dsave", "FORBIDDEN"),
            ),
        ),
        under(
            Prof::OnlyAnthropic,
            case(
                "duplicate_provider_keys_last_wins_allowed",
                body(
                    r#"{"v":1,"id":"dp1","op":"get_token","payload":{"provider":"gemini","provider":"anthropic"}}"#,
                ),
                ok_data("dp1", anthropic_default()),
            ),
        ),
        under(
            Prof::OnlyAnthropic,
            case(
                "duplicate_provider_keys_last_wins_refused",
                body(
                    r#"{"v":1,"id":"dp2","op":"get_token","payload":{"provider":"anthropic","provider":"gemini"}}"#,
                ),
                err_msg("dp2", "UNAUTHORIZED", "UNAUTHORIZED: "),
            ),
        ),
        case(
            "duplicate_payload_keys_last_wins",
            body(
                r#"{"v":1,"id":"dpl","op":"get_token","payload":[],"payload":{"provider":"anthropic"}}"#,
            ),
            ok_data("dpl", anthropic_default()),
        ),
    ]
}

fn handshake_cases() -> Vec<Case> {
    let required = || handshake_error("INVALID_REQUEST", "handshake required");
    let version = || handshake_error("UNKNOWN_VERSION", "unsupported protocol version");
    vec![
        first("first_frame_get_token", get_anthropic("g"), required()),
        first(
            "first_frame_save_token_is_not_executed",
            req(
                "s",
                "save_token",
                json!({"provider":"anthropic","token":valid_token("at-evil")}),
            ),
            required(),
        ),
        first(
            "first_frame_remove_token_is_not_executed",
            req("r", "remove_token", json!({"provider":"anthropic"})),
            required(),
        ),
        first(
            "first_frame_handshake_capitalised",
            body(r#"{"v":1,"op":"Handshake","payload":{"minVersion":1,"maxVersion":1}}"#),
            required(),
        ),
        first(
            "first_frame_handshake_with_nul",
            body(r#"{"v":1,"op":"handshake\u0000","payload":{"minVersion":1,"maxVersion":1}}"#),
            required(),
        ),
        first(
            "first_frame_op_missing",
            body(r#"{"v":1,"payload":{"minVersion":1,"maxVersion":1}}"#),
            required(),
        ),
        first(
            "first_frame_op_array",
            body(r#"{"v":1,"op":["handshake"],"payload":{"minVersion":1,"maxVersion":1}}"#),
            required(),
        ),
        first("first_frame_empty_object", body("{}"), required()),
        first(
            "handshake_versions_2_to_3",
            body(r#"{"v":1,"op":"handshake","payload":{"minVersion":2,"maxVersion":3}}"#),
            Expect::HandshakeOk(2),
        ),
        first(
            "handshake_versions_3_to_4",
            body(r#"{"v":1,"op":"handshake","payload":{"minVersion":3,"maxVersion":4}}"#),
            version(),
        ),
        first(
            "handshake_min_above_max",
            body(r#"{"v":1,"op":"handshake","payload":{"minVersion":1,"maxVersion":0}}"#),
            version(),
        ),
        first(
            "handshake_versions_as_strings",
            body(r#"{"v":1,"op":"handshake","payload":{"minVersion":"1","maxVersion":"1"}}"#),
            version(),
        ),
        first(
            "handshake_versions_as_floats",
            body(r#"{"v":1,"op":"handshake","payload":{"minVersion":0.5,"maxVersion":1.5}}"#),
            version(),
        ),
        first(
            "handshake_v_string_without_versions",
            body(r#"{"v":"1","op":"handshake"}"#),
            version(),
        ),
        first(
            "handshake_v_null_without_versions",
            body(r#"{"v":null,"op":"handshake","payload":{}}"#),
            version(),
        ),
        first(
            "handshake_min_huge_negative_max_1",
            body(
                r#"{"v":1,"op":"handshake","payload":{"minVersion":-9223372036854775808,"maxVersion":1}}"#,
            ),
            Expect::HandshakeOk(1),
        ),
        // §4: "both integers with min <= max": u64::MAX is an integer, so version 1 is in
        // [1, u64::MAX] and must be agreed.
        first(
            "handshake_max_version_u64_max",
            body(
                r#"{"v":1,"op":"handshake","payload":{"minVersion":1,"maxVersion":18446744073709551615}}"#,
            ),
            Expect::HandshakeOk(2),
        ),
        first(
            "handshake_payload_array_falls_back_to_v",
            body(r#"{"v":1,"op":"handshake","payload":[1,1]}"#),
            Expect::HandshakeOk(1),
        ),
        first(
            "handshake_with_huge_ignored_field",
            json_frame(
                json!({"v":1,"op":"handshake","payload":{"minVersion":1,"maxVersion":1},"pad":"p".repeat(60_000)}),
            ),
            Expect::HandshakeOk(1),
        ),
    ]
}

fn envelope_cases() -> Vec<Case> {
    let get = |id: Value| get_anthropic(id);
    let with_op = |op: Value| json_frame(json!({"v":1,"id":"op","op":op,"payload":{}}));
    let with_payload = |p: Value| json_frame(json!({"v":1,"id":"pl","op":"get_token","payload":p}));
    let unknown_op = |shown: &str| {
        err_msg(
            "op",
            "INVALID_REQUEST",
            &format!("unknown operation: {shown}"),
        )
    };
    vec![
        // id types (§5): string of 1..=128 bytes or an integer; else "unknown".
        case("id_null", get(Value::Null), invalid("unknown")),
        case("id_true", get(json!(true)), invalid("unknown")),
        case("id_false", get(json!(false)), invalid("unknown")),
        case("id_float", get(json!(1.5)), invalid("unknown")),
        case(
            "id_float_integral",
            body(format!(r#"{{"v":1,"id":2.0,{GET}}}"#)),
            invalid("unknown"),
        ),
        case(
            "id_exponent",
            body(format!(r#"{{"v":1,"id":1e2,{GET}}}"#)),
            invalid("unknown"),
        ),
        case("id_object", get(json!({"id":"x"})), invalid("unknown")),
        case("id_array", get(json!(["x"])), invalid("unknown")),
        case(
            "id_missing",
            json_frame(json!({"v":1,"op":"get_token","payload":{"provider":"anthropic"}})),
            invalid("unknown"),
        ),
        case(
            "id_negative_int",
            get(json!(-42)),
            ok_data("-42", anthropic_default()),
        ),
        case("id_zero", get(json!(0)), ok_data("0", anthropic_default())),
        case(
            "id_i64_min",
            get(json!(i64::MIN)),
            ok_data(&i64::MIN.to_string(), anthropic_default()),
        ),
        case(
            "id_u64_max",
            get(json!(u64::MAX)),
            ok_data(&u64::MAX.to_string(), anthropic_default()),
        ),
        // Beyond u64 serde_json reads a float: refused, since it cannot be echoed exactly.
        case(
            "id_beyond_u64",
            body(format!(r#"{{"v":1,"id":18446744073709551616,{GET}}}"#)),
            invalid("unknown"),
        ),
        case(
            "id_128_bytes",
            get(json!("x".repeat(128))),
            ok_data(&"x".repeat(128), anthropic_default()),
        ),
        case(
            "id_129_bytes",
            get(json!("x".repeat(129))),
            invalid("unknown"),
        ),
        case(
            "id_43_euro_signs_is_129_bytes",
            get(json!("€".repeat(43))),
            invalid("unknown"),
        ),
        case("id_empty", get(json!("")), invalid("unknown")),
        case(
            "id_unknown_literally",
            get(json!("unknown")),
            ok_data("unknown", anthropic_default()),
        ),
        // op names (§5): only the operations of §7.
        case(
            "op_toString",
            with_op(json!("toString")),
            unknown_op("toString"),
        ),
        case(
            "op___proto__",
            with_op(json!("__proto__")),
            unknown_op("__proto__"),
        ),
        case(
            "op_constructor",
            with_op(json!("constructor")),
            unknown_op("constructor"),
        ),
        case(
            "op_hasOwnProperty",
            with_op(json!("hasOwnProperty")),
            unknown_op("hasOwnProperty"),
        ),
        case(
            "op_empty",
            with_op(json!("")),
            err_msg("op", "INVALID_REQUEST", "unknown operation"),
        ),
        case(
            "op_10kb",
            with_op(json!("z".repeat(10_240))),
            unknown_op(&"z".repeat(64)),
        ),
        case(
            "op_with_nul",
            with_op(json!("get_token\u{0}")),
            unknown_op("get_token?"),
        ),
        case(
            "op_unicode_lookalike",
            with_op(json!("gеt_token")),
            unknown_op("gеt_token"),
        ),
        case("op_emoji", with_op(json!("🔑")), unknown_op("🔑")),
        case(
            "op_uppercase",
            with_op(json!("GET_TOKEN")),
            unknown_op("GET_TOKEN"),
        ),
        case(
            "op_trailing_space",
            with_op(json!("get_token ")),
            unknown_op("get_token "),
        ),
        case(
            "op_handshake_after_handshake",
            with_op(json!("handshake")),
            unknown_op("handshake"),
        ),
        case("op_null", with_op(Value::Null), invalid("op")),
        case("op_number", with_op(json!(1)), invalid("op")),
        case("op_array", with_op(json!(["get_token"])), invalid("op")),
        case("op_object", with_op(json!({"get_token":1})), invalid("op")),
        case(
            "op_missing",
            json_frame(json!({"v":1,"id":"op","payload":{}})),
            invalid("op"),
        ),
        // payload types (§5): an object or missing.
        case(
            "payload_array",
            with_payload(json!([{"provider":"anthropic"}])),
            invalid("pl"),
        ),
        case(
            "payload_string",
            with_payload(json!("anthropic")),
            invalid("pl"),
        ),
        case("payload_number", with_payload(json!(0)), invalid("pl")),
        case("payload_null", with_payload(Value::Null), invalid("pl")),
        case("payload_bool", with_payload(json!(true)), invalid("pl")),
        case(
            "payload_array_with_unknown_op",
            json_frame(json!({"v":1,"id":"pl","op":"nope","payload":[]})),
            invalid("pl"),
        ),
        case(
            "payload_missing_for_list_providers",
            json_frame(json!({"v":1,"id":"lp","op":"list_providers"})),
            ok_data("lp", json!({"providers":["anthropic","gemini"]})),
        ),
        // v is ignored after the handshake.
        case(
            "v_string_after_handshake",
            json_frame(json!({"v":"x","id":"v",
            "op":"get_token","payload":{"provider":"anthropic"}})),
            ok_data("v", anthropic_default()),
        ),
        case(
            "v_999_after_handshake",
            json_frame(json!({"v":999,"id":"v",
            "op":"get_token","payload":{"provider":"anthropic"}})),
            ok_data("v", anthropic_default()),
        ),
        case(
            "prototype_pollution_keys_are_ignored",
            body(format!(
                r#"{{"__proto__":{{"admin":true}},"constructor":1,"v":1,"id":"pp",{GET}}}"#
            )),
            ok_data("pp", anthropic_default()),
        ),
        case(
            "refresh_token_request_field_is_ignored",
            json_frame(
                json!({"v":1,"id":"rt","op":"get_token","payload":{"provider":"anthropic","refresh_token":true}}),
            ),
            ok_data("rt", anthropic_default()),
        ),
    ]
}

/// Bad values for a name field, each with a short label.
fn bad_names(key: bool) -> Vec<(&'static str, Value)> {
    let mut v = vec![
        ("number", json!(1)),
        ("float", json!(1.5)),
        ("array", json!(["anthropic"])),
        ("object", json!({"name":"anthropic"})),
        ("bool", json!(true)),
        ("empty", json!("")),
        ("slash", json!("anthropic/default")),
        ("dotdot", json!("..")),
        ("dot", json!(".")),
        ("traversal", json!("../keys")),
        ("absolute", json!("/etc/passwd")),
        ("nul", json!("anthropic\u{0}")),
        ("cyrillic_a", json!("\u{430}nthropic")),
        ("fullwidth", json!("ａｎｔｈｒｏｐｉｃ")),
        ("len65", json!("a".repeat(65))),
        ("trailing_space", json!("anthropic ")),
        ("newline", json!("anthropic\n")),
        ("backslash", json!("a\\b")),
        ("colon", json!("anthropic:work")),
        ("percent_encoded_dotdot", json!("%2e%2e")),
        ("star", json!("*")),
    ];
    if key {
        v.push(("at_sign", json!("sk@anthropic")));
    }
    v
}

fn payload_cases() -> Vec<Case> {
    // Each operation with a valid payload; one field at a time is broken.
    let ops: [(&str, Value); 7] = [
        ("get_token", json!({"provider":"anthropic"})),
        (
            "save_token",
            json!({"provider":"anthropic","token":valid_token("at-evil")}),
        ),
        ("remove_token", json!({"provider":"anthropic"})),
        ("list_buckets", json!({"provider":"anthropic"})),
        ("get_bucket_stats", json!({"provider":"anthropic"})),
        ("get_api_key", json!({"name":"anthropic"})),
        ("has_api_key", json!({"name":"anthropic"})),
    ];
    let mut cases = Vec::new();
    for (op, base) in &ops {
        let field = if op.ends_with("api_key") {
            "name"
        } else {
            "provider"
        };
        let id = format!("{op}.{field}");
        let mut missing = base.clone();
        missing.as_object_mut().expect("object").remove(field);
        cases.push(case(
            format!("{op}/{field}/missing"),
            req(id.as_str(), op, missing),
            invalid(&id),
        ));
        let mut null = base.clone();
        null[field] = Value::Null;
        cases.push(case(
            format!("{op}/{field}/null"),
            req(id.as_str(), op, null),
            invalid(&id),
        ));
        for (label, value) in bad_names(field == "name") {
            let mut p = base.clone();
            p[field] = value;
            cases.push(case(
                format!("{op}/{field}/{label}"),
                req(id.as_str(), op, p),
                invalid(&id),
            ));
        }
        if field == "provider" && *op != "list_buckets" {
            let id = format!("{op}.bucket");
            for (label, value) in bad_names(false) {
                let mut p = base.clone();
                p["bucket"] = value;
                cases.push(case(
                    format!("{op}/bucket/{label}"),
                    req(id.as_str(), op, p),
                    invalid(&id),
                ));
            }
        }
    }
    // Boundaries that are valid names: the schema passes, the store is only read.
    let l64 = "a".repeat(64);
    cases.extend([
        case(
            "get_token/provider/len64_is_valid",
            req("l64", "get_token", json!({"provider":l64})),
            err("l64", "NOT_FOUND"),
        ),
        case(
            "get_token/bucket/null_means_default",
            req(
                "bn",
                "get_token",
                json!({"provider":"anthropic","bucket":null}),
            ),
            ok_data("bn", anthropic_default()),
        ),
        case(
            "has_api_key/name/len64_is_valid",
            req("hk64", "has_api_key", json!({"name":l64})),
            ok_data("hk64", json!({"exists":false})),
        ),
        case(
            "list_buckets/provider/unicode_lookalike_of_a_stored_one",
            req("lb", "list_buckets", json!({"provider":"gemіni"})),
            invalid("lb"),
        ),
    ]);
    cases
}

fn token_cases() -> Vec<Case> {
    // A `save_token` of `token` into `bucket` that must be refused as invalid.
    let save_into = |bucket: &str, name: &str, token: Option<Value>| {
        let mut payload = json!({"provider":"anthropic","bucket":bucket});
        if let Some(t) = token {
            payload["token"] = t;
        }
        case(
            format!("save_token/{name}"),
            req("st", "save_token", payload),
            invalid("st"),
        )
    };
    let save = |name: &str, token: Option<Value>| save_into("default", name, token);
    // A partial token is merged into a stored one (PROTOCOL.md §7); with nothing stored
    // to merge into, it is invalid.
    let save_fresh = |name: &str, token: Option<Value>| save_into("nothing-stored", name, token);
    let without = |field: &str| {
        let mut t = valid_token("at-new");
        t.as_object_mut().expect("object").remove(field);
        Some(t)
    };
    let with = |field: &str, value: Value| {
        let mut t = valid_token("at-new");
        t[field] = value;
        Some(t)
    };
    let mut cases = vec![
        save("token_missing", None),
        save("token_null", Some(Value::Null)),
        save("token_array", Some(json!([valid_token("at-new")]))),
        save(
            "token_string",
            Some(json!(valid_token("at-new").to_string())),
        ),
        save("token_number", Some(json!(1))),
        save("token_bool", Some(json!(true))),
        save_fresh("token_empty_object", Some(json!({}))),
        save_fresh(
            "token_only_refresh_token",
            Some(json!({"refresh_token":"rt-evil"})),
        ),
        save_fresh("missing_access_token", without("access_token")),
        save_fresh("missing_expiry", without("expiry")),
        save_fresh("missing_token_type", without("token_type")),
        save("access_token_empty", with("access_token", json!(""))),
        save("access_token_number", with("access_token", json!(12345))),
        save("access_token_null", with("access_token", Value::Null)),
        save("access_token_array", with("access_token", json!(["a"]))),
        save("access_token_object", with("access_token", json!({"a":1}))),
        save("expiry_string", with("expiry", json!("2000000000"))),
        save("expiry_null", with("expiry", Value::Null)),
        save("expiry_array", with("expiry", json!([2_000_000_000]))),
        save("expiry_object", with("expiry", json!({"s":1}))),
        save("expiry_bool", with("expiry", json!(true))),
        save("token_type_number", with("token_type", json!(1))),
        save("token_type_null", with("token_type", Value::Null)),
        save("token_type_array", with("token_type", json!(["Bearer"]))),
        save("scope_number", with("scope", json!(1))),
        save("scope_array", with("scope", json!(["a", "b"]))),
        save("scope_object", with("scope", json!({"a":true}))),
        save("scope_bool", with("scope", json!(false))),
        case(
            "save_token/valid_token_but_bad_bucket",
            req(
                "sb",
                "save_token",
                json!({"provider":"anthropic","bucket":"../../keys/anthropic","token":valid_token("at-new")}),
            ),
            invalid("sb"),
        ),
    ];
    // Scope and mode (§8) after a valid schema: refused, store untouched.
    let gemini_token = json!({"provider":"gemini","token":valid_token("at-evil")});
    cases.extend([
        under(
            Prof::OnlyAnthropic,
            case(
                "scope/get_token_outside_profile",
                req("sc", "get_token", json!({"provider":"gemini"})),
                err_msg("sc", "UNAUTHORIZED", "UNAUTHORIZED: "),
            ),
        ),
        under(
            Prof::OnlyAnthropic,
            case(
                "scope/save_token_outside_profile",
                req("sc", "save_token", gemini_token.clone()),
                err_msg("sc", "UNAUTHORIZED", "UNAUTHORIZED: "),
            ),
        ),
        under(
            Prof::OnlyAnthropic,
            case(
                "scope/remove_token_outside_profile",
                req("sc", "remove_token", json!({"provider":"gemini"})),
                err_msg("sc", "UNAUTHORIZED", "UNAUTHORIZED: "),
            ),
        ),
        under(
            Prof::OnlyAnthropic,
            case(
                "scope/list_buckets_outside_profile",
                req("sc", "list_buckets", json!({"provider":"gemini"})),
                err_msg("sc", "UNAUTHORIZED", "UNAUTHORIZED: "),
            ),
        ),
        under(
            Prof::OnlyAnthropic,
            case(
                "scope/get_bucket_stats_outside_profile",
                req("sc", "get_bucket_stats", json!({"provider":"gemini"})),
                err_msg("sc", "UNAUTHORIZED", "UNAUTHORIZED: "),
            ),
        ),
        under(
            Prof::OnlyAnthropic,
            case(
                "scope/get_api_key_outside_profile",
                req("sc", "get_api_key", json!({"name":"openai"})),
                err_msg("sc", "UNAUTHORIZED", "UNAUTHORIZED: "),
            ),
        ),
        under(
            Prof::OnlyAnthropic,
            case(
                "scope/has_api_key_outside_profile",
                req("sc", "has_api_key", json!({"name":"openai"})),
                err_msg("sc", "UNAUTHORIZED", "UNAUTHORIZED: "),
            ),
        ),
        under(
            Prof::OnlyAnthropic,
            case(
                "scope/invalid_token_outside_profile_is_a_schema_error_first",
                req(
                    "sc",
                    "save_token",
                    json!({"provider":"gemini","token":{"access_token":""}}),
                ),
                invalid("sc"),
            ),
        ),
        under(
            Prof::OnlyAnthropic,
            case(
                "scope/list_providers_is_filtered",
                req("sc", "list_providers", json!({})),
                ok_data("sc", json!({"providers":["anthropic"]})),
            ),
        ),
        under(
            Prof::ReadOnly,
            case(
                "read_only/save_token",
                req(
                    "ro",
                    "save_token",
                    json!({"provider":"anthropic","token":valid_token("at-evil")}),
                ),
                err("ro", "FORBIDDEN"),
            ),
        ),
        under(
            Prof::ReadOnly,
            case(
                "read_only/remove_token",
                req(
                    "ro",
                    "remove_token",
                    json!({"provider":"anthropic","bucket":"work"}),
                ),
                err("ro", "FORBIDDEN"),
            ),
        ),
        under(
            Prof::ReadOnly,
            case(
                "read_only/invalid_token_is_a_schema_error_first",
                req(
                    "ro",
                    "save_token",
                    json!({"provider":"anthropic","token":{"expiry":"soon"}}),
                ),
                invalid("ro"),
            ),
        ),
    ]);
    cases
}

// ---------------------------------------------------------------------------------------
// The runner.
// ---------------------------------------------------------------------------------------

/// Asserts the shape every error reply with an id has (§5).
fn assert_error_reply(reply: &Value, id: &str, code: &str, msg: Option<&str>) {
    let error = assert_err(reply, id, code);
    if let Some(msg) = msg {
        assert!(error.contains(msg), "error {error:?} lacks {msg:?}");
    }
    assert!(
        !error.contains("rt-") && !error.contains("at-") && !error.contains('/'),
        "error message carries a secret or a path: {error:?}"
    );
}

fn assert_ok_reply(reply: &Value, id: &str, data: Option<&Value>) {
    assert_eq!(reply["v"], json!(1), "reply: {reply}");
    assert_eq!(reply["ok"], json!(true), "expected success: {reply}");
    assert_eq!(reply["id"], json!(id), "reply id: {reply}");
    assert!(reply["data"].is_object(), "data is not an object: {reply}");
    if let Some(data) = data {
        assert_eq!(&reply["data"], data, "reply data: {reply}");
    }
    assert!(
        !reply.to_string().contains("refresh_token"),
        "a refresh token crossed the socket: {reply}"
    );
}

/// Proves the connection is still open and that the case got exactly one reply: the
/// next frame must be the answer to this probe.
fn probe(raw: &mut Raw) {
    raw.send(&json!({"v":1,"id":"probe","op":"get_token","payload":{"provider":"anthropic"}}));
    match raw.try_recv() {
        Some(reply) => assert_ok_reply(&reply, "probe", Some(&anthropic_default())),
        None => panic!("the connection was closed after a reply that must keep it open"),
    }
}

fn run_case(h: &Harness, c: &Case) {
    let before = h.snapshot();
    let mut raw = Raw::connect(&h.path);
    if !c.first {
        raw.handshake();
    }
    // A server that closes at once (oversize header) may reset a write still going on.
    let written = raw.stream.write_all(&c.bytes);
    let closes = matches!(
        c.expect,
        Expect::Close | Expect::ErrorThenClose | Expect::HandshakeErrorThenClose { .. }
    );
    if !closes {
        written.expect("write the case");
    }
    match &c.expect {
        Expect::Reply { id, code, msg } => {
            let reply = raw.try_recv().expect("a reply, not a close");
            assert_error_reply(&reply, id, code, msg.as_deref());
            probe(&mut raw);
        }
        Expect::Ok { id, data } => {
            let reply = raw.try_recv().expect("a reply, not a close");
            assert_ok_reply(&reply, id, data.as_ref());
            probe(&mut raw);
        }
        Expect::HandshakeOk(v) => {
            let reply = raw.try_recv().expect("the handshake reply, not a close");
            assert_eq!(
                reply,
                json!({"v":v,"op":"handshake","ok":true,"data":{"version":v}})
            );
            raw.limit = credproxy::codec::frame_limit(*v);
            raw.send(&json!({"id":"probe","op":"get_token","payload":{"provider":"anthropic"}}));
            let reply = raw.try_recv().expect("a reply to the probe");
            assert_eq!(
                reply,
                json!({"v":v,"id":"probe","ok":true,"data":anthropic_default()})
            );
        }
        Expect::ErrorThenClose => {
            let reply = raw.try_recv().expect("the §3 error frame before the close");
            // Before the handshake the frame carries the server's highest version (§13).
            assert_malformed_frame_reply(&reply, if c.first { 2 } else { 1 });
            raw.expect_closed();
        }
        Expect::HandshakeErrorThenClose { code, error } => {
            let reply = raw
                .try_recv()
                .expect("the handshake error frame before the close");
            assert_eq!(
                reply,
                json!({"v":2,"op":"handshake","ok":false,"code":code,"error":error})
            );
            raw.expect_closed();
        }
        Expect::Close => raw.expect_closed(),
    }
    drop(raw);
    assert_same_store(&before, &h.snapshot(), "during the case");
    h.assert_serves();
    h.wait_no_sessions(Duration::from_secs(3));
    assert_same_store(&before, &h.snapshot(), "after the fresh connection");
}

fn panic_text(e: Box<dyn std::any::Any + Send>) -> String {
    e.downcast_ref::<String>()
        .cloned()
        .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "panic".to_owned())
}

/// Runs a table; fails once at the end with every failing case by name.
fn run_table(table: &str, cases: Vec<Case>) {
    let mut names = std::collections::HashSet::new();
    for c in &cases {
        assert!(
            names.insert(c.name.clone()),
            "duplicate case name {}",
            c.name
        );
    }
    let mut servers: HashMap<Prof, Harness> = HashMap::new();
    let mut failures = Vec::new();
    for c in &cases {
        let h = servers
            .entry(c.prof)
            .or_insert_with(|| Harness::start(c.prof));
        if let Err(e) = catch_unwind(AssertUnwindSafe(|| run_case(h, c))) {
            failures.push(format!("  {}: {}", c.name, panic_text(e)));
            // A server that failed a case is replaced, so one bug does not hide the rest.
            servers.remove(&c.prof);
        }
    }
    drop(servers);
    assert!(
        failures.is_empty(),
        "{table}: {} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn catalogue_has_at_least_50_distinct_named_cases() {
    let all: Vec<String> = [
        framing_cases(),
        handshake_cases(),
        envelope_cases(),
        payload_cases(),
        token_cases(),
    ]
    .into_iter()
    .flatten()
    .map(|c| c.name)
    .collect();
    let distinct: std::collections::HashSet<&String> = all.iter().collect();
    assert_eq!(distinct.len(), all.len(), "case names repeat");
    assert!(all.len() >= 50, "only {} cases", all.len());
}

/// The runner is not vacuous: a request that does write, and a wrong expectation, fail it.
#[test]
fn the_runner_detects_a_store_change_and_a_wrong_reply() {
    let h = Harness::start(Prof::AllowAll);
    let write = case(
        "control/save_token_writes",
        req(
            "w",
            "save_token",
            json!({"provider":"anthropic","bucket":"control","token":valid_token("at-control")}),
        ),
        ok_data("w", json!({})),
    );
    let e = catch_unwind(AssertUnwindSafe(|| run_case(&h, &write)))
        .expect_err("a write must fail the store check");
    assert!(panic_text(e).contains("the store changed"));
    let wrong = case(
        "control/wrong_code",
        get_anthropic("c"),
        err("c", "NOT_FOUND"),
    );
    assert!(catch_unwind(AssertUnwindSafe(|| run_case(&h, &wrong))).is_err());
    let wrong_close = case("control/close_expected", get_anthropic("c"), Expect::Close);
    assert!(catch_unwind(AssertUnwindSafe(|| run_case(&h, &wrong_close))).is_err());
}

#[test]
fn hostile_framing() {
    run_table("framing", framing_cases());
}

#[test]
fn hostile_first_frames() {
    run_table("first frames", handshake_cases());
}

#[test]
fn hostile_envelopes() {
    run_table("envelopes", envelope_cases());
}

#[test]
fn hostile_payloads() {
    run_table("payloads", payload_cases());
}

#[test]
fn hostile_tokens_and_scope() {
    run_table("tokens and scope", token_cases());
}

// ---------------------------------------------------------------------------------------
// Floods.
// ---------------------------------------------------------------------------------------

/// Reads one frame; `None` on EOF.
fn read_frame(stream: &mut UnixStream) -> Option<Value> {
    let mut header = [0u8; 4];
    match stream.read_exact(&mut header) {
        Ok(()) => {}
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset
            ) =>
        {
            return None
        }
        Err(e) => panic!("reading a reply header: {e}"),
    }
    let len = u32::from_be_bytes(header) as usize;
    assert!(len <= 65_536, "server wrote a frame of {len} bytes");
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).expect("reply body");
    Some(serde_json::from_slice(&body).expect("reply is JSON"))
}

/// Writes `bytes` from another thread while the caller reads, so that neither side's
/// socket buffer can stall the other.
fn write_in_background(stream: &UnixStream, bytes: Vec<u8>) -> thread::JoinHandle<()> {
    let mut writer = stream.try_clone().expect("clone stream");
    thread::spawn(move || writer.write_all(&bytes).expect("flood write"))
}

/// Asserts nothing more arrives within `wait`.
fn assert_no_more_frames(stream: &mut UnixStream, wait: Duration) {
    stream.set_read_timeout(Some(wait)).expect("timeout");
    let mut byte = [0u8; 1];
    match stream.read(&mut byte) {
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        Ok(0) => panic!("the server closed the connection"),
        Ok(_) => panic!("an extra frame arrived"),
        Err(e) => panic!("read: {e}"),
    }
    stream.set_read_timeout(Some(REPLY_WAIT)).expect("timeout");
}

#[test]
fn flood_5000_requests_in_one_write_each_get_exactly_one_reply() {
    const N: usize = 5000;
    let h = Harness::start(Prof::AllowAll);
    let before = h.snapshot();
    let mut raw = h.connect();
    let mut bytes = Vec::new();
    for i in 0..N {
        bytes.extend(get_anthropic(format!("f{i}")));
    }
    let t0 = Instant::now();
    let writer = write_in_background(&raw.stream, bytes);
    let mut seen: HashMap<String, Value> = HashMap::new();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    while seen.len() < N {
        let reply = read_frame(&mut raw.stream)
            .unwrap_or_else(|| panic!("closed after {} of {N} replies", seen.len()));
        let id = reply["id"].as_str().expect("reply id").to_owned();
        let outcome = if reply["ok"] == json!(true) {
            assert_ok_reply(&reply, &id, Some(&anthropic_default()));
            "ok".to_owned()
        } else {
            let code = reply["code"].as_str().expect("code").to_owned();
            match code.as_str() {
                "RATE_LIMITED" => {
                    let after = reply["retryAfter"].as_u64().expect("retryAfter");
                    assert!(after >= 1, "retryAfter {after}");
                }
                "RESOURCE_EXHAUSTED" => {}
                other => panic!("unexpected code {other}: {reply}"),
            }
            code
        };
        *counts.entry(outcome).or_default() += 1;
        assert!(
            seen.insert(id.clone(), reply).is_none(),
            "two replies for {id}"
        );
    }
    let elapsed = t0.elapsed();
    writer.join().expect("writer");
    for i in 0..N {
        assert!(seen.contains_key(&format!("f{i}")), "no reply for f{i}");
    }
    assert_no_more_frames(&mut raw.stream, Duration::from_millis(200));
    let oks = counts.get("ok").copied().unwrap_or(0);
    let windows = elapsed.as_secs() as usize + 2;
    assert!(oks >= 1, "nothing served: {counts:?}");
    assert!(
        oks <= 60 * windows,
        "{oks} served in {elapsed:?}: over the rate limit ({counts:?})"
    );
    assert!(
        counts.get("RATE_LIMITED").copied().unwrap_or(0) >= N.saturating_sub(60 * windows),
        "{counts:?}"
    );
    eprintln!("flood of {N}: {counts:?} in {elapsed:?}");
    drop(raw);
    h.assert_serves();
    h.wait_no_sessions(Duration::from_secs(3));
    assert_same_store(&before, &h.snapshot(), "by the flood");
}

#[test]
fn flood_100_frames_with_one_id_each_get_exactly_one_reply() {
    const N: usize = 100;
    let h = Harness::start(Prof::AllowAll);
    let before = h.snapshot();
    let mut raw = h.connect();
    let bytes: Vec<u8> = (0..N).flat_map(|_| get_anthropic("same")).collect();
    let writer = write_in_background(&raw.stream, bytes);
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for n in 0..N {
        let reply = read_frame(&mut raw.stream)
            .unwrap_or_else(|| panic!("closed after {n} of {N} replies"));
        assert_eq!(reply["id"], json!("same"), "{reply}");
        let outcome = if reply["ok"] == json!(true) {
            assert_ok_reply(&reply, "same", Some(&anthropic_default()));
            "ok"
        } else {
            match reply["code"].as_str() {
                Some("RATE_LIMITED") => "RATE_LIMITED",
                Some("RESOURCE_EXHAUSTED") => "RESOURCE_EXHAUSTED",
                Some("INVALID_REQUEST") => {
                    assert_error_reply(&reply, "same", "INVALID_REQUEST", Some("duplicate"));
                    "duplicate"
                }
                _ => panic!("unexpected reply {reply}"),
            }
        };
        *counts.entry(outcome.to_owned()).or_default() += 1;
    }
    writer.join().expect("writer");
    assert_no_more_frames(&mut raw.stream, Duration::from_millis(200));
    assert!(counts.contains_key("ok"), "{counts:?}");
    drop(raw);
    h.assert_serves();
    h.wait_no_sessions(Duration::from_secs(3));
    assert_same_store(&before, &h.snapshot(), "by the duplicate-id flood");
}

#[test]
fn reconnect_storm_of_500_cycles() {
    let h = Harness::start(Prof::AllowAll);
    let before = h.snapshot();
    let t0 = Instant::now();
    for i in 0..500 {
        let mut raw = Raw::connect(&h.path);
        match i % 5 {
            // Connect and go.
            0 => {}
            // Handshake and go.
            1 => raw.handshake(),
            // A request, gone before the reply.
            2 => {
                raw.handshake();
                raw.write(&get_anthropic(format!("s{i}")));
            }
            // Gone in the middle of a frame.
            3 => {
                raw.handshake();
                raw.write(&header(100));
                raw.write(b"{\"v\":1");
            }
            // A full request/reply.
            _ => {
                raw.handshake();
                let reply = raw.call(&format!("s{i}"), "list_providers", json!({}));
                assert_ok_reply(
                    &reply,
                    &format!("s{i}"),
                    Some(&json!({"providers":["anthropic","gemini"]})),
                );
            }
        }
    }
    eprintln!("500 reconnects in {:?}", t0.elapsed());
    h.assert_serves();
    h.wait_no_sessions(Duration::from_secs(5));
    assert_same_store(&before, &h.snapshot(), "by the reconnect storm");
}

#[test]
fn handshake_spam_on_one_connection_never_closes_it() {
    const N: usize = 200;
    let h = Harness::start(Prof::AllowAll);
    let before = h.snapshot();
    let mut raw = h.connect();

    // 200 handshake frames as sent by a client (no id): the envelope check comes first,
    // so each is INVALID_REQUEST with id "unknown" (§5), and none counts against the rate.
    let bytes: Vec<u8> = (0..N).flat_map(|_| body(HANDSHAKE)).collect();
    let writer = write_in_background(&raw.stream, bytes);
    for n in 0..N {
        let reply = read_frame(&mut raw.stream)
            .unwrap_or_else(|| panic!("closed after {n} of {N} handshake replies"));
        assert_error_reply(&reply, "unknown", "INVALID_REQUEST", None);
    }
    writer.join().expect("writer");

    // 200 more with ids: "unknown operation: handshake" until the rate limit, then
    // RATE_LIMITED; exactly one reply per id, never a close.
    let bytes: Vec<u8> = (0..N)
        .flat_map(|i| {
            json_frame(json!({"v":1,"id":format!("hs{i}"),"op":"handshake",
                "payload":{"minVersion":1,"maxVersion":1}}))
        })
        .collect();
    let t0 = Instant::now();
    let writer = write_in_background(&raw.stream, bytes);
    let mut seen = std::collections::HashSet::new();
    let (mut unknown, mut limited) = (0usize, 0usize);
    for n in 0..N {
        let reply = read_frame(&mut raw.stream)
            .unwrap_or_else(|| panic!("closed after {n} of {N} handshake replies"));
        let id = reply["id"].as_str().expect("id").to_owned();
        assert!(seen.insert(id.clone()), "two replies for {id}");
        if reply["code"] == json!("RATE_LIMITED") {
            limited += 1;
        } else {
            assert_error_reply(
                &reply,
                &id,
                "INVALID_REQUEST",
                Some("unknown operation: handshake"),
            );
            unknown += 1;
        }
    }
    writer.join().expect("writer");
    let windows = t0.elapsed().as_secs() as usize + 2;
    assert!(
        unknown >= 1 && unknown <= 60 * windows,
        "{unknown} / {limited}"
    );
    // Still open: the next request is answered (rate limited or not).
    raw.send(&json!({"v":1,"id":"after","op":"list_providers"}));
    let reply = read_frame(&mut raw.stream).expect("the connection is still open");
    assert_eq!(reply["id"], json!("after"), "{reply}");
    drop(raw);
    h.assert_serves();
    h.wait_no_sessions(Duration::from_secs(3));
    assert_same_store(&before, &h.snapshot(), "by the handshake spam");
}

#[test]
fn idle_connections_are_closed_by_the_handshake_deadline_while_serving_others() {
    const N: usize = 200;
    let h = Harness::start(Prof::AllowAll);
    let before = h.snapshot();
    let t0 = Instant::now();
    let mut idle: Vec<Raw> = (0..N).map(|_| Raw::connect(&h.path)).collect();
    // Served meanwhile.
    let mut busy = h.connect();
    for i in 0..20 {
        let id = format!("b{i}");
        let reply = busy.call(&id, "get_token", json!({"provider":"anthropic"}));
        assert_ok_reply(&reply, &id, Some(&anthropic_default()));
    }
    for (i, raw) in idle.iter_mut().enumerate() {
        if let Some(frame) = raw.try_recv() {
            panic!("idle connection {i} got a frame: {frame}");
        }
    }
    let elapsed = t0.elapsed();
    let deadline = short_limits().handshake_timeout;
    assert!(
        elapsed >= deadline,
        "idle connections closed after {elapsed:?}, before the {deadline:?} deadline"
    );
    assert!(
        elapsed < Duration::from_secs(4),
        "{N} idle connections took {elapsed:?} to close"
    );
    // The handshaken connection is not subject to the handshake deadline.
    let reply = busy.call("late", "get_token", json!({"provider":"anthropic"}));
    assert_ok_reply(&reply, "late", Some(&anthropic_default()));
    drop(busy);
    drop(idle);
    h.assert_serves();
    h.wait_no_sessions(Duration::from_secs(3));
    assert_same_store(&before, &h.snapshot(), "by the idle connections");
}

#[test]
fn slow_loris_partial_frames_are_closed_while_serving_others() {
    const N: usize = 50;
    let h = Harness::start(Prof::AllowAll);
    let before = h.snapshot();
    let mut lorises: Vec<Raw> = (0..N)
        .map(|i| {
            let mut raw = h.connect();
            // A frame announcing 1000 bytes, of which only a few arrive.
            raw.write(&header(1000));
            raw.write(&vec![b' '; i % 7]);
            raw
        })
        .collect();
    h.assert_serves();
    let t0 = Instant::now();
    for (i, raw) in lorises.iter_mut().enumerate() {
        if let Some(frame) = raw.try_recv() {
            panic!("slow connection {i} got a frame: {frame}");
        }
    }
    assert!(
        t0.elapsed() < Duration::from_secs(4),
        "took {:?}",
        t0.elapsed()
    );
    drop(lorises);
    h.assert_serves();
    h.wait_no_sessions(Duration::from_secs(3));
    assert_same_store(&before, &h.snapshot(), "by the slow connections");
}

#[test]
fn half_close_after_pipelined_requests_gets_every_reply_then_eof() {
    const N: usize = 10;
    let h = Harness::start(Prof::AllowAll);
    let before = h.snapshot();
    let mut raw = h.connect();
    let bytes: Vec<u8> = (0..N)
        .flat_map(|i| get_anthropic(format!("hc{i}")))
        .collect();
    raw.write(&bytes);
    raw.stream
        .shutdown(std::net::Shutdown::Write)
        .expect("half-close");
    let mut seen = std::collections::HashSet::new();
    for n in 0..N {
        let reply = read_frame(&mut raw.stream)
            .unwrap_or_else(|| panic!("EOF after {n} of {N} replies: in-flight replies lost"));
        let id = reply["id"].as_str().expect("id").to_owned();
        assert_ok_reply(&reply, &id, Some(&anthropic_default()));
        assert!(seen.insert(id), "two replies");
    }
    assert!(
        read_frame(&mut raw.stream).is_none(),
        "a frame after the replies"
    );
    drop(raw);
    h.assert_serves();
    h.wait_no_sessions(Duration::from_secs(3));
    assert_same_store(&before, &h.snapshot(), "by the half-close");
}

/// EOF in the middle of a frame closes the connection at once (the stream is broken).
/// PROTOCOL.md does not say whether the complete requests before it are still answered:
/// this asserts only that each gets at most one well-formed reply, then EOF, no hang, and
/// no change to the store. (Observed: with the file store none is answered, while a clean
/// EOF answers them all; see the test above.)
#[test]
fn half_close_in_the_middle_of_a_frame_after_complete_requests_closes() {
    const N: usize = 10;
    let h = Harness::start(Prof::AllowAll);
    let before = h.snapshot();
    let mut raw = h.connect();
    let mut bytes: Vec<u8> = (0..N)
        .flat_map(|i| get_anthropic(format!("hm{i}")))
        .collect();
    bytes.extend(header(50));
    bytes.extend(b"{\"v\":1");
    raw.write(&bytes);
    raw.stream
        .shutdown(std::net::Shutdown::Write)
        .expect("half-close");
    let mut seen = std::collections::HashSet::new();
    while let Some(reply) = read_frame(&mut raw.stream) {
        let id = reply["id"].as_str().expect("id").to_owned();
        assert_ok_reply(&reply, &id, Some(&anthropic_default()));
        assert!(seen.insert(id), "two replies");
    }
    eprintln!(
        "EOF mid-frame after {N} complete requests: {} answered",
        seen.len()
    );
    drop(raw);
    h.assert_serves();
    h.wait_no_sessions(Duration::from_secs(3));
    assert_same_store(&before, &h.snapshot(), "by the half-close");
}
