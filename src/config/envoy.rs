//! envoyproxy/ratelimit YAML (`envoy_ratelimit_configs`), read as plain data.
//!
//! Each file holds one `domain` and its nested `descriptors`. The limiter's
//! compiler turns a domain into a scope beside those of Tollgate's own config,
//! and every `rate_limit` into a token bucket with capacity
//! `requests_per_unit` that refills completely in one `unit`. The YAML is
//! walked by hand so that every problem names its file and exact field path;
//! every field envoyproxy/ratelimit knows is read, and any other is refused.
//! Where a field's meaning here differs from upstream's, the walk leaves a
//! note (`EnvoyDomain::notes`) for `tollgate check-config --envoy-compat`.

mod metadata;

pub use metadata::{MAX_METADATA_DEPTH, Metadata, MetadataValue};

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use yaml_rust2::{Yaml, YamlLoader};

use super::ConfigError;
use super::scopes::{MAX_CAPACITY, MAX_NAME_LEN};

/// Deepest descriptor nesting accepted; real configs use two or three.
pub const MAX_DEPTH: usize = 16;

/// envoyproxy/ratelimit's units and their lengths. A month is 30 days and a
/// year 365, as envoyproxy/ratelimit counts them.
pub const UNITS: [(&str, Duration); 7] = [
    ("second", Duration::from_secs(1)),
    ("minute", Duration::from_secs(60)),
    ("hour", Duration::from_secs(3600)),
    ("day", Duration::from_secs(86_400)),
    ("week", Duration::from_secs(7 * 86_400)),
    ("month", Duration::from_secs(30 * 86_400)),
    ("year", Duration::from_secs(365 * 86_400)),
];

/// The fields of a descriptor, as envoyproxy/ratelimit names them.
const DESCRIPTOR_FIELDS: [&str; 10] = [
    "key",
    "value",
    "rate_limit",
    "descriptors",
    "shadow_mode",
    "quota_mode",
    "share_threshold",
    "detailed_metric",
    "value_to_metric",
    "metadata",
];

/// The fields of a `rate_limit`.
const RATE_LIMIT_FIELDS: [&str; 5] = ["unit", "requests_per_unit", "name", "unlimited", "replaces"];

/// One file: a domain and its descriptor rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvoyDomain {
    /// The domain, which becomes a scope of this name.
    pub name: String,
    /// The file it came from, for messages that name it.
    pub origin: String,
    /// The descriptors that match a descriptor's first entry.
    pub descriptors: Vec<EnvoyDescriptor>,
    /// Where a field loaded with a meaning that differs from
    /// envoyproxy/ratelimit's, and how: `path: what differs`.
    pub notes: Vec<String>,
}

/// One `descriptors` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvoyDescriptor {
    /// The entry key it matches.
    pub key: String,
    /// The entry values it matches.
    pub value: EnvoyValue,
    /// The limit of a descriptor that ends here; `None` for none.
    pub rate_limit: Option<EnvoyRateLimit>,
    /// `shadow_mode`: judged and counted, never denies.
    pub shadow: bool,
    /// `quota_mode`: among a request's quota descriptors, the request is
    /// over the limit only when all of them are.
    pub quota: bool,
    /// `share_threshold`: every value its wildcard `value` matches draws on
    /// one bucket, not one per value.
    pub share_threshold: bool,
    /// `detailed_metric`: upstream's per-value stat names. Read, and noted:
    /// Tollgate's metrics never carry a descriptor value.
    pub detailed_metric: bool,
    /// `value_to_metric`: as `detailed_metric`.
    pub value_to_metric: bool,
    /// `metadata`: handed back in the answer's dynamic metadata when it
    /// passes (`envoy_dynamic_metadata`).
    pub metadata: Option<Metadata>,
    /// The descriptors that match the next entry.
    pub children: Vec<EnvoyDescriptor>,
}

/// How a descriptor matches an entry's value.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum EnvoyValue {
    /// Any value (no `value`); each value gets its own bucket.
    Any,
    /// Exactly this value.
    Exact(String),
    /// A `value` holding `*`, as written: each `*` matches any run of
    /// characters, the empty one too (`files/*`, `/api/*/action`).
    Pattern(String),
}

