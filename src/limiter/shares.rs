//! Fair shares of one limit across the Envoy quota streams that draw on it.
//!
//! Plain computation in integers: rates in millitokens per second, bursts
//! in tokens. [`rebalance`] water-fills a limit's rate across its members by
//! their measured demand, holding back [`HEADROOM_PERMILLE`] for newcomers;
//! it shrinks at once, grows only out of what no member still holds, and
//! leaves a share alone unless it moves by more than the step. The caller
//! keeps what each member may still hold (`outstanding`): a member that
//! was told to shrink holds its old share until it has reported since.
//!
//! Across replicas, the members of one replica are water-filled together
//! with the rest of the fleet's streams ([`Fleet`], as the store last told
//! it: each of them asks an equal part of what they ask in all), and grow
//! only within the rate the store granted this replica ([`rebalance_to`]).
//! docs/rlqs.md states the algorithm and its constants.

/// Of a limit's rate, the part (in thousandths) never planned for members
/// that have already reported, so that a newcomer gets a share at once.
pub const HEADROOM_PERMILLE: u64 = 100;

/// Demand is planned with this much slack (in thousandths) on top, so a
/// member whose traffic creeps up is not denied before its next report.
pub const DEMAND_SLACK_PERMILLE: u64 = 250;

/// A share moves only when the new one differs from the current one by more
/// than this part of it (in thousandths) ...
pub const STEP_PERMILLE: u64 = 100;

/// ... and by more than this, in millitokens per second (half a token/s).
pub const MIN_STEP_MILLI: u64 = 500;

/// The least share planned for an active member while the limit has room
/// for one per member: one token per second.
pub const FLOOR_MILLI: u64 = 1000;

/// A limit, as a pool to share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pool {
    /// The limit's refill rate R, in millitokens per second.
    pub rate_milli: u64,
    /// The limit's capacity C, in tokens.
    pub burst: u64,
}

/// One member (one stream's bucket) of a pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Member {
    /// Requests per second it saw (allowed and denied), in thousandths;
    /// `None` until it has reported over a measured interval.
    pub demand_milli: Option<u64>,
    /// The share it was last told, in millitokens per second.
    pub assigned: u64,
    /// The most it may still hold: `assigned`, or more while a shrink it
    /// was told has not been confirmed by a report since.
    pub outstanding: u64,
}

/// The new share of each member, in `members`' order.
///
/// For `Σ max(outstanding, assigned) ≤ R` on entry, the result keeps
/// `Σ max(outstanding, new) ≤ R`: a share grows only out of what no member
/// may still hold.
pub fn rebalance(pool: Pool, members: &[Member]) -> Vec<u64> {
    rebalance_to(members, &targets(pool, members), pool.rate_milli)
}

/// The new share of each member, moving towards `targets` and growing only
/// within `cap`: for `Σ max(outstanding, assigned) ≤ cap` on entry, the
/// result keeps `Σ max(outstanding, new) ≤ cap`.
pub fn rebalance_to(members: &[Member], targets: &[u64], cap: u64) -> Vec<u64> {
    let mut new: Vec<u64> = members.iter().map(|m| m.assigned).collect();
    let mut growers = Vec::new();
    for (i, (m, &target)) in members.iter().zip(targets).enumerate() {
        if !moves(m.assigned, target) {
            continue;
        }
        if target < m.assigned {
            new[i] = target;
        } else {
            growers.push(i);
        }
    }
    let held: u64 = members
        .iter()
        .zip(&new)
        .map(|(m, &n)| m.outstanding.max(m.assigned).max(n))
        .sum();
    let mut free = cap.saturating_sub(held);
    for i in growers {
        let m = &members[i];
        // What it already holds covers part of the growth.
        let room = m.outstanding.max(m.assigned) - m.assigned;
        let want = targets[i] - m.assigned;
        let from_free = want.saturating_sub(room).min(free);
        free -= from_free;
        new[i] = m.assigned + (want.min(room) + from_free);
    }
    new
}

/// Whether a share moves from `current` to `target`: always from nothing,
/// otherwise by more than the step.
fn moves(current: u64, target: u64) -> bool {
    if current == 0 {
        return target > 0;
    }
    let step = permille(current, STEP_PERMILLE).max(MIN_STEP_MILLI);
    current.abs_diff(target) > step
}

