//! Redis over TLS (`rediss://`): a gateway trusts only the CA it was given and shows the
//! client certificate it was given; a Redis it cannot verify, or one that refuses it, stops
//! it at start with an error that says so, as an unreachable Redis does. The quota fleet
//! tests over TLS (one node, and a cluster with client certificates) are in quotas.rs.

use serde_json::json;
use sluice_e2e::tls::Ca;
use sluice_e2e::{
    Backend, Gateway, GatewayOptions, OwnRedis, RedisTlsServer, StoreKind, SIM_MODEL,
};
use std::path::PathBuf;

fn store(
    redis: &OwnRedis,
    ca: Option<PathBuf>,
    client: Option<sluice_e2e::tls::Leaf>,
) -> StoreKind {
    StoreKind::RedisTlsAt {
        url: redis.url(),
        prefix: format!("tls-{}", uuid::Uuid::new_v4().simple()),
        ca,
        client,
    }
}

/// Starts a gateway that must not start; its error (with the log's tail).
async fn refused(backend: &Backend, store: StoreKind) -> String {
    match Gateway::start(GatewayOptions::new(backend, store)).await {
        Ok(gw) => panic!("the gateway started:\n{}", gw.log()),
        Err(e) => e.to_string(),
    }
}

#[tokio::test]
async fn a_gateway_refuses_to_start_on_a_redis_whose_certificate_it_does_not_trust() {
    let backend = Backend::start().await.unwrap();
    let ca = Ca::new("redis CA").unwrap();
    let redis = OwnRedis::start_tls(RedisTlsServer::node_of(&ca, false).unwrap());
    let stranger = Ca::new("another CA").unwrap();
    for (trusting, ca) in [
        ("another CA", Some(stranger.cert().to_owned())),
        ("the system's roots", None),
    ] {
        let error = refused(&backend, store(&redis, ca, None)).await;
        assert!(
            error.contains(&format!("cannot connect to Redis at {}", redis.url())),
            "trusting {trusting}: {error}"
        );
        assert!(
            error.contains("invalid peer certificate") && error.contains("UnknownIssuer"),
            "trusting {trusting}, the error names the certificate: {error}"
        );
    }
    // The right CA opens it.
    let gw = Gateway::start(GatewayOptions::new(
        &backend,
        store(&redis, Some(ca.cert().to_owned()), None),
    ))
    .await
    .unwrap();
    gw.create_key("acme", "free").await.unwrap();
}

#[tokio::test]
async fn a_redis_that_asks_for_client_certificates_admits_only_a_gateway_showing_one_from_its_ca() {
    let backend = Backend::start().await.unwrap();
    let ca = Ca::new("redis CA").unwrap();
    let redis = OwnRedis::start_tls(RedisTlsServer::node_of(&ca, true).unwrap());
    let trusted = || Some(ca.cert().to_owned());
    let stranger = Ca::new("another CA").unwrap();
    for (showing, client) in [
        ("no certificate", None),
        (
            "a certificate from another CA",
            Some(stranger.client_cert("gateway").unwrap()),
        ),
    ] {
        let error = refused(&backend, store(&redis, trusted(), client)).await;
        assert!(
            error.contains(&format!("cannot connect to Redis at {}", redis.url())),
            "showing {showing}: {error}"
        );
    }

    let gw = Gateway::start(GatewayOptions::new(
        &backend,
        store(&redis, trusted(), Some(ca.client_cert("gateway").unwrap())),
    ))
    .await
    .unwrap();
    let (_, key) = gw.create_key("acme", "free").await.unwrap();
    let body = json!({"model": SIM_MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]});
    let r = gw
        .post_raw("/v1/chat/completions", Some(&key), body.to_string())
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        200,
        "a key kept in Redis over mutual TLS admits"
    );
}
