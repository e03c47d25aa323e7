//! Leases on Redis: one `EVALSHA` of `lease.lua` per operation, on the
//! pool's node (on Cluster, its hash slot), behind the same breaker as the
//! slot's charges. Not coalesced: a lease call is one small script, and its
//! reply is its own.

use redis::{Cmd, ErrorKind, ServerErrorKind};

use super::cluster::{self, TryAgain};
use super::keys::{self, lease_keys};
use super::topology::{CallError, Request};
use super::{Inner, call_failed, circuit_open};
use crate::store::{LeaseCall, LeaseOp, LeaseOutcome, StoreError};

/// The script's source.
pub(crate) const SOURCE: &str = include_str!("lease.lua");

/// The script's SHA1, as `EVALSHA` wants it.
pub(crate) fn sha1() -> String {
    redis::Script::new(SOURCE).get_hash().to_owned()
}

/// The `EVALSHA` of one call.
fn command(sha: &str, prefix: &str, call: &LeaseCall<'_>) -> Cmd {
    let [pool, weights] = lease_keys(prefix, &call.pool);
    let (op, limit, weight, reserve, ttl, dry) = match call.op {
        LeaseOp::Acquire {
            limit,
            weight,
            reserve,
            ttl_us,
            dry_run,
        } => ("a", limit, weight, reserve, ttl_us, u8::from(dry_run)),
        LeaseOp::Renew { ttl_us } => ("r", 0, 0, 0, ttl_us, 0),
        LeaseOp::Release => ("l", 0, 0, 0, 0, 0),
    };
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(sha).arg(2).arg(pool).arg(weights);
    cmd.arg(op).arg(call.lease_id);
    cmd.arg(limit).arg(weight).arg(reserve).arg(ttl).arg(dry);
    cmd
}

/// Reads the script's `{ok, expires_at, in_flight, earliest, now, expired}`.
fn outcome(reply: &[i64]) -> Result<LeaseOutcome, StoreError> {
    let &[ok, at, in_flight, earliest, now, expired] = reply else {
        return Err(StoreError::permanent(format!(
            "lease script replied with {} integers, expected 6",
            reply.len()
        )));
    };
    let unsigned = |n: i64| u64::try_from(n).unwrap_or(0);
    Ok(LeaseOutcome {
        ok: ok == 1,
        expires_at_us: unsigned(at),
        in_flight: unsigned(in_flight),
        earliest_expiry_us: u64::try_from(earliest).ok(),
        now_us: unsigned(now),
        expired: unsigned(expired),
    })
}

impl Inner {
    /// One lease call behind its breaker (on Cluster, its slot's).
    pub(super) async fn lease(&self, call: &LeaseCall<'_>) -> Result<LeaseOutcome, StoreError> {
        let slot_breaker = self.breaker_for_key(&call.pool);
        let breaker = slot_breaker.as_deref().unwrap_or(&self.breaker);
        if !breaker.admit() {
            return Err(circuit_open());
        }
        let cmd = command(&self.lease_sha, &self.prefix, call);
        let result = self.send_lease(&cmd, call).await;
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
        let outcome = outcome(&reply)?;
        self.clock.observe(reply[4]);
        Ok(outcome)
    }

    /// Sends `cmd`; on `NOSCRIPT` (which ran nothing) loads the lease script
    /// and sends it once more. Never resent after a timeout.
    async fn send_lease(&self, cmd: &Cmd, call: &LeaseCall<'_>) -> Result<Vec<i64>, StoreError> {
        let timeout = self.response_timeout;
        if self.topology.is_cluster() {
            let slot = keys::slot(&call.pool);
            return cluster::eval_source(
                &self.topology,
                cmd,
                SOURCE,
                slot,
                timeout,
                TryAgain::Wait,
            )
            .await
            .map_err(call_failed);
        }
        for attempt in 0..2 {
            match self
                .topology
                .call::<Vec<i64>>(Request::Cmd(cmd), timeout)
                .await
            {
                Ok(ints) => return Ok(ints),
                Err(CallError::Redis(e))
                    if attempt == 0 && e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) =>
                {
                    let mut load = redis::cmd("SCRIPT");
                    load.arg("LOAD").arg(SOURCE);
                    self.topology
                        .call::<redis::Value>(Request::Cmd(&load), timeout)
                        .await
                        .map_err(call_failed)?;
                }
                Err(e) => return Err(call_failed(e)),
            }
        }
        Err(StoreError::transient("Redis kept answering NOSCRIPT"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_reply_is_an_error_not_a_panic() {
        assert!(outcome(&[1, 2]).is_err());
        let o = outcome(&[0, 0, 5, -1, 7, 2]).unwrap();
        assert_eq!(
            (o.ok, o.in_flight, o.earliest_expiry_us, o.expired),
            (false, 5, None, 2)
        );
    }
}
