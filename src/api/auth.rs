//! Caller authorization: who is calling, and whether their grant covers
//! the call.
//!
//! A caller is recognised by a bearer token (`authorization: Bearer <t>`,
//! matched by its SHA-256) or, failing that, by a DNS or URI SAN of the
//! client certificate its TLS connection presented. A token that is sent
//! decides on its own: a wrong one is refused even on a connection whose
//! certificate would match, so a bad token is never silently ignored.
//!
//! With no `callers:` configured, every call is let through, as before
//! this existed. With callers, an unrecognised call is `UNAUTHENTICATED`
//! and a call outside its grant is `PERMISSION_DENIED`, naming the caller
//! and the scope; both are refused before the limiter sees the request, so
//! they take nothing. Each refusal is counted and audited (sampled).
//!
//! The admin service (`api::admin`) calls [`Authorizer::authorize_admin`]
//! with its method name; nothing else is needed to guard it.

use std::collections::HashMap;
use std::sync::Arc;

use globset::{Glob, GlobSet, GlobSetBuilder};
use tonic::{Request, Status};

use crate::config::CallerConfig;
use crate::observe::Observer;

pub use crate::net::{PeerInfo, UNAUTHENTICATED};

/// What a grant may allow beyond deciding on its scopes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Privilege {
    /// `dry_run` requests.
    DryRun,
    /// `ShouldAllowBatch`.
    Batch,
    /// The admin RPCs.
    Admin,
    /// Envoy refunds (`is_negative_hits`).
    Refund,
}

impl Privilege {
    fn describe(self) -> &'static str {
        match self {
            Self::DryRun => "send dry_run requests (Envoy: a descriptor's hits_addend 0)",
            Self::Batch => {
                "send batches (ShouldAllowBatch, or Envoy requests of several descriptors)"
            }
            Self::Admin => "call the admin RPCs",
            Self::Refund => "send refunds (is_negative_hits)",
        }
    }
}

/// One configured caller, compiled.
#[derive(Debug)]
pub struct Caller {
    /// The configured name.
    pub name: Arc<str>,
    scopes: GlobSet,
    dry_run: bool,
    batch: bool,
    admin: bool,
    refund: bool,
}

impl Caller {
    fn compile(c: &CallerConfig) -> Self {
        let mut scopes = GlobSetBuilder::new();
        // The config has checked every glob; one that still fails matches
        // nothing rather than everything.
        for glob in c.scopes.iter().filter_map(|g| Glob::new(g).ok()) {
            scopes.add(glob);
        }
        Self {
            name: c.name.as_str().into(),
            scopes: scopes.build().unwrap_or_else(|_| GlobSet::empty()),
            dry_run: c.dry_run,
            batch: c.batch,
            admin: c.admin,
            refund: c.refund,
        }
    }

    /// Whether this caller may decide on `scope`.
    pub fn may_decide(&self, scope: &str) -> bool {
        self.scopes.is_match(scope)
    }

    /// Whether this caller holds `privilege`.
    pub fn may(&self, privilege: Privilege) -> bool {
        match privilege {
            Privilege::DryRun => self.dry_run,
            Privilege::Batch => self.batch,
            Privilege::Admin => self.admin,
            Privilege::Refund => self.refund,
        }
    }
}

/// Every caller, indexed by how it is recognised.
#[derive(Debug, Default)]
struct Grants {
    by_san: HashMap<String, Arc<Caller>>,
    /// Keyed by the token's SHA-256. Looking a hash up is not a timing
    /// oracle for the token: learning which hashes are near tells nothing
    /// about a preimage.
    by_token: HashMap<[u8; 32], Arc<Caller>>,
}

/// Decides who is calling and what they may do. One per config: a reload
/// builds a new one and swaps it in with the rules it goes with (see
/// `crate::reload`), so a call is authorised and decided on one config.
#[derive(Debug)]
pub struct Authorizer {
    /// `None` when no `callers:` are configured: everyone may do everything.
    grants: Option<Grants>,
    observer: Arc<Observer>,
}

impl Authorizer {
    /// Authorizes by `callers` (`None`: everyone may do everything),
    /// reporting refusals to `observer`.
    pub fn new(callers: Option<&[CallerConfig]>, observer: Arc<Observer>) -> Self {
        let grants = callers.map(|callers| {
            let mut grants = Grants::default();
            for c in callers {
                let caller = Arc::new(Caller::compile(c));
                if let Some(san) = &c.san {
                    grants.by_san.insert(san.clone(), caller.clone());
                }
                if let Some(hash) = c.token_sha256.as_deref().and_then(from_hex) {
                    grants.by_token.insert(hash, caller);
                }
            }
            grants
        });
        Self { grants, observer }
    }

