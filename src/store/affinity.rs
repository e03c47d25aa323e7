//! Which core's runtime the calling thread serves, when the server runs one
//! single-threaded runtime per core (`grpc.cores`).
//!
//! The Redis store reads it to keep a decision on its core: each core gets
//! its own coalescer queue (so the task that drains it runs on that core's
//! runtime) and its own lane (so the connection's driver task was spawned
//! there). On the shared multi-threaded runtime no thread is pinned, and
//! both are shared as before.

use std::cell::Cell;

thread_local! {
    static CORE: Cell<Option<u16>> = const { Cell::new(None) };
}

/// Marks the calling thread as serving core `core` for as long as it lives.
pub fn pin(core: u16) {
    CORE.with(|c| c.set(Some(core)));
}

/// The core the calling thread serves, if it was pinned.
pub fn current() -> Option<u16> {
    CORE.with(Cell::get)
}
