//! Distillation datasets: the conversations of tenants and keys that opted in are captured,
//! and export as OpenAI fine-tuning lines that reproduce exactly what was asked and
//! answered; nothing of callers that did not opt in (or opted a key out) is kept. On the
//! embedded store, and on Redis with the requests spread over two replicas.

use reqwest::Method;
use serde_json::{json, Value};
use sluice_e2e::{admin_jwt, binary, Backend, Gateway, GatewayOptions, StoreKind, ADMIN_TOKEN};
use std::time::Duration;

async fn export(gw: &Gateway, token: &str, query: &str) -> (u16, String) {
    let r = gw
        .http
        .get(format!("{}/admin/v1/datasets/export?{query}", gw.admin_url))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.text().await.unwrap())
}

fn lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).expect("every line is JSON"))
        .collect()
}

/// Sends a chat completion and returns the assistant's answer as the client saw it (a
/// stream put together from its deltas) and its finish reason.
async fn chat(
    gw: &Gateway,
    key: &str,
    messages: &str,
    stream: bool,
    max_tokens: u32,
) -> (String, String) {
    let body = format!(
        r#"{{"model": "sim-chat", "messages": {messages}, "stream": {stream}, "max_tokens": {max_tokens}}}"#
    );
    let r = gw
        .post_raw("/v1/chat/completions", Some(key), body)
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    if !stream {
        let v: Value = serde_json::from_str(&text).unwrap();
        let choice = &v["choices"][0];
        return (
            choice["message"]["content"].as_str().unwrap().to_owned(),
            choice["finish_reason"].as_str().unwrap().to_owned(),
        );
    }
    let (mut answer, mut finish) = (String::new(), String::new());
    for data in text.lines().filter_map(|l| l.strip_prefix("data: ")) {
        if data == "[DONE]" {
            break;
        }
        let chunk: Value = serde_json::from_str(data).unwrap();
        for choice in chunk["choices"].as_array().unwrap() {
            answer.push_str(choice["delta"]["content"].as_str().unwrap_or(""));
            if let Some(reason) = choice["finish_reason"].as_str() {
                finish = reason.to_owned();
            }
        }
    }
    (answer, finish)
}

/// How many lines an export with this query has.
async fn count(gw: &Gateway, query: &str) -> usize {
    let (status, text) = export(gw, ADMIN_TOKEN, query).await;
    assert_eq!(status, 200, "{query}: {text}");
    text.lines().count()
}

