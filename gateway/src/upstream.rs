//! Where does it go? The backends this gateway knows, the models each serves, and the choice
//! of one backend for a request. Models are declared in the configuration or discovered from
//! each backend's `/v1/models`, re-read in the background so a backend that starts late (or
//! gains a model) is picked up without a restart. The pool itself is the configuration's
//! backends, changed at run time through the admin API (kept in the store, so every replica
//! applies the same changes): backends that stay keep their health and load.
//!
//! The choice itself (strategies, health, ejection) is the balancer's.

use crate::balancer::{self, BackendState, BalancerConfig, Strategy};
use crate::config::BackendConfig;
use arc_swap::ArcSwap;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How often backends are asked which models they serve.
const DISCOVERY_INTERVAL: Duration = Duration::from_secs(5);
const DISCOVERY_TIMEOUT: Duration = Duration::from_secs(2);

/// A backend's scraped load older than this is not trusted (load_aware).
const SCRAPE_STALE: Duration = Duration::from_secs(3);

/// What a backend said it serves: (model id, owned_by) pairs.
type ServedModels = Vec<(String, String)>;

#[derive(Debug)]
pub struct Backend {
    pub name: String,
    pub url: String,
    pub addr: SocketAddr,
    /// `addr` as the `Host` header requests to it carry, written once.
    pub host: String,
    /// Models named in the configuration; empty means discovered.
    declared_models: Vec<String>,
    pub state: BackendState,
    /// A stable number for the backend (from its address), for rendezvous hashing.
    pub id: u64,
}

impl AsRef<BackendState> for Arc<Backend> {
    fn as_ref(&self) -> &BackendState {
        &self.state
    }
}

/// One model, and the backends that serve it.
#[derive(Debug)]
pub struct ModelRoute {
    pub id: String,
    pub owned_by: String,
    pub backends: Vec<Arc<Backend>>,
    cursor: AtomicUsize,
}

impl ModelRoute {
    /// Passive health: `backend` failed a request of this model. Says whether that ejected
    /// it; it does not while ejecting it would take more than `max_ejection_percent` of this
    /// model's backends out at once.
    pub fn backend_failed(&self, backend: &Backend, config: &BalancerConfig) -> bool {
        // Ejections are rare; one lock makes "count, then eject" a single step, so two
        // backends failing at once cannot both take the last share.
        static EJECTING: parking_lot::Mutex<()> = parking_lot::Mutex::new(());
        let _one_at_a_time = EJECTING.lock();
        let allowed = self.backends.len() * config.max_ejection_percent.min(100) as usize / 100;
        let ejected = self.backends.iter().filter(|b| b.state.ejected()).count();
        let may_eject = backend.state.ejected() || ejected < allowed;
        backend.state.failed(config, may_eject)
    }

    /// An available backend not in `tried`, chosen by `strategy`; `prefix` is the prompt's
    /// affinity hash.
    pub fn pick(
        &self,
        strategy: Strategy,
        tried: &[Arc<Backend>],
        prefix: u64,
        load_factor: f64,
    ) -> Option<Arc<Backend>> {
        let candidates: Vec<Arc<Backend>> = self
            .backends
            .iter()
            .filter(|b| b.state.available() && !tried.iter().any(|t| Arc::ptr_eq(t, b)))
            .cloned()
            .collect();
        let ids: Vec<u64> = candidates.iter().map(|b| b.id).collect();
        let hints = balancer::Hints {
            turn: self.cursor.fetch_add(1, Ordering::Relaxed),
            prefix,
            load_factor,
            stale: SCRAPE_STALE,
        };
        balancer::choose(strategy, &candidates, &ids, hints).cloned()
    }
}

pub struct Upstreams {
    configured: Vec<BackendConfig>,
    backends: ArcSwap<Vec<Arc<Backend>>>,
    models: ArcSwap<BTreeMap<String, Arc<ModelRoute>>>,
    /// What each backend (by name) last said it serves: a backend that is briefly
    /// unreachable keeps its models, so its clients see a 502 and not a vanished model.
    last_discovered: parking_lot::Mutex<std::collections::HashMap<String, ServedModels>>,
    http: reqwest::Client,
}

