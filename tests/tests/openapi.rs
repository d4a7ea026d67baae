//! The admin API's OpenAPI document against the real thing: it is served to admins and
//! viewers (a tenant's viewer too) and to no one without a credential, it is a valid OpenAPI
//! 3.1 document, and every answer of a tour of the admin API (each documented operation
//! succeeding at least once, and the usual refusals) matches the schema the document declares
//! for its operation, status and media type (tests/python/openapi_check.py).

use reqwest::Method;
use serde_json::{json, Value};
use sluice_e2e::{admin_jwt, python_check, Backend, Gateway, GatewayOptions, StoreKind};
use sluice_e2e::{ADMIN_TOKEN, SIM_MODEL};
use std::time::Duration;

/// A completion token costs 0.001, so one two-token answer reaches half of a 0.004 budget
/// and raises an alert within a check interval.
const CONFIG: &str = r#"
[quotas]
lease_max_requests = 0

[alerts]
thresholds = [50]
check_interval_ms = 100

[[prices]]
model = "sim-chat"
tier = "*"
currency = "USD"
input = "0"
output = "1000"
"#;

/// The admin calls made, as the checker reads them.
struct Tour<'g> {
    gw: &'g Gateway,
    calls: Vec<Value>,
}

impl Tour<'_> {
    /// Calls the admin API with `token` and records the answer; returns its status and JSON
    /// body (`Null` when it is not JSON).
    async fn call(
        &mut self,
        token: Option<&str>,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut request = self
            .gw
            .http
            .request(method.clone(), format!("{}{path}", self.gw.admin_url));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let text = response.text().await.unwrap();
        self.calls.push(json!({
            "method": method.as_str(),
            "path": path,
            "status": status,
            "content_type": content_type,
            "body": text,
        }));
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    async fn admin(&mut self, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
        self.call(Some(ADMIN_TOKEN), method, path, body).await
    }
}

