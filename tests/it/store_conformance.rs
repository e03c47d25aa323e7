//! One behavioural suite, the same expectations, for every store: the
//! embedded one and Redis standalone, Sentinel and Cluster.
//!
//! Time is real (Redis keeps its own clock), so assertions about waits are
//! bounds that a correct store meets however slow the machine, plus "sleep
//! the retry_after and the same request is allowed".

use std::time::Duration;

use crate::common::redis::{Cluster, Sentinel, Standalone};
use crate::shaping::a_shaped_burst_is_spread_and_a_denial_takes_nothing;
use tollgate::bucket::Shape;
use tollgate::config::HashTag;
use tollgate::store::memory::MemoryStore;
use tollgate::store::{
    BanPosition, BucketCharge, BucketKey, Charge, ChargeOutcome, Condition, DemandAnswer,
    DemandCall, LeaseCall, LeaseOp, LeaseOutcome, Once, Open, Penalty, PenaltyAnswer, PenaltyKey,
    PenaltyOp, PenaltyRule, SettleBucket, Settled, Settlement, Store, StoreError, StoreExt,
};
use tollgate::window::Window;

const MS: u64 = 1_000_000;

fn bucket<'a>(scope: &'a str, rule: &'a str, capacity: u64, period_ms: u64) -> BucketCharge<'a> {
    BucketCharge {
        key: BucketKey {
            scope,
            rule,
            identity: Some("alice"),
            operation: None,
            hash_tag: Default::default(),
        },
        shape: Shape {
            capacity,
            period: period_ms * MS,
        },
        cost: 1,
        shadow: false,
        reserve: 0,
        window: None,
        max_delay: std::time::Duration::ZERO,
    }
}

