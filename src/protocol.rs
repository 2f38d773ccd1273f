//! Wire types of protocol v1 (PROTOCOL.md §4, §5, §7, §10): error codes, operations,
//! request parsing and reply building. No I/O here.

use std::fmt;

use serde::Serialize;
use serde_json::{Map, Value};

use crate::names::{self, NameKind, DEFAULT_BUCKET};
use crate::token::Token;

/// The protocol versions this server speaks.
pub const SUPPORTED_VERSIONS: &[i64] = &[1];

/// A wire error code (PROTOCOL.md §10). These, with a short sentence, are all that an
/// error reply carries; internal errors never cross the socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// Malformed envelope or payload, unknown operation, duplicate id, handshake missing.
    InvalidRequest,
    /// No protocol version in common (handshake only).
    UnknownVersion,
    /// Outside the loaded profile.
    Unauthorized,
    /// Not allowed in this mode (read-only).
    Forbidden,
    /// No such token, key or stats.
    NotFound,
    /// Over the per-connection rate; the reply carries `retryAfter`.
    RateLimited,
    /// Too many requests in flight on this connection.
    ResourceExhausted,
    /// The store failed or timed out.
    InternalError,
}

impl ErrorCode {
    /// Every code, in the order of PROTOCOL.md §10.
    pub const ALL: [ErrorCode; 8] = [
        ErrorCode::InvalidRequest,
        ErrorCode::UnknownVersion,
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::NotFound,
        ErrorCode::RateLimited,
        ErrorCode::ResourceExhausted,
        ErrorCode::InternalError,
    ];

    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidRequest => "INVALID_REQUEST",
            ErrorCode::UnknownVersion => "UNKNOWN_VERSION",
            ErrorCode::Unauthorized => "UNAUTHORIZED",
            ErrorCode::Forbidden => "FORBIDDEN",
            ErrorCode::NotFound => "NOT_FOUND",
            ErrorCode::RateLimited => "RATE_LIMITED",
            ErrorCode::ResourceExhausted => "RESOURCE_EXHAUSTED",
            ErrorCode::InternalError => "INTERNAL_ERROR",
        }
    }

    /// Parses a wire code; `None` for a code this version does not know.
    pub fn parse(code: &str) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|c| c.as_str() == code)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An operation of PROTOCOL.md §7.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// `get_token`
    GetToken,
    /// `save_token`
    SaveToken,
    /// `remove_token`
    RemoveToken,
    /// `list_providers`
    ListProviders,
    /// `list_buckets`
    ListBuckets,
    /// `get_bucket_stats`
    GetBucketStats,
    /// `get_api_key`
    GetApiKey,
    /// `list_api_keys`
    ListApiKeys,
    /// `has_api_key`
    HasApiKey,
}

impl Op {
    /// Every operation.
    pub const ALL: [Op; 9] = [
        Op::GetToken,
        Op::SaveToken,
        Op::RemoveToken,
        Op::ListProviders,
        Op::ListBuckets,
        Op::GetBucketStats,
        Op::GetApiKey,
        Op::ListApiKeys,
        Op::HasApiKey,
    ];

    /// The operation's wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::GetToken => "get_token",
            Op::SaveToken => "save_token",
            Op::RemoveToken => "remove_token",
            Op::ListProviders => "list_providers",
            Op::ListBuckets => "list_buckets",
            Op::GetBucketStats => "get_bucket_stats",
            Op::GetApiKey => "get_api_key",
            Op::ListApiKeys => "list_api_keys",
            Op::HasApiKey => "has_api_key",
        }
    }

    /// Parses a wire name (exact match: `toString` or `GET_TOKEN` are unknown).
    pub fn parse(name: &str) -> Option<Op> {
        Op::ALL.into_iter().find(|op| op.as_str() == name)
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The longest request id accepted, in bytes (PROTOCOL.md §5).
pub const MAX_ID_LEN: usize = 128;

/// The id echoed when a request has no usable one.
pub const UNKNOWN_ID: &str = "unknown";

/// A rejected request: the code and a short sentence for a person (never a secret, a path
/// or an internal error's text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// The wire code.
    pub code: ErrorCode,
    /// The `error` text.
    pub message: String,
}

