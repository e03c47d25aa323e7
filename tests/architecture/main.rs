//! The architecture invariants of `ARCHITECTURE.md`, checked against the
//! source itself so that the map stays true as the code moves.
//!
//! Every `.rs` file under `src/` is parsed with `syn` and placed in the
//! module tree by following `mod` items from `src/lib.rs` (the library,
//! `tollgate::…`) and `src/main.rs` (the binary, `bin::…`). Every `use` tree
//! and every path of two or more segments (in code, types, attributes and
//! macro bodies) is resolved to an absolute path: `crate::`, `super::`,
//! `self::`, the file's own items and imports, and glob imports are followed,
//! and anything else is taken as an outside crate. The rules below are then
//! read against those paths. `ARCHITECTURE.md` shows the same tables; a test
//! keeps its copy equal to what [`render_tables`] prints.
//!
//! This is its own test target, not a module of `tests/it`: it reads files
//! and never links `tollgate`, so it builds in seconds against `syn` alone,
//! and editing it does not rebuild the integration-test binary.
//!
//! - this file: the rule tables, the checks, and the tests on the real tree;
//! - [`parse`]: files → module tree → the facts the checks read;
//! - [`planted`]: self-tests, which plant a violation of each rule and
//!   assert that it is reported, so the test can fail.

mod parse;
mod planted;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::Path;

use parse::Tree;

// ---------------------------------------------------------------------------
// The rules. ARCHITECTURE.md shows these tables (see `render_tables`).
// ---------------------------------------------------------------------------

/// A room of the house: the module path its files live under, and its
/// layer. A room may name only itself and rooms of a lower layer.
struct Room {
    name: &'static str,
    /// `tollgate::…` for the library, `bin::…` for the binary. A crate root
    /// (`tollgate`, `bin`) holds only its own file; every other room holds
    /// its module and everything under it, so a new file falls under its
    /// room's rule without a new row.
    module: &'static str,
    layer: u8,
}

const ROOMS: &[Room] = &[
    room("bucket", "tollgate::bucket", 0),
    room("window", "tollgate::window", 0),
    room("config", "tollgate::config", 0),
    room("pb", "tollgate::pb", 0),
    room("store", "tollgate::store", 1),
    room("limiter", "tollgate::limiter", 2),
    room("observe", "tollgate::observe", 3),
    room("error", "tollgate::error", 3),
    room("net", "tollgate::net", 4),
    room("api", "tollgate::api", 5),
    room("shutdown", "tollgate::shutdown", 6),
    room("reload", "tollgate::reload", 7),
    room("watch", "tollgate::watch", 7),
    room("server", "tollgate::server", 8),
    room("lib.rs", "tollgate", 9),
    room("cli", "bin::cli", 10),
    room("main.rs", "bin", 11),
];

const fn room(name: &'static str, module: &'static str, layer: u8) -> Room {
    Room {
        name,
        module,
        layer,
    }
}

/// Modules the table names that PLAN.md says will arrive or leave as the
/// branches of issue 18 merge. Only these may match no file; any other row
/// that matches nothing is stale, and [`check_table`] says so.
const PLANNED: &[(&str, &str)] = &[];

/// A path that a room names against the layers, known and kept in sight:
/// why it is there, and what would remove it. An edge no file uses any more
/// is stale, and [`check_table`] says so.
struct Upward {
    from: &'static str,
    to: &'static str,
    why: &'static str,
}

const UPWARD: &[Upward] = &[];

/// An invariant that no layer order can say: the files under `within`
/// (but not under `except_within`) never name a path under `never` (unless
/// it is under `but`). A name is a path prefix (`tokio::net` covers
/// `tokio::net::TcpStream`); `*::now` is any path that ends in `now`.
struct Ban {
    invariant: &'static str,
    within: &'static [&'static str],
    except_within: &'static [&'static str],
    never: &'static [&'static str],
    but: &'static [&'static str],
}

/// The outside crates and the module that carry protobuf and gRPC types.
const PROTO: &[&str] = &[
    "tollgate::pb",
    "tonic",
    "tonic_health",
    "tonic_reflection",
    "tonic_prost",
    "prost",
    "prost_types",
    "envoy_types",
];

