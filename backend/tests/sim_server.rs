//! The simulated backend, driven over HTTP the way the gateway and OpenAI clients drive it.
//! Every test starts its own server on an ephemeral port; none asserts on timing.

use std::pin::Pin;
use std::time::Duration;

use axum::body::Bytes;
use base64::Engine as _;
use futures::{Stream, StreamExt};
use reqwest::StatusCode;
use serde_json::{json, Value};
use sluice_backend::{serve, AppState, SimConfig};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

const MODEL: &str = "sim-chat";

struct Backend {
    base: String,
    client: reqwest::Client,
    _stop: oneshot::Sender<()>,
}

impl Backend {
    async fn start() -> Self {
        Self::start_with(SimConfig::default()).await
    }

    async fn start_with(sim: SimConfig) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let state = AppState::new(vec![MODEL.to_owned(), "sim-embed".to_owned()], sim);
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(serve(listener, state, async {
            let _ = stopped.await;
        }));
        Self {
            base,
            client: reqwest::Client::new(),
            _stop: stop,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        let response = self
            .client
            .post(self.url(path))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = response.status();
        (status, response.json().await.unwrap())
    }

    async fn post_raw(&self, path: &str, body: &'static str) -> (StatusCode, Value) {
        let response = self
            .client
            .post(self.url(path))
            .body(body)
            .send()
            .await
            .unwrap();
        let status = response.status();
        (status, response.json().await.unwrap())
    }

    async fn get(&self, path: &str) -> reqwest::Response {
        self.client.get(self.url(path)).send().await.unwrap()
    }

    async fn stream(&self, path: &str, body: Value) -> Sse {
        let response = self
            .client
            .post(self.url(path))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.headers()["content-type"].to_str().unwrap(),
            "text/event-stream"
        );
        Sse {
            body: Box::pin(response.bytes_stream()),
            buffer: Vec::new(),
        }
    }
}

/// A minimal SSE reader: yields each event's `data` payload as it arrives.
struct Sse {
    body: Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>,
    buffer: Vec<u8>,
}

impl Sse {
    async fn next_data(&mut self) -> Option<String> {
        loop {
            if let Some(end) = self.buffer.windows(2).position(|w| w == b"\n\n") {
                let event: Vec<u8> = self.buffer.drain(..end + 2).collect();
                let event = String::from_utf8(event).unwrap();
                let data = event.trim_end().strip_prefix("data: ").unwrap();
                return Some(data.to_owned());
            }
            match self.body.next().await {
                Some(chunk) => self.buffer.extend_from_slice(&chunk.unwrap()),
                None => {
                    assert!(self.buffer.is_empty(), "stream ended mid-event");
                    return None;
                }
            }
        }
    }

    /// Every event up to `[DONE]`, parsed; asserts the stream ends right after `[DONE]`.
    async fn chunks_until_done(&mut self) -> Vec<Value> {
        let mut chunks = Vec::new();
        loop {
            let data = self.next_data().await.expect("stream ended before [DONE]");
            if data == "[DONE]" {
                assert_eq!(self.next_data().await, None, "nothing may follow [DONE]");
                return chunks;
            }
            chunks.push(serde_json::from_str(&data).unwrap());
        }
    }
}

fn chat(content: &str) -> Value {
    json!({"model": MODEL, "messages": [{"role": "user", "content": content}]})
}

fn with(mut body: Value, extra: Value) -> Value {
    for (key, value) in extra.as_object().unwrap() {
        body[key] = value.clone();
    }
    body
}

/// The content deltas of a chat stream: the chunks that carry text.
fn content_deltas(chunks: &[Value]) -> Vec<String> {
    chunks
        .iter()
        .filter_map(|c| c["choices"].get(0)?["delta"]["content"].as_str())
        .filter(|text| !text.is_empty())
        .map(str::to_owned)
        .collect()
}