impl Rejection {
    /// A rejection with `code` and `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Rejection {
            code,
            message: message.into(),
        }
    }

    /// `INVALID_REQUEST` with `message`.
    pub fn invalid(message: impl Into<String>) -> Self {
        Rejection::new(ErrorCode::InvalidRequest, message)
    }
}

/// Parses a frame body as a JSON object; anything else ends the connection (§3).
pub fn parse_object(body: &[u8]) -> Result<Map<String, Value>, &'static str> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err("request must be a JSON object"),
        Err(_) => Err("request is not valid UTF-8 JSON"),
    }
}

/// The outcome of the version negotiation of a handshake frame (§4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handshake {
    /// Agreed on this version.
    Agreed(i64),
    /// The first frame was not a handshake.
    NotHandshake,
    /// No version in common, or the version fields are unusable.
    NoVersion,
}

/// Negotiates the version from the first frame of a connection (§4).
pub fn negotiate(frame: &Map<String, Value>) -> Handshake {
    if frame.get("op").and_then(Value::as_str) != Some("handshake") {
        return Handshake::NotHandshake;
    }
    let payload = frame.get("payload").and_then(Value::as_object);
    let field = |name: &str| payload.and_then(|p| p.get(name));
    let (min, max) = (field("minVersion"), field("maxVersion"));
    if let (Some(min), Some(max)) = (min, max) {
        return match (integer(min), integer(max)) {
            (Some(lo), Some(hi)) if lo <= hi => SUPPORTED_VERSIONS
                .iter()
                .rev()
                .find(|v| (lo..=hi).contains(&i128::from(**v)))
                .map_or(Handshake::NoVersion, |v| Handshake::Agreed(*v)),
            _ => Handshake::NoVersion,
        };
    }
    match frame.get("v").and_then(Value::as_i64) {
        Some(v) if SUPPORTED_VERSIONS.contains(&v) => Handshake::Agreed(v),
        _ => Handshake::NoVersion,
    }
}

/// A JSON integer of any size serde_json holds (i64 or u64); `None` for anything else.
fn integer(value: &Value) -> Option<i128> {
    value
        .as_i64()
        .map(i128::from)
        .or_else(|| value.as_u64().map(i128::from))
}

/// A request whose envelope is well formed (§5); the operation is not checked yet.
pub struct Envelope {
    /// The request id (an integer id already turned into its decimal string).
    pub id: String,
    /// The operation name as sent.
    pub op: String,
    /// The payload (`{}` when missing).
    pub payload: Map<String, Value>,
}

/// Checks the envelope of a request. On failure returns the id to answer with (the
/// request's own when it was usable, else [`UNKNOWN_ID`]) and the rejection.
pub fn parse_envelope(mut frame: Map<String, Value>) -> Result<Envelope, (String, Rejection)> {
    let id = match frame.get("id") {
        Some(Value::String(s)) if !s.is_empty() && s.len() <= MAX_ID_LEN => s.clone(),
        Some(Value::Number(n)) if n.is_i64() || n.is_u64() => n.to_string(),
        Some(Value::String(s)) if s.len() > MAX_ID_LEN => {
            return Err((
                UNKNOWN_ID.into(),
                Rejection::invalid(format!("id must be at most {MAX_ID_LEN} bytes")),
            ))
        }
        Some(_) => {
            return Err((
                UNKNOWN_ID.into(),
                Rejection::invalid("id must be a non-empty string"),
            ))
        }
        None => return Err((UNKNOWN_ID.into(), Rejection::invalid("missing request id"))),
    };
    let op = match frame.remove("op") {
        Some(Value::String(op)) => op,
        Some(_) => return Err((id, Rejection::invalid("op must be a string"))),
        None => return Err((id, Rejection::invalid("missing op"))),
    };
    let payload = match frame.remove("payload") {
        None => Map::new(),
        Some(Value::Object(p)) => p,
        Some(_) => return Err((id, Rejection::invalid("payload must be an object"))),
    };
    Ok(Envelope { id, op, payload })
}