fn with_cost(mut b: BucketCharge<'_>, cost: u64) -> BucketCharge<'_> {
    b.cost = cost;
    b
}

async fn one(store: &impl Store, buckets: Vec<BucketCharge<'_>>, dry_run: bool) -> ChargeOutcome {
    let mut out = store
        .check_and_take(&[Charge {
            buckets: buckets.into(),
            dry_run,
            marks: false,
            lease: None,
            open: None,
            penalty: None,
        }])
        .await
        .expect("store answers");
    out.pop().expect("one outcome")
}

async fn full_bucket_admits_its_capacity_then_denies(store: &impl Store) {
    // 3 tokens per 30 s: one every 10 s, so the test never sees a refill.
    let b = bucket("capacity", "r", 3, 30_000);
    for left in [2, 1, 0] {
        let o = one(store, vec![b], false).await;
        assert!(o.allowed);
        assert_eq!(o.buckets[0].remaining, left);
        assert_eq!(o.buckets[0].retry_after, None);
    }
    let o = one(store, vec![b], false).await;
    assert!(!o.allowed);
    assert!(!o.buckets[0].conforms);
    let wait = o.buckets[0].retry_after.expect("a retry_after");
    // The next token comes at most one emission interval (10 s) away.
    assert!(
        wait > Duration::from_secs(9) && wait <= Duration::from_secs(10),
        "{wait:?}"
    );
    let reset = o.buckets[0].reset_after;
    assert!(
        reset > Duration::from_secs(29) && reset <= Duration::from_secs(30),
        "{reset:?}"
    );
}

async fn sleeping_retry_after_makes_the_request_allowed(store: &impl Store) {
    // One token every 100 ms.
    let b = bucket("retry", "r", 2, 200);
    assert!(one(store, vec![with_cost(b, 2)], false).await.allowed);
    let o = one(store, vec![b], false).await;
    assert!(!o.allowed);
    let wait = o.buckets[0].retry_after.expect("a retry_after");
    assert!(wait <= Duration::from_millis(100), "{wait:?}");
    tokio::time::sleep(wait).await;
    assert!(
        one(store, vec![b], false).await.allowed,
        "allowed after {wait:?}"
    );
}

async fn multi_bucket_charges_are_all_or_nothing(store: &impl Store) {
    let wide = bucket("multi", "wide", 5, 60_000);
    let narrow = bucket("multi", "narrow", 1, 60_000);
    let o = one(store, vec![wide, narrow], false).await;
    assert!(o.allowed);
    assert_eq!((o.buckets[0].remaining, o.buckets[1].remaining), (4, 0));
    let o = one(store, vec![wide, narrow], false).await;
    assert!(!o.allowed);
    assert!(o.buckets[0].conforms && !o.buckets[1].conforms);
    // The wide bucket held its token but gave nothing: still 4.
    assert_eq!(o.buckets[0].remaining, 4);
    let o = one(store, vec![wide], true).await;
    assert_eq!(o.buckets[0].remaining, 4);
}

async fn denied_request_takes_no_tokens(store: &impl Store) {
    let b = bucket("denied", "r", 3, 60_000);
    assert_eq!(
        one(store, vec![with_cost(b, 2)], false).await.buckets[0].remaining,
        1
    );
    for _ in 0..3 {
        let o = one(store, vec![with_cost(b, 2)], false).await;
        assert!(!o.allowed);
        assert_eq!(o.buckets[0].remaining, 1);
    }
    assert!(
        one(store, vec![b], false).await.allowed,
        "the last token is still there"
    );
}

async fn dry_run_takes_nothing(store: &impl Store) {
    let b = bucket("dry", "r", 2, 60_000);
    for _ in 0..5 {
        let o = one(store, vec![b], true).await;
        assert!(o.allowed);
        assert_eq!(o.buckets[0].remaining, 2);
    }
    assert_eq!(one(store, vec![b], false).await.buckets[0].remaining, 1);
}

async fn shadow_bucket_never_denies_but_is_charged_when_it_can_be(store: &impl Store) {
    let enforced = bucket("shadow", "enforced", 10, 60_000);
    let mut shadow = bucket("shadow", "shadow", 1, 60_000);
    shadow.shadow = true;
    let o = one(store, vec![enforced, shadow], false).await;
    assert!(o.allowed);
    assert_eq!(o.buckets[1].remaining, 0, "the shadow bucket was charged");
    let o = one(store, vec![enforced, shadow], false).await;
    assert!(o.allowed, "a shadow bucket never denies");
    assert!(!o.buckets[1].conforms);
    assert_eq!(o.buckets[0].remaining, 8);
}

async fn cost_over_capacity_is_denied_without_retry_after(store: &impl Store) {
    let b = with_cost(bucket("over", "r", 5, 1_000), 6);
    let o = one(store, vec![b], false).await;
    assert!(!o.allowed);
    assert_eq!(o.buckets[0].retry_after, None);
    assert_eq!(o.buckets[0].remaining, 5, "nothing taken");
}

async fn a_refilled_bucket_is_the_same_as_a_new_one(store: &impl Store) {
    let b = bucket("expiry", "r", 2, 100);
    let o = one(store, vec![with_cost(b, 2)], false).await;
    let reset = o.buckets[0].reset_after;
    assert!(reset <= Duration::from_millis(100) && reset > Duration::ZERO);
    tokio::time::sleep(reset + Duration::from_millis(5)).await;
    let o = one(store, vec![b], true).await;
    assert_eq!(o.buckets[0].remaining, 2);
    assert_eq!(o.buckets[0].reset_after, Duration::ZERO);
}

async fn charges_in_one_call_are_independent(store: &impl Store) {
    let a = bucket("batch", "a", 1, 60_000);
    let b = bucket("batch", "b", 1, 60_000);
    assert!(one(store, vec![a], false).await.allowed);
    let out = store
        .check_and_take(&[
            Charge {
                buckets: smallvec::smallvec![a],
                dry_run: false,
                marks: false,
                lease: None,
                open: None,
                penalty: None,
            },
            Charge {
                buckets: smallvec::smallvec![b],
                dry_run: false,
                marks: false,
                lease: None,
                open: None,
                penalty: None,
            },
            Charge {
                buckets: smallvec::smallvec![],
                dry_run: false,
                marks: false,
                lease: None,
                open: None,
                penalty: None,
            },
        ])
        .await
        .unwrap();
    assert_eq!(out.len(), 3);
    assert!(!out[0].allowed);
    assert!(out[1].allowed);
    assert!(out[2].allowed);
}

async fn identities_and_operations_keep_their_own_buckets(store: &impl Store) {
    let hostile = [
        "alice", "alice:*", "alice}", "{alice}", "a:b", "a", "%41lice", "ålice", "",
    ];
    let long = "x".repeat(256);
    for id in hostile.iter().copied().chain([long.as_str()]) {
        let mut b = bucket("hostile", "r", 1, 60_000);
        b.key.identity = Some(id);
        let o = one(store, vec![b], false).await;
        assert!(o.allowed, "identity {id:?} got someone else's empty bucket");
    }
    let mut b = bucket("hostile", "r", 1, 60_000);
    b.key.identity = Some("a");
    b.key.operation = Some("b");
    assert!(one(store, vec![b], false).await.allowed, "a + b is not a:b");
}

/// Takes `b` as a reservation does, then settles it at `actual`; returns
/// the bucket's remaining after the settle.
async fn reserve_then_settle(store: &impl Store, b: BucketCharge<'_>, actual: u64) -> u64 {
    let mark = reserve(store, b).await;
    settle_at(store, b, mark, actual).await
}

/// Takes `b` as a reservation does; returns its mark.
async fn reserve(store: &impl Store, b: BucketCharge<'_>) -> tollgate::bucket::Mark {
    let taken = store
        .check_and_take_one(&Charge {
            buckets: [b].into_iter().collect(),
            dry_run: false,
            marks: true,
            lease: None,
            open: None,
            penalty: None,
        })
        .await
        .expect("store answers");
    assert!(taken.allowed, "{taken:?}");
    taken.buckets[0].mark
}

/// Settles `b`, taken with `mark`, at `actual`; returns its remaining.
async fn settle_at(
    store: &impl Store,
    b: BucketCharge<'_>,
    mark: tollgate::bucket::Mark,
    actual: u64,
) -> u64 {
    let settled = store
        .settle(&Settlement {
            buckets: vec![SettleBucket {
                charge: b,
                actual,
                mark: Some(mark),
            }],
            once: None,
        })
        .await
        .expect("store answers");
    let Settled::Applied(after) = settled else {
        panic!("{settled:?}")
    };
    after[0].remaining
}

/// Issue 19: a settle takes at most the capacity above its estimate, at
/// most one period of debt past empty, and never the headroom its
/// reservation had to leave; a budget's likewise.
async fn a_settle_far_above_its_estimate_is_bounded(store: &impl Store) {
    // 10 tokens per 100 s: one every 10 s.
    let b = bucket("debt", "r", 10, 100_000);
    // Two reservations, both settled at 2^32 - 1: the first takes 10 more
    // (12 tokens down), the second meets the ceiling of one period of debt.
    let (first, second) = (reserve(store, b).await, reserve(store, b).await);
    settle_at(store, b, first, u64::from(u32::MAX)).await;
    settle_at(store, b, second, u64::from(u32::MAX)).await;
    let o = one(store, vec![b], true).await;
    let wait = o.buckets[0].retry_after.expect("in debt");
    // One period of debt, then one token: 110 s at most, not years.
    assert!(
        wait > Duration::from_secs(100) && wait <= Duration::from_secs(110),
        "{wait:?}"
    );
    let reset = o.buckets[0].reset_after;
    assert!(reset <= Duration::from_secs(200), "{reset:?}");
    // A reservation that had to leave 3 tokens leaves them.
    let shed = BucketCharge {
        reserve: 3,
        ..bucket("debt-headroom", "r", 10, 100_000)
    };
    assert_eq!(
        reserve_then_settle(store, shed, u64::from(u32::MAX)).await,
        3
    );
    assert!(
        one(
            store,
            vec![with_cost(bucket("debt-headroom", "r", 10, 100_000), 3)],
            false
        )
        .await
        .allowed
    );
    // A budget of 10 an hour: the spend stops at twice the budget, or at
    // the budget less the headroom.
    let hour = Window::Fixed {
        length_ns: 3_600_000 * MS,
    };
    let budget = BucketCharge {
        window: Some(&hour),
        max_delay: std::time::Duration::ZERO,
        ..bucket("debt-budget", "r", 10, 1)
    };
    assert_eq!(
        reserve_then_settle(store, budget, u64::from(u32::MAX)).await,
        0
    );
    let shed = BucketCharge {
        reserve: 4,
        window: Some(&hour),
        max_delay: std::time::Duration::ZERO,
        ..bucket("debt-budget-headroom", "r", 10, 1)
    };
    assert_eq!(
        reserve_then_settle(store, shed, u64::from(u32::MAX)).await,
        4
    );
}

/// Issue 19: a reservation settles only while the record its charge
/// opened exists, and the settle removes it: once, and never for an id no
/// charge opened (as after an eviction), nor for one a denial did not take.
async fn a_reservation_settles_only_while_open_and_once(store: &impl Store) {
    let b = with_cost(bucket("open", "r", 10, 100_000), 4);
    let charge = |id: u8| Charge {
        buckets: [b].into_iter().collect(),
        dry_run: false,
        marks: true,
        lease: None,
        open: Some(Open {
            id: [id; 16],
            within_us: 60_000_000,
        }),
        penalty: None,
    };
    let taken = store.check_and_take_one(&charge(1)).await.expect("answers");
    assert!(taken.allowed);
    let settle = |id: u8| Settlement {
        buckets: vec![SettleBucket {
            charge: b,
            actual: 0,
            mark: Some(taken.buckets[0].mark),
        }],
        once: Some(Once {
            id: [id; 16],
            deadline_us: taken.now_us + 60_000_000,
        }),
    };
    let answer = |s: Result<Settled, _>| match s.expect("answers") {
        Settled::Applied(o) => Some(o[0].remaining),
        _ => None,
    };
    // Never opened: refused, nothing given back.
    assert_eq!(answer(store.settle(&settle(2)).await), None);
    assert_eq!(answer(store.settle(&settle(1)).await), Some(10));
    assert_eq!(answer(store.settle(&settle(1)).await), None, "settles once");
    // A denied charge opens nothing.
    let greedy = Charge {
        buckets: [with_cost(b, 11)].into_iter().collect(),
        ..charge(3)
    };
    assert!(
        !store
            .check_and_take_one(&greedy)
            .await
            .expect("answers")
            .allowed
    );
    assert_eq!(answer(store.settle(&settle(3)).await), None);
}

fn boxed<'a>(
    scope: &'a str,
    identity: &'a str,
    buckets: Vec<BucketCharge<'a>>,
    strikes_from: &[bool],
) -> Charge<'a> {
    Charge {
        penalty: Some(Penalty {
            key: PenaltyKey {
                scope,
                identity,
                operation: None,
            },
            rule: PenaltyRule {
                strikes: 3,
                within_ns: 60_000 * MS,
                ban_ns: 60_000 * MS,
                factor: 2,
                max_ban_ns: 600_000 * MS,
                forgive_ns: 600_000 * MS,
            },
            strikes_from: strikes_from.iter().copied().collect(),
            forced: false,
        }),
        ..Charge::of(buckets)
    }
}

