//! The fault matrix: two Tollgate replicas on one Redis topology, callers on
//! one hot bucket and many cold ones, and one fault at a time. Each run
//! records, per failure mode, what was admitted against `C + r·t`
//! (over-admission), the calls that failed, the time to recover, and the
//! p99 latency during the fault.
//!
//! The replicas are two limiters in this process, each with its own Redis
//! store (own connections, breakers and prober), the one with
//! `failure_mode: open`, the other `closed`: one run measures both modes.
//! The fast cases run in CI; `benches/chaos/run.sh` runs the whole table
//! (`full_matrix`, ignored here) and writes it as text and JSON.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

use crate::common::proxy::Proxy;
use crate::common::redis::{Cluster, Sentinel, Standalone, conn, node_id, store_config};
use tollgate::config::{Config, RedisConfig, RedisMode};
use tollgate::limiter::{Limiter, Request, Rules};
use tollgate::store::redis::RedisStore;

/// The hot bucket: 50 tokens, refilled at 50 per second.
const HOT_CAPACITY: f64 = 50.0;
const HOT_RATE: f64 = 50.0;
/// Callers per replica.
const CALLERS: usize = 6;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fault {
    /// SIGKILL the Sentinel primary; the replica is promoted.
    SentinelKillPrimary,
    /// SIGSTOP the Sentinel primary past the response timeout; promoted.
    SentinelStopPrimary,
    /// SIGSTOP a standalone Redis (no replica) for 1.5 s: the breaker.
    StandaloneStop,
    /// Kill the Cluster primary that holds the hot scope; restart it 1.5 s later.
    ClusterKillNode,
    /// Migrate the hot scope's slot to another primary, keys and all.
    ClusterMigrateSlot,
    /// With `hash_tag: identity`, migrate the hot identity's slot while
    /// each of its decisions also charges the scope's bucket in another
    /// slot (reserve and refund).
    ClusterMigrateIdentitySlot,
    /// Redis `maxmemory` reached (writes refused) for 1.5 s.
    MaxMemory,
    /// Nothing gets through between Tollgate and Redis for 1.5 s.
    Blackhole,
}

impl Fault {
    pub(crate) const ALL: [Fault; 8] = [
        Fault::SentinelKillPrimary,
        Fault::SentinelStopPrimary,
        Fault::StandaloneStop,
        Fault::ClusterKillNode,
        Fault::ClusterMigrateSlot,
        Fault::ClusterMigrateIdentitySlot,
        Fault::MaxMemory,
        Fault::Blackhole,
    ];

    fn name(self) -> &'static str {
        match self {
            Fault::SentinelKillPrimary => "sentinel: kill primary",
            Fault::SentinelStopPrimary => "sentinel: SIGSTOP primary",
            Fault::StandaloneStop => "standalone: SIGSTOP, no replica",
            Fault::ClusterKillNode => "cluster: kill a primary",
            Fault::ClusterMigrateSlot => "cluster: migrate a slot",
            Fault::ClusterMigrateIdentitySlot => "cluster, hash_tag identity: migrate a slot",
            Fault::MaxMemory => "standalone: maxmemory reached",
            Fault::Blackhole => "standalone: network blackhole",
        }
    }

    /// The hot bucket's request: the `hot` scope's one bucket, or under
    /// `hash_tag: identity` one identity's bucket of the `spread` scope
    /// (beside that scope's own bucket).
    fn hot_request(self) -> Request<'static> {
        match self {
            Fault::ClusterMigrateIdentitySlot => Request::new("spread", "hot-user", "op"),
            _ => Request::new("hot", "", "op"),
        }
    }

    /// The hash tag of the hot bucket's key.
    fn hot_tag(self) -> &'static str {
        match self {
            Fault::ClusterMigrateIdentitySlot => "spread:hot-user",
            _ => "hot",
        }
    }

    /// Over-admission docs/faults.md documents for this fault: asynchronous
    /// replication can lose the last writes when a primary dies.
    fn window_documented(self) -> bool {
        matches!(
            self,
            Fault::SentinelKillPrimary | Fault::SentinelStopPrimary
        )
    }
}

/// The topology under test, and how to reach it.
enum Topo {
    Standalone(Standalone, Option<Proxy>),
    Sentinel(Sentinel),
    Cluster(Cluster),
}

