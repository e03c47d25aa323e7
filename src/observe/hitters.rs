//! Heavy hitters and utilization, per scope and rule: which identities
//! decide and are denied most over the last minute, five minutes and hour,
//! how full the rule's buckets run, and the share it denies.
//!
//! Everything is per replica and in memory; recording touches no store.
//! Each window is a ring of [`SLOTS`] closed slots plus the current one;
//! each slot holds a [`SpaceSaving`] summary of decisions and one of
//! denials, so a window's answer merges at most `SLOTS + 1` summaries and
//! covers between one window and one window plus a slot (1m: 60–70 s). The
//! error of every count is at most `N / counters`, where `N` is the
//! decisions (or denials) in the window (see [`super::sketch`]).
//!
//! Memory per rule, bounded by `counters` (`m`): 3 windows × (`SLOTS` + 1)
//! slots × 2 summaries, each of at most
//! [`super::sketch::max_memory_bytes`] bytes, plus the per-second counters. With the default `m = 64` and 16-byte identities: 42 × 6,464 B
//! ≈ 265 KiB per rule at most (252,768 B measured with every summary full).
//! An identity over [`MAX_KEPT_IDENTITY`] bytes is kept as a prefix and its
//! hash ([`shown`]), so no identity makes a summary hold more.

use std::borrow::Cow;
use std::hash::BuildHasher as _;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hashbrown::{DefaultHashBuilder, Equivalent, HashMap};
use parking_lot::Mutex;
use serde::Serialize;
use tokio::time::Instant;

pub use super::sketch::ENTRY_BYTES;
use super::sketch::{Counted, Merged, SpaceSaving, merge};
use crate::limiter::{Decision, Rules};

/// Closed slots per window; the current slot makes one more.
pub const SLOTS: usize = 6;
/// Bins of the `remaining / capacity` histogram: `[0, 10%)` … `[90%, 100%]`.
pub const FILL_BINS: usize = 10;
/// Seconds of per-second decision and denial counts kept for live charts.
pub const SECONDS: usize = 60;
/// Default counters per summary (`m`): a count is off by at most `N / m`.
pub const DEFAULT_COUNTERS: usize = 64;
/// Default identities returned per list (`K`).
pub const DEFAULT_TOP_K: usize = 10;

/// A sliding window of recent time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum Window {
    /// The last minute (slots of 10 s).
    #[serde(rename = "1m")]
    OneMinute,
    /// The last five minutes (slots of 50 s).
    #[serde(rename = "5m")]
    FiveMinutes,
    /// The last hour (slots of 10 min).
    #[serde(rename = "1h")]
    OneHour,
}

impl Window {
    /// Every window, shortest first.
    pub const ALL: [Window; 3] = [Self::OneMinute, Self::FiveMinutes, Self::OneHour];

    /// Its length.
    pub fn span(self) -> Duration {
        Duration::from_secs(match self {
            Self::OneMinute => 60,
            Self::FiveMinutes => 300,
            Self::OneHour => 3600,
        })
    }

    /// `1m`, `5m` or `1h`.
    pub fn name(self) -> &'static str {
        match self {
            Self::OneMinute => "1m",
            Self::FiveMinutes => "5m",
            Self::OneHour => "1h",
        }
    }

    /// The window named `1m`, `5m` or `1h`.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|w| w.name() == name)
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// What a top list ranks identities by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RankBy {
    /// Every decision of the rule's buckets.
    Decisions,
    /// The decisions in which the rule's bucket was exhausted.
    Denials,
}

/// One window's slots of one rule.
#[derive(Debug)]
struct Slot {
    decisions: SpaceSaving,
    denials: SpaceSaving,
    fill: [u64; FILL_BINS],
}

impl Slot {
    fn new(counters: usize) -> Self {
        Self {
            decisions: SpaceSaving::new(counters),
            denials: SpaceSaving::new(counters),
            fill: [0; FILL_BINS],
        }
    }

    fn clear(&mut self) {
        self.decisions.clear();
        self.denials.clear();
        self.fill = [0; FILL_BINS];
    }
}

/// A ring of `SLOTS + 1` slots of `width` nanoseconds; `epoch` numbers the
/// current one (time since start / width).
#[derive(Debug)]
struct Ring {
    width: u64,
    epoch: u64,
    /// When the current slot ends: until then, no division is needed to
    /// find it (three of them per bucket showed in the recording bench).
    ends: u64,
    slots: Vec<Slot>,
}

impl Ring {
    fn new(window: Window, counters: usize) -> Self {
        let width = (window.span() / SLOTS as u32).as_nanos() as u64;
        Self {
            width,
            epoch: 0,
            ends: width,
            slots: (0..=SLOTS).map(|_| Slot::new(counters)).collect(),
        }
    }

