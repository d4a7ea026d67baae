//! The native engine's real sentence embeddings: a real `sluice-backend --engine native`
//! process serving all-MiniLM-L6-v2 on the CPU, asked over HTTP, checked against an
//! independent float64 numpy implementation (scripts/minilm_reference.py).
//!
//! The weights come from scripts/fetch-weights.sh through `SLUICE_MINILM_DIR` (scripts/test.sh
//! sets both up). Without them these tests say so and pass, except under `CI=true`, where a
//! missing model is a broken setup and fails them.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use base64::Engine as _;
use serde_json::{json, Value};
use sluice_e2e::{binary, minilm_dir, openai_error, required_weights, test_python, Backend};

const MODEL: &str = "all-MiniLM-L6-v2";

fn weights() -> Option<PathBuf> {
    required_weights(minilm_dir(), "SLUICE_MINILM_DIR", "all-MiniLM-L6-v2")
}

async fn minilm_backend(dir: &Path) -> Backend {
    let model = format!("{MODEL}={}", dir.display());
    Backend::start_native(&["--device", "cpu", "--model", &model])
        .await
        .expect("the native backend starts with MiniLM")
}

async fn post(backend: &Backend, path: &str, body: Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{}{path}", backend.url))
        .json(&body)
        .send()
        .await
        .expect("backend answers")
}

