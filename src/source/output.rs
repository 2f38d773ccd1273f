//! What a source command printed, read as a credential and its expiry.
//!
//! Accepted forms of stdout:
//! - a plain value: the first line, trimmed (`gcloud auth print-access-token`, `op read`);
//! - a JSON token object: `access_token` with `expiry` (epoch seconds) or `expires_in`
//!   (seconds from now), other fields kept (a `refresh_token` is dropped);
//! - `{"token": "...", "expiry" | "expires_in": ...}`;
//! - a Kubernetes `ExecCredential`: `status.token`, `status.expirationTimestamp` (RFC 3339).
//!
//! Errors name what is wrong, never a value.

use serde_json::{Map, Value};

use crate::secret::{wipe_json, Secret};
use crate::token::REFRESH_TOKEN;

/// A credential read from a command's output.
pub enum Parsed {
    /// A plain value, a `{"token": ...}` object or an `ExecCredential`.
    Value {
        /// The credential.
        value: Secret,
        /// Its expiry, epoch seconds, when the output gave one.
        expiry: Option<u64>,
    },
    /// A token object: every field but `refresh_token`; `expiry` set when the output gave
    /// `expiry` or `expires_in`.
    Token(Fields),
}

/// A token object's fields, wiped when dropped.
pub struct Fields(Map<String, Value>);

impl Fields {
    /// The fields, for the caller to hold (and wipe) from now on.
    pub fn take(mut self) -> Map<String, Value> {
        std::mem::take(&mut self.0)
    }

    /// The fields.
    pub fn get(&self) -> &Map<String, Value> {
        &self.0
    }
}

impl Drop for Fields {
    fn drop(&mut self) {
        self.0.values_mut().for_each(wipe_json);
    }
}

impl std::fmt::Debug for Parsed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Parsed::Value { expiry, .. } => f
                .debug_struct("Value")
                .field("expiry", expiry)
                .finish_non_exhaustive(),
            Parsed::Token(fields) => f
                .debug_tuple("Token")
                .field(&fields.get().keys().collect::<Vec<_>>())
                .finish(),
        }
    }
}

/// Why an output is not a credential.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OutputError {
    /// Nothing but white space.
    #[error("the command printed nothing")]
    Empty,
    /// JSON that is none of the accepted forms, or a field of the wrong type.
    #[error("the command's JSON output {0}")]
    Shape(&'static str),
    /// Not UTF-8.
    #[error("the command's output is not UTF-8 text")]
    NotText,
}

/// Reads `stdout` (see the module documentation); `now` is the epoch seconds that an
/// `expires_in` counts from.
pub fn parse(stdout: &[u8], now: u64) -> Result<Parsed, OutputError> {
    let text = std::str::from_utf8(stdout).map_err(|_| OutputError::NotText)?;
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(OutputError::Empty);
    }
    if !trimmed.starts_with('{') {
        let line = trimmed.lines().next().unwrap_or_default().trim();
        return Ok(Parsed::Value {
            value: Secret::from(line),
            expiry: None,
        });
    }
    let mut value = crate::secret_json::parse(trimmed.as_bytes())
        .map_err(|_| OutputError::Shape("is not valid JSON"))?;
    let result = read_object(&mut value, now);
    wipe_json(&mut value);
    result
}

fn read_object(value: &mut Value, now: u64) -> Result<Parsed, OutputError> {
    let Value::Object(map) = value else {
        return Err(OutputError::Shape("is not an object"));
    };
    if map.get("kind").and_then(Value::as_str) == Some("ExecCredential") {
        let status = map
            .get("status")
            .and_then(Value::as_object)
            .ok_or(OutputError::Shape("has no status object (ExecCredential)"))?;
        let token = non_empty(status.get("token"))
            .ok_or(OutputError::Shape("has no status.token (ExecCredential)"))?;
        let expiry = match status.get("expirationTimestamp") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(rfc3339(s).ok_or(OutputError::Shape(
                "has a status.expirationTimestamp that is not RFC 3339",
            ))?),
            Some(_) => {
                return Err(OutputError::Shape(
                    "has a status.expirationTimestamp that is not a string",
                ))
            }
        };
        return Ok(Parsed::Value {
            value: Secret::from(token),
            expiry,
        });
    }
    let expiry = expiry_of(map, now)?;
    if map.contains_key("access_token") {
        let mut fields = std::mem::take(map);
        if non_empty(fields.get("access_token")).is_none() {
            fields.values_mut().for_each(wipe_json);
            return Err(OutputError::Shape(
                "has an empty or non-string access_token",
            ));
        }
        if let Some(mut rt) = fields.remove(REFRESH_TOKEN) {
            wipe_json(&mut rt);
        }
        if let Some(mut old) = fields.remove("expires_in") {
            wipe_json(&mut old);
        }
        match expiry {
            Some(e) => {
                fields.insert("expiry".into(), Value::from(e));
            }
            None => {
                fields.remove("expiry");
            }
        }
        return Ok(Parsed::Token(Fields(fields)));
    }
    let token = non_empty(map.get("token"))
        .ok_or(OutputError::Shape("has neither access_token nor token"))?;
    Ok(Parsed::Value {
        value: Secret::from(token),
        expiry,
    })
}

fn non_empty(value: Option<&Value>) -> Option<&str> {
    match value {
        Some(Value::String(s)) if !s.trim().is_empty() => Some(s.as_str()),
        _ => None,
    }
}

