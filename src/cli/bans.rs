//! `tollgate ban`, `unban` and `bans`: the penalty box from the command
//! line, as clients of `tollgate.v1.Admin`.
//!
//! Bans live in the store, so any replica answers for all of them; `bans`
//! asks every `--addr` given and shows the union, naming a replica that
//! did not answer.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use clap::Args;
use tollgate::pb::tollgate::v1 as pb;

use super::admin::authed;

/// Who a ban or unban is about, and where to send it.
#[derive(Debug, Args)]
pub(crate) struct Target {
    /// The server, e.g. http://127.0.0.1:50051.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    addr: String,
    /// A scope with a penalty box.
    #[arg(long)]
    scope: String,
    /// The caller.
    #[arg(long)]
    identity: String,
    /// The operation, for a scope that bans per identity and operation.
    #[arg(long, default_value = "")]
    operation: String,
    /// Why, for the audit line.
    #[arg(long, default_value = "")]
    reason: String,
    /// A bearer token of a caller granted `admin`, for a server with
    /// `callers:`.
    #[arg(long)]
    token: Option<String>,
}

/// The `ban` subcommand's flags.
#[derive(Debug, Args)]
pub(crate) struct BanArgs {
    #[command(flatten)]
    target: Target,
    /// How long, e.g. `10m` or `24h`.
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Duration,
}

/// The `bans` subcommand's flags.
#[derive(Debug, Args)]
pub(crate) struct BansArgs {
    /// A replica's address; repeat for several.
    #[arg(long = "addr", default_value = "http://127.0.0.1:50051")]
    addrs: Vec<String>,
    /// The scope whose bans to list.
    #[arg(long)]
    scope: String,
    /// A bearer token of a caller granted `admin`.
    #[arg(long)]
    token: Option<String>,
}

/// Bans a caller and says until when.
pub(crate) async fn ban(args: BanArgs) -> anyhow::Result<String> {
    let t = args.target;
    let mut client = pb::admin_client::AdminClient::connect(t.addr).await?;
    let request = pb::BanRequest {
        scope: t.scope.clone(),
        identity: t.identity.clone(),
        operation: t.operation,
        duration: Some(prost_types::Duration {
            seconds: i64::try_from(args.duration.as_secs())?,
            nanos: i32::try_from(args.duration.subsec_nanos())?,
        }),
        reason: t.reason,
    };
    let answer = client
        .ban(authed(t.token.as_deref(), request)?)
        .await?
        .into_inner();
    let left = answer.remaining.as_ref().map_or_else(String::new, secs);
    Ok(format!(
        "BANNED scope={} identity={} for {left} (until {})\n",
        t.scope,
        t.identity,
        when(answer.until_unix_micros)
    ))
}

/// Lifts a caller's ban.
pub(crate) async fn unban(args: Target) -> anyhow::Result<String> {
    let mut client = pb::admin_client::AdminClient::connect(args.addr).await?;
    let request = pb::UnbanRequest {
        scope: args.scope.clone(),
        identity: args.identity.clone(),
        operation: args.operation,
        reason: args.reason,
    };
    let answer = client
        .unban(authed(args.token.as_deref(), request)?)
        .await?
        .into_inner();
    let was = if answer.was_banned {
        "was banned"
    } else {
        "was not banned"
    };
    Ok(format!(
        "UNBANNED scope={} identity={} ({was}; its history is cleared)\n",
        args.scope, args.identity
    ))
}

/// Every ban of a scope, from every replica given, merged.
pub(crate) async fn bans(args: BansArgs) -> anyhow::Result<String> {
    let mut merged: BTreeMap<(String, String), pb::BannedCaller> = BTreeMap::new();
    let mut out = String::new();
    let mut answered = 0;
    for addr in &args.addrs {
        match list_all(addr, &args.scope, args.token.as_deref()).await {
            Ok(bans) => {
                answered += 1;
                for b in bans {
                    merged.insert((b.identity.clone(), b.operation.clone()), b);
                }
            }
            Err(e) => {
                let _ = writeln!(out, "! {addr}: {e}");
            }
        }
    }
    if answered == 0 {
        anyhow::bail!("no replica answered\n{out}");
    }
    let _ = writeln!(out, "{} ban(s) in scope {}", merged.len(), args.scope);
    let mut rows: Vec<&pb::BannedCaller> = merged.values().collect();
    rows.sort_by_key(|b| b.until_unix_micros);
    for b in rows {
        let op = if b.operation.is_empty() {
            String::new()
        } else {
            format!(" operation={}", b.operation)
        };
        let left = b.remaining.as_ref().map_or_else(String::new, secs);
        let why = if b.reason.is_empty() {
            String::new()
        } else {
            format!("  reason: {}", b.reason)
        };
        let _ = writeln!(
            out,
            "  {}{op}  {left} left, until {}{why}",
            b.identity,
            when(b.until_unix_micros)
        );
    }
    Ok(out)
}

/// Every page of one replica's answer.
async fn list_all(
    addr: &str,
    scope: &str,
    token: Option<&str>,
) -> anyhow::Result<Vec<pb::BannedCaller>> {
    let mut client = pb::admin_client::AdminClient::connect(addr.to_owned()).await?;
    let mut all = Vec::new();
    let mut page_token = String::new();
    loop {
        let request = pb::ListBansRequest {
            scope: scope.to_owned(),
            page_size: 0,
            page_token,
        };
        let page = client
            .list_bans(authed(token, request)?)
            .await?
            .into_inner();
        all.extend(page.bans);
        if page.next_page_token.is_empty() {
            return Ok(all);
        }
        page_token = page.next_page_token;
    }
}

fn secs(d: &prost_types::Duration) -> String {
    format!("{}.{:03}s", d.seconds, d.nanos / 1_000_000)
}

/// A store-clock instant as RFC 3339 UTC.
fn when(unix_micros: i64) -> String {
    jiff::Timestamp::from_microsecond(unix_micros).map_or_else(
        |_| unix_micros.to_string(),
        |t| {
            t.round(jiff::Unit::Second)
                .map_or_else(|_| t.to_string(), |t| t.to_string())
        },
    )
}
