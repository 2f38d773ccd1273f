//! Profile files: `credproxy serve --profile FILE` and `credproxy exec --profile FILE`.
//!
//! A profile file is a small TOML document with the same meaning as the command-line flags
//! `--allow`, `--allow-key`, `--allow-all`, `--read-only` and `--rate-limit`, spelled the
//! same way so a setting moves between the two unchanged:
//!
//! ```toml
//! # every key optional
//! allow = ["anthropic", "gemini:default,work"]   # same spec as --allow
//! allow_key = ["openai"]                          # same as --allow-key
//! allow_all = false
//! read_only = false
//! rate_limit = 60                                 # requests/s per connection, 0 = off
//! capability_token = false                        # same as --capability-token
//! ```
//!
//! `capability_token = true` binds the socket to the one sandbox of this launch
//! (PROTOCOL.md §13): a fresh capability token is made at start, `exec` hands it to its
//! command on a descriptor and `serve` prints it, and a handshake without it is refused.
//!
//! An empty file allows nothing. `examples/profile.toml` is an annotated example.
//!
//! Host-side refresh (PROTOCOL.md §14) is set with three more keys and one table per
//! provider whose token endpoint differs from its built-in preset (or that has none):
//!
//! ```toml
//! refresh = true           # false: serve tokens as stored (same as --no-refresh)
//! refresh_margin = 60      # seconds; same as --refresh-margin
//! renew_before = 300       # seconds; same as --renew-before
//!
//! [provider.anthropic]     # a preset: only the keys named change
//! token_url = "http://127.0.0.1:8080/v1/oauth/token"
//!
//! [provider.acme]          # no preset: token_url and client_id are required
//! token_url = "https://login.acme.example/oauth/token"
//! client_id = "cli-123"
//! client_secret_key = "acme-client-secret"   # an API key in the store holding it
//! body = "json"                               # or "form" (the default)
//! # `credproxy login` / `logout` (all optional; a preset has its own):
//! authorization_url = "https://login.acme.example/oauth/authorize"      # loopback flow
//! device_authorization_url = "https://login.acme.example/oauth/device"  # device flow
//! revocation_url = "https://login.acme.example/oauth/revoke"            # logout (RFC 7009)
//! scopes = ["openid", "offline_access"]
//! redirect_uri = "http://127.0.0.1/callback"  # no port: ephemeral; https://: paste the code
//! ```
//!
//! A profile file can set these keys and tables and nothing else: any other key or table, a
//! value of the wrong type, an invalid name or URL, malformed TOML, invalid UTF-8 or a file
//! over [`MAX_PROFILE_SIZE`] bytes is refused with an error naming the file and, where
//! there is one, the 1-based line, on one line of text.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, Read};
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::de::IgnoredAny;
use serde::Deserialize;
use toml::Spanned;

use crate::oauth::provider::{BodyFormat, Endpoint, EndpointOverride};
use crate::policy::Profile;

/// The largest profile file accepted, in bytes (1 MiB).
pub const MAX_PROFILE_SIZE: u64 = 1 << 20;

/// The keys a profile file may set, in the order error messages list them.
pub const KEYS: [&str; 12] = [
    "allow",
    "allow_key",
    "allow_all",
    "read_only",
    "rate_limit",
    "capability_token",
    "refresh",
    "refresh_margin",
    "renew_before",
    "provider",
    "token_command",
    "key_command",
];

/// The longest `ttl` of a command source, in seconds (one week).
pub const MAX_SOURCE_TTL: u64 = 7 * 86_400;

/// The keys of a `[provider.NAME]` table.
pub const PROVIDER_KEYS: [&str; 9] = [
    "token_url",
    "client_id",
    "client_secret_key",
    "body",
    "authorization_url",
    "device_authorization_url",
    "revocation_url",
    "scopes",
    "redirect_uri",
];

/// The longest `refresh_margin` or `renew_before` accepted, in seconds (one day): a longer
/// lead would renew every token as soon as it was issued.
pub const MAX_REFRESH_LEAD: u64 = 86_400;

