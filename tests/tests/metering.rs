//! Every token a backend generated for a key is metered once, priced exactly and exported:
//! JSON and streamed responses, streams with and without the client's usage chunk, clients
//! that hang up mid-stream, and a Redis outage in the middle of the traffic.

use futures::StreamExt;
use rust_decimal::Decimal;
use serde_json::{json, Value};
use sluice_e2e::postgres::{OwnPostgres, PgDatabase};
use sluice_e2e::{
    Backend, Gateway, GatewayOptions, OwnNats, OwnRedis, StoreKind, ADMIN_TOKEN, SIM_EMBED_MODEL,
    SIM_MODEL,
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
            assert!(ends_with_done_and_cost(&text), "{text}");
        }
        Kind::ChatStreamWithoutUsage | Kind::CompletionStream => {
            let text = response.text().await.unwrap();
            assert!(
                !text.contains("prompt_tokens"),
                "usage chunk the client did not ask for: {text}"
            );
            assert!(ends_with_done_and_cost(&text), "{text}");
        }
        _ => {
            let v: Value = response.json().await.unwrap();
            assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
        }
    }
}

/// A priced stream ends with `[DONE]` and then the comment saying what it cost.
fn ends_with_done_and_cost(text: &str) -> bool {
    text.rsplit_once("data: [DONE]\n\n")
        .is_some_and(|(_, rest)| {
            rest.starts_with(": x-sluice-cost: ") && rest.ends_with(" USD\n\n")
        })
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
    // The outage went through the journal.
    gw.wait_for_log("usage journal replayed").await;
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

/// A gateway whose usage goes to the PostgreSQL ledger at `postgres_url`.
async fn with_ledger(backend: &Backend, store: StoreKind, postgres_url: &str) -> Gateway {
    Gateway::start(GatewayOptions {
        extra_config: format!("[billing]\npostgres_url = {postgres_url:?}\n{PRICES}"),
        ..GatewayOptions::new(backend, store)
    })
    .await
    .unwrap()
}

/// The ledger's raw events and its rollups hold the same totals, and no event is there twice.
fn assert_ledger_agrees(db_url: &str, requests: u64) {
    let q = |sql: &str| sluice_e2e::postgres::psql(db_url, sql);
    let raw = q("SELECT count(*), sum(prompt_tokens), sum(completion_tokens), sum(cached_tokens) FROM usage_events");
    let rolled = q("SELECT sum(requests), sum(prompt_tokens), sum(completion_tokens), sum(cached_tokens) FROM usage_rollups");
    assert_eq!(raw, rolled, "raw events and rollups agree");
    assert!(raw.starts_with(&format!("{requests}|")), "{raw}");
    let distinct = q("SELECT count(DISTINCT id) FROM usage_events");
    assert_eq!(distinct, requests.to_string(), "no event twice");
}

async fn get(gw: &Gateway, path: &str, query: &[(&str, &str)]) -> (u16, String) {
    let r = gw
        .http
        .get(format!("{}{path}", gw.admin_url))
        .query(query)
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// With the ledger on the embedded store (the README's default store): every token once in
/// the ledger, exports from it reconciling with the backend, a CloudEvents export that
/// OpenMeter's schema accepts, budgets restored from the rollups after a restart, and a
/// tenant's purge.
#[tokio::test]
async fn the_ledger_bills_every_token_once_on_the_embedded_store() {
    let db = PgDatabase::create();
    let backend = Backend::start_with(&["--sim-token-delay-ms", "1"])
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = StoreKind::Embedded(dir.path().to_owned());
    let gw = with_ledger(&backend, store.clone(), &db.url).await;
    let (a_id, a) = gw.create_key("acme", "enterprise").await.unwrap();
    let (_, b) = gw.create_key("globex", "enterprise").await.unwrap();
    traffic(&gw, &[a.clone(), b], 140, 0).await;
    assert_reconciles(&gw, &backend, 140).await;
    assert_ledger_agrees(&db.url, 140);

    // Whole days come from the rollups: a range of whole days gives the same totals.
    let today = db.query("SELECT (now() AT TIME ZONE 'UTC')::date::text");
    let tomorrow = db.query("SELECT ((now() AT TIME ZONE 'UTC')::date + 1)::text");
    let (status, body) = get(
        &gw,
        "/admin/v1/billing/export",
        &[
            ("from", &today),
            ("to", &tomorrow),
            ("group_by", "tenant"),
            ("format", "jsonl"),
        ],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let rows: Vec<Value> = body
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(sum(&rows, "requests"), 140);
    let by_key = export(&gw, "key,model").await;
    let cost = |rows: &[Value]| -> Decimal {
        rows.iter()
            .map(|r| Decimal::from_str(r["cost"].as_str().unwrap()).unwrap())
            .sum()
    };
    assert_eq!(cost(&rows), cost(&by_key), "rollups price as events do");

    // The OpenMeter feed: one CloudEvent per request, valid against its schema.
    let (status, feed) = get(
        &gw,
        "/admin/v1/billing/export",
        &[("group_by", "event"), ("format", "cloudevents")],
    )
    .await;
    assert_eq!(status, 200, "{feed}");
    let feed_path = dir.path().join("feed.jsonl");
    std::fs::write(&feed_path, &feed).unwrap();
    sluice_e2e::python_check(
        "openmeter_cloudevents.py",
        &[
            ("SLUICE_EXPORT", feed_path.to_str().unwrap()),
            ("SLUICE_EXPECTED_EVENTS", "140"),
        ],
        || gw.log(),
    )
    .await;

    // A restart rebuilds this month's budget use from the rollups. (Before it, the live
    // figure also holds what the replica's leases reserve; they are given back at exit.)
    let mut gw = gw;
    gw.terminate().unwrap();
    gw.wait_exit(Duration::from_secs(20)).await.unwrap();
    let gw = with_ledger(&backend, store, &db.url).await;
    let spent_nano: i64 = db
        .query(&format!(
            "SELECT sum(spend_nano) FROM usage_rollups WHERE key_id = '{a_id}'"
        ))
        .parse()
        .unwrap();
    assert!(spent_nano > 0, "the run spent something");
    assert_eq!(
        gw.quota(&a_id).await.unwrap()["monthly_budget"]["used"],
        Decimal::new(spent_nano, 9).normalize().to_string(),
        "budget use restored from the ledger"
    );

    // A tenant's data-deletion request.
    let (status, body) = gw
        .admin(reqwest::Method::DELETE, "/admin/v1/tenants/acme/usage")
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["events_deleted"], 70);
    let left = export(&gw, "event").await;
    assert_eq!(left.len(), 70);
    assert!(left.iter().all(|e| e["tenant"] == "globex"));
    assert_eq!(
        db.query("SELECT count(*) FROM usage_rollups WHERE tenant = 'acme'"),
        "0"
    );
}

/// The ledger killed mid-traffic on Redis: what it cannot take waits in Redis's buffer, and
/// reaches the ledger once, when it is back. Exports answer 503 meanwhile, not a short bill.
#[tokio::test]
async fn a_ledger_outage_is_buffered_in_redis_and_billed_once() {
    let mut postgres = OwnPostgres::start();
    let db = PgDatabase::create_on(&postgres.url());
    let backend = Backend::start_with(&["--sim-token-delay-ms", "1"])
        .await
        .unwrap();
    let prefix = format!("ledger-{}", uuid::Uuid::new_v4().simple());
    let gw = with_ledger(&backend, StoreKind::Redis(prefix.clone()), &db.url).await;
    let (_, key) = gw.create_key("acme", "enterprise").await.unwrap();
    let keys = vec![key];
    traffic(&gw, &keys, 70, 0).await;
    postgres.kill();
    traffic(&gw, &keys, 70, 70).await;
    // Down until the gateway has taken the outage path (a write waits out the pool's
    // connection attempts first), however fast the traffic went.
    gw.wait_for_log("events buffered in the store").await;
    let (status, _) = get(&gw, "/admin/v1/billing/export", &[("group_by", "event")]).await;
    assert_eq!(status, 503, "an export without its ledger is refused");
    postgres.spawn();
    traffic(&gw, &keys, 70, 140).await;

    assert_reconciles(&gw, &backend, 210).await;
    assert_ledger_agrees(&db.url, 210);
    // The buffer is empty again.
    let redis = redis::Client::open(sluice_e2e::redis_url()).unwrap();
    let mut conn = redis.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{{{prefix}:usage:*}}:buffer"))
        .query_async(&mut conn)
        .await
        .unwrap();
    for key in keys {
        let left: u64 = redis::cmd("ZCARD")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(left, 0, "{key} still buffers events");
    }
}

/// Without a shared buffer (the embedded store), a ledger outage goes to the journal.
#[tokio::test]
async fn a_ledger_outage_on_the_embedded_store_is_journaled_and_billed_once() {
    let mut postgres = OwnPostgres::start();
    let db = PgDatabase::create_on(&postgres.url());
    let backend = Backend::start_with(&["--sim-token-delay-ms", "1"])
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let gw = with_ledger(
        &backend,
        StoreKind::Embedded(dir.path().to_owned()),
        &db.url,
    )
    .await;
    let (_, key) = gw.create_key("acme", "enterprise").await.unwrap();
    let keys = vec![key];
    traffic(&gw, &keys, 70, 0).await;
    postgres.kill();
    traffic(&gw, &keys, 70, 70).await;
    gw.wait_for_log("journaling events").await;
    postgres.spawn();
    traffic(&gw, &keys, 70, 140).await;
    assert_reconciles(&gw, &backend, 210).await;
    assert_ledger_agrees(&db.url, 210);
    gw.wait_for_log("usage journal replayed").await;
}

/// Every message on the feed's stream so far, as a billing system's consumer reads them.
async fn feed_messages(nats_url: &str) -> Vec<Value> {
    use async_nats::jetstream::consumer::pull;
    let client = async_nats::connect(nats_url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    // Until the gateway's first publish, the stream does not exist yet.
    let Ok(stream) = js.get_stream("SLUICE_USAGE").await else {
        return Vec::new();
    };
    let consumer = stream
        .create_consumer(pull::Config::default())
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    let mut out = Vec::new();
    while let Ok(Some(message)) =
        tokio::time::timeout(Duration::from_secs(2), messages.next()).await
    {
        let message = message.unwrap();
        out.push(serde_json::from_slice(&message.payload).unwrap());
        message.ack().await.unwrap();
    }
    out
}

/// The NATS JetStream feed: with NATS killed and restarted mid-traffic, a consumer receives
/// every request's event (after dropping copies by id), in OpenMeter's CloudEvents shape, and
/// exactly the events billing exports.
#[tokio::test]
async fn the_nats_feed_delivers_every_event_through_a_nats_restart() {
    let mut nats = OwnNats::start();
    let backend = Backend::start_with(&["--sim-token-delay-ms", "1"])
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(GatewayOptions {
        extra_config: format!("[billing]\nnats_url = {:?}\n{PRICES}", nats.url()),
        ..GatewayOptions::new(&backend, StoreKind::Embedded(dir.path().to_owned()))
    })
    .await
    .unwrap();
    let (_, key) = gw.create_key("acme", "enterprise").await.unwrap();
    let keys = vec![key];
    traffic(&gw, &keys, 70, 0).await;
    nats.kill();
    traffic(&gw, &keys, 70, 70).await;
    gw.wait_for_log("usage feed: NATS unreachable").await;
    nats.spawn();
    traffic(&gw, &keys, 70, 140).await;
    assert_reconciles(&gw, &backend, 210).await;

    let exported: std::collections::BTreeSet<String> = export(&gw, "event")
        .await
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect();
    let mut received = std::collections::BTreeMap::new();
    for _ in 0..100 {
        for event in feed_messages(&nats.url()).await {
            received.insert(event["id"].as_str().unwrap().to_owned(), event);
        }
        if received.len() >= exported.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let ids: std::collections::BTreeSet<String> = received.keys().cloned().collect();
    assert_eq!(
        ids,
        exported,
        "the feed carries exactly the billed events\n{}",
        gw.log()
    );
    let completion: u64 = received
        .values()
        .map(|e| e["data"]["completion_tokens"].as_u64().unwrap())
        .sum();
    assert_eq!(
        completion,
        backend
            .metric("sluice_backend_generation_tokens_total")
            .await
            .unwrap()
    );
    let feed_path = dir.path().join("nats-feed.jsonl");
    let lines: Vec<String> = received.values().map(Value::to_string).collect();
    std::fs::write(&feed_path, lines.join("\n") + "\n").unwrap();
    sluice_e2e::python_check(
        "openmeter_cloudevents.py",
        &[
            ("SLUICE_EXPORT", feed_path.to_str().unwrap()),
            ("SLUICE_EXPECTED_EVENTS", "210"),
        ],
        || gw.log(),
    )
    .await;
}

/// Turning the ledger on where the store has been the record: `sluice billing import`
/// copies the store's events into the ledger once (a second run adds nothing), and the
/// gateway, restarted with the ledger, exports the same bill as before.
#[tokio::test]
async fn the_stores_usage_is_imported_into_the_ledger_once() {
    let db = PgDatabase::create();
    let backend = Backend::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = StoreKind::Embedded(dir.path().to_owned());
    let gw = Gateway::start(GatewayOptions {
        extra_config: PRICES.to_owned(),
        ..GatewayOptions::new(&backend, store.clone())
    })
    .await
    .unwrap();
    let (_, key) = gw.create_key("acme", "enterprise").await.unwrap();
    traffic(&gw, &[key], 70, 0).await;
    let before = exported_rows(&gw, 70).await;
    let mut gw = gw;
    gw.terminate().unwrap();
    gw.wait_exit(Duration::from_secs(20)).await.unwrap();

    let config = dir.path().join("import.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\ndata_dir = {:?}\n\n[billing]\npostgres_url = {:?}\n{PRICES}",
            dir.path().display().to_string(),
            db.url
        ),
    )
    .unwrap();
    let import = || {
        let out = std::process::Command::new(sluice_e2e::binary("sluice"))
            .args(["billing", "import", "--config"])
            .arg(&config)
            .env_remove("SLUICE_POSTGRES_URL")
            .env_remove("SLUICE_REDIS_URL")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert_eq!(
        import(),
        "70 usage events read from the store, 70 new in the ledger"
    );
    assert_eq!(
        import(),
        "70 usage events read from the store, 0 new in the ledger"
    );
    assert_ledger_agrees(&db.url, 70);

    let gw = with_ledger(&backend, store, &db.url).await;
    let after = export(&gw, "key,model").await;
    assert_eq!(after, before, "the same bill from the ledger");
}
