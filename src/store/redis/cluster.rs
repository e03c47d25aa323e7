//! Script calls on Redis Cluster, one command at a time, with redirections
//! followed here rather than by the client library.
//!
//! The library's cluster connection retries a whole request when a reply
//! asks for it (`MOVED`, `ASK`, `TRYAGAIN`) and resends after a dropped
//! connection, possibly after the script ran. During a slot migration that
//! could judge a charge twice: denied on the source, then allowed on the
//! target against an empty key. So the client's retries are off
//! (`topology.rs`), each script call (one coalesced batch, all in one slot)
//! is its own command, never a pipeline (a pipeline's one error would hide
//! which of its calls ran), and only replies that prove the script did not
//! run are followed:
//!
//! - `MOVED host:port`: sent again to that node (the client also refreshes
//!   its slot map);
//! - `ASK host:port`: sent to that node after `ASKING`, once;
//! - `TRYAGAIN` (a migration in progress split the keys): sent again after
//!   a short pause (a batch is split into its charges instead, by the
//!   caller);
//! - `NOSCRIPT`: `SCRIPT LOAD` on the node that said it, then sent again.
//!
//! Anything else — a timeout, a dropped connection — fails the batch's
//! charges and is never resent: the script may have run.

use std::time::Duration;

use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::{Cmd, ErrorKind, RedisError, ServerErrorKind, Value};

use super::script;
use super::topology::{CallError, Topology};

/// Redirections followed for one call before it fails.
const MAX_HOPS: usize = 5;

/// Pause before resending after `TRYAGAIN`.
const TRY_AGAIN_AFTER: Duration = Duration::from_millis(20);

/// Where the next send of a call goes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    /// The slot's primary, by the client's slot map.
    Slot,
    /// A node named by `MOVED`.
    Moved(String, u16),
    /// A node named by `ASK`: send `ASKING` first.
    Ask(String, u16),
}

/// What to do with `TRYAGAIN`, which proves the script did not run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TryAgain {
    /// Send again after a short pause: the migration may finish.
    Wait,
    /// Return it: the caller splits the call (a batch whose keys a
    /// migration split between two nodes would get it until the end).
    Return,
}

/// Runs the script command `cmd`, whose keys are in `slot`, on the node
/// that owns the slot. Returns the script's reply.
pub(crate) async fn eval(
    topology: &Topology,
    cmd: &Cmd,
    slot: u16,
    timeout: Duration,
    try_again: TryAgain,
) -> Result<Vec<i64>, CallError> {
    eval_source(topology, cmd, script::SOURCE, slot, timeout, try_again).await
}

/// [`eval`] of the script whose source is `source` (the lease script's
/// calls come here too): a `NOSCRIPT` loads that source.
pub(crate) async fn eval_source(
    topology: &Topology,
    cmd: &Cmd,
    source: &str,
    slot: u16,
    timeout: Duration,
    try_again: TryAgain,
) -> Result<Vec<i64>, CallError> {
    let mut target = Target::Slot;
    let mut loaded = false;
    for _ in 0..MAX_HOPS {
        let error = match send(topology, cmd, &target, timeout).await {
            Ok(ints) => return Ok(ints),
            Err(CallError::Redis(e)) => e,
            Err(other) => return Err(other),
        };
        match error.kind() {
            ErrorKind::Server(ServerErrorKind::Moved) => match node(&error) {
                Some((host, port)) => target = Target::Moved(host, port),
                None => return Err(CallError::Redis(error)),
            },
            ErrorKind::Server(ServerErrorKind::Ask) => match node(&error) {
                Some((host, port)) => target = Target::Ask(host, port),
                None => return Err(CallError::Redis(error)),
            },
            ErrorKind::Server(ServerErrorKind::TryAgain) if try_again == TryAgain::Wait => {
                tokio::time::sleep(TRY_AGAIN_AFTER).await;
            }
            ErrorKind::Server(ServerErrorKind::NoScript) if !loaded => {
                load(topology, source, &target, slot, timeout).await?;
                loaded = true;
            }
            _ => return Err(CallError::Redis(error)),
        }
    }
    Err(CallError::Redis(RedisError::from((
        ErrorKind::Server(ServerErrorKind::TryAgain),
        "too many Cluster redirections; the script did not run",
    ))))
}

/// The node a `MOVED` or `ASK` error names.
fn node(error: &RedisError) -> Option<(String, u16)> {
    let (addr, _slot) = error.redirect_node()?;
    let (host, port) = addr.rsplit_once(':')?;
    Some((host.to_owned(), port.parse().ok()?))
}

fn routing(target: &Target, slot: u16) -> SingleNodeRoutingInfo {
    match target {
        Target::Slot => SingleNodeRoutingInfo::SpecificNode(Route::new(slot, SlotAddr::Master)),
        Target::Moved(host, port) | Target::Ask(host, port) => SingleNodeRoutingInfo::ByAddress {
            host: host.clone(),
            port: *port,
        },
    }
}

/// One send of `cmd` to `target`.
async fn send(
    topology: &Topology,
    cmd: &Cmd,
    target: &Target,
    timeout: Duration,
) -> Result<Vec<i64>, CallError> {
    let sent = topology
        .with_cluster(timeout, |mut conn| async move {
            let reply = match target {
                Target::Slot => cmd.query_async::<Value>(&mut conn).await?,
                Target::Moved(..) => {
                    let to = RoutingInfo::SingleNode(routing(target, 0));
                    conn.route_command(cmd.clone(), to).await?
                }
                Target::Ask(..) => {
                    let mut pipe = redis::pipe();
                    pipe.cmd("ASKING").add_command(cmd.clone());
                    // Skip ASKING's reply; keep the script's.
                    let mut replies = conn.route_pipeline(pipe, 1, 1, routing(target, 0)).await?;
                    replies.pop().unwrap_or(Value::Nil)
                }
            };
            let reply = reply.extract_error()?;
            Ok(redis::from_redis_value::<Vec<i64>>(reply)?)
        })
        .await;
    sent.unwrap_or_else(|| Err(CallError::Redis(not_cluster())))
}

/// Loads the script on the node that refused it.
async fn load(
    topology: &Topology,
    source: &str,
    target: &Target,
    slot: u16,
    timeout: Duration,
) -> Result<(), CallError> {
    let mut load = redis::cmd("SCRIPT");
    load.arg("LOAD").arg(source);
    let to = RoutingInfo::SingleNode(routing(target, slot));
    let loaded = topology
        .with_cluster(timeout, |mut conn| async move {
            conn.route_command(load, to)
                .await?
                .extract_error()
                .map(|_| ())
        })
        .await;
    loaded.unwrap_or_else(|| Err(CallError::Redis(not_cluster())))
}

fn not_cluster() -> RedisError {
    RedisError::from((ErrorKind::Client, "a Cluster call on a non-Cluster store"))
}
