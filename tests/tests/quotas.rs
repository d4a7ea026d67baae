//! Quotas that hold across every gateway replica: three gateway processes share one Redis,
//! and a key's limits hold for the fleet, not per replica.

use futures::StreamExt;
use rust_decimal::Decimal;
use serde_json::{json, Value};
use sluice_e2e::tls::{Ca, Role};
use sluice_e2e::{
    Backend, Gateway, GatewayOptions, OwnRedis, RedisCluster, RedisTlsServer, StoreKind,
    ADMIN_TOKEN, NO_LEASES, SIM_MODEL,
};
use std::str::FromStr;

const PRICES: &str = r#"
[[prices]]
model = "*"
tier = "*"
currency = "USD"
input = "1.00"
output = "3.00"
"#;

fn chat(max_tokens: u32) -> String {
    json!({"model": SIM_MODEL, "max_tokens": max_tokens, "messages": [{"role": "user", "content": "hello there"}]})
        .to_string()
}

/// Leases off: every request is decided by the store, exactly.
async fn fleet(backend: &Backend, replicas: usize) -> Vec<Gateway> {
    fleet_on(backend, replicas, StoreKind::fresh_redis(), NO_LEASES).await
}

async fn fleet_on(
    backend: &Backend,
    replicas: usize,
    store: StoreKind,
    extra: &str,
) -> Vec<Gateway> {
    sluice_e2e::fleet(backend, replicas, store, &format!("{PRICES}{extra}")).await
}

/// Sends `count` requests spread round-robin over `gateways`, all at once; returns each
/// answer's status, headers and JSON body.
async fn burst(
    gateways: &[Gateway],
    key: &str,
    count: usize,
    body: String,
) -> Vec<(u16, reqwest::header::HeaderMap, Value)> {
    futures::stream::iter(0..count)
        .map(|i| {
            let gw = &gateways[i % gateways.len()];
            let body = body.clone();
            async move {
                let r = gw
                    .post_raw("/v1/chat/completions", Some(key), body)
                    .await
                    .unwrap();
                let status = r.status().as_u16();
                let headers = r.headers().clone();
                let v: Value = r.json().await.unwrap();
                (status, headers, v)
            }
        })
        .buffer_unordered(count)
        .collect()
        .await
}

#[tokio::test]
async fn a_request_limit_holds_exactly_across_three_replicas() {
    let backend = Backend::start().await.unwrap();
    let gws = fleet(&backend, 3).await;
    request_limit_holds_exactly(&gws).await;
}

#[tokio::test]
async fn a_request_limit_holds_exactly_across_three_replicas_on_a_redis_cluster() {
    let backend = Backend::start().await.unwrap();
    let cluster = RedisCluster::start();
    let store = StoreKind::RedisAt {
        url: cluster.url(),
        prefix: "cluster".into(),
    };
    let gws = fleet_on(&backend, 3, store, NO_LEASES).await;
    request_limit_holds_exactly(&gws).await;
}

/// `rediss://` with a private CA: the Redis listens for TLS only (no plain port), so every
/// admission went through TLS.
#[tokio::test]
async fn a_request_limit_holds_exactly_across_three_replicas_on_redis_over_tls() {
    let backend = Backend::start().await.unwrap();
    let ca = Ca::new("redis CA").unwrap();
    let redis = OwnRedis::start_tls(RedisTlsServer::node_of(&ca, false).unwrap());
    let store = StoreKind::RedisTlsAt {
        url: redis.url(),
        prefix: "tls".into(),
        ca: Some(ca.cert().to_owned()),
        client: None,
    };
    let gws = fleet_on(&backend, 3, store, NO_LEASES).await;
    request_limit_holds_exactly(&gws).await;
}

/// A Redis Cluster over TLS (client connections and cluster bus), which asks every client
/// for a certificate: the gateways show theirs to every node, those the cluster named to
/// them included.
#[tokio::test]
async fn a_request_limit_holds_exactly_across_three_replicas_on_a_redis_cluster_over_tls_with_client_certificates(
) {
    let backend = Backend::start().await.unwrap();
    let ca = Ca::new("redis cluster CA").unwrap();
    let cluster = RedisCluster::start_tls(RedisTlsServer {
        cert: ca.sign("redis-node", Role::Peer).unwrap(),
        ca: ca.cert().to_owned(),
        auth_clients: true,
    });
    let store = StoreKind::RedisTlsAt {
        url: cluster.url(),
        prefix: "tls-cluster".into(),
        ca: Some(ca.cert().to_owned()),
        client: Some(ca.client_cert("gateway").unwrap()),
    };
    let gws = fleet_on(&backend, 3, store, NO_LEASES).await;
    request_limit_holds_exactly(&gws).await;
}

