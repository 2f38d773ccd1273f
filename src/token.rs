//! The OAuth token shape, and the sanitize and merge rules (PROTOCOL.md §6).
//!
//! A [`Token`] is a JSON object with at least `access_token` (non-empty string), `expiry`
//! (number, epoch seconds) and `token_type` (string); `refresh_token` (string) and `scope`
//! (string or null) are optional and every other field is kept as it is. Its `Debug`
//! prints only field names, and every string in it is wiped on drop.

use std::fmt;
use std::io;
use std::sync::Arc;

use serde::ser::SerializeMap;
use serde_json::{Map, Value};

use crate::memory::LockedBytes;
use crate::secret::wipe_json;

/// The field that must never cross the socket.
pub const REFRESH_TOKEN: &str = "refresh_token";

/// Why a JSON value is not a valid token. The text is safe to send to a client: it names
/// fields, never values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// The value is not a JSON object.
    #[error("token must be a JSON object")]
    NotAnObject,
    /// The text is not valid JSON (position only, never content).
    #[error("token is not valid JSON (line {line}, column {column})")]
    NotJson {
        /// Line of the first error.
        line: usize,
        /// Column of the first error.
        column: usize,
    },
    /// A required field is absent.
    #[error("token is missing {0}")]
    Missing(&'static str),
    /// A field has the wrong JSON type or an empty value.
    #[error("token field {0} {1}")]
    BadField(&'static str, &'static str),
}

/// A validated token. Every string in it is wiped when it is dropped.
#[derive(Clone, PartialEq)]
pub struct Token {
    fields: Map<String, Value>,
}

impl Token {
    /// Validates a JSON value as a token, keeping every field (including `refresh_token`).
    pub fn from_value(value: Value) -> Result<Token, TokenError> {
        match value {
            Value::Object(fields) => Token::from_map(fields),
            mut other => {
                wipe_json(&mut other);
                Err(TokenError::NotAnObject)
            }
        }
    }

    /// Validates a JSON object as a token.
    pub fn from_map(fields: Map<String, Value>) -> Result<Token, TokenError> {
        // Wrap first so that the fields are wiped on the error path too.
        let token = Token { fields };
        token.validate()?;
        Ok(token)
    }

    /// Parses and validates token JSON text (the store file, or `credproxy store` input).
    pub fn from_json(text: &[u8]) -> Result<Token, TokenError> {
        let value: Value = serde_json::from_slice(text).map_err(|e| TokenError::NotJson {
            line: e.line(),
            column: e.column(),
        })?;
        Token::from_value(value)
    }

    fn validate(&self) -> Result<(), TokenError> {
        self.check_fields(true)
    }

    /// Checks the type of every known field present; with `complete`, also that the
    /// required ones (`access_token`, `expiry`, `token_type`) are there.
    fn check_fields(&self, complete: bool) -> Result<(), TokenError> {
        match self.fields.get("access_token") {
            None if !complete => {}
            None => return Err(TokenError::Missing("access_token")),
            Some(Value::String(s)) if !s.is_empty() => {}
            Some(Value::String(_)) => {
                return Err(TokenError::BadField("access_token", "must not be empty"))
            }
            Some(_) => return Err(TokenError::BadField("access_token", "must be a string")),
        }
        match self.fields.get("expiry") {
            None if !complete => {}
            None => return Err(TokenError::Missing("expiry")),
            Some(Value::Number(_)) => {}
            Some(_) => {
                return Err(TokenError::BadField(
                    "expiry",
                    "must be a number (epoch seconds)",
                ))
            }
        }
        match self.fields.get("token_type") {
            None if !complete => {}
            None => return Err(TokenError::Missing("token_type")),
            Some(Value::String(_)) => {}
            Some(_) => return Err(TokenError::BadField("token_type", "must be a string")),
        }
        match self.fields.get(REFRESH_TOKEN) {
            None | Some(Value::String(_)) | Some(Value::Null) => {}
            Some(_) => return Err(TokenError::BadField(REFRESH_TOKEN, "must be a string")),
        }
        match self.fields.get("scope") {
            None | Some(Value::String(_)) | Some(Value::Null) => {}
            Some(_) => return Err(TokenError::BadField("scope", "must be a string or null")),
        }
        Ok(())
    }