/// Water-filling: every member gets up to an equal share of the rate less
/// the headroom, and what members asking for less leave goes to the others.
/// A member not measured yet asks for an equal share; none is planned below
/// the floor while the rate has room for it.
pub fn targets(pool: Pool, members: &[Member]) -> Vec<u64> {
    targets_among(pool, members, Fleet::default())
}

/// The rest of the fleet (other replicas' streams on the same group), as
/// the store last told it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Fleet {
    /// How many streams.
    pub streams: u64,
    /// What they ask for in all, in millitokens per second.
    pub ask_milli: u64,
}

/// [`targets`] for this replica's `members` among the rest of the fleet:
/// the water-fill runs over every stream of the fleet, each of the others
/// asking an equal part of `fleet.ask_milli`, and returns the members'
/// part. Every replica that sees the same fleet computes the same levels.
pub fn targets_among(pool: Pool, members: &[Member], fleet: Fleet) -> Vec<u64> {
    let asks = asks(pool, members, fleet);
    let n = members.len() as u64 + fleet.streams;
    if members.is_empty() {
        return Vec::new();
    }
    let avail = available(pool);
    let floor = FLOOR_MILLI.min(avail / n);
    let other = match fleet.streams {
        0 => None,
        k => Some(((fleet.ask_milli / k).max(floor), k)),
    };
    // (ask, how many ask it, which member or none for the others)
    let mut order: Vec<(u64, u64, Option<usize>)> = asks
        .iter()
        .enumerate()
        .map(|(i, &a)| (a, 1, Some(i)))
        .chain(other.map(|(a, k)| (a, k, None)))
        .collect();
    order.sort_by_key(|&(a, ..)| a);
    let mut out = vec![0; members.len()];
    let (mut left, mut remaining) = (avail, n);
    for (ask, count, who) in order {
        // Equal asks get one level, rounded down: never more than is left.
        let each = ask.min(left / remaining);
        if let Some(i) = who {
            out[i] = each;
        }
        left -= each.saturating_mul(count).min(left);
        remaining -= count;
    }
    out
}

/// What each member asks for, among `fleet`: its demand plus slack, or an
/// equal share of the rate less the headroom when not measured yet; at
/// least the floor while the rate has room for one per stream.
pub fn asks(pool: Pool, members: &[Member], fleet: Fleet) -> Vec<u64> {
    let n = (members.len() as u64 + fleet.streams).max(1);
    let avail = available(pool);
    let floor = FLOOR_MILLI.min(avail / n);
    members
        .iter()
        .map(|m| {
            // Demand comes from what an Envoy reports: any u64.
            let ask = m.demand_milli.map_or(avail / n, |d| {
                d.saturating_add(permille(d, DEMAND_SLACK_PERMILLE))
            });
            ask.max(floor)
        })
        .collect()
}

/// The rate less the headroom: what the water-fill plans.
fn available(pool: Pool) -> u64 {
    pool.rate_milli - permille(pool.rate_milli, HEADROOM_PERMILLE)
}

/// What `members` may hold now: `Σ max(outstanding, assigned)`.
pub fn held(members: &[Member]) -> u64 {
    members
        .iter()
        .map(|m| m.outstanding.max(m.assigned))
        .fold(0, u64::saturating_add)
}

/// What `members` would hold if every one reached its target, with what
/// they still hold: `Σ max(outstanding, assigned, target)`.
pub fn wanted(members: &[Member], targets: &[u64]) -> u64 {
    members
        .iter()
        .zip(targets)
        .map(|(m, &t)| m.outstanding.max(m.assigned).max(t))
        .fold(0, u64::saturating_add)
}

/// `p` thousandths of `x`, rounded down, without overflow.
fn permille(x: u64, p: u64) -> u64 {
    u64::try_from(u128::from(x) * u128::from(p) / 1000).unwrap_or(u64::MAX)
}

/// A member's burst for a share: its part of C in proportion to its part
/// of R, rounded down.
pub fn burst_of(pool: Pool, share_milli: u64) -> u64 {
    if pool.rate_milli == 0 {
        return 0;
    }
    let b = u128::from(pool.burst) * u128::from(share_milli) / u128::from(pool.rate_milli);
    u64::try_from(b).unwrap_or(pool.burst)
}

