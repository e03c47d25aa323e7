//! Operator bans and unbans told to every replica's ban cache at once: the
//! penalty script publishes each change, and every replica keeps one
//! dedicated subscription to hear it (see `ban_cache.rs` for what the
//! cache does with it, and what it does without it).
//!
//! # Channel and message
//! `<prefix>%bans:changed`: one channel per key prefix, so deployments (or
//! tests) that share a Redis under different prefixes do not hear each
//! other. The message is `<scope>\n<identity>\n<operation>` (operation
//! empty for a box per identity): all three are validated text with no
//! control characters, so a newline separates them. `penalty.lua`
//! publishes it in the same script call as the change, so no change is
//! made without its message, and no message goes out for a change that
//! failed. A message this replica cannot read drops every held ban.
//!
//! # Per topology
//! - **Standalone**: one subscription to the server.
//! - **Sentinel**: to the primary the sentinels name, asked again at every
//!   subscription, so after a failover the next one goes to the new
//!   primary. (Sentinel drops the old primary's clients when it demotes
//!   it; and a lost subscription is what the cache is built to survive.)
//! - **Cluster**: the script's `PUBLISH` is broadcast: the node that ran
//!   it forwards it to every node over the cluster bus, so one
//!   subscription to any node hears every change. `SPUBLISH` (Redis 7)
//!   would keep a message on its slot's shard, but then every replica
//!   would need a subscription to each shard that holds a penalty scope,
//!   followed through resharding and failover; bans change at an
//!   operator's pace, and a broadcast of a few dozen bytes per change
//!   costs nothing. The subscription goes to the configured nodes in turn.
//!
//! # Proving it live
//! Once `SUBSCRIBE` is confirmed the feed is live; then a `PING` goes out
//! on the subscription every [`PING_EVERY`], and each answer tells the
//! feed when it was sent (an answer follows every message published
//! before its ping). An answer missing for [`PONG_WITHIN`], an error, or
//! the connection closing (a restart, `CLIENT KILL TYPE pubsub`, a
//! failover) ends the subscription: the feed is lost, and a new one is
//! made after [`RETRY_AFTER`] (the next URL, or the sentinels asked
//! again), waiting twice as long after each attempt that fails, up to
//! [`RETRY_AT_MOST`]. The task ends once the store and its cache are
//! dropped.
//!
//! On Cluster, a ping proves the subscribed node live, not the bus from
//! the node that ran the script: a change published while the bus between
//! the two is cut is not heard. So on Cluster the ban cache holds a ban no
//! longer than without a feed (`ban_cache::MAX_HOLD`, 1 s): a change
//! arrives at once as a rule, and one the bus lost within 1 s, as before
//! the subscription existed.

use std::sync::Weak;
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::PubSub;
use redis::{ConnectionInfo, RedisResult, Value};
use tokio::time::Instant;

use super::topology;
use crate::config::{RedisConfig, RedisMode};
use crate::store::PenaltyKey;
use crate::store::ban_cache::BanFeed;
use crate::store::redis::BuildError;

/// How often the subscription is pinged.
pub(crate) const PING_EVERY: Duration = Duration::from_millis(200);

/// A ping not answered within this ends the subscription.
pub(crate) const PONG_WITHIN: Duration = Duration::from_millis(600);

/// Pause before a new subscription after one ended; doubled after each
/// attempt that made none, up to [`RETRY_AT_MOST`].
pub(crate) const RETRY_AFTER: Duration = Duration::from_millis(100);

/// The longest pause between attempts while Redis cannot be reached.
pub(crate) const RETRY_AT_MOST: Duration = Duration::from_secs(2);

/// The channel the penalty script publishes changes on.
pub(crate) fn channel(prefix: &str) -> String {
    format!("{prefix}%bans:changed")
}

/// The message for a change of `key`'s ban.
pub(crate) fn message(key: &PenaltyKey<'_>) -> String {
    format!(
        "{}\n{}\n{}",
        key.scope,
        key.identity,
        key.operation.unwrap_or_default()
    )
}

/// The parts of a message: scope, identity, operation.
fn parts(message: &[u8]) -> Option<(&str, &str, Option<&str>)> {
    let text = std::str::from_utf8(message).ok()?;
    let mut parts = text.split('\n');
    let (scope, identity, operation) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || scope.is_empty() || identity.is_empty() {
        return None;
    }
    Some((
        scope,
        identity,
        (!operation.is_empty()).then_some(operation),
    ))
}

/// Tells `feed` of the change a message reports.
fn tell(feed: &BanFeed, message: &[u8]) {
    match parts(message) {
        Some((scope, identity, operation)) => feed.changed(Some(&PenaltyKey {
            scope,
            identity,
            operation,
        })),
        None => feed.changed(None),
    }
}

