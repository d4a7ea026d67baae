//! The response cache end to end: real gateways, real backends (the simulated one for
//! answers, the native one running all-MiniLM-L6-v2 for embeddings), real Redis.

use reqwest::header::HeaderMap;
use serde_json::{json, Value};
use sluice_e2e::{
    minilm_dir, python_check, required_weights, Backend, Gateway, GatewayOptions, StoreKind,
    ADMIN_TOKEN, SIM_MODEL,
};
use std::time::Duration;

async fn embedder() -> Option<Backend> {
    let dir = required_weights(minilm_dir(), "SLUICE_MINILM_DIR", "all-MiniLM-L6-v2")?;
    let model = format!("all-MiniLM-L6-v2={}", dir.display());
    Some(
        Backend::start_native(&["--device", "cpu", "--model", &model])
            .await
            .expect("the MiniLM backend starts"),
    )
}

fn cache_config(embedder: Option<&Backend>, extra: &str) -> String {
    let embedding = embedder.map_or(String::new(), |b| {
        format!(
            "embedding_url = \"{}/v1/embeddings\"\nembedding_model = \"all-MiniLM-L6-v2\"\n",
            b.url
        )
    });
    // A test machine under load can take more than the default second to embed; a question
    // left without an embedding would miss for a reason the test does not mean to check.
    let timeout = if extra.contains("embedding_timeout_ms") {
        ""
    } else {
        "embedding_timeout_ms = 10000\n"
    };
    format!("[cache]\n{embedding}{timeout}{extra}\n")
}

async fn gateway(backend: &Backend, store: StoreKind, config: String) -> Gateway {
    let mut options = GatewayOptions::new(backend, store);
    options.extra_config = config;
    Gateway::start(options).await.unwrap()
}

fn embedded() -> StoreKind {
    let dir = tempfile::tempdir().unwrap().keep();
    StoreKind::Embedded(dir)
}

fn ask(question: &str) -> Value {
    json!({
        "model": SIM_MODEL,
        "temperature": 0,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": question},
        ],
    })
}

struct Answer {
    status: u16,
    headers: HeaderMap,
    body: Value,
}