    /// Reads a token that arrived from the sandbox (`save_token`): its `refresh_token` is
    /// dropped first, whatever its type, so nothing the client sends can set one. It may
    /// be partial (PROTOCOL.md §7: say, only a new `access_token`): every field present
    /// must have the right type, and the store checks that the result of the merge is
    /// complete ([`Token::check_complete`]).
    pub fn from_client(value: Value) -> Result<Token, TokenError> {
        match value {
            Value::Object(mut fields) => {
                if let Some(mut rt) = fields.remove(REFRESH_TOKEN) {
                    wipe_json(&mut rt);
                }
                let token = Token { fields };
                token.check_fields(false)?;
                Ok(token)
            }
            mut other => {
                wipe_json(&mut other);
                Err(TokenError::NotAnObject)
            }
        }
    }

    /// Checks that the token has every required field (a token from
    /// [`Token::from_client`] may not, until it is merged into a stored one).
    pub fn check_complete(&self) -> Result<(), TokenError> {
        self.check_fields(true)
    }

    /// True when the token carries a non-empty refresh token.
    pub fn has_refresh_token(&self) -> bool {
        matches!(self.fields.get(REFRESH_TOKEN), Some(Value::String(s)) if !s.is_empty())
    }

    /// The copy that may cross the socket: every field but `refresh_token`.
    pub fn sanitized(&self) -> Token {
        let mut copy = self.clone();
        if let Some(mut rt) = copy.fields.remove(REFRESH_TOKEN) {
            wipe_json(&mut rt);
        }
        copy
    }

    /// The form a `get_token` reply carries: every field but `refresh_token`, serialized
    /// once into a shared buffer (see [`ServedToken`]).
    pub fn served(&self) -> ServedToken {
        ServedToken {
            bytes: Arc::new(locked_json(&WithoutRefresh(&self.fields))),
            expiry: self.expiry(),
            has_refresh_token: self.has_refresh_token(),
        }
    }

    /// The `expiry` field in whole epoch seconds (a fraction is cut off; a negative or
    /// missing one is 0, which counts as expired).
    pub fn expiry(&self) -> u64 {
        match self.fields.get("expiry") {
            Some(Value::Number(n)) => n
                .as_u64()
                .or_else(|| n.as_f64().filter(|f| *f > 0.0).map(|f| f as u64))
                .unwrap_or(0),
            _ => 0,
        }
    }

    /// The refresh token, when the token carries a non-empty one. Callers must not log it.
    pub fn refresh_token(&self) -> Option<&str> {
        match self.fields.get(REFRESH_TOKEN) {
            Some(Value::String(s)) if !s.is_empty() => Some(s),
            _ => None,
        }
    }

    /// The whole token (with `refresh_token`) as JSON text in [`LockedBytes`], written in
    /// place with no intermediate copy: how the memory backend keeps it.
    pub fn locked_json(&self) -> LockedBytes {
        locked_json(&self.fields)
    }

    /// The length in bytes of [`Token::served`]'s JSON, measured without building it.
    pub fn served_len(&self) -> usize {
        json_len(&WithoutRefresh(&self.fields))
    }

