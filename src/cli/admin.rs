//! `tollgate top` and `tollgate explain`: clients of `tollgate.v1.Admin`.
//!
//! `top` asks every replica given for its full summaries and merges them:
//! an identity's count is the sum over replicas, where a replica that does
//! not list it adds its `absent_at_most` to both the count and the error,
//! so `count - error <= true <= count` still holds for the fleet.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::io::{IsTerminal as _, Write as _};
use std::time::Duration;

use clap::Args;
use tollgate::pb::tollgate::v1 as pb;
use tonic::transport::Channel;

/// The `top` subcommand's flags.
#[derive(Debug, Args)]
pub(crate) struct TopArgs {
    /// A replica's address; repeat for several, whose figures are merged.
    #[arg(long = "addr", default_value = "http://127.0.0.1:50051")]
    addrs: Vec<String>,
    /// Only this scope.
    #[arg(long, default_value = "")]
    scope: String,
    /// `1m`, `5m` or `1h`.
    #[arg(long, default_value = "1m", value_parser = parse_window)]
    window: pb::Window,
    /// Rank by `decisions` or `denials`.
    #[arg(long, default_value = "decisions", value_parser = parse_by)]
    by: pb::RankBy,
    /// Identities shown per rule.
    #[arg(long, short = 'k', default_value_t = 5)]
    limit: usize,
    /// Time between refreshes.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// Refreshes before exiting; 0 runs until interrupted.
    #[arg(long, short = 'n', default_value_t = 0)]
    iterations: u64,
    /// A bearer token of a caller granted `admin`, for a server with
    /// `callers:`.
    #[arg(long)]
    token: Option<String>,
}

/// `body` as a request carrying `token` as `authorization: Bearer …`.
pub(super) fn authed<T>(token: Option<&str>, body: T) -> anyhow::Result<tonic::Request<T>> {
    let mut request = tonic::Request::new(body);
    if let Some(token) = token {
        let value = format!("Bearer {token}").parse()?;
        request.metadata_mut().insert("authorization", value);
    }
    Ok(request)
}

fn parse_window(s: &str) -> Result<pb::Window, String> {
    match s {
        "1m" => Ok(pb::Window::Window1m),
        "5m" => Ok(pb::Window::Window5m),
        "1h" => Ok(pb::Window::Window1h),
        _ => Err(format!("expected 1m, 5m or 1h, got {s:?}")),
    }
}

fn parse_by(s: &str) -> Result<pb::RankBy, String> {
    match s {
        "decisions" => Ok(pb::RankBy::Decisions),
        "denials" => Ok(pb::RankBy::Denials),
        _ => Err(format!("expected decisions or denials, got {s:?}")),
    }
}

/// Runs the `top` view: one screen per interval, redrawn in place on a
/// terminal (plain output, one screen after another, otherwise).
pub(crate) async fn top(args: TopArgs) -> anyhow::Result<()> {
    let mut clients = Vec::new();
    for addr in &args.addrs {
        let channel = Channel::from_shared(addr.clone())?.connect_lazy();
        clients.push((addr.clone(), pb::admin_client::AdminClient::new(channel)));
    }
    let tty = std::io::stdout().is_terminal();
    let mut shown = 0;
    loop {
        let screen = screen(&args, &mut clients).await;
        let mut out = std::io::stdout().lock();
        if tty {
            // Home and clear, as top does.
            write!(out, "\x1b[H\x1b[2J")?;
        }
        write!(out, "{screen}")?;
        out.flush()?;
        shown += 1;
        if args.iterations != 0 && shown >= args.iterations {
            return Ok(());
        }
        tokio::time::sleep(args.interval).await;
    }
}

type Clients = Vec<(String, pb::admin_client::AdminClient<Channel>)>;

/// One refresh: every replica asked, their answers merged and rendered.
async fn screen(args: &TopArgs, clients: &mut Clients) -> String {
    let mut tops = Vec::new();
    let mut usages = Vec::new();
    let mut failed = Vec::new();
    let token = args.token.as_deref();
    for (addr, client) in clients.iter_mut() {
        let top = pb::TopIdentitiesRequest {
            scope: args.scope.clone(),
            rule: String::new(),
            window: args.window.into(),
            by: args.by.into(),
            // Everything each replica holds: merging needs more than K.
            limit: u32::MAX,
        };
        let usage = pb::UtilizationRequest {
            scope: args.scope.clone(),
            window: args.window.into(),
        };
        let (Ok(top), Ok(usage)) = (authed(token, top), authed(token, usage)) else {
            failed.push(format!("{addr}: the token is not a valid header value"));
            continue;
        };
        let top = client.top_identities(top).await;
        let usage = client.utilization(usage).await;
        match (top, usage) {
            (Ok(t), Ok(u)) => {
                tops.push(t.into_inner().rules);
                usages.push((addr.clone(), u.into_inner().rules));
            }
            (Err(e), _) | (_, Err(e)) => failed.push(format!("{addr}: {}", e.message())),
        }
    }
    let usage = merge_usage(usages);
    let mut out = render(args, &merge_tops(tops), &usage, &failed);
    out.push_str(&banned(args, clients, &usage).await);
    out
}

