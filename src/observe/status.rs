//! The live status page on the metrics port: `GET /` is server-rendered
//! HTML that reads well without JavaScript; a little inline script polls
//! `GET /status.json` (the same figures) and updates the page in place.
//! Everything it needs is served from here: no build step, nothing fetched
//! from elsewhere.
//!
//! Identities are caller-controlled text: the HTML escapes every value, and
//! the script only ever sets `textContent`.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::SystemTime;

use parking_lot::Mutex;
use serde::Serialize;

use super::hitters::{FILL_BINS, Hint, Hitters, RankBy, Usage, Window};
use super::sketch::Counted;
use crate::limiter::{Limiter, Rules};
use crate::store::Store;

/// Reloads kept in the page's history.
pub const RELOAD_HISTORY: usize = 20;
/// How often the page's script polls, in milliseconds.
pub const POLL_MILLIS: u32 = 1000;

/// What the page reads from the running server.
pub trait Live: Send + Sync + 'static {
    /// The rules in force.
    fn rules(&self) -> Arc<Rules>;
    /// True while the store answers (the Redis circuit is closed).
    fn store_available(&self) -> bool;
}

/// The limiter's rules are those of the snapshot every call decides on: the
/// page shows the config that is deciding, swapped with it on reload.
impl<S: Store, E: Send + Sync + 'static> Live for Limiter<S, E> {
    fn rules(&self) -> Arc<Rules> {
        Limiter::rules(self)
    }

    fn store_available(&self) -> bool {
        self.store().is_available()
    }
}

/// One reload, for the history.
#[derive(Debug, Clone, Serialize)]
pub struct ReloadEntry {
    /// When, RFC 3339 in UTC.
    pub at: String,
    /// True when the new config replaced the old.
    pub accepted: bool,
    /// The config version in force afterwards.
    pub version: u64,
    /// What happened, with every problem's field path when refused.
    pub message: String,
}

#[derive(Debug)]
struct ConfigLog {
    version: u64,
    loaded_at: String,
    history: VecDeque<ReloadEntry>,
}

/// Everything the page shows, shared with the server.
pub struct Board {
    /// Heavy hitters and utilization.
    pub hitters: Arc<Hitters>,
    live: Arc<dyn Live>,
    /// `memory` or `redis (standalone)` and so on.
    store_kind: String,
    config: Mutex<ConfigLog>,
    /// Per scope with a penalty box: its bans as last read from the store
    /// (by the server's ban watcher, every few seconds).
    bans: Mutex<std::collections::HashMap<String, BansView>>,
}

/// A scope's bans as last read from the store.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BansView {
    /// Callers banned, all of them.
    pub total: u64,
    /// The first few, by ban end.
    pub first: Vec<BannedView>,
    /// When the store was read, RFC 3339 in UTC.
    pub read_at: String,
}

/// One banned caller.
#[derive(Debug, Clone, Serialize)]
pub struct BannedView {
    /// As the store keeps it (`#` and a SHA-256 for a long one).
    pub identity: String,
    /// Its operation, for a box per identity and operation.
    pub operation: Option<String>,
    /// Seconds of ban left when read.
    pub seconds_left: u64,
}

impl std::fmt::Debug for Board {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Board").finish_non_exhaustive()
    }
}

// Wall-clock time for people reading the page (when a reload happened),
// never for bucket math.
#[allow(clippy::disallowed_methods)]
fn rfc3339_now() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

impl Board {
    /// A board over `live` with config version 1, loaded now.
    pub fn new(hitters: Arc<Hitters>, live: Arc<dyn Live>, store_kind: String) -> Self {
        Self {
            hitters,
            live,
            store_kind,
            config: Mutex::new(ConfigLog {
                version: 1,
                loaded_at: rfc3339_now(),
                history: VecDeque::new(),
            }),
            bans: Mutex::default(),
        }
    }

    /// Notes `scope`'s bans, as just read from the store.
    pub fn banned(&self, scope: &str, total: u64, first: &[crate::store::BanEntry]) {
        let view = BansView {
            total,
            first: first
                .iter()
                .map(|b| BannedView {
                    identity: b.identity.clone(),
                    operation: b.operation.clone(),
                    seconds_left: b.remaining.as_secs(),
                })
                .collect(),
            read_at: rfc3339_now(),
        };
        self.bans.lock().insert(scope.to_owned(), view);
    }

