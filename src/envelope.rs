//! Parsing of a frame body into the few fields the rules of PROTOCOL.md §4–§7 look at,
//! in one pass and with strings borrowed from the body where they hold no escapes.
//!
//! The result is the same as parsing the body into a `serde_json::Value` and reading the
//! fields from it (the server did that first, and `tests/hostile.rs` and the property
//! tests hold it to the same outcomes): the body must be valid UTF-8 JSON in full,
//! nesting is bounded by serde_json's recursion limit (every value, including the ones
//! no rule reads, goes through the same deserializer), a duplicated key keeps its last
//! value, and escaped keys are matched after unescaping. It only avoids building a tree
//! of owned maps and strings for every request.
//!
//! Values that no rule reads are parsed, wiped (they may carry secrets) and dropped.

use std::borrow::Cow;
use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;

use crate::secret::wipe_json;

/// A JSON value as far as the envelope and payload rules need to know it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scalar<'a> {
    /// A string (borrowed from the body unless it held escapes).
    Str(Cow<'a, str>),
    /// An integer that serde_json holds as `i64` or `u64`.
    Int(i128),
    /// `null`.
    Null,
    /// Anything else: a float, a boolean, an array or an object.
    Other,
}

impl Scalar<'_> {
    /// The string, when the value is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Scalar::Str(s) => Some(s),
            _ => None,
        }
    }
}

/// The fields of a request payload that some operation reads.
#[derive(Default)]
pub struct Payload<'a> {
    /// `provider`
    pub provider: Option<Scalar<'a>>,
    /// `bucket`
    pub bucket: Option<Scalar<'a>>,
    /// `name` (API key name)
    pub name: Option<Scalar<'a>>,
    /// `minVersion` (handshake)
    pub min_version: Option<Scalar<'a>>,
    /// `maxVersion` (handshake)
    pub max_version: Option<Scalar<'a>>,
    /// `token` (save_token), wiped on drop unless taken.
    token: Option<Value>,
    /// `capabilityToken` (handshake, PROTOCOL.md §13); an unescaped copy is wiped on
    /// drop.
    pub capability_token: Option<Scalar<'a>>,
    /// `targetId` (cancel, PROTOCOL.md §13)
    pub target_id: Option<Scalar<'a>>,
    /// The names of the fields present, for `Debug` (names only, never values).
    fields: u8,
}

impl Payload<'_> {
    /// Takes the `token` value (it is wiped on drop otherwise).
    pub fn take_token(&mut self) -> Option<Value> {
        self.token.take()
    }
}

impl Drop for Payload<'_> {
    fn drop(&mut self) {
        if let Some(token) = &mut self.token {
            wipe_json(token);
        }
        if let Some(Scalar::Str(Cow::Owned(text))) = &mut self.capability_token {
            zeroize::Zeroize::zeroize(text);
        }
    }
}

const PAYLOAD_FIELDS: [&str; 8] = [
    "provider",
    "bucket",
    "name",
    "minVersion",
    "maxVersion",
    "token",
    "capabilityToken",
    "targetId",
];

/// Shows which known fields are present, never their values (a payload may carry a
/// token).
impl fmt::Debug for Payload<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let present = PAYLOAD_FIELDS
            .iter()
            .enumerate()
            .filter(|(i, _)| self.fields & (1 << i) != 0)
            .map(|(_, name)| name);
        f.debug_list().entries(present).finish()
    }
}

/// The `payload` member of a request.
// It lives on the stack for the length of one request; boxing the large variant would
// cost an allocation per request.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum PayloadField<'a> {
    /// An object.
    Object(Payload<'a>),
    /// Anything else, `null` included.
    NotObject,
}

/// A request frame: the envelope members, each `None` when absent.
#[derive(Debug, Default)]
pub struct Frame<'a> {
    /// `v`
    pub v: Option<Scalar<'a>>,
    /// `id`
    pub id: Option<Scalar<'a>>,
    /// `op`
    pub op: Option<Scalar<'a>>,
    /// `payload`
    pub payload: Option<PayloadField<'a>>,
}

