//! A JSON parse for text that holds secrets (store files, a token given to
//! `credproxy store token set`, a token endpoint's answer, another CLI's credential file)
//! that leaves no copy of a string behind when its buffers are freed.
//!
//! `serde_json::from_slice::<Value>` leaves three kinds of copies of a stored file's
//! secrets in freed memory: a string with escapes is unescaped into the deserializer's
//! private `scratch` buffer (grown by reallocation, freed unwiped, and out of our reach);
//! a value replaced by a later duplicate key is dropped unwiped; and a parse that fails
//! halfway drops what it built unwiped. Here serde_json only *validates* and *splits*: each
//! member value is taken as a borrowed `&RawValue` (serde_json skips it without unescaping:
//! `ignore_value` never writes a string into `scratch`), strings are unescaped by
//! `unescape` into a buffer of their final size, a replaced duplicate is wiped, and a
//! container under construction is wiped if the parse fails. Object keys (field names,
//! not secrets) are still read by serde_json.
//!
//! [`parse`] returns the value; its error says where or what is wrong (`not valid JSON at
//! line 1 column 5`), never the content.

use std::fmt;

use serde::de::{self, Deserializer as _, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use zeroize::{Zeroize, Zeroizing};

use crate::secret::wipe_json;

/// Nesting limit, as serde_json's own (128).
const MAX_DEPTH: usize = 128;

/// Why a text is not valid JSON; never its content.
#[derive(Debug)]
pub enum ParseError {
    /// serde_json's error (position and category only).
    Json(serde_json::Error),
    /// A rule checked here (nesting, escapes).
    Invalid(&'static str),
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParseError::Json(e) => {
                write!(
                    f,
                    "not valid JSON at line {} column {}",
                    e.line(),
                    e.column()
                )
            }
            ParseError::Invalid(what) => write!(f, "not valid JSON: {what}"),
        }
    }
}

impl std::error::Error for ParseError {}

impl From<serde_json::Error> for ParseError {
    fn from(e: serde_json::Error) -> Self {
        ParseError::Json(e)
    }
}

/// A value under construction, wiped when dropped unless taken.
struct Wiping(Value);

impl Wiping {
    fn take(mut self) -> Value {
        std::mem::take(&mut self.0)
    }
}

impl Drop for Wiping {
    fn drop(&mut self) {
        wipe_json(&mut self.0);
    }
}

/// Parses a whole text (UTF-8 checked, trailing characters refused).
pub fn parse(bytes: &[u8]) -> Result<Value, ParseError> {
    let raw: &RawValue = serde_json::from_slice(bytes)?;
    value(raw.get(), 0)
}

/// One value whose text serde_json has already validated.
fn value(raw: &str, depth: usize) -> Result<Value, ParseError> {
    if depth > MAX_DEPTH {
        return Err(ParseError::Invalid("nested too deeply"));
    }
    match raw.as_bytes().first() {
        Some(b'"') => unescape(raw).map(Value::String),
        Some(b'{') => {
            let mut de = serde_json::Deserializer::from_str(raw);
            let v = de.deserialize_map(Container { depth })?;
            de.end()?;
            Ok(v)
        }
        Some(b'[') => {
            let mut de = serde_json::Deserializer::from_str(raw);
            let v = de.deserialize_seq(Container { depth })?;
            de.end()?;
            Ok(v)
        }
        // Numbers, true, false, null: nothing secret, nothing unescaped.
        _ => Ok(serde_json::from_str(raw)?),
    }
}

struct Container {
    depth: usize,
}

fn nested<E: de::Error>(raw: &RawValue, depth: usize) -> Result<Value, E> {
    value(raw.get(), depth + 1).map_err(|e| match e {
        ParseError::Json(e) => E::custom(format_args!(
            "invalid value at line {} column {}",
            e.line(),
            e.column()
        )),
        ParseError::Invalid(what) => E::custom(what),
    })
}

impl<'de> Visitor<'de> for Container {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object or array")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Value, A::Error> {
        let mut out = Wiping(Value::Object(Map::new()));
        while let Some(key) = access.next_key::<String>()? {
            let raw: &'de RawValue = access.next_value()?;
            let v = nested(raw, self.depth)?;
            if let Value::Object(map) = &mut out.0 {
                // The last duplicate wins, as in serde_json; the one it replaces is wiped.
                if let Some(mut replaced) = map.insert(key, v) {
                    wipe_json(&mut replaced);
                }
            }
        }
        Ok(out.take())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut access: A) -> Result<Value, A::Error> {
        let mut out = Wiping(Value::Array(Vec::new()));
        while let Some(raw) = access.next_element::<&'de RawValue>()? {
            let v = nested(raw, self.depth)?;
            if let Value::Array(items) = &mut out.0 {
                // A reallocation moves only the `Value`s (pointers), never string bytes.
                items.push(v);
            }
        }
        Ok(out.take())
    }
}

