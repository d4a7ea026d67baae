//! What does a replica share between requests? The gateway's state, assembled in order:
//! configuration, store, tiers, authentication, admission, upstreams, cache and the usage
//! sink, shared by the proxy and the admin API (`server` starts them).

use crate::admission::{self, Admission};
use crate::auth::{Authenticator, JwtVerifier, KeyCache};
use crate::clock::{self, Clock};
use crate::config::Config;
use crate::metering::journal::{usage_channel, UsageSink, UsageWriter};
use crate::store::{EmbeddedStore, RedisStore, Store};
use crate::upstream::Upstreams;
use anyhow::Context;
use arc_swap::ArcSwap;
use bytes::Bytes;
use serde_json::json;
use sluice_policies::{Tenants, Tiers};
use std::sync::Arc;

pub struct Gateway {
    pub config: Config,
    /// The tiers in force: the configuration's, overridden by those written through the
    /// admin API, reloaded whenever the store's key epoch moves.
    pub tiers: Arc<ArcSwap<Tiers>>,
    /// Tenants' limits, written through the admin API, reloaded like the tiers.
    pub tenants: Arc<ArcSwap<Tenants>>,
    pub store: Arc<dyn Store>,
    pub key_cache: Arc<KeyCache>,
    pub auth: Authenticator,
    /// Proxy JWTs (`[auth.jwt]`) and, apart from them, admin JWTs (`[auth.admin_jwt]`).
    pub jwt: Option<Arc<JwtVerifier>>,
    pub admin_jwt: Option<Arc<JwtVerifier>>,
    pub upstreams: Arc<Upstreams>,
    pub usage: UsageSink,
    /// The PostgreSQL usage ledger (`[billing] postgres_url`); without one, the store keeps
    /// usage events and exports read them there.
    pub ledger: Option<Arc<crate::ledger::Ledger>>,
    /// The NATS JetStream usage feed (`[billing] nats_url`).
    pub feed: Option<Arc<crate::metering::Feed>>,
    pub admission: Arc<Admission>,
    pub cache: Arc<crate::cache::ResponseCache>,
    /// Requests in flight and body bytes held, against the configured marks.
    pub overload: crate::overload::Overload,
    /// Models' tokenizers (`[tokenizers]`), for usage a backend does not report.
    pub tokenizers: crate::metering::tokens::TokenCounters,
    /// Spend alerts (`[alerts]`).
    pub alerts: Option<Arc<crate::alerts::Alerts>>,
    /// Conversations captured for distillation, on their way to the store.
    pub datasets: Arc<crate::datasets::Datasets>,
}

