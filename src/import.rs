//! Logins other CLIs already made on this machine, read from their credential files and
//! converted to our token shape (PROTOCOL.md §6: `expiry` in epoch seconds, every other
//! field kept). The source file is only read.
//!
//! | source | file | provider | format |
//! |---|---|---|---|
//! | `claude-code` | `~/.claude/.credentials.json` | `anthropic` | `{"claudeAiOauth": {"accessToken", "refreshToken", "expiresAt" (ms), "scopes": [..], ...}}` |
//! | `codex` | `~/.codex/auth.json` | `codex` | `{"tokens": {"access_token", "refresh_token", "id_token", "account_id"}, "last_refresh", ...}`; no expiry: the access token's JWT `exp` claim |
//! | `gemini-cli` | `~/.gemini/oauth_creds.json` | `gemini` | google-auth-library credentials: `access_token`, `refresh_token`, `expiry_date` (ms), `scope`, `token_type`, `id_token` |
//!
//! A token whose expiry cannot be known (no `expiresAt`, a Codex access token without an
//! `exp` claim) is stored as expired (`expiry` 0), so the refresh engine renews it at once.
//! Errors name the file's field, never a value.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde_json::{Map, Value};
use zeroize::Zeroizing;

use crate::secret::wipe_json;
use crate::token::{Token, TokenError};

/// The largest credential file read, in bytes.
pub const MAX_IMPORT_SIZE: u64 = 1 << 20;

/// A CLI whose login can be imported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Anthropic's Claude Code.
    ClaudeCode,
    /// OpenAI's Codex CLI.
    Codex,
    /// Google's Gemini CLI.
    GeminiCli,
}

/// Why a credential file cannot be imported. The text names fields and positions, never
/// values.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The file is larger than [`MAX_IMPORT_SIZE`].
    #[error("{} is larger than {MAX_IMPORT_SIZE} bytes: not a credential file", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// The file is not JSON (where, never what).
    #[error(transparent)]
    NotJson(#[from] crate::secret_json::ParseError),
    /// A field the format requires is absent or empty.
    #[error("the file has no {0}")]
    Missing(&'static str),
    /// A field has the wrong type.
    #[error("{0} {1}")]
    BadField(&'static str, &'static str),
    /// The converted token is not valid.
    #[error(transparent)]
    Token(#[from] TokenError),
}

impl Source {
    /// Every source, in the order `--help` lists them.
    pub const ALL: [Source; 3] = [Source::ClaudeCode, Source::Codex, Source::GeminiCli];

    /// The name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Source::ClaudeCode => "claude-code",
            Source::Codex => "codex",
            Source::GeminiCli => "gemini-cli",
        }
    }

    /// The source called `name` on the command line.
    pub fn parse(name: &str) -> Option<Source> {
        Source::ALL.into_iter().find(|s| s.name() == name)
    }

    /// The provider the login is stored under.
    pub fn provider(self) -> &'static str {
        match self {
            Source::ClaudeCode => "anthropic",
            Source::Codex => "codex",
            Source::GeminiCli => "gemini",
        }
    }

    /// The file the CLI keeps its login in, under the home directory `home`.
    pub fn default_path(self, home: &Path) -> PathBuf {
        match self {
            Source::ClaudeCode => home.join(".claude/.credentials.json"),
            Source::Codex => home.join(".codex/auth.json"),
            Source::GeminiCli => home.join(".gemini/oauth_creds.json"),
        }
    }

    /// Reads `path` (at most [`MAX_IMPORT_SIZE`] bytes, into a buffer wiped on drop) and
    /// converts it.
    pub fn read(self, path: &Path) -> Result<Token, ImportError> {
        use std::io::Read;
        let read_err = |source| ImportError::Read {
            path: path.to_owned(),
            source,
        };
        let file = std::fs::File::open(path).map_err(read_err)?;
        let mut bytes = Zeroizing::new(Vec::new());
        file.take(MAX_IMPORT_SIZE + 1)
            .read_to_end(&mut bytes)
            .map_err(read_err)?;
        if bytes.len() as u64 > MAX_IMPORT_SIZE {
            return Err(ImportError::TooLarge {
                path: path.to_owned(),
            });
        }
        self.convert(&bytes)
    }

    /// Converts the text of a credential file of this source to a token.
    pub fn convert(self, text: &[u8]) -> Result<Token, ImportError> {
        // Parsed without leaving copies of the tokens in freed memory.
        let mut value = crate::secret_json::parse(text)?;
        let result = match self {
            Source::ClaudeCode => claude_code(&mut value),
            Source::Codex => codex(&mut value),
            Source::GeminiCli => gemini_cli(&mut value),
        };
        wipe_json(&mut value);
        result
    }
}

