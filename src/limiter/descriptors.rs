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
    /// The entry whose value is a lease id: a descriptor that reaches a
    /// concurrency limit holds (or, with `is_negative_hits`, releases) the
    /// lease of that id. Never part of a whole-descriptor identity, so
    /// one caller's requests share a pool.
    pub lease_id: Option<String>,
}

/// How a node matches an entry's value.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ValueMatch {
    /// Any value (no `value` in the YAML). Each value gets its own bucket.
    Any,
    /// Exactly this value.
    Exact(String),
    /// A YAML value holding `*`: each `*` matches any run of characters,
    /// the empty one too.
    Wildcard {
        /// The value as written, `files/*`: what a shared bucket is keyed by.
        pattern: String,
        /// `pattern` split at each `*`, so at least two parts.
        parts: Vec<String>,
    },
}

impl ValueMatch {
    /// The wildcard of a YAML value holding `*`.
    pub fn wildcard(pattern: &str) -> Self {
        Self::Wildcard {
            pattern: pattern.to_owned(),
            parts: pattern.split('*').map(str::to_owned).collect(),
        }
    }

    /// Lower ranks win: an exact value beats a wildcard, which beats any
    /// value; among wildcards the first in file order (`index`) wins, as in
    /// envoyproxy/ratelimit.
    fn rank(&self, value: &str, index: usize) -> Option<(u8, usize)> {
        match self {
            Self::Exact(v) => (v == value).then_some((0, 0)),
            Self::Wildcard { parts, .. } => wildcard_matches(parts, value).then_some((1, index)),
            Self::Any => Some((2, 0)),
        }
    }
}

/// Whether `value` is `parts` joined by runs of any characters: it starts
/// with the first part, ends with the last, and holds the others in order
/// between them, none overlapping.
fn wildcard_matches(parts: &[String], value: &str) -> bool {
    let (Some(first), Some(last)) = (parts.first(), parts.last()) else {
        return false;
    };
    if parts.len() < 2 || value.len() < first.len() + last.len() {
        return parts.len() < 2 && first == value;
    }
    if !value.starts_with(first.as_str()) || !value.ends_with(last.as_str()) {
        return false;
    }
    let mut rest = &value[first.len()..value.len() - last.len()];
    for part in &parts[1..parts.len() - 1] {
        match rest.find(part.as_str()) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    true
}

/// One node of a descriptor tree.
#[derive(Debug, Clone)]
pub struct DescriptorNode {
    /// The entry key this node matches.
    pub key: String,
    /// The entry values this node matches.
    pub value: ValueMatch,
    /// envoyproxy's `share_threshold`: every value this node's wildcard
    /// matches draws on one bucket.
    pub share: bool,
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
    /// wins (exact value, then the first wildcard that matches, then any
    /// value) and the walk never backtracks, as in envoyproxy/ratelimit: a
    /// descriptor that leaves the tree, or ends on a node without a limit,
    /// has no limit.
    pub fn find(&self, entries: &[(&str, &str)]) -> Option<&Limit> {
        self.end(entries)?.0.limit.as_ref()
    }

    /// The node the last entry reaches, and whether a `share_threshold`
    /// wildcard matched on the way; `None` when the descriptor leaves the
    /// tree. Allocates nothing: it runs for every Envoy descriptor.
    fn end(&self, entries: &[(&str, &str)]) -> Option<(&DescriptorNode, bool)> {
        let mut level = &self.roots;
        let mut reached = None;
        let mut shared = false;
        for (key, value) in entries {
            let node = choose(level, key, value)?;
            shared |= node.shares();
            reached = Some(node);
            level = &node.children;
        }
        reached.map(|n| (n, shared))
    }

    /// The identity of the bucket `entries` draw on when a node on their
    /// way matched with `share_threshold`: the canonical descriptor with
    /// each such entry's value replaced by [`SHARED_MARK`] and the wildcard
    /// as written, so every value the wildcard matches shares one bucket.
    /// `None` when no shared wildcard applies or no limit is reached.
    pub fn shared_identity(&self, entries: &[(&str, &str)]) -> Option<String> {
        let (end, shared) = self.end(entries)?;
        if !shared || end.limit.is_none() {
            return None;
        }
        let mut level = &self.roots;
        let mut values = Vec::with_capacity(entries.len());
        for (key, value) in entries {
            let node = choose(level, key, value)?;
            values.push(match &node.value {
                ValueMatch::Wildcard { pattern, .. } if node.share => {
                    format!("{SHARED_MARK}{pattern}")
                }
                _ => (*value).to_owned(),
            });
            level = &node.children;
        }
        let entries: Vec<(&str, &str)> = entries
            .iter()
            .zip(&values)
            .map(|((k, _), v)| (*k, v.as_str()))
            .collect();
        Some(canonical(&entries))
    }
}

/// The node of `level` that an entry `key=value` takes: the most specific.
fn choose<'t>(level: &'t [DescriptorNode], key: &str, value: &str) -> Option<&'t DescriptorNode> {
    level
        .iter()
        .enumerate()
        .filter(|(_, n)| n.key == key)
        .filter_map(|(i, n)| n.value.rank(value, i).map(|r| (r, n)))
        .min_by_key(|(r, _)| *r)
        .map(|(_, n)| n)
}