/// Unescapes a JSON string literal (quotes included, already validated by serde_json
/// except for surrogates) into a buffer allocated once at its final capacity: no
/// reallocation, and the buffer is wiped if the string turns out invalid.
fn unescape(raw: &str) -> Result<String, ParseError> {
    let inner = raw
        .strip_prefix('"')
        .and_then(|r| r.strip_suffix('"'))
        .ok_or(ParseError::Invalid("bad string"))?
        .as_bytes();
    // An escape is never shorter than what it stands for.
    let mut out = Zeroizing::new(Vec::with_capacity(inner.len()));
    let mut i = 0;
    while i < inner.len() {
        let b = inner[i];
        if b != b'\\' {
            out.push(b);
            i += 1;
            continue;
        }
        let esc = *inner.get(i + 1).ok_or(ParseError::Invalid("bad escape"))?;
        i += 2;
        let simple = match esc {
            b'"' => b'"',
            b'\\' => b'\\',
            b'/' => b'/',
            b'b' => 0x08,
            b'f' => 0x0c,
            b'n' => b'\n',
            b'r' => b'\r',
            b't' => b'\t',
            b'u' => {
                let first = hex4(inner, i)?;
                i += 4;
                let code = match first {
                    0xD800..=0xDBFF => {
                        if inner.get(i) != Some(&b'\\') || inner.get(i + 1) != Some(&b'u') {
                            return Err(ParseError::Invalid(
                                "lone leading surrogate in hex escape",
                            ));
                        }
                        let second = hex4(inner, i + 2)?;
                        if !(0xDC00..=0xDFFF).contains(&second) {
                            return Err(ParseError::Invalid(
                                "lone leading surrogate in hex escape",
                            ));
                        }
                        i += 6;
                        0x10000 + ((first - 0xD800) << 10) + (second - 0xDC00)
                    }
                    0xDC00..=0xDFFF => {
                        return Err(ParseError::Invalid("lone trailing surrogate in hex escape"))
                    }
                    other => other,
                };
                let c = char::from_u32(code).ok_or(ParseError::Invalid("bad escape"))?;
                let mut utf8 = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut utf8).as_bytes());
                utf8.zeroize();
                continue;
            }
            _ => return Err(ParseError::Invalid("bad escape")),
        };
        out.push(simple);
    }
    let bytes = std::mem::take(&mut *out);
    String::from_utf8(bytes).map_err(|e| {
        e.into_bytes().zeroize();
        ParseError::Invalid("not UTF-8")
    })
}

fn hex4(s: &[u8], at: usize) -> Result<u32, ParseError> {
    let digits = s.get(at..at + 4).ok_or(ParseError::Invalid("bad escape"))?;
    let text = std::str::from_utf8(digits).map_err(|_| ParseError::Invalid("bad escape"))?;
    u32::from_str_radix(text, 16).map_err(|_| ParseError::Invalid("bad escape"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Differential check against serde_json on the cases that matter.
    #[test]
    fn agrees_with_serde_json() {
        let cases: &[&str] = &[
            r#"{"a":"x\"y\\z\/\b\f\n\r\t","b":[1,"\u00e9\ud83d\ude00",null,true],"c":{"d":-1.5e3}}"#,
            r#"{"k":"first","k":"second"}"#,
            r#"  ["plain", {"x": []}, {}]  "#,
            r#""top""#,
            "12",
            r#"{"a":"caf\u00e9 \u2028"}"#,
        ];
        for case in cases {
            let ours = parse(case.as_bytes()).expect(case);
            let theirs: Value = serde_json::from_str(case).expect(case);
            assert_eq!(ours, theirs, "{case}");
        }
    }

    fn json_value() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<String>().prop_map(Value::String),
            "[\\\\\"/\u{0}-\u{1f}a\u{e9}\u{2028}\u{1f600}]{0,12}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                proptest::collection::vec(("[a-z\\\\\"]{0,4}", inner), 0..6)
                    .prop_map(|kv| { Value::Object(kv.into_iter().collect()) }),
            ]
        })
    }

    proptest::proptest! {
        /// Whatever serde_json writes (every escape it produces, with and without
        /// pretty-printing), we read back exactly as serde_json does.
        #[test]
        fn round_trips_what_serde_json_writes(v in json_value()) {
            for text in [serde_json::to_string(&v).unwrap(), serde_json::to_string_pretty(&v).unwrap()] {
                let ours = parse(text.as_bytes()).ok();
                proptest::prop_assert_eq!(ours.as_ref(), Some(&v));
            }
        }

        /// On arbitrary bytes (biased to JSON's alphabet) we accept exactly what
        /// serde_json accepts, with the same value, duplicates and escapes included.
        #[test]
        fn agrees_with_serde_json_on_any_input(
            text in "[{}\\[\\],:\"\\\\ u0-9a-fA-Fnrtbe.+\\-]{0,40}",
        ) {
            let theirs = serde_json::from_str::<Value>(&text).ok();
            let ours = parse(text.as_bytes()).ok();
            proptest::prop_assert_eq!(ours, theirs, "{:?}", text);
        }
    }

    #[test]
    fn refuses_what_serde_json_refuses() {
        let bad: &[&str] = &[
            r#"{"a":"\ud800"}"#,
            r#"{"a":"\udc00"}"#,
            r#"{"a":"\ud800\u0041"}"#,
            r#"{"a":"x"} x"#,
            r#"{"a":"\x"}"#,
            "{\"a\":\"\u{1}\"}",
            "",
            "{",
        ];
        for case in bad {
            assert!(serde_json::from_str::<Value>(case).is_err(), "{case}");
            assert!(parse(case.as_bytes()).is_err(), "{case}");
        }
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        assert!(parse(deep.as_bytes()).is_err());
    }
}
