//! Where does it go? The backends this gateway knows, the models each serves, and the choice
//! of one backend for a request. Models are declared in the configuration or discovered from
//! each backend's `/v1/models`, re-read in the background so a backend that starts late (or
//! gains a model) is picked up without a restart. The pool itself is the configuration's
//! backends, changed at run time through the admin API (kept in the store, so every replica
//! applies the same changes): backends that stay keep their health and load.
//!
//! The choice itself (strategies, health, ejection) is the balancer's.

use crate::balancer::{self, BackendState, BalancerConfig, Strategy};
use crate::config::{BackendConfig, BackendKind};
use crate::outbound::{self, Outbound};
use arc_swap::ArcSwap;
use pingora_core::protocols::ALPN;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_http::RequestHeader;
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
    /// Where it is and how it is spoken to, as configured or added.
    pub config: BackendConfig,
    pub state: BackendState,
    /// A stable number for the backend (from its address), for rendezvous hashing.
    pub id: u64,
    /// Where it is now: its configured address, or what its host name last resolved to.
    addr: ArcSwap<SocketAddr>,
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

    /// An available backend not in `tried`, chosen by `strategy` among those of the best
    /// (lowest) priority left; `prefix` is the prompt's affinity hash.
    pub fn pick(
        &self,
        strategy: Strategy,
        tried: &[Arc<Backend>],
        prefix: u64,
        load_factor: f64,
    ) -> Option<Arc<Backend>> {
        let mut candidates: Vec<Arc<Backend>> = self
            .backends
            .iter()
            .filter(|b| b.state.available() && !tried.iter().any(|t| Arc::ptr_eq(t, b)))
            .cloned()
            .collect();
        let best = candidates.iter().map(|b| b.config.priority).min()?;
        candidates.retain(|b| b.config.priority == best);
        let ids: Vec<u64> = candidates.iter().map(|b| b.id).collect();
        let hints = balancer::Hints {
            turn: self.cursor.fetch_add(1, Ordering::Relaxed),
            prefix,
            load_factor,
            stale: SCRAPE_STALE,
        };
        balancer::choose(strategy, &candidates, &ids, hints).cloned()
    }

    /// How long until one of this model's backends comes back from its own rate limit,
    /// when that is all that keeps them all aside.
    pub fn backed_off_for(&self) -> Option<Duration> {
        self.backends
            .iter()
            .map(|b| b.state.backed_off_for())
            .collect::<Option<Vec<_>>>()?
            .into_iter()
            .min()
    }
}

pub struct Upstreams {
    configured: Vec<BackendConfig>,
    backends: ArcSwap<Vec<Arc<Backend>>>,
    models: ArcSwap<BTreeMap<String, Arc<ModelRoute>>>,
    /// What each backend (by name) last said it serves: a backend that is briefly
    /// unreachable keeps its models, so its clients see a 502 and not a vanished model.
    last_discovered: parking_lot::Mutex<std::collections::HashMap<String, ServedModels>>,
    outbound: Outbound,
}

impl Backend {
    fn new(c: &BackendConfig) -> Backend {
        Backend {
            name: c.name.clone(),
            config: c.clone(),
            state: BackendState::default(),
            id: crate::balancer::prefix_hash(c.url.as_bytes(), usize::MAX),
            addr: ArcSwap::from_pointee(c.addr),
        }
    }

    /// The address its connections go to now.
    pub fn addr(&self) -> SocketAddr {
        **self.addr.load()
    }

    /// Follows its host name to `found` (what a lookup gave): the address in use stays
    /// while it is among them, else the first is taken. Whether it moved.
    fn moved_to(&self, found: &[SocketAddr]) -> bool {
        let current = self.addr();
        match found.first() {
            Some(&first) if !found.contains(&current) => {
                self.addr.store(Arc::new(first));
                true
            }
            _ => false,
        }
    }

    /// Whether this backend is what `c` describes (so it can stay, state and all).
    fn is(&self, c: &BackendConfig) -> bool {
        self.name == c.name && self.config.spec == c.spec
    }

    /// Models named in the configuration or when it was added; empty means discovered.
    pub fn declared_models(&self) -> &[String] {
        &self.config.models
    }

