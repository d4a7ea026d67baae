//! The gateway, assembled: configuration, store, authentication and upstreams, shared by the
//! proxy and the admin API, and the start-up that brings them up in order.

use crate::admin;
use crate::auth::{Authenticator, JwtVerifier, KeyCache};
use crate::config::Config;
use crate::metering::events::{usage_channel, UsageSink, UsageWriter};
use crate::proxy::Proxy;
use crate::store::{EmbeddedStore, RedisStore, Store};
use crate::upstream::Upstreams;
use anyhow::Context;
use arc_swap::ArcSwap;
use bytes::Bytes;
use pingora_core::server::configuration::ServerConf;
use pingora_core::server::Server;
use serde_json::json;
use sluice_policies::Tiers;
use std::sync::Arc;

/// Entries the local key cache may hold before it starts over.
const KEY_CACHE_CAPACITY: usize = 100_000;

pub struct Gateway {
    pub config: Config,
    /// The tiers in force: the configuration's, overridden by those written through the
    /// admin API, reloaded whenever the store's key epoch moves.
    pub tiers: Arc<ArcSwap<Tiers>>,
    pub store: Arc<dyn Store>,
    pub key_cache: Arc<KeyCache>,
    pub auth: Authenticator,
    pub jwt: Option<Arc<JwtVerifier>>,
    pub upstreams: Arc<Upstreams>,
    pub usage: UsageSink,
    pub local_limiter: crate::admission::LocalLimiter,
    /// Reservations this replica holds open, and charges it owes from store outages.
    pub held: Arc<crate::admission::held::Held>,
    pub leases: crate::leases::Leases,
    pub cache: Arc<crate::cache::ResponseCache>,
}

