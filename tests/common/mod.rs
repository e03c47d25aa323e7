//! Shared test fixtures: real processes, started and stopped by the tests.
#![allow(dead_code, unreachable_pub)]

pub mod redis;
