//! Descriptor rules: how an Envoy descriptor's entries pick a limit.
//!
//! A descriptor is an ordered list of `(key, value)` entries, such as
//! `[("user", "alice"), ("path", "/search")]`. Scopes loaded from
//! envoyproxy/ratelimit YAML hold a [`DescriptorTree`]; a descriptor is walked
//! down it one entry per level, and the node reached by its last entry names
//! the limit. Scopes from Tollgate's own config hold [`DescriptorKeys`]
//! instead, which say which entries are the identity and the operation.
//!
//! This module is pure data and matching: it knows no proto types.

use super::limit::Limit;

/// For a scope of Tollgate's own config: which descriptor entries carry the
/// identity and the operation of the request that a descriptor becomes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DescriptorKeys {
    /// The entry whose value is the identity; absent or missing means the
    /// whole descriptor is the identity.
    pub identity: Option<String>,
    /// The entry whose value is the operation; absent or missing means "".
    pub operation: Option<String>,
    /// The entry whose value is the priority (`critical`, `normal`,
    /// `sheddable`); absent or missing means normal. It is never part of a
    /// whole-descriptor identity, so one caller's priorities share buckets.
    pub priority: Option<String>,
}

/// How a node matches an entry's value.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ValueMatch {
    /// Any value (no `value` in the YAML). Each value gets its own bucket.
    Any,
    /// Exactly this value.
    Exact(String),
    /// Values that start with this (a YAML value `prefix*`).
    Prefix(String),
}

impl ValueMatch {
    /// Lower ranks win: an exact value beats a prefix, which beats any value.
    fn rank(&self, value: &str) -> Option<(u8, usize)> {
        match self {
            Self::Exact(v) => (v == value).then_some((0, 0)),
            // A longer prefix is the more specific one.
            Self::Prefix(p) => value
                .starts_with(p.as_str())
                .then_some((1, usize::MAX - p.len())),
            Self::Any => Some((2, 0)),
        }
    }
}

/// One node of a descriptor tree.
#[derive(Debug, Clone)]
pub struct DescriptorNode {
    /// The entry key this node matches.
    pub key: String,
    /// The entry values this node matches.
    pub value: ValueMatch,
    /// The limit of a descriptor that ends here; `None` means no limit.
    pub limit: Option<Limit>,
    /// The nodes that match the next entry.
    pub children: Vec<DescriptorNode>,
}

/// A scope's descriptor rules, as nested in envoyproxy/ratelimit YAML.
#[derive(Debug, Clone, Default)]
pub struct DescriptorTree {
    /// The nodes that match a descriptor's first entry.
    pub roots: Vec<DescriptorNode>,
}

impl DescriptorTree {
    /// True when the tree holds no rules.
    pub fn is_empty(&self) -> bool {
        self.roots.is_empty()
    }

    /// How many nodes carry a limit.
    pub fn limit_count(&self) -> usize {
        fn count(nodes: &[DescriptorNode]) -> usize {
            nodes
                .iter()
                .map(|n| usize::from(n.limit.is_some()) + count(&n.children))
                .sum()
        }
        count(&self.roots)
    }

    /// Every limit in the tree, depth first.
    pub fn limits(&self) -> Vec<&Limit> {
        fn walk<'t>(nodes: &'t [DescriptorNode], out: &mut Vec<&'t Limit>) {
            for n in nodes {
                out.extend(n.limit.as_ref());
                walk(&n.children, out);
            }
        }
        let mut out = Vec::new();
        walk(&self.roots, &mut out);
        out
    }

    /// The limit for `entries`, if any. At each level the most specific node
    /// wins (exact value, then longest prefix, then any value) and the walk
    /// never backtracks, as in envoyproxy/ratelimit: a descriptor that leaves
    /// the tree, or ends on a node without a limit, has no limit.
    pub fn find(&self, entries: &[(&str, &str)]) -> Option<&Limit> {
        let mut level = &self.roots;
        let mut found = None;
        for (key, value) in entries {
            let node = level
                .iter()
                .filter(|n| n.key == *key)
                .filter_map(|n| n.value.rank(value).map(|r| (r, n)))
                .min_by_key(|(r, _)| *r)
                .map(|(_, n)| n)?;
            found = Some(node);
            level = &node.children;
        }
        found.and_then(|n| n.limit.as_ref())
    }
}

