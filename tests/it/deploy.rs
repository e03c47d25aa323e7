//! Static checks of what `deploy/` ships: every config in it validates, and
//! the Dockerfile copies files that exist.

use std::path::Path;

use tollgate::config::Config;

#[test]
fn the_example_config_validates() {
    Config::load(
        Path::new("deploy/tollgate.example.yaml"),
        std::iter::empty(),
    )
    .expect("valid");
}

/// The config embedded in the Kubernetes ConfigMap, de-indented.
fn configmap_config(manifest: &str) -> String {
    let mut lines = manifest
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("tollgate.yaml: |"));
    let header = lines.next().expect("a tollgate.yaml key in the ConfigMap");
    let outer = header.len() - header.trim_start().len();
    lines
        .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > outer)
        .map(|l| l.get(outer + 2..).unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn the_kubernetes_configmap_config_validates() {
    let manifest = std::fs::read_to_string("deploy/kubernetes/tollgate.yaml").expect("manifest");
    let yaml = configmap_config(&manifest);
    let config = Config::from_yaml(&yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    assert_eq!(config.listen, "0.0.0.0:50051");
    // The probe names the health service the server reports on.
    assert!(manifest.contains(&format!("service: {}", tollgate::server::HEALTH_SERVICE)));
}

#[test]
fn the_dockerfile_copies_files_that_exist() {
    let dockerfile = std::fs::read_to_string("deploy/Dockerfile").expect("Dockerfile");
    let mut copied = 0;
    for line in dockerfile
        .lines()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from"))
    {
        let parts: Vec<&str> = line.split_whitespace().collect();
        for src in &parts[1..parts.len() - 1] {
            assert!(
                Path::new(src).exists(),
                "Dockerfile copies {src}, which does not exist"
            );
            copied += 1;
        }
    }
    assert!(copied >= 5, "found only {copied} COPY sources");
}

#[test]
fn the_hardened_config_validates_with_its_files_mounted() {
    // The files it names, as a pod would have them mounted.
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = crate::common::certs::Ca::new("deploy");
    let leaf = ca.server(&[]);
    let file = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write");
        path.display().to_string()
    };
    let (cert, key, ca) = (
        file("tls.crt", &leaf.cert),
        file("tls.key", &leaf.key),
        file("ca.crt", &ca.pem),
    );
    let env = [
        ("TLS__CERT", cert.clone()),
        ("TLS__KEY", key.clone()),
        ("TLS__CLIENT_CA", ca.clone()),
        ("METRICS__TLS__CERT", cert),
        ("METRICS__TLS__KEY", key),
        ("METRICS__TLS__CLIENT_CA", ca),
        ("STORE__REDIS__PASSWORD_FILE", file("password", "p\n")),
        (
            "STORE__REDIS__SENTINEL_PASSWORD_FILE",
            file("sentinel-password", "s\n"),
        ),
    ]
    .map(|(k, v)| (format!("TOLLGATE_{k}"), v));
    let config = Config::load(Path::new("deploy/tollgate.hardened.yaml"), env)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(config.tls.as_ref().is_some_and(|t| t.client_ca.is_some()));
    assert!(config.metrics.tls.is_some());
    assert_eq!(config.callers.as_ref().map(Vec::len), Some(4));
    assert_eq!(
        config.store.redis.password.as_ref().map(|p| p.expose()),
        Some("p")
    );
    // And the server takes it as far as the store (no Redis is contacted).
    tollgate::server::Prepared::new(config, None).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn the_kubernetes_memory_limit_leaves_room_above_the_store_bound() {
    let manifest = std::fs::read_to_string("deploy/kubernetes/tollgate.yaml").expect("manifest");
    let config = tollgate::config::Config::from_yaml(&configmap_config(&manifest)).expect("valid");
    let limit_mi: usize = manifest
        .split("limits: {memory: ")
        .nth(1)
        .and_then(|rest| rest.split("Mi}").next())
        .and_then(|n| n.parse().ok())
        .expect("a memory limit in Mi");
    assert!(
        limit_mi << 20 >= config.store.memory.max_bytes + (128 << 20),
        "limit {limit_mi}Mi vs max_bytes {}",
        config.store.memory.max_bytes
    );
}

#[test]
fn the_readmes_serve_command_knows_which_binary_to_run() {
    // The workspace also builds examples/rust-proxy, so a bare `cargo run`
    // (the README's first command) needs the package to name its binary.
    let manifest =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
            .expect("Cargo.toml");
    let package = manifest.split("[workspace]").next().unwrap_or_default();
    assert!(
        package.contains("default-run = \"tollgate\""),
        "[package] must set default-run = \"tollgate\""
    );
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README.md");
    assert!(readme.contains("cargo run --release -- serve --config deploy/tollgate.example.yaml"));
}
