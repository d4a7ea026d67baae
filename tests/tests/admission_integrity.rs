//! Quotas and billing that cannot be fooled, where users meet them: on the default embedded
//! store and on Redis, through the README's own quick start, and against clients and
//! backends that do not play along (reused request ids, huge fan-outs, `null`s, long
//! streams, bodies that cannot be read, a store that goes away).

use futures::StreamExt;
use serde_json::{json, Value};
use sluice_e2e::{Backend, Gateway, GatewayOptions, OwnRedis, StoreKind, SIM_MODEL};
use std::time::Duration;

const PRICES: &str = r#"
[[prices]]
model = "*"
tier = "*"
currency = "USD"
input = "1.00"
output = "3.00"
"#;

/// Both stores, each a fresh one.
fn stores(dir: &std::path::Path) -> [StoreKind; 2] {
    [
        StoreKind::Embedded(dir.to_owned()),
        StoreKind::fresh_redis(),
    ]
}

async fn gateway(backend: &Backend, store: StoreKind, extra: &str) -> Gateway {
    Gateway::start(GatewayOptions {
        extra_config: format!("{PRICES}{extra}"),
        ..GatewayOptions::new(backend, store)
    })
    .await
    .unwrap()
}

async fn quota(gw: &Gateway, id: &str) -> Value {
    gw.quota(id).await.unwrap()
}

async fn events(gw: &Gateway) -> Vec<Value> {
    gw.billing_export("event").await.unwrap()
}

