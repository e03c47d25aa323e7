//! The architecture invariants written in `src/lib.rs`, checked against the
//! source itself, so that the map stays true as the code moves.

use std::path::{Path, PathBuf};

/// Every `.rs` file under `src/<dir>`, with its text.
fn sources(dir: &str) -> Vec<(PathBuf, String)> {
    fn walk(dir: &Path, out: &mut Vec<(PathBuf, String)>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.expect("dir entry").path())
            .collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&p).expect("read source");
                out.push((p, text));
            }
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src").join(dir);
    let mut out = Vec::new();
    if root.is_file() {
        let text = std::fs::read_to_string(&root).expect("read source");
        out.push((root, text));
    } else {
        walk(&root, &mut out);
    }
    assert!(!out.is_empty(), "no sources under src/{dir}");
    out
}

/// The code of a file without its comments, line by line (1-based), so a
/// doc comment that names a forbidden path is not a violation.
fn code_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines().enumerate().filter_map(|(i, line)| {
        let code = line.split("//").next().unwrap_or_default();
        (!code.trim().is_empty()).then_some((i + 1, code))
    })
}

/// Every `(file:line, needle)` where the code of a file under `dirs` names
/// one of `needles`. Unit tests (after `#[cfg(test)]`) may wire real parts
/// together, so they are not read.
fn violations(dirs: &[&str], needles: &[&str]) -> Vec<String> {
    let mut found = Vec::new();
    for dir in dirs {
        for (path, text) in sources(dir) {
            let text = text.split("#[cfg(test)]").next().unwrap_or_default();
            for (n, code) in code_lines(text) {
                for needle in needles {
                    if code.contains(needle) {
                        found.push(format!("{}:{n}: {needle}", path.display()));
                    }
                }
            }
        }
    }
    found
}

#[test]
fn the_bucket_math_is_a_leaf() {
    let found = violations(&["bucket.rs"], &["crate::", "f32", "f64"]);
    assert!(
        found.is_empty(),
        "bucket.rs must import nothing and use no floats: {found:#?}"
    );
}

#[test]
fn the_window_math_is_a_leaf() {
    let found = violations(&["window.rs"], &["crate::"]);
    assert!(
        found.is_empty(),
        "window.rs must import nothing: {found:#?}"
    );
}

#[test]
fn config_imports_nothing_from_the_rest_of_the_crate() {
    let found: Vec<String> = violations(&["config"], &["crate::"])
        .into_iter()
        .filter(|v| !v.ends_with("crate::config"))
        .collect();
    // `super::` stays inside config/; `crate::` would leave it.
    assert!(found.is_empty(), "config must be plain data: {found:#?}");
}

#[test]
fn only_api_knows_proto_types() {
    let found = violations(
        &["limiter", "store", "config", "observe", "bucket.rs"],
        &["pb::", "tonic::", "prost", "envoy_types"],
    );
    assert!(found.is_empty(), "proto types outside api: {found:#?}");
}

#[test]
fn only_the_redis_store_knows_redis() {
    let mut found = Vec::new();
    for dir in [
        "limiter",
        "config",
        "observe",
        "api",
        "bucket.rs",
        "server.rs",
        "shutdown.rs",
        "error.rs",
        "lib.rs",
    ] {
        found.extend(violations(&[dir], &["redis::", "deadpool_redis"]));
    }
    for (path, text) in sources("store") {
        if path.components().any(|c| c.as_os_str() == "redis") {
            continue;
        }
        for (n, code) in code_lines(&text) {
            // The store's own module tree names its `redis` child; that is
            // `redis::RedisStore` through `self`, not the client library.
            if code.contains("deadpool_redis") || code.contains("::redis::") {
                found.push(format!("{}:{n}", path.display()));
            }
        }
    }
    assert!(found.is_empty(), "Redis outside store/redis: {found:#?}");
}