fn assert_openai_error(body: &Value, code: Option<&str>, param: Option<&str>) {
    let error = &body["error"];
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert_eq!(error["type"], "invalid_request_error", "{body}");
    assert_eq!(error["code"].as_str(), code, "{body}");
    assert_eq!(error["param"].as_str(), param, "{body}");
}

#[tokio::test]
async fn chat_usage_counts_words_punctuation_and_three_tokens_per_message() {
    let backend = Backend::start().await;
    let body = json!({"model": MODEL, "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [{"type": "text", "text": "Hello, world!"}]},
    ]});
    let (status, reply) = backend.post("/v1/chat/completions", body).await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    assert_eq!(reply["object"], "chat.completion");
    assert!(reply["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(reply["model"], MODEL);
    // "You are terse." = 4, "Hello, world!" = 4, 3 per message.
    assert_eq!(reply["usage"]["prompt_tokens"], 4 + 4 + 2 * 3);
    assert_eq!(reply["usage"]["completion_tokens"], 16);
    assert_eq!(reply["usage"]["total_tokens"], 14 + 16);
    let choice = &reply["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["finish_reason"], "stop");
    let content = choice["message"]["content"].as_str().unwrap();
    assert_eq!(content.split_whitespace().count(), 16, "{content}");
}

#[tokio::test]
async fn streamed_chat_sends_one_content_delta_per_completion_token() {
    let backend = Backend::start().await;
    let body = with(
        chat("Tell me about rivers."),
        json!({"stream": true, "stream_options": {"include_usage": true}}),
    );
    let chunks = backend
        .stream("/v1/chat/completions", body.clone())
        .await
        .chunks_until_done()
        .await;

    let first = &chunks[0];
    assert_eq!(first["object"], "chat.completion.chunk");
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(first["choices"][0]["delta"]["content"], "");

    let usage_chunk = chunks.last().unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));
    let usage = &usage_chunk["usage"];
    let deltas = content_deltas(&chunks);
    assert_eq!(
        deltas.len() as u64,
        usage["completion_tokens"].as_u64().unwrap()
    );
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + deltas.len() as u64
    );

    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "stop");
    assert_eq!(finish["choices"][0]["delta"], json!({}));
    for chunk in &chunks[..chunks.len() - 1] {
        assert!(
            chunk["usage"].is_null() && chunk.get("usage").is_some(),
            "{chunk}"
        );
        assert_eq!(chunk["id"], usage_chunk["id"]);
    }

    // The stream says exactly what the non-streamed reply says.
    let (_, whole) = backend
        .post("/v1/chat/completions", with(body, json!({"stream": false})))
        .await;
    assert_eq!(whole["choices"][0]["message"]["content"], deltas.concat());
    assert_eq!(whole["usage"], *usage);
}

#[tokio::test]
async fn usage_chunk_is_sent_only_when_the_client_asks_for_it() {
    let backend = Backend::start().await;
    for options in [json!(null), json!({"include_usage": false}), json!({})] {
        let body = with(
            chat("hello"),
            json!({"stream": true, "stream_options": options}),
        );
        let chunks = backend
            .stream("/v1/chat/completions", body)
            .await
            .chunks_until_done()
            .await;
        assert!(chunks.iter().all(|c| c.get("usage").is_none()), "{options}");
        assert_eq!(
            chunks.last().unwrap()["choices"][0]["finish_reason"],
            "stop"
        );
        assert_eq!(content_deltas(&chunks).len(), 16);
    }
}

