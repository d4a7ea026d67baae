//! The audit trail: every admin write that succeeds leaves exactly one entry (who, what, on
//! what), on the default embedded store and on Redis across two replicas; refused writes
//! leave none; nobody can write to the trail through the API.

use reqwest::Method;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use sluice_e2e::{admin_jwt, Backend, Gateway, StoreKind, ADMIN_TOKEN};

/// The whole trail, newest first, read page by page (`limit` per page).
async fn trail(gw: &Gateway, query: &str, limit: usize) -> Vec<Value> {
    let mut all = Vec::new();
    let mut before: Option<String> = None;
    loop {
        let cursor = before
            .as_ref()
            .map_or(String::new(), |b| format!("&before={b}"));
        let (status, page) = gw
            .admin_as(
                ADMIN_TOKEN,
                Method::GET,
                &format!("/admin/v1/audit?limit={limit}{query}{cursor}"),
                None,
            )
            .await;
        assert_eq!(status, 200, "{page}");
        let data = page["data"].as_array().unwrap();
        assert!(data.len() <= limit);
        all.extend(data.iter().cloned());
        match page["next"].as_str() {
            Some(next) => before = Some(next.to_owned()),
            None => return all,
        }
    }
}

/// Every admin write route once, split over `gws` in turn; returns (method, route) of each.
/// Every kind of admin write, once each; what was done, and the secret of the key created.
async fn every_write(gws: &[Gateway], backend: &Backend) -> (Vec<(String, String)>, String) {
    let gw = |i: usize| &gws[i % gws.len()];
    let (status, key) = gw(0)
        .admin_as(
            ADMIN_TOKEN,
            Method::POST,
            "/admin/v1/keys",
            Some(json!({"name": "audited", "tenant": "acme"})),
        )
        .await;
    assert_eq!(status, 201, "{key}");
    let id = key["id"].as_str().unwrap().to_owned();
    let secret = key["key"].as_str().unwrap().to_owned();
    let writes: Vec<(Method, String, Option<Value>)> = vec![
        (
            Method::PATCH,
            format!("/admin/v1/keys/{id}"),
            Some(json!({"name": "renamed"})),
        ),
        (Method::POST, format!("/admin/v1/keys/{id}/rotate"), None),
        (
            Method::POST,
            format!("/admin/v1/keys/{id}/quota/reset"),
            None,
        ),
        (
            Method::PUT,
            "/admin/v1/tiers/audited".into(),
            Some(json!({"limits": {"requests_per_minute": 5}})),
        ),
        (
            Method::PUT,
            "/admin/v1/tenants/acme".into(),
            Some(json!({"limits": {"requests_per_day": 100}})),
        ),
        (
            Method::POST,
            "/admin/v1/backends".into(),
            Some(json!({"name": "audited-backend", "url": backend.url, "models": ["sim-chat"]})),
        ),
        (
            Method::POST,
            "/admin/v1/backends/audited-backend/drain".into(),
            None,
        ),
        (
            Method::DELETE,
            "/admin/v1/backends/audited-backend/drain".into(),
            None,
        ),
        (
            Method::DELETE,
            "/admin/v1/backends/audited-backend".into(),
            None,
        ),
        (Method::DELETE, "/admin/v1/cache?tenant=acme".into(), None),
        (Method::DELETE, "/admin/v1/tenants/acme/usage".into(), None),
        (Method::DELETE, format!("/admin/v1/keys/{id}"), None),
    ];
    let mut done = vec![("POST".to_owned(), "/admin/v1/keys".to_owned())];
    for (i, (method, path, body)) in writes.into_iter().enumerate() {
        // A backend added on one replica reaches the others within a second: its changes
        // are made where it was added.
        let on = if path.contains("/backends") {
            gw(0)
        } else {
            gw(i + 1)
        };
        let (status, answer) = on.admin_as(ADMIN_TOKEN, method.clone(), &path, body).await;
        assert!(
            (200..300).contains(&status),
            "{method} {path}: {status} {answer}"
        );
        done.push((
            method.to_string(),
            path.split('?').next().unwrap().to_owned(),
        ));
    }
    (done, secret)
}

