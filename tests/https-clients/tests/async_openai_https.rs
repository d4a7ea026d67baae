//! async-openai (its reqwest on rustls) over HTTPS, on HTTP/1.1 and on HTTP/2 (ALPN), trusting
//! only the test's CA: an answer, and a stream to its usage chunk; the gateway's access log
//! says which protocol each came over. A client trusting another CA gets no answer.

use async_openai::config::OpenAIConfig;
use async_openai::types::chat::{
    ChatCompletionRequestUserMessageArgs, ChatCompletionStreamOptions, CreateChatCompletionRequest,
    CreateChatCompletionRequestArgs,
};
use futures::StreamExt;
use sluice_e2e::tls::Ca;
use sluice_e2e::{Backend, Gateway, GatewayOptions, StoreKind, SIM_MODEL};
use std::time::{Duration, Instant};

fn client(gw: &Gateway, key: &str, ca: &Ca, http2: bool) -> async_openai::Client<OpenAIConfig> {
    let pem = std::fs::read(ca.cert()).unwrap();
    let mut http =
        reqwest::Client::builder().tls_certs_only([reqwest::Certificate::from_pem(&pem).unwrap()]);
    if !http2 {
        http = http.http1_only();
    }
    let config = OpenAIConfig::new()
        .with_api_base(format!("{}/v1", gw.url))
        .with_api_key(key);
    async_openai::Client::with_config(config).with_http_client(http.build().unwrap())
}

fn request(stream: bool) -> CreateChatCompletionRequest {
    let question = ChatCompletionRequestUserMessageArgs::default()
        .content("hi")
        .build()
        .unwrap();
    let mut args = CreateChatCompletionRequestArgs::default();
    args.model(SIM_MODEL)
        .messages([question.into()])
        .max_completion_tokens(6u32);
    if stream {
        args.stream_options(ChatCompletionStreamOptions {
            include_usage: Some(true),
            include_obfuscation: None,
        });
    }
    args.build().unwrap()
}

/// The protocol of each chat request in the gateway's access log.
fn protocols(gw: &Gateway) -> Vec<String> {
    gw.access_log()
        .into_iter()
        .filter(|line| line["model"] == SIM_MODEL)
        .map(|line| line["protocol"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[tokio::test]
async fn async_openai_over_https_on_http1_and_http2() {
    // Every reqwest client here (the harness's too) takes rustls's provider from the process.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ca = Ca::new("edge-ca").unwrap();
    let stranger = Ca::new("stranger-ca").unwrap();
    let leaf = ca.server_cert("gateway").unwrap();
    let backend = Backend::start().await.unwrap();
    let data = tempfile::tempdir().unwrap();
    // The admin listener stays plain, for the harness to make a key.
    let gw = Gateway::start(GatewayOptions {
        server_config: format!(
            "[server.tls]\ncert_file = {:?}\nkey_file = {:?}\nadmin = false\n",
            leaf.cert.display().to_string(),
            leaf.key.display().to_string(),
        ),
        ..GatewayOptions::new(&backend, StoreKind::Embedded(data.path().to_owned()))
    })
    .await
    .unwrap();
    let (_, key) = gw.create_key("async-openai-tls", "pro").await.unwrap();

    for http2 in [false, true] {
        let client = client(&gw, &key, &ca, http2);
        let answer = client.chat().create(request(false)).await.unwrap();
        assert_eq!(answer.usage.unwrap().completion_tokens, 6);
        let mut stream = client.chat().create_stream(request(true)).await.unwrap();
        let (mut text, mut usage) = (String::new(), None);
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.unwrap();
            if let Some(delta) = chunk.choices.first().and_then(|c| c.delta.content.clone()) {
                text.push_str(&delta);
            }
            usage = chunk.usage.or(usage);
        }
        assert!(!text.is_empty());
        assert_eq!(usage.unwrap().completion_tokens, 6);
    }
    let refused = client(&gw, &key, &stranger, true)
        .chat()
        .create(request(false))
        .await;
    assert!(refused.is_err(), "{refused:?}");

    // The access log is written in batches, within moments.
    let deadline = Instant::now() + Duration::from_secs(20);
    while protocols(&gw).len() < 4 {
        assert!(Instant::now() < deadline, "{}", gw.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut seen = protocols(&gw);
    seen.sort();
    assert_eq!(
        seen,
        ["HTTP/1.1", "HTTP/1.1", "HTTP/2", "HTTP/2"],
        "{}",
        gw.log()
    );
}
