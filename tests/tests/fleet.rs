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
