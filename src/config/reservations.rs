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
/// The most secrets `reservations.secret` may list: a forged token is
/// checked against each, so the list stays short.
pub const MAX_SECRETS: usize = 8;

/// `reservations.secret`: one secret, or a list whose first signs and
/// whose every one verifies, so a key can be rotated without stranding the
/// reservations it signed.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Secrets {
    /// `secret: "..."`.
    One(Secret),
    /// `secret: ["new", "old"]`.
    Many(Vec<Secret>),
}

impl Secrets {
    /// Every secret, the signing one first.
    pub fn all(&self) -> &[Secret] {
        match self {
            Self::One(s) => std::slice::from_ref(s),
            Self::Many(v) => v,
        }
    }
}

impl From<Secret> for Secrets {
    fn from(secret: Secret) -> Self {
        Self::One(secret)
    }
}

/// `reservations.secret_file`: one file, or a list, as for [`Secrets`].
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum SecretFiles {
    /// `secret_file: /path`.
    One(PathBuf),
    /// `secret_file: [/new, /old]`.
    Many(Vec<PathBuf>),
}

impl SecretFiles {
    fn all_mut(&mut self) -> &mut [PathBuf] {
        match self {
            Self::One(p) => std::slice::from_mut(p),
            Self::Many(v) => v,
        }
    }
}

/// `reservations`: how reservations are signed and bounded.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReservationsConfig {
    /// The HMAC key that signs reservations, at least 32 bytes, or a list
    /// of them: the first signs, all verify. Every replica that shares a
    /// store must have the same ones, or a replica refuses the others'
    /// reservations as forged. Absent: a random key per process, so only
    /// the replica that made a reservation can settle it.
    #[serde(default)]
    pub secret: Option<Secrets>,
    /// A file holding `secret` (a trailing newline is ignored), or a list
    /// of files, one secret each, in the order of `secret`'s list.
    #[serde(default)]
    pub secret_file: Option<SecretFiles>,
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
        for p in self.secret_file.iter_mut().flat_map(SecretFiles::all_mut) {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        }
    }

    /// Reads `secret_file` into `secret`.
    pub(super) fn read_secret(&mut self, problems: &mut Vec<String>) {
        let Some(files) = &self.secret_file else {
            return;
        };
        if self.secret.is_some() {
            problems
                .push("reservations.secret_file: give secret or secret_file, not both".to_owned());
            return;
        }
        let (files, many): (&[PathBuf], bool) = match files {
            SecretFiles::One(p) => (std::slice::from_ref(p), false),
            SecretFiles::Many(v) => (v, true),
        };
        let mut secrets = Vec::with_capacity(files.len());
        for (i, file) in files.iter().enumerate() {
            match std::fs::read_to_string(file) {
                Ok(text) => {
                    let text = text.strip_suffix('\n').unwrap_or(&text);
                    let text = text.strip_suffix('\r').unwrap_or(text);
                    secrets.push(Secret::new(text));
                }
                Err(e) => problems.push(format!(
                    "reservations.secret_file{}: cannot read {}: {e}",
                    if many {
                        format!("[{i}]")
                    } else {
                        String::new()
                    },
                    file.display()
                )),
            }
        }
        if secrets.len() != files.len() {
            return;
        }
        self.secret = match (many, secrets.pop()) {
            (false, Some(one)) => Some(Secrets::One(one)),
            (true, Some(last)) => {
                secrets.push(last);
                Some(Secrets::Many(secrets))
            }
            (_, None) => Some(Secrets::Many(Vec::new())),
        };
    }

    /// Checks the bounds, pushing `reservations.<field>: problem`.
    pub(super) fn validate(&self, problems: &mut Vec<String>) {
        match &self.secret {
            None => {}
            Some(Secrets::One(secret)) if secret.expose().len() < MIN_SECRET_LEN => {
                problems.push(format!(
                    "reservations.secret: must be at least {MIN_SECRET_LEN} bytes"
                ));
            }
            Some(Secrets::One(_)) => {}
            Some(Secrets::Many(list)) => {
                if list.is_empty() || list.len() > MAX_SECRETS {
                    problems.push(format!(
                        "reservations.secret: must list 1 to {MAX_SECRETS} secrets (the first signs)"
                    ));
                }
                for (i, secret) in list.iter().enumerate() {
                    if secret.expose().len() < MIN_SECRET_LEN {
                        problems.push(format!(
                            "reservations.secret[{i}]: must be at least {MIN_SECRET_LEN} bytes"
                        ));
                    }
                }
            }
        }
        if self.max_settle_within < Duration::from_millis(1)
            || self.max_settle_within > MAX_SETTLE_WITHIN
        {
            problems.push("reservations.max_settle_within: must be between 1ms and 7d".to_owned());
        }
    }
}