async fn every_write_is_audited_once(gws: &[Gateway], backend: &Backend) {
    let (done, secret) = every_write(gws, backend).await;
    // Refused writes leave nothing: a bad body, a viewer's write, a write to the trail.
    let (status, _) = gws[0]
        .admin_as(
            ADMIN_TOKEN,
            Method::PUT,
            "/admin/v1/tenants/acme",
            Some(json!({"limits": {"requests_per_hour": 1}})),
        )
        .await;
    assert_eq!(status, 400);
    let viewer = admin_jwt(json!({"role": "viewer", "sub": "auditor"}));
    let (status, _) = gws[0]
        .admin_as(&viewer, Method::DELETE, "/admin/v1/cache", None)
        .await;
    assert_eq!(status, 403);
    for method in [Method::POST, Method::PUT, Method::PATCH, Method::DELETE] {
        let (status, answer) = gws[0]
            .admin_as(ADMIN_TOKEN, method, "/admin/v1/audit", Some(json!({})))
            .await;
        assert_eq!(status, 405, "{answer}");
        assert_eq!(answer["error"]["code"], "method_not_allowed");
    }

    // Every replica reads the whole trail, in small pages as in one.
    for gw in gws {
        let entries = trail(gw, "", 4).await;
        let mut seen: Vec<(String, String)> = entries
            .iter()
            .map(|e| {
                (
                    e["method"].as_str().unwrap().to_owned(),
                    e["path"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        seen.reverse();
        assert_eq!(
            seen, done,
            "one entry per write, oldest last in the listing"
        );
        let actor = format!(
            "admin-token:{}",
            &hex::encode(Sha256::digest(ADMIN_TOKEN))[..12]
        );
        for e in &entries {
            assert_eq!(e["actor"], actor.as_str(), "{e}");
            assert!(e["status"].as_u64().unwrap() < 300);
            assert!(e["at_ms"].as_i64().unwrap() > 0);
            assert!(
                e["route"].as_str().unwrap().starts_with("/admin/v1/"),
                "{e}"
            );
        }
        let created = entries.last().unwrap();
        assert_eq!(created["body"]["tenant"], "acme", "{created}");
        // Before and after, where the path names a key, tenant, tier or backend.
        let entry = |method: &str, path: &str| {
            entries
                .iter()
                .find(|e| e["method"] == method && e["path"] == path)
                .unwrap_or_else(|| panic!("no {method} {path} in {entries:?}"))
        };
        assert!(created["before"].is_null(), "{created}");
        assert_eq!(created["after"]["tenant"], "acme", "{created}");
        assert_eq!(created["after"]["name"], "audited", "{created}");
        let key_path = format!(
            "/admin/v1/keys/{}",
            created["after"]["id"].as_str().unwrap()
        );
        let renamed = entry("PATCH", &key_path);
        assert_eq!(renamed["before"]["name"], "audited", "{renamed}");
        assert_eq!(renamed["after"]["name"], "renamed", "{renamed}");
        let revoked = entry("DELETE", &key_path);
        assert_eq!(revoked["before"]["status"], "active", "{revoked}");
        let tenant = entry("PUT", "/admin/v1/tenants/acme");
        assert!(
            tenant["before"]["limits"]["requests_per_day"].is_null(),
            "{tenant}"
        );
        assert_eq!(
            tenant["after"]["limits"]["requests_per_day"], 100,
            "{tenant}"
        );
        let tier = entry("PUT", "/admin/v1/tiers/audited");
        assert!(tier["before"].is_null(), "a new tier: {tier}");
        assert_eq!(tier["after"]["limits"]["requests_per_minute"], 5, "{tier}");
        let drained = entry("POST", "/admin/v1/backends/audited-backend/drain");
        assert_eq!(drained["before"]["draining"], false, "{drained}");
        assert_eq!(drained["after"]["draining"], true, "{drained}");
        let removed = entry("DELETE", "/admin/v1/backends/audited-backend");
        assert_eq!(removed["before"]["name"], "audited-backend", "{removed}");
        assert!(removed["after"].is_null(), "{removed}");
        let purged = entry("DELETE", "/admin/v1/cache");
        assert!(
            purged["before"].is_null() && purged["after"].is_null(),
            "{purged}"
        );
        assert!(
            !entries.iter().any(|e| e.to_string().contains(&secret)),
            "no secret in the trail"
        );
        // Filters, and a viewer may read it.
        let tenants = trail(gw, "&path=/admin/v1/tenants&method=put", 100).await;
        assert_eq!(tenants.len(), 1, "{tenants:?}");
        let (status, page) = gw
            .admin_as(&viewer, Method::GET, "/admin/v1/audit?actor=nobody", None)
            .await;
        assert_eq!((status, page["data"].as_array().unwrap().len()), (200, 0));
    }
    let (status, answer) = gws[0]
        .admin_as(ADMIN_TOKEN, Method::GET, "/admin/v1/audit?limit=0", None)
        .await;
    assert_eq!(status, 400, "{answer}");

    // The export: the whole trail as JSON lines, the same entries the listing pages through,
    // filtered alike, for admins and viewers; nothing else is accepted as a parameter.
    let export = |token: String, query: &'static str| {
        let gw = &gws[gws.len() - 1];
        async move {
            let response = gw
                .http
                .get(format!("{}/admin/v1/audit/export{query}", gw.admin_url))
                .bearer_auth(token)
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            let text = response.text().await.unwrap();
            (status, text)
        }
    };
    let (status, text) = export(ADMIN_TOKEN.to_owned(), "").await;
    assert_eq!(status, 200, "{text}");
    let exported: Vec<Value> = text
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(exported, trail(&gws[0], "", 1000).await);
    let (status, text) = export(viewer.clone(), "?method=put&path=/admin/v1/tenants").await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(text.lines().count(), 1, "{text}");
    let (status, text) = export(ADMIN_TOKEN.to_owned(), "?limit=5").await;
    assert_eq!(status, 400, "{text}");
}

#[tokio::test]
async fn every_admin_write_is_audited_once_on_the_embedded_store() {
    let backend = Backend::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::embedded(&backend, dir.path()).await.unwrap();
    every_write_is_audited_once(&[gw], &backend).await;
}

#[tokio::test]
async fn every_admin_write_is_audited_once_across_two_replicas_on_redis() {
    let backend = Backend::start().await.unwrap();
    let store = StoreKind::fresh_redis();
    let gws = sluice_e2e::fleet(&backend, 2, store, "").await;
    every_write_is_audited_once(&gws, &backend).await;
}
