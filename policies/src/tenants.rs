//! What may a tenant (the customer behind many keys) spend in all? Limits that count every
//! one of its keys' requests together, on top of each key's own: the same fields as a key's,
//! kept in the tenant's own quota ledger, which every admission of its keys counts in.

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
}

/// The id of a tenant's quota ledger. Key ids are minted (`key_…`) or `jwt:…`, so no key's
/// ledger can be named like a tenant's.
pub fn ledger_of(tenant: &str) -> String {
    format!("tenant:{tenant}")
}

/// Every tenant with limits, by id: what admission looks a request's tenant up in.
#[derive(Debug, Clone, Default)]
pub struct Tenants {
    by_id: HashMap<String, (Limits, Arc<ModelLimits>)>,
}

impl Tenants {
    pub fn new(all: impl IntoIterator<Item = Tenant>) -> Tenants {
        Tenants {
            by_id: all
                .into_iter()
                .map(|t| (t.id, (t.limits, Arc::new(t.model_limits))))
                .collect(),
        }
    }

    /// Every tenant with limits set, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = Tenant> + '_ {
        self.by_id.iter().map(|(id, (limits, models))| Tenant {
            id: id.clone(),
            limits: limits.clone(),
            model_limits: (**models).clone(),
        })
    }

    /// The tenant's limits (unlimited when none were set).
    pub fn limits(&self, tenant: &str) -> Limits {
        self.by_id
            .get(tenant)
            .map(|(limits, _)| limits.clone())
            .unwrap_or_default()
    }

    /// The tenant's per-model limits (none when none were set).
    pub fn model_limits(&self, tenant: &str) -> Arc<ModelLimits> {
        self.by_id
            .get(tenant)
            .map(|(_, models)| models.clone())
            .unwrap_or_default()
    }
}
