//! What may a tenant (the customer behind many keys) spend in all? Limits that count every
//! one of its keys' requests together, on top of each key's own: the same fields as a key's,
//! kept in the tenant's own quota ledger, which every admission of its keys counts in.

use crate::distillation::Distillation;
use crate::limits::{Limits, ModelLimits};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;

/// A tenant's limits as an operator set them (`PUT /admin/v1/tenants/{id}`); `None` fields
/// are unlimited.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tenant {
    pub id: String,
    #[serde(default)]
    pub limits: Limits,
    /// Limits for single models, for all of the tenant's keys together.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub model_limits: ModelLimits,
    /// The tenant's opt-in to capture for distillation (none: nothing is kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distillation: Option<Distillation>,
}

/// The id of a tenant's quota ledger. Key ids are minted (`key_…`) or `jwt:…`, so no key's
/// ledger can be named like a tenant's.
pub fn ledger_of(tenant: &str) -> String {
    format!("tenant:{tenant}")
}

/// What admission and capture read of one tenant, shared by every identity of its keys.
#[derive(Debug, Clone, Default)]
struct Entry {
    limits: Limits,
    model_limits: Arc<ModelLimits>,
    distillation: Option<Distillation>,
}

/// Every tenant that was set, by id: what admission looks a request's tenant up in.
#[derive(Debug, Clone, Default)]
pub struct Tenants {
    by_id: HashMap<String, Entry>,
}

impl Tenants {
    pub fn new(all: impl IntoIterator<Item = Tenant>) -> Tenants {
        Tenants {
            by_id: all
                .into_iter()
                .map(|t| {
                    let entry = Entry {
                        limits: t.limits,
                        model_limits: Arc::new(t.model_limits),
                        distillation: t.distillation,
                    };
                    (t.id, entry)
                })
                .collect(),
        }
    }

    /// Every tenant that was set, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = Tenant> + '_ {
        self.by_id.keys().map(|id| self.get(id))
    }

    /// The tenant as set (unlimited, and not opted in to anything, when it never was).
    pub fn get(&self, tenant: &str) -> Tenant {
        let entry = self.by_id.get(tenant).cloned().unwrap_or_default();
        Tenant {
            id: tenant.to_owned(),
            limits: entry.limits,
            model_limits: (*entry.model_limits).clone(),
            distillation: entry.distillation,
        }
    }

    /// The tenant's limits (unlimited when none were set).
    pub fn limits(&self, tenant: &str) -> Limits {
        self.by_id
            .get(tenant)
            .map(|e| e.limits.clone())
            .unwrap_or_default()
    }

    /// The tenant's per-model limits (none when none were set).
    pub fn model_limits(&self, tenant: &str) -> Arc<ModelLimits> {
        self.by_id
            .get(tenant)
            .map(|e| e.model_limits.clone())
            .unwrap_or_default()
    }

    /// The tenant's opt-in to capture for distillation, if it gave one.
    pub fn distillation(&self, tenant: &str) -> Option<&Distillation> {
        self.by_id.get(tenant).and_then(|e| e.distillation.as_ref())
    }
}
