//! Every refusal a client or operator can meet, over real HTTP: the right status, OpenAI's
//! error shape, and a request id on every answer.

use serde_json::json;
use sluice_e2e::{
    admin_jwt, jwt, openai_error, Backend, Gateway, GatewayOptions, StoreKind, ADMIN_TOKEN,
    JWT_SECRET, SIM_MODEL,
};

const CHAT: &str = "/v1/chat/completions";

fn chat_body() -> String {
    json!({"model": SIM_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
        .to_string()
}

async fn setup() -> (Backend, Gateway, tempfile::TempDir) {
    let backend = Backend::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let gateway = Gateway::embedded(&backend, dir.path()).await.unwrap();
    (backend, gateway, dir)
}

async fn expect_error(response: reqwest::Response, status: u16, code: &str) -> String {
    assert_eq!(response.status().as_u16(), status);
    assert!(
        response.headers().contains_key("x-request-id"),
        "every answer carries x-request-id"
    );
    let (_, got_code, message) = openai_error(response).await.unwrap();
    assert_eq!(got_code, code, "{message}");
    message
}

#[tokio::test]
async fn missing_unknown_and_revoked_keys_get_401() {
    let (_backend, gw, _dir) = setup().await;

    let r = gw.post_raw(CHAT, None, chat_body()).await.unwrap();
    expect_error(r, 401, "invalid_api_key").await;

    let r = gw
        .post_raw(CHAT, Some("sk-sluice-0000"), chat_body())
        .await
        .unwrap();
    let message = expect_error(r, 401, "invalid_api_key").await;
    assert!(
        !message.contains("sk-sluice-0000"),
        "the key is never echoed"
    );

    let (id, key) = gw.create_key("acme", "free").await.unwrap();
    let r = gw.post_raw(CHAT, Some(&key), chat_body()).await.unwrap();
    assert_eq!(r.status(), 200);
    gw.revoke_key(&id).await.unwrap();
    let r = gw.post_raw(CHAT, Some(&key), chat_body()).await.unwrap();
    expect_error(r, 401, "invalid_api_key").await;

    // GET routes are guarded too.
    let r = gw
        .http
        .get(format!("{}/v1/models", gw.url))
        .send()
        .await
        .unwrap();
    expect_error(r, 401, "invalid_api_key").await;

    assert!(!gw.log().contains(&key), "the secret never reaches the log");
}

#[tokio::test]
async fn jwts_are_checked_for_signature_and_expiry() {
    let (_backend, gw, _dir) = setup().await;
    let good = jwt(json!({}), JWT_SECRET);
    let r = gw.post_raw(CHAT, Some(&good), chat_body()).await.unwrap();
    assert_eq!(r.status(), 200, "a good JWT is accepted");

    let forged = jwt(json!({}), "not-the-secret-not-the-secret-not-the-secret");
    let r = gw.post_raw(CHAT, Some(&forged), chat_body()).await.unwrap();
    expect_error(r, 401, "invalid_api_key").await;

    let now = jsonwebtoken::get_current_timestamp() as i64;
    let expired = jwt(json!({"exp": now - 3600}), JWT_SECRET);
    let r = gw
        .post_raw(CHAT, Some(&expired), chat_body())
        .await
        .unwrap();
    let message = expect_error(r, 401, "invalid_api_key").await;
    assert!(message.to_lowercase().contains("expired"), "{message}");

    let wrong_audience = jwt(json!({"aud": "someone-else"}), JWT_SECRET);
    let r = gw
        .post_raw(CHAT, Some(&wrong_audience), chat_body())
        .await
        .unwrap();
    expect_error(r, 401, "invalid_api_key").await;

    let unknown_tier = jwt(json!({"tier": "platinum"}), JWT_SECRET);
    let r = gw
        .post_raw(CHAT, Some(&unknown_tier), chat_body())
        .await
        .unwrap();
    expect_error(r, 401, "invalid_api_key").await;
}

#[tokio::test]
async fn bad_bodies_get_400_unknown_models_404_and_huge_bodies_413() {
    let backend = Backend::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(GatewayOptions {
        max_body_bytes: 64 * 1024,
        ..GatewayOptions::new(&backend, StoreKind::Embedded(dir.path().to_owned()))
    })
    .await
    .unwrap();
    let (_, secret) = gw.create_key("acme", "free").await.unwrap();
    let key = Some(secret.as_str());

    let r = gw.post_raw(CHAT, key, "{\"model\": \"x\",").await.unwrap();
    assert_eq!(r.status(), 400);
    let (kind, _, message) = openai_error(r).await.unwrap();
    assert_eq!(kind, "invalid_request_error");
    assert!(message.contains("line 1 column"), "says where: {message}");

    let r = gw
        .post_raw(CHAT, key, json!({"messages": []}).to_string())
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let (_, _, message) = openai_error(r).await.unwrap();
    assert!(message.contains("model"), "{message}");

    let r = gw
        .post_raw(
            CHAT,
            key,
            json!({"model": SIM_MODEL, "messages": [], "stream": "yes"}).to_string(),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let (_, _, message) = openai_error(r).await.unwrap();
    assert!(
        message.contains("boolean"),
        "names the wrong type: {message}"
    );

    let r = gw
        .post_raw(
            CHAT,
            key,
            json!({"model": "no-such-model", "messages": []}).to_string(),
        )
        .await
        .unwrap();
    expect_error(r, 404, "model_not_found").await;

    let r = gw
        .http
        .post(format!("{}/v1/nothing-here", gw.url))
        .bearer_auth(&secret)
        .send()
        .await
        .unwrap();
    expect_error(r, 404, "not_found").await;

    // Past the limit with a declared length, and past it in chunks of unknown total length.
    let huge = format!(
        "{{\"model\":\"{SIM_MODEL}\",\"messages\":[{{\"role\":\"user\",\"content\":\"{}\"}}]}}",
        "x".repeat(100 * 1024)
    );
    let r = gw.post_raw(CHAT, key, huge.clone()).await.unwrap();
    expect_error(r, 413, "request_too_large").await;
    let chunks = futures::stream::iter(
        huge.into_bytes()
            .chunks(8 * 1024)
            .map(|c| Ok::<_, std::io::Error>(c.to_vec()))
            .collect::<Vec<_>>(),
    );
    let r = gw
        .post_raw(CHAT, key, reqwest::Body::wrap_stream(chunks))
        .await
        .unwrap();
    expect_error(r, 413, "request_too_large").await;
}

#[tokio::test]
async fn bodies_past_pingoras_retry_buffer_are_forwarded_whole() {
    // pingora replays a pre-read body only up to 64 KiB on its own; vendor/README.md.
    let (_backend, gw, _dir) = setup().await;
    // Enterprise: the free tier's token limits are smaller than this prompt.
    let (_, key) = gw.create_key("acme", "enterprise").await.unwrap();
    let long_prompt = "word ".repeat(40_000);
    let body = json!({"model": SIM_MODEL, "messages": [{"role": "user", "content": long_prompt}], "max_tokens": 2});
    let r = gw
        .post_raw(CHAT, Some(&key), body.to_string())
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert!(
        v["usage"]["prompt_tokens"].as_u64().unwrap() >= 40_000,
        "{}",
        v["usage"]
    );
}

#[tokio::test]
async fn request_ids_are_kept_or_minted() {
    let (_backend, gw, _dir) = setup().await;
    let (_, key) = gw.create_key("acme", "free").await.unwrap();
    let r = gw
        .http
        .post(format!("{}{CHAT}", gw.url))
        .bearer_auth(&key)
        .header("x-request-id", "client-chose-this-1")
        .body(chat_body())
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "client-chose-this-1");
    assert!(r.headers().contains_key("x-sluice-backend"));

    let r = gw.post_raw(CHAT, Some(&key), chat_body()).await.unwrap();
    let minted = r.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert!(uuid::Uuid::parse_str(&minted).is_ok(), "{minted}");

    let r = gw
        .http
        .get(format!("{}/health", gw.url))
        .send()
        .await
        .unwrap();
    assert!(r.headers().contains_key("x-request-id"));
}

#[tokio::test]
async fn admin_api_needs_credentials_and_viewers_only_read() {
    let (_backend, gw, _dir) = setup().await;
    let keys = format!("{}/admin/v1/keys", gw.admin_url);
    let create = json!({"name": "n", "tenant": "t"});

    let r = gw.http.get(&keys).send().await.unwrap();
    expect_error(r, 401, "invalid_api_key").await;
    let r = gw
        .http
        .get(&keys)
        .bearer_auth("wrong-token")
        .send()
        .await
        .unwrap();
    expect_error(r, 401, "invalid_api_key").await;

    let viewer = admin_jwt(json!({"role": "viewer"}));
    let r = gw
        .http
        .get(&keys)
        .bearer_auth(&viewer)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = gw
        .http
        .post(&keys)
        .bearer_auth(&viewer)
        .json(&create)
        .send()
        .await
        .unwrap();
    expect_error(r, 403, "insufficient_permissions").await;

    let admin = admin_jwt(json!({"role": "admin"}));
    let r = gw
        .http
        .post(&keys)
        .bearer_auth(&admin)
        .json(&create)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);

    let no_role = admin_jwt(json!({}));
    let r = gw
        .http
        .get(&keys)
        .bearer_auth(&no_role)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);

    // Bad bodies say what is wrong.
    let r = gw
        .http
        .post(&keys)
        .bearer_auth(ADMIN_TOKEN)
        .body("{")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = gw
        .http
        .post(&keys)
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"name": "n", "tenant": "t", "tier": "gold"}))
        .send()
        .await
        .unwrap();
    let message = expect_error_any(r, 400).await;
    assert!(
        message.contains("gold") && message.contains("free"),
        "{message}"
    );
    let r = gw
        .http
        .post(&keys)
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"name": "n", "tenant": "t", "limits": {"requests_per_minute": "lots"}}))
        .send()
        .await
        .unwrap();
    let message = expect_error_any(r, 400).await;
    assert!(
        message.contains("lots") || message.contains("invalid type"),
        "{message}"
    );
}

async fn expect_error_any(response: reqwest::Response, status: u16) -> String {
    assert_eq!(response.status().as_u16(), status);
    openai_error(response).await.unwrap().2
}

#[tokio::test]
async fn a_model_whose_backends_are_all_gone_gets_503_in_openai_shape() {
    let (backend, gw, _dir) = setup().await;
    let (_, key) = gw.create_key("acme", "free").await.unwrap();
    drop(backend);
    let r = gw.post_raw(CHAT, Some(&key), chat_body()).await.unwrap();
    let message = expect_error(r, 503, "service_unavailable").await;
    assert!(message.contains("No backend is serving model"), "{message}");
}
