//! Limits for one model alone: set on a tier, a key or a tenant, they refuse only requests
//! for that model, name themselves in the refusal, and hold exactly across three replicas.

use futures::StreamExt;
use serde_json::{json, Value};
use sluice_e2e::{Backend, Gateway, StoreKind, SIM_EMBED_MODEL, SIM_MODEL};

fn chat() -> String {
    json!({"model": SIM_MODEL, "max_tokens": 2,
           "messages": [{"role": "user", "content": "hello"}]})
    .to_string()
}

fn embed() -> String {
    json!({"model": SIM_EMBED_MODEL, "input": "hello"}).to_string()
}

/// An admin write with a JSON body: status and answer.
async fn admin_write(
    gw: &Gateway,
    method: reqwest::Method,
    path: &str,
    body: Value,
) -> (u16, Value) {
    gw.admin_json(method, path, Some(body)).await
}

/// Sends one request; returns its status and the limit that refused it, if one did.
async fn send(gw: &Gateway, key: &str, chat_or_embed: bool) -> (u16, Option<String>) {
    let (path, body) = if chat_or_embed {
        ("/v1/chat/completions", chat())
    } else {
        ("/v1/embeddings", embed())
    };
    let r = gw.post_raw(path, Some(key), body).await.unwrap();
    let status = r.status().as_u16();
    let limit = r
        .headers()
        .get("x-sluice-limit")
        .map(|v| v.to_str().unwrap().to_owned());
    let answer: Value = r.json().await.unwrap();
    if status == 429 {
        let message = answer["error"]["message"].as_str().unwrap();
        let named = limit.as_deref().unwrap_or_default();
        assert!(message.contains(named), "{message} names {named}");
    }
    (status, limit)
}

