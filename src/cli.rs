//! The command line: `serve`, `check-config`, the `allow` client, the
//! admin clients `top` and `explain` ([`admin`]), and the penalty box's
//! `ban`, `unban` and `bans` ([`bans`]).
//!
//! This module belongs to the binary, not the library: it is the one place
//! outside `api` that speaks proto, as a client.

mod admin;
mod bans;
mod envoy_compat;

pub(crate) use admin::{ExplainArgs, TopArgs, explain, top};
pub(crate) use bans::{BanArgs, BansArgs, Target as UnbanArgs, ban, bans, unban};
pub(crate) use envoy_compat::check_envoy_compat;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use tollgate::config::{Config, ConfigSource};
use tollgate::limiter::Rules;
use tollgate::pb::tollgate::v1 as pb;
use tollgate::reload::Prepared;

/// Tollgate: a rate-limit decision service.
#[derive(Debug, Parser)]
#[command(name = "tollgate", version, about)]
pub(crate) struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub(crate) command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Serve the gRPC API until SIGTERM or SIGINT; SIGHUP reloads the config.
    Serve {
        /// The YAML config file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a config file and print a summary of its scopes and rules;
    /// or, with --envoy-compat, report on an envoyproxy/ratelimit config
    /// directory.
    CheckConfig {
        /// The YAML config file.
        #[arg(required_unless_present = "envoy_compat")]
        file: Option<PathBuf>,
        /// An envoyproxy/ratelimit config directory (or runtime root): say
        /// per file whether Tollgate loads it, and every field whose meaning
        /// differs from upstream's.
        #[arg(long, value_name = "DIR", conflicts_with = "file")]
        envoy_compat: Option<PathBuf>,
    },
    /// Ask a running Tollgate for one decision, and print it.
    Allow(Box<AllowArgs>),
    /// Show the heaviest identities per rule, refreshed in place like top;
    /// several --addr are merged.
    Top(TopArgs),
    /// Show which limits apply to a request and what each bucket holds now,
    /// taking nothing.
    Explain(ExplainArgs),
    /// Put a caller in a scope's penalty box for a while.
    Ban(BanArgs),
    /// Lift a caller's ban and clear its history.
    Unban(UnbanArgs),
    /// List the callers banned in a scope; several --addr are merged.
    Bans(BansArgs),
}

/// The `allow` subcommand's flags.
#[derive(Debug, Args)]
pub(crate) struct AllowArgs {
    /// The server, e.g. http://127.0.0.1:50051.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    addr: String,
    /// What to ask about.
    #[command(flatten)]
    question: Question,
    /// Decide without taking.
    #[arg(long)]
    dry_run: bool,
    /// A bearer token, for a server with `callers:` (sent as
    /// `authorization: Bearer <token>`).
    #[arg(long)]
    token: Option<String>,
    /// PEM CA that signed the server's certificate; implies TLS (an
    /// `https://` address uses the system's roots without it).
    #[arg(long)]
    ca_cert: Option<PathBuf>,
    /// PEM client certificate for mTLS (with `--key`).
    #[arg(long, requires = "key")]
    cert: Option<PathBuf>,
    /// PEM client key for mTLS (with `--cert`).
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
    /// The name to check the server's certificate against, when it is not
    /// the address's host.
    #[arg(long)]
    tls_name: Option<String>,
}

