//! The capability token of PROTOCOL.md §13: 32 random bytes, written as 64 lowercase hex
//! characters, made fresh for each launch. A server started with one answers only
//! handshakes that present it, so a sandbox that can reach another proxy's socket (a
//! shared `/tmp`, a leaked path) still cannot talk to it.
//!
//! - The launcher holds the token as a [`CapabilityToken`] only long enough to hand it to
//!   the sandbox (an inherited descriptor, [`FD_ENV`]); `Debug` never shows it and its
//!   bytes are wiped on drop.
//! - The server keeps only the SHA-256 of it, a [`CapabilityDigest`], and compares a
//!   presented token by hashing it and comparing the two digests in constant time: no
//!   timing difference tells how much of a guess was right, whatever its length.
//!
//! SHA-256 comes from `ring` (already built for rustls), the comparison from `subtle`.

use std::fmt;

use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

/// Characters in a token's text form.
pub const TOKEN_HEX_LEN: usize = 64;

/// Random bytes in a token.
pub const TOKEN_BYTES: usize = 32;

/// The variable naming the descriptor a sandbox reads its token from (the llxprt-code
/// convention).
pub const FD_ENV: &str = "LLXPRT_CAPABILITY_FD";

/// The descriptor a launcher uses when none is chosen.
pub const DEFAULT_FD: i32 = 3;

/// The name of the line `credproxy serve` prints the token on (after the socket line).
pub const TOKEN_VAR: &str = "LLXPRT_CAPABILITY_TOKEN";

/// Why a text is not a capability token. Never carries the text itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CapabilityError {
    /// Not exactly 64 characters.
    #[error("a capability token is exactly {TOKEN_HEX_LEN} characters")]
    Length,
    /// A character outside `0-9 a-f`.
    #[error("a capability token holds only the characters 0-9 and a-f")]
    Character,
}

/// A capability token in its text form, held by the launcher until it is handed over.
/// `Debug` is redacted and the text is wiped on drop.
pub struct CapabilityToken(Zeroizing<String>);

impl CapabilityToken {
    /// A fresh token from the operating system's random source.
    pub fn generate() -> CapabilityToken {
        use rand::RngCore;
        let mut bytes = Zeroizing::new([0u8; TOKEN_BYTES]);
        rand::rngs::OsRng.fill_bytes(&mut bytes[..]);
        let mut text = Zeroizing::new(String::with_capacity(TOKEN_HEX_LEN));
        const HEX: &[u8; 16] = b"0123456789abcdef";
        for b in bytes.iter() {
            text.push(char::from(HEX[usize::from(b >> 4)]));
            text.push(char::from(HEX[usize::from(b & 15)]));
        }
        CapabilityToken(text)
    }

    /// Parses a token's text form: exactly 64 lowercase hex characters (a trailing
    /// newline, as the descriptor carries it, is the caller's to strip).
    pub fn parse(text: &str) -> Result<CapabilityToken, CapabilityError> {
        if text.len() != TOKEN_HEX_LEN {
            return Err(CapabilityError::Length);
        }
        if !text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(CapabilityError::Character);
        }
        Ok(CapabilityToken(Zeroizing::new(text.to_owned())))
    }

    /// The text form, for the one place that hands it over (a descriptor, a handshake).
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The digest a server keeps.
    pub fn digest(&self) -> CapabilityDigest {
        CapabilityDigest::of(self.0.as_bytes())
    }
}

impl fmt::Debug for CapabilityToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CapabilityToken(<redacted>)")
    }
}

/// The SHA-256 of a capability token: all a server keeps of it.
#[derive(Clone, PartialEq, Eq)]
pub struct CapabilityDigest([u8; 32]);

impl CapabilityDigest {
    fn of(bytes: &[u8]) -> CapabilityDigest {
        let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
        let mut out = [0u8; 32];
        out.copy_from_slice(digest.as_ref());
        CapabilityDigest(out)
    }

    /// True when `presented` is the token. The presented text is hashed whatever its
    /// length or case and the digests are compared in constant time, so neither the
    /// answer's timing nor its content says anything about the token.
    pub fn verify(&self, presented: &str) -> bool {
        bool::from(CapabilityDigest::of(presented.as_bytes()).0.ct_eq(&self.0))
    }
}

impl fmt::Debug for CapabilityDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CapabilityDigest(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_tokens_are_fresh_lowercase_hex_and_verify() {
        let a = CapabilityToken::generate();
        let b = CapabilityToken::generate();
        assert_ne!(a.expose(), b.expose());
        assert_eq!(a.expose().len(), TOKEN_HEX_LEN);
        assert!(CapabilityToken::parse(a.expose()).is_ok());
        let digest = a.digest();
        assert!(digest.verify(a.expose()));
        assert!(!digest.verify(b.expose()));
        assert!(!digest.verify(&a.expose().to_uppercase()));
        assert!(!digest.verify(&a.expose()[..63]));
        assert!(!digest.verify(&format!("{}\n", a.expose())));
        assert!(!digest.verify(""));
    }

    #[test]
    fn parse_refuses_bad_text_without_echoing_it() {
        let good = CapabilityToken::generate();
        let upper = good.expose().to_uppercase();
        assert_eq!(
            CapabilityToken::parse(&upper).unwrap_err(),
            CapabilityError::Character
        );
        assert_eq!(
            CapabilityToken::parse("abc").unwrap_err(),
            CapabilityError::Length
        );
        let shown = format!("{good:?} {:?}", good.digest());
        assert!(!shown.contains(good.expose()), "{shown}");
        assert!(!shown.contains(&good.expose()[..8]), "{shown}");
    }
}
