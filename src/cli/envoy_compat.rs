//! `tollgate check-config --envoy-compat DIR`: reads an envoyproxy/ratelimit
//! config directory and reports, per file, whether Tollgate loads it, and
//! every field whose meaning here differs from upstream's, and how.
//!
//! `DIR` is the directory of YAML files (`RUNTIME_ROOT/RUNTIME_SUBDIRECTORY/
//! RUNTIME_APPDIRECTORY`), or a runtime root whose `<subdirectory>/config/`
//! directories hold them. Nothing is served and nothing is written.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use tollgate::config::envoy;

/// What differs for every file, whatever its fields: the service's own
/// semantics. Each line is one difference.
const EVERYWHERE: [&str; 3] = [
    "rate_limit: a token bucket of capacity requests_per_unit that refills \
     smoothly over the unit, not a fixed window: no burst of twice the limit \
     at a window's edge, and tokens come back one at a time",
    "a request's descriptors are checked and charged all or nothing: a \
     denied request takes nothing from any descriptor (upstream still counts \
     the others' hits)",
    "requests_per_unit: at most 50,000,000 (upstream: 4,294,967,295)",
];

/// Runs the report; fails when any file is refused.
pub(crate) fn check_envoy_compat(dir: &Path) -> ExitCode {
    let (report, refused) = report(dir);
    print!("{report}");
    if refused {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// The report for `dir`, and whether anything was refused.
pub(crate) fn report(dir: &Path) -> (String, bool) {
    let mut out = String::new();
    let dirs = config_dirs(dir);
    if dirs.is_empty() {
        let _ = writeln!(out, "{}: no configuration files found", dir.display());
        return (out, true);
    }
    let mut refused = false;
    // The first file of each domain: two files of one domain are refused
    // here, as upstream does without MERGE_DOMAIN_CONFIG.
    let mut domains: HashMap<String, PathBuf> = HashMap::new();
    let (mut loaded, mut failed) = (0, 0);
    let all: Vec<PathBuf> = dirs.iter().flat_map(|d| files(d, &mut out)).collect();
    for file in all {
        let name = file.display().to_string();
        let text = match std::fs::read_to_string(&file) {
            Ok(text) => text,
            Err(e) => {
                let _ = writeln!(out, "{name}: refused\n  cannot read: {e}");
                (refused, failed) = (true, failed + 1);
                continue;
            }
        };
        match envoy::parse(&text, &name) {
            Ok(d) => match domains.get(&d.name) {
                Some(first) => {
                    let _ = writeln!(
                        out,
                        "{name}: refused\n  domain {:?} is already defined in {} \
                         (upstream refuses it too, unless MERGE_DOMAIN_CONFIG; \
                         Tollgate's envoy_merge_domains merges them)",
                        d.name,
                        first.display()
                    );
                    (refused, failed) = (true, failed + 1);
                }
                None => {
                    loaded += 1;
                    describe(&mut out, &name, &d);
                    domains.insert(d.name.clone(), file.clone());
                }
            },
            Err(e) => {
                let _ = writeln!(out, "{name}: refused");
                for p in &e.problems {
                    let _ = writeln!(out, "  {p}");
                }
                (refused, failed) = (true, failed + 1);
            }
        }
    }
    let _ = writeln!(out, "differs in every file:");
    for line in EVERYWHERE {
        let _ = writeln!(out, "  {line}");
    }
    let _ = writeln!(out, "{loaded} loaded, {failed} refused");
    (out, refused)
}

fn describe(out: &mut String, name: &str, d: &envoy::EnvoyDomain) {
    let _ = writeln!(out, "{name}: loaded, domain {:?}", d.name);
    for note in &d.notes {
        let _ = writeln!(out, "  differs: {note}");
    }
}

/// `dir` itself when it holds files, else its `<subdirectory>/config/`
/// directories (a runtime root), in name order.
fn config_dirs(dir: &Path) -> Vec<PathBuf> {
    let entries = sorted(dir);
    if entries.iter().any(|p| p.is_file()) {
        return vec![dir.to_owned()];
    }
    entries
        .into_iter()
        .map(|sub| sub.join("config"))
        .filter(|c| c.is_dir())
        .collect()
}

/// The files of `dir` Tollgate reads (`.yaml`, `.yml`), noting in `out`
/// those upstream would read and Tollgate does not.
fn files(dir: &Path, out: &mut String) -> Vec<PathBuf> {
    let mut yaml = Vec::new();
    for p in sorted(dir) {
        let is_yaml = p
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("yaml") || e.eq_ignore_ascii_case("yml"));
        if p.is_file() && is_yaml {
            yaml.push(p);
        } else {
            let _ = writeln!(
                out,
                "{}: skipped: Tollgate reads only the .yaml and .yml files of a \
                 directory, not its subdirectories; upstream reads every file",
                p.display()
            );
        }
    }
    yaml
}

fn sorted(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    out.sort();
    out
}