impl Topo {
    async fn start(fault: Fault) -> Self {
        match fault {
            Fault::SentinelKillPrimary | Fault::SentinelStopPrimary => {
                Topo::Sentinel(tokio::task::spawn_blocking(Sentinel::start).await.unwrap())
            }
            Fault::ClusterKillNode
            | Fault::ClusterMigrateSlot
            | Fault::ClusterMigrateIdentitySlot => Topo::Cluster(
                tokio::task::spawn_blocking(|| {
                    Cluster::start_with(&["--cluster-require-full-coverage", "no"])
                })
                .await
                .unwrap(),
            ),
            Fault::Blackhole => {
                let redis = Standalone::start();
                let proxy = Proxy::start(redis.server.port).await;
                Topo::Standalone(redis, Some(proxy))
            }
            _ => Topo::Standalone(Standalone::start(), None),
        }
    }

    fn config(&self, prefix: &str) -> RedisConfig {
        let (mode, urls) = match self {
            Topo::Standalone(r, None) => (RedisMode::Standalone, vec![r.url()]),
            Topo::Standalone(_, Some(p)) => (RedisMode::Standalone, vec![p.url()]),
            Topo::Sentinel(s) => (RedisMode::Sentinel, s.urls()),
            Topo::Cluster(c) => (RedisMode::Cluster, c.urls()),
        };
        RedisConfig {
            response_timeout: Duration::from_millis(100),
            connect_timeout: Duration::from_millis(300),
            breaker_cool_down: Duration::from_millis(200),
            ..store_config(mode, urls, prefix)
        }
    }

    /// The Cluster node that holds the slot of `tag`.
    fn cluster_owner(&self, tag: &str) -> usize {
        let Topo::Cluster(c) = self else {
            unreachable!()
        };
        c.nodes
            .iter()
            .position(|n| {
                let mut k = conn(n.port).unwrap();
                let slot: i64 = redis::cmd("CLUSTER")
                    .arg("KEYSLOT")
                    .arg(tag)
                    .query(&mut k)
                    .unwrap();
                let keys: i64 = redis::cmd("CLUSTER")
                    .arg("COUNTKEYSINSLOT")
                    .arg(slot)
                    .query(&mut k)
                    .unwrap_or(0);
                keys > 0
            })
            .expect("the hot slot's keys live on one node")
    }

    /// Starts the fault. Returns when it is in place.
    async fn inject(&mut self, fault: Fault) {
        match (fault, &mut *self) {
            (Fault::SentinelKillPrimary, Topo::Sentinel(s)) => s.primary.kill(),
            (Fault::SentinelStopPrimary, Topo::Sentinel(s)) => s.primary.signal("STOP"),
            (Fault::StandaloneStop, Topo::Standalone(r, _)) => r.server.signal("STOP"),
            (Fault::MaxMemory, Topo::Standalone(r, _)) => {
                let _: () = redis::cmd("CONFIG")
                    .arg("SET")
                    .arg("maxmemory")
                    .arg(1)
                    .query(&mut conn(r.server.port).unwrap())
                    .unwrap();
            }
            (Fault::Blackhole, Topo::Standalone(_, Some(p))) => p.blackhole(),
            (Fault::ClusterKillNode, _) => {
                let owner = self.cluster_owner("hot");
                let Topo::Cluster(c) = self else {
                    unreachable!()
                };
                c.nodes[owner].kill();
            }
            (Fault::ClusterMigrateSlot | Fault::ClusterMigrateIdentitySlot, _) => {
                let tag = fault.hot_tag();
                let owner = self.cluster_owner(tag);
                let Topo::Cluster(c) = self else {
                    unreachable!()
                };
                let ports: Vec<u16> = c.nodes.iter().map(|n| n.port).collect();
                tokio::task::spawn_blocking(move || migrate(tag, &ports, owner))
                    .await
                    .unwrap();
            }
            _ => unreachable!("{fault:?} on this topology"),
        }
    }

