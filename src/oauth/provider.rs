//! Where and how a provider's refresh-token grant is sent: the built-in presets and the
//! profile's overrides, resolved into one [`Endpoint`].
//!
//! The presets are facts from the providers' own public clients, which embed them in
//! their source (an installed application's client id, and for Google its client secret,
//! which Google documents as "obviously not treated as a secret" for installed apps):
//!
//! | provider | token endpoint | client |
//! |---|---|---|
//! | `anthropic` | `https://console.anthropic.com/v1/oauth/token` | Claude Code's client id |
//! | `codex` | `https://auth.openai.com/oauth/token` | the Codex CLI's client id |
//! | `gemini` | `https://oauth2.googleapis.com/token` | the Gemini CLI's installed-app id and secret |
//!
//! All three take a form-encoded body. A profile table for a preset overrides only the
//! keys it names; a table for any other name defines a provider of its own and must name
//! at least `token_url` and `client_id`.

use std::fmt;
use std::net::IpAddr;

use reqwest::Url;

use crate::names::{self, NameKind};
use crate::secret::Secret;

/// How the grant's parameters are written in the request body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BodyFormat {
    /// `application/x-www-form-urlencoded` (RFC 6749 §6; every preset).
    #[default]
    Form,
    /// `application/json`, for providers that want it.
    Json,
}

impl BodyFormat {
    /// Reads the profile's spelling: `form` or `json`.
    pub fn parse(text: &str) -> Option<BodyFormat> {
        match text {
            "form" => Some(BodyFormat::Form),
            "json" => Some(BodyFormat::Json),
            _ => None,
        }
    }
}

/// Where a provider's client secret comes from.
#[derive(Clone, PartialEq, Eq)]
pub enum ClientSecret {
    /// A secret published in the provider's own public client (an installed
    /// application's, not confidential); still never logged.
    Published(Secret),
    /// The name of an API key in the store that holds the secret (the profile's
    /// `client_secret_key`), read at each refresh.
    StoreKey(String),
}

impl fmt::Debug for ClientSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientSecret::Published(_) => f.write_str("Published([redacted])"),
            ClientSecret::StoreKey(name) => f.debug_tuple("StoreKey").field(name).finish(),
        }
    }
}

/// One provider's token endpoint, resolved from its preset and the profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// The provider name, as in the store and the profile.
    pub provider: String,
    /// Where the grant is posted: `https://`, or `http://` on a loopback address.
    pub token_url: Url,
    /// The OAuth client id sent with every grant.
    pub client_id: String,
    /// The client secret sent with every grant, when the provider has one.
    pub client_secret: Option<ClientSecret>,
    /// How the body is written.
    pub body: BodyFormat,
}

/// The profile's table for one provider (`[provider.NAME]`): every key optional.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EndpointOverride {
    /// `token_url`: replaces the preset's endpoint.
    pub token_url: Option<String>,
    /// `client_id`: replaces the preset's client id.
    pub client_id: Option<String>,
    /// `client_secret_key`: the name of a store API key holding the client secret.
    pub client_secret_key: Option<String>,
    /// `body`: `form` or `json`.
    pub body: Option<BodyFormat>,
}

/// Why a provider's endpoint cannot be resolved. The text names the key and the problem
/// (callers say which provider); a URL is never quoted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    /// The provider name breaks the name rules (PROTOCOL.md §6).
    #[error("not a valid provider name")]
    BadProvider(String),
    /// `token_url` does not parse as a URL.
    #[error("token_url is not a valid URL: {0}")]
    BadUrl(String),
    /// `token_url` has a scheme other than `https`, or `http` off loopback.
    #[error("token_url must be https:// (plain http:// only on a loopback address such as 127.0.0.1 or [::1])")]
    Insecure,
    /// `token_url` carries a user name or password, which would be sent in clear text to
    /// any proxy and logged by servers.
    #[error("token_url must not carry a user name or password")]
    Credentials,
    /// A provider with no preset lacks a required key.
    #[error("no built-in preset, so {key} is required")]
    Missing {
        /// The provider.
        provider: String,
        /// The key it must name.
        key: &'static str,
    },
    /// `client_id` is empty.
    #[error("client_id must not be empty")]
    EmptyClientId,
    /// `client_secret_key` breaks the API key name rules.
    #[error("client_secret_key {0:?} is not a valid API key name")]
    BadSecretKey(String),
}

