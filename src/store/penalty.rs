//! The penalty box in the store: what a charge carries of it, what the
//! store answers, and the strike-and-ban arithmetic every store applies
//! (the embedded store calls [`Record::strike`]; `redis/decide.lua` mirrors
//! it, and this is the reference).
//!
//! A charge that carries a [`Penalty`] is judged in this order, atomically
//! with the charge (under the same locks on the embedded store, in the same
//! script call on Redis):
//!
//! 1. a caller whose ban has not ended is denied at once: no bucket is
//!    read, nothing is taken ([`PenaltyOutcome::banned`]);
//! 2. otherwise the charge is decided as usual;
//! 3. if it was denied (not a dry run) by a bucket that strikes, or the
//!    charge is a strike by itself ([`Penalty::forced`]), the strike is
//!    counted, and the `strikes`-th strike within `within` starts a ban.
//!
//! All times are the store's own ticks: nanoseconds on the embedded store,
//! microseconds in the script.

use std::time::Duration;

/// Who a penalty record is about. Stores escape or hash the caller's parts
/// as they do a bucket's, and keep it beside the scope's buckets (on Redis,
/// in the same hash slot).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PenaltyKey<'a> {
    /// The scope. Validated, from the config.
    pub scope: &'a str,
    /// The caller.
    pub identity: &'a str,
    /// The operation, when the scope bans per identity and operation.
    pub operation: Option<&'a str>,
}

/// A scope's penalty rule, in nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PenaltyRule {
    /// Strikes within `within_ns` that start a ban, at least 1.
    pub strikes: u64,
    /// The window strikes are counted in, from its first strike.
    pub within_ns: u64,
    /// The first ban.
    pub ban_ns: u64,
    /// Each further ban is this many times the last, at least 1.
    pub factor: u64,
    /// The longest ban, at least `ban_ns`.
    pub max_ban_ns: u64,
    /// Quiet time after which the next ban is `ban_ns` again.
    pub forgive_ns: u64,
}

/// The highest escalation level kept: past it every ban is `max_ban`
/// anyway (a factor of at least 2 passes any 366-day cap in 45 steps).
pub const MAX_LEVEL: u64 = 64;

impl PenaltyRule {
    /// The length of a ban at escalation `level` (0 for the first):
    /// `ban · factor^level`, at most `max_ban`, in integers.
    pub fn ban_at(&self, level: u64) -> u64 {
        let mut d = self.ban_ns.min(self.max_ban_ns);
        for _ in 0..level {
            if d >= self.max_ban_ns || self.factor <= 1 {
                break;
            }
            d = d.saturating_mul(self.factor).min(self.max_ban_ns);
        }
        d
    }

    /// The rule in microseconds, the Redis script's unit (rounded up).
    pub fn in_micros(&self) -> Self {
        let us = |ns: u64| ns.div_ceil(1_000).max(1);
        Self {
            strikes: self.strikes,
            within_ns: us(self.within_ns),
            ban_ns: us(self.ban_ns),
            factor: self.factor,
            max_ban_ns: us(self.max_ban_ns),
            forgive_ns: us(self.forgive_ns),
        }
    }
}

/// The penalty box's part in a charge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Penalty<'a> {
    /// Whose record.
    pub key: PenaltyKey<'a>,
    /// The scope's rule.
    pub rule: PenaltyRule,
    /// One per bucket of the charge, in order: true when that bucket's
    /// denial is a strike (a limit named in `on`; never a shadow bucket).
    pub strikes_from: smallvec::SmallVec<[bool; 4]>,
    /// A strike whatever the decision, dry run included: an outcome the
    /// caller reports (a failed login). Not while banned: then nothing is
    /// judged.
    pub forced: bool,
}

/// What the penalty box did with a charge.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PenaltyOutcome {
    /// Set when the caller is banned now: it was before the charge (then
    /// nothing was judged or taken), or this charge's strike started it.
    pub banned: Option<Ban>,
    /// True when this charge's denial was counted as a strike.
    pub struck: bool,
}

