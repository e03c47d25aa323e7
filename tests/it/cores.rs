//! The server on a runtime per core (`grpc.cores`): connections are dealt
//! to the cores in turn, every core serves its share, decisions stay exact
//! on the embedded store and on Redis, TLS handshakes happen on the cores,
//! and the server stops cleanly.

use std::collections::HashMap;
use std::time::Duration;

use crate::common::certs::{Ca, TlsFiles};
use crate::common::redis::Standalone;
use crate::common::{TestServer, ask, req};
use crate::security::tls_channel;
use tollgate::pb::tollgate::v1::rate_limiter_client::RateLimiterClient;
use tonic::transport::Channel;

const CORES: usize = 2;
const CAPACITY: u64 = 40;

fn yaml(store: &str) -> String {
    format!(
        "grpc: {{ cores: {CORES} }}
{store}
scopes:
  - name: s
    limits:
      - {{ name: per-user, per: identity, capacity: {CAPACITY}, refill_period: 1h }}
"
    )
}

/// This process's threads that serve a core, by name, with the CPU each has
/// used so far in nanoseconds (`/proc/self/task/*/schedstat`).
fn core_threads() -> HashMap<String, u64> {
    let mut threads = HashMap::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let name = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        let name = name.trim();
        if !name.starts_with("tollgate-core-") {
            continue;
        }
        let sched = std::fs::read_to_string(task.path().join("schedstat")).unwrap_or_default();
        let ns = sched
            .split_whitespace()
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        *threads.entry(name.to_owned()).or_insert(0) += ns;
    }
    threads
}

/// Asks for one identity's bucket `calls` times over each of `channels`
/// (each its own TCP connection) at once; returns how many were allowed.
async fn hammer(channels: &[Channel], calls: usize) -> u64 {
    let mut tasks = Vec::new();
    for channel in channels {
        for _ in 0..4 {
            let mut client = RateLimiterClient::new(channel.clone());
            tasks.push(tokio::spawn(async move {
                let mut allowed = 0;
                for _ in 0..calls / 4 {
                    let r = ask(&mut client, req("s", "alice", "op")).await;
                    assert!(!r.degraded, "answered by failure mode: {r:?}");
                    allowed += u64::from(r.allowed);
                }
                allowed
            }));
        }
    }
    let mut allowed = 0;
    for task in tasks {
        allowed += task.await.unwrap();
    }
    allowed
}

/// Every core thread used at least `ns` of CPU between `before` and now.
fn every_core_served(before: &HashMap<String, u64>, ns: u64) {
    let after = core_threads();
    assert_eq!(after.len(), CORES, "core threads: {after:?}");
    for (name, used) in &after {
        let spent = used - before.get(name).copied().unwrap_or(0);
        assert!(
            spent >= ns,
            "{name} spent {spent} ns: it served none of the connections ({after:?})"
        );
    }
}

/// One test for every case, in turn: the check on the core threads reads
/// this process's threads by name, so no other test may run a server with
/// `grpc.cores` at the same time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_dealt_to_every_core_and_decisions_stay_exact() {
    let redis = Standalone::start();
    // Timeouts no slow test machine reaches: an answer by failure mode
    // would hide what is measured here.
    let on_redis = format!(
        "store: {{ kind: redis, redis: {{ urls: [\"{}\"], key_prefix: \"test:cores:\", pool_size: 4, response_timeout: 5s, wait_timeout: 5s }} }}",
        redis.url()
    );
    let ca = Ca::new("cores");
    let files = TlsFiles::new(&ca.server(&[]), None);
    let over_tls = format!("tls: {}", files.yaml("10s"));
    for extra in ["", on_redis.as_str(), over_tls.as_str()] {
        let server = TestServer::start(&yaml(extra)).await;
        // The server starts its threads once its task runs.
        let mut before = core_threads();
        for _ in 0..100 {
            if before.len() == CORES {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            before = core_threads();
        }
        assert_eq!(before.len(), CORES, "one thread per core: {before:?}");
        let mut channels = Vec::new();
        for _ in 0..4 {
            channels.push(if extra == over_tls {
                tls_channel(server.addr, &ca.pem, None, "localhost")
                    .await
                    .expect("a TLS connection")
            } else {
                server.channel().await
            });
        }
        let allowed = hammer(&channels, 200).await;
        assert_eq!(
            allowed, CAPACITY,
            "exactly the capacity, over {CORES} cores ({extra:?})"
        );
        every_core_served(&before, 2_000_000);
        drop(channels);
        server.shutdown().await;
        // The threads end with the server.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(core_threads().is_empty(), "{:?}", core_threads());
    }
}