#[tokio::test]
async fn with_leases_a_request_limit_is_never_exceeded_across_three_replicas() {
    let backend = Backend::start().await.unwrap();
    let gws = fleet_on(&backend, 3, StoreKind::fresh_redis(), "").await;
    let (_, key) = gws[0]
        .create_key_with("acme", "enterprise", json!({"requests_per_minute": 60}))
        .await
        .unwrap();
    let answers = burst(&gws, &key, 300, chat(2)).await;
    let ok = answers.iter().filter(|a| a.0 == 200).count();
    // Leases are counted in full by the store when taken: never more than the limit. What a
    // lease may strand is at most its size (a quarter of the limit) per other replica.
    assert!(ok <= 60, "{ok} admitted under a limit of 60");
    assert!(
        ok >= 60 - 2 * 15,
        "{ok} admitted: leases stranded more than their bound"
    );
}

async fn request_limit_holds_exactly(gws: &[Gateway]) {
    let (_, key) = gws[0]
        .create_key_with("acme", "enterprise", json!({"requests_per_minute": 60}))
        .await
        .unwrap();
    let answers = burst(gws, &key, 300, chat(2)).await;
    let ok = answers.iter().filter(|a| a.0 == 200).count();
    assert_eq!(ok, 60, "exactly the limit is admitted across the fleet");
    for (status, headers, body) in &answers {
        assert!(
            headers.contains_key("x-ratelimit-limit-requests"),
            "{status}: every answer carries the headers"
        );
        if *status == 429 {
            assert_eq!(body["error"]["code"], "rate_limit_exceeded");
            assert!(
                headers["retry-after"]
                    .to_str()
                    .unwrap()
                    .parse::<u64>()
                    .unwrap()
                    >= 1
            );
            assert_eq!(headers["x-ratelimit-remaining-requests"], "0", "{body}");
        } else {
            assert_eq!(*status, 200);
        }
    }
}

#[tokio::test]
async fn a_token_limit_is_never_overspent_across_three_replicas() {
    let backend = Backend::start().await.unwrap();
    token_limit_holds(&fleet(&backend, 3).await).await;
}

#[tokio::test]
async fn with_leases_a_token_limit_is_never_overspent_across_three_replicas() {
    let backend = Backend::start().await.unwrap();
    token_limit_holds(&fleet_on(&backend, 3, StoreKind::fresh_redis(), "").await).await;
}

async fn token_limit_holds(gws: &[Gateway]) {
    let limit = 2_000u64;
    let (_, key) = gws[0]
        .create_key_with("acme", "enterprise", json!({"tokens_per_minute": limit}))
        .await
        .unwrap();
    let answers = burst(gws, &key, 300, chat(8)).await;
    let used: u64 = answers
        .iter()
        .filter(|a| a.0 == 200)
        .map(|a| a.2["usage"]["total_tokens"].as_u64().unwrap())
        .sum();
    let admitted = answers.iter().filter(|a| a.0 == 200).count();
    assert!(used <= limit, "{used} tokens used under a limit of {limit}");
    // Each request reserves its prompt's bytes + 64 + max_tokens (about 120 tokens), so at
    // least limit / 120 fit; settling returns the unused part, so usually more do.
    assert!(
        admitted >= (limit / 130) as usize,
        "only {admitted} admitted"
    );
    assert!(answers
        .iter()
        .any(|a| a.0 == 429 && a.2["error"]["code"] == "rate_limit_exceeded"));
}

#[tokio::test]
async fn a_budget_holds_under_two_hundred_simultaneous_requests() {
    let backend = Backend::start().await.unwrap();
    budget_holds(&fleet(&backend, 3).await).await;
}

#[tokio::test]
async fn with_leases_a_budget_holds_and_the_ledger_reconciles() {
    let backend = Backend::start().await.unwrap();
    budget_holds(&fleet_on(&backend, 3, StoreKind::fresh_redis(), "").await).await;
}

