//! A backend that reports no usage is billed what the model's own tokenizer counts
//! (`[tokenizers]`), not a guess from bytes: the prompt from the request, the completion from
//! the text that passed, for a JSON answer and for a stream, with the tokenizer from a
//! `tokenizer.json` or from a GGUF file's metadata.

use serde_json::{json, Value};
use sluice_e2e::misbehaving::{Behaviour, Misbehaving, UNREPORTED_ANSWER};
use sluice_e2e::{
    minilm_dir, required_weights, smollm2_gguf, test_python, Gateway, GatewayOptions, StoreKind,
    SIM_MODEL,
};
use std::path::PathBuf;
use std::time::Duration;
use tokenizers::Tokenizer;

const QUESTION: &str = "How does a canal lock work?";

async fn billed_event(gw: &Gateway) -> Value {
    for _ in 0..200 {
        let events = gw.billing_export("event").await.unwrap();
        if let Some(event) = events.into_iter().next() {
            return event;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("no usage event\n{}", gw.log());
}

/// Where the gateway's tokenizer comes from.
enum Source {
    /// all-MiniLM-L6-v2's `tokenizer.json`.
    TokenizerJson,
    /// SmolLM2's GGUF file, checked against the `tokenizer.json` that scripts/gguf_to_hf.py
    /// (llama.cpp's `gguf` package and Hugging Face's `tokenizers`, no code shared with
    /// Sluice) builds from the same file.
    Gguf,
}

/// The file the gateway is configured with, and the `tokenizer.json` that counts for
/// reference (`None`: the weights are not fetched and the test is skipped).
fn tokenizer_files(source: &Source, scratch: &std::path::Path) -> Option<(PathBuf, PathBuf)> {
    match source {
        Source::TokenizerJson => {
            let dir = required_weights(minilm_dir(), "SLUICE_MINILM_DIR", "all-MiniLM-L6-v2")?;
            Some((dir.join("tokenizer.json"), dir.join("tokenizer.json")))
        }
        Source::Gguf => {
            let gguf = required_weights(
                smollm2_gguf(),
                "SLUICE_SMOLLM2_GGUF",
                "SmolLM2-135M-Instruct",
            )?;
            let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/gguf_to_hf.py");
            let status = std::process::Command::new(test_python())
                .arg(script)
                .arg(&gguf)
                .arg(scratch)
                .arg("--tokenizer-only")
                .status()
                .expect("run scripts/gguf_to_hf.py");
            assert!(status.success(), "scripts/gguf_to_hf.py failed ({status})");
            Some((gguf, scratch.join("tokenizer.json")))
        }
    }
}

async fn case(behaviour: Behaviour, stream: bool, source: Source) {
    let scratch = tempfile::tempdir().unwrap();
    let Some((tokenizer_file, reference)) = tokenizer_files(&source, scratch.path()) else {
        return;
    };
    let mut tokenizer = Tokenizer::from_file(&reference).unwrap();
    // MiniLM's file pads every encoding to 128 tokens: a count must not.
    tokenizer.with_padding(None);
    tokenizer.with_truncation(None).unwrap();
    let count = |text: &str| tokenizer.encode_fast(text, false).unwrap().len() as u64;

    let backend = Misbehaving::start(behaviour).await;
    let data = tempfile::tempdir().unwrap();
    let gw = Gateway::start(GatewayOptions {
        backends: vec![backend.url.clone()],
        store: StoreKind::Embedded(data.path().to_owned()),
        max_body_bytes: 1 << 20,
        extra_config: format!(
            "[tokenizers]\n{SIM_MODEL:?} = {:?}\n",
            tokenizer_file.display().to_string()
        ),
        server_config: String::new(),
        env: Vec::new(),
        jwt_config: String::new(),
        hosts_file: None,
    })
    .await
    .unwrap();
    let (_, key) = gw.create_key("acme", "pro").await.unwrap();
    let body = json!({"model": SIM_MODEL, "stream": stream, "max_tokens": 200,
        "messages": [{"role": "system", "content": "Answer in one sentence."},
                     {"role": "user", "content": QUESTION}]});
    let r = gw
        .post_raw("/v1/chat/completions", Some(&key), body.to_string())
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    assert!(text.contains("Locks"), "{text}");

    let event = billed_event(&gw).await;
    assert_eq!(event["usage_source"], "estimated", "{event}");
    // Two messages' text, 3 tokens each for the chat format, 3 for the reply.
    let prompt = count("Answer in one sentence.") + count(QUESTION) + 2 * 3 + 3;
    assert_eq!(event["prompt_tokens"], prompt, "{event}");
    assert_eq!(
        event["completion_tokens"],
        count(UNREPORTED_ANSWER),
        "{event}"
    );
    // Far fewer than the bytes the estimate without a tokenizer bills.
    assert!(count(UNREPORTED_ANSWER) < UNREPORTED_ANSWER.len() as u64 / 2);
}

#[tokio::test]
async fn a_json_answer_without_usage_is_billed_its_tokenizer_count() {
    case(Behaviour::NoUsage, false, Source::TokenizerJson).await;
}

#[tokio::test]
async fn a_stream_without_usage_is_billed_its_tokenizer_count() {
    case(Behaviour::StreamWithoutUsage, true, Source::TokenizerJson).await;
}

#[tokio::test]
async fn a_json_answer_without_usage_is_billed_its_gguf_tokenizer_count() {
    case(Behaviour::NoUsage, false, Source::Gguf).await;
}

#[tokio::test]
async fn a_stream_without_usage_is_billed_its_gguf_tokenizer_count() {
    case(Behaviour::StreamWithoutUsage, true, Source::Gguf).await;
}
