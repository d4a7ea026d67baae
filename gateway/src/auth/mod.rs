//! Who is this? Turns an `Authorization` header into an [`Identity`], or a 401.
//!
//! `Bearer sk-...` is an API key, looked up by the SHA-256 of the secret in a local cache in
//! front of the store; `Bearer eyJ...` is a JWT. The secret itself is never stored, logged or
//! kept past this call.

mod jwks;
mod jwt;
mod key_cache;
mod verifying_key;

pub use jwks::Jwks;
pub use jwt::{JwtError, JwtVerifier, VerifiedToken};
pub use key_cache::{KeyCache, EPOCH_POLL};

use crate::error::ApiError;
use crate::keys::{KeyHash, KeyRecord};
use crate::store::Store;
use sluice_policies::ledger::{self, Scope};
use sluice_policies::quota::LimitScope;
use sluice_policies::{
    tenants, Distillation, Limits, ModelAccess, ModelLimits, ModelLists, Tenants, Tiers,
};
use std::sync::Arc;

/// What a JWT's tenant (and subject) is prefixed with, so that tenants named by tokens and
/// tenants of API keys never share quotas, cache entries or billing rows.
pub const JWT_TENANT_PREFIX: &str = "jwt:";

/// The caller of a request, as far as policy cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The API key's id, or `jwt:<subject>` for a token.
    pub key_id: String,
    /// The key's tenant, or `jwt:<tenant claim, else subject>` for a token.
    pub tenant: String,
    pub tier: String,
    pub limits: Limits,
    /// The key allows the response cache (tokens always do; their tier's rules decide).
    pub cache: bool,
    /// Which models the caller may name.
    pub models: ModelAccess,
    /// Its tenant's limits, which count every key of the tenant together (unlimited when
    /// the operator set none).
    pub tenant_limits: Limits,
    /// The quota ledgers its requests count in: its key's, then its tenant's (see
    /// [`quota_ledgers`]).
    pub ledgers: Ledgers,
    /// Limits for single models (its tier's, with its key's over them), and its tenant's:
    /// each counted in a ledger of its own (`ledger::model_ledger`).
    pub model_limits: Arc<ModelLimits>,
    pub tenant_model_limits: Arc<ModelLimits>,
    /// Its key's (else its tenant's) opt-in to capture for distillation; `None`: nothing
    /// of its is kept.
    pub distillation: Option<Arc<Distillation>>,
}

/// Whose limit: the key's or the tenant's, for every model or for one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LimitOwner<'a> {
    pub scope: LimitScope,
    pub model: Option<&'a str>,
}

impl LimitOwner<'_> {
    /// As refusals and `x-sluice-limit` name it: `key`, `tenant`, `key/MODEL`, `tenant/MODEL`.
    pub fn label(&self) -> String {
        match self.model {
            None => self.scope.name().to_owned(),
            Some(model) => format!("{}/{model}", self.scope.name()),
        }
    }
}

/// What a request for one model counts against: each ledger, its limits and whose they are,
/// in the order admission checks them (key, tenant, then per-model limits where set).
pub struct QuotaPlan<'a> {
    pub ledgers: Ledgers,
    pub limits: Vec<&'a Limits>,
    pub owners: Vec<LimitOwner<'a>>,
}

impl QuotaPlan<'_> {
    /// The scopes of the store's admission.
    pub fn scopes(&self) -> Vec<Scope<'_>> {
        self.ledgers
            .iter()
            .zip(&self.limits)
            .map(|(ledger, limits)| Scope { ledger, limits })
            .collect()
    }

    /// Whether the model has limits of its own here (its requests are then decided by the
    /// store one by one: a lease is a slice of the key's quota for every model).
    pub fn per_model(&self) -> bool {
        self.ledgers.len() > 2
    }
}

impl Identity {
    /// What a request for `model` counts against.
    pub fn quota_plan<'a>(&'a self, model: &'a str) -> QuotaPlan<'a> {
        let mut limits = vec![&self.limits, &self.tenant_limits];
        let mut owners = vec![
            LimitOwner {
                scope: LimitScope::Key,
                model: None,
            },
            LimitOwner {
                scope: LimitScope::Tenant,
                model: None,
            },
        ];
        let own = [
            (LimitScope::Key, self.model_limits.get(model)),
            (LimitScope::Tenant, self.tenant_model_limits.get(model)),
        ];
        if own.iter().all(|(_, l)| l.is_none()) {
            return QuotaPlan {
                ledgers: self.ledgers.clone(),
                limits,
                owners,
            };
        }
        let mut ledgers: Vec<String> = self.ledgers.to_vec();
        for (i, (scope, model_limits)) in own.into_iter().enumerate() {
            if let Some(model_limits) = model_limits {
                ledgers.push(ledger::model_ledger(&self.ledgers[i], model));
                limits.push(model_limits);
                owners.push(LimitOwner {
                    scope,
                    model: Some(model),
                });
            }
        }
        QuotaPlan {
            ledgers: ledgers.into(),
            limits,
            owners,
        }
    }
}

/// The ids of the quota ledgers a request counts in (see [`quota_ledgers`]).
pub type Ledgers = Arc<[String]>;

/// The quota ledgers of a key (or token subject) of `tenant`: the key's own, and the
/// tenant's, which every request of the tenant counts in, so that a tenant's limits set
/// later count what its keys spent this month already.
pub fn quota_ledgers(key_id: &str, tenant: &str) -> Ledgers {
    Arc::from([key_id.to_owned(), tenants::ledger_of(tenant)])
}

