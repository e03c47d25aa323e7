//! Logs: tracing, human-readable or JSON, to stderr.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Installs the global subscriber. `RUST_LOG`, when set, wins over the
/// configured level. Calling it twice is harmless (the second call is a no-op).
pub fn init(log: &LogConfig, rust_log: Option<&str>) {
    let filter = rust_log.or(log.level.as_deref()).unwrap_or("info");
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour only for a terminal: in a file or a log collector, escape
    // codes are noise in every line.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match log.format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
