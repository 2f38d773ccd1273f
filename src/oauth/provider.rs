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
//!
//! Each endpoint also carries how `credproxy login` gets a first token ([`LoginConfig`]):
//! the authorization and device authorization endpoints, the scopes, the redirect (a
//! loopback listener or a page that shows the code to paste), and where `credproxy logout`
//! revokes a token. The presets' login values, and where each comes from:
//!
//! - `anthropic`, from the public reimplementations of Claude Code's login
//!   (anomalyco/opencode-anthropic-auth `index.mjs`; llxprt-code has the same): authorize
//!   at `https://claude.ai/oauth/authorize` with `code=true`, redirect to
//!   `https://console.anthropic.com/oauth/code/callback` (a page that shows `code#state`
//!   to paste), scopes `org:create_api_key user:profile user:inference`, the code exchanged
//!   with a JSON body that also carries `state`. No revocation endpoint is published.
//! - `codex`, from the Codex CLI (openai/codex `codex-rs/login/src/server.rs`): authorize
//!   at `https://auth.openai.com/oauth/authorize`, redirect to the loopback listener
//!   `http://localhost:1455/auth/callback` (the port its client registers), scopes
//!   `openid profile email offline_access`, and its extra parameters
//!   `id_token_add_organizations=true`, `codex_cli_simplified_flow=true`,
//!   `originator=codex_cli_rs`; `account_id` is the `chatgpt_account_id` of the id token's
//!   `https://api.openai.com/auth` claim (`persist_tokens_to_store_async` there). Its
//!   revocation endpoint takes a JSON body (`codex-rs/login/src/auth/revoke.rs`), not
//!   RFC 7009's form, so none is configured.
//! - `gemini`, from the Gemini CLI (google-gemini/gemini-cli
//!   `packages/core/src/code_assist/oauth2.ts`, `authWithWeb`): authorize at
//!   `https://accounts.google.com/o/oauth2/v2/auth` (google-auth-library's default) with
//!   `access_type=offline`, redirect to `http://127.0.0.1:<ephemeral port>/oauth2callback`,
//!   scopes `cloud-platform`, `userinfo.email`, `userinfo.profile`. We add `prompt=consent`
//!   (Google's documented way to get a refresh token on every login, not only the first).
//!   Revocation at `https://oauth2.googleapis.com/revoke` (Google's OAuth 2.0 for
//!   installed apps guide).

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

/// Where the authorization server sends the browser back with the code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Redirect {
    /// A listener of ours on the loopback interface (RFC 8252 §7.3): the redirect URI is
    /// `http://HOST:PORT/PATH`; port 0 means an ephemeral port chosen at each login.
    Loopback {
        /// How the redirect URI names the host: `127.0.0.1`, `[::1]` or `localhost`.
        host: String,
        /// The port; 0 for an ephemeral one.
        port: u16,
        /// The callback path, starting with `/`.
        path: String,
    },
    /// A page of the provider's (https) that shows the code (`code#state`) for the person
    /// to paste into the terminal.
    Paste(Url),
}

impl Default for Redirect {
    fn default() -> Self {
        Redirect::Loopback {
            host: "127.0.0.1".to_owned(),
            port: 0,
            path: "/callback".to_owned(),
        }
    }
}