/// Why a frame body was not accepted; both end the connection (§3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// Not valid UTF-8 JSON (or too deeply nested).
    NotJson,
    /// Valid JSON, but not an object.
    NotObject,
}

/// Parses a frame body.
pub fn parse_frame(body: &[u8]) -> Result<Frame<'_>, FrameError> {
    match fast::parse(body) {
        Some(frame) => Ok(frame),
        None => parse_with_serde(body),
    }
}

/// Parses a frame body with serde_json, whatever its shape.
fn parse_with_serde(body: &[u8]) -> Result<Frame<'_>, FrameError> {
    match serde_json::from_slice::<Top<'_>>(body) {
        Ok(Top(Some(frame))) => Ok(frame),
        Ok(Top(None)) => Err(FrameError::NotObject),
        Err(_) => Err(FrameError::NotJson),
    }
}

/// Drops a value no rule reads, after parsing it in full (so that it is validated like
/// any other) and wiping its strings.
fn discard<'de, A: MapAccess<'de>>(map: &mut A) -> Result<(), A::Error> {
    let mut value: Value = map.next_value()?;
    wipe_json(&mut value);
    Ok(())
}

fn discard_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<(), A::Error> {
    while let Some(mut value) = seq.next_element::<Value>()? {
        wipe_json(&mut value);
    }
    Ok(())
}

fn discard_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<(), A::Error> {
    while map.next_key::<Cow<'de, str>>()?.is_some() {
        discard(&mut map)?;
    }
    Ok(())
}

/// A map key matched against a fixed list of names, without copying it.
struct KeyIn(&'static [&'static str]);

impl<'de> DeserializeSeed<'de> for KeyIn {
    /// The index of the name in the list, or `None` for any other key.
    type Value = Option<usize>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Option<usize>, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeyIn {
    type Value = Option<usize>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a key")
    }

    fn visit_str<E>(self, key: &str) -> Result<Option<usize>, E> {
        Ok(self.0.iter().position(|name| *name == key))
    }
}

/// The visits of a boolean, a number, a string or `null`, each giving `$none`: for the
/// values that must be objects.
macro_rules! not_an_object {
    ($value:ty, $none:expr) => {
        fn visit_bool<E>(self, _: bool) -> Result<$value, E> {
            Ok($none)
        }

        fn visit_i64<E>(self, _: i64) -> Result<$value, E> {
            Ok($none)
        }

        fn visit_u64<E>(self, _: u64) -> Result<$value, E> {
            Ok($none)
        }

        fn visit_f64<E>(self, _: f64) -> Result<$value, E> {
            Ok($none)
        }

        fn visit_str<E>(self, _: &str) -> Result<$value, E> {
            Ok($none)
        }

        fn visit_unit<E>(self) -> Result<$value, E> {
            Ok($none)
        }
    };
}

/// The top-level value: `Some` for an object.
struct Top<'a>(Option<Frame<'a>>);

impl<'de> Deserialize<'de> for Top<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(TopVisitor)
    }
}

struct TopVisitor;

const FRAME_FIELDS: [&str; 4] = ["v", "id", "op", "payload"];

impl<'de> Visitor<'de> for TopVisitor {
    type Value = Top<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Top<'de>, A::Error> {
        let mut frame = Frame::default();
        while let Some(key) = map.next_key_seed(KeyIn(&FRAME_FIELDS))? {
            match key {
                Some(0) => frame.v = Some(map.next_value()?),
                Some(1) => frame.id = Some(map.next_value()?),
                Some(2) => frame.op = Some(map.next_value()?),
                Some(3) => frame.payload = Some(map.next_value()?),
                _ => discard(&mut map)?,
            }
        }
        Ok(Top(Some(frame)))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Top<'de>, A::Error> {
        discard_seq(seq)?;
        Ok(Top(None))
    }

    not_an_object!(Top<'de>, Top(None));
}

impl<'de> Deserialize<'de> for PayloadField<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(PayloadVisitor)
    }
}

struct PayloadVisitor;

