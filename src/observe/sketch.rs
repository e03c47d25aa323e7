//! Space-saving (Metwally, Agrawal, El Abbadi, 2005): the heaviest keys of a
//! stream in a fixed number of counters, with a per-key error bound.
//!
//! A summary of `m` counters over a stream of `N` records keeps, for every
//! key it holds, a `count` and an `error` such that
//!
//! - `count - error <= true count <= count`, and
//! - `error <= min <= N / m`, where `min` is the smallest count held once
//!   all `m` counters are in use (0 before);
//! - a key it does not hold was seen at most `min` times, so every key seen
//!   more than `N / m` times is held.
//!
//! [`merge`] adds up summaries of disjoint parts of a stream (the slots of a
//! sliding window) and keeps the same guarantees for the whole: each key's
//! error is at most the sum of the parts' `min`, which is at most `N / m`.
//!
//! Memory is bounded by `m`: [`SpaceSaving::memory_bytes`] is at most
//! [`max_memory_bytes`]`(m, longest key)` = `m × (ENTRY_BYTES + longest
//! key) + 64`, whatever the stream (a property test holds it to that). It
//! grows with the keys seen, so an idle summary costs almost nothing.

use std::collections::HashMap;

use hashbrown::HashTable;

/// Bytes per counter, besides the key's own bytes: the entry (key handle,
/// hash, count, error, heap position), its heap slot, and its share of the
/// index: 5 bytes per table slot, and a table at most 4.4 slots per key
/// (at most 7/8 full, a power of two, and doubled once when replaced keys'
/// tombstones fill it), so under 24 bytes.
pub const ENTRY_BYTES: usize = std::mem::size_of::<Entry>() + 4 + 24;

/// The most heap a summary of `counters` counters holds, when no key is
/// longer than `longest_key` bytes.
pub const fn max_memory_bytes(counters: usize, longest_key: usize) -> usize {
    counters * (ENTRY_BYTES + longest_key) + 64
}

#[derive(Debug)]
struct Entry {
    key: String,
    hash: u64,
    count: u64,
    error: u64,
    /// Where this entry sits in [`SpaceSaving::heap`].
    pos: u32,
}

/// One space-saving summary of `capacity` counters.
///
/// Counters sit in a min-heap by count, so the smallest is replaced in
/// `O(log m)`, and in a hash index by key. Keys' buffers are reused when a
/// counter changes hands: once warm, recording allocates only for a key
/// longer than the one it replaces.
#[derive(Debug)]
pub struct SpaceSaving {
    capacity: usize,
    entries: Vec<Entry>,
    /// Indices into `entries`, a binary min-heap by `count`.
    heap: Vec<u32>,
    /// Indices into `entries`, by the key's hash.
    index: HashTable<u32>,
    /// Records seen: the `N` of the bounds.
    total: u64,
}

/// One key of a summary, or of a merge of several.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Counted {
    /// The key (an identity).
    #[serde(rename = "identity")]
    pub key: String,
    /// An upper bound of its true count.
    pub count: u64,
    /// How much `count` may exceed the true count.
    pub error: u64,
}

