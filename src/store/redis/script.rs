//! The decision script: its arguments going in and its reply coming out.
//!
//! The script (`decide.lua`) keeps GCRA state in exact integer microseconds
//! and returns each bucket's raw TAT with Redis's `now`; this side turns that
//! into remaining, reset_after and retry_after with [`Shape`]'s 128-bit math,
//! the same code the embedded store uses, so the two cannot disagree.

use redis::Cmd;

use super::keys::{bans_key, bucket_key, lease_keys, open_key, penalty_key};
use crate::bucket::{Budget, Ledger, Mark, Shape, Tat};
use crate::store::{
    Ban, BucketCharge, Charge, ChargeOutcome, LeaseCall, LeaseOp, LeaseOutcome, Penalty,
    PenaltyOutcome, Settled, Settlement, StoreError,
};
use crate::window::Window;

/// The script's source: the concurrency pools' functions it shares with
/// `lease.lua` (for a lease taken with a charge), then its own.
pub(crate) const SOURCE: &str = concat!(include_str!("lease_pool.lua"), include_str!("decide.lua"));

/// Why a script reply could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("decision script replied with {got} integers, expected {expected}")]
pub(crate) struct BadReply {
    got: usize,
    expected: usize,
}

/// The script's SHA1, as `EVALSHA` wants it.
pub(crate) fn sha1() -> String {
    redis::Script::new(SOURCE).get_hash().to_owned()
}

/// A bucket's shape in the script's unit, microseconds. Config validation
/// keeps periods whole microseconds; a stray sub-microsecond rounds up, so
/// the refill is never faster than configured.
fn shape_us(shape: Shape) -> Shape {
    Shape {
        capacity: shape.capacity.max(1),
        period: shape.period.div_ceil(1_000).max(1),
    }
}

/// One charge's part of a batch call, encoded once by the caller (keys
/// escaped, shapes in microseconds), so a batch only concatenates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Encoded {
    /// The charge's keys, in order: its buckets', then a settle's marker.
    pub(crate) keys: Vec<String>,
    /// How many buckets it has.
    pub(crate) buckets: usize,
    /// Integers the script answers per bucket: 3, or 6 with the ledger.
    pub(crate) per_bucket: usize,
    /// Its numbers, packed as the script unpacks them (see its header).
    pub(crate) numbers: Vec<u8>,
    /// Shaping: the reply carries the charge's wait after its status.
    pub(crate) shaped: bool,
    /// Integers the script answers after the buckets': 5 for a charge
    /// with a lease (see [`LEASE_TRAILER`]), then 3 for a charge behind a
    /// penalty box (ban end, started, struck).
    pub(crate) trailer: usize,
}

impl super::coalesce::Work for Encoded {
    /// Integers the script answers for this charge: its status, its wait
    /// (shaped), three or six per bucket, then its trailer.
    fn reply_len(&self) -> usize {
        1 + usize::from(self.shaped) + self.per_bucket * self.buckets + self.trailer
    }
}

/// Integers the script answers per bucket of a charge: conforms, ticks,
/// frac, and (for a reservation or a settle) born, given whole, given frac.
const PLAIN: usize = 3;
const MARKED: usize = 6;

/// A number as the script's `i8`, saturating (config bounds keep every
/// value far below).
fn i8_of(v: u64) -> [u8; 8] {
    i64::try_from(v).unwrap_or(i64::MAX).to_le_bytes()
}

