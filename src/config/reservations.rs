//! Settle-later reservations: the key that signs them and how long they live.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::Secret;

/// Default `reservations.max_settle_within`.
pub const DEFAULT_MAX_SETTLE_WITHIN: Duration = Duration::from_secs(3600);
/// The longest `reservations.max_settle_within` may be.
pub const MAX_SETTLE_WITHIN: Duration = Duration::from_secs(7 * 24 * 3600);
/// The fewest bytes a signing secret may have.
pub const MIN_SECRET_LEN: usize = 32;

/// `reservations`: how reservations are signed and bounded.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReservationsConfig {
    /// The HMAC key that signs reservations, at least 32 bytes. Every
    /// replica that shares a store must have the same one, or a replica
    /// refuses the others' reservations as forged. Absent: a random key per
    /// process, so only the replica that made a reservation can settle it.
    #[serde(default)]
    pub secret: Option<Secret>,
    /// A file holding `secret` (a trailing newline is ignored).
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// The longest `settle_within` a request may ask for. Each settled
    /// reservation is remembered (its id, in the store) until its deadline,
    /// so this bounds that memory too.
    #[serde(default = "default_max", with = "humantime_serde")]
    pub max_settle_within: Duration,
}

fn default_max() -> Duration {
    DEFAULT_MAX_SETTLE_WITHIN
}

impl Default for ReservationsConfig {
    fn default() -> Self {
        Self {
            secret: None,
            secret_file: None,
            max_settle_within: DEFAULT_MAX_SETTLE_WITHIN,
        }
    }
}

impl fmt::Debug for ReservationsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReservationsConfig")
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("secret_file", &self.secret_file)
            .field("max_settle_within", &self.max_settle_within)
            .finish()
    }
}

impl ReservationsConfig {
    /// Makes a relative `secret_file` relative to `dir`, the config's folder.
    pub(super) fn resolve(&mut self, dir: &Path) {
        if let Some(p) = self.secret_file.as_mut()
            && p.is_relative()
        {
            *p = dir.join(&*p);
        }
    }

    /// Reads `secret_file` into `secret`.
    pub(super) fn read_secret(&mut self, problems: &mut Vec<String>) {
        let Some(file) = &self.secret_file else {
            return;
        };
        if self.secret.is_some() {
            problems
                .push("reservations.secret_file: give secret or secret_file, not both".to_owned());
            return;
        }
        match std::fs::read_to_string(file) {
            Ok(text) => {
                let text = text.strip_suffix('\n').unwrap_or(&text);
                let text = text.strip_suffix('\r').unwrap_or(text);
                self.secret = Some(Secret::new(text));
            }
            Err(e) => problems.push(format!(
                "reservations.secret_file: cannot read {}: {e}",
                file.display()
            )),
        }
    }

    /// Checks the bounds, pushing `reservations.<field>: problem`.
    pub(super) fn validate(&self, problems: &mut Vec<String>) {
        if let Some(secret) = &self.secret
            && secret.expose().len() < MIN_SECRET_LEN
        {
            problems.push(format!(
                "reservations.secret: must be at least {MIN_SECRET_LEN} bytes"
            ));
        }
        if self.max_settle_within < Duration::from_millis(1)
            || self.max_settle_within > MAX_SETTLE_WITHIN
        {
            problems.push("reservations.max_settle_within: must be between 1ms and 7d".to_owned());
        }
    }
}
