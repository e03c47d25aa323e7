//! Self-tests: the checker reports what breaks each rule, so the
//! architecture test can fail. Most plant a violation into a copy of the
//! real `src/`; the last pins down how names resolve on small sources.

use std::collections::BTreeSet;

use super::*;

/// The real sources with each `(file, text)` appended to its file (or made a
/// new file), parsed.
fn planted(plants: &[(&str, &str)]) -> Tree {
    let mut files = real_sources();
    for (path, text) in plants {
        let file = files.entry(path.to_string()).or_default();
        file.push('\n');
        file.push_str(text);
        file.push('\n');
    }
    Tree::parse(&files).unwrap_or_else(|e| panic!("{e}"))
}

#[track_caller]
fn assert_reports(found: &[String], want: &str) {
    assert!(
        found.iter().any(|f| f.contains(want)),
        "expected a report containing {want:?}, got {found:#?}"
    );
}

#[track_caller]
fn assert_silent(found: &[String], unwanted: &str) {
    let hits: Vec<&String> = found.iter().filter(|f| f.contains(unwanted)).collect();
    assert!(
        hits.is_empty(),
        "expected no report containing {unwanted:?}, got {hits:#?}"
    );
}

#[test]
fn a_room_naming_a_room_above_it_is_reported() {
    let tree = planted(&[
        (
            "store/mod.rs",
            "fn planted() { let _ = crate::limiter::Limiter::decide; }",
        ),
        ("bucket.rs", "use crate::{window::{self, Window as W}};"),
        ("store/redis/keys.rs", "use super::super::super::api::auth;"),
        (
            "limiter/plan.rs",
            "use crate::observe as renamed; fn planted() { renamed::f(); }",
        ),
        ("config/mod.rs", "mod planted { use crate::api::*; }"),
    ]);
    let found = check_layers(&tree);
    assert_reports(
        &found,
        "store (layer 1) names tollgate::limiter::Limiter::decide",
    );
    assert_reports(&found, "bucket (layer 0) names tollgate::window (layer 0");
    assert_reports(&found, "bucket (layer 0) names tollgate::window::Window");
    assert_reports(&found, "store (layer 1) names tollgate::api::auth");
    assert_reports(&found, "limiter (layer 2) names tollgate::observe::f");
    assert_reports(&found, "config (layer 0) names tollgate::api (layer");
}

#[test]
fn proto_in_the_core_is_reported_even_renamed_or_inside_a_macro() {
    let tree = planted(&[
        (
            "limiter/plan.rs",
            "fn planted() -> tonic::Status { todo!() }",
        ),
        (
            "limiter/rules.rs",
            "use tonic as quiet; fn planted() -> quiet::Code { todo!() }",
        ),
        (
            "observe/mod.rs",
            "fn planted() { let _ = vec![crate::pb::tollgate::v1::Priority::Normal]; }",
        ),
        ("main.rs", "use tollgate::pb;"),
    ]);
    let found = check_bans(&tree, BANS);
    assert_reports(
        &found,
        "tollgate::limiter::plan names tonic::Status: The core speaks no proto",
    );
    assert_reports(
        &found,
        "tollgate::observe names tollgate::pb::tollgate::v1::Priority::Normal",
    );
    assert_reports(
        &found,
        "tollgate::limiter::rules names tonic::Code: The core",
    );
    assert_reports(&found, "bin names tollgate::pb: main speaks no proto");
}

#[test]
fn the_redis_crate_outside_store_redis_is_reported_but_the_module_is_not() {
    let tree = planted(&[
        // In store/mod.rs, `redis::` is the child module store::redis: fine.
        (
            "store/mod.rs",
            "fn planted(_: &redis::RedisStore, _: &::redis::Client) {}",
        ),
        ("api/tollgate.rs", "use redis::Cmd;"),
        ("store/redis/mod.rs", "fn planted(_: &redis::Cmd) {}"),
    ]);
    let found = check_bans(&tree, BANS);
    assert_reports(
        &found,
        "tollgate::store names redis::Client: Only the Redis store knows Redis",
    );
    assert_reports(&found, "tollgate::api::tollgate names redis::Cmd");
    assert_silent(
        &found,
        "names tollgate::store::redis::RedisStore: Only the Redis store",
    );
    assert_silent(&found, "tollgate::store::redis names redis::Cmd");
}

