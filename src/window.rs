//! Budget windows: which calendar day, week or month (in an IANA time zone,
//! DST included), or which fixed slice of time aligned to the Unix epoch,
//! holds an instant.
//!
//! A window is a half-open interval `[start, end)` of instants. Consecutive
//! windows tile the time line: each starts where the one before ends, so an
//! instant belongs to exactly one window.
//!
//! - A *fixed* window of length `L` is `[k·L, (k+1)·L)` since the epoch, the
//!   same everywhere; a time zone would not move it, so none is accepted.
//! - A *calendar* window starts at the local start of its first day: local
//!   midnight, or the first instant of that date when midnight falls in a
//!   DST gap (some zones move their clocks at 00:00). A day is therefore 23
//!   or 25 hours long on the days the clocks change, a week starts on the
//!   Monday (ISO weeks), and a month on the 1st.
//!
//! Pure time math: no clock of its own (callers pass the store's "now"), and
//! no I/O. The tz database is compiled into the binary (see `jiff` in
//! Cargo.toml), so every replica of a build draws the same windows.
//!
//! # Range
//! Instants are `u64` nanoseconds (or microseconds for [`Window::around_us`])
//! since the Unix epoch. Any value is accepted and nothing panics; a
//! boundary that does not fit saturates: a calendar window that starts
//! before 1970 starts at 0, and a window whose end lies past what the
//! unit can count (`u64::MAX` ns is in the year 2554; jiff stops at the year
//! 9999) ends at `u64::MAX`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use jiff::civil::{Date, Time};
use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan};

const NS_PER_US: u64 = 1_000;
const NS_PER_S: u64 = 1_000_000_000;
const DAY: Duration = Duration::from_secs(86_400);
/// The shortest fixed window the config accepts.
const MIN_FIXED: Duration = Duration::from_millis(1);
/// The longest fixed window, the same cap as a bucket's refill period.
const MAX_FIXED: Duration = Duration::from_secs(366 * 86_400);

/// A budget's window.
#[derive(Debug, Clone, PartialEq)]
pub enum Window {
    /// A fixed length, aligned to the Unix epoch: windows are `[k·len, (k+1)·len)`.
    Fixed {
        /// The window's length in nanoseconds; [`Window::parse`] makes it a
        /// whole number of microseconds (the Redis script's unit), at least 1 ms.
        length_ns: u64,
    },
    /// A calendar unit in a time zone.
    Calendar {
        /// Day, week or month.
        unit: CalendarUnit,
        /// The zone whose local midnights start the windows.
        zone: TimeZone,
        /// The zone's IANA name as the database spells it (`UTC` when none
        /// was configured): it goes into [`Window::tag`], so two spellings of
        /// one zone share their windows' keys.
        zone_name: Arc<str>,
        /// The last window [`Window::bounds`] computed, so that the common
        /// case (the same window as the previous decision) skips the tz math.
        /// Shared by clones; ignored by `==`.
        cache: WindowCache,
    },
}

/// The calendar unit of a [`Window::Calendar`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CalendarUnit {
    /// From the start of one local day to the start of the next.
    Day,
    /// An ISO week: from the start of a Monday to the start of the next Monday.
    Week,
    /// From the start of the 1st of a month to the start of the 1st of the next.
    Month,
}

/// The last window a [`Window::Calendar`] computed, packed into one atomic
/// word: its start (whole seconds since the epoch, high 35 bits) and length
/// (seconds, low 29 bits). Calendar boundaries fall on whole seconds (tz
/// offsets are whole seconds), so nothing is lost.
///
/// One word rather than two: a reader can never see the start of one
/// window with the end of another, so a hit is one relaxed load and no
/// lock. Every value ever stored is a correct window, so a stale one is
/// only a miss. Make one with `WindowCache::default()`.
#[derive(Debug, Clone, Default)]
pub struct WindowCache(Arc<AtomicU64>);

/// Bits of the packed cache that hold the window's length in seconds (up to
/// 17 years); the other 35 hold its start (up to the year 3058).
const LENGTH_BITS: u32 = 29;

