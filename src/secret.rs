//! Redacting, zeroizing holders for secret material.
//!
//! Every access token, refresh token and API key that credproxy holds lives in one of
//! these types. Their `Debug` and `Display` print a placeholder, so a derived `Debug` on
//! any struct that carries them can never leak a value into a log line, and their memory
//! is overwritten when they are dropped or cleared. A [`Secret`] lives on pages of its own
//! ([`LockedBytes`]: excluded from core dumps, locked against swap where the limit allows).

use std::fmt;
use std::sync::Arc;

use zeroize::Zeroize;

use crate::memory::LockedBytes;

/// The text every redacting type prints instead of its value.
pub const REDACTED: &str = "[redacted]";

/// A secret string (an API key, or a token's text), kept in [`LockedBytes`] and wiped
/// when the last clone is dropped (clones share the bytes).
///
/// Read it with [`Secret::expose`] at the one place that must write it out (the reply
/// frame or the store file).
#[derive(Clone, Default)]
pub struct Secret(Option<Arc<LockedBytes>>);

impl Secret {
    /// Takes `value` into locked pages and wipes the caller's heap copy, so no other copy
    /// remains.
    pub fn new(mut value: String) -> Self {
        let secret = Secret::from_bytes(value.as_bytes());
        value.zeroize();
        secret
    }

    /// A locked copy of `value`.
    fn from_bytes(value: &[u8]) -> Self {
        if value.is_empty() {
            return Secret(None);
        }
        Secret(Some(Arc::new(LockedBytes::from_slice(value))))
    }

    /// The secret value. Callers must not log or format it.
    pub fn expose(&self) -> &str {
        match &self.0 {
            // Only ever built from a str, so always UTF-8.
            Some(bytes) => std::str::from_utf8(bytes.as_slice()).unwrap_or_default(),
            None => "",
        }
    }

    /// True when the value is the empty string.
    pub fn is_empty(&self) -> bool {
        self.0.is_none()
    }
}

impl PartialEq for Secret {
    fn eq(&self, other: &Self) -> bool {
        self.expose() == other.expose()
    }
}

impl Eq for Secret {}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Secret::new(value)
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Secret::from_bytes(value.as_bytes())
    }
}

/// Overwrites every string inside a JSON value (object keys are not secret and stay).
pub fn wipe_json(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::String(s) => s.zeroize(),
        serde_json::Value::Array(items) => items.iter_mut().for_each(wipe_json),
        serde_json::Value::Object(map) => map.values_mut().for_each(wipe_json),
        _ => {}
    }
}

/// A byte buffer that may hold secrets (a serialized reply, a file's contents); wiped on drop.
#[derive(Default)]
pub struct SecretBytes(pub Vec<u8>);

impl Drop for SecretBytes {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{REDACTED} ({} bytes)", self.0.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_redact() {
        let s = Secret::from("canary-secret-value");
        assert_eq!(format!("{s:?}"), REDACTED);
        assert_eq!(format!("{s}"), REDACTED);
        assert_eq!(s.expose(), "canary-secret-value");
        let b = SecretBytes(b"canary".to_vec());
        assert!(!format!("{b:?}").contains("canary"));
    }

    #[test]
    fn wipe_json_clears_nested_strings() {
        let mut v = serde_json::json!({"a": "xyz", "b": ["pq"], "c": {"d": "rs"}, "n": 1});
        wipe_json(&mut v);
        let text = v.to_string();
        assert!(!text.contains("xyz") && !text.contains("pq") && !text.contains("rs"));
    }
}