    /// Moves the ring to `now`, clearing the slots that fell out of it, and
    /// returns the current slot.
    fn at(&mut self, now: u64) -> &mut Slot {
        let len = self.slots.len() as u64;
        if now >= self.ends {
            let epoch = now / self.width;
            for e in (self.epoch + 1..=epoch).take(len as usize) {
                self.slots[(e % len) as usize].clear();
            }
            self.epoch = epoch;
            self.ends = (epoch + 1).saturating_mul(self.width);
        }
        &mut self.slots[(self.epoch % len) as usize]
    }
}

/// Per-second counts for the last [`SECONDS`] seconds.
#[derive(Debug)]
struct Seconds {
    epoch: u64,
    decisions: [u32; SECONDS],
    denials: [u32; SECONDS],
}

impl Seconds {
    fn advance(&mut self, now: u64) -> usize {
        let epoch = now / 1_000_000_000;
        if epoch > self.epoch {
            for e in (self.epoch + 1..=epoch).take(SECONDS) {
                self.decisions[e as usize % SECONDS] = 0;
                self.denials[e as usize % SECONDS] = 0;
            }
            self.epoch = epoch;
        }
        self.epoch as usize % SECONDS
    }

    /// Oldest first, ending with the second under way.
    fn series(&mut self, now: u64) -> (Vec<u32>, Vec<u32>) {
        let at = self.advance(now);
        let order = (1..=SECONDS).map(|k| (at + k) % SECONDS);
        order.map(|i| (self.decisions[i], self.denials[i])).unzip()
    }
}

/// Everything kept about one rule of one scope.
#[derive(Debug)]
struct RuleStats {
    rings: [Ring; 3],
    seconds: Seconds,
    /// The capacity and refill period of the last bucket seen.
    capacity: u64,
    period: Duration,
}

impl RuleStats {
    fn new(counters: usize) -> Self {
        Self {
            rings: Window::ALL.map(|w| Ring::new(w, counters)),
            seconds: Seconds {
                epoch: 0,
                decisions: [0; SECONDS],
                denials: [0; SECONDS],
            },
            capacity: 0,
            period: Duration::ZERO,
        }
    }

    fn record(&mut self, now: u64, identity: &str, hash: u64, denied: bool, bin: usize) {
        let s = self.seconds.advance(now);
        self.seconds.decisions[s] = self.seconds.decisions[s].saturating_add(1);
        if denied {
            self.seconds.denials[s] = self.seconds.denials[s].saturating_add(1);
        }
        for ring in &mut self.rings {
            let slot = ring.at(now);
            slot.decisions.record(identity, hash);
            if denied {
                slot.denials.record(identity, hash);
            }
            slot.fill[bin] += 1;
        }
    }

    fn merged(&mut self, now: u64, window: Window, by: RankBy) -> Merged {
        let ring = &mut self.rings[window.index()];
        ring.at(now);
        merge(ring.slots.iter().map(|s| match by {
            RankBy::Decisions => &s.decisions,
            RankBy::Denials => &s.denials,
        }))
    }

    fn fill(&mut self, now: u64, window: Window) -> [u64; FILL_BINS] {
        let ring = &mut self.rings[window.index()];
        ring.at(now);
        let mut fill = [0; FILL_BINS];
        for slot in &ring.slots {
            for (sum, n) in fill.iter_mut().zip(slot.fill) {
                *sum += n;
            }
        }
        fill
    }

    fn memory_bytes(&self) -> usize {
        let slots = self.rings.iter().flat_map(|r| &r.slots);
        std::mem::size_of::<Self>()
            + slots
                .map(|s| {
                    std::mem::size_of::<Slot>()
                        + s.decisions.memory_bytes()
                        + s.denials.memory_bytes()
                })
                .sum::<usize>()
    }
}

/// The map's key: a configured scope and rule name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct RuleKey(Arc<str>, Arc<str>);

impl Equivalent<RuleKey> for (&str, &str) {
    fn equivalent(&self, key: &RuleKey) -> bool {
        *key.0 == *self.0 && *key.1 == *self.1
    }
}

// `(&str, &str)` hashes as `RuleKey` does: field by field, each as a `str`.

type Table = HashMap<RuleKey, Arc<Mutex<RuleStats>>>;

/// How big the summaries are and how many identities a list holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sizes {
    /// Counters per summary (`m`): counts are off by at most `N / m`.
    pub counters: usize,
    /// Identities per list by default (`K`, at most `counters`).
    pub top_k: usize,
}