/// Packs one bucket's `capacity, period, cost, fourth` and, for a calendar
/// budget, its window boundaries around `now_us` (the replica's best guess
/// of Redis's clock; the script picks among them by its own).
fn push_bucket(numbers: &mut Vec<u8>, b: &BucketCharge<'_>, cost: i64, fourth: u64, now_us: u64) {
    let shape = shape_us(b.shape);
    numbers.extend_from_slice(&i8_of(shape.capacity));
    match b.window {
        None => numbers.extend_from_slice(&i8_of(shape.period)),
        Some(Window::Fixed { length_ns }) => {
            let us = i64::try_from(length_ns.div_ceil(1_000).max(1)).unwrap_or(i64::MAX);
            numbers.extend_from_slice(&(-us).to_le_bytes());
        }
        Some(_) => numbers.extend_from_slice(&0i64.to_le_bytes()),
    }
    numbers.extend_from_slice(&cost.to_le_bytes());
    numbers.extend_from_slice(&i8_of(fourth));
    if let Some(w @ Window::Calendar { .. }) = b.window {
        for bound in w.around_us(now_us) {
            numbers.extend_from_slice(&i8_of(bound));
        }
    }
}

/// The header of a charge: mode and bucket count.
fn header(mode: u8, n: usize) -> Vec<u8> {
    let mut numbers = Vec::with_capacity(3 + 36 * n);
    numbers.push(mode);
    // A charge has a handful of buckets: the limiter plans one per limit.
    let n = u16::try_from(n).unwrap_or(u16::MAX);
    numbers.extend_from_slice(&n.to_le_bytes());
    numbers
}

/// Encodes one charge for a batch call. The charge must have a bucket.
/// `marked`: the reply carries each bucket's ledger, for a reservation.
/// `now_us`: the instant to offer calendar windows around.
pub(crate) fn encode(prefix: &str, charge: &Charge<'_>, marked: bool, now_us: u64) -> Encoded {
    let n = charge.buckets.len().min(usize::from(u16::MAX));
    let open = charge.open.filter(|_| n > 0);
    let penalty = charge.penalty.as_ref().filter(|_| n > 0);
    // A charge behind a penalty box is never shaped: config refuses
    // `max_delay` in a scope with one, and the script's penalty box reads
    // plain replies.
    let shaped = is_shaped(charge) && charge.penalty.is_none();
    let lease = charge.lease.as_ref().filter(|_| n > 0);
    let mode = u8::from(charge.dry_run)
        | if marked || open.is_some() { 4 } else { 0 }
        | if open.is_some() { 8 } else { 0 }
        | if shaped { 16 } else { 0 }
        | if penalty.is_some() { PENALTY_MODE } else { 0 }
        | if lease.is_some() { LEASE_MODE } else { 0 };
    let mut numbers = header(mode, n);
    if let Some(l) = lease {
        push_lease(&mut numbers, l);
    }
    if let Some(p) = penalty {
        push_penalty(&mut numbers, p, n);
    }
    if let Some(open) = open {
        numbers.extend_from_slice(&i8_of(open.within_us));
    }
    for b in &charge.buckets[..n] {
        let cost = i64::try_from(b.cost.max(1)).unwrap_or(i64::MAX);
        push_bucket(
            &mut numbers,
            b,
            if b.shadow { -cost } else { cost },
            b.reserve,
            now_us,
        );
        if shaped {
            numbers.extend_from_slice(&i8_of(bound_us(b)));
        }
    }
    let mut keys: Vec<String> = charge.buckets[..n]
        .iter()
        .map(|b| bucket_key(prefix, b))
        .collect();
    if let (Some(open), Some(first)) = (open, charge.buckets.first()) {
        keys.push(open_key(prefix, first, &open.id));
    }
    if let Some(p) = penalty {
        keys.push(penalty_key(prefix, &p.key));
        keys.push(bans_key(prefix, p.key.scope));
    }
    if let Some(l) = lease {
        keys.extend(lease_keys(prefix, &l.pool));
    }
    Encoded {
        keys,
        buckets: n,
        per_bucket: if marked || open.is_some() {
            MARKED
        } else {
            PLAIN
        },
        numbers,
        shaped,
        trailer: trailer_len(charge),
    }
}

/// The mode bit of a charge that takes a lease with its buckets.
const LEASE_MODE: u8 = 64;

/// Integers a lease adds to a charge's reply, before a penalty box's: the
/// pool's verdict (1 room or live id, 0 none, -1 a pool key of another
/// type), the lease's expiry, the live weight, the earliest live expiry
/// (-1 for none) and the expired leases removed.
const LEASE_TRAILER: usize = 5;

