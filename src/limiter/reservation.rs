//! Reservations: self-contained, signed tokens naming what a charge took,
//! so any replica can settle it later.
//!
//! # Why signed tokens, not records in the store
//! A reservation carries everything a settle needs: the buckets it charged
//! (their keys and shapes), the estimate, the state each bucket was left in
//! (which bounds a refund), and its deadline. HMAC-SHA256 with a key shared
//! by the replicas makes a forged or altered token fail to verify, with a
//! clear error. What a token cannot carry is whether it was used: the charge
//! that makes it records its random id as open in the store, in the same
//! atomic step, until the deadline, and a settle applies only while that
//! record exists, removing it in the same atomic step. So a second settle
//! (on any replica) is refused, a lost record (evicted) refuses the settle
//! rather than allow a replay, and after the deadline the token itself is
//! refused as expired.
//!
//! # Format
//! `base64url(body ‖ HMAC-SHA256(key, body))`, where `body` is a version
//! byte, the 16-byte id, the deadline (µs of the store's clock), the scope,
//! the caller that made it (when callers are configured), and each charged
//! bucket (rule key, identity, operation, shape, window tag, estimate,
//! headroom, state), length-prefixed. It is opaque to callers.

use std::sync::Arc;

use arc_swap::ArcSwap;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

use crate::bucket::{Ledger, Mark, Shape, Tat};

/// The format's version, the first byte of every body. Version 1 (before
/// a token named its caller and each bucket its headroom, and before the
/// store recorded open reservations) is refused: its reservation has no
/// open record to settle, so its estimate stands.
const VERSION: u8 = 2;
/// The longest token accepted, in characters: 16 buckets of the longest
/// keys fit well within it.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;
/// Bytes of the signature at the end of every token.
const MAC_LEN: usize = 32;

/// Signs and verifies reservations. Its keys can be replaced while it
/// serves (a reload rotating `reservations.secret`): the first signs, every
/// one verifies, so tokens signed with a key still listed keep settling.
#[derive(Clone)]
pub struct Signer {
    keys: Arc<ArcSwap<Vec<hmac::Key>>>,
    /// This process's random key, used when no secret is configured.
    own: hmac::Key,
    random: Arc<SystemRandom>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signer(<redacted>)")
    }
}

impl Signer {
    /// A signer with `secret` as its HMAC key: replicas with equal secrets
    /// accept each other's reservations.
    pub fn new(secret: &[u8]) -> Self {
        Self::with_secrets(&[secret])
    }

    /// A signer that signs with the first of `secrets` and verifies with
    /// every one; with none, a random key of this process.
    pub fn with_secrets(secrets: &[&[u8]]) -> Self {
        let random = SystemRandom::new();
        let mut own = [0u8; 32];
        // The system's random source does not fail on supported platforms;
        // if it ever did, a zero key still verifies only our own tokens'
        // format, and a log reader would see every reservation refused.
        let _ = random.fill(&mut own);
        let signer = Self {
            keys: Arc::new(ArcSwap::from_pointee(Vec::new())),
            own: hmac::Key::new(hmac::HMAC_SHA256, &own),
            random: Arc::new(random),
        };
        signer.use_secrets(secrets);
        signer
    }

    /// A signer with a random key: only this process accepts its tokens.
    pub fn random() -> Self {
        Self::with_secrets(&[])
    }

    /// From now on, signs with the first of `secrets` and verifies with
    /// every one; with none, with this process's random key. Every clone
    /// of this signer follows.
    pub fn use_secrets(&self, secrets: &[&[u8]]) {
        let keys = if secrets.is_empty() {
            vec![self.own.clone()]
        } else {
            secrets
                .iter()
                .map(|s| hmac::Key::new(hmac::HMAC_SHA256, s))
                .collect()
        };
        self.keys.store(Arc::new(keys));
    }

    /// A fresh random reservation id.
    pub fn new_id(&self) -> [u8; 16] {
        let mut id = [0u8; 16];
        let _ = self.random.fill(&mut id);
        id
    }

    /// The token for `reservation`.
    pub fn sign(&self, reservation: &Reservation) -> String {
        let mut body = reservation.encode();
        let keys = self.keys.load();
        // `use_secrets` never stores an empty list.
        let key = keys.first().unwrap_or(&self.own);
        let tag = hmac::sign(key, &body);
        body.extend_from_slice(tag.as_ref());
        URL_SAFE_NO_PAD.encode(body)
    }

    /// The reservation in `token`, if it is one this key signed, unaltered.
    pub fn verify(&self, token: &str) -> Result<Reservation, TokenError> {
        let raw = raw(token)?;
        let (body, tag) = raw.split_at(raw.len() - MAC_LEN);
        let keys = self.keys.load();
        if !keys.iter().any(|k| hmac::verify(k, body, tag).is_ok()) {
            return Err(TokenError::Forged);
        }
        Reservation::decode(body).ok_or(TokenError::Malformed)
    }
}