/// Exports (from `gw`) until `count` lines are there: capture is written after the answer,
/// off the request path.
async fn wait_for_lines(gw: &Gateway, count: usize) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (status, text) = export(gw, ADMIN_TOKEN, "").await;
        assert_eq!(status, 200, "{text}");
        let n = text.lines().count();
        assert!(
            n <= count,
            "more lines than conversations captured:\n{text}"
        );
        if n == count {
            return text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{n} of {count} conversations exported:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Conversations of every shape a client sends (a system prompt, several turns, content
/// parts, names, characters JSON escapes, numbers as written), as the client writes them:
/// keys in its own order, its own spacing.
fn conversations() -> Vec<&'static str> {
    vec![
        r#"[{"role": "user", "content": "What is the capital of France?"}]"#,
        r#"[{"role":"system","content":"Answer in one word."},{"name":"ann","role":"user","content":"Largest planet?"}]"#,
        r#"[ {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Say \"quoted\"\n\ttabs, \u2603 and 🚀"} ]"#,
        r#"[{"content": [{"type": "text", "text": "Part one."}, {"text": "Part two.", "type": "text"}], "role": "user"}]"#,
        r#"[{"role": "developer", "content": "Be terse."}, {"role": "user", "content": "1e3 == 1000.0?", "weight": 1.50}]"#,
    ]
}

async fn datasets_case(gws: &[Gateway]) {
    let gw = |i: usize| &gws[i % gws.len()];
    // Bad opt-ins are refused with the field named.
    let (status, answer) = gw(0)
        .admin_json(
            Method::PUT,
            "/admin/v1/tenants/acme",
            Some(json!({"limits": {}, "distillation": {"models": ["sim chat"]}})),
        )
        .await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["error"]["param"], "distillation.models", "{answer}");
    let (status, answer) = gw(0)
        .admin_json(
            Method::PUT,
            "/admin/v1/tenants/acme",
            Some(json!({"limits": {}, "distillation": {"model": ["sim-*"]}})),
        )
        .await;
    assert_eq!(status, 400, "{answer}");

    // acme opts in for sim-* models; globex does not; one acme key opts itself out.
    let (status, tenant) = gw(0)
        .admin_json(
            Method::PUT,
            "/admin/v1/tenants/acme",
            Some(json!({"limits": {}, "distillation": {"models": ["sim-*"]}})),
        )
        .await;
    assert_eq!(status, 200, "{tenant}");
    assert_eq!(tenant["distillation"], json!({"models": ["sim-*"]}));
    let (_, shown) = gw(1)
        .admin_json(Method::GET, "/admin/v1/tenants/globex", None)
        .await;
    assert_eq!(shown["distillation"], Value::Null, "off unless opted in");
    let (acme_id, acme_key) = gw(0).create_key("acme", "enterprise").await.unwrap();
    let (status, out) = gw(0)
        .admin_json(
            Method::POST,
            "/admin/v1/keys",
            Some(
                json!({"name": "private", "tenant": "acme", "tier": "enterprise",
                    "distillation": {"models": []}}),
            ),
        )
        .await;
    assert_eq!(status, 201, "{out}");
    assert_eq!(out["distillation"], json!({"models": []}));
    let private_key = out["key"].as_str().unwrap().to_owned();
    let (_, globex_key) = gw(0).create_key("globex", "enterprise").await.unwrap();
    // Every replica has loaded acme's opt-in (tenants reload within a second).
    tokio::time::sleep(Duration::from_millis(1_500)).await;

    let mut expected = Vec::new();
    for (i, messages) in conversations().iter().enumerate() {
        let stream = i % 2 == 1;
        let max_tokens = if i == 2 { 4 } else { 64 };
        let (answer, finish) = chat(gw(i), &acme_key, messages, stream, max_tokens).await;
        let sent: Value = serde_json::from_str(messages).unwrap();
        let mut all = sent.as_array().unwrap().clone();
        all.push(json!({"role": "assistant", "content": answer}));
        expected.push((json!({"messages": all}), finish, *messages));
        // The same questions from callers who did not opt in leave nothing.
        chat(gw(i + 1), &globex_key, messages, stream, max_tokens).await;
        chat(gw(i), &private_key, messages, stream, max_tokens).await;
    }
    assert!(expected.iter().any(|(_, f, _)| f == "length"));

    let last = gw(gws.len() - 1);
    let text = wait_for_lines(last, expected.len()).await;
    let exported = lines(&text);
    for (want, finish, messages) in &expected {
        assert!(
            exported.contains(want),
            "missing {want} ({finish}) from:\n{text}"
        );
        // Each of the request's messages byte for byte, as the client wrote it (a line of
        // JSON Lines has no newline between them, so only the list's own spacing goes).
        let sent: Vec<&serde_json::value::RawValue> = serde_json::from_str(messages).unwrap();
        for message in sent {
            assert!(
                text.contains(message.get()),
                "{message} not verbatim in:\n{text}"
            );
        }
    }
    for line in &exported {
        assert_eq!(line.as_object().unwrap().len(), 1, "only messages: {line}");
    }

    // Filters.
    assert_eq!(count(last, "tenant=globex").await, 0);
    assert_eq!(count(last, "tenant=acme&model=sim-*").await, expected.len());
    assert_eq!(count(last, "model=llama-*").await, 0);
    let lengths = expected.iter().filter(|(_, f, _)| f == "length").count();
    assert_eq!(count(last, "finish_reason=length").await, lengths);
    assert_eq!(
        count(last, "finish_reason=stop,length").await,
        expected.len()
    );
    assert_eq!(count(last, &format!("key={acme_id}")).await, expected.len());
    assert_eq!(count(last, "from=2000-01-01&to=2000-01-02").await, 0);
    let (status, bad) = export(last, ADMIN_TOKEN, "from=yesterday").await;
    assert_eq!(status, 400, "{bad}");
    assert!(bad.contains("\"param\":\"from\""), "{bad}");

    // Viewers read it; a viewer scoped to a tenant does not.
    let viewer = admin_jwt(json!({"role": "viewer", "sub": "finance"}));
    assert_eq!(export(last, &viewer, "").await.0, 200);
    let scoped = admin_jwt(json!({"role": "viewer", "sub": "acme-admin", "tenant": "acme"}));
    assert_eq!(export(last, &scoped, "").await.0, 403);

    // The CLI writes the same file.
    let file = tempfile::NamedTempFile::new().unwrap();
    let status = tokio::process::Command::new(binary("sluice"))
        .args([
            "datasets",
            "export",
            "--admin-url",
            &last.admin_url,
            "--tenant",
            "acme",
            "-o",
        ])
        .arg(file.path())
        .env("SLUICE_ADMIN_TOKEN", ADMIN_TOKEN)
        .status()
        .await
        .unwrap();
    assert!(status.success());
    assert_eq!(std::fs::read_to_string(file.path()).unwrap(), text);

    // Purge: something must be named; what is named goes, and only that.
    let (status, answer) = gw(0)
        .admin_json(Method::DELETE, "/admin/v1/datasets", None)
        .await;
    assert_eq!(status, 400, "{answer}");
    let (status, answer) = gw(0)
        .admin_json(
            Method::DELETE,
            "/admin/v1/datasets?finish_reason=length",
            None,
        )
        .await;
    assert_eq!(
        (status, answer["deleted"].as_u64()),
        (200, Some(lengths as u64)),
        "{answer}"
    );
    assert_eq!(count(last, "").await, expected.len() - lengths);
    assert_eq!(count(last, "finish_reason=length").await, 0);
    let (status, answer) = gw(1)
        .admin_json(Method::DELETE, "/admin/v1/datasets?all=true", None)
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(count(last, "").await, 0);

    // A key whose own setting is cleared (null) follows its tenant again.
    let private_id = out["id"].as_str().unwrap();
    let (status, patched) = gw(0)
        .admin_json(
            Method::PATCH,
            &format!("/admin/v1/keys/{private_id}"),
            Some(json!({"distillation": null})),
        )
        .await;
    assert_eq!(
        (status, &patched["distillation"]),
        (200, &Value::Null),
        "{patched}"
    );
    // (On the replica that changed it: the others drop their cached key within a second.)
    let (answer, _) = chat(gw(0), &private_key, conversations()[0], false, 64).await;
    let text = wait_for_lines(last, 1).await;
    assert!(text.contains(&answer), "{text}");
}

