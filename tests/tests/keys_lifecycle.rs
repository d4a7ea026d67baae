//! API keys through the admin API, as an operator uses them: create (the secret shown once),
//! list, read, update, rotate, revoke; across restarts and across replicas.

use serde_json::json;
use sluice_e2e::{Backend, Gateway, GatewayOptions, StoreKind, SIM_MODEL};
use std::time::Duration;

fn chat_body() -> String {
    json!({"model": SIM_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        .to_string()
}

#[tokio::test]
async fn operator_manages_a_key_from_creation_to_revocation() {
    let backend = Backend::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::embedded(&backend, dir.path()).await.unwrap();
    use reqwest::Method;

    let (status, created) = gw
        .admin_json(
            Method::POST,
            "/admin/v1/keys",
            Some(json!({"name": "ci", "tenant": "acme", "tier": "pro",
                    "limits": {"requests_per_minute": 30, "monthly_budget": "12.50"}})),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().unwrap().to_owned();
    let secret = created["key"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("sk-"));
    assert_eq!(created["effective_limits"]["requests_per_minute"], 30);
    assert_eq!(created["effective_limits"]["monthly_budget"], "12.5");

    let (_, listed) = gw.admin_json(Method::GET, "/admin/v1/keys", None).await;
    let text = listed.to_string();
    assert!(text.contains(&id));
    assert!(!text.contains(&secret), "the secret is shown only once");
    let (_, one) = gw
        .admin_json(Method::GET, &format!("/admin/v1/keys/{id}"), None)
        .await;
    assert!(one.get("key").is_none());
    assert_eq!(one["tier"], "pro");

    let (status, updated) = gw
        .admin_json(
            Method::PATCH,
            &format!("/admin/v1/keys/{id}"),
            Some(json!({"tier": "enterprise", "limits": {}})),
        )
        .await;
    assert_eq!(status, 200, "{updated}");
    assert_eq!(updated["tier"], "enterprise");
    assert_eq!(updated["limits"], json!({}));

    let (status, rotated) = gw
        .admin_json(Method::POST, &format!("/admin/v1/keys/{id}/rotate"), None)
        .await;
    assert_eq!(status, 200);
    let new_secret = rotated["key"].as_str().unwrap().to_owned();
    assert_ne!(new_secret, secret);
    let old = gw
        .post_raw("/v1/chat/completions", Some(&secret), chat_body())
        .await
        .unwrap();
    assert_eq!(old.status(), 401, "the rotated-away secret stops working");
    let new = gw
        .post_raw("/v1/chat/completions", Some(&new_secret), chat_body())
        .await
        .unwrap();
    assert_eq!(new.status(), 200);

    let (status, revoked) = gw
        .admin_json(Method::DELETE, &format!("/admin/v1/keys/{id}"), None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(revoked["status"], "revoked");
    let r = gw
        .post_raw("/v1/chat/completions", Some(&new_secret), chat_body())
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    let (status, _) = gw
        .admin_json(Method::GET, "/admin/v1/keys/key_0000000000000000", None)
        .await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn embedded_store_keeps_keys_across_a_gateway_restart() {
    let backend = Backend::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::embedded(&backend, dir.path()).await.unwrap();
    let (_, key) = gw.create_key("acme", "free").await.unwrap();
    drop(gw);
    let gw = Gateway::embedded(&backend, dir.path()).await.unwrap();
    let r = gw
        .post_raw("/v1/chat/completions", Some(&key), chat_body())
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", gw.log());
}

#[tokio::test]
async fn revoked_key_is_refused_by_another_replica_within_a_second() {
    let backend = Backend::start().await.unwrap();
    let store = StoreKind::fresh_redis();
    let options = || GatewayOptions::new(&backend, store.clone());
    let a = Gateway::start(options()).await.unwrap();
    let b = Gateway::start(options()).await.unwrap();
    let (id, key) = a.create_key("acme", "free").await.unwrap();

    // The key made on A works on B, and B now holds it in its local cache.
    let r = b
        .post_raw("/v1/chat/completions", Some(&key), chat_body())
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", b.log());

    a.revoke_key(&id).await.unwrap();
    // The promise is "within one second" of the revocation answer.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let r = b
        .post_raw("/v1/chat/completions", Some(&key), chat_body())
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        401,
        "B still accepts a key revoked on A a second ago"
    );
}