async fn budget_holds(gws: &[Gateway]) {
    // Each request reserves at most (prompt bytes + 64) input and 10 output tokens:
    // about 110 × 1.00 + 10 × 3.00 per million. A budget of 0.007 fits ~50 reservations.
    let (id, key) = gws[0]
        .create_key_with("acme", "enterprise", json!({"monthly_budget": "0.007"}))
        .await
        .unwrap();
    let answers = burst(gws, &key, 200, chat(10)).await;
    let admitted: Vec<&Value> = answers
        .iter()
        .filter(|a| a.0 == 200)
        .map(|a| &a.2)
        .collect();
    assert!(!admitted.is_empty());
    assert!(answers
        .iter()
        .any(|a| a.0 == 429 && a.2["error"]["code"] == "insufficient_quota"));
    // The cost of what was admitted, by hand, in nano-units rounded up per request as the
    // ledger counts it.
    let nano = Decimal::from(1_000_000_000);
    let spent: Decimal = admitted
        .iter()
        .map(|b| {
            let cost = (Decimal::from(b["usage"]["prompt_tokens"].as_u64().unwrap())
                * Decimal::from_str("1.00").unwrap()
                + Decimal::from(b["usage"]["completion_tokens"].as_u64().unwrap())
                    * Decimal::from_str("3.00").unwrap())
                / Decimal::from(1_000_000);
            (cost * nano).ceil()
        })
        .sum();
    assert!(
        spent <= Decimal::from_str("0.007").unwrap() * nano,
        "spend {spent} nano over the budget"
    );

    // Settlement runs after each response; wait for the ledger to settle, then compare.
    let mut ledger = Decimal::ZERO;
    for _ in 0..200 {
        let (_, q) = gws[1]
            .admin(reqwest::Method::GET, &format!("/admin/v1/keys/{id}/quota"))
            .await
            .unwrap();
        ledger = Decimal::from_str(q["monthly_budget"]["used"].as_str().unwrap()).unwrap() * nano;
        if ledger == spent && q["max_concurrent"]["in_flight"] == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(
        ledger, spent,
        "the ledger equals the cost of the admitted requests"
    );
}

#[tokio::test]
async fn max_tokens_beyond_the_token_limit_is_a_400_not_an_endless_429() {
    let backend = Backend::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::embedded(&backend, dir.path()).await.unwrap();
    let (_, key) = gw
        .create_key_with("acme", "enterprise", json!({"tokens_per_minute": 500}))
        .await
        .unwrap();
    let r = gw
        .post_raw("/v1/chat/completions", Some(&key), chat(1000))
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["param"], "max_tokens");
    let r = gw
        .post_raw("/v1/chat/completions", Some(&key), chat(10))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn operators_see_and_reset_live_quota_state() {
    let backend = Backend::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::embedded(&backend, dir.path()).await.unwrap();
    let (id, key) = gw
        .create_key_with(
            "acme",
            "enterprise",
            json!({"requests_per_minute": 3, "requests_per_day": 100}),
        )
        .await
        .unwrap();
    for _ in 0..3 {
        let r = gw
            .post_raw("/v1/chat/completions", Some(&key), chat(2))
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let r = gw
        .post_raw("/v1/chat/completions", Some(&key), chat(2))
        .await
        .unwrap();
    assert_eq!(r.status(), 429);

    let quota_path = format!("/admin/v1/keys/{id}/quota");
    let (_, q) = gw.admin(reqwest::Method::GET, &quota_path).await.unwrap();
    assert_eq!(q["requests_per_minute"]["used"], 3);
    assert_eq!(q["requests_per_minute"]["remaining"], 0);
    assert_eq!(q["requests_per_day"]["used"], 3);
    assert!(q["requests_per_minute"]["resets_in_secs"].as_u64().unwrap() >= 1);

    let (status, _) = gw
        .admin(reqwest::Method::POST, &format!("{quota_path}/reset"))
        .await
        .unwrap();
    assert_eq!(status, 200);
    let r = gw
        .post_raw("/v1/chat/completions", Some(&key), chat(2))
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "a reset key is admitted again");
}

#[tokio::test]
async fn a_tier_change_applies_on_every_replica_within_a_second() {
    let backend = Backend::start().await.unwrap();
    let gws = fleet(&backend, 2).await;
    let (_, key) = gws[0].create_key("acme", "pro").await.unwrap();
    let r = gws[1]
        .post_raw("/v1/chat/completions", Some(&key), chat(2))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    let r = gws[0]
        .http
        .put(format!("{}/admin/v1/tiers/pro", gws[0].admin_url))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"limits": {"requests_per_minute": 2}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let tier: Value = r.json().await.unwrap();
    assert_eq!(tier["limits"]["requests_per_minute"], 2);

    // The promise is "within one second" of the change's answer.
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let r = gws[1]
        .post_raw("/v1/chat/completions", Some(&key), chat(2))
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        200,
        "the second request of the minute fits a limit of 2"
    );
    assert_eq!(r.headers()["x-ratelimit-limit-requests"], "2");
    let r = gws[1]
        .post_raw("/v1/chat/completions", Some(&key), chat(2))
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        429,
        "replica B enforces the tier changed on replica A"
    );

    let r = gws[1]
        .http
        .put(format!("{}/admin/v1/tiers/pro", gws[1].admin_url))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"limits": {"requests_per_minute": "many"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}

