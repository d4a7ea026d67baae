//! Backends that do not play along (see `sluice_e2e::misbehaving`): for each, the gateway
//! stays up and within a memory bound, the client gets an OpenAI-shaped error or the
//! (truncated) stream, and billing follows the metering rules: the backend's own usage when
//! it reports it, an estimate when it does not, nothing for an answer that never came.

use futures::StreamExt;
use serde_json::{json, Value};
use sluice_e2e::misbehaving::{Behaviour, Misbehaving, REPORTED};
use sluice_e2e::{openai_error, Gateway, GatewayOptions, StoreKind, SIM_MODEL};
use std::time::Duration;

/// How much a gateway's memory may grow over one case.
const RSS_BOUND: u64 = 64 << 20;

struct Case {
    backend: Misbehaving,
    gw: Gateway,
    key: String,
    rss_before: u64,
    _dir: tempfile::TempDir,
}

async fn case(behaviour: Behaviour) -> Case {
    let backend = Misbehaving::start(behaviour).await;
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(GatewayOptions {
        backends: vec![backend.url.clone()],
        store: StoreKind::Embedded(dir.path().to_owned()),
        max_body_bytes: 1 << 20,
        // Priced, so that non-streamed answers are held for their cost header: every case
        // below also holds with a held answer.
        extra_config: "[balancer]\nread_timeout_secs = 2\nretries = 1\n\n[metering]\ndrain_secs = 2\n\n\
             [[prices]]\nmodel = \"sim-chat\"\ntier = \"*\"\ncurrency = \"USD\"\ninput = \"1\"\noutput = \"2\"\n"
            .into(),
        server_config: String::new(),
        env: Vec::new(),
        jwt_config: String::new(),
        hosts_file: None,
    })
    .await
    .unwrap();
    let (_, key) = gw.create_key("acme", "enterprise").await.unwrap();
    let rss_before = gw.rss_bytes();
    Case {
        backend,
        gw,
        key,
        rss_before,
        _dir: dir,
    }
}

impl Case {
    fn chat(&self, stream: bool) -> reqwest::RequestBuilder {
        self.gw
            .http
            .post(format!("{}/v1/chat/completions", self.gw.url))
            .bearer_auth(&self.key)
            .json(
                &json!({"model": SIM_MODEL, "stream": stream, "max_tokens": 50,
                          "messages": [{"role": "user", "content": "hello there"}]}),
            )
    }

    /// The gateway is up, answers, and its memory grew less than the bound.
    async fn still_well(&self) {
        let health = reqwest::get(format!("{}/health", self.gw.url)).await;
        assert!(health.is_ok_and(|r| r.status() == 200), "{}", self.gw.log());
        let grown = self.gw.rss_bytes().saturating_sub(self.rss_before);
        assert!(grown < RSS_BOUND, "RSS grew by {} MiB", grown >> 20);
    }

