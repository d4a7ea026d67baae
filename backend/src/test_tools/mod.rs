//! Does a device compute what the CPU does, and how fast? Tools for the backend's own tests,
//! examples and GPU check, never used by the server: [`device_check`] runs every operation of
//! a device against a reference device, [`speed`] times a decoder's prefill and decode,
//! [`requests`] builds what tests and examples ask the scheduler for.
//!
//! Compiled only with the `test-tools` feature, which the backend's own dev-dependency on
//! itself turns on for its tests and examples (see `backend/Cargo.toml`), so they stay out of
//! the production library's public API.

pub mod device_check;
pub mod requests;
pub mod speed;