/// Integers a charge's reply holds after its buckets'.
fn trailer_len(charge: &Charge<'_>) -> usize {
    if charge.buckets.is_empty() {
        return 0;
    }
    (if charge.lease.is_some() {
        LEASE_TRAILER
    } else {
        0
    }) + (if charge.penalty.is_some() { TRAILER } else { 0 })
}

/// Packs a lease's limit, weight, reserve and time to live, then its id
/// (length, bytes): the id rides in the numbers, never as a key.
fn push_lease(numbers: &mut Vec<u8>, call: &LeaseCall<'_>) {
    let (limit, weight, reserve, ttl_us) = match call.op {
        LeaseOp::Acquire {
            limit,
            weight,
            reserve,
            ttl_us,
            ..
        } => (limit, weight, reserve, ttl_us),
        // Refused by the stores before encoding; a weight over any limit
        // takes nothing should one get here.
        _ => (0, 1, 0, 1),
    };
    for v in [limit, weight, reserve, ttl_us] {
        numbers.extend_from_slice(&i8_of(v));
    }
    let id = &call.lease_id.as_bytes()[..call.lease_id.len().min(usize::from(u16::MAX))];
    numbers.extend_from_slice(&(id.len() as u16).to_le_bytes());
    numbers.extend_from_slice(id);
}

/// Reads a lease's trailer (see [`LEASE_TRAILER`]) decided at `now`.
fn lease_outcome(trailer: &[i64], now: u64) -> Result<LeaseOutcome, StoreError> {
    let [ok, at, in_flight, earliest, expired] = *trailer else {
        return Err(StoreError::permanent(BadReply {
            got: trailer.len(),
            expected: LEASE_TRAILER,
        }));
    };
    if ok < 0 {
        return Err(StoreError::permanent(
            "a key of this charge's lease pool holds a value of another type in Redis",
        ));
    }
    let int = |v: i64| u64::try_from(v).unwrap_or(0);
    Ok(LeaseOutcome {
        ok: ok == 1,
        expires_at_us: int(at),
        in_flight: int(in_flight),
        earliest_expiry_us: u64::try_from(earliest).ok(),
        now_us: now,
        expired: int(expired),
        ..LeaseOutcome::default()
    })
}

/// The mode bit of a charge behind a penalty box.
const PENALTY_MODE: u8 = 32;

/// Integers a penalty box adds to a charge's reply: the ban's end, whether
/// this charge started it, whether it struck.
const TRAILER: usize = 3;

/// Packs a penalty box's rule (in microseconds) and one strike flag per
/// bucket of the `n` sent.
fn push_penalty(numbers: &mut Vec<u8>, penalty: &Penalty<'_>, n: usize) {
    let r = penalty.rule.in_micros();
    for v in [
        r.strikes,
        r.within_ns,
        r.ban_ns,
        r.factor,
        r.max_ban_ns,
        r.forgive_ns,
        u64::from(penalty.forced),
    ] {
        numbers.extend_from_slice(&i8_of(v));
    }
    for i in 0..n {
        let strikes = penalty.strikes_from.get(i).copied().unwrap_or(false);
        numbers.push(u8::from(strikes));
    }
}

/// Reads a penalty box's trailer (`ban end, started, struck`) decided at
/// `now` (both microseconds of Redis's clock).
fn penalty_outcome(trailer: &[i64], now: u64) -> PenaltyOutcome {
    let [until, started, struck] = *trailer else {
        return PenaltyOutcome::default();
    };
    let until = u64::try_from(until).unwrap_or(0);
    PenaltyOutcome {
        banned: (until > now).then(|| Ban {
            retry_after: std::time::Duration::from_micros(until - now),
            until_us: until,
            started: started == 1,
        }),
        struck: struck == 1,
    }
}

