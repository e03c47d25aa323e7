//! The `store.redis` config: defaults, validation with field paths, and a
//! password that never shows.

use std::time::Duration;

use tollgate::config::{Config, RedisMode, StoreKind};

fn problems(yaml: &str) -> Vec<String> {
    Config::from_yaml(yaml).expect_err("invalid").problems
}

#[test]
fn a_minimal_redis_store_gets_small_timeouts_and_the_versioned_prefix() {
    let c =
        Config::from_yaml("store: { kind: redis, redis: { urls: [\"redis://127.0.0.1:6379\"] } }")
            .unwrap();
    assert_eq!(c.store.kind, StoreKind::Redis);
    assert_eq!(c.store.redis.mode, RedisMode::Standalone);
    assert_eq!(c.store.redis.response_timeout, Duration::from_millis(50));
    assert_eq!(c.store.redis.key_prefix, "tg2:");
}

#[test]
fn sentinel_mode_requires_a_master_name() {
    let p = problems(
        "store: { kind: redis, redis: { mode: sentinel, urls: [\"redis://127.0.0.1:26379\"] } }",
    );
    assert!(
        p.contains(&"store.redis.master_name: required when mode is sentinel".to_owned()),
        "{p:?}"
    );
}

#[test]
fn bad_urls_prefixes_and_sizes_name_their_fields() {
    let p = problems(
        r#"
store:
  kind: redis
  redis:
    urls: ["http://x"]
    key_prefix: "a{b}"
    pool_size: 0
    response_timeout: 0s
"#,
    );
    for field in [
        "store.redis.urls[0]:",
        "store.redis.key_prefix:",
        "store.redis.pool_size:",
        "store.redis.response_timeout:",
    ] {
        assert!(p.iter().any(|x| x.starts_with(field)), "{field} in {p:?}");
    }
    let p = problems("store: { kind: redis }");
    assert!(
        p.iter().any(|x| x.starts_with("store.redis.urls:")),
        "{p:?}"
    );
}

#[test]
fn the_password_is_never_printed() {
    let c = Config::from_yaml(
        "store: { kind: redis, redis: { urls: [\"redis://127.0.0.1:6379\"], username: u, password: hunter2 } }",
    )
    .unwrap();
    let shown = format!("{c:?}");
    assert!(!shown.contains("hunter2"), "{shown}");
    assert!(shown.contains("<redacted>"));
    assert_eq!(c.store.redis.password.unwrap().expose(), "hunter2");
}

#[test]
fn a_password_inside_a_url_is_never_printed_either() {
    let c = Config::from_yaml(
        "store: { kind: redis, redis: { urls: [\"redis://app:hunter2@127.0.0.1:6379/0\"] } }",
    )
    .unwrap();
    let shown = format!("{:?}", c.store.redis);
    assert!(!shown.contains("hunter2"), "{shown}");
    assert!(
        shown.contains("redis://app:<redacted>@127.0.0.1:6379/0"),
        "{shown}"
    );
}
