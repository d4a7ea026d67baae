//! A tenant's limits hold for all of its keys together, in the same atomic admission as
//! each key's own: on the default embedded store, on three replicas sharing a Redis (leases
//! off: exactly; leases on: never past the limit, and the tenant's ledger agrees), and on a
//! Redis Cluster, where the tenant's and the key's ledgers live in different slots.

use futures::StreamExt;
use reqwest::header::HeaderMap;
use rust_decimal::Decimal;
use serde_json::{json, Value};
use sluice_e2e::{
    Backend, Gateway, GatewayOptions, RedisCluster, StoreKind, ADMIN_TOKEN, NO_LEASES, SIM_MODEL,
};
use std::str::FromStr;
use std::time::Duration;

const PRICES: &str = r#"
[[prices]]
model = "*"
tier = "*"
currency = "USD"
input = "1.00"
output = "3.00"
"#;

/// Leases off: every request is decided by the store, exactly.
fn chat(max_tokens: u32) -> String {
    json!({"model": SIM_MODEL, "max_tokens": max_tokens,
           "messages": [{"role": "user", "content": "hello there"}]})
    .to_string()
}

async fn fleet(backend: &Backend, replicas: usize, store: StoreKind, extra: &str) -> Vec<Gateway> {
    sluice_e2e::fleet(backend, replicas, store, &format!("{PRICES}{extra}")).await
}

/// `PUT /admin/v1/tenants/{id}` with `body`, as the admin: status and answer.
async fn put_tenant(gw: &Gateway, id: &str, body: &str) -> (u16, Value) {
    let r = gw
        .http
        .put(format!("{}/admin/v1/tenants/{id}", gw.admin_url))
        .bearer_auth(ADMIN_TOKEN)
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

struct Answer {
    key: usize,
    status: u16,
    headers: HeaderMap,
    body: Value,
}

/// Sends `count` requests, all at once, spread round-robin over `gateways` and, apart from
/// that, over `keys`.
async fn burst(gateways: &[Gateway], keys: &[String], count: usize, body: String) -> Vec<Answer> {
    futures::stream::iter(0..count)
        .map(|i| {
            let gw = &gateways[i % gateways.len()];
            let key = (i / gateways.len()) % keys.len();
            let body = body.clone();
            async move {
                let r = gw
                    .post_raw("/v1/chat/completions", Some(&keys[key]), body)
                    .await
                    .unwrap();
                Answer {
                    key,
                    status: r.status().as_u16(),
                    headers: r.headers().clone(),
                    body: r.json().await.unwrap(),
                }
            }
        })
        .buffer_unordered(count)
        .collect()
        .await
}

/// Every refusal is the tenant's limit `limit`, and says so.
fn refused_by_the_tenant(answers: &[Answer], limit: &str, code: &str) {
    for a in answers.iter().filter(|a| a.status != 200) {
        assert_eq!(a.status, 429, "{}", a.body);
        assert_eq!(a.body["error"]["code"], code, "{}", a.body);
        assert_eq!(a.body["error"]["type"], "rate_limit_error", "{}", a.body);
        let message = a.body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("organization") && message.contains(&format!("tenant.{limit}")),
            "{message}"
        );
        assert_eq!(
            a.headers["x-sluice-limit"],
            format!("tenant.{limit}").as_str()
        );
    }
}