impl WindowCache {
    /// The cached window when it holds `t`. The empty cache (0) holds nothing.
    fn get(&self, t: u64) -> Option<(u64, u64)> {
        let packed = self.0.load(Ordering::Relaxed);
        let start = (packed >> LENGTH_BITS).saturating_mul(NS_PER_S);
        let end = start.saturating_add((packed & ((1 << LENGTH_BITS) - 1)) * NS_PER_S);
        (start <= t && t < end).then_some((start, end))
    }

    /// Remembers `[start, end)`, unless it does not pack. An end saturated to
    /// `u64::MAX` is not a whole second, so the last window (in 2554) is
    /// recomputed each time; a start saturated to 0 packs as it is returned.
    fn put(&self, (start, end): (u64, u64)) {
        if start % NS_PER_S != 0 || end % NS_PER_S != 0 {
            return;
        }
        let (start, length) = (start / NS_PER_S, (end - start) / NS_PER_S);
        if start < 1 << (64 - LENGTH_BITS) && length < 1 << LENGTH_BITS {
            self.0
                .store((start << LENGTH_BITS) | length, Ordering::Relaxed);
        }
    }
}

/// A cache never makes two windows differ: it only remembers what the
/// window's own fields imply.
impl PartialEq for WindowCache {
    fn eq(&self, _: &WindowCache) -> bool {
        true
    }
}

impl Window {
    /// Parses the config's `window` (`day`, `week`, `month`, or a humantime
    /// duration such as `1h`, `90s`: at least 1 ms, whole microseconds, at
    /// most 366 days) and `time_zone` (an IANA name; `None` = UTC). A fixed
    /// window with a time zone is refused (the zone only moves calendar
    /// windows). Err is a short message without the field path, e.g.
    /// `unknown time zone "Mars/Base"`.
    pub fn parse(window: &str, time_zone: Option<&str>) -> Result<Window, String> {
        let unit = match window {
            "day" => CalendarUnit::Day,
            "week" => CalendarUnit::Week,
            "month" => CalendarUnit::Month,
            _ => {
                let length_ns = fixed_length_ns(window)?;
                if let Some(zone) = time_zone {
                    return Err(format!(
                        "a fixed window ({window}) takes no time zone (got {zone:?}): \
                         only day, week and month follow local time"
                    ));
                }
                return Ok(Window::Fixed { length_ns });
            }
        };
        let (zone, zone_name) = zone(time_zone)?;
        Ok(Window::Calendar {
            unit,
            zone,
            zone_name,
            cache: WindowCache::default(),
        })
    }

    /// The window `[start, end)` that contains `unix_ns` (nanoseconds since
    /// the Unix epoch), in ns. `start <= unix_ns < end`, except that an end
    /// past `u64::MAX` saturates to it (see the module's "Range").
    ///
    /// Calendar windows: after the first call in a window, one relaxed
    /// atomic load and two comparisons; the tz math runs once per new window
    /// (or when callers alternate between windows, each switch).
    pub fn bounds(&self, unix_ns: u64) -> (u64, u64) {
        match self {
            Window::Fixed { length_ns } => {
                let length = (*length_ns).max(1);
                let start = unix_ns - unix_ns % length;
                (start, start.saturating_add(length))
            }
            Window::Calendar {
                unit, zone, cache, ..
            } => {
                if let Some(hit) = cache.get(unix_ns) {
                    return hit;
                }
                let (start, end) = calendar_window(*unit, zone, i128::from(unix_ns));
                let window = (saturate(start), saturate(end));
                cache.put(window);
                window
            }
        }
    }