/// What a profile file sets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProfileFile {
    /// The grants, `allow_all` and `read_only` of the file; nothing allowed when it sets none.
    pub profile: Profile,
    /// `rate_limit` (requests per second per connection, 0 = off) when the file sets it.
    pub rate_limit: Option<u32>,
    /// `capability_token` when the file sets it (true: a fresh capability token per
    /// launch, as `--capability-token`).
    pub capability_token: Option<bool>,
    /// `refresh` when the file sets it (false: serve tokens as stored).
    pub refresh: Option<bool>,
    /// `refresh_margin` in seconds when the file sets it.
    pub refresh_margin: Option<u64>,
    /// `renew_before` in seconds when the file sets it.
    pub renew_before: Option<u64>,
    /// The token endpoints of the `[provider.NAME]` tables, each resolved against its
    /// preset.
    pub providers: BTreeMap<String, Endpoint>,
    /// The `[[token_command]]` and `[[key_command]]` sources, in file order.
    pub sources: Vec<crate::source::SourceSpec>,
}

/// Why a profile file was refused. Every variant displays as one line naming the file.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    /// The file could not be opened or read.
    #[error("profile {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// The file is larger than [`MAX_PROFILE_SIZE`].
    #[error("profile {}: larger than the limit of {MAX_PROFILE_SIZE} bytes", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// The file's content is not a valid profile.
    #[error("profile {}{}: {message}", path.display(), at_line(*line))]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The 1-based line of the problem, when it is known.
        line: Option<usize>,
        /// The problem, on one line.
        message: String,
    },
}

fn at_line(line: Option<usize>) -> String {
    line.map(|n| format!(", line {n}")).unwrap_or_default()
}

/// The file as written; `deny_unknown_fields` makes any other key or table an error.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    #[serde(default)]
    allow: Vec<Spanned<String>>,
    #[serde(default)]
    allow_key: Vec<Spanned<String>>,
    #[serde(default)]
    allow_all: bool,
    #[serde(default)]
    read_only: bool,
    #[serde(default)]
    rate_limit: Option<u32>,
    #[serde(default)]
    capability_token: Option<bool>,
    #[serde(default)]
    refresh: Option<bool>,
    #[serde(default)]
    refresh_margin: Option<Spanned<u64>>,
    #[serde(default)]
    renew_before: Option<Spanned<u64>>,
    #[serde(default)]
    provider: BTreeMap<Spanned<String>, Spanned<RawProvider>>,
    #[serde(default)]
    token_command: Vec<Spanned<RawTokenCommand>>,
    #[serde(default)]
    key_command: Vec<Spanned<RawKeyCommand>>,
}

/// One `[[token_command]]` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTokenCommand {
    provider: Spanned<String>,
    bucket: Option<Spanned<String>>,
    command: Spanned<Vec<String>>,
    ttl: Option<Spanned<u64>>,
}

/// One `[[key_command]]` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKeyCommand {
    name: Spanned<String>,
    command: Spanned<Vec<String>>,
    ttl: Option<Spanned<u64>>,
}

/// One `[provider.NAME]` table as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProvider {
    token_url: Option<Spanned<String>>,
    client_id: Option<String>,
    client_secret_key: Option<String>,
    body: Option<Spanned<String>>,
    authorization_url: Option<Spanned<String>>,
    device_authorization_url: Option<Spanned<String>>,
    revocation_url: Option<Spanned<String>>,
    scopes: Option<Spanned<Vec<String>>>,
    redirect_uri: Option<Spanned<String>>,
}

