//! Values sealed before they leave the host (issue 11: a shared store's operators must
//! never read a refresh token): AES-256-GCM from `ring` (already built for rustls, and
//! hardware-accelerated on x86 and ARM), with the value's key path as associated data, so
//! a sealed value moved to another key no longer opens.
//!
//! A sealed value is `VERSION ‖ nonce (12 bytes) ‖ ciphertext ‖ tag (16 bytes)`. Nonces
//! are random: at the volumes of a credential store (a write per login, per refresh) the
//! chance of a repeat under one key stays negligible (about n²/2⁹⁷ for n writes: 10⁻¹⁷
//! for a million), well inside NIST SP 800-38D's 2³² messages per key.
//!
//! The data key is 32 bytes read from a file that must be a regular file of exactly 32
//! bytes, owned by this uid, with no permission for group or others (`--store-key FILE`);
//! anything else is refused with a sentence saying what to fix. It lives in a
//! [`DataKey`], redacted and wiped on drop.

use std::fmt;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

/// The first byte of every sealed value: the format and algorithm (1: AES-256-GCM, a
/// 12-byte nonce, a 16-byte tag).
pub const VERSION: u8 = 1;

/// Bytes in a data key.
pub const KEY_LEN: usize = 32;

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Bytes a sealed value adds to its plaintext: the version, the nonce and the tag.
pub const OVERHEAD: usize = 1 + NONCE_LEN + 16;

/// Why a value could not be sealed or opened, or a key not loaded. Never carries key
/// material or plaintext.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// The key file is unusable; the text says why and what to do.
    #[error("data key {path}: {reason}")]
    KeyFile {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The value is not a sealed value of this version, or it was altered, moved to
    /// another key path, or sealed with another data key.
    #[error("a stored value does not open with this data key (altered, moved, or sealed with another key)")]
    Open,
    /// The system's random source failed.
    #[error("the system random source failed")]
    Random,
}

/// A 32-byte data key, wiped on drop; `Debug` shows nothing of it.
pub struct DataKey(Zeroizing<[u8; KEY_LEN]>);

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DataKey(<redacted>)")
    }
}

impl DataKey {
    /// A key from its 32 bytes.
    pub fn from_bytes(bytes: Zeroizing<[u8; KEY_LEN]>) -> DataKey {
        DataKey(bytes)
    }

    /// A fresh random key from the system random source.
    pub fn generate() -> Result<DataKey, SealError> {
        let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
        SystemRandom::new()
            .fill(&mut bytes[..])
            .map_err(|_| SealError::Random)?;
        Ok(DataKey(bytes))
    }