/// Takes `object[key]` out as a non-empty string, or says which field is missing.
fn take_string(
    object: &mut Map<String, Value>,
    key: &str,
    field: &'static str,
) -> Result<Option<Value>, ImportError> {
    match object.remove(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(v @ Value::String(_)) => Ok(Some(v)),
        Some(mut other) => {
            wipe_json(&mut other);
            Err(ImportError::BadField(field, "must be a string"))
        }
    }
}

/// Milliseconds since the epoch (a number) as epoch seconds.
fn millis_to_seconds(value: &Value, field: &'static str) -> Result<u64, ImportError> {
    value
        .as_u64()
        .or_else(|| value.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
        .map(|ms| ms / 1000)
        .ok_or(ImportError::BadField(
            field,
            "must be a number (epoch milliseconds)",
        ))
}

fn claude_code(root: &mut Value) -> Result<Token, ImportError> {
    let Some(Value::Object(oauth)) = root.get_mut("claudeAiOauth") else {
        return Err(ImportError::Missing("claudeAiOauth"));
    };
    let mut fields = Map::new();
    let access = take_string(oauth, "accessToken", "claudeAiOauth.accessToken")?
        .ok_or(ImportError::Missing("claudeAiOauth.accessToken"))?;
    fields.insert("access_token".into(), access);
    if let Some(rt) = take_string(oauth, "refreshToken", "claudeAiOauth.refreshToken")? {
        fields.insert("refresh_token".into(), rt);
    }
    let expiry = match oauth.remove("expiresAt") {
        None | Some(Value::Null) => 0,
        Some(v) => millis_to_seconds(&v, "claudeAiOauth.expiresAt")?,
    };
    fields.insert("expiry".into(), Value::from(expiry));
    fields.insert("token_type".into(), Value::from("Bearer"));
    match oauth.remove("scopes") {
        None | Some(Value::Null) => {}
        Some(Value::Array(items)) if items.iter().all(Value::is_string) => {
            let scope: Vec<&str> = items.iter().filter_map(Value::as_str).collect();
            fields.insert("scope".into(), Value::from(scope.join(" ")));
        }
        Some(_) => {
            return Err(ImportError::BadField(
                "claudeAiOauth.scopes",
                "must be a list of strings",
            ))
        }
    }
    // Everything else (subscriptionType, rateLimitTier, ...) is kept as it is.
    for (key, value) in std::mem::take(oauth) {
        fields.entry(key).or_insert(value);
    }
    Ok(Token::from_map(fields)?)
}

fn codex(root: &mut Value) -> Result<Token, ImportError> {
    let Some(Value::Object(tokens)) = root.get_mut("tokens") else {
        return Err(ImportError::Missing(
            "tokens (a ChatGPT login; an API-key login has nothing to import)",
        ));
    };
    let mut fields = Map::new();
    let access = take_string(tokens, "access_token", "tokens.access_token")?
        .ok_or(ImportError::Missing("tokens.access_token"))?;
    let expiry = access.as_str().and_then(jwt_exp).unwrap_or(0);
    fields.insert("access_token".into(), access);
    if let Some(rt) = take_string(tokens, "refresh_token", "tokens.refresh_token")? {
        fields.insert("refresh_token".into(), rt);
    }
    fields.insert("expiry".into(), Value::from(expiry));
    fields.insert("token_type".into(), Value::from("Bearer"));
    for (key, value) in std::mem::take(tokens) {
        fields.entry(key).or_insert(value);
    }
    Ok(Token::from_map(fields)?)
}

fn gemini_cli(root: &mut Value) -> Result<Token, ImportError> {
    let Value::Object(creds) = root else {
        return Err(ImportError::BadField("the file", "must be a JSON object"));
    };
    let mut fields = Map::new();
    let access = take_string(creds, "access_token", "access_token")?
        .ok_or(ImportError::Missing("access_token"))?;
    fields.insert("access_token".into(), access);
    if let Some(rt) = take_string(creds, "refresh_token", "refresh_token")? {
        fields.insert("refresh_token".into(), rt);
    }
    let expiry = match creds.remove("expiry_date") {
        None | Some(Value::Null) => 0,
        Some(v) => millis_to_seconds(&v, "expiry_date")?,
    };
    fields.insert("expiry".into(), Value::from(expiry));
    match creds.remove("token_type") {
        Some(v @ Value::String(_)) => fields.insert("token_type".into(), v),
        _ => fields.insert("token_type".into(), Value::from("Bearer")),
    };
    for (key, value) in std::mem::take(creds) {
        fields.entry(key).or_insert(value);
    }
    Ok(Token::from_map(fields)?)
}

/// The `exp` claim (epoch seconds) of a JWT, read without verifying it: only to know when
/// the token expires, never to trust it.
pub fn jwt_exp(jwt: &str) -> Option<u64> {
    let payload = jwt.split('.').nth(1)?;
    let bytes = Zeroizing::new(
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload.trim_end_matches('='))
            .ok()?,
    );
    let mut claims: Value = serde_json::from_slice(&bytes).ok()?;
    let exp = claims.get("exp").and_then(|v| {
        v.as_u64()
            .or_else(|| v.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
    });
    wipe_json(&mut claims);
    exp
}

/// The ChatGPT account id of a Codex login's id token: the `chatgpt_account_id` of its
/// `https://api.openai.com/auth` claim (openai/codex `codex-rs/login/src/server.rs`,
/// `jwt_auth_claims`), as the Codex CLI stores it as `account_id`.
pub fn chatgpt_account_id(jwt: &str) -> Option<String> {
    let payload = jwt.split('.').nth(1)?;
    let bytes = Zeroizing::new(
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload.trim_end_matches('='))
            .ok()?,
    );
    let mut claims: Value = serde_json::from_slice(&bytes).ok()?;
    let id = claims
        .get("https://api.openai.com/auth")
        .and_then(|auth| auth.get("chatgpt_account_id"))
        .and_then(Value::as_str)
        .filter(|id| !id.is_empty() && id.len() <= 256 && !id.chars().any(char::is_control))
        .map(str::to_owned);
    wipe_json(&mut claims);
    id
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn jwt(claims: Value) -> String {
        let enc = |v: &Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string().as_bytes())
        };
        format!("{}.{}.sig", enc(&json!({"alg": "RS256"})), enc(&claims))
    }

    #[test]
    fn claude_code_credentials() {
        let file = json!({"claudeAiOauth": {
            "accessToken": "sk-ant-oat01-x", "refreshToken": "sk-ant-ort01-y",
            "expiresAt": 1_900_000_000_123u64, "scopes": ["user:inference", "user:profile"],
            "subscriptionType": "max"
        }});
        let t = Source::ClaudeCode
            .convert(file.to_string().as_bytes())
            .expect("converts");
        let f = t.fields();
        assert_eq!(f["access_token"], "sk-ant-oat01-x");
        assert_eq!(f["refresh_token"], "sk-ant-ort01-y");
        assert_eq!(f["expiry"], 1_900_000_000);
        assert_eq!(f["token_type"], "Bearer");
        assert_eq!(f["scope"], "user:inference user:profile");
        assert_eq!(f["subscriptionType"], "max");
        assert!(f.get("accessToken").is_none() && f.get("expiresAt").is_none());
        assert_eq!(Source::ClaudeCode.provider(), "anthropic");
    }

    #[test]
    fn codex_takes_its_expiry_from_the_jwt() {
        let access = jwt(json!({"exp": 1_900_000_500u64, "sub": "u"}));
        let file = json!({"OPENAI_API_KEY": null, "tokens": {
            "id_token": jwt(json!({"email": "a@b"})), "access_token": access,
            "refresh_token": "rt-codex", "account_id": "acct-1"
        }, "last_refresh": "2026-11-01T10:00:00Z"});
        let t = Source::Codex
            .convert(file.to_string().as_bytes())
            .expect("converts");
        let f = t.fields();
        assert_eq!(f["expiry"], 1_900_000_500);
        assert_eq!(f["refresh_token"], "rt-codex");
        assert_eq!(f["account_id"], "acct-1");
        assert!(f["id_token"].is_string());

        // No exp claim (or not a JWT): stored as expired, renewed at once.
        let file = json!({"tokens": {"access_token": "opaque", "refresh_token": "r"}});
        let t = Source::Codex
            .convert(file.to_string().as_bytes())
            .expect("converts");
        assert_eq!(t.fields()["expiry"], 0);
    }

    #[test]
    fn gemini_cli_credentials() {
        let file = json!({"access_token": "ya29.x", "refresh_token": "1//y",
            "scope": "https://www.googleapis.com/auth/cloud-platform", "token_type": "Bearer",
            "id_token": "e.y.j", "expiry_date": 1_900_000_000_999u64});
        let t = Source::GeminiCli
            .convert(file.to_string().as_bytes())
            .expect("converts");
        let f = t.fields();
        assert_eq!(f["expiry"], 1_900_000_000);
        assert_eq!(f["refresh_token"], "1//y");
        assert_eq!(f["id_token"], "e.y.j");
        assert!(f.get("expiry_date").is_none());
    }

    #[test]
    fn malformed_files_name_the_missing_field_only() {
        let cases: Vec<(Source, &str, &str)> = vec![
            (Source::ClaudeCode, "{}", "the file has no claudeAiOauth"),
            (
                Source::ClaudeCode,
                r#"{"claudeAiOauth":{"refreshToken":"SECRET-RT"}}"#,
                "the file has no claudeAiOauth.accessToken",
            ),
            (
                Source::ClaudeCode,
                r#"{"claudeAiOauth":{"accessToken":"SECRET-AT","expiresAt":"soon"}}"#,
                "claudeAiOauth.expiresAt must be a number (epoch milliseconds)",
            ),
            (
                Source::ClaudeCode,
                r#"{"claudeAiOauth":{"accessToken":5}}"#,
                "claudeAiOauth.accessToken must be a string",
            ),
            (
                Source::Codex,
                r#"{"OPENAI_API_KEY":"SECRET-KEY"}"#,
                "the file has no tokens (a ChatGPT login; an API-key login has nothing to import)",
            ),
            (
                Source::Codex,
                r#"{"tokens":{"refresh_token":"SECRET-RT"}}"#,
                "the file has no tokens.access_token",
            ),
            (Source::GeminiCli, "[]", "the file must be a JSON object"),
            (
                Source::GeminiCli,
                r#"{"refresh_token":"SECRET-RT"}"#,
                "the file has no access_token",
            ),
            (
                Source::GeminiCli,
                "{\"a\": SECRET",
                "not valid JSON at line 1 column 7",
            ),
        ];
        for (source, text, want) in cases {
            let e = source.convert(text.as_bytes()).expect_err(text).to_string();
            assert_eq!(e, want, "{text}");
            assert!(!e.contains("SECRET"));
        }
    }

    #[test]
    fn chatgpt_account_id_reads_the_auth_claim() {
        let token = jwt(json!({"https://api.openai.com/auth": {"chatgpt_account_id": "acct-9"}}));
        assert_eq!(chatgpt_account_id(&token), Some("acct-9".into()));
        assert_eq!(chatgpt_account_id(&jwt(json!({"sub": "u"}))), None);
        assert_eq!(chatgpt_account_id("a.!!!.c"), None);
    }

    #[test]
    fn jwt_exp_reads_only_well_formed_tokens() {
        assert_eq!(jwt_exp(&jwt(json!({"exp": 12}))), Some(12));
        assert_eq!(jwt_exp(&jwt(json!({"exp": "12"}))), None);
        assert_eq!(jwt_exp("a.!!!.c"), None);
        assert_eq!(jwt_exp("nodots"), None);
    }

    #[test]
    fn names_and_paths() {
        for s in Source::ALL {
            assert_eq!(Source::parse(s.name()), Some(s));
        }
        assert_eq!(Source::parse("claude"), None);
        assert_eq!(
            Source::GeminiCli.default_path(Path::new("/h")),
            PathBuf::from("/h/.gemini/oauth_creds.json")
        );
    }
}