    /// Boundaries in MICROseconds around `unix_us`: [start of the previous
    /// window, start of the current, start of the next, end of the next].
    /// Four strictly increasing values; the Redis script picks whichever of
    /// the three windows holds Redis's own clock, so a replica's clock that
    /// is off by less than a window never decides the window.
    ///
    /// At the edges of the range the values saturate and may repeat: in the
    /// first window after the epoch the previous one starts at 0 too, and
    /// past jiff's year 9999 the last ones are `u64::MAX`. Not cached: it
    /// serves the Redis path, where a round trip dwarfs the tz math.
    pub fn around_us(&self, unix_us: u64) -> [u64; 4] {
        match self {
            Window::Fixed { length_ns } => {
                let length = (length_ns / NS_PER_US).max(1);
                let start = unix_us - unix_us % length;
                let next = start.saturating_add(length);
                [
                    start.saturating_sub(length),
                    start,
                    next,
                    next.saturating_add(length),
                ]
            }
            Window::Calendar { unit, zone, .. } => {
                let t = i128::from(unix_us) * i128::from(NS_PER_US);
                let (start, next) = calendar_window(*unit, zone, t);
                let previous = match start {
                    i128::MIN => start,
                    _ => calendar_window(*unit, zone, start - 1).0,
                };
                let after_next = match next {
                    i128::MAX => next,
                    _ => calendar_window(*unit, zone, next).1,
                };
                [previous, start, next, after_next].map(|ns| saturate(ns.div_euclid(1_000)))
            }
        }
    }

    /// The nominal length, for reporting (`refill_period` in responses): a
    /// fixed window's length; 1 day, 7 days, or 31 days for calendar windows.
    pub fn nominal(&self) -> Duration {
        match self {
            Window::Fixed { length_ns } => Duration::from_nanos(*length_ns),
            Window::Calendar { unit, .. } => match unit {
                CalendarUnit::Day => DAY,
                CalendarUnit::Week => DAY * 7,
                CalendarUnit::Month => DAY * 31,
            },
        }
    }

    /// A short stable text naming the window, for store keys: e.g.
    /// `day@Europe/Paris`, `month@UTC`, `3600000000us` (fixed, in µs). Only
    /// characters `[A-Za-z0-9_+-/@]`.
    pub fn tag(&self) -> String {
        match self {
            Window::Fixed { length_ns } => format!("{}us", length_ns / NS_PER_US),
            Window::Calendar {
                unit, zone_name, ..
            } => format!("{}@{zone_name}", unit.name()),
        }
    }

    /// The window a [`Window::tag`] names, so a reservation whose rule a
    /// reload removed still settles against the window it spent in.
    pub fn from_tag(tag: &str) -> Option<Window> {
        if let Some(us) = tag.strip_suffix("us") {
            let us: u64 = us.parse().ok()?;
            return Some(Window::Fixed {
                length_ns: us.checked_mul(NS_PER_US)?,
            });
        }
        let (unit, zone) = tag.split_once('@')?;
        Window::parse(unit, Some(zone)).ok()
    }
}

// Equality compares the unit and the zone; the cache never differs in
// meaning, so it is an equivalence.
impl Eq for Window {}

impl CalendarUnit {
    fn name(self) -> &'static str {
        match self {
            CalendarUnit::Day => "day",
            CalendarUnit::Week => "week",
            CalendarUnit::Month => "month",
        }
    }

    /// The first date of the unit that holds `date`.
    fn first_date(self, date: Date) -> Option<Date> {
        match self {
            CalendarUnit::Day => Some(date),
            CalendarUnit::Week => {
                let since_monday = date.weekday().to_monday_zero_offset();
                date.checked_sub(i64::from(since_monday).days()).ok()
            }
            CalendarUnit::Month => Some(date.first_of_month()),
        }
    }

    /// The first date of the unit `n` units after (or before) the one that
    /// starts on `first`. None past jiff's years ±9999.
    fn step(self, first: Date, n: i64) -> Option<Date> {
        match self {
            CalendarUnit::Day => first.checked_add(n.days()),
            CalendarUnit::Week => first.checked_add((7 * n).days()),
            CalendarUnit::Month => first.checked_add(n.months()),
        }
        .ok()
    }
}

