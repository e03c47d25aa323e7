//! Coalescing: concurrent charges bound for one Redis node share one script
//! call; so do concurrent lease calls (`lease.rs`), in their own queues.
//!
//! Each node (on Cluster, each hash slot, since one script may only touch
//! one slot) has a queue and a task that drains it. Natural batching, no
//! timer: the task takes everything queued (up to [`MAX_BATCH`]), yields once
//! to let ready tasks queue theirs, sends it all as one `EVALSHA`, and while
//! that call is in flight, new charges queue up for the next. A lone charge
//! goes out after one pass of the scheduler; under load, batches grow with
//! the load. The script decides each charge atomically on its own, so
//! batching changes how many calls Redis answers, never an outcome.
//!
//! A whole batch fails together only when the call does (a timeout, a lost
//! connection): then Redis decided none of them. A charge whose own keys
//! fail (a key of another type) fails alone; see the script. A caller that
//! stopped waiting before its batch left is dropped from it, so it takes
//! nothing; so is an item that waited in the queue past its owner's
//! patience, which fails. A call still out when its oldest item's patience
//! ends fails all it carries, at once: the task keeps one timer per batch,
//! not one per item.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Weak};

use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::store::{StoreError, affinity};

/// The most charges one call carries. Redis runs one script at a time, so
/// this also bounds how long a batch holds Redis: about 1–2 µs per charge.
pub(crate) const MAX_BATCH: usize = 128;

/// One charge's raw answer from its batch.
#[derive(Debug)]
pub(crate) struct Reply {
    /// The batch's instant, Redis's `TIME` in microseconds.
    pub(crate) now: i64,
    /// The charge's status and per-bucket triples.
    pub(crate) ints: Vec<i64>,
}

/// One item of a batch, encoded for its script.
pub(crate) trait Work: Send + Sync + 'static {
    /// Integers the script answers for this item.
    fn reply_len(&self) -> usize;
}

/// Decides a batch: one script call, as a rule (see [`split`]), and one
/// reply per item, in batch order.
pub(crate) trait BatchCall<W: Work>: Send + Sync + 'static {
    /// How long an item may wait for its answer, from when it was queued.
    /// An item queued longer fails without being sent; a call still out
    /// when its oldest item's time is up fails every item it carries.
    fn patience(&self) -> Duration;
    /// `node` is the queue's: 0, or on Cluster the batch's hash slot.
    fn call(
        &self,
        node: u16,
        batch: &[&W],
    ) -> impl Future<Output = Vec<Result<Reply, StoreError>>> + Send;
}

/// An item waiting for its batch.
#[derive(Debug)]
struct Job<W> {
    charge: W,
    reply: oneshot::Sender<Result<Reply, StoreError>>,
    queued: Instant,
}

/// The queues, one per node (or slot), each drained by its own task; with
/// a runtime per core, one per node and core (see [`affinity`]), so a
/// charge is batched, sent and answered on the core that took it.
#[derive(Debug)]
pub(crate) struct Coalescer<W> {
    queues: Mutex<HashMap<QueueKey, mpsc::UnboundedSender<Job<W>>>>,
}

/// A queue's core (none on the shared runtime) and node.
type QueueKey = (Option<u16>, u16);

impl<W> Default for Coalescer<W> {
    fn default() -> Self {
        Self {
            queues: Mutex::new(HashMap::new()),
        }
    }
}

impl<W: Work> Coalescer<W> {
    /// Queues `charge` for `node`'s next call, starting the node's task on
    /// first use. The task holds `owner` weakly and ends when it is dropped.
    pub(crate) fn submit<B: BatchCall<W>>(
        &self,
        owner: &Arc<B>,
        node: u16,
        charge: W,
    ) -> oneshot::Receiver<Result<Reply, StoreError>> {
        let (reply, answer) = oneshot::channel();
        let mut job = Job {
            charge,
            reply,
            queued: Instant::now(),
        };
        let key = (affinity::current(), node);
        let mut queues = self.queues.lock();
        // Twice at most: a task that ended (its runtime shut down, as
        // between tests) is replaced once.
        for _ in 0..2 {
            let queue = queues.entry(key).or_insert_with(|| {
                let (queue, jobs) = mpsc::unbounded_channel();
                tokio::spawn(drain(Arc::downgrade(owner), node, jobs));
                queue
            });
            match queue.send(job) {
                Ok(()) => break,
                Err(mpsc::error::SendError(back)) => {
                    queues.remove(&key);
                    job = back;
                }
            }
        }
        answer
    }
}

