//! The strict reading of an MCP body: one JSON text with exactly one
//! meaning, or a reason to refuse it. Kept equal to the Go client's by
//! `clients/mcp/vectors.json`.
//!
//! A body a lenient server could read differently (a BOM, UTF-16, a comment
//! or a trailing comma, a duplicate key, a key that is a JSON-RPC key in
//! another case) would let calls run that were charged as something else,
//! or not at all, so it is refused rather than guessed at.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

/// The keys of a JSON-RPC message.
const ENVELOPE_KEYS: [&str; 6] = ["jsonrpc", "id", "method", "params", "result", "error"];
/// The keys of params that name what a call touches.
const PARAM_KEYS: [&str; 2] = ["name", "uri"];
/// The longest key quoted in a reason.
const MOST_QUOTED: usize = 64;

/// Reads `bytes` as one JSON text with no duplicate key in any object, or
/// says why not. serde_json already refuses what is not JSON (a BOM, a
/// comment, a trailing comma or a second text), a lone surrogate escape, a
/// number out of an `f64`'s range and nesting past 127 levels; the Go
/// client checks each of these itself.
pub(crate) fn read(bytes: &[u8]) -> Result<Value, String> {
    if bytes.starts_with(&[0xEF, 0xBB, 0xBF]) {
        return Err("the body starts with a byte order mark".into());
    }
    if bytes.starts_with(&[0xFE, 0xFF]) || bytes.starts_with(&[0xFF, 0xFE]) {
        return Err("the body is UTF-16, not UTF-8".into());
    }
    if std::str::from_utf8(bytes).is_err() {
        return Err("the body is not UTF-8".into());
    }
    match serde_json::from_slice::<Strict>(bytes) {
        Ok(Strict(value)) => Ok(value),
        Err(e) if e.is_data() => Err(e.to_string()),
        Err(e) => Err(format!("the body is not one strict JSON text: {e}")),
    }
}

/// Refuses a message whose keys include a case variant of a JSON-RPC key,
/// or whose params' keys include one of `name` or `uri`: a server that
/// matches keys without regard to case (Go's encoding/json does, for struct
/// fields) would read it as that key.
pub(crate) fn check_message(message: &Map<String, Value>) -> Result<(), String> {
    for key in message.keys() {
        if let Some(name) = case_variant(key, &ENVELOPE_KEYS) {
            return Err(format!(
                "the key {} is {name:?} in another case",
                quote(key)
            ));
        }
    }
    if let Some(Value::Object(params)) = message.get("params") {
        for key in params.keys() {
            if let Some(name) = case_variant(key, &PARAM_KEYS) {
                return Err(format!(
                    "the params key {} is {name:?} in another case",
                    quote(key)
                ));
            }
        }
    }
    Ok(())
}

/// The name `key` differs from only in case, under Unicode simple case
/// folding (as Go's `strings.EqualFold`). The names are ASCII, and the only
/// other characters that fold to an ASCII letter are the Kelvin sign (to
/// `k`) and the long s (to `s`).
fn case_variant(key: &str, names: &[&'static str]) -> Option<&'static str> {
    let folded: String = key
        .chars()
        .map(|c| match c {
            '\u{212A}' => 'k',
            '\u{017F}' => 's',
            c => c.to_ascii_lowercase(),
        })
        .collect();
    names
        .iter()
        .find(|&&name| key != name && folded == name)
        .copied()
}

fn quote(key: &str) -> String {
    if key.len() <= MOST_QUOTED {
        return format!("{key:?}");
    }
    let mut cut = MOST_QUOTED;
    while !key.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{:?}…", &key[..cut])
}

/// A JSON value read with duplicate keys refused at every depth.
struct Strict(Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom("a number out of range"))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(Strict(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let Strict(value) = map.next_value()?;
            if out.contains_key(&key) {
                return Err(de::Error::custom(format!(
                    "the key {} appears twice in one object",
                    quote(&key)
                )));
            }
            out.insert(key, value);
        }
        Ok(Value::Object(out))
    }
}
