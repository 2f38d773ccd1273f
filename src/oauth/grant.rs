//! One refresh-token grant on paper (RFC 6749 §6): the request body, the token response,
//! and what a failed answer means.
//!
//! Every buffer that holds a refresh token, a client secret or a token response is wiped
//! when it is dropped: the request body is built in a buffer sized up front (a
//! reallocation would leave an unwiped copy behind), and the parsed response lives in a
//! [`Grant`] whose strings are wiped on drop.

use std::fmt;

use serde_json::{Map, Value};
use zeroize::Zeroizing;

use super::provider::{BodyFormat, Endpoint};
use crate::secret::{wipe_json, Secret};
use crate::token::{Token, TokenError, REFRESH_TOKEN};

/// The lifetime given to an access token whose response has no `expires_in`: one hour,
/// the shortest any preset's provider issues, so the token is renewed early rather than
/// served after it expired.
pub const DEFAULT_EXPIRES_IN: u64 = 3600;

/// The OAuth `error` codes that mean the refresh token or the client is no longer
/// accepted: the person has to log in again (PROTOCOL.md §14).
pub const AUTH_FAILURE_CODES: [&str; 3] =
    ["invalid_grant", "invalid_client", "unauthorized_client"];

/// What one grant sends: the endpoint's client, the refresh token and the client secret
/// (when the provider has one, already read from the store).
pub struct GrantRequest<'a> {
    /// Where and how.
    pub endpoint: &'a Endpoint,
    /// The stored refresh token.
    pub refresh_token: &'a Secret,
    /// The client secret, when the provider has one.
    pub client_secret: Option<&'a Secret>,
}

impl fmt::Debug for GrantRequest<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrantRequest")
            .field("provider", &self.endpoint.provider)
            .field("token_url", &self.endpoint.token_url.as_str())
            .finish_non_exhaustive()
    }
}

impl GrantRequest<'_> {
    /// The `Content-Type` of [`GrantRequest::body`].
    pub fn content_type(&self) -> &'static str {
        match self.endpoint.body {
            BodyFormat::Form => "application/x-www-form-urlencoded",
            BodyFormat::Json => "application/json",
        }
    }

    /// The request body, in a buffer wiped on drop.
    pub fn body(&self) -> Zeroizing<Vec<u8>> {
        let mut params: Vec<(&str, &str)> = vec![
            ("grant_type", "refresh_token"),
            ("refresh_token", self.refresh_token.expose()),
            ("client_id", &self.endpoint.client_id),
        ];
        if let Some(secret) = self.client_secret {
            params.push(("client_secret", secret.expose()));
        }
        match self.endpoint.body {
            BodyFormat::Form => form_body(&params),
            BodyFormat::Json => json_body(&params),
        }
    }
}

/// `params` as a request body of `format`, in a buffer wiped on drop (the code exchange,
/// device polls and revocation use it too).
pub fn params_body(format: BodyFormat, params: &[(&str, &str)]) -> Zeroizing<Vec<u8>> {
    match format {
        BodyFormat::Form => form_body(params),
        BodyFormat::Json => json_body(params),
    }
}

/// The `Content-Type` of a body of `format`.
pub fn content_type(format: BodyFormat) -> &'static str {
    match format {
        BodyFormat::Form => "application/x-www-form-urlencoded",
        BodyFormat::Json => "application/json",
    }
}

/// `k=v&k=v`, percent-encoded, in a buffer that never reallocates.
fn form_body(params: &[(&str, &str)]) -> Zeroizing<Vec<u8>> {
    // Percent-encoding writes at most three bytes per input byte.
    let most: usize = params
        .iter()
        .map(|(k, v)| 3 * (k.len() + v.len()) + 2)
        .sum();
    let mut out = Zeroizing::new(Vec::with_capacity(most));
    for (i, (key, value)) in params.iter().enumerate() {
        if i > 0 {
            out.push(b'&');
        }
        for part in form_urlencoded::byte_serialize(key.as_bytes()) {
            out.extend_from_slice(part.as_bytes());
        }
        out.push(b'=');
        for part in form_urlencoded::byte_serialize(value.as_bytes()) {
            out.extend_from_slice(part.as_bytes());
        }
    }
    debug_assert!(out.len() <= most);
    out
}

/// `{"k":"v",...}` in a buffer that never reallocates.
fn json_body(params: &[(&str, &str)]) -> Zeroizing<Vec<u8>> {
    struct Params<'a>(&'a [(&'a str, &'a str)]);
    impl serde::Serialize for Params<'_> {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            use serde::ser::SerializeMap;
            let mut map = s.serialize_map(Some(self.0.len()))?;
            for (k, v) in self.0 {
                map.serialize_entry(k, v)?;
            }
            map.end()
        }
    }
    let params = Params(params);
    let mut out = Zeroizing::new(Vec::with_capacity(crate::token::json_len(&params)));
    // A map of strings always serializes.
    let _ = serde_json::to_writer(&mut *out, &params);
    out
}

