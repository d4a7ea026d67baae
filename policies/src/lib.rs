//! Sluice's policy logic, kept pure: no I/O, no async, no clocks read here. Everything in this
//! crate is a function of its arguments, so it can be unit- and property-tested in isolation
//! and shared by every store and replica without drift.

pub mod alerts;
pub mod cache;
pub mod distillation;
pub mod ledger;
pub mod limits;
pub mod model_access;
pub mod money;
pub mod pricing;
pub mod quota;
pub mod same_question;
pub mod tenants;
pub mod tiers;

pub use distillation::Distillation;
pub use limits::{LimitOverrides, Limits, ModelLimits};
pub use model_access::{ModelAccess, ModelLists};
pub use money::Money;
pub use pricing::{
    Band, ModelPrice, PriceBook, PriceEntry, PriceSchedule, PricingError, TokenCounts,
};
pub use tenants::{Tenant, Tenants};
pub use tiers::{FailMode, RequestCaps, Tier, TierError, Tiers};
