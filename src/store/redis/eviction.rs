//! Redis's eviction policy: whether Redis may drop Tollgate's keys.
//!
//! Every key Tollgate writes expires, so any `volatile-*` policy can evict
//! it as well as any `allkeys-*` one. An evicted bucket reads as a full one
//! (it admits a new burst), and an evicted open-reservation record
//! refuses its settle (the estimate stands). Only `noeviction` keeps them: Redis then refuses
//! writes when full (`OOM`), which is a store failure the breaker and each
//! scope's `failure_mode` handle.
//!
//! The policy is read with `INFO memory` (which managed Redis services
//! answer even where `CONFIG` is disabled) at start, on every reconnect,
//! every [`RECHECK_TICKS`] probes, and on every probe while it evicts, so a
//! fix is noticed. What is done about it is `store.redis.on_evicting_policy`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;
use redis::Value;

use crate::config::OnEvictingPolicy;

/// Probes between two reads of the policy while nothing suggests a change
/// (about a minute at the default cool-down of 500 ms).
pub(crate) const RECHECK_TICKS: u32 = 120;

/// The policy last read, and what to do about an evicting one.
#[derive(Debug)]
pub(crate) struct Eviction {
    /// `store.redis.on_evicting_policy`.
    on_evicting: OnEvictingPolicy,
    /// The evicting policy last read; `None` for `noeviction` or unread.
    policy: Mutex<Option<Arc<str>>>,
    /// True until the policy is read, and again after Redis was lost: the
    /// next contact is a (re)connect, which reads it again.
    due: AtomicBool,
}

impl Eviction {
    pub(crate) fn new(on_evicting: OnEvictingPolicy) -> Self {
        Self {
            on_evicting,
            policy: Mutex::new(None),
            due: AtomicBool::new(true),
        }
    }

    /// True when the policy should be read at the next contact.
    pub(crate) fn due(&self) -> bool {
        self.due.load(Ordering::Relaxed) || self.policy.lock().is_some()
    }

    /// Redis was lost: read the policy again when it is back.
    pub(crate) fn reconnecting(&self) {
        self.due.store(true, Ordering::Relaxed);
    }

    /// True under `on_evicting_policy: refuse`.
    pub(crate) fn refuses(&self) -> bool {
        self.on_evicting == OnEvictingPolicy::Refuse
    }

    /// The evicting policy last read, if any.
    pub(crate) fn policy(&self) -> Option<Arc<str>> {
        self.policy.lock().clone()
    }

    /// Records the policy `INFO memory` answered (on Cluster, the nodes'
    /// answers: any evicting one counts). Logs an evicting policy loudly
    /// at start and on each reconnect, and a change either way. Returns
    /// why the policy is unsafe, if it is.
    pub(crate) fn read(&self, info: &Value) -> Option<String> {
        let reconnect = self.due.swap(false, Ordering::Relaxed);
        let mut policies = Vec::new();
        policies_in(info, &mut policies);
        let evicting = policies.into_iter().find(|p| can_evict(p));
        let why = evicting.as_deref().map(|policy| {
            format!(
                "Redis's maxmemory-policy is {policy}, which can evict Tollgate's keys \
                 (an evicted bucket admits a new burst, an evicted open reservation \
                 cannot be settled); set it to noeviction, or accept the risk with \
                 store.redis.on_evicting_policy: warn"
            )
        });
        let now: Option<Arc<str>> = evicting.map(Arc::from);
        let before = std::mem::replace(&mut *self.policy.lock(), now.clone());
        let changed = before != now;
        if let Some(why) = &why
            && (reconnect || changed)
        {
            if self.refuses() {
                tracing::error!(
                    "{why}; this replica reports not ready until the policy is noeviction"
                );
            } else {
                tracing::error!("{why}; serving anyway (on_evicting_policy: warn)");
            }
        } else if why.is_none() && before.is_some() {
            tracing::info!("Redis's maxmemory-policy no longer evicts Tollgate's keys");
        }
        why
    }
}

/// True for every policy but `noeviction`: all keys Tollgate writes expire,
/// so `volatile-*` policies reach them as well as `allkeys-*` ones.
fn can_evict(policy: &str) -> bool {
    policy != "noeviction"
}

/// Collects every `maxmemory_policy:` value in an `INFO` reply: one text, or
/// (Cluster) a text per node.
fn policies_in(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::BulkString(bytes) => lines_of(&String::from_utf8_lossy(bytes), out),
        Value::SimpleString(text) => lines_of(text, out),
        Value::VerbatimString { text, .. } => lines_of(text, out),
        Value::Array(items) | Value::Set(items) => {
            items.iter().for_each(|v| policies_in(v, out));
        }
        Value::Map(pairs) => pairs.iter().for_each(|(_, v)| policies_in(v, out)),
        _ => {}
    }
}

fn lines_of(text: &str, out: &mut Vec<String>) {
    out.extend(
        text.lines()
            .filter_map(|l| l.trim().strip_prefix("maxmemory_policy:"))
            .map(|p| p.trim().to_owned()),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(policy: &str) -> Value {
        Value::BulkString(
            format!("# Memory\r\nused_memory:1\r\nmaxmemory_policy:{policy}\r\n").into_bytes(),
        )
    }

    #[test]
    fn only_noeviction_keeps_every_key() {
        let e = Eviction::new(OnEvictingPolicy::Refuse);
        assert!(e.read(&info("noeviction")).is_none());
        assert!(!e.due());
        for p in [
            "volatile-lru",
            "volatile-ttl",
            "allkeys-lfu",
            "allkeys-random",
        ] {
            let why = e.read(&info(p)).expect(p);
            assert!(why.contains(p), "{why}");
            assert_eq!(e.policy().as_deref(), Some(p));
        }
        assert!(e.read(&info("noeviction")).is_none());
        assert_eq!(e.policy(), None);
    }

    #[test]
    fn any_cluster_node_that_evicts_counts() {
        let e = Eviction::new(OnEvictingPolicy::Warn);
        let nodes = Value::Map(vec![
            (Value::SimpleString("a".into()), info("noeviction")),
            (Value::SimpleString("b".into()), info("allkeys-lru")),
        ]);
        assert!(e.read(&nodes).is_some());
    }
}