    /// Ends the fault, where ending it is up to us.
    async fn heal(&mut self, fault: Fault) {
        match (fault, self) {
            (Fault::StandaloneStop, Topo::Standalone(r, _)) => r.server.signal("CONT"),
            (Fault::MaxMemory, Topo::Standalone(r, _)) => {
                let _: () = redis::cmd("CONFIG")
                    .arg("SET")
                    .arg("maxmemory")
                    .arg(0)
                    .query(&mut conn(r.server.port).unwrap())
                    .unwrap();
            }
            (Fault::Blackhole, Topo::Standalone(_, Some(p))) => p.lift(),
            (Fault::ClusterKillNode, Topo::Cluster(c)) => {
                let dead = c.nodes.iter().position(|n| n.pid().is_none()).unwrap();
                let node = &mut c.nodes[dead];
                tokio::task::block_in_place(|| node.start());
            }
            // The others heal themselves (failover) or need no healing.
            _ => {}
        }
    }

    /// Leaves the topology killable on drop.
    fn cleanup(&mut self, fault: Fault) {
        if let (Fault::SentinelStopPrimary, Topo::Sentinel(s)) = (fault, self) {
            s.primary.signal("CONT");
        }
    }
}

/// Moves `tag`'s slot, with its keys, from node `from` to the next node.
fn migrate(tag: &str, ports: &[u16], from: usize) {
    let to = (from + 1) % ports.len();
    let (src, dst) = (ports[from], ports[to]);
    let slot: i64 = redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(tag)
        .query(&mut conn(src).unwrap())
        .unwrap();
    let setslot = |p: u16, args: &[&str]| {
        let _: () = redis::cmd("CLUSTER")
            .arg("SETSLOT")
            .arg(slot)
            .arg(args)
            .query(&mut conn(p).unwrap())
            .unwrap();
    };
    setslot(dst, &["IMPORTING", &node_id(src)]);
    setslot(src, &["MIGRATING", &node_id(dst)]);
    loop {
        let keys: Vec<String> = redis::cmd("CLUSTER")
            .arg("GETKEYSINSLOT")
            .arg(slot)
            .arg(100)
            .query(&mut conn(src).unwrap())
            .unwrap();
        if keys.is_empty() {
            break;
        }
        let _: () = redis::cmd("MIGRATE")
            .arg("127.0.0.1")
            .arg(dst)
            .arg("")
            .arg(0)
            .arg(5000)
            .arg("REPLACE")
            .arg("KEYS")
            .arg(&keys)
            .query(&mut conn(src).unwrap())
            .unwrap();
    }
    for &p in ports {
        setslot(p, &["NODE", &node_id(dst)]);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Allowed,
    Denied,
    /// Allowed without the store (fail-open).
    Degraded,
    /// The store failed and the scope fails closed.
    Unavailable,
}

#[derive(Debug, Clone, Copy)]
struct Call {
    at: Duration,
    replica: usize,
    hot: bool,
    answer: Answer,
    took: Duration,
}

/// One row of the table: one fault, one failure mode.
#[derive(Debug, Clone)]
pub(crate) struct Row {
    pub fault: &'static str,
    pub mode: &'static str,
    pub admitted: u64,
    pub bound: f64,
    pub over: f64,
    pub window_documented: bool,
    pub calls: usize,
    pub failed: usize,
    pub recover_s: f64,
    pub p99_ms: f64,
}

fn limiter(topo: &Topo, mode: &str, prefix: &str) -> (Limiter<RedisStore>, RedisStore) {
    let yaml = format!(
        "failure_mode: {mode}\nscopes:\n  - name: hot\n    limits:\n      - {{ name: hot, per: scope, capacity: {HOT_CAPACITY}, refill_period: 1s }}\n  - name: cold\n    limits:\n      - {{ name: per-user, per: identity, capacity: 5, refill_period: 1s }}\n  - name: spread\n    hash_tag: identity\n    limits:\n      - {{ name: hot, per: identity, capacity: {HOT_CAPACITY}, refill_period: 1s }}\n      - {{ name: all, per: scope, capacity: 1000000, refill_period: 1h }}\n"
    );
    let config = Config::from_yaml(&yaml).expect("valid");
    let store = RedisStore::new(&topo.config(prefix)).expect("store");
    drop(store.spawn_prober(Duration::from_millis(200)));
    (
        Limiter::new(Rules::compile(&config).expect("rules"), store.clone()),
        store,
    )
}

/// Runs `fault` once: warm 1 s, inject, heal after `hold`, run until `end`.
pub(crate) async fn run(fault: Fault, hold: Duration, end: Duration) -> Vec<Row> {
    let mut topo = Topo::start(fault).await;
    let prefix = "matrix";
    let replicas: Vec<Arc<Limiter<RedisStore>>> = ["open", "closed"]
        .iter()
        .map(|mode| Arc::new(limiter(&topo, mode, prefix).0))
        .collect();
    let calls = Arc::new(Mutex::new(Vec::<Call>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (r, replica) in replicas.iter().enumerate() {
        for i in 0..CALLERS {
            let (replica, calls, stop) = (replica.clone(), calls.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let hot = n.is_multiple_of(2);
                    let id = format!("cold-{r}-{i}-{}", n % 50);
                    let req = if hot {
                        fault.hot_request()
                    } else {
                        Request::new("cold", &id, "op")
                    };
                    let t = Instant::now();
                    let answer = match replica.decide(&req).await {
                        Ok(d) if d.degraded => Answer::Degraded,
                        Ok(d) if d.allowed => Answer::Allowed,
                        Ok(_) => Answer::Denied,
                        Err(_) => Answer::Unavailable,
                    };
                    calls.lock().push(Call {
                        at: start.elapsed(),
                        replica: r,
                        hot,
                        answer,
                        took: t.elapsed(),
                    });
                    tokio::time::sleep(Duration::from_millis(3)).await;
                }
            }));
        }
    }
    let warm = Duration::from_secs(1);
    tokio::time::sleep(warm).await;
    topo.inject(fault).await;
    let injected = start.elapsed();
    tokio::time::sleep(hold).await;
    topo.heal(fault).await;
    let healed = if hold.is_zero() {
        injected
    } else {
        start.elapsed()
    };
    tokio::time::sleep(end.saturating_sub(start.elapsed())).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.expect("no panic in the callers");
    }
    topo.cleanup(fault);
    let calls = calls.lock().clone();
    summarize(fault, &calls, injected, healed)
}