/// A ledger's quota as the admin API reports it, once it settles to `settled` (reservations
/// in flight and leases given back), or as last read.
async fn quota_when(gw: &Gateway, path: &str, settled: impl Fn(&Value) -> bool) -> Value {
    let mut last = Value::Null;
    for _ in 0..100 {
        let (status, q) = gw.admin(reqwest::Method::GET, path).await.unwrap();
        assert_eq!(status, 200, "{q}");
        if settled(&q) {
            return q;
        }
        last = q;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    last
}

#[tokio::test]
async fn on_the_embedded_store_a_tenants_keys_share_its_limits_and_its_month_survives_a_restart() {
    let backend = Backend::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let options = || GatewayOptions {
        extra_config: PRICES.to_owned(),
        ..GatewayOptions::new(&backend, StoreKind::Embedded(dir.path().to_owned()))
    };
    let mut gw = Gateway::start(options()).await.unwrap();
    let (a_id, a) = gw.create_key("acme", "enterprise").await.unwrap();
    let (_, b) = gw.create_key("acme", "enterprise").await.unwrap();
    let (_, other) = gw.create_key("globex", "enterprise").await.unwrap();

    let (status, tenant) = put_tenant(
        &gw,
        "acme",
        r#"{"limits": {"requests_per_minute": 4, "monthly_budget": "100"}}"#,
    )
    .await;
    assert_eq!(status, 200, "{tenant}");
    assert_eq!(tenant["limits"]["requests_per_minute"], 4);
    let (_, read) = gw
        .admin(reqwest::Method::GET, "/admin/v1/tenants/acme")
        .await
        .unwrap();
    assert_eq!(read["limits"], tenant["limits"]);

    // One at a time, the keys taking turns: the tenant's four, then refusals for both.
    let mut statuses = Vec::new();
    for i in 0..8 {
        let key = if i % 2 == 0 { &a } else { &b };
        let r = gw
            .post_raw("/v1/chat/completions", Some(key), chat(2))
            .await
            .unwrap();
        let status = r.status().as_u16();
        if status == 200 {
            // The tenant's minute is the tighter one: the headers report it.
            assert_eq!(r.headers()["x-ratelimit-limit-requests"], "4");
            assert!(r.headers().get("x-sluice-limit").is_none());
        }
        let headers = r.headers().clone();
        let body: Value = r.json().await.unwrap();
        refused_by_the_tenant(
            &[Answer {
                key: i % 2,
                status,
                headers,
                body,
            }],
            "requests_per_minute",
            "rate_limit_exceeded",
        );
        statuses.push(status);
    }
    assert_eq!(statuses, [200, 200, 200, 200, 429, 429, 429, 429]);
    // Another tenant is untouched.
    let r = gw
        .post_raw("/v1/chat/completions", Some(&other), chat(2))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    let q = quota_when(&gw, "/admin/v1/tenants/acme/quota", |q| {
        q["max_concurrent"]["in_flight"] == 0
    })
    .await;
    assert_eq!(q["tenant"], "acme");
    assert_eq!(q["requests_per_minute"]["used"], 4, "{q}");
    assert_eq!(q["requests_per_minute"]["remaining"], 0, "{q}");
    assert_eq!(q["monthly_budget"]["limit"], "100");
    assert_eq!(q["monthly_budget"]["currency"], "USD");
    let spent = q["monthly_budget"]["used"].as_str().unwrap().to_owned();
    assert_ne!(spent, "0", "{q}");
    // The tenant's spend is its keys' spend together.
    let key_spend = |q: &Value| Decimal::from_str(q["monthly_budget"]["used"].as_str().unwrap());
    let (_, qa) = gw
        .admin(
            reqwest::Method::GET,
            &format!("/admin/v1/keys/{a_id}/quota"),
        )
        .await
        .unwrap();
    assert!(key_spend(&qa).unwrap() < Decimal::from_str(&spent).unwrap());

    // Restarted, the limits are still set and the month's spend is still counted.
    gw.terminate().unwrap();
    gw.wait_exit(Duration::from_secs(20)).await.unwrap();
    let gw = Gateway::start(options()).await.unwrap();
    let (_, read) = gw
        .admin(reqwest::Method::GET, "/admin/v1/tenants/acme")
        .await
        .unwrap();
    assert_eq!(read["limits"], tenant["limits"]);
    let (_, q) = gw
        .admin(reqwest::Method::GET, "/admin/v1/tenants/acme/quota")
        .await
        .unwrap();
    assert_eq!(q["monthly_budget"]["used"], spent.as_str(), "{q}");
    let (_, list) = gw
        .admin(reqwest::Method::GET, "/admin/v1/tenants")
        .await
        .unwrap();
    let ids: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["acme"]);
}