#[test]
fn io_or_a_clock_in_the_limiter_or_the_math_is_reported() {
    let tree = planted(&[
        (
            "limiter/plan.rs",
            "async fn planted() { tokio::task::yield_now().await; }",
        ),
        (
            "limiter/rules.rs",
            "use tokio::time::Instant; fn planted() { let _ = Instant::now(); }",
        ),
        (
            "window.rs",
            "fn planted() { let _ = jiff::Timestamp::now(); }",
        ),
        (
            "bucket.rs",
            "fn planted() { let _ = std::fs::read(\"x\"); }",
        ),
    ]);
    let found = check_bans(&tree, BANS);
    let io = "The math and the limiter do no I/O";
    assert_reports(
        &found,
        &format!("tollgate::limiter::plan names tokio::task::yield_now: {io}"),
    );
    assert_reports(
        &found,
        &format!("tollgate::limiter::rules names tokio::time::Instant::now: {io}"),
    );
    assert_reports(
        &found,
        &format!("tollgate::window names jiff::Timestamp::now: {io}"),
    );
    assert_reports(
        &found,
        &format!("tollgate::bucket names std::fs::read: {io}"),
    );
}

#[test]
fn the_environment_and_anyhow_in_the_library_are_reported() {
    let tree = planted(&[(
        "config/mod.rs",
        "fn planted() -> anyhow::Result<()> { let _ = std::env::var(\"X\"); Ok(()) }",
    )]);
    let found = check_bans(&tree, BANS);
    assert_reports(
        &found,
        "names std::env::var: The library reads no environment",
    );
    assert_reports(
        &found,
        "names anyhow::Result: The library's errors are typed",
    );
}

#[test]
fn a_store_implementation_named_outside_store_is_reported_but_not_in_unit_tests() {
    let tree = planted(&[
        ("api/tollgate.rs", "use crate::store::memory::MemoryStore;"),
        (
            "limiter/mod.rs",
            "#[cfg(test)]\nmod planted { use crate::store::redis::RedisStore; }",
        ),
    ]);
    let found = check_bans(&tree, BANS);
    assert_reports(
        &found,
        "tollgate::api::tollgate names tollgate::store::memory::MemoryStore: Store implementations",
    );
    assert_silent(&found, "RedisStore");
}

#[test]
fn the_cli_reaching_into_the_server_or_serving_is_reported() {
    let tree = planted(&[
        (
            "cli/admin.rs",
            "use tollgate::store::Store; use tollgate::server::run;",
        ),
        (
            "cli.rs",
            "fn planted() { let _ = tokio::net::TcpListener::bind; }",
        ),
    ]);
    let found = check_bans(&tree, BANS);
    assert_reports(
        &found,
        "bin::cli::admin names tollgate::store::Store: The cli is a gRPC client",
    );
    assert_reports(
        &found,
        "bin::cli::admin names tollgate::server::run: The cli is a gRPC client",
    );
    assert_silent(&found, "names tollgate::server::Prepared");
    assert_reports(
        &found,
        "bin::cli names tokio::net::TcpListener::bind: The cli never serves",
    );
}

#[test]
fn a_float_in_the_math_is_reported() {
    let tree = planted(&[
        (
            "bucket.rs",
            "fn planted(x: u64) -> u64 { (x as f64) as u64 }",
        ),
        (
            "window.rs",
            "fn planted(d: std::time::Duration) -> u64 { d.as_secs_f64() as u64 }",
        ),
        (
            "bucket.rs",
            "fn planted_too() -> String { format!(\"{}\", 0.5) }",
        ),
    ]);
    let found = check_floats(&tree);
    assert_reports(&found, "tollgate::bucket holds a float: `f64`");
    assert_reports(&found, "tollgate::window holds a float: `as_secs_f64`");
    assert_reports(&found, "tollgate::bucket holds a float: literal 0.5");
}

#[test]
fn an_await_on_anything_but_the_store_in_the_limiter_is_reported() {
    let tree = planted(&[(
        "limiter/plan.rs",
        "async fn planted(f: impl std::future::Future<Output = ()>, s: &dyn crate::store::Store) { \
             f.await; s.not_a_store_method().await; planted_own().await; }\n\
         async fn planted_own() {}",
    )]);
    let found = check_awaits(&tree);
    assert_reports(&found, "awaits something that is not a method call");
    assert_reports(&found, "awaits not_a_store_method, which is neither");
    assert_eq!(found.len(), 2, "{found:#?}");
}

#[test]
fn a_long_function_is_reported_with_its_real_length() {
    let body = "    let _ = 1;\n".repeat(80);
    let tree = planted(&[("server.rs", &format!("fn planted() {{\n{body}}}"))]);
    let found = check_lengths(&tree);
    assert_reports(&found, "fn planted runs 82 lines");
    let short = planted(&[("server.rs", "fn planted() {\n    let _ = 1;\n}")]);
    assert_silent(&check_lengths(&short), "fn planted ");
}