/// A `rate_limit`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvoyRateLimit {
    /// Its `name`, or the path of keys and values that leads to it.
    pub name: String,
    /// True when `name` was written: only such a rule can be named by a
    /// `replaces`, as upstream has it.
    pub named: bool,
    /// `requests_per_unit`: the bucket's capacity. 0 denies every request
    /// and takes nothing (upstream's "black list").
    pub requests_per_unit: u64,
    /// `unit`, as a length: the bucket's refill period; zero when unlimited.
    pub unit: Duration,
    /// `unlimited: true`: never limited, but still a rule (it can replace
    /// others, and reports an unlimited remainder).
    pub unlimited: bool,
    /// The rule names that it stands in for.
    pub replaces: Vec<String>,
}

/// Reads every file (or every `.yaml`/`.yml` file of every directory) of
/// `paths`. Uniqueness of the domains, among themselves and against the
/// config's own scopes, is checked with the rest of the config.
pub fn load_all(paths: &[PathBuf]) -> Result<Vec<EnvoyDomain>, ConfigError> {
    let mut problems = Vec::new();
    let mut files = Vec::new();
    for (i, p) in paths.iter().enumerate() {
        if let Err(e) = expand(p, &mut files) {
            problems.push(format!("envoy_ratelimit_configs[{i}]: {e}"));
        }
    }
    let mut domains = Vec::new();
    for file in files {
        let origin = file.display().to_string();
        match std::fs::read_to_string(&file) {
            Ok(text) => match parse(&text, &origin) {
                Ok(domain) => domains.push(domain),
                Err(e) => problems.extend(e.problems),
            },
            Err(e) => problems.push(format!("{origin}: cannot read: {e}")),
        }
    }
    ConfigError::check(problems)?;
    Ok(domains)
}

/// Merges the domains defined in several files into one each, in file
/// order (`envoy_merge_domains`, upstream's `MERGE_DOMAIN_CONFIG`): a later
/// file's top-level descriptors join the first file's. As upstream, two
/// top-level descriptors of one domain with the same key and value are
/// refused, naming both files; nested descriptors are not merged.
pub fn merge(domains: Vec<EnvoyDomain>) -> Result<Vec<EnvoyDomain>, ConfigError> {
    let mut problems = Vec::new();
    let mut out: Vec<EnvoyDomain> = Vec::new();
    for d in domains {
        let Some(first) = out.iter_mut().find(|o| o.name == d.name) else {
            out.push(d);
            continue;
        };
        for (i, desc) in d.descriptors.into_iter().enumerate() {
            let same = |o: &EnvoyDescriptor| o.key == desc.key && o.value == desc.value;
            if first.descriptors.iter().any(same) {
                problems.push(format!(
                    "{}: descriptors[{i}]: repeats the key and value of a descriptor of \
                     domain {:?} in {}",
                    d.origin, d.name, first.origin
                ));
            } else {
                first.descriptors.push(desc);
            }
        }
        let notes = d.notes.into_iter().map(|n| format!("{}: {n}", d.origin));
        first.notes.extend(notes);
        first.origin = format!("{}, {}", first.origin, d.origin);
    }
    ConfigError::check(problems)?;
    Ok(out)
}

/// A file as itself; a directory as its `.yaml` and `.yml` files, sorted, not
/// descending into subdirectories.
fn expand(path: &Path, out: &mut Vec<PathBuf>) -> Result<(), String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if !meta.is_dir() {
        out.push(path.to_owned());
        return Ok(());
    }
    let mut found = Vec::new();
    for entry in std::fs::read_dir(path).map_err(|e| format!("{}: {e}", path.display()))? {
        let p = entry
            .map_err(|e| format!("{}: {e}", path.display()))?
            .path();
        let yaml = p
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("yaml") || e.eq_ignore_ascii_case("yml"));
        if yaml && p.is_file() {
            found.push(p);
        }
    }
    found.sort();
    out.extend(found);
    Ok(())
}

