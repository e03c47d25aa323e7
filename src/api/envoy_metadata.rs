//! Dynamic metadata on Envoy RLS answers (`envoy_dynamic_metadata`), in the
//! shape envoyproxy/ratelimit sends with `RESPONSE_DYNAMIC_METADATA`:
//!
//! ```text
//! { domain: "edge",
//!   descriptors: [ { entries: ["user=alice"], hitsAddend: 2 }, ... ],
//!   hitsAddend: 1,                      // only when the request set it
//!   metadata: { ... } }                 // only when a passing rule has some
//! ```
//!
//! Envoy's rate-limit filter stores it under its own namespace
//! (`envoy.filters.http.ratelimit`), where access logs and later filters
//! read it. `metadata` merges the `metadata:` blocks of the rules of every
//! descriptor that passed, in request order; where two blocks hold the same
//! key, the first wins, and mappings under one key are merged the same way.

use std::collections::HashMap;

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
use envoy_types::pb::google::protobuf::{ListValue, Struct, Value, value::Kind};

use crate::config::envoy::{Metadata, MetadataValue};

/// The dynamic metadata of an answer to `req`, given the `metadata:`
/// blocks of the rules of the descriptors that passed, in request order.
pub(super) fn answer<'m>(
    req: &RateLimitRequest,
    passed: impl IntoIterator<Item = &'m Metadata>,
) -> Struct {
    let mut fields = HashMap::new();
    fields.insert("domain".to_owned(), string(req.domain.clone()));
    let descriptors = req.descriptors.iter().map(descriptor).collect();
    fields.insert("descriptors".to_owned(), list(descriptors));
    if req.hits_addend != 0 {
        fields.insert("hitsAddend".to_owned(), number(f64::from(req.hits_addend)));
    }
    let mut merged = Struct::default();
    for block in passed {
        merge(&mut merged, to_struct(block));
    }
    if !merged.fields.is_empty() {
        fields.insert("metadata".to_owned(), kind(Kind::StructValue(merged)));
    }
    Struct { fields }
}

fn descriptor(d: &RateLimitDescriptor) -> Value {
    let entries = d
        .entries
        .iter()
        .map(|e| string(format!("{}={}", e.key, e.value)))
        .collect();
    let mut fields = HashMap::from([("entries".to_owned(), list(entries))]);
    if let Some(h) = &d.hits_addend {
        // A double, as protobuf's Struct holds every number; hits above
        // 2^53 lose their last digits here, and only here.
        #[allow(clippy::cast_precision_loss)]
        fields.insert("hitsAddend".to_owned(), number(h.value as f64));
    }
    kind(Kind::StructValue(Struct { fields }))
}

/// Adds `src`'s fields to `dest`: a key already there keeps its value,
/// except that two mappings under one key are merged in turn.
fn merge(dest: &mut Struct, src: Struct) {
    for (k, v) in src.fields {
        match (dest.fields.get_mut(&k), v.kind) {
            (
                Some(Value {
                    kind: Some(Kind::StructValue(d)),
                }),
                Some(Kind::StructValue(s)),
            ) => merge(d, s),
            (Some(_), _) => {}
            (None, kind) => {
                dest.fields.insert(k, Value { kind });
            }
        }
    }
}

fn to_struct(m: &Metadata) -> Struct {
    Struct {
        fields: m.iter().map(|(k, v)| (k.clone(), value(v))).collect(),
    }
}

fn value(v: &MetadataValue) -> Value {
    match v {
        MetadataValue::Null => kind(Kind::NullValue(0)),
        MetadataValue::Bool(b) => kind(Kind::BoolValue(*b)),
        // YAML numbers Rust does not read (`.inf`, `0x1f`) stay text.
        MetadataValue::Number(n) => n.parse::<f64>().map_or_else(|_| string(n.clone()), number),
        MetadataValue::String(s) => string(s.clone()),
        MetadataValue::List(items) => list(items.iter().map(value).collect()),
        MetadataValue::Map(m) => kind(Kind::StructValue(to_struct(m))),
    }
}

fn kind(k: Kind) -> Value {
    Value { kind: Some(k) }
}

fn string(s: String) -> Value {
    kind(Kind::StringValue(s))
}

fn number(n: f64) -> Value {
    kind(Kind::NumberValue(n))
}

fn list(values: Vec<Value>) -> Value {
    kind(Kind::ListValue(ListValue { values }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(pairs: &[(&str, MetadataValue)]) -> Metadata {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect()
    }

    #[test]
    fn the_first_block_wins_a_key_and_mappings_merge() {
        let a = meta(&[
            ("team", MetadataValue::String("a".into())),
            (
                "x",
                MetadataValue::Map(meta(&[("p", MetadataValue::Bool(true))])),
            ),
        ]);
        let b = meta(&[
            ("team", MetadataValue::String("b".into())),
            (
                "x",
                MetadataValue::Map(meta(&[("q", MetadataValue::Number("2".into()))])),
            ),
        ]);
        let req = RateLimitRequest {
            domain: "d".into(),
            ..RateLimitRequest::default()
        };
        let s = answer(&req, [&a, &b]);
        let Some(Kind::StructValue(m)) = &s.fields["metadata"].kind else {
            panic!("{s:?}");
        };
        assert_eq!(m.fields["team"], string("a".into()));
        let Some(Kind::StructValue(x)) = &m.fields["x"].kind else {
            panic!("{m:?}");
        };
        assert_eq!(x.fields["p"], kind(Kind::BoolValue(true)));
        assert_eq!(x.fields["q"], number(2.0));
        assert!(!s.fields.contains_key("hitsAddend"), "absent when unset");
    }
}