/// Opens every canonical descriptor string; see [`canonical`].
pub const CANONICAL_MARK: char = '\u{1}';

/// The whole descriptor as one string, used as the identity of its buckets:
/// `key=value` pairs joined by `,`, with `%`, `,` and `=` percent-escaped so
/// that no two descriptors share a string.
///
/// It starts with [`CANONICAL_MARK`], a control character that validation
/// refuses in every identity a caller sends, so a descriptor's buckets never
/// share a key with a caller-chosen identity such as `"path=/login"`.
pub fn canonical(entries: &[(&str, &str)]) -> String {
    let mut out = String::from(CANONICAL_MARK);
    for (i, (k, v)) in entries.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        escape_into(&mut out, k);
        out.push('=');
        escape_into(&mut out, v);
    }
    out
}

fn escape_into(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '%' => out.push_str("%25"),
            ',' => out.push_str("%2C"),
            '=' => out.push_str("%3D"),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bucket::Shape;

    fn limit(name: &str) -> Option<Limit> {
        let shape = Shape {
            capacity: 1,
            period: 1_000_000_000,
        };
        Some(Limit::for_descriptor(name, shape, false))
    }

    fn node(
        key: &str,
        value: ValueMatch,
        l: &str,
        children: Vec<DescriptorNode>,
    ) -> DescriptorNode {
        DescriptorNode {
            key: key.to_owned(),
            value,
            limit: if l.is_empty() { None } else { limit(l) },
            children,
        }
    }

    fn name<'a>(t: &'a DescriptorTree, e: &[(&str, &str)]) -> Option<&'a str> {
        t.find(e).map(|l| &*l.name)
    }

    #[test]
    fn most_specific_value_wins_at_each_level_without_backtracking() {
        let tree = DescriptorTree {
            roots: vec![
                node(
                    "user",
                    ValueMatch::Any,
                    "any-user",
                    vec![node(
                        "path",
                        ValueMatch::Exact("/b".into()),
                        "any-user-b",
                        vec![],
                    )],
                ),
                node("user", ValueMatch::Prefix("bot-".into()), "bots", vec![]),
                node(
                    "user",
                    ValueMatch::Exact("alice".into()),
                    "",
                    vec![node(
                        "path",
                        ValueMatch::Exact("/a".into()),
                        "alice-a",
                        vec![],
                    )],
                ),
            ],
        };
        assert_eq!(name(&tree, &[("user", "bob")]), Some("any-user"));
        assert_eq!(name(&tree, &[("user", "bot-7")]), Some("bots"));
        assert_eq!(
            name(&tree, &[("user", "alice")]),
            None,
            "alice's node has no limit"
        );
        assert_eq!(
            name(&tree, &[("user", "alice"), ("path", "/a")]),
            Some("alice-a")
        );
        // alice's branch is taken and has no /b: no fallback to the any-user branch.
        assert_eq!(name(&tree, &[("user", "alice"), ("path", "/b")]), None);
        assert_eq!(
            name(&tree, &[("user", "bob"), ("path", "/b")]),
            Some("any-user-b")
        );
        assert_eq!(name(&tree, &[("path", "/b")]), None);
        assert_eq!(name(&tree, &[]), None);
    }

    #[test]
    fn canonical_form_is_unambiguous() {
        assert_eq!(canonical(&[("a", "b"), ("c", "d")]), "\u{1}a=b,c=d");
        assert_ne!(
            canonical(&[("a", "b,c=d")]),
            canonical(&[("a", "b"), ("c", "d")])
        );
        assert_eq!(canonical(&[("k", "50%")]), "\u{1}k=50%25");
    }
}