/// One node's task: take what is queued, send it as one call, answer each.
async fn drain<W: Work, B: BatchCall<W>>(
    owner: Weak<B>,
    node: u16,
    mut jobs: mpsc::UnboundedReceiver<Job<W>>,
) {
    let mut batch: Vec<Job<W>> = Vec::with_capacity(MAX_BATCH);
    let mut charges: Vec<W> = Vec::with_capacity(MAX_BATCH);
    let mut waiting = Vec::with_capacity(MAX_BATCH);
    while jobs.recv_many(&mut batch, MAX_BATCH).await > 0 {
        gather(&mut jobs, &mut batch).await;
        // Whoever stopped waiting gets nothing taken on their behalf.
        batch.retain(|job| !job.reply.is_closed());
        let Some(owner) = owner.upgrade() else { return };
        let patience = owner.patience();
        let now = Instant::now();
        // Nor does whoever waited out their patience in the queue.
        for job in batch.extract_if(.., |job| job.queued + patience <= now) {
            let _ = job.reply.send(Err(overdue(patience)));
        }
        let Some(oldest) = batch.iter().map(|job| job.queued).min() else {
            continue;
        };
        for job in batch.drain(..) {
            charges.push(job.charge);
            waiting.push(job.reply);
        }
        {
            let carried: Vec<&W> = charges.iter().collect();
            // One timer per batch, not one per item: each timer that a
            // single-threaded runtime registers before the earliest one its
            // driver saw costs a write to its own eventfd.
            let call = owner.call(node, &carried);
            tokio::pin!(call);
            tokio::select! {
                biased;
                replies = &mut call => answer(&mut waiting, replies),
                () = tokio::time::sleep_until(oldest + patience) => {
                    for reply in waiting.drain(..) {
                        let _ = reply.send(Err(overdue(patience)));
                    }
                    // The call ends by its own bounds, which count its
                    // timeout against its connection; its replies are no
                    // one's now.
                    call.await;
                }
            }
        }
        drop(owner);
        charges.clear();
    }
}

/// An item's error when its answer did not come within `patience`: Redis
/// may or may not have run its call.
fn overdue(patience: Duration) -> StoreError {
    StoreError::transient(format!("Redis did not answer within {patience:?}"))
}

/// Lets the tasks that are ready run once before a batch leaves, and takes
/// what they queued meanwhile. Under load, the requests whose charges would
/// have missed this call by a few microseconds are often ready on this very
/// worker; one yield lets them join it. A lone charge pays one pass of the
/// scheduler (a few microseconds), not a timer.
async fn gather<W>(jobs: &mut mpsc::UnboundedReceiver<Job<W>>, batch: &mut Vec<Job<W>>) {
    if batch.len() >= MAX_BATCH {
        return;
    }
    tokio::task::yield_now().await;
    while batch.len() < MAX_BATCH {
        let Ok(job) = jobs.try_recv() else { break };
        batch.push(job);
    }
}

/// Hands each waiting item its reply, in batch order.
fn answer(
    waiting: &mut Vec<oneshot::Sender<Result<Reply, StoreError>>>,
    replies: Vec<Result<Reply, StoreError>>,
) {
    let mut replies = replies.into_iter();
    for reply_to in waiting.drain(..) {
        let reply = replies.next().unwrap_or_else(|| {
            Err(StoreError::permanent(
                "a batch call answered fewer charges than it carried",
            ))
        });
        // A caller that left meanwhile does not need its answer.
        let _ = reply_to.send(reply);
    }
}