/// How `credproxy login` and `credproxy logout` talk to a provider, besides its token
/// endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoginConfig {
    /// The authorization endpoint (RFC 6749 §3.1): the loopback and paste flows.
    pub authorization_url: Option<Url>,
    /// The device authorization endpoint (RFC 8628 §3.1): the device flow.
    pub device_authorization_url: Option<Url>,
    /// The token revocation endpoint (RFC 7009), used by `logout`.
    pub revocation_url: Option<Url>,
    /// The scopes asked for.
    pub scopes: Vec<String>,
    /// Where the browser comes back with the code.
    pub redirect: Redirect,
    /// How the code exchange's body is written (the device flow's polls too).
    pub exchange_body: BodyFormat,
    /// Extra parameters of the authorization request, as the provider's own client sends
    /// them (presets only).
    pub extra_params: Vec<(String, String)>,
    /// The code exchange also carries the `state` (Anthropic's endpoint wants it).
    pub state_in_exchange: bool,
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
    /// How a first token is obtained (`credproxy login`) and revoked (`logout`).
    pub login: LoginConfig,
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
    /// `body`: `form` or `json` (the refresh grant, the code exchange and device polls).
    pub body: Option<BodyFormat>,
    /// `authorization_url`: the authorization endpoint (loopback and paste flows).
    pub authorization_url: Option<String>,
    /// `device_authorization_url`: the device authorization endpoint (device flow).
    pub device_authorization_url: Option<String>,
    /// `revocation_url`: the RFC 7009 endpoint `logout` revokes at.
    pub revocation_url: Option<String>,
    /// `scopes`: the scopes a login asks for.
    pub scopes: Option<Vec<String>>,
    /// `redirect_uri`: `http://127.0.0.1[:PORT]/PATH` (or `localhost`, `[::1]`) for a
    /// loopback listener (no port: an ephemeral one), or an `https://` page that shows the
    /// code to paste.
    pub redirect_uri: Option<String>,
}