/// The penalty box: only striking buckets' denials strike, the third bans
/// for the rule's `ban`, and a banned charge reads and takes nothing.
async fn the_third_strike_bans_and_a_banned_charge_takes_nothing(store: &impl Store) {
    let wide = bucket("boxed", "wide", 5, 60_000);
    let narrow = bucket("boxed", "narrow", 1, 60_000);
    let charge = boxed("boxed", "alice", vec![wide, narrow], &[false, true]);
    assert!(store.check_and_take_one(&charge).await.unwrap().allowed);
    for strike in 1..=3 {
        let o = store.check_and_take_one(&charge).await.unwrap();
        assert!(!o.allowed && o.penalty.struck, "strike {strike}");
        assert_eq!(o.penalty.banned.is_some(), strike == 3, "strike {strike}");
    }
    let o = store.check_and_take_one(&charge).await.unwrap();
    let ban = o.penalty.banned.expect("banned");
    assert!(!ban.started && !o.penalty.struck && o.buckets.is_empty());
    assert!(
        ban.retry_after > Duration::from_secs(59) && ban.retry_after <= Duration::from_secs(60),
        "{:?}",
        ban.retry_after
    );
    let o = one(store, vec![wide], true).await;
    assert_eq!(o.buckets[0].remaining, 4, "nothing taken since the first");
    // A denial by a bucket that does not strike never bans.
    let only_wide = boxed("boxed", "bob", vec![with_cost(wide, 6)], &[false]);
    for _ in 0..5 {
        let o = store.check_and_take_one(&only_wide).await.unwrap();
        assert!(!o.allowed && !o.penalty.struck && o.penalty.banned.is_none());
    }
}