impl Default for Sizes {
    fn default() -> Self {
        Self {
            counters: DEFAULT_COUNTERS,
            top_k: DEFAULT_TOP_K,
        }
    }
}

/// The heavy hitters and utilization of every rule, fed by
/// [`super::Observer::decided`].
#[derive(Debug)]
pub struct Hitters {
    sizes: Sizes,
    /// Keyed per process, so callers cannot aim identities at one slot.
    hasher: DefaultHashBuilder,
    /// Read on every decision without a lock; replaced whole (under
    /// `grow`) the first time a rule is seen, which the config bounds.
    rules: ArcSwap<Table>,
    grow: Mutex<()>,
    started: Instant,
}

impl Default for Hitters {
    fn default() -> Self {
        Self::new(Sizes::default())
    }
}

impl Hitters {
    /// Empty, with summaries of `sizes.counters`.
    pub fn new(sizes: Sizes) -> Self {
        Self {
            sizes: Sizes {
                counters: sizes.counters.max(1),
                top_k: sizes.top_k.clamp(1, sizes.counters.max(1)),
            },
            hasher: DefaultHashBuilder::default(),
            rules: ArcSwap::default(),
            grow: Mutex::new(()),
            started: Instant::now(),
        }
    }

    /// The sizes in use.
    pub fn sizes(&self) -> Sizes {
        self.sizes
    }

