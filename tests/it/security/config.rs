//! The security settings' validation: each mistake is refused before any
//! port is bound, naming its field.

use tollgate::config::Config;

fn problems(yaml: &str) -> String {
    Config::from_yaml(yaml)
        .expect_err("should be refused")
        .to_string()
}

#[test]
fn bad_callers_are_refused_with_their_field_paths() {
    let e = problems(
        "callers:
  - {name: a, token_sha256: abc, scopes: [x]}
  - {name: a, san: spiffe://x, scopes: []}
  - {name: c, scopes: [\"[\"]}
",
    );
    for want in [
        "callers[0].token_sha256: must be 64 hex digits",
        "callers[1].name: duplicate caller \"a\"",
        "callers[1].san: needs tls.client_ca",
        "callers[1].scopes: must list at least one scope glob",
        "callers[2]: needs a san or a token_sha256",
        "callers[2].scopes[0]:",
    ] {
        assert!(e.contains(want), "missing {want:?} in {e}");
    }
}

#[test]
fn bad_tls_and_bounds_are_refused_with_their_field_paths() {
    let e = problems(
        "tls: {cert: /nonexistent/cert.pem, key: /nonexistent/key.pem}
metrics: {tls: {cert: /nonexistent/c, key: /nonexistent/k}}
grpc: {max_in_flight: 0, max_batch: 0, max_connection_age: 1ms, max_message_size: 10, cores: 257}
",
    );
    for want in [
        "tls.cert: cannot read /nonexistent/cert.pem",
        "tls.key: cannot read",
        "metrics.tls: needs metrics.listen",
        "grpc.max_in_flight: must be between 1 and",
        "grpc.max_batch: must be between 1 and",
        "grpc.cores: must be between 0 and 256",
        "grpc.max_connection_age: must be between 10ms and",
        "grpc.max_message_size: must be between 1024 and",
    ] {
        assert!(e.contains(want), "missing {want:?} in {e}");
    }
}

#[test]
fn a_certificate_that_does_not_parse_is_refused_before_binding() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
    std::fs::write(&cert, "not a certificate").unwrap();
    std::fs::write(&key, "not a key").unwrap();
    let yaml = format!("tls: {{cert: {}, key: {}}}", cert.display(), key.display());
    let config = Config::from_yaml(&yaml).expect("the files exist");
    let e = tollgate::server::Prepared::new(config, None)
        .expect_err("refused")
        .to_string();
    assert!(e.contains("tls.cert: holds no PEM certificate"), "{e}");
}

#[test]
fn redis_secrets_are_redacted_and_given_once() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pw");
    std::fs::write(&file, "from-file-secret\n").unwrap();
    let yaml = format!(
        "store:
  kind: redis
  redis:
    mode: sentinel
    master_name: m
    urls: [\"redis://127.0.0.1:1/\"]
    sentinel_username: s
    sentinel_password: sentinel-secret
    password_file: {}
",
        file.display()
    );
    let config = Config::from_yaml(&yaml).unwrap();
    let printed = format!("{config:?}");
    assert!(!printed.contains("sentinel-secret"), "{printed}");
    assert!(!printed.contains("from-file-secret"), "{printed}");
    assert_eq!(
        config.store.redis.password.as_ref().map(|p| p.expose()),
        Some("from-file-secret")
    );

    let both = format!("{yaml}    password: inline\n");
    assert!(
        problems(&both)
            .contains("store.redis.password_file: give password or password_file, not both")
    );
    let standalone = "store:
  kind: redis
  redis:
    urls: [\"redis://127.0.0.1:1/\"]
    sentinel_password: x
";
    assert!(problems(standalone).contains("store.redis.sentinel_password: only meaningful"));
}

#[test]
fn a_ca_file_is_refused_where_the_client_cannot_use_it() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, crate::common::certs::Ca::new("x").pem).unwrap();
    let yaml = format!(
        "store:
  kind: redis
  redis:
    mode: cluster
    urls: [\"rediss://127.0.0.1:1/\"]
    tls: {{ca_file: {}}}
",
        ca.display()
    );
    let config = Config::from_yaml(&yaml).unwrap();
    let e = tollgate::server::Prepared::new(config, None)
        .expect_err("refused")
        .to_string();
    assert!(
        e.contains("store.redis.tls.ca_file: only standalone mode supports it"),
        "{e}"
    );
}

#[test]
fn a_list_of_reservation_secrets_is_checked_one_by_one() {
    let long = "k".repeat(32);
    let e = problems(&format!("reservations: {{secret: [\"{long}\", short]}}\n"));
    assert!(
        e.contains("reservations.secret[1]: must be at least 32 bytes"),
        "{e}"
    );
    let e = problems("reservations: {secret: []}\n");
    assert!(
        e.contains("reservations.secret: must list 1 to 8 secrets"),
        "{e}"
    );
    let nine = vec![format!("\"{long}\""); 9].join(", ");
    let e = problems(&format!("reservations: {{secret: [{nine}]}}\n"));
    assert!(e.contains("must list 1 to 8 secrets"), "{e}");
    let dir = tempfile::tempdir().expect("tempdir");
    let e = problems(&format!(
        "reservations: {{secret_file: [{:?}]}}\n",
        dir.path().join("missing")
    ));
    assert!(
        e.contains("reservations.secret_file[0]: cannot read"),
        "{e}"
    );
    Config::from_yaml(&format!("reservations: {{secret: [\"{long}\"]}}\n"))
        .expect("one listed secret is fine");
}
