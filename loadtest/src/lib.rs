//! `sluice-load`: an open-loop load generator for OpenAI-style APIs.
//!
//! Open loop is the default because closed-loop tools hide queueing: when the target stalls,
//! a closed loop stops sending, and the stall never shows in its latencies (coordinated
//! omission). Here every request has a scheduled send time, is sent then whether or not
//! earlier ones have answered, and its latency is counted from that scheduled time.
//! `cache_eval` is the exception: one request at a time, because it measures what the cache
//! answers, not how fast it answers under load.

pub mod cache_eval;
pub mod client;
pub mod report;
pub mod schedule;
pub mod workload;