/// A successful token response: the fields to merge into the stored token (PROTOCOL.md
/// §14), every string wiped on drop.
pub struct Grant {
    fields: Map<String, Value>,
    expires_in_defaulted: bool,
}

impl fmt::Debug for Grant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Grant")
            .field("fields", &self.fields.keys().collect::<Vec<_>>())
            .field("expires_in_defaulted", &self.expires_in_defaulted)
            .finish()
    }
}

impl Drop for Grant {
    fn drop(&mut self) {
        for value in self.fields.values_mut() {
            wipe_json(value);
        }
    }
}

/// What is wrong with a token response that came with a success status. The text names
/// the field, never a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResponseError {
    /// The body is not a JSON object.
    #[error("the token response is not a JSON object")]
    NotAnObject,
    /// `access_token` is absent, empty or not a string.
    #[error("the token response has no access_token")]
    NoAccessToken,
    /// A field has the wrong type.
    #[error("the token response's {0} {1}")]
    BadField(&'static str, &'static str),
}

impl Grant {
    /// Reads a token response received at `now` (epoch seconds): `access_token` (required),
    /// `expires_in` (seconds; a number or a numeric string; absent: [`DEFAULT_EXPIRES_IN`]),
    /// `token_type` (default `Bearer`), an optional `refresh_token` (a rotated one), and any
    /// other field (`scope`, `id_token`, ...), kept as it is.
    pub fn parse(body: &[u8], now: u64) -> Result<Grant, ResponseError> {
        // Parsed without leaving copies of the tokens in freed memory.
        let fields = match crate::secret_json::parse(body) {
            Ok(Value::Object(map)) => map,
            Ok(mut other) => {
                wipe_json(&mut other);
                return Err(ResponseError::NotAnObject);
            }
            Err(_) => return Err(ResponseError::NotAnObject),
        };
        // Owned from here, so every path below wipes it.
        let mut grant = Grant {
            fields,
            expires_in_defaulted: false,
        };
        match grant.fields.get("access_token") {
            Some(Value::String(s)) if !s.is_empty() => {}
            _ => return Err(ResponseError::NoAccessToken),
        }
        let expires_in = match grant.fields.remove("expires_in") {
            None | Some(Value::Null) => {
                grant.expires_in_defaulted = true;
                DEFAULT_EXPIRES_IN
            }
            Some(Value::Number(n)) => n
                .as_u64()
                .or_else(|| n.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
                .ok_or(ResponseError::BadField(
                    "expires_in",
                    "must be a non-negative number",
                ))?,
            Some(Value::String(s)) => s.trim().parse::<u64>().map_err(|_| {
                ResponseError::BadField("expires_in", "must be a non-negative number")
            })?,
            Some(_) => {
                return Err(ResponseError::BadField(
                    "expires_in",
                    "must be a non-negative number",
                ))
            }
        };
        grant
            .fields
            .insert("expiry".into(), Value::from(now.saturating_add(expires_in)));
        match grant.fields.get("token_type") {
            None | Some(Value::Null) => {
                grant
                    .fields
                    .insert("token_type".into(), Value::from("Bearer"));
            }
            Some(Value::String(_)) => {}
            Some(_) => return Err(ResponseError::BadField("token_type", "must be a string")),
        }
        match grant.fields.get(REFRESH_TOKEN) {
            None | Some(Value::String(_)) | Some(Value::Null) => {}
            Some(_) => return Err(ResponseError::BadField(REFRESH_TOKEN, "must be a string")),
        }
        match grant.fields.get("scope") {
            None | Some(Value::String(_)) | Some(Value::Null) => {}
            // Some servers send scopes as a list; the token shape wants a string.
            Some(Value::Array(items)) if items.iter().all(Value::is_string) => {
                let joined = items
                    .iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(" ");
                grant.fields.insert("scope".into(), Value::from(joined));
            }
            Some(_) => return Err(ResponseError::BadField("scope", "must be a string")),
        }
        Ok(grant)
    }

    /// A copy holding only the fields a token cannot do without (`access_token`,
    /// `expiry`, `token_type`, `refresh_token`, `scope`): what is stored when the whole
    /// answer would make a token too large to serve.
    pub fn essential(&self) -> Grant {
        let fields = [
            "access_token",
            "expiry",
            "token_type",
            REFRESH_TOKEN,
            "scope",
        ]
        .iter()
        .filter_map(|k| self.fields.get(*k).map(|v| ((*k).to_owned(), v.clone())))
        .collect();
        Grant {
            fields,
            expires_in_defaulted: self.expires_in_defaulted,
        }
    }

    /// A copy of the whole response (wiped on drop like this one): a store that may ask
    /// its write's `decide` again after a lost compare-and-swap merges a fresh copy each
    /// time.
    pub fn duplicate(&self) -> Grant {
        Grant {
            fields: self.fields.clone(),
            expires_in_defaulted: self.expires_in_defaulted,
        }
    }

    /// True when the response had no `expires_in` and [`DEFAULT_EXPIRES_IN`] was used.
    pub fn expires_in_defaulted(&self) -> bool {
        self.expires_in_defaulted
    }

    /// The new `expiry` (epoch seconds).
    pub fn expiry(&self) -> u64 {
        self.fields
            .get("expiry")
            .and_then(Value::as_u64)
            .unwrap_or(0)
    }

    /// The string field `key` of the response, when it has one. Callers must not log it.
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.fields.get(key).and_then(Value::as_str)
    }