/// A token's bytes, body and signature, if it has the shape of one.
fn raw(token: &str) -> Result<Vec<u8>, TokenError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(TokenError::Malformed);
    }
    let raw = URL_SAFE_NO_PAD
        .decode(token.trim())
        .map_err(|_| TokenError::Malformed)?;
    if raw.len() <= MAC_LEN {
        return Err(TokenError::Malformed);
    }
    Ok(raw)
}

/// What `token` claims, without checking its signature: never to be acted
/// on, only to check a caller's grant before telling it whether the token
/// is genuine.
pub fn peek(token: &str) -> Result<Reservation, TokenError> {
    let raw = raw(token)?;
    Reservation::decode(&raw[..raw.len() - MAC_LEN]).ok_or(TokenError::Malformed)
}

/// Why a token is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not a reservation token at all.
    #[error("is not a reservation token")]
    Malformed,
    /// Signed with another key, or altered.
    #[error(
        "is forged or altered: its signature does not match (or another deployment's key signed it)"
    )]
    Forged,
}

/// What a reservation took, as its token carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    /// Random; the store records it when settled.
    pub id: [u8; 16],
    /// The last moment it may be settled: the store's clock, µs since the
    /// Unix epoch.
    pub deadline_us: u64,
    /// The scope whose buckets it charged.
    pub scope: String,
    /// The configured caller that made it, when callers are configured:
    /// only that caller may settle it.
    pub caller: Option<String>,
    /// Each bucket it took from.
    pub buckets: Vec<ReservedBucket>,
}

/// One bucket a reservation took from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReservedBucket {
    /// The rule's key name (its name, and a budget's window tag).
    pub rule: String,
    /// The bucket's identity part, if any.
    pub identity: Option<String>,
    /// The bucket's operation part, if any.
    pub operation: Option<String>,
    /// Its shape when charged (nanoseconds).
    pub shape: Shape,
    /// A budget's window tag; empty for a token bucket.
    pub window: String,
    /// The estimate taken.
    pub cost: u64,
    /// The headroom the request's priority had to leave in this bucket:
    /// its settle may not take it (see [`crate::bucket::Shape::settle`]).
    pub reserve: u64,
    /// The state the charge left it in and its ledger then, in the
    /// store's ticks.
    pub mark: Mark,
}

impl Reservation {
    /// The most bytes one bucket adds to a token's body.
    pub fn bucket_len(b: &crate::store::BucketCharge<'_>) -> usize {
        // Rule, identity and operation with their length prefixes and
        // flags, the window tag (a unit and an IANA name, well under 64),
        // and nine numbers.
        let text = |s: Option<&str>| 3 + s.map_or(0, str::len);
        text(Some(b.key.rule)) + text(b.key.identity) + text(b.key.operation) + 2 + 64 + 9 * 8
    }

    /// The length of a token whose buckets add `buckets_len` bytes: the
    /// fixed fields and the signature, in base64.
    pub fn token_len(buckets_len: usize) -> usize {
        // Version, id, deadline, scope, caller (a name, at most 128), count.
        let body = 1 + 16 + 8 + 2 + 128 + 3 + 128 + 1 + buckets_len + MAC_LEN;
        body.div_ceil(3) * 4
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + 96 * self.buckets.len());
        out.push(VERSION);
        out.extend_from_slice(&self.id);
        out.extend_from_slice(&self.deadline_us.to_le_bytes());
        put_text(&mut out, &self.scope);
        put_opt(&mut out, self.caller.as_deref());
        out.push(u8::try_from(self.buckets.len()).unwrap_or(u8::MAX));
        for b in self.buckets.iter().take(usize::from(u8::MAX)) {
            put_text(&mut out, &b.rule);
            put_opt(&mut out, b.identity.as_deref());
            put_opt(&mut out, b.operation.as_deref());
            put_text(&mut out, &b.window);
            for n in [
                b.shape.capacity,
                b.shape.period,
                b.cost,
                b.reserve,
                b.mark.taken.ticks,
                b.mark.taken.frac,
                b.mark.ledger.born,
                b.mark.ledger.given.ticks,
                b.mark.ledger.given.frac,
            ] {
                out.extend_from_slice(&n.to_le_bytes());
            }
        }
        out
    }

    fn decode(body: &[u8]) -> Option<Self> {
        let mut r = Reader(body);
        if r.byte()? != VERSION {
            return None;
        }
        let id = r.take(16)?.try_into().ok()?;
        let deadline_us = r.u64()?;
        let scope = r.text()?;
        let caller = r.opt()?;
        let n = r.byte()?;
        let mut buckets = Vec::with_capacity(usize::from(n));
        for _ in 0..n {
            let rule = r.text()?;
            let identity = r.opt()?;
            let operation = r.opt()?;
            let window = r.text()?;
            let [capacity, period, cost, reserve, ticks, frac] =
                [r.u64()?, r.u64()?, r.u64()?, r.u64()?, r.u64()?, r.u64()?];
            let [born, given_ticks, given_frac] = [r.u64()?, r.u64()?, r.u64()?];
            buckets.push(ReservedBucket {
                rule,
                identity,
                operation,
                shape: Shape { capacity, period },
                window,
                cost,
                reserve,
                mark: Mark {
                    taken: Tat { ticks, frac },
                    ledger: Ledger {
                        born,
                        given: Tat {
                            ticks: given_ticks,
                            frac: given_frac,
                        },
                    },
                },
            });
        }
        r.0.is_empty().then_some(Self {
            id,
            deadline_us,
            scope,
            caller,
            buckets,
        })
    }
}

