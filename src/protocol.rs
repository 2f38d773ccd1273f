//! Wire types of the protocol (PROTOCOL.md §4, §5, §7, §10, and version 2 in §13): error
//! codes, operations, the handshake's negotiation, request parsing and reply building.
//! No I/O here.

use std::borrow::Cow;
use std::fmt;

use serde::Serialize;
use serde_json::Value;

use crate::capability::CapabilityDigest;
use crate::envelope::{self, Frame, FrameError, Payload, PayloadField, Scalar};
use crate::names::{self, NameKind, DEFAULT_BUCKET};
use crate::token::{ServedToken, Token};

/// The protocol versions this server speaks.
pub const SUPPORTED_VERSIONS: &[i64] = &[1, 2];

/// The highest version this server speaks: the `v` of a rejected handshake and of the
/// error frame before a close on a connection with no version yet (§13).
pub const HIGHEST_VERSION: i64 = 2;

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
    /// The token cannot be refreshed on the host: no token endpoint for the provider, or
    /// no refresh token stored (§14).
    RefreshNotAvailable,
    /// The token endpoint refused the refresh token: a new login on the host is needed
    /// (§14).
    ReauthRequired,
    /// A refresh failed for another reason, after its retries (§14).
    RefreshFailed,
    /// The request was cancelled by the client (§13).
    Cancelled,
    /// The reply would exceed the connection's frame limit (§3, §13).
    ResponseTooLarge,
}

