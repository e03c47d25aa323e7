//! The denial audit log: one line per denial, rate-limited by our own bucket
//! math, so that an attacker hammering a limit cannot flood the log.

use parking_lot::Mutex;
use tokio::time::Instant;

use super::metrics::Metrics;
use crate::bucket::{Shape, Tat};
use crate::limiter::{Decision, Request};

/// Audit lines allowed per second, as a burst that refills over one second.
pub const AUDIT_LINES_PER_SECOND: u64 = 20;

/// Writes sampled audit lines for denials.
#[derive(Debug)]
pub struct Audit {
    shape: Shape,
    state: Mutex<Tat>,
    epoch: Instant,
}

impl Default for Audit {
    fn default() -> Self {
        Self {
            shape: Shape {
                capacity: AUDIT_LINES_PER_SECOND,
                period: 1_000_000_000,
            },
            state: Mutex::new(Tat::default()),
            epoch: Instant::now(),
        }
    }
}

impl Audit {
    /// Logs a denial at `tollgate::audit`, unless the audit budget is spent,
    /// in which case it is only counted.
    pub fn denied(
        &self,
        metrics: &Metrics,
        api: &str,
        scope: &str,
        identity: &str,
        operation: &str,
        d: &Decision,
    ) {
        if !self.admit(metrics) {
            return;
        }
        let rule = d.primary().map_or("", |b| &*b.rule);
        tracing::info!(
            target: "tollgate::audit",
            api,
            scope,
            identity,
            operation,
            rule,
            retry_after_ms = d.retry_after.map(|r| r.as_millis() as u64),
            reason = d.reason.as_deref().unwrap_or(""),
            "denied"
        );
    }

    /// Logs a ban a penalty box started, from the same budget.
    pub fn banned(&self, metrics: &Metrics, api: &str, req: &Request<'_>, d: &Decision) {
        if !self.admit(metrics) {
            return;
        }
        tracing::warn!(
            target: "tollgate::audit",
            api,
            scope = req.scope,
            identity = req.identity,
            operation = req.operation,
            ban_ms = d.retry_after.map(|r| r.as_millis() as u64),
            until_us = d.penalty.banned.map(|b| b.until_us),
            "banned"
        );
    }

    /// Logs a call refused by caller authorization (`caller` is the
    /// configured name, or `_unauthenticated`), from the same budget as the
    /// denials, so neither flood can flood the log.
    pub fn refused(&self, metrics: &Metrics, api: &str, caller: &str, scope: &str, why: &str) {
        if !self.admit(metrics) {
            return;
        }
        tracing::warn!(target: "tollgate::audit", api, caller, scope, reason = why, "refused");
    }

    /// Takes one line from the budget; counts it as suppressed when spent.
    fn admit(&self, metrics: &Metrics) -> bool {
        // One second in, so the first lines find the bucket full.
        let now =
            u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX) + 1_000_000_000;
        let admitted = {
            let mut tat = self.state.lock();
            let v = self.shape.judge(*tat, now, 1);
            if v.conforms {
                *tat = v.after;
            }
            v.conforms
        };
        if !admitted {
            metrics.audit_suppressed();
        }
        admitted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn refusals_share_the_denials_budget_and_the_rest_are_counted() {
        let (audit, metrics) = (Audit::default(), Metrics::new());
        for _ in 0..AUDIT_LINES_PER_SECOND + 5 {
            audit.refused(&metrics, "tollgate", "edge", "b", "not granted");
        }
        let text = metrics.encode();
        assert!(
            text.contains("tollgate_audit_lines_suppressed_total 5"),
            "{text}"
        );
        // A second later the budget is back.
        tokio::time::advance(std::time::Duration::from_secs(1)).await;
        audit.refused(&metrics, "tollgate", "edge", "b", "not granted");
        assert!(
            metrics
                .encode()
                .contains("tollgate_audit_lines_suppressed_total 5")
        );
    }
}
