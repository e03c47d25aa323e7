//! The penalty box's operator side on Redis: one `EVAL` of `penalty.lua`
//! per ban, unban or listing, on the scope's hash slot. Operators call it
//! rarely, so it sends the script's source each time: no script cache to
//! load or lose. A ban or an unban is also published, by the same script,
//! to every replica's ban cache (see `invalidation.rs`).

use std::time::Duration;

use redis::Value;

use super::invalidation;
use super::keys::{bans_key, caller_of, penalty_key, reasons_key};
use super::topology::Request;
use super::{Inner, call_failed};
use crate::store::{Ban, BanEntry, BanPosition, PenaltyAnswer, PenaltyOp, StoreError};

/// The script's source.
const SOURCE: &str = include_str!("penalty.lua");

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl Inner {
    /// Runs one operator request against the scope's keys.
    pub(super) async fn penalties(&self, op: &PenaltyOp<'_>) -> Result<PenaltyAnswer, StoreError> {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(SOURCE);
        match *op {
            PenaltyOp::Ban {
                key,
                duration,
                forget,
                reason,
            } => {
                cmd.arg(3)
                    .arg(penalty_key(&self.prefix, &key))
                    .arg(bans_key(&self.prefix, key.scope))
                    .arg(reasons_key(&self.prefix, key.scope))
                    .arg("ban")
                    .arg(micros(duration).max(1))
                    .arg(micros(forget))
                    .arg(invalidation::channel(&self.prefix))
                    .arg(invalidation::message(&key))
                    .arg(reason);
            }
            PenaltyOp::Unban { key } => {
                cmd.arg(3)
                    .arg(penalty_key(&self.prefix, &key))
                    .arg(bans_key(&self.prefix, key.scope))
                    .arg(reasons_key(&self.prefix, key.scope))
                    .arg("unban")
                    .arg(0)
                    .arg(0)
                    .arg(invalidation::channel(&self.prefix))
                    .arg(invalidation::message(&key));
            }
            PenaltyOp::List {
                scope,
                after,
                limit,
            } => {
                cmd.arg(2)
                    .arg(bans_key(&self.prefix, scope))
                    .arg(reasons_key(&self.prefix, scope))
                    .arg("list")
                    .arg(after.map_or(String::new(), |c| c.until.to_string()))
                    .arg(limit)
                    .arg(after.map_or(&[][..], |c| c.caller));
            }
        }
        let reply: Vec<Value> = self
            .topology
            .call(Request::Cmd(&cmd), self.response_timeout)
            .await
            .map_err(call_failed)?;
        answer(op, &reply).ok_or_else(|| StoreError::permanent("penalty script replied oddly"))
    }
}

fn int(v: &Value) -> Option<u64> {
    match v {
        Value::Int(i) => u64::try_from(*i).ok(),
        _ => None,
    }
}

/// Reads the script's reply to `op`.
fn answer(op: &PenaltyOp<'_>, reply: &[Value]) -> Option<PenaltyAnswer> {
    let now = int(reply.first()?)?;
    Some(match op {
        PenaltyOp::Ban { .. } => {
            let until = int(reply.get(1)?)?;
            PenaltyAnswer::Banned(Ban {
                retry_after: Duration::from_micros(until.saturating_sub(now)),
                until_us: until,
                started: true,
            })
        }
        PenaltyOp::Unban { .. } => PenaltyAnswer::Unbanned(int(reply.get(1)?)? == 1),
        PenaltyOp::List { .. } => {
            let total = int(reply.get(1)?)?;
            let more = int(reply.get(2)?)? == 1;
            let mut bans = Vec::new();
            for ban in reply.get(3..)?.chunks(3) {
                let [Value::BulkString(member), until, reason] = ban else {
                    return None;
                };
                let reason = match reason {
                    Value::BulkString(r) => String::from_utf8_lossy(r).into_owned(),
                    _ => String::new(),
                };
                let until = int(until)?;
                let (identity, operation) = caller_of(&String::from_utf8_lossy(member));
                bans.push(BanEntry {
                    identity,
                    operation,
                    remaining: Duration::from_micros(until.saturating_sub(now)),
                    until_us: until,
                    position: BanPosition {
                        until,
                        caller: member.clone(),
                    },
                    reason,
                });
            }
            PenaltyAnswer::Listed { total, bans, more }
        }
    })
}