    /// The connection its requests (and probes) go over: TLS with its name, trust and
    /// client certificate when it is `https://`.
    pub fn peer(&self, connect_timeout: Duration, read_timeout: Duration) -> HttpPeer {
        let tls = self.config.tls.as_ref();
        let server_name = tls.map_or_else(String::new, |t| t.server_name.clone());
        let mut peer = HttpPeer::new(self.addr(), tls.is_some(), server_name);
        peer.options.connection_timeout = Some(connect_timeout);
        peer.options.read_timeout = Some(read_timeout);
        if let Some(tls) = tls {
            peer.options.ca = tls.trust.ca.clone();
            peer.client_cert_key = tls.trust.client_cert.clone();
            peer.options.alpn = if tls.http2 { ALPN::H2H1 } else { ALPN::H1 };
        }
        peer
    }

    /// Sets what every request to it carries: its `Host`, its API key (never the client's),
    /// and its extra headers.
    pub fn set_headers(&self, request: &mut RequestHeader) -> pingora_error::Result<()> {
        request.insert_header(http::header::HOST, &self.config.host)?;
        if let Some(credential) = &self.config.credential {
            request.insert_header(credential.header.clone(), credential.value.clone())?;
        }
        for (name, value) in &self.config.headers {
            request.insert_header(name.clone(), value.clone())?;
        }
        Ok(())
    }

    /// The path (and query) a client's `/v1/...` request takes on this backend: its base
    /// path in place of `/v1`.
    pub fn path_for(&self, client_path: &str) -> Option<String> {
        let base = &self.config.base_path;
        if base == "/v1" {
            return None;
        }
        let rest = client_path.strip_prefix("/v1").unwrap_or(client_path);
        Some(format!("{base}{rest}"))
    }

    /// The name this backend knows `model` by, when it is another.
    pub fn model_name(&self, model: &str) -> Option<&str> {
        self.config.model_map.get(model).map(String::as_str)
    }

    /// A GET of `path` on this backend, as a probe sends it.
    fn probe_request(&self, path: &str) -> pingora_error::Result<RequestHeader> {
        let mut request = RequestHeader::build("GET", path.as_bytes(), None)?;
        self.set_headers(&mut request)?;
        Ok(request)
    }

    /// Where its health is read: `/health` on an engine beside the gateway, the models
    /// list on a hosted API (which has no health endpoint).
    fn health_path(&self) -> String {
        match self.config.kind {
            BackendKind::Sluice => "/health".to_owned(),
            BackendKind::OpenAiCompatible => self.models_path(),
        }
    }

