//! Redis credentials through the whole service: an ACL user whose password
//! comes from a file, a Sentinel with its own password, and TLS checked
//! against a CA file. Every scope fails closed, so a store that cannot
//! authenticate shows as UNAVAILABLE rather than as a degraded allow.

use std::path::Path;

use tollgate::config::Config;
use tonic::Code;

use crate::common::certs::Ca;
use crate::common::redis::{Server, free_port};
use crate::common::{TestServer, req};

const PASSWORD: &str = "acl-pass:{never}logged";
const SENTINEL_PASSWORD: &str = "sentinel-only-pass";

fn scopes() -> &'static str {
    "failure_mode: closed
scopes:
  - name: s
    limits: [{name: per-user, per: identity, capacity: 5, refill_period: 1m}]
"
}

/// A data node whose only user is `tollgate` (the default user is off).
fn acl_server(dir: &Path, extra: &[&str]) -> Server {
    let password = format!(">{PASSWORD}");
    let mut args = vec![
        "--user", "default", "off", "--user", "tollgate", "on", &password, "~*", "&*", "+@all",
    ];
    args.extend_from_slice(extra);
    Server::redis(dir, free_port(), &args)
}

/// Serves `store_yaml` (indented under `store.redis`) and asks once.
async fn decide(store_yaml: &str) -> Result<bool, tonic::Status> {
    // Generous timeouts: a TLS connect on a busy CI machine is not fast.
    let yaml = format!(
        "store:\n  kind: redis\n  redis:\n{store_yaml}    response_timeout: 2s\n    connect_timeout: 5s\n    wait_timeout: 5s\n{}",
        scopes()
    );
    let server = TestServer::start(&yaml).await;
    let mut c = server.client().await;
    c.should_allow(req("s", "alice", "op"))
        .await
        .map(|r| r.into_inner().allowed)
}

#[tokio::test]
async fn an_acl_user_with_a_password_file_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let redis = acl_server(dir.path(), &[]);
    // As a Kubernetes secret is mounted: the password and a newline.
    let file = dir.path().join("redis-password");
    std::fs::write(&file, format!("{PASSWORD}\n")).unwrap();
    let settings = |file: &Path| {
        format!(
            "    urls: [\"redis://127.0.0.1:{}/\"]\n    username: tollgate\n    password_file: {}\n    key_prefix: \"test:acl:\"\n",
            redis.port,
            file.display()
        )
    };
    assert!(decide(&settings(&file)).await.expect("served"));

    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, "not-it\n").unwrap();
    let e = decide(&settings(&wrong)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(!e.message().contains(PASSWORD));

    // The password never shows in the config's Debug print.
    let yaml = format!("store:\n  kind: redis\n  redis:\n{}", settings(&file));
    let config = Config::from_yaml(&yaml).unwrap();
    let printed = format!("{config:?}");
    assert!(!printed.contains(PASSWORD), "{printed}");
}

#[tokio::test]
async fn sentinel_with_its_own_password_is_authenticated_separately() {
    let dir = tempfile::tempdir().unwrap();
    let primary = acl_server(dir.path(), &[]);
    let sentinel = Server::sentinel(
        dir.path(),
        free_port(),
        &format!(
            "requirepass {SENTINEL_PASSWORD}\n\
             sentinel monitor mymaster 127.0.0.1 {} 1\n\
             sentinel auth-user mymaster tollgate\n\
             sentinel auth-pass mymaster {PASSWORD}\n",
            primary.port
        ),
    );
    let secret = dir.path().join("sentinel-password");
    std::fs::write(&secret, SENTINEL_PASSWORD).unwrap();
    let settings = |sentinel_auth: &str| {
        format!(
            "    mode: sentinel\n    master_name: mymaster\n    urls: [\"redis://127.0.0.1:{}/\"]\n    username: tollgate\n    password: \"{PASSWORD}\"\n{sentinel_auth}    key_prefix: \"test:sentinel-auth:\"\n",
            sentinel.port
        )
    };
    let with = format!("    sentinel_password_file: {}\n", secret.display());
    assert!(decide(&settings(&with)).await.expect("served"));
    let e = decide(&settings("")).await.unwrap_err();
    assert_eq!(
        e.code(),
        Code::Unavailable,
        "without the sentinel's password: {e:?}"
    );
}

#[tokio::test]
async fn redis_tls_is_verified_against_the_ca_file() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("redis CA");
    let leaf = ca.server(&[]);
    let (cert, key, ca_file) = (
        dir.path().join("redis.pem"),
        dir.path().join("redis.key"),
        dir.path().join("ca.pem"),
    );
    std::fs::write(&cert, &leaf.cert).unwrap();
    std::fs::write(&key, &leaf.key).unwrap();
    std::fs::write(&ca_file, &ca.pem).unwrap();
    let tls_port = free_port().to_string();
    let _redis = acl_server(
        dir.path(),
        &[
            "--tls-port",
            &tls_port,
            "--tls-cert-file",
            cert.to_str().unwrap(),
            "--tls-key-file",
            key.to_str().unwrap(),
            "--tls-ca-cert-file",
            ca_file.to_str().unwrap(),
            "--tls-auth-clients",
            "no",
        ],
    );
    let settings = |tls: &str| {
        format!(
            "    urls: [\"rediss://127.0.0.1:{tls_port}/\"]\n    username: tollgate\n    password: \"{PASSWORD}\"\n    key_prefix: \"test:tls-ca:\"\n{tls}"
        )
    };
    let ca_yaml = format!("    tls: {{ca_file: {}}}\n", ca_file.display());
    assert!(decide(&settings(&ca_yaml)).await.expect("served"));

    // The system's roots do not know this CA.
    let e = decide(&settings("")).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");

    // Another CA's file is no better…
    let other = dir.path().join("other.pem");
    std::fs::write(&other, Ca::new("other").pem).unwrap();
    let other_yaml = format!("    tls: {{ca_file: {}}}\n", other.display());
    let e = decide(&settings(&other_yaml)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");

    // … unless verification is skipped, which must be said out loud.
    let danger = "    tls: {danger_accept_invalid_certificates: true}\n";
    assert!(decide(&settings(danger)).await.expect("served"));
    let quiet = format!(
        "store:\n  kind: redis\n  redis:\n    urls: [\"rediss://127.0.0.1:{tls_port}/#insecure\"]\n"
    );
    let e = Config::from_yaml(&quiet).unwrap_err().to_string();
    assert!(
        e.contains("store.redis.urls[0]: #insecure is not accepted"),
        "{e}"
    );
}
