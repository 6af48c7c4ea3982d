//! Helpers shared by the integration tests (`mod common;` in each).
#![allow(dead_code, unreachable_pub)] // Each test binary uses a different part.

pub mod redis;
