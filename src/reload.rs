//! Reload: everything a reload changes, swapped as one snapshot, and the
//! procedure that reads the config again and swaps it.
//!
//! # One snapshot
//! A reload changes the rules, the caller grants, the Envoy header setting
//! and `reservations.max_settle_within`, and every call reads several of
//! them. They are one [`Snapshot`]: one `Arc`, in one `ArcSwap` (the
//! limiter's), replaced by one store. Each API call loads it once, first,
//! and identifies the caller, checks its grant, decides, records the
//! decision and renders Envoy's headers from that one load. So a reload
//! never lets a call be authorised by one config and decided (or counted,
//! or answered) by another, whatever it lands between; calls under way
//! finish on the snapshot they loaded. `tests/it/reload.rs` reloads back and
//! forth under load and checks every answer against both configs.
//!
//! # Why this shape
//! - **The swap lives in the limiter.** The layers point one way, so the
//!   limiter cannot name the grants or the header settings, which are the
//!   API's. It carries them without knowing them: a
//!   [`Generation<E>`](crate::limiter::Generation) holds the rules and an
//!   `extra: E` the limiter never reads, and the API's
//!   [`Settings`](crate::api::Settings) are that `E`. `E` defaults to `()`,
//!   so `Limiter<S>`, its tests and the benchmarks are unchanged.
//! - **Not a second `ArcSwap` beside the limiter's rules.** The API could
//!   keep its own snapshot of rules and grants, but then the limiter's rules
//!   (read by settles, `Limiter::decide`, the status page) would be a second
//!   copy to swap, which is the four-moment reload this replaced.
//! - **Not a limiter without rules.** Passing the rules into every call
//!   would make every user of the limiter (tests, benches, the status page)
//!   keep the live rules itself.
//! - **The API says which rules decide.** `decide_on`, `decide_each_on`,
//!   `decide_together_on`, `explain_on` and `settle_reservation_on` take the
//!   rules of the snapshot the call loaded, so the API never reads the rules
//!   a second time to record the decision: it already holds the ones that
//!   decided. `Limiter::decide(&req)` and the like load the snapshot
//!   themselves, for tests, benchmarks and anything without grants.
//! - **The rules are an `Arc` of their own** inside the snapshot, so the
//!   status page and tests can hold the rules alone, as before; a decision
//!   pays one more pointer hop for that, not a reference count.
//!
//! # Beside the snapshot
//! - `drain_delay` is read only by the stop sequence, on the task that
//!   reloads ([`Reloader::drain_delay`]), so no call can race it.
//! - The heavy hitters forget the rules the new snapshot dropped, right
//!   after the swap, against that snapshot's rules. A call decided on the old
//!   snapshot that records after the pruning may bring back one of its
//!   rules; it is pruned at the next reload, and memory stays bounded by the
//!   configs loaded.
//! - The reservation secrets go to the limiter's signer right after the
//!   swap. A reservation signed in between with the old first key still
//!   settles while the new list keeps that key, as a rotation does.
//! - Settings only a restart can apply ([`restart_only_changes`]) are named
//!   in a warning; the old values stay in force. TLS certificates follow
//!   their files by themselves (`crate::net::tls`).

use std::sync::Arc;
use std::time::Duration;

use crate::api::Settings;
pub use crate::api::Snapshot;
use crate::config::{Config, ConfigError, ConfigSource};
use crate::limiter::{Generation, Limiter, Rules};
use crate::net::tls::{self, Tls};
use crate::observe::Observer;
use crate::observe::status::Board;
use crate::store::{self, Store};

/// The snapshot of `config`, whose compiled rules are `rules`; refusals
/// are reported to `observer`.
pub fn snapshot(config: &Config, rules: Rules, observer: &Arc<Observer>) -> Snapshot {
    observer.metrics.known_rules(&rules);
    observer.metrics.known_penalties(&rules);
    Generation {
        rules: Arc::new(rules),
        extra: Settings::new(config, observer.clone()),
    }
}

/// `config`'s reservation secrets, the signing one first; none when it
/// names none (a random key of this process signs).
pub fn secrets(config: &Config) -> Vec<&[u8]> {
    config
        .reservations
        .secret
        .iter()
        .flat_map(|s| s.all())
        .map(|s| s.expose().as_bytes())
        .collect()
}

/// Reads the config again on [`crate::shutdown::Control::Reload`] and swaps
/// in its snapshot, whole.
#[derive(Debug)]
pub(crate) struct Reloader<S> {
    /// Where the config is read again; `None` refuses reloads.
    source: Option<ConfigSource>,
    /// Holds the snapshot every call loads.
    limiter: Arc<Limiter<S, Settings>>,
    /// Counts reloads; the grants report refusals to it.
    observer: Arc<Observer>,
    /// The status page's reload history, and the heavy hitters to prune.
    board: Arc<Board>,
    /// The config serving now, for the drain delay and to tell which
    /// restart-only settings a reload changed.
    current: Config,
}