/// Strikes a caller reports (failed logins, as dry runs) count like
/// denials: the third bans, and the ban meets the next charge.
async fn reported_strikes_ban_like_denials(store: &impl Store) {
    let b = bucket("reported", "r", 100, 60_000);
    let mut report = boxed("reported", "guesser", vec![b], &[true]);
    report.dry_run = true;
    report.penalty.as_mut().unwrap().forced = true;
    for strike in 1..=3 {
        let o = store.check_and_take_one(&report).await.unwrap();
        assert!(o.allowed, "a dry run with room is allowed");
        assert!(o.penalty.struck, "strike {strike}");
        assert_eq!(o.penalty.banned.is_some(), strike == 3);
    }
    let next = boxed("reported", "guesser", vec![b], &[true]);
    let o = store.check_and_take_one(&next).await.unwrap();
    assert!(!o.allowed && o.penalty.banned.is_some());
    let o = one(store, vec![b], true).await;
    assert_eq!(o.buckets[0].remaining, 100, "the reports took nothing");
}

/// An operator's ban is met by charges, listed with the caller as sent
/// (a long one hashed), and lifted by an unban.
async fn operators_ban_list_and_unban(store: &impl Store) {
    let odd = "a:b%c {d}";
    let long = "x".repeat(100);
    let ban = |identity| PenaltyOp::Ban {
        key: PenaltyKey {
            scope: "operated",
            identity,
            operation: None,
        },
        duration: Duration::from_secs(30),
        forget: Duration::from_secs(60),
        reason: if identity == odd {
            "abuse report #7"
        } else {
            ""
        },
    };
    for who in [odd, long.as_str()] {
        let PenaltyAnswer::Banned(b) = store.penalties(&ban(who)).await.unwrap() else {
            panic!("not banned");
        };
        assert_eq!(b.retry_after, Duration::from_secs(30));
    }
    let charge = boxed(
        "operated",
        odd,
        vec![bucket("operated", "r", 5, 60_000)],
        &[true],
    );
    let o = store.check_and_take_one(&charge).await.unwrap();
    assert!(!o.allowed && o.penalty.banned.is_some());
    let list = PenaltyOp::List {
        scope: "operated",
        after: None,
        limit: 10,
    };
    let PenaltyAnswer::Listed { total, bans, .. } = store.penalties(&list).await.unwrap() else {
        panic!("not a listing");
    };
    assert_eq!(total, 2);
    let mut who: Vec<&str> = bans.iter().map(|b| b.identity.as_str()).collect();
    who.sort_unstable();
    // Each ban lists the reason its operator gave, if any.
    for b in &bans {
        let want = if b.identity == odd {
            "abuse report #7"
        } else {
            ""
        };
        assert_eq!(b.reason, want, "{}", b.identity);
    }
    // A ban that replaces it with no reason lists none.
    let again = PenaltyOp::Ban {
        key: PenaltyKey {
            scope: "operated",
            identity: odd,
            operation: None,
        },
        duration: Duration::from_secs(30),
        forget: Duration::from_secs(60),
        reason: "",
    };
    store.penalties(&again).await.unwrap();
    let PenaltyAnswer::Listed { bans, .. } = store.penalties(&list).await.unwrap() else {
        panic!("not a listing");
    };
    assert!(bans.iter().all(|b| b.reason.is_empty()), "{bans:?}");
    assert_eq!(who[1], odd, "the caller as sent");
    assert!(who[0].starts_with('#') && who[0].len() == 65, "{}", who[0]);
    let unban = PenaltyOp::Unban {
        key: PenaltyKey {
            scope: "operated",
            identity: odd,
            operation: None,
        },
    };
    assert_eq!(
        store.penalties(&unban).await.unwrap(),
        PenaltyAnswer::Unbanned(true)
    );
    assert!(store.check_and_take_one(&charge).await.unwrap().allowed);
    let PenaltyAnswer::Listed { total, .. } = store.penalties(&list).await.unwrap() else {
        panic!("not a listing");
    };
    assert_eq!(total, 1);
}