    /// Nanoseconds since this was made, on tokio's (pausable) clock.
    pub fn now(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Records `identity`'s decision in `scope` under every rule whose
    /// bucket applied, at the current time.
    pub fn record(&self, scope: &str, identity: &str, decision: &Decision) {
        if !decision.buckets.is_empty() {
            self.record_at(self.now(), scope, identity, decision);
        }
    }

    /// [`Hitters::record`] at `now` nanoseconds since start.
    pub fn record_at(&self, now: u64, scope: &str, identity: &str, decision: &Decision) {
        let identity = &*shown(identity);
        let hash = self.hasher.hash_one(identity);
        let table = self.rules.load();
        for b in &decision.buckets {
            let record = |stats: &Mutex<RuleStats>| {
                let mut stats = stats.lock();
                stats.capacity = b.limit;
                stats.period = b.period;
                let bin = fill_bin(b.remaining, b.limit);
                stats.record(now, identity, hash, b.exhausted, bin);
            };
            // Borrowed from the table, not cloned: no shared count to bounce
            // between cores on every decision.
            match table.get(&(scope, &*b.rule)) {
                Some(stats) => record(stats),
                None => record(&self.add(scope, &b.rule)),
            }
        }
    }

    #[cold]
    fn add(&self, scope: &str, rule: &Arc<str>) -> Arc<Mutex<RuleStats>> {
        let _grow = self.grow.lock();
        let table = self.rules.load();
        if let Some(s) = table.get(&(scope, &**rule)) {
            return s.clone();
        }
        let stats = Arc::new(Mutex::new(RuleStats::new(self.sizes.counters)));
        let mut next = Table::clone(&table);
        next.insert(RuleKey(scope.into(), rule.clone()), stats.clone());
        self.rules.store(Arc::new(next));
        stats
    }

    /// Forgets the rules that `rules` no longer has (after a reload), so
    /// memory follows the config.
    pub fn retain(&self, rules: &Rules) {
        let _grow = self.grow.lock();
        let mut next = Table::clone(&self.rules.load());
        next.retain(|RuleKey(scope, rule), _| {
            rules.scope(scope).is_some_and(|s| {
                s.limits.iter().any(|l| l.name == *rule) || !s.descriptor_tree.is_empty()
            })
        });
        self.rules.store(Arc::new(next));
    }

    fn stats(&self, scope: &str, rule: &str) -> Option<Arc<Mutex<RuleStats>>> {
        self.rules.load().get(&(scope, rule)).cloned()
    }

    /// The rules seen so far, as `(scope, rule)`, sorted.
    pub fn seen(&self) -> Vec<(Arc<str>, Arc<str>)> {
        let mut seen: Vec<_> = self
            .rules
            .load()
            .keys()
            .map(|k| (k.0.clone(), k.1.clone()))
            .collect();
        seen.sort();
        seen
    }

    /// The top `k` identities of `scope`'s `rule` over `window`.
    pub fn top(&self, scope: &str, rule: &str, window: Window, by: RankBy, k: usize) -> TopList {
        self.top_at(self.now(), scope, rule, (window, by), k)
    }

    /// [`Hitters::top`] at `now` nanoseconds since start.
    pub fn top_at(
        &self,
        now: u64,
        scope: &str,
        rule: &str,
        (window, by): (Window, RankBy),
        k: usize,
    ) -> TopList {
        let merged = self
            .stats(scope, rule)
            .map(|s| s.lock().merged(now, window, by))
            .unwrap_or_default();
        TopList::new(scope, rule, window, by, merged, k)
    }

    /// How `scope`'s `rule` has been used over `window`.
    pub fn usage(&self, scope: &str, rule: &str, window: Window) -> Usage {
        let now = self.now();
        let Some(stats) = self.stats(scope, rule) else {
            return Usage::empty(window);
        };
        let mut s = stats.lock();
        let decisions = s.merged(now, window, RankBy::Decisions);
        let denials = s.merged(now, window, RankBy::Denials);
        let (per_second, denied_per_second) = s.seconds.series(now);
        Usage {
            window,
            capacity: s.capacity,
            period: s.period,
            decisions: decisions.total,
            denials: denials.total,
            fill: s.fill(now, window),
            denied_identities: denials.keys.iter().filter(|c| c.count > c.error).count(),
            per_second,
            denied_per_second,
        }
    }

    /// Heap bytes held by every rule's summaries.
    pub fn memory_bytes(&self) -> usize {
        self.rules
            .load()
            .values()
            .map(|s| s.lock().memory_bytes())
            .sum()
    }
}

/// The longest identity the summaries keep as it came. A longer one (an
/// Envoy descriptor used whole can reach ~18 KB) is kept, and shown to
/// operators, as its first [`SHOWN_PREFIX`] bytes, `…`, and `sha256:` with
/// the first 16 bytes of its SHA-256 in hex: a summary's memory stays
/// bounded whatever callers send, and two long identities stay apart.
pub const MAX_KEPT_IDENTITY: usize = 128;
/// Bytes of a long identity shown before its hash.
const SHOWN_PREFIX: usize = 64;

/// `identity` as the summaries keep and show it (see [`MAX_KEPT_IDENTITY`]).
pub fn shown(identity: &str) -> Cow<'_, str> {
    if identity.len() <= MAX_KEPT_IDENTITY {
        return Cow::Borrowed(identity);
    }
    let mut end = SHOWN_PREFIX;
    while !identity.is_char_boundary(end) {
        end -= 1;
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, identity.as_bytes());
    let mut out = String::with_capacity(end + 3 + 7 + 32);
    out.push_str(&identity[..end]);
    out.push_str("…sha256:");
    for b in &digest.as_ref()[..16] {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    Cow::Owned(out)
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// The `remaining / capacity` bin of a bucket.
fn fill_bin(remaining: u64, capacity: u64) -> usize {
    if capacity == 0 {
        return 0;
    }
    let bin = u128::from(remaining) * FILL_BINS as u128 / u128::from(capacity);
    (bin as usize).min(FILL_BINS - 1)
}

/// The heaviest identities of one rule over one window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TopList {
    /// The scope.
    pub scope: String,
    /// The rule.
    pub rule: String,
    /// The window.
    pub window: Window,
    /// What it ranks by.
    pub by: RankBy,
    /// Decisions (or denials) in the window, all identities together: `N`.
    pub total: u64,
    /// No count below is more than this above the truth (at most
    /// `N / counters`).
    pub error_bound: u64,
    /// An identity not listed was counted at most this many times.
    pub absent_at_most: u64,
    /// Heaviest first. Each `count` is an upper bound and `count - error`
    /// a lower bound of the identity's true count.
    pub identities: Vec<Counted>,
}

impl TopList {
    fn new(scope: &str, rule: &str, window: Window, by: RankBy, m: Merged, k: usize) -> Self {
        let mut identities = m.keys;
        let mut absent_at_most = m.error_bound;
        if identities.len() > k {
            identities.truncate(k);
            if let Some(last) = identities.last() {
                absent_at_most = absent_at_most.max(last.count);
            }
        }
        Self {
            scope: scope.to_owned(),
            rule: rule.to_owned(),
            window,
            by,
            total: m.total,
            error_bound: m.error_bound,
            absent_at_most,
            identities,
        }
    }
}

/// How one rule's buckets were used over a window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Usage {
    /// The window.
    pub window: Window,
    /// The capacity of the rule's buckets (0 before any decision).
    pub capacity: u64,
    /// Their refill period.
    #[serde(with = "humantime_serde")]
    pub period: Duration,
    /// Decisions in which a bucket of the rule applied.
    pub decisions: u64,
    /// Decisions in which the rule's bucket was exhausted (for a shadow
    /// rule: the requests it would have denied).
    pub denials: u64,
    /// Decisions by the bucket's `remaining / capacity` afterwards, in
    /// [`FILL_BINS`] bins from empty to full.
    pub fill: [u64; FILL_BINS],
    /// Identities certainly denied at least once in the window (at most
    /// the number of counters).
    pub denied_identities: usize,
    /// Decisions in each of the last [`SECONDS`] seconds, oldest first.
    pub per_second: Vec<u32>,
    /// Denials in each of the last [`SECONDS`] seconds, oldest first.
    pub denied_per_second: Vec<u32>,
}