/// The request a subcommand asks about: `allow` decides it, `explain`
/// explains it.
#[derive(Debug, Args)]
pub(crate) struct Question {
    /// The scope.
    #[arg(long)]
    scope: String,
    /// The caller's identity.
    #[arg(long, default_value = "")]
    identity: String,
    /// The operation.
    #[arg(long, default_value = "")]
    operation: String,
    /// Tokens to take (or, for `explain`, to judge).
    #[arg(long, default_value_t = 1)]
    cost: u32,
    /// An attribute, as key=value; repeat for more.
    #[arg(long = "attr", value_parser = parse_attr)]
    attrs: Vec<(String, String)>,
    /// The request's priority: which headroom it may take.
    #[arg(long, default_value = "normal", value_parser = ["critical", "normal", "sheddable"])]
    priority: String,
    /// Shaping: the longest this caller can wait (e.g. `2s`); a limit with
    /// `max_delay` may then answer ALLOWED with a delay instead of DENIED.
    #[arg(long, value_parser = humantime::parse_duration)]
    max_wait: Option<Duration>,
    /// Concurrency limits: take a lease with this id along with the rates
    /// (all or nothing). It is held until its TTL ends: this command does
    /// not release it.
    #[arg(long)]
    lease_id: Option<String>,
    /// The lease's time to live (e.g. `30s`); unset: the limit's `max_lease`.
    #[arg(long, requires = "lease_id", value_parser = humantime::parse_duration)]
    lease_ttl: Option<Duration>,
}

impl Question {
    /// The request, as a dry run or not.
    fn into_request(self, dry_run: bool) -> pb::ShouldAllowRequest {
        pb::ShouldAllowRequest {
            scope: self.scope,
            identity: self.identity,
            operation: self.operation,
            cost: self.cost,
            dry_run,
            attributes: self.attrs.into_iter().collect(),
            priority: match self.priority.as_str() {
                "critical" => pb::Priority::Critical,
                "sheddable" => pb::Priority::Sheddable,
                _ => pb::Priority::Normal,
            }
            .into(),
            settle_within: None,
            max_wait: self
                .max_wait
                .and_then(|d| prost_types::Duration::try_from(d).ok()),
            strike: false,
            lease_id: self.lease_id.unwrap_or_default(),
            lease_ttl: self
                .lease_ttl
                .and_then(|d| prost_types::Duration::try_from(d).ok()),
        }
    }
}

fn parse_attr(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("expected key=value, got {s:?}"))
}

/// Validates a config file as `serve` would, printing a summary of its
/// scopes and rules, or every problem found.
pub(crate) fn check_config(file: &Path) -> ExitCode {
    let source = ConfigSource::new(file, std::env::vars());
    for name in &source.ignored {
        eprintln!("warning: {name} ignored: it names no config section");
    }
    match Prepared::load(source) {
        Ok(p) => {
            print!("{}", summary(&p.config, &p.rules));
            println!("config OK");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{}: invalid configuration", file.display());
            for p in &e.problems {
                eprintln!("  {p}");
            }
            ExitCode::FAILURE
        }
    }
}

/// A human summary of a validated config and its compiled rules.
fn summary(config: &Config, rules: &Rules) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "listen {}, store {:?}, failure_mode {:?}, unknown scopes: {:?}",
        config.listen, config.store.kind, config.failure_mode, config.unknown_scope
    );
    let mut scopes: Vec<_> = rules.scopes().collect();
    scopes.sort_by(|a, b| a.name.cmp(&b.name));
    for scope in scopes {
        let _ = writeln!(
            out,
            "scope {} (failure_mode {:?}, hash_tag {}, {} limits, {} descriptor rules)",
            scope.name,
            scope.failure_mode,
            scope.hash_tag.name(),
            scope.limits.len(),
            scope.descriptor_tree.limit_count()
        );
        for l in &scope.limits {
            let period = humantime::format_duration(Duration::from_nanos(l.shape.period));
            let mut extra = String::new();
            if l.operations.is_some() {
                extra.push_str(" for some operations");
            }
            for (k, v) in &l.when {
                let _ = write!(extra, " when {k}={v}");
            }
            if l.shadow {
                extra.push_str(" (shadow)");
            }
            if l.reserve != [0; 3] {
                let _ = write!(
                    extra,
                    " keeping {} from normal and {} from sheddable requests",
                    l.reserve[1], l.reserve[2]
                );
            }
            // A budget's window is a calendar unit in a zone, or a length.
            let period = match &l.window {
                Some(w) => format!("window {}", w.tag()),
                None => period.to_string(),
            };
            let _ = writeln!(
                out,
                "  {}: {} per {} per {:?}{}",
                l.name, l.shape.capacity, period, l.per, extra
            );
        }
    }
    out
}