/// Envoy's token bucket for a share: `tokens_per_fill` every
/// `fill_interval_secs`, never faster than the share. Envoy reads the fill
/// interval in whole seconds, so a share under one token per second is one
/// token every few seconds, up to [`MAX_FILL_SECS`]; below that, `None`.
pub fn token_bucket_of(share_milli: u64) -> Option<(u64, u64)> {
    if share_milli >= 1000 {
        return Some((share_milli / 1000, 1));
    }
    if share_milli == 0 {
        return None;
    }
    let secs = 1000u64.div_ceil(share_milli);
    (secs <= MAX_FILL_SECS).then_some((1, secs))
}

/// The longest fill interval handed out: one token a minute.
pub const MAX_FILL_SECS: u64 = 60;

#[cfg(test)]
mod tests {
    use super::*;

    fn member(demand: Option<u64>, assigned: u64) -> Member {
        Member {
            demand_milli: demand,
            assigned,
            outstanding: assigned,
        }
    }

    const POOL: Pool = Pool {
        rate_milli: 20_000,
        burst: 20,
    };

    #[test]
    fn the_busy_member_gets_the_larger_share_and_headroom_is_left() {
        let t = targets(POOL, &[member(Some(15_000), 0), member(Some(5_000), 0)]);
        // 18/s to plan: the quiet one asks 6.25/s, the busy one gets the rest.
        assert_eq!(t, vec![11_750, 6_250]);
    }

    #[test]
    fn a_shrink_is_at_once_and_growth_waits_for_what_others_still_hold() {
        // One member held everything; a newcomer arrives.
        let old = Member {
            demand_milli: Some(30_000),
            assigned: 18_000,
            outstanding: 18_000,
        };
        let new = rebalance(POOL, &[old, member(None, 0)]);
        assert_eq!(new[0], 9_000, "shrinks at once");
        // Only the unheld 2/s is free until the first member confirms.
        assert_eq!(new[1], 2_000);
        let confirmed = Member {
            assigned: 9_000,
            outstanding: 9_000,
            ..old
        };
        let newcomer = Member {
            demand_milli: None,
            assigned: 2_000,
            outstanding: 2_000,
        };
        assert_eq!(rebalance(POOL, &[confirmed, newcomer])[1], 9_000);
    }

    #[test]
    fn other_replicas_streams_count_in_the_water_fill() {
        // The same levels as if the other stream were one of ours.
        let ours = [member(Some(15_000), 0)];
        let fleet = Fleet {
            streams: 1,
            ask_milli: 6_250,
        };
        assert_eq!(targets_among(POOL, &ours, fleet), vec![11_750]);
        // An unmeasured stream asks an equal share of the whole fleet.
        let fresh = [member(None, 0)];
        let three = Fleet {
            streams: 2,
            ask_milli: 40_000,
        };
        assert_eq!(targets_among(POOL, &fresh, three), vec![6_000]);
    }

    #[test]
    fn growth_stays_within_the_cap_and_shrinks_do_not_wait_for_it() {
        let grows = member(None, 1_000);
        let shrinks = member(Some(1_000), 8_000);
        let new = rebalance_to(&[grows, shrinks], &[9_000, 1_250], 10_000);
        // 8 000 is still held by the shrinking one: 1 000 is free.
        assert_eq!(new, vec![2_000, 1_250]);
        assert_eq!(wanted(&[grows, shrinks], &[9_000, 1_250]), 17_000);
        assert_eq!(held(&[grows, shrinks]), 9_000);
    }

    #[test]
    fn small_moves_are_not_sent() {
        let m = member(Some(7_500), 10_000);
        assert_eq!(rebalance(POOL, &[m]), vec![10_000]);
    }

    #[test]
    fn extreme_demands_and_rates_do_not_overflow() {
        let huge = Pool {
            rate_milli: u64::MAX,
            burst: u64::MAX,
        };
        let members = [member(Some(u64::MAX), u64::MAX / 4), member(None, 0)];
        let new = rebalance(huge, &members);
        assert!(new.iter().all(|&n| n <= u64::MAX / 2), "{new:?}");
        assert_eq!(targets(POOL, &[member(Some(u64::MAX), 0)]), vec![18_000]);
    }

    #[test]
    fn token_buckets_never_run_faster_than_the_share() {
        assert_eq!(token_bucket_of(6_999), Some((6, 1)));
        assert_eq!(token_bucket_of(400), Some((1, 3)));
        assert_eq!(token_bucket_of(10), None);
        assert_eq!(burst_of(POOL, 5_000), 5);
    }
}