fn summarize(fault: Fault, calls: &[Call], injected: Duration, healed: Duration) -> Vec<Row> {
    // The hot bucket is shared by both replicas: one bound for the run,
    // over the time from the first call's start to the last call's end,
    // which holds every take Redis made (a call's take may come well
    // before its answer: under `hash_tag: identity`, a second round trip
    // to the scope's slot follows it).
    let hot: Vec<&Call> = calls.iter().filter(|c| c.hot).collect();
    let first = hot.iter().map(|c| c.at.saturating_sub(c.took)).min();
    let span = match (first, hot.iter().map(|c| c.at).max()) {
        (Some(a), Some(b)) => (b - a).as_secs_f64(),
        _ => 0.0,
    };
    let bound = HOT_CAPACITY + HOT_RATE * span;
    ["open", "closed"]
        .iter()
        .enumerate()
        .map(|(r, mode)| {
            let mine: Vec<&Call> = calls.iter().filter(|c| c.replica == r).collect();
            let admitted = hot.iter().filter(|c| c.answer == Answer::Allowed).count() as u64;
            let failed: Vec<&&Call> = mine
                .iter()
                .filter(|c| matches!(c.answer, Answer::Degraded | Answer::Unavailable))
                .collect();
            let last_failure = failed.iter().map(|c| c.at).max();
            let recover_s = last_failure.map_or(0.0, |t| t.saturating_sub(healed).as_secs_f64());
            let window_end = last_failure.unwrap_or(healed).max(healed);
            let mut during: Vec<Duration> = mine
                .iter()
                .filter(|c| c.at >= injected && c.at <= window_end + Duration::from_millis(10))
                .map(|c| c.took)
                .collect();
            during.sort_unstable();
            let p99 = during
                .get(((during.len() as f64) * 0.99) as usize)
                .or(during.last())
                .copied()
                .unwrap_or_default();
            Row {
                fault: fault.name(),
                mode,
                admitted,
                bound,
                over: (admitted as f64 - bound).max(0.0),
                window_documented: fault.window_documented(),
                calls: mine.len(),
                failed: failed.len(),
                recover_s,
                p99_ms: p99.as_secs_f64() * 1e3,
            }
        })
        .collect()
}

