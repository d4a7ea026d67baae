//! Which models a caller may name: tier and key allow- and deny-lists, with aliases, on both
//! stores, through the proxy and the admin API as an operator and a client meet them.

use reqwest::Method;
use serde_json::{json, Value};
use sluice_e2e::{
    jwt, openai_error, Backend, Gateway, GatewayOptions, StoreKind, JWT_SECRET, SIM_EMBED_MODEL,
    SIM_MODEL,
};

/// The "expensive" model the free tier must not reach.
const BIG_MODEL: &str = "sim-big";

/// free may name sim-chat and the `chat` alias only; pro may not name anything `sim-b*`;
/// `chat` is sim-chat for free and the big model for everyone else.
const POLICY: &str = r#"
[tiers.free]
limits = { requests_per_minute = 100 }
allowed_models = ["sim-chat", "chat"]

[tiers.pro]
limits = { requests_per_minute = 100 }
denied_models = ["sim-b*"]

[tiers.enterprise]
limits = { requests_per_minute = 100 }

[aliases.chat]
free = "sim-chat"
"*" = "sim-big"
"#;

fn chat(model: &str) -> String {
    json!({"model": model, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
        .to_string()
}

async fn start(store: StoreKind) -> (Backend, Gateway) {
    let backend = Backend::start_with(&["--model", BIG_MODEL]).await.unwrap();
    let gw = Gateway::start(GatewayOptions {
        extra_config: POLICY.to_owned(),
        ..GatewayOptions::new(&backend, store)
    })
    .await
    .unwrap();
    (backend, gw)
}

/// The status and, for a success, the model the backend answered as.
async fn ask(gw: &Gateway, key: &str, model: &str) -> (u16, Value) {
    let r = gw
        .post_raw("/v1/chat/completions", Some(key), chat(model))
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

async fn listed(gw: &Gateway, key: &str) -> Vec<String> {
    let models = gw.get_json("/v1/models", key).await.unwrap();
    let mut ids: Vec<String> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    ids
}

async fn admin(gw: &Gateway, method: Method, path: &str, body: Value) -> (u16, Value) {
    gw.admin_json(method, path, Some(body)).await
}

async fn tier_and_alias_lists_decide(store: StoreKind) {
    let (_backend, gw) = start(store).await;
    let (free_id, free) = gw.create_key("acme", "free").await.unwrap();
    let (_, pro) = gw.create_key("acme", "pro").await.unwrap();
    let (_, enterprise) = gw.create_key("acme", "enterprise").await.unwrap();

    // A free key naming the big model is refused in OpenAI's shape, and nothing is charged.
    let r = gw
        .post_raw("/v1/chat/completions", Some(&free), chat(BIG_MODEL))
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let (kind, code, message) = openai_error(r).await.unwrap();
    assert_eq!(
        (kind.as_str(), code.as_str()),
        ("permission_error", "model_not_allowed")
    );
    assert!(message.contains(BIG_MODEL), "{message}");
    let quota = gw.quota(&free_id).await.unwrap();
    assert_eq!(quota["requests_per_minute"]["used"], 0, "{quota}");

    // Its own models, and the alias (resolved for its tier), still work.
    assert_eq!(ask(&gw, &free, SIM_MODEL).await.0, 200);
    let (status, answer) = ask(&gw, &free, "chat").await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["model"], SIM_MODEL);
    // A model the list does not name, even one a backend serves, is refused.
    let r = gw
        .post_raw(
            "/v1/embeddings",
            Some(&free),
            json!({"model": SIM_EMBED_MODEL, "input": "x"}).to_string(),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), 403);

    // The listing shows only what the key may use.
    assert_eq!(listed(&gw, &free).await, ["chat", SIM_MODEL]);

    // pro's deny-list refuses the big model by its name and through the alias that leads to it.
    assert_eq!(ask(&gw, &pro, BIG_MODEL).await.0, 403);
    assert_eq!(ask(&gw, &pro, "chat").await.0, 403);
    assert_eq!(ask(&gw, &pro, SIM_MODEL).await.0, 200);
    assert_eq!(listed(&gw, &pro).await, [SIM_MODEL, SIM_EMBED_MODEL]);

    // enterprise has no lists: everything, the alias included.
    let (status, answer) = ask(&gw, &enterprise, "chat").await;
    assert_eq!((status, answer["model"].as_str()), (200, Some(BIG_MODEL)));
    assert_eq!(
        listed(&gw, &enterprise).await,
        ["chat", BIG_MODEL, SIM_MODEL, SIM_EMBED_MODEL]
    );

    // A token of the free tier gets the free tier's lists.
    let token = jwt(json!({"tier": "free"}), JWT_SECRET);
    assert_eq!(ask(&gw, &token, BIG_MODEL).await.0, 403);
    assert_eq!(ask(&gw, &token, SIM_MODEL).await.0, 200);
}

#[tokio::test]
async fn tier_and_alias_lists_decide_on_the_embedded_store() {
    let dir = tempfile::tempdir().unwrap();
    tier_and_alias_lists_decide(StoreKind::Embedded(dir.path().to_owned())).await;
}

#[tokio::test]
async fn tier_and_alias_lists_decide_on_redis() {
    tier_and_alias_lists_decide(StoreKind::fresh_redis()).await;
}

async fn key_lists_and_admin_changes(store: StoreKind) {
    let (_backend, gw) = start(store).await;

    // A key's own allow-list replaces its tier's: this free key may use the big model.
    let (status, created) = admin(
        &gw,
        Method::POST,
        "/admin/v1/keys",
        json!({"name": "trial", "tenant": "acme", "tier": "free", "allowed_models": ["sim-*"]}),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["allowed_models"], json!(["sim-*"]));
    let id = created["id"].as_str().unwrap().to_owned();
    let key = created["key"].as_str().unwrap().to_owned();
    assert_eq!(ask(&gw, &key, BIG_MODEL).await.0, 200);
    assert_eq!(
        listed(&gw, &key).await,
        ["chat", BIG_MODEL, SIM_MODEL, SIM_EMBED_MODEL],
        "the alias is allowed through the model it leads to"
    );

    // A deny-list on the key; then `null` gives the tier's allow-list back.
    let path = format!("/admin/v1/keys/{id}");
    let (status, patched) = admin(
        &gw,
        Method::PATCH,
        &path,
        json!({"denied_models": [BIG_MODEL]}),
    )
    .await;
    assert_eq!(status, 200, "{patched}");
    assert_eq!(ask(&gw, &key, BIG_MODEL).await.0, 403);
    assert_eq!(ask(&gw, &key, SIM_EMBED_MODEL).await.0, 200);
    let (status, patched) = admin(
        &gw,
        Method::PATCH,
        &path,
        json!({"allowed_models": null, "denied_models": []}),
    )
    .await;
    assert_eq!(status, 200, "{patched}");
    assert_eq!(patched["allowed_models"], Value::Null);
    assert_eq!(ask(&gw, &key, BIG_MODEL).await.0, 403);
    assert_eq!(ask(&gw, &key, SIM_EMBED_MODEL).await.0, 403);
    assert_eq!(ask(&gw, &key, SIM_MODEL).await.0, 200);

    // A tier's lists change through the admin API and apply to its keys at once.
    let (_, pro) = gw.create_key("acme", "pro").await.unwrap();
    assert_eq!(ask(&gw, &pro, BIG_MODEL).await.0, 403);
    let (status, tier) = admin(
        &gw,
        Method::PUT,
        "/admin/v1/tiers/pro",
        json!({"limits": {"requests_per_minute": 100}, "denied_models": []}),
    )
    .await;
    assert_eq!(status, 200, "{tier}");
    assert_eq!(ask(&gw, &pro, BIG_MODEL).await.0, 200);
    let (status, tier) = admin(
        &gw,
        Method::PUT,
        "/admin/v1/tiers/pro",
        json!({"limits": {"requests_per_minute": 100}, "allowed_models": ["sim-chat"]}),
    )
    .await;
    assert_eq!(status, 200, "{tier}");
    assert_eq!(tier["allowed_models"], json!(["sim-chat"]));
    assert_eq!(ask(&gw, &pro, BIG_MODEL).await.0, 403);
    assert_eq!(listed(&gw, &pro).await, [SIM_MODEL]);

    // Malformed lists are refused with the field named, and change nothing.
    for body in [
        json!({"allowed_models": [""]}),
        json!({"denied_models": ["two words"]}),
        json!({"allowed_models": "sim-chat"}),
        json!({"allowed_models": (0..300).map(|i| format!("m{i}")).collect::<Vec<_>>()}),
    ] {
        let (status, error) = admin(&gw, Method::PATCH, &path, body.clone()).await;
        assert_eq!(status, 400, "{body} -> {error}");
        assert!(
            error["error"]["message"]
                .as_str()
                .unwrap()
                .contains("models"),
            "{error}"
        );
    }
    let (status, error) = admin(
        &gw,
        Method::PUT,
        "/admin/v1/tiers/pro",
        json!({"limits": {}, "allowed_models": ["a b"]}),
    )
    .await;
    assert_eq!(status, 400, "{error}");
    assert_eq!(ask(&gw, &key, SIM_MODEL).await.0, 200);
}

#[tokio::test]
async fn key_lists_and_admin_changes_on_the_embedded_store() {
    let dir = tempfile::tempdir().unwrap();
    key_lists_and_admin_changes(StoreKind::Embedded(dir.path().to_owned())).await;
}

#[tokio::test]
async fn key_lists_and_admin_changes_on_redis() {
    key_lists_and_admin_changes(StoreKind::fresh_redis()).await;
}
