//! Red-team tests: each replays, over the wire, a way a hostile or broken
//! caller got around a promise (issue 19), on the embedded store and on
//! Redis, and fails if the hole reopens. The bound each one holds is
//! stated in docs/security.md, "What one caller cannot do".

mod grants;
mod settle;
mod store;