    fn models_path(&self) -> String {
        format!("{}/models", self.config.base_path)
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
        let upstreams = Upstreams {
            configured: configs.to_vec(),
            last_discovered: Default::default(),
            backends: ArcSwap::from_pointee(backends),
            models: ArcSwap::from_pointee(BTreeMap::new()),
            outbound: Outbound::default(),
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
        for backend in backends.iter().filter(|b| b.declared_models().is_empty()) {
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

    /// Checks every backend's health at the configured interval until the process ends.
    pub async fn check_health(self: Arc<Self>, config: BalancerConfig) {
        let mut tick = tokio::time::interval(Duration::from_millis(config.health_interval_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let timeout = Duration::from_millis(config.health_timeout_ms);
        let config = &config;
        let this = &self;
        loop {
            tick.tick().await;
            let backends = self.backends();
            let checks = backends.iter().map(|b| async move {
                let ok = this
                    .probe(b, &b.health_path(), timeout)
                    .await
                    .is_ok_and(|answer| (200..300).contains(&answer.status));
                if b.state.checked(ok, config) {
                    tracing::warn!(backend = %b.name, up = ok, "backend health changed");
                }
            });
            futures::future::join_all(checks).await;
        }
    }

    /// Looks every backend's host name up again each `dns_refresh_secs`: a hosted API or a
    /// service whose address changes is followed without a restart. A lookup that fails
    /// keeps the address in use (and says so in the log).
    pub async fn follow_addresses(self: Arc<Self>, config: BalancerConfig) {
        if config.dns_refresh_secs == 0 {
            return;
        }
        let mut tick = tokio::time::interval(Duration::from_secs(config.dns_refresh_secs));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first tick is now, and every address was looked up at start.
        tick.tick().await;
        loop {
            tick.tick().await;
            let backends = self.backends();
            let lookups = backends.iter().filter_map(|b| {
                let (host, port) = b.config.lookup.as_ref()?;
                Some(async move {
                    match tokio::net::lookup_host((host.as_str(), *port)).await {
                        Ok(found) => {
                            let from = b.addr();
                            if b.moved_to(&found.collect::<Vec<_>>()) {
                                tracing::info!(backend = %b.name, %from, to = %b.addr(), "backend address changed");
                                crate::metrics::get().record_backend_address_change(&b.name);
                            }
                        }
                        Err(e) => tracing::warn!(
                            backend = %b.name,
                            host = %host,
                            error = %e,
                            "backend host name did not resolve; its address stays"
                        ),
                    }
                })
            });
            futures::future::join_all(lookups).await;
        }
    }

    /// Reads every engine's `/metrics` at the configured interval, for `load_aware`.
    pub async fn scrape_load(self: Arc<Self>, config: BalancerConfig) {
        if config.strategy != Strategy::LoadAware {
            return;
        }
        let mut tick = tokio::time::interval(Duration::from_millis(config.scrape_interval_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let this = &self;
        loop {
            tick.tick().await;
            let timeout = Duration::from_millis(config.health_timeout_ms);
            let backends = self.backends();
            let scrapes = backends
                .iter()
                .filter(|b| b.config.kind == BackendKind::Sluice)
                .map(|b| async move {
                    match this.probe(b, "/metrics", timeout).await {
                        Ok(answer) if answer.status == 200 => {
                            b.state.scraped(&String::from_utf8_lossy(&answer.body))
                        }
                        _ => {}
                    }
                });
            futures::future::join_all(scrapes).await;
        }
    }

    async fn probe(
        &self,
        backend: &Backend,
        path: &str,
        timeout: Duration,
    ) -> Result<outbound::Answer, String> {
        let request = backend.probe_request(path).map_err(|e| e.to_string())?;
        self.outbound
            .send(&backend.peer(timeout, timeout), request, None, timeout)
            .await
    }

    async fn fetch_models(&self, backend: &Backend) -> Result<ServedModels, String> {
        let path = backend.models_path();
        let answer = self.probe(backend, &path, DISCOVERY_TIMEOUT).await?;
        if !(200..300).contains(&answer.status) {
            return Err(format!("{path} answered {}", answer.status));
        }
        let list: ModelList = serde_json::from_slice(&answer.body).map_err(|e| e.to_string())?;
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
            for model in backend.declared_models() {
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

/// The most of a 400's body read to tell a context-length refusal (they are a few hundred
/// bytes); a longer one is passed on as it is.
pub const MAX_REFUSAL_BYTES: usize = 16 << 10;

/// Whether a 400's body says the prompt does not fit the model's context (OpenAI's
/// `context_length_exceeded`, vLLM's and others' "maximum context length" wording), which
/// another model may take, as opposed to a mistake in the request, which no model would.
pub fn is_context_length_refusal(body: &[u8]) -> bool {
    let Ok(answer) = serde_json::from_slice::<serde_json::Value>(body) else {
        return false;
    };
    let error = answer.get("error").unwrap_or(&answer);
    let code = error.get("code").and_then(|c| c.as_str()).unwrap_or("");
    if matches!(code, "context_length_exceeded" | "string_above_max_length") {
        return true;
    }
    let message = error
        .get("message")
        .and_then(|m| m.as_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    [
        "context length",
        "context window",
        "maximum context",
        "too many tokens",
        "prompt is too long",
    ]
    .iter()
    .any(|phrase| message.contains(phrase))
}

/// The longest a backend's own rate limit sets it aside for, whatever it asks.
const MAX_BACKOFF: Duration = Duration::from_secs(600);
/// How long a 429 without a usable `Retry-After` sets a backend aside.
const DEFAULT_BACKOFF: Duration = Duration::from_secs(1);

/// How long a backend's answer says to leave it alone, if it does: a 429's `retry-after-ms`
/// or `Retry-After` (seconds; one second when missing or a date), and, from a hosted API,
/// an `x-ratelimit-remaining-requests` or `-tokens` at 0 until its `x-ratelimit-reset-*`.
pub fn rate_limit_wait(
    backend: &Backend,
    status: u16,
    headers: &http::HeaderMap,
) -> Option<Duration> {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    let wait = if status == 429 {
        let ms = header("retry-after-ms").and_then(|v| v.parse::<f64>().ok());
        let secs = header("retry-after").and_then(|v| v.parse::<f64>().ok());
        ms.map(|ms| ms / 1000.0)
            .or(secs)
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map_or(DEFAULT_BACKOFF, Duration::from_secs_f64)
    } else if backend.config.kind == BackendKind::OpenAiCompatible {
        ["requests", "tokens"]
            .iter()
            .filter(|what| header(&format!("x-ratelimit-remaining-{what}")) == Some("0"))
            .filter_map(|what| header(&format!("x-ratelimit-reset-{what}")).and_then(go_duration))
            .max()?
    } else {
        return None;
    };
    Some(wait.min(MAX_BACKOFF))
}

/// A duration as OpenAI's `x-ratelimit-reset-*` write it (`1s`, `6m0s`, `20ms`, `1h2m3.5s`),
/// or a bare number of seconds.
fn go_duration(text: &str) -> Option<Duration> {
    if let Ok(secs) = text.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs));
    }
    let mut total = 0.0;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .filter(|&end| end > 0)?;
        let value: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 0.001,
            "us" | "µs" => 0.000_001,
            "ns" => 0.000_000_001,
            _ => return None,
        };
        total += value * scale;
        rest = &rest[unit_len..];
    }
    Some(Duration::from_secs_f64(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(name: &str, port: u16, models: &[&str]) -> BackendConfig {
        let url = format!("http://127.0.0.1:{port}");
        let models = models.iter().map(|m| m.to_string()).collect();
        crate::config::backend(
            name,
            crate::backend_spec::BackendSpec::plain(None, url, models),
        )
        .unwrap()
    }

    #[test]
    fn a_backend_follows_its_name_only_when_its_address_is_no_longer_given() {
        let b = Backend::new(&backend("named", 1, &["m"]));
        let configured = b.addr();
        let elsewhere: SocketAddr = "127.0.0.2:1".parse().unwrap();
        assert!(
            !b.moved_to(&[]),
            "a lookup with no answer keeps the address"
        );
        assert!(
            !b.moved_to(&[elsewhere, configured]),
            "still among the answers"
        );
        assert_eq!(b.addr(), configured);
        assert!(b.moved_to(&[elsewhere]));
        assert_eq!(b.addr(), elsewhere);
        let peer = b.peer(Duration::from_secs(1), Duration::from_secs(1));
        assert_eq!(
            peer._address,
            pingora_core::protocols::l4::socket::SocketAddr::Inet(elsewhere)
        );
    }

    #[test]
    fn rate_limit_waits_come_from_retry_after_or_a_hosted_apis_exhausted_budget() {
        let mut hosted = backend("hosted", 1, &["m"]);
        hosted.kind = BackendKind::OpenAiCompatible;
        let hosted = Backend::new(&hosted);
        let engine = Backend::new(&backend("engine", 2, &["m"]));
        let headers = |pairs: &[(&'static str, &str)]| {
            let mut map = http::HeaderMap::new();
            for (name, value) in pairs {
                map.insert(*name, value.parse().unwrap());
            }
            map
        };
        let wait = |b: &Backend, status, pairs: &[(&'static str, &str)]| {
            rate_limit_wait(b, status, &headers(pairs))
        };
        assert_eq!(
            wait(&engine, 429, &[("retry-after", "7")]),
            Some(Duration::from_secs(7))
        );
        assert_eq!(
            wait(
                &engine,
                429,
                &[("retry-after-ms", "250"), ("retry-after", "7")]
            ),
            Some(Duration::from_millis(250))
        );
        assert_eq!(wait(&engine, 429, &[]), Some(DEFAULT_BACKOFF));
        assert_eq!(
            wait(
                &engine,
                429,
                &[("retry-after", "Wed, 21 Oct 2015 07:28:00 GMT")]
            ),
            Some(DEFAULT_BACKOFF)
        );
        assert_eq!(
            wait(&engine, 429, &[("retry-after", "99999999")]),
            Some(MAX_BACKOFF)
        );
        assert_eq!(
            wait(&engine, 429, &[("retry-after", "-3")]),
            Some(DEFAULT_BACKOFF)
        );
        let exhausted = [
            ("x-ratelimit-remaining-requests", "0"),
            ("x-ratelimit-reset-requests", "6m0s"),
            ("x-ratelimit-remaining-tokens", "10"),
            ("x-ratelimit-reset-tokens", "20ms"),
        ];
        assert_eq!(
            wait(&hosted, 200, &exhausted),
            Some(Duration::from_secs(360))
        );
        assert_eq!(
            wait(&engine, 200, &exhausted),
            None,
            "engines do not speak for a provider"
        );
        assert_eq!(
            wait(
                &hosted,
                200,
                &[
                    ("x-ratelimit-remaining-requests", "5"),
                    ("x-ratelimit-reset-requests", "1s")
                ]
            ),
            None
        );
        assert_eq!(
            go_duration("1h2m3.5s"),
            Some(Duration::from_secs_f64(3723.5))
        );
        assert_eq!(go_duration("20ms"), Some(Duration::from_millis(20)));
        assert_eq!(go_duration("2"), Some(Duration::from_secs(2)));
        assert_eq!(go_duration("soon"), None);
        assert_eq!(go_duration("5x"), None);
    }

    #[test]
    fn context_length_refusals_are_told_from_other_bad_requests() {
        let refusals = [
            r#"{"error":{"message":"This model's maximum context length is 8192 tokens. However, your messages resulted in 9000 tokens.","type":"invalid_request_error","param":"messages","code":"context_length_exceeded"}}"#,
            r#"{"object":"error","message":"This model's maximum context length is 2048 tokens. However, you requested 3000 tokens (2990 in the messages, 10 in the completion).","type":"BadRequestError","param":null,"code":400}"#,
            r#"{"error":{"message":"prompt is too long: 210000 tokens > 200000 maximum","type":"invalid_request_error"}}"#,
            r#"{"error":{"message":"Input exceeds the model's context window.","code":null}}"#,
        ];
        for body in refusals {
            assert!(is_context_length_refusal(body.as_bytes()), "{body}");
        }
        let mistakes = [
            r#"{"error":{"message":"'temperature' must be between 0 and 2","type":"invalid_request_error","code":"invalid_value"}}"#,
            r#"{"error":{"message":"Unknown model","code":"model_not_found"}}"#,
            "context length exceeded (not JSON)",
            "",
        ];
        for body in mistakes {
            assert!(!is_context_length_refusal(body.as_bytes()), "{body}");
        }
    }

    #[test]
    fn a_lower_priority_serves_only_when_no_backend_of_a_higher_one_can() {
        let mut hosted = backend("hosted", 3, &["m"]);
        hosted.priority = 1;
        let u = Upstreams::new(&[
            backend("gpu-a", 1, &["m"]),
            hosted,
            backend("gpu-b", 2, &["m"]),
        ]);
        let m = u.model("m").unwrap();
        for _ in 0..6 {
            let name = m
                .pick(Strategy::RoundRobin, &[], 0, 1.25)
                .unwrap()
                .name
                .clone();
            assert_ne!(name, "hosted");
        }
        let gpus: Vec<_> = m
            .backends
            .iter()
            .filter(|b| b.name.starts_with("gpu"))
            .cloned()
            .collect();
        assert_eq!(
            m.pick(Strategy::RoundRobin, &gpus, 0, 1.25).unwrap().name,
            "hosted"
        );
        // Set aside by its own rate limit, a backend is not picked; when all are, the route
        // says for how long.
        for b in &m.backends {
            b.state
                .back_off(Duration::from_secs(30 + b.config.priority as u64));
        }
        assert!(m.pick(Strategy::RoundRobin, &[], 0, 1.25).is_none());
        let wait = m.backed_off_for().unwrap();
        assert!(
            wait > Duration::from_secs(28) && wait <= Duration::from_secs(30),
            "{wait:?}"
        );
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