/// Why a provider's endpoint cannot be resolved. The text names the key and the problem
/// (callers say which provider); a URL is never quoted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    /// The provider name breaks the name rules (PROTOCOL.md §6).
    #[error("not a valid provider name")]
    BadProvider(String),
    /// A URL key (`token_url`, `authorization_url`, ...) does not parse as a URL.
    #[error("{0} is not a valid URL: {1}")]
    BadUrl(&'static str, String),
    /// A URL key has a scheme other than `https`, or `http` off loopback.
    #[error("{0} must be https:// (plain http:// only on a loopback address such as 127.0.0.1 or [::1])")]
    Insecure(&'static str),
    /// A URL key carries a user name or password, which would be sent in clear text to
    /// any proxy and logged by servers.
    #[error("{0} must not carry a user name or password")]
    Credentials(&'static str),
    /// `redirect_uri` is neither a loopback `http://` URL nor an `https://` page.
    #[error("redirect_uri must be http:// on 127.0.0.1, [::1] or localhost (a loopback listener), or https:// (a page that shows the code to paste), with no query or fragment")]
    BadRedirect,
    /// `scopes` has an empty scope or one with a space or a control character.
    #[error("scopes must be non-empty strings without spaces")]
    BadScope,
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
    let (url, client_id, secret, login) = match provider {
        "anthropic" => (
            "https://console.anthropic.com/v1/oauth/token",
            "9d1c250a-e61b-44d9-88ed-5944d1962f5e",
            None,
            LoginConfig {
                authorization_url: Some(fixed_url("https://claude.ai/oauth/authorize")),
                scopes: scopes(&["org:create_api_key", "user:profile", "user:inference"]),
                redirect: Redirect::Paste(fixed_url(
                    "https://console.anthropic.com/oauth/code/callback",
                )),
                exchange_body: BodyFormat::Json,
                extra_params: params(&[("code", "true")]),
                state_in_exchange: true,
                ..LoginConfig::default()
            },
        ),
        "codex" => (
            "https://auth.openai.com/oauth/token",
            "app_EMoamEEZ73f0CkXaXp7hrann",
            None,
            LoginConfig {
                authorization_url: Some(fixed_url("https://auth.openai.com/oauth/authorize")),
                scopes: scopes(&["openid", "profile", "email", "offline_access"]),
                redirect: Redirect::Loopback {
                    host: "localhost".to_owned(),
                    port: 1455,
                    path: "/auth/callback".to_owned(),
                },
                extra_params: params(&[
                    ("id_token_add_organizations", "true"),
                    ("codex_cli_simplified_flow", "true"),
                    ("originator", "codex_cli_rs"),
                ]),
                ..LoginConfig::default()
            },
        ),
        "gemini" => (
            "https://oauth2.googleapis.com/token",
            "681255809395-oo8ft2oprdrnp9e3aqf6av3hmdib135j.apps.googleusercontent.com",
            Some(ClientSecret::Published(Secret::from(GEMINI_CLIENT_SECRET))),
            LoginConfig {
                authorization_url: Some(fixed_url("https://accounts.google.com/o/oauth2/v2/auth")),
                revocation_url: Some(fixed_url("https://oauth2.googleapis.com/revoke")),
                scopes: scopes(&[
                    "https://www.googleapis.com/auth/cloud-platform",
                    "https://www.googleapis.com/auth/userinfo.email",
                    "https://www.googleapis.com/auth/userinfo.profile",
                ]),
                redirect: Redirect::Loopback {
                    host: "127.0.0.1".to_owned(),
                    port: 0,
                    path: "/oauth2callback".to_owned(),
                },
                extra_params: params(&[("access_type", "offline"), ("prompt", "consent")]),
                ..LoginConfig::default()
            },
        ),
        _ => return None,
    };
    Some(Endpoint {
        provider: provider.to_owned(),
        token_url: fixed_url(url),
        client_id: client_id.to_owned(),
        client_secret: secret,
        body: BodyFormat::Form,
        login,
    })
}

fn fixed_url(text: &str) -> Url {
    Url::parse(text).expect("a preset URL parses")
}

fn scopes(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

fn params(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
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
                login: LoginConfig::default(),
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
            endpoint.login.exchange_body = body;
        }
        let login = &mut endpoint.login;
        if let Some(u) = &overrides.authorization_url {
            login.authorization_url = Some(parse_url("authorization_url", u)?);
        }
        if let Some(u) = &overrides.device_authorization_url {
            login.device_authorization_url = Some(parse_url("device_authorization_url", u)?);
        }
        if let Some(u) = &overrides.revocation_url {
            login.revocation_url = Some(parse_url("revocation_url", u)?);
        }
        if let Some(list) = &overrides.scopes {
            if list
                .iter()
                .any(|s| s.is_empty() || s.chars().any(|c| c == ' ' || c.is_control()))
            {
                return Err(EndpointError::BadScope);
            }
            login.scopes = list.clone();
        }
        if let Some(u) = &overrides.redirect_uri {
            login.redirect = parse_redirect(u)?;
        }
        Ok(endpoint)
    }
}

/// Parses a `redirect_uri`: a loopback `http://` URL (a listener of ours; no port means an
/// ephemeral one), or an `https://` page that shows the code to paste. No query, no
/// fragment, no user name or password.
pub fn parse_redirect(text: &str) -> Result<Redirect, EndpointError> {
    let key = "redirect_uri";
    let url = Url::parse(text).map_err(|e| EndpointError::BadUrl(key, e.to_string()))?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err(EndpointError::Credentials(key));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(EndpointError::BadRedirect);
    }
    match url.scheme() {
        "https" if url.host().is_some() => Ok(Redirect::Paste(url)),
        "http" if is_loopback(&url) => Ok(Redirect::Loopback {
            host: match url.host() {
                Some(url::Host::Domain(_)) => "localhost".to_owned(),
                Some(url::Host::Ipv6(ip)) => format!("[{ip}]"),
                Some(url::Host::Ipv4(ip)) => ip.to_string(),
                None => return Err(EndpointError::BadRedirect),
            },
            // `url` drops the scheme's default port; an explicit :80 is kept as 80.
            port: url.port().unwrap_or(0),
            path: url.path().to_owned(),
        }),
        _ => Err(EndpointError::BadRedirect),
    }
}

/// Parses a token endpoint URL: `https://`, or `http://` only when the host is a loopback
/// address (`127.0.0.0/8`, `::1` or `localhost`), for tests and local development. No
/// user name or password in it.
pub fn parse_token_url(text: &str) -> Result<Url, EndpointError> {
    parse_url("token_url", text)
}