    /// Notes a reload: accepted ones bump the config version.
    pub fn reloaded(&self, accepted: bool, message: String) {
        let mut log = self.config.lock();
        let at = rfc3339_now();
        if accepted {
            log.version += 1;
            log.loaded_at = at.clone();
        }
        let version = log.version;
        if log.history.len() == RELOAD_HISTORY {
            log.history.pop_back();
        }
        log.history.push_front(ReloadEntry {
            at,
            accepted,
            version,
            message,
        });
    }

    /// Everything on the page, for `window`.
    pub fn snapshot(&self, window: Window) -> Snapshot {
        let rules = self.live.rules();
        let mut scopes: Vec<_> = rules.scopes().collect();
        scopes.sort_by(|a, b| a.name.cmp(&b.name));
        let k = self.hitters.sizes().top_k;
        let scopes = scopes
            .into_iter()
            .map(|s| ScopeView {
                bans: self.bans.lock().get(&*s.name).cloned(),
                name: s.name.to_string(),
                failure_mode: format!("{:?}", s.failure_mode).to_lowercase(),
                rules: self
                    .rule_names(&s.name, &rules)
                    .into_iter()
                    .map(|named| self.rule_view(&s.name, named, window, k))
                    .collect(),
            })
            .collect();
        let log = self.config.lock();
        Snapshot {
            now: rfc3339_now(),
            window,
            store: StoreView {
                kind: self.store_kind.clone(),
                available: self.live.store_available(),
            },
            config_version: log.version,
            config_loaded_at: log.loaded_at.clone(),
            reloads: log.history.iter().cloned().collect(),
            counters: self.hitters.sizes().counters,
            scopes,
        }
    }

    /// A scope's configured rules in order, then rules seen only in
    /// decisions (Envoy descriptor rules).
    fn rule_names(&self, scope: &str, rules: &Rules) -> Vec<Named> {
        let mut out: Vec<Named> = rules
            .scope(scope)
            .map(|s| {
                s.limits
                    .iter()
                    .map(|l| Named {
                        rule: l.name.to_string(),
                        per: snake(&format!("{:?}", l.per)),
                        capacity: l.shape.capacity,
                        period: std::time::Duration::from_nanos(l.shape.period),
                    })
                    .collect()
            })
            .unwrap_or_default();
        for (s, r) in self.hitters.seen() {
            if *s == *scope && !out.iter().any(|n| *n.rule == *r) {
                let u = self.hitters.usage(scope, &r, Window::OneHour);
                out.push(Named {
                    rule: r.to_string(),
                    per: "descriptor".to_owned(),
                    capacity: u.capacity,
                    period: u.period,
                });
            }
        }
        out
    }

    fn rule_view(&self, scope: &str, named: Named, window: Window, k: usize) -> RuleView {
        let usage = self.hitters.usage(scope, &named.rule, window);
        let top = |by| self.hitters.top(scope, &named.rule, window, by, k);
        let (decided, denied) = (top(RankBy::Decisions), top(RankBy::Denials));
        RuleView {
            name: named.rule,
            per: named.per,
            capacity: named.capacity,
            refill_period: humantime::format_duration(named.period).to_string(),
            decisions_per_second: recent_rate(&usage.per_second),
            denials_per_second: recent_rate(&usage.denied_per_second),
            denied_share: usage.denied_share(),
            hints: usage.hints(),
            error_bound: decided.error_bound.max(denied.error_bound),
            top_decisions: decided.identities,
            top_denials: denied.identities,
            usage,
        }
    }
}

/// A rule's name and shape.
struct Named {
    rule: String,
    per: String,
    capacity: u64,
    period: std::time::Duration,
}