impl Answer {
    fn cache(&self) -> &str {
        self.headers
            .get("x-sluice-cache")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    fn content(&self) -> &str {
        self.body["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or_default()
    }
}

async fn send_with(gw: &Gateway, key: &str, body: &Value, headers: &[(&str, &str)]) -> Answer {
    let mut request = gw
        .http
        .post(format!("{}/v1/chat/completions", gw.url))
        .bearer_auth(key)
        .json(body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.json().await.unwrap_or(Value::Null);
    Answer {
        status,
        headers,
        body,
    }
}

async fn send(gw: &Gateway, key: &str, body: &Value) -> Answer {
    send_with(gw, key, body, &[]).await
}

/// Sends until the answer comes from the cache (an answer is kept just after it is sent).
async fn send_until_cached(gw: &Gateway, key: &str, body: &Value) -> Answer {
    for _ in 0..100 {
        let answer = send(gw, key, body).await;
        // An error answer carries no cache header: say what it was rather than let the
        // caller's `cache() == "hit"` fail with an empty string.
        assert_eq!(
            answer.status,
            200,
            "waiting for a hit, got {} {}\n{}",
            answer.status,
            answer.body,
            gw.log()
        );
        if answer.cache() != "miss" {
            return answer;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("never answered from the cache\n{}", gw.log());
}

/// Chat completions the backend received (its health checks and scrapes not counted).
async fn backend_requests(backend: &Backend) -> u64 {
    let text = reqwest::get(format!("{}/metrics", backend.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let series = "sluice_backend_requests_total{route=\"/v1/chat/completions\"} ";
    text.lines()
        .find_map(|l| l.strip_prefix(series))
        .and_then(|v| v.trim().parse().ok())
        .expect("the backend counts chat completions")
}

#[tokio::test]
async fn the_same_request_twice_is_an_exact_hit_with_the_same_content() {
    let backend = Backend::start().await.unwrap();
    let gw = gateway(&backend, embedded(), cache_config(None, "")).await;
    let (_, key) = gw.create_key("acme", "pro").await.unwrap();
    let question = ask("What is the boiling point of water at sea level?");

    let first = send(&gw, &key, &question).await;
    assert_eq!(first.status, 200, "{:?}", first.body);
    assert_eq!(first.cache(), "miss");
    assert!(first.headers.contains_key("x-sluice-backend"));

    // The entry is stored just after the first answer: a resend may still miss (and reach
    // the backend), so the count that matters is the one just before the hit.
    let (second, served) = loop {
        let served = backend_requests(&backend).await;
        let answer = send(&gw, &key, &question).await;
        if answer.cache() != "miss" {
            break (answer, served);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(second.status, 200);
    assert_eq!(second.cache(), "hit");
    assert_eq!(second.content(), first.content());
    assert_eq!(second.body["object"], "chat.completion");
    assert_ne!(second.body["id"], first.body["id"], "a hit gets a new id");
    assert_eq!(second.body["usage"], {
        let mut usage = first.body["usage"].clone();
        usage["prompt_tokens_details"] = json!({"cached_tokens": usage["prompt_tokens"]});
        usage
    });
    assert!(!second.headers.contains_key("x-sluice-backend"));
    assert!(second
        .headers
        .contains_key("x-ratelimit-remaining-requests"));
    assert_eq!(
        backend_requests(&backend).await,
        served,
        "the backend was not asked"
    );

    // The same request written differently (key order, spacing, a delivery-only field) is
    // the same entry.
    let reordered: Value = serde_json::from_str(&format!(
        r#"{{ "user": "someone", "messages": {}, "temperature": 0.0, "model": "{SIM_MODEL}" }}"#,
        question["messages"]
    ))
    .unwrap();
    assert_eq!(send(&gw, &key, &reordered).await.cache(), "hit");

    // Cache-Control: no-cache goes to the backend; a different max_tokens is another entry.
    let fresh = send_with(&gw, &key, &question, &[("cache-control", "no-cache")]).await;
    assert_eq!(fresh.cache(), "miss");
    assert!(fresh.headers.contains_key("x-sluice-backend"));
    let mut capped = question.clone();
    capped["max_tokens"] = json!(3);
    assert_eq!(send(&gw, &key, &capped).await.cache(), "miss");
}

#[tokio::test]
async fn the_same_question_from_another_tenant_is_a_miss() {
    let backend = Backend::start().await.unwrap();
    let gw = gateway(&backend, embedded(), cache_config(None, "")).await;
    let (_, acme) = gw.create_key("acme", "pro").await.unwrap();
    let (_, other) = gw.create_key("globex", "pro").await.unwrap();
    let (_, acme_too) = gw.create_key("acme", "free").await.unwrap();
    let question = ask("Summarise our refund policy.");

    send(&gw, &acme, &question).await;
    assert_eq!(
        send_until_cached(&gw, &acme, &question).await.cache(),
        "hit"
    );
    // no-store, so that globex never finds an entry of its own either.
    for _ in 0..3 {
        let answer = send_with(&gw, &other, &question, &[("cache-control", "no-store")]).await;
        assert_eq!(
            answer.cache(),
            "miss",
            "another tenant never sees acme's entry"
        );
        assert!(answer.headers.contains_key("x-sluice-backend"));
    }
    // The tenant, not the key, owns an entry: acme's other key finds it.
    let answer = send(&gw, &acme_too, &question).await;
    assert_eq!(answer.cache(), "hit", "{} {}", answer.status, answer.body);
}

#[tokio::test]
async fn ineligible_requests_are_never_answered_from_the_cache() {
    let backend = Backend::start().await.unwrap();
    let gw = gateway(&backend, embedded(), cache_config(None, "")).await;
    let (_, key) = gw.create_key("acme", "pro").await.unwrap();
    let (id, no_cache_key) = gw.create_key("acme", "pro").await.unwrap();
    let turned_off = gw
        .http
        .patch(format!("{}/admin/v1/keys/{id}", gw.admin_url))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"cache": false}))
        .send()
        .await
        .unwrap();
    assert_eq!(turned_off.status(), 200);
    let view: Value = turned_off.json().await.unwrap();
    assert_eq!(view["cache"], false);

    let base = ask("Name a prime number.");
    let mut sampled = base.clone();
    sampled["temperature"] = json!(0.7);
    let mut unset = base.clone();
    unset.as_object_mut().unwrap().remove("temperature");
    let mut several = base.clone();
    several["n"] = json!(2);
    let mut tools = base.clone();
    tools["tools"] = json!([{"type": "function", "function": {"name": "f", "parameters": {}}}]);
    for body in [&sampled, &unset, &several, &tools] {
        for _ in 0..3 {
            let answer = send(&gw, &key, body).await;
            assert_eq!(answer.status, 200, "{:?}", answer.body);
            assert!(
                answer.headers.contains_key("x-sluice-backend"),
                "{body} was served from the cache"
            );
        }
    }
    for _ in 0..3 {
        let answer = send(&gw, &no_cache_key, &base).await;
        assert!(answer.headers.contains_key("x-sluice-backend"));
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    // no-store: answered, never kept.
    for _ in 0..3 {
        let answer = send_with(&gw, &key, &ask("Kept?"), &[("cache-control", "no-store")]).await;
        assert_eq!(answer.cache(), "miss");
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let (_, stats) = gw
        .admin(reqwest::Method::GET, "/admin/v1/cache/stats")
        .await
        .unwrap();
    assert_eq!(stats["entries"], 0, "{stats}");
}

#[tokio::test]
async fn a_paraphrase_is_a_semantic_hit_and_a_negation_is_a_miss() {
    let Some(embedder) = embedder().await else {
        return;
    };
    let backend = Backend::start().await.unwrap();
    let gw = gateway(
        &backend,
        StoreKind::fresh_redis(),
        cache_config(Some(&embedder), ""),
    )
    .await;
    let (_, key) = gw.create_key("acme", "pro").await.unwrap();
    let (_, other) = gw.create_key("globex", "pro").await.unwrap();

    let original = send(&gw, &key, &ask("How do I reset my password?")).await;
    assert_eq!(original.cache(), "miss");
    send_until_cached(&gw, &key, &ask("How do I reset my password?")).await;

    let paraphrase = send(&gw, &key, &ask("What is the way to reset my password?")).await;
    assert_eq!(paraphrase.cache(), "semantic", "{}", gw.log());
    assert_eq!(paraphrase.content(), original.content());
    let similarity: f32 = paraphrase.headers["x-sluice-cache-similarity"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((0.95..=1.0).contains(&similarity), "{similarity}");
    assert!(!paraphrase.headers.contains_key("x-sluice-backend"));

    // Unrelated, another tenant, or another system prompt: misses.
    assert_eq!(
        send(&gw, &key, &ask("How do I bake bread?")).await.cache(),
        "miss"
    );
    let mut other_system = ask("What is the way to reset my password?");
    other_system["messages"][0]["content"] = json!("Answer in French.");
    assert_eq!(send(&gw, &key, &other_system).await.cache(), "miss");
    assert_eq!(
        send(&gw, &other, &ask("What is the way to reset my password?"))
            .await
            .cache(),
        "miss"
    );

    // MiniLM puts a question and its negation closer together (cosine ~0.99) than most
    // paraphrases: only the verifier keeps the answer to one from the other.
    let safe = ask("Is ibuprofen safe during pregnancy?");
    send(&gw, &key, &safe).await;
    send_until_cached(&gw, &key, &safe).await;
    let negated = send(&gw, &key, &ask("Is ibuprofen not safe during pregnancy?")).await;
    assert_eq!(negated.cache(), "miss");
    assert!(negated.headers.contains_key("x-sluice-backend"));
    let (_, stats) = gw
        .admin(reqwest::Method::GET, "/admin/v1/cache/stats")
        .await
        .unwrap();
    assert!(
        stats["verification"]["rejected"]["negation"]
            .as_u64()
            .unwrap()
            >= 1,
        "{stats}"
    );
    assert!(stats["semantic_hits"].as_u64().unwrap() >= 1, "{stats}");
    assert_eq!(stats["by_tenant"]["globex"]["semantic_hits"], 0, "{stats}");
    assert_eq!(stats["by_tenant"]["globex"]["hits"], 0, "{stats}");
}

#[tokio::test]
async fn an_entry_written_through_one_replica_is_a_hit_through_another() {
    let backend = Backend::start().await.unwrap();
    let store = StoreKind::fresh_redis();
    let first = gateway(&backend, store.clone(), cache_config(None, "")).await;
    let second = gateway(&backend, store, cache_config(None, "")).await;
    let (_, key) = first.create_key("acme", "pro").await.unwrap();
    let question = ask("Which replica wrote this?");

    let original = send(&first, &key, &question).await;
    assert_eq!(original.cache(), "miss");
    let started = std::time::Instant::now();
    let replayed = send_until_cached(&second, &key, &question).await;
    assert_eq!(replayed.cache(), "hit");
    assert_eq!(replayed.content(), original.content());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "found by the second replica only after {:?}",
        started.elapsed()
    );

    // A purge through the second replica reaches the first.
    let (status, purged) = second
        .admin(reqwest::Method::DELETE, "/admin/v1/cache?tenant=acme")
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(purged["deleted"], 1);
    for _ in 0..100 {
        let (_, stats) = first
            .admin(reqwest::Method::GET, "/admin/v1/cache/stats")
            .await
            .unwrap();
        if stats["entries"] == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(send(&first, &key, &question).await.cache(), "miss");
}

#[tokio::test]
async fn hits_are_billed_as_cached_tokens_at_the_cache_price() {
    let backend = Backend::start().await.unwrap();
    let prices = format!(
        r#"
[[prices]]
model = "{SIM_MODEL}"
tier = "*"
currency = "USD"
input = "1"
output = "2"
cached = "0.1"
"#
    );
    let gw = gateway(&backend, embedded(), cache_config(None, "") + &prices).await;
    let (key_id, key) = gw.create_key("acme", "pro").await.unwrap();
    let question = ask("Bill me once.");
    let first = send(&gw, &key, &question).await;
    let hit = send_until_cached(&gw, &key, &question).await;
    assert_eq!(hit.cache(), "hit");
    let prompt = first.body["usage"]["prompt_tokens"].as_u64().unwrap();
    let completion = first.body["usage"]["completion_tokens"].as_u64().unwrap();

    let mut events = Vec::new();
    for _ in 0..100 {
        events = gw
            .billing_export("event")
            .await
            .unwrap()
            .into_iter()
            .filter(|e| e["key_id"] == key_id.as_str())
            .collect();
        if events.iter().any(|e| e["cache_status"] == "hit") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let hit_event = events
        .iter()
        .find(|e| e["cache_status"] == "hit")
        .unwrap_or_else(|| panic!("no hit event in {events:?}"));
    assert_eq!(hit_event["prompt_tokens"], prompt);
    assert_eq!(hit_event["completion_tokens"], completion);
    assert_eq!(hit_event["cached_tokens"], prompt + completion);
    // Every token at the cached price: (prompt + completion) × 0.1 per million.
    let expected = rust_decimal::Decimal::from(prompt + completion)
        * rust_decimal::Decimal::new(1, 1)
        / rust_decimal::Decimal::from(1_000_000);
    let cost: rust_decimal::Decimal = hit_event["cost"].as_str().unwrap().parse().unwrap();
    assert_eq!(cost, expected, "{hit_event}");
    let miss_event = events.iter().find(|e| e["cache_status"] == "miss").unwrap();
    let miss_cost: rust_decimal::Decimal = miss_event["cost"].as_str().unwrap().parse().unwrap();
    assert!(miss_cost > cost);
}

#[tokio::test]
async fn a_streamed_request_is_answered_from_cache_as_a_stream_python_reads() {
    let backend = Backend::start().await.unwrap();
    let gw = gateway(&backend, embedded(), cache_config(None, "")).await;
    let (_, key) = gw.create_key("acme", "pro").await.unwrap();
    let url = gw.url.clone();
    python_check(
        "cached_stream.py",
        &[
            ("SLUICE_URL", &url),
            ("SLUICE_KEY", &key),
            ("SIM_MODEL", SIM_MODEL),
        ],
        || gw.log(),
    )
    .await;
}

#[tokio::test]
async fn bad_purge_requests_get_400() {
    let backend = Backend::start().await.unwrap();
    let gw = gateway(&backend, embedded(), cache_config(None, "")).await;
    for path in ["/admin/v1/cache?tennant=x", "/admin/v1/cache?tenant="] {
        let (status, body) = gw.admin(reqwest::Method::DELETE, path).await.unwrap();
        assert_eq!(status, 400, "{path}: {body}");
        assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
    }
    let (status, body) = gw
        .admin(reqwest::Method::DELETE, "/admin/v1/cache")
        .await
        .unwrap();
    assert_eq!((status, body["deleted"].clone()), (200, json!(0)));
}

/// Asks `question` once and waits until its answer is kept, so a second question can find it.
async fn keep(gw: &Gateway, key: &str, question: &str) {
    send(gw, key, &ask(question)).await;
    send_until_cached(gw, key, &ask(question)).await;
}

async fn verification(gw: &Gateway) -> Value {
    let (_, stats) = gw
        .admin(reqwest::Method::GET, "/admin/v1/cache/stats")
        .await
        .unwrap();
    stats["verification"].clone()
}

/// The two stages through the real API on the default (embedded) store: near-identical
/// questions that ask something else miss, each turned down by its own check, while
/// rephrased, politer, retyped and recased questions far below the similarity threshold hit.
#[tokio::test]
async fn structural_changes_miss_and_rewordings_hit_on_the_embedded_store() {
    let Some(embedder) = embedder().await else {
        return;
    };
    let backend = Backend::start().await.unwrap();
    let gw = gateway(&backend, embedded(), cache_config(Some(&embedder), "")).await;
    let (_, key) = gw.create_key("acme", "pro").await.unwrap();

    for (stored, asked, check) in [
        (
            "Can a lender sue a borrower for late payment?",
            "Can a borrower sue a lender for late payment?",
            "role_swap",
        ),
        (
            "Is a heat pump cheaper to run than a gas boiler?",
            "Is a gas boiler cheaper to run than a heat pump?",
            "comparison",
        ),
        (
            "Is it legal to collect rainwater in Colorado?",
            "Is it illegal to collect rainwater in Colorado?",
            "negation",
        ),
        (
            "How much water should I drink on a 20 km hike?",
            "How much water should I drink on a 20 mile hike?",
            "units",
        ),
        (
            "What were the best selling cars last year?",
            "What were the best selling cars next year?",
            "time",
        ),
    ] {
        keep(&gw, &key, stored).await;
        let before = verification(&gw).await["rejected"][check].as_u64().unwrap();
        let answer = send(&gw, &key, &ask(asked)).await;
        assert_eq!((answer.status, answer.cache()), (200, "miss"), "{asked}");
        let after = verification(&gw).await["rejected"][check].as_u64().unwrap();
        assert!(
            after > before,
            "{stored} / {asked}: not turned down by {check}"
        );
    }

    for (stored, asked) in [
        (
            "How do I undo the last commit in git?",
            "hey, could you tell me how do I undo the last commit in git? thanks",
        ),
        (
            "In Excel, how do I freeze the top row?",
            "How do I freeze the top row in Excel?",
        ),
        (
            "How long should I steep green tea?",
            "How long shuold I steep green tea?",
        ),
    ] {
        keep(&gw, &key, stored).await;
        let answer = send(&gw, &key, &ask(asked)).await;
        assert_eq!(
            answer.cache(),
            "semantic",
            "{stored} / {asked}\n{}",
            gw.log()
        );
    }
    // Case, spacing and punctuation alone are an exact hit: no model involved.
    keep(&gw, &key, "What is the boiling point of ethanol?").await;
    let answer = send(&gw, &key, &ask("  what is the BOILING point of ethanol ")).await;
    assert_eq!(answer.cache(), "hit");
}

/// With the learned verifier at an address where nothing listens, or behind a server that
/// never answers, a candidate the structure lets through is a miss, answered by the backend
/// with a 200, never an error; with a scorer that answers, its score decides.
#[tokio::test]
async fn a_learned_verifier_that_is_down_or_slow_makes_a_miss_not_an_error() {
    let Some(embedder) = embedder().await else {
        return;
    };
    let backend = Backend::start().await.unwrap();
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_url = format!("http://{}/v1/score", dead.local_addr().unwrap());
    drop(dead);
    // Accepts connections and never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_url = format!("http://{}/v1/score", silent.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            held.push(socket);
        }
    });
    let (stored, asked) = (
        "How do I reset my router password?",
        "Could you please tell me how to reset my router password?",
    );
    for url in [dead_url, silent_url] {
        let extra = format!("verifier_url = \"{url}\"\nverifier_timeout_ms = 200\n");
        let gw = gateway(&backend, embedded(), cache_config(Some(&embedder), &extra)).await;
        let (_, key) = gw.create_key("acme", "pro").await.unwrap();
        keep(&gw, &key, stored).await;
        let answer = send(&gw, &key, &ask(asked)).await;
        assert_eq!((answer.status, answer.cache()), (200, "miss"), "{url}");
        assert!(answer.headers.contains_key("x-sluice-backend"));
        let v = verification(&gw).await;
        assert!(v["learned"].as_bool().unwrap(), "{v}");
        assert!(
            v["rejected"]["verifier_unavailable"].as_u64().unwrap() >= 1,
            "{v}"
        );
    }

    // A stand-in scorer (not a model: it scores by a fixed rule) in vLLM's /v1/score shape
    // and TEI's /rerank shape: high scores are served, low ones are turned down.
    for (path, score, expected) in [
        ("/v1/score", 0.9, "semantic"),
        ("/v1/score", 0.1, "miss"),
        ("/rerank", 0.9, "semantic"),
    ] {
        let url = stand_in_scorer(path, score).await;
        // The scorer answers at once; the long timeout only keeps a loaded machine from
        // turning its answer into "unavailable".
        let extra = format!(
            "verifier_url = \"{url}\"\nverifier_threshold = 0.5\nverifier_timeout_ms = 10000\n"
        );
        let gw = gateway(&backend, embedded(), cache_config(Some(&embedder), &extra)).await;
        let (_, key) = gw.create_key("acme", "pro").await.unwrap();
        keep(&gw, &key, stored).await;
        // Counted from here: while the first answer was being kept, a resend of the same
        // question may have been compared with it (exact lookup before the entry landed,
        // nearest-neighbour lookup after) and been turned down too.
        let rejected = |v: &Value| v["rejected"]["learned"].as_u64().unwrap();
        let before = rejected(&verification(&gw).await);
        let answer = send(&gw, &key, &ask(asked)).await;
        assert_eq!(answer.cache(), expected, "{path} {score}\n{}", gw.log());
        let v = verification(&gw).await;
        assert_eq!(rejected(&v) - before, u64::from(expected == "miss"), "{v}");
        // The structure is still checked before the scorer is asked.
        let negated = send(&gw, &key, &ask("How do I not reset my router password?")).await;
        assert_eq!(negated.cache(), "miss");
    }
}

/// A scoring endpoint that gives every pair `score`, in the shape its path implies.
async fn stand_in_scorer(path: &'static str, score: f64) -> String {
    use axum::{routing::post, Json, Router};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let handler = move |Json(request): Json<Value>| async move {
        if path == "/rerank" {
            assert!(request["query"].is_string() && request["texts"].is_array());
            Json(json!([{"index": 0, "score": score}]))
        } else {
            assert!(request["text_1"].is_string() && request["text_2"].is_string());
            Json(
                json!({"object": "list", "data": [{"index": 0, "object": "score", "score": score}]}),
            )
        }
    };
    tokio::spawn(async move {
        axum::serve(listener, Router::new().route(path, post(handler)))
            .await
            .unwrap()
    });
    format!("http://{addr}{path}")
}