#[tokio::test]
async fn a_model_limit_on_a_tier_a_key_or_a_tenant_refuses_only_that_model() {
    let backend = Backend::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::embedded(&backend, dir.path()).await.unwrap();

    // The tier: two chat requests a minute, embeddings as before.
    let (status, tier) = admin_write(
        &gw,
        reqwest::Method::PUT,
        "/admin/v1/tiers/pro",
        json!({"limits": {"requests_per_minute": 1000},
               "model_limits": {SIM_MODEL: {"requests_per_minute": 2}}}),
    )
    .await;
    assert_eq!(status, 200, "{tier}");
    assert_eq!(tier["model_limits"][SIM_MODEL]["requests_per_minute"], 2);
    let (id, key) = gw.create_key("acme", "pro").await.unwrap();
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(send(&gw, &key, true).await);
    }
    for _ in 0..3 {
        seen.push(send(&gw, &key, false).await);
    }
    let refused = Some(format!("key/{SIM_MODEL}.requests_per_minute"));
    assert_eq!(
        seen,
        [
            (200, None),
            (200, None),
            (429, refused),
            (200, None),
            (200, None),
            (200, None)
        ]
    );
    // Once the embeddings' quota lease is given back (leases are for every model alike).
    let mut q = Value::Null;
    for _ in 0..100 {
        q = gw
            .admin(reqwest::Method::GET, &format!("/admin/v1/keys/{id}/quota"))
            .await
            .unwrap()
            .1;
        if q["max_concurrent"]["in_flight"] == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(
        q["models"][SIM_MODEL]["requests_per_minute"]["used"], 2,
        "{q}"
    );
    assert_eq!(q["models"][SIM_MODEL]["requests_per_minute"]["limit"], 2);
    // Every model together: the two chats and three embeddings.
    assert_eq!(q["requests_per_minute"]["used"], 5, "{q}");

    // A key's own: one embedding a minute, its tier's chat limit kept.
    let (status, created) = admin_write(
        &gw,
        reqwest::Method::POST,
        "/admin/v1/keys",
        json!({"name": "k", "tenant": "acme", "tier": "pro",
               "model_limits": {SIM_EMBED_MODEL: {"requests_per_minute": 1}}}),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let own = created["key"].as_str().unwrap().to_owned();
    assert_eq!(send(&gw, &own, false).await, (200, None));
    assert_eq!(
        send(&gw, &own, false).await,
        (
            429,
            Some(format!("key/{SIM_EMBED_MODEL}.requests_per_minute"))
        )
    );
    assert_eq!(send(&gw, &own, true).await, (200, None));

    // A tenant's: three chats a minute for all of its keys together.
    let (_, a) = gw.create_key("globex", "enterprise").await.unwrap();
    let (_, b) = gw.create_key("globex", "enterprise").await.unwrap();
    let (status, tenant) = admin_write(
        &gw,
        reqwest::Method::PUT,
        "/admin/v1/tenants/globex",
        json!({"limits": {}, "model_limits": {SIM_MODEL: {"requests_per_minute": 3}}}),
    )
    .await;
    assert_eq!(status, 200, "{tenant}");
    let mut statuses = Vec::new();
    for key in [&a, &b, &a, &b] {
        statuses.push(send(&gw, key, true).await);
    }
    assert_eq!(
        statuses[3],
        (429, Some(format!("tenant/{SIM_MODEL}.requests_per_minute")))
    );
    assert!(statuses[..3].iter().all(|s| s.0 == 200), "{statuses:?}");
    assert_eq!(send(&gw, &b, false).await, (200, None));
    let (_, q) = gw
        .admin(reqwest::Method::GET, "/admin/v1/tenants/globex/quota")
        .await
        .unwrap();
    assert_eq!(
        q["models"][SIM_MODEL]["requests_per_minute"]["used"], 3,
        "{q}"
    );

    // Budgets are not per model; nothing is stored by a refused body.
    for (method, path) in [
        (reqwest::Method::PUT, "/admin/v1/tiers/pro"),
        (reqwest::Method::PUT, "/admin/v1/tenants/globex"),
        (reqwest::Method::PATCH, &*format!("/admin/v1/keys/{id}")),
    ] {
        let (status, answer) = admin_write(
            &gw,
            method,
            path,
            json!({"limits": {}, "model_limits": {SIM_MODEL: {"monthly_budget": "1"}}}),
        )
        .await;
        assert_eq!(status, 400, "{path}: {answer}");
        assert!(
            answer["error"]["message"]
                .as_str()
                .unwrap()
                .contains("budgets are per key and per tenant"),
            "{answer}"
        );
    }
    let (_, tier) = gw
        .admin(reqwest::Method::GET, "/admin/v1/tiers/pro")
        .await
        .unwrap();
    assert_eq!(tier["model_limits"][SIM_MODEL]["requests_per_minute"], 2);
}

#[tokio::test]
async fn a_tenants_model_limit_holds_exactly_across_three_replicas() {
    let backend = Backend::start().await.unwrap();
    let store = StoreKind::fresh_redis();
    let gws = sluice_e2e::fleet(&backend, 3, store, "").await;
    let (_, a) = gws[0].create_key("acme", "enterprise").await.unwrap();
    let (_, b) = gws[1].create_key("acme", "enterprise").await.unwrap();
    let (status, _) = admin_write(
        &gws[2],
        reqwest::Method::PUT,
        "/admin/v1/tenants/acme",
        json!({"limits": {}, "model_limits": {SIM_MODEL: {"requests_per_minute": 10}}}),
    )
    .await;
    assert_eq!(status, 200);
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let keys = [a, b];
    let answers: Vec<(bool, u16, Option<String>)> = futures::stream::iter(0..90)
        .map(|i| {
            let gw = &gws[i % 3];
            let key = &keys[(i / 3) % 2];
            // Two chats for every embedding.
            let chat = i % 3 != 2;
            async move {
                let (status, limit) = send(gw, key, chat).await;
                (chat, status, limit)
            }
        })
        .buffer_unordered(90)
        .collect()
        .await;
    let chats_ok = answers.iter().filter(|a| a.0 && a.1 == 200).count();
    assert_eq!(chats_ok, 10, "exactly the model's limit across the fleet");
    assert!(
        answers.iter().filter(|a| !a.0).all(|a| a.1 == 200),
        "embeddings are not limited"
    );
    for (_, status, limit) in answers.iter().filter(|a| a.1 != 200) {
        assert_eq!(*status, 429);
        assert_eq!(
            limit.as_deref(),
            Some(&*format!("tenant/{SIM_MODEL}.requests_per_minute"))
        );
    }
}
