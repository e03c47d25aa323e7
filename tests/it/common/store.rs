//! Store-level fixtures: a one-bucket charge, and a load that calls a store
//! continuously while a test breaks what is under it.
#![allow(dead_code, unreachable_pub)]

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;
use tollgate::bucket::Shape;
use tollgate::store::{BucketCharge, BucketKey, Charge};

/// A charge of 1 from the bucket `s`/`r`/`identity` of `capacity` tokens per
/// `period`; not a dry run.
pub fn charge(identity: &str, capacity: u64, period: Duration) -> Charge<'_> {
    Charge {
        buckets: smallvec::smallvec![BucketCharge {
            key: BucketKey {
                scope: "s",
                rule: "r",
                identity: Some(identity),
                operation: None,
                hash_tag: Default::default(),
            },
            shape: Shape {
                capacity,
                period: period.as_nanos() as u64,
            },
            cost: 1,
            shadow: false,
            reserve: 0,
            window: None,
            max_delay: std::time::Duration::ZERO,
        }],
        dry_run: false,
        marks: false,
        lease: None,
        open: None,
        penalty: None,
    }
}

/// Calls a store from several tasks until stopped, counting the calls that
/// succeeded and those that failed.
pub struct Load {
    /// Calls that succeeded so far.
    pub ok: Arc<AtomicU64>,
    /// Calls that failed so far.
    pub failed: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Load {
    /// Starts `callers` tasks; task `i` awaits `call(i)` over and over until
    /// [`Load::stop`], and `call` says whether the call succeeded. After a
    /// failure the task waits `backoff` before counting it and calling
    /// again, so that an outage is not a busy loop.
    pub fn start<F, Fut>(callers: usize, backoff: Duration, call: F) -> Self
    where
        F: Fn(usize) -> Fut + Clone + Send + 'static,
        Fut: Future<Output = bool> + Send,
    {
        let (ok, failed, stop) = (
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        let tasks = (0..callers)
            .map(|i| {
                let (call, ok, failed, stop) =
                    (call.clone(), ok.clone(), failed.clone(), stop.clone());
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        if call(i).await {
                            ok.fetch_add(1, Ordering::Relaxed);
                        } else {
                            tokio::time::sleep(backoff).await;
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        Self {
            ok,
            failed,
            stop,
            tasks,
        }
    }

    /// Waits until `n` more calls succeed; returns how long that took, or
    /// `None` if it took longer than `within`.
    pub async fn succeeds(&self, n: u64, within: Duration) -> Option<Duration> {
        let t = Instant::now();
        let ok = self.ok.load(Ordering::Relaxed);
        while self.ok.load(Ordering::Relaxed) < ok + n {
            if t.elapsed() > within {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Some(t.elapsed())
    }

    /// Waits until calls fail (the outage is felt), then until a run of 20
    /// of them succeeds again; returns how long after `since` that was.
    /// Panics if either takes until `within` after `since`.
    pub async fn recovered(&self, since: Instant, within: Duration) -> Duration {
        let failed = self.failed.load(Ordering::Relaxed);
        while self.failed.load(Ordering::Relaxed) == failed {
            assert!(since.elapsed() < within, "the outage was never felt");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let ok = self.ok.load(Ordering::Relaxed);
        while self.ok.load(Ordering::Relaxed) < ok + 20 {
            assert!(since.elapsed() < within, "no recovery within {within:?}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        since.elapsed()
    }

    /// Stops every task and waits for it; returns the calls that succeeded
    /// and those that failed.
    pub async fn stop(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.expect("no panic in the load");
        }
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}