    /// Who is calling: `Ok(None)` when no callers are configured.
    pub fn identify<T>(
        &self,
        api: &'static str,
        request: &Request<T>,
    ) -> Result<Option<Arc<Caller>>, Status> {
        let Some(grants) = &self.grants else {
            return Ok(None);
        };
        let refuse = |why: &str| {
            self.observer.refused(api, UNAUTHENTICATED, "", why);
            Err(Status::unauthenticated(why.to_owned()))
        };
        if let Some(value) = request.metadata().get("authorization") {
            let token = value.to_str().ok().and_then(|v| {
                let (scheme, token) = v.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            });
            let Some(token) = token else {
                return refuse("the authorization header must be `Bearer <token>`");
            };
            let hash = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
            let caller = <[u8; 32]>::try_from(hash.as_ref())
                .ok()
                .and_then(|h| grants.by_token.get(&h));
            return match caller {
                Some(caller) => Ok(Some(caller.clone())),
                None => refuse("the bearer token matches no configured caller"),
            };
        }
        let sans = request
            .extensions()
            .get::<PeerInfo>()
            .map(|p| p.sans.clone())
            .unwrap_or_default();
        match sans.iter().find_map(|san| grants.by_san.get(san)) {
            Some(caller) => Ok(Some(caller.clone())),
            None if sans.is_empty() => refuse(
                "no credentials: send `authorization: Bearer <token>` or a client certificate",
            ),
            None => refuse("the client certificate's SANs match no configured caller"),
        }
    }

    /// Refuses, as PERMISSION_DENIED, a decision on `scope` (found at
    /// `field` of the request) that `caller`'s grant does not cover, or a
    /// `dry_run` it may not send.
    pub fn check_decision(
        &self,
        api: &'static str,
        caller: Option<&Caller>,
        field: &str,
        scope: &str,
        dry_run: bool,
    ) -> Result<(), Status> {
        let Some(caller) = caller else { return Ok(()) };
        if !caller.may_decide(scope) {
            let why = format!(
                "{field}: caller {:?} may not decide on scope {scope:?}",
                &*caller.name
            );
            return Err(self.denied(api, caller, scope, why));
        }
        if dry_run && !caller.may(Privilege::DryRun) {
            return self.check_privilege(api, Some(caller), Privilege::DryRun, scope);
        }
        Ok(())
    }

    /// Refuses, as PERMISSION_DENIED, a call that needs `privilege` when
    /// `caller`'s grant lacks it. `scope` is named in the refusal, if any.
    pub fn check_privilege(
        &self,
        api: &'static str,
        caller: Option<&Caller>,
        privilege: Privilege,
        scope: &str,
    ) -> Result<(), Status> {
        match caller {
            Some(caller) if !caller.may(privilege) => {
                let on = if scope.is_empty() {
                    String::new()
                } else {
                    format!(" (scope {scope:?})")
                };
                let why = format!(
                    "caller {:?} may not {}{on}",
                    &*caller.name,
                    privilege.describe()
                );
                Err(self.denied(api, caller, scope, why))
            }
            _ => Ok(()),
        }
    }

    /// Refuses, as PERMISSION_DENIED, a settle by `caller` of a reservation
    /// on `scope` that another caller, `owner`, made. A reservation made
    /// with no callers configured names none, and settles for anyone
    /// granted its scope; with no callers configured now, anyone settles.
    pub fn check_owner(
        &self,
        api: &'static str,
        caller: Option<&Caller>,
        owner: Option<&str>,
        scope: &str,
    ) -> Result<(), Status> {
        match (caller, owner) {
            (Some(caller), Some(owner)) if *caller.name != *owner => {
                // The owner is not named: callers need not learn each
                // other's names.
                let why = format!(
                    "reservation: caller {:?} did not make this reservation; \
                     only the caller that made it may settle it",
                    &*caller.name
                );
                Err(self.denied(api, caller, scope, why))
            }
            _ => Ok(()),
        }
    }

    /// For the admin service: identifies the caller of `method` and refuses
    /// it unless its grant has `admin: true`. With no callers configured,
    /// admin calls are open like every other (see docs/security.md).
    pub fn authorize_admin<T>(
        &self,
        request: &Request<T>,
        method: &str,
    ) -> Result<Option<Arc<Caller>>, Status> {
        let caller = self.identify("admin", request)?;
        self.check_privilege("admin", caller.as_deref(), Privilege::Admin, "")
            .map_err(|s| Status::permission_denied(format!("{method}: {}", s.message())))?;
        Ok(caller)
    }

    fn denied(&self, api: &'static str, caller: &Caller, scope: &str, why: String) -> Status {
        self.observer.refused(api, &caller.name, scope, &why);
        Status::permission_denied(why)
    }
}

/// 64 hex digits as 32 bytes.
fn from_hex(hex: &str) -> Option<[u8; 32]> {
    let bytes = hex.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks(2).enumerate() {
        let text = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(text, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_digests_read_back() {
        let h = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
        let bytes = from_hex(h).unwrap();
        let digest = ring::digest::digest(&ring::digest::SHA256, b"test");
        assert_eq!(&bytes[..], digest.as_ref());
        assert_eq!(from_hex(&h.to_uppercase()), Some(bytes));
        assert_eq!(from_hex("zz"), None);
    }
}
