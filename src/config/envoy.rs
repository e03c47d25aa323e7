//! envoyproxy/ratelimit YAML (`envoy_ratelimit_configs`), read as plain data.
//!
//! Each file holds one `domain` and its nested `descriptors`. The limiter's
//! compiler turns a domain into a scope beside those of Tollgate's own config,
//! and every `rate_limit` into a token bucket with capacity
//! `requests_per_unit` that refills completely in one `unit`. The YAML is
//! walked by hand so that every problem names its file and exact field path,
//! and any field we do not implement is refused rather than ignored.

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

/// Fields we know of but do not implement: naming them beats "unknown field".
const UNSUPPORTED: [(&str, &str); 3] = [
    ("quota_mode", "is not supported"),
    (
        "value_to_metric",
        "is not supported: metrics never carry descriptor values",
    ),
    ("share_threshold", "is not supported"),
];

/// One file: a domain and its descriptor rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvoyDomain {
    /// The domain, which becomes a scope of this name.
    pub name: String,
    /// The file it came from, for messages that name it.
    pub origin: String,
    /// The descriptors that match a descriptor's first entry.
    pub descriptors: Vec<EnvoyDescriptor>,
}

/// One `descriptors` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvoyDescriptor {
    /// The entry key it matches.
    pub key: String,
    /// The entry values it matches.
    pub value: EnvoyValue,
    /// The limit of a descriptor that ends here; `None` for no limit (absent
    /// or `unlimited: true`).
    pub rate_limit: Option<EnvoyRateLimit>,
    /// `shadow_mode`: judged and counted, never denies.
    pub shadow: bool,
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
    /// Values that start with this (a `value` ending in `*`).
    Prefix(String),
}

/// A `rate_limit`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvoyRateLimit {
    /// Its `name`, or the path of keys and values that leads to it.
    pub name: String,
    /// `requests_per_unit`: the bucket's capacity.
    pub requests_per_unit: u64,
    /// `unit`, as a length: the bucket's refill period.
    pub unit: Duration,
    /// The rule names of this file that it stands in for.
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