/// Everything that reaches the outside world or a clock. (`std::env` has a
/// row of its own, for the whole library.)
const IO: &[&str] = &[
    "tokio",
    "std::fs",
    "std::net",
    "std::io",
    "std::thread",
    "std::process",
    "std::time::Instant",
    "std::time::SystemTime",
    "*::now",
];

const BANS: &[Ban] = &[
    Ban {
        invariant: "The core speaks no proto",
        within: &[
            "tollgate::bucket",
            "tollgate::window",
            "tollgate::config",
            "tollgate::store",
            "tollgate::limiter",
            "tollgate::observe",
        ],
        except_within: &[],
        never: PROTO,
        but: &[],
    },
    Ban {
        invariant: "main speaks no proto; the cli does",
        within: &["bin"],
        except_within: &["bin::cli"],
        never: PROTO,
        but: &[],
    },
    Ban {
        invariant: "Only the Redis store knows Redis",
        within: &["tollgate", "bin"],
        except_within: &["tollgate::store::redis"],
        never: &["redis", "deadpool_redis"],
        but: &[],
    },
    Ban {
        invariant: "The math and the limiter do no I/O",
        within: &["tollgate::bucket", "tollgate::window", "tollgate::limiter"],
        except_within: &[],
        never: IO,
        but: &[],
    },
    Ban {
        invariant: "The library's errors are typed",
        within: &["tollgate"],
        except_within: &[],
        never: &["anyhow"],
        but: &[],
    },
    Ban {
        invariant: "The library reads no environment",
        within: &["tollgate"],
        except_within: &[],
        never: &["std::env"],
        but: &[],
    },
    Ban {
        invariant: "Store implementations stay behind the trait",
        within: &["tollgate", "bin"],
        except_within: &["tollgate::store", "tollgate::server"],
        never: &[
            "tollgate::store::memory",
            "tollgate::store::redis",
            "tollgate::store::deny_cache",
            "tollgate::store::ban_cache",
        ],
        but: &[],
    },
    Ban {
        invariant: "The cli is a gRPC client",
        within: &["bin::cli"],
        except_within: &[],
        never: &["tollgate"],
        but: &[
            "tollgate::pb",
            "tollgate::config",
            "tollgate::limiter::Rules",
            "tollgate::reload::Prepared",
        ],
    },
    Ban {
        invariant: "The cli never serves",
        within: &["bin::cli"],
        except_within: &[],
        never: &[
            "tokio::net",
            "std::net::TcpListener",
            "std::net::TcpStream",
            "std::net::UdpSocket",
            "tonic::transport::Server",
            "tonic::transport::server",
        ],
        but: &[],
    },
];

/// Rooms whose code holds no float: no `f32`/`f64` type, float literal, or
/// name ending in `_f32`/`_f64` (such as `Duration::as_secs_f64`).
const FLOAT_FREE: &[&str] = &[
    "tollgate::bucket",
    "tollgate::window",
    // Fair shares of a limit across RLQS streams: in millitokens, like the
    // bucket math they split.
    "tollgate::limiter::shares",
];

/// The room whose every `.await` must be on a method of a trait declared in
/// `AWAITS_ONLY_ON`, or on one of its own async fns.
const AWAITS_IN: &str = "tollgate::limiter";
const AWAITS_ONLY_ON: &str = "tollgate::store";

/// No function in `src/` runs longer than this, from its `fn` line to its
/// closing brace.
const MAX_FN_LINES: usize = 80;

// ---------------------------------------------------------------------------
// The tests.
// ---------------------------------------------------------------------------

#[test]
fn the_layers_point_one_way() {
    assert_clean(
        &check_layers(&tree()),
        "names a room of its own layer or above",
    );
}

#[test]
fn the_bans_hold() {
    assert_clean(&check_bans(&tree(), BANS), "names what it must not");
}

#[test]
fn the_math_is_float_free() {
    assert_clean(&check_floats(&tree()), "holds a float");
}

#[test]
fn the_limiter_awaits_only_the_store() {
    assert_clean(
        &check_awaits(&tree()),
        "awaits something other than the store",
    );
}