    /// Reads a key file: a regular file (not followed through a symlink) of exactly 32
    /// bytes, owned by this uid, without any permission for group or others.
    pub fn load(path: &Path) -> Result<DataKey, SealError> {
        let shown = path.display().to_string();
        let refuse = |reason: String| SealError::KeyFile {
            path: shown.clone(),
            reason,
        };
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| {
                refuse(format!(
                    "cannot open it ({e}); it must be a regular file, not a symlink"
                ))
            })?;
        let meta = file
            .metadata()
            .map_err(|e| refuse(format!("cannot inspect it ({e})")))?;
        if !meta.is_file() {
            return Err(refuse("not a regular file".into()));
        }
        if meta.uid() != nix::unistd::geteuid().as_raw() {
            return Err(refuse(
                "owned by another user; the data key must be yours alone".into(),
            ));
        }
        if meta.mode() & 0o077 != 0 {
            return Err(refuse(format!(
                "mode {:03o} lets others read it; run chmod 600 on it",
                meta.mode() & 0o777
            )));
        }
        if meta.len() != KEY_LEN as u64 {
            return Err(refuse(format!(
                "{} bytes; a data key is exactly {KEY_LEN} random bytes (for example \
                 `head -c 32 /dev/urandom > FILE`)",
                meta.len()
            )));
        }
        let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
        file.read_exact(&mut bytes[..])
            .map_err(|e| refuse(format!("cannot read it ({e})")))?;
        Ok(DataKey(bytes))
    }

    /// The key as 64 lowercase hex characters, for a store that keeps text (the OS
    /// keyring); wiped when dropped.
    pub fn to_hex(&self) -> Zeroizing<String> {
        let mut out = Zeroizing::new(String::with_capacity(KEY_LEN * 2));
        for b in self.0.iter() {
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0x0f)]));
        }
        out
    }

    /// A key from 64 hex characters (either case, surrounding white space ignored);
    /// `None` for anything else.
    pub fn from_hex(text: &str) -> Option<DataKey> {
        let text = text.trim().as_bytes();
        if text.len() != KEY_LEN * 2 {
            return None;
        }
        let nibble = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
        let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
        for (i, pair) in text.chunks_exact(2).enumerate() {
            bytes[i] = (nibble(pair[0])? << 4) | nibble(pair[1])?;
        }
        Some(DataKey(bytes))
    }

    /// Writes this key to `path` as a new file that [`DataKey::load`] accepts: created
    /// with `O_CREAT | O_EXCL` (an existing file, or a symlink, is never touched: the error
    /// is [`std::io::ErrorKind::AlreadyExists`]), mode 0600, synced to disk (and its
    /// directory entry, best effort). A file this call created but could not fill is removed, so a
    /// failure never leaves a short key behind.
    pub fn write_new(&self, path: &Path) -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::PermissionsExt;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
            .open(path)?;
        // Exactly 0600 whatever the umask (a umask can only take bits away, and one that
        // took the owner's would make a key its owner cannot read back).
        let written = file
            .set_permissions(std::fs::Permissions::from_mode(0o600))
            .and_then(|()| file.write_all(&self.0[..]))
            .and_then(|()| file.sync_all());
        if let Err(e) = written {
            drop(file);
            let _ = std::fs::remove_file(path);
            return Err(e);
        }
        // The directory entry too, best effort: the file itself is complete and synced, and
        // an error here must not report as unwritten a key that is there.
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
        Ok(())
    }

    fn aead(&self) -> LessSafeKey {
        // 32 bytes is AES-256-GCM's key length, so this cannot fail.
        LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &self.0[..]).expect("a 32-byte key"))
    }

    /// Seals `plaintext` for the key path `path` (associated data, with the version).
    pub fn seal(&self, path: &str, plaintext: &[u8]) -> Result<Vec<u8>, SealError> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| SealError::Random)?;
        // Sized once: the buffer holds the plaintext until it is encrypted in place, and
        // must never be reallocated (an unwiped copy would be left behind).
        let mut out = Vec::with_capacity(OVERHEAD + plaintext.len());
        out.push(VERSION);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plaintext);
        let mut body = out.split_off(1 + NONCE_LEN);
        let sealed = self.aead().seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad(path)),
            &mut body,
        );
        if sealed.is_err() {
            zeroize::Zeroize::zeroize(&mut body);
            return Err(SealError::Random);
        }
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// Opens a value sealed for `path`; the plaintext is wiped when dropped.
    pub fn open(&self, path: &str, sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, SealError> {
        if sealed.len() < OVERHEAD || sealed[0] != VERSION {
            return Err(SealError::Open);
        }
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&sealed[1..1 + NONCE_LEN]);
        let mut body = Zeroizing::new(sealed[1 + NONCE_LEN..].to_vec());
        let len = self
            .aead()
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad(path)),
                &mut body[..],
            )
            .map_err(|_| SealError::Open)?
            .len();
        body.truncate(len);
        Ok(body)
    }
}