impl<'de> Visitor<'de> for PayloadVisitor {
    type Value = PayloadField<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<PayloadField<'de>, A::Error> {
        let mut p = Payload::default();
        while let Some(key) = map.next_key_seed(KeyIn(&PAYLOAD_FIELDS))? {
            if let Some(i) = key {
                p.fields |= 1 << i;
            }
            match key {
                Some(0) => p.provider = Some(map.next_value()?),
                Some(1) => p.bucket = Some(map.next_value()?),
                Some(2) => p.name = Some(map.next_value()?),
                Some(3) => p.min_version = Some(map.next_value()?),
                Some(4) => p.max_version = Some(map.next_value()?),
                Some(6) => p.capability_token = Some(map.next_value()?),
                Some(7) => p.target_id = Some(map.next_value()?),
                Some(5) => {
                    let value: Value = map.next_value()?;
                    // A repeated key keeps the last value; the earlier one is wiped.
                    if let Some(mut earlier) = p.token.replace(value) {
                        wipe_json(&mut earlier);
                    }
                }
                _ => discard(&mut map)?,
            }
        }
        Ok(PayloadField::Object(p))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<PayloadField<'de>, A::Error> {
        discard_seq(seq)?;
        Ok(PayloadField::NotObject)
    }

    not_an_object!(PayloadField<'de>, PayloadField::NotObject);
}

impl<'de> Deserialize<'de> for Scalar<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ScalarVisitor)
    }
}

struct ScalarVisitor;

impl<'de> Visitor<'de> for ScalarVisitor {
    type Value = Scalar<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Str(Cow::Borrowed(v)))
    }

    fn visit_str<E>(self, v: &str) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Str(Cow::Owned(v.to_owned())))
    }

    fn visit_string<E>(self, v: String) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Str(Cow::Owned(v)))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Int(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Int(v.into()))
    }

    fn visit_f64<E>(self, _: f64) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Other)
    }

    fn visit_bool<E>(self, _: bool) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Other)
    }

    fn visit_unit<E>(self) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Scalar<'de>, A::Error> {
        discard_seq(seq)?;
        Ok(Scalar::Other)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Scalar<'de>, A::Error> {
        discard_map(map)?;
        Ok(Scalar::Other)
    }
}

/// A scanner for the shape every real client sends: an object of plain keys, escape-free
/// strings, small non-negative integers, `true`/`false`/`null`, and a payload object of
/// the same. It gives up (`None`) on anything else (escapes, floats, negative numbers,
/// nested values other than the payload, a token, any syntax error), and serde_json then
/// decides: it only ever accepts bodies that serde_json parses to the same frame, which
/// `tests::fast_path_agrees_with_serde` and the property tests check.
mod fast {
    use std::borrow::Cow;

    use super::{Frame, Payload, PayloadField, Scalar, FRAME_FIELDS, PAYLOAD_FIELDS};

