//! Redacting, zeroizing holders for secret material.
//!
//! Every access token, refresh token and API key that credproxy holds lives in one of
//! these types. Their `Debug` and `Display` print a placeholder, so a derived `Debug` on
//! any struct that carries them can never leak a value into a log line, and their memory
//! is overwritten when they are dropped or cleared.

use std::fmt;

use zeroize::Zeroize;

/// The text every redacting type prints instead of its value.
pub const REDACTED: &str = "[redacted]";

/// A secret string (an API key, or a token's text) that is wiped on drop.
///
/// Read it with [`Secret::expose`] at the one place that must write it out (the reply
/// frame or the store file).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Takes ownership of `value`; the caller's copy moves in, so no other copy remains.
    pub fn new(value: String) -> Self {
        Secret(value)
    }

    /// The secret value. Callers must not log or format it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// True when the value is the empty string.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

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
        Secret(value)
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Secret(value.to_owned())
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
