//! Provider, bucket and API key names (PROTOCOL.md §6).
//!
//! A name is 1 to 64 characters from `A-Z a-z 0-9 . _ @ -` (API key names without `@`),
//! and never `.` or `..`. Because `/` and NUL can never pass, a valid name can be used as
//! a single path component of the file backend without escaping the store directory.

/// The longest name accepted, in characters (all allowed characters are one byte).
pub const MAX_NAME_LEN: usize = 64;

/// The bucket a request means when it names none.
pub const DEFAULT_BUCKET: &str = "default";

/// What kind of name is being checked; API key names do not allow `@`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameKind {
    /// A provider name such as `anthropic`.
    Provider,
    /// A bucket name such as `default` or `work@example.com`.
    Bucket,
    /// An API key name.
    Key,
}

impl NameKind {
    /// The word used for this kind in error messages.
    pub fn word(self) -> &'static str {
        match self {
            NameKind::Provider => "provider",
            NameKind::Bucket => "bucket",
            NameKind::Key => "key name",
        }
    }
}

/// True when `name` is a valid name of `kind`.
pub fn is_valid(kind: NameKind, name: &str) -> bool {
    if name.is_empty() || name.len() > MAX_NAME_LEN || name == "." || name == ".." {
        return false;
    }
    name.bytes().all(|b| {
        b.is_ascii_alphanumeric()
            || matches!(b, b'.' | b'_' | b'-')
            || (b == b'@' && kind != NameKind::Key)
    })
}

/// Checks `name`, returning a short sentence for a person when it is invalid.
pub fn check(kind: NameKind, name: &str) -> Result<(), String> {
    if is_valid(kind, name) {
        Ok(())
    } else {
        let allowed = if kind == NameKind::Key {
            "A-Z a-z 0-9 . _ -"
        } else {
            "A-Z a-z 0-9 . _ @ -"
        };
        Err(format!(
            "invalid {}: use 1 to {MAX_NAME_LEN} characters from {allowed}, not . or ..",
            kind.word()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_and_rejects() {
        for ok in [
            "anthropic",
            "a",
            "default",
            "work@example.com",
            "x.y_z-1",
            "...",
        ] {
            assert!(is_valid(NameKind::Bucket, ok), "{ok}");
        }
        let long = "a".repeat(65);
        for bad in [
            "", ".", "..", "a/b", "a\0b", "a b", "ä", "ａ", &long, "a\\b", "../x",
        ] {
            assert!(!is_valid(NameKind::Provider, bad), "{bad:?}");
        }
        assert!(is_valid(NameKind::Provider, &"a".repeat(64)));
        assert!(!is_valid(NameKind::Key, "a@b"));
        assert!(is_valid(NameKind::Provider, "a@b"));
    }
}
