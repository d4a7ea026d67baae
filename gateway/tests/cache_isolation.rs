//! Property: whatever two tenants ask, in whatever order, neither is ever served an answer
//! the other's request stored — exactly or by meaning. Runs the gateway's response cache on
//! the embedded store with a real HTTP embedding endpoint (bag-of-words vectors, so that
//! paraphrases in the pool really do land within the threshold and semantic hits happen).

use axum::{routing::post, Json, Router};
use proptest::prelude::*;
use serde_json::{json, Value};
use sluice_gateway::auth::Identity;
use sluice_gateway::cache::answer::CachedAnswer;
use sluice_gateway::cache::ResponseCache;
use sluice_gateway::config::{CacheConfig, VerificationConfig};
use sluice_gateway::request::{RequestView, Route};
use sluice_gateway::store::EmbeddedStore;
use sluice_policies::cache::{CachePolicy, CacheRules};
use sluice_policies::Limits;
use std::sync::Arc;
use std::time::Duration;

const DIM: usize = 64;

/// Questions that overlap in words: paraphrases, a negation, and unrelated ones.
const QUESTIONS: &[&str] = &[
    "how do i reset my password",
    "how can i reset my password",
    "what is the capital of france",
    "what is the capital city of france",
    "is it safe to swim here",
    "is it not safe to swim here",
    "recommend a good book",
];

/// A bag-of-words embedding: each word adds one to a bucket chosen by its hash.
async fn embed(Json(request): Json<Value>) -> Json<Value> {
    let text = request["input"].as_str().unwrap_or_default();
    let mut v = vec![0.0f32; DIM];
    for word in text.split_whitespace() {
        let h = blake3::hash(word.to_lowercase().as_bytes());
        v[h.as_bytes()[0] as usize % DIM] += 1.0;
    }
    Json(json!({"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": v}]}))
}

async fn embedding_endpoint() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, Router::new().route("/v1/embeddings", post(embed)))
            .await
            .unwrap()
    });
    format!("http://{addr}/v1/embeddings")
}

fn cache(url: String, dir: &std::path::Path) -> ResponseCache {
    let config = CacheConfig {
        policy: CachePolicy {
            defaults: CacheRules {
                similarity_threshold: 0.8,
                ..CacheRules::default()
            },
            ..CachePolicy::default()
        },
        embedding_url: Some(url),
        embedding_model: "bag-of-words".into(),
        embedding_api_key: None,
        embedding_timeout: Duration::from_secs(5),
        max_entry_bytes: 1 << 20,
        max_entries: 100_000,
        max_bytes: 1 << 30,
        tenant_max_percent: 100,
        // Two-stage matching as configured by default: the property holds with it on.
        verification: VerificationConfig::default(),
    };
    ResponseCache::new(config, Arc::new(EmbeddedStore::open(dir).unwrap()))
}

fn asker(tenant: &str) -> Identity {
    Identity {
        key_id: format!("key-of-{tenant}"),
        tenant: tenant.to_owned(),
        tier: "free".to_owned(),
        limits: Limits::default(),
        cache: true,
        models: Default::default(),
        tenant_limits: Limits::default(),
        ledgers: sluice_gateway::auth::quota_ledgers(&format!("key-of-{tenant}"), tenant),
        model_limits: Default::default(),
        tenant_model_limits: Default::default(),
        distillation: None,
    }
}

fn body(question: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "model": "m", "temperature": 0,
        "messages": [{"role": "user", "content": question}],
    }))
    .unwrap()
}

fn answer_from(tenant: &str, question: &str) -> CachedAnswer {
    CachedAnswer {
        route: Route::ChatCompletions.name().into(),
        model: "m".into(),
        text: format!("{tenant}|{question}"),
        finish_reason: "stop".into(),
        prompt_tokens: 3,
        completion_tokens: 4,
        system_fingerprint: None,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn no_request_is_ever_answered_with_another_tenants_entry(
        ops in prop::collection::vec((0..2usize, 0..QUESTIONS.len()), 1..24)
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let cache = cache(embedding_endpoint().await, dir.path());
            for (who, q) in ops {
                let tenant = ["tenant-a", "tenant-b"][who];
                let question = QUESTIONS[q];
                let body = body(question);
                let view = RequestView::parse(Route::ChatCompletions, &body).unwrap();
                let mut plan = cache
                    .plan(Route::ChatCompletions, &asker(tenant), &view, &body, None, false)
                    .expect("eligible");
                match cache.lookup(&mut plan).await {
                    Some(hit) => {
                        let (owner, _) = hit.answer.text.split_once('|').unwrap();
                        prop_assert_eq!(owner, tenant, "served {:?} to {}", hit.answer.text, tenant);
                    }
                    None => cache.put(plan, answer_from(tenant, question)).await.unwrap(),
                }
            }
            Ok(())
        })?;
    }
}

/// The property above only means something if hits happen at all: across a fixed sequence,
/// both kinds do (and the negation is turned down by the verifier).
#[tokio::test]
async fn the_pool_produces_exact_and_semantic_hits_within_a_tenant() {
    let dir = tempfile::tempdir().unwrap();
    let cache = cache(embedding_endpoint().await, dir.path());
    let mut kinds = Vec::new();
    for q in [0, 0, 1, 4, 5, 2, 3] {
        let body = body(QUESTIONS[q]);
        let view = RequestView::parse(Route::ChatCompletions, &body).unwrap();
        let mut plan = cache
            .plan(
                Route::ChatCompletions,
                &asker("t"),
                &view,
                &body,
                None,
                false,
            )
            .unwrap();
        match cache.lookup(&mut plan).await {
            Some(hit) => kinds.push(hit.status.as_str()),
            None => {
                kinds.push("miss");
                cache
                    .put(plan, answer_from("t", QUESTIONS[q]))
                    .await
                    .unwrap();
            }
        }
    }
    assert_eq!(
        kinds,
        ["miss", "hit", "semantic", "miss", "miss", "miss", "semantic"]
    );
    let verification = cache.stats().verification;
    assert_eq!(verification.rejected["negation"], 1);
    assert_eq!(verification.verified, 2);
}