/// Encodes a settlement. With [`Once`], its marker key (in the buckets'
/// hash slot) comes last. `now_us` as for [`encode`].
pub(crate) fn encode_settle(prefix: &str, settlement: &Settlement<'_>, now_us: u64) -> Encoded {
    let n = settlement.buckets.len().min(usize::from(u16::MAX));
    let mut numbers = header(if settlement.once.is_some() { 3 } else { 2 }, n);
    if let Some(once) = settlement.once {
        numbers.extend_from_slice(&i8_of(once.deadline_us));
    }
    for part in &settlement.buckets[..n] {
        let b = &part.charge;
        // A settle takes at most the capacity above its estimate.
        let actual = part.actual.min(b.cost.saturating_add(b.shape.capacity));
        // A settle's estimate may be 0: an Envoy refund of nothing.
        let cost = i64::try_from(b.cost).unwrap_or(i64::MAX);
        push_bucket(&mut numbers, b, cost, actual, now_us);
        let mark = part.mark.unwrap_or_default();
        let taken_ticks = match part.mark {
            Some(m) => i64::try_from(m.taken.ticks).unwrap_or(i64::MAX),
            None => -1,
        };
        numbers.extend_from_slice(&taken_ticks.to_le_bytes());
        for n in [
            mark.taken.frac,
            mark.ledger.born,
            mark.ledger.given.ticks,
            mark.ledger.given.frac,
        ] {
            numbers.extend_from_slice(&i8_of(n));
        }
        // |actual - estimate|·P/C, exactly: at most one period.
        let shape = shape_us(b.shape);
        let diff = shape.time_of(actual.abs_diff(b.cost));
        // How far the extra may go: a bucket's TAT ceiling past now, or a
        // budget's spend ceiling (see Shape::ceiling, Budget::ceiling).
        let ceiling = match b.window {
            None => shape.ceiling(0, b.reserve),
            Some(_) => Tat {
                ticks: Budget {
                    amount: b.shape.capacity,
                }
                .ceiling(b.reserve),
                frac: 0,
            },
        };
        for n in [diff.ticks, diff.frac, ceiling.ticks, ceiling.frac] {
            numbers.extend_from_slice(&i8_of(n));
        }
    }
    let mut keys: Vec<String> = settlement.buckets[..n]
        .iter()
        .map(|p| bucket_key(prefix, &p.charge))
        .collect();
    if let (Some(once), Some(first)) = (settlement.once, settlement.buckets.first()) {
        keys.push(open_key(prefix, &first.charge, &once.id));
    }
    Encoded {
        keys,
        buckets: n,
        per_bucket: MARKED,
        numbers,
        shaped: false,
        trailer: 0,
    }
}

/// One `EVALSHA` deciding every charge of `batch`, in order: every key,
/// then all the numbers as one argument.
pub(crate) fn evalsha<'a>(sha: &str, batch: impl Iterator<Item = &'a Encoded> + Clone) -> Cmd {
    let mut cmd = redis::cmd("EVALSHA");
    let keys: usize = batch.clone().map(|e| e.keys.len()).sum();
    cmd.arg(sha).arg(keys);
    let mut numbers = Vec::new();
    for e in batch {
        for key in &e.keys {
            cmd.arg(key.as_str());
        }
        numbers.extend_from_slice(&e.numbers);
    }
    cmd.arg(numbers);
    cmd
}

/// One `EVALSHA` of the decision script over `batch`, as [`evalsha`], and
/// with the script's ARGV[2] when every charge is a plain lone bucket
/// (mode 0, one key) and no key appears twice: the script then reads the
/// whole batch with one `MGET` instead of a `GET` per charge (see its
/// "Reading a batch at once"). A repeated key would make a later charge
/// read the value from before an earlier one's write, so such a batch
/// reads per charge as before.
pub(crate) fn decide_call<'a>(sha: &str, batch: impl Iterator<Item = &'a Encoded> + Clone) -> Cmd {
    let mut cmd = evalsha(sha, batch.clone());
    if reads_at_once(batch) {
        cmd.arg("1");
    }
    cmd
}