#[tokio::test]
async fn every_admin_answer_matches_the_served_openapi_document() {
    let backend = Backend::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(GatewayOptions {
        extra_config: CONFIG.into(),
        ..GatewayOptions::new(&backend, StoreKind::Embedded(dir.path().to_owned()))
    })
    .await
    .unwrap();
    let mut tour = Tour {
        gw: &gw,
        calls: Vec::new(),
    };
    let get = Method::GET;

    // The document: no credential, no document; any admin credential reads it.
    let spec = "/admin/v1/openapi.json";
    assert_eq!(tour.call(None, get.clone(), spec, None).await.0, 401);
    let scoped_viewer = admin_jwt(json!({"role": "viewer", "tenant": "acme"}));
    assert_eq!(
        tour.call(Some(scoped_viewer.as_str()), get.clone(), spec, None)
            .await
            .0,
        200
    );
    let (status, document) = tour.admin(get.clone(), spec, None).await;
    assert_eq!(status, 200);
    assert!(
        document["openapi"].as_str().unwrap().starts_with("3.1"),
        "{}",
        document["openapi"]
    );

    // Keys, and usage on one of them: a request that spends half its budget and is kept for
    // distillation.
    let (status, key) = tour
        .admin(
            Method::POST,
            "/admin/v1/keys",
            Some(json!({"name": "toured", "tenant": "acme", "tier": "pro",
                        "limits": {"monthly_budget": "0.004", "requests_per_minute": 100},
                        "allowed_models": ["sim-*"], "distillation": {"models": ["sim-*"]},
                        "model_limits": {SIM_MODEL: {"tokens_per_minute": 1000}}})),
        )
        .await;
    assert_eq!(status, 201, "{key}");
    let id = key["id"].as_str().unwrap().to_owned();
    let chat = json!({"model": SIM_MODEL, "max_tokens": 2,
                      "messages": [{"role": "user", "content": "hello"}],
                      "tools": [{"type": "function", "function": {"name": "noop", "parameters": {}}}]});
    let answer = gw
        .post_raw(
            "/v1/chat/completions",
            key["key"].as_str(),
            chat.to_string(),
        )
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    tour.admin(get.clone(), "/admin/v1/keys", None).await;
    tour.admin(get.clone(), &format!("/admin/v1/keys/{id}"), None)
        .await;
    tour.admin(get.clone(), &format!("/admin/v1/keys/{id}/quota"), None)
        .await;
    tour.admin(
        Method::PATCH,
        &format!("/admin/v1/keys/{id}"),
        Some(json!({"name": "renamed", "allowed_models": null})),
    )
    .await;

    // Tiers and tenants.
    tour.admin(get.clone(), "/admin/v1/tiers", None).await;
    tour.admin(get.clone(), "/admin/v1/tiers/pro", None).await;
    tour.admin(
        Method::PUT,
        "/admin/v1/tiers/toured",
        Some(json!({"currency": "USD", "limits": {"requests_per_minute": 5, "monthly_budget": "12.50"},
                    "on_store_unavailable": "closed", "denied_models": ["nope-*"],
                    "model_limits": {SIM_MODEL: {"requests_per_day": 10}}})),
    )
    .await;
    tour.admin(
        Method::PUT,
        "/admin/v1/tenants/acme",
        Some(
            json!({"limits": {"requests_per_day": 1000, "soft_monthly_budget": "5"},
                    "model_limits": {SIM_MODEL: {"max_concurrent": 4}},
                    "distillation": {"models": [SIM_MODEL]}}),
        ),
    )
    .await;
    tour.admin(get.clone(), "/admin/v1/tenants/acme", None)
        .await;
    tour.admin(get.clone(), "/admin/v1/tenants/acme/quota", None)
        .await;
    tour.admin(get.clone(), "/admin/v1/tenants", None).await;

    // Backends.
    tour.admin(get.clone(), "/admin/v1/backends", None).await;
    let extra = json!({"name": "toured-backend", "url": backend.url, "models": [SIM_MODEL]});
    tour.admin(Method::POST, "/admin/v1/backends", Some(extra.clone()))
        .await;
    // The same name again: refused with 409, a documented answer too.
    tour.admin(Method::POST, "/admin/v1/backends", Some(extra))
        .await;
    let drain = "/admin/v1/backends/toured-backend/drain";
    tour.admin(Method::POST, drain, None).await;
    tour.admin(Method::DELETE, drain, None).await;
    tour.admin(Method::DELETE, "/admin/v1/backends/toured-backend", None)
        .await;

    // Usage and billing, once the request's usage is in the store.
    for _ in 0..100 {
        if gw.billing_export("event").await.unwrap().len() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tour.admin(get.clone(), &format!("/admin/v1/usage?key={id}"), None)
        .await;
    tour.admin(get.clone(), "/admin/v1/spend", None).await;
    tour.admin(get.clone(), "/admin/v1/traffic?minutes=5", None)
        .await;
    tour.admin(get.clone(), "/admin/v1/keys?limit=1&status=active", None)
        .await;
    for query in [
        "",
        "?format=jsonl",
        "?format=jsonl&group_by=tenant,month",
        "?format=jsonl&group_by=event",
        "?format=cloudevents&group_by=event",
        "?group_by=event",
    ] {
        let (status, _) = tour
            .admin(
                get.clone(),
                &format!("/admin/v1/billing/export{query}"),
                None,
            )
            .await;
        assert_eq!(status, 200, "export{query}");
    }

    // The conversation kept for distillation, once it is read into the store.
    let dataset = "/admin/v1/datasets/export";
    let mut exported = String::new();
    for _ in 0..100 {
        tour.admin(get.clone(), dataset, None).await;
        exported = tour.calls.last().unwrap()["body"]
            .as_str()
            .unwrap()
            .to_owned();
        if !exported.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(exported.lines().count(), 1, "{exported}");
    tour.admin(
        get.clone(),
        &format!("{dataset}?tenant=acme&finish_reason=stop,length"),
        None,
    )
    .await;

    // Alerts: the half-budget one, once a check has seen the spend.
    let mut alerts = Value::Null;
    for _ in 0..100 {
        alerts = tour.admin(get.clone(), "/admin/v1/alerts", None).await.1;
        if alerts["data"].as_array().is_some_and(|a| !a.is_empty()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(alerts["data"].as_array().unwrap().len(), 1, "{alerts}");

    // The cache, metrics, the rest of the keys' life, and the page that uses all this.
    tour.admin(get.clone(), "/admin/v1/cache/stats", None).await;
    tour.admin(Method::DELETE, "/admin/v1/cache?tenant=acme", None)
        .await;
    tour.admin(get.clone(), "/metrics", None).await;
    tour.admin(Method::POST, &format!("/admin/v1/keys/{id}/rotate"), None)
        .await;
    tour.admin(
        Method::POST,
        &format!("/admin/v1/keys/{id}/quota/reset"),
        None,
    )
    .await;
    tour.admin(Method::DELETE, &format!("/admin/v1/keys/{id}"), None)
        .await;
    tour.admin(Method::DELETE, "/admin/v1/tenants/acme/usage", None)
        .await;
    tour.admin(Method::DELETE, "/admin/v1/datasets?tenant=acme", None)
        .await;
    tour.call(None, get.clone(), "/health", None).await;
    tour.call(None, get.clone(), "/console", None).await;
    let (status, audit) = tour
        .admin(get.clone(), "/admin/v1/audit?limit=5", None)
        .await;
    assert_eq!(status, 200);
    let next = audit["next"].as_str().unwrap();
    tour.admin(
        get.clone(),
        &format!("/admin/v1/audit?limit=5&before={next}&method=post"),
        None,
    )
    .await;
    let (status, _) = tour
        .admin(get.clone(), "/admin/v1/audit/export?method=put", None)
        .await;
    assert_eq!(status, 200);

    // Refusals: each must be a documented answer with the error schema.
    let viewer = admin_jwt(json!({"role": "viewer"}));
    let admin = Some(ADMIN_TOKEN);
    let revoked = format!("/admin/v1/keys/{id}");
    let new_key = json!({"name": "x", "tenant": "acme"});
    let refusals = [
        (None, Method::GET, "/admin/v1/keys", None, 401),
        (
            Some(viewer.as_str()),
            Method::POST,
            "/admin/v1/keys",
            Some(new_key),
            403,
        ),
        (
            Some(scoped_viewer.as_str()),
            Method::GET,
            "/admin/v1/backends",
            None,
            403,
        ),
        (admin, Method::GET, "/admin/v1/keys/key_nobody", None, 404),
        (
            admin,
            Method::POST,
            "/admin/v1/keys",
            Some(json!({"name": 1, "tenant": "acme"})),
            400,
        ),
        (
            admin,
            Method::PATCH,
            revoked.as_str(),
            Some(json!({"name": "revoked stays"})),
            400,
        ),
        (
            admin,
            Method::PUT,
            "/admin/v1/tenants/acme",
            Some(json!({"limits": {"rph": 1}})),
            400,
        ),
        (
            admin,
            Method::GET,
            "/admin/v1/tiers/no-such-tier",
            None,
            404,
        ),
        (
            admin,
            Method::GET,
            "/admin/v1/billing/export?format=xml",
            None,
            400,
        ),
        (admin, Method::GET, "/admin/v1/alerts?limit=0", None, 400),
        (admin, Method::GET, "/admin/v1/spend?top=0", None, 400),
        (admin, Method::GET, "/admin/v1/traffic?minutes=0", None, 400),
        (admin, Method::GET, "/admin/v1/keys?limit=0", None, 400),
        // Refused by axum's query extractor, in plain text (documented so).
        (admin, Method::GET, "/admin/v1/alerts?bogus=1", None, 400),
        (admin, Method::GET, "/admin/v1/audit?limit=0", None, 400),
        (
            admin,
            Method::DELETE,
            "/admin/v1/cache?region=eu",
            None,
            400,
        ),
        (
            admin,
            Method::DELETE,
            "/admin/v1/backends/no-such-backend",
            None,
            404,
        ),
        (admin, Method::DELETE, "/admin/v1/datasets", None, 400),
    ];
    for (token, method, path, body, want) in refusals {
        let (status, answer) = tour.call(token, method.clone(), path, body).await;
        assert_eq!(status, want, "{method} {path}: {answer}");
    }

    let spec_path = dir.path().join("openapi.json");
    std::fs::write(&spec_path, document.to_string()).unwrap();
    let calls_path = dir.path().join("calls.json");
    std::fs::write(&calls_path, Value::from(tour.calls).to_string()).unwrap();
    python_check(
        "openapi_check.py",
        &[
            ("SLUICE_OPENAPI", spec_path.to_str().unwrap()),
            ("SLUICE_CALLS", calls_path.to_str().unwrap()),
        ],
        || gw.log(),
    )
    .await;
}