/// A listing resumes after the last ban it listed, not at a count: bans
/// that end (here, are lifted) between pages shift nothing, whether or not
/// the last one listed is still there.
async fn a_listing_resumes_after_its_last_ban_whatever_ends(store: &impl Store) {
    let key = |identity| PenaltyKey {
        scope: "paged",
        identity,
        operation: None,
    };
    let callers = ["p1", "p2", "p3", "p4", "p5"];
    for (i, who) in callers.iter().enumerate() {
        let ban = PenaltyOp::Ban {
            key: key(who),
            duration: Duration::from_secs(10 * (i as u64 + 1)),
            forget: Duration::from_secs(60),
            reason: "",
        };
        store.penalties(&ban).await.unwrap();
    }
    let page = async |after: Option<&BanPosition>| {
        let list = PenaltyOp::List {
            scope: "paged",
            after: after.map(BanPosition::cursor),
            limit: 2,
        };
        let PenaltyAnswer::Listed { bans, more, .. } = store.penalties(&list).await.unwrap() else {
            panic!("not a listing");
        };
        let who: Vec<String> = bans.iter().map(|b| b.identity.clone()).collect();
        (who, more, bans.last().map(|b| b.position.clone()))
    };
    let lift = async |who| {
        let unban = PenaltyOp::Unban { key: key(who) };
        store.penalties(&unban).await.unwrap();
    };
    let (first, more, last) = page(None).await;
    assert_eq!(
        (first, more),
        (vec!["p1".to_owned(), "p2".to_owned()], true)
    );
    // Both listed bans end, the last listed one too.
    lift("p1").await;
    lift("p2").await;
    let (second, more, last) = page(last.as_ref()).await;
    assert_eq!(
        (second, more),
        (vec!["p3".to_owned(), "p4".to_owned()], true)
    );
    // One before the last listed ends; the last listed is still there.
    lift("p3").await;
    let (third, more, _) = page(last.as_ref()).await;
    assert_eq!((third, more), (vec!["p5".to_owned()], false));
}

/// Leases: weights count once per id, a dry run and a refusal record
/// nothing, a priority's reserve is kept free, release is idempotent, and
/// renewing an unknown lease reports it lost.
async fn leases_count_weight_once_and_never_exceed_the_limit(store: &impl Store) {
    let call = |id: &'static str, op: LeaseOp| LeaseCall {
        pool: BucketKey {
            scope: "leases",
            rule: "streams",
            identity: Some("alice"),
            operation: None,
            hash_tag: Default::default(),
        },
        lease_id: id,
        op,
    };
    let acquire = |weight: u64, reserve: u64, dry_run: bool| LeaseOp::Acquire {
        limit: 5,
        weight,
        reserve,
        ttl_us: 60_000_000,
        dry_run,
    };
    let go =
        async |id: &'static str, op: LeaseOp| store.lease(&call(id, op)).await.expect("answers");
    let a = go("a", acquire(3, 0, false)).await;
    assert!(a.ok);
    assert_eq!(a.in_flight, 3);
    assert_eq!(a.expires_at_us, a.now_us + 60_000_000);
    let again = go("a", acquire(3, 0, false)).await;
    assert_eq!(
        (again.ok, again.in_flight, again.expires_at_us),
        (true, 3, a.expires_at_us)
    );
    let dry = go("d", acquire(2, 0, true)).await;
    assert_eq!(
        (dry.ok, dry.in_flight),
        (true, 3),
        "a dry run records nothing"
    );
    let kept = go("b", acquire(2, 1, false)).await;
    assert!(!kept.ok, "the reserve is kept free");
    assert_eq!(kept.earliest_expiry_us, Some(a.expires_at_us));
    let b = go("b", acquire(2, 0, false)).await;
    assert_eq!((b.ok, b.in_flight), (true, 5));
    let full = go("c", acquire(1, 0, false)).await;
    assert_eq!(
        (full.ok, full.in_flight),
        (false, 5),
        "a refusal takes nothing"
    );
    let never = go("c", acquire(5, 1, false)).await;
    assert_eq!((never.ok, never.earliest_expiry_us), (false, None));
    let renew = go(
        "a",
        LeaseOp::Renew {
            ttl_us: 120_000_000,
        },
    )
    .await;
    assert!(renew.ok && renew.expires_at_us >= a.expires_at_us);
    assert!(
        !go("zz", LeaseOp::Renew { ttl_us: 1_000 }).await.ok,
        "unknown: lost"
    );
    let released = go("a", LeaseOp::Release).await;
    assert_eq!((released.ok, released.in_flight), (true, 2));
    assert!(
        !go("a", LeaseOp::Release).await.ok,
        "a second release finds nothing"
    );
    assert!(go("b", LeaseOp::Release).await.ok);
    assert_eq!(go("c", acquire(5, 0, true)).await.in_flight, 0);
}