    struct Cursor<'a> {
        bytes: &'a [u8],
        at: usize,
    }

    impl<'a> Cursor<'a> {
        fn skip_ws(&mut self) {
            while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.bytes.get(self.at) {
                self.at += 1;
            }
        }

        fn peek(&mut self) -> Option<u8> {
            self.skip_ws();
            self.bytes.get(self.at).copied()
        }

        fn eat(&mut self, byte: u8) -> Option<()> {
            (self.peek()? == byte).then(|| self.at += 1)
        }

        /// A string without escapes or control characters, valid UTF-8.
        fn string(&mut self) -> Option<&'a str> {
            self.eat(b'"')?;
            let rest = &self.bytes[self.at..];
            let len = rest
                .iter()
                .position(|b| matches!(b, b'"' | b'\\' | 0..=0x1f))?;
            if rest[len] != b'"' {
                return None;
            }
            self.at += len + 1;
            std::str::from_utf8(&rest[..len]).ok()
        }

        fn literal(&mut self, word: &[u8]) -> Option<()> {
            let end = self.at + word.len();
            (self.bytes.get(self.at..end)? == word).then(|| self.at = end)
        }

        /// A value that is not an object or an array.
        fn scalar(&mut self) -> Option<Scalar<'a>> {
            match self.peek()? {
                b'"' => self.string().map(|s| Scalar::Str(Cow::Borrowed(s))),
                b't' => self.literal(b"true").map(|()| Scalar::Other),
                b'f' => self.literal(b"false").map(|()| Scalar::Other),
                b'n' => self.literal(b"null").map(|()| Scalar::Null),
                b'0'..=b'9' => {
                    let rest = &self.bytes[self.at..];
                    let len = rest
                        .iter()
                        .position(|b| !b.is_ascii_digit())
                        .unwrap_or(rest.len());
                    // A leading zero, a fraction, an exponent or more digits than always
                    // fit in a u64: serde_json decides.
                    let leading_zero = rest[0] == b'0' && len > 1;
                    if leading_zero || len > 18 || matches!(rest.get(len), Some(b'.' | b'e' | b'E'))
                    {
                        return None;
                    }
                    let n = rest[..len]
                        .iter()
                        .fold(0i128, |n, d| n * 10 + i128::from(d - b'0'));
                    self.at += len;
                    Some(Scalar::Int(n))
                }
                _ => None,
            }
        }

        /// The members of an object whose `{` has been eaten, each handed to `member`
        /// with the cursor on its value.
        fn members(
            &mut self,
            mut member: impl FnMut(&mut Self, &'a str) -> Option<()>,
        ) -> Option<()> {
            if self.eat(b'}').is_some() {
                return Some(());
            }
            loop {
                let key = self.string()?;
                self.eat(b':')?;
                member(self, key)?;
                match self.peek()? {
                    b',' => self.at += 1,
                    b'}' => {
                        self.at += 1;
                        return Some(());
                    }
                    _ => return None,
                }
            }
        }
    }

    fn payload<'a>(c: &mut Cursor<'a>) -> Option<PayloadField<'a>> {
        if c.peek()? != b'{' {
            // `null`, a string, a number: not an object. Arrays go to serde_json.
            c.scalar()?;
            return Some(PayloadField::NotObject);
        }
        c.at += 1;
        let mut p = Payload::default();
        c.members(|c, key| {
            let i = PAYLOAD_FIELDS.iter().position(|name| *name == key);
            if let Some(i) = i {
                p.fields |= 1 << i;
            }
            let value = c.scalar()?;
            match i {
                Some(0) => p.provider = Some(value),
                Some(1) => p.bucket = Some(value),
                Some(2) => p.name = Some(value),
                Some(3) => p.min_version = Some(value),
                Some(4) => p.max_version = Some(value),
                Some(6) => p.capability_token = Some(value),
                Some(7) => p.target_id = Some(value),
                // A token is an object: serde_json parses it.
                Some(_) => return None,
                None => {}
            }
            Some(())
        })?;
        Some(PayloadField::Object(p))
    }

    /// The frame, or `None` to let serde_json decide.
    pub(super) fn parse(body: &[u8]) -> Option<Frame<'_>> {
        let mut c = Cursor { bytes: body, at: 0 };
        c.eat(b'{')?;
        let mut frame = Frame::default();
        c.members(|c, key| {
            match FRAME_FIELDS.iter().position(|name| *name == key) {
                Some(0) => frame.v = Some(c.scalar()?),
                Some(1) => frame.id = Some(c.scalar()?),
                Some(2) => frame.op = Some(c.scalar()?),
                Some(_) => frame.payload = Some(payload(c)?),
                None => {
                    c.scalar()?;
                }
            }
            Some(())
        })?;
        c.skip_ws();
        (c.at == body.len()).then_some(frame)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The reference: what reading the fields from a parsed `Value` gives.
    fn scalar_of(v: &Value) -> Scalar<'static> {
        match v {
            Value::String(s) => Scalar::Str(Cow::Owned(s.clone())),
            Value::Number(n) if n.is_i64() => Scalar::Int(n.as_i64().map_or(0, i128::from)),
            Value::Number(n) if n.is_u64() => Scalar::Int(n.as_u64().map_or(0, i128::from)),
            Value::Null => Scalar::Null,
            _ => Scalar::Other,
        }
    }

    fn agrees(body: &[u8]) {
        let reference = serde_json::from_slice::<Value>(body);
        let parsed = parse_frame(body);
        match (&reference, &parsed) {
            (Err(_), Err(FrameError::NotJson)) => {}
            (Ok(v), Err(FrameError::NotObject)) if !v.is_object() => {}
            (Ok(Value::Object(map)), Ok(frame)) => {
                let get = |k: &str| map.get(k).map(scalar_of);
                assert_eq!(frame.v, get("v"));
                assert_eq!(frame.id, get("id"));
                assert_eq!(frame.op, get("op"));
                match (map.get("payload"), &frame.payload) {
                    (None, None) => {}
                    (Some(Value::Object(p)), Some(PayloadField::Object(q))) => {
                        let get = |k: &str| p.get(k).map(scalar_of);
                        assert_eq!(q.provider, get("provider"));
                        assert_eq!(q.bucket, get("bucket"));
                        assert_eq!(q.name, get("name"));
                        assert_eq!(q.min_version, get("minVersion"));
                        assert_eq!(q.max_version, get("maxVersion"));
                        assert_eq!(q.token.as_ref(), p.get("token"));
                    }
                    (Some(v), Some(PayloadField::NotObject)) if !v.is_object() => {}
                    other => panic!("payload differs: {other:?}"),
                }
            }
            _ => panic!(
                "{:?}: reference {:?}, parsed {:?}",
                String::from_utf8_lossy(body),
                reference.map(|_| ()),
                parsed.map(|_| ())
            ),
        }
    }

    #[test]
    fn agrees_with_a_value_parse() {
        let deep = format!(
            "{{\"id\":\"1\",\"x\":{}1{}}}",
            "[".repeat(200),
            "]".repeat(200)
        );
        let cases: Vec<Vec<u8>> = vec![
            br#"{"v":1,"id":"a","op":"get_token","payload":{"provider":"p","bucket":"b"}}"#
                .to_vec(),
            br#"{"id":7,"op":"x"}"#.to_vec(),
            br#"{"id":18446744073709551615,"op":"x"}"#.to_vec(),
            br#"{"id":-9223372036854775808,"op":"x"}"#.to_vec(),
            br#"{"id":42.0,"op":"x"}"#.to_vec(),
            br#"{"id":1e400,"op":"x"}"#.to_vec(),
            br#"{"id":"a","id":"b","op":"x","op":null}"#.to_vec(),
            br#"{"\u0069d":"esc\u00e9","o\u0070":"get_token"}"#.to_vec(),
            br#"{"id":"a","payload":null}"#.to_vec(),
            br#"{"id":"a","payload":[1,{"a":2}]}"#.to_vec(),
            br#"{"id":"a","payload":"x"}"#.to_vec(),
            br#"{"id":"a","payload":{"provider":{"a":[1]},"bucket":true,"name":[]}}"#.to_vec(),
            br#"{"id":"a","payload":{"token":{"access_token":"t"},"token":{"x":1}}}"#.to_vec(),
            br#"{"op":"handshake","payload":{"minVersion":1,"maxVersion":18446744073709551615}}"#
                .to_vec(),
            br#"{"id":"a","extra":{"deep":[[[["s"]]]]}}"#.to_vec(),
            br#"{}"#.to_vec(),
            br#"[]"#.to_vec(),
            br#"[1,2,{"a":[]}]"#.to_vec(),
            br#"null"#.to_vec(),
            br#"3"#.to_vec(),
            br#""s""#.to_vec(),
            br#"true"#.to_vec(),
            br#"{"id":"a"} x"#.to_vec(),
            br#"{"id":"a","#.to_vec(),
            b"{\"id\":\"\xff\"}".to_vec(),
            b"{\"x\":\"\xc3\x28\",\"id\":\"a\"}".to_vec(),
            b"{\"id\":\"a\",\"x\":[\"\xed\xa0\x80\"]}".to_vec(),
            br#"{"id":"\ud800"}"#.to_vec(),
            b"".to_vec(),
            deep.into_bytes(),
        ];
        for body in cases {
            agrees(&body);
        }
    }

    /// Everything a rule can read from a frame, as text.
    fn snapshot(f: &Frame<'_>) -> String {
        let payload = match &f.payload {
            None => "none".to_owned(),
            Some(PayloadField::NotObject) => "not-object".to_owned(),
            Some(PayloadField::Object(p)) => format!(
                "{:?} {:?} {:?} {:?} {:?} {:?} {:?} {:?} {}",
                p.provider,
                p.bucket,
                p.name,
                p.min_version,
                p.max_version,
                p.token,
                p.capability_token,
                p.target_id,
                p.fields
            ),
        };
        format!("{:?} {:?} {:?} {payload}", f.v, f.id, f.op)
    }

    /// When the fast path accepts a body, serde_json parses it to the same frame.
    fn fast_agrees(body: &[u8]) -> bool {
        let Some(fast) = fast::parse(body) else {
            return false;
        };
        let slow = parse_with_serde(body).unwrap_or_else(|e| {
            panic!(
                "fast path accepted what serde_json refuses ({e:?}): {:?}",
                String::from_utf8_lossy(body)
            )
        });
        assert_eq!(
            snapshot(&fast),
            snapshot(&slow),
            "{:?}",
            String::from_utf8_lossy(body)
        );
        true
    }

    #[test]
    fn fast_path_agrees_with_serde() {
        let taken: &[&[u8]] = &[
            br#"{"v":1,"id":"0f8fad5b-d9cb","op":"get_token","payload":{"provider":"anthropic"}}"#,
            br#" { "id" : 7 , "op" : "x" , "payload" : { } } "#,
            b"{\"id\":\"a\",\n\t\"op\":\"x\"\r}",
            br#"{"id":"a","id":"b","op":"x","op":null,"payload":{"bucket":null,"bucket":"w"}}"#,
            "{\"id\":\"\u{e9}\",\"x\":true,\"y\":false,\"z\":null,\"n\":0,\"payload\":\"s\"}"
                .as_bytes(),
            br#"{"op":"handshake","payload":{"minVersion":1,"maxVersion":999999999999999999}}"#,
            br#"{"payload":null}"#,
            br#"{"payload":3}"#,
            br#"{}"#,
        ];
        for body in taken {
            assert!(fast_agrees(body), "{:?}", String::from_utf8_lossy(body));
        }
        let left_to_serde: &[&[u8]] = &[
            br#"{"id":"a\"b"}"#,
            br#"{"\u0069d":"a"}"#,
            br#"{"id":-1}"#,
            br#"{"id":-0}"#,
            br#"{"id":01}"#,
            br#"{"id":1.0}"#,
            br#"{"id":1e3}"#,
            br#"{"id":1234567890123456789}"#,
            br#"{"id":[1]}"#,
            br#"{"x":{}}"#,
            br#"{"payload":[]}"#,
            br#"{"payload":{"token":{"access_token":"a"}}}"#,
            br#"{"payload":{"provider":{}}}"#,
            b"{\"id\":\"\xff\"}",
            b"{\"id\":\"a\x01\"}",
            br#"{"id":"a"} x"#,
            br#"{"id":"a",}"#,
            br#"{"id":tru}"#,
            br#"{"id":nullx}"#,
            br#"{"id" "a"}"#,
            br#"[]"#,
            br#""#,
            br#"{"#,
        ];
        for body in left_to_serde {
            assert!(
                fast::parse(body).is_none(),
                "{:?}",
                String::from_utf8_lossy(body)
            );
            agrees(body);
        }
    }

    fn keys() -> proptest::sample::Select<&'static str> {
        proptest::sample::select(&[
            "\"v\"",
            "\"id\"",
            "\"op\"",
            "\"provider\"",
            "\"bucket\"",
            "\"name\"",
            "\"minVersion\"",
            "\"maxVersion\"",
            "\"token\"",
            "\"x\"",
            "\"\\u0069d\"",
            "\"\"",
        ])
    }

    fn values() -> proptest::sample::Select<&'static str> {
        proptest::sample::select(&[
            "\"a\"",
            "\"get_token\"",
            "\"\"",
            "\"\u{e9}\u{1F600}\"",
            "\"a\\\"b\"",
            "\"\u{1}\"",
            "0",
            "7",
            "01",
            "-1",
            "-0",
            "1.5",
            "1e3",
            "123456789012345678",
            "18446744073709551615",
            "18446744073709551616",
            "true",
            "false",
            "null",
            "[]",
            "[1,[2]]",
            "{}",
            "{\"a\":1}",
            "{\"access_token\":\"t\"}",
        ])
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(4000))]

        /// Bodies glued from the pieces of real and hostile requests: whenever the fast
        /// path accepts one, serde_json parses it to the same frame; either way the
        /// result agrees with a `Value` parse.
        #[test]
        fn fast_path_never_disagrees(pieces in proptest::collection::vec(
            proptest::sample::select(vec![
                "{", "}", "[", "]", ":", ",", " ", "\n", "\"v\"", "\"id\"", "\"op\"",
                "\"payload\"", "\"provider\"", "\"bucket\"", "\"name\"", "\"token\"",
                "\"minVersion\"", "\"maxVersion\"", "\"x\"", "\"get_token\"", "\"é\"",
                "\"a\\\"b\"", "\"\\u0041\"", "0", "01", "7", "-1", "-0", "1.5", "1e3",
                "18446744073709551616", "123456789012345678", "true", "false", "null",
                "tru", "\"", "\u{1}", "\"\u{1}\"",
            ]),
            0..24,
        )) {
            let body = pieces.concat();
            fast_agrees(body.as_bytes());
            agrees(body.as_bytes());
        }

        /// Objects of known and unknown keys with tricky values, with or without a
        /// payload object: same checks.
        #[test]
        fn structured_bodies_never_disagree(
            members in proptest::collection::vec((keys(), values()), 0..6),
            payload in proptest::option::of(proptest::collection::vec((keys(), values()), 0..5)),
            ws in proptest::sample::select(vec!["", " ", "\n\t"]),
        ) {
            let object = |pairs: &[(&str, &str)]| {
                let inner: Vec<String> =
                    pairs.iter().map(|(k, v)| format!("{ws}{k}{ws}:{ws}{v}{ws}")).collect();
                format!("{{{}}}", inner.join(","))
            };
            let mut pairs = members.clone();
            let payload_text = payload.as_deref().map(object);
            if let Some(p) = &payload_text {
                pairs.push(("\"payload\"", p));
            }
            let body = object(&pairs);
            fast_agrees(body.as_bytes());
            agrees(body.as_bytes());
        }

        /// Well-formed requests with random names and ids take the fast path.
        #[test]
        fn plain_requests_take_the_fast_path(
            id in "[a-z0-9-]{1,40}",
            provider in "[A-Za-z0-9._@-]{1,64}",
            n in 0u64..1_000_000,
        ) {
            let body = format!(
                r#"{{"v":1,"id":"{id}","op":"get_token","payload":{{"provider":"{provider}","bucket":{n}}}}}"#
            );
            proptest::prop_assert!(fast_agrees(body.as_bytes()));
        }
    }

    #[test]
    fn strings_without_escapes_are_borrowed() {
        let body = br#"{"id":"abc","op":"get_token","payload":{"provider":"p\u0041"}}"#;
        let frame = parse_frame(body).expect("frame");
        assert!(matches!(frame.id, Some(Scalar::Str(Cow::Borrowed("abc")))));
        let Some(PayloadField::Object(p)) = &frame.payload else {
            panic!("payload")
        };
        assert!(matches!(&p.provider, Some(Scalar::Str(Cow::Owned(s))) if s == "pA"));
    }

    #[test]
    fn debug_names_fields_only() {
        let body = br#"{"id":"a","op":"save_token","payload":{"provider":"p","token":{"access_token":"CANARY"}}}"#;
        let frame = parse_frame(body).expect("frame");
        let shown = format!("{frame:?}");
        assert!(!shown.contains("CANARY"), "{shown}");
        assert!(shown.contains("token"), "{shown}");
    }

    #[test]
    fn agrees_on_bodies_serde_json_writes() {
        // Any JSON value built by serde_json agrees too.
        for v in [
            json!({"id": 1, "op": "get_token", "payload": {"provider": "p"}}),
            json!({"id": "", "payload": {}}),
            json!({"v": [1], "id": {"a": "b"}, "op": 1.5}),
        ] {
            agrees(&serde_json::to_vec(&v).expect("json"));
        }
    }
}
