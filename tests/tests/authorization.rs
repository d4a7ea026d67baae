//! Who may call what on the admin API: every route against every kind of credential, on a
//! real gateway. Admin tokens and admin JWTs open it; nothing the proxy accepts does.

use reqwest::Method;
use serde_json::{json, Value};
use sluice_e2e::{admin_jwt, jwt, Backend, Gateway, ADMIN_TOKEN, JWT_SECRET};

/// The credentials a caller may present.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who {
    Nobody,
    WrongToken,
    ApiKey,
    /// A token the proxy accepts, claiming `role: admin`.
    ProxyJwt,
    /// An admin-signed token minted for another audience.
    AdminJwtWrongAudience,
    Viewer,
    /// A viewer scoped to the tenant of the key under test.
    TenantViewer,
    /// A viewer scoped to some other tenant.
    OtherTenantViewer,
    Admin,
    AdminJwt,
}

const EVERYONE: [Who; 10] = [
    Who::Nobody,
    Who::WrongToken,
    Who::ApiKey,
    Who::ProxyJwt,
    Who::AdminJwtWrongAudience,
    Who::Viewer,
    Who::TenantViewer,
    Who::OtherTenantViewer,
    // Admins last: their writes change what the next route sees.
    Who::AdminJwt,
    Who::Admin,
];

/// One admin route, and the status an admin gets (`ok`).
struct Route {
    method: Method,
    path: String,
    body: Option<Value>,
    ok: u16,
    /// Viewers may read it (GET); scoped viewers only when it is about their tenant.
    tenant_scoped: bool,
}

fn route(method: Method, path: String, body: Option<Value>, ok: u16, tenant_scoped: bool) -> Route {
    Route {
        method,
        path,
        body,
        ok,
        tenant_scoped,
    }
}

/// What `who` must get on `r`.
fn expected(who: Who, r: &Route) -> u16 {
    let read = r.method == Method::GET;
    match who {
        Who::Nobody
        | Who::WrongToken
        | Who::ApiKey
        | Who::ProxyJwt
        | Who::AdminJwtWrongAudience => 401,
        Who::Admin | Who::AdminJwt => r.ok,
        Who::Viewer if read => r.ok,
        Who::TenantViewer if read && r.tenant_scoped => r.ok,
        // Another tenant's key is as good as absent; its lists come back empty.
        Who::OtherTenantViewer if read && r.tenant_scoped => {
            if r.path.starts_with("/admin/v1/keys/") || r.path.starts_with("/admin/v1/tenants/") {
                404
            } else {
                r.ok
            }
        }
        Who::Viewer | Who::TenantViewer | Who::OtherTenantViewer => 403,
    }
}

