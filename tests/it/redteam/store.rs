//! The store as a shared resource: clock skew, a full embedded store, cache memory.
