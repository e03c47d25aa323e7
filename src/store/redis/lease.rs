//! Leases on Redis: each operation goes through its pool's node queue (on
//! Cluster, its hash slot's), and concurrent operations share one `EVALSHA`
//! of `lease.lua`, as charges share `decide.lua`'s (`coalesce.rs`), behind
//! the same breaker as the slot's charges.

use futures_util::future::join_all;
use redis::{Cmd, ErrorKind, ServerErrorKind, Value};

use super::cluster::{self, TryAgain};
use super::coalesce::{self, BatchCall, Reply, Work};
use super::keys::{self, lease_keys};
use super::topology::{CallError, Request};
use super::{Inner, call_failed, circuit_open};
use crate::store::{LeaseCall, LeaseOp, LeaseOutcome, LiveLease, StoreError};

/// The script's source: the pool functions it shares with `decide.lua`,
/// then its own.
pub(crate) const SOURCE: &str = concat!(include_str!("lease_pool.lua"), include_str!("lease.lua"));

/// The script's SHA1, as `EVALSHA` wants it.
pub(crate) fn sha1() -> String {
    redis::Script::new(SOURCE).get_hash().to_owned()
}

/// The read-only listing script (`LeaseOp::List`), sent apart from the
/// batches: its reply is not five integers per operation.
const LIST_SOURCE: &str = include_str!("lease_list.lua");

/// Integers the script answers per operation.
const REPLY_LEN: usize = 5;

/// One operation, encoded for its batch: its two keys and seven arguments
/// (see the script's header).
#[derive(Debug)]
pub(crate) struct Encoded {
    keys: [String; 2],
    op: &'static str,
    lease_id: String,
    numbers: [u64; 4],
    dry_run: bool,
}

impl Work for Encoded {
    fn reply_len(&self) -> usize {
        REPLY_LEN
    }
}

fn encode(prefix: &str, call: &LeaseCall<'_>) -> Encoded {
    let (op, limit, weight, reserve, ttl, dry_run) = match call.op {
        LeaseOp::Acquire {
            limit,
            weight,
            reserve,
            ttl_us,
            dry_run,
        } => ("a", limit, weight, reserve, ttl_us, dry_run),
        LeaseOp::Renew { ttl_us } => ("r", 0, 0, 0, ttl_us, false),
        LeaseOp::Release => ("l", 0, 0, 0, 0, false),
        // Never batched (`Inner::lease` sends a list apart); a release
        // of the empty id would change nothing.
        LeaseOp::List { .. } => ("l", 0, 0, 0, 0, false),
    };
    Encoded {
        keys: lease_keys(prefix, &call.pool),
        op,
        lease_id: call.lease_id.to_owned(),
        numbers: [limit, weight, reserve, ttl],
        dry_run,
    }
}

/// The `EVALSHA` of a batch.
fn evalsha<'a>(sha: &str, batch: impl Iterator<Item = &'a Encoded> + Clone) -> Cmd {
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(sha).arg(2 * batch.clone().count());
    for e in batch.clone() {
        cmd.arg(e.keys[0].as_str()).arg(e.keys[1].as_str());
    }
    for e in batch {
        cmd.arg(e.op).arg(e.lease_id.as_str());
        for n in e.numbers {
            cmd.arg(n);
        }
        cmd.arg(u8::from(e.dry_run));
    }
    cmd
}

/// Reads one operation's `{ok, expires_at, in_flight, earliest, expired}`.
fn outcome(now: i64, reply: &[i64]) -> Result<LeaseOutcome, StoreError> {
    let &[ok, at, in_flight, earliest, expired] = reply else {
        return Err(StoreError::permanent(format!(
            "lease script replied with {} integers, expected {REPLY_LEN}",
            reply.len()
        )));
    };
    if ok < 0 {
        return Err(StoreError::permanent(
            "a lease pool's key in Redis holds another type",
        ));
    }
    let unsigned = |n: i64| u64::try_from(n).unwrap_or(0);
    Ok(LeaseOutcome {
        ok: ok == 1,
        expires_at_us: unsigned(at),
        in_flight: unsigned(in_flight),
        earliest_expiry_us: u64::try_from(earliest).ok(),
        now_us: unsigned(now),
        expired: unsigned(expired),
        ..LeaseOutcome::default()
    })
}