/// The calendar window holding `t` (ns since the epoch), as `[start, end)`
/// in ns. An edge past jiff's range is `i128::MIN` or `i128::MAX`.
fn calendar_window(unit: CalendarUnit, zone: &TimeZone, t: i128) -> (i128, i128) {
    let clamped = t.clamp(
        Timestamp::MIN.as_nanosecond(),
        Timestamp::MAX.as_nanosecond(),
    );
    let local = Timestamp::from_nanosecond(clamped).map(|ts| zone.to_datetime(ts).date());
    let Some(mut first) = local.ok().and_then(|d| unit.first_date(d)) else {
        return (i128::MIN, i128::MAX);
    };
    // The unit of t's local date holds t, except inside a fold that crosses
    // midnight: the repeated hour before midnight belongs to the day that
    // had already begun. So step, at most a few times, until it holds t.
    let mut window = (i128::MIN, i128::MAX);
    for _ in 0..4 {
        let next = unit.step(first, 1);
        window = (
            start_of(zone, Some(first), i128::MIN),
            start_of(zone, next, i128::MAX),
        );
        let towards = if t < window.0 {
            -1
        } else if t >= window.1 {
            1
        } else {
            return window;
        };
        match unit.step(first, towards) {
            Some(date) => first = date,
            None => break,
        }
    }
    window
}

/// The first instant of `date` in `zone`, in ns: local midnight, or the
/// instant just after the gap when midnight is skipped (jiff's "compatible"
/// disambiguation; in a fold it takes the first midnight). `beyond` when
/// the date or its start is past jiff's range.
fn start_of(zone: &TimeZone, date: Option<Date>, beyond: i128) -> i128 {
    date.and_then(|d| zone.to_timestamp(d.to_datetime(Time::midnight())).ok())
        .map_or(beyond, Timestamp::as_nanosecond)
}

/// An i128 instant as a u64, saturating at both ends.
fn saturate(ns: i128) -> u64 {
    u64::try_from(ns.max(0)).unwrap_or(u64::MAX)
}

/// A fixed window's length in ns, from a humantime duration.
fn fixed_length_ns(window: &str) -> Result<u64, String> {
    let length = humantime::parse_duration(window).map_err(|e| {
        format!(
            "unknown window {window:?}: expected day, week, month or a duration such as 1h ({e})"
        )
    })?;
    if length < MIN_FIXED {
        return Err(format!("window {window} is shorter than 1ms"));
    }
    if length > MAX_FIXED {
        return Err(format!("window {window} is longer than 366 days"));
    }
    if length.subsec_nanos() % 1_000 != 0 {
        return Err(format!(
            "window {window} is not a whole number of microseconds"
        ));
    }
    // At most 366 days, so it fits: 3.2e16 ns.
    u64::try_from(length.as_nanos()).map_err(|_| format!("window {window} is too long"))
}