/// Reads and parses the profile file at `path` (at most [`MAX_PROFILE_SIZE`] bytes).
pub fn load(path: &Path) -> Result<ProfileFile, ProfileError> {
    let read_err = |source| ProfileError::Read {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(read_err)?;
    // Bounded read rather than trusting the metadata: the path may be a pipe or a device.
    let mut bytes = Vec::new();
    file.take(MAX_PROFILE_SIZE + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    if bytes.len() as u64 > MAX_PROFILE_SIZE {
        return Err(ProfileError::TooLarge {
            path: path.to_owned(),
        });
    }
    let text = match String::from_utf8(bytes) {
        Ok(text) => text,
        Err(e) => {
            let valid = &e.as_bytes()[..e.utf8_error().valid_up_to()];
            return Err(ProfileError::Invalid {
                path: path.to_owned(),
                line: Some(line_at(valid, valid.len())),
                message: "not valid UTF-8".to_owned(),
            });
        }
    };
    parse(&text, path)
}

/// Parses the text of a profile file; `origin` is the file's name, used only in messages.
pub fn parse(text: &str, origin: &Path) -> Result<ProfileFile, ProfileError> {
    let invalid = |span: Option<Range<usize>>, message: String| ProfileError::Invalid {
        path: origin.to_owned(),
        line: span.map(|s| line_at(text.as_bytes(), s.start)),
        message,
    };
    if text.len() as u64 > MAX_PROFILE_SIZE {
        return Err(ProfileError::TooLarge {
            path: origin.to_owned(),
        });
    }
    let raw: Raw = toml::from_str(text).map_err(|e| invalid(e.span(), toml_message(text, &e)))?;
    let mut profile = Profile {
        allow_all: raw.allow_all,
        read_only: raw.read_only,
        ..Profile::default()
    };
    for spec in &raw.allow {
        profile
            .allow(spec.get_ref())
            .map_err(|m| invalid(Some(spec.span()), one_line(&m)))?;
    }
    for name in &raw.allow_key {
        profile
            .allow_key(name.get_ref())
            .map_err(|m| invalid(Some(name.span()), one_line(&m)))?;
    }
    for (key, value) in [
        ("refresh_margin", &raw.refresh_margin),
        ("renew_before", &raw.renew_before),
    ] {
        if let Some(v) = value {
            if *v.get_ref() > MAX_REFRESH_LEAD {
                return Err(invalid(
                    Some(v.span()),
                    format!("`{key}`: at most {MAX_REFRESH_LEAD} seconds (one day)"),
                ));
            }
        }
    }
    let mut providers = BTreeMap::new();
    for (name, table) in &raw.provider {
        let t = table.get_ref();
        let body = match &t.body {
            None => None,
            Some(b) => Some(BodyFormat::parse(b.get_ref()).ok_or_else(|| {
                invalid(
                    Some(b.span()),
                    format!(
                        "provider {}: `body` must be \"form\" or \"json\"",
                        name.get_ref().escape_debug()
                    ),
                )
            })?),
        };
        let text = |v: &Option<Spanned<String>>| v.as_ref().map(|u| u.get_ref().clone());
        let overrides = EndpointOverride {
            token_url: text(&t.token_url),
            client_id: t.client_id.clone(),
            client_secret_key: t.client_secret_key.clone(),
            body,
            authorization_url: text(&t.authorization_url),
            device_authorization_url: text(&t.device_authorization_url),
            revocation_url: text(&t.revocation_url),
            scopes: t.scopes.as_ref().map(|s| s.get_ref().clone()),
            redirect_uri: text(&t.redirect_uri),
        };
        let endpoint = Endpoint::resolve(name.get_ref(), &overrides).map_err(|e| {
            use crate::oauth::provider::EndpointError as E;
            // A bad value points at its own line; anything else at the table.
            let url_key = match &e {
                E::BadUrl(key, _) | E::Insecure(key) | E::Credentials(key) => Some(*key),
                E::BadRedirect => Some("redirect_uri"),
                _ => None,
            };
            let value = match url_key {
                Some("token_url") => t.token_url.as_ref(),
                Some("authorization_url") => t.authorization_url.as_ref(),
                Some("device_authorization_url") => t.device_authorization_url.as_ref(),
                Some("revocation_url") => t.revocation_url.as_ref(),
                Some("redirect_uri") => t.redirect_uri.as_ref(),
                _ => None,
            };
            let span = match (&e, value, &t.scopes) {
                (_, Some(v), _) => v.span(),
                (E::BadScope, _, Some(scopes)) => scopes.span(),
                _ => name.span(),
            };
            invalid(
                Some(span),
                format!(
                    "provider {}: {}",
                    name.get_ref().escape_debug(),
                    one_line(&e.to_string())
                ),
            )
        })?;
        providers.insert(name.get_ref().clone(), endpoint);
    }
    let mut sources: Vec<crate::source::SourceSpec> = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    let mut add_source = |target: crate::source::SourceTarget,
                          at: Range<usize>,
                          command: &Spanned<Vec<String>>,
                          ttl: &Option<Spanned<u64>>|
     -> Result<(), ProfileError> {
        if command
            .get_ref()
            .first()
            .is_none_or(|p| p.trim().is_empty())
        {
            return Err(invalid(
                Some(command.span()),
                format!("source {target}: `command` must name a program"),
            ));
        }
        if let Some(ttl) = ttl {
            if !(1..=MAX_SOURCE_TTL).contains(ttl.get_ref()) {
                return Err(invalid(
                    Some(ttl.span()),
                    format!("source {target}: `ttl` must be 1 to {MAX_SOURCE_TTL} seconds"),
                ));
            }
        }
        if !seen.insert(target.clone()) {
            return Err(invalid(
                Some(at),
                format!("source {target} is defined twice"),
            ));
        }
        sources.push(crate::source::SourceSpec {
            target,
            command: command.get_ref().clone(),
            ttl: ttl
                .as_ref()
                .map(|t| std::time::Duration::from_secs(*t.get_ref())),
        });
        Ok(())
    };
    for table in &raw.token_command {
        let t = table.get_ref();
        let name = |v: &Spanned<String>, kind, what| {
            crate::names::check(kind, v.get_ref()).map_err(|m| {
                invalid(
                    Some(v.span()),
                    format!("token_command {what}: {}", one_line(&m)),
                )
            })
        };
        name(&t.provider, crate::names::NameKind::Provider, "provider")?;
        let bucket = match &t.bucket {
            Some(b) => {
                name(b, crate::names::NameKind::Bucket, "bucket")?;
                b.get_ref().clone()
            }
            None => crate::names::DEFAULT_BUCKET.to_owned(),
        };
        let target = crate::source::SourceTarget::Token {
            provider: t.provider.get_ref().clone(),
            bucket,
        };
        add_source(target, table.span(), &t.command, &t.ttl)?;
    }
    for table in &raw.key_command {
        let t = table.get_ref();
        crate::names::check(crate::names::NameKind::Key, t.name.get_ref()).map_err(|m| {
            invalid(
                Some(t.name.span()),
                format!("key_command name: {}", one_line(&m)),
            )
        })?;
        let target = crate::source::SourceTarget::Key {
            name: t.name.get_ref().clone(),
        };
        add_source(target, table.span(), &t.command, &t.ttl)?;
    }
    Ok(ProfileFile {
        sources,
        profile,
        rate_limit: raw.rate_limit,
        capability_token: raw.capability_token,
        refresh: raw.refresh,
        refresh_margin: raw.refresh_margin.map(Spanned::into_inner),
        renew_before: raw.renew_before.map(Spanned::into_inner),
        providers,
    })
}

/// The 1-based line of byte offset `at` in `text` (clamped to the end of the text).
fn line_at(text: &[u8], at: usize) -> usize {
    let at = at.min(text.len());
    1 + text[..at].iter().filter(|&&b| b == b'\n').count()
}

/// The message of a toml error on one line, with serde's "unknown field" reworded in the
/// words of this file format and a wrong value prefixed with its key.
fn toml_message(text: &str, e: &toml::de::Error) -> String {
    let message = e.message();
    if let Some(rest) = message.strip_prefix("unknown field `") {
        // serde: "unknown field `NAME`, expected one of `a`, `b`" (or "expected `a`"),
        // listing the keys of the table the field was found in.
        if let Some((name, expected)) = rest.rsplit_once("`, expected ") {
            let expected = expected.trim_start_matches("one of ").replace('`', "");
            return format!(
                "unknown key `{}` (expected one of {expected})",
                name.escape_debug(),
            );
        }
    }
    match e.span().and_then(|span| key_of(text, span)) {
        Some(key) => format!("`{key}`: {}", one_line(message)),
        None => one_line(message),
    }
}

/// The known top-level key whose value holds `span`, when `text` is well-formed TOML.
/// toml's error message for a wrong value does not say which key it belongs to.
fn key_of(text: &str, span: Range<usize>) -> Option<&'static str> {
    let known = |name: &str| KEYS.iter().copied().find(|k| *k == name);
    match toml::from_str::<BTreeMap<String, Spanned<IgnoredAny>>>(text) {
        Ok(table) => table.iter().find_map(|(key, value)| {
            let v = value.span();
            if v.start <= span.start && span.end <= v.end {
                known(key)
            } else {
                None
            }
        }),
        // toml cannot give the span of a dotted-key table (`allow.x = 1`), but there the
        // error's span is the key itself.
        Err(_) => text.get(span).and_then(known),
    }
}

/// `s` on one line: its lines joined with "; " and any other control character escaped.
fn one_line(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for line in s.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if !out.is_empty() {
            out.push_str("; ");
        }
        for c in line.chars() {
            if c.is_control() {
                let _ = write!(out, "{}", c.escape_debug());
            } else {
                out.push(c);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::BucketScope;

    const ORIGIN: &str = "/etc/x.toml";

    fn ok(text: &str) -> ProfileFile {
        parse(text, Path::new(ORIGIN)).expect("valid profile")
    }

    /// Parses `text`, which must fail, and returns the error's Display.
    fn err(text: &str) -> String {
        let e = parse(text, Path::new(ORIGIN)).expect_err("invalid profile");
        let s = e.to_string();
        assert!(!s.contains('\n'), "one line: {s:?}");
        assert!(s.starts_with("profile /etc/x.toml"), "{s}");
        s
    }

    fn assert_err(text: &str, line: usize, needle: &str) {
        let s = err(text);
        let prefix = format!("profile /etc/x.toml, line {line}: ");
        assert!(s.starts_with(&prefix), "want {prefix:?} in {s:?}");
        assert!(s.contains(needle), "want {needle:?} in {s:?}");
    }

    #[test]
    fn full_file() {
        let f = ok(r#"
            # every key
            allow = ["anthropic", "gemini:default,work"]
            allow_key = ["openai"]
            allow_all = false
            read_only = true
            rate_limit = 10
        "#);
        let p = &f.profile;
        assert_eq!(p.providers.get("anthropic"), Some(&BucketScope::All));
        assert!(p.allows_bucket("gemini", "work") && !p.allows_bucket("gemini", "x"));
        assert!(p.allows_key("anthropic") && p.allows_key("gemini") && p.allows_key("openai"));
        assert!(!p.allows_key("mistral") && !p.allows_provider("openai"));
        assert!(p.read_only && !p.allow_all);
        assert_eq!(f.rate_limit, Some(10));

        let f = ok("allow_all = true\nrate_limit = 0\n");
        assert!(f.profile.allow_all && !f.profile.read_only);
        assert_eq!(f.rate_limit, Some(0));
        let f = ok(&format!("rate_limit = {}", u32::MAX));
        assert_eq!(f.rate_limit, Some(u32::MAX));
    }

    #[test]
    fn empty_allows_nothing() {
        for text in [
            "",
            "\n",
            "# only a comment\n",
            "allow = []\nallow_key = []\n",
        ] {
            let f = ok(text);
            assert!(f.profile.allows_nothing(), "{text:?}");
            assert_eq!(f, ProfileFile::default());
        }
    }

    #[test]
    fn unknown_keys() {
        let expected = "(expected one of allow, allow_key, allow_all, read_only, rate_limit, \
                        capability_token, refresh, refresh_margin, renew_before, provider, token_command, \
                        key_command)";
        assert_err(
            "allow = []\nalow = [\"x\"]\n",
            2,
            &format!("unknown key `alow` {expected}"),
        );
        assert_err(
            "read_only = true\n\n[providers]\nanthropic = {}\n",
            3,
            "unknown key `providers`",
        );
        assert_err("allow.x = 1\n", 1, "`allow`: invalid type: map");
        assert_err("\"a\\nb\" = 1\n", 1, "unknown key `a\\nb`");
        assert_err("[[allow]]\n", 1, "`allow`: invalid type: map");
    }

    #[test]
    fn refresh_keys_and_provider_tables() {
        let f = ok(r#"
            refresh = false
            refresh_margin = 30
            renew_before = 600

            [provider.anthropic]
            token_url = "http://127.0.0.1:8080/v1/oauth/token"

            [provider.acme]
            token_url = "https://login.acme.example/oauth/token"
            client_id = "cli-123"
            client_secret_key = "acme-client-secret"
            body = "json"
        "#);
        assert_eq!(f.refresh, Some(false));
        assert_eq!((f.refresh_margin, f.renew_before), (Some(30), Some(600)));
        let a = &f.providers["anthropic"];
        assert_eq!(a.token_url.as_str(), "http://127.0.0.1:8080/v1/oauth/token");
        assert_eq!(a.client_id, "9d1c250a-e61b-44d9-88ed-5944d1962f5e");
        let acme = &f.providers["acme"];
        assert_eq!(acme.client_id, "cli-123");
        assert_eq!(acme.body, BodyFormat::Json);
        assert_eq!(
            acme.client_secret,
            Some(crate::oauth::ClientSecret::StoreKey(
                "acme-client-secret".into()
            ))
        );
        let login = ok(r#"
            [provider.acme]
            token_url = "https://login.acme.example/oauth/token"
            authorization_url = "https://login.acme.example/oauth/authorize"
            device_authorization_url = "https://login.acme.example/oauth/device"
            revocation_url = "https://login.acme.example/oauth/revoke"
            client_id = "cli-123"
            scopes = ["openid", "offline_access"]
            redirect_uri = "http://127.0.0.1:8765/cb"
        "#);
        let l = &login.providers["acme"].login;
        assert!(l.authorization_url.is_some() && l.device_authorization_url.is_some());
        assert!(l.revocation_url.is_some());
        assert_eq!(l.scopes, ["openid", "offline_access"]);
        assert!(matches!(
            l.redirect,
            crate::oauth::provider::Redirect::Loopback { port: 8765, .. }
        ));
        let none = ok("allow = []\n");
        assert_eq!((none.refresh, none.refresh_margin), (None, None));
        assert!(none.providers.is_empty());
    }

    #[test]
    fn bad_refresh_settings_name_their_line() {
        assert_err(
            "\n[provider.anthropic]\ntoken_url = \"http://login.example/t\"\n",
            3,
            "provider anthropic: token_url must be https://",
        );
        assert_err(
            "[provider.acme]\ntoken_url = \"https://a.example/t\"\n",
            1,
            "provider acme: no built-in preset, so client_id is required",
        );
        assert_err(
            "[provider.anthropic]\ntokenurl = \"x\"\n",
            2,
            "unknown key `tokenurl` (expected one of token_url, client_id, client_secret_key, body, \
             authorization_url, device_authorization_url, revocation_url, scopes, redirect_uri)",
        );
        assert_err(
            "[provider.gemini]\nbody = \"xml\"\n",
            2,
            "provider gemini: `body` must be \"form\" or \"json\"",
        );
        assert_err(
            "[provider.\"bad/name\"]\nclient_id = \"x\"\n",
            1,
            "provider bad/name: not a valid provider name",
        );
        assert_err(
            "[provider.gemini]\nclient_secret_key = \"a@b\"\n",
            1,
            "client_secret_key \"a@b\" is not a valid API key name",
        );
        assert_err(
            "renew_before = 86401\n",
            1,
            "`renew_before`: at most 86400 seconds",
        );
        assert_err(
            "refresh_margin = -1\n",
            1,
            "`refresh_margin`: invalid value",
        );
        assert_err("refresh = \"no\"\n", 1, "`refresh`: invalid type: string");
        assert_err(
            "[provider.anthropic]\ntoken_url = \"::\"\n",
            2,
            "not a valid URL",
        );
        assert_err(
            "[provider.acme]\ntoken_url = \"https://a.example/t\"\nclient_id = \"c\"\n\
             revocation_url = \"http://a.example/r\"\n",
            4,
            "provider acme: revocation_url must be https://",
        );
        assert_err(
            "[provider.codex]\n\nredirect_uri = \"http://a.example/cb\"\n",
            3,
            "provider codex: redirect_uri must be http:// on 127.0.0.1",
        );
        assert_err(
            "[provider.codex]\nscopes = [\"a b\"]\n",
            2,
            "provider codex: scopes must be non-empty strings without spaces",
        );
        assert_err(
            "[provider.codex]\nscopes = \"openid\"\n",
            2,
            "invalid type: string",
        );
    }

    #[test]
    fn wrong_types() {
        assert_err(
            "\nallow = \"x\"\n",
            2,
            "`allow`: invalid type: string \"x\", expected a sequence",
        );
        assert_err("allow_key = [1]\n", 1, "`allow_key`: invalid type: integer");
        assert_err(
            "allow = [\"a\",\n  2]\n",
            2,
            "`allow`: invalid type: integer",
        );
        assert_err(
            "allow_all = \"yes\"\n",
            1,
            "`allow_all`: invalid type: string",
        );
        assert_err(
            "#\n#\nread_only = 1\n",
            3,
            "`read_only`: invalid type: integer",
        );
        assert_err(
            "rate_limit = -1\n",
            1,
            "`rate_limit`: invalid value: integer `-1`",
        );
        assert_err(
            "rate_limit = \"60\"\n",
            1,
            "`rate_limit`: invalid type: string",
        );
        assert_err(
            "rate_limit = 1.5\n",
            1,
            "`rate_limit`: invalid type: floating",
        );
        assert_err(
            "\n\nrate_limit = 4294967296\n",
            3,
            "`rate_limit`: invalid value",
        );
        // Beyond i64 toml itself refuses the number.
        assert_err("rate_limit = 99999999999999999999\n", 1, "number too large");
        assert_err(
            "\ncapability_token = \"yes\"\n",
            2,
            "`capability_token`: invalid type: string \"yes\", expected a boolean",
        );
        assert_err(
            "capability_token = 1\n",
            1,
            "`capability_token`: invalid type: integer",
        );
    }

    #[test]
    fn capability_token_key() {
        assert_eq!(ok("capability_token = true\n").capability_token, Some(true));
        assert_eq!(
            ok("capability_token = false\n").capability_token,
            Some(false)
        );
        assert_eq!(ok("").capability_token, None);
    }

    #[test]
    fn bad_names() {
        assert_err(
            "allow = [\n  \"anthropic\",\n  \"bad/name\",\n]\n",
            3,
            "--allow \"bad/name\": invalid provider",
        );
        assert_err("allow = [\"p:\"]\n", 1, "--allow \"p:\": invalid bucket");
        assert_err(
            "\nallow_key = [\"ok\", \"a@b\"]\n",
            2,
            "--allow-key \"a@b\": invalid key name",
        );
        assert_err("allow = [\"a\\nb\"]\n", 1, "--allow \"a\\nb\"");
    }

    #[test]
    fn malformed_toml() {
        // toml notices the missing `]` where the next key starts.
        assert_err(
            "allow = [\"a\"\n\nread_only = true\n",
            3,
            "invalid array; expected `]`",
        );
        assert_err("read_only = true\nread_only = false\n", 2, "duplicate");
        assert_err("\nallow = [\"unterminated]\n", 2, "invalid basic string");
        assert_err("= 1\n", 1, "invalid key");
        assert_err(
            "read_only = true\nallow = [\"a\"] x\n",
            2,
            "expected newline",
        );
    }

    #[test]
    fn load_reads_and_bounds_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("p.toml");
        std::fs::write(&path, "allow = [\"anthropic\"]\n").expect("write");
        let f = load(&path).expect("loads");
        assert!(f.profile.allows_key("anthropic"));

        let missing = dir.path().join("missing.toml");
        let e = load(&missing).expect_err("missing");
        assert!(matches!(e, ProfileError::Read { .. }));
        let s = e.to_string();
        assert!(
            s.contains("missing.toml") && s.contains("No such file"),
            "{s}"
        );

        let e = load(dir.path()).expect_err("a directory");
        assert!(matches!(e, ProfileError::Read { .. }), "{e}");

        let mut big = "#".repeat(MAX_PROFILE_SIZE as usize - 1);
        big.push('\n');
        std::fs::write(&path, &big).expect("write");
        assert!(load(&path)
            .expect("exactly the limit")
            .profile
            .allows_nothing());
        big.push('#');
        std::fs::write(&path, &big).expect("write");
        let e = load(&path).expect_err("too large");
        assert!(matches!(e, ProfileError::TooLarge { .. }), "{e}");
        assert!(e.to_string().contains("p.toml"));

        std::fs::write(&path, b"read_only = true\n# \xff\n").expect("write");
        let e = load(&path).expect_err("not UTF-8");
        assert!(
            e.to_string().ends_with("p.toml, line 2: not valid UTF-8"),
            "{e}"
        );
    }

    #[test]
    fn example_file_parses() {
        let f = ok(include_str!("../examples/profile.toml"));
        let p = &f.profile;
        assert!(!p.allow_all && !p.read_only);
        assert!(p.allows_bucket("anthropic", "any") && p.allows_key("anthropic"));
        assert!(p.allows_bucket("gemini", "work@example.com") && !p.allows_bucket("gemini", "x"));
        assert!(p.allows_key("gemini") && p.allows_key("openai") && !p.allows_provider("openai"));
        assert_eq!(f.rate_limit, Some(60));
    }

    #[test]
    fn command_sources() {
        let f = parse(
            "[[token_command]]\nprovider = \"gcloud\"\ncommand = [\"gcloud\", \"auth\", \"print-access-token\"]\nttl = 2700\n\n[[key_command]]\nname = \"openai\"\ncommand = [\"op\", \"read\", \"op://x\"]\n",
            Path::new("p.toml"),
        )
        .expect("parses");
        assert_eq!(f.sources.len(), 2);
        assert_eq!(
            f.sources[0].target,
            crate::source::SourceTarget::Token {
                provider: "gcloud".into(),
                bucket: "default".into()
            }
        );
        assert_eq!(f.sources[0].ttl, Some(std::time::Duration::from_secs(2700)));
        assert_eq!(f.sources[1].command, ["op", "read", "op://x"]);
        for (text, want) in [
            (
                "[[token_command]]\nprovider = \"g\"\ncommand = []\n",
                "line 3: source g:default: `command` must name a program",
            ),
            (
                "[[key_command]]\nname = \"k\"\ncommand = [\"x\"]\nttl = 0\n",
                "line 4: source key k: `ttl` must be 1 to 604800 seconds",
            ),
            (
                "[[token_command]]\nprovider = \"a/b\"\ncommand = [\"x\"]\n",
                "line 2: token_command provider",
            ),
            (
                "[[key_command]]\nname = \"k\"\ncommand = [\"x\"]\n[[key_command]]\nname = \"k\"\ncommand = [\"y\"]\n",
                "source key k is defined twice",
            ),
            (
                "[[token_command]]\nprovider = \"g\"\ncommand = [\"x\"]\nshell = true\n",
                "unknown key `shell`",
            ),
        ] {
            let e = parse(text, Path::new("p.toml")).expect_err(text).to_string();
            assert!(e.contains(want), "{e} (wanted {want})");
        }
    }
}
