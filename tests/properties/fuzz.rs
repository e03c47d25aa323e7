//! Fuzz-style tests on stable Rust: proptest drives the loaders and the
//! validators with random and mutated input, from the seed corpus in
//! `tests/corpus/`. Bounded: a fixed number of cases per target (a few
//! seconds in all in CI). Nothing may panic, and every error names a field
//! (or, for text that is not YAML at all, says where it stopped parsing).
//!
//! Longer runs: `PROPTEST_CASES=100000 cargo test --test properties fuzz`.

use proptest::prelude::*;
use tollgate::api::validate;
use tollgate::bucket::Shape;
use tollgate::config::{Config, HashTag, envoy};
use tollgate::limiter::Rules;
use tollgate::store::redis::keys::bucket_key;
use tollgate::store::{BucketCharge, BucketKey, check_settings};

/// `PROPTEST_CASES` when set (a longer run), else the CI default.
fn cases(ci: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(ci)
}

/// Every `.yaml` file under `tests/corpus/<dir>`, subdirectories included
/// (the envoy corpus keeps upstream's runtime layout and refused files).
fn corpus(dir: &str) -> Vec<String> {
    fn walk(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("corpus") {
            let p = entry.expect("entry").path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|e| e == "yaml") {
                out.push(p);
            }
        }
    }
    let mut files = Vec::new();
    walk(
        std::path::Path::new(&format!("tests/corpus/{dir}")),
        &mut files,
    );
    files.sort();
    files
        .iter()
        .map(|p| std::fs::read_to_string(p).expect("seed"))
        .collect()
}

/// Pieces of YAML and of our keys, so mutations reach past the parser.
const TOKENS: &[&str] = &[
    "\n",
    ": ",
    "  ",
    "- ",
    "{",
    "}",
    "[",
    "]",
    ",",
    "*",
    "&a ",
    "*a",
    "!!binary ",
    "\"",
    "'",
    "#",
    "0",
    "-1",
    "99999999999999999999",
    "1e400",
    ".nan",
    "~",
    "null",
    "true",
    "0s",
    "366d",
    "1ms",
    "1.5s",
    "9999999h",
    "capacity: ",
    "refill_period: ",
    "per: ",
    "scopes:\n",
    "store:\n",
    "kind: redis\n",
    "mode: cluster\n",
    "urls: [",
    "descriptors:\n",
    "rate_limit: ",
    "unit: ",
    "requests_per_unit: ",
    "key: ",
    "value: ",
    "name: ",
    "\u{202e}",
    "\u{0}",
    "é",
    "max_bytes: ",
    "1GiB",
    "key_prefix: ",
    "replaces: [{name: ",
    "unlimited: true",
    "<<: *a\n",
];

#[derive(Debug, Clone)]
enum Edit {
    Delete(usize, usize),
    Insert(usize, usize),
    Byte(usize, u8),
    Duplicate(usize, usize),
}

fn edits() -> impl Strategy<Value = Vec<Edit>> {
    let edit = prop_oneof![
        (any::<usize>(), 1usize..40).prop_map(|(a, n)| Edit::Delete(a, n)),
        (any::<usize>(), 0..TOKENS.len()).prop_map(|(a, t)| Edit::Insert(a, t)),
        (any::<usize>(), any::<u8>()).prop_map(|(a, b)| Edit::Byte(a, b)),
        (any::<usize>(), 1usize..80).prop_map(|(a, n)| Edit::Duplicate(a, n)),
    ];
    prop::collection::vec(edit, 0..8)
}

fn mutate(seed: &str, edits: &[Edit]) -> String {
    let mut b = seed.as_bytes().to_vec();
    for e in edits {
        let at = |a: usize, len: usize| if len == 0 { 0 } else { a % (len + 1) };
        match *e {
            Edit::Delete(a, n) => {
                let s = at(a, b.len());
                let end = (s + n).min(b.len());
                b.drain(s..end);
            }
            Edit::Insert(a, t) => {
                let s = at(a, b.len());
                b.splice(s..s, TOKENS[t].bytes());
            }
            Edit::Byte(a, v) if !b.is_empty() => {
                let s = a % b.len();
                b[s] = v;
            }
            Edit::Byte(..) => {}
            Edit::Duplicate(a, n) => {
                let s = at(a, b.len());
                let end = (s + n).min(b.len());
                let copy = b[s..end].to_vec();
                b.splice(s..s, copy);
            }
        }
    }
    String::from_utf8_lossy(&b).into_owned()
}

/// A problem names where it is: `field.path: what` (or a location in the
/// text, for YAML that does not parse).
fn names_a_place(problem: &str) -> bool {
    match problem.split_once(": ") {
        Some((place, what)) => !place.trim().is_empty() && !what.trim().is_empty(),
        None => false,
    }
}

fn config_text() -> impl Strategy<Value = String> {
    let seeds = corpus("config");
    prop_oneof![
        3 => (0..seeds.len(), edits()).prop_map(move |(i, e)| mutate(&seeds[i], &e)),
        1 => ".{0,200}",
    ]
}