#[test]
fn a_file_in_no_room_or_out_of_the_tree_is_reported() {
    let tree = planted(&[("lib.rs", "pub mod planted;"), ("planted.rs", "")]);
    assert_reports(
        &check_table(&tree),
        "src/planted.rs (tollgate::planted) is in no room",
    );
    let mut files = real_sources();
    files.insert("orphan.rs".into(), String::new());
    let err = Tree::parse(&files)
        .err()
        .expect("an orphan file is an error");
    assert!(err.contains("orphan.rs"), "{err}");
}

/// Small sources, to pin down how names resolve.
fn small(files: &[(&str, &str)]) -> Tree {
    let files = files
        .iter()
        .map(|(p, t)| (p.to_string(), t.to_string()))
        .collect();
    Tree::parse(&files).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn the_resolver_follows_use_trees_paths_and_macros() {
    let tree = small(&[
        ("lib.rs", "pub mod a; pub mod b;"),
        ("main.rs", "mod cli; use tollgate::a::X;"),
        ("cli.rs", "use super::*;"),
        (
            "a.rs",
            "pub mod redis; pub struct X;\n\
             use crate::b::{self, c::{D as E, *}};\n\
             use std::io::{self as sio};\n\
             use prost as p;\n\
             fn f() { let _ = redis::Thing; let _ = ::redis::Cmd; let _ = super::b::c::D;\n\
                      let _ = E::new(); let _ = sio::stdout(); let _ = vec![tonic::Code::Ok]; let _ = p::Message;\n\
                      let _ = <[u8; 4]>::try_from(&[0u8; 4][..]); }\n\
             #[cfg(test)] mod tests { use crate::hidden; }",
        ),
        ("a/redis.rs", "use super::X;"),
        (
            "b.rs",
            "pub mod c { pub struct D; fn g() { let _ = super::super::a::X; } }",
        ),
    ]);
    let refs: BTreeSet<String> = tree
        .refs
        .iter()
        .map(|r| format!("{} -> {}", r.module, r.path))
        .collect();
    for want in [
        "tollgate::a -> tollgate::b",
        "tollgate::a -> tollgate::b::c::D",
        "tollgate::a -> tollgate::b::c",
        "tollgate::a -> std::io",
        "tollgate::a -> tollgate::a::redis::Thing",
        "tollgate::a -> redis::Cmd",
        "tollgate::a -> tollgate::b::c::D::new",
        "tollgate::a -> std::io::stdout",
        "tollgate::a -> tonic::Code::Ok",
        "tollgate::a -> prost",
        "tollgate::a -> prost::Message",
        "tollgate::a::redis -> tollgate::a::X",
        "tollgate::b::c -> tollgate::a::X",
        "bin -> tollgate::a::X",
        "bin::cli -> bin",
    ] {
        assert!(refs.contains(want), "{want} not in {refs:#?}");
    }
    assert!(!refs.contains("tollgate::a -> redis::Thing"), "{refs:#?}");
    assert!(!refs.iter().any(|r| r.contains("hidden")), "{refs:#?}");
    assert!(!refs.contains("tollgate::a -> p::Message"), "{refs:#?}");
    assert!(!refs.iter().any(|r| r.contains("try_from")), "{refs:#?}");
    // Real line numbers: the `use` on line 2, the path on line 5.
    let lines: BTreeSet<usize> = tree
        .refs
        .iter()
        .filter(|r| r.path == "tollgate::b::c::D")
        .map(|r| r.line)
        .collect();
    assert_eq!(lines, BTreeSet::from([2, 5]));
}

#[test]
fn a_name_the_resolver_cannot_place_is_reported() {
    // `helpers` is no module here and no dependency: a glob from outside
    // the crate, or a missed import, would otherwise slip past every rule.
    let tree = planted(&[("limiter/plan.rs", "fn planted() { helpers::sleep(); }")]);
    let found = check_crates(&tree, &dependencies());
    assert_reports(
        &found,
        "names helpers::sleep, and `helpers` is no dependency",
    );
}

#[test]
fn the_transport_and_the_reload_keep_their_layers() {
    // net/ sits below the API (tls.rs once named api::auth from above it),
    // and reload below server.
    let tree = planted(&[
        ("net/tls.rs", "use crate::api::auth::Caller;"),
        ("reload.rs", "use crate::server::run;"),
    ]);
    let found = check_layers(&tree);
    assert_reports(&found, "net (layer 4) names tollgate::api::auth::Caller");
    assert_reports(&found, "reload (layer 7) names tollgate::server::run");
}
