//! Quota demand on Redis: one `EVALSHA` of `demand.lua` per publication, on
//! the group's node (on Cluster, its hash slot), behind the same breaker as
//! the slot's charges. Not coalesced: a replica publishes a group at most
//! once per report of one of its streams.

use redis::Cmd;

use super::cluster::{self, TryAgain};
use super::keys::{self, demand_key};
use super::{Inner, call_failed, circuit_open};
use crate::store::demand::MAX_DEMAND_VALUE;
use crate::store::{DemandAnswer, DemandCall, Others, StoreError};

/// The script's source.
pub(crate) const SOURCE: &str = include_str!("demand.lua");

/// The script's SHA1, as `EVALSHA` wants it.
pub(crate) fn sha1() -> String {
    redis::Script::new(SOURCE).get_hash().to_owned()
}

/// The `EVALSHA` of one call, every number clamped to what Lua keeps exact.
fn command(sha: &str, prefix: &str, call: &DemandCall<'_>) -> Cmd {
    let clamp = |n: u64| n.min(MAX_DEMAND_VALUE);
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(sha).arg(1).arg(demand_key(prefix, &call.key));
    cmd.arg(call.replica.to_string());
    cmd.arg(clamp(call.held_milli))
        .arg(clamp(call.ask_milli))
        .arg(clamp(call.streams));
    cmd.arg(clamp(call.limit_milli))
        .arg(clamp(call.ttl_us).max(1))
        .arg(clamp(call.max_replicas));
    cmd
}

/// Reads the script's `{granted, others_held, others_ask, others_streams,
/// others, now}`.
fn answer(reply: &[i64]) -> Result<DemandAnswer, StoreError> {
    let &[granted, held, ask, streams, replicas, now] = reply else {
        return Err(StoreError::permanent(format!(
            "demand script replied with {} integers, expected 6",
            reply.len()
        )));
    };
    let unsigned = |n: i64| u64::try_from(n).unwrap_or(0);
    Ok(DemandAnswer {
        granted_milli: unsigned(granted),
        others: Others {
            held_milli: unsigned(held),
            ask_milli: unsigned(ask),
            streams: unsigned(streams),
            replicas: unsigned(replicas),
        },
        now_us: unsigned(now),
    })
}

impl Inner {
    /// One publication behind its breaker (on Cluster, its slot's).
    pub(super) async fn demand(&self, call: &DemandCall<'_>) -> Result<DemandAnswer, StoreError> {
        let slot_breaker = self.breaker_for_key(&call.key);
        let breaker = slot_breaker.as_deref().unwrap_or(&self.breaker);
        if !breaker.admit() {
            return Err(circuit_open());
        }
        let cmd = command(&self.demand_sha, &self.prefix, call);
        let result = self.send_demand(&cmd, call).await;
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
        let answer = answer(&reply)?;
        self.clock.observe(reply[5]);
        Ok(answer)
    }

    /// Sends `cmd`; on `NOSCRIPT` (which ran nothing) loads the script and
    /// sends it once more. Never resent after a timeout.
    async fn send_demand(&self, cmd: &Cmd, call: &DemandCall<'_>) -> Result<Vec<i64>, StoreError> {
        let timeout = self.response_timeout;
        if self.topology.is_cluster() {
            let slot = keys::slot(&call.key);
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
        self.eval_loading(cmd, SOURCE).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_reply_is_an_error_not_a_panic() {
        assert!(answer(&[1, 2]).is_err());
        let a = answer(&[5, 10, 20, 2, 1, 7]).unwrap();
        assert_eq!((a.granted_milli, a.others.streams, a.now_us), (5, 2, 7));
    }
}