#[test]
fn no_function_runs_past_eighty_lines() {
    assert_clean(&check_lengths(&tree()), "is too long");
}

#[test]
fn every_file_is_in_a_room_and_every_row_of_the_table_matches_the_tree() {
    assert_clean(&check_table(&tree()), "or row is out of place");
}

#[test]
fn every_name_resolves_into_the_crate_or_a_dependency() {
    assert_clean(
        &check_crates(&tree(), &dependencies()),
        "names a crate that is no dependency (the resolver misplaced a name)",
    );
}

#[test]
fn architecture_md_shows_the_tables() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("ARCHITECTURE.md");
    let text = std::fs::read_to_string(&path).expect("read ARCHITECTURE.md");
    let (begin, end) = ("<!-- rules:begin -->\n", "<!-- rules:end -->");
    let start = text
        .find(begin)
        .expect("ARCHITECTURE.md has a rules:begin marker")
        + begin.len();
    let stop = text
        .find(end)
        .expect("ARCHITECTURE.md has a rules:end marker");
    let want = render_tables();
    if text[start..stop] != want {
        if std::env::var_os("UPDATE_ARCHITECTURE").is_some() {
            let updated = format!("{}{want}{}", &text[..start], &text[stop..]);
            std::fs::write(&path, updated).expect("write ARCHITECTURE.md");
            return;
        }
        panic!(
            "ARCHITECTURE.md's tables differ from tests/architecture/main.rs; \
             rerun with UPDATE_ARCHITECTURE=1 to write these:\n{want}"
        );
    }
}

/// Prints which rooms each room names, and which outside crates: the map
/// ARCHITECTURE.md draws. `cargo test --test architecture -- --ignored --nocapture`.
#[test]
#[ignore = "prints the graph; checks nothing"]
fn print_the_room_graph() {
    let tree = tree();
    let mut graph: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    for r in &tree.refs {
        let Some(from) = room_of(&r.module) else {
            continue;
        };
        let to = match target_room(&r.path) {
            Some(to) if to.name == from.name => continue,
            Some(to) => to.name.to_string(),
            None => format!("({})", r.path.split("::").next().unwrap_or_default()),
        };
        graph.entry(from.name).or_default().insert(to);
    }
    for (from, to) in graph {
        println!("{from} -> {}", to.into_iter().collect::<Vec<_>>().join(" "));
    }
}

fn assert_clean(found: &[String], what: &str) {
    assert!(
        found.is_empty(),
        "{} place(s) where a file {what} (see ARCHITECTURE.md):\n{}",
        found.len(),
        found.join("\n")
    );
}

/// The real tree, parsed once per test.
fn tree() -> Tree {
    Tree::parse(&real_sources()).unwrap_or_else(|e| panic!("{e}"))
}

/// Every `.rs` file under `src/`, by its path relative to `src/`.
fn real_sources() -> BTreeMap<String, String> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = BTreeMap::new();
    read_dir(&src, &src, &mut files);
    files
}

fn read_dir(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            read_dir(root, &path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let rel = path.strip_prefix(root).expect("under src");
            let rel = rel.to_string_lossy().replace('\\', "/");
            out.insert(rel, std::fs::read_to_string(&path).expect("read source"));
        }
    }
}

// ---------------------------------------------------------------------------
// The checks.
// ---------------------------------------------------------------------------

fn room_of(module: &str) -> Option<&'static Room> {
    ROOMS
        .iter()
        .filter(|r| {
            if r.module == "tollgate" || r.module == "bin" {
                module == r.module
            } else {
                under(module, r.module)
            }
        })
        .max_by_key(|r| r.module.len())
}

/// Whether the path `path` is `prefix` or lies under it.
fn under(path: &str, prefix: &str) -> bool {
    path == prefix
        || path
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with("::"))
}

/// The room a named path points into, if it points into this crate.
fn target_room(path: &str) -> Option<&'static Room> {
    if !(under(path, "tollgate") || under(path, "bin")) {
        return None;
    }
    ROOMS
        .iter()
        .filter(|r| under(path, r.module))
        .max_by_key(|r| r.module.len())
}