/// The operation named by `op`, or the rejection for an unknown one.
pub fn parse_op(op: &str) -> Result<Op, Rejection> {
    Op::parse(op).ok_or_else(|| {
        // Echo a bounded, printable form of what was sent: it is the client's own text.
        let shown: String = op
            .chars()
            .take(64)
            .map(|c| if c.is_control() { '?' } else { c })
            .collect();
        Rejection::invalid(format!("unknown operation: {shown}"))
    })
}

/// A request with a schema-checked payload (§6, §7).
#[derive(Debug)]
pub enum Request {
    /// `get_token`
    GetToken {
        /// Provider name.
        provider: String,
        /// Bucket name (`default` when omitted).
        bucket: String,
    },
    /// `save_token`; the token's `refresh_token` has already been dropped.
    SaveToken {
        /// Provider name.
        provider: String,
        /// Bucket name.
        bucket: String,
        /// The incoming token, without refresh token.
        token: Token,
    },
    /// `remove_token`
    RemoveToken {
        /// Provider name.
        provider: String,
        /// Bucket name.
        bucket: String,
    },
    /// `list_providers`
    ListProviders,
    /// `list_buckets`
    ListBuckets {
        /// Provider name.
        provider: String,
    },
    /// `get_bucket_stats`
    GetBucketStats {
        /// Provider name.
        provider: String,
        /// Bucket name.
        bucket: String,
    },
    /// `get_api_key`
    GetApiKey {
        /// Key name.
        name: String,
    },
    /// `list_api_keys`
    ListApiKeys,
    /// `has_api_key`
    HasApiKey {
        /// Key name.
        name: String,
    },
}

fn name_field(
    payload: &Map<String, Value>,
    field: &str,
    kind: NameKind,
) -> Result<String, Rejection> {
    match payload.get(field) {
        Some(Value::String(s)) => names::check(kind, s)
            .map(|()| s.clone())
            .map_err(Rejection::invalid),
        Some(_) => Err(Rejection::invalid(format!("{field} must be a string"))),
        None => Err(Rejection::invalid(format!("missing {field}"))),
    }
}

fn bucket_field(payload: &Map<String, Value>) -> Result<String, Rejection> {
    match payload.get("bucket") {
        None | Some(Value::Null) => Ok(DEFAULT_BUCKET.to_owned()),
        Some(_) => name_field(payload, "bucket", NameKind::Bucket),
    }
}

impl Request {
    /// Checks the payload of `op` (§6, §7). Unknown extra payload fields are ignored.
    pub fn parse(op: Op, mut payload: Map<String, Value>) -> Result<Request, Rejection> {
        let provider = || name_field(&payload, "provider", NameKind::Provider);
        Ok(match op {
            Op::GetToken => Request::GetToken {
                provider: provider()?,
                bucket: bucket_field(&payload)?,
            },
            Op::RemoveToken => Request::RemoveToken {
                provider: provider()?,
                bucket: bucket_field(&payload)?,
            },
            Op::GetBucketStats => Request::GetBucketStats {
                provider: provider()?,
                bucket: bucket_field(&payload)?,
            },
            Op::SaveToken => {
                let (provider, bucket) = (provider()?, bucket_field(&payload)?);
                let token = match payload.remove("token") {
                    None => return Err(Rejection::invalid("missing token")),
                    Some(value) => {
                        Token::from_client(value).map_err(|e| Rejection::invalid(e.to_string()))?
                    }
                };
                Request::SaveToken {
                    provider,
                    bucket,
                    token,
                }
            }
            Op::ListProviders => Request::ListProviders,
            Op::ListBuckets => Request::ListBuckets {
                provider: provider()?,
            },
            Op::GetApiKey => Request::GetApiKey {
                name: name_field(&payload, "name", NameKind::Key)?,
            },
            Op::ListApiKeys => Request::ListApiKeys,
            Op::HasApiKey => Request::HasApiKey {
                name: name_field(&payload, "name", NameKind::Key)?,
            },
        })
    }