/// The providers with a built-in preset.
pub const PRESETS: [&str; 3] = ["anthropic", "codex", "gemini"];

/// The Gemini CLI's published installed-application client secret.
const GEMINI_CLIENT_SECRET: &str = "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";

/// The built-in preset of `provider`, if it has one.
pub fn preset(provider: &str) -> Option<Endpoint> {
    let (url, client_id, secret) = match provider {
        "anthropic" => (
            "https://console.anthropic.com/v1/oauth/token",
            "9d1c250a-e61b-44d9-88ed-5944d1962f5e",
            None,
        ),
        "codex" => (
            "https://auth.openai.com/oauth/token",
            "app_EMoamEEZ73f0CkXaXp7hrann",
            None,
        ),
        "gemini" => (
            "https://oauth2.googleapis.com/token",
            "681255809395-oo8ft2oprdrnp9e3aqf6av3hmdib135j.apps.googleusercontent.com",
            Some(ClientSecret::Published(Secret::from(GEMINI_CLIENT_SECRET))),
        ),
        _ => return None,
    };
    Some(Endpoint {
        provider: provider.to_owned(),
        token_url: Url::parse(url).expect("a preset URL parses"),
        client_id: client_id.to_owned(),
        client_secret: secret,
        body: BodyFormat::Form,
    })
}

impl Endpoint {
    /// The endpoint of `provider`: its preset with `overrides` applied key by key, or, for a
    /// provider without a preset, `overrides` alone (which must name `token_url` and
    /// `client_id`).
    pub fn resolve(
        provider: &str,
        overrides: &EndpointOverride,
    ) -> Result<Endpoint, EndpointError> {
        if !names::is_valid(NameKind::Provider, provider) {
            return Err(EndpointError::BadProvider(provider.to_owned()));
        }
        let missing = |key| EndpointError::Missing {
            provider: provider.to_owned(),
            key,
        };
        let mut endpoint = match preset(provider) {
            Some(preset) => preset,
            None => Endpoint {
                provider: provider.to_owned(),
                token_url: parse_token_url(
                    overrides
                        .token_url
                        .as_deref()
                        .ok_or_else(|| missing("token_url"))?,
                )?,
                client_id: overrides
                    .client_id
                    .clone()
                    .ok_or_else(|| missing("client_id"))?,
                client_secret: None,
                body: BodyFormat::Form,
            },
        };
        if let Some(url) = &overrides.token_url {
            endpoint.token_url = parse_token_url(url)?;
        }
        if let Some(id) = &overrides.client_id {
            endpoint.client_id = id.clone();
        }
        if endpoint.client_id.is_empty() {
            return Err(EndpointError::EmptyClientId);
        }
        if let Some(key) = &overrides.client_secret_key {
            if !names::is_valid(NameKind::Key, key) {
                return Err(EndpointError::BadSecretKey(key.clone()));
            }
            endpoint.client_secret = Some(ClientSecret::StoreKey(key.clone()));
        }
        if let Some(body) = overrides.body {
            endpoint.body = body;
        }
        Ok(endpoint)
    }
}

/// Parses a token endpoint URL: `https://`, or `http://` only when the host is a loopback
/// address (`127.0.0.0/8`, `::1` or `localhost`), for tests and local development. No
/// user name or password in it.
pub fn parse_token_url(text: &str) -> Result<Url, EndpointError> {
    let url = Url::parse(text).map_err(|e| EndpointError::BadUrl(e.to_string()))?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err(EndpointError::Credentials);
    }
    match url.scheme() {
        "https" if url.host().is_some() => Ok(url),
        "http" if is_loopback(&url) => Ok(url),
        _ => Err(EndpointError::Insecure),
    }
}