/// Where a subscription connects.
pub(crate) enum Source {
    /// Standalone (one URL) or Cluster (any of its nodes, in turn).
    Nodes(Vec<ConnectionInfo>),
    /// The primary the sentinels name.
    Sentinel(Box<redis::sentinel::SentinelClient>),
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Connection infos carry passwords: name the kind only.
        f.write_str(match self {
            Self::Nodes(_) => "Source::Nodes",
            Self::Sentinel(_) => "Source::Sentinel",
        })
    }
}

impl Source {
    /// The source for `config`'s topology.
    pub(crate) fn of(config: &RedisConfig) -> Result<Self, BuildError> {
        Ok(match config.mode {
            RedisMode::Standalone | RedisMode::Cluster => {
                Self::Nodes(topology::node_infos(config)?)
            }
            RedisMode::Sentinel => Self::Sentinel(Box::new(topology::sentinel_client(config)?)),
        })
    }

    /// A new pub/sub connection; `attempt` picks the node.
    async fn connect(&mut self, attempt: usize) -> RedisResult<PubSub> {
        match self {
            Self::Nodes(infos) => {
                let info = infos.get(attempt % infos.len().max(1)).cloned();
                let info = info.ok_or_else(|| {
                    redis::RedisError::from((redis::ErrorKind::Client, "no Redis URL"))
                })?;
                redis::Client::open(info)?.get_async_pubsub().await
            }
            Self::Sentinel(client) => client.async_get_client().await?.get_async_pubsub().await,
        }
    }
}

/// Keeps `feed` subscribed to `channel` until the feed is dropped.
/// `timeout` bounds each connect and `SUBSCRIBE`.
pub(crate) fn spawn(
    feed: Weak<BanFeed>,
    mut source: Source,
    channel: String,
    timeout: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut attempt = 0usize;
        let mut pause = RETRY_AFTER;
        while feed.strong_count() > 0 {
            let why = match tokio::time::timeout(timeout, source.connect(attempt)).await {
                Ok(Ok(pubsub)) => listen(&feed, pubsub, &channel, timeout).await,
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no connection within {timeout:?}"),
            };
            if let Some(feed) = feed.upgrade() {
                if feed.is_live() {
                    tracing::warn!(error = %why, "lost the ban-change subscription; bans held at most 1 s until it is back");
                    pause = RETRY_AFTER;
                } else {
                    tracing::debug!(error = %why, "no ban-change subscription");
                    pause = (pause * 2).min(RETRY_AT_MOST);
                }
                feed.lost();
            }
            attempt = attempt.wrapping_add(1);
            tokio::time::sleep(pause).await;
        }
    })
}

/// Subscribes on `pubsub` and serves the feed until the subscription ends;
/// returns why it ended.
async fn listen(feed: &Weak<BanFeed>, pubsub: PubSub, channel: &str, timeout: Duration) -> String {
    let (mut sink, mut stream) = pubsub.split();
    let sent = Instant::now();
    match tokio::time::timeout(timeout, sink.subscribe(channel)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return e.to_string(),
        Err(_) => return format!("SUBSCRIBE not confirmed within {timeout:?}"),
    }
    let Some(live) = feed.upgrade() else {
        return "stopped".to_owned();
    };
    live.subscribed(sent);
    drop(live);
    tracing::info!(channel, "subscribed to ban changes");
    let pings = async {
        loop {
            tokio::time::sleep(PING_EVERY).await;
            let sent = Instant::now();
            match tokio::time::timeout(PONG_WITHIN, sink.ping::<Value>()).await {
                Ok(Ok(_)) => match feed.upgrade() {
                    Some(feed) => feed.confirmed(sent),
                    None => return "stopped".to_owned(),
                },
                Ok(Err(e)) => return e.to_string(),
                Err(_) => return format!("PING not answered within {PONG_WITHIN:?}"),
            }
        }
    };
    let messages = async {
        while let Some(msg) = stream.next().await {
            let Some(feed) = feed.upgrade() else {
                return "stopped".to_owned();
            };
            tell(&feed, msg.get_payload_bytes());
        }
        "the connection closed".to_owned()
    };
    tokio::select! {
        why = pings => why,
        why = messages => why,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_names_the_caller_it_was_made_for() {
        let key = PenaltyKey {
            scope: "api",
            identity: "agent 7",
            operation: Some("login"),
        };
        let m = message(&key);
        assert_eq!(parts(m.as_bytes()), Some(("api", "agent 7", Some("login"))));
        let per_identity = PenaltyKey {
            operation: None,
            ..key
        };
        assert_eq!(
            parts(message(&per_identity).as_bytes()),
            Some(("api", "agent 7", None))
        );
        for odd in ["", "api", "api\n", "api\nx\ny\nz", "\nx\n", "a\n\n"] {
            assert_eq!(parts(odd.as_bytes()), None, "{odd:?}");
        }
        assert_eq!(parts(&[0xff, b'\n', b'x', b'\n']), None);
    }
}
