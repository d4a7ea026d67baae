//! What the console's pages read, through the admin API as any client would: keys searched,
//! filtered and paged by the server; live traffic (one replica's on the embedded store, the
//! fleet's on a shared Redis); this month's spend against every budget, and the top
//! spenders. Each on the embedded store and on Redis.

use futures::StreamExt;
use reqwest::Method;
use rust_decimal::Decimal;
use serde_json::{json, Value};
use sluice_e2e::{fleet, Backend, Gateway, StoreKind, SIM_MODEL};
use std::collections::HashSet;
use std::str::FromStr;
use std::time::Duration;

const PRICES: &str = r#"
[[prices]]
model = "*"
tier = "*"
currency = "USD"
input = "1000.00"
output = "3000.00"
"#;

fn chat(content: &str) -> String {
    json!({"model": SIM_MODEL, "max_tokens": 8,
           "messages": [{"role": "user", "content": content}]})
    .to_string()
}

async fn get(gw: &Gateway, path: &str) -> (u16, Value) {
    gw.admin_json(Method::GET, path, None).await
}

fn ids(page: &Value) -> Vec<String> {
    page["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["id"].as_str().unwrap().to_owned())
        .collect()
}

async fn keys_are_searched_filtered_and_paged_by_the_server(store: StoreKind) {
    let backend = Backend::start().await.unwrap();
    let gw = &fleet(&backend, 1, store, "").await[0];
    // 130 keys over three tenants and two tiers, created at once (many in the same second,
    // so the page order's tie-break is exercised); one named to be searched for.
    let created: Vec<(String, String)> = futures::stream::iter(0..130)
        .map(|i| async move {
            let name = if i == 77 {
                "Needle-In-Haystack".to_owned()
            } else {
                format!("key-{i}")
            };
            let tenant = format!("tenant-{}", i % 3);
            let tier = if i % 2 == 0 { "free" } else { "pro" };
            let (status, body) = gw
                .admin_json(
                    Method::POST,
                    "/admin/v1/keys",
                    Some(json!({"name": name, "tenant": tenant, "tier": tier})),
                )
                .await;
            assert_eq!(status, 201, "{body}");
            (body["id"].as_str().unwrap().to_owned(), name)
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let revoked: Vec<&String> = created.iter().map(|(id, _)| id).take(7).collect();
    for id in &revoked {
        gw.revoke_key(id).await.unwrap();
    }

    // Without a limit: every key, as before paging existed.
    let (status, all) = get(gw, "/admin/v1/keys").await;
    assert_eq!(status, 200);
    assert_eq!(all["total"], 130);
    assert_eq!(ids(&all).len(), 130);
    assert_eq!(all["has_more"], false);
    assert_eq!(all["next"], Value::Null);

    // Pages of 50: every key once, newest first, a key created between two pages neither
    // repeated nor shifting the pages after it.
    let mut seen = Vec::new();
    let mut path = "/admin/v1/keys?limit=50".to_owned();
    let mut pages = 0;
    let mut late = None;
    loop {
        let (status, page) = get(gw, &path).await;
        assert_eq!(status, 200, "{page}");
        assert!(ids(&page).len() <= 50);
        let created_at: Vec<i64> = page["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["created_at"].as_i64().unwrap())
            .collect();
        assert!(created_at.windows(2).all(|w| w[0] >= w[1]), "newest first");
        seen.extend(ids(&page));
        pages += 1;
        if pages == 1 {
            late = Some(gw.create_key("late-tenant", "free").await.unwrap().0);
        }
        match page["next"].as_str() {
            Some(next) => {
                assert_eq!(page["has_more"], true);
                path = format!("/admin/v1/keys?limit=50&after={next}");
            }
            None => break,
        }
    }
    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "no key twice");
    // The late key is newer than the first page: it is listed later only when created in
    // the same second as the first page's last key (the order then goes by id).
    let mut expected: HashSet<&String> = created.iter().map(|(id, _)| id).collect();
    let late = late.unwrap();
    if unique.contains(&late) {
        expected.insert(&late);
    }
    assert_eq!(unique, expected, "every key of the listing, once");
    assert_eq!(pages, expected.len().div_ceil(50));

    // Search: any case, over names, ids and tenants.
    let needle = &created
        .iter()
        .find(|(_, n)| n == "Needle-In-Haystack")
        .unwrap()
        .0;
    let (_, found) = get(gw, "/admin/v1/keys?limit=50&search=needle-in").await;
    assert_eq!(ids(&found), std::slice::from_ref(needle));
    assert_eq!(found["total"], 1);
    let (_, by_id) = get(gw, &format!("/admin/v1/keys?search={}", &needle[4..])).await;
    assert_eq!(ids(&by_id), std::slice::from_ref(needle));

    // Filters, alone and together.
    let (_, tenant) = get(gw, "/admin/v1/keys?tenant=tenant-1&limit=1000").await;
    assert_eq!(tenant["total"], 43);
    let (_, tier) = get(gw, "/admin/v1/keys?tier=pro&tenant=tenant-1").await;
    let want = (0..130).filter(|i| i % 3 == 1 && i % 2 == 1).count();
    assert_eq!(tier["total"], want);
    let (_, gone) = get(gw, "/admin/v1/keys?status=revoked").await;
    let gone: HashSet<String> = ids(&gone).into_iter().collect();
    assert_eq!(gone, revoked.iter().map(|id| (*id).clone()).collect());
    let (_, live) = get(gw, "/admin/v1/keys?status=active&limit=10").await;
    assert_eq!(live["total"], 124);
    let (_, none) = get(gw, "/admin/v1/keys?search=no-such-key&limit=10").await;
    assert_eq!(none["total"], 0);
    assert_eq!(none["data"], json!([]));

    // Bad parameters: 400 in OpenAI's shape, naming the parameter.
    for (query, param) in [
        ("limit=0", Some("limit")),
        ("limit=1001", Some("limit")),
        ("limit=ten", Some("limit")),
        ("status=gone", Some("status")),
        ("after=nonsense", Some("after")),
        ("page=2", None),
    ] {
        let (status, body) = get(gw, &format!("/admin/v1/keys?{query}")).await;
        assert_eq!(status, 400, "{query}: {body}");
        assert_eq!(body["error"]["type"], "invalid_request_error", "{query}");
        assert_eq!(body["error"]["param"], json!(param), "{query}: {body}");
    }
}

#[tokio::test]
async fn keys_are_searched_filtered_and_paged_by_the_server_on_the_embedded_store() {
    let dir = tempfile::tempdir().unwrap();
    keys_are_searched_filtered_and_paged_by_the_server(StoreKind::Embedded(dir.path().into()))
        .await;
}

#[tokio::test]
async fn keys_are_searched_filtered_and_paged_by_the_server_on_redis() {
    keys_are_searched_filtered_and_paged_by_the_server(StoreKind::fresh_redis()).await;
}

/// Sums a field over the traffic's points.
fn total(traffic: &Value, field: &str) -> f64 {
    traffic["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p[field].as_f64().unwrap_or(0.0))
        .sum()
}

fn errors(traffic: &Value, status: &str) -> u64 {
    traffic["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["errors"][status].as_u64().unwrap_or(0))
        .sum()
}

/// Sends `refused` requests without a valid key and `chats` chats (each different, so
/// nothing is cached) to `gw`: the completion tokens the chats' answers reported.
async fn traffic_on(gw: &Gateway, key: &str, refused: usize, chats: usize) -> u64 {
    // The chats first, the refusals last: a replica adds a 5-second bucket's counts when it
    // ends, in order, so once every refusal is counted (what `traffic_once_counted` waits
    // for) every chat before it is too, even when a bucket ended between them.
    let mut completion = 0;
    for i in 0..chats {
        let r = gw
            .post_raw(
                "/v1/chat/completions",
                Some(key),
                chat(&format!("traffic {i} {}", uuid::Uuid::new_v4())),
            )
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let body: Value = r.json().await.unwrap();
        completion += body["usage"]["completion_tokens"].as_u64().unwrap();
    }
    for _ in 0..refused {
        let r = gw
            .post_raw("/v1/chat/completions", Some("sk-made-up"), chat("x"))
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
    }
    completion
}

/// Reads `/admin/v1/traffic` from `gw` until the 401s it shows reach `want_401` (replicas
/// add their counts when each 5-second bucket ends), or 20 s pass.
async fn traffic_once_counted(gw: &Gateway, want_401: u64) -> Value {
    let mut traffic = Value::Null;
    for _ in 0..80 {
        let (status, body) = get(gw, "/admin/v1/traffic?minutes=5").await;
        assert_eq!(status, 200, "{body}");
        traffic = body;
        if errors(&traffic, "401") >= want_401 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    traffic
}

#[tokio::test]
async fn live_traffic_is_the_replicas_own_on_the_embedded_store() {
    let backend = Backend::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let gw = &fleet(&backend, 1, StoreKind::Embedded(dir.path().into()), "").await[0];
    let (_, key) = gw.create_key("live", "pro").await.unwrap();
    let completion = traffic_on(gw, &key, 3, 12).await;
    let traffic = traffic_once_counted(gw, 3).await;
    assert_eq!(traffic["object"], "traffic");
    assert_eq!(traffic["scope"], "replica");
    assert_eq!(traffic["interval_secs"], 5);
    let points = traffic["points"].as_array().unwrap();
    assert_eq!(points.len(), 60, "five minutes of 5-second buckets");
    let starts: Vec<i64> = points.iter().map(|p| p["at"].as_i64().unwrap()).collect();
    assert!(starts.windows(2).all(|w| w[1] - w[0] == 5), "{starts:?}");
    assert_eq!(errors(&traffic, "401"), 3, "{traffic}");
    // The harness's own health checks are requests too: at least what this test sent.
    assert!(total(&traffic, "requests") >= 15.0, "{traffic}");
    let tokens = total(&traffic, "completion_tokens_per_sec") * 5.0;
    assert_eq!(
        tokens.round() as u64,
        completion,
        "tokens counted once each"
    );
    let timed: Vec<&Value> = points
        .iter()
        .filter(|p| p["requests"].as_u64() > Some(0))
        .collect();
    assert!(timed.iter().all(|p| p["latency_p99_ms"].as_f64().is_some()));
    assert!(timed.iter().any(|p| p["error_rate"].as_f64() > Some(0.0)));

    for query in ["minutes=0", "minutes=61", "minutes=soon", "window=5"] {
        let (status, body) = get(gw, &format!("/admin/v1/traffic?{query}")).await;
        assert_eq!(status, 400, "{query}: {body}");
        assert_eq!(body["error"]["type"], "invalid_request_error");
    }
}

#[tokio::test]
async fn live_traffic_adds_up_every_replica_on_redis() {
    let backend = Backend::start().await.unwrap();
    let gws = fleet(&backend, 2, StoreKind::fresh_redis(), "").await;
    let (_, key) = gws[0].create_key("live", "pro").await.unwrap();
    let on_first = traffic_on(&gws[0], &key, 4, 5).await;
    let on_second = traffic_on(&gws[1], &key, 6, 7).await;
    for gw in &gws {
        let traffic = traffic_once_counted(gw, 10).await;
        assert_eq!(traffic["scope"], "fleet");
        assert_eq!(
            errors(&traffic, "401"),
            10,
            "both replicas' refusals: {traffic}"
        );
        let tokens = total(&traffic, "completion_tokens_per_sec") * 5.0;
        assert_eq!(tokens.round() as u64, on_first + on_second);
    }
}

async fn spend_against_budgets(store: StoreKind) {
    let backend = Backend::start().await.unwrap();
    let gws = fleet(&backend, 1, store, PRICES).await;
    let gw = &gws[0];
    // One key with a budget of its own, one tenant with one, a busier key without one.
    let (budgeted, budgeted_key) = gw
        .create_key_with("spenders", "pro", json!({"monthly_budget": "5"}))
        .await
        .unwrap();
    let (busy, busy_key) = gw
        .create_key_with("busy-tenant", "free", json!({}))
        .await
        .unwrap();
    let (status, body) = gw
        .admin_json(
            Method::PUT,
            "/admin/v1/tenants/busy-tenant",
            Some(json!({"limits": {"soft_monthly_budget": "1"}})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    for (key, n) in [(&budgeted_key, 2), (&busy_key, 5)] {
        for i in 0..n {
            let r = gw
                .post_raw(
                    "/v1/chat/completions",
                    Some(key),
                    chat(&format!("spend {i}")),
                )
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
        }
    }
    // Usage reaches the store in the background: wait until the busy key's events are read.
    let mut spend = Value::Null;
    for _ in 0..100 {
        let (status, body) = get(gw, "/admin/v1/spend").await;
        assert_eq!(status, 200, "{body}");
        spend = body;
        if spend["top_keys"][0]["requests"] == 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(spend["object"], "spend");
    assert_eq!(spend["thresholds"], json!([50, 80, 100]));

    // Budgets: what each ledger counted, as its quota view says, against the budget.
    let budgets = spend["budgets"].as_array().unwrap();
    let key_row = budgets
        .iter()
        .find(|b| b["scope"] == "key" && b["id"] == budgeted.as_str())
        .unwrap_or_else(|| panic!("the key's own budget: {spend}"));
    let quota = gw.quota(&budgeted).await.unwrap();
    assert_eq!(key_row["spent"], quota["monthly_budget"]["used"]);
    assert_eq!(key_row["monthly_budget"], "5");
    let spent = Decimal::from_str(key_row["spent"].as_str().unwrap()).unwrap();
    assert!(spent > Decimal::ZERO, "{spend}");
    let percent = (spent * Decimal::from(100) / Decimal::from(5)).round_dp(2);
    assert_eq!(
        Decimal::from_str(&key_row["used_percent"].to_string()).unwrap(),
        percent.normalize()
    );
    let tenant_row = budgets
        .iter()
        .find(|b| b["scope"] == "tenant" && b["id"] == "busy-tenant")
        .unwrap_or_else(|| panic!("the tenant's soft budget: {spend}"));
    assert_eq!(tenant_row["soft_monthly_budget"], "1");
    assert_eq!(tenant_row["monthly_budget"], Value::Null);
    let (_, tenant_quota) = get(gw, "/admin/v1/tenants/busy-tenant/quota").await;
    assert_eq!(tenant_row["spent"], tenant_quota["monthly_budget"]["used"]);
    let shares: Vec<f64> = budgets
        .iter()
        .map(|b| b["used_percent"].as_f64().unwrap())
        .collect();
    assert!(
        shares.windows(2).all(|w| w[0] >= w[1]),
        "fullest first: {shares:?}"
    );
    // The busy key's budget is its tier's (the builtin free tier has one).
    let busy_row = budgets
        .iter()
        .find(|b| b["id"] == busy.as_str())
        .unwrap_or_else(|| panic!("a tier's budget is the key's: {spend}"));
    assert_eq!(busy_row["monthly_budget"], "5");

    // Top spenders: the month's priced usage, as /admin/v1/usage prices it.
    let (_, usage) = get(gw, "/admin/v1/usage").await;
    let cost_of = |id: &str| {
        usage["totals"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["key_id"] == id)
            .map(|r| r["cost"].clone())
            .unwrap()
    };
    let top = &spend["top_keys"];
    assert_eq!(top[0]["id"], busy.as_str());
    assert_eq!(top[0]["name"], "busy-tenant-key");
    assert_eq!(top[0]["tenant"], "busy-tenant");
    assert_eq!(top[0]["cost"], cost_of(&busy));
    assert_eq!(top[1]["id"], budgeted.as_str());
    assert_eq!(top[1]["cost"], cost_of(&budgeted));
    assert_eq!(spend["top_tenants"][0]["id"], "busy-tenant");
    assert_eq!(spend["top_tenants"][0]["requests"], 5);

    let (_, one) = get(gw, "/admin/v1/spend?top=1&budgets=1").await;
    assert_eq!(one["top_keys"].as_array().unwrap().len(), 1);
    assert_eq!(one["budgets"].as_array().unwrap().len(), 1);
    assert_eq!(one["budgets_total"], spend["budgets_total"]);
    for query in ["top=0", "budgets=1001", "top=many", "month=2026-01"] {
        let (status, body) = get(gw, &format!("/admin/v1/spend?{query}")).await;
        assert_eq!(status, 400, "{query}: {body}");
    }
}

#[tokio::test]
async fn this_months_spend_against_every_budget_on_the_embedded_store() {
    let dir = tempfile::tempdir().unwrap();
    spend_against_budgets(StoreKind::Embedded(dir.path().into())).await;
}

#[tokio::test]
async fn this_months_spend_against_every_budget_on_redis() {
    spend_against_budgets(StoreKind::fresh_redis()).await;
}