#[test]
fn layers_point_one_way() {
    // Each layer, and the layers it must never import.
    let rules: &[(&str, &[&str])] = &[
        (
            "store",
            &[
                "crate::limiter",
                "crate::observe",
                "crate::api",
                "crate::server",
                "crate::shutdown",
                "crate::net",
            ],
        ),
        (
            "limiter",
            &[
                "crate::observe",
                "crate::api",
                "crate::server",
                "crate::shutdown",
                "crate::store::redis",
                "crate::store::memory",
            ],
        ),
        (
            "observe",
            &[
                "crate::api",
                "crate::server",
                "crate::shutdown",
                "crate::net",
            ],
        ),
        (
            "api",
            &[
                "crate::server",
                "crate::shutdown",
                "crate::store::redis",
                "crate::store::memory",
            ],
        ),
        ("net", &["crate::server", "crate::shutdown", "crate::api"]),
    ];
    let mut found = Vec::new();
    for (layer, forbidden) in rules {
        found.extend(violations(&[layer], forbidden));
    }
    assert!(found.is_empty(), "imports against the layering: {found:#?}");
}

#[test]
fn the_limiter_does_no_io_of_its_own() {
    let found = violations(
        &["limiter"],
        &[
            "std::fs",
            "std::net",
            "tokio::net",
            "tokio::fs",
            "tokio::time::sleep",
            "std::io",
        ],
    );
    assert!(found.is_empty(), "I/O in the limiter: {found:#?}");
    // The planner and rules are synchronous: the only await is on the store.
    for file in [
        "limiter/plan.rs",
        "limiter/rules.rs",
        "limiter/compile.rs",
        "limiter/limit.rs",
        "limiter/descriptors.rs",
    ] {
        let found = violations(&[file], &[".await", "async "]);
        assert!(found.is_empty(), "{file} must be synchronous: {found:#?}");
    }
}

/// The length of every `fn` in `text`, by brace counting from its
/// signature to its closing brace, with the line it starts on and whether a
/// comment right above says why it may be long.
fn function_lengths(text: &str) -> Vec<(usize, usize, bool)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let code = lines[i].split("//").next().unwrap_or_default();
        let is_fn = code.trim_start().starts_with("fn ")
            || code.contains(" fn ")
                && !code.contains("Fn(")
                && !code.trim_start().starts_with("type ");
        if !is_fn || code.trim_end().ends_with(';') {
            i += 1;
            continue;
        }
        let excused = i > 0
            && lines[..i]
                .iter()
                .rev()
                .take_while(|l| {
                    let t = l.trim_start();
                    t.starts_with("//") || t.starts_with("#[")
                })
                .any(|l| l.contains("long because"));
        let (mut depth, mut opened, start) = (0i64, false, i);
        while i < lines.len() {
            let code = lines[i].split("//").next().unwrap_or_default();
            for c in code.chars() {
                match c {
                    '{' => {
                        depth += 1;
                        opened = true;
                    }
                    '}' => depth -= 1,
                    _ => {}
                }
            }
            i += 1;
            if opened && depth <= 0 {
                break;
            }
            if !opened && code.trim_end().ends_with(';') {
                break;
            }
        }
        out.push((start + 1, i - start, excused));
    }
    out
}

#[test]
fn no_function_runs_past_eighty_lines() {
    let mut long = Vec::new();
    for (path, text) in sources("") {
        // Test modules hold table-like test bodies; the rule is for code.
        let code = text.split("#[cfg(test)]").next().unwrap_or_default();
        for (line, len, excused) in function_lengths(code) {
            if len > 80 && !excused {
                long.push(format!("{}:{line}: {len} lines", path.display()));
            }
        }
    }
    assert!(
        long.is_empty(),
        "functions over 80 lines (say \"long because\" above one that must be): {long:#?}"
    );
}

#[test]
fn the_length_check_counts_a_function_it_is_shown() {
    let text = "fn short() {\n    let a = 1;\n}\n\n// long because a table\nfn long() {\n{\n}\n}\n";
    assert_eq!(function_lengths(text), vec![(1, 3, false), (6, 4, true)]);
}
