//! Sluice on the public edge: clients over HTTPS and HTTP/2 (the Python openai client and
//! curl, trusting only the test's CA), a certificate replaced under open streams, and a
//! hosted OpenAI-compatible API over HTTPS with a private CA that gets its own key, never
//! the client's, and, when it answers 429, leaves the request to the next model in the
//! fallback chain. Certificates are made by the test (tests/src/tls.rs); the hosted API is a
//! stand-in process (tests/python/hosted_provider.py), since no real one can be reached here.

use serde_json::{json, Value};
use sluice_e2e::tls::Ca;
use sluice_e2e::{Backend, Gateway, GatewayOptions, StoreKind, SIM_MODEL};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn tls_section(dir: &Path) -> String {
    format!(
        "[server.tls]\ncert_file = {:?}\nkey_file = {:?}\nadmin = false\nreload_check_secs = 1\n",
        dir.join("cert.pem").display().to_string(),
        dir.join("key.pem").display().to_string(),
    )
}

fn install(leaf: &sluice_e2e::tls::Leaf, dir: &Path) {
    // Written whole under a temporary name, then renamed: the gateway never reads half a file.
    for (from, name) in [(&leaf.cert, "cert.pem"), (&leaf.key, "key.pem")] {
        let staged = dir.join(format!("{name}.new"));
        std::fs::copy(from, &staged).unwrap();
        std::fs::rename(&staged, dir.join(name)).unwrap();
    }
}