#[tokio::test]
async fn with_redis_down_fail_open_keys_keep_local_limits_and_fail_closed_keys_get_503() {
    let backend = Backend::start().await.unwrap();
    let mut redis = OwnRedis::start();
    let tiers = r#"
[tiers.free.limits]
requests_per_minute = 100

[tiers.open]
on_store_unavailable = "open"
[tiers.open.limits]
requests_per_minute = 6

[tiers.closed]
on_store_unavailable = "closed"
[tiers.closed.limits]
requests_per_minute = 100
"#;
    let gw = Gateway::start(GatewayOptions {
        extra_config: tiers.to_owned(),
        ..GatewayOptions::new(
            &backend,
            StoreKind::RedisAt {
                url: redis.url(),
                prefix: "failmodes".into(),
            },
        )
    })
    .await
    .unwrap();
    let (_, open) = gw.create_key("acme", "open").await.unwrap();
    let (_, closed) = gw.create_key("acme", "closed").await.unwrap();
    for key in [&open, &closed] {
        let r = gw
            .post_raw("/v1/chat/completions", Some(key), chat(2))
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }

    redis.kill();
    let mut open_statuses = Vec::new();
    for _ in 0..10 {
        let r = gw
            .post_raw("/v1/chat/completions", Some(&open), chat(2))
            .await
            .unwrap();
        open_statuses.push(r.status().as_u16());
    }
    let served = open_statuses.iter().filter(|s| **s == 200).count();
    assert!(served >= 1, "fail-open keys are served: {open_statuses:?}");
    assert!(
        served <= 5,
        "...within the replica's local limit (6/min, one already used): {open_statuses:?}"
    );
    assert!(
        open_statuses.iter().all(|s| *s == 200 || *s == 429),
        "{open_statuses:?}"
    );
    let r = gw
        .post_raw("/v1/chat/completions", Some(&closed), chat(2))
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        503,
        "fail-closed keys are refused while the store is down"
    );

    redis.spawn();
    let mut recovered = false;
    for _ in 0..50 {
        let r = gw
            .post_raw("/v1/chat/completions", Some(&closed), chat(2))
            .await
            .unwrap();
        if r.status() == 200 {
            recovered = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(recovered, "admission recovers when Redis returns");
    assert!(!gw.log_contains("panicked"));
}

/// Redis's own count of script calls (admissions and settlements; metering is off here).
fn script_calls(redis: &OwnRedis) -> u64 {
    let out = std::process::Command::new("redis-cli")
        .args(["-u", &redis.url(), "info", "commandstats"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("cmdstat_evalsha:") || l.starts_with("cmdstat_eval:"))
        .filter_map(|l| {
            l.split("calls=")
                .nth(1)?
                .split(',')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

#[tokio::test]
async fn with_leases_most_requests_make_no_store_call() {
    let backend = Backend::start().await.unwrap();
    let mut counts = Vec::new();
    for extra in [NO_LEASES, ""] {
        let redis = OwnRedis::start();
        let store = StoreKind::RedisAt {
            url: redis.url(),
            prefix: "trips".into(),
        };
        let gws = fleet_on(
            &backend,
            1,
            store,
            &format!("{extra}\n[metering]\nenabled = false\n"),
        )
        .await;
        let (_, key) = gws[0].create_key("acme", "enterprise").await.unwrap();
        let before = script_calls(&redis);
        let answers: Vec<u16> = futures::stream::iter(0..200)
            .map(|_| {
                let gw = &gws[0];
                let key = key.clone();
                async move {
                    gw.post_raw("/v1/chat/completions", Some(&key), chat(2))
                        .await
                        .unwrap()
                        .status()
                        .as_u16()
                }
            })
            .buffer_unordered(8)
            .collect()
            .await;
        assert!(answers.iter().all(|s| *s == 200));
        // Let the last settlements and lease give-backs land.
        tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
        counts.push(script_calls(&redis) - before);
        drop(gws);
        drop(redis);
    }
    let (exact, leased) = (counts[0], counts[1]);
    // (A script's first calls may be an EVALSHA answered NOSCRIPT, then an EVAL.)
    assert!(
        exact >= 400,
        "without leases: an admission and a settlement per request ({exact})"
    );
    assert!(
        leased <= 100,
        "with leases, {leased} store calls for 200 requests (without: {exact})"
    );
}
