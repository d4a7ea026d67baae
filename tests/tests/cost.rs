//! What an answer says it cost: `x-sluice-cost` on non-streamed and cached answers and the
//! closing `: x-sluice-cost:` comment of streams, each equal to the billing export's cost of
//! the same request, on both stores.

use rust_decimal::Decimal;
use serde_json::{json, Value};
use sluice_e2e::{Backend, Gateway, GatewayOptions, StoreKind, SIM_EMBED_MODEL, SIM_MODEL};
use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;

/// Decimals that do not end in a round number of nano-units, so that a rounded figure
/// anywhere would show; cached tokens have their own price.
const PRICES: &str = r#"
[[prices]]
model = "sim-chat"
tier = "*"
currency = "EUR"
input = "0.1234567"
output = "2.7182818"
cached = "0.0314159"

[[prices]]
model = "sim-embed"
tier = "*"
currency = "EUR"
input = "0.0271828"
output = "0"

[tiers.free]
currency = "EUR"
[tiers.pro]
currency = "EUR"
[tiers.enterprise]
currency = "EUR"
"#;

/// The kinds of answers that say their cost, each sent by a key of its own.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    ChatJson,
    CompletionJson,
    Embedding,
    StreamWithUsage,
    StreamWithoutUsage,
    /// The same question as `CachedMiss`, asked again: served from the cache.
    CachedMiss,
    CachedHit,
    CachedStreamHit,
}

fn request(kind: Kind) -> (&'static str, Value) {
    let chat = |extra: Value| {
        let mut body = json!({"model": SIM_MODEL, "max_tokens": 9,
            "messages": [{"role": "user", "content": format!("How much does {kind:?} cost?")}]});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    let cached_question = json!({"model": SIM_MODEL, "temperature": 0, "max_tokens": 7,
        "messages": [{"role": "user", "content": "Which canal has the most locks?"}]});
    match kind {
        Kind::ChatJson => ("/v1/chat/completions", chat(json!({}))),
        Kind::CompletionJson => (
            "/v1/completions",
            json!({"model": SIM_MODEL, "prompt": "a weir", "max_tokens": 6, "n": 2}),
        ),
        Kind::Embedding => (
            "/v1/embeddings",
            json!({"model": SIM_EMBED_MODEL, "input": ["lock", "weir and sluice"]}),
        ),
        Kind::StreamWithUsage => (
            "/v1/chat/completions",
            chat(json!({"stream": true, "stream_options": {"include_usage": true}})),
        ),
        Kind::StreamWithoutUsage => ("/v1/chat/completions", chat(json!({"stream": true}))),
        Kind::CachedMiss | Kind::CachedHit => ("/v1/chat/completions", cached_question),
        Kind::CachedStreamHit => {
            let mut body = cached_question;
            body["stream"] = json!(true);
            ("/v1/chat/completions", body)
        }
    }
}

/// Sends `kind` and returns the cost its answer states, checking the answer is whole.
async fn stated_cost(gw: &Gateway, key: &str, kind: Kind) -> Decimal {
    let (path, body) = request(kind);
    let response = gw
        .post_raw(path, Some(key), body.to_string())
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{kind:?}");
    let headers = response.headers().clone();
    let header = |name: &str| headers.get(name).map(|v| v.to_str().unwrap().to_owned());
    let cached = matches!(kind, Kind::CachedHit | Kind::CachedStreamHit);
    assert_eq!(
        header("x-sluice-cache").as_deref() == Some("hit"),
        cached,
        "{kind:?}"
    );
    let text = response.text().await.unwrap();
    if body["stream"] == json!(true) {
        // The stream is whole and ends with the comment, after [DONE].
        let (stream, comment) = text
            .rsplit_once("data: [DONE]\n\n")
            .unwrap_or_else(|| panic!("{kind:?} did not end with [DONE]: {text}"));
        assert!(stream.starts_with("data: {"), "{kind:?}: {text}");
        let cost = comment
            .strip_prefix(": x-sluice-cost: ")
            .and_then(|c| c.strip_suffix(" EUR\n\n"))
            .unwrap_or_else(|| panic!("{kind:?}: no cost comment after [DONE]: {comment:?}"));
        if !cached {
            // The client gets no cost header for a stream: it is not known at header time.
            assert_eq!(header("x-sluice-cost"), None, "{kind:?}");
        }
        return Decimal::from_str(cost).unwrap();
    }
    let v: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{kind:?}: the held answer is whole JSON ({e}): {text}"));
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(
        header("content-length").map(|l| l.parse::<usize>().unwrap()),
        Some(text.len()),
        "{kind:?}"
    );
    assert_eq!(header("x-sluice-cost-currency").as_deref(), Some("EUR"));
    let cost = header("x-sluice-cost").unwrap_or_else(|| panic!("{kind:?}: no x-sluice-cost"));
    Decimal::from_str(&cost).unwrap()
}

async fn stated_costs_equal_the_export(store: StoreKind) {
    let backend = Backend::start_with(&["--model", "sim-unpriced"])
        .await
        .unwrap();
    let gw = Gateway::start(GatewayOptions {
        extra_config: PRICES.to_owned(),
        ..GatewayOptions::new(&backend, store)
    })
    .await
    .unwrap();
    let kinds = [
        Kind::ChatJson,
        Kind::CompletionJson,
        Kind::Embedding,
        Kind::StreamWithUsage,
        Kind::StreamWithoutUsage,
        Kind::CachedMiss,
        Kind::CachedHit,
        Kind::CachedStreamHit,
    ];
    let mut stated = BTreeMap::new();
    for kind in kinds {
        let (id, key) = gw.create_key("acme", "pro").await.unwrap();
        let cost = stated_cost(&gw, &key, kind).await;
        assert!(cost > Decimal::ZERO, "{kind:?}");
        stated.insert(id, (kind, cost));
        if kind == Kind::CachedMiss {
            // The answer is kept just after it is served; the hits come once it is.
            for _ in 0..100 {
                let (_, stats) = gw
                    .admin(reqwest::Method::GET, "/admin/v1/cache/stats")
                    .await
                    .unwrap();
                if stats["entries"].as_u64() > Some(0) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    // An unpriced model says nothing about cost.
    let (_, key) = gw.create_key("acme", "pro").await.unwrap();
    let r = gw
        .post_raw(
            "/v1/chat/completions",
            Some(&key),
            json!({"model": "sim-unpriced", "messages": [{"role": "user", "content": "x"}]})
                .to_string(),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("x-sluice-cost").is_none());

    // Each key made one request: its exported cost is that request's.
    let mut exported = BTreeMap::new();
    for _ in 0..100 {
        let rows = gw.billing_export("key").await.unwrap();
        exported = rows
            .iter()
            .filter_map(|r| {
                let id = r["key_id"].as_str()?.to_owned();
                let cost = Decimal::from_str(r["cost"].as_str()?).ok()?;
                stated.contains_key(&id).then_some((id, cost))
            })
            .collect();
        if exported.len() == stated.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (id, (kind, cost)) in &stated {
        assert_eq!(
            exported.get(id),
            Some(cost),
            "{kind:?}: stated {cost}, exported {:?}",
            exported.get(id)
        );
    }
}

#[tokio::test]
async fn stated_costs_equal_the_export_on_the_embedded_store() {
    let dir = tempfile::tempdir().unwrap();
    stated_costs_equal_the_export(StoreKind::Embedded(dir.path().to_owned())).await;
}

#[tokio::test]
async fn stated_costs_equal_the_export_on_redis() {
    stated_costs_equal_the_export(StoreKind::fresh_redis()).await;
}