impl Gateway {
    /// Connects the store and learns the backends' models. Runs on the support runtime; the
    /// returned writer must be run there too.
    pub async fn build(config: Config) -> anyhow::Result<(Arc<Gateway>, UsageWriter)> {
        let store: Arc<dyn Store> = match &config.redis_url {
            Some(url) => Arc::new(
                RedisStore::connect(url, &config.redis_prefix)
                    .await
                    .with_context(|| format!("cannot connect to Redis at {url}"))?,
            ),
            None => {
                let store = EmbeddedStore::open(&config.data_dir)?;
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs() as i64);
                let (month, _) = crate::admission::month_of(now);
                let prices = &config.prices;
                store
                    .restore_month_spend(crate::billing::month_start(now * 1000), &month, |e| {
                        let usage = crate::metering::Usage::of_event(e);
                        crate::admission::settled_cost_nano(prices, &e.model, &e.tier, &usage)
                    })
                    .await?;
                Arc::new(store)
            }
        };
        let jwt = config
            .jwt
            .as_ref()
            .map(|j| JwtVerifier::new(j).map(Arc::new))
            .transpose()
            .context("auth.jwt")?;
        let key_cache = Arc::new(KeyCache::new(KEY_CACHE_CAPACITY));
        let tiers = Arc::new(ArcSwap::from_pointee(
            merged_tiers(&config.tiers, store.as_ref()).await?,
        ));
        let auth = Authenticator::new(store.clone(), key_cache.clone(), jwt.clone(), tiers.clone());
        let upstreams = Arc::new(Upstreams::new(&config.backends));
        upstreams.discover().await;
        let (usage, writer) =
            usage_channel(store.clone(), config.data_dir.join("usage-journal.jsonl"));
        let config_leases = (config.lease_max_requests, config.lease_ms);
        let cache = Arc::new(crate::cache::ResponseCache::new(
            config.cache.clone(),
            store.clone(),
        ));
        let gateway = Arc::new(Gateway {
            config,
            tiers,
            store,
            key_cache,
            auth,
            jwt,
            upstreams,
            usage,
            local_limiter: Default::default(),
            held: Default::default(),
            leases: crate::leases::Leases::new(
                config_leases.0,
                std::time::Duration::from_millis(config_leases.1),
            ),
            cache,
        });
        Ok((gateway, writer))
    }

    /// The tiers in force now.
    pub fn tiers(&self) -> Arc<Tiers> {
        self.tiers.load_full()
    }

    /// Re-reads what the admin API changed in the store: tiers, the backend pool, and which
    /// backends drain.
    pub async fn reload_shared(&self) -> anyhow::Result<()> {
        let tiers = merged_tiers(&self.config.tiers, self.store.as_ref()).await?;
        self.tiers.store(Arc::new(tiers));
        let mut pool = Vec::new();
        for (name, record) in self.store.backend_changes().await? {
            let backend = match record {
                Some(r) => match crate::config::backend(&name, &r.url, r.models) {
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

    /// Follows the store's key epoch until the process ends: when it moves (a key or tier
    /// changed on any replica), reload the tiers, then drop the cached identities.
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

    /// Gives back expired leases whose requests are done, until the process ends.
    pub async fn sweep_leases(self: Arc<Self>) {
        if !self.leases.enabled() {
            return;
        }
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(100));
        loop {
            tick.tick().await;
            crate::leases::give_back(self.store.clone(), self.held.clone(), self.leases.sweep());
        }
    }

    /// The body of `GET /v1/models`: every model some backend serves, and the aliases.
    pub fn model_list(&self) -> Bytes {
        let mut data: Vec<_> = self
            .upstreams
            .models()
            .values()
            .map(|m| json!({"id": m.id, "object": "model", "created": 0, "owned_by": m.owned_by}))
            .collect();
        data.extend(self.config.aliases.keys().map(|alias| {
            json!({"id": alias, "object": "model", "created": 0, "owned_by": "sluice-alias"})
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

/// Runs the gateway until a signal stops it. On SIGTERM (or Ctrl-C) the listener closes,
/// requests in flight (streams included) get `grace_period_secs` to finish, and the usage
/// events they produced are written to the store (or the journal) before this returns.
pub fn run(config: Config) -> anyhow::Result<()> {
    // Store connections, the admin API and background followers live on their own small
    // runtime, so they keep running while pingora's proxy threads serve traffic.
    let support = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("sluice-support")
        .enable_all()
        .build()?;
    let (gateway, usage_writer) = support.block_on(Gateway::build(config.clone()))?;
    support.spawn(usage_writer.run());

    let admin_listener = support
        .block_on(tokio::net::TcpListener::bind(config.admin_listen))
        .with_context(|| format!("cannot listen on {} (admin)", config.admin_listen))?;
    support.spawn(admin::serve(admin_listener, gateway.clone()));
    support.spawn(gateway.clone().follow_changes());
    support.spawn(gateway.clone().sweep_leases());
    support.spawn(
        gateway
            .held
            .clone()
            .run(gateway.store.clone(), config.slot_ttl_secs),
    );
    support.spawn(gateway.cache.clone().follow());
    support.spawn(gateway.upstreams.clone().follow());
    support.spawn(
        gateway
            .upstreams
            .clone()
            .check_health(config.balancer.clone()),
    );
    support.spawn(
        gateway
            .upstreams
            .clone()
            .scrape_load(config.balancer.clone()),
    );

    if config.admin_token.is_none() && config.jwt.is_none() {
        tracing::warn!(
            "no admin credentials configured (SLUICE_ADMIN_TOKEN or auth.jwt): \
             the admin API refuses every call"
        );
    }
    let models = gateway.upstreams.models();
    tracing::info!(
        listen = %config.listen,
        admin = %config.admin_listen,
        store = gateway.store.kind(),
        backends = config.backends.len(),
        models = ?models.keys().collect::<Vec<_>>(),
        "sluice gateway starting"
    );

    let server_conf = ServerConf {
        threads: config.threads,
        grace_period_seconds: Some(config.grace_period_secs),
        graceful_shutdown_timeout_seconds: Some(config.grace_period_secs),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, server_conf);
    server.bootstrap();
    let mut proxy = pingora_proxy::http_proxy_service_with_name(
        &server.configuration,
        Proxy::new(gateway.clone()),
        "sluice-proxy",
    );
    proxy.add_tcp(&config.listen.to_string());
    server.add_service(proxy);
    server.run(pingora_core::server::RunArgs::default());
    let flushed = support
        .block_on(async { tokio::time::timeout(USAGE_FLUSH_LIMIT, gateway.usage.flush()).await });
    match flushed {
        Ok(()) => tracing::info!("usage events flushed; gateway stopped"),
        Err(_) => tracing::error!(
            "usage events not flushed within {USAGE_FLUSH_LIMIT:?}; those not written are lost unless journaled"
        ),
    }
    Ok(())
}

/// How long a stopping gateway waits for its usage events to reach the store or journal.
const USAGE_FLUSH_LIMIT: std::time::Duration = std::time::Duration::from_secs(15);