/// Parses one envoyproxy/ratelimit YAML document. `origin` prefixes every
/// problem (usually the file's path).
pub fn parse(text: &str, origin: &str) -> Result<EnvoyDomain, ConfigError> {
    let mut walk = Walk {
        origin,
        problems: Vec::new(),
        notes: Vec::new(),
        names: Vec::new(),
        references: Vec::new(),
    };
    let scope = match YamlLoader::load_from_str(text) {
        Err(e) => {
            walk.problem("", format!("not valid YAML: {e}"));
            None
        }
        Ok(docs) if docs.len() != 1 => {
            walk.problem(
                "",
                format!("holds {} YAML documents; one is expected", docs.len()),
            );
            None
        }
        Ok(docs) => walk.document(&docs[0]),
    };
    match scope {
        Some(s) if walk.problems.is_empty() => Ok(s),
        _ => Err(ConfigError {
            problems: walk.problems,
        }),
    }
}

/// Collects problems and notes while walking one file.
struct Walk<'a> {
    origin: &'a str,
    problems: Vec<String>,
    /// Where a field's meaning differs from upstream's: `path: how`.
    notes: Vec<String>,
    /// Every rule name written in the file.
    names: Vec<String>,
    /// Every `replaces` entry, with its path, to check once all names are in.
    references: Vec<(String, String)>,
}

