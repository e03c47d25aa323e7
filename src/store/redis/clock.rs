//! The replica's view of Redis's clock: only to choose which calendar
//! windows to offer the script, which picks among them by Redis's `TIME`.
//!
//! Every script reply carries Redis's `TIME`, so the replica learns how far
//! Redis's clock is from its own and offers windows around Redis's instant,
//! not its own. A replica days off Redis then still offers the right
//! windows (after at most one charge answered "no window holds Redis's
//! clock", which took nothing and is sent once more); the skew is exported
//! as `tollgate_store_clock_skew_seconds` and logged once when it passes
//! [`SKEW_WORTH_TELLING`].

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

/// A skew worth a log line: NTP keeps hosts within milliseconds, so a
/// second means a clock that is not synchronised.
const SKEW_WORTH_TELLING: i64 = 1_000_000;

/// Stands for "not measured yet" in [`ReplicaClock::redis_minus_host_us`].
const UNKNOWN: i64 = i64::MIN;

/// This host's clock, and what it learned of Redis's.
#[derive(Debug)]
pub(crate) struct ReplicaClock {
    /// Added to the host's clock: a test's skew (`store.redis` in code
    /// only), 0 in production.
    skew_us: i64,
    /// Redis's clock minus this host's, µs, from the last reply; [`UNKNOWN`]
    /// before the first.
    redis_minus_host_us: AtomicI64,
    /// True while the skew is past [`SKEW_WORTH_TELLING`] and was logged,
    /// so it is logged once, not per reply.
    told: AtomicBool,
}

impl ReplicaClock {
    pub(crate) fn new(skew_us: i64) -> Self {
        Self {
            skew_us,
            redis_minus_host_us: AtomicI64::new(UNKNOWN),
            told: AtomicBool::new(false),
        }
    }

    /// Microseconds since the Unix epoch on this host, test skew included.
    #[expect(
        clippy::disallowed_methods,
        reason = "only picks which windows to offer; the script picks among them by Redis's TIME"
    )]
    fn host_now_us(&self) -> i64 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX));
        now.saturating_add(self.skew_us)
    }

    /// The instant to offer windows around: this host's clock moved by the
    /// skew last measured, i.e. the best guess of Redis's clock now.
    pub(crate) fn offer_at_us(&self) -> u64 {
        let host = self.host_now_us();
        let at = match self.redis_minus_host_us.load(Ordering::Relaxed) {
            UNKNOWN => host,
            skew => host.saturating_add(skew),
        };
        u64::try_from(at).unwrap_or(0)
    }

    /// Learns from a reply decided at `redis_now_us` on Redis's clock.
    pub(crate) fn observe(&self, redis_now_us: i64) {
        if redis_now_us <= 0 {
            return;
        }
        let skew = redis_now_us.saturating_sub(self.host_now_us());
        self.redis_minus_host_us.store(skew, Ordering::Relaxed);
        let off = skew.unsigned_abs() > SKEW_WORTH_TELLING.unsigned_abs();
        if self.told.swap(off, Ordering::Relaxed) != off {
            let seconds = skew as f64 / 1e6;
            if off {
                tracing::warn!(
                    redis_minus_replica_seconds = seconds,
                    "this replica's clock is off Redis's; budgets keep Redis's windows, but fix the host's clock (NTP)"
                );
            } else {
                tracing::info!(
                    redis_minus_replica_seconds = seconds,
                    "this replica's clock agrees with Redis's again"
                );
            }
        }
    }

    /// Redis's clock minus this host's, µs, once measured.
    pub(crate) fn skew_us(&self) -> Option<i64> {
        match self.redis_minus_host_us.load(Ordering::Relaxed) {
            UNKNOWN => None,
            skew => Some(skew),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offers_windows_around_redis_clock_once_measured() {
        let behind = ReplicaClock::new(-3 * 86_400 * 1_000_000);
        let host = behind.offer_at_us();
        assert_eq!(behind.skew_us(), None);
        let redis = host + 3 * 86_400 * 1_000_000;
        behind.observe(i64::try_from(redis).unwrap());
        let skew = behind.skew_us().unwrap();
        assert!((skew - 3 * 86_400 * 1_000_000).abs() < 1_000_000, "{skew}");
        let offered = behind.offer_at_us();
        assert!(offered.abs_diff(redis) < 1_000_000, "{offered} vs {redis}");
    }
}