/// Splits one script call's reply for `batch` into each item's part: the
/// reply is `now`, then each item's integers, in batch order. A call that
/// failed fails every item it carried (Redis decided none).
pub(crate) fn split<W: Work>(
    batch: &[&W],
    result: Result<Vec<i64>, StoreError>,
) -> Vec<Result<Reply, StoreError>> {
    let expected = 1 + batch.iter().map(|e| e.reply_len()).sum::<usize>();
    let result = result.and_then(|ints| {
        if ints.len() == expected {
            Ok(ints)
        } else {
            Err(StoreError::permanent(format!(
                "a script replied with {} integers for a batch, expected {expected}",
                ints.len()
            )))
        }
    });
    match result {
        Ok(ints) => {
            let mut at = 1;
            batch
                .iter()
                .map(|e| {
                    let len = e.reply_len();
                    let part = ints[at..at + len].to_vec();
                    at += len;
                    Ok(Reply {
                        now: ints[0],
                        ints: part,
                    })
                })
                .collect()
        }
        Err(e) => batch.iter().map(|_| Err(e.clone())).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Item(u32);

    impl Work for Item {
        fn reply_len(&self) -> usize {
            0
        }
    }

    /// An empty answer for every item of `batch`.
    fn answered(batch: &[&Item]) -> Vec<Result<Reply, StoreError>> {
        batch
            .iter()
            .map(|_| {
                Ok(Reply {
                    now: 0,
                    ints: Vec::new(),
                })
            })
            .collect()
    }

    /// Records each call's items and answers every one.
    #[derive(Default)]
    struct Recorder {
        calls: Mutex<Vec<Vec<u32>>>,
    }

    impl BatchCall<Item> for Recorder {
        fn patience(&self) -> Duration {
            Duration::from_secs(5)
        }
        async fn call(&self, _node: u16, batch: &[&Item]) -> Vec<Result<Reply, StoreError>> {
            self.calls.lock().push(batch.iter().map(|i| i.0).collect());
            answered(batch)
        }
    }

    /// Takes 6 s per call, against a patience of 5 s.
    #[derive(Default)]
    struct Slow {
        calls: Mutex<Vec<Vec<u32>>>,
        ended: std::sync::atomic::AtomicUsize,
    }

    impl BatchCall<Item> for Slow {
        fn patience(&self) -> Duration {
            Duration::from_secs(5)
        }
        async fn call(&self, _node: u16, batch: &[&Item]) -> Vec<Result<Reply, StoreError>> {
            self.calls.lock().push(batch.iter().map(|i| i.0).collect());
            tokio::time::sleep(Duration::from_secs(6)).await;
            self.ended.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            answered(batch)
        }
    }

    /// A call out past its oldest item's patience fails its items then,
    /// and still runs to its end; an item that waited in the queue past its
    /// patience meanwhile fails without being sent.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_call_past_its_patience_fails_its_items_and_an_overdue_item_is_not_sent() {
        let owner = Arc::new(Slow::default());
        let coalescer = Arc::new(Coalescer::<Item>::default());
        let started = Instant::now();
        let first = coalescer.submit(&owner, 0, Item(1));
        tokio::time::sleep(Duration::from_millis(100)).await;
        let second = coalescer.submit(&owner, 0, Item(2));
        let e = first.await.unwrap().unwrap_err();
        assert!(
            e.transient && e.to_string().contains("did not answer within 5s"),
            "{e}"
        );
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        assert_eq!(owner.ended.load(std::sync::atomic::Ordering::SeqCst), 0);
        let e = second.await.unwrap().unwrap_err();
        assert!(e.to_string().contains("did not answer within 5s"), "{e}");
        // Failed when the task was free again: after the first call ended.
        assert_eq!(started.elapsed(), Duration::from_secs(6));
        assert_eq!(owner.ended.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(
            *owner.calls.lock(),
            vec![vec![1]],
            "the overdue item was sent"
        );
    }

    /// With a runtime per core, a charge is batched on its own core: each
    /// pinned thread's charges are drained by a task on its own runtime,
    /// even while the other core's task is alive.
    #[test]
    fn each_core_drains_its_own_queue_on_its_own_thread() {
        /// Records the thread each call ran on.
        #[derive(Default)]
        struct Threads(Mutex<Vec<String>>);
        impl BatchCall<Item> for Threads {
            fn patience(&self) -> Duration {
                Duration::from_secs(5)
            }
            async fn call(&self, _node: u16, batch: &[&Item]) -> Vec<Result<Reply, StoreError>> {
                let name = std::thread::current().name().unwrap_or("").to_owned();
                self.0.lock().push(name);
                answered(batch)
            }
        }
        let owner = Arc::new(Threads::default());
        let coalescer = Arc::new(Coalescer::<Item>::default());
        let (first_done, first_waits) = std::sync::mpsc::channel::<()>();
        let (second_done, second_waits) = tokio::sync::oneshot::channel::<()>();
        let core = |id: u16,
                    done: Box<dyn FnOnce() + Send>,
                    hold: Option<tokio::sync::oneshot::Receiver<()>>| {
            let (owner, coalescer) = (owner.clone(), coalescer.clone());
            std::thread::Builder::new()
                .name(format!("core-{id}"))
                .spawn(move || {
                    affinity::pin(id);
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap();
                    runtime.block_on(async {
                        let answer = coalescer.submit(&owner, 0, Item(u32::from(id)));
                        answer.await.unwrap().unwrap();
                        done();
                        // Keeps this runtime (and its queue's task) running
                        // until the other core has been served.
                        if let Some(hold) = hold {
                            hold.await.unwrap();
                        }
                    });
                })
                .unwrap()
        };
        let first = core(
            0,
            Box::new(move || first_done.send(()).unwrap()),
            Some(second_waits),
        );
        first_waits.recv().unwrap();
        let second = core(1, Box::new(move || second_done.send(()).unwrap()), None);
        second.join().unwrap();
        first.join().unwrap();
        assert_eq!(
            *owner.0.lock(),
            vec!["core-0".to_owned(), "core-1".to_owned()]
        );
    }

    /// On one thread the order is fixed: the drain task takes item 1, then
    /// yields; the task spawned after it queues 2 (whose caller has already
    /// left) and 3 meanwhile. 3 joins 1's call; 2 is not carried, so
    /// nothing is taken for it.
    #[tokio::test(flavor = "current_thread")]
    async fn ready_requests_join_the_batch_and_one_that_left_is_not_carried() {
        let owner = Arc::new(Recorder::default());
        let coalescer = Arc::new(Coalescer::<Item>::default());
        let first = coalescer.submit(&owner, 0, Item(1));
        let late = {
            let (owner, coalescer) = (owner.clone(), coalescer.clone());
            tokio::spawn(async move {
                drop(coalescer.submit(&owner, 0, Item(2)));
                coalescer.submit(&owner, 0, Item(3)).await.unwrap().unwrap();
            })
        };
        first.await.unwrap().unwrap();
        late.await.unwrap();
        assert_eq!(*owner.calls.lock(), vec![vec![1, 3]]);
    }
}