/// Asks for float embeddings of `inputs`; returns the vectors and `usage.prompt_tokens`.
async fn embed(backend: &Backend, inputs: Value) -> (Vec<Vec<f64>>, u64) {
    let response = post(
        backend,
        "/v1/embeddings",
        json!({"model": MODEL, "input": inputs, "encoding_format": "float"}),
    )
    .await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["model"], MODEL);
    let vectors = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, item)| {
            assert_eq!(item["index"], i);
            item["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        })
        .collect();
    let tokens = body["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(body["usage"]["total_tokens"].as_u64(), Some(tokens));
    (vectors, tokens)
}

/// The reference's embeddings and token counts for `sentences`.
fn reference(dir: &Path, sentences: &[&str]) -> (Vec<Vec<f64>>, Vec<u64>) {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../scripts/minilm_reference.py"
    );
    let mut child = Command::new(test_python())
        .arg(script)
        .arg(dir)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python runs");
    serde_json::to_writer(child.stdin.take().unwrap(), &sentences).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "minilm_reference.py failed (scripts/test.sh installs numpy, safetensors and \
         tokenizers into .venv):\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let out: Value = serde_json::from_slice(&output.stdout).unwrap();
    let vectors = out["embeddings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            v.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        })
        .collect();
    let tokens = out["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_u64().unwrap())
        .collect();
    (vectors, tokens)
}

fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    dot / (norm(a) * norm(b))
}

fn norm(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum::<f64>().sqrt()
}

#[tokio::test]
async fn minilm_embeddings_match_an_independent_float64_reference() {
    let Some(dir) = weights() else { return };
    let backend = minilm_backend(&dir).await;
    let long = "A sluice is a water channel controlled at its head by a movable gate. ".repeat(12);
    let sentences = [
        "How do I reset my password?",
        "What is the way to reset my password?",
        "The quarterly report shows revenue grew twelve percent in Europe.",
        "Ünïcödé, émojis 🙂 and numbers like 3.14159 are tokenized too!",
        "a",
        long.as_str(),
    ];
    // One request with every sentence: a batch of very different lengths, which must give
    // each sentence the vector it gets alone.
    let (got, prompt_tokens) = embed(&backend, json!(sentences)).await;
    let (want, want_tokens) = reference(&dir, &sentences);
    assert_eq!(got.len(), sentences.len());
    assert_eq!(prompt_tokens, want_tokens.iter().sum::<u64>());
    assert!(
        want_tokens[5] > 150,
        "the long input is long: {want_tokens:?}"
    );
    for (i, (got, want)) in got.iter().zip(&want).enumerate() {
        assert_eq!(got.len(), 384);
        assert!(
            (norm(got) - 1.0).abs() < 1e-5,
            "input {i} is not unit length"
        );
        let worst = got
            .iter()
            .zip(want)
            .map(|(g, w)| (g - w).abs())
            .fold(0.0, f64::max);
        assert!(
            worst < 1e-4,
            "input {i} ({:?}): max |backend - reference| = {worst:e}",
            sentences[i]
        );
    }
    let (alone, alone_tokens) = embed(&backend, json!(sentences[0])).await;
    assert_eq!(alone_tokens, want_tokens[0]);
    let worst = alone[0]
        .iter()
        .zip(&got[0])
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(worst < 1e-5, "batched and alone differ by {worst:e}");
}

/// A backend serving only real models has no simulated-engine test hooks.
#[tokio::test]
async fn a_backend_of_real_models_has_no_sim_routes() {
    let Some(dir) = weights() else { return };
    let backend = minilm_backend(&dir).await;
    let r = reqwest::Client::new()
        .post(format!("{}/sim/gates/anything/open", backend.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn paraphrases_embed_closer_than_unrelated_sentences() {
    let Some(dir) = weights() else { return };
    let backend = minilm_backend(&dir).await;
    let (v, _) = embed(
        &backend,
        json!([
            "How do I reset my password?",
            "What is the way to reset my password?",
            "The quarterly report shows revenue grew twelve percent in Europe.",
            "Best hiking trails near the coast",
        ]),
    )
    .await;
    let paraphrase = cosine(&v[0], &v[1]);
    let unrelated = cosine(&v[0], &v[2]).max(cosine(&v[0], &v[3]));
    assert!(paraphrase > 0.8, "paraphrase cosine {paraphrase}");
    assert!(
        paraphrase > unrelated + 0.5,
        "paraphrase {paraphrase} vs unrelated {unrelated}"
    );
}

#[tokio::test]
async fn base64_float_token_ids_and_dimensions_agree() {
    let Some(dir) = weights() else { return };
    let backend = minilm_backend(&dir).await;
    let text = "hello world";
    let (float, tokens) = embed(&backend, json!(text)).await;
    // [CLS] hello world [SEP]
    assert_eq!(tokens, 4);

    let response = post(
        &backend,
        "/v1/embeddings",
        json!({"model": MODEL, "input": [text], "encoding_format": "base64"}),
    )
    .await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(body["data"][0]["embedding"].as_str().unwrap())
        .unwrap();
    let decoded: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    // The same f32s: JSON prints each f32 with the shortest digits that read back as it.
    let from_json: Vec<f32> = float[0].iter().map(|&x| x as f32).collect();
    assert_eq!(decoded, from_json);
    assert_eq!(body["usage"]["prompt_tokens"], 4);

    // "hello" and "world" in BERT's uncased vocabulary, given as token ids: wrapped in
    // [CLS] and [SEP] as text is, so the same vector.
    let (ids, id_tokens) = embed(&backend, json!([7592, 2088])).await;
    assert_eq!(id_tokens, 4);
    let worst = ids[0]
        .iter()
        .zip(&float[0])
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(worst < 1e-6, "token ids and text differ by {worst:e}");

    let response = post(
        &backend,
        "/v1/embeddings",
        json!({"model": MODEL, "input": text, "dimensions": 64}),
    )
    .await;
    let body: Value = response.json().await.unwrap();
    let short: Vec<f64> = body["data"][0]["embedding"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert_eq!(short.len(), 64);
    assert!((norm(&short) - 1.0).abs() < 1e-5);
    assert!(cosine(&short, &float[0][..64]) > 0.9999);
}

#[tokio::test]
async fn an_embedding_model_refuses_chat_and_overlong_inputs_in_openai_shape() {
    let Some(dir) = weights() else { return };
    let backend = minilm_backend(&dir).await;

    let models: Value = reqwest::get(format!("{}/v1/models", backend.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["id"], MODEL);
    assert_eq!(models["data"][0]["simulated"], false);

    let chat = post(
        &backend,
        "/v1/chat/completions",
        json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(chat.status(), 400);
    let (kind, code, message) = openai_error(chat).await.unwrap();
    assert_eq!(kind, "invalid_request_error");
    assert_eq!(code, "model_not_supported");
    assert!(message.contains("only serves embeddings"), "{message}");

    let completion = post(
        &backend,
        "/v1/completions",
        json!({"model": MODEL, "prompt": "hi"}),
    )
    .await;
    assert_eq!(completion.status(), 400);
    let (_, code, _) = openai_error(completion).await.unwrap();
    assert_eq!(code, "model_not_supported");

    // 600 words is well past MiniLM's 512 positions: refused whole, not silently cut.
    let long = "word ".repeat(600);
    let response = post(
        &backend,
        "/v1/embeddings",
        json!({"model": MODEL, "input": ["short", long]}),
    )
    .await;
    assert_eq!(response.status(), 400);
    let (_, code, message) = openai_error(response).await.unwrap();
    assert_eq!(code, "context_length_exceeded");
    assert!(
        message.contains("input[1]") && message.contains("512"),
        "{message}"
    );

    let response = post(
        &backend,
        "/v1/embeddings",
        json!({"model": MODEL, "input": [[1, 2, 999_999]]}),
    )
    .await;
    assert_eq!(response.status(), 400);

    // Refused requests read no tokens and are not metered.
    assert_eq!(
        backend
            .metric("sluice_backend_prompt_tokens_total")
            .await
            .unwrap(),
        0
    );
    let metrics = reqwest::get(format!("{}/metrics", backend.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("engine=\"native\""), "{metrics}");
}

#[tokio::test]
async fn health_answers_while_a_long_embedding_request_runs() {
    let Some(dir) = weights() else { return };
    let backend = minilm_backend(&dir).await;
    let long = "The gate rises and the water runs through the channel. ".repeat(40);
    let inputs = vec![long; 4];
    let url = format!("{}/v1/embeddings", backend.url);
    let request = tokio::spawn(async move {
        reqwest::Client::new()
            .post(url)
            .json(&json!({"model": MODEL, "input": inputs}))
            .send()
            .await
            .unwrap()
            .status()
    });
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let mut answered_during = 0;
    while !request.is_finished() {
        let health = http
            .get(format!("{}/health", backend.url))
            .send()
            .await
            .expect("/health answers while the engine works");
        assert_eq!(health.status(), 200);
        if !request.is_finished() {
            answered_during += 1;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(request.await.unwrap(), 200);
    assert!(
        answered_during > 0,
        "the request finished before /health was asked"
    );
}

/// Requests that arrive together share the engine's passes, but each gets its own answer:
/// the same vectors and token counts as alone, and a bad input fails only its own request.
#[tokio::test]
async fn concurrent_requests_share_passes_but_not_answers_or_errors() {
    let Some(dir) = weights() else { return };
    let backend = minilm_backend(&dir).await;
    let texts: Vec<String> = (0..12)
        .map(|i| format!("Request number {i} asks about canal lock number {}.", i * 7))
        .collect();
    let mut alone = Vec::new();
    for text in &texts {
        alone.push(embed(&backend, json!([text, "and a second input"])).await);
    }
    let together = futures::future::join_all(texts.iter().map(|text| {
        let backend = &backend;
        async move { embed(backend, json!([text, "and a second input"])).await }
    }));
    let bad = post(
        &backend,
        "/v1/embeddings",
        json!({"model": MODEL, "input": [[1, 2, 999_999]]}),
    );
    let (together, bad) = tokio::join!(together, bad);
    assert_eq!(bad.status(), 400);
    for ((vectors, tokens), (want, want_tokens)) in together.iter().zip(&alone) {
        assert_eq!(tokens, want_tokens);
        assert_eq!(vectors.len(), 2);
        for (got, want) in vectors.iter().zip(want) {
            assert!(cosine(got, want) > 0.999_999, "{}", cosine(got, want));
        }
    }
}

/// Needs no weights: what this build cannot serve is refused at start-up with status 2, and
/// a GGUF file or Llama folder it would serve but cannot read with status 1.
#[test]
fn the_native_engine_refuses_cuda_and_other_decoders_with_2_and_broken_models_with_1() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("smollm2.gguf");
    std::fs::write(&gguf, b"GGUF\x03\0\0\0").unwrap();
    let llama = dir.path().join("llama");
    std::fs::create_dir(&llama).unwrap();
    std::fs::write(
        llama.join("config.json"),
        r#"{"model_type":"llama","architectures":["LlamaForCausalLM"]}"#,
    )
    .unwrap();
    let qwen = dir.path().join("qwen");
    std::fs::create_dir(&qwen).unwrap();
    std::fs::write(qwen.join("config.json"), r#"{"model_type":"qwen2"}"#).unwrap();
    let bert = dir.path().join("bert");
    std::fs::create_dir(&bert).unwrap();
    std::fs::write(bert.join("config.json"), r#"{"model_type":"bert"}"#).unwrap();

    let cases: [(&[&str], i32, &str); 4] = [
        (
            &["--device", "cuda:0", "--model", bert.to_str().unwrap()],
            2,
            "no usable GPU: no libcuda (the NVIDIA driver) could be loaded",
        ),
        (
            &["--device", "cpu", "--model", gguf.to_str().unwrap()],
            1,
            "model `smollm2`",
        ),
        (&["--model", llama.to_str().unwrap()], 1, "tokenizer.json"),
        (
            &["--model", qwen.to_str().unwrap()],
            2,
            "model_type `qwen2`",
        ),
    ];
    for (args, status, expected) in cases {
        let output = Command::new(binary("sluice-backend"))
            .args(["--engine", "native", "--listen", "127.0.0.1:0"])
            .args(args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(status), "{args:?}: {stderr}");
        assert!(
            stderr.contains(expected),
            "{args:?}: stderr lacks {expected:?}: {stderr}"
        );
    }
}