    /// The operation of this request.
    pub fn op(&self) -> Op {
        match self {
            Request::GetToken { .. } => Op::GetToken,
            Request::SaveToken { .. } => Op::SaveToken,
            Request::RemoveToken { .. } => Op::RemoveToken,
            Request::ListProviders => Op::ListProviders,
            Request::ListBuckets { .. } => Op::ListBuckets,
            Request::GetBucketStats { .. } => Op::GetBucketStats,
            Request::GetApiKey { .. } => Op::GetApiKey,
            Request::ListApiKeys => Op::ListApiKeys,
            Request::HasApiKey { .. } => Op::HasApiKey,
        }
    }

    /// The provider, bucket and key named, for logging (names are not secret).
    pub fn target(&self) -> Target<'_> {
        let mut t = Target::default();
        match self {
            Request::GetToken { provider, bucket }
            | Request::SaveToken {
                provider, bucket, ..
            }
            | Request::RemoveToken { provider, bucket }
            | Request::GetBucketStats { provider, bucket } => {
                t.provider = Some(provider);
                t.bucket = Some(bucket);
            }
            Request::ListBuckets { provider } => t.provider = Some(provider),
            Request::GetApiKey { name } | Request::HasApiKey { name } => t.key = Some(name),
            Request::ListProviders | Request::ListApiKeys => {}
        }
        t
    }
}

/// What a request names, for the request log line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Target<'a> {
    /// The provider.
    pub provider: Option<&'a str>,
    /// The bucket.
    pub bucket: Option<&'a str>,
    /// The API key name.
    pub key: Option<&'a str>,
}

/// Shows the id, the operation and the payload's field names, never their values (a
/// payload may carry a token).
impl std::fmt::Debug for Envelope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Envelope")
            .field("id", &self.id)
            .field("op", &self.op)
            .field("payload_fields", &self.payload.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// The `data` of a success reply.
pub enum ReplyData {
    /// A sanitized token.
    Token(Token),
    /// Any other JSON object (lists, stats, `{}`). API keys are carried here as
    /// `{"key": ...}` built at the last moment and wiped after serialization.
    Json(Value),
}

/// Shows the kind of data only: it may be a token or an API key.
impl std::fmt::Debug for ReplyData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReplyData::Token(t) => f.debug_tuple("Token").field(t).finish(),
            ReplyData::Json(_) => f.write_str("Json(..)"),
        }
    }
}

impl Serialize for ReplyData {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            ReplyData::Token(t) => t.serialize(s),
            ReplyData::Json(v) => v.serialize(s),
        }
    }
}

impl Drop for ReplyData {
    fn drop(&mut self) {
        if let ReplyData::Json(v) = self {
            crate::secret::wipe_json(v);
        }
    }
}

#[derive(Serialize)]
struct OkReply<'a> {
    v: u8,
    id: &'a str,
    ok: bool,
    data: &'a ReplyData,
}

#[derive(Serialize)]
struct ErrReply<'a> {
    v: u8,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    op: Option<&'a str>,
    ok: bool,
    code: &'static str,
    error: &'a str,
    #[serde(rename = "retryAfter", skip_serializing_if = "Option::is_none")]
    retry_after: Option<u64>,
}

/// Serializes a success reply body.
pub fn ok_reply(id: &str, data: &ReplyData) -> Vec<u8> {
    let reply = OkReply {
        v: 1,
        id,
        ok: true,
        data,
    };
    // Sized for a typical token reply, so the buffer (which may hold a secret) is not
    // reallocated, leaving unwiped copies behind, in the common case.
    let mut out = Vec::with_capacity(512);
    match serde_json::to_writer(&mut out, &reply) {
        Ok(()) => out,
        Err(_) => Vec::new(),
    }
}