/// Whether `batch` is all plain lone charges over distinct keys.
fn reads_at_once<'a>(batch: impl Iterator<Item = &'a Encoded>) -> bool {
    let mut keys = Vec::with_capacity(batch.size_hint().0);
    for e in batch {
        match (e.keys.as_slice(), e.numbers.first()) {
            ([key], Some(0)) if e.buckets == 1 => keys.push(key.as_str()),
            _ => return false,
        }
    }
    // MGET takes its keys from one Lua `unpack`, whose stack is bounded
    // (8,000 values); a batch holds far fewer.
    if keys.len() > super::coalesce::MAX_BATCH {
        return false;
    }
    keys.sort_unstable();
    keys.windows(2).all(|w| w[0] != w[1])
}

/// Shaping: the longest bucket `b` lets a request wait, in whole
/// microseconds (rounded down, so a wait never exceeds the request's
/// bound); 0 for a shadow bucket or a budget, which never delay.
fn bound_us(b: &BucketCharge<'_>) -> u64 {
    if b.shadow || b.window.is_some() {
        return 0;
    }
    u64::try_from(b.max_delay.as_micros()).unwrap_or(u64::MAX)
}

/// True when a charge is sent shaped: some bucket may make it wait.
fn is_shaped(charge: &Charge<'_>) -> bool {
    charge.buckets.iter().any(|b| bound_us(b) > 0)
}

/// The state (and, in a reply of six per bucket, the ledger) of bucket `i`
/// in a charge's reply.
fn mark_at(reply: &[i64], i: usize, per: usize) -> Mark {
    let int = |k: usize| u64::try_from(reply[1 + per * i + k]).unwrap_or(0);
    let ledger = if per == MARKED {
        Ledger {
            born: int(3),
            given: Tat {
                ticks: int(4),
                frac: int(5),
            },
        }
    } else {
        Ledger::default()
    };
    Mark {
        taken: Tat {
            ticks: int(1),
            frac: int(2),
        },
        ledger,
    }
}

/// The status of a charge none of whose offered windows held Redis's clock:
/// it took nothing.
const WINDOW_MISSED: i64 = -2;

/// True when `reply` (one charge's part) says no offered calendar window
/// held Redis's clock, so the charge ran nothing and may be sent again.
pub(crate) fn missed_window(reply: &[i64]) -> bool {
    reply.first() == Some(&WINDOW_MISSED)
}

/// Reads how many integers a reply holds per bucket of a charge of
/// `buckets`, checking its length and its failure statuses.
fn check(reply: &[i64], buckets: usize, head: usize) -> Result<usize, StoreError> {
    let per = [PLAIN, MARKED]
        .into_iter()
        .find(|per| reply.len() == head + per * buckets);
    let Some(per) = per else {
        return Err(StoreError::permanent(BadReply {
            got: reply.len(),
            expected: head + PLAIN * buckets,
        }));
    };
    match reply[0] {
        // About this charge's keys only (one holds another type), so it
        // does not count against Redis's health. Nothing was taken.
        -1 => Err(StoreError::permanent(
            "a key of this charge holds a value of another type in Redis",
        )),
        // About this charge's windows, not Redis's health: it fails alone
        // and never counts against the breaker. The store sends it once more
        // with windows around Redis's clock (see `clock.rs`) before this.
        WINDOW_MISSED => Err(StoreError::permanent(
            "Redis's clock is outside the budget windows this replica offered, \
             even around Redis's own clock",
        )),
        _ => Ok(per),
    }
}