/// Parses the endpoint URL of profile key `key` by the rules of [`parse_token_url`].
pub fn parse_url(key: &'static str, text: &str) -> Result<Url, EndpointError> {
    let url = Url::parse(text).map_err(|e| EndpointError::BadUrl(key, e.to_string()))?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err(EndpointError::Credentials(key));
    }
    match url.scheme() {
        "https" if url.host().is_some() => Ok(url),
        "http" if is_loopback(&url) => Ok(url),
        _ => Err(EndpointError::Insecure(key)),
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
                Err(EndpointError::Insecure("token_url")),
                "{insecure}"
            );
        }
        assert!(matches!(
            parse_token_url("not a url"),
            Err(EndpointError::BadUrl("token_url", _))
        ));
        assert_eq!(
            parse_token_url("https://user:pw@login.example/token"),
            Err(EndpointError::Credentials("token_url"))
        );
        assert_eq!(
            parse_url("revocation_url", "http://10.0.0.1/revoke"),
            Err(EndpointError::Insecure("revocation_url"))
        );
    }

    #[test]
    fn presets_carry_their_login_flows() {
        let a = preset("anthropic").expect("a").login;
        assert!(matches!(a.redirect, Redirect::Paste(_)));
        assert_eq!(a.exchange_body, BodyFormat::Json);
        assert!(a.state_in_exchange);
        let c = preset("codex").expect("c").login;
        assert_eq!(
            c.redirect,
            Redirect::Loopback {
                host: "localhost".into(),
                port: 1455,
                path: "/auth/callback".into()
            }
        );
        assert!(c.scopes.contains(&"offline_access".to_owned()));
        let g = preset("gemini").expect("g").login;
        assert!(matches!(g.redirect, Redirect::Loopback { port: 0, .. }));
        assert!(g.revocation_url.is_some());
    }

    #[test]
    fn login_overrides_are_checked() {
        let base = EndpointOverride {
            token_url: Some("https://login.acme.example/oauth/token".into()),
            client_id: Some("cli-123".into()),
            ..EndpointOverride::default()
        };
        let e = Endpoint::resolve(
            "acme",
            &EndpointOverride {
                authorization_url: Some("https://login.acme.example/oauth/authorize".into()),
                device_authorization_url: Some("http://127.0.0.1:9/device".into()),
                scopes: Some(vec!["openid".into(), "offline_access".into()]),
                redirect_uri: Some("http://localhost:8123/cb".into()),
                body: Some(BodyFormat::Json),
                ..base.clone()
            },
        )
        .expect("resolve");
        assert_eq!(
            e.login.redirect,
            Redirect::Loopback {
                host: "localhost".into(),
                port: 8123,
                path: "/cb".into()
            }
        );
        assert_eq!(e.login.exchange_body, BodyFormat::Json);
        assert_eq!(e.login.scopes, ["openid", "offline_access"]);
        let bad = |o: EndpointOverride| Endpoint::resolve("acme", &o).expect_err("bad");
        assert_eq!(
            bad(EndpointOverride {
                authorization_url: Some("http://login.acme.example/a".into()),
                ..base.clone()
            }),
            EndpointError::Insecure("authorization_url")
        );
        assert_eq!(
            bad(EndpointOverride {
                redirect_uri: Some("http://example.com/cb".into()),
                ..base.clone()
            }),
            EndpointError::BadRedirect
        );
        assert_eq!(
            bad(EndpointOverride {
                scopes: Some(vec!["a b".into()]),
                ..base.clone()
            }),
            EndpointError::BadScope
        );
        assert!(matches!(
            parse_redirect("http://127.0.0.1/cb").expect("ok"),
            Redirect::Loopback { port: 0, .. }
        ));
        assert!(matches!(
            parse_redirect("https://x.example/code").expect("ok"),
            Redirect::Paste(_)
        ));
        assert_eq!(
            parse_redirect("https://x.example/code?a=1"),
            Err(EndpointError::BadRedirect)
        );
    }

    #[test]
    fn debug_never_shows_a_published_secret() {
        let text = format!("{:?}", preset("gemini").expect("gemini"));
        assert!(!text.contains(GEMINI_CLIENT_SECRET), "{text}");
        assert!(text.contains("[redacted]"), "{text}");
    }
}