impl SpaceSaving {
    /// An empty summary of `capacity` counters (at least 1).
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            entries: Vec::new(),
            heap: Vec::new(),
            index: HashTable::new(),
            total: 0,
        }
    }

    /// Records one occurrence of `key`, whose hash is `hash`.
    pub fn record(&mut self, key: &str, hash: u64) {
        self.total += 1;
        let entries = &self.entries;
        if let Some(&i) = self.index.find(hash, |&i| entries[i as usize].key == key) {
            let e = &mut self.entries[i as usize];
            e.count += 1;
            let pos = e.pos as usize;
            self.sift_down(pos);
        } else if self.entries.len() < self.capacity {
            let i = self.entries.len() as u32;
            if self.entries.len() == self.entries.capacity() {
                // Grow by doubling, but never past `capacity`.
                let more = self
                    .entries
                    .len()
                    .max(4)
                    .min(self.capacity - self.entries.len());
                self.entries.reserve_exact(more);
                self.heap.reserve_exact(more);
            }
            self.entries.push(Entry {
                key: key.to_owned(),
                hash,
                count: 1,
                error: 0,
                pos: i,
            });
            self.heap.push(i);
            self.insert_index(i);
            // Every count is at least 1, so a new 1 belongs at the top.
            self.sift_up(i as usize);
        } else {
            self.replace_min(key, hash);
        }
    }

    /// The smallest counter takes over `key`: its count becomes the new
    /// key's error, since the new key may have been among those it counted.
    fn replace_min(&mut self, key: &str, hash: u64) {
        let i = self.heap[0];
        let old = self.entries[i as usize].hash;
        if let Ok(slot) = self.index.find_entry(old, |&j| j == i) {
            slot.remove();
        }
        let e = &mut self.entries[i as usize];
        e.key.clear();
        // Exact, so a key buffer never holds more than the longest key.
        e.key.reserve_exact(key.len());
        e.key.push_str(key);
        e.hash = hash;
        e.error = e.count;
        e.count += 1;
        self.insert_index(i);
        self.sift_down(0);
    }

    fn insert_index(&mut self, i: u32) {
        let entries = &self.entries;
        self.index
            .insert_unique(entries[i as usize].hash, i, |&j| entries[j as usize].hash);
    }

    fn count_at(&self, pos: usize) -> u64 {
        self.entries[self.heap[pos] as usize].count
    }

    fn swap(&mut self, a: usize, b: usize) {
        self.heap.swap(a, b);
        self.entries[self.heap[a] as usize].pos = a as u32;
        self.entries[self.heap[b] as usize].pos = b as u32;
    }

    fn sift_up(&mut self, mut pos: usize) {
        while pos > 0 {
            let parent = (pos - 1) / 2;
            if self.count_at(parent) <= self.count_at(pos) {
                break;
            }
            self.swap(parent, pos);
            pos = parent;
        }
    }

    fn sift_down(&mut self, mut pos: usize) {
        let n = self.heap.len();
        loop {
            let (l, r) = (2 * pos + 1, 2 * pos + 2);
            let mut least = pos;
            if l < n && self.count_at(l) < self.count_at(least) {
                least = l;
            }
            if r < n && self.count_at(r) < self.count_at(least) {
                least = r;
            }
            if least == pos {
                return;
            }
            self.swap(pos, least);
            pos = least;
        }
    }

    /// Records seen since the last [`SpaceSaving::clear`].
    pub fn total(&self) -> u64 {
        self.total
    }

    /// The most a key not held can have been seen: the smallest count once
    /// every counter is in use, else 0 (every key seen is held).
    pub fn min(&self) -> u64 {
        if self.entries.len() < self.capacity {
            0
        } else {
            self.heap
                .first()
                .map_or(0, |&i| self.entries[i as usize].count)
        }
    }

    /// Every key held, with its count and error, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, u64, u64)> {
        self.entries.iter().map(|e| (&*e.key, e.count, e.error))
    }

    /// Forgets everything, keeping the allocations.
    pub fn clear(&mut self) {
        self.entries.clear();
        self.heap.clear();
        self.index.clear();
        self.total = 0;
    }

    /// Heap bytes held, keys included.
    pub fn memory_bytes(&self) -> usize {
        self.entries.capacity() * std::mem::size_of::<Entry>()
            + self.entries.iter().map(|e| e.key.capacity()).sum::<usize>()
            + self.heap.capacity() * 4
            + self.index.allocation_size()
    }
}

/// The result of merging summaries of disjoint parts of one stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Merged {
    /// Every key held by any part, heaviest first (ties by key).
    pub keys: Vec<Counted>,
    /// Records in all parts: `N`.
    pub total: u64,
    /// The sum of the parts' [`SpaceSaving::min`]: no key's error exceeds
    /// it, and a key not listed was seen at most this many times.
    pub error_bound: u64,
}

/// Merges summaries of disjoint parts of a stream. A key missing from a
/// part may still have been seen there up to that part's `min` times, so it
/// is counted as that (an upper bound) with the same added to its error.
pub fn merge<'a>(parts: impl IntoIterator<Item = &'a SpaceSaving>) -> Merged {
    let mut sums: HashMap<&str, (u64, u64, u64)> = HashMap::new();
    let (mut total, mut error_bound) = (0, 0);
    for part in parts {
        total += part.total();
        let min = part.min();
        error_bound += min;
        for (key, count, error) in part.iter() {
            let s = sums.entry(key).or_default();
            s.0 += count;
            s.1 += error;
            // The mins of the parts that held it, subtracted below.
            s.2 += min;
        }
    }
    let mut keys: Vec<Counted> = sums
        .into_iter()
        .map(|(key, (count, error, held_min))| Counted {
            key: key.to_owned(),
            count: count + (error_bound - held_min),
            error: error + (error_bound - held_min),
        })
        .collect();
    keys.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.key.cmp(&b.key)));
    Merged {
        keys,
        total,
        error_bound,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record_all(s: &mut SpaceSaving, keys: &[&str]) {
        for k in keys {
            s.record(k, k.len() as u64);
        }
    }

    #[test]
    fn exact_until_the_counters_run_out() {
        let mut s = SpaceSaving::new(4);
        record_all(&mut s, &["a", "bb", "a", "ccc", "a"]);
        let m = merge([&s]);
        assert_eq!(m.error_bound, 0);
        assert_eq!(
            m.keys[0],
            Counted {
                key: "a".into(),
                count: 3,
                error: 0
            }
        );
        assert_eq!(m.keys.len(), 3);
    }

    #[test]
    fn a_new_key_takes_the_smallest_counter_and_its_count_as_error() {
        let mut s = SpaceSaving::new(2);
        record_all(&mut s, &["a", "a", "b", "c"]);
        let m = merge([&s]);
        assert_eq!(
            m.keys,
            vec![
                Counted {
                    key: "a".into(),
                    count: 2,
                    error: 0
                },
                Counted {
                    key: "c".into(),
                    count: 2,
                    error: 1
                },
            ]
        );
        assert_eq!(s.min(), 2);
    }
}