/// The associated data of a value at `path`: the version and the path, so neither can be
/// changed without the tag failing.
fn aad(path: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + path.len());
    out.push(VERSION);
    out.extend_from_slice(path.as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn round_trip_and_every_tamper_is_refused() {
        let key = DataKey::generate().expect("key");
        let sealed = key
            .seal("fleet/tokens/anthropic/default", b"refresh-token-canary")
            .expect("seal");
        assert_eq!(sealed.len(), OVERHEAD + 20);
        assert!(!sealed.windows(b"canary".len()).any(|w| w == b"canary"));
        let opened = key
            .open("fleet/tokens/anthropic/default", &sealed)
            .expect("open");
        assert_eq!(&opened[..], b"refresh-token-canary");
        // Fresh nonce each time.
        assert_ne!(
            sealed,
            key.seal("fleet/tokens/anthropic/default", b"refresh-token-canary")
                .expect("seal")
        );
        // Moved to another key path.
        assert!(matches!(
            key.open("fleet/tokens/anthropic/work", &sealed),
            Err(SealError::Open)
        ));
        // Another data key.
        let other = DataKey::generate().expect("key");
        assert!(other
            .open("fleet/tokens/anthropic/default", &sealed)
            .is_err());
        // Any flipped byte, a wrong version, a truncation.
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 1;
            assert!(
                key.open("fleet/tokens/anthropic/default", &bad).is_err(),
                "byte {i}"
            );
        }
        assert!(key
            .open("fleet/tokens/anthropic/default", &sealed[..OVERHEAD - 1])
            .is_err());
        assert!(format!("{key:?}").contains("redacted"));
    }

    #[test]
    fn a_written_key_loads_and_an_existing_file_is_never_overwritten() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("new.key");
        let key = DataKey::generate().expect("key");
        key.write_new(&path).expect("write");
        let meta = std::fs::metadata(&path).expect("stat");
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert_eq!(meta.len(), KEY_LEN as u64);
        let sealed = key.seal("p", b"x").expect("seal");
        let loaded = DataKey::load(&path).expect("load");
        assert_eq!(&loaded.open("p", &sealed).expect("open")[..], b"x");

        let before = std::fs::read(&path).expect("read");
        let e = DataKey::generate()
            .expect("key")
            .write_new(&path)
            .expect_err("exists");
        assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(
            std::fs::read(&path).expect("read"),
            before,
            "left as it was"
        );

        let link = dir.path().join("dangling.key");
        std::os::unix::fs::symlink(dir.path().join("nowhere"), &link).expect("symlink");
        assert!(key.write_new(&link).is_err(), "a symlink is never followed");
        assert!(!dir.path().join("nowhere").exists());
    }

    #[test]
    fn key_files_are_checked_and_refusals_say_what_to_do() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("data.key");
        std::fs::write(&path, [7u8; 32]).expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let key = DataKey::load(&path).expect("good key file");
        let sealed = key.seal("p", b"x").expect("seal");
        assert_eq!(
            &DataKey::load(&path)
                .expect("again")
                .open("p", &sealed)
                .expect("open")[..],
            b"x"
        );

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        let e = DataKey::load(&path).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        std::fs::write(&path, [7u8; 31]).expect("write");
        let e = DataKey::load(&path).unwrap_err().to_string();
        assert!(e.contains("exactly 32"), "{e}");

        let link = dir.path().join("link.key");
        std::os::unix::fs::symlink(&path, &link).expect("symlink");
        assert!(DataKey::load(&link).is_err(), "a symlink is not followed");
        assert!(DataKey::load(dir.path()).is_err(), "a directory is refused");
        let e = DataKey::load(&dir.path().join("missing"))
            .unwrap_err()
            .to_string();
        assert!(!e.contains("\u{7}"), "{e}");
    }

    #[test]
    fn hex_round_trip_and_refusals() {
        let key = DataKey::generate().expect("key");
        let hex = key.to_hex();
        assert_eq!(hex.len(), 64);
        let back = DataKey::from_hex(&format!(" {}\n", hex.to_uppercase())).expect("parse");
        let sealed = key.seal("/p/tokens/a/b", b"x").expect("seal");
        assert_eq!(
            &back.open("/p/tokens/a/b", &sealed).expect("open")[..],
            b"x"
        );
        assert!(DataKey::from_hex(&hex[..63]).is_none());
        assert!(DataKey::from_hex(&format!("{}g", &hex[..63])).is_none());
        assert!(format!("{back:?}").contains("redacted"));
    }
}
