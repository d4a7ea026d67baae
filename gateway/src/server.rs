//! How does a replica start and stop? Brings the gateway's state up, starts the admin API,
//! the background followers and the proxy, and on SIGTERM drains requests and flushes usage.

use crate::admin;
use crate::app::Gateway;
use crate::config::Config;
use crate::connections::Capped;
use crate::proxy::Proxy;
use crate::tls::ServedCertificate;
use anyhow::Context;
use pingora_core::server::configuration::ServerConf;
use pingora_core::server::Server;

/// Runs the gateway until a signal stops it. On SIGTERM (or Ctrl-C) the listener closes,
/// requests in flight (streams included) get `grace_period_secs` to finish, and the usage
/// events they produced are written to the store (or the journal) before this returns.
pub fn run(config: Config) -> anyhow::Result<()> {
    crate::tls::install_crypto_provider();
    // Store connections, the admin API and background followers live on their own small
    // runtime, so they keep running while pingora's proxy threads serve traffic. One worker:
    // with two, each task it spawned (a lease taken ahead, a store write) woke the other to
    // steal it, a context switch on cores the proxy threads need (docs/benchmarks.md, fourth
    // profile); its blocking work (the embedded store's writes) has threads of its own.
    let support = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("sluice-support")
        .enable_all()
        .build()?;
    let (gateway, usage_writer) = support.block_on(Gateway::build(config.clone()))?;
    support.spawn(usage_writer.run());
    if let Some(ledger) = &gateway.ledger {
        support.spawn(ledger.clone().run_retention());
    }
    if let Some(feed) = &gateway.feed {
        support.spawn(feed.clone().run());
    }
    if let Some(alerts) = &gateway.alerts {
        support.spawn(alerts.clone().run());
    }
    for jwks in [&gateway.jwt, &gateway.admin_jwt]
        .into_iter()
        .flatten()
        .filter_map(|verifier| verifier.jwks.clone())
    {
        support.spawn(jwks.run());
    }

    let served_certificate = match &config.tls {
        Some(tls) => {
            let served = ServedCertificate::load(&tls.cert_file, &tls.key_file)?;
            support.spawn(served.clone().follow(tls.reload_check));
            Some(served)
        }
        None => None,
    };
    let admin_tls = match (&config.tls, &served_certificate) {
        (Some(tls), Some(served)) if tls.admin => Some(crate::tls::admin_acceptor(
            served.clone(),
            tls.admin_client_ca_file.as_deref(),
        )?),
        _ => None,
    };
    let admin_listener = support
        .block_on(tokio::net::TcpListener::bind(config.admin_listen))
        .with_context(|| format!("cannot listen on {} (admin)", config.admin_listen))?;
    support.spawn(admin::serve(admin_listener, admin_tls, gateway.clone()));
    support.spawn(gateway.clone().follow_changes());
    support.spawn(gateway.admission.clone().run());
    support.spawn(gateway.datasets.clone().run());
    support.spawn(crate::traffic::record(gateway.store.clone()));
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
    support.spawn(
        gateway
            .upstreams
            .clone()
            .follow_addresses(config.balancer.clone()),
    );

    if config.admin_token.is_none() && config.admin_jwt.is_none() {
        tracing::warn!(
            "no admin credentials configured (SLUICE_ADMIN_TOKEN or auth.admin_jwt): \
             the admin API refuses every call"
        );
    }
    let models = gateway.upstreams.models();
    tracing::info!(
        listen = %config.listen,
        admin = %config.admin_listen,
        tls = config.tls.is_some(),
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
    let mut proxy_app =
        pingora_proxy::http_proxy(&server.configuration, Proxy::new(gateway.clone()));
    if config.h2c {
        let mut options = pingora_core::apps::HttpServerOptions::default();
        options.h2c = true;
        proxy_app.server_options = Some(options);
    }
    let mut proxy = pingora_core::services::listening::Service::new(
        "sluice-proxy".to_owned(),
        Capped::new(proxy_app, config.max_connections),
    );
    let listen = config.listen.to_string();
    match (&config.tls, served_certificate) {
        (Some(tls), Some(served)) => {
            let settings = crate::tls::proxy_settings(served, tls.http2)?;
            proxy.add_tls_with_settings(&listen, None, settings);
        }
        _ => proxy.add_tcp(&listen),
    }
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
