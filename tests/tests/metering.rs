//! Every token a backend generated for a key is metered once, priced exactly and exported:
//! JSON and streamed responses, streams with and without the client's usage chunk, clients
//! that hang up mid-stream, and a Redis outage in the middle of the traffic.

use futures::StreamExt;
use rust_decimal::Decimal;
use serde_json::{json, Value};
use sluice_e2e::{
    Backend, Gateway, GatewayOptions, OwnRedis, StoreKind, ADMIN_TOKEN, SIM_EMBED_MODEL, SIM_MODEL,
};
use std::str::FromStr;
use std::time::Duration;

/// Prices for the sim model: flat input, graduated output with a low first band so that a
/// run crosses it. Embeddings have their own flat price.
const PRICES: &str = r#"
[[prices]]
model = "sim-chat"
tier = "*"
currency = "USD"
input = "0.50"
output = [ { up_to = 2000, per_million = "2.00" }, { per_million = "1.25" } ]

[[prices]]
model = "sim-embed"
tier = "*"
currency = "USD"
input = "0.02"
output = "0"
"#;

/// Graduated output price of `tokens` tokens from the start of the month, by hand.
fn output_cost(tokens: u64) -> Decimal {
    let first = tokens.min(2000);
    let rest = tokens - first;
    (Decimal::from(first) * Decimal::from_str("2.00").unwrap()
        + Decimal::from(rest) * Decimal::from_str("1.25").unwrap())
        / Decimal::from(1_000_000)
}

/// The kinds of traffic the run mixes.
#[derive(Clone, Copy, Debug)]
enum Kind {
    ChatJson,
    ChatStreamWithUsage,
    ChatStreamWithoutUsage,
    CompletionJson,
    CompletionStream,
    Embedding,
    /// A streamed chat whose client hangs up after the first chunk.
    ChatStreamHangUp,
}

const KINDS: [Kind; 7] = [
    Kind::ChatJson,
    Kind::ChatStreamWithUsage,
    Kind::ChatStreamWithoutUsage,
    Kind::CompletionJson,
    Kind::CompletionStream,
    Kind::Embedding,
    Kind::ChatStreamHangUp,
];

/// Sends one request of `kind` and checks what the client sees.
async fn send(gw: &Gateway, key: &str, kind: Kind, i: usize) {
    let prompt = format!("Request number {i} asks about canal locks and weirs.");
    let (path, body) = match kind {
        Kind::ChatJson => (
            "/v1/chat/completions",
            json!({"model": SIM_MODEL, "max_tokens": 5 + i % 9, "messages": [{"role": "user", "content": prompt}]}),
        ),
        Kind::ChatStreamWithUsage => (
            "/v1/chat/completions",
            json!({"model": SIM_MODEL, "stream": true, "stream_options": {"include_usage": true}, "messages": [{"role": "user", "content": prompt}]}),
        ),
        Kind::ChatStreamWithoutUsage | Kind::ChatStreamHangUp => (
            "/v1/chat/completions",
            json!({"model": SIM_MODEL, "stream": true, "max_tokens": 20, "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": prompt}]}),
        ),
        Kind::CompletionJson => (
            "/v1/completions",
            json!({"model": SIM_MODEL, "prompt": prompt, "max_tokens": 7, "n": 2}),
        ),
        Kind::CompletionStream => (
            "/v1/completions",
            json!({"model": SIM_MODEL, "prompt": [prompt, "and a second prompt"], "stream": true}),
        ),
        Kind::Embedding => (
            "/v1/embeddings",
            json!({"model": SIM_EMBED_MODEL, "input": [prompt, "weir"]}),
        ),
    };
    let response = gw
        .post_raw(path, Some(key), body.to_string())
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{kind:?}");
    match kind {
        Kind::ChatStreamHangUp => {
            let mut stream = response.bytes_stream();
            let first = stream.next().await.unwrap().unwrap();
            assert!(!first.is_empty());
            // Dropping the stream closes the connection mid-answer.
        }
        Kind::ChatStreamWithUsage => {
            let text = response.text().await.unwrap();
            assert!(
                text.contains("\"completion_tokens\""),
                "the client asked for usage"
            );
            assert!(text.ends_with("data: [DONE]\n\n"));
        }
        Kind::ChatStreamWithoutUsage | Kind::CompletionStream => {
            let text = response.text().await.unwrap();
            assert!(
                !text.contains("prompt_tokens"),
                "usage chunk the client did not ask for: {text}"
            );
            assert!(text.ends_with("data: [DONE]\n\n"));
        }
        _ => {
            let v: Value = response.json().await.unwrap();
            assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
        }
    }
}