/// A lease taken with a charge (issue 20): the pool and the bucket are
/// judged together, a pool without room takes no token, a bucket that
/// denies records no lease, a repeated id counts once in the pool while
/// the rates are charged again, and a dry run records nothing.
async fn a_lease_with_a_charge_is_all_or_nothing(store: &impl Store) {
    let pool = BucketKey {
        scope: "leased",
        rule: "streams",
        identity: Some("alice"),
        operation: None,
        hash_tag: Default::default(),
    };
    let acquire = |id: &'static str| LeaseCall {
        pool,
        lease_id: id,
        op: LeaseOp::Acquire {
            limit: 2,
            weight: 1,
            reserve: 0,
            ttl_us: 60_000_000,
            dry_run: false,
        },
    };
    let rate = bucket("leased", "per-minute", 4, 60_000);
    let go = async |id: &'static str, dry_run: bool| {
        let charge = Charge {
            lease: Some(acquire(id)),
            ..Charge::of([rate])
        };
        let charge = Charge { dry_run, ..charge };
        let o = store.check_and_take_one(&charge).await.expect("answers");
        let lease = o.lease.clone().expect("the lease's outcome");
        (o, lease)
    };
    let in_flight = async || {
        let mut probe = acquire("probe");
        probe.op = LeaseOp::Acquire {
            limit: 2,
            weight: 1,
            reserve: 0,
            ttl_us: 1,
            dry_run: true,
        };
        store.lease(&probe).await.expect("answers").in_flight
    };
    let (a, la) = go("a", false).await;
    assert!(a.allowed && la.ok, "{a:?}");
    assert_eq!((la.in_flight, a.buckets[0].remaining), (1, 3));
    assert_eq!(la.expires_at_us, la.now_us + 60_000_000);
    let (again, l) = go("a", false).await;
    assert!(again.allowed && l.ok);
    assert_eq!(
        (l.in_flight, l.expires_at_us, again.buckets[0].remaining),
        (1, la.expires_at_us, 2),
        "the same id counts once in the pool; the rates are charged again"
    );
    let (dry, l) = go("b", true).await;
    assert!(dry.allowed && l.ok);
    assert_eq!((l.in_flight, dry.buckets[0].remaining), (1, 2));
    assert_eq!(in_flight().await, 1, "a dry run records no lease");
    let (b, l) = go("b", false).await;
    assert!(b.allowed && l.ok);
    assert_eq!((l.in_flight, b.buckets[0].remaining), (2, 1));
    let (full, l) = go("c", false).await;
    assert!(!full.allowed && !l.ok, "{full:?}");
    assert_eq!(l.earliest_expiry_us, Some(la.expires_at_us));
    assert!(full.buckets[0].conforms, "the bucket had room");
    assert_eq!(
        one(store, vec![rate], true).await.buckets[0].remaining,
        1,
        "a pool without room takes no token"
    );
    let released = store
        .lease(&LeaseCall {
            op: LeaseOp::Release,
            ..acquire("a")
        })
        .await
        .expect("answers");
    assert_eq!(released.in_flight, 1);
    assert!(
        one(store, vec![rate], false).await.allowed,
        "the last token"
    );
    let (spent, l) = go("d", false).await;
    assert!(!spent.allowed && !spent.buckets[0].conforms);
    assert!(l.ok, "the pool had room");
    assert_eq!(in_flight().await, 1, "a bucket's denial records no lease");
}