/// The table, as docs/faults.md shows it.
pub(crate) fn table(rows: &[Row]) -> String {
    let mut out = String::from(
        "| fault | failure mode | hot admitted / C + r·t | over-admission | failed calls | recovered | p99 during fault |\n|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        out.push_str(&format!(
            "| {} | {} | {} / {:.0} | {:.0}{} | {} of {} | {:.2} s | {:.1} ms |\n",
            r.fault,
            r.mode,
            r.admitted,
            r.bound,
            r.over,
            if r.window_documented {
                " (replication window)"
            } else {
                ""
            },
            r.failed,
            r.calls,
            r.recover_s,
            r.p99_ms
        ));
    }
    out
}

fn json(rows: &[Row]) -> String {
    let items: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "{{\"fault\":\"{}\",\"failure_mode\":\"{}\",\"hot_admitted\":{},\"bound\":{:.1},\"over_admission\":{:.1},\"replication_window_documented\":{},\"calls\":{},\"failed\":{},\"recovered_after_heal_s\":{:.3},\"p99_during_fault_ms\":{:.2}}}",
                r.fault, r.mode, r.admitted, r.bound, r.over, r.window_documented, r.calls, r.failed, r.recover_s, r.p99_ms
            )
        })
        .collect();
    format!("[\n  {}\n]\n", items.join(",\n  "))
}

fn check(rows: &[Row]) {
    for r in rows {
        assert!(
            r.over == 0.0 || r.window_documented,
            "over-admission outside a documented window: {r:?}"
        );
    }
}

/// The hold and total time of each fault in the full table.
fn timing(fault: Fault) -> (Duration, Duration) {
    match fault {
        Fault::SentinelKillPrimary | Fault::SentinelStopPrimary => {
            (Duration::ZERO, Duration::from_secs(9))
        }
        Fault::ClusterMigrateSlot | Fault::ClusterMigrateIdentitySlot => {
            (Duration::ZERO, Duration::from_secs(4))
        }
        _ => (Duration::from_millis(1_500), Duration::from_secs(5)),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_stop_opens_the_breaker_and_admits_nothing_extra() {
    let rows = run(
        Fault::StandaloneStop,
        Duration::from_millis(1_000),
        Duration::from_millis(3_000),
    )
    .await;
    eprintln!("{}", table(&rows));
    check(&rows);
    let open = &rows[0];
    assert!(open.failed > 0, "the fault was felt");
    assert!(open.recover_s < 2.5, "{open:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blackhole_and_maxmemory_admit_nothing_extra_and_recover() {
    for fault in [Fault::Blackhole, Fault::MaxMemory] {
        let rows = run(
            fault,
            Duration::from_millis(1_000),
            Duration::from_millis(3_000),
        )
        .await;
        eprintln!("{}", table(&rows));
        check(&rows);
        assert!(
            rows.iter().all(|r| r.failed > 0),
            "{fault:?} was felt: {rows:?}"
        );
        // Generous: CI shares two cores among many tests.
        assert!(rows.iter().all(|r| r.recover_s < 2.5), "{rows:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_migration_under_load_admits_nothing_extra() {
    for fault in [Fault::ClusterMigrateSlot, Fault::ClusterMigrateIdentitySlot] {
        let rows = run(fault, Duration::ZERO, Duration::from_millis(3_000)).await;
        eprintln!("{}", table(&rows));
        check(&rows);
        assert!(
            rows.iter().all(|r| r.admitted >= HOT_CAPACITY as u64),
            "{fault:?}: the hot bucket was used: {rows:?}"
        );
    }
}

/// The whole table: `benches/chaos/run.sh` runs this and keeps its output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the full fault table takes a minute; benches/chaos/run.sh runs it"]
async fn full_matrix() {
    let mut rows = Vec::new();
    for fault in Fault::ALL {
        let (hold, end) = timing(fault);
        rows.extend(run(fault, hold, end).await);
    }
    let text = table(&rows);
    println!("{text}");
    let dir = std::env::var("FAULT_MATRIX_DIR").unwrap_or_else(|_| "target/chaos".to_owned());
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(format!("{dir}/faults.md"), &text).unwrap();
    std::fs::write(format!("{dir}/faults.json"), json(&rows)).unwrap();
    check(&rows);
}