/// Waits until the export holds `count` events.
async fn wait_events(gw: &Gateway, count: usize) -> Vec<Value> {
    for _ in 0..200 {
        let all = events(gw).await;
        if all.len() >= count {
            return all;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "the export never held {count} events: {:?}\n{}",
        events(gw).await,
        gw.log()
    );
}

fn held_stream(gate: &str) -> String {
    json!({"model": SIM_MODEL, "stream": true, "max_tokens": 4, "user": format!("sim-gate:{gate}"),
           "messages": [{"role": "user", "content": "hold on"}]})
    .to_string()
}

/// Polls a key's quota until `in_flight` is `want`.
async fn wait_in_flight(gw: &Gateway, id: &str, want: u64) {
    for _ in 0..100 {
        if quota(gw, id).await["max_concurrent"]["in_flight"] == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("in_flight never reached {want}: {}", quota(gw, id).await);
}

/// A client that sends the same `x-request-id` on every request still gets only
/// `max_concurrent` requests in flight, and each slot is freed when its request ends.
#[tokio::test]
async fn a_reused_request_id_cannot_fold_concurrency_slots_on_either_store() {
    let backend = Backend::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    for store in stores(dir.path()) {
        let gw = gateway(&backend, store.clone(), "").await;
        let (id, key) = gw
            .create_key_with("acme", "enterprise", json!({"max_concurrent": 2}))
            .await
            .unwrap();
        let gate = format!("reuse-{}", uuid::Uuid::new_v4().simple());
        let body = held_stream(&gate);
        let responses: Vec<reqwest::Response> = futures::stream::iter(0..50)
            .map(|_| {
                gw.http
                    .post(format!("{}/v1/chat/completions", gw.url))
                    .bearer_auth(&key)
                    .header("x-request-id", "the-same-id-every-time")
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
            })
            .buffer_unordered(50)
            .map(Result::unwrap)
            .collect()
            .await;
        let admitted = responses.iter().filter(|r| r.status() == 200).count();
        assert_eq!(
            admitted, 2,
            "{store:?}: only max_concurrent requests run at once"
        );
        for r in responses.iter().filter(|r| r.status() != 200) {
            assert_eq!(r.status(), 429);
            assert_eq!(
                r.headers()["x-request-id"],
                "the-same-id-every-time",
                "the client's id is still echoed for its logs"
            );
        }
        wait_in_flight(&gw, &id, 2).await;
        backend.open_gate(&gate).await.unwrap();
        for r in responses {
            let _ = r.bytes().await;
        }
        wait_in_flight(&gw, &id, 0).await;
        // Sequential requests after that are never refused for concurrency.
        for i in 0..6 {
            let r = gw
                .post_raw(
                    "/v1/chat/completions",
                    Some(&key),
                    json!({"model": SIM_MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
                        .to_string(),
                )
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "{store:?}: sequential request {i}");
        }
    }
}

/// A completions request with 3 prompts and n=2 reserves 6 × max_tokens (plus its prompt
/// estimate): seen in the error a key whose token limit is smaller gets, which names the
/// reservation.
#[tokio::test]
async fn a_multi_prompt_completion_reserves_every_prompt_and_choice() {
    let backend = Backend::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    for store in stores(dir.path()) {
        let gw = gateway(&backend, store.clone(), "").await;
        let (id, key) = gw
            .create_key_with("acme", "enterprise", json!({"tokens_per_minute": 900}))
            .await
            .unwrap();
        let prompt = json!(["one", "two", "three"]);
        let body = json!({"model": SIM_MODEL, "prompt": prompt, "n": 2, "max_tokens": 150});
        let r = gw
            .post_raw("/v1/completions", Some(&key), body.to_string())
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{store:?}");
        let v: Value = r.json().await.unwrap();
        let expected = prompt.to_string().len() as u64 + 64 + 6 * 150;
        let message = v["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(&format!("needs up to {expected} tokens")),
            "{store:?}: {message}"
        );
        // One prompt, one choice of the same size fits, and is admitted.
        let body = json!({"model": SIM_MODEL, "prompt": "one", "max_tokens": 150});
        let r = gw
            .post_raw("/v1/completions", Some(&key), body.to_string())
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{store:?}");
        let q = quota(&gw, &id).await;
        assert_eq!(q["requests_per_minute"]["used"], 1, "{store:?}: {q}");
    }
}

/// `n`, the number of prompts and `max_tokens` past the tier's caps are a 400 naming the
/// field, and nothing is reserved.
#[tokio::test]
async fn requests_past_the_tiers_caps_are_refused_and_reserve_nothing() {
    let backend = Backend::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let caps = "\n[tiers.free.request_caps]\nmax_tokens = 100\nmax_n = 2\nmax_prompts = 2\n";
    for store in stores(dir.path()) {
        let gw = gateway(&backend, store.clone(), caps).await;
        let (id, key) = gw.create_key("acme", "free").await.unwrap();
        let cases = [
            (
                "/v1/chat/completions",
                json!({"model": SIM_MODEL, "n": 3, "messages": [{"role": "user", "content": "hi"}]}),
                "n",
            ),
            (
                "/v1/chat/completions",
                json!({"model": SIM_MODEL, "max_tokens": 101, "messages": [{"role": "user", "content": "hi"}]}),
                "max_tokens",
            ),
            (
                "/v1/chat/completions",
                json!({"model": SIM_MODEL, "max_completion_tokens": 4_000_000_000u64, "messages": [{"role": "user", "content": "hi"}]}),
                "max_completion_tokens",
            ),
            (
                "/v1/completions",
                json!({"model": SIM_MODEL, "prompt": ["a", "b", "c"], "max_tokens": 5}),
                "prompt",
            ),
            (
                "/v1/completions",
                json!({"model": SIM_MODEL, "prompt": "a", "best_of": 3, "max_tokens": 5}),
                "best_of",
            ),
            (
                "/v1/embeddings",
                json!({"model": "sim-embed", "input": ["a", "b", "c"]}),
                "input",
            ),
        ];
        for (path, body, field) in cases {
            let r = gw
                .post_raw(path, Some(&key), body.to_string())
                .await
                .unwrap();
            assert_eq!(r.status(), 400, "{store:?}: {body}");
            let v: Value = r.json().await.unwrap();
            assert_eq!(v["error"]["param"], field, "{store:?}: {v}");
            assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
        }
        let q = quota(&gw, &id).await;
        assert_eq!(q["requests_per_minute"]["used"], 0, "{store:?}: {q}");
        assert_eq!(q["tokens_per_day"]["used"], 0, "{store:?}: {q}");
        assert_eq!(q["monthly_budget"]["used"], "0", "{store:?}: {q}");
    }
}

/// A client that sends `"stream_options": null` gets its stream metered from the backend's
/// own usage chunk (which it did not ask for, so it does not see it).
#[tokio::test]
async fn a_null_stream_options_stream_is_metered_from_the_backends_usage() {
    let backend = Backend::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    for store in stores(dir.path()) {
        let gw = gateway(&backend, store.clone(), "").await;
        let (_, key) = gw.create_key("acme", "pro").await.unwrap();
        let body = json!({"model": SIM_MODEL, "stream": true, "stream_options": null, "max_tokens": 5,
                          "messages": [{"role": "user", "content": "count to five"}]});
        let r = gw
            .post_raw("/v1/chat/completions", Some(&key), body.to_string())
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{store:?}");
        let text = r.text().await.unwrap();
        assert!(text.contains("data: [DONE]"), "{text}");
        assert!(
            !text.contains("\"usage\":{"),
            "the client did not ask for usage: {text}"
        );
        let events = wait_events(&gw, 1).await;
        assert_eq!(
            events[0]["usage_source"], "reported",
            "{store:?}: {:?}",
            events[0]
        );
        assert_eq!(events[0]["completion_tokens"], 5);
        assert!(events[0]["prompt_tokens"].as_u64().unwrap() > 0);
    }
}

/// A stream that outlives its slot's lifetime keeps its slot: renewed while it runs, on both
/// stores, and freed when it ends.
#[tokio::test]
async fn a_stream_held_past_the_slot_lifetime_keeps_its_slot() {
    let backend = Backend::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    for store in stores(dir.path()) {
        // A 4 s lifetime renews every second: room for a loaded CI box to hold the renewal
        // up by a few seconds without the slot lapsing (2 s once lapsed under a full suite).
        let gw = gateway(&backend, store.clone(), "\n[quotas]\nslot_ttl_secs = 4\n").await;
        let (id, key) = gw
            .create_key_with("acme", "enterprise", json!({"max_concurrent": 1}))
            .await
            .unwrap();
        let gate = format!("long-{}", uuid::Uuid::new_v4().simple());
        let long = gw
            .post_raw("/v1/chat/completions", Some(&key), held_stream(&gate))
            .await
            .unwrap();
        assert_eq!(long.status(), 200);
        // Over two slot lifetimes later it still holds its slot...
        tokio::time::sleep(Duration::from_secs(9)).await;
        let q = quota(&gw, &id).await;
        assert_eq!(q["max_concurrent"]["in_flight"], 1, "{store:?}: {q}");
        let other = gw
            .post_raw(
                "/v1/chat/completions",
                Some(&key),
                held_stream("never-held"),
            )
            .await
            .unwrap();
        assert_eq!(other.status(), 429, "{store:?}");
        let retry: u64 = other.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            (1..=4).contains(&retry),
            "{store:?}: Retry-After {retry} is within the slot's lifetime"
        );
        let v: Value = other.json().await.unwrap();
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("max_concurrent"),
            "{v}"
        );
        // ...and frees it when it ends.
        backend.open_gate(&gate).await.unwrap();
        let _ = long.bytes().await.unwrap();
        wait_in_flight(&gw, &id, 0).await;
    }
}

/// A misbehaving backend: each model is a way of answering 2xx whose usage cannot be read.
mod rogue {
    use axum::body::Body;
    use axum::http::{header, StatusCode};
    use axum::response::Response;
    use axum::routing::{get, post};
    use axum::{Json, Router};
    use serde_json::{json, Value};

    pub const MODELS: [&str; 5] = [
        "big-json",
        "cut-stream",
        "gzip",
        "no-usage",
        "no-usage-stream",
    ];

    async fn chat(Json(body): Json<Value>) -> Response {
        let model = body["model"].as_str().unwrap_or_default().to_owned();
        // The events, then (when `crash`) a broken connection once they have been sent.
        let sse = |events: Vec<String>, crash: bool| {
            use futures::StreamExt;
            let events = futures::stream::iter(events.into_iter().map(Ok));
            let end = futures::stream::once(async move {
                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                Err(std::io::Error::other("backend crashed"))
            })
            .take(usize::from(crash));
            Response::builder()
                .header(header::CONTENT_TYPE, "text/event-stream")
                .body(Body::from_stream(events.chain(end)))
                .unwrap()
        };
        let delta = |text: &str| {
            format!(
                "data: {}\n\n",
                json!({"id": "r", "object": "chat.completion.chunk", "model": model,
                       "choices": [{"index": 0, "delta": {"content": text}}]})
            )
        };
        match model.as_str() {
            // Past the gateway's 16 MiB copy bound, usage at the very end.
            "big-json" => {
                let text = "a".repeat(17 << 20);
                let body = json!({"id": "r", "object": "chat.completion", "model": model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text}}],
                    "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}});
                json_response(body)
            }
            // The backend crashes mid-stream: two chunks, then the connection drops.
            "cut-stream" => sse(vec![delta("Hello"), delta(" there")], true),
            "gzip" => Response::builder()
                .header(header::CONTENT_TYPE, "application/json")
                .header(header::CONTENT_ENCODING, "gzip")
                .body(Body::from(vec![
                    0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3, 1, 2, 3,
                ]))
                .unwrap(),
            "no-usage" => json_response(
                json!({"id": "r", "object": "chat.completion", "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "twelve bytes"}}]}),
            ),
            "no-usage-stream" => sse(vec![delta("four"), "data: [DONE]\n\n".to_owned()], false),
            _ => Response::builder()
                .status(StatusCode::NOT_FOUND)
                .body(Body::empty())
                .unwrap(),
        }
    }

    fn json_response(body: Value) -> Response {
        Response::builder()
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body.to_string()))
            .unwrap()
    }

    /// Serves on a loopback port until the test ends; returns its URL.
    pub async fn start() -> String {
        let models: Vec<Value> = MODELS
            .iter()
            .map(|m| json!({"id": m, "object": "model", "owned_by": "rogue"}))
            .collect();
        let app = Router::new()
            .route("/health", get(|| async { "ok" }))
            .route(
                "/v1/models",
                get(move || {
                    let models = models.clone();
                    async move { Json(json!({"object": "list", "data": models})) }
                }),
            )
            .route("/v1/chat/completions", post(chat));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        url
    }
}