impl<S: Store> Reloader<S> {
    /// Reloads from `source` into `limiter`, whose snapshot is `current`'s.
    pub(crate) fn new(
        source: Option<ConfigSource>,
        limiter: Arc<Limiter<S, Settings>>,
        observer: Arc<Observer>,
        board: Arc<Board>,
        current: Config,
    ) -> Self {
        Self {
            source,
            limiter,
            observer,
            board,
            current,
        }
    }

    /// The drain delay of the config serving now: a reload applies it.
    pub(crate) fn drain_delay(&self) -> Duration {
        self.current.drain_delay.unwrap_or_default()
    }

    /// Swaps in the snapshot of the config read again, or refuses it whole:
    /// the old config keeps serving. Settings that only a restart can apply
    /// are named in a warning, never silently ignored.
    pub(crate) fn reload(&mut self) {
        let prepared = match &self.source {
            Some(source) => Prepared::load(source.clone()),
            None => Err(ConfigError::one(
                "this server was not started from a config file",
            )),
        };
        let metrics = &self.observer.metrics;
        match prepared {
            Ok(p) => {
                let scopes = p.rules.scopes().count();
                // Built in full first (the grants are compiled here), then
                // swapped in one store.
                let next = snapshot(&p.config, p.rules, &self.observer);
                self.limiter.replace(next);
                // Tokens signed with a key the new list keeps still settle.
                self.limiter.signer().use_secrets(&secrets(&p.config));
                self.board.hitters.retain(&self.limiter.rules());
                let pending = restart_only_changes(&self.current, &p.config);
                if !pending.is_empty() {
                    tracing::warn!(
                        settings = %pending.join(", "),
                        "config reloaded, but these settings take effect only on restart; the old values stay in force"
                    );
                }
                self.current = p.config;
                metrics.reload(true);
                self.board
                    .reloaded(true, format!("config reloaded: {scopes} scopes"));
                tracing::info!(scopes, "config reloaded");
            }
            Err(e) => {
                metrics.reload(false);
                self.board.reloaded(false, e.to_string());
                tracing::error!(error = %e, "config reload refused; the old config keeps serving");
            }
        }
    }
}

/// The settings that differ between `old` and `new` and that a reload
/// cannot apply: the listeners and their TLS and gRPC bounds, the store,
/// logging, metrics and the shutdown grace (armed when serving starts).
/// (The TLS certificate files themselves are re-read
/// when they change.) Compared by their Debug prints, which every config
/// type has (passwords print redacted, so a password-only change is not
/// named).
pub fn restart_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    let differ =
        |a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| format!("{a:?}") != format!("{b:?}");
    let mut changed = Vec::new();
    if old.listen != new.listen {
        changed.push("listen");
    }
    if differ(&old.store, &new.store) {
        changed.push("store");
    }
    if differ(&old.log, &new.log) {
        changed.push("log");
    }
    if differ(&old.metrics, &new.metrics) {
        changed.push("metrics");
    }
    if differ(&old.tls, &new.tls) {
        changed.push("tls");
    }
    if differ(&old.grpc, &new.grpc) {
        changed.push("grpc");
    }
    if old.shutdown_grace != new.shutdown_grace {
        changed.push("shutdown_grace");
    }
    // Each quota stream holds its mapping and bounds from its start.
    if differ(&old.rlqs, &new.rlqs) {
        changed.push("rlqs");
    }
    // `reservations` (the signing secrets and `max_settle_within`) is
    // applied by a reload.
    changed
}

/// A config that has passed every check a start or a reload makes, with its
/// rules compiled (once).
#[derive(Debug)]
pub struct Prepared {
    /// The validated config.
    pub config: Config,
    /// Its compiled rules.
    pub rules: Rules,
    /// Where a reload reads the config again; `None` refuses reloads.
    pub source: Option<ConfigSource>,
    /// The gRPC and metrics listeners' TLS, loaded once, when configured.
    pub tls: (Option<Tls>, Option<Tls>),
}

impl Prepared {
    /// Reads `source` and prepares what it holds.
    pub fn load(source: ConfigSource) -> Result<Self, ConfigError> {
        let config = source.load()?;
        Self::new(config, Some(source))
    }

    /// Compiles `config`'s rules and checks its store settings.
    pub fn new(config: Config, source: Option<ConfigSource>) -> Result<Self, ConfigError> {
        store::check_settings(&config.store)?;
        // The certificates must load now, before any port is bound.
        let tls = listener_tls(&config)?;
        let rules = Rules::compile(&config)?;
        Ok(Self {
            config,
            rules,
            source,
            tls,
        })
    }
}

/// The TLS of the gRPC and the metrics listeners, each when configured.
fn listener_tls(config: &Config) -> Result<(Option<Tls>, Option<Tls>), ConfigError> {
    let grpc = config
        .tls
        .as_ref()
        .map(|t| Tls::load(t, "tls", tls::ALPN_H2))
        .transpose()?;
    let metrics = config
        .metrics
        .tls
        .as_ref()
        .map(|t| Tls::load(t, "metrics.tls", tls::ALPN_HTTP1))
        .transpose()?;
    Ok((grpc, metrics))
}