/// True when `url`'s host is a loopback address or `localhost`.
pub fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip).is_loopback(),
        Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip).is_loopback(),
        Some(url::Host::Domain(name)) => name.eq_ignore_ascii_case("localhost"),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_resolve_with_their_published_values() {
        for name in PRESETS {
            let e = Endpoint::resolve(name, &EndpointOverride::default()).expect(name);
            assert_eq!(e.token_url.scheme(), "https");
            assert_eq!(e.body, BodyFormat::Form);
            assert!(!e.client_id.is_empty());
        }
        let gemini = preset("gemini").expect("gemini");
        assert!(matches!(
            gemini.client_secret,
            Some(ClientSecret::Published(_))
        ));
        assert!(preset("anthropic").expect("a").client_secret.is_none());
        assert!(preset("acme").is_none());
    }

    #[test]
    fn an_override_of_a_preset_replaces_only_the_keys_it_names() {
        let e = Endpoint::resolve(
            "anthropic",
            &EndpointOverride {
                token_url: Some("http://127.0.0.1:8080/v1/oauth/token".into()),
                ..EndpointOverride::default()
            },
        )
        .expect("resolve");
        assert_eq!(e.token_url.as_str(), "http://127.0.0.1:8080/v1/oauth/token");
        assert_eq!(e.client_id, "9d1c250a-e61b-44d9-88ed-5944d1962f5e");
        let e = Endpoint::resolve(
            "gemini",
            &EndpointOverride {
                client_secret_key: Some("my-gemini-secret".into()),
                body: Some(BodyFormat::Json),
                ..EndpointOverride::default()
            },
        )
        .expect("resolve");
        assert_eq!(
            e.client_secret,
            Some(ClientSecret::StoreKey("my-gemini-secret".into()))
        );
        assert_eq!(e.body, BodyFormat::Json);
        assert_eq!(e.token_url.as_str(), "https://oauth2.googleapis.com/token");
    }

    #[test]
    fn a_provider_without_a_preset_needs_url_and_client_id() {
        let only_url = EndpointOverride {
            token_url: Some("https://login.acme.example/oauth/token".into()),
            ..EndpointOverride::default()
        };
        assert_eq!(
            Endpoint::resolve("acme", &only_url),
            Err(EndpointError::Missing {
                provider: "acme".into(),
                key: "client_id"
            })
        );
        let full = EndpointOverride {
            client_id: Some("cli-123".into()),
            ..only_url
        };
        let e = Endpoint::resolve("acme", &full).expect("resolve");
        assert_eq!(e.client_id, "cli-123");
        assert!(e.client_secret.is_none());
        assert!(matches!(
            Endpoint::resolve("../x", &full),
            Err(EndpointError::BadProvider(_))
        ));
        let empty_id = EndpointOverride {
            client_id: Some(String::new()),
            ..full.clone()
        };
        assert_eq!(
            Endpoint::resolve("acme", &empty_id),
            Err(EndpointError::EmptyClientId)
        );
        let bad_key = EndpointOverride {
            client_secret_key: Some("a/b".into()),
            ..full
        };
        assert!(matches!(
            Endpoint::resolve("acme", &bad_key),
            Err(EndpointError::BadSecretKey(_))
        ));
    }

    #[test]
    fn plain_http_only_on_loopback() {
        for ok in [
            "https://login.example/token",
            "http://127.0.0.1:9/token",
            "http://127.3.4.5/token",
            "http://[::1]:8080/token",
            "http://localhost:1/token",
        ] {
            assert!(parse_token_url(ok).is_ok(), "{ok}");
        }
        for insecure in [
            "http://login.example/token",
            "http://10.0.0.1/token",
            "http://[::2]/token",
            "http://127.0.0.1.example/token",
            "ftp://127.0.0.1/token",
            "file:///etc/passwd",
        ] {
            assert_eq!(
                parse_token_url(insecure),
                Err(EndpointError::Insecure),
                "{insecure}"
            );
        }
        assert!(matches!(
            parse_token_url("not a url"),
            Err(EndpointError::BadUrl(_))
        ));
        assert_eq!(
            parse_token_url("https://user:pw@login.example/token"),
            Err(EndpointError::Credentials)
        );
    }

    #[test]
    fn debug_never_shows_a_published_secret() {
        let text = format!("{:?}", preset("gemini").expect("gemini"));
        assert!(!text.contains(GEMINI_CLIENT_SECRET), "{text}");
        assert!(text.contains("[redacted]"), "{text}");
    }
}
