//! Clients that do not play along: floods of made-up keys, uploads a key may not send,
//! bodies that never finish, more requests than a replica can carry, silent admin
//! connections. Each is bounded before it costs the gateway work or memory, on a real
//! gateway.

use futures::StreamExt;
use serde_json::json;
use sluice_e2e::{Backend, Gateway, GatewayOptions, OwnRedis, StoreKind, SIM_MODEL};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn chat() -> String {
    json!({"model": SIM_MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
        .to_string()
}

async fn status_of(gw: &Gateway, key: &str) -> u16 {
    gw.post_raw("/v1/chat/completions", Some(key), chat())
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// Opens a connection and sends a request head announcing `length` bytes of body, then
/// `sent` bytes of it.
async fn announce(url: &str, key: &str, length: usize, sent: usize) -> TcpStream {
    let address = url.trim_start_matches("http://");
    let mut tcp = TcpStream::connect(address).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: {address}\r\nauthorization: Bearer {key}\r\n\
         content-type: application/json\r\ncontent-length: {length}\r\n\r\n"
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    if sent > 0 {
        // A shed upload is answered and closed before its body is read: the write may then
        // fail, and the answer is still there to read.
        let _ = tcp.write_all(&vec![b' '; sent]).await;
    }
    tcp
}

/// The status code and text (head, and as much body as arrives soon after) of the answer on
/// `tcp`, if one comes within `limit`.
async fn answer_within(tcp: &mut TcpStream, limit: Duration) -> Option<(u16, String)> {
    let mut buffer = vec![0u8; 8192];
    let mut read = 0;
    let mut deadline = tokio::time::Instant::now() + limit;
    let mut head_seen = false;
    while read < buffer.len() {
        match tokio::time::timeout_at(deadline, tcp.read(&mut buffer[read..])).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => read += n,
            Err(_) if head_seen => break,
            Err(_) => return None,
        }
        if !head_seen && buffer[..read].windows(4).any(|w| w == b"\r\n\r\n") {
            head_seen = true;
            // The body follows at once, or not at all.
            deadline = tokio::time::Instant::now() + Duration::from_millis(200);
        }
    }
    let text = String::from_utf8_lossy(&buffer[..read]).into_owned();
    let code = text.split(' ').nth(1)?.parse().ok()?;
    Some((code, text))
}

/// 10,000 made-up keys while Redis is down (after thousands more while it was up, more
/// than the unknown-key cache holds) cost valid keys nothing: they are still served from
/// the local key cache, and no made-up key is let in.
#[tokio::test]
async fn made_up_keys_during_a_redis_outage_leave_valid_keys_working() {
    let backend = Backend::start().await.unwrap();
    let mut redis = OwnRedis::start();
    let gw = Gateway::start(GatewayOptions {
        extra_config: "[auth]\nkey_cache_entries = 100\nunknown_key_cache_entries = 500\n".into(),
        ..GatewayOptions::new(
            &backend,
            StoreKind::RedisAt {
                url: redis.url(),
                prefix: "abuse".into(),
            },
        )
    })
    .await
    .unwrap();
    let (_, key) = gw.create_key("acme", "pro").await.unwrap();
    assert_eq!(status_of(&gw, &key).await, 200);

    let flood = |count: usize, tag: &'static str| {
        let gw = &gw;
        futures::stream::iter(0..count)
            .map(move |i| async move {
                let made_up = format!("sk-sluice-made-up-{tag}-{i:08}");
                status_of(gw, &made_up).await
            })
            .buffer_unordered(32)
            .collect::<Vec<u16>>()
    };
    let while_up = flood(2_000, "up").await;
    assert!(
        while_up.iter().all(|s| *s == 401),
        "made-up keys are unknown"
    );

    redis.kill();
    let started = Instant::now();
    let during_outage = flood(10_000, "down").await;
    assert!(
        during_outage.iter().all(|s| matches!(s, 401 | 503)),
        "a made-up key is never admitted: {:?}",
        during_outage
            .iter()
            .filter(|s| !matches!(s, 401 | 503))
            .collect::<Vec<_>>()
    );
    eprintln!(
        "10,000 made-up keys during the outage took {:?}",
        started.elapsed()
    );
    // The builtin tiers fail open: the valid key is served by the local limiter alone.
    assert_eq!(status_of(&gw, &key).await, 200, "{}", gw.log());
}

/// A key limited to one request a minute: 50 clients that each announce an 8 MiB upload are
/// refused before the gateway reads a byte of their bodies.
#[tokio::test]
async fn uploads_past_a_keys_rate_are_refused_before_the_body_is_read() {
    let backend = Backend::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(GatewayOptions {
        max_body_bytes: 9 << 20,
        ..GatewayOptions::new(&backend, StoreKind::Embedded(dir.path().to_owned()))
    })
    .await
    .unwrap();
    let (_, key) = gw
        .create_key_with("acme", "pro", json!({"requests_per_minute": 1}))
        .await
        .unwrap();
    assert_eq!(status_of(&gw, &key).await, 200);
    let before = gw.rss_bytes();
    let clients = futures::future::join_all((0..50).map(|_| async {
        let mut tcp = announce(&gw.url, &key, 8 << 20, 0).await;
        answer_within(&mut tcp, Duration::from_secs(30)).await
    }))
    .await;
    for answer in &clients {
        let (code, text) = answer
            .as_ref()
            .expect("answered without the body being sent");
        assert_eq!(*code, 429, "{text}");
        assert!(text.to_lowercase().contains("retry-after"), "{text}");
    }
    let grown = gw.rss_bytes().saturating_sub(before);
    assert!(grown < 32 << 20, "RSS grew by {grown} bytes");
}

/// Bodies held in memory are bounded per replica: past `max_body_bytes_in_flight`, uploads
/// are shed with 503 and `Retry-After`, and the replica's memory stays within the bound.
#[tokio::test]
async fn request_bodies_held_at_once_are_bounded_by_the_replicas_budget() {
    let backend = Backend::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(GatewayOptions {
        max_body_bytes: 8 << 20,
        server_config: "max_body_bytes_in_flight = 16777216\n".into(),
        ..GatewayOptions::new(&backend, StoreKind::Embedded(dir.path().to_owned()))
    })
    .await
    .unwrap();
    let (_, key) = gw.create_key("acme", "enterprise").await.unwrap();
    let before = gw.rss_bytes();
    // 40 uploads of 8 MiB each send 3 MiB and stall: 320 MiB announced, 120 MiB sent.
    let mut held = Vec::new();
    for _ in 0..40 {
        held.push(announce(&gw.url, &key, 8 << 20, 3 << 20).await);
    }
    // The shed ones are answered at once; the held ones never are (their bodies stall).
    let answers = futures::future::join_all(
        held.iter_mut()
            .map(|tcp| answer_within(tcp, Duration::from_secs(10))),
    )
    .await;
    let mut shed = 0;
    for (code, text) in answers.into_iter().flatten() {
        {
            assert_eq!(code, 503, "{text}");
            assert!(
                text.contains("retry-after: 1") || text.contains("Retry-After: 1"),
                "{text}"
            );
            shed += 1;
        }
    }
    let grown = gw.rss_bytes().saturating_sub(before);
    eprintln!("{shed} of 40 uploads shed; RSS grew by {} MiB", grown >> 20);
    assert!(
        shed >= 34,
        "at most 16 MiB / 3 MiB uploads are held; {shed} of 40 were shed"
    );
    assert!(grown < 48 << 20, "RSS grew by {grown} bytes");
    drop(held);
    // Once the uploads are gone (the gateway sees them close) their budget is back.
    let deadline = Instant::now() + Duration::from_secs(20);
    while status_of(&gw, &key).await != 200 {
        assert!(Instant::now() < deadline, "the budget came back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A body that trickles in past `body_read_timeout_secs` gets 408.
#[tokio::test]
async fn a_body_that_never_finishes_gets_408() {
    let backend = Backend::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(GatewayOptions {
        server_config: "body_read_timeout_secs = 1\n".into(),
        ..GatewayOptions::new(&backend, StoreKind::Embedded(dir.path().to_owned()))
    })
    .await
    .unwrap();
    let (_, key) = gw.create_key("acme", "pro").await.unwrap();
    let mut tcp = announce(&gw.url, &key, 1000, 10).await;
    let (code, text) = answer_within(&mut tcp, Duration::from_secs(30))
        .await
        .expect("an answer");
    assert_eq!(code, 408, "{text}");
    assert!(text.contains("request_timeout"), "{text}");
    assert_eq!(status_of(&gw, &key).await, 200);
}

/// Past `max_in_flight`, a replica sheds requests at once with 503 `overloaded` and
/// `Retry-After`, and takes them again when load falls.
#[tokio::test]
async fn past_the_in_flight_mark_requests_are_shed() {
    let backend = Backend::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(GatewayOptions {
        server_config: "max_in_flight = 2\n".into(),
        ..GatewayOptions::new(&backend, StoreKind::Embedded(dir.path().to_owned()))
    })
    .await
    .unwrap();
    let (_, key) = gw.create_key("acme", "enterprise").await.unwrap();
    let gate = format!("shed-{}", uuid::Uuid::new_v4().simple());
    let held = json!({"model": SIM_MODEL, "stream": true, "max_tokens": 4,
                      "user": format!("sim-gate:{gate}"),
                      "messages": [{"role": "user", "content": "hold on"}]})
    .to_string();
    let mut streams = Vec::new();
    for _ in 0..2 {
        let r = gw
            .post_raw("/v1/chat/completions", Some(&key), held.clone())
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        streams.push(r);
    }
    let r = gw
        .post_raw("/v1/chat/completions", Some(&key), chat())
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    let (_, code, _) = sluice_e2e::openai_error(r).await.unwrap();
    assert_eq!(code, "overloaded");
    backend.open_gate(&gate).await.unwrap();
    for r in streams {
        r.text().await.unwrap();
    }
    assert_eq!(status_of(&gw, &key).await, 200);
    let metrics = gw.admin_metrics().await;
    assert!(
        metrics.contains("sluice_requests_shed_total{mark=\"in_flight\"} 1"),
        "{metrics}"
    );
}

/// The admin listener closes a connection that sends no request head in time, and serves at
/// most `admin_max_connections` at once.
#[tokio::test]
async fn silent_admin_connections_are_capped_and_closed() {
    let backend = Backend::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(GatewayOptions {
        server_config: "admin_max_connections = 2\nadmin_header_timeout_secs = 2\n".into(),
        ..GatewayOptions::new(&backend, StoreKind::Embedded(dir.path().to_owned()))
    })
    .await
    .unwrap();
    let address = gw.admin_url.trim_start_matches("http://").to_owned();
    // Two silent connections take both places.
    let mut silent = Vec::new();
    for _ in 0..2 {
        let mut tcp = TcpStream::connect(&address).await.unwrap();
        tcp.write_all(b"GET /health HTTP/1.1\r\n").await.unwrap();
        silent.push(tcp);
    }
    let health = format!("{}/health", gw.admin_url);
    // A third waits (in the accept backlog) while both places are taken...
    let third = tokio::spawn(reqwest::get(health.clone()));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !third.is_finished(),
        "a third connection waits while two are open"
    );
    // ...and is served once one of them closes.
    drop(silent.pop());
    assert_eq!(third.await.unwrap().unwrap().status(), 200);
    // The other head never finishes: it is closed by the header timeout.
    let mut byte = [0u8; 512];
    let closed = tokio::time::timeout(Duration::from_secs(20), silent[0].read(&mut byte)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "a silent connection was closed"
    );
    let r = reqwest::get(&health).await.unwrap();
    assert_eq!(r.status(), 200);
}

/// One tenant sending thousands of unique cacheable questions (many times what the cache
/// holds) evicts its own entries, and the other tenant's answers are still served from the
/// cache.
#[tokio::test]
async fn a_tenant_flooding_the_cache_leaves_other_tenants_entries() {
    let dir = tempfile::tempdir().unwrap();
    cache_flood_case(StoreKind::Embedded(dir.path().to_owned())).await;
}

/// The same on Redis (bodies in Redis, each replica's index within its own budget).
#[tokio::test]
async fn a_tenant_flooding_the_cache_leaves_other_tenants_entries_on_redis() {
    cache_flood_case(StoreKind::fresh_redis()).await;
}

async fn cache_flood_case(store: StoreKind) {
    let backend = Backend::start().await.unwrap();
    let gw = Gateway::start(GatewayOptions {
        extra_config: "[cache]\nmax_bytes = 131072\n".into(),
        ..GatewayOptions::new(&backend, store)
    })
    .await
    .unwrap();
    let (_, quiet) = gw.create_key("quiet", "enterprise").await.unwrap();
    let (_, flood) = gw.create_key("flood", "enterprise").await.unwrap();
    let question = |i: usize| {
        json!({"model": SIM_MODEL, "temperature": 0, "max_tokens": 4,
               "messages": [{"role": "user", "content": format!("question number {i}")}]})
        .to_string()
    };
    let ask = |key: &str, i: usize| {
        let request = gw
            .http
            .post(format!("{}/v1/chat/completions", gw.url))
            .bearer_auth(key)
            .header("content-type", "application/json")
            .body(question(i));
        async move {
            let r = request.send().await.unwrap();
            assert_eq!(r.status(), 200);
            r.headers()["x-sluice-cache"].to_str().unwrap().to_owned()
        }
    };
    for i in 0..20 {
        ask(&quiet, i).await;
    }
    // Answers are kept just after they are sent.
    for _ in 0..100 {
        let (_, stats) = gw
            .admin(reqwest::Method::GET, "/admin/v1/cache/stats")
            .await
            .unwrap();
        if stats["by_tenant"]["quiet"]["entries"] == 20 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let flooded: Vec<String> = futures::stream::iter(0..3_000)
        .map(|i| ask(&flood, 100_000 + i))
        .buffer_unordered(16)
        .collect()
        .await;
    assert!(flooded.iter().all(|s| s == "miss"));
    let (_, stats) = gw
        .admin(reqwest::Method::GET, "/admin/v1/cache/stats")
        .await
        .unwrap();
    assert!(stats["evicted"].as_u64().unwrap() > 0, "{stats}");
    assert!(stats["bytes"].as_u64().unwrap() <= 131_072, "{stats}");
    for i in 0..20 {
        assert_eq!(ask(&quiet, i).await, "hit", "question {i}: {stats}");
    }
}

/// Reads from `tcp` until the peer closes it (true) or `limit` passes or bytes arrive
/// (false): whether the gateway hung up without answering.
async fn closed_unanswered(tcp: &mut TcpStream, limit: Duration) -> bool {
    let mut byte = [0u8; 1];
    matches!(
        tokio::time::timeout(limit, tcp.read(&mut byte)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

/// Sends `GET /health` on `tcp` and reads its answer (keeping the connection open).
async fn health_on(tcp: &mut TcpStream) -> u16 {
    tcp.write_all(b"GET /health HTTP/1.1\r\nhost: sluice\r\n\r\n")
        .await
        .unwrap();
    let (code, _) = answer_within(tcp, Duration::from_secs(10))
        .await
        .expect("an answer on a connection within the cap");
    code
}

/// The proxy listener holds at most `max_connections` client connections: one more is
/// closed on arrival (and counted), and once the idle keep-alive connections holding the
/// places pass the header timeout they are closed and new clients are served again.
#[tokio::test]
async fn proxy_connections_are_capped_and_idle_ones_closed() {
    let backend = Backend::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(GatewayOptions {
        server_config: "max_connections = 3\nheader_timeout_secs = 2\n".into(),
        ..GatewayOptions::new(&backend, StoreKind::Embedded(dir.path().to_owned()))
    })
    .await
    .unwrap();
    let address = gw.url.trim_start_matches("http://").to_owned();
    // The start-up health probe's connection is gone before the places are taken.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !gw
        .admin_metrics()
        .await
        .contains("sluice_connections_open 0")
    {
        assert!(Instant::now() < deadline, "connections left open at start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut idle = Vec::new();
    for _ in 0..3 {
        let mut tcp = TcpStream::connect(&address).await.unwrap();
        assert_eq!(health_on(&mut tcp).await, 200);
        idle.push(tcp);
    }
    let mut fourth = TcpStream::connect(&address).await.unwrap();
    fourth
        .write_all(b"GET /health HTTP/1.1\r\nhost: sluice\r\n\r\n")
        .await
        .unwrap();
    assert!(
        closed_unanswered(&mut fourth, Duration::from_secs(5)).await,
        "a connection past max_connections is closed on arrival"
    );
    let metrics = gw.admin_metrics().await;
    assert!(
        metrics.contains("sluice_connections_refused_total 1"),
        "{metrics}"
    );
    assert!(metrics.contains("sluice_connections_open 3"), "{metrics}");
    // The idle keep-alive connections are closed once the header timeout passes.
    for tcp in &mut idle {
        assert!(
            closed_unanswered(tcp, Duration::from_secs(20)).await,
            "an idle keep-alive connection is closed"
        );
    }
    let r = reqwest::get(format!("{}/health", gw.url)).await.unwrap();
    assert_eq!(r.status(), 200);
}

/// A request header trickled in a byte at a time (each read well inside pingora's per-read
/// timeout) is cut off at the header timeout, unanswered.
#[tokio::test]
async fn a_trickled_request_header_is_cut_off() {
    let backend = Backend::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(GatewayOptions {
        server_config: "header_timeout_secs = 2\n".into(),
        ..GatewayOptions::new(&backend, StoreKind::Embedded(dir.path().to_owned()))
    })
    .await
    .unwrap();
    let address = gw.url.trim_start_matches("http://").to_owned();
    let mut tcp = TcpStream::connect(&address).await.unwrap();
    tcp.write_all(b"GET /health HTTP/1.1\r\nx-slow: ")
        .await
        .unwrap();
    // Up to 30 s of one byte every 250 ms: far longer than the timeout.
    let mut closed = false;
    for _ in 0..120 {
        if tcp.write_all(b"a").await.is_err() {
            closed = true;
            break;
        }
        if closed_unanswered(&mut tcp, Duration::from_millis(250)).await {
            closed = true;
            break;
        }
    }
    assert!(closed, "the trickled header was cut off");
}