/// A ban in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ban {
    /// Until the ban ends, from the store's clock at the decision.
    pub retry_after: Duration,
    /// When it ends, in microseconds since the Unix epoch on the store's
    /// clock (0 when a local cache answered and did not keep it).
    pub until_us: u64,
    /// True when this charge's strike started it.
    pub started: bool,
}

/// One caller's record, in ticks: the strikes in the current window, the
/// escalation level, and the ban, if any.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Record {
    /// When the current strike window began.
    pub window_start: u64,
    /// Strikes in it.
    pub strikes: u64,
    /// Bans started since the caller was last forgiven: the next ban is
    /// `ban · factor^level`.
    pub level: u64,
    /// When the current (or last) ban ends; 0 for none.
    pub ban_until: u64,
    /// The last strike; 0 for none.
    pub last_strike: u64,
}

impl Record {
    /// True while a ban is in force at `now`.
    pub fn banned_at(&self, now: u64) -> bool {
        now < self.ban_until
    }

    /// Counts a strike at `now`. Returns true when it starts a ban (then
    /// `ban_until` is its end). Never called while banned: a banned
    /// caller's charges are not judged.
    pub fn strike(&mut self, rule: &PenaltyRule, now: u64) -> bool {
        // Forgiven: quiet for `forgive` since the later of the last strike
        // and the last ban's end.
        let quiet_since = self.last_strike.max(self.ban_until);
        if self.level > 0 && now >= quiet_since.saturating_add(rule.forgive_ns) {
            self.level = 0;
        }
        if self.strikes == 0 || now >= self.window_start.saturating_add(rule.within_ns) {
            self.window_start = now;
            self.strikes = 0;
        }
        self.strikes += 1;
        self.last_strike = now;
        if self.strikes < rule.strikes {
            return false;
        }
        self.ban_until = now.saturating_add(rule.ban_at(self.level));
        self.level = (self.level + 1).min(MAX_LEVEL);
        self.strikes = 0;
        true
    }

    /// When the record means nothing any more and may be forgotten: no
    /// ban, no strike window, and the level forgiven.
    pub fn forget_at(&self, rule: &PenaltyRule) -> u64 {
        let quiet_since = self.last_strike.max(self.ban_until);
        let window_end = self.window_start.saturating_add(rule.within_ns);
        quiet_since
            .saturating_add(rule.forgive_ns)
            .max(window_end)
            .max(self.ban_until)
    }
}

/// What an operator asks of the penalty box ([`super::Store::penalties`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PenaltyOp<'a> {
    /// Bans `key` for `duration` from the store's clock now, replacing any
    /// ban it is serving. Its record is kept `forget` past the ban's end,
    /// so the escalation it carries is forgiven as the scope says.
    Ban {
        /// Who.
        key: PenaltyKey<'a>,
        /// How long.
        duration: Duration,
        /// The scope's `forgive_after`.
        forget: Duration,
        /// Why, as the operator said (at most 256 bytes; may be empty):
        /// kept with the ban and listed with it.
        reason: &'a str,
    },
    /// Lifts `key`'s ban and clears its history: strikes and level.
    Unban {
        /// Who.
        key: PenaltyKey<'a>,
    },
    /// The callers of `scope` banned now, ordered by ban end then caller:
    /// at most `limit`, those after `after` (all when `None`). Bans that
    /// end between two pages shift nothing: a page resumes after the last
    /// one listed, not at a count.
    List {
        /// Whose bans.
        scope: &'a str,
        /// Where the previous page ended.
        after: Option<BanCursor<'a>>,
        /// The most to return.
        limit: u64,
    },
}