/// A lease behind a penalty box, in one charge: a pool without room is
/// no strike (no bucket denied); a bucket's denials strike as ever and the
/// third bans; a banned charge reads neither its buckets nor its pool.
async fn a_leased_charge_behind_a_penalty_box(store: &impl Store) {
    let pool = BucketKey {
        scope: "boxlease",
        rule: "streams",
        identity: Some("carol"),
        operation: None,
        hash_tag: Default::default(),
    };
    let lease = |id: &'static str, dry_run: bool| LeaseCall {
        pool,
        lease_id: id,
        op: LeaseOp::Acquire {
            limit: 1,
            weight: 1,
            reserve: 0,
            ttl_us: 60_000_000,
            dry_run,
        },
    };
    let rate = bucket("boxlease", "two", 2, 60_000);
    let go = async |id: &'static str| {
        let charge = Charge {
            lease: Some(lease(id, false)),
            ..boxed("boxlease", "carol", vec![rate], &[true])
        };
        store.check_and_take_one(&charge).await.expect("answers")
    };
    let held = go("l1").await;
    assert!(held.allowed && held.lease.as_ref().is_some_and(|l| l.ok));
    let full = go("l2").await;
    assert!(
        !full.allowed && !full.penalty.struck,
        "a full pool is no strike"
    );
    assert!(!full.lease.expect("judged").ok);
    // Same id as the held lease: the pool has room for it; the rate has
    // one token left, then denies (strikes) until the third bans.
    assert!(go("l1").await.allowed);
    for strike in 1..=3 {
        let o = go("l1").await;
        assert!(!o.allowed && o.penalty.struck, "strike {strike}");
    }
    let banned = go("l1").await;
    assert!(banned.penalty.banned.is_some_and(|b| !b.started));
    assert!(
        banned.lease.is_none() && banned.buckets.is_empty(),
        "{banned:?}"
    );
    let probe = store.lease(&lease("probe", true)).await.expect("answers");
    assert_eq!(probe.in_flight, 1, "only l1 is held");
}

/// Quota demand shared by replicas (Redis only: the embedded store is one
/// replica): a replica grows only out of what the others leave of the
/// limit, may always keep or lower its own, is refused past the bound of
/// replicas, and an entry that is not written again expires.
async fn demand_is_shared_within_the_limit(store: &impl Store) {
    let key = |identity: &'static str| BucketKey {
        scope: "fleet",
        rule: "shared",
        identity: Some(identity),
        operation: Some(""),
        hash_tag: Default::default(),
    };
    let call = |identity: &'static str, replica: u64, held: u64, ttl_ms: u64| DemandCall {
        key: key(identity),
        replica,
        held_milli: held,
        ask_milli: held,
        streams: 1,
        limit_milli: 20_000,
        ttl_us: ttl_ms * 1_000,
        max_replicas: 2,
    };
    let go = async |c: DemandCall<'static>| store.demand(&c).await.unwrap();
    let a = go(call("g", 1, 15_000, 60_000)).await;
    assert_eq!((a.granted_milli, a.others.replicas), (15_000, 0));
    let b = go(call("g", 2, 15_000, 60_000)).await;
    assert_eq!(b.granted_milli, 5_000, "only what replica 1 leaves");
    assert_eq!((b.others.held_milli, b.others.streams), (15_000, 1));
    assert_eq!(go(call("g", 1, 8_000, 60_000)).await.granted_milli, 8_000);
    assert_eq!(go(call("g", 2, 15_000, 60_000)).await.granted_milli, 12_000);
    let keep = go(call("g", 1, 10_000, 60_000)).await;
    assert_eq!(keep.granted_milli, 8_000, "keeps its own, no more");
    assert_eq!(keep.others.held_milli + keep.granted_milli, 20_000);
    // Past the bound of replicas: refused, nothing written.
    let third = go(call("g", 3, 1_000, 60_000)).await;
    assert_eq!((third.granted_milli, third.others.replicas), (0, 2));
    assert_eq!(go(call("g", 1, 8_000, 60_000)).await.others.replicas, 1);
    // An entry not written again expires, and its part comes back.
    go(call("h", 1, 20_000, 200)).await;
    assert_eq!(go(call("h", 2, 20_000, 200)).await.granted_milli, 0);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let back = go(call("h", 2, 20_000, 60_000)).await;
    assert_eq!((back.granted_milli, back.others.replicas), (20_000, 0));
}

#[tokio::test]
async fn the_embedded_store_is_one_replica_and_grants_what_is_asked() {
    let store = MemoryStore::default();
    let call = DemandCall {
        key: BucketKey {
            scope: "fleet",
            rule: "shared",
            identity: Some("g"),
            operation: None,
            hash_tag: Default::default(),
        },
        replica: 1,
        held_milli: 7_000,
        ask_milli: 7_000,
        streams: 2,
        limit_milli: 20_000,
        ttl_us: 1_000_000,
        max_replicas: 2,
    };
    let a: DemandAnswer = store.demand(&call).await.unwrap();
    assert_eq!((a.granted_milli, a.others.streams), (7_000, 0));
}