/// Whether a client trusting only `ca` completes a request to the gateway's `/health`.
fn trusted_by(url: &str, ca: &Path) -> bool {
    Command::new("curl")
        .args(["-sf", "--max-time", "5", "--cacert"])
        .arg(ca)
        .arg(format!("{url}/health"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "{what} did not happen");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn https_and_http2_clients_and_a_certificate_replaced_under_open_streams() {
    let first_ca = Ca::new("first-ca").unwrap();
    let second_ca = Ca::new("second-ca").unwrap();
    let certs = tempfile::tempdir().unwrap();
    let first_leaf = first_ca.server_cert("gateway").unwrap();
    install(&first_leaf, certs.path());
    // Each token 60 ms apart: a 40-token stream is open for over two seconds.
    let backend = Backend::start_with(&["--sim-token-delay-ms", "60"])
        .await
        .unwrap();
    let data = tempfile::tempdir().unwrap();
    let gw = Gateway::start(GatewayOptions {
        server_config: tls_section(certs.path()),
        ..GatewayOptions::new(&backend, StoreKind::Embedded(data.path().to_owned()))
    })
    .await
    .unwrap();
    assert!(gw.url.starts_with("https://"));
    let (_, key) = gw.create_key("tls-tenant", "free").await.unwrap();
    let ca = first_ca.cert().display().to_string();
    sluice_e2e::python_check(
        "https_clients.py",
        &[
            ("SLUICE_URL", &gw.url),
            ("SLUICE_KEY", &key),
            ("SLUICE_CA", &ca),
            ("SLUICE_MODEL", SIM_MODEL),
        ],
        || gw.log(),
    )
    .await;

    // A stream over HTTP/2 is open when the certificate is replaced and the gateway told.
    let body = json!({
        "model": SIM_MODEL, "stream": true, "max_tokens": 40,
        "messages": [{"role": "user", "content": "a long answer, please"}],
    });
    let stream = Command::new("curl")
        .args(["-sSN", "--http2", "--max-time", "60", "--cacert", &ca])
        .args(["-H", &format!("authorization: Bearer {key}")])
        .args([
            "-H",
            "content-type: application/json",
            "-d",
            &body.to_string(),
        ])
        .arg(format!("{}/v1/chat/completions", gw.url))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    install(&second_ca.server_cert("gateway").unwrap(), certs.path());
    gw.hang_up().unwrap();
    wait_until("the new certificate in use", || {
        trusted_by(&gw.url, second_ca.cert())
    })
    .await;
    assert!(!trusted_by(&gw.url, first_ca.cert()), "the old one is gone");
    let streamed = stream.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&streamed.stdout);
    assert!(
        streamed.status.success() && text.contains("data: [DONE]"),
        "the stream opened before the reload ran to its end: {}\n{text}\n{}",
        String::from_utf8_lossy(&streamed.stderr),
        gw.log()
    );
    assert!(
        text.contains("\"finish_reason\":\""),
        "the stream ended with its finish reason: {text}"
    );

    // Without a signal, a changed file is noticed on its own; a broken one is not taken.
    std::fs::write(certs.path().join("key.pem"), "not a key").unwrap();
    gw.wait_for_log("TLS certificate not reloaded").await;
    assert!(
        trusted_by(&gw.url, second_ca.cert()),
        "the previous certificate stays"
    );
    install(&first_leaf, certs.path());
    wait_until("the file change noticed", || {
        trusted_by(&gw.url, first_ca.cert())
    })
    .await;
}

struct Provider {
    _server: sluice_e2e::PythonServer,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Provider {
    async fn start(ca: &Ca, api_key: &str, mode: &str, prefix: &str) -> (Provider, u16) {
        Provider::start_with(ca, api_key, mode, prefix, None).await
    }

    /// With `client_ca`, it admits only clients showing a certificate from that CA.
    async fn start_with(
        ca: &Ca,
        api_key: &str,
        mode: &str,
        prefix: &str,
        client_ca: Option<&Path>,
    ) -> (Provider, u16) {
        let dir = tempfile::tempdir().unwrap();
        let leaf = ca.server_cert(&format!("provider-{mode}")).unwrap();
        let log = dir.path().join("requests.jsonl");
        let mut args = vec![
            leaf.cert.into_os_string(),
            leaf.key.into_os_string(),
            api_key.into(),
            mode.into(),
            log.clone().into_os_string(),
            prefix.into(),
        ];
        args.extend(client_ca.map(|ca| ca.as_os_str().to_owned()));
        let server = sluice_e2e::PythonServer::start("hosted_provider.py", &args)
            .await
            .unwrap();
        let port = server.port;
        (
            Provider {
                _server: server,
                log,
                _dir: dir,
            },
            port,
        )
    }

    /// What it received: chat requests (probes of its models list left out).
    fn requests(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(|line| serde_json::from_str::<Value>(line).unwrap())
            .filter(|r| r["method"] == "POST")
            .collect()
    }

    fn every_request(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(|line| serde_json::from_str::<Value>(line).unwrap())
            .collect()
    }
}

const PRICES: &str = r#"
[[prices]]
model = "big-model"
tier = "*"
currency = "USD"
input = "10.00"
output = "30.00"

[[prices]]
model = "sim-chat"
tier = "*"
currency = "USD"
input = "1.00"
output = "2.00"
"#;

fn hosted_backend(port: u16, ca: &Ca, prefix: &str) -> String {
    format!(
        r#"
[[backends]]
name = "hosted"
url = "https://127.0.0.1:{port}{prefix}"
kind = "openai_compatible"
api_key_env = "SLUICE_TEST_PROVIDER_KEY"
ca_file = {ca:?}
headers = {{ "x-provider-project" = "proj-7" }}
model_map = {{ "big-model" = "provider-model" }}
"#,
        ca = ca.cert().display().to_string()
    )
}

async fn chat(gw: &Gateway, key: &str, model: &str) -> reqwest::Response {
    gw.post_raw(
        "/v1/chat/completions",
        Some(key),
        json!({"model": model, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]})
            .to_string(),
    )
    .await
    .unwrap()
}

async fn wait_events(gw: &Gateway, count: usize) -> Vec<Value> {
    for _ in 0..200 {
        let events = gw.billing_export("event").await.unwrap();
        if events.len() >= count {
            return events;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the export never held {count} events:\n{}", gw.log());
}

/// Each gateway this test starts gets a store of its own from `store`.
async fn a_hosted_api_gets_its_own_key_and_falls_back(store: impl Fn() -> StoreKind) {
    let ca = Ca::new("provider-ca").unwrap();
    let provider_key = "sk-provider-0123456789";
    let prefix = "/openai/v1";
    let (serving, port) = Provider::start(&ca, provider_key, "serve", prefix).await;
    let backend = Backend::start().await.unwrap();
    let options = |port: u16| GatewayOptions {
        extra_config: format!(
            "{PRICES}{}\n[fallbacks]\n\"big-model\" = [\"{SIM_MODEL}\"]\n",
            hosted_backend(port, &ca, prefix)
        ),
        env: vec![("SLUICE_TEST_PROVIDER_KEY".into(), provider_key.into())],
        ..GatewayOptions::new(&backend, store())
    };
    let gw = Gateway::start(options(port)).await.unwrap();
    let (_, key) = gw.create_key("hosted-tenant", "free").await.unwrap();

    let answer = chat(&gw, &key, "big-model").await;
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.headers()["x-sluice-backend"], "hosted");
    assert_ne!(
        answer
            .headers()
            .get("x-ratelimit-remaining-requests")
            .map(|v| v.to_str().unwrap()),
        Some("99"),
        "the provider's own limits are not the client's"
    );
    let body: Value = answer.json().await.unwrap();
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "from the hosted provider"
    );
    let received = serving.requests();
    assert_eq!(received.len(), 1, "{received:?}");
    let request = &received[0];
    assert_eq!(request["path"], format!("{prefix}/chat/completions"));
    assert_eq!(request["authorization"], format!("Bearer {provider_key}"));
    assert_eq!(request["host"], format!("127.0.0.1:{port}"));
    assert_eq!(request["extra"], "proj-7");
    assert_eq!(request["body"]["model"], "provider-model");
    for seen in serving.every_request() {
        assert!(
            !seen.to_string().contains(&key),
            "the client's key reached the provider: {seen}"
        );
    }
    assert!(
        !gw.log().contains(provider_key),
        "the provider key is never logged"
    );

    // A provider that answers 429: the request goes to the fallback model, once; the next
    // one does not knock on the provider while its Retry-After runs.
    let (limited, limited_port) = Provider::start(&ca, provider_key, "429", prefix).await;
    let gw = Gateway::start(options(limited_port)).await.unwrap();
    let (_, key) = gw.create_key("hosted-tenant", "free").await.unwrap();
    for _ in 0..2 {
        let answer = chat(&gw, &key, "big-model").await;
        assert_eq!(answer.status(), 200, "{}", gw.log());
        assert_eq!(answer.headers()["x-sluice-backend"], "backend-0");
        let body: Value = answer.json().await.unwrap();
        assert_eq!(body["model"], SIM_MODEL, "the fallback model answered");
    }
    assert_eq!(limited.requests().len(), 1, "backed off after its 429");
    let metrics = gw.admin_metrics().await;
    let fallbacks = metrics
        .lines()
        .find(|line| line.starts_with("sluice_fallbacks_total{"))
        .unwrap_or_default();
    assert!(
        fallbacks.contains("from=\"big-model\"")
            && fallbacks.contains(&format!("to=\"{SIM_MODEL}\""))
            && fallbacks.ends_with(" 2"),
        "{metrics}"
    );
    let events = wait_events(&gw, 2).await;
    for event in &events {
        assert_eq!(event["model"], SIM_MODEL, "{event}");
        assert_eq!(event["backend"], "backend-0", "{event}");
        // Priced as the model that served: 1.00 in and 2.00 out per million tokens.
        let input = event["prompt_tokens"].as_u64().unwrap();
        let output = event["completion_tokens"].as_u64().unwrap();
        let expected = rust_decimal::Decimal::from(input + 2 * output)
            / rust_decimal::Decimal::from(1_000_000);
        let cost: rust_decimal::Decimal = event["cost"].as_str().unwrap().parse().unwrap();
        assert_eq!(cost, expected, "{event}");
    }

    // A provider that finds the prompt longer than its context: the request goes to the
    // fallback model; one that finds a mistake in the request: the client hears it as said.
    for (mode, status) in [("context", 200), ("bad", 400)] {
        let (refusing, refusing_port) = Provider::start(&ca, provider_key, mode, prefix).await;
        let gw = Gateway::start(options(refusing_port)).await.unwrap();
        let (_, key) = gw.create_key("hosted-tenant", "free").await.unwrap();
        let answer = chat(&gw, &key, "big-model").await;
        assert_eq!(answer.status(), status, "{mode}\n{}", gw.log());
        let body: Value = answer.json().await.unwrap();
        match mode {
            "context" => assert_eq!(body["model"], SIM_MODEL, "{body}"),
            _ => assert_eq!(body["error"]["code"], "invalid_value", "{body}"),
        }
        assert_eq!(refusing.requests().len(), 1, "{mode}: asked once");
    }

    // Every target down: one clear 503.
    drop(backend);
    let refused = chat(&gw, &key, "big-model").await;
    assert_eq!(refused.status(), 503);
    let (kind, _code, message) = sluice_e2e::openai_error(refused).await.unwrap();
    assert!(!message.is_empty() && !kind.is_empty(), "{message}");
}

#[tokio::test]
async fn a_hosted_api_over_https_gets_its_own_key_and_a_rate_limited_one_falls_back() {
    let data = tempfile::tempdir().unwrap();
    let count = std::sync::atomic::AtomicUsize::new(0);
    a_hosted_api_gets_its_own_key_and_falls_back(|| {
        let n = count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        StoreKind::Embedded(data.path().join(n.to_string()))
    })
    .await;
}

#[tokio::test]
async fn a_hosted_api_over_https_gets_its_own_key_and_falls_back_on_redis() {
    a_hosted_api_gets_its_own_key_and_falls_back(StoreKind::fresh_redis).await;
}

/// Sluice in front of Sluice: the inner one on HTTPS with HTTP/2, the outer one speaking
/// HTTP/2 to it with the inner one's key (never its client's), answers and streams.
#[tokio::test]
async fn a_backend_over_http2_and_one_that_asks_for_a_client_certificate() {
    let ca = Ca::new("inner-ca").unwrap();
    let certs = tempfile::tempdir().unwrap();
    install(&ca.server_cert("inner").unwrap(), certs.path());
    let backend = Backend::start().await.unwrap();
    let inner_data = tempfile::tempdir().unwrap();
    let inner = Gateway::start(GatewayOptions {
        server_config: tls_section(certs.path()),
        ..GatewayOptions::new(&backend, StoreKind::Embedded(inner_data.path().to_owned()))
    })
    .await
    .unwrap();
    let (inner_key_id, inner_key) = inner.create_key("outer-gateway", "pro").await.unwrap();
    let outer_data = tempfile::tempdir().unwrap();
    let outer = Gateway::start(GatewayOptions {
        backends: Vec::new(),
        extra_config: format!(
            r#"{PRICES}
[[backends]]
name = "inner"
url = "{url}"
ca_file = {ca:?}
http2 = true
api_key_env = "SLUICE_TEST_INNER_KEY"
models = ["{SIM_MODEL}"]
"#,
            url = inner.url,
            ca = ca.cert().display().to_string()
        ),
        env: vec![("SLUICE_TEST_INNER_KEY".into(), inner_key.clone())],
        ..GatewayOptions::new(&backend, StoreKind::Embedded(outer_data.path().to_owned()))
    })
    .await
    .unwrap();
    let (_, outer_key) = outer.create_key("customer", "pro").await.unwrap();
    let answer = chat(&outer, &outer_key, SIM_MODEL).await;
    assert_eq!(answer.status(), 200, "{}\n{}", outer.log(), inner.log());
    assert_eq!(answer.headers()["x-sluice-backend"], "inner");
    // The answer came over HTTP/2 and was held until its usage was read: its header says
    // what it cost (1.00 in and 2.00 out per million tokens).
    let cost: rust_decimal::Decimal = answer.headers()["x-sluice-cost"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let body: Value = answer.json().await.unwrap();
    let usage = &body["usage"];
    let billed =
        usage["prompt_tokens"].as_u64().unwrap() + 2 * usage["completion_tokens"].as_u64().unwrap();
    assert!(billed > 0, "{body}");
    assert_eq!(
        cost,
        rust_decimal::Decimal::from(billed) / rust_decimal::Decimal::from(1_000_000),
        "{body}"
    );
    let streamed = outer
        .post_raw(
            "/v1/chat/completions",
            Some(&outer_key),
            json!({"model": SIM_MODEL, "stream": true, "max_tokens": 8,
                   "messages": [{"role": "user", "content": "hi"}]})
            .to_string(),
        )
        .await
        .unwrap();
    assert_eq!(streamed.status(), 200);
    let text = streamed.text().await.unwrap();
    assert!(text.contains("data: [DONE]"), "{text}");
    // The inner gateway served both over HTTP/2, to its own key (its access log is written
    // in batches, within moments).
    let chats = || -> Vec<Value> {
        let mut lines = inner.access_log();
        lines.retain(|line| line["model"] == SIM_MODEL);
        lines
    };
    wait_until("the inner access log", || chats().len() >= 2).await;
    let inner_log = inner.log();
    let served = chats();
    assert_eq!(served.len(), 2, "{inner_log}");
    for line in &served {
        assert_eq!(line["protocol"], "HTTP/2", "{line}");
        assert_eq!(line["key_id"], inner_key_id.as_str(), "{line}");
        assert_eq!(line["status"], 200, "{line}");
    }
    assert!(!inner_log.contains(&outer_key));

    // A provider that asks for a client certificate: shown one from its CA, it serves;
    // without one, the handshake fails and the client gets a clear 502.
    let client_ca = Ca::new("client-ca").unwrap();
    let client = client_ca.client_cert("gateway").unwrap();
    let provider_key = "sk-provider-mtls-0123456789";
    let (provider, port) =
        Provider::start_with(&ca, provider_key, "serve", "/v1", Some(client_ca.cert())).await;
    for (with_cert, status) in [(true, 200), (false, 502)] {
        let cert_lines = if with_cert {
            format!(
                "client_cert_file = {:?}\nclient_key_file = {:?}\n",
                client.cert.display().to_string(),
                client.key.display().to_string()
            )
        } else {
            String::new()
        };
        let data = tempfile::tempdir().unwrap();
        let gw = Gateway::start(GatewayOptions {
            backends: Vec::new(),
            extra_config: format!(
                "[[backends]]\nname = \"mtls\"\nurl = \"https://127.0.0.1:{port}/v1\"\nkind = \"openai_compatible\"\nca_file = {:?}\napi_key_env = \"SLUICE_TEST_PROVIDER_KEY\"\nmodel_map = {{ \"big-model\" = \"provider-model\" }}\n{cert_lines}",
                ca.cert().display().to_string()
            ),
            env: vec![("SLUICE_TEST_PROVIDER_KEY".into(), provider_key.into())],
            ..GatewayOptions::new(&backend, StoreKind::Embedded(data.path().to_owned()))
        })
        .await
        .unwrap();
        let (_, key) = gw.create_key("mtls-tenant", "pro").await.unwrap();
        let answer = chat(&gw, &key, "big-model").await;
        assert_eq!(
            answer.status(),
            status,
            "with_cert={with_cert}\n{}",
            gw.log()
        );
        if !with_cert {
            let (_, _, message) = sluice_e2e::openai_error(answer).await.unwrap();
            assert!(message.contains("mtls"), "{message}");
        }
    }
    assert_eq!(
        provider.requests().len(),
        1,
        "only the gateway with the certificate got in"
    );
}

/// A backend spoken to over HTTP/2 (here a Sluice on HTTPS in front of a hosted API) that
/// finds the prompt longer than the model's context: the request goes to the fallback
/// model, the client never sees the refusal; a bad request still reaches it as said.
#[tokio::test]
async fn a_context_length_refusal_over_http2_goes_to_the_fallback_model() {
    let ca = Ca::new("inner-ca").unwrap();
    let certs = tempfile::tempdir().unwrap();
    install(&ca.server_cert("inner").unwrap(), certs.path());
    let backend = Backend::start().await.unwrap();
    let provider_key = "sk-provider-h2-0123456789";
    for (mode, status) in [("context", 200), ("bad", 400)] {
        let (provider, port) = Provider::start(&ca, provider_key, mode, "/v1").await;
        let inner_data = tempfile::tempdir().unwrap();
        let inner = Gateway::start(GatewayOptions {
            server_config: tls_section(certs.path()),
            backends: Vec::new(),
            extra_config: hosted_backend(port, &ca, "/v1"),
            env: vec![("SLUICE_TEST_PROVIDER_KEY".into(), provider_key.into())],
            ..GatewayOptions::new(&backend, StoreKind::Embedded(inner_data.path().to_owned()))
        })
        .await
        .unwrap();
        let (_, inner_key) = inner.create_key("outer-gateway", "pro").await.unwrap();
        let outer_data = tempfile::tempdir().unwrap();
        let outer = Gateway::start(GatewayOptions {
            extra_config: format!(
                r#"{PRICES}
[[backends]]
name = "inner"
url = "{url}"
ca_file = {ca:?}
http2 = true
api_key_env = "SLUICE_TEST_INNER_KEY"
models = ["big-model"]

[fallbacks]
"big-model" = ["{SIM_MODEL}"]
"#,
                url = inner.url,
                ca = ca.cert().display().to_string()
            ),
            env: vec![("SLUICE_TEST_INNER_KEY".into(), inner_key.clone())],
            ..GatewayOptions::new(&backend, StoreKind::Embedded(outer_data.path().to_owned()))
        })
        .await
        .unwrap();
        let (_, key) = outer.create_key("customer", "pro").await.unwrap();
        let answer = chat(&outer, &key, "big-model").await;
        assert_eq!(
            answer.status(),
            status,
            "{mode}\n{}\n{}",
            outer.log(),
            inner.log()
        );
        let served_by = answer.headers().get("x-sluice-backend").cloned();
        let body: Value = answer.json().await.unwrap();
        match mode {
            "context" => {
                assert_eq!(body["model"], SIM_MODEL, "{body}");
                assert_eq!(served_by.unwrap(), "backend-0");
            }
            _ => assert_eq!(body["error"]["code"], "invalid_value", "{body}"),
        }
        assert_eq!(provider.requests().len(), 1, "{mode}: asked once");
        // The inner gateway was spoken to over HTTP/2.
        let asked = || {
            inner
                .access_log()
                .into_iter()
                .find(|line| line["model"] == "big-model")
        };
        wait_until("the inner access log", || asked().is_some()).await;
        let line = asked().unwrap();
        assert_eq!(line["protocol"], "HTTP/2", "{line}");
        assert_eq!(line["status"], 400, "{line}");
    }
}

/// The admin listener on TLS with `admin_client_ca_file`: only a client showing a
/// certificate from that CA completes the handshake, and it still needs the admin token.
#[tokio::test]
async fn the_admin_listener_admits_only_client_certificates_from_its_ca_and_still_wants_the_token()
{
    let server_ca = Ca::new("server-ca").unwrap();
    let operators = Ca::new("operators-ca").unwrap();
    let strangers = Ca::new("strangers-ca").unwrap();
    let certs = tempfile::tempdir().unwrap();
    install(&server_ca.server_cert("gateway").unwrap(), certs.path());
    let backend = Backend::start().await.unwrap();
    let data = tempfile::tempdir().unwrap();
    let gw = Gateway::start(GatewayOptions {
        server_config: format!(
            "[server.tls]\ncert_file = {:?}\nkey_file = {:?}\nadmin_client_ca_file = {:?}\n",
            certs.path().join("cert.pem").display().to_string(),
            certs.path().join("key.pem").display().to_string(),
            operators.cert().display().to_string(),
        ),
        ..GatewayOptions::new(&backend, StoreKind::Embedded(data.path().to_owned()))
    })
    .await
    .unwrap();
    assert!(gw.admin_url.starts_with("https://"));
    let operator = operators.client_cert("operator").unwrap();
    let stranger = strangers.client_cert("stranger").unwrap();
    // (client certificate, admin token) -> the HTTP status, or None when the handshake fails.
    let admin = |cert: Option<&sluice_e2e::tls::Leaf>, token: bool| {
        let mut curl = Command::new("curl");
        curl.args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "10",
        ])
        .arg("--cacert")
        .arg(server_ca.cert());
        if let Some(leaf) = cert {
            curl.arg("--cert")
                .arg(&leaf.cert)
                .arg("--key")
                .arg(&leaf.key);
        }
        if token {
            curl.args([
                "-H",
                &format!("authorization: Bearer {}", sluice_e2e::ADMIN_TOKEN),
            ]);
        }
        let out = curl
            .arg(format!("{}/admin/v1/keys", gw.admin_url))
            .output()
            .unwrap();
        let code = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        (out.status.success() && code != "000").then_some(code)
    };
    assert_eq!(admin(Some(&operator), true).as_deref(), Some("200"));
    assert_eq!(admin(Some(&operator), false).as_deref(), Some("401"));
    assert_eq!(
        admin(None, true),
        None,
        "no client certificate: no handshake"
    );
    assert_eq!(
        admin(Some(&stranger), true),
        None,
        "another CA's: no handshake"
    );
    // The proxy listener asks no client certificate.
    assert!(trusted_by(&gw.url, server_ca.cert()));

    // The CLI's exports reach it with the operators' certificate and the server's CA, and
    // say why when either is missing. First a key and one answer (both listeners are on
    // TLS, which this harness's plain client does not speak: curl does it).
    let curl = |url: String, bearer: &str, body: Value, client: bool| -> Value {
        let mut curl = Command::new("curl");
        curl.args(["-sf", "--max-time", "10", "--cacert"])
            .arg(server_ca.cert())
            .args(["-H", &format!("authorization: Bearer {bearer}")])
            .args([
                "-H",
                "content-type: application/json",
                "-d",
                &body.to_string(),
            ]);
        if client {
            curl.arg("--cert")
                .arg(&operator.cert)
                .arg("--key")
                .arg(&operator.key);
        }
        let out = curl.arg(url).output().unwrap();
        assert!(out.status.success(), "{out:?}");
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let created = curl(
        format!("{}/admin/v1/keys", gw.admin_url),
        sluice_e2e::ADMIN_TOKEN,
        json!({"name": "cli", "tenant": "cli-tenant", "tier": "pro"}),
        true,
    );
    let key = created["key"].as_str().unwrap();
    let answer = curl(
        format!("{}/v1/chat/completions", gw.url),
        key,
        json!({"model": SIM_MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}),
        false,
    );
    assert_eq!(answer["object"], "chat.completion", "{answer}");
    let export = |cert: Option<&sluice_e2e::tls::Leaf>, ca: bool| {
        let out = tempfile::tempdir().unwrap();
        let file = out.path().join("usage.jsonl");
        let mut cli = Command::new(sluice_e2e::binary("sluice"));
        cli.args([
            "billing",
            "export",
            "--group-by",
            "event",
            "--format",
            "jsonl",
            "--admin-url",
        ])
        .arg(&gw.admin_url)
        .arg("-o")
        .arg(&file)
        .env("SLUICE_ADMIN_TOKEN", sluice_e2e::ADMIN_TOKEN);
        if ca {
            cli.arg("--ca-file").arg(server_ca.cert());
        }
        if let Some(leaf) = cert {
            cli.arg("--client-cert")
                .arg(&leaf.cert)
                .arg("--client-key")
                .arg(&leaf.key);
        }
        let run = cli.output().unwrap();
        let text = std::fs::read_to_string(&file).ok();
        (
            run.status.success(),
            text,
            String::from_utf8_lossy(&run.stderr).into_owned(),
        )
    };
    let mut rows = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while rows.is_empty() {
        let (ok, text, stderr) = export(Some(&operator), true);
        assert!(ok, "{stderr}");
        rows = text
            .unwrap()
            .lines()
            .map(|line| serde_json::from_str::<Value>(line).unwrap())
            .collect();
        assert!(
            Instant::now() < deadline,
            "the answer never reached the export"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["tenant"], "cli-tenant", "{rows:?}");
    let (ok, text, stderr) = export(None, true);
    assert!(!ok && text.is_none(), "no client certificate: {stderr}");
    assert!(stderr.contains(&gw.admin_url), "{stderr}");
    let (ok, text, stderr) = export(Some(&operator), false);
    assert!(
        !ok && text.is_none(),
        "a server the system's roots do not know: {stderr}"
    );
}

/// `[server] h2c = true`: HTTP/2 without TLS for clients that know it (prior knowledge),
/// streams included, and HTTP/1.1 still served on the same port.
#[tokio::test]
async fn cleartext_http2_when_configured_beside_http1() {
    let backend = Backend::start().await.unwrap();
    let data = tempfile::tempdir().unwrap();
    let gw = Gateway::start(GatewayOptions {
        server_config: "h2c = true\n".into(),
        ..GatewayOptions::new(&backend, StoreKind::Embedded(data.path().to_owned()))
    })
    .await
    .unwrap();
    let (_, key) = gw.create_key("h2c-tenant", "pro").await.unwrap();
    let body = json!({"model": SIM_MODEL, "stream": true, "max_tokens": 8,
        "messages": [{"role": "user", "content": "hi"}]});
    let out = Command::new("curl")
        .args([
            "-sS",
            "--http2-prior-knowledge",
            "-w",
            "\nversion=%{http_version}",
            "--max-time",
            "20",
        ])
        .args(["-H", &format!("authorization: Bearer {key}")])
        .args([
            "-H",
            "content-type: application/json",
            "-d",
            &body.to_string(),
        ])
        .arg(format!("{}/v1/chat/completions", gw.url))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.ends_with("version=2"), "{text}");
    assert!(text.contains("data: [DONE]"), "{text}");
    // The harness's own client speaks HTTP/1.1 to the same listener.
    let plain = chat(&gw, &key, SIM_MODEL).await;
    assert_eq!(plain.status(), 200);
    assert_eq!(plain.version(), reqwest::Version::HTTP_11);
}

/// A hosted API added through the admin API with the same options as a `[[backends]]` entry
/// (its key named, its CA, a model map, a path, fixed headers): every replica serves it, to
/// the provider's key and never the client's; bad options are a 400 naming the field.
async fn a_hosted_api_added_at_run_time(store: StoreKind, replicas: usize) {
    let ca = Ca::new("provider-ca").unwrap();
    let provider_key = "sk-provider-added-0123456789";
    let prefix = "/openai/v1";
    let (provider, port) = Provider::start(&ca, provider_key, "serve", prefix).await;
    let backend = Backend::start().await.unwrap();
    let mut gateways = Vec::new();
    for _ in 0..replicas {
        gateways.push(
            Gateway::start(GatewayOptions {
                extra_config: PRICES.to_owned(),
                env: vec![("SLUICE_TEST_PROVIDER_KEY".into(), provider_key.into())],
                ..GatewayOptions::new(&backend, store.clone())
            })
            .await
            .unwrap(),
        );
    }
    let admin = &gateways[0];
    let spec = json!({
        "name": "hosted-added",
        "url": format!("https://127.0.0.1:{port}{prefix}"),
        "kind": "openai_compatible",
        "api_key_env": "SLUICE_TEST_PROVIDER_KEY",
        "ca_file": ca.cert().display().to_string(),
        "headers": {"x-provider-project": "proj-9"},
        "model_map": {"big-model": "provider-model"},
        "priority": 1,
    });

    // Mistakes are the request's 400, naming the field; nothing is added.
    let mut relative_ca = spec.clone();
    relative_ca["ca_file"] = json!("certs/ca.pem");
    let mut unset_key = spec.clone();
    unset_key["api_key_env"] = json!("SLUICE_TEST_NO_SUCH_VARIABLE");
    let mut key_in_headers = spec.clone();
    key_in_headers["headers"] = json!({"Authorization": "Bearer sk-in-the-clear"});
    let mut a_key_itself = spec.clone();
    a_key_itself["api_key"] = json!(provider_key);
    let mut tls_on_plain = spec.clone();
    tls_on_plain["url"] = json!(format!("http://127.0.0.1:{port}{prefix}"));
    for (body, param) in [
        (relative_ca, Some("ca_file")),
        (unset_key, Some("api_key_env")),
        (key_in_headers, Some("headers")),
        (a_key_itself, None),
        (tls_on_plain, Some("ca_file")),
    ] {
        let (status, answer) = admin
            .admin_json(
                reqwest::Method::POST,
                "/admin/v1/backends",
                Some(body.clone()),
            )
            .await;
        assert_eq!(status, 400, "{body}: {answer}");
        assert_eq!(answer["error"]["type"], "invalid_request_error", "{answer}");
        if let Some(param) = param {
            assert_eq!(answer["error"]["param"], param, "{body}: {answer}");
        }
        assert!(
            !answer.to_string().contains(provider_key),
            "a key is never echoed: {answer}"
        );
    }
    let (_, pool) = admin
        .admin(reqwest::Method::GET, "/admin/v1/backends")
        .await
        .unwrap();
    assert_eq!(pool["data"].as_array().unwrap().len(), 1, "{pool}");

    let (status, added) = admin
        .admin_json(reqwest::Method::POST, "/admin/v1/backends", Some(spec))
        .await;
    assert_eq!(status, 201, "{added}\n{}", admin.log());
    assert_eq!(added["kind"], "openai_compatible", "{added}");
    assert_eq!(added["priority"], 1, "{added}");
    assert_eq!(added["api_key"], true, "{added}");
    assert_eq!(added["model_map"]["big-model"], "provider-model", "{added}");
    assert!(!added.to_string().contains(provider_key), "{added}");

    let (_, key) = admin.create_key("hosted-tenant", "pro").await.unwrap();
    for gw in &gateways {
        // Other replicas apply the change within a second or so.
        let mut answer = chat(gw, &key, "big-model").await;
        let deadline = Instant::now() + Duration::from_secs(10);
        while answer.status() != 200 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
            answer = chat(gw, &key, "big-model").await;
        }
        assert_eq!(answer.status(), 200, "{}", gw.log());
        assert_eq!(answer.headers()["x-sluice-backend"], "hosted-added");
        let body: Value = answer.json().await.unwrap();
        assert_eq!(
            body["choices"][0]["message"]["content"],
            "from the hosted provider"
        );
        assert!(!gw.log().contains(provider_key), "the key is never logged");
    }
    let received = provider.requests();
    assert_eq!(received.len(), replicas, "{received:?}");
    for request in &received {
        assert_eq!(request["path"], format!("{prefix}/chat/completions"));
        assert_eq!(request["authorization"], format!("Bearer {provider_key}"));
        assert_eq!(request["extra"], "proj-9");
        assert_eq!(request["body"]["model"], "provider-model");
    }
    for seen in provider.every_request() {
        assert!(!seen.to_string().contains(&key), "{seen}");
    }

    // Taken out again: the model is gone on every replica.
    let (status, _) = admin
        .admin_json(
            reqwest::Method::DELETE,
            "/admin/v1/backends/hosted-added",
            None,
        )
        .await;
    assert_eq!(status, 200);
    for gw in &gateways {
        let deadline = Instant::now() + Duration::from_secs(10);
        while chat(gw, &key, "big-model").await.status() != 404 {
            assert!(Instant::now() < deadline, "still served:\n{}", gw.log());
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

#[tokio::test]
async fn a_hosted_api_added_through_the_admin_api_on_the_embedded_store() {
    let data = tempfile::tempdir().unwrap();
    a_hosted_api_added_at_run_time(StoreKind::Embedded(data.path().to_owned()), 1).await;
}

#[tokio::test]
async fn a_hosted_api_added_through_the_admin_api_reaches_every_replica_on_redis() {
    a_hosted_api_added_at_run_time(StoreKind::fresh_redis(), 2).await;
}