fn put_text(out: &mut Vec<u8>, s: &str) {
    // Every part is validated far below 64 KiB.
    let len = u16::try_from(s.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&s.as_bytes()[..usize::from(len)]);
}

fn put_opt(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        None => out.push(0),
        Some(s) => {
            out.push(1);
            put_text(out, s);
        }
    }
}

/// Reads a body front to back; `None` at any short or bad field.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn byte(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    fn text(&mut self) -> Option<String> {
        let len = u16::from_le_bytes(self.take(2)?.try_into().ok()?);
        String::from_utf8(self.take(usize::from(len))?.to_vec()).ok()
    }

    fn opt(&mut self) -> Option<Option<String>> {
        match self.byte()? {
            0 => Some(None),
            1 => Some(Some(self.text()?)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reservation() -> Reservation {
        Reservation {
            id: [7; 16],
            deadline_us: 1_700_000_000_000_000,
            scope: "llm".into(),
            caller: Some("edge".into()),
            buckets: vec![ReservedBucket {
                rule: "tokens".into(),
                identity: Some("team-a".into()),
                operation: None,
                shape: Shape {
                    capacity: 50_000,
                    period: 60_000_000_000,
                },
                window: String::new(),
                cost: 1_000,
                reserve: 300,
                mark: Mark {
                    taken: Tat {
                        ticks: 1_699_999_999_000_000,
                        frac: 17,
                    },
                    ledger: Ledger {
                        born: 1_699_999_998_000_000,
                        given: Tat { ticks: 40, frac: 3 },
                    },
                },
            }],
        }
    }

    #[test]
    fn a_token_round_trips_on_any_replica_with_the_same_key() {
        let one = Signer::new(&[1; 32]);
        let two = Signer::new(&[1; 32]);
        let token = one.sign(&reservation());
        assert_eq!(two.verify(&token).unwrap(), reservation());
    }

    #[test]
    fn a_version_1_token_is_refused_as_malformed() {
        let key = [1; 32];
        let mut body = reservation().encode();
        body[0] = 1;
        let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, &key), &body);
        body.extend_from_slice(tag.as_ref());
        let token = URL_SAFE_NO_PAD.encode(body);
        assert_eq!(Signer::new(&key).verify(&token), Err(TokenError::Malformed));
    }

    #[test]
    fn an_altered_or_foreign_token_is_forged() {
        let signer = Signer::new(&[1; 32]);
        let token = signer.sign(&reservation());
        // Flip one character in the middle of the body.
        let mut chars: Vec<char> = token.chars().collect();
        let i = chars.len() / 3;
        chars[i] = if chars[i] == 'A' { 'B' } else { 'A' };
        let altered: String = chars.into_iter().collect();
        assert_eq!(signer.verify(&altered), Err(TokenError::Forged));
        assert_eq!(
            Signer::new(&[2; 32]).verify(&token),
            Err(TokenError::Forged)
        );
        assert_eq!(signer.verify("not a token!"), Err(TokenError::Malformed));
        // Rotation: a key still listed verifies; a retired one does not.
        let rotated = Signer::with_secrets(&[&[2; 32], &[1; 32]]);
        assert_eq!(rotated.verify(&token), Ok(reservation()));
        let new = rotated.sign(&reservation());
        assert_eq!(Signer::new(&[2; 32]).verify(&new), Ok(reservation()));
        rotated.use_secrets(&[&[2; 32]]);
        assert_eq!(rotated.verify(&token), Err(TokenError::Forged));
        assert_eq!(signer.verify(""), Err(TokenError::Malformed));
    }
}
