//! The native engine's chat and text completions: a real `sluice-backend --engine native`
//! process serving SmolLM2-135M-Instruct from its GGUF file on the CPU, asked over HTTP,
//! whole and streamed, with several choices, by the Python `openai` package directly and
//! through a gateway; its metrics; a client hanging up. (The forward pass and batching are
//! checked against an independent reference in the backend's own tests; this proves the
//! server around them.)
//!
//! The weights come from scripts/fetch-weights.sh through `SLUICE_SMOLLM2_GGUF`
//! (scripts/test.sh sets it). Without them these tests say so and pass, except under
//! `CI=true`, where a missing model is a broken setup and fails them.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use sluice_e2e::{
    openai_error, python_check, required_weights, smollm2_gguf, Backend, Gateway, GatewayOptions,
    StoreKind,
};

const MODEL: &str = "smollm2";
const QUESTION: &str = "What is the capital of France?";

fn weights() -> Option<PathBuf> {
    required_weights(
        smollm2_gguf(),
        "SLUICE_SMOLLM2_GGUF",
        "SmolLM2-135M-Instruct",
    )
}

async fn smollm2_backend(file: &Path) -> Backend {
    let model = format!("{MODEL}={}", file.display());
    Backend::start_native(&["--device", "cpu", "--model", &model])
        .await
        .expect("the native backend starts with SmolLM2")
}

async fn post(backend: &Backend, body: Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", backend.url))
        .json(&body)
        .send()
        .await
        .expect("backend answers")
}

fn question(extra: Value) -> Value {
    let mut body = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": QUESTION}],
        "temperature": 0,
        "max_tokens": 48,
    });
    for (key, value) in extra.as_object().unwrap() {
        body[key] = value.clone();
    }
    body
}