pub struct Authenticator {
    store: Arc<dyn Store>,
    cache: Arc<KeyCache>,
    jwt: Option<Arc<JwtVerifier>>,
    tiers: Arc<arc_swap::ArcSwap<Tiers>>,
    tenants: Arc<arc_swap::ArcSwap<Tenants>>,
}

/// The bearer credential of a request, still unverified.
pub fn bearer(authorization: Option<&[u8]>) -> Option<&str> {
    let value = std::str::from_utf8(authorization?).ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

impl Authenticator {
    pub fn new(
        store: Arc<dyn Store>,
        cache: Arc<KeyCache>,
        jwt: Option<Arc<JwtVerifier>>,
        tiers: Arc<arc_swap::ArcSwap<Tiers>>,
        tenants: Arc<arc_swap::ArcSwap<Tenants>>,
    ) -> Self {
        Authenticator {
            store,
            cache,
            jwt,
            tiers,
            tenants,
        }
    }

    /// A key's identity is resolved once and cached, so a request pays one hash and one
    /// shared pointer, not a store call or a copy of its limits.
    pub async fn authenticate(
        &self,
        authorization: Option<&[u8]>,
    ) -> Result<Arc<Identity>, ApiError> {
        let Some(token) = bearer(authorization) else {
            return Err(ApiError::invalid_api_key(
                "You didn't provide an API key. Provide it in the Authorization header as \
                 'Bearer sk-...' (or a JWT).",
            ));
        };
        if token.starts_with("eyJ") {
            return self.authenticate_jwt(token).await.map(Arc::new);
        }
        self.lookup_key(token).await?.ok_or_else(|| {
            ApiError::invalid_api_key(
                "Incorrect API key provided. It is unknown, revoked or rotated.",
            )
        })
    }

    async fn lookup_key(&self, secret: &str) -> Result<Option<Arc<Identity>>, ApiError> {
        let hash = KeyHash::of_secret(secret);
        if let Some(hit) = self.cache.get(&hash) {
            return Ok(hit);
        }
        let epoch = self.cache.epoch();
        let found = self.store.key_by_hash(&hash).await.map_err(|e| {
            tracing::error!(error = %e, "key lookup failed");
            ApiError::unavailable("Sluice cannot check API keys right now; try again shortly.")
        })?;
        let identity = match found {
            Some(record) => Some(Arc::new(self.identity_of_key(&record)?)),
            None => None,
        };
        self.cache.insert(hash, identity.clone(), epoch);
        Ok(identity)
    }

    fn identity_of_key(&self, record: &KeyRecord) -> Result<Identity, ApiError> {
        let tiers = self.tiers.load();
        let tier = tiers.get(&record.tier).map_err(|e| {
            tracing::error!(key_id = %record.id, error = %e, "key names a tier that no longer exists");
            ApiError::internal("This API key's tier is not configured; contact the operator.")
        })?;
        let tenants = self.tenants.load();
        Ok(Identity {
            key_id: record.id.clone(),
            tenant: record.tenant.clone(),
            tier: record.tier.clone(),
            limits: tier.limits.with_overrides(&record.limits),
            cache: record.cache,
            models: ModelAccess::of(&tier.models, &record.models),
            tenant_limits: tenants.limits(&record.tenant),
            ledgers: quota_ledgers(&record.id, &record.tenant),
            model_limits: Arc::new(sluice_policies::limits::merge_model_limits(
                &tier.model_limits,
                &record.model_limits,
            )),
            tenant_model_limits: tenants.model_limits(&record.tenant),
            distillation: Distillation::of(
                record.distillation.as_ref(),
                tenants.distillation(&record.tenant),
            )
            .cloned()
            .map(Arc::new),
        })
    }

    async fn authenticate_jwt(&self, token: &str) -> Result<Identity, ApiError> {
        let Some(verifier) = &self.jwt else {
            return Err(ApiError::invalid_api_key(
                "JWT authentication is not enabled on this gateway.",
            ));
        };
        let claims = verifier
            .verify(token)
            .await
            .map_err(|e| ApiError::invalid_api_key(format!("Invalid token: {e}.")))?;
        let tier_name = claims
            .tier
            .as_deref()
            .unwrap_or(sluice_policies::tiers::DEFAULT_TIER);
        let tiers = self.tiers.load();
        let tier = tiers
            .get(tier_name)
            .map_err(|e| ApiError::invalid_api_key(format!("Invalid token: {e}.")))?;
        let tenant = format!(
            "{JWT_TENANT_PREFIX}{}",
            claims.tenant.as_deref().unwrap_or(&claims.subject)
        );
        let key_id = format!("{JWT_TENANT_PREFIX}{}", claims.subject);
        let tenants = self.tenants.load();
        Ok(Identity {
            ledgers: quota_ledgers(&key_id, &tenant),
            tenant_limits: tenants.limits(&tenant),
            model_limits: Arc::new(tier.model_limits.clone()),
            tenant_model_limits: tenants.model_limits(&tenant),
            distillation: Distillation::of(None, tenants.distillation(&tenant))
                .cloned()
                .map(Arc::new),
            key_id,
            tenant,
            tier: tier.name.clone(),
            limits: tier.limits.clone(),
            cache: true,
            models: ModelAccess::of(&tier.models, &ModelLists::default()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::bearer;

    #[test]
    fn bearer_takes_the_token_of_any_case_scheme() {
        assert_eq!(bearer(Some(b"Bearer sk-abc")), Some("sk-abc"));
        assert_eq!(bearer(Some(b"bearer   sk-abc ")), Some("sk-abc"));
        assert_eq!(bearer(Some(b"Basic dXNlcg==")), None);
        assert_eq!(bearer(Some(b"Bearer ")), None);
        assert_eq!(bearer(None), None);
    }
}