    /// Merges an incoming token into this stored one (PROTOCOL.md §6): every field present
    /// in `incoming` replaces the stored one, absent fields keep the stored value, and
    /// `refresh_token` keeps the stored value when the incoming one is absent, empty or null.
    pub fn merge(&self, incoming: &Token) -> Token {
        let mut merged = self.clone();
        for (key, value) in &incoming.fields {
            if key == REFRESH_TOKEN {
                let keep_stored = match value {
                    Value::Null => true,
                    Value::String(s) => s.is_empty(),
                    _ => true,
                };
                if keep_stored && merged.fields.contains_key(REFRESH_TOKEN) {
                    continue;
                }
            }
            if let Some(mut old) = merged.fields.insert(key.clone(), value.clone()) {
                wipe_json(&mut old);
            }
        }
        merged
    }

    /// The fields, for serializing into a reply or a file. Callers must not log them.
    pub fn fields(&self) -> &Map<String, Value> {
        &self.fields
    }

    /// Serializes the token as JSON text (for the store file).
    pub fn to_json(&self) -> Vec<u8> {
        // A Map of Values always serializes.
        serde_json::to_vec(&self.fields).unwrap_or_default()
    }
}

/// Serializes a token's fields without `refresh_token`.
struct WithoutRefresh<'a>(&'a Map<String, Value>);

impl serde::Serialize for WithoutRefresh<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let fields = self.0.iter().filter(|(k, _)| k.as_str() != REFRESH_TOKEN);
        let mut map = serializer.serialize_map(None)?;
        for (key, value) in fields {
            map.serialize_entry(key, value)?;
        }
        map.end()
    }
}

/// The length of `value` serialized as JSON (0 if it cannot be), without building it:
/// for sizing a buffer that will hold secrets so that it is never reallocated.
pub fn json_len<T: serde::Serialize + ?Sized>(value: &T) -> usize {
    let mut len = ByteCount(0);
    match serde_json::to_writer(&mut len, value) {
        Ok(()) => len.0,
        Err(_) => 0,
    }
}

/// `value` serialized as JSON straight into locked pages. Sized first, so the bytes are
/// written once and never reallocated (a reallocation would leave an unwiped copy behind).
fn locked_json<T: serde::Serialize + ?Sized>(value: &T) -> LockedBytes {
    let mut out = LockedBytes::zeroed(json_len(value));
    // A map of Values always serializes, and into exactly json_len bytes.
    let _ = serde_json::to_writer(out.as_mut_slice(), value);
    out
}

/// A writer that only counts bytes.
struct ByteCount(usize);

impl io::Write for ByteCount {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A token as it crosses the socket: sanitized (no `refresh_token`) and serialized as a
/// JSON object once, when it is read from the store. Clones share the bytes, so a cached
/// token is served without copying or re-serializing it; the bytes are wiped when the last
/// clone is dropped. The bytes live in [`LockedBytes`] (excluded from core dumps, locked
/// against swap where the limit allows). `Debug` shows the length only.
///
/// Beside the bytes it keeps what `get_token` needs to decide on a refresh without parsing
/// them: the expiry, and whether the stored token (not this sanitized copy) has a refresh
/// token.
#[derive(Clone)]
pub struct ServedToken {
    bytes: Arc<LockedBytes>,
    expiry: u64,
    has_refresh_token: bool,
}

impl ServedToken {
    /// The JSON object text. Callers must not log it.
    pub fn json(&self) -> &[u8] {
        self.bytes.as_slice()
    }

    /// The stored token's `expiry`, epoch seconds (see [`Token::expiry`]).
    pub fn expiry(&self) -> u64 {
        self.expiry
    }

    /// True when the stored token this was served from has a refresh token.
    pub fn has_refresh_token(&self) -> bool {
        self.has_refresh_token
    }

    /// Parses the text back into a [`Token`] (tests and tools; not on the request path).
    pub fn to_token(&self) -> Result<Token, TokenError> {
        Token::from_json(self.json())
    }
}

impl fmt::Debug for ServedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ServedToken({} bytes)", self.json().len())
    }
}

impl PartialEq for ServedToken {
    fn eq(&self, other: &Self) -> bool {
        self.json() == other.json()
    }
}