impl ErrorCode {
    /// Every code, in the order of PROTOCOL.md §10.
    pub const ALL: [ErrorCode; 13] = [
        ErrorCode::InvalidRequest,
        ErrorCode::UnknownVersion,
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::NotFound,
        ErrorCode::RateLimited,
        ErrorCode::ResourceExhausted,
        ErrorCode::InternalError,
        ErrorCode::RefreshNotAvailable,
        ErrorCode::ReauthRequired,
        ErrorCode::RefreshFailed,
        ErrorCode::Cancelled,
        ErrorCode::ResponseTooLarge,
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
            ErrorCode::RefreshNotAvailable => "REFRESH_NOT_AVAILABLE",
            ErrorCode::ReauthRequired => "REAUTH_REQUIRED",
            ErrorCode::RefreshFailed => "REFRESH_FAILED",
            ErrorCode::Cancelled => "CANCELLED",
            ErrorCode::ResponseTooLarge => "RESPONSE_TOO_LARGE",
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
    /// `refresh_token` (§14)
    RefreshToken,
    /// `cancel` (§13)
    Cancel,
}

impl Op {
    /// Every operation.
    pub const ALL: [Op; 11] = [
        Op::GetToken,
        Op::SaveToken,
        Op::RemoveToken,
        Op::ListProviders,
        Op::ListBuckets,
        Op::GetBucketStats,
        Op::GetApiKey,
        Op::ListApiKeys,
        Op::HasApiKey,
        Op::RefreshToken,
        Op::Cancel,
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
            Op::RefreshToken => "refresh_token",
            Op::Cancel => "cancel",
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

/// Parses a frame body; anything but a JSON object ends the connection (§3), with the
/// text to send before closing.
pub fn parse_frame(body: &[u8]) -> Result<Frame<'_>, &'static str> {
    envelope::parse_frame(body).map_err(|e| match e {
        FrameError::NotObject => "request must be a JSON object",
        FrameError::NotJson => "request is not valid UTF-8 JSON",
    })
}

/// The outcome of a handshake frame (§4, §13).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handshake {
    /// Agreed on this version.
    Agreed(i64),
    /// The first frame was not a handshake.
    NotHandshake,
    /// No version in common, or the version fields are unusable.
    NoVersion,
    /// The server was started with a capability token and the handshake did not present
    /// it (missing, not a string, or wrong).
    Unauthorized,
}

/// Negotiates the version from the first frame of a connection (§4), then, when the server
/// has a capability token, checks the one presented (§13: the version is checked first).
/// A server without a token ignores one a client presents.
pub fn negotiate(frame: &Frame<'_>, capability: Option<&CapabilityDigest>) -> Handshake {
    let agreed = match negotiate_version(frame) {
        Handshake::Agreed(version) => version,
        other => return other,
    };
    if let Some(digest) = capability {
        let presented = match &frame.payload {
            Some(PayloadField::Object(p)) => p.capability_token.as_ref().and_then(Scalar::as_str),
            _ => None,
        };
        if !presented.is_some_and(|token| digest.verify(token)) {
            return Handshake::Unauthorized;
        }
    }
    Handshake::Agreed(agreed)
}

fn negotiate_version(frame: &Frame<'_>) -> Handshake {
    if frame.op.as_ref().and_then(Scalar::as_str) != Some("handshake") {
        return Handshake::NotHandshake;
    }
    if let Some(PayloadField::Object(p)) = &frame.payload {
        if let (Some(min), Some(max)) = (&p.min_version, &p.max_version) {
            return match (min, max) {
                (Scalar::Int(lo), Scalar::Int(hi)) if lo <= hi => SUPPORTED_VERSIONS
                    .iter()
                    .rev()
                    .find(|v| (*lo..=*hi).contains(&i128::from(**v)))
                    .map_or(Handshake::NoVersion, |v| Handshake::Agreed(*v)),
                _ => Handshake::NoVersion,
            };
        }
    }
    match &frame.v {
        Some(Scalar::Int(v)) => match i64::try_from(*v) {
            Ok(v) if SUPPORTED_VERSIONS.contains(&v) => Handshake::Agreed(v),
            _ => Handshake::NoVersion,
        },
        _ => Handshake::NoVersion,
    }
}

/// A request whose envelope is well formed (§5); the operation is not checked yet.
#[derive(Debug)]
pub struct Envelope<'a> {
    /// The request id (an integer id already turned into its decimal string).
    pub id: String,
    /// The operation name as sent.
    pub op: Cow<'a, str>,
    /// The payload (empty when missing).
    pub payload: Payload<'a>,
}

/// Checks the envelope of a request. On failure returns the id to answer with (the
/// request's own when it was usable, else [`UNKNOWN_ID`]) and the rejection.
pub fn parse_envelope(frame: Frame<'_>) -> Result<Envelope<'_>, (String, Rejection)> {
    let id = match frame.id {
        Some(Scalar::Str(s)) if !s.is_empty() && s.len() <= MAX_ID_LEN => s.into_owned(),
        Some(Scalar::Int(n)) => n.to_string(),
        Some(Scalar::Str(s)) if s.len() > MAX_ID_LEN => {
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
    let op = match frame.op {
        Some(Scalar::Str(op)) => op,
        Some(_) => return Err((id, Rejection::invalid("op must be a string"))),
        None => return Err((id, Rejection::invalid("missing op"))),
    };
    let payload = match frame.payload {
        None => Payload::default(),
        Some(PayloadField::Object(p)) => p,
        Some(PayloadField::NotObject) => {
            return Err((id, Rejection::invalid("payload must be an object")))
        }
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
    /// `refresh_token` (§14)
    RefreshToken {
        /// Provider name.
        provider: String,
        /// Bucket name (`default` when omitted).
        bucket: String,
    },
    /// `cancel` (§13); the session answers it itself.
    Cancel {
        /// The id of the request to cancel.
        target_id: String,
    },
}

fn name_field(field: &Option<Scalar<'_>>, name: &str, kind: NameKind) -> Result<String, Rejection> {
    match field {
        Some(Scalar::Str(s)) => names::check(kind, s)
            .map(|()| s.as_ref().to_owned())
            .map_err(Rejection::invalid),
        Some(_) => Err(Rejection::invalid(format!("{name} must be a string"))),
        None => Err(Rejection::invalid(format!("missing {name}"))),
    }
}

fn bucket_field(payload: &Payload<'_>) -> Result<String, Rejection> {
    match payload.bucket {
        None | Some(Scalar::Null) => Ok(DEFAULT_BUCKET.to_owned()),
        Some(_) => name_field(&payload.bucket, "bucket", NameKind::Bucket),
    }
}

impl Request {
    /// Checks the payload of `op` (§6, §7). Unknown extra payload fields are ignored.
    pub fn parse(op: Op, mut payload: Payload<'_>) -> Result<Request, Rejection> {
        let provider = |p: &Payload<'_>| name_field(&p.provider, "provider", NameKind::Provider);
        Ok(match op {
            Op::GetToken => Request::GetToken {
                provider: provider(&payload)?,
                bucket: bucket_field(&payload)?,
            },
            Op::RemoveToken => Request::RemoveToken {
                provider: provider(&payload)?,
                bucket: bucket_field(&payload)?,
            },
            Op::GetBucketStats => Request::GetBucketStats {
                provider: provider(&payload)?,
                bucket: bucket_field(&payload)?,
            },
            Op::RefreshToken => Request::RefreshToken {
                provider: provider(&payload)?,
                bucket: bucket_field(&payload)?,
            },
            Op::SaveToken => {
                let (provider, bucket) = (provider(&payload)?, bucket_field(&payload)?);
                let token = match payload.take_token() {
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
                provider: provider(&payload)?,
            },
            Op::GetApiKey => Request::GetApiKey {
                name: name_field(&payload.name, "name", NameKind::Key)?,
            },
            Op::ListApiKeys => Request::ListApiKeys,
            Op::HasApiKey => Request::HasApiKey {
                name: name_field(&payload.name, "name", NameKind::Key)?,
            },
            Op::Cancel => match &payload.target_id {
                Some(Scalar::Str(id)) => Request::Cancel {
                    target_id: id.as_ref().to_owned(),
                },
                Some(_) => return Err(Rejection::invalid("targetId must be a string")),
                None => return Err(Rejection::invalid("missing targetId")),
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
            Request::RefreshToken { .. } => Op::RefreshToken,
            Request::Cancel { .. } => Op::Cancel,
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
            | Request::GetBucketStats { provider, bucket }
            | Request::RefreshToken { provider, bucket } => {
                t.provider = Some(provider);
                t.bucket = Some(bucket);
            }
            Request::ListBuckets { provider } => t.provider = Some(provider),
            Request::GetApiKey { name } | Request::HasApiKey { name } => t.key = Some(name),
            Request::ListProviders | Request::ListApiKeys | Request::Cancel { .. } => {}
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

/// The `data` of a success reply.
pub enum ReplyData {
    /// A token as served: sanitized and already serialized.
    Token(ServedToken),
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

impl Drop for ReplyData {
    fn drop(&mut self) {
        if let ReplyData::Json(v) = self {
            crate::secret::wipe_json(v);
        }
    }
}

#[derive(Serialize)]
struct ErrReply<'a> {
    v: i64,
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

/// Start of a success reply, up to the version digit.
const OK_HEAD: &[u8] = br#"{"v":"#;
/// Between the version digit and the id of a success reply.
const OK_ID: &[u8] = br#","id":"#;
/// Between the id and the data of a success reply.
const OK_DATA: &[u8] = br#","ok":true,"data":"#;

/// The largest served token (its JSON without refresh token, as `get_token` carries it)
/// whose reply still fits in one frame of `frame_limit` bytes for any request id the
/// protocol accepts: the limit minus the envelope around the data, with an id of
/// [`MAX_ID_LEN`] bytes that each escape to six (`\u0001`).
pub const fn served_token_limit(frame_limit: usize) -> usize {
    frame_limit - (OK_HEAD.len() + 1 + OK_ID.len() + 2 + 6 * MAX_ID_LEN + OK_DATA.len() + 1)
}

/// The largest served token the store accepts: one that a version-2 connection can
/// always carry (§13). A `save_token` (or `store token set`) whose merged result would be
/// larger is refused, so that every stored token can be served. A token larger than
/// [`MAX_SERVED_TOKEN_LEN_V1`] is answered `RESPONSE_TOO_LARGE` on a version-1 connection.
pub const MAX_SERVED_TOKEN_LEN: usize = served_token_limit(crate::codec::MAX_FRAME_LEN_V2);

/// The largest served token a version-1 connection can always carry.
pub const MAX_SERVED_TOKEN_LEN_V1: usize = served_token_limit(crate::codec::MAX_FRAME_LEN);

/// The ASCII digit of a negotiated version (1 or 2; anything else is written as the
/// highest).
fn version_digit(version: i64) -> u8 {
    match version {
        1 => b'1',
        _ => b'0' + HIGHEST_VERSION as u8,
    }
}

/// Serializes a success reply body: `{"v":<version>,"id":…,"ok":true,"data":…}`.
pub fn ok_reply(version: i64, id: &str, data: &ReplyData) -> Vec<u8> {
    const HEAD: &[u8] = OK_HEAD;
    const OK: &[u8] = OK_DATA;
    // Sized up front so that the buffer (which may hold a secret: a token, an API key)
    // is never reallocated, leaving unwiped copies behind. An id escapes to at most six
    // bytes a byte; other data is measured by a first, counting serialization.
    let data_len = match data {
        ReplyData::Token(t) => t.json().len(),
        ReplyData::Json(v) => crate::token::json_len(v),
    };
    let mut out = Vec::with_capacity(
        HEAD.len() + 1 + OK_ID.len() + 2 + 6 * id.len() + OK.len() + data_len + 1,
    );
    out.extend_from_slice(HEAD);
    out.push(version_digit(version));
    out.extend_from_slice(OK_ID);
    // A string always serializes.
    let _ = serde_json::to_writer(&mut out, id);
    out.extend_from_slice(OK);
    match data {
        ReplyData::Token(t) => out.extend_from_slice(t.json()),
        ReplyData::Json(v) => {
            if serde_json::to_writer(&mut out, v).is_err() {
                return Vec::new();
            }
        }
    }
    out.push(b'}');
    out
}

/// Serializes an error reply body. `version` is the connection's negotiated version, or
/// [`HIGHEST_VERSION`] before the handshake (§13). `id` is `None` only for the frame sent
/// before a close; `op` is `Some("handshake")` only for handshake replies.
pub fn error_reply(
    version: i64,
    id: Option<&str>,
    op: Option<&str>,
    code: ErrorCode,
    message: &str,
    retry_after: Option<u64>,
) -> Vec<u8> {
    let reply = ErrReply {
        v: version,
        id,
        op,
        ok: false,
        code: code.as_str(),
        error: message,
        retry_after,
    };
    serde_json::to_vec(&reply).unwrap_or_default()
}

/// The handshake success reply, carrying the negotiated version as `v` too (§13).
pub fn handshake_ok(version: i64) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "v": version, "op": "handshake", "ok": true, "data": {"version": version}
    }))
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn largest_servable_token_fills_a_frame_with_the_costliest_id() {
        let token = |pad: usize| {
            crate::token::Token::from_value(
                json!({"access_token":"a","expiry":1,"token_type":"B","pad":"x".repeat(pad)}),
            )
            .expect("valid token")
            .served()
        };
        let base = token(0).json().len();
        let worst_id = "\u{1}".repeat(MAX_ID_LEN);
        for (version, limit, frame) in [
            (1, MAX_SERVED_TOKEN_LEN_V1, crate::codec::MAX_FRAME_LEN),
            (2, MAX_SERVED_TOKEN_LEN, crate::codec::MAX_FRAME_LEN_V2),
        ] {
            let largest = token(limit - base);
            assert_eq!(largest.json().len(), limit);
            let reply = ok_reply(version, &worst_id, &ReplyData::Token(largest));
            assert_eq!(reply.len(), frame, "exactly one frame at v{version}");
        }
    }

    /// Runs `f` on the frame of `v` serialized.
    fn with_frame<R>(v: Value, f: impl FnOnce(Frame<'_>) -> R) -> R {
        let body = serde_json::to_vec(&v).expect("json");
        f(parse_frame(&body).expect("object"))
    }

    fn negotiate_json(v: Value) -> Handshake {
        with_frame(v, |f| negotiate(&f, None))
    }

    fn envelope_json(v: Value) -> Result<(String, String), (String, Rejection)> {
        with_frame(v, |f| {
            parse_envelope(f).map(|e| (e.id, format!("{:?}", e.payload)))
        })
    }

    fn request(op: Op, payload: Value) -> Result<Request, Rejection> {
        with_frame(json!({"id":"1","op":"x","payload":payload}), |f| {
            Request::parse(op, parse_envelope(f).expect("envelope").payload)
        })
    }

    #[test]
    fn frame_errors() {
        assert_eq!(
            parse_frame(b"[1]").unwrap_err(),
            "request must be a JSON object"
        );
        assert_eq!(
            parse_frame(b"{").unwrap_err(),
            "request is not valid UTF-8 JSON"
        );
    }

    #[test]
    fn negotiation() {
        let hs = |p: Value| negotiate_json(json!({"v":1,"op":"handshake","payload":p}));
        assert_eq!(
            hs(json!({"minVersion":1,"maxVersion":1})),
            Handshake::Agreed(1)
        );
        assert_eq!(
            hs(json!({"minVersion":1,"maxVersion":5})),
            Handshake::Agreed(2)
        );
        assert_eq!(
            hs(json!({"minVersion":1,"maxVersion":2})),
            Handshake::Agreed(2)
        );
        assert_eq!(
            hs(json!({"minVersion":2,"maxVersion":3})),
            Handshake::Agreed(2)
        );
        assert_eq!(
            hs(json!({"minVersion":3,"maxVersion":4})),
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
            negotiate_json(json!({"v":2,"op":"handshake"})),
            Handshake::Agreed(2)
        );
        assert_eq!(
            negotiate_json(json!({"v":3,"op":"handshake"})),
            Handshake::NoVersion
        );
        // The capability token is checked after the version (§13).
        let token = crate::capability::CapabilityToken::generate();
        let digest = token.digest();
        let with = |p: Value| {
            with_frame(json!({"v":1,"op":"handshake","payload":p}), |f| {
                negotiate(&f, Some(&digest))
            })
        };
        let t = token.expose();
        assert_eq!(
            with(json!({"minVersion":1,"maxVersion":2,"capabilityToken":t})),
            Handshake::Agreed(2)
        );
        assert_eq!(
            with(json!({"minVersion":1,"maxVersion":2})),
            Handshake::Unauthorized
        );
        assert_eq!(
            with(json!({"minVersion":1,"maxVersion":2,"capabilityToken":7})),
            Handshake::Unauthorized
        );
        assert_eq!(
            with(json!({"minVersion":3,"maxVersion":4,"capabilityToken":t})),
            Handshake::NoVersion
        );
        assert_eq!(
            negotiate_json(json!({"v":1,"op":"get_token"})),
            Handshake::NotHandshake
        );
    }

    #[test]
    fn envelope_rules() {
        let (id, payload) = envelope_json(json!({"id":7,"op":"x"})).expect("int id");
        assert_eq!((id.as_str(), payload.as_str()), ("7", "[]"));
        let (id, r) = envelope_json(json!({"op":"x"})).unwrap_err();
        assert_eq!(
            (id.as_str(), r.code),
            (UNKNOWN_ID, ErrorCode::InvalidRequest)
        );
        let long = "x".repeat(129);
        assert_eq!(
            envelope_json(json!({"id":long,"op":"x"})).unwrap_err().0,
            UNKNOWN_ID
        );
        assert!(envelope_json(json!({"id":"a","op":"x","payload":[1]})).is_err());
        assert!(envelope_json(json!({"id":"a","op":"x","payload":null})).is_err());
        assert!(envelope_json(json!({"id":"","op":"x"})).is_err());
        assert!(envelope_json(json!({"id":1.5,"op":"x"})).is_err());
        assert_eq!(
            envelope_json(
                json!({"id":"a","op":"x","payload":{"provider":"p","token":{"a":"SECRET"}}})
            )
            .expect("envelope")
            .1,
            r#"["provider", "token"]"#
        );
        assert_eq!(
            parse_op("toString").unwrap_err().message,
            "unknown operation: toString"
        );
    }

    #[test]
    fn payload_rules() {
        let r = request(Op::GetToken, json!({"provider":"p"})).expect("ok");
        let t = r.target();
        assert_eq!(
            (t.provider, t.bucket, t.key),
            (Some("p"), Some("default"), None)
        );
        assert!(request(Op::GetToken, json!({"provider":"../x"})).is_err());
        assert!(request(Op::GetToken, json!({"provider":1})).is_err());
        assert!(request(Op::GetApiKey, json!({"name":"a@b"})).is_err());
        // A partial token passes the payload check (the store merges it, §7); a field of
        // the wrong type does not.
        assert!(request(
            Op::SaveToken,
            json!({"provider":"p","token":{"access_token":"a"}})
        )
        .is_ok());
        assert!(request(
            Op::SaveToken,
            json!({"provider":"p","token":{"access_token":"a","expiry":"1"}})
        )
        .is_err());
        let r = request(
            Op::SaveToken,
            json!({"provider":"p","bucket":null,"token":{"access_token":"a","expiry":1,"token_type":"B","refresh_token":"R"}}),
        )
        .expect("save");
        let Request::SaveToken { bucket, token, .. } = r else {
            panic!("save_token")
        };
        assert_eq!(bucket, "default");
        assert!(
            !token.has_refresh_token(),
            "the client's refresh token is dropped"
        );
    }

    #[test]
    fn replies() {
        let body = error_reply(
            1,
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
        let body = ok_reply(1, "9", &ReplyData::Json(json!({})));
        assert_eq!(
            serde_json::from_slice::<Value>(&body).expect("json"),
            json!({"v":1,"id":"9","ok":true,"data":{}})
        );
        let token = Token::from_value(
            json!({"access_token":"a","expiry":1,"token_type":"B","refresh_token":"R"}),
        )
        .expect("token");
        // A long API key: the buffer is sized for it, never grown (a reallocation
        // would leave an unwiped copy of the key behind).
        let body = ok_reply(1, "1", &ReplyData::Json(json!({"key": "k".repeat(5000)})));
        assert!(
            body.capacity() <= body.len() + 8,
            "{} > {}",
            body.capacity(),
            body.len()
        );
        let id = "q\"\u{1}\\é";
        let body = ok_reply(1, id, &ReplyData::Token(token.served()));
        assert_eq!(
            serde_json::from_slice::<Value>(&ok_reply(2, "x", &ReplyData::Json(json!({}))))
                .expect("json"),
            json!({"v":2,"id":"x","ok":true,"data":{}})
        );
        assert_eq!(
            serde_json::from_slice::<Value>(&body).expect("json"),
            json!({"v":1,"id":id,"ok":true,"data":{"access_token":"a","expiry":1,"token_type":"B"}})
        );
    }
}