#[tokio::test]
async fn opted_in_conversations_export_exactly_on_the_embedded_store() {
    let backend = Backend::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::embedded(&backend, dir.path()).await.unwrap();
    datasets_case(&[gw]).await;
}

#[tokio::test]
async fn opted_in_conversations_export_exactly_across_two_replicas_on_redis() {
    let backend = Backend::start().await.unwrap();
    let store = StoreKind::fresh_redis();
    let gws = sluice_e2e::fleet(&backend, 2, store, "").await;
    datasets_case(&gws).await;
}

#[tokio::test]
async fn an_answer_past_the_capture_bound_is_answered_but_not_kept() {
    let backend = Backend::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut options = GatewayOptions::new(&backend, StoreKind::Embedded(dir.path().to_owned()));
    options.extra_config = "[datasets]\nmax_answer_bytes = 1000\n".to_owned();
    let gw = Gateway::start(options).await.unwrap();
    let (status, _) = gw
        .admin_json(
            Method::PUT,
            "/admin/v1/tenants/acme",
            Some(json!({"limits": {}, "distillation": {"models": ["*"]}})),
        )
        .await;
    assert_eq!(status, 200);
    let (_, key) = gw.create_key("acme", "enterprise").await.unwrap();
    let short = r#"[{"role": "user", "content": "Hi"}]"#;
    // A one-token answer fits in 1000 bytes; a stream of sixteen chunks does not.
    let (kept, _) = chat(&gw, &key, short, false, 1).await;
    let (answer, finish) = chat(&gw, &key, short, true, 64).await;
    assert_eq!(finish, "stop");
    assert!(!answer.is_empty());
    let text = wait_for_lines(&gw, 1).await;
    assert!(text.contains(&kept), "{text}");
    let metrics = gw.admin_metrics().await;
    assert!(
        metrics.contains("sluice_dataset_captures_total{outcome=\"too_large\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("sluice_dataset_captures_total{outcome=\"kept\"} 1"),
        "{metrics}"
    );
}