#[tokio::test]
async fn bad_tenant_bodies_get_400_in_openai_shape() {
    let backend = Backend::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::embedded(&backend, dir.path()).await.unwrap();
    for (body, says) in [
        (
            r#"{"limits": {"requests_per_hour": 3}}"#,
            "requests_per_hour",
        ),
        (
            r#"{"limits": {"requests_per_minute": -1}}"#,
            "requests_per_minute",
        ),
        (
            r#"{"limits": {"requests_per_minute": "many"}}"#,
            "requests_per_minute",
        ),
        (r#"{"limits": {"monthly_budget": "ten"}}"#, "monthly_budget"),
        (r#"{"limits": {"tokens_per_day": 1e400}}"#, "tokens_per_day"),
        (r#"{"limits": null}"#, "limits"),
        (r#"{}"#, "limits"),
        (r#"{"limits": {}, "name": "x"}"#, "name"),
        ("not json", "Invalid request body"),
    ] {
        let (status, answer) = put_tenant(&gw, "acme", body).await;
        assert_eq!(status, 400, "{body}: {answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.contains(says), "{body}: {message}");
        assert_eq!(answer["error"]["type"], "invalid_request_error");
    }
    // Nothing was stored by a refused body.
    let (_, read) = gw
        .admin(reqwest::Method::GET, "/admin/v1/tenants/acme")
        .await
        .unwrap();
    assert_eq!(read["limits"]["requests_per_minute"], Value::Null);
    let (status, _) = put_tenant(&gw, "%20", r#"{"limits": {}}"#).await;
    assert_eq!(status, 400, "a blank tenant id");
}

async fn tenant_request_limit_holds_exactly(gws: &[Gateway]) {
    let (_, a) = gws[0].create_key("acme", "enterprise").await.unwrap();
    let (_, b) = gws[1].create_key("acme", "enterprise").await.unwrap();
    let (status, _) = put_tenant(
        &gws[2],
        "acme",
        r#"{"limits": {"requests_per_minute": 40}}"#,
    )
    .await;
    assert_eq!(status, 200);
    // Set on one replica, in force on every one within a second.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let answers = burst(gws, &[a, b], 150, chat(2)).await;
    let ok: Vec<&Answer> = answers.iter().filter(|a| a.status == 200).collect();
    assert_eq!(ok.len(), 40, "exactly the tenant's limit across the fleet");
    // What each key got, by status: said when a key got nothing (seen once in CI, under
    // load, and not again in six runs alone).
    let by_key = |key: usize| {
        let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
        for a in answers.iter().filter(|a| a.key == key) {
            *statuses.entry(a.status).or_default() += 1;
        }
        statuses
    };
    assert!(
        ok.iter().any(|a| a.key == 0) && ok.iter().any(|a| a.key == 1),
        "both keys are served; statuses (and how many) of key 0: {:?}, of key 1: {:?}",
        by_key(0),
        by_key(1)
    );
    refused_by_the_tenant(&answers, "requests_per_minute", "rate_limit_exceeded");
    let q = quota_when(&gws[0], "/admin/v1/tenants/acme/quota", |q| {
        q["max_concurrent"]["in_flight"] == 0
    })
    .await;
    assert_eq!(q["requests_per_minute"]["used"], 40, "{q}");
}

#[tokio::test]
async fn two_keys_of_a_tenant_together_hold_its_limit_exactly_across_three_replicas() {
    let backend = Backend::start().await.unwrap();
    let gws = fleet(&backend, 3, StoreKind::fresh_redis(), NO_LEASES).await;
    tenant_request_limit_holds_exactly(&gws).await;
}

#[tokio::test]
async fn two_keys_of_a_tenant_together_hold_its_limit_exactly_on_a_redis_cluster() {
    let backend = Backend::start().await.unwrap();
    let cluster = RedisCluster::start();
    let store = StoreKind::RedisAt {
        url: cluster.url(),
        prefix: "tenants".into(),
    };
    let gws = fleet(&backend, 3, store, NO_LEASES).await;
    tenant_request_limit_holds_exactly(&gws).await;
}

#[tokio::test]
async fn with_leases_a_tenants_keys_never_pass_its_limit_and_its_ledger_agrees() {
    let backend = Backend::start().await.unwrap();
    let gws = fleet(&backend, 3, StoreKind::fresh_redis(), "").await;
    let (_, a) = gws[0].create_key("acme", "enterprise").await.unwrap();
    let (_, b) = gws[0].create_key("acme", "enterprise").await.unwrap();
    let (status, _) = put_tenant(
        &gws[0],
        "acme",
        r#"{"limits": {"requests_per_minute": 60}}"#,
    )
    .await;
    assert_eq!(status, 200);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let answers = burst(&gws, &[a, b], 300, chat(2)).await;
    let ok = answers.iter().filter(|a| a.status == 200).count();
    // Leases are counted in full, in the tenant's ledger too, when taken: never more than
    // the limit.
    assert!(
        (1..=60).contains(&ok),
        "{ok} admitted under a tenant limit of 60"
    );
    refused_by_the_tenant(&answers, "requests_per_minute", "rate_limit_exceeded");
    // Once the leases are given back, the tenant's minute holds exactly what was served.
    let q = quota_when(&gws[1], "/admin/v1/tenants/acme/quota", |q| {
        q["max_concurrent"]["in_flight"] == 0 && q["requests_per_minute"]["used"] == ok
    })
    .await;
    assert_eq!(q["requests_per_minute"]["used"], ok, "{q}");
}

#[tokio::test]
async fn a_tenants_budget_holds_across_three_replicas_and_its_ledger_reconciles() {
    let backend = Backend::start().await.unwrap();
    let gws = fleet(&backend, 3, StoreKind::fresh_redis(), NO_LEASES).await;
    let (a_id, a) = gws[0].create_key("acme", "enterprise").await.unwrap();
    let (b_id, b) = gws[0].create_key("acme", "enterprise").await.unwrap();
    // About 50 reservations (see quotas.rs: ~0.00014 each), shared by the two keys.
    let (status, _) = put_tenant(
        &gws[0],
        "acme",
        r#"{"limits": {"monthly_budget": "0.007"}}"#,
    )
    .await;
    assert_eq!(status, 200);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let answers = burst(&gws, &[a, b], 200, chat(10)).await;
    refused_by_the_tenant(&answers, "monthly_budget", "insufficient_quota");
    let nano = Decimal::from(1_000_000_000);
    let spent: Decimal = answers
        .iter()
        .filter(|a| a.status == 200)
        .map(|a| {
            let usage = &a.body["usage"];
            let cost = (Decimal::from(usage["prompt_tokens"].as_u64().unwrap())
                + Decimal::from(usage["completion_tokens"].as_u64().unwrap()) * Decimal::from(3))
                / Decimal::from(1_000_000);
            (cost * nano).ceil()
        })
        .sum();
    assert!(spent > Decimal::ZERO);
    assert!(
        answers.iter().any(|a| a.status == 429),
        "the budget ran out"
    );
    assert!(
        spent <= Decimal::from_str("0.007").unwrap() * nano,
        "spend {spent} nano over the tenant's budget"
    );
    let used = |q: &Value| {
        Decimal::from_str(q["monthly_budget"]["used"].as_str().unwrap()).unwrap() * nano
    };
    let q = quota_when(&gws[2], "/admin/v1/tenants/acme/quota", |q| {
        q["max_concurrent"]["in_flight"] == 0 && used(q) == spent
    })
    .await;
    assert_eq!(
        used(&q),
        spent,
        "the tenant's ledger equals what was admitted: {q}"
    );
    let mut keys = Decimal::ZERO;
    for id in [a_id, b_id] {
        let (_, q) = gws[1]
            .admin(reqwest::Method::GET, &format!("/admin/v1/keys/{id}/quota"))
            .await
            .unwrap();
        keys += used(&q);
    }
    assert_eq!(keys, spent, "and its keys' ledgers together");
}
