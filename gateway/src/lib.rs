//! Sluice's gateway: an OpenAI-compatible proxy on pingora, with its admin API.

pub mod admin;
pub mod admission;
pub mod alerts;
pub mod app;
pub mod auth;
pub mod balancer;
pub mod billing;
pub mod cache;
pub mod clock;
pub mod config;
pub mod connections;
pub mod datasets;
pub mod error;
pub mod keys;
pub mod ledger;
pub mod metering;
pub mod metrics;
pub mod outcome;
pub mod overload;
pub mod proxy;
pub mod request;
pub mod server;
pub mod store;
pub mod traces;
pub mod upstream;
pub mod usage;
