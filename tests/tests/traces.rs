//! Traces: with OTEL_EXPORTER_OTLP_ENDPOINT set, the gateway exports one span per request
//! with children for each phase, the backend continues the same trace from `traceparent`,
//! and no span carries an API key or prompt text. The collector is a real OTLP/HTTP JSON
//! endpoint on loopback, written here.

use axum::{body::Bytes, routing::post, Router};
use serde_json::{json, Value};
use sluice_e2e::{Backend, Gateway, GatewayOptions, StoreKind, SIM_MODEL};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Every span received, flattened: (service name, span JSON).
type Received = Arc<Mutex<Vec<(String, Value)>>>;

async fn collector() -> (String, Received, Arc<Mutex<Vec<String>>>) {
    let spans: Received = Arc::default();
    let raw: Arc<Mutex<Vec<String>>> = Arc::default();
    let (s, r) = (spans.clone(), raw.clone());
    let app = Router::new().route(
        "/v1/traces",
        post(move |body: Bytes| {
            let (spans, raw) = (s.clone(), r.clone());
            async move {
                let text = String::from_utf8_lossy(&body).into_owned();
                let export: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                raw.lock().unwrap().push(text);
                for resource in export["resourceSpans"].as_array().into_iter().flatten() {
                    let service = resource["resource"]["attributes"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .find(|a| a["key"] == "service.name")
                        .and_then(|a| a["value"]["stringValue"].as_str())
                        .unwrap_or_default()
                        .to_owned();
                    for scope in resource["scopeSpans"].as_array().into_iter().flatten() {
                        for span in scope["spans"].as_array().into_iter().flatten() {
                            spans.lock().unwrap().push((service.clone(), span.clone()));
                        }
                    }
                }
                "{}"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, spans, raw)
}

fn otel_env(endpoint: &str) -> Vec<(String, String)> {
    [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

fn attribute<'a>(span: &'a Value, key: &str) -> Option<&'a Value> {
    span["attributes"]
        .as_array()?
        .iter()
        .find(|a| a["key"] == key)
        .map(|a| &a["value"])
}

#[tokio::test]
async fn a_request_is_one_trace_across_gateway_and_backend_with_no_secrets() {
    let (endpoint, spans, raw) = collector().await;
    let env = otel_env(&endpoint);
    let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let backend = Backend::start_with_env(&env_refs).await.unwrap();
    let mut options = GatewayOptions::new(
        &backend,
        StoreKind::Embedded(tempfile::tempdir().unwrap().keep()),
    );
    options.env = env.clone();
    let gw = Gateway::start(options).await.unwrap();
    let (_, key) = gw.create_key("acme", "pro").await.unwrap();

    let prompt = "a question whose text must never be exported";
    let r = gw
        .post_raw(
            "/v1/chat/completions",
            Some(&key),
            json!({"model": SIM_MODEL, "max_tokens": 4, "temperature": 0,
                   "messages": [{"role": "user", "content": prompt}]})
            .to_string(),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // Spans arrive within the batch delay.
    let deadline = Instant::now() + Duration::from_secs(10);
    let (root, upstream, backend_span) = loop {
        {
            let spans = spans.lock().unwrap();
            let find = |service: &str, name: &str| {
                spans
                    .iter()
                    .find(|(s, span)| s == service && span["name"] == name)
                    .map(|(_, span)| span.clone())
            };
            if let (Some(root), Some(upstream), Some(b)) = (
                find("sluice-gateway", &format!("chat {SIM_MODEL}")),
                find("sluice-gateway", "upstream"),
                find("sluice-backend", "POST /v1/chat/completions"),
            ) {
                break (root, upstream, b);
            }
        }
        assert!(
            Instant::now() < deadline,
            "spans never arrived: {:?}\n{}",
            spans.lock().unwrap(),
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let spans = spans.lock().unwrap().clone();
    let trace = root["traceId"].as_str().unwrap();
    let root_id = root["spanId"].as_str().unwrap();

    // The phases hang under the request's span.
    for phase in ["auth", "admission", "cache lookup", "upstream", "metering"] {
        let span = spans
            .iter()
            .map(|(_, s)| s)
            .find(|s| s["name"] == phase)
            .unwrap_or_else(|| panic!("no {phase} span in {spans:?}"));
        assert_eq!(span["traceId"], trace, "{phase}");
        assert_eq!(span["parentSpanId"], root_id, "{phase}");
    }
    // The backend continued the same trace, under the gateway's upstream attempt.
    assert_eq!(backend_span["traceId"], trace);
    assert_eq!(backend_span["parentSpanId"], upstream["spanId"]);

    // GenAI attributes on the request's span.
    assert_eq!(
        attribute(&root, "gen_ai.request.model").unwrap()["stringValue"],
        SIM_MODEL
    );
    assert_eq!(
        attribute(&root, "gen_ai.operation.name").unwrap()["stringValue"],
        "chat"
    );
    let output = attribute(&root, "gen_ai.usage.output_tokens").unwrap();
    // OTLP JSON writes 64-bit integers as strings.
    assert_eq!(output["intValue"], "4", "{output}");
    assert!(
        attribute(&upstream, "sluice.time_to_first_byte_ms").is_some(),
        "{upstream}"
    );

    // Nothing secret anywhere in what was exported.
    let everything = raw.lock().unwrap().join("\n");
    assert!(!everything.contains(&key), "an API key was exported");
    assert!(!everything.contains(prompt), "prompt text was exported");
}
