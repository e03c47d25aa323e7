//! Settings of what operators see and how the config follows its files:
//! the heavy-hitter analytics and reload on file change.

use std::time::Duration;

use serde::Deserialize;

/// Default counters per heavy-hitter summary (`m`).
pub const DEFAULT_ANALYTICS_COUNTERS: usize = 64;
/// Default identities per top list (`K`).
pub const DEFAULT_ANALYTICS_TOP_K: usize = 10;
/// The most counters per summary: memory grows linearly with it.
pub const MAX_ANALYTICS_COUNTERS: usize = 4096;
/// Default quiet time after a file change before the config is reloaded.
pub const DEFAULT_RELOAD_DEBOUNCE: Duration = Duration::from_millis(300);

/// Heavy hitters and utilization (per replica, in memory).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnalyticsConfig {
    /// Counters per summary (`m`): each count is at most `N / m` too high,
    /// for `N` decisions in the window, and memory grows with `m`.
    #[serde(default = "default_counters")]
    pub counters: usize,
    /// Identities per top list (`K`) unless a request asks for another
    /// number; at most `counters`.
    #[serde(default = "default_top_k")]
    pub top_k: usize,
}

impl Default for AnalyticsConfig {
    fn default() -> Self {
        Self {
            counters: DEFAULT_ANALYTICS_COUNTERS,
            top_k: DEFAULT_ANALYTICS_TOP_K,
        }
    }
}

fn default_counters() -> usize {
    DEFAULT_ANALYTICS_COUNTERS
}

fn default_top_k() -> usize {
    DEFAULT_ANALYTICS_TOP_K
}

/// Reload on file change.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReloadConfig {
    /// Watch the config file and the envoyproxy/ratelimit paths, and reload
    /// when their contents change. SIGHUP works either way.
    #[serde(default = "default_watch")]
    pub watch: bool,
    /// Quiet time after the last change before reloading, so a file written
    /// in several steps (or a ConfigMap swap) is read once, whole.
    #[serde(default = "default_debounce", with = "humantime_serde")]
    pub debounce: Duration,
}

impl Default for ReloadConfig {
    fn default() -> Self {
        Self {
            watch: true,
            debounce: DEFAULT_RELOAD_DEBOUNCE,
        }
    }
}

fn default_watch() -> bool {
    true
}

fn default_debounce() -> Duration {
    DEFAULT_RELOAD_DEBOUNCE
}

impl AnalyticsConfig {
    /// Adds `analytics.*` problems to `problems`.
    pub(super) fn validate(&self, problems: &mut Vec<String>) {
        if !(1..=MAX_ANALYTICS_COUNTERS).contains(&self.counters) {
            problems.push(format!(
                "analytics.counters: must be 1 to {MAX_ANALYTICS_COUNTERS}, not {}",
                self.counters
            ));
        }
        if self.top_k == 0 || self.top_k > self.counters {
            problems.push(format!(
                "analytics.top_k: must be 1 to analytics.counters ({}), not {}",
                self.counters, self.top_k
            ));
        }
    }
}

impl ReloadConfig {
    /// Adds `reload.*` problems to `problems`.
    pub(super) fn validate(&self, problems: &mut Vec<String>) {
        if self.debounce > Duration::from_secs(60) {
            problems.push("reload.debounce: must be at most 1m".to_owned());
        }
    }
}