#[tokio::test]
async fn max_tokens_caps_the_reply_and_reports_length() {
    let backend = Backend::start().await;
    for (cap, count) in [
        (json!({"max_tokens": 5}), 5),
        (json!({"max_completion_tokens": 3}), 3),
        (json!({"max_tokens": 8, "max_completion_tokens": 4}), 4),
    ] {
        let (status, reply) = backend
            .post("/v1/chat/completions", with(chat("hi"), cap.clone()))
            .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(reply["usage"]["completion_tokens"], count, "{cap}");
        assert_eq!(reply["choices"][0]["finish_reason"], "length", "{cap}");
    }

    // A cap above the natural length changes nothing.
    let (_, reply) = backend
        .post(
            "/v1/chat/completions",
            with(chat("hi"), json!({"max_tokens": 100})),
        )
        .await;
    assert_eq!(reply["usage"]["completion_tokens"], 16);
    assert_eq!(reply["choices"][0]["finish_reason"], "stop");

    let body = with(
        chat("hi"),
        json!({"max_tokens": 4, "stream": true, "stream_options": {"include_usage": true}}),
    );
    let chunks = backend
        .stream("/v1/chat/completions", body)
        .await
        .chunks_until_done()
        .await;
    assert_eq!(content_deltas(&chunks).len(), 4);
    assert_eq!(
        chunks[chunks.len() - 2]["choices"][0]["finish_reason"],
        "length"
    );
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], 4);
}

