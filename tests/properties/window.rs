//! Property tests of budget windows: in zones whose clocks move (by an hour,
//! by half an hour, at midnight, across the date line), every window holds
//! its instant, starts at the first instant of its local date, and the
//! windows tile time with no gap or overlap.
//!
//! Instants are drawn uniformly from 1970 to 2200, and half of them near one
//! of the zone's transitions, where the mistakes would be.

use jiff::Timestamp;
use jiff::civil::{Date, Weekday};
use jiff::tz::TimeZone;
use proptest::prelude::*;
use tollgate::window::Window;

const MINUTE: u64 = 60_000_000_000;
const HOUR: u64 = 60 * MINUTE;
const DAY: u64 = 24 * HOUR;
/// 1970-02-01: the first month's window starts before the epoch, and is
/// saturated to 0 (a unit test covers it), so it has no local midnight.
const FROM: u64 = 31 * DAY;
/// The longest fixed window, 366 days; past the first one, every window
/// has a previous one.
const MAX_FIXED: u64 = 366 * DAY;
/// 2200-01-01.
const UNTIL: u64 = 7_258_118_400_000_000_000;

/// Zones whose clocks move, and two whose clocks do not.
const ZONES: &[&str] = &[
    "Europe/Paris",
    "America/New_York",
    "America/Santiago",    // moves at 24:00: midnight is skipped
    "America/Havana",      // moves at 00:00 or 01:00, by the year
    "Asia/Beirut",         // moved at 00:00 until 2023
    "Australia/Lord_Howe", // half-hour DST
    "Pacific/Chatham",     // +12:45, DST +13:45
    "Pacific/Apia",        // skipped 2011-12-30 whole
    "Asia/Kolkata",
    "UTC",
];

/// A zone, and an instant: uniform, or within two days of a transition.
fn zone_and_instant() -> impl Strategy<Value = (&'static str, u64)> {
    (
        prop::sample::select(ZONES),
        FROM..UNTIL,
        any::<bool>(),
        0..4 * DAY,
    )
        .prop_map(|(zone, t, near_transition, delta)| {
            if !near_transition {
                return (zone, t);
            }
            let tz = TimeZone::get(zone).unwrap();
            let after = Timestamp::from_nanosecond(i128::from(t)).unwrap();
            let transition = tz.following(after).next().map_or(t, |tr| {
                u64::try_from(tr.timestamp().as_nanosecond()).unwrap()
            });
            (
                zone,
                (transition + delta)
                    .saturating_sub(2 * DAY)
                    .clamp(FROM, UNTIL),
            )
        })
}

fn local_date(zone: &str, ns: u64) -> Date {
    let ts = Timestamp::from_nanosecond(i128::from(ns)).unwrap();
    TimeZone::get(zone).unwrap().to_datetime(ts).date()
}

/// `start` is the first instant of its local date: the instant before it
/// is on an earlier date.
fn starts_a_local_date(zone: &str, start: u64) -> bool {
    local_date(zone, start - 1) < local_date(zone, start)
}

/// Checks the properties every window shares; returns `(start, end)`.
fn tiles(window: &Window, t: u64) -> Result<(u64, u64), TestCaseError> {
    let (start, end) = window.bounds(t);
    prop_assert!(start <= t && t < end, "{t} outside [{start}, {end})");
    // The window's own edges give the same window (the cache answers these),
    // and the neighbours meet it.
    prop_assert_eq!(window.bounds(start), (start, end));
    prop_assert_eq!(window.bounds(end - 1), (start, end));
    let (previous, previous_end) = window.bounds(start - 1);
    prop_assert_eq!(previous_end, start);
    let (next, after_next) = window.bounds(end);
    prop_assert_eq!(next, end);
    // around_us is bounds in microseconds, for the window holding t.
    let us = |ns: u64| ns / 1_000;
    let around = window.around_us(us(t));
    prop_assert_eq!(around, [us(previous), us(start), us(end), us(after_next)]);
    prop_assert!(around.is_sorted_by(|a, b| a < b), "{around:?}");
    Ok((start, end))
}

proptest! {
    // Failures print their input; a regressions file beside a submodule
    // would be misplaced (proptest looks for lib.rs or main.rs).
    #![proptest_config(ProptestConfig { cases: 1_000, failure_persistence: None, ..ProptestConfig::default() })]

    /// The month holding t runs from the first instant of the 1st of its
    /// local month to the first instant of the 1st of the next.
    #[test]
    fn a_month_in_a_dst_changing_time_zone_tiles_time((zone, t) in zone_and_instant()) {
        let month = Window::parse("month", Some(zone)).unwrap();
        let (start, end) = tiles(&month, t)?;
        let first = local_date(zone, t).first_of_month();
        prop_assert_eq!(local_date(zone, start), first);
        prop_assert!(starts_a_local_date(zone, start));
        prop_assert_eq!(local_date(zone, end), first.checked_add(jiff::Span::new().months(1)).unwrap());
        prop_assert!(starts_a_local_date(zone, end));
        prop_assert!((28 * DAY - HOUR..=31 * DAY + HOUR).contains(&(end - start)));
    }

    /// A day runs from the first instant of its local date to the first of
    /// the next: 23 to 25 hours, in steps of half an hour (Lord Howe's DST).
    #[test]
    fn a_day_in_a_dst_changing_time_zone_tiles_time((zone, t) in zone_and_instant()) {
        let day = Window::parse("day", Some(zone)).unwrap();
        let (start, end) = tiles(&day, t)?;
        let date = local_date(zone, t);
        prop_assert_eq!(local_date(zone, start), date);
        prop_assert!(starts_a_local_date(zone, start));
        prop_assert!(starts_a_local_date(zone, end));
        // Apia's 2011-12-30 never happened: the day after the 29th is the 31st.
        prop_assert!(local_date(zone, end) > date);
        prop_assert!((23 * HOUR..=25 * HOUR).contains(&(end - start)), "{} h", (end - start) / MINUTE);
        prop_assert_eq!((end - start) % (30 * MINUTE), 0);
    }

    /// A week runs from the first instant of a local Monday to the next's.
    #[test]
    fn a_week_in_a_dst_changing_time_zone_tiles_time((zone, t) in zone_and_instant()) {
        let week = Window::parse("week", Some(zone)).unwrap();
        let (start, end) = tiles(&week, t)?;
        prop_assert_eq!(local_date(zone, start).weekday(), Weekday::Monday);
        prop_assert!(starts_a_local_date(zone, start));
        prop_assert_eq!(local_date(zone, end).weekday(), Weekday::Monday);
        prop_assert!(starts_a_local_date(zone, end));
        prop_assert!((7 * DAY - 25 * HOUR..=7 * DAY + 25 * HOUR).contains(&(end - start)));
    }

    /// A fixed window is [k·len, (k+1)·len) for any length in whole µs.
    #[test]
    fn fixed_windows_tile_time_from_the_epoch(t in MAX_FIXED..UNTIL, length_us in 1_000u64..=MAX_FIXED / 1_000) {
        let window = Window::parse(&format!("{length_us}us"), None).unwrap();
        let (start, end) = tiles(&window, t)?;
        prop_assert_eq!(start % (length_us * 1_000), 0);
        prop_assert_eq!(end - start, length_us * 1_000);
    }
}
