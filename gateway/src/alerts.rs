//! Spend alerts: when a key's (or a tenant's) spend reaches a threshold of its budget
//! (`monthly_budget`, which refuses past it, or `soft_monthly_budget`, which only alerts), one
//! alert is recorded in the store and delivered to the webhook, signed and retried, once per
//! key or tenant, budget, threshold and month across the whole fleet: the store decides which
//! replica records it.
//!
//! A replica checks the keys (and tenants) it served since its last check, every
//! `check_interval`, against
//! the spend the budget counts (`GET /admin/v1/keys/{id}/quota`: what is settled plus what
//! requests in flight have reserved), so an alert comes at most one interval after the spend
//! that crossed the threshold, and the 100% alert of a hard budget comes no later than its
//! first refusal would.

use crate::auth::Identity;
use crate::store::Store;
use arc_swap::ArcSwap;
use hmac::{Hmac, Mac};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use sluice_policies::alerts::{self, BudgetKind};
use sluice_policies::quota::{self, LimitScope};
use sluice_policies::{Limits, Tiers};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// Deliveries of one alert: the first, then retries after 1, 2, 4 … 64 s (about two minutes
/// in all), then it is given up (and counted as failed; the console still lists it).
const DELIVERY_ATTEMPTS: u32 = 8;
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);
/// Keys noted between two checks; past it, the busiest replica checks only this many.
const MAX_NOTED_KEYS: usize = 100_000;

#[derive(Debug, Clone)]
pub struct AlertsConfig {
    /// The webhook URL and the secret its deliveries are signed with; without one, alerts
    /// are recorded (console, admin API, metrics) but not sent.
    pub webhook: Option<(String, String)>,
    /// Percentages of a budget that raise an alert.
    pub thresholds: Vec<u32>,
    pub check_interval: Duration,
}

/// One spend alert, as the webhook receives it, the store keeps it and the admin API lists it.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SpendAlert {
    /// `budget:<ledger>:<month>:<hard|soft>:<threshold>`: one alert per ledger, budget,
    /// threshold and month, fleet-wide.
    pub id: String,
    /// Always `budget.threshold_reached`.
    pub r#type: String,
    /// `key` or `tenant`: whose budget.
    pub scope: String,
    /// The key's id; `null` for a tenant's budget.
    #[schema(required)]
    pub key_id: Option<String>,
    pub tenant: String,
    /// The tier of the key that noticed (a tenant's keys may be of several).
    pub tier: String,
    /// `hard` (`monthly_budget`) or `soft` (`soft_monthly_budget`).
    pub budget: String,
    pub threshold_percent: u32,
    /// The budget, as an exact decimal string.
    pub budget_amount: String,
    /// The spend counted when the threshold was seen, as an exact decimal string.
    pub counted: String,
    pub currency: String,
    /// `YYYY-MM` (UTC).
    pub month: String,
    /// Unix seconds.
    pub created_at: i64,
}

pub struct Alerts {
    config: AlertsConfig,
    store: Arc<dyn Store>,
    tiers: Arc<ArcSwap<Tiers>>,
    http: crate::outbound::Outbound,
    /// Ledgers with a budget (keys', tenants') served since the last check, with whose they
    /// are and the identity of a caller that spent in them.
    noted: parking_lot::Mutex<HashMap<String, (LimitScope, Arc<Identity>)>>,
}

fn has_budget(limits: &Limits) -> bool {
    limits.monthly_budget.is_some() || limits.soft_monthly_budget.is_some()
}

impl Alerts {
    pub fn new(config: AlertsConfig, store: Arc<dyn Store>, tiers: Arc<ArcSwap<Tiers>>) -> Self {
        let http = crate::outbound::Outbound::default();
        Alerts {
            config,
            store,
            tiers,
            http,
            noted: parking_lot::Mutex::new(HashMap::new()),
        }
    }

    /// A request of this caller was settled: check its key's and tenant's spend at the next
    /// check.
    pub fn note(&self, identity: &Arc<Identity>) {
        let budgets = [
            (LimitScope::Key, has_budget(&identity.limits)),
            (LimitScope::Tenant, has_budget(&identity.tenant_limits)),
        ];
        if budgets.iter().all(|(_, has)| !has) {
            return;
        }
        let mut noted = self.noted.lock();
        for (i, (scope, has)) in budgets.into_iter().enumerate() {
            let ledger = &identity.ledgers[i];
            if has && (noted.len() < MAX_NOTED_KEYS || noted.contains_key(ledger)) {
                noted.insert(ledger.clone(), (scope, identity.clone()));
            }
        }
    }

    pub async fn run(self: Arc<Self>) {
        loop {
            tokio::time::sleep(self.config.check_interval).await;
            let noted = std::mem::take(&mut *self.noted.lock());
            for (ledger, (scope, identity)) in noted {
                if let Err(e) = self.check(&ledger, scope, &identity).await {
                    tracing::warn!(%ledger, error = %e, "spend alert check failed");
                    // Checked again after its next request.
                }
            }
        }
    }