/// `expiry` (epoch seconds) or `now + expires_in`, when either is given.
fn expiry_of(map: &Map<String, Value>, now: u64) -> Result<Option<u64>, OutputError> {
    let seconds = |v: &Value| -> Option<u64> {
        match v {
            Value::Number(n) => n
                .as_u64()
                .or_else(|| n.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64)),
            Value::String(s) => s.trim().parse().ok(),
            _ => None,
        }
    };
    if let Some(v) = map.get("expiry").filter(|v| !v.is_null()) {
        return seconds(v).map(Some).ok_or(OutputError::Shape(
            "has an expiry that is not a number of seconds",
        ));
    }
    if let Some(v) = map.get("expires_in").filter(|v| !v.is_null()) {
        return seconds(v)
            .map(|s| Some(now.saturating_add(s)))
            .ok_or(OutputError::Shape(
                "has an expires_in that is not a number of seconds",
            ));
    }
    Ok(None)
}

/// Epoch seconds of an RFC 3339 timestamp (`2026-12-04T15:30:00Z`, fractions and
/// `±HH:MM` offsets accepted); `None` when it is not one or lies before 1970.
pub fn rfc3339(text: &str) -> Option<u64> {
    let b = text.trim().as_bytes();
    let num = |range: std::ops::Range<usize>| -> Option<i64> {
        let part = b.get(range)?;
        if part.is_empty() || !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(part).ok()?.parse().ok()
    };
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let month_days = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if day > month_days[(month - 1) as usize] {
        return None;
    }
    let mut i = 19;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == start {
            return None;
        }
    }
    let offset = match b.get(i)? {
        b'Z' | b'z' if i + 1 == b.len() => 0,
        sign @ (b'+' | b'-') if i + 6 == b.len() && b[i + 3] == b':' => {
            let (h, m) = (num(i + 1..i + 3)?, num(i + 4..i + 6)?);
            if h > 23 || m > 59 {
                return None;
            }
            let minutes = h * 60 + m;
            if *sign == b'+' {
                minutes * 60
            } else {
                -minutes * 60
            }
        }
        _ => return None,
    };
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second - offset;
    u64::try_from(secs).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn value(p: &Parsed) -> (&str, Option<u64>) {
        match p {
            Parsed::Value { value, expiry } => (value.expose(), *expiry),
            Parsed::Token(_) => panic!("a token object"),
        }
    }

    #[test]
    fn plain_values_are_the_first_line() {
        let p = parse(b"  ya29.abc \nsecond line\n", 0).unwrap();
        assert_eq!(value(&p), ("ya29.abc", None));
        assert_eq!(parse(b" \n\t", 0).unwrap_err(), OutputError::Empty);
        assert_eq!(parse(b"\xff\xfe", 0).unwrap_err(), OutputError::NotText);
    }

    #[test]
    fn json_forms() {
        let p = parse(br#"{"token":"t1","expires_in":60}"#, 1000).unwrap();
        assert_eq!(value(&p), ("t1", Some(1060)));
        let p = parse(br#"{"token":"t2","expiry":5000}"#, 1000).unwrap();
        assert_eq!(value(&p), ("t2", Some(5000)));
        let exec = json!({"apiVersion":"client.authentication.k8s.io/v1","kind":"ExecCredential",
            "status":{"token":"k8s","expirationTimestamp":"1970-01-01T01:00:00Z"}});
        let p = parse(exec.to_string().as_bytes(), 0).unwrap();
        assert_eq!(value(&p), ("k8s", Some(3600)));
        let t = json!({"access_token":"at","expires_in":"30","refresh_token":"rt","scope":"s"});
        match parse(t.to_string().as_bytes(), 100).unwrap() {
            Parsed::Token(f) => {
                let f = f.get();
                assert_eq!(f["access_token"], "at");
                assert_eq!(f["expiry"], 130);
                assert_eq!(f["scope"], "s");
                assert!(f.get("refresh_token").is_none() && f.get("expires_in").is_none());
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_json_is_named_without_values() {
        for (input, want) in [
            (&br#"{"nothing":"secret-x"}"#[..], "neither access_token nor token"),
            (br#"{"token":""}"#, "neither access_token nor token"),
            (br#"{"access_token":5}"#, "empty or non-string access_token"),
            (br#"{"token":"secret-x","expiry":"soon"}"#, "expiry"),
            (br#"{"kind":"ExecCredential"}"#, "status"),
            (
                br#"{"kind":"ExecCredential","status":{"token":"secret-x","expirationTimestamp":"tomorrow"}}"#,
                "RFC 3339",
            ),
            (br#"{"token": "secret-x""#, "not valid JSON"),
        ] {
            let e = parse(input, 0).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
            assert!(!e.contains("secret-x"), "{e}");
        }
    }

    #[test]
    fn rfc3339_timestamps() {
        assert_eq!(rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(rfc3339("2026-12-04T15:30:00Z"), Some(1_796_398_200));
        assert_eq!(rfc3339("2026-12-04T15:30:00.123456Z"), Some(1_796_398_200));
        assert_eq!(rfc3339("2026-12-04T16:30:00+01:00"), Some(1_796_398_200));
        assert_eq!(rfc3339("2026-12-04T07:30:00-08:00"), Some(1_796_398_200));
        assert_eq!(rfc3339("2000-02-29T00:00:00Z"), Some(951_782_400));
        for bad in [
            "",
            "2026-12-04",
            "2026-13-04T00:00:00Z",
            "2026-12-04T25:00:00Z",
            "2026-12-04T00:00:00",
            "2026-12-04T00:00:00+0100",
            "1969-12-31T23:59:59Z",
            "2026-12-04T00:00:00.Z",
            "2026-02-29T00:00:00Z",
            "2026-02-31T00:00:00Z",
            "2026-04-31T00:00:00Z",
        ] {
            assert_eq!(rfc3339(bad), None, "{bad}");
        }
    }
}