/// `IdentityOperation` as `identity_operation`.
fn snake(name: &str) -> String {
    let mut out = String::new();
    for (i, c) in name.chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

/// The mean over the last ten complete seconds of a per-second series.
fn recent_rate(series: &[u32]) -> f64 {
    let complete = &series[..series.len().saturating_sub(1)];
    let last = &complete[complete.len().saturating_sub(10)..];
    last.iter().map(|&n| f64::from(n)).sum::<f64>() / last.len().max(1) as f64
}

/// The page's figures, as `GET /status.json` serves them.
#[derive(Debug, Serialize)]
pub struct Snapshot {
    /// When this was taken.
    pub now: String,
    /// The window of the top lists and utilization.
    pub window: Window,
    /// The store.
    pub store: StoreView,
    /// 1 at start, plus one per accepted reload.
    pub config_version: u64,
    /// When the config in force was loaded.
    pub config_loaded_at: String,
    /// The latest reloads, newest first.
    pub reloads: Vec<ReloadEntry>,
    /// Counters per summary (`m`), for the error bound.
    pub counters: usize,
    /// Every configured scope, by name.
    pub scopes: Vec<ScopeView>,
}

/// The store's state.
#[derive(Debug, Serialize)]
pub struct StoreView {
    /// Which store.
    pub kind: String,
    /// False while its circuit is open.
    pub available: bool,
}

/// One scope.
#[derive(Debug, Serialize)]
pub struct ScopeView {
    /// Its name.
    pub name: String,
    /// `open` or `closed`.
    pub failure_mode: String,
    /// Its rules.
    pub rules: Vec<RuleView>,
    /// Its penalty box's bans, once read; `None` without a penalty box.
    pub bans: Option<BansView>,
}

/// One rule.
#[derive(Debug, Serialize)]
pub struct RuleView {
    /// Its name.
    pub name: String,
    /// What its buckets are kept per.
    pub per: String,
    /// Its buckets' capacity.
    pub capacity: u64,
    /// Their refill period, such as `1m`.
    pub refill_period: String,
    /// Over the last ten complete seconds.
    pub decisions_per_second: f64,
    /// Over the last ten complete seconds.
    pub denials_per_second: f64,
    /// Denials over decisions in the window.
    pub denied_share: f64,
    /// Capacity hints.
    pub hints: Vec<Hint>,
    /// No count in the lists is more than this too high.
    pub error_bound: u64,
    /// Heaviest identities by decisions.
    pub top_decisions: Vec<Counted>,
    /// Heaviest identities by denials.
    pub top_denials: Vec<Counted>,
    /// The window's figures.
    pub usage: Usage,
}

/// `&`, `<`, `>`, `"` and `'` as entities.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// An SVG sparkline of `series`, scaled to its own maximum.
fn sparkline(class: &str, series: &[u32]) -> String {
    let max = series.iter().copied().max().unwrap_or(0).max(1);
    let points: Vec<String> = series
        .iter()
        .enumerate()
        .map(|(i, &v)| format!("{i},{:.1}", 20.0 - f64::from(v) * 19.0 / f64::from(max)))
        .collect();
    format!(
        "<svg class=\"spark {class}\" viewBox=\"0 0 59 20\" preserveAspectRatio=\"none\" \
         role=\"img\" aria-label=\"per second, last minute, peak {max}\">\
         <polyline points=\"{}\"/></svg>",
        points.join(" ")
    )
}

/// Ten bars of the `remaining / capacity` histogram, empty to full.
fn fill_bars(fill: &[u64; FILL_BINS]) -> String {
    let max = fill.iter().copied().max().unwrap_or(0).max(1);
    let mut out = String::from(
        "<div class=\"fill\" title=\"decisions by tokens left afterwards: empty … full\">",
    );
    for (i, &n) in fill.iter().enumerate() {
        let _ = write!(
            out,
            "<span style=\"height:{}%\" title=\"{}–{}% left: {n}\"></span>",
            n * 100 / max,
            i * 10,
            i * 10 + 10
        );
    }
    out.push_str("</div>");
    out
}

fn top_rows(list: &[Counted]) -> String {
    if list.is_empty() {
        return "<tr><td colspan=\"2\" class=\"none\">none</td></tr>".to_owned();
    }
    let mut out = String::new();
    for c in list {
        let _ = write!(
            out,
            "<tr><td>{}</td><td class=\"n\">{}{}</td></tr>",
            escape(&c.key),
            c.count,
            lower_bound(c)
        );
    }
    out
}

/// `" (≥ n)"` when a count may be too high, so readers see the range.
fn lower_bound(c: &Counted) -> String {
    if c.error == 0 {
        String::new()
    } else {
        format!(" <small>(≥ {})</small>", c.count - c.error)
    }
}

mod page;
pub use page::{render, routes};