    /// Sets the field `key` (a value derived from the response, such as an account id).
    pub fn insert(&mut self, key: &str, value: Value) {
        if let Some(mut old) = self.fields.insert(key.to_owned(), value) {
            wipe_json(&mut old);
        }
    }

    /// The response as a whole token to store (a login's first token).
    pub fn into_token(mut self) -> Result<Token, TokenError> {
        Token::from_map(std::mem::take(&mut self.fields))
    }

    /// True when the provider returned a new (rotated) refresh token.
    pub fn rotated(&self) -> bool {
        matches!(self.fields.get(REFRESH_TOKEN), Some(Value::String(s)) if !s.is_empty())
    }

    /// `stored` with this response merged in (PROTOCOL.md §6 and §14): new `access_token`
    /// and `expiry`, a returned `refresh_token` replaces the stored one, other returned
    /// fields replace theirs, the rest is kept.
    pub fn merge_into(mut self, stored: &Token) -> Result<Token, TokenError> {
        let fields = std::mem::take(&mut self.fields);
        let incoming = Token::from_map(fields)?;
        Ok(stored.merge(&incoming))
    }
}

/// How a failed answer of the token endpoint is classified (PROTOCOL.md §14), from its
/// status and the OAuth `error` member alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The refresh token or the client is refused: no retry, the bucket needs a login.
    AuthFailure,
    /// Worth another attempt: 429 and 5xx.
    Transient,
    /// Any other refusal: not retried.
    Rejected,
}

/// Classifies a non-success answer: 400/401 with `invalid_grant`, `invalid_client` or
/// `unauthorized_client`, and any 401, are auth failures; 429 and 5xx are transient;
/// everything else is rejected.
pub fn classify(status: u16, error_code: Option<&str>) -> Verdict {
    let auth_code = error_code.is_some_and(|c| AUTH_FAILURE_CODES.contains(&c));
    match status {
        401 => Verdict::AuthFailure,
        400 if auth_code => Verdict::AuthFailure,
        429 | 500..=599 => Verdict::Transient,
        _ => Verdict::Rejected,
    }
}