/// Who is banned in each scope shown, and until when: bans live in the
/// store, so the first replica that answers speaks for all. Scopes
/// without a penalty box answer nothing and are left out.
async fn banned(
    args: &TopArgs,
    clients: &mut Clients,
    usage: &BTreeMap<(String, String), Summed>,
) -> String {
    let mut scopes: Vec<&str> = usage.keys().map(|(s, _)| s.as_str()).collect();
    scopes.dedup();
    let mut out = String::new();
    for scope in scopes {
        for (_, client) in clients.iter_mut() {
            let request = pb::ListBansRequest {
                scope: scope.to_owned(),
                page_size: u32::try_from(args.limit.clamp(1, 1_000)).unwrap_or(1_000),
                page_token: String::new(),
            };
            let Ok(request) = authed(args.token.as_deref(), request) else {
                break;
            };
            let page = match client.list_bans(request).await {
                Ok(page) => page.into_inner(),
                // No penalty box in this scope: no replica has bans for it.
                Err(e) if e.code() == tonic::Code::FailedPrecondition => break,
                Err(_) => continue,
            };
            if page.total > 0 {
                let _ = writeln!(out, "\nBANNED in {scope}: {}", page.total);
                for b in &page.bans {
                    let left = b.remaining.as_ref().map_or_else(String::new, secs);
                    let op = if b.operation.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", b.operation)
                    };
                    let _ = writeln!(
                        out,
                        "    {:<36} {left:>10} left",
                        format!("{}{op}", b.identity)
                    );
                }
            }
            break;
        }
    }
    out
}

/// Per (scope, rule), the replicas' lists merged as the module doc says.
pub(crate) fn merge_tops(replicas: Vec<Vec<pb::RuleTop>>) -> Vec<pb::RuleTop> {
    let mut by_rule: BTreeMap<(String, String), Vec<pb::RuleTop>> = BTreeMap::new();
    for list in replicas {
        for t in list {
            by_rule
                .entry((t.scope.clone(), t.rule.clone()))
                .or_default()
                .push(t);
        }
    }
    by_rule.into_values().map(merge_rule).collect()
}

fn merge_rule(parts: Vec<pb::RuleTop>) -> pb::RuleTop {
    let absent: u64 = parts.iter().map(|p| p.absent_at_most).sum();
    // Per identity: (count, error, the absent_at_most of the replicas that
    // listed it, to take back out of `absent`).
    let mut sums: HashMap<String, (u64, u64, u64)> = HashMap::new();
    for p in &parts {
        for c in &p.identities {
            let s = sums.entry(c.identity.clone()).or_default();
            s.0 += c.count;
            s.1 += c.error;
            s.2 += p.absent_at_most;
        }
    }
    let mut identities: Vec<pb::IdentityCount> = sums
        .into_iter()
        .map(|(identity, (count, error, listed))| pb::IdentityCount {
            identity,
            count: count + (absent - listed),
            error: error + (absent - listed),
        })
        .collect();
    identities.sort_by(|a, b| {
        b.count
            .cmp(&a.count)
            .then_with(|| a.identity.cmp(&b.identity))
    });
    let first = parts.first().cloned().unwrap_or_default();
    pb::RuleTop {
        total: parts.iter().map(|p| p.total).sum(),
        error_bound: parts
            .iter()
            .map(|p| p.error_bound.max(p.absent_at_most))
            .sum(),
        absent_at_most: absent,
        identities,
        ..first
    }
}

/// Per (scope, rule): decisions and denials in the window, and the last
/// complete second's rates, summed over replicas.
fn merge_usage(
    replicas: Vec<(String, Vec<pb::RuleUtilization>)>,
) -> BTreeMap<(String, String), Summed> {
    let mut out: BTreeMap<(String, String), Summed> = BTreeMap::new();
    let several = replicas.len() > 1;
    for (addr, list) in replicas {
        for u in list {
            let s = out.entry((u.scope.clone(), u.rule.clone())).or_default();
            s.decisions += u.decisions;
            s.denials += u.denials;
            s.per_second += recent(&u.decisions_per_second);
            s.denied_per_second += recent(&u.denials_per_second);
            // Hints are each replica's own: say whose when there are several.
            s.hints.extend(u.hints.into_iter().map(|h| {
                if several {
                    format!("{addr}: {}", h.message)
                } else {
                    h.message
                }
            }));
        }
    }
    for s in out.values_mut() {
        s.hints.sort();
        s.hints.dedup();
    }
    out
}