/// Every 2xx answer whose usage cannot be read is billed, non-zero and flagged: estimated
/// from what passed, or at its reservation when nothing could be read. On both stores.
#[tokio::test]
async fn answers_with_unreadable_usage_are_billed_and_flagged() {
    let backend = Backend::start().await.unwrap();
    let rogue = rogue::start().await;
    let dir = tempfile::tempdir().unwrap();
    for store in stores(dir.path()) {
        let gw = Gateway::start(GatewayOptions {
            extra_config: PRICES.to_owned(),
            backends: vec![rogue.clone()],
            max_body_bytes: 1 << 20,
            ..GatewayOptions::new(&backend, store.clone())
        })
        .await
        .unwrap();
        let (id, key) = gw.create_key("acme", "enterprise").await.unwrap();
        for model in rogue::MODELS {
            let stream = model.ends_with("stream");
            let body = json!({"model": model, "stream": stream, "max_tokens": 40,
                              "messages": [{"role": "user", "content": "hi"}]});
            // A connection of its own: the gateway closes one whose answer broke off.
            let r = reqwest::Client::new()
                .post(format!("{}/v1/chat/completions", gw.url))
                .bearer_auth(&key)
                .header("content-type", "application/json")
                .body(body.to_string())
                .send()
                .await
                .unwrap_or_else(|e| panic!("{store:?} {model}: {e}"));
            assert_eq!(r.status(), 200, "{store:?} {model}");
            let _ = r.bytes().await;
        }
        let events = wait_events(&gw, rogue::MODELS.len()).await;
        let source = |model: &str| {
            let e = events
                .iter()
                .find(|e| e["model"] == model)
                .unwrap_or_else(|| panic!("no event for {model}: {events:?}"));
            assert!(e["prompt_tokens"].as_u64().unwrap() > 0, "{store:?} {e}");
            assert!(
                e["cost"].as_str().unwrap().parse::<f64>().unwrap() > 0.0,
                "{store:?}: billed, not zero: {e}"
            );
            assert_eq!(e["usage_reported"], false, "{e}");
            (
                e["usage_source"].as_str().unwrap().to_owned(),
                e["completion_tokens"].as_u64().unwrap(),
            )
        };
        assert_eq!(source("big-json"), ("reserved".into(), 40), "{store:?}");
        assert_eq!(source("gzip"), ("reserved".into(), 40), "{store:?}");
        assert_eq!(source("no-usage"), ("estimated".into(), 12), "{store:?}");
        assert_eq!(source("cut-stream"), ("estimated".into(), 11), "{store:?}");
        assert_eq!(
            source("no-usage-stream"),
            ("estimated".into(), 4),
            "{store:?}"
        );
        // The quota counts what was billed.
        let billed: u64 = events
            .iter()
            .map(|e| {
                e["prompt_tokens"].as_u64().unwrap() + e["completion_tokens"].as_u64().unwrap()
            })
            .sum();
        let mut q = Value::Null;
        for _ in 0..100 {
            q = quota(&gw, &id).await;
            if q["tokens_per_day"]["used"] == billed {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(q["tokens_per_day"]["used"], billed, "{store:?}: {q}");
    }
}

/// Requests a fail-open tier admitted while Redis was down reach the key's counters and
/// budget once it is back, each exactly once.
#[tokio::test]
async fn fail_open_admissions_are_charged_once_redis_returns() {
    let backend = Backend::start().await.unwrap();
    let mut redis = OwnRedis::start();
    let gw = Gateway::start(GatewayOptions {
        extra_config: format!("{PRICES}\n[quotas]\nlease_max_requests = 0\n"),
        ..GatewayOptions::new(
            &backend,
            StoreKind::RedisAt {
                url: redis.url(),
                prefix: "failopen".into(),
            },
        )
    })
    .await
    .unwrap();
    let (id, key) = gw.create_key("acme", "enterprise").await.unwrap();
    let chat = json!({"model": SIM_MODEL, "max_tokens": 3, "messages": [{"role": "user", "content": "hello"}]})
        .to_string();
    let r = gw
        .post_raw("/v1/chat/completions", Some(&key), chat.clone())
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    redis.kill();
    let mut served = 0;
    for _ in 0..5 {
        let r = gw
            .post_raw("/v1/chat/completions", Some(&key), chat.clone())
            .await
            .unwrap();
        if r.status() == 200 {
            served += 1;
        }
    }
    assert_eq!(served, 5, "the enterprise tier fails open");
    redis.spawn();

    let events = wait_events(&gw, 6).await;
    let tokens: u64 = events
        .iter()
        .map(|e| e["prompt_tokens"].as_u64().unwrap() + e["completion_tokens"].as_u64().unwrap())
        .sum();
    let cost: rust_decimal::Decimal = events
        .iter()
        .map(|e| {
            e["cost"]
                .as_str()
                .unwrap()
                .parse::<rust_decimal::Decimal>()
                .unwrap()
        })
        .sum();
    let mut q = Value::Null;
    for _ in 0..100 {
        q = quota(&gw, &id).await;
        if q["requests_per_minute"]["used"] == 6 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A few more seconds of retries change nothing: each is counted once.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let q2 = quota(&gw, &id).await;
    for limit in [
        "requests_per_minute",
        "tokens_per_minute",
        "requests_per_day",
        "tokens_per_day",
        "monthly_budget",
    ] {
        assert_eq!(
            q[limit]["used"], q2[limit]["used"],
            "{limit} is not counted again"
        );
    }
    assert_eq!(q["requests_per_minute"]["used"], 6, "{q}");
    assert_eq!(q["tokens_per_minute"]["used"], tokens, "{q}");
    assert_eq!(q["tokens_per_day"]["used"], tokens, "{q}");
    let spent: rust_decimal::Decimal = q["monthly_budget"]["used"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(spent, cost, "the budget counts what was billed: {q}");
}

/// The README's quick start, exactly as it says (with the simulated engine): the demo key
/// it prints serves sequential requests up to the free tier's requests per minute, and the
/// first refusal names that limit and says when the minute frees room.
#[tokio::test]
async fn the_quickstart_demo_key_is_served_up_to_the_free_request_rate() {
    use std::io::BufRead;
    use std::os::unix::process::CommandExt;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let data = tempfile::tempdir().unwrap();
    let (listen, admin, backend) = (
        sluice_e2e::free_port(),
        sluice_e2e::free_port(),
        sluice_e2e::free_port(),
    );
    let mut child = std::process::Command::new(root.join("scripts/quickstart.sh"))
        .current_dir(&root)
        .env("SLUICE_QUICKSTART_ENGINE", "sim")
        .env("SLUICE_LISTEN", format!("127.0.0.1:{listen}"))
        .env("SLUICE_ADMIN_LISTEN", format!("127.0.0.1:{admin}"))
        .env("SLUICE_BACKEND_LISTEN", format!("127.0.0.1:{backend}"))
        .env("SLUICE_DATA_DIR", data.path())
        .env_remove("SLUICE_REDIS_URL")
        .env_remove("SLUICE_BACKENDS")
        .env_remove("SLUICE_ADMIN_TOKEN")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .process_group(0)
        .spawn()
        .expect("scripts/quickstart.sh runs");
    // The script, its backend and its gateway share one process group: stopped together,
    // and waited for, however the test ends.
    struct Stop(std::process::Child);
    impl Drop for Stop {
        fn drop(&mut self) {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", "--", &format!("-{}", self.0.id())])
                .status();
            let _ = self.0.wait();
        }
    }
    let stdout = child.stdout.take().unwrap();
    let _stop = Stop(child);
    // The script builds the release binaries first: minutes on a cold machine. Its output is
    // read to the end (a closed pipe would stop it), handing over the admin token and key.
    let (found, mut printed) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let token = |marker: &str| {
                line.find(marker).map(|at| {
                    line[at + marker.len()..]
                        .trim_end_matches(')')
                        .trim()
                        .to_owned()
                })
            };
            if let Some(admin) = token("(admin token: ") {
                let _ = found.send(("admin", admin));
            } else if let Some(at) = line.find("sk-") {
                let key = line[at..].split_whitespace().next().unwrap_or_default();
                let _ = found.send(("key", key.to_owned()));
            }
        }
    });
    let (mut admin_token, mut key) = (None, None);
    while key.is_none() {
        let (what, value) = tokio::time::timeout(Duration::from_secs(1500), printed.recv())
            .await
            .expect("quickstart printed its key in time")
            .expect("quickstart printed a demo key before it ended");
        match what {
            "admin" => admin_token = Some(value),
            _ => key = Some(value),
        }
    }
    let (admin_token, key) = (admin_token.expect("an admin token"), key.unwrap());

    // The free tier as this gateway runs it.
    let http = reqwest::Client::new();
    let tier: Value = http
        .get(format!("http://127.0.0.1:{admin}/admin/v1/tiers/free"))
        .bearer_auth(&admin_token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let free_rpm = tier["limits"]["requests_per_minute"]
        .as_u64()
        .unwrap_or_else(|| panic!("the free tier has a request rate: {tier}"));

    let url = format!("http://127.0.0.1:{listen}/v1/chat/completions");
    // As the printed curl asks, one request after another.
    let body = json!({"model": "sluice-sim", "messages": [{"role": "user", "content": "What is the capital of France?"}],
                      "temperature": 0, "stream": true});
    for i in 0..free_rpm {
        let r = http
            .post(&url)
            .bearer_auth(&key)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status();
        let text = r.text().await.unwrap();
        assert_eq!(status, 200, "request {i} of {free_rpm}: {text}");
        assert!(text.contains("[DONE]"));
    }
    let r = http
        .post(&url)
        .bearer_auth(&key)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        retry > 30 && retry <= 60,
        "Retry-After {retry}: the first of {free_rpm} requests sent seconds ago leaves the minute then"
    );
    let v: Value = r.json().await.unwrap();
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains("requests_per_minute"), "{message}");
    assert_eq!(v["error"]["code"], "rate_limit_exceeded");
}