/// Sends `count` requests, cycling through every kind, 16 at a time.
async fn traffic(gw: &Gateway, keys: &[String], count: usize, offset: usize) {
    futures::stream::iter(offset..offset + count)
        .for_each_concurrent(16, |i| async move {
            send(gw, &keys[i % keys.len()], KINDS[i % KINDS.len()], i).await;
        })
        .await;
}

async fn export(gw: &Gateway, group_by: &str) -> Vec<Value> {
    gw.billing_export(group_by).await.unwrap()
}

fn sum(rows: &[Value], field: &str) -> u64 {
    rows.iter().map(|r| r[field].as_u64().unwrap()).sum()
}

/// Waits until the export counts `requests` requests (events are written asynchronously,
/// within milliseconds; a drained hang-up takes as long as its generation).
async fn exported_rows(gw: &Gateway, requests: u64) -> Vec<Value> {
    for _ in 0..200 {
        let rows = export(gw, "key,model").await;
        if sum(&rows, "requests") >= requests {
            return rows;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rows = export(gw, "key,model").await;
    panic!(
        "export never reached {requests} requests: {rows:?}\n{}",
        gw.log()
    );
}

/// The export's totals against the backend's own counters, and its cost against prices
/// computed here by hand from the exported token totals.
async fn assert_reconciles(gw: &Gateway, backend: &Backend, requests: u64) {
    let rows = exported_rows(gw, requests).await;
    assert_eq!(
        sum(&rows, "requests"),
        requests,
        "nothing lost, nothing doubled"
    );
    let prompt = backend
        .metric("sluice_backend_prompt_tokens_total")
        .await
        .unwrap();
    let generated = backend
        .metric("sluice_backend_generation_tokens_total")
        .await
        .unwrap();
    assert_eq!(
        sum(&rows, "prompt_tokens"),
        prompt,
        "prompt tokens reconcile with the backend"
    );
    assert_eq!(
        sum(&rows, "completion_tokens"),
        generated,
        "completion tokens reconcile with the backend"
    );

    for row in &rows {
        let input = Decimal::from(row["prompt_tokens"].as_u64().unwrap());
        let output = row["completion_tokens"].as_u64().unwrap();
        let expected = match row["model"].as_str().unwrap() {
            SIM_MODEL => {
                input * Decimal::from_str("0.50").unwrap() / Decimal::from(1_000_000)
                    + output_cost(output)
            }
            SIM_EMBED_MODEL => {
                input * Decimal::from_str("0.02").unwrap() / Decimal::from(1_000_000)
            }
            other => panic!("unexpected model {other}"),
        };
        let cost = Decimal::from_str(row["cost"].as_str().unwrap()).unwrap();
        assert_eq!(cost, expected, "cost of {row}");
        assert_eq!(row["currency"], "USD");
    }
}

#[tokio::test]
async fn every_generated_token_is_exported_once_and_priced_exactly() {
    let backend = Backend::start_with(&["--sim-token-delay-ms", "2", "--sim-output-tokens", "24"])
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(GatewayOptions {
        extra_config: PRICES.to_owned(),
        ..GatewayOptions::new(&backend, StoreKind::Embedded(dir.path().to_owned()))
    })
    .await
    .unwrap();
    let (_, a) = gw.create_key("acme", "enterprise").await.unwrap();
    let (_, b) = gw.create_key("globex", "enterprise").await.unwrap();
    let keys = vec![a, b];
    traffic(&gw, &keys, 280, 0).await;
    assert_reconciles(&gw, &backend, 280).await;

    // Raw events carry the same totals, and a hang-up is marked as such.
    let events = export(&gw, "event").await;
    assert_eq!(events.len(), 280);
    assert_eq!(
        sum(&events, "completion_tokens"),
        backend
            .metric("sluice_backend_generation_tokens_total")
            .await
            .unwrap()
    );
    let hangups = events
        .iter()
        .filter(|e| e["client_disconnected"] == true)
        .count();
    assert!(hangups > 0, "hang-ups are recorded");
    assert!(
        events.iter().all(|e| e["usage_reported"] == true),
        "the backend's usage was read for every request"
    );
}

#[tokio::test]
async fn usage_survives_a_redis_outage_without_loss_or_double_count() {
    let backend = Backend::start_with(&["--sim-token-delay-ms", "1"])
        .await
        .unwrap();
    let mut redis = OwnRedis::start();
    let store = StoreKind::RedisAt {
        url: redis.url(),
        prefix: "outage".into(),
    };
    let gw = Gateway::start(GatewayOptions {
        extra_config: PRICES.to_owned(),
        ..GatewayOptions::new(&backend, store)
    })
    .await
    .unwrap();
    let (_, key) = gw.create_key("acme", "enterprise").await.unwrap();
    let keys = vec![key];

    traffic(&gw, &keys, 70, 0).await;
    redis.kill();
    // Served from the key cache; their events go to the local journal.
    traffic(&gw, &keys, 70, 70).await;
    redis.spawn();
    traffic(&gw, &keys, 70, 140).await;

    assert_reconciles(&gw, &backend, 210).await;
    assert!(
        gw.log_contains("usage journal replayed"),
        "the outage went through the journal"
    );
}

#[tokio::test]
async fn bad_export_requests_get_400() {
    let backend = Backend::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::embedded(&backend, dir.path()).await.unwrap();
    for (query, needle) in [
        (vec![("from", "yesterday")], "yesterday"),
        (vec![("from", "2026-05-02"), ("to", "2026-05-01")], "before"),
        (vec![("format", "xlsx")], "xlsx"),
        (vec![("group_by", "color")], "color"),
    ] {
        let r = gw
            .http
            .get(format!("{}/admin/v1/billing/export", gw.admin_url))
            .query(&query)
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{query:?}");
        let v: Value = r.json().await.unwrap();
        let message = v["error"]["message"].as_str().unwrap();
        assert!(message.contains(needle), "{message}");
    }
    let r = gw
        .http
        .get(format!(
            "{}/admin/v1/billing/export?from=2026-01-01&to=2026-02-01",
            gw.admin_url
        ))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    assert!(text.starts_with("month,day,key_id,tenant,model,currency,requests,prompt_tokens,completion_tokens,cached_tokens,cost"));
}

/// An export of more events than the store returns in one page (they are read, priced and
/// written a page at a time) is whole and priced exactly: graduated prices cross their band
/// mid-way through the pages, the event export and the grouped one agree to the token and
/// the cent, and the CSV has one line per event. On both stores.
async fn exports_past_a_store_page_case(store: StoreKind) {
    let backend = Backend::start().await.unwrap();
    let gw = Gateway::start(GatewayOptions {
        extra_config: PRICES.to_owned(),
        ..GatewayOptions::new(&backend, store)
    })
    .await
    .unwrap();
    let (_, a) = gw.create_key("acme", "enterprise").await.unwrap();
    let (_, b) = gw.create_key("globex", "enterprise").await.unwrap();
    let keys = [a, b];
    const REQUESTS: usize = 2400;
    futures::stream::iter(0..REQUESTS)
        .for_each_concurrent(16, |i| {
            let keys = &keys;
            let gw = &gw;
            async move { send(gw, &keys[i % 2], Kind::ChatJson, i).await }
        })
        .await;
    assert_reconciles(&gw, &backend, REQUESTS as u64).await;

    let events = export(&gw, "event").await;
    assert_eq!(events.len(), REQUESTS);
    let ids: std::collections::HashSet<&str> =
        events.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), REQUESTS, "no event twice");
    let rows = export(&gw, "key,model").await;
    let cost = |rows: &[Value]| -> Decimal {
        rows.iter()
            .map(|r| Decimal::from_str(r["cost"].as_str().unwrap()).unwrap())
            .sum()
    };
    assert_eq!(cost(&events), cost(&rows), "events and rows cost the same");
    assert_eq!(
        sum(&events, "completion_tokens"),
        sum(&rows, "completion_tokens")
    );
    let csv = gw
        .http
        .get(format!("{}/admin/v1/billing/export", gw.admin_url))
        .query(&[("group_by", "event"), ("format", "csv")])
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        csv.lines().count(),
        REQUESTS + 1,
        "a header and one line per event"
    );
}

#[tokio::test]
async fn exports_past_a_store_page_are_whole_on_the_embedded_store() {
    let dir = tempfile::tempdir().unwrap();
    exports_past_a_store_page_case(StoreKind::Embedded(dir.path().to_owned())).await;
}

#[tokio::test]
async fn exports_past_a_store_page_are_whole_on_redis() {
    exports_past_a_store_page_case(StoreKind::fresh_redis()).await;
}
