//! Reload on file change, on the real binary: an edited file, a Kubernetes
//! ConfigMap `..data` swap, an envoyproxy/ratelimit directory, a bad file
//! refused with its field path, SIGHUP without the watch, and zero failed
//! calls while reloads happen under load.

use std::os::unix::fs::symlink;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::cli::{config_file, connect, serve, signal};
use crate::common::{ask, free_port, metrics_get, req, wait_for_limit};

/// A config with the demo scope at `capacity`, metrics on `metrics`, and
/// `extra` YAML appended.
fn config(capacity: u64, metrics: u16, extra: &str) -> String {
    format!(
        "metrics:\n  listen: 127.0.0.1:{metrics}\nreload:\n  debounce: 100ms\n{extra}\
         scopes:\n  - name: demo\n    limits:\n      - {{name: per-user, per: identity, capacity: {capacity}, refill_period: 1h}}\n"
    )
}

/// `tollgate_config_reloads_total{result=...}` from the metrics port.
async fn reloads(metrics: u16, result: &str) -> u64 {
    let text = metrics_get(metrics, "/metrics").await;
    let needle = format!("tollgate_config_reloads_total{{result=\"{result}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&needle))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

async fn wait_for_reloads(metrics: u16, result: &str, want: u64) -> u64 {
    let mut got = 0;
    for _ in 0..150 {
        got = reloads(metrics, result).await;
        if got >= want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_under_load_from_file_changes_fail_no_call() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (port, metrics) = (free_port(), free_port());
    let path = config_file(&dir, &config(1_000_000, metrics, ""));
    let _child = serve(&path, port);
    let mut c = connect(port).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut load = Vec::new();
    for i in 0..4 {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        let mut c = connect(port).await;
        load.push(tokio::spawn(async move {
            // Bounded: at most 20 s, whatever happens.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            while !stop.load(Ordering::Relaxed) && tokio::time::Instant::now() < deadline {
                match c
                    .should_allow(req("demo", &format!("load-{i}"), "op"))
                    .await
                {
                    Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    for (n, capacity) in [2_000_000, 3_000_000, 4_000_000, 5_000_000, 6_000_000]
        .into_iter()
        .enumerate()
    {
        config_file(&dir, &config(capacity, metrics, ""));
        assert_eq!(
            wait_for_limit(&mut c, "demo", "probe", capacity).await,
            capacity
        );
        assert_eq!(
            wait_for_reloads(metrics, "accepted", n as u64 + 1).await,
            n as u64 + 1
        );
    }
    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await.expect("load task");
    }
    assert!(ok.load(Ordering::Relaxed) > 100, "the load ran");
    assert_eq!(failed.load(Ordering::Relaxed), 0, "no call failed");
}

/// Lays out `dir` as a ConfigMap volume does: `tollgate.yaml` is a symlink
/// to `..data/tollgate.yaml`, and `..data` a symlink to a timestamped
/// directory, swapped by renaming a new symlink over it.
fn configmap_update(dir: &Path, version: u32, yaml: &str) {
    let data = dir.join(format!("..2026_11_30_{version:02}"));
    std::fs::create_dir(&data).expect("data dir");
    std::fs::write(data.join("tollgate.yaml"), yaml).expect("write");
    let tmp = dir.join("..data_tmp");
    symlink(data.file_name().expect("name"), &tmp).expect("symlink");
    std::fs::rename(&tmp, dir.join("..data")).expect("swap ..data");
    let link = dir.join("tollgate.yaml");
    if !link.exists() {
        symlink("..data/tollgate.yaml", &link).expect("symlink");
    }
    if version > 1 {
        let old = dir.join(format!("..2026_11_30_{:02}", version - 1));
        std::fs::remove_dir_all(old).expect("remove old data");
    }
}

#[tokio::test]
async fn a_configmap_data_swap_is_reloaded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (port, metrics) = (free_port(), free_port());
    configmap_update(dir.path(), 1, &config(3, metrics, ""));
    let _child = serve(&dir.path().join("tollgate.yaml"), port);
    let mut c = connect(port).await;
    assert_eq!(ask(&mut c, req("demo", "kai", "op")).await.limit, 3);
    configmap_update(dir.path(), 2, &config(8, metrics, ""));
    assert_eq!(wait_for_limit(&mut c, "demo", "kai", 8).await, 8);
    configmap_update(dir.path(), 3, &config(9, metrics, ""));
    assert_eq!(wait_for_limit(&mut c, "demo", "kai", 9).await, 9);
    assert_eq!(reloads(metrics, "accepted").await, 2, "one reload per swap");
}

#[tokio::test]
async fn a_bad_file_keeps_the_old_config_and_its_field_path_is_logged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (port, metrics) = (free_port(), free_port());
    let path = config_file(&dir, &config(3, metrics, ""));
    let mut child = serve(&path, port);
    let mut c = connect(port).await;
    config_file(&dir, &config(0, metrics, ""));
    assert_eq!(wait_for_reloads(metrics, "refused", 1).await, 1);
    assert_eq!(ask(&mut c, req("demo", "lou", "op")).await.limit, 3);
    // Touching the file without changing it reloads nothing.
    config_file(&dir, &config(0, metrics, ""));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(reloads(metrics, "refused").await, 1);
    // An empty file (a write caught halfway) is not loaded as "no scopes".
    config_file(&dir, "");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(reloads(metrics, "accepted").await, 0);
    assert_eq!(ask(&mut c, req("demo", "lou", "op")).await.limit, 3);
    config_file(&dir, &config(5, metrics, ""));
    assert_eq!(wait_for_limit(&mut c, "demo", "lou", 5).await, 5);

    signal(&child.0, "-TERM");
    // The server is another process: waiting on it here blocks nothing.
    let _ = child.0.wait();
    let mut out = String::new();
    if let Some(mut e) = child.0.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut out);
    }
    assert!(
        out.contains("scopes[0].limits[0].capacity"),
        "the refusal names the field: {out}"
    );
}

#[tokio::test]
async fn an_envoy_config_directory_is_watched_and_sighup_works_without_the_watch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let envoy = dir.path().join("envoy");
    std::fs::create_dir(&envoy).expect("envoy dir");
    let domain = |n: u32| {
        format!(
            "domain: edge\ndescriptors:\n  - key: remote_address\n    rate_limit: {{unit: second, requests_per_unit: {n}}}\n"
        )
    };
    std::fs::write(envoy.join("edge.yaml"), domain(5)).expect("write");
    let (port, metrics) = (free_port(), free_port());
    let extra = "envoy_ratelimit_configs: [envoy]\n";
    let path = config_file(&dir, &config(3, metrics, extra));
    let _child = serve(&path, port);
    let _ = connect(port).await;
    std::fs::write(envoy.join("edge.yaml"), domain(6)).expect("write");
    assert_eq!(wait_for_reloads(metrics, "accepted", 1).await, 1);

    // With the watch off, a change waits for SIGHUP.
    let (port, metrics) = (free_port(), free_port());
    let unwatched = "reload:\n  watch: false\n";
    let dir = tempfile::tempdir().expect("tempdir");
    let yaml = |cap| config(cap, metrics, "").replace("reload:\n  debounce: 100ms\n", unwatched);
    let path = config_file(&dir, &yaml(3));
    let child = serve(&path, port);
    let mut c = connect(port).await;
    config_file(&dir, &yaml(4));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(ask(&mut c, req("demo", "max", "op")).await.limit, 3);
    signal(&child.0, "-HUP");
    assert_eq!(wait_for_limit(&mut c, "demo", "max", 4).await, 4);
}