/// Runs every case against `store`, naming each as it goes.
async fn conforms(store: impl Store) {
    conforms_spread(&store).await;
    cases!(
        &store,
        the_third_strike_bans_and_a_banned_charge_takes_nothing,
        operators_ban_list_and_unban,
        a_listing_resumes_after_its_last_ban_whatever_ends,
        reported_strikes_ban_like_denials,
        a_lease_with_a_charge_is_all_or_nothing,
        a_leased_charge_behind_a_penalty_box,
    );
}

/// Every case but the penalty box's, which config allows only with
/// `hash_tag: scope`: what a store keyed under any hash tag must do.
async fn conforms_spread(store: &impl Store) {
    cases!(
        store,
        full_bucket_admits_its_capacity_then_denies,
        sleeping_retry_after_makes_the_request_allowed,
        multi_bucket_charges_are_all_or_nothing,
        denied_request_takes_no_tokens,
        dry_run_takes_nothing,
        shadow_bucket_never_denies_but_is_charged_when_it_can_be,
        cost_over_capacity_is_denied_without_retry_after,
        a_refilled_bucket_is_the_same_as_a_new_one,
        charges_in_one_call_are_independent,
        identities_and_operations_keep_their_own_buckets,
        a_settle_far_above_its_estimate_is_bounded,
        a_reservation_settles_only_while_open_and_once,
        a_shaped_burst_is_spread_and_a_denial_takes_nothing,
        leases_count_weight_once_and_never_exceed_the_limit,
    );
}

/// Runs each case against a store, naming each as it goes.
macro_rules! cases {
    ($store:expr, $($case:ident),* $(,)?) => {
        $(
            eprintln!("case {}", stringify!($case));
            $case($store).await;
        )*
    };
}
use cases;

#[tokio::test]
async fn memory_store_conforms() {
    conforms(MemoryStore::default()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_standalone_conforms() {
    let redis = Standalone::start();
    conforms(redis.store("conformance")).await;
    demand_is_shared_within_the_limit(&redis.store("conformance-demand")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_sentinel_conforms() {
    let redis = tokio::task::spawn_blocking(Sentinel::start).await.unwrap();
    conforms(redis.store("conformance")).await;
    demand_is_shared_within_the_limit(&redis.store("conformance-demand")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_conforms() {
    let redis = tokio::task::spawn_blocking(Cluster::start).await.unwrap();
    conforms(redis.store("conformance")).await;
    // Again with every key tagged as `hash_tag: identity_operation` makes
    // it: each identity (and operation) in a slot of its own.
    let tag = HashTag::IdentityOperation;
    conforms_spread(&Retagged(redis.store("conformance-tagged"), tag)).await;
    demand_is_shared_within_the_limit(&Retagged(redis.store("conformance-demand"), tag)).await;
}

/// A store whose every bucket is keyed under the hash tag `.1`, as the
/// limiter asks for a scope configured so.
#[derive(Debug)]
struct Retagged<S>(S, HashTag);

impl<S: Store> Retagged<S> {
    fn charge<'a>(&self, charge: &Charge<'a>) -> Charge<'a> {
        let mut charge = charge.clone();
        for b in &mut charge.buckets {
            b.key.hash_tag = self.1;
        }
        charge
    }
}

impl<S: Store> Store for Retagged<S> {
    async fn check_and_take_each(
        &self,
        charges: &[Charge<'_>],
    ) -> Vec<Result<ChargeOutcome, StoreError>> {
        let charges: Vec<Charge<'_>> = charges.iter().map(|c| self.charge(c)).collect();
        self.0.check_and_take_each(&charges).await
    }

    async fn check_and_take_one(&self, charge: &Charge<'_>) -> Result<ChargeOutcome, StoreError> {
        self.0.check_and_take_one(&self.charge(charge)).await
    }

    async fn settle(&self, settlement: &Settlement<'_>) -> Result<Settled, StoreError> {
        let mut settlement = settlement.clone();
        for b in &mut settlement.buckets {
            b.charge.key.hash_tag = self.1;
        }
        self.0.settle(&settlement).await
    }

    async fn penalties(&self, op: &PenaltyOp<'_>) -> Result<PenaltyAnswer, StoreError> {
        self.0.penalties(op).await
    }

    async fn lease(&self, call: &LeaseCall<'_>) -> Result<LeaseOutcome, StoreError> {
        let mut call = *call;
        call.pool.hash_tag = self.1;
        self.0.lease(&call).await
    }

    async fn demand(&self, call: &DemandCall<'_>) -> Result<DemandAnswer, StoreError> {
        let mut call = *call;
        call.key.hash_tag = self.1;
        self.0.demand(&call).await
    }

    fn is_available(&self) -> bool {
        self.0.is_available()
    }

    fn rules_replaced(&self, scopes: &[&str]) {
        self.0.rules_replaced(scopes);
    }

    fn condition(&self) -> Condition {
        self.0.condition()
    }
}
