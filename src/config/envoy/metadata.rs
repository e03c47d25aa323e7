//! A descriptor's `metadata:` block: free-form YAML that envoyproxy/ratelimit
//! hands back to Envoy in a response's dynamic metadata.
//!
//! Kept as plain data, numbers as their YAML text, so the config room holds
//! no float; the API turns it into a protobuf `Struct` when it answers.

use yaml_rust2::Yaml;

/// Deepest nesting of maps and lists accepted in one `metadata` block.
pub const MAX_METADATA_DEPTH: usize = 16;

/// One metadata value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetadataValue {
    /// `null`, or an empty value.
    Null,
    /// `true` or `false`.
    Bool(bool),
    /// A number, as written (`3`, `0.5`); a protobuf `Struct` holds numbers
    /// as doubles, so the API converts it there.
    Number(String),
    /// A string.
    String(String),
    /// A list.
    List(Vec<MetadataValue>),
    /// A mapping, in file order.
    Map(Metadata),
}

/// A metadata mapping, in file order; keys that are not strings are written
/// as their YAML text, as envoyproxy/ratelimit does.
pub type Metadata = Vec<(String, MetadataValue)>;

/// Reads a `metadata` block, which must be a mapping. `Err` says what is
/// wrong and where below `metadata`, as a path suffix (`.a[2]`).
pub(super) fn parse(node: &Yaml) -> Result<Metadata, (String, String)> {
    match value(node, 0)? {
        MetadataValue::Map(map) => Ok(map),
        MetadataValue::Null => Ok(Vec::new()),
        _ => Err((String::new(), "must be a mapping".to_owned())),
    }
}

fn value(node: &Yaml, depth: usize) -> Result<MetadataValue, (String, String)> {
    if depth > MAX_METADATA_DEPTH {
        return Err((
            String::new(),
            format!("nests deeper than {MAX_METADATA_DEPTH}"),
        ));
    }
    Ok(match node {
        Yaml::Null => MetadataValue::Null,
        Yaml::Boolean(b) => MetadataValue::Bool(*b),
        Yaml::Integer(i) => MetadataValue::Number(i.to_string()),
        Yaml::Real(r) => MetadataValue::Number(r.clone()),
        Yaml::String(s) => MetadataValue::String(s.clone()),
        Yaml::Array(items) => {
            let mut out = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                out.push(value(item, depth + 1).map_err(|(at, e)| (format!("[{i}]{at}"), e))?);
            }
            MetadataValue::List(out)
        }
        Yaml::Hash(map) => {
            let mut out = Vec::with_capacity(map.len());
            for (k, v) in map {
                let key = scalar_text(k)
                    .ok_or_else(|| (String::new(), format!("keys must be scalars, not {k:?}")))?;
                let v = value(v, depth + 1).map_err(|(at, e)| (format!(".{key}{at}"), e))?;
                out.push((key, v));
            }
            MetadataValue::Map(out)
        }
        other => {
            return Err((String::new(), format!("cannot hold {other:?}")));
        }
    })
}

fn scalar_text(node: &Yaml) -> Option<String> {
    match node {
        Yaml::String(s) | Yaml::Real(s) => Some(s.clone()),
        Yaml::Integer(i) => Some(i.to_string()),
        Yaml::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use yaml_rust2::YamlLoader;

    fn read(text: &str) -> Result<Metadata, (String, String)> {
        parse(&YamlLoader::load_from_str(text).unwrap()[0])
    }

    #[test]
    fn nested_maps_lists_and_scalars_keep_their_order_and_text() {
        let m = read("b: {x: [1, 0.5, true, null]}\na: hi\n3: three\n").unwrap();
        assert_eq!(m[0].0, "b");
        assert_eq!(
            m[0].1,
            MetadataValue::Map(vec![(
                "x".into(),
                MetadataValue::List(vec![
                    MetadataValue::Number("1".into()),
                    MetadataValue::Number("0.5".into()),
                    MetadataValue::Bool(true),
                    MetadataValue::Null,
                ])
            )])
        );
        assert_eq!(m[1], ("a".into(), MetadataValue::String("hi".into())));
        assert_eq!(m[2].0, "3");
    }

    #[test]
    fn a_scalar_or_too_deep_a_block_is_refused_with_where() {
        assert_eq!(read("just text").unwrap_err().1, "must be a mapping");
        let deep = format!("a: {}1{}\n", "[".repeat(20), "]".repeat(20));
        let (at, why) = read(&deep).unwrap_err();
        assert!(at.starts_with(".a[0][0]"), "{at}");
        assert!(why.contains("deeper than 16"), "{why}");
    }
}