/// Collects problems while walking one file.
struct Walk<'a> {
    origin: &'a str,
    problems: Vec<String>,
    /// Every rule name in the file.
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
            let here = join(at, k);
            if let Some((_, why)) = UNSUPPORTED.iter().find(|(f, _)| f == k) {
                self.problem(&here, why);
            } else if !known.contains(&k.as_str()) {
                self.problem(
                    &here,
                    format!("unknown field (known: {})", known.join(", ")),
                );
            } else {
                out.insert(k.as_str(), v);
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
                self.problem(&at, format!("names no rate_limit of this file: {name:?}"));
            }
        }
        Some(EnvoyDomain {
            name: domain?,
            origin: self.origin.to_owned(),
            descriptors: roots,
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
        let f = self.fields(
            at,
            node,
            &[
                "key",
                "value",
                "rate_limit",
                "descriptors",
                "shadow_mode",
                "detailed_metric",
            ],
        )?;
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
        let value = match f.get("value") {
            None | Some(Yaml::Null) => Some(EnvoyValue::Any),
            Some(v) => self.string(&join(at, "value"), v).map(|v| {
                // Only a trailing `*` is a wildcard, as in envoyproxy/ratelimit.
                match v.strip_suffix('*') {
                    Some(prefix) => EnvoyValue::Prefix(prefix.to_owned()),
                    None => EnvoyValue::Exact(v),
                }
            }),
        };
        let shadow = self.flag(&join(at, "shadow_mode"), f.get("shadow_mode"));
        // Accepted for compatibility; it changes only envoyproxy's stat names.
        self.flag(&join(at, "detailed_metric"), f.get("detailed_metric"));
        let (key, value) = (key?, value?);
        let mut here = path.to_vec();
        here.push(match &value {
            EnvoyValue::Any => key.clone(),
            EnvoyValue::Exact(v) => format!("{key}_{v}"),
            EnvoyValue::Prefix(p) => format!("{key}_{p}*"),
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
            children,
        })
    }

    fn rate_limit(&mut self, at: &str, node: &Yaml, path: &[String]) -> Option<EnvoyRateLimit> {
        let f = self.fields(
            at,
            node,
            &["unit", "requests_per_unit", "name", "unlimited", "replaces"],
        )?;
        let name = match f.get("name") {
            Some(n) => self.string(&join(at, "name"), n),
            None => Some(path.join(".")),
        };
        if let Some(n) = &name {
            self.name(&join(at, "name"), n);
        }
        if self.flag(&join(at, "unlimited"), f.get("unlimited")) {
            for field in ["unit", "requests_per_unit"] {
                if f.contains_key(field) {
                    self.problem(&join(at, field), "must not be set when unlimited is true");
                }
            }
            return None;
        }
        let period = match f.get("unit") {
            None => {
                self.problem(&join(at, "unit"), "is required");
                None
            }
            Some(u) => self.string(&join(at, "unit"), u).and_then(|u| {
                let found = UNITS.iter().find(|(n, _)| n.eq_ignore_ascii_case(&u));
                if found.is_none() {
                    let names: Vec<&str> = UNITS.iter().map(|(n, _)| *n).collect();
                    self.problem(
                        &join(at, "unit"),
                        format!("unknown unit {u:?} (one of {})", names.join(", ")),
                    );
                }
                found.map(|(_, d)| *d)
            }),
        };
        let capacity = match f.get("requests_per_unit") {
            None => {
                self.problem(&join(at, "requests_per_unit"), "is required");
                None
            }
            Some(Yaml::Integer(n)) if *n > 0 && n.unsigned_abs() <= MAX_CAPACITY => {
                Some(n.unsigned_abs())
            }
            Some(_) => {
                self.problem(
                    &join(at, "requests_per_unit"),
                    format!("must be a whole number from 1 to {MAX_CAPACITY}"),
                );
                None
            }
        };
        let replaces = self.replaces(&join(at, "replaces"), f.get("replaces").copied());
        let (name, unit, requests_per_unit) = (name?, period?, capacity?);
        self.names.push(name.clone());
        Some(EnvoyRateLimit {
            name,
            requests_per_unit,
            unit,
            replaces,
        })
    }

    /// `replaces: [{name: ...}, ...]`: the rule names this one stands in for.
    fn replaces(&mut self, at: &str, node: Option<&Yaml>) -> Vec<String> {
        let list = self.list(at, node);
        let mut out = Vec::new();
        for (i, item) in list.iter().enumerate() {
            let here = format!("{at}[{i}]");
            let Some(f) = self.fields(&here, item, &["name"]) else {
                continue;
            };
            let name = match f.get("name") {
                Some(n) => self.string(&join(&here, "name"), n),
                None => {
                    self.problem(&join(&here, "name"), "is required");
                    None
                }
            };
            if let Some(n) = name {
                self.references.push((join(&here, "name"), n.clone()));
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

    #[test]
    fn unsupported_and_unknown_fields_are_named_with_their_path() {
        let p = problems(
            "domain: d\ndescriptors:\n  - key: a\n    descriptors:\n      - key: b\n        rate_limit: {unit: second, requests_per_unit: 1, quota_mode: true}\n        colour: red\n",
        );
        assert!(
            p.iter().any(|p| p.starts_with(
                "f.yaml: descriptors[0].descriptors[0].rate_limit.quota_mode: is not supported"
            )),
            "{p:?}"
        );
        assert!(
            p.iter()
                .any(|p| p
                    .starts_with("f.yaml: descriptors[0].descriptors[0].colour: unknown field")),
            "{p:?}"
        );
    }

    #[test]
    fn bad_units_and_counts_are_refused() {
        let p = problems(
            "domain: d\ndescriptors:\n  - key: a\n    rate_limit: {unit: fortnight, requests_per_unit: 0}\n",
        );
        assert!(
            p.iter()
                .any(|p| p.contains("descriptors[0].rate_limit.unit: unknown unit \"fortnight\"")),
            "{p:?}"
        );
        assert!(
            p.iter()
                .any(|p| p.contains("descriptors[0].rate_limit.requests_per_unit: must be")),
            "{p:?}"
        );
        assert_eq!(
            problems("descriptors: []\n"),
            vec!["f.yaml: domain: is required"]
        );
    }

    #[test]
    fn units_become_lengths_and_names_default_to_the_path() {
        let domain = parse(
            "domain: d\ndescriptors:\n  - key: user\n    value: vip*\n    rate_limit: {unit: MINUTE, requests_per_unit: 60}\n    descriptors:\n      - key: path\n        rate_limit: {unit: day, requests_per_unit: 5, name: daily}\n",
            "f.yaml",
        )
        .unwrap();
        let user = &domain.descriptors[0];
        assert_eq!(user.value, EnvoyValue::Prefix("vip".into()));
        let minute = user.rate_limit.as_ref().unwrap();
        assert_eq!(minute.name, "user_vip*");
        assert_eq!(minute.requests_per_unit, 60);
        assert_eq!(minute.unit, Duration::from_secs(60));
        let daily = user.children[0].rate_limit.as_ref().unwrap();
        assert_eq!(daily.name, "daily");
        assert_eq!(daily.unit, Duration::from_secs(86_400));
    }
}
