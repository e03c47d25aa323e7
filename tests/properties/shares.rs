//! Fair shares of one limit across quota streams (`limiter::shares`): what
//! every member may hold never sums past the limit's rate or burst, and no
//! active member starves while the limit has room for one token per second
//! each.

use proptest::prelude::*;
use tollgate::limiter::shares::{self, FLOOR_MILLI, Member, Pool};

fn pools() -> impl Strategy<Value = Pool> {
    (1u64..=10_000_000, 1u64..=100_000).prop_map(|(rate_milli, burst)| Pool { rate_milli, burst })
}

/// Demands, `None` for a member not measured yet.
fn demands() -> impl Strategy<Value = Vec<Option<u64>>> {
    prop::collection::vec(prop::option::of(0u64..=20_000_000), 1..12)
}

/// Members whose holdings sum within `pool`: each holds a part of it, some
/// still holding more than they were last told (an unconfirmed shrink).
fn holding(pool: Pool, demands: &[Option<u64>], parts: &[(u64, u64)]) -> Vec<Member> {
    let n = demands.len() as u64;
    demands
        .iter()
        .zip(parts)
        .map(|(&demand_milli, &(a, extra))| {
            let each = pool.rate_milli / n;
            let assigned = each * a / 100;
            let outstanding = assigned + (each - assigned) * extra / 100;
            Member {
                demand_milli,
                assigned,
                outstanding,
            }
        })
        .collect()
}

/// One round: every share is what the member was told, and (when
/// `confirm`) each has reported since, so it holds no more than that.
fn apply(members: &mut [Member], new: &[u64], confirm: bool) {
    for (m, &n) in members.iter_mut().zip(new) {
        m.outstanding = if confirm {
            n
        } else {
            m.outstanding.max(m.assigned).max(n)
        };
        m.assigned = n;
    }
}

fn held(members: &[Member]) -> u64 {
    members.iter().map(|m| m.outstanding.max(m.assigned)).sum()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    /// Σ of what members may hold stays within R through any sequence of
    /// rebalances and confirmations, and the bursts within C.
    #[test]
    fn what_members_may_hold_never_sums_past_the_rate_or_burst(
        pool in pools(),
        demands in demands(),
        parts in prop::collection::vec((0u64..=100, 0u64..=100), 12),
        rounds in prop::collection::vec((any::<bool>(), prop::collection::vec(prop::option::of(0u64..=20_000_000), 12)), 1..8),
    ) {
        let mut members = holding(pool, &demands, &parts);
        prop_assert!(held(&members) <= pool.rate_milli);
        for (confirm, next) in rounds {
            let new = shares::rebalance(pool, &members);
            apply(&mut members, &new, confirm);
            prop_assert!(held(&members) <= pool.rate_milli,
                "{} held of {} by {members:?}", held(&members), pool.rate_milli);
            let bursts: u64 = members.iter().map(|m| shares::burst_of(pool, m.outstanding)).sum();
            prop_assert!(bursts <= pool.burst, "{bursts} of burst {}", pool.burst);
            for (m, d) in members.iter_mut().zip(next) {
                m.demand_milli = d;
            }
        }
    }

    /// With room for one token per second per member after the headroom,
    /// every member, whatever its demand, has a share of at least the floor
    /// (less one step) once the others have confirmed twice.
    #[test]
    fn no_active_member_starves(
        demands in demands(),
        parts in prop::collection::vec((0u64..=100, 0u64..=100), 12),
        spare in 0u64..=1_000_000,
    ) {
        let n = demands.len() as u64;
        let rate_milli = 2 * FLOOR_MILLI * n + spare;
        let pool = Pool { rate_milli, burst: 1000 };
        let mut members = holding(pool, &demands, &parts);
        for _ in 0..3 {
            let new = shares::rebalance(pool, &members);
            apply(&mut members, &new, true);
        }
        for m in &members {
            prop_assert!(m.assigned > 0, "{m:?} starves among {members:?}");
            prop_assert!(shares::token_bucket_of(m.assigned).is_some(), "{m:?}");
        }
    }
}