#[tokio::test]
async fn greedy_chat_answers_paris_whole_and_streamed_alike_with_exact_usage() {
    let Some(file) = weights() else { return };
    let backend = smollm2_backend(&file).await;

    let health = reqwest::get(format!("{}/health", backend.url))
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let models: Value = reqwest::get(format!("{}/v1/models", backend.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        models["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["id"] == MODEL),
        "{models}"
    );

    let response = post(&backend, question(json!({}))).await;
    assert_eq!(response.status(), 200);
    let whole: Value = response.json().await.unwrap();
    assert_eq!(whole["object"], "chat.completion");
    assert_eq!(whole["model"], MODEL);
    let choice = &whole["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    let answer = choice["message"]["content"].as_str().unwrap().to_owned();
    assert!(
        answer.contains("Paris"),
        "the reply does not name Paris: {answer:?}"
    );
    let finish = choice["finish_reason"].as_str().unwrap().to_owned();
    let usage = &whole["usage"];
    let fingerprint = whole["system_fingerprint"].as_str().unwrap_or_default();
    assert!(
        fingerprint.starts_with("sluice-native-"),
        "a native reply says so: {fingerprint}"
    );
    let (prompt_tokens, completion_tokens) = (
        usage["prompt_tokens"].as_u64().unwrap(),
        usage["completion_tokens"].as_u64().unwrap(),
    );
    // The chat template wraps the question in role markers, and more: more tokens than words.
    assert!(prompt_tokens > 7, "{usage}");
    assert!((1..=48).contains(&completion_tokens), "{usage}");
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        prompt_tokens + completion_tokens
    );
    // A greedy reply that fits in 48 tokens ends at the end-of-sequence token; one that
    // does not stops at exactly the cap.
    match finish.as_str() {
        "stop" => assert!(completion_tokens < 48, "{usage}"),
        "length" => assert_eq!(completion_tokens, 48, "{usage}"),
        other => panic!("finish_reason {other}"),
    }

    let response = post(
        &backend,
        question(json!({"stream": true, "stream_options": {"include_usage": true}})),
    )
    .await;
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let body = response.text().await.unwrap();
    let events: Vec<&str> = body
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| e.strip_prefix("data: ").expect("every event is data"))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{body}");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let mut streamed = String::new();
    let mut finishes = Vec::new();
    for chunk in &chunks {
        assert_eq!(chunk["object"], "chat.completion.chunk");
        if let Some(choice) = chunk["choices"].as_array().unwrap().first() {
            streamed.push_str(choice["delta"]["content"].as_str().unwrap_or_default());
            if let Some(reason) = choice["finish_reason"].as_str() {
                finishes.push(reason.to_owned());
            }
        }
    }
    assert_eq!(
        streamed, answer,
        "greedy: the stream must say what the JSON said"
    );
    assert_eq!(finishes, [finish]);
    let last = chunks.last().unwrap();
    assert!(last["choices"].as_array().unwrap().is_empty(), "{last}");
    assert_eq!(&last["usage"], usage);
}

#[tokio::test]
async fn a_stop_string_ends_the_reply_before_it_and_a_prompt_past_the_context_is_refused() {
    let Some(file) = weights() else { return };
    let backend = smollm2_backend(&file).await;

    let whole: Value = post(&backend, question(json!({})))
        .await
        .json()
        .await
        .unwrap();
    let answer = whole["choices"][0]["message"]["content"].as_str().unwrap();
    let stopped: Value = post(&backend, question(json!({"stop": ["Paris"]})))
        .await
        .json()
        .await
        .unwrap();
    let choice = &stopped["choices"][0];
    let before = &answer[..answer.find("Paris").expect("the reply names Paris")];
    assert_eq!(choice["message"]["content"], before, "{stopped}");
    assert_eq!(choice["finish_reason"], "stop");

    let capped: Value = post(&backend, question(json!({"max_tokens": 2})))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(capped["choices"][0]["finish_reason"], "length", "{capped}");
    assert_eq!(capped["usage"]["completion_tokens"], 2);

    // Far more than SmolLM2's context (8192 tokens): each " Paris" is at least one token.
    let long = " Paris".repeat(9000);
    let response = post(
        &backend,
        json!({"model": MODEL, "messages": [{"role": "user", "content": long}]}),
    )
    .await;
    assert_eq!(response.status(), 400);
    let (kind, code, message) = openai_error(response).await.unwrap();
    assert_eq!(kind, "invalid_request_error");
    assert_eq!(code, "context_length_exceeded", "{message}");
}

/// The value of the series `name` (with its labels, if any) on the backend's /metrics.
async fn metric(backend: &Backend, series: &str) -> f64 {
    let text = reqwest::get(format!("{}/metrics", backend.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
        .parse()
        .unwrap()
}

/// Polls `series` until `done` holds of it, for up to a minute (a debug build on a busy
/// machine is slow).
async fn metric_until(backend: &Backend, series: &str, done: impl Fn(f64) -> bool) -> f64 {
    for _ in 0..600 {
        let value = metric(backend, series).await;
        if done(value) {
            return value;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("{series} never reached the expected value");
}

#[tokio::test]
async fn text_completions_give_n_choices_per_prompt_and_the_engine_reports_its_work() {
    let Some(file) = weights() else { return };
    let backend = smollm2_backend(&file).await;
    let models: Value = reqwest::get(format!("{}/v1/models", backend.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["device"], "cpu", "{models}");
    assert_eq!(models["data"][0]["max_model_len"], 8192, "{models}");

    let body = json!({
        "model": MODEL,
        "prompt": ["The capital of France is", "1, 2, 3, 4,"],
        "n": 2,
        "temperature": 0,
        "max_tokens": 4,
    });
    let response = reqwest::Client::new()
        .post(format!("{}/v1/completions", backend.url))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let reply: Value = response.json().await.unwrap();
    assert_eq!(reply["object"], "text_completion");
    let choices = reply["choices"].as_array().unwrap();
    let indexes: Vec<u64> = choices
        .iter()
        .map(|c| c["index"].as_u64().unwrap())
        .collect();
    assert_eq!(indexes, [0, 1, 2, 3], "{reply}");
    let text = |i: usize| choices[i]["text"].as_str().unwrap();
    // Greedy: both choices of a prompt agree, and the two prompts differ.
    assert_eq!(text(0), text(1));
    assert_eq!(text(2), text(3));
    assert!(text(0).contains("Paris"), "{reply}");
    assert!(text(2).contains('5'), "{reply}");
    for choice in choices {
        assert_eq!(choice["finish_reason"], "length", "{reply}");
    }
    assert_eq!(reply["usage"]["completion_tokens"], 4 * 4, "{reply}");
    let prompt_tokens = reply["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(prompt_tokens >= 8, "{reply}");

    // The engine counted those prompts (one prefill per choice), the decoded tokens and
    // four first tokens; its cache is free again.
    let labels = format!("{{model=\"{MODEL}\"}}");
    let prefill = metric_until(
        &backend,
        &format!("sluice_backend_engine_prefill_tokens_total{labels}"),
        |v| v > 0.0,
    )
    .await;
    assert_eq!(prefill as u64, 2 * prompt_tokens);
    let decoded = metric(
        &backend,
        &format!("sluice_backend_engine_decode_tokens_total{labels}"),
    )
    .await;
    // Each choice's last sampled token is never fed back.
    assert_eq!(decoded as u64, 4 * 3);
    let first_tokens = metric(
        &backend,
        &format!("sluice_backend_time_to_first_token_seconds_count{labels}"),
    )
    .await;
    assert_eq!(first_tokens as u64, 4);
    assert!(
        metric(
            &backend,
            &format!("sluice_backend_kv_cache_blocks_total{labels}")
        )
        .await
            > 0.0
    );
    assert_eq!(
        metric(
            &backend,
            &format!("sluice_backend_kv_cache_blocks_used{labels}")
        )
        .await,
        0.0
    );

    let bad = reqwest::Client::new()
        .post(format!("{}/v1/completions", backend.url))
        .json(&json!({"model": MODEL, "prompt": [[49152]]}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let (_, code, message) = openai_error(bad).await.unwrap();
    assert_eq!(code, "invalid_value", "{message}");
}

#[tokio::test]
async fn a_client_that_hangs_up_mid_stream_frees_its_sequence() {
    let Some(file) = weights() else { return };
    let backend = smollm2_backend(&file).await;
    let labels = format!("{{model=\"{MODEL}\"}}");
    let max_tokens = 4000;
    // Counting goes on and on: left alone, this runs to max_tokens (minutes on a CPU).
    let mut response = reqwest::Client::new()
        .post(format!("{}/v1/completions", backend.url))
        .json(&json!({
            "model": MODEL,
            "prompt": "1, 2, 3, 4, 5, 6, 7, 8,",
            "temperature": 0,
            "max_tokens": max_tokens,
            "stream": true,
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    // Wait for a few tokens, so the sequence is surely running.
    let mut seen = String::new();
    while seen.matches("data: ").count() < 3 {
        let chunk = response.chunk().await.unwrap().expect("the stream goes on");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert_eq!(
        metric(
            &backend,
            &format!("sluice_backend_engine_sequences_running{labels}")
        )
        .await,
        1.0
    );
    drop(response);

    metric_until(
        &backend,
        &format!("sluice_backend_engine_sequences_running{labels}"),
        |v| v == 0.0,
    )
    .await;
    assert_eq!(
        metric(
            &backend,
            &format!("sluice_backend_kv_cache_blocks_used{labels}")
        )
        .await,
        0.0
    );
    let decoded = metric(
        &backend,
        &format!("sluice_backend_engine_decode_tokens_total{labels}"),
    )
    .await;
    assert!(
        decoded < f64::from(max_tokens) / 2.0,
        "{decoded} tokens decoded"
    );
}

/// The Python `openai` package (scripts/test.sh's .venv) streams SmolLM2's reply from the
/// backend directly and through a gateway: tests/python/native_stream.py.
#[tokio::test]
async fn the_python_openai_client_streams_from_the_backend_and_through_the_gateway() {
    let Some(file) = weights() else { return };
    let backend = smollm2_backend(&file).await;
    let dir = tempfile::tempdir().unwrap();
    let gateway = Gateway::start(GatewayOptions::new(
        &backend,
        StoreKind::Embedded(dir.path().to_owned()),
    ))
    .await
    .expect("gateway starts");
    let (_, key) = gateway.create_key("native", "pro").await.unwrap();
    python_check(
        "native_stream.py",
        &[
            ("BACKEND_URL", &backend.url),
            ("SLUICE_URL", &gateway.url),
            ("SLUICE_KEY", &key),
            ("MODEL", MODEL),
        ],
        || gateway.log(),
    )
    .await;
}

/// Speculative decoding (on unless a request says `"speculative_decoding": false`) drafts
/// tokens by prompt lookup for a reply that copies its prompt: the reply is the same as
/// without, and /metrics counts drafted and kept tokens.
#[tokio::test]
async fn speculative_decoding_keeps_the_reply_and_counts_its_drafts() {
    let Some(file) = weights() else { return };
    let backend = smollm2_backend(&file).await;
    let copy = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content":
            "Repeat this sentence exactly: The quick brown fox jumps over the lazy dog near the old river bank."}],
        "temperature": 0,
        "max_tokens": 32,
    });
    let drafted = format!("sluice_backend_engine_drafted_tokens_total{{model=\"{MODEL}\"}}");
    let accepted = format!("sluice_backend_engine_accepted_tokens_total{{model=\"{MODEL}\"}}");
    let mut off = copy.clone();
    off["speculative_decoding"] = json!(false);
    let plain: Value = post(&backend, off).await.json().await.unwrap();
    assert_eq!(
        metric(&backend, &drafted).await,
        0.0,
        "no drafts for a request that turned them off"
    );
    // On by default.
    let speculated: Value = post(&backend, copy.clone()).await.json().await.unwrap();
    assert_eq!(
        speculated["choices"][0]["message"], plain["choices"][0]["message"],
        "{speculated} against {plain}"
    );
    assert_eq!(speculated["usage"], plain["usage"]);
    let (drafted, accepted) = (
        metric(&backend, &drafted).await,
        metric(&backend, &accepted).await,
    );
    assert!(
        accepted > 0.0 && accepted <= drafted,
        "{accepted} of {drafted} drafted tokens kept"
    );
    // Not a boolean: refused by name.
    let mut wrong = copy;
    wrong["speculative_decoding"] = json!("yes");
    let response = post(&backend, wrong).await;
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["param"], "speculative_decoding", "{body}");
}

/// Automatic prefix caching over HTTP: a second conversation with the same long system
/// prompt finds its blocks in the cache (counted on /metrics), and gets the reply it gets
/// from a backend that never saw the first.
#[tokio::test]
async fn a_shared_system_prompt_is_found_in_the_cache_and_changes_no_reply() {
    let Some(file) = weights() else { return };
    let backend = smollm2_backend(&file).await;
    let system = "You are the help desk of a small river shipping company. Answer in one short \
                  sentence, politely, and never mention prices, timetables or the weather.";
    let ask = |question: &str| {
        json!({
            "model": MODEL,
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": question},
            ],
            "temperature": 0,
            "max_tokens": 16,
        })
    };
    let hits = format!("sluice_backend_engine_prefix_cache_hit_tokens_total{{model=\"{MODEL}\"}}");
    let _: Value = post(&backend, ask("Is there a cafe on board?"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        metric(&backend, &hits).await,
        0.0,
        "nothing to find at first"
    );
    let second: Value = post(&backend, ask("Can I bring a bicycle?"))
        .await
        .json()
        .await
        .unwrap();
    let found = metric(&backend, &hits).await;
    // Blocks of 16 positions: at least the system turn's whole blocks.
    assert!(
        found >= 32.0 && found % 16.0 == 0.0,
        "{found} prompt tokens found"
    );

    let fresh = smollm2_backend(&file).await;
    let alone: Value = post(&fresh, ask("Can I bring a bicycle?"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        second["choices"], alone["choices"],
        "{second} against {alone}"
    );
    assert_eq!(
        second["usage"], alone["usage"],
        "usage counts every prompt token"
    );
}