/// Reads the listing script's `{now, live, in_flight, (id, expiry,
/// weight)...}`.
fn listed(reply: Vec<Value>) -> Result<LeaseOutcome, StoreError> {
    let bad = || StoreError::permanent("the lease listing script replied in another shape");
    let int = |v: &Value| match v {
        Value::Int(n) => u64::try_from(*n).map_err(|_| bad()),
        _ => Err(bad()),
    };
    let (head, rest) = reply.split_at_checked(3).ok_or_else(bad)?;
    if rest.len() % 3 != 0 {
        return Err(bad());
    }
    let live = rest
        .chunks_exact(3)
        .map(|l| match &l[0] {
            Value::BulkString(id) => Ok(LiveLease {
                lease_id: String::from_utf8_lossy(id).into(),
                expires_at_us: int(&l[1])?,
                weight: int(&l[2])?,
            }),
            _ => Err(bad()),
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(LeaseOutcome {
        ok: true,
        now_us: int(&head[0])?,
        live_total: int(&head[1])?,
        in_flight: int(&head[2])?,
        live,
        ..LeaseOutcome::default()
    })
}

impl Inner {
    /// One lease operation behind its breaker (on Cluster, its slot's), in
    /// its node's next batch; a list goes alone.
    pub(super) async fn lease(
        self: &std::sync::Arc<Self>,
        call: &LeaseCall<'_>,
    ) -> Result<LeaseOutcome, StoreError> {
        let slot_breaker = self.breaker_for_key(&call.pool);
        let breaker = slot_breaker.as_deref().unwrap_or(&self.breaker);
        if !breaker.admit() {
            return Err(circuit_open());
        }
        if let LeaseOp::List { max } = call.op {
            // A read for Explain: it neither trips nor heals the breaker.
            return self.list_leases(call, max).await;
        }
        let node = if self.topology.is_cluster() {
            keys::slot(&call.pool)
        } else {
            0
        };
        let answer = self
            .lease_coalescer
            .submit(self, node, encode(&self.prefix, call));
        let result = self.await_batch(answer).await;
        let opened = match &result {
            Err(e) if e.transient => breaker.failed(e),
            _ => {
                breaker.succeeded();
                false
            }
        };
        if slot_breaker.is_none() {
            self.lost_if_opened(opened);
        }
        let reply = result?;
        self.clock.observe(reply.now);
        outcome(reply.now, &reply.ints)
    }

    /// A pool's live leases, in one `EVAL` of the read-only listing script
    /// (routed by its keys on Cluster).
    async fn list_leases(
        &self,
        call: &LeaseCall<'_>,
        max: u32,
    ) -> Result<LeaseOutcome, StoreError> {
        let [pool, weights] = lease_keys(&self.prefix, &call.pool);
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(LIST_SOURCE).arg(2).arg(pool).arg(weights).arg(max);
        let reply = self
            .topology
            .call::<Vec<Value>>(Request::Cmd(&cmd), self.response_timeout)
            .await
            .map_err(call_failed)?;
        let outcome = listed(reply)?;
        self.clock
            .observe(i64::try_from(outcome.now_us).unwrap_or(i64::MAX));
        Ok(outcome)
    }

    /// A batch on Cluster, to its slot's node; a batch whose keys a slot
    /// migration split gets `TRYAGAIN` (it ran nothing), and then each
    /// operation goes alone, as charges do.
    async fn send_leases_on_cluster(
        &self,
        slot: u16,
        batch: &[&Encoded],
    ) -> Vec<Result<Reply, StoreError>> {
        let timeout = self.response_timeout;
        let eval = |batch: &[&Encoded], again| {
            let cmd = evalsha(&self.lease_sha, batch.iter().copied());
            async move { cluster::eval_source(&self.topology, &cmd, SOURCE, slot, timeout, again).await }
        };
        if batch.len() == 1 {
            let result = eval(batch, TryAgain::Wait).await;
            return coalesce::split(batch, result.map_err(call_failed));
        }
        match eval(batch, TryAgain::Return).await {
            Err(CallError::Redis(e))
                if e.kind() == ErrorKind::Server(ServerErrorKind::TryAgain) =>
            {
                let alone = batch.iter().map(|&one| async move {
                    let result = eval(&[one], TryAgain::Wait).await.map_err(call_failed);
                    coalesce::split(&[one], result).pop().unwrap_or_else(|| {
                        Err(StoreError::permanent("a lease call answered no operation"))
                    })
                });
                join_all(alone).await
            }
            result => coalesce::split(batch, result.map_err(call_failed)),
        }
    }
}

impl BatchCall<Encoded> for Inner {
    fn patience(&self) -> std::time::Duration {
        self.batch_patience()
    }
    async fn call(&self, node: u16, batch: &[&Encoded]) -> Vec<Result<Reply, StoreError>> {
        if self.topology.is_cluster() {
            return self.send_leases_on_cluster(node, batch).await;
        }
        let cmd = evalsha(&self.lease_sha, batch.iter().copied());
        coalesce::split(batch, self.eval_loading(&cmd, SOURCE).await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_reply_is_an_error_not_a_panic() {
        assert!(outcome(7, &[1, 2]).is_err());
        assert!(outcome(7, &[-1, 0, 0, -1, 0]).is_err());
        let o = outcome(7, &[0, 0, 5, -1, 2]).unwrap();
        assert_eq!(
            (o.ok, o.in_flight, o.earliest_expiry_us, o.expired, o.now_us),
            (false, 5, None, 2, 7)
        );
    }

    #[test]
    fn a_listing_reply_is_read_or_refused() {
        let id = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let ok = listed(vec![
            Value::Int(9),
            Value::Int(3),
            Value::Int(4),
            id("a"),
            Value::Int(20),
            Value::Int(1),
        ])
        .unwrap();
        assert_eq!((ok.now_us, ok.live_total, ok.in_flight), (9, 3, 4));
        assert_eq!(&*ok.live[0].lease_id, "a");
        assert_eq!((ok.live[0].expires_at_us, ok.live[0].weight), (20, 1));
        assert!(listed(vec![Value::Int(9)]).is_err());
        assert!(listed(vec![Value::Int(9), Value::Int(3), Value::Int(4), id("a")]).is_err());
        assert!(listed(vec![Value::Int(9), Value::Int(-3), Value::Int(4)]).is_err());
    }
}
