//! A fleet on one machine: three gateways and two simulated backends over a three-node Redis
//! Cluster. One gateway is stopped with SIGTERM mid-load: it finishes what it holds (a stream
//! included), writes its usage events before it exits, and no client request fails that a
//! remaining replica could serve. Revocation reaches the whole fleet.

use futures::StreamExt;
use serde_json::{json, Value};
use sluice_e2e::{Backend, Gateway, GatewayOptions, RedisCluster, StoreKind, SIM_MODEL};
use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

const REQUESTS: usize = 240;

/// Sends one request, starting at gateway `first` and moving to the next when a gateway cannot
/// be reached (as a client behind a load balancer would); the status and request id it ended
/// with.
async fn send(urls: &[String], first: usize, key: &str, id: &str) -> (u16, String) {
    let http = reqwest::Client::new();
    let body = json!({"model": SIM_MODEL, "max_tokens": 3,
                      "messages": [{"role": "user", "content": format!("request {id}")}]});
    for attempt in 0..urls.len() * 2 {
        let url = &urls[(first + attempt) % urls.len()];
        match http
            .post(format!("{url}/v1/chat/completions"))
            .bearer_auth(key)
            .header("x-request-id", id)
            .json(&body)
            .send()
            .await
        {
            Ok(r) => return (r.status().as_u16(), id.to_owned()),
            // Refused or cut before an answer: the request was not served there.
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    (0, id.to_owned())
}

async fn events(gw: &Gateway) -> Vec<Value> {
    gw.billing_export("event").await.unwrap()
}

#[tokio::test]
async fn a_gateway_stopped_mid_load_loses_no_request_and_no_usage_event() {
    let cluster = RedisCluster::start();
    let store = StoreKind::RedisAt {
        url: cluster.url(),
        prefix: format!("fleet-{}", uuid::Uuid::new_v4().simple()),
    };
    let backends = [
        Backend::start_with(&["--sim-ttft-ms", "5"]).await.unwrap(),
        Backend::start_with(&["--sim-ttft-ms", "5"]).await.unwrap(),
    ];
    let mut gateways = Vec::new();
    for _ in 0..3 {
        let mut options = GatewayOptions::new(&backends[0], store.clone());
        options.backends = backends.iter().map(|b| b.url.clone()).collect();
        gateways.push(Gateway::start(options).await.unwrap());
    }
    let urls: Vec<String> = gateways.iter().map(|g| g.url.clone()).collect();
    let (key_id, key) = gateways[0].create_key("acme", "enterprise").await.unwrap();

    // A stream held open on the gateway that will be stopped.
    let stream = gateways[2]
        .http
        .post(format!("{}/v1/chat/completions", gateways[2].url))
        .bearer_auth(&key)
        .header("x-request-id", "held-stream")
        .json(
            &json!({"model": SIM_MODEL, "stream": true, "max_tokens": 4, "user": "sim-gate:fleet",
                      "messages": [{"role": "user", "content": "hold me"}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    let mut chunks = stream.bytes_stream();
    let first = chunks.next().await.unwrap().unwrap();
    assert!(first.starts_with(b"data: "));

    // Load over all three, round robin; the third is stopped a third of the way in.
    let done = AtomicUsize::new(0);
    let stopped = AtomicUsize::new(0);
    let results: Vec<(u16, String)> = futures::stream::iter(0..REQUESTS)
        .map(|i| {
            let (urls, key, done, stopped, gateways) = (&urls, &key, &done, &stopped, &gateways);
            async move {
                if done.load(Ordering::Relaxed) >= REQUESTS / 3
                    && stopped.fetch_add(1, Ordering::Relaxed) == 0
                {
                    gateways[2].terminate().unwrap();
                }
                let answer = send(urls, i % urls.len(), key, &format!("fleet-{i}")).await;
                done.fetch_add(1, Ordering::Relaxed);
                answer
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    let failed: Vec<_> = results.iter().filter(|(s, _)| *s != 200).collect();
    assert!(failed.is_empty(), "failed requests: {failed:?}");

    // The held stream finishes on the stopping gateway.
    let mut released = 0;
    for b in &backends {
        released += b.open_gate("fleet").await.unwrap();
    }
    assert_eq!(released, 1, "the held stream was waiting at its gate");
    let mut rest = Vec::new();
    while let Some(chunk) = chunks.next().await {
        rest.extend_from_slice(&chunk.unwrap());
    }
    assert!(
        String::from_utf8_lossy(&rest).contains("data: [DONE]"),
        "the held stream ended properly"
    );

    let mut stopping = gateways.pop().unwrap();
    let status = stopping.wait_exit(Duration::from_secs(20)).await.unwrap();
    assert!(
        status.is_some_and(|s| s.success()),
        "the stopped gateway exited cleanly: {status:?}\n{}",
        stopping.log()
    );
    assert!(
        stopping.log_contains("usage events flushed"),
        "{}",
        stopping.log()
    );

    // Every answered request (and the stream) has its usage event, whichever gateway served it.
    let mut wanted: HashSet<String> = results.into_iter().map(|(_, id)| id).collect();
    wanted.insert("held-stream".to_owned());
    let mut missing = wanted.clone();
    for _ in 0..100 {
        let recorded: HashSet<String> = events(&gateways[0])
            .await
            .into_iter()
            .filter(|e| e["key_id"] == key_id.as_str())
            .filter_map(|e| e["request_id"].as_str().map(str::to_owned))
            .collect();
        missing = wanted.difference(&recorded).cloned().collect();
        if missing.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(missing.is_empty(), "usage events lost for {missing:?}");

    // Revocation through one replica holds on the others.
    gateways[0].revoke_key(&key_id).await.unwrap();
    for gw in &gateways[1..] {
        let mut status = 0;
        for _ in 0..50 {
            status = gw
                .post_raw(
                    "/v1/chat/completions",
                    Some(&key),
                    json!({"model": SIM_MODEL, "messages": [{"role": "user", "content": "x"}]})
                        .to_string(),
                )
                .await
                .unwrap()
                .status()
                .as_u16();
            if status == 401 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(status, 401, "the revoked key still works on {}", gw.url);
    }
}

/// Sums a field over rows of an export.
fn total(rows: &[Value], field: &str) -> u64 {
    rows.iter().map(|r| r[field].as_u64().unwrap()).sum()
}

/// Three gateways on a Redis Cluster write into one PostgreSQL ledger under load, while the
/// whole cluster and then PostgreSQL are killed and started again mid-run. Every request
/// that was answered is billed once: the ledger's export equals the backends' own token
/// counters exactly, no event is there twice, and raw events and rollups agree.
#[tokio::test]
async fn a_fleet_bills_into_one_ledger_through_redis_and_postgres_restarts() {
    const LOAD: usize = 600;
    let mut cluster = RedisCluster::start();
    let mut postgres = sluice_e2e::postgres::OwnPostgres::start();
    let db = sluice_e2e::postgres::PgDatabase::create_on(&postgres.url());
    let store = StoreKind::RedisAt {
        url: cluster.url(),
        prefix: format!("ledger-fleet-{}", uuid::Uuid::new_v4().simple()),
    };
    let backends = [
        Backend::start_with(&["--sim-token-delay-ms", "1"])
            .await
            .unwrap(),
        Backend::start_with(&["--sim-token-delay-ms", "1"])
            .await
            .unwrap(),
    ];
    let mut gateways = Vec::new();
    for _ in 0..3 {
        let mut options = GatewayOptions::new(&backends[0], store.clone());
        options.backends = backends.iter().map(|b| b.url.clone()).collect();
        options.extra_config = format!("[billing]\npostgres_url = {:?}\n", db.url);
        gateways.push(Gateway::start(options).await.unwrap());
    }
    let urls: Vec<String> = gateways.iter().map(|g| g.url.clone()).collect();
    let (key_id, key) = gateways[0].create_key("acme", "enterprise").await.unwrap();

    // Chaos by progress: Redis down at 1/6 of the load, up at 2/6; PostgreSQL down at 3/6,
    // up at 4/6. Each step runs while requests are in flight.
    let done = std::sync::Arc::new(AtomicUsize::new(0));
    let chaos = {
        let done = done.clone();
        tokio::task::spawn_blocking(move || {
            let wait = |n: usize| {
                while done.load(Ordering::Relaxed) < n {
                    std::thread::sleep(Duration::from_millis(5));
                }
            };
            wait(LOAD / 6);
            cluster.kill();
            wait(2 * LOAD / 6);
            cluster.restart();
            wait(3 * LOAD / 6);
            postgres.kill();
            // Down long enough that writes fail (the pool retries a connection for a while)
            // and go to the buffer, whatever the pace of the load.
            let down = std::time::Instant::now();
            wait(4 * LOAD / 6);
            std::thread::sleep(Duration::from_secs(6).saturating_sub(down.elapsed()));
            postgres.spawn();
            (cluster, postgres)
        })
    };
    let results: Vec<(u16, String)> = futures::stream::iter(0..LOAD)
        .map(|i| {
            let (urls, key, done) = (&urls, &key, &done);
            async move {
                let answer = send(urls, i % urls.len(), key, &format!("ledger-{i}")).await;
                done.fetch_add(1, Ordering::Relaxed);
                answer
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    let (_cluster, _postgres) = chaos.await.unwrap();
    let answered = results.iter().filter(|(s, _)| *s == 200).count() as u64;
    assert!(answered > 0);

    let mut prompt = 0;
    let mut generated = 0;
    for b in &backends {
        prompt += b
            .metric("sluice_backend_prompt_tokens_total")
            .await
            .unwrap();
        generated += b
            .metric("sluice_backend_generation_tokens_total")
            .await
            .unwrap();
    }
    // Buffered and journaled events arrive within a few seconds of both being back.
    let mut rows = Vec::new();
    for _ in 0..600 {
        // While the ledger catches up an export may be refused (503): try again.
        rows = gateways[0]
            .billing_export("key,model")
            .await
            .unwrap_or_default();
        if total(&rows, "completion_tokens") >= generated && total(&rows, "requests") >= answered {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = || {
        gateways
            .iter()
            .map(Gateway::log)
            .collect::<Vec<_>>()
            .join("\n----\n")
    };
    assert_eq!(
        total(&rows, "requests"),
        answered,
        "one event per answered request\n{}",
        log()
    );
    assert_eq!(
        total(&rows, "prompt_tokens"),
        prompt,
        "prompt tokens reconcile"
    );
    assert_eq!(
        total(&rows, "completion_tokens"),
        generated,
        "completion tokens reconcile"
    );
    assert!(rows.iter().all(|r| r["key_id"] == key_id.as_str()));

    let q = |sql: &str| db.query(sql);
    assert_eq!(
        q("SELECT count(*) - count(DISTINCT id) FROM usage_events"),
        "0",
        "no event twice"
    );
    assert_eq!(
        q("SELECT count(*), sum(prompt_tokens), sum(completion_tokens) FROM usage_events"),
        q("SELECT sum(requests), sum(prompt_tokens), sum(completion_tokens) FROM usage_rollups"),
        "raw events and rollups agree"
    );
    assert!(
        gateways
            .iter()
            .any(|g| g.log_contains("events buffered in the store")),
        "the PostgreSQL outage went through the Redis buffer"
    );
}