#[derive(Debug, Default)]
struct Summed {
    decisions: u64,
    denials: u64,
    per_second: f64,
    denied_per_second: f64,
    hints: Vec<String>,
}

/// The mean of the last ten complete seconds of a per-second series.
fn recent(series: &[u32]) -> f64 {
    let complete = &series[..series.len().saturating_sub(1)];
    let last = &complete[complete.len().saturating_sub(10)..];
    last.iter().map(|&n| f64::from(n)).sum::<f64>() / last.len().max(1) as f64
}

// The header's wall-clock time is for the person watching, as in top.
#[allow(clippy::disallowed_methods)]
fn render(
    args: &TopArgs,
    tops: &[pb::RuleTop],
    usage: &BTreeMap<(String, String), Summed>,
    failed: &[String],
) -> String {
    let mut out = String::new();
    let by = if args.by == pb::RankBy::Denials {
        "denials"
    } else {
        "decisions"
    };
    let window = args
        .window
        .as_str_name()
        .trim_start_matches("WINDOW_")
        .to_lowercase();
    let _ = writeln!(
        out,
        "tollgate top - {} replica(s) - last {window} by {by} - {}",
        args.addrs.len() - failed.len(),
        humantime::format_rfc3339_seconds(std::time::SystemTime::now())
    );
    for f in failed {
        let _ = writeln!(out, "  unreachable: {f}");
    }
    let _ = writeln!(
        out,
        "\n{:<32} {:>9} {:>9} {:>8} {:>10}",
        "SCOPE/RULE", "DECIDED/s", "DENIED/s", "DENIED", "DECISIONS"
    );
    let _ = writeln!(out, "    {:<36} {:>8}", "IDENTITY", by.to_uppercase());
    for ((scope, rule), u) in usage {
        let share = 100.0 * u.denials as f64 / u.decisions.max(1) as f64;
        let _ = writeln!(
            out,
            "{:<32} {:>9.1} {:>9.1} {:>7.1}% {:>10}",
            format!("{scope}/{rule}"),
            u.per_second,
            u.denied_per_second,
            share,
            u.decisions
        );
        for h in &u.hints {
            let _ = writeln!(out, "  ! {h}");
        }
        if let Some(t) = tops.iter().find(|t| t.scope == *scope && t.rule == *rule) {
            for c in t.identities.iter().take(args.limit) {
                let bound = if c.error > 0 {
                    format!(" (at least {})", c.count - c.error)
                } else {
                    String::new()
                };
                let _ = writeln!(out, "    {:<36} {:>8}{bound}", c.identity, c.count);
            }
        }
    }
    out
}

/// The `explain` subcommand's flags.
#[derive(Debug, Args)]
pub(crate) struct ExplainArgs {
    /// The server, e.g. http://127.0.0.1:50051.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    addr: String,
    /// What to explain, judged as a dry run.
    #[command(flatten)]
    question: super::Question,
    /// A bearer token of a caller granted `admin`, for a server with
    /// `callers:`.
    #[arg(long)]
    token: Option<String>,
}

/// Asks `Explain` and renders the answer.
pub(crate) async fn explain(args: ExplainArgs) -> anyhow::Result<String> {
    let request = args.question.into_request(true);
    let mut client = pb::admin_client::AdminClient::connect(args.addr).await?;
    let explain = pb::ExplainRequest {
        request: Some(request.clone()),
    };
    let e = client
        .explain(authed(args.token.as_deref(), explain)?)
        .await?
        .into_inner();
    Ok(render_explain(&e, &request.scope))
}