impl Gateway {
    /// Connects the store and learns the backends' models. Runs on the support runtime; the
    /// returned writer must be run there too.
    pub async fn build(config: Config) -> anyhow::Result<(Arc<Gateway>, UsageWriter)> {
        let ledger = config
            .ledger
            .as_ref()
            .map(|l| crate::ledger::Ledger::new(l, config.prices.clone()).map(Arc::new))
            .transpose()
            .context("billing.postgres_url")?;
        let store: Arc<dyn Store> = match &config.redis_url {
            Some(url) => Arc::new(
                RedisStore::connect_with_tls(url, &config.redis_prefix, &config.redis_tls)
                    .await
                    .with_context(|| format!("cannot connect to Redis at {url}"))?,
            ),
            None => Arc::new(open_embedded(&config, ledger.as_deref()).await?),
        };
        let jwt = config
            .jwt
            .as_ref()
            .map(|j| JwtVerifier::new(j).map(Arc::new))
            .transpose()
            .context("auth.jwt")?;
        let admin_jwt = config
            .admin_jwt
            .as_ref()
            .map(|j| JwtVerifier::new(j).map(Arc::new))
            .transpose()
            .context("auth.admin_jwt")?;
        // Tokens are verified from the start; a provider that cannot be reached now is asked
        // again on the first token that names a key, and on every refresh.
        for verifier in [&jwt, &admin_jwt].into_iter().flatten() {
            if let Some(jwks) = &verifier.jwks {
                if let Err(e) = jwks.fetch().await {
                    tracing::warn!(error = %e, "JWKS not fetched at start");
                }
            }
        }
        let key_cache = Arc::new(KeyCache::new(
            config.key_cache_entries,
            config.unknown_key_cache_entries,
        ));
        let tiers = Arc::new(ArcSwap::from_pointee(
            merged_tiers(&config.tiers, store.as_ref()).await?,
        ));
        let tenants = Arc::new(ArcSwap::from_pointee(Tenants::new(store.tenants().await?)));
        let auth = Authenticator::new(
            store.clone(),
            key_cache.clone(),
            jwt.clone(),
            tiers.clone(),
            tenants.clone(),
        );
        let upstreams = Arc::new(Upstreams::new(&config.backends));
        upstreams.discover().await;
        let feed = config.feed.clone().map(|f| {
            Arc::new(crate::metering::Feed::new(
                f,
                config.data_dir.join("usage-feed-outbox.jsonl"),
            ))
        });
        let (usage, writer) = usage_channel(
            crate::metering::UsageTarget::new(store.clone(), ledger.clone())
                .with_feed(feed.clone()),
            config.data_dir.join("usage-journal.jsonl"),
        );
        let admission = Arc::new(Admission::new(
            store.clone(),
            tiers.clone(),
            config.prices.clone(),
            admission::Settings {
                default_max_tokens: config.default_max_tokens,
                slot_ttl_secs: config.slot_ttl_secs,
                lease_max_requests: config.lease_max_requests,
                lease_ttl: std::time::Duration::from_millis(config.lease_ms),
            },
            Clock::system(),
        ));
        let cache = Arc::new(crate::cache::ResponseCache::new(
            config.cache.clone(),
            store.clone(),
        ));
        let overload = crate::overload::Overload::new(config.marks);
        let tokenizers = crate::metering::tokens::TokenCounters::load(&config.tokenizers)
            .map_err(|e| anyhow::anyhow!(e))?;
        let alerts = config
            .alerts
            .clone()
            .map(|a| Arc::new(crate::alerts::Alerts::new(a, store.clone(), tiers.clone())));
        let datasets = Arc::new(crate::datasets::Datasets::new(
            config.datasets.clone(),
            store.clone(),
        ));
        let gateway = Arc::new(Gateway {
            config,
            tiers,
            tenants,
            store,
            key_cache,
            auth,
            jwt,
            admin_jwt,
            upstreams,
            usage,
            ledger,
            feed,
            admission,
            cache,
            overload,
            tokenizers,
            alerts,
            datasets,
        });
        Ok((gateway, writer))
    }

    /// The tiers in force now.
    pub fn tiers(&self) -> Arc<Tiers> {
        self.tiers.load_full()
    }