impl Backend {
    fn new(c: &BackendConfig) -> Backend {
        Backend {
            name: c.name.clone(),
            url: c.url.clone(),
            addr: c.addr,
            host: c.addr.to_string(),
            declared_models: c.models.clone(),
            state: BackendState::default(),
            id: crate::balancer::prefix_hash(c.url.as_bytes(), usize::MAX),
        }
    }

    /// Whether this backend is what `c` describes (so it can stay, state and all).
    fn is(&self, c: &BackendConfig) -> bool {
        self.name == c.name && self.url == c.url && self.declared_models == c.models
    }

    /// Models named in the configuration or when it was added; empty means discovered.
    pub fn declared_models(&self) -> &[String] {
        &self.declared_models
    }
}

#[derive(Deserialize)]
struct ModelList {
    data: Vec<ModelEntry>,
}

#[derive(Deserialize)]
struct ModelEntry {
    id: String,
    #[serde(default)]
    owned_by: Option<String>,
}

impl Upstreams {
    pub fn new(configs: &[BackendConfig]) -> Self {
        let backends = configs.iter().map(|c| Arc::new(Backend::new(c))).collect();
        let http = reqwest::Client::builder()
            .timeout(DISCOVERY_TIMEOUT)
            .build()
            .expect("http client builds without TLS");
        let upstreams = Upstreams {
            configured: configs.to_vec(),
            last_discovered: Default::default(),
            backends: ArcSwap::from_pointee(backends),
            models: ArcSwap::from_pointee(BTreeMap::new()),
            http,
        };
        upstreams.install();
        upstreams
    }

    /// Sets the pool to the configured backends with `changes` (from the store) applied:
    /// a name with `Some` is that backend (added, or replacing a configured one), with
    /// `None` it is out. Returns whether the pool changed; new backends still need
    /// [`Upstreams::discover`] to learn their models.
    pub fn set_pool(&self, changes: &[(String, Option<BackendConfig>)]) -> bool {
        let changed: std::collections::HashMap<&str, &Option<BackendConfig>> =
            changes.iter().map(|(n, c)| (n.as_str(), c)).collect();
        let mut wanted: Vec<&BackendConfig> = self
            .configured
            .iter()
            .filter(|c| !changed.contains_key(c.name.as_str()))
            .collect();
        wanted.extend(changes.iter().filter_map(|(_, c)| c.as_ref()));
        let current = self.backends.load_full();
        let next: Vec<Arc<Backend>> = wanted
            .into_iter()
            .map(|c| {
                current
                    .iter()
                    .find(|b| b.is(c))
                    .cloned()
                    .unwrap_or_else(|| Arc::new(Backend::new(c)))
            })
            .collect();
        let same = next.len() == current.len()
            && next
                .iter()
                .zip(current.iter())
                .all(|(a, b)| Arc::ptr_eq(a, b));
        if same {
            return false;
        }
        {
            let mut last = self.last_discovered.lock();
            last.retain(|name, _| next.iter().any(|b| &b.name == name));
        }
        self.backends.store(Arc::new(next));
        self.install();
        true
    }

    pub fn model(&self, id: &str) -> Option<Arc<ModelRoute>> {
        self.models.load().get(id).cloned()
    }

    pub fn models(&self) -> Arc<BTreeMap<String, Arc<ModelRoute>>> {
        self.models.load_full()
    }

    /// The pool now. A backend taken out stays alive for the requests that still hold it.
    pub fn backends(&self) -> Arc<Vec<Arc<Backend>>> {
        self.backends.load_full()
    }

    /// Asks every backend without declared models what it serves, and installs the result.
    /// A backend that does not answer keeps the models it last listed.
    pub async fn discover(&self) {
        let backends = self.backends();
        let mut answers = Vec::with_capacity(backends.len());
        for backend in backends.iter().filter(|b| b.declared_models.is_empty()) {
            match self.fetch_models(backend).await {
                Ok(models) => answers.push((backend.name.clone(), models)),
                Err(e) => {
                    tracing::warn!(backend = %backend.name, error = %e, "model discovery failed")
                }
            }
        }
        {
            let mut last = self.last_discovered.lock();
            for (name, models) in answers {
                if backends.iter().any(|b| b.name == name) {
                    last.insert(name, models);
                }
            }
        }
        self.install();
    }