/// Files in no room, and rows of the tables that match no file and are not
/// planned.
fn check_table(tree: &Tree) -> Vec<String> {
    let mut problems = Vec::new();
    for file in &tree.files {
        if room_of(&file.module).is_none() {
            problems.push(format!("src/{} ({}) is in no room", file.path, file.module));
        }
    }
    let mut rows: Vec<&str> = ROOMS.iter().map(|r| r.module).collect();
    for ban in BANS {
        rows.extend(ban.within.iter().chain(ban.except_within));
    }
    rows.extend(FLOAT_FREE.iter().chain([&AWAITS_IN, &AWAITS_ONLY_ON]));
    rows.extend(UPWARD.iter().map(|u| u.from));
    for u in UPWARD {
        let present = tree.files.iter().any(|f| under(&f.module, u.from));
        let used = tree
            .refs
            .iter()
            .any(|r| under(&r.module, u.from) && under(&r.path, u.to));
        if present && !used {
            problems.push(format!(
                "{} no longer names {}: delete its row from UPWARD",
                u.from, u.to
            ));
        }
    }
    for row in rows {
        let present = tree.files.iter().any(|f| under(&f.module, row));
        let planned = PLANNED.iter().any(|(m, _)| *m == row);
        if !present && !planned {
            problems.push(format!("the table names {row}, which holds no file"));
        }
    }
    problems
}

/// The crates `src/` may name: the `[dependencies]` of Cargo.toml, and the
/// standard library's.
fn dependencies() -> BTreeSet<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
    let text = std::fs::read_to_string(path).expect("read Cargo.toml");
    let mut crates: BTreeSet<String> = ["std", "core", "alloc"].map(String::from).into();
    let mut in_dependencies = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_dependencies = line == "[dependencies]";
        } else if in_dependencies
            && !line.starts_with('#')
            && let Some((name, _)) = line.split_once('=')
        {
            crates.insert(name.trim().replace('-', "_"));
        }
    }
    crates
}

/// Names whose first segment is neither this crate nor a dependency: a
/// name the resolver could not place, which would slip past every rule.
fn check_crates(tree: &Tree, crates: &BTreeSet<String>) -> Vec<String> {
    let mut found = BTreeSet::new();
    for r in &tree.refs {
        let first = r.path.split("::").next().unwrap_or_default();
        if !matches!(first, "tollgate" | "bin") && !crates.contains(first) {
            found.insert(format!(
                "src/{}:{}: {} names {}, and `{first}` is no dependency",
                r.file, r.line, r.module, r.path
            ));
        }
    }
    found.into_iter().collect()
}

fn check_layers(tree: &Tree) -> Vec<String> {
    let mut found = BTreeSet::new();
    for r in &tree.refs {
        let (Some(from), Some(to)) = (room_of(&r.module), target_room(&r.path)) else {
            continue;
        };
        let known = UPWARD
            .iter()
            .any(|u| under(&r.module, u.from) && under(&r.path, u.to));
        if from.name != to.name && to.layer >= from.layer && !known {
            found.insert(format!(
                "src/{}:{}: {} (layer {}) names {} (layer {} room {})",
                r.file, r.line, from.name, from.layer, r.path, to.layer, to.name
            ));
        }
    }
    found.into_iter().collect()
}

fn matches(path: &str, name: &str) -> bool {
    match name.strip_prefix("*::") {
        Some(last) => path.rsplit("::").next() == Some(last) && path.contains("::"),
        None => under(path, name),
    }
}

fn check_bans(tree: &Tree, bans: &[Ban]) -> Vec<String> {
    let mut found = BTreeSet::new();
    for r in &tree.refs {
        for ban in bans {
            let inside = ban.within.iter().any(|w| under(&r.module, w))
                && !ban.except_within.iter().any(|w| under(&r.module, w));
            let banned = ban.never.iter().any(|n| matches(&r.path, n))
                && !ban.but.iter().any(|n| matches(&r.path, n));
            if inside && banned {
                found.insert(format!(
                    "src/{}:{}: {} names {}: {}",
                    r.file, r.line, r.module, r.path, ban.invariant
                ));
            }
        }
    }
    found.into_iter().collect()
}