/// The OAuth `error` member of an error body, when the body is a JSON object and the
/// member is a plain code (`[a-z0-9_.-]`, at most 64 characters, as RFC 6749 §5.2 codes
/// are). Anything else is dropped, so an upstream body never reaches a log line.
pub fn error_code(body: &[u8]) -> Option<String> {
    let mut value: Value = serde_json::from_slice(body).ok()?;
    let code = value
        .get("error")
        .and_then(Value::as_str)
        .filter(|c| {
            !c.is_empty()
                && c.len() <= 64
                && c.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b))
        })
        .map(str::to_owned);
    wipe_json(&mut value);
    code
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oauth::provider::preset;

    fn request_body(format: BodyFormat, secret: Option<&Secret>) -> String {
        let mut endpoint = preset("gemini").expect("gemini");
        endpoint.body = format;
        let rt = Secret::from("rt/with+odd&chars=");
        let req = GrantRequest {
            endpoint: &endpoint,
            refresh_token: &rt,
            client_secret: secret,
        };
        String::from_utf8(req.body().to_vec()).expect("utf-8")
    }

    #[test]
    fn form_body_is_percent_encoded() {
        let secret = Secret::from("s3cr3t");
        let body = request_body(BodyFormat::Form, Some(&secret));
        let pairs: Vec<(String, String)> = form_urlencoded::parse(body.as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        assert_eq!(pairs[0], ("grant_type".into(), "refresh_token".into()));
        assert_eq!(
            pairs[1],
            ("refresh_token".into(), "rt/with+odd&chars=".into())
        );
        assert_eq!(pairs[2].0, "client_id");
        assert_eq!(pairs[3], ("client_secret".into(), "s3cr3t".into()));
        assert_eq!(pairs.len(), 4);
    }

    #[test]
    fn json_body_has_the_same_parameters() {
        let body = request_body(BodyFormat::Json, None);
        let v: Value = serde_json::from_str(&body).expect("json");
        assert_eq!(v["grant_type"], "refresh_token");
        assert_eq!(v["refresh_token"], "rt/with+odd&chars=");
        assert!(v["client_id"].is_string());
        assert!(v.get("client_secret").is_none());
    }

    #[test]
    fn a_response_is_read_and_merged() {
        let stored = Token::from_value(serde_json::json!({
            "access_token": "old", "refresh_token": "rt-old", "expiry": 1,
            "token_type": "Bearer", "account_id": "acct"
        }))
        .expect("token");
        let g = Grant::parse(
            br#"{"access_token":"new","expires_in":3599,"refresh_token":"rt-new","scope":["a","b"]}"#,
            1_000,
        )
        .expect("grant");
        assert!(g.rotated() && !g.expires_in_defaulted());
        assert_eq!(g.expiry(), 4_599);
        let merged = g.merge_into(&stored).expect("merge");
        let f = merged.fields();
        assert_eq!(f["access_token"], "new");
        assert_eq!(f["refresh_token"], "rt-new");
        assert_eq!(f["expiry"], 4_599);
        assert_eq!(f["scope"], "a b");
        assert_eq!(f["account_id"], "acct");
        assert!(f.get("expires_in").is_none());

        // No rotation: the stored refresh token stays; no expires_in: one hour.
        let g = Grant::parse(br#"{"access_token":"n2","expires_in":"60"}"#, 10).expect("g");
        assert_eq!(g.expiry(), 70);
        let merged = g.merge_into(&stored).expect("merge");
        assert_eq!(merged.fields()["refresh_token"], "rt-old");
        let g = Grant::parse(br#"{"access_token":"n3","token_type":"bearer"}"#, 10).expect("g");
        assert!(g.expires_in_defaulted());
        assert_eq!(g.expiry(), 10 + DEFAULT_EXPIRES_IN);
    }

    #[test]
    fn bad_responses_are_named_without_values() {
        for (body, want) in [
            (&b"not json"[..], ResponseError::NotAnObject),
            (b"[1]", ResponseError::NotAnObject),
            (b"{}", ResponseError::NoAccessToken),
            (br#"{"access_token":""}"#, ResponseError::NoAccessToken),
            (br#"{"access_token":7}"#, ResponseError::NoAccessToken),
            (
                br#"{"access_token":"x","expires_in":-5}"#,
                ResponseError::BadField("expires_in", "must be a non-negative number"),
            ),
            (
                br#"{"access_token":"x","refresh_token":5}"#,
                ResponseError::BadField(REFRESH_TOKEN, "must be a string"),
            ),
        ] {
            assert_eq!(Grant::parse(body, 0).expect_err("bad"), want);
        }
    }

    #[test]
    fn classification_uses_status_and_code_only() {
        assert_eq!(classify(400, Some("invalid_grant")), Verdict::AuthFailure);
        assert_eq!(classify(400, Some("invalid_client")), Verdict::AuthFailure);
        assert_eq!(
            classify(400, Some("unauthorized_client")),
            Verdict::AuthFailure
        );
        assert_eq!(classify(401, None), Verdict::AuthFailure);
        assert_eq!(classify(401, Some("whatever")), Verdict::AuthFailure);
        assert_eq!(classify(400, Some("invalid_request")), Verdict::Rejected);
        assert_eq!(classify(400, None), Verdict::Rejected);
        assert_eq!(classify(403, Some("invalid_grant")), Verdict::Rejected);
        assert_eq!(classify(429, None), Verdict::Transient);
        assert_eq!(classify(500, None), Verdict::Transient);
        assert_eq!(classify(503, Some("invalid_grant")), Verdict::Transient);
        assert_eq!(classify(302, None), Verdict::Rejected);
    }

    #[test]
    fn only_plain_error_codes_are_kept() {
        assert_eq!(
            error_code(br#"{"error":"invalid_grant","error_description":"secret stuff"}"#),
            Some("invalid_grant".into())
        );
        assert_eq!(error_code(br#"{"error":"Bad Thing: rt-123"}"#), None);
        assert_eq!(error_code(b"<html>"), None);
        assert_eq!(error_code(br#"{"error":{"code":1}}"#), None);
    }
}