impl Usage {
    fn empty(window: Window) -> Self {
        Self {
            window,
            capacity: 0,
            period: Duration::ZERO,
            decisions: 0,
            denials: 0,
            fill: [0; FILL_BINS],
            denied_identities: 0,
            per_second: vec![0; SECONDS],
            denied_per_second: vec![0; SECONDS],
        }
    }

    /// Denials over decisions, 0 without decisions.
    pub fn denied_share(&self) -> f64 {
        if self.decisions == 0 {
            0.0
        } else {
            self.denials as f64 / self.decisions as f64
        }
    }
}

/// Rules with denials from more identities than this are flagged.
pub const MANY_DENIED_IDENTITIES: usize = 5;
/// Rules whose decisions leave the bucket under 10% full more often than
/// this share are flagged...
pub const NEARLY_EMPTY_SHARE: f64 = 0.5;
/// ...once they have at least this many decisions in the window.
pub const HINT_MIN_DECISIONS: u64 = 20;

/// A capacity hint: a rule that may be set too low, with the figure that
/// raised it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Hint {
    /// `many_identities_denied` or `runs_nearly_empty`.
    pub kind: &'static str,
    /// The figure: identities denied, or the share of decisions.
    pub figure: f64,
    /// For people.
    pub message: String,
}

impl Usage {
    /// The capacity hints this usage raises.
    pub fn hints(&self) -> Vec<Hint> {
        let mut hints = Vec::new();
        let w = self.window.name();
        if self.denied_identities > MANY_DENIED_IDENTITIES {
            hints.push(Hint {
                kind: "many_identities_denied",
                figure: self.denied_identities as f64,
                message: format!(
                    "{} identities were denied over the last {w}: the limit may be too low \
                     for normal use, rather than one caller being abusive",
                    self.denied_identities
                ),
            });
        }
        let nearly_empty = self.fill[0] as f64 / self.decisions.max(1) as f64;
        if self.decisions >= HINT_MIN_DECISIONS && nearly_empty > NEARLY_EMPTY_SHARE {
            hints.push(Hint {
                kind: "runs_nearly_empty",
                figure: nearly_empty,
                message: format!(
                    "{:.0}% of decisions over the last {w} left the bucket under 10% full",
                    nearly_empty * 100.0
                ),
            });
        }
        hints
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limiter::BucketReport;
    use crate::observe::sketch::max_memory_bytes;

    fn denied() -> Decision {
        Decision {
            allowed: false,
            buckets: vec![BucketReport {
                rule: Arc::from("r"),
                limit: 10,
                period: Duration::from_secs(1),
                remaining: 0,
                reset_after: Duration::ZERO,
                retry_after: None,
                exhausted: true,
                shadow: false,
            }]
            .into(),
            ..Decision::default()
        }
    }

    #[test]
    fn long_identities_cost_bounded_memory_and_show_a_prefix_and_their_hash() {
        let m = 64;
        let hitters = Hitters::new(Sizes {
            counters: m,
            top_k: 10,
        });
        // Thousands of 16 KiB identities over an hour: every summary fills.
        for i in 0..4_000u64 {
            let who = format!("{i:08}-{}", "x".repeat(16 * 1024));
            hitters.record_at(i * 900_000_000, "s", &who, &denied());
        }
        // 42 summaries per rule, each bounded by its longest kept key.
        let bound = 42 * max_memory_bytes(m, MAX_KEPT_IDENTITY) + 64 * 1024;
        assert!(
            hitters.memory_bytes() <= bound,
            "{} > {bound}",
            hitters.memory_bytes()
        );
        let top = hitters.top_at(
            3_600_000_000_000,
            "s",
            "r",
            (Window::OneHour, RankBy::Denials),
            m,
        );
        let long = top.identities.first().expect("a long identity is listed");
        assert!(long.key.len() <= MAX_KEPT_IDENTITY, "{}", long.key);
        assert!(long.key.contains("…sha256:"), "{}", long.key);
        assert_eq!(shown("short"), "short");
        assert_ne!(shown(&"y".repeat(200)), shown(&"y".repeat(201)));
    }
}