/// Serializes an error reply body. `id` is `None` only for the frame sent before a close;
/// `op` is `Some("handshake")` only for handshake replies.
pub fn error_reply(
    id: Option<&str>,
    op: Option<&str>,
    code: ErrorCode,
    message: &str,
    retry_after: Option<u64>,
) -> Vec<u8> {
    let reply = ErrReply {
        v: 1,
        id,
        op,
        ok: false,
        code: code.as_str(),
        error: message,
        retry_after,
    };
    serde_json::to_vec(&reply).unwrap_or_default()
}

/// The handshake success reply.
pub fn handshake_ok(version: i64) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "v": 1, "op": "handshake", "ok": true, "data": {"version": version}
    }))
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().cloned().expect("object")
    }

    #[test]
    fn negotiation() {
        let hs = |p: Value| negotiate(&obj(json!({"v":1,"op":"handshake","payload":p})));
        assert_eq!(
            hs(json!({"minVersion":1,"maxVersion":1})),
            Handshake::Agreed(1)
        );
        assert_eq!(
            hs(json!({"minVersion":1,"maxVersion":5})),
            Handshake::Agreed(1)
        );
        assert_eq!(
            hs(json!({"minVersion":2,"maxVersion":3})),
            Handshake::NoVersion
        );
        assert_eq!(
            hs(json!({"minVersion":1,"maxVersion":0})),
            Handshake::NoVersion
        );
        assert_eq!(
            hs(json!({"minVersion":"1","maxVersion":1})),
            Handshake::NoVersion
        );
        assert_eq!(hs(json!({})), Handshake::Agreed(1));
        assert_eq!(
            negotiate(&obj(json!({"v":2,"op":"handshake"}))),
            Handshake::NoVersion
        );
        assert_eq!(
            negotiate(&obj(json!({"v":1,"op":"get_token"}))),
            Handshake::NotHandshake
        );
    }

    #[test]
    fn envelope_rules() {
        let e = parse_envelope(obj(json!({"id":7,"op":"x"}))).expect("int id");
        assert_eq!((e.id.as_str(), e.payload.len()), ("7", 0));
        let (id, r) = parse_envelope(obj(json!({"op":"x"}))).unwrap_err();
        assert_eq!(
            (id.as_str(), r.code),
            (UNKNOWN_ID, ErrorCode::InvalidRequest)
        );
        let long = "x".repeat(129);
        assert_eq!(
            parse_envelope(obj(json!({"id":long,"op":"x"})))
                .unwrap_err()
                .0,
            UNKNOWN_ID
        );
        assert!(parse_envelope(obj(json!({"id":"a","op":"x","payload":[1]}))).is_err());
        assert!(parse_envelope(obj(json!({"id":"","op":"x"}))).is_err());
        assert!(parse_envelope(obj(json!({"id":1.5,"op":"x"}))).is_err());
        assert_eq!(
            parse_op("toString").unwrap_err().message,
            "unknown operation: toString"
        );
    }

    #[test]
    fn payload_rules() {
        let r = Request::parse(Op::GetToken, obj(json!({"provider":"p"}))).expect("ok");
        let t = r.target();
        assert_eq!(
            (t.provider, t.bucket, t.key),
            (Some("p"), Some("default"), None)
        );
        assert!(Request::parse(Op::GetToken, obj(json!({"provider":"../x"}))).is_err());
        assert!(Request::parse(Op::GetToken, obj(json!({"provider":1}))).is_err());
        assert!(Request::parse(Op::GetApiKey, obj(json!({"name":"a@b"}))).is_err());
        assert!(Request::parse(
            Op::SaveToken,
            obj(json!({"provider":"p","token":{"access_token":"a"}}))
        )
        .is_err());
    }

    #[test]
    fn replies() {
        let body = error_reply(
            Some("1"),
            None,
            ErrorCode::RateLimited,
            "slow down",
            Some(1),
        );
        let v: Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(
            v,
            json!({"v":1,"id":"1","ok":false,"code":"RATE_LIMITED","error":"slow down","retryAfter":1})
        );
        let body = ok_reply("9", &ReplyData::Json(json!({})));
        assert_eq!(
            serde_json::from_slice::<Value>(&body).expect("json"),
            json!({"v":1,"id":"9","ok":true,"data":{}})
        );
    }
}