/// A place in a store's order of bans: a ban's end in the store's ticks,
/// then the store's own key of its caller. Opaque outside the store that
/// made it ([`BanEntry::position`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct BanCursor<'a> {
    /// The ban's end, in the store's ticks.
    pub until: u64,
    /// The store's key of the caller.
    pub caller: &'a [u8],
}

/// A listed ban's place in its store's order, to resume a listing after
/// it ([`BanCursor`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BanPosition {
    /// The ban's end, in the store's ticks.
    pub until: u64,
    /// The store's key of the caller.
    pub caller: Vec<u8>,
}

impl BanPosition {
    /// The cursor that resumes after this ban.
    pub fn cursor(&self) -> BanCursor<'_> {
        BanCursor {
            until: self.until,
            caller: &self.caller,
        }
    }
}

/// What the penalty box answered an operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PenaltyAnswer {
    /// The ban is in force until then.
    Banned(Ban),
    /// The caller's record was cleared; `true` when it was banned.
    Unbanned(bool),
    /// A page of bans, and how many bans the scope has in all.
    Listed {
        /// Bans in force in the scope, all pages.
        total: u64,
        /// This page.
        bans: Vec<BanEntry>,
        /// True when more bans follow this page.
        more: bool,
    },
}

/// One ban in a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BanEntry {
    /// The caller as the store keeps it: as sent, or `#` and its SHA-256
    /// in hex when longer than 64 bytes.
    pub identity: String,
    /// The operation, for a box per identity and operation.
    pub operation: Option<String>,
    /// Until the ban ends, from the store's clock at the listing.
    pub remaining: Duration,
    /// When it ends, microseconds since the Unix epoch, store clock.
    pub until_us: u64,
    /// Its place in the store's order, to list the bans after it.
    pub position: BanPosition,
    /// The reason of the operator's ban that set it; empty for a ban the
    /// penalty box started.
    pub reason: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn rule() -> PenaltyRule {
        PenaltyRule {
            strikes: 3,
            within_ns: 60 * S,
            ban_ns: 60 * S,
            factor: 2,
            max_ban_ns: 300 * S,
            forgive_ns: 3600 * S,
        }
    }

    #[test]
    fn bans_grow_by_the_factor_up_to_the_cap() {
        let r = rule();
        let got: Vec<u64> = (0..6).map(|l| r.ban_at(l) / S).collect();
        assert_eq!(got, [60, 120, 240, 300, 300, 300]);
        let flat = PenaltyRule { factor: 1, ..r };
        assert_eq!(flat.ban_at(40), 60 * S);
        assert_eq!(r.ban_at(u64::MAX), 300 * S, "no overflow, no long loop");
    }

    #[test]
    fn the_nth_strike_within_the_window_bans_and_forgiveness_resets() {
        let r = rule();
        let mut rec = Record::default();
        let t0 = 1_000 * S;
        assert!(!rec.strike(&r, t0));
        assert!(!rec.strike(&r, t0 + 59 * S));
        // The window ran out: this is the first strike of a new one.
        assert!(!rec.strike(&r, t0 + 60 * S));
        assert!(!rec.strike(&r, t0 + 61 * S));
        assert!(rec.strike(&r, t0 + 62 * S));
        assert_eq!(rec.ban_until, t0 + 122 * S);
        assert!(rec.banned_at(t0 + 122 * S - 1) && !rec.banned_at(t0 + 122 * S));
        let after = t0 + 122 * S;
        for k in 0..3 {
            assert_eq!(rec.strike(&r, after + k), k == 2);
        }
        assert_eq!(
            rec.ban_until,
            after + 2 + 120 * S,
            "the second ban is twice"
        );
        // Quiet for forgive_after since that ban's end: short again.
        let later = rec.ban_until + 3600 * S;
        for k in 0..3 {
            rec.strike(&r, later + k);
        }
        assert_eq!(rec.ban_until, later + 2 + 60 * S);
        assert!(rec.forget_at(&r) >= rec.ban_until + 3600 * S);
    }
}