/// Reads one charge's part of a batch reply (`status`, then a triple per
/// bucket), decided at `now`. A status below 0 is that charge's own failure.
pub(crate) fn outcome(
    charge: &Charge<'_>,
    now: i64,
    reply: &[i64],
) -> Result<ChargeOutcome, StoreError> {
    let trailer = trailer_len(charge);
    let shaped = is_shaped(charge) && charge.penalty.is_none();
    let Some(split) = reply.len().checked_sub(trailer) else {
        return Err(StoreError::permanent(BadReply {
            got: reply.len(),
            expected: 1 + PLAIN * charge.buckets.len() + trailer,
        }));
    };
    let (reply, trailer) = reply.split_at(split);
    let per = check(reply, charge.buckets.len(), 1 + usize::from(shaped))?;
    let now = u64::try_from(now).unwrap_or(0);
    let (lease, trailer) = trailer.split_at(if charge.lease.is_some() {
        LEASE_TRAILER.min(trailer.len())
    } else {
        0
    });
    let penalty = penalty_outcome(trailer, now);
    if penalty.banned.is_some_and(|b| !b.started) {
        // Banned before this charge: no bucket (and no pool) was read.
        return Ok(ChargeOutcome {
            allowed: false,
            buckets: smallvec::SmallVec::new(),
            now_us: now,
            delay: std::time::Duration::ZERO,
            lease: None,
            penalty,
        });
    }
    let lease = match charge.lease {
        Some(_) => Some(lease_outcome(lease, now)?),
        None => None,
    };
    // A shaped reply's wait sits after its status; the buckets follow it.
    let status = reply[0];
    let (delay, reply) = if shaped {
        (u64::try_from(reply[1]).unwrap_or(0), &reply[1..])
    } else {
        (0, reply)
    };
    let buckets = charge
        .buckets
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let conforms = reply[1 + per * i] == 1;
            let mark = mark_at(reply, i, per);
            let state = mark.taken;
            let b = BucketCharge {
                shape: shape_us(b.shape),
                ..*b
            };
            // A bucket that did not conform was left as it was, so judging
            // it again here gives the script's own verdict and its exact
            // wait. A budget's state holds its window's end.
            let retry_after = if conforms {
                None
            } else {
                b.judge_shaped(state, now, state.ticks, 1_000).0.retry_after
            };
            b.outcome(conforms, retry_after, mark, now, 1_000)
        })
        .collect();
    Ok(ChargeOutcome {
        allowed: status == 1,
        buckets,
        now_us: now,
        delay: std::time::Duration::from_micros(delay),
        lease,
        penalty,
    })
}

