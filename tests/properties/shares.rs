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

/// One replica of a fleet: its members, and what the store holds for it.
#[derive(Debug, Clone, Default)]
struct Replica {
    members: Vec<Member>,
    published: u64,
}

/// The store's rule (`store::demand`): keep or lower at will, raise only
/// out of what the others leave of the limit.
fn grant(rate: u64, asked: u64, mine: u64, others: u64) -> u64 {
    asked.min(mine.max(rate.saturating_sub(others)))
}

/// One report on replica `r`, as the hub runs it: confirm, publish what
/// its members would hold at their fleet targets, rebalance within the
/// grant.
fn report_on(pool: Pool, fleet: &mut [Replica], r: usize, confirm: bool) {
    let others: Vec<&Replica> = fleet
        .iter()
        .enumerate()
        .filter(|&(i, _)| i != r)
        .map(|(_, x)| x)
        .collect();
    let view = shares::Fleet {
        streams: others.iter().map(|x| x.members.len() as u64).sum(),
        ask_milli: others
            .iter()
            .map(|x| {
                shares::asks(pool, &x.members, shares::Fleet::default())
                    .iter()
                    .sum::<u64>()
            })
            .sum(),
    };
    let others_held: u64 = others.iter().map(|x| x.published).sum();
    let me = &mut fleet[r];
    if confirm {
        for m in &mut me.members {
            m.outstanding = m.assigned;
        }
    }
    let targets = shares::targets_among(pool, &me.members, view);
    let asked = shares::wanted(&me.members, &targets);
    let granted = grant(pool.rate_milli, asked, me.published, others_held);
    let new = shares::rebalance_to(&me.members, &targets, granted);
    apply(&mut me.members, &new, false);
    me.published = granted;
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Across replicas that each rebalance their own members within what the
    /// store grants them, what all members may hold never sums past R (nor
    /// their bursts past C), in any order of reports.
    #[test]
    fn a_fleet_of_replicas_never_holds_more_than_the_rate(
        pool in pools(),
        sizes in prop::collection::vec(1usize..5, 2..5),
        demands in prop::collection::vec(prop::option::of(0u64..=20_000_000), 20),
        steps in prop::collection::vec(
            (0usize..5, any::<bool>(), 0usize..5, prop::option::of(0u64..=20_000_000)),
            1..40,
        ),
    ) {
        let mut next = demands.iter().copied().cycle();
        let mut fleet: Vec<Replica> = sizes
            .iter()
            .map(|&n| Replica {
                members: (0..n)
                    .map(|_| Member { demand_milli: next.next().flatten(), ..Member::default() })
                    .collect(),
                published: 0,
            })
            .collect();
        for (r, confirm, who, demand) in steps {
            let r = r % fleet.len();
            report_on(pool, &mut fleet, r, confirm);
            // Demand moves between reports, so shares shrink and grow.
            let members = &mut fleet[r].members;
            let who = who % members.len();
            members[who].demand_milli = demand;
            let all: u64 = fleet.iter().map(|x| held(&x.members)).sum();
            let published: u64 = fleet.iter().map(|x| x.published).sum();
            prop_assert!(all <= published && published <= pool.rate_milli,
                "{all} held, {published} published of {}: {fleet:?}", pool.rate_milli);
            let bursts: u64 = fleet
                .iter()
                .flat_map(|x| &x.members)
                .map(|m| shares::burst_of(pool, m.outstanding.max(m.assigned)))
                .sum();
            prop_assert!(bursts <= pool.burst, "{bursts} of burst {}", pool.burst);
        }
    }

    /// Every member of every replica gets a share once each replica has
    /// reported a few times, with room for one token per second each.
    #[test]
    fn no_member_of_the_fleet_starves(
        sizes in prop::collection::vec(1usize..4, 2..4),
        demands in prop::collection::vec(prop::option::of(0u64..=20_000_000), 12),
        spare in 0u64..=1_000_000,
    ) {
        let n: u64 = sizes.iter().map(|&s| s as u64).sum();
        let pool = Pool { rate_milli: 2 * FLOOR_MILLI * n + spare, burst: 1000 };
        let mut next = demands.iter().copied().cycle();
        let mut fleet: Vec<Replica> = sizes
            .iter()
            .map(|&k| Replica {
                members: (0..k)
                    .map(|_| Member { demand_milli: next.next().flatten(), ..Member::default() })
                    .collect(),
                published: 0,
            })
            .collect();
        for _ in 0..4 {
            for r in 0..fleet.len() {
                report_on(pool, &mut fleet, r, true);
            }
        }
        for m in fleet.iter().flat_map(|x| &x.members) {
            prop_assert!(m.assigned > 0, "{m:?} starves in {fleet:?}");
        }
    }
}
