//! Balancing and failover across real backend processes: a backend that dies costs clients
//! nothing, health follows it down and up again, and load-aware strategies steer traffic away
//! from a slow backend.

use futures::StreamExt;
use serde_json::{json, Value};
use sluice_e2e::{Backend, Gateway, GatewayOptions, StoreKind, SIM_MODEL};
use std::collections::HashMap;
use std::time::{Duration, Instant};

fn chat() -> String {
    json!({"model": SIM_MODEL, "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]})
        .to_string()
}

async fn gateway(backends: &[&Backend], balancer: &str, dir: &tempfile::TempDir) -> Gateway {
    Gateway::start(GatewayOptions {
        backends: backends.iter().map(|b| b.url.clone()).collect(),
        extra_config: format!("[balancer]\n{balancer}\n"),
        ..GatewayOptions::new(backends[0], StoreKind::Embedded(dir.path().to_owned()))
    })
    .await
    .unwrap()
}

/// Sends `count` requests, `concurrency` at a time; returns (status, backend) of each.
async fn load(gw: &Gateway, key: &str, count: usize, concurrency: usize) -> Vec<(u16, String)> {
    let run = futures::stream::iter(0..count)
        .map(|_| async {
            let r = gw
                .post_raw("/v1/chat/completions", Some(key), chat())
                .await
                .unwrap();
            let backend = r
                .headers()
                .get("x-sluice-backend")
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default();
            (r.status().as_u16(), backend)
        })
        .buffer_unordered(concurrency)
        .collect();
    match tokio::time::timeout(Duration::from_secs(30), run).await {
        Ok(answers) => answers,
        Err(_) => panic!("requests hung:\n{}", gw.log_without("model discovery")),
    }
}

async fn backend_health(gw: &Gateway, name: &str) -> String {
    let (_, v) = gw
        .admin(reqwest::Method::GET, "/admin/v1/backends")
        .await
        .unwrap();
    v["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == name)
        .map(|b| b["health"].as_str().unwrap().to_owned())
        .unwrap()
}

async fn wait_health(gw: &Gateway, name: &str, want: &str, within: Duration) {
    let deadline = Instant::now() + within;
    while backend_health(gw, name).await != want {
        assert!(Instant::now() < deadline, "{name} did not become {want}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_backend_killed_mid_run_costs_clients_nothing_and_returns_when_restarted() {
    let delay = ["--sim-ttft-ms", "5", "--sim-token-delay-ms", "2"];
    let a = Backend::start_with(&delay).await.unwrap();
    let b = Backend::start_with(&delay).await.unwrap();
    let c = Backend::start_with(&delay).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway(
        &[&a, &b, &c],
        "strategy = \"round_robin\"\nhealth_interval_ms = 200\nretries = 2",
        &dir,
    )
    .await;
    let (_, key) = gw.create_key("acme", "enterprise").await.unwrap();
    let b_port = b.port;

    let (before, (), after) = tokio::join!(
        load(&gw, &key, 150, 6),
        async {
            tokio::time::sleep(Duration::from_millis(150)).await;
            drop(b); // killed mid-run, with requests in flight to it
        },
        async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            load(&gw, &key, 150, 6).await
        }
    );
    let all: Vec<&(u16, String)> = before.iter().chain(after.iter()).collect();
    let failed: Vec<_> = all.iter().filter(|(s, _)| *s != 200).collect();
    assert!(
        failed.is_empty(),
        "clients saw failures: {failed:?}\n{}",
        gw.log()
    );

    // Two failed checks at 200 ms mark it down.
    wait_health(&gw, "backend-1", "down", Duration::from_secs(2)).await;
    let served: Vec<_> = load(&gw, &key, 30, 3).await;
    assert!(served.iter().all(|(s, b)| *s == 200 && b != "backend-1"));

    let _b = Backend::start_on(b_port, &delay).await.unwrap();
    wait_health(&gw, "backend-1", "up", Duration::from_secs(3)).await;
    let served = load(&gw, &key, 30, 3).await;
    assert!(
        served.iter().any(|(_, b)| b == "backend-1"),
        "the restarted backend gets traffic again"
    );
}

#[tokio::test]
async fn load_aware_strategies_send_a_slow_backend_less_than_round_robin() {
    let slow = Backend::start_with(&["--sim-ttft-ms", "60"]).await.unwrap();
    let fast1 = Backend::start().await.unwrap();
    let fast2 = Backend::start().await.unwrap();
    let mut share = HashMap::new();
    for strategy in ["round_robin", "least_outstanding", "p2c", "load_aware"] {
        let dir = tempfile::tempdir().unwrap();
        let gw = gateway(
            &[&slow, &fast1, &fast2],
            &format!("strategy = \"{strategy}\""),
            &dir,
        )
        .await;
        let (_, key) = gw.create_key("acme", "enterprise").await.unwrap();
        // Warm the latency estimates, then measure.
        load(&gw, &key, 30, 6).await;
        let answers = load(&gw, &key, 150, 6).await;
        assert!(answers.iter().all(|(s, _)| *s == 200));
        let to_slow = answers.iter().filter(|(_, b)| b == "backend-0").count();
        share.insert(strategy, to_slow);
        if strategy == "load_aware" {
            // What the strategy read is shown: each backend's last /metrics report.
            let (_, list) = gw
                .admin(reqwest::Method::GET, "/admin/v1/backends")
                .await
                .unwrap();
            for backend in list["data"].as_array().unwrap() {
                let scrape = &backend["last_scrape"];
                assert!(scrape["running"].is_u64(), "{backend}");
                assert!(scrape["age_ms"].as_u64().unwrap() < 5_000, "{backend}");
            }
        }
    }
    let rr = share["round_robin"];
    assert!(
        (45..=55).contains(&rr),
        "round robin gives each backend a third: {share:?}"
    );
    assert!(
        share["least_outstanding"] * 10 < rr * 6,
        "least outstanding: {share:?}"
    );
    assert!(share["p2c"] * 10 < rr * 6, "p2c: {share:?}");
    assert!(share["load_aware"] * 10 < rr * 6, "load aware: {share:?}");
}

fn chat_with_system(system: &str, question: usize) -> String {
    json!({"model": SIM_MODEL, "max_tokens": 2, "messages": [
        {"role": "system", "content": system},
        {"role": "user", "content": format!("question {question}")}
    ]})
    .to_string()
}

#[tokio::test]
async fn prefix_affinity_keeps_a_shared_prompt_on_one_backend_until_its_load_bound() {
    let delay = ["--sim-ttft-ms", "40"];
    let a = Backend::start_with(&delay).await.unwrap();
    let b = Backend::start_with(&delay).await.unwrap();
    let c = Backend::start_with(&delay).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway(&[&a, &b, &c], "strategy = \"prefix_affinity\"", &dir).await;
    let (_, key) = gw.create_key("acme", "enterprise").await.unwrap();
    let system = "You are the support assistant of a canal company. ".repeat(12);

    let send = |i: usize| {
        let body = chat_with_system(&system, i);
        let (gw, key) = (&gw, &key);
        async move {
            let r = gw
                .post_raw("/v1/chat/completions", Some(key), body)
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            r.headers()["x-sluice-backend"].to_str().unwrap().to_owned()
        }
    };
    // One at a time: every request with the shared prefix lands on the same backend.
    let mut one_by_one = Vec::new();
    for i in 0..12 {
        one_by_one.push(send(i).await);
    }
    assert!(
        one_by_one.iter().all(|b| *b == one_by_one[0]),
        "{one_by_one:?}"
    );

    // Twelve at once: past the load bound the same prefix spills to other backends.
    let together: Vec<String> = futures::stream::iter(0..12)
        .map(send)
        .buffer_unordered(12)
        .collect()
        .await;
    let distinct: std::collections::HashSet<_> = together.iter().collect();
    assert!(distinct.len() > 1, "no spill-over under load: {together:?}");
    let home = together.iter().filter(|b| **b == one_by_one[0]).count();
    assert!(
        home >= 4,
        "the prefix's backend still takes the biggest share: {together:?}"
    );
}

#[tokio::test]
async fn a_drained_backend_finishes_its_streams_and_gets_no_new_requests() {
    let a = Backend::start().await.unwrap();
    let b = Backend::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway(&[&a, &b], "strategy = \"round_robin\"", &dir).await;
    let (_, key) = gw.create_key("acme", "enterprise").await.unwrap();

    // A stream held open by its backend after the first token.
    let gate = format!("drain-{}", uuid::Uuid::new_v4().simple());
    let body = json!({"model": SIM_MODEL, "stream": true, "max_tokens": 5, "user": format!("sim-gate:{gate}"),
                      "messages": [{"role": "user", "content": "stream please"}]});
    let r = gw
        .post_raw("/v1/chat/completions", Some(&key), body.to_string())
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let streaming_on = r.headers()["x-sluice-backend"].to_str().unwrap().to_owned();
    let (held, other) = if streaming_on == "backend-0" {
        (&a, "backend-1")
    } else {
        (&b, "backend-0")
    };
    let mut stream = r.bytes_stream();
    let first = stream.next().await.unwrap().unwrap();
    assert!(!first.is_empty());

    let drain_path = format!("/admin/v1/backends/{streaming_on}/drain");
    let (status, _) = gw.admin(reqwest::Method::POST, &drain_path).await.unwrap();
    assert_eq!(status, 200);

    let after = load(&gw, &key, 12, 3).await;
    assert!(
        after.iter().all(|(s, b)| *s == 200 && b == other),
        "new requests avoid the drained backend: {after:?}"
    );

    // The in-flight stream still finishes on the drained backend.
    assert_eq!(held.open_gate(&gate).await.unwrap(), 1);
    let mut text = String::from_utf8_lossy(&first).into_owned();
    while let Some(chunk) = stream.next().await {
        text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
    }
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");

    let (status, _) = gw
        .admin(reqwest::Method::DELETE, &drain_path)
        .await
        .unwrap();
    assert_eq!(status, 200);
    let back = load(&gw, &key, 12, 3).await;
    assert!(
        back.iter().any(|(_, b)| *b == streaming_on),
        "back in service: {back:?}"
    );
}

#[tokio::test]
async fn an_alias_routes_each_tier_to_its_own_model() {
    let backend = Backend::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(GatewayOptions {
        extra_config: "[aliases.chat]\nfree = \"sim-embed\"\n\"*\" = \"sim-chat\"\n".to_owned(),
        ..GatewayOptions::new(&backend, StoreKind::Embedded(dir.path().to_owned()))
    })
    .await
    .unwrap();
    let (_, free) = gw.create_key("acme", "free").await.unwrap();
    let (_, enterprise) = gw.create_key("acme", "enterprise").await.unwrap();
    let body =
        json!({"model": "chat", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
            .to_string();
    for (key, model) in [(&free, "sim-embed"), (&enterprise, "sim-chat")] {
        let r = gw
            .post_raw("/v1/chat/completions", Some(key), body.clone())
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        assert_eq!(
            v["model"], model,
            "the backend was asked for the tier's model"
        );
    }
    let models = gw.get_json("/v1/models", &free).await.unwrap();
    assert!(models["data"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["id"] == "chat"));
}

async fn pool(gw: &Gateway) -> Vec<String> {
    let (_, v) = gw
        .admin(reqwest::Method::GET, "/admin/v1/backends")
        .await
        .unwrap();
    v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap().to_owned())
        .collect()
}

async fn wait_pool(gw: &Gateway, want: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let names = pool(gw).await;
        if names == want {
            return;
        }
        assert!(Instant::now() < deadline, "pool is {names:?}, not {want:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn admin_json(
    gw: &Gateway,
    method: reqwest::Method,
    path: &str,
    body: Value,
) -> (u16, Value) {
    let r = gw
        .http
        .request(method, format!("{}{path}", gw.admin_url))
        .bearer_auth(sluice_e2e::ADMIN_TOKEN)
        .json(&body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

#[tokio::test]
async fn backends_added_and_removed_through_one_replica_change_every_replicas_pool() {
    let first = Backend::start().await.unwrap();
    let second = Backend::start().await.unwrap();
    let store = StoreKind::fresh_redis();
    let gw_a = Gateway::start(GatewayOptions::new(&first, store.clone()))
        .await
        .unwrap();
    let gw_b = Gateway::start(GatewayOptions::new(&first, store))
        .await
        .unwrap();
    let (_, key) = gw_a.create_key("acme", "pro").await.unwrap();
    assert_eq!(pool(&gw_b).await, ["backend-0"]);

    let (status, added) = admin_json(
        &gw_a,
        reqwest::Method::POST,
        "/admin/v1/backends",
        json!({"name": "added", "url": second.url}),
    )
    .await;
    assert_eq!(status, 201, "{added}");
    assert_eq!(added["name"], "added");
    assert_eq!(
        added["models"],
        json!([SIM_MODEL, sluice_e2e::SIM_EMBED_MODEL])
    );

    // The other replica takes it into its pool and sends it traffic.
    wait_pool(&gw_b, &["backend-0", "added"]).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let served = load(&gw_b, &key, 20, 4).await;
        assert!(
            served.iter().all(|(status, _)| *status == 200),
            "{served:?}"
        );
        if served.iter().any(|(_, backend)| backend == "added") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the added backend got no traffic: {served:?}"
        );
    }

    // Names are unique; bad URLs are refused with the field named.
    let (status, body) = admin_json(
        &gw_a,
        reqwest::Method::POST,
        "/admin/v1/backends",
        json!({"name": "added", "url": second.url}),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (409, json!("conflict"))
    );
    let (status, body) = admin_json(
        &gw_a,
        reqwest::Method::POST,
        "/admin/v1/backends",
        json!({"name": "bad", "url": "ftp://example"}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], "url");

    // Removed through the second replica (the configured one, even): both pools lose it and
    // no request fails on the way.
    let (status, _) = gw_b
        .admin(reqwest::Method::DELETE, "/admin/v1/backends/backend-0")
        .await
        .unwrap();
    assert_eq!(status, 200);
    wait_pool(&gw_a, &["added"]).await;
    let served = load(&gw_a, &key, 20, 4).await;
    assert!(
        served
            .iter()
            .all(|(status, backend)| *status == 200 && backend == "added"),
        "{served:?}"
    );
    let (status, _) = gw_a
        .admin(reqwest::Method::DELETE, "/admin/v1/backends/nope")
        .await
        .unwrap();
    assert_eq!(status, 404);
}

/// A backend named by a host name follows the name when its address changes (`[balancer]
/// dns_refresh_secs`), without a restart. The gateway runs in a mount namespace of its own
/// whose `/etc/hosts` is a file the test rewrites; the two backends share a port on two
/// loopback addresses.
#[tokio::test]
async fn a_backend_named_by_host_follows_the_name_when_its_address_changes() {
    use std::net::Ipv4Addr;
    let port = sluice_e2e::free_port();
    let first = Backend::start_at(Ipv4Addr::new(127, 0, 0, 1), port, &[])
        .await
        .unwrap();
    let second = Backend::start_at(Ipv4Addr::new(127, 0, 0, 2), port, &[])
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let hosts = dir.path().join("hosts");
    let host = "gpu-pool.sluice.test";
    std::fs::write(&hosts, format!("127.0.0.1 {host}\n")).unwrap();
    let gw = Gateway::start(GatewayOptions {
        backends: Vec::new(),
        extra_config: format!(
            "[balancer]\ndns_refresh_secs = 1\nhealth_interval_ms = 200\n\n[[backends]]\nname = \"named\"\nurl = \"http://{host}:{port}\"\nmodels = [\"{SIM_MODEL}\"]\n"
        ),
        hosts_file: Some(hosts.clone()),
        ..GatewayOptions::new(&first, StoreKind::Embedded(dir.path().join("data")))
    })
    .await
    .unwrap();
    let (_, key) = gw.create_key("dns-tenant", "pro").await.unwrap();
    async fn served(gw: &Gateway, key: &str) -> u16 {
        gw.post_raw("/v1/chat/completions", Some(key), chat())
            .await
            .unwrap()
            .status()
            .as_u16()
    }
    let tokens = "sluice_backend_prompt_tokens_total";
    assert_eq!(served(&gw, &key).await, 200, "{}", gw.log());
    assert!(first.metric(tokens).await.unwrap() > 0);
    assert_eq!(second.metric(tokens).await.unwrap(), 0);

    // The name moves (written in place: the bound file is the same inode); the next lookup
    // takes requests to the new address, and the old one gets no more.
    std::fs::write(&hosts, format!("127.0.0.2 {host}\n")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !gw.log().contains("backend address changed") {
        assert!(Instant::now() < deadline, "never followed:\n{}", gw.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before = first.metric(tokens).await.unwrap();
    for _ in 0..3 {
        assert_eq!(served(&gw, &key).await, 200, "{}", gw.log());
    }
    assert!(
        second.metric(tokens).await.unwrap() > 0,
        "the new address served"
    );
    assert_eq!(
        first.metric(tokens).await.unwrap(),
        before,
        "the old one got nothing"
    );
    let metrics = gw.admin_metrics().await;
    assert!(
        metrics.contains("sluice_backend_address_changes_total{backend=\"named\"} 1"),
        "{metrics}"
    );

    // A name that stops resolving keeps the address in use.
    std::fs::write(&hosts, "").unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !gw.log().contains("backend host name did not resolve") {
        assert!(Instant::now() < deadline, "no failed lookup:\n{}", gw.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(served(&gw, &key).await, 200, "{}", gw.log());
}