impl Walk<'_> {
    fn problem(&mut self, at: &str, what: impl std::fmt::Display) {
        if at.is_empty() {
            self.problems.push(format!("{}: {what}", self.origin));
        } else {
            self.problems.push(format!("{}: {at}: {what}", self.origin));
        }
    }

    fn note(&mut self, at: &str, what: impl std::fmt::Display) {
        self.notes.push(format!("{at}: {what}"));
    }

    /// The fields of a mapping, refusing any not in `known`.
    fn fields<'y>(
        &mut self,
        at: &str,
        node: &'y Yaml,
        known: &[&str],
    ) -> Option<HashMap<&'y str, &'y Yaml>> {
        let Yaml::Hash(map) = node else {
            self.problem(at, "must be a mapping");
            return None;
        };
        let mut out = HashMap::new();
        for (k, v) in map {
            let Yaml::String(k) = k else {
                self.problem(at, format!("field names must be strings, not {k:?}"));
                continue;
            };
            if known.contains(&k.as_str()) {
                out.insert(k.as_str(), v);
            } else {
                self.problem(
                    &join(at, k),
                    format!("unknown field (known: {})", known.join(", ")),
                );
            }
        }
        Some(out)
    }

    fn string(&mut self, at: &str, node: &Yaml) -> Option<String> {
        match node {
            Yaml::String(s) | Yaml::Real(s) => Some(s.clone()),
            Yaml::Integer(i) => Some(i.to_string()),
            Yaml::Boolean(b) => Some(b.to_string()),
            _ => {
                self.problem(at, "must be a string");
                None
            }
        }
    }

    /// A list's items; absent or null is an empty list.
    fn list<'y>(&mut self, at: &str, node: Option<&'y Yaml>) -> &'y [Yaml] {
        match node {
            None | Some(Yaml::Null) => &[],
            Some(Yaml::Array(list)) => list,
            Some(_) => {
                self.problem(at, "must be a list");
                &[]
            }
        }
    }

    fn flag(&mut self, at: &str, node: Option<&&Yaml>) -> bool {
        match node {
            None | Some(Yaml::Null) => false,
            Some(Yaml::Boolean(b)) => *b,
            Some(_) => {
                self.problem(at, "must be true or false");
                false
            }
        }
    }

    fn document(&mut self, doc: &Yaml) -> Option<EnvoyDomain> {
        let fields = self.fields("", doc, &["domain", "descriptors"])?;
        let domain = match fields.get("domain") {
            None => {
                self.problem("domain", "is required");
                None
            }
            Some(d) => self.string("domain", d),
        };
        if let Some(d) = &domain {
            self.name("domain", d);
        }
        let roots = self.descriptors("descriptors", fields.get("descriptors").copied(), &[]);
        for (at, name) in std::mem::take(&mut self.references) {
            if !self.names.contains(&name) {
                // Upstream loads it too; it replaces nothing.
                self.note(
                    &at,
                    format!("names no rate_limit of this file ({name:?}): it replaces nothing"),
                );
            }
        }
        Some(EnvoyDomain {
            name: domain?,
            origin: self.origin.to_owned(),
            descriptors: roots,
            notes: std::mem::take(&mut self.notes),
        })
    }

    fn name(&mut self, at: &str, name: &str) {
        if name.is_empty() {
            self.problem(at, "must not be empty");
        } else if name.len() > MAX_NAME_LEN {
            self.problem(at, format!("must be at most {MAX_NAME_LEN} bytes"));
        } else if name.chars().any(char::is_control) {
            self.problem(at, "must not contain control characters");
        }
    }

    /// A list of descriptors under `at`; `path` names the parents, for the
    /// default rule name.
    fn descriptors(
        &mut self,
        at: &str,
        node: Option<&Yaml>,
        path: &[String],
    ) -> Vec<EnvoyDescriptor> {
        let list = self.list(at, node);
        if list.is_empty() {
            return Vec::new();
        }
        if path.len() >= MAX_DEPTH {
            self.problem(at, format!("descriptors nest deeper than {MAX_DEPTH}"));
            return Vec::new();
        }
        let mut out = Vec::with_capacity(list.len());
        let mut seen = HashMap::new();
        for (i, d) in list.iter().enumerate() {
            let here = format!("{at}[{i}]");
            if let Some(n) = self.descriptor(&here, d, path) {
                let id = (n.key.clone(), n.value.clone());
                if let Some(first) = seen.insert(id, i) {
                    self.problem(&here, format!("repeats the key and value of {at}[{first}]"));
                }
                out.push(n);
            }
        }
        out
    }

    fn descriptor(&mut self, at: &str, node: &Yaml, path: &[String]) -> Option<EnvoyDescriptor> {
        let f = self.fields(at, node, &DESCRIPTOR_FIELDS)?;
        let key = match f.get("key") {
            Some(k) => self.string(&join(at, "key"), k),
            None => {
                self.problem(&join(at, "key"), "is required");
                None
            }
        };
        if let Some(k) = &key {
            self.name(&join(at, "key"), k);
        }
        let value = self.value(&join(at, "value"), f.get("value").copied());
        let [
            shadow,
            quota,
            share_threshold,
            detailed_metric,
            value_to_metric,
        ] = self.flags(at, &f, value.as_ref());
        let metadata = self.metadata(&join(at, "metadata"), f.get("metadata").copied());
        let (key, value) = (key?, value?);
        let mut here = path.to_vec();
        here.push(match &value {
            EnvoyValue::Any => key.clone(),
            EnvoyValue::Exact(v) | EnvoyValue::Pattern(v) => format!("{key}_{v}"),
        });
        let rate_limit = match f.get("rate_limit") {
            None | Some(Yaml::Null) => None,
            Some(r) => self.rate_limit(&join(at, "rate_limit"), r, &here),
        };
        let children = self.descriptors(
            &join(at, "descriptors"),
            f.get("descriptors").copied(),
            &here,
        );
        Some(EnvoyDescriptor {
            key,
            value,
            rate_limit,
            shadow,
            quota,
            share_threshold,
            detailed_metric,
            value_to_metric,
            metadata,
            children,
        })
    }

    /// A descriptor's `value`: absent or empty matches any value (upstream
    /// keys both by the key alone), and one holding `*` is a wildcard.
    fn value(&mut self, at: &str, node: Option<&Yaml>) -> Option<EnvoyValue> {
        match node {
            None | Some(Yaml::Null) => Some(EnvoyValue::Any),
            Some(v) => self.string(at, v).map(|v| {
                if v.is_empty() {
                    EnvoyValue::Any
                } else if v.contains('*') {
                    EnvoyValue::Pattern(v)
                } else {
                    EnvoyValue::Exact(v)
                }
            }),
        }
    }

    /// `shadow_mode`, `quota_mode`, `share_threshold`, `detailed_metric`
    /// and `value_to_metric`, in that order, with their checks and notes.
    fn flags(
        &mut self,
        at: &str,
        f: &HashMap<&str, &Yaml>,
        value: Option<&EnvoyValue>,
    ) -> [bool; 5] {
        let names = [
            "shadow_mode",
            "quota_mode",
            "share_threshold",
            "detailed_metric",
            "value_to_metric",
        ];
        let flags = names.map(|n| self.flag(&join(at, n), f.get(n)));
        if flags[2] && value.is_some_and(|v| !matches!(v, EnvoyValue::Pattern(_))) {
            self.problem(
                &join(at, "share_threshold"),
                "can only be used with a wildcard value (one holding `*`)",
            );
        }
        for (on, field) in [(flags[3], "detailed_metric"), (flags[4], "value_to_metric")] {
            if on {
                self.note(
                    &join(at, field),
                    "no per-value metric: Tollgate's metrics are per rule, never per \
                     descriptor value; the busiest values per rule are its heavy hitters",
                );
            }
        }
        if flags[1] {
            self.note(
                &join(at, "quota_mode"),
                "a quota descriptor over its limit takes nothing; when some of a \
                 request's quota descriptors are over, the rest are charged in a second \
                 store call",
            );
        }
        flags
    }

    fn metadata(&mut self, at: &str, node: Option<&Yaml>) -> Option<Metadata> {
        let node = node?;
        match metadata::parse(node) {
            Ok(m) if m.is_empty() => None,
            Ok(m) => Some(m),
            Err((below, why)) => {
                self.problem(&format!("{at}{below}"), why);
                None
            }
        }
    }

    fn rate_limit(&mut self, at: &str, node: &Yaml, path: &[String]) -> Option<EnvoyRateLimit> {
        let f = self.fields(at, node, &RATE_LIMIT_FIELDS)?;
        let named = match f.get("name") {
            Some(n) => self.string(&join(at, "name"), n),
            None => None,
        };
        if let Some(n) = &named {
            self.name(&join(at, "name"), n);
            self.names.push(n.clone());
        }
        let replaces = self.replaces(
            &join(at, "replaces"),
            f.get("replaces").copied(),
            named.as_deref(),
        );
        let unlimited = self.flag(&join(at, "unlimited"), f.get("unlimited"));
        let (unit, requests_per_unit) = if unlimited {
            if f.contains_key("unit") {
                self.problem(&join(at, "unit"), "must not be set when unlimited is true");
            }
            if f.contains_key("requests_per_unit") {
                self.note(
                    &join(at, "requests_per_unit"),
                    "ignored: the rule is unlimited",
                );
            }
            (Some(Duration::ZERO), Some(0))
        } else {
            (
                self.unit(&join(at, "unit"), f.get("unit").copied()),
                self.requests(at, &f),
            )
        };
        Some(EnvoyRateLimit {
            name: named.clone().unwrap_or_else(|| path.join(".")),
            named: named.is_some(),
            requests_per_unit: requests_per_unit?,
            unit: unit?,
            unlimited,
            replaces,
        })
    }

    fn unit(&mut self, at: &str, node: Option<&Yaml>) -> Option<Duration> {
        let Some(node) = node else {
            self.problem(at, "is required");
            return None;
        };
        let u = self.string(at, node)?;
        let found = UNITS.iter().find(|(n, _)| n.eq_ignore_ascii_case(&u));
        if found.is_none() {
            let names: Vec<&str> = UNITS.iter().map(|(n, _)| *n).collect();
            self.problem(
                at,
                format!("unknown unit {u:?} (one of {})", names.join(", ")),
            );
        }
        found.map(|(_, d)| *d)
    }

    /// `requests_per_unit`, 0 included; absent is 0, as upstream reads it.
    fn requests(&mut self, at: &str, f: &HashMap<&str, &Yaml>) -> Option<u64> {
        let at = join(at, "requests_per_unit");
        match f.get("requests_per_unit") {
            None => {
                self.note(
                    &at,
                    "absent, so 0, as upstream reads it: every request is denied",
                );
                Some(0)
            }
            Some(Yaml::Integer(n)) if *n >= 0 && n.unsigned_abs() <= MAX_CAPACITY => {
                Some(n.unsigned_abs())
            }
            Some(_) => {
                self.problem(
                    &at,
                    format!(
                        "must be a whole number from 0 to {MAX_CAPACITY} (Tollgate's \
                         exactness bound; upstream allows up to 4294967295)"
                    ),
                );
                None
            }
        }
    }

    /// `replaces: [{name: ...}, ...]`: the rule names this one stands in
    /// for. `own` is this rule's own `name`, which it may not replace.
    fn replaces(&mut self, at: &str, node: Option<&Yaml>, own: Option<&str>) -> Vec<String> {
        let list = self.list(at, node);
        let mut out = Vec::new();
        for (i, item) in list.iter().enumerate() {
            let here = format!("{at}[{i}]");
            let Some(f) = self.fields(&here, item, &["name"]) else {
                continue;
            };
            let name = match f.get("name") {
                None | Some(Yaml::Null) => Some(String::new()),
                Some(n) => self.string(&join(&here, "name"), n),
            };
            let Some(n) = name else { continue };
            let name_at = join(&here, "name");
            if n.is_empty() {
                self.problem(&name_at, "must not be empty");
            } else if own == Some(n.as_str()) {
                self.problem(&name_at, format!("names this rate_limit itself ({n:?})"));
            } else {
                self.references.push((name_at, n.clone()));
                out.push(n);
            }
        }
        out
    }
}