fn envoy_text() -> impl Strategy<Value = String> {
    let seeds = corpus("envoy");
    prop_oneof![
        3 => (0..seeds.len(), edits()).prop_map(move |(i, e)| mutate(&seeds[i], &e)),
        1 => ".{0,200}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(300), failure_persistence: None, ..ProptestConfig::default() })]

    /// The config loader, then the rule compiler and the store's own checks
    /// on whatever it accepts: no panic, and every problem names its place.
    #[test]
    fn the_config_loader_never_panics_and_names_every_problem(text in config_text()) {
        match Config::from_yaml(&text) {
            Ok(config) => {
                let _ = check_settings(&config.store);
                if let Err(e) = Rules::compile(&config) {
                    for p in &e.problems {
                        prop_assert!(names_a_place(p), "{p:?}");
                    }
                }
            }
            Err(e) => {
                prop_assert!(!e.problems.is_empty());
                for p in &e.problems {
                    prop_assert!(names_a_place(p), "{p:?} for {text:?}");
                }
            }
        }
    }

    /// The envoyproxy/ratelimit YAML loader: no panic, and every problem
    /// starts with the file it came from.
    #[test]
    fn the_envoy_loader_never_panics_and_names_the_file(text in envoy_text()) {
        if let Err(e) = envoy::parse(&text, "limits/fuzz.yaml") {
            for p in &e.problems {
                prop_assert!(p.starts_with("limits/fuzz.yaml"), "{p:?}");
                prop_assert!(names_a_place(p), "{p:?}");
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(2_000), failure_persistence: None, ..ProptestConfig::default() })]

    /// Request validation: what passes is within bounds and printable; what
    /// fails names the field it was given.
    #[test]
    fn validation_bounds_what_it_accepts_and_names_what_it_refuses(
        value in prop_oneof![".{0,300}", "\\PC{0,300}", any::<String>()],
        max in 0usize..300,
        required in any::<bool>(),
    ) {
        match validate::text("descriptors[3].entries[1].value", &value, max, required) {
            Ok(()) => {
                prop_assert!(value.len() <= max);
                prop_assert!(!required || !value.is_empty());
                prop_assert!(!value.chars().any(char::is_control));
                let invisible = ['\u{202e}', '\u{200b}', '\u{2028}'];
                prop_assert!(!value.contains(invisible), "{:?}", value);
            }
            Err(e) => prop_assert_eq!(e.field, "descriptors[3].entries[1].value"),
        }
    }

    /// Key building: bounded, one hash tag (the scope's, with the parts its
    /// `hash_tag` names), and two different buckets never share a key,
    /// whatever tag each was keyed under.
    #[test]
    fn keys_are_bounded_tagged_once_and_injective(
        a in parts(), b in parts(),
    ) {
        let (ka, kb) = (bucket_key("tg2:", &a.charge()), bucket_key("tg2:", &b.charge()));
        for k in [&ka, &kb] {
            let tagged = 2 * (3 * 64 + 1);
            prop_assert!(k.len() <= 5 + 3 * 128 + 3 * 64 + 48 + 2 * 65 + 8 + tagged, "{} bytes", k.len());
            prop_assert_eq!(k.matches('{').count(), 1);
            prop_assert_eq!(k.matches('}').count(), 1);
            prop_assert!(k.is_ascii());
        }
        let bucket = |p: &Parts| (p.scope.clone(), p.rule.clone(), p.identity.clone(), p.operation.clone(), p.capacity);
        if bucket(&a) != bucket(&b) {
            prop_assert_ne!(&ka, &kb);
        } else if a.tag == b.tag {
            prop_assert_eq!(&ka, &kb);
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Parts {
    scope: String,
    rule: String,
    identity: Option<String>,
    operation: Option<String>,
    capacity: u64,
    tag: HashTag,
}

impl Parts {
    fn charge(&self) -> BucketCharge<'_> {
        BucketCharge {
            key: BucketKey {
                scope: &self.scope,
                rule: &self.rule,
                identity: self.identity.as_deref(),
                operation: self.operation.as_deref(),
                hash_tag: self.tag,
            },
            shape: Shape {
                capacity: self.capacity,
                period: 1_000_000_000,
            },
            cost: 1,
            shadow: false,
            reserve: 0,
            window: None,
            max_delay: std::time::Duration::ZERO,
        }
    }
}

fn parts() -> impl Strategy<Value = Parts> {
    // Few distinct short values, so equal parts come up often; long ones
    // exercise hashing.
    // Scopes are validated to 128 bytes: at most 32 four-byte characters.
    let short = prop_oneof!["[a:{}%*#]{0,3}", "\\PC{0,32}"];
    let long = prop_oneof![
        "[a:{}%*#]{0,3}",
        "\\PC{60,70}",
        "[ab]{64,66}",
        "x{0,20}".prop_map(|s| format!("{s}{}", "y".repeat(200))),
    ];
    (
        short.clone(),
        "[a-z:{}]{0,4}",
        prop::option::of(long.clone()),
        prop::option::of(long),
        1u64..3,
        prop_oneof![
            Just(HashTag::Scope),
            Just(HashTag::Identity),
            Just(HashTag::IdentityOperation)
        ],
    )
        .prop_map(|(scope, rule, identity, operation, capacity, tag)| Parts {
            scope,
            rule,
            identity,
            operation,
            capacity,
            tag,
        })
}