/// Reads a settlement's part of a batch reply.
pub(crate) fn settled(
    settlement: &Settlement<'_>,
    now: i64,
    reply: &[i64],
) -> Result<Settled, StoreError> {
    let per = check(reply, settlement.buckets.len(), 1)?;
    match reply[0] {
        -3 => return Ok(Settled::Expired),
        -4 => return Ok(Settled::AlreadySettled),
        _ => {}
    }
    let now = u64::try_from(now).unwrap_or(0);
    Ok(Settled::Applied(
        settlement
            .buckets
            .iter()
            .enumerate()
            .map(|(i, part)| {
                let b = BucketCharge {
                    shape: shape_us(part.charge.shape),
                    ..part.charge
                };
                b.outcome(true, None, mark_at(reply, i, per), now, 1_000)
            })
            .collect(),
    ))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::store::redis::coalesce::Work as _;
    use crate::store::{BucketCharge, BucketKey};

    fn charge(cost: u64) -> Charge<'static> {
        Charge {
            buckets: smallvec::smallvec![BucketCharge {
                key: BucketKey {
                    scope: "s",
                    rule: "r",
                    identity: Some("i"),
                    operation: None,
                    hash_tag: Default::default(),
                },
                shape: Shape {
                    capacity: 3,
                    period: 1_000_000_000,
                },
                cost,
                shadow: false,
                reserve: 0,
                window: None,
                max_delay: std::time::Duration::ZERO,
            }],
            dry_run: false,
            marks: false,
            lease: None,
            open: None,
            penalty: None,
        }
    }

    #[test]
    fn a_batch_is_every_key_then_every_charge_s_numbers_packed() {
        let one = encode("tg1:", &charge(2), false, 0);
        let mut shadow = charge(1);
        shadow.buckets[0].shadow = true;
        shadow.dry_run = true;
        let two = encode("tg1:", &shadow, false, 0);
        let cmd = evalsha("abc", [&one, &two].into_iter());
        let args: Vec<Vec<u8>> = cmd
            .args_iter()
            .map(|a| match a {
                redis::Arg::Simple(b) => b.to_vec(),
                _ => Vec::new(),
            })
            .collect();
        let text = |i: usize| String::from_utf8_lossy(&args[i]).into_owned();
        assert_eq!(
            (0..5).map(text).collect::<Vec<_>>(),
            [
                "EVALSHA",
                "abc",
                "2",
                "tg1:{s}:r:3/1000000:i:*",
                "tg1:{s}:r:3/1000000:i:*"
            ]
        );
        // Per bucket: capacity, period, ±cost, reserve, each an i64.
        let mut numbers = vec![0u8, 1, 0];
        for n in [3i64, 1_000_000, 2, 0] {
            numbers.extend(n.to_le_bytes());
        }
        numbers.extend([1u8, 1, 0]);
        for n in [3i64, 1_000_000, -1, 0] {
            numbers.extend(n.to_le_bytes());
        }
        assert_eq!(args[5], numbers);
        assert_eq!(args.len(), 6);
        assert_eq!(one.reply_len(), 4);
    }

    #[test]
    fn only_lone_plain_charges_over_distinct_keys_are_read_at_once() {
        let lone = |identity: &'static str| {
            let mut c = charge(1);
            c.buckets[0].key.identity = Some(identity);
            encode("tg1:", &c, false, 0)
        };
        let last = |batch: &[&Encoded]| {
            let cmd = decide_call("abc", batch.iter().copied());
            match cmd.args_iter().last() {
                Some(redis::Arg::Simple(b)) => b.to_vec(),
                _ => Vec::new(),
            }
        };
        let (a, b) = (lone("a"), lone("b"));
        assert_eq!(last(&[&a, &b]), b"1", "distinct lone keys: one MGET");
        assert_eq!(last(&[&a]), b"1");
        // Otherwise the last argument is the packed numbers, as before.
        assert_ne!(last(&[&a, &b, &lone("a")]), b"1", "a repeated key");
        let mut dry = charge(1);
        dry.dry_run = true;
        assert_ne!(last(&[&a, &encode("tg1:", &dry, false, 0)]), b"1");
        let mut two = charge(1);
        two.buckets.push(two.buckets[0]);
        two.buckets[1].key.rule = "other";
        assert_ne!(last(&[&a, &encode("tg1:", &two, false, 0)]), b"1");
        assert_ne!(
            last(&[&encode("tg1:", &charge(1), true, 0)]),
            b"1",
            "marked"
        );
    }

    #[test]
    fn a_denied_bucket_gets_its_exact_wait() {
        // Empty bucket: TAT one full period ahead of now.
        let now = 10_000_000;
        let reply = [0, 0, now + 1_000_000, 0, now - 5, 0, 0];
        let out = outcome(&charge(1), now, &reply).unwrap();
        assert!(!out.allowed);
        let b = out.buckets[0];
        assert_eq!(b.remaining, 0);
        assert_eq!(b.reset_after, Duration::from_secs(1));
        // One token every 333_333.33 µs, rounded up.
        assert_eq!(b.retry_after, Some(Duration::from_micros(333_334)));
    }

    #[test]
    fn a_short_reply_is_an_error_not_a_panic() {
        assert!(outcome(&charge(1), 2, &[1, 2]).is_err());
    }

    #[test]
    fn a_failed_charge_is_its_own_error() {
        let e = outcome(&charge(1), 2, &[-1, 0, 0, 0, 0, 0, 0]).unwrap_err();
        assert!(!e.transient);
        // No offered window held Redis's clock: the charge's own fault,
        // never the breaker's.
        let reply = [-2, 0, 0, 0, 0, 0, 0];
        assert!(missed_window(&reply));
        assert!(!outcome(&charge(1), 2, &reply).unwrap_err().transient);
    }

    #[test]
    fn the_sha_matches_the_source() {
        assert_eq!(sha1().len(), 40);
    }
}
