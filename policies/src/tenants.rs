//! What may a tenant (the customer behind many keys) spend in all? Limits that count every
//! one of its keys' requests together, on top of each key's own: the same fields as a key's,
//! kept in the tenant's own quota ledger, which every admission of its keys counts in.

use crate::limits::Limits;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// A tenant's limits as an operator set them (`PUT /admin/v1/tenants/{id}`); `None` fields
/// are unlimited.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tenant {
    pub id: String,
    #[serde(default)]
    pub limits: Limits,
}

/// The id of a tenant's quota ledger. Key ids are minted (`key_…`) or `jwt:…`, so no key's
/// ledger can be named like a tenant's.
pub fn ledger_of(tenant: &str) -> String {
    format!("tenant:{tenant}")
}

/// Every tenant with limits, by id: what admission looks a request's tenant up in.
#[derive(Debug, Clone, Default)]
pub struct Tenants {
    limits: HashMap<String, Limits>,
}

impl Tenants {
    pub fn new(all: impl IntoIterator<Item = Tenant>) -> Tenants {
        Tenants {
            limits: all.into_iter().map(|t| (t.id, t.limits)).collect(),
        }
    }

    /// Every tenant with limits set, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Limits)> {
        self.limits.iter()
    }

    /// The tenant's limits (unlimited when none were set).
    pub fn limits(&self, tenant: &str) -> Limits {
        self.limits.get(tenant).cloned().unwrap_or_default()
    }
}
