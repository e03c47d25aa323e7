//! A scope's penalty box: callers who keep being denied are banned for a
//! while, longer each time they come back to it.
//!
//! ```yaml
//! penalty: {strikes: 20, within: 1m, ban: 1m, factor: 2, max_ban: 24h, forgive_after: 1h}
//! ```
//!
//! A *strike* is a denial by one of the scope's limits named in `on` (all
//! of them by default). `strikes` strikes within `within` ban the caller
//! for `ban`; each further ban is `factor` times the one before, up to
//! `max_ban`; after `forgive_after` without a strike (counted from the end
//! of the last ban, if later) the next ban is `ban` again.

use std::time::Duration;

use serde::Deserialize;

use super::scopes::LimitConfig;

/// The default ban multiplier from one ban to the next.
pub const DEFAULT_PENALTY_FACTOR: u32 = 2;
/// The default longest ban.
pub const DEFAULT_MAX_BAN: Duration = Duration::from_secs(24 * 3600);
/// The default quiet time after which a caller's next ban is short again.
pub const DEFAULT_FORGIVE_AFTER: Duration = Duration::from_secs(3600);
/// The most strikes a ban may wait for.
pub const MAX_STRIKES: u32 = 1_000_000;
/// The largest factor: ten escalations of it already pass a year.
pub const MAX_PENALTY_FACTOR: u32 = 1_000;
/// The longest any penalty duration may be (`within`, `ban`, `max_ban`,
/// `forgive_after`). Keeps every instant the Redis script adds exact.
pub const MAX_PENALTY_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);
/// The shortest penalty duration.
pub const MIN_PENALTY_DURATION: Duration = Duration::from_millis(1);

/// `penalty:` under a scope.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PenaltyConfig {
    /// Strikes within `within` that ban the caller.
    pub strikes: u32,
    /// The window strikes are counted in, from the first strike.
    #[serde(with = "humantime_serde")]
    pub within: Duration,
    /// The first ban's length.
    #[serde(with = "humantime_serde")]
    pub ban: Duration,
    /// Each further ban is this many times the one before (1: no growth).
    #[serde(default = "default_factor")]
    pub factor: u32,
    /// The longest ban.
    #[serde(default = "default_max_ban", with = "humantime_serde")]
    pub max_ban: Duration,
    /// Quiet time (no strike, no ban) after which bans start short again.
    #[serde(default = "default_forgive_after", with = "humantime_serde")]
    pub forgive_after: Duration,
    /// Who is banned: the identity (default), or the identity on one
    /// operation.
    #[serde(default)]
    pub per: PenaltyPer,
    /// Which limits' denials are strikes: `all` (default) or their names.
    #[serde(default)]
    pub on: PenaltyOn,
}

fn default_factor() -> u32 {
    DEFAULT_PENALTY_FACTOR
}

fn default_max_ban() -> Duration {
    DEFAULT_MAX_BAN
}

fn default_forgive_after() -> Duration {
    DEFAULT_FORGIVE_AFTER
}

/// What a penalty box holds one record per.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PenaltyPer {
    /// One per identity: a ban shuts the caller out of the whole scope.
    #[default]
    Identity,
    /// One per identity and operation: a ban shuts one operation only.
    IdentityOperation,
}

/// Which limits' denials count as strikes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum PenaltyOn {
    /// Every limit of the scope.
    #[default]
    All,
    /// The limits with these names.
    Limits(Vec<String>),
}

impl<'de> Deserialize<'de> for PenaltyOn {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Word(String),
            Names(Vec<String>),
        }
        match Raw::deserialize(d)? {
            Raw::Word(w) if w == "all" => Ok(Self::All),
            Raw::Word(w) => Err(serde::de::Error::custom(format!(
                "{w:?} is neither `all` nor a list of limit names"
            ))),
            Raw::Names(names) => Ok(Self::Limits(names)),
        }
    }
}

impl PenaltyConfig {
    /// Checks the numbers and that `on` names limits of the scope, pushing
    /// `path: problem` entries; `at` is the scope's path (`scopes[0]`).
    pub(crate) fn validate(&self, problems: &mut Vec<String>, at: &str, limits: &[LimitConfig]) {
        let at = format!("{at}.penalty");
        if self.strikes == 0 || self.strikes > MAX_STRIKES {
            problems.push(format!("{at}.strikes: must be between 1 and {MAX_STRIKES}"));
        }
        for (field, d) in [
            ("within", self.within),
            ("ban", self.ban),
            ("max_ban", self.max_ban),
            ("forgive_after", self.forgive_after),
        ] {
            if !(MIN_PENALTY_DURATION..=MAX_PENALTY_DURATION).contains(&d) {
                problems.push(format!("{at}.{field}: must be between 1ms and 366d"));
            } else if !d.subsec_nanos().is_multiple_of(1_000) {
                problems.push(format!(
                    "{at}.{field}: must be a whole number of microseconds"
                ));
            }
        }
        if self.ban > self.max_ban {
            problems.push(format!(
                "{at}.max_ban: must be at least ban ({})",
                humantime::format_duration(self.ban)
            ));
        }
        if self.factor == 0 || self.factor > MAX_PENALTY_FACTOR {
            problems.push(format!(
                "{at}.factor: must be between 1 and {MAX_PENALTY_FACTOR}"
            ));
        }
        if let PenaltyOn::Limits(names) = &self.on {
            if names.is_empty() {
                problems.push(format!(
                    "{at}.on: must name at least one limit (or be `all`)"
                ));
            }
            for (k, name) in names.iter().enumerate() {
                if !limits.iter().any(|l| l.name == *name) {
                    problems.push(format!(
                        "{at}.on[{k}]: no limit of the scope is named {name:?}"
                    ));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn load(penalty: &str) -> Result<Config, Vec<String>> {
        Config::from_yaml(&format!(
            "scopes:\n  - name: s\n    limits:\n      - {{name: per-user, per: identity, capacity: 1, refill_period: 1s}}\n    penalty: {penalty}\n"
        ))
        .map_err(|e| e.problems)
    }

    #[test]
    fn defaults_fill_what_is_left_out() {
        let config = load("{strikes: 20, within: 1m, ban: 1m}").unwrap();
        let c = config.scopes[0].penalty.clone().unwrap();
        assert_eq!(c.factor, 2);
        assert_eq!(c.max_ban, DEFAULT_MAX_BAN);
        assert_eq!(c.forgive_after, DEFAULT_FORGIVE_AFTER);
        assert_eq!((c.per, c.on), (PenaltyPer::Identity, PenaltyOn::All));
    }

    #[test]
    fn every_bad_field_is_named_by_its_path() {
        let got = load(
            "{strikes: 0, within: 400d, ban: 2h, max_ban: 1h, factor: 0, forgive_after: 1500us, on: [per-user, nope]}",
        )
        .unwrap_err();
        assert_eq!(
            got,
            [
                "scopes[0].penalty.strikes: must be between 1 and 1000000",
                "scopes[0].penalty.within: must be between 1ms and 366d",
                "scopes[0].penalty.max_ban: must be at least ban (2h)",
                "scopes[0].penalty.factor: must be between 1 and 1000",
                "scopes[0].penalty.on[1]: no limit of the scope is named \"nope\"",
            ]
        );
        assert_eq!(
            load("{strikes: 1, within: 1s, ban: 1s, on: []}").unwrap_err(),
            ["scopes[0].penalty.on: must name at least one limit (or be `all`)"]
        );
        assert!(load("{strikes: 1, within: 1s, ban: 1s, on: some}").is_err());
    }
}