#[tokio::test]
async fn the_same_request_gets_the_same_reply() {
    let backend = Backend::start().await;
    let content = |reply: &Value, i: usize| {
        reply["choices"][i]["message"]["content"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let (_, a) = backend.post("/v1/chat/completions", chat("same")).await;
    let (_, b) = backend.post("/v1/chat/completions", chat("same")).await;
    assert_eq!(content(&a, 0), content(&b, 0));
    assert_ne!(a["id"], b["id"]);

    let (_, seeded) = backend
        .post(
            "/v1/chat/completions",
            with(chat("same"), json!({"seed": 7})),
        )
        .await;
    assert_ne!(content(&a, 0), content(&seeded, 0));
    let (_, other) = backend
        .post("/v1/chat/completions", chat("different"))
        .await;
    assert_ne!(content(&a, 0), content(&other, 0));

    let (_, three) = backend
        .post("/v1/chat/completions", with(chat("same"), json!({"n": 3})))
        .await;
    assert_eq!(three["choices"].as_array().unwrap().len(), 3);
    assert_eq!(content(&three, 0), content(&a, 0));
    assert_ne!(content(&three, 1), content(&three, 0));
    for i in 0..3 {
        assert_eq!(three["choices"][i]["index"], i);
    }
    assert_eq!(three["usage"]["completion_tokens"], 3 * 16);
}

#[tokio::test]
async fn completions_give_n_choices_per_prompt_with_running_indexes() {
    let backend = Backend::start().await;
    let (status, reply) = backend
        .post(
            "/v1/completions",
            json!({"model": MODEL, "prompt": ["first prompt", "second prompt"], "n": 2, "max_tokens": 6}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    assert_eq!(reply["object"], "text_completion");
    assert!(reply["id"].as_str().unwrap().starts_with("cmpl-"));
    let choices = reply["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 4);
    for (i, choice) in choices.iter().enumerate() {
        assert_eq!(choice["index"], i);
        assert_eq!(choice["finish_reason"], "length");
        assert_eq!(
            choice["text"].as_str().unwrap().split_whitespace().count(),
            6
        );
    }
    assert_eq!(reply["usage"]["prompt_tokens"], 4);
    assert_eq!(reply["usage"]["completion_tokens"], 4 * 6);

    // A prompt gets the same reply alone as in a batch.
    let (_, alone) = backend
        .post(
            "/v1/completions",
            json!({"model": MODEL, "prompt": "second prompt", "max_tokens": 6}),
        )
        .await;
    assert_eq!(alone["choices"][0]["text"], choices[2]["text"]);

    // Token-id prompts count one token per id.
    let (status, ids) = backend
        .post(
            "/v1/completions",
            json!({"model": MODEL, "prompt": [1, 2, 3]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{ids}");
    assert_eq!(ids["usage"]["prompt_tokens"], 3);
}

#[tokio::test]
async fn streamed_completions_send_one_text_delta_per_token() {
    let backend = Backend::start().await;
    let body = json!({
        "model": MODEL, "prompt": "Once upon a time", "stream": true,
        "stream_options": {"include_usage": true},
    });
    let chunks = backend
        .stream("/v1/completions", body)
        .await
        .chunks_until_done()
        .await;
    let texts: Vec<&str> = chunks
        .iter()
        .filter_map(|c| c["choices"].get(0)?["text"].as_str())
        .filter(|t| !t.is_empty())
        .collect();
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(
        texts.len() as u64,
        usage["completion_tokens"].as_u64().unwrap()
    );
    assert_eq!(usage["prompt_tokens"], 4);
    assert_eq!(chunks[0]["object"], "text_completion");
    assert_eq!(
        chunks[chunks.len() - 2]["choices"][0]["finish_reason"],
        "stop"
    );
}

#[tokio::test]
async fn malformed_requests_get_openai_errors_naming_the_parameter() {
    let backend = Backend::start().await;
    let chat_path = "/v1/chat/completions";
    let cases: Vec<(&str, Value, StatusCode, &str, Option<&str>)> = vec![
        (
            chat_path,
            json!({"messages": []}),
            StatusCode::BAD_REQUEST,
            "missing_required_parameter",
            Some("model"),
        ),
        (
            chat_path,
            json!({"model": MODEL}),
            StatusCode::BAD_REQUEST,
            "missing_required_parameter",
            Some("messages"),
        ),
        (
            chat_path,
            json!({"model": MODEL, "messages": []}),
            StatusCode::BAD_REQUEST,
            "invalid_value",
            Some("messages"),
        ),
        (
            chat_path,
            with(chat("x"), json!({"max_tokens": "ten"})),
            StatusCode::BAD_REQUEST,
            "invalid_type",
            Some("max_tokens"),
        ),
        (
            chat_path,
            with(chat("x"), json!({"max_tokens": 0})),
            StatusCode::BAD_REQUEST,
            "invalid_value",
            Some("max_tokens"),
        ),
        (
            chat_path,
            with(chat("x"), json!({"max_completion_tokens": -2})),
            StatusCode::BAD_REQUEST,
            "invalid_value",
            Some("max_completion_tokens"),
        ),
        (
            chat_path,
            with(chat("x"), json!({"n": 17})),
            StatusCode::BAD_REQUEST,
            "invalid_value",
            Some("n"),
        ),
        (
            chat_path,
            with(chat("x"), json!({"n": 0})),
            StatusCode::BAD_REQUEST,
            "invalid_value",
            Some("n"),
        ),
        (
            chat_path,
            json!({"model": MODEL, "messages": "hi"}),
            StatusCode::BAD_REQUEST,
            "invalid_type",
            Some("messages"),
        ),
        (
            chat_path,
            json!({"model": MODEL, "messages": [{"role": "user", "content": 3}]}),
            StatusCode::BAD_REQUEST,
            "invalid_type",
            Some("messages[0].content"),
        ),
        (
            chat_path,
            json!({"model": 5, "messages": []}),
            StatusCode::BAD_REQUEST,
            "invalid_type",
            Some("model"),
        ),
        (
            chat_path,
            json!({"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}),
            StatusCode::NOT_FOUND,
            "model_not_found",
            Some("model"),
        ),
        (
            "/v1/completions",
            json!({"model": MODEL}),
            StatusCode::BAD_REQUEST,
            "missing_required_parameter",
            Some("prompt"),
        ),
        (
            "/v1/completions",
            json!({"model": MODEL, "prompt": []}),
            StatusCode::BAD_REQUEST,
            "invalid_value",
            Some("prompt"),
        ),
        (
            "/v1/completions",
            json!({"model": MODEL, "prompt": {"a": 1}}),
            StatusCode::BAD_REQUEST,
            "invalid_type",
            Some("prompt"),
        ),
        (
            "/v1/completions",
            json!({"model": "nope", "prompt": "x"}),
            StatusCode::NOT_FOUND,
            "model_not_found",
            Some("model"),
        ),
        (
            "/v1/embeddings",
            json!({"model": MODEL}),
            StatusCode::BAD_REQUEST,
            "missing_required_parameter",
            Some("input"),
        ),
        (
            "/v1/embeddings",
            json!({"model": MODEL, "input": ""}),
            StatusCode::BAD_REQUEST,
            "invalid_value",
            Some("input"),
        ),
        (
            "/v1/embeddings",
            json!({"model": MODEL, "input": []}),
            StatusCode::BAD_REQUEST,
            "invalid_value",
            Some("input"),
        ),
        (
            "/v1/embeddings",
            json!({"model": MODEL, "input": ["a", ""]}),
            StatusCode::BAD_REQUEST,
            "invalid_value",
            Some("input"),
        ),
        (
            "/v1/embeddings",
            json!({"model": MODEL, "input": "x", "encoding_format": "hex"}),
            StatusCode::BAD_REQUEST,
            "invalid_value",
            Some("encoding_format"),
        ),
        (
            "/v1/embeddings",
            json!({"model": MODEL, "input": "x", "dimensions": 100_000}),
            StatusCode::BAD_REQUEST,
            "invalid_value",
            Some("dimensions"),
        ),
        (
            "/v1/embeddings",
            json!({"model": "nope", "input": "x"}),
            StatusCode::NOT_FOUND,
            "model_not_found",
            Some("model"),
        ),
    ];
    for (path, body, status, code, param) in cases {
        let (got, reply) = backend.post(path, body.clone()).await;
        assert_eq!(got, status, "{path} {body}: {reply}");
        assert_openai_error(&reply, Some(code), param);
    }

    for broken in [
        "{\"model\": ",
        "not json",
        "",
        "{\"model\": \"x\",}",
        "[1, 2]",
    ] {
        let (status, reply) = backend.post_raw(chat_path, broken).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{broken:?}");
        assert_openai_error(&reply, Some("invalid_json"), None);
    }
    let (_, reply) = backend.post_raw(chat_path, "{\"model\": ").await;
    assert!(
        reply["error"]["message"].as_str().unwrap().contains("EOF"),
        "serde's message says what is wrong: {reply}"
    );

    let response = backend.get("/v1/nowhere").await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert_openai_error(&response.json().await.unwrap(), Some("unknown_url"), None);
    let response = backend.get(chat_path).await;
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_openai_error(
        &response.json().await.unwrap(),
        Some("method_not_allowed"),
        None,
    );
}

#[tokio::test]
async fn a_body_is_read_as_json_whatever_its_content_type() {
    let backend = Backend::start().await;
    let body = r#"{"model":"sim-chat","messages":[{"role":"user","content":"hi"}]}"#;
    let (status, reply) = backend.post_raw("/v1/chat/completions", body).await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    let response = backend
        .client
        .post(backend.url("/v1/chat/completions"))
        .header("content-type", "text/plain")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

fn floats_from_base64(encoded: &str) -> Vec<f32> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .unwrap();
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn floats(value: &Value) -> Vec<f32> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[tokio::test]
async fn embeddings_are_unit_vectors_that_place_similar_texts_close() {
    let backend = Backend::start().await;
    let texts = [
        "How do I reset my password?",
        "how can I reset my password",
        "The quarterly revenue grew twelve percent in Europe",
    ];
    let (status, reply) = backend
        .post(
            "/v1/embeddings",
            json!({"model": "sim-embed", "input": texts}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    assert_eq!(reply["object"], "list");
    assert_eq!(reply["model"], "sim-embed");
    let vectors: Vec<Vec<f32>> = (0..3)
        .map(|i| {
            assert_eq!(reply["data"][i]["index"], i);
            assert_eq!(reply["data"][i]["object"], "embedding");
            floats(&reply["data"][i]["embedding"])
        })
        .collect();
    for vector in &vectors {
        assert_eq!(vector.len(), 384);
        assert!((dot(vector, vector) - 1.0).abs() < 1e-4);
    }
    assert!(dot(&vectors[0], &vectors[1]) > dot(&vectors[0], &vectors[2]));
    let usage = &reply["usage"];
    assert_eq!(usage["prompt_tokens"], 7 + 6 + 8);
    assert_eq!(usage["total_tokens"], usage["prompt_tokens"]);

    let (_, encoded) = backend
        .post(
            "/v1/embeddings",
            json!({"model": "sim-embed", "input": texts[0], "encoding_format": "base64"}),
        )
        .await;
    let decoded = floats_from_base64(encoded["data"][0]["embedding"].as_str().unwrap());
    assert_eq!(
        decoded, vectors[0],
        "base64 and float forms carry the same vector"
    );

    let (_, short) = backend
        .post(
            "/v1/embeddings",
            json!({"model": "sim-embed", "input": texts[0], "dimensions": 64}),
        )
        .await;
    let short = floats(&short["data"][0]["embedding"]);
    assert_eq!(short.len(), 64);
    assert!((dot(&short, &short) - 1.0).abs() < 1e-4);

    let (status, ids) = backend
        .post(
            "/v1/embeddings",
            json!({"model": "sim-embed", "input": [[1, 2, 3], [4]]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{ids}");
    assert_eq!(ids["data"].as_array().unwrap().len(), 2);
    assert_eq!(ids["usage"]["prompt_tokens"], 4);
}

#[tokio::test]
async fn a_gated_stream_holds_after_its_first_token_until_the_gate_opens() {
    let backend = Backend::start().await;
    let body = with(
        chat("gated"),
        json!({"stream": true, "user": "sim-gate:x", "stream_options": {"include_usage": true}}),
    );
    let mut sse = backend.stream("/v1/chat/completions", body).await;

    let role: Value = serde_json::from_str(&sse.next_data().await.unwrap()).unwrap();
    assert_eq!(role["choices"][0]["delta"]["role"], "assistant");
    let first: Value = serde_json::from_str(&sse.next_data().await.unwrap()).unwrap();
    assert!(!first["choices"][0]["delta"]["content"]
        .as_str()
        .unwrap()
        .is_empty());

    let (status, opened) = backend.post("/sim/gates/x/open", json!(null)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(opened, json!({"released": 1}));

    let rest = sse.chunks_until_done().await;
    assert_eq!(content_deltas(&rest).len(), 15);
    assert_eq!(rest.last().unwrap()["usage"]["completion_tokens"], 16);

    // Nobody waits now, and opening does not leave the gate open for later streams.
    let (_, opened) = backend.post("/sim/gates/x/open", json!(null)).await;
    assert_eq!(opened, json!({"released": 0}));
}

#[tokio::test]
async fn a_client_that_hangs_up_stops_its_stream() {
    let backend = Backend::start().await;
    let body = with(
        chat("bye"),
        json!({"stream": true, "user": "sim-gate:hangup"}),
    );
    let mut sse = backend.stream("/v1/chat/completions", body).await;
    sse.next_data().await.unwrap();
    sse.next_data().await.unwrap();
    drop(sse);

    // The stream leaves the gate once the server notices the hang-up; poll for that
    // instead of assuming how long it takes.
    for _ in 0..500 {
        let metrics = backend.get("/metrics").await.text().await.unwrap();
        if metrics.contains("sluice_backend_requests_running 0\n") {
            let (_, opened) = backend.post("/sim/gates/hangup/open", json!(null)).await;
            assert_eq!(opened, json!({"released": 0}));
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the stream kept running after its client hung up");
}

#[tokio::test]
async fn models_are_listed_as_simulated() {
    let backend = Backend::start().await;
    let response = backend.get("/v1/models").await;
    assert_eq!(response.status(), StatusCode::OK);
    let list: Value = response.json().await.unwrap();
    assert_eq!(list["object"], "list");
    let ids: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [MODEL, "sim-embed"]);
    for model in list["data"].as_array().unwrap() {
        assert_eq!(model["object"], "model");
        assert_eq!(model["owned_by"], "sluice-sim");
        assert_eq!(model["simulated"], true);
        assert!(model["created"].as_u64().unwrap() > 0);
    }
    let one: Value = backend
        .get("/v1/models/sim-chat")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(one["id"], MODEL);
    let missing = backend.get("/v1/models/org/none").await;
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn the_default_sim_model_is_sluice_sim() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(serve(
        listener,
        AppState::new(Vec::new(), SimConfig::default()),
        std::future::pending(),
    ));
    let list: Value = reqwest::get(format!("{base}/v1/models"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["data"][0]["id"], "sluice-sim");
}

#[tokio::test]
async fn the_request_id_is_echoed_on_answers_and_errors() {
    let backend = Backend::start().await;
    for (path, body) in [
        ("/v1/chat/completions", chat("hi")),
        ("/v1/chat/completions", json!({})),
    ] {
        let response = backend
            .client
            .post(backend.url(path))
            .header("x-request-id", "req-123")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.headers()["x-request-id"], "req-123");
    }
    let response = backend.get("/health").await;
    assert!(response.headers().get("x-request-id").is_none());
}

#[tokio::test]
async fn health_and_metrics_report_the_work_done() {
    let backend = Backend::start().await;
    let health: Value = backend.get("/health").await.json().await.unwrap();
    assert_eq!(health, json!({"status": "ok"}));

    backend
        .post(
            "/v1/chat/completions",
            with(chat("hi"), json!({"max_tokens": 5})),
        )
        .await;
    let response = backend.get("/metrics").await;
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let text = response.text().await.unwrap();
    for line in [
        "sluice_backend_requests_total{route=\"/v1/chat/completions\"} 1",
        "sluice_backend_requests_total{route=\"/health\"} 1",
        "sluice_backend_requests_running 0",
        "sluice_backend_requests_waiting 0",
        "sluice_backend_generation_tokens_total 5",
        "sluice_backend_prompt_tokens_total 4",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
}

#[tokio::test]
async fn pacing_delays_do_not_change_the_reply() {
    let paced = Backend::start_with(SimConfig {
        ttft: Duration::from_millis(5),
        token_delay: Duration::from_millis(1),
        output_tokens: 4,
        ..SimConfig::default()
    })
    .await;
    let (_, reply) = paced.post("/v1/chat/completions", chat("paced")).await;
    assert_eq!(reply["usage"]["completion_tokens"], 4);
    let chunks = paced
        .stream(
            "/v1/chat/completions",
            with(chat("paced"), json!({"stream": true})),
        )
        .await
        .chunks_until_done()
        .await;
    assert_eq!(
        content_deltas(&chunks).concat(),
        reply["choices"][0]["message"]["content"].as_str().unwrap()
    );
}

#[tokio::test]
async fn replies_past_the_capacity_wait_their_turn_and_are_counted_waiting() {
    let backend = Backend::start_with(SimConfig {
        ttft: Duration::from_millis(400),
        max_running: 1,
        ..SimConfig::default()
    })
    .await;
    let backend = std::sync::Arc::new(backend);
    let replies: Vec<_> = (0..2)
        .map(|i| {
            let backend = backend.clone();
            tokio::spawn(async move {
                backend
                    .post("/v1/chat/completions", chat(&format!("q{i}")))
                    .await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let text = backend.get("/metrics").await.text().await.unwrap();
    assert!(
        text.contains("sluice_backend_requests_running 1\n"),
        "{text}"
    );
    assert!(
        text.contains("sluice_backend_requests_waiting 1\n"),
        "{text}"
    );
    for reply in replies {
        assert_eq!(reply.await.unwrap().0, StatusCode::OK);
    }
    let text = backend.get("/metrics").await.text().await.unwrap();
    assert!(
        text.contains("sluice_backend_requests_waiting 0\n"),
        "{text}"
    );
}