    /// Checks one ledger's spend: a key's (`scope` Key) or its tenant's.
    async fn check(
        self: &Arc<Self>,
        ledger: &str,
        scope: LimitScope,
        identity: &Identity,
    ) -> Result<(), crate::store::StoreError> {
        let now_ms = crate::clock::now_ms();
        let now = now_ms / 1000;
        let (month, _) = crate::clock::month_of(now);
        let spend = self
            .store
            .quota_counters(ledger, now, &month)
            .await?
            .month_spend_nano;
        let (limits, key_id) = match scope {
            LimitScope::Key => (&identity.limits, Some(&identity.key_id)),
            LimitScope::Tenant => (&identity.tenant_limits, None),
        };
        let budgets = [
            (BudgetKind::Hard, limits.monthly_budget),
            (BudgetKind::Soft, limits.soft_monthly_budget),
        ];
        for (kind, budget) in budgets {
            let Some(budget) = budget else { continue };
            let budget_nano = quota::to_nano_ceil(budget.amount());
            for threshold in alerts::reached(spend, budget_nano, &self.config.thresholds) {
                // A key's ledger is named by its key id, a tenant's `tenant:ID`: ids of the
                // two never meet.
                let id = format!("budget:{ledger}:{month}:{}:{threshold}", kind.as_str());
                let alert = SpendAlert {
                    id: id.clone(),
                    r#type: "budget.threshold_reached".to_owned(),
                    scope: scope.name().to_owned(),
                    key_id: key_id.cloned(),
                    tenant: identity.tenant.clone(),
                    tier: identity.tier.clone(),
                    budget: kind.as_str().to_owned(),
                    threshold_percent: threshold,
                    budget_amount: budget.amount().normalize().to_string(),
                    counted: (Decimal::from(spend) / Decimal::from(quota::NANO))
                        .normalize()
                        .to_string(),
                    currency: self.currency(&identity.tier),
                    month: month.to_string(),
                    created_at: now,
                };
                let body = serde_json::to_string(&alert).expect("an alert serializes");
                if !self
                    .store
                    .record_alert_once(&id, now_ms, body.as_bytes())
                    .await?
                {
                    continue;
                }
                tracing::info!(alert_id = %id, counted = %alert.counted, "spend alert");
                crate::metrics::get().record_budget_alert(kind.as_str());
                let alerts = self.clone();
                tokio::spawn(async move { alerts.deliver(&id, body).await });
            }
        }
        Ok(())
    }

    fn currency(&self, tier: &str) -> String {
        self.tiers
            .load()
            .get(tier)
            .map_or_else(|_| "USD".to_owned(), |t| t.currency.clone())
    }

    /// POSTs the alert, signed, until the receiver answers 2xx or the attempts run out.
    async fn deliver(&self, id: &str, body: String) {
        let Some((url, secret)) = &self.config.webhook else {
            return;
        };
        let mut backoff = Duration::from_secs(1);
        for attempt in 1..=DELIVERY_ATTEMPTS {
            let timestamp = crate::clock::now_ms() / 1000;
            let signed = signature(secret, timestamp, &body);
            let headers = [
                ("content-type", "application/json"),
                ("x-sluice-event-id", id),
                ("x-sluice-signature", signed.as_str()),
            ];
            let result = self
                .http
                .call(
                    "POST",
                    url,
                    &headers,
                    Some(body.clone().into()),
                    DELIVERY_TIMEOUT,
                )
                .await;
            match result {
                Ok(r) if r.is_success() => {
                    crate::metrics::get().record_budget_alert_delivery("delivered");
                    return;
                }
                Ok(r) => {
                    tracing::warn!(alert_id = %id, attempt, status = r.status, "spend alert webhook refused")
                }
                Err(e) => {
                    tracing::warn!(alert_id = %id, attempt, error = %e, "spend alert webhook unreachable")
                }
            }
            if attempt < DELIVERY_ATTEMPTS {
                tokio::time::sleep(backoff).await;
                backoff *= 2;
            }
        }
        crate::metrics::get().record_budget_alert_delivery("failed");
        tracing::error!(alert_id = %id, "spend alert not delivered; giving up");
    }

    /// The alerts recorded, newest first (`GET /admin/v1/alerts`).
    pub async fn recent(&self, limit: usize) -> Result<Vec<SpendAlert>, crate::store::StoreError> {
        let raw = self.store.recent_alerts(limit).await?;
        Ok(raw
            .iter()
            .filter_map(|a| serde_json::from_slice(a).ok())
            .collect())
    }
}

/// `t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`: the receiver recomputes it with
/// the shared secret, and refuses old timestamps so a captured delivery cannot be replayed.
pub fn signature(secret: &str, timestamp: i64, body: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body.as_bytes());
    format!(
        "t={timestamp},v1={}",
        hex::encode(mac.finalize().into_bytes())
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_the_hmac_of_timestamp_and_body() {
        // RFC 4231 test case 2's key and data, split as "<t>.<body>" would be.
        let s = signature("Jefe", 0, "what do ya want for nothing?");
        assert!(s.starts_with("t=0,v1="), "{s}");
        let mut mac = Hmac::<Sha256>::new_from_slice(b"Jefe").unwrap();
        mac.update(b"0.what do ya want for nothing?");
        assert_eq!(&s[7..], hex::encode(mac.finalize().into_bytes()));
        assert_ne!(s, signature("Jefe", 1, "what do ya want for nothing?"));
        assert_ne!(s, signature("Jeff", 0, "what do ya want for nothing?"));
    }
}