/// The zone and its name for the tag; `None` is UTC.
fn zone(name: Option<&str>) -> Result<(TimeZone, Arc<str>), String> {
    let Some(name) = name else {
        return Ok((TimeZone::UTC, Arc::from("UTC")));
    };
    let zone = jiff::tz::db()
        .get(name)
        .map_err(|_| format!("unknown time zone {name:?}"))?;
    // The database's own spelling, so `europe/paris` keys as `Europe/Paris`.
    let spelled = zone.iana_name().unwrap_or(name);
    let tag_safe = |c: char| c.is_ascii_alphanumeric() || "_+-/".contains(c);
    if !spelled.chars().all(tag_safe) {
        return Err(format!(
            "time zone {name:?} has characters a store key cannot carry"
        ));
    }
    let spelled = Arc::from(spelled);
    Ok((zone, spelled))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: u64 = 3_600 * NS_PER_S;

    /// An RFC 3339 instant as ns since the epoch.
    fn ns(instant: &str) -> u64 {
        let ts: Timestamp = instant.parse().unwrap();
        u64::try_from(ts.as_nanosecond()).unwrap()
    }

    fn window(unit: &str, zone: &str) -> Window {
        Window::parse(unit, Some(zone)).unwrap()
    }

    /// The day window holding `instant` in `zone`.
    fn day_in(zone: &str, instant: &str) -> (u64, u64) {
        window("day", zone).bounds(ns(instant))
    }

    #[test]
    fn a_day_in_paris_starts_at_local_midnight() {
        let (start, end) = day_in("Europe/Paris", "2024-07-14T12:00:00+02:00");
        assert_eq!(start, ns("2024-07-14T00:00:00+02:00"));
        assert_eq!(end, ns("2024-07-15T00:00:00+02:00"));
    }

    #[test]
    fn the_day_dst_begins_is_23_hours_long_in_new_york_and_the_day_it_ends_25() {
        for (noon, midnight, hours) in [
            ("2024-03-10T12:00:00-04:00", "2024-03-10T00:00:00-05:00", 23),
            ("2024-11-03T12:00:00-05:00", "2024-11-03T00:00:00-04:00", 25),
        ] {
            let (start, end) = day_in("America/New_York", noon);
            assert_eq!((start, end - start), (ns(midnight), hours * HOUR), "{noon}");
        }
    }

    #[test]
    fn a_day_whose_midnight_is_skipped_starts_at_its_first_instant() {
        // Chile moves its clocks at 24:00: 2023-09-03 00:00 never happened
        // in Santiago, the clocks went from 23:59:59 -04 to 01:00 -03.
        let (start, end) = day_in("America/Santiago", "2023-09-03T12:00:00-03:00");
        assert_eq!(start, ns("2023-09-03T01:00:00-03:00"));
        assert_eq!(end, ns("2023-09-04T00:00:00-03:00"));
        // The day before ends where this one starts: no gap between them.
        assert_eq!(
            day_in("America/Santiago", "2023-09-02T23:59:59.999999999-04:00").1,
            start
        );
    }

    #[test]
    fn an_hour_repeated_across_midnight_belongs_to_the_day_already_begun() {
        // A zone (+1, summer +2) whose clocks go back from 00:30 to 23:30:
        // the half hour before midnight happens twice, the second time after
        // the next day began, and it belongs to that day.
        let day = Window::Calendar {
            unit: CalendarUnit::Day,
            zone: TimeZone::posix("XST-1XDT,M3.5.0,M10.5.0/0:30").unwrap(),
            zone_name: Arc::from("Test/Fold"),
            cache: WindowCache::default(),
        };
        let sunday = ns("2024-10-27T00:00:00+02:00");
        assert_eq!(day.bounds(sunday - 1).1, sunday);
        // 23:45 the second time: Saturday on the clock, but Sunday had begun.
        let again = ns("2024-10-26T23:45:00+01:00");
        assert_eq!(day.bounds(again), (sunday, ns("2024-10-28T00:00:00+01:00")));
        let mut t = ns("2024-10-26T20:00:00Z");
        while t < ns("2024-10-27T04:00:00Z") {
            let (start, end) = day.bounds(t);
            assert!(start <= t && t < end && day.bounds(end).0 == end, "{t}");
            t += 5 * 60 * NS_PER_S;
        }
    }

    #[test]
    fn weeks_start_on_monday() {
        let week = window("week", "Europe/Paris");
        // Sunday 2024-03-31, the day Paris moves to summer time.
        let (start, end) = week.bounds(ns("2024-03-31T23:00:00+02:00"));
        assert_eq!(start, ns("2024-03-25T00:00:00+01:00"));
        assert_eq!(end, ns("2024-04-01T00:00:00+02:00"));
        assert_eq!(end - start, 7 * 24 * HOUR - HOUR);
        // Monday 00:00 is the first instant of the next week.
        assert_eq!(week.bounds(end), (end, ns("2024-04-08T00:00:00+02:00")));
    }

    #[test]
    fn months_start_on_the_first_and_last_28_to_31_days() {
        let month = Window::parse("month", None).unwrap();
        let (start, end) = month.bounds(ns("2024-02-29T23:59:59.999999999Z"));
        assert_eq!(
            (start, end),
            (ns("2024-02-01T00:00:00Z"), ns("2024-03-01T00:00:00Z"))
        );
        let (start, end) = month.bounds(ns("2023-02-01T00:00:00Z"));
        assert_eq!(end - start, 28 * 24 * HOUR);
        let (start, end) = month.bounds(ns("2023-12-31T12:00:00Z"));
        assert_eq!(
            (start, end),
            (ns("2023-12-01T00:00:00Z"), ns("2024-01-01T00:00:00Z"))
        );
    }

    #[test]
    fn a_month_in_a_zone_starts_at_its_local_midnight() {
        let month = window("month", "Asia/Kolkata");
        // 20:00 UTC on the 31st is 01:30 on February 1st in Kolkata.
        let february = (
            ns("2024-02-01T00:00:00+05:30"),
            ns("2024-03-01T00:00:00+05:30"),
        );
        assert_eq!(month.bounds(ns("2024-01-31T20:00:00Z")), february);
    }

    #[test]
    fn a_fixed_window_is_aligned_to_the_epoch() {
        let hour = Window::parse("1h", None).unwrap();
        let t = ns("2024-07-14T12:34:56.789Z");
        assert_eq!(
            hour.bounds(t),
            (ns("2024-07-14T12:00:00Z"), ns("2024-07-14T13:00:00Z"))
        );
        let seven = Window::parse("7s", None).unwrap();
        assert_eq!(seven.bounds(0), (0, 7 * NS_PER_S));
        assert_eq!(seven.bounds(7 * NS_PER_S), (7 * NS_PER_S, 14 * NS_PER_S));
        assert_eq!(seven.bounds(20 * NS_PER_S), (14 * NS_PER_S, 21 * NS_PER_S));
    }

    #[test]
    fn around_gives_the_previous_current_and_next_windows() {
        let day = window("day", "America/New_York");
        let t = ns("2024-03-10T12:00:00-04:00") / NS_PER_US;
        let us = |s: &str| ns(s) / NS_PER_US;
        assert_eq!(
            day.around_us(t),
            [
                us("2024-03-09T00:00:00-05:00"),
                us("2024-03-10T00:00:00-05:00"),
                us("2024-03-11T00:00:00-04:00"),
                us("2024-03-12T00:00:00-04:00"),
            ]
        );
        let ten = Window::parse("10s", None).unwrap();
        assert_eq!(
            ten.around_us(25_000_000),
            [10_000_000, 20_000_000, 30_000_000, 40_000_000]
        );
    }

    #[test]
    fn bad_zone_and_bad_window_are_refused_with_a_clear_message() {
        let err = |w: &str, z: Option<&str>| Window::parse(w, z).unwrap_err();
        assert_eq!(
            err("day", Some("Mars/Base")),
            r#"unknown time zone "Mars/Base""#
        );
        assert!(
            err("fortnight", None)
                .starts_with(r#"unknown window "fortnight": expected day, week, month"#)
        );
        assert!(err("Day", None).starts_with(r#"unknown window "Day""#));
        assert_eq!(err("500us", None), "window 500us is shorter than 1ms");
        assert_eq!(
            err("367days", None),
            "window 367days is longer than 366 days"
        );
        assert_eq!(
            err("1ms 1ns", None),
            "window 1ms 1ns is not a whole number of microseconds"
        );
        assert!(
            err("1h", Some("Europe/Paris")).starts_with("a fixed window (1h) takes no time zone")
        );
    }

    #[test]
    fn fixed_windows_run_from_1ms_to_366_days_in_whole_microseconds() {
        assert_eq!(
            Window::parse("1ms", None),
            Ok(Window::Fixed {
                length_ns: 1_000_000
            })
        );
        assert_eq!(
            Window::parse("1ms 1us", None),
            Ok(Window::Fixed {
                length_ns: 1_001_000
            })
        );
        let longest = Window::parse("366days", None).unwrap();
        assert_eq!(longest.nominal(), MAX_FIXED);
    }

    #[test]
    fn tags_name_the_unit_and_zone_or_the_length_in_microseconds() {
        assert_eq!(window("day", "Europe/Paris").tag(), "day@Europe/Paris");
        assert_eq!(Window::parse("month", None).unwrap().tag(), "month@UTC");
        assert_eq!(Window::parse("1h", None).unwrap().tag(), "3600000000us");
        // The database's spelling, so one zone keys one way.
        assert_eq!(window("week", "europe/paris").tag(), "week@Europe/Paris");
        let key_safe = |c: char| c.is_ascii_alphanumeric() || "_+-/@".contains(c);
        for zone in [
            "America/Port-au-Prince",
            "Etc/GMT+5",
            "America/Argentina/Buenos_Aires",
        ] {
            assert!(window("day", zone).tag().chars().all(key_safe), "{zone}");
        }
    }

    #[test]
    fn nominal_lengths_are_a_day_a_week_and_31_days() {
        let nominal = |w: &str| Window::parse(w, None).unwrap().nominal();
        assert_eq!(nominal("day"), DAY);
        assert_eq!(nominal("week"), 7 * DAY);
        assert_eq!(nominal("month"), 31 * DAY);
        assert_eq!(nominal("90s"), Duration::from_secs(90));
    }

    #[test]
    fn no_instant_panics_and_the_edges_saturate() {
        for w in ["day", "week", "month", "1ms", "366days"] {
            let w = Window::parse(w, None).unwrap();
            assert_eq!(w.bounds(u64::MAX).1, u64::MAX, "{w:?}");
            assert_eq!(w.bounds(0).0, 0, "{w:?}");
            assert_eq!(w.around_us(0)[0], 0, "{w:?}");
            assert_eq!(w.around_us(u64::MAX)[3], u64::MAX, "{w:?}");
            let [a, b, c, d] = w.around_us(u64::MAX / 2);
            assert!(a <= b && b <= c && c <= d, "{w:?}");
        }
        // Before 1970 in Paris: the first day starts at 0, not at 23:00Z.
        assert_eq!(window("day", "Europe/Paris").bounds(0), (0, 23 * HOUR));
        // A Fixed built by hand with no length does not divide by zero.
        assert_eq!(Window::Fixed { length_ns: 0 }.around_us(5), [4, 5, 6, 7]);
    }

    #[test]
    fn the_cache_answers_only_for_the_window_it_holds() {
        let day = window("day", "Europe/Paris");
        let later = ns("2024-07-15T08:00:00+02:00");
        let earlier = ns("2024-07-14T08:00:00+02:00");
        let fresh = || window("day", "Europe/Paris");
        assert_eq!(day.bounds(later), fresh().bounds(later));
        assert_eq!(day.bounds(earlier), fresh().bounds(earlier));
        assert_eq!(day.bounds(later - 1), fresh().bounds(later - 1));
        // Clones share the cache and still compare equal to a new window.
        let clone = day.clone();
        assert_eq!(clone.bounds(earlier), fresh().bounds(earlier));
        assert_eq!(clone, fresh());
        assert_ne!(clone, window("day", "Europe/Berlin"));
    }

    #[test]
    fn threads_sharing_a_cache_never_see_a_torn_window() {
        let day = window("day", "America/New_York");
        let instants = [
            ns("2024-03-09T12:00:00-05:00"),
            ns("2024-03-10T12:00:00-04:00"),
            ns("2024-03-11T12:00:00-04:00"),
        ];
        let expected: Vec<_> = instants.iter().map(|&t| day.bounds(t)).collect();
        std::thread::scope(|s| {
            for offset in 0..2 {
                let (day, expected) = (day.clone(), &expected);
                s.spawn(move || {
                    for i in 0..30_000 {
                        let k = (i + offset) % instants.len();
                        assert_eq!(day.bounds(instants[k]), expected[k]);
                    }
                });
            }
        });
    }

    #[test]
    fn a_window_can_be_shared_between_threads() {
        fn shared<T: Send + Sync + Clone>() {}
        shared::<Window>();
    }
}