#[tokio::test]
async fn every_admin_route_against_every_credential() {
    let backend = Backend::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::embedded(&backend, dir.path()).await.unwrap();
    let (id, api_key) = gw.create_key("matrix", "free").await.unwrap();
    let credential = |who: Who| -> Option<String> {
        match who {
            Who::Nobody => None,
            Who::WrongToken => Some("not-the-admin-token-not-at-all".into()),
            Who::ApiKey => Some(api_key.clone()),
            Who::ProxyJwt => Some(jwt(json!({"role": "admin"}), JWT_SECRET)),
            Who::AdminJwtWrongAudience => {
                Some(admin_jwt(json!({"role": "admin", "aud": "someone-else"})))
            }
            Who::Viewer => Some(admin_jwt(json!({"role": "viewer"}))),
            Who::TenantViewer => Some(admin_jwt(json!({"role": "viewer", "tenant": "matrix"}))),
            Who::OtherTenantViewer => Some(admin_jwt(
                json!({"role": "viewer", "tenant": "someone-else"}),
            )),
            Who::AdminJwt => Some(admin_jwt(json!({"role": "admin"}))),
            Who::Admin => Some(ADMIN_TOKEN.into()),
        }
    };
    let key = |suffix: &str| format!("/admin/v1/keys/{id}{suffix}");
    let routes = [
        route(Method::GET, "/admin/v1/keys".into(), None, 200, true),
        route(
            Method::POST,
            "/admin/v1/keys".into(),
            Some(json!({"name": "made-in-matrix", "tenant": "matrix"})),
            201,
            true,
        ),
        route(Method::GET, key(""), None, 200, true),
        route(
            Method::PATCH,
            key(""),
            Some(json!({"name": "renamed"})),
            200,
            true,
        ),
        route(Method::GET, key("/quota"), None, 200, true),
        route(Method::POST, key("/quota/reset"), None, 200, true),
        route(Method::POST, key("/rotate"), None, 200, true),
        route(Method::GET, "/admin/v1/tiers".into(), None, 200, true),
        route(Method::GET, "/admin/v1/tiers/free".into(), None, 200, true),
        route(
            Method::PUT,
            "/admin/v1/tiers/matrix".into(),
            Some(json!({"limits": {"requests_per_minute": 5}})),
            200,
            false,
        ),
        route(Method::GET, "/admin/v1/backends".into(), None, 200, false),
        route(
            Method::POST,
            "/admin/v1/backends".into(),
            Some(json!({"name": "matrix-backend", "url": backend.url, "models": ["sim-chat"]})),
            201,
            false,
        ),
        route(
            Method::POST,
            "/admin/v1/backends/matrix-backend/drain".into(),
            None,
            200,
            false,
        ),
        route(
            Method::DELETE,
            "/admin/v1/backends/matrix-backend/drain".into(),
            None,
            200,
            false,
        ),
        route(
            Method::DELETE,
            "/admin/v1/backends/matrix-backend".into(),
            None,
            200,
            false,
        ),
        route(
            Method::GET,
            "/admin/v1/billing/export".into(),
            None,
            200,
            true,
        ),
        route(Method::GET, "/admin/v1/usage".into(), None, 200, true),
        route(Method::GET, "/admin/v1/spend".into(), None, 200, true),
        route(Method::GET, "/admin/v1/traffic".into(), None, 200, false),
        route(
            Method::GET,
            "/admin/v1/cache/stats".into(),
            None,
            200,
            false,
        ),
        route(Method::DELETE, "/admin/v1/cache".into(), None, 200, false),
        route(Method::GET, "/admin/v1/alerts".into(), None, 200, true),
        route(
            Method::PUT,
            "/admin/v1/tenants/matrix".into(),
            Some(json!({"limits": {"requests_per_day": 1000}})),
            200,
            true,
        ),
        route(Method::GET, "/admin/v1/tenants".into(), None, 200, true),
        route(Method::GET, "/admin/v1/audit".into(), None, 200, false),
        route(
            Method::POST,
            "/admin/v1/audit".into(),
            Some(json!({})),
            405,
            false,
        ),
        route(
            Method::GET,
            "/admin/v1/tenants/matrix".into(),
            None,
            200,
            true,
        ),
        route(
            Method::GET,
            "/admin/v1/tenants/matrix/quota".into(),
            None,
            200,
            true,
        ),
        route(Method::GET, "/metrics".into(), None, 200, false),
        route(
            Method::GET,
            "/admin/v1/openapi.json".into(),
            None,
            200,
            true,
        ),
        route(Method::DELETE, key(""), None, 200, true),
    ];
    let mut wrong = Vec::new();
    for r in &routes {
        for who in EVERYONE {
            // Each admin kind writes once: the JWT admin on a copy of the route where a
            // second write would not be the same call (creating a backend twice is 409).
            let once = matches!(
                r.method,
                Method::POST | Method::PUT | Method::DELETE | Method::PATCH
            ) && !r.path.contains("/keys")
                && !r.path.ends_with("/cache");
            if who == Who::AdminJwt && once {
                continue;
            }
            if who == Who::AdminJwt && r.method == Method::DELETE && r.path == key("") {
                continue;
            }
            let mut request = gw
                .http
                .request(r.method.clone(), format!("{}{}", gw.admin_url, r.path));
            if let Some(token) = credential(who) {
                request = request.bearer_auth(token);
            }
            if let Some(body) = &r.body {
                request = request.json(body);
            }
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            let want = expected(who, r);
            if status != want {
                let body = response.text().await.unwrap_or_default();
                wrong.push(format!(
                    "{} {} as {who:?}: {status} (want {want}) {body}",
                    r.method, r.path
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "cells that differ:\n{}", wrong.join("\n"));
}

/// A viewer scoped to a tenant sees that tenant's keys and usage, and nothing of another's.
#[tokio::test]
async fn a_tenant_viewer_sees_only_its_tenant() {
    let backend = Backend::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::embedded(&backend, dir.path()).await.unwrap();
    let (mine, my_key) = gw.create_key("mine", "free").await.unwrap();
    let (theirs, their_key) = gw.create_key("theirs", "free").await.unwrap();
    let chat = json!({"model": sluice_e2e::SIM_MODEL, "max_tokens": 2,
                      "messages": [{"role": "user", "content": "hi"}]});
    for key in [&my_key, &their_key] {
        let r = gw
            .post_raw("/v1/chat/completions", Some(key), chat.to_string())
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let viewer = admin_jwt(json!({"role": "viewer", "tenant": "mine"}));
    let get = |path: String| {
        gw.http
            .get(format!("{}{path}", gw.admin_url))
            .bearer_auth(&viewer)
            .send()
    };
    let keys: Value = get("/admin/v1/keys".into())
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = keys["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [mine.as_str()]);
    assert_eq!(
        get(format!("/admin/v1/keys/{theirs}"))
            .await
            .unwrap()
            .status(),
        404
    );

    // Usage events reach the store in the background: wait for both, as the admin sees them.
    let mut admin_rows = 0;
    for _ in 0..100 {
        admin_rows = gw.billing_export("key").await.unwrap().len();
        if admin_rows == 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(admin_rows, 2);
    let export = get("/admin/v1/billing/export?group_by=key&format=jsonl".into())
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let rows: Vec<Value> = export
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 1, "{export}");
    assert_eq!(rows[0]["key_id"], mine.as_str());
    let usage: Value = get("/admin/v1/usage".into())
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let totals = usage["totals"].as_array().unwrap();
    assert_eq!(totals.len(), 1, "{usage}");
    assert_eq!(totals[0]["key_id"], mine.as_str());
    // This month's spend: its own tenant's budgets and spenders only.
    let spend: Value = get("/admin/v1/spend".into())
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for list in ["budgets", "top_keys", "top_tenants"] {
        let entries = spend[list].as_array().unwrap();
        assert!(!entries.is_empty(), "{list}: {spend}");
        assert!(
            entries.iter().all(|e| e["tenant"] == "mine"),
            "{list}: {spend}"
        );
    }
    assert_eq!(spend["top_keys"][0]["id"], mine.as_str());
    // Live traffic is fleet-wide: not a tenant viewer's.
    assert_eq!(get("/admin/v1/traffic".into()).await.unwrap().status(), 403);
}

/// A JWT's tenant lives in its own namespace: it cannot be an API-key tenant, and a key
/// cannot be created in it.
#[tokio::test]
async fn jwt_tenants_are_namespaced_apart_from_key_tenants() {
    let backend = Backend::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::embedded(&backend, dir.path()).await.unwrap();
    let chat = json!({"model": sluice_e2e::SIM_MODEL, "max_tokens": 2,
                      "messages": [{"role": "user", "content": "hi"}]});
    let token = jwt(json!({"tenant": "acme", "sub": "u1"}), JWT_SECRET);
    let r = gw
        .post_raw("/v1/chat/completions", Some(&token), chat.to_string())
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut rows = Vec::new();
    for _ in 0..100 {
        rows = gw.billing_export("tenant").await.unwrap();
        if !rows.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["tenant"], "jwt:acme");

    let r = gw
        .http
        .post(format!("{}/admin/v1/keys", gw.admin_url))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"name": "squatter", "tenant": "jwt:acme"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["param"], "tenant");
}