/// A channel to `--addr`, over TLS when the flags or the scheme ask for it.
async fn channel(args: &AllowArgs) -> anyhow::Result<tonic::transport::Channel> {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let tls = args.ca_cert.is_some() || args.cert.is_some() || args.addr.starts_with("https://");
    let addr = match args.addr.strip_prefix("http://") {
        Some(rest) if tls => format!("https://{rest}"),
        _ => args.addr.clone(),
    };
    let mut endpoint = Endpoint::from_shared(addr)?;
    if tls {
        let mut config = ClientTlsConfig::new().with_enabled_roots();
        if let Some(ca) = &args.ca_cert {
            config = config.ca_certificate(Certificate::from_pem(std::fs::read(ca)?));
        }
        if let (Some(cert), Some(key)) = (&args.cert, &args.key) {
            config = config.identity(Identity::from_pem(
                std::fs::read(cert)?,
                std::fs::read(key)?,
            ));
        }
        if let Some(name) = &args.tls_name {
            config = config.domain_name(name);
        }
        endpoint = endpoint.tls_config(config)?;
    }
    Ok(endpoint.connect().await?)
}

/// Sends one `ShouldAllow` and renders the answer for a terminal.
pub(crate) async fn allow(args: AllowArgs) -> anyhow::Result<String> {
    let channel = channel(&args).await?;
    let request = args.question.into_request(args.dry_run);
    let mut request = tonic::Request::new(request);
    if let Some(token) = &args.token {
        let value = format!("Bearer {token}").parse()?;
        request.metadata_mut().insert("authorization", value);
    }
    let mut client = pb::rate_limiter_client::RateLimiterClient::new(channel);
    let r = client.should_allow(request).await?.into_inner();
    Ok(render(&r))
}

/// Seconds with milliseconds, as the CLI prints durations.
fn secs(d: &Option<prost_types::Duration>) -> Option<String> {
    d.as_ref()
        .map(|d| format!("{:.3}s", d.seconds as f64 + f64::from(d.nanos) / 1e9))
}

/// A `ShouldAllow` answer for a terminal: the decision on one line, then a
/// line per bucket and one for a lease.
fn render(r: &pb::ShouldAllowResponse) -> String {
    let mut out = String::new();
    let _ = write!(out, "{}", if r.allowed { "ALLOWED" } else { "DENIED" });
    if let Some(s) = secs(&r.delay) {
        let _ = write!(out, " delay={s}");
    }
    if let Some(s) = secs(&r.retry_after) {
        let _ = write!(out, " retry_after={s}");
    }
    if !r.rule.is_empty() {
        let _ = write!(
            out,
            " rule={} limit={} remaining={}",
            r.rule, r.limit, r.remaining
        );
        if let Some(s) = secs(&r.reset_after) {
            let _ = write!(out, " reset_after={s}");
        }
    }
    if r.degraded {
        out.push_str(" degraded");
    }
    if !r.reason.is_empty() {
        let _ = write!(out, " reason={:?}", r.reason);
    }
    out.push('\n');
    for b in &r.buckets {
        let _ = write!(out, "  {}: {}/{} left", b.rule, b.remaining, b.limit);
        if let Some(s) = secs(&b.retry_after) {
            let _ = write!(out, ", retry in {s}");
        }
        out.push('\n');
    }
    if let Some(l) = &r.lease {
        let held = if l.granted { "held" } else { "not held" };
        let _ = write!(
            out,
            "  lease {} ({}): {held}, {}/{} in flight",
            l.lease_id, l.rule, l.in_flight, l.limit
        );
        if let Some(s) = secs(&l.ttl) {
            let _ = write!(out, ", {s} left");
        }
        out.push('\n');
    }
    out
}