    /// Re-reads what the admin API changed in the store: tiers, tenants' limits, the
    /// backend pool, and which backends drain.
    pub async fn reload_shared(&self) -> anyhow::Result<()> {
        let tiers = merged_tiers(&self.config.tiers, self.store.as_ref()).await?;
        self.tiers.store(Arc::new(tiers));
        let tenants = Tenants::new(self.store.tenants().await?);
        self.tenants.store(Arc::new(tenants));
        let mut pool = Vec::new();
        let current = self.upstreams.backends();
        for (name, record) in self.store.backend_changes().await? {
            // One in the pool as stored is kept as it is: its files are not read nor its
            // host looked up again on every change to the store (it follows its name on
            // its own, see `Upstreams::follow_addresses`).
            let record = record.map(|mut spec| {
                spec.name = Some(name.clone());
                spec
            });
            let unchanged = record.as_ref().and_then(|spec| {
                current
                    .iter()
                    .find(|b| b.name == name && &b.config.spec == spec)
            });
            if let Some(kept) = unchanged {
                pool.push((name, Some(kept.config.clone())));
                continue;
            }
            let backend = match record {
                Some(spec) => match crate::config::backend(&name, spec) {
                    Ok(backend) => Some(backend),
                    Err(e) => {
                        tracing::error!(backend = %name, error = %e, "stored backend is invalid; skipped");
                        continue;
                    }
                },
                None => None,
            };
            pool.push((name, backend));
        }
        if self.upstreams.set_pool(&pool) {
            tracing::info!(
                backends = ?self.upstreams.backends().iter().map(|b| &b.name).collect::<Vec<_>>(),
                "backend pool changed"
            );
            self.upstreams.discover().await;
        }
        let draining = self.store.draining_backends().await?;
        for backend in self.upstreams.backends().iter() {
            let drain = draining.contains(&backend.name);
            backend
                .state
                .draining
                .store(drain, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(())
    }

    /// Follows the store's key epoch until the process ends: when it moves (a key, tier or
    /// tenant changed on any replica), reload the tiers and tenants, then drop the cached
    /// identities.
    pub async fn follow_changes(self: Arc<Self>) {
        let mut tick = tokio::time::interval(crate::auth::EPOCH_POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seen = None;
        loop {
            tick.tick().await;
            match self.store.keys_epoch().await {
                Ok(epoch) if seen != Some(epoch) => {
                    if let Err(e) = self.reload_shared().await {
                        tracing::warn!(error = %e, "cannot reload tiers");
                        continue;
                    }
                    seen = Some(epoch);
                    self.key_cache.observe_epoch(epoch);
                }
                Ok(_) => {}
                // While the store is unreachable nothing can change in it either: keep the
                // cached identities and tiers.
                Err(e) => tracing::warn!(error = %e, "cannot read the key epoch"),
            }
        }
    }

    /// The body of `GET /v1/models`: every model some backend serves and every alias that
    /// resolves for the caller's tier, less what the caller may not name.
    pub fn model_list(&self, caller: &crate::auth::Identity) -> Bytes {
        let access = &caller.models;
        let mut data: Vec<_> = self
            .upstreams
            .models()
            .values()
            .filter(|m| access.permits(&m.id, None))
            .map(|m| json!({"id": m.id, "object": "model", "created": 0, "owned_by": m.owned_by}))
            .collect();
        data.extend(self.config.aliases.keys().filter_map(|alias| {
            let target = self.config.resolve_alias(alias, &caller.tier)?;
            access.permits(alias, Some(target)).then(|| {
                json!({"id": alias, "object": "model", "created": 0, "owned_by": "sluice-alias"})
            })
        }));
        Bytes::from(json!({"object": "list", "data": data}).to_string())
    }
}

/// The configuration's tiers with the stored ones over them.
async fn merged_tiers(configured: &Tiers, store: &dyn Store) -> anyhow::Result<Tiers> {
    let stored = store.stored_tiers().await?;
    if stored.is_empty() {
        return Ok(configured.clone());
    }
    let mut all: std::collections::BTreeMap<String, sluice_policies::Tier> = configured
        .iter()
        .map(|t| (t.name.clone(), t.clone()))
        .collect();
    for tier in stored {
        all.insert(tier.name.clone(), tier);
    }
    Ok(Tiers::new(all.into_values())?)
}

/// The embedded store, with this month's budget spend restored: from the ledger's rollups
/// when there is one (the store then keeps no events), else from the store's own events.
async fn open_embedded(
    config: &Config,
    ledger: Option<&crate::ledger::Ledger>,
) -> anyhow::Result<EmbeddedStore> {
    let store = EmbeddedStore::open(&config.data_dir)?;
    let month = clock::Month::of_ms(clock::now_ms());
    match ledger {
        Some(ledger) => match ledger.month_spend(&month).await {
            Ok(spend) => {
                for (key_id, tenant, nano) in spend {
                    store.add_month_spend(&key_id, &month.label, nano);
                    let tenant = sluice_policies::tenants::ledger_of(&tenant);
                    store.add_month_spend(&tenant, &month.label, nano);
                }
            }
            // Starting matters more: the gateway runs (and journals) while PostgreSQL is
            // down, and budgets count from what this replica admits.
            Err(e) => {
                tracing::error!(error = %e, "cannot read this month's spend from the usage ledger; budgets count from zero until restart")
            }
        },
        None => {
            let prices = &config.prices;
            store
                .restore_month_spend(month.start_ms, &month.label, |e| {
                    let usage = crate::metering::Usage::of_event(e);
                    crate::billing::settled_cost_nano(prices, &e.model, &e.tier, &usage)
                })
                .await?;
        }
    }
    Ok(store)
}