fn join(at: &str, field: &str) -> String {
    if at.is_empty() {
        field.to_owned()
    } else {
        format!("{at}.{field}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(text: &str) -> Vec<String> {
        match parse(text, "f.yaml") {
            Ok(_) => Vec::new(),
            Err(e) => e.problems,
        }
    }

    fn has(problems: &[String], what: &str) {
        assert!(
            problems.iter().any(|p| p.contains(what)),
            "{what} not in {problems:?}"
        );
    }

    #[test]
    fn unknown_and_misplaced_fields_are_named_with_their_path() {
        let p = problems(
            "domain: d\ndescriptors:\n  - key: a\n    descriptors:\n      - key: b\n        rate_limit: {unit: second, requests_per_unit: 1, quota_mode: true}\n        colour: red\n",
        );
        has(
            &p,
            "f.yaml: descriptors[0].descriptors[0].rate_limit.quota_mode: unknown field",
        );
        has(
            &p,
            "f.yaml: descriptors[0].descriptors[0].colour: unknown field",
        );
        has(
            &problems("domain: d\ndescriptors:\n  - key: a\n    shadowmode: true\n"),
            "descriptors[0].shadowmode: unknown field",
        );
        has(
            &problems("domain: d\n1: x\n"),
            "field names must be strings",
        );
        has(
            &problems("domain: d\ndescriptors: [a]\n"),
            "descriptors[0]: must be a mapping",
        );
    }

    #[test]
    fn bad_units_empty_names_and_duplicates_are_refused() {
        let p = problems(
            "domain: d\ndescriptors:\n  - key: a\n    rate_limit: {unit: fortnight, requests_per_unit: -1}\n",
        );
        has(
            &p,
            "descriptors[0].rate_limit.unit: unknown unit \"fortnight\"",
        );
        has(
            &p,
            "descriptors[0].rate_limit.requests_per_unit: must be a whole number from 0",
        );
        assert_eq!(
            problems("descriptors: []\n"),
            vec!["f.yaml: domain: is required"]
        );
        has(
            &problems("domain: \"\"\n"),
            "f.yaml: domain: must not be empty",
        );
        has(
            &problems("domain: d\ndescriptors:\n  - key: \"\"\n"),
            "descriptors[0].key: must not be empty",
        );
        has(
            &problems("domain: d\ndescriptors:\n  - {key: a, value: x}\n  - {key: a, value: x}\n"),
            "descriptors[1]: repeats the key and value of descriptors[0]",
        );
        // An empty value is no value, as upstream keys it.
        has(
            &problems("domain: d\ndescriptors:\n  - {key: a}\n  - {key: a, value: \"\"}\n"),
            "descriptors[1]: repeats",
        );
    }

    #[test]
    fn unlimited_with_a_unit_and_bad_replaces_are_refused() {
        let p = problems(
            "domain: d\ndescriptors:\n  - key: a\n    rate_limit: {unlimited: true, unit: second}\n",
        );
        has(
            &p,
            "descriptors[0].rate_limit.unit: must not be set when unlimited is true",
        );
        let p = problems(
            "domain: d\ndescriptors:\n  - key: a\n    rate_limit: {unit: second, requests_per_unit: 1, name: me, replaces: [{name: me}, {name: \"\"}, {}]}\n",
        );
        has(
            &p,
            "rate_limit.replaces[0].name: names this rate_limit itself (\"me\")",
        );
        has(&p, "rate_limit.replaces[1].name: must not be empty");
        has(&p, "rate_limit.replaces[2].name: must not be empty");
        has(
            &problems(
                "domain: d\ndescriptors:\n  - key: a\n    value: x\n    share_threshold: true\n",
            ),
            "descriptors[0].share_threshold: can only be used with a wildcard value",
        );
    }

    #[test]
    fn every_upstream_field_loads_and_differences_are_noted() {
        let d = parse(
            "domain: d\ndescriptors:\n  - key: ip\n    value: 10.0.0.1\n    rate_limit: {unit: second, requests_per_unit: 0}\n  - key: f\n    value: files/*\n    share_threshold: true\n    quota_mode: true\n    detailed_metric: true\n    value_to_metric: true\n    metadata: {team: a}\n    rate_limit: {unit: hour}\n  - key: ldap\n    rate_limit: {unlimited: true, requests_per_unit: 5, name: free, replaces: [{name: ghost}]}\n",
            "f.yaml",
        )
        .unwrap();
        let [ip, files, ldap] = &d.descriptors[..] else {
            panic!("{d:?}")
        };
        assert_eq!(ip.rate_limit.as_ref().unwrap().requests_per_unit, 0);
        assert_eq!(files.value, EnvoyValue::Pattern("files/*".into()));
        assert!(
            files.share_threshold && files.quota && files.detailed_metric && files.value_to_metric
        );
        assert_eq!(files.metadata.as_ref().unwrap()[0].0, "team");
        assert_eq!(
            files.rate_limit.as_ref().unwrap().requests_per_unit,
            0,
            "absent is 0"
        );
        let free = ldap.rate_limit.as_ref().unwrap();
        assert!(free.unlimited && free.named && free.replaces == ["ghost"]);
        let notes = d.notes.join("\n");
        for n in [
            "descriptors[1].detailed_metric: no per-value metric",
            "descriptors[1].value_to_metric: no per-value metric",
            "descriptors[1].quota_mode:",
            "descriptors[1].rate_limit.requests_per_unit: absent, so 0",
            "descriptors[2].rate_limit.requests_per_unit: ignored",
            "descriptors[2].rate_limit.replaces[0].name: names no rate_limit of this file (\"ghost\")",
        ] {
            assert!(notes.contains(n), "{n} not in\n{notes}");
        }
    }

    #[test]
    fn units_become_lengths_and_names_default_to_the_path() {
        let domain = parse(
            "domain: d\ndescriptors:\n  - key: user\n    value: vip*\n    rate_limit: {unit: MINUTE, requests_per_unit: 60}\n    descriptors:\n      - key: path\n        rate_limit: {unit: day, requests_per_unit: 5, name: daily}\n",
            "f.yaml",
        )
        .unwrap();
        let user = &domain.descriptors[0];
        assert_eq!(user.value, EnvoyValue::Pattern("vip*".into()));
        let minute = user.rate_limit.as_ref().unwrap();
        assert_eq!(minute.name, "user_vip*");
        assert!(!minute.named);
        assert_eq!(minute.requests_per_unit, 60);
        assert_eq!(minute.unit, Duration::from_secs(60));
        let daily = user.children[0].rate_limit.as_ref().unwrap();
        assert_eq!(daily.name, "daily");
        assert_eq!(daily.unit, Duration::from_secs(86_400));
    }
}