impl Drop for Token {
    fn drop(&mut self) {
        self.fields.values_mut().for_each(wipe_json);
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("fields", &self.fields.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl serde::Serialize for Token {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.fields.serialize(serializer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn tok(v: Value) -> Token {
        Token::from_value(v).expect("valid token")
    }

    #[test]
    fn validation_rules() {
        assert!(
            Token::from_value(json!({"access_token":"a","expiry":1,"token_type":"Bearer"})).is_ok()
        );
        assert_eq!(
            Token::from_value(json!({"expiry":1,"token_type":"B"})),
            Err(TokenError::Missing("access_token"))
        );
        assert!(Token::from_value(json!({"access_token":"","expiry":1,"token_type":"B"})).is_err());
        assert!(
            Token::from_value(json!({"access_token":"a","expiry":"1","token_type":"B"})).is_err()
        );
        assert!(Token::from_value(json!({"access_token":"a","expiry":1})).is_err());
        assert!(Token::from_value(
            json!({"access_token":"a","expiry":1,"token_type":"B","scope":3})
        )
        .is_err());
        assert!(Token::from_value(
            json!({"access_token":"a","expiry":1.5,"token_type":"B","scope":null})
        )
        .is_ok());
        assert!(Token::from_value(json!([1])).is_err());
    }

    #[test]
    fn sanitize_removes_refresh_token() {
        let t = tok(
            json!({"access_token":"a","expiry":1,"token_type":"B","refresh_token":"R","x":"y"}),
        );
        let s = t.sanitized();
        assert!(!s.fields().contains_key(REFRESH_TOKEN));
        assert_eq!(s.fields()["x"], "y");
        let served = t.served();
        assert_eq!(served.to_token().unwrap(), s);
        assert_eq!(served.json().last(), Some(&b'}'), "sized exactly");
        assert!(!String::from_utf8_lossy(served.json()).contains("\"R\""));
        assert_eq!(
            format!("{served:?}"),
            format!("ServedToken({} bytes)", served.json().len())
        );
    }

    #[test]
    fn client_refresh_token_is_dropped_even_when_malformed() {
        let t = Token::from_client(
            json!({"access_token":"a","expiry":1,"token_type":"B","refresh_token":5}),
        )
        .unwrap();
        assert!(!t.fields().contains_key(REFRESH_TOKEN));
    }

    #[test]
    fn merge_rules() {
        let stored = tok(
            json!({"access_token":"old","expiry":1,"token_type":"B","refresh_token":"R","resource_url":"u"}),
        );
        let incoming = tok(json!({"access_token":"new","expiry":2,"token_type":"B"}));
        let m = stored.merge(&incoming);
        assert_eq!(m.fields()["access_token"], "new");
        assert_eq!(m.fields()["expiry"], 2);
        assert_eq!(m.fields()[REFRESH_TOKEN], "R");
        assert_eq!(m.fields()["resource_url"], "u");
        for empty in [json!(null), json!("")] {
            let inc =
                tok(json!({"access_token":"n","expiry":2,"token_type":"B","refresh_token":empty}));
            assert_eq!(stored.merge(&inc).fields()[REFRESH_TOKEN], "R");
        }
        let inc = tok(json!({"access_token":"n","expiry":2,"token_type":"B","refresh_token":"R2"}));
        assert_eq!(stored.merge(&inc).fields()[REFRESH_TOKEN], "R2");
    }

    #[test]
    fn debug_shows_no_values() {
        let t = tok(
            json!({"access_token":"CANARY1","expiry":1,"token_type":"B","refresh_token":"CANARY2"}),
        );
        let d = format!("{t:?}");
        assert!(!d.contains("CANARY"), "{d}");
        let e = Token::from_value(json!({"access_token":"CANARY","expiry":"x","token_type":"B"}))
            .unwrap_err();
        assert!(!e.to_string().contains("CANARY"));
    }
}
