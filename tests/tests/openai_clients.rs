//! Real OpenAI clients that nobody here wrote (the `async-openai` crate and the Python
//! `openai` package) talk to a real gateway in front of a real (simulated-engine) backend,
//! once with the embedded store and once with Redis.

use async_openai::config::OpenAIConfig;
use async_openai::types::chat::{
    ChatCompletionRequestUserMessageArgs, ChatCompletionStreamOptions,
    CreateChatCompletionRequestArgs,
};
use async_openai::types::completions::CreateCompletionRequestArgs;
use async_openai::types::embeddings::CreateEmbeddingRequestArgs;
use async_openai::Client;
use futures::StreamExt;
use sluice_e2e::{
    python_check, Backend, Gateway, GatewayOptions, StoreKind, SIM_EMBED_MODEL, SIM_MODEL,
};

fn client(gateway: &Gateway, key: &str) -> Client<OpenAIConfig> {
    Client::with_config(
        OpenAIConfig::new()
            .with_api_base(format!("{}/v1", gateway.url))
            .with_api_key(key),
    )
}

async fn gateway_on(store: StoreKind, backend: &Backend) -> Gateway {
    Gateway::start(GatewayOptions::new(backend, store))
        .await
        .expect("gateway starts")
}

/// Every route through async-openai: models, chat, streamed chat, completion, embedding.
async fn async_openai_round_trip(store: StoreKind) {
    let backend = Backend::start().await.unwrap();
    let gateway = gateway_on(store, &backend).await;
    let (_, key) = gateway.create_key("acme", "pro").await.unwrap();
    let client = client(&gateway, &key);

    let models = client.models().list().await.unwrap();
    let ids: Vec<&str> = models.data.iter().map(|m| m.id.as_str()).collect();
    assert!(
        ids.contains(&SIM_MODEL) && ids.contains(&SIM_EMBED_MODEL),
        "{ids:?}"
    );

    let user_turn = ChatCompletionRequestUserMessageArgs::default()
        .content("What is a sluice gate?")
        .build()
        .unwrap();
    let chat = client
        .chat()
        .create(
            CreateChatCompletionRequestArgs::default()
                .model(SIM_MODEL)
                .messages([user_turn.clone().into()])
                .max_completion_tokens(8u32)
                .build()
                .unwrap(),
        )
        .await
        .unwrap();
    let content = chat.choices[0].message.content.clone().unwrap();
    assert!(!content.is_empty());
    let usage = chat.usage.expect("usage block");
    assert_eq!(usage.completion_tokens, 8);
    assert!(usage.prompt_tokens > 0);
    assert_eq!(
        usage.total_tokens,
        usage.prompt_tokens + usage.completion_tokens
    );

    // The stream holds after its first token until the test opens the gate: a gateway that
    // buffered the stream would never hand the first token over, and this test would hang
    // (and fail on its timeout) instead of passing.
    let gate = format!("async-openai-{}", uuid::Uuid::new_v4().simple());
    let mut stream = client
        .chat()
        .create_stream(
            CreateChatCompletionRequestArgs::default()
                .model(SIM_MODEL)
                .messages([user_turn.into()])
                .max_completion_tokens(6u32)
                .user(format!("sim-gate:{gate}"))
                .stream_options(ChatCompletionStreamOptions {
                    include_usage: Some(true),
                    include_obfuscation: None,
                })
                .build()
                .unwrap(),
        )
        .await
        .unwrap();
    let mut text = String::new();
    let first_token = tokio::time::timeout(std::time::Duration::from_secs(30), async {
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.unwrap();
            if let Some(delta) = chunk.choices.first().and_then(|c| c.delta.content.clone()) {
                if !delta.is_empty() {
                    return delta;
                }
            }
        }
        panic!("stream ended before any token");
    })
    .await
    .expect("first token arrives while the backend still holds the rest of the stream");
    text.push_str(&first_token);
    assert_eq!(
        backend.open_gate(&gate).await.unwrap(),
        1,
        "the stream was still held"
    );
    let mut usage = None;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        if let Some(delta) = chunk.choices.first().and_then(|c| c.delta.content.clone()) {
            text.push_str(&delta);
        }
        if chunk.usage.is_some() {
            usage = chunk.usage;
        }
    }
    assert_eq!(usage.expect("usage chunk").completion_tokens, 6);
    assert_eq!(text.split_whitespace().count(), 6, "{text:?}");

    let completion = client
        .completions()
        .create(
            CreateCompletionRequestArgs::default()
                .model(SIM_MODEL)
                .prompt("Once upon a time")
                .max_tokens(5u32)
                .build()
                .unwrap(),
        )
        .await
        .unwrap();
    assert!(!completion.choices[0].text.is_empty());
    assert_eq!(completion.usage.unwrap().completion_tokens, 5);

    let embedding = client
        .embeddings()
        .create(
            CreateEmbeddingRequestArgs::default()
                .model(SIM_EMBED_MODEL)
                .input(["a quiet river", "a loud machine"])
                .build()
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(embedding.data.len(), 2);
    let norm: f32 = embedding.data[0].embedding.iter().map(|x| x * x).sum();
    assert!((norm - 1.0).abs() < 1e-3, "unit vector, got |v|^2 = {norm}");
}

#[tokio::test]
async fn async_openai_client_works_through_gateway_with_embedded_store() {
    let dir = tempfile::tempdir().unwrap();
    async_openai_round_trip(StoreKind::Embedded(dir.path().to_owned())).await;
}

#[tokio::test]
async fn async_openai_client_works_through_gateway_with_redis_store() {
    async_openai_round_trip(StoreKind::fresh_redis()).await;
}

/// The Python `openai` package (installed by scripts/test.sh into .venv, or any python3 that
/// has it, via SLUICE_TEST_PYTHON) runs tests/python/openai_client.py against the gateway.
async fn python_openai_round_trip(store: StoreKind) {
    let backend = Backend::start().await.unwrap();
    let gateway = gateway_on(store, &backend).await;
    let (_, key) = gateway.create_key("pyco", "free").await.unwrap();
    python_check(
        "openai_client.py",
        &[
            ("SLUICE_URL", &gateway.url),
            ("SLUICE_KEY", &key),
            ("SIM_BACKEND_URL", &backend.url),
            ("SIM_MODEL", SIM_MODEL),
            ("SIM_EMBED_MODEL", SIM_EMBED_MODEL),
        ],
        || gateway.log(),
    )
    .await;
}

#[tokio::test]
async fn python_openai_client_works_through_gateway_with_embedded_store() {
    let dir = tempfile::tempdir().unwrap();
    python_openai_round_trip(StoreKind::Embedded(dir.path().to_owned())).await;
}

#[tokio::test]
async fn python_openai_client_works_through_gateway_with_redis_store() {
    python_openai_round_trip(StoreKind::fresh_redis()).await;
}