/// `tollgate explain`'s text for an answer about `scope`.
fn render_explain(e: &pb::ExplainResponse, scope: &str) -> String {
    let mut out = String::new();
    if !e.scope_configured {
        let _ = writeln!(out, "scope {scope:?} is not configured");
    }
    if let Some(d) = &e.decision {
        let _ = write!(
            out,
            "would be {} (nothing was taken)",
            if d.allowed { "ALLOWED" } else { "DENIED" }
        );
        if let Some(r) = &d.retry_after {
            let _ = write!(out, ", retry after {}", secs(r));
        }
        if !d.reason.is_empty() {
            let _ = write!(out, ": {}", d.reason);
        }
        out.push('\n');
    }
    for l in &e.limits {
        let period = l
            .refill_period
            .as_ref()
            .map(|d| {
                let d = Duration::new(d.seconds.max(0) as u64, d.nanos.max(0) as u32);
                humantime::format_duration(d).to_string()
            })
            .unwrap_or_default();
        let _ = write!(
            out,
            "  {:<20} per {:<18} {} per {}{}: ",
            l.rule,
            l.per,
            l.capacity,
            period,
            if l.shadow { " (shadow)" } else { "" }
        );
        match (&l.bucket, l.applies) {
            (Some(b), true) => {
                let _ = write!(out, "applies, {}/{} left", b.remaining, b.limit);
                if let Some(r) = &b.retry_after {
                    let _ = write!(out, ", enough in {}", secs(r));
                }
            }
            _ => {
                let _ = write!(out, "does not apply: {}", l.skipped_because);
            }
        }
        out.push('\n');
    }
    render_pools(&mut out, e);
    out
}

/// The concurrency limits, and the live leases of the request's pool.
fn render_pools(out: &mut String, e: &pb::ExplainResponse) {
    for p in &e.pools {
        let _ = write!(
            out,
            "  {:<20} per {:<18} {} at once: ",
            p.rule, p.per, p.concurrency
        );
        match (p.applies, p.in_flight_known) {
            (true, true) => {
                let _ = write!(out, "the pool, {}/{} held", p.in_flight, p.concurrency);
            }
            (true, false) => out.push_str("the pool, weight held unknown"),
            (false, _) => {
                let _ = write!(out, "not the pool: {}", p.skipped_because);
            }
        }
        out.push('\n');
    }
    if !e.live_leases_known {
        return;
    }
    for l in &e.live_leases {
        let at = std::time::UNIX_EPOCH + Duration::from_micros(l.expires_at_unix_micros);
        let _ = writeln!(
            out,
            "    lease {:?} weight {} expires {} (store clock)",
            l.lease_id,
            l.weight,
            humantime::format_rfc3339_millis(at)
        );
    }
    if e.live_leases_not_listed > 0 {
        let _ = writeln!(out, "    and {} more live leases", e.live_leases_not_listed);
    }
}

fn secs(d: &prost_types::Duration) -> String {
    format!("{:.3}s", d.seconds as f64 + f64::from(d.nanos) / 1e9)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explain_prints_the_pool_and_its_live_leases() {
        let e = pb::ExplainResponse {
            scope_configured: true,
            pools: vec![pb::PoolExplained {
                rule: "streams".into(),
                per: "identity".into(),
                concurrency: 3,
                applies: true,
                in_flight: 2,
                in_flight_known: true,
                ..Default::default()
            }],
            live_leases: vec![pb::LiveLease {
                lease_id: "r-1".into(),
                expires_at_unix_micros: 1_000_000,
                weight: 2,
            }],
            live_leases_not_listed: 4,
            live_leases_known: true,
            ..Default::default()
        };
        let text = render_explain(&e, "llm");
        assert!(text.contains("streams"), "{text}");
        assert!(text.contains("the pool, 2/3 held"), "{text}");
        assert!(
            text.contains(r#"lease "r-1" weight 2 expires 1970-01-01T00:00:01.000Z (store clock)"#),
            "{text}"
        );
        assert!(text.contains("and 4 more live leases"), "{text}");
    }

    fn top(identities: &[(&str, u64, u64)], absent: u64) -> pb::RuleTop {
        pb::RuleTop {
            scope: "s".into(),
            rule: "r".into(),
            total: identities.iter().map(|i| i.1).sum(),
            absent_at_most: absent,
            identities: identities
                .iter()
                .map(|&(identity, count, error)| pb::IdentityCount {
                    identity: identity.into(),
                    count,
                    error,
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn replicas_merge_with_the_absent_bound_added_to_count_and_error() {
        // alice: 10 on A, unlisted on B (at most 2 there); bob on both.
        let a = top(&[("alice", 10, 0), ("bob", 4, 1)], 0);
        let b = top(&[("bob", 7, 0), ("carol", 3, 0)], 2);
        let merged = merge_tops(vec![vec![a], vec![b]]);
        assert_eq!(merged.len(), 1);
        let got: Vec<(&str, u64, u64)> = merged[0]
            .identities
            .iter()
            .map(|c| (c.identity.as_str(), c.count, c.error))
            .collect();
        assert_eq!(got, [("alice", 12, 2), ("bob", 11, 1), ("carol", 3, 0)]);
        assert_eq!(merged[0].total, 24);
    }
}
