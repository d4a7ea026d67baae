//! JWTs verified with an identity provider's published keys (`[auth.jwt] jwks_url`), served
//! here by a local JWKS endpoint: keys rotate without a restart, made-up key ids cannot make
//! the gateway hammer the provider, and a provider that is down at start is asked again.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use sluice_e2e::{
    Backend, Gateway, GatewayOptions, StoreKind, JWT_AUDIENCE, JWT_ISSUER, JWT_SECRET, SIM_MODEL,
};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn fixture(name: &str) -> String {
    let path = format!(
        "{}/../gateway/tests/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// A fixture key as a JWK with the given id.
fn jwk(which: &str, kid: &str) -> Value {
    let keys: Value = serde_json::from_str(&fixture("public-jwks.json")).unwrap();
    let mut key = keys[which].clone();
    key["kid"] = json!(kid);
    key
}

/// The provider: answers its current key set (or 503 while `down`), and counts the fetches.
#[derive(Clone, Default)]
struct Provider {
    keys: Arc<Mutex<Vec<Value>>>,
    down: Arc<std::sync::atomic::AtomicBool>,
    fetches: Arc<AtomicU64>,
}

impl Provider {
    async fn start(&self) -> String {
        async fn jwks(State(p): State<Provider>) -> Result<Json<Value>, axum::http::StatusCode> {
            p.fetches.fetch_add(1, Ordering::SeqCst);
            if p.down.load(Ordering::SeqCst) {
                return Err(axum::http::StatusCode::SERVICE_UNAVAILABLE);
            }
            Ok(Json(json!({"keys": *p.keys.lock().unwrap()})))
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "http://{}/.well-known/jwks.json",
            listener.local_addr().unwrap()
        );
        let app = Router::new()
            .route("/.well-known/jwks.json", get(jwks))
            .with_state(self.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        url
    }

    fn publish(&self, keys: Vec<Value>) {
        *self.keys.lock().unwrap() = keys;
    }

    fn fetches(&self) -> u64 {
        self.fetches.load(Ordering::SeqCst)
    }
}

/// A token for the gateway's issuer and audience, signed by a fixture key under `kid`.
fn token(alg: Algorithm, kid: &str, subject: &str) -> String {
    let now = jsonwebtoken::get_current_timestamp();
    let claims = json!({"sub": subject, "tenant": "idp-tenant", "tier": "pro",
        "iss": JWT_ISSUER, "aud": JWT_AUDIENCE, "exp": now + 300, "iat": now});
    let key = match alg {
        Algorithm::ES256 => EncodingKey::from_ec_pem(fixture("ec-private.pem").as_bytes()),
        _ => EncodingKey::from_rsa_pem(fixture("rsa-private.pem").as_bytes()),
    }
    .unwrap();
    let mut header = Header::new(alg);
    header.kid = Some(kid.to_owned());
    jsonwebtoken::encode(&header, &claims, &key).unwrap()
}

async fn status(gw: &Gateway, token: &str) -> u16 {
    gw.post_raw(
        "/v1/chat/completions",
        Some(token),
        json!({"model": SIM_MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
            .to_string(),
    )
    .await
    .unwrap()
    .status()
    .as_u16()
}

async fn gateway(backend: &Backend, url: &str, dir: &tempfile::TempDir) -> Gateway {
    Gateway::start(GatewayOptions {
        jwt_config: format!(
            "jwks_url = {url:?}\njwks_min_refresh_secs = 1\njwks_refresh_secs = 3600\n"
        ),
        ..GatewayOptions::new(backend, StoreKind::Embedded(dir.path().to_owned()))
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn a_rotated_key_works_without_a_restart_and_unknown_kids_are_rate_bounded() {
    let provider = Provider::default();
    provider.publish(vec![jwk("rsa", "k1")]);
    let url = provider.start().await;
    let backend = Backend::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway(&backend, &url, &dir).await;
    assert_eq!(provider.fetches(), 1, "fetched once at start");

    // A token signed with the published key works; one signed with a key not yet published
    // does not. The shared secret still works beside the provider's keys.
    assert_eq!(status(&gw, &token(Algorithm::RS256, "k1", "u1")).await, 200);
    assert_eq!(status(&gw, &token(Algorithm::ES256, "k2", "u1")).await, 401);
    let hs = sluice_e2e::jwt(json!({}), JWT_SECRET);
    assert_eq!(status(&gw, &hs).await, 200);

    // The provider rotates: k2 in, k1 out. The first k2 token makes the gateway fetch again.
    provider.publish(vec![jwk("ec", "k2")]);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let before = provider.fetches();
    assert_eq!(status(&gw, &token(Algorithm::ES256, "k2", "u2")).await, 200);
    assert_eq!(provider.fetches(), before + 1);
    assert_eq!(status(&gw, &token(Algorithm::RS256, "k1", "u1")).await, 401);

    // A flood of made-up key ids fetches at most once per jwks_min_refresh_secs (1 s here),
    // however many arrive: the bound is the flood's own duration in seconds, plus one.
    let forged: Vec<String> = (0..60)
        .map(|i| token(Algorithm::ES256, &format!("forged-{i}"), "x"))
        .collect();
    let before = provider.fetches();
    let started = std::time::Instant::now();
    for t in &forged {
        assert_eq!(status(&gw, t).await, 401);
    }
    let during = provider.fetches() - before;
    let bound = started.elapsed().as_secs() + 1;
    assert!(
        during <= bound,
        "{during} fetches for 60 unknown key ids in under {bound} s"
    );

    // A token that names k2 but is signed by another key (and algorithm) is refused.
    assert_eq!(status(&gw, &token(Algorithm::RS256, "k2", "u2")).await, 401);
    assert_eq!(status(&gw, &token(Algorithm::ES256, "k2", "u2")).await, 200);
}

#[tokio::test]
async fn a_provider_down_at_start_is_asked_again_when_a_token_arrives() {
    let provider = Provider::default();
    provider.publish(vec![jwk("rsa", "k1")]);
    provider.down.store(true, Ordering::SeqCst);
    let url = provider.start().await;
    let backend = Backend::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    // The gateway starts without the keys, and says why.
    let gw = gateway(&backend, &url, &dir).await;
    gw.wait_for_log("JWKS not fetched at start").await;
    assert_eq!(status(&gw, &token(Algorithm::RS256, "k1", "u1")).await, 401);

    provider.down.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(status(&gw, &token(Algorithm::RS256, "k1", "u1")).await, 200);
}

/// A key set and a spend-alert webhook over HTTPS: trusted through the CA the gateway's
/// environment names (`SSL_CERT_FILE`), and not without it.
#[tokio::test]
async fn a_key_set_and_an_alert_webhook_over_https_are_trusted_through_the_named_ca() {
    let ca = sluice_e2e::tls::Ca::new("idp-ca").unwrap();
    let served = tempfile::tempdir().unwrap();
    std::fs::write(
        served.path().join("jwks.json"),
        json!({"keys": [jwk("rsa", "k1")]}).to_string(),
    )
    .unwrap();
    let leaf = ca.server_cert("idp").unwrap();
    let server = sluice_e2e::PythonServer::start(
        "https_server.py",
        &[
            leaf.cert.as_os_str(),
            leaf.key.as_os_str(),
            served.path().as_os_str(),
        ],
    )
    .await
    .unwrap();
    let url = format!("https://127.0.0.1:{}", server.port);
    let backend = Backend::start().await.unwrap();
    let secret = "alerts-webhook-secret-0123456789";
    let options = |dir: &tempfile::TempDir, trust: bool| {
        GatewayOptions {
        jwt_config: format!("jwks_url = \"{url}/jwks.json\"\n"),
        extra_config: format!(
            "[quotas]\nlease_max_requests = 0\n\n[alerts]\nwebhook_url = \"{url}/hooks/sluice\"\nwebhook_secret = \"{secret}\"\nthresholds = [50]\ncheck_interval_ms = 200\n\n[[prices]]\nmodel = \"{SIM_MODEL}\"\ntier = \"*\"\ncurrency = \"USD\"\ninput = \"0\"\noutput = \"1000\"\n"
        ),
        env: if trust {
            vec![("SSL_CERT_FILE".into(), ca.cert().display().to_string())]
        } else {
            Vec::new()
        },
        ..GatewayOptions::new(&backend, StoreKind::Embedded(dir.path().to_owned()))
    }
    };

    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(options(&dir, true)).await.unwrap();
    assert_eq!(status(&gw, &token(Algorithm::RS256, "k1", "u1")).await, 200);
    // A key whose budget is passed halfway by one request: its alert reaches the webhook.
    let (_, key) = gw
        .create_key_with("finance", "pro", json!({"monthly_budget": "0.002"}))
        .await
        .unwrap();
    assert_eq!(status(&gw, &key).await, 200);
    let posts = served.path().join("posts.jsonl");
    let mut delivered = String::new();
    for _ in 0..200 {
        delivered = std::fs::read_to_string(&posts).unwrap_or_default();
        if !delivered.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let post: Value =
        serde_json::from_str(delivered.lines().next().expect("a webhook POST")).unwrap();
    assert_eq!(post["path"], "/hooks/sluice");
    assert!(post["headers"]["x-sluice-signature"]
        .as_str()
        .unwrap()
        .starts_with("t="));
    let alert: Value = serde_json::from_str(post["body"].as_str().unwrap()).unwrap();
    assert_eq!(alert["type"], "budget.threshold_reached");
    assert_eq!(alert["threshold_percent"], 50);

    // Without the CA, the provider's certificate is not trusted: no keys, and it says why.
    let dir = tempfile::tempdir().unwrap();
    let untrusting = Gateway::start(options(&dir, false)).await.unwrap();
    untrusting.wait_for_log("JWKS not fetched at start").await;
    assert_eq!(
        status(&untrusting, &token(Algorithm::RS256, "k1", "u1")).await,
        401
    );
}