impl DescriptorNode {
    /// A `share_threshold` wildcard.
    fn shares(&self) -> bool {
        self.share && matches!(self.value, ValueMatch::Wildcard { .. })
    }
}

/// Opens a shared wildcard's value in a bucket's identity: a control
/// character, which validation refuses in every value a caller sends, so a
/// caller cannot name the shared bucket by sending the wildcard as a value.
pub const SHARED_MARK: char = '\u{2}';

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
            share: false,
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
                node("user", ValueMatch::wildcard("bot-*"), "bots", vec![]),
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
    fn wildcards_match_anywhere_and_the_first_in_file_order_wins() {
        let parts = |p: &str| match ValueMatch::wildcard(p) {
            ValueMatch::Wildcard { parts, .. } => parts,
            _ => unreachable!(),
        };
        let m = |p: &str, v: &str| wildcard_matches(&parts(p), v);
        assert!(m("files/*", "files/a.pdf") && m("files/*", "files/"));
        assert!(!m("files/*", "file"));
        assert!(m("/api/*/action", "/api/7/action") && !m("/api/*/action", "/api/7/other"));
        assert!(m("/a/*/r/*/x", "/a/1/r/2/x") && !m("/a/*/r/*/x", "/a/1/x"));
        assert!(!m("ab*ba", "aba"), "the prefix and suffix may not overlap");
        let tree = DescriptorTree {
            roots: vec![
                node("k", ValueMatch::wildcard("a*"), "first", vec![]),
                node("k", ValueMatch::wildcard("ab*"), "longer", vec![]),
            ],
        };
        assert_eq!(name(&tree, &[("k", "abc")]), Some("first"));
    }

    #[test]
    fn a_shared_wildcard_gives_every_value_one_unforgeable_identity() {
        let mut shared = node(
            "f",
            ValueMatch::wildcard("files/*"),
            "",
            vec![node("m", ValueMatch::Any, "per-method", vec![])],
        );
        shared.share = true;
        let tree = DescriptorTree {
            roots: vec![shared, node("g", ValueMatch::wildcard("g*"), "own", vec![])],
        };
        let a = tree.shared_identity(&[("f", "files/a"), ("m", "GET")]);
        let b = tree.shared_identity(&[("f", "files/b"), ("m", "GET")]);
        assert_eq!(a, b);
        assert_eq!(a.as_deref(), Some("\u{1}f=\u{2}files/*,m=GET"));
        assert_ne!(a, tree.shared_identity(&[("f", "files/a"), ("m", "PUT")]));
        // No limit at the end, or no shared wildcard on the way: none.
        assert_eq!(tree.shared_identity(&[("f", "files/a")]), None);
        assert_eq!(tree.shared_identity(&[("g", "g1")]), None);
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