    /// Re-runs discovery until the process ends.
    pub async fn follow(self: Arc<Self>) {
        loop {
            tokio::time::sleep(DISCOVERY_INTERVAL).await;
            self.discover().await;
        }
    }

    /// Checks every backend's `/health` at the configured interval until the process ends.
    pub async fn check_health(self: Arc<Self>, config: BalancerConfig) {
        let mut tick = tokio::time::interval(Duration::from_millis(config.health_interval_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let timeout = Duration::from_millis(config.health_timeout_ms);
        let config = &config;
        loop {
            tick.tick().await;
            let backends = self.backends();
            let checks = backends.iter().map(|b| {
                let request = self.http.get(format!("{}/health", b.url)).timeout(timeout);
                async move {
                    let ok = request.send().await.is_ok_and(|r| r.status().is_success());
                    if b.state.checked(ok, config) {
                        tracing::warn!(backend = %b.name, up = ok, "backend health changed");
                    }
                }
            });
            futures::future::join_all(checks).await;
        }
    }

    /// Reads every backend's `/metrics` at the configured interval, for `load_aware`.
    pub async fn scrape_load(self: Arc<Self>, config: BalancerConfig) {
        if config.strategy != Strategy::LoadAware {
            return;
        }
        let mut tick = tokio::time::interval(Duration::from_millis(config.scrape_interval_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let timeout = Duration::from_millis(config.health_timeout_ms);
            let backends = self.backends();
            let scrapes = backends.iter().map(|b| {
                let request = self.http.get(format!("{}/metrics", b.url)).timeout(timeout);
                async move {
                    let response = request.send().await;
                    if let Ok(text) = async { response?.error_for_status()?.text().await }.await {
                        b.state.scraped(&text);
                    }
                }
            });
            futures::future::join_all(scrapes).await;
        }
    }

    async fn fetch_models(&self, backend: &Backend) -> Result<ServedModels, String> {
        let url = format!("{}/v1/models", backend.url);
        let response = self
            .http
            .get(&url)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if !response.status().is_success() {
            return Err(format!("{url} answered {}", response.status()));
        }
        let list: ModelList = response.json().await.map_err(|e| e.to_string())?;
        Ok(list
            .data
            .into_iter()
            .map(|m| {
                let owned_by = m.owned_by.unwrap_or_else(|| backend.name.clone());
                (m.id, owned_by)
            })
            .collect())
    }

    /// Rebuilds the model table from the pool and what its backends last said they serve.
    fn install(&self) {
        let backends = self.backends();
        let discovered = self.last_discovered.lock().clone();
        let mut routes: BTreeMap<String, (String, Vec<Arc<Backend>>)> = BTreeMap::new();
        for backend in backends.iter() {
            for model in &backend.declared_models {
                routes
                    .entry(model.clone())
                    .or_insert_with(|| ("sluice".to_owned(), Vec::new()))
                    .1
                    .push(backend.clone());
            }
            for (model, owned_by) in discovered.get(&backend.name).into_iter().flatten() {
                routes
                    .entry(model.clone())
                    .or_insert_with(|| (owned_by.clone(), Vec::new()))
                    .1
                    .push(backend.clone());
            }
        }
        let current = self.models.load();
        let unchanged = current.len() == routes.len()
            && routes.iter().all(|(id, (_, backends))| {
                current.get(id).is_some_and(|r| {
                    r.backends.len() == backends.len()
                        && r.backends
                            .iter()
                            .zip(backends)
                            .all(|(a, b)| Arc::ptr_eq(a, b))
                })
            });
        if unchanged {
            return;
        }
        let table = routes
            .into_iter()
            .map(|(id, (owned_by, backends))| {
                let route = ModelRoute {
                    id: id.clone(),
                    owned_by,
                    backends,
                    cursor: AtomicUsize::new(0),
                };
                (id, Arc::new(route))
            })
            .collect();
        self.models.store(Arc::new(table));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(name: &str, port: u16, models: &[&str]) -> BackendConfig {
        BackendConfig {
            name: name.into(),
            url: format!("http://127.0.0.1:{port}"),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            models: models.iter().map(|m| m.to_string()).collect(),
        }
    }

    #[test]
    fn declared_models_route_round_robin() {
        let u = Upstreams::new(&[backend("a", 1, &["m1", "m2"]), backend("b", 2, &["m1"])]);
        let m1 = u.model("m1").unwrap();
        let picks: Vec<_> = (0..4)
            .map(|_| {
                m1.pick(Strategy::RoundRobin, &[], 0, 1.25)
                    .unwrap()
                    .name
                    .clone()
            })
            .collect();
        assert_eq!(picks, ["a", "b", "a", "b"]);
        let a = u.backends()[0].clone();
        assert_eq!(
            m1.pick(Strategy::RoundRobin, &[a], 0, 1.25).unwrap().name,
            "b",
            "tried backends are skipped"
        );
        assert_eq!(u.model("m2").unwrap().backends.len(), 1);
        assert!(u.model("m3").is_none());
    }

    #[test]
    fn ejection_never_takes_more_than_its_share_of_a_models_backends() {
        let config = BalancerConfig {
            eject_after: 1,
            ..BalancerConfig::default()
        };
        let configs: Vec<_> = (0..4)
            .map(|i| backend(&format!("b{i}"), 10 + i, &["m"]))
            .collect();
        let u = Upstreams::new(&configs);
        let m = u.model("m").unwrap();
        // Every backend fails every request, in turn, many times over.
        for _ in 0..5 {
            for b in &m.backends {
                m.backend_failed(b, &config);
            }
        }
        let ejected = m.backends.iter().filter(|b| b.state.ejected()).count();
        assert_eq!(ejected, 2, "50% of 4");
        assert_eq!(m.backends.iter().filter(|b| b.state.available()).count(), 2);

        // One backend: ejecting it would leave the model with none, so it stays.
        let single = Upstreams::new(&[backend("only", 20, &["s"])]);
        let s = single.model("s").unwrap();
        for _ in 0..10 {
            assert!(!s.backend_failed(&s.backends[0], &config));
        }
        assert!(s.backends[0].state.available());

        // 100% lets all go; 0% none.
        let all = BalancerConfig {
            max_ejection_percent: 100,
            ..config.clone()
        };
        let u = Upstreams::new(&configs[..2]);
        let m = u.model("m").unwrap();
        for b in &m.backends {
            assert!(m.backend_failed(b, &all));
        }
    }

    #[test]
    fn pool_changes_add_remove_and_keep_the_state_of_backends_that_stay() {
        let u = Upstreams::new(&[backend("a", 1, &["m1"]), backend("b", 2, &["m1"])]);
        let a = u.backends()[0].clone();
        a.state.in_flight.fetch_add(3, Ordering::Relaxed);
        assert!(!u.set_pool(&[]), "no change");
        assert!(u.set_pool(&[
            ("b".into(), None),
            ("c".into(), Some(backend("c", 3, &["m1", "m2"]))),
        ]));
        let names: Vec<_> = u.backends().iter().map(|b| b.name.clone()).collect();
        assert_eq!(names, ["a", "c"]);
        assert!(Arc::ptr_eq(&u.backends()[0], &a), "a kept its state");
        assert_eq!(u.backends()[0].state.in_flight.load(Ordering::Relaxed), 3);
        let m1: Vec<_> = u
            .model("m1")
            .unwrap()
            .backends
            .iter()
            .map(|b| b.name.clone())
            .collect();
        assert_eq!(m1, ["a", "c"]);
        assert!(u.model("m2").is_some());
        // Back to the configuration.
        assert!(u.set_pool(&[]));
        assert!(u.model("m2").is_none());
        assert_eq!(u.backends().len(), 2);
    }
}