    /// The usage events, once `count` are exported.
    async fn events(&self, count: usize) -> Vec<Value> {
        for _ in 0..200 {
            let events = self.gw.billing_export("event").await.unwrap();
            if events.len() >= count {
                return events;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("fewer than {count} usage events:\n{}", self.gw.log());
    }
}

#[tokio::test]
async fn an_endless_stream_is_cut_when_the_client_leaves_and_billed() {
    let c = case(Behaviour::EndlessStream).await;
    let response = c.chat(true).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.bytes_stream();
    let mut read = 0;
    while read < 256 << 10 {
        read += body.next().await.unwrap().unwrap().len();
    }
    drop(body);
    // The gateway reads on for drain_secs after the client left, then lets go.
    let events = c.events(1).await;
    assert_eq!(events[0]["client_disconnected"], true, "{events:?}");
    assert!(events[0]["completion_tokens"].as_u64().unwrap() > 0);
    assert_ne!(events[0]["usage_source"], "reported");
    c.still_well().await;
}

#[tokio::test]
async fn one_byte_chunks_pass_whole_and_are_billed_as_reported() {
    let c = case(Behaviour::OneByteChunks).await;
    let response = c.chat(true).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    assert_eq!(text.matches("tok ").count(), REPORTED.1 as usize, "{text}");
    // The stream ends with what it cost: the reported usage at 1 and 2 USD per million.
    let cost = rust_decimal::Decimal::from(REPORTED.0 + 2 * REPORTED.1)
        / rust_decimal::Decimal::from(1_000_000);
    let end = format!(
        "data: [DONE]\n\n: x-sluice-cost: {} USD\n\n",
        cost.normalize()
    );
    assert!(text.ends_with(&end), "{text}");
    assert!(
        !text.contains("prompt_tokens"),
        "the usage chunk nobody asked for is removed"
    );
    let events = c.events(1).await;
    assert_eq!(events[0]["usage_source"], "reported");
    assert_eq!(events[0]["prompt_tokens"], REPORTED.0);
    assert_eq!(events[0]["completion_tokens"], REPORTED.1);
    c.still_well().await;
}

#[tokio::test]
async fn a_100_mb_answer_passes_through_without_being_held() {
    let c = case(Behaviour::HugeBody(100 << 20)).await;
    let response = c.chat(false).send().await.unwrap();
    assert_eq!(response.status(), 200);
    // Far past what is held for a cost header: passed on as it came, without one.
    assert!(response.headers().get("x-sluice-cost").is_none());
    let mut body = response.bytes_stream();
    let mut read = 0usize;
    while let Some(piece) = body.next().await {
        read += piece.unwrap().len();
    }
    assert_eq!(read, 100 << 20);
    c.still_well().await;
    let events = c.events(1).await;
    assert_eq!(events[0]["status"], 200);
    // Past the gateway's copy bound its usage cannot be read: billed at the reservation
    // (the request's max_tokens for the completion).
    assert_eq!(events[0]["usage_source"], "reserved", "{events:?}");
    assert_eq!(events[0]["completion_tokens"], 50);
}

#[tokio::test]
async fn an_answer_without_usage_is_billed_at_an_estimate() {
    let c = case(Behaviour::NoUsage).await;
    let response = c.chat(false).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let events = c.events(1).await;
    assert_eq!(events[0]["usage_source"], "estimated");
    assert!(events[0]["prompt_tokens"].as_u64().unwrap() > 0);
    c.still_well().await;
}

#[tokio::test]
async fn a_gzip_answer_nobody_asked_for_passes_through_and_is_billed_at_the_reservation() {
    let c = case(Behaviour::Gzip).await;
    let response = c.chat(false).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-encoding"], "gzip");
    let events = c.events(1).await;
    assert_eq!(events[0]["usage_source"], "reserved");
    assert_eq!(events[0]["completion_tokens"], 50);
    c.still_well().await;
}

#[tokio::test]
async fn an_answer_that_is_not_json_is_passed_on_and_billed_at_an_estimate() {
    let c = case(Behaviour::InvalidJson).await;
    let response = c.chat(false).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let events = c.events(1).await;
    assert_ne!(events[0]["usage_source"], "reported");
    c.still_well().await;
}

#[tokio::test]
async fn a_storm_of_503s_gets_openai_errors_and_bills_nothing() {
    let c = case(Behaviour::Status(503)).await;
    let statuses: Vec<(u16, String)> = futures::stream::iter(0..50)
        .map(|_| async {
            let r = c.chat(false).send().await.unwrap();
            let status = r.status().as_u16();
            let (_, _, message) = openai_error(r).await.unwrap();
            (status, message)
        })
        .buffer_unordered(8)
        .collect()
        .await;
    assert!(statuses.iter().all(|(s, _)| *s == 503), "{statuses:?}");
    assert!(
        statuses[0].1.contains("answered 503"),
        "the client hears what the backend said: {statuses:?}"
    );
    let events = c.gw.billing_export("event").await.unwrap();
    let tokens: u64 = events
        .iter()
        .map(|e| {
            e["prompt_tokens"].as_u64().unwrap_or(0) + e["completion_tokens"].as_u64().unwrap_or(0)
        })
        .sum();
    assert_eq!(tokens, 0, "nothing was generated: {events:?}");
    // The model's only backend is never ejected, so it is tried every time.
    assert!(c.backend.chats() >= 50);
    c.still_well().await;
}

#[tokio::test]
async fn a_backend_that_never_answers_gets_a_504() {
    let c = case(Behaviour::Silent).await;
    let response = c.chat(false).send().await.unwrap();
    assert_eq!(response.status(), 504);
    let (kind, _, message) = openai_error(response).await.unwrap();
    assert_eq!(kind, "server_error", "{message}");
    c.still_well().await;
}

#[tokio::test]
async fn a_reset_mid_stream_truncates_the_stream_and_bills_what_was_sent() {
    let c = case(Behaviour::ResetMidStream).await;
    let response = c.chat(true).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.bytes_stream();
    let mut text = Vec::new();
    while let Some(Ok(piece)) = body.next().await {
        text.extend_from_slice(&piece);
    }
    let text = String::from_utf8_lossy(&text);
    assert!(
        text.contains("tok "),
        "what was generated reached the client: {text}"
    );
    let events = c.events(1).await;
    assert_ne!(events[0]["usage_source"], "reported", "{events:?}");
    assert!(
        events[0]["completion_tokens"].as_u64().unwrap() > 0,
        "{events:?}"
    );
    c.still_well().await;
}

/// Three of a model's four backends answer every request with 502: passive ejection takes
/// out at most half of them (two), never the pool, and clients are still served by retries.
#[tokio::test]
async fn a_reset_mid_json_answer_held_for_its_cost_gets_an_openai_error() {
    let c = case(Behaviour::ResetMidJson).await;
    let response = c.chat(false).send().await.unwrap();
    // The header was held back with the half answer, so the client gets a clean error
    // rather than a 200 with half a JSON body.
    assert_eq!(response.status(), 502);
    assert!(response.headers().get("x-sluice-cost").is_none());
    let (kind, _, message) = openai_error(response).await.unwrap();
    assert_eq!(kind, "server_error", "{message}");
    c.still_well().await;
}

#[tokio::test]
async fn ejection_stops_at_its_share_of_the_pool() {
    let failing = [
        Misbehaving::start(Behaviour::Status(502)).await,
        Misbehaving::start(Behaviour::Status(502)).await,
        Misbehaving::start(Behaviour::Status(502)).await,
    ];
    let good = sluice_e2e::Backend::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut backends: Vec<String> = failing.iter().map(|b| b.url.clone()).collect();
    backends.push(good.url.clone());
    let gw = Gateway::start(GatewayOptions {
        backends,
        store: StoreKind::Embedded(dir.path().to_owned()),
        max_body_bytes: 1 << 20,
        extra_config: "[balancer]\nstrategy = \"round_robin\"\nretries = 3\neject_after = 2\neject_base_ms = 60000\n"
            .into(),
        server_config: String::new(),
        env: Vec::new(),
        jwt_config: String::new(),
        hosts_file: None,
    })
    .await
    .unwrap();
    let (_, key) = gw.create_key("acme", "enterprise").await.unwrap();
    let chat = json!({"model": SIM_MODEL, "max_tokens": 2,
                      "messages": [{"role": "user", "content": "hi"}]})
    .to_string();
    let mut served = 0;
    for _ in 0..40 {
        let r = gw
            .post_raw("/v1/chat/completions", Some(&key), chat.clone())
            .await
            .unwrap();
        served += usize::from(r.status() == 200);
    }
    let (_, pool) = gw
        .admin(reqwest::Method::GET, "/admin/v1/backends")
        .await
        .unwrap();
    let health: Vec<&str> = pool["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["health"].as_str().unwrap())
        .collect();
    let ejected = health.iter().filter(|h| **h == "ejected").count();
    assert_eq!(ejected, 2, "half of four, no more: {pool}");
    assert_eq!(
        served, 40,
        "every request found the good backend by retrying"
    );
}
