//! A circuit breaker, so that a dead Redis costs microseconds per decision,
//! not a timeout per decision.
//!
//! Closed: calls pass; `threshold` failures in a row open it. Open: calls fail
//! at once for `cool_down`; then one call (a request or the background probe)
//! passes as a probe, and the next cool-down starts, so a probe that never
//! reports cannot wedge it. Any success closes it. Only state changes are
//! logged: "Redis lost" and "Redis back".

use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

/// The breaker's tuning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerSettings {
    /// Consecutive failures that open the breaker.
    pub threshold: u32,
    /// How long an open breaker refuses calls before letting a probe through.
    pub cool_down: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed { failures: u32 },
    Open { probe_at: Instant },
}

/// The breaker. A short critical section, so a plain mutex.
#[derive(Debug)]
pub(crate) struct Breaker {
    settings: BreakerSettings,
    state: Mutex<State>,
    /// The Cluster hash slot it guards, for logs; `None` guards the server.
    slot: Option<u16>,
}

impl Breaker {
    pub(crate) fn new(settings: BreakerSettings) -> Self {
        Self::for_slot(settings, None)
    }

    fn for_slot(settings: BreakerSettings, slot: Option<u16>) -> Self {
        Self {
            settings: BreakerSettings {
                threshold: settings.threshold.max(1),
                cool_down: settings.cool_down,
            },
            state: Mutex::new(State::Closed { failures: 0 }),
            slot,
        }
    }

    /// True when a call may go to Redis now. While open, true once per
    /// cool-down: that call is the probe.
    pub(crate) fn admit(&self) -> bool {
        let mut state = self.state.lock();
        match *state {
            State::Closed { .. } => true,
            State::Open { probe_at } => {
                let now = Instant::now();
                if now >= probe_at {
                    *state = State::Open {
                        probe_at: now + self.settings.cool_down,
                    };
                    true
                } else {
                    false
                }
            }
        }
    }

    /// Records a call that reached Redis and got an answer.
    pub(crate) fn succeeded(&self) {
        let mut state = self.state.lock();
        if matches!(*state, State::Open { .. }) {
            tracing::info!(
                slot = self.slot,
                "Redis back: circuit closed, decisions go to Redis again"
            );
        }
        *state = State::Closed { failures: 0 };
    }

    /// Records a call that failed to reach Redis or timed out. True when
    /// this failure opened the breaker.
    pub(crate) fn failed(&self, error: &dyn std::fmt::Display) -> bool {
        let mut state = self.state.lock();
        match *state {
            State::Closed { failures } if failures + 1 < self.settings.threshold => {
                *state = State::Closed {
                    failures: failures + 1,
                };
                false
            }
            State::Closed { .. } => {
                tracing::warn!(
                    %error,
                    slot = self.slot,
                    cool_down = ?self.settings.cool_down,
                    "Redis lost: circuit open, decisions follow each scope's failure_mode until a probe succeeds"
                );
                *state = State::Open {
                    probe_at: Instant::now() + self.settings.cool_down,
                };
                true
            }
            // A failed probe: the next cool-down already started in `admit`.
            State::Open { .. } => false,
        }
    }

    /// Opens the breaker at once, e.g. when Redis is unreachable at start.
    pub(crate) fn trip(&self, error: &dyn std::fmt::Display) {
        let mut state = self.state.lock();
        if matches!(*state, State::Closed { .. }) {
            tracing::warn!(%error, "Redis unreachable: circuit open");
            *state = State::Open {
                probe_at: Instant::now() + self.settings.cool_down,
            };
        }
    }

    /// True while the breaker is open.
    pub(crate) fn is_open(&self) -> bool {
        matches!(*self.state.lock(), State::Open { .. })
    }
}

/// One breaker per Cluster hash slot, made on first use. On Cluster a dead
/// shard must not share a breaker with live ones: their successes would
/// keep resetting it, and every call to the dead shard would pay the whole
/// timeout. A scope's buckets share one slot, so in practice this is a
/// breaker per scope, and scopes on live shards never notice a dead one.
#[derive(Debug)]
pub(crate) struct SlotBreakers {
    settings: BreakerSettings,
    slots: Mutex<std::collections::HashMap<u16, std::sync::Arc<Breaker>>>,
}

impl SlotBreakers {
    pub(crate) fn new(settings: BreakerSettings) -> Self {
        Self {
            settings,
            slots: Mutex::new(std::collections::HashMap::new()),
        }
    }

    /// The breaker of `slot`.
    pub(crate) fn get(&self, slot: u16) -> std::sync::Arc<Breaker> {
        self.slots
            .lock()
            .entry(slot)
            .or_insert_with(|| std::sync::Arc::new(Breaker::for_slot(self.settings, Some(slot))))
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> Breaker {
        Breaker::new(BreakerSettings {
            threshold: 2,
            cool_down: Duration::from_millis(100),
        })
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_threshold_failures_in_a_row() {
        let b = breaker();
        b.failed(&"x");
        b.succeeded();
        b.failed(&"x");
        assert!(!b.is_open());
        b.failed(&"x");
        assert!(b.is_open());
        assert!(!b.admit());
    }

    #[tokio::test(start_paused = true)]
    async fn a_slot_breaker_opens_alone() {
        let slots = SlotBreakers::new(BreakerSettings {
            threshold: 2,
            cool_down: Duration::from_millis(100),
        });
        let (dead, live) = (slots.get(1), slots.get(2));
        for _ in 0..5 {
            dead.failed(&"timeout");
            live.succeeded();
        }
        assert!(dead.is_open(), "successes elsewhere do not reset it");
        assert!(!live.is_open());
        assert!(slots.get(1).is_open(), "the same breaker on every call");
    }

    #[tokio::test(start_paused = true)]
    async fn lets_one_probe_through_per_cool_down_and_closes_on_success() {
        let b = breaker();
        b.trip(&"down");
        assert!(!b.admit());
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(b.admit(), "the probe");
        assert!(!b.admit(), "only one probe per cool-down");
        b.failed(&"still down");
        assert!(b.is_open());
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(b.admit());
        b.succeeded();
        assert!(!b.is_open());
        assert!(b.admit());
    }
}