fn check_floats(tree: &Tree) -> Vec<String> {
    tree.floats
        .iter()
        .filter(|f| FLOAT_FREE.iter().any(|m| under(&f.module, m)))
        .map(|f| {
            format!(
                "src/{}:{}: {} holds a float: {}",
                f.file, f.line, f.module, f.what
            )
        })
        .collect()
}

fn check_awaits(tree: &Tree) -> Vec<String> {
    let store_methods: BTreeSet<&str> = tree
        .trait_methods
        .iter()
        .filter(|(module, _)| under(module, AWAITS_ONLY_ON))
        .map(|(_, method)| method.as_str())
        .collect();
    let own: BTreeSet<&str> = tree
        .async_fns
        .iter()
        .filter(|(module, _)| under(module, AWAITS_IN))
        .map(|(_, name)| name.as_str())
        .collect();
    tree.awaits
        .iter()
        .filter(|a| under(&a.module, AWAITS_IN))
        .filter(|a| {
            !a.what
                .as_deref()
                .is_some_and(|m| store_methods.contains(m) || own.contains(m))
        })
        .map(|a| {
            let what = a
                .what
                .as_deref()
                .unwrap_or("something that is not a method call");
            format!(
                "src/{}:{}: {} awaits {what}, which is neither a method of a trait \
                 in {AWAITS_ONLY_ON} nor an async fn of {AWAITS_IN}",
                a.file, a.line, a.module
            )
        })
        .collect()
}

fn check_lengths(tree: &Tree) -> Vec<String> {
    tree.fns
        .iter()
        .filter(|f| f.lines > MAX_FN_LINES)
        .map(|f| {
            format!(
                "src/{}:{}: fn {} runs {} lines",
                f.file, f.line, f.name, f.lines
            )
        })
        .collect()
}

// ---------------------------------------------------------------------------
// The tables as ARCHITECTURE.md shows them.
// ---------------------------------------------------------------------------

fn render_tables() -> String {
    let mut out = String::new();
    out.push_str("| Layer | Room | Modules | Planned |\n|---|---|---|---|\n");
    let mut rooms: Vec<&Room> = ROOMS.iter().collect();
    rooms.sort_by_key(|r| (r.layer, r.module));
    for r in rooms {
        let planned = PLANNED
            .iter()
            .find(|(m, _)| *m == r.module)
            .map_or("", |(_, why)| why);
        let modules = match r.module {
            "tollgate" | "bin" => format!("`{}` (its own file only)", r.module),
            m => format!("`{m}::*`"),
        };
        let _ = writeln!(out, "| {} | {} | {modules} | {planned} |", r.layer, r.name);
    }
    out.push_str("\n| Known edge against the layers | Names | Why |\n|---|---|---|\n");
    for u in UPWARD {
        let _ = writeln!(out, "| `{}` | `{}` | {} |", u.from, u.to, u.why);
    }
    out.push_str("\n| Invariant | Within | Except within | Never names | But may name |\n");
    out.push_str("|---|---|---|---|---|\n");
    let code = |names: &[&str]| {
        names
            .iter()
            .map(|n| format!("`{n}`"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    for b in BANS {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} |",
            b.invariant,
            code(b.within),
            code(b.except_within),
            code(b.never),
            code(b.but)
        );
    }
    let _ = writeln!(
        out,
        "\nFloat-free: {}. `{AWAITS_IN}` awaits only methods of traits declared in \
         `{AWAITS_ONLY_ON}`, or its own async fns. No function runs past {MAX_FN_LINES} lines.",
        code(FLOAT_FREE)
    );
    let planned_rows: Vec<String> = PLANNED
        .iter()
        .filter(|(m, _)| !ROOMS.iter().any(|r| r.module == *m))
        .map(|(m, why)| format!("`{m}` ({why})"))
        .collect();
    if !planned_rows.is_empty() {
        let _ = writeln!(
            out,
            "Planned, so it may be absent: {}.",
            planned_rows.join(", ")
        );
    }
    out
}
