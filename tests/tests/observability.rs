//! What operators see: Prometheus metrics on the admin listener, from real traffic through a
//! real gateway on Redis.

use serde_json::json;
use sluice_e2e::{Backend, Gateway, GatewayOptions, StoreKind, ADMIN_TOKEN, SIM_MODEL};

/// The value of the first sample of `name` whose labels include all of `labels`.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .find(|(series, _)| {
            let metric = series.split('{').next().unwrap_or(series);
            metric == name
                && labels
                    .iter()
                    .all(|(k, v)| series.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|(_, v)| v.parse().ok())
}

/// The sum of every series of `name` with these labels (whatever its other labels).
fn sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(series, _)| {
            series.split('{').next() == Some(name)
                && labels
                    .iter()
                    .all(|(k, v)| series.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|(_, v)| v.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn metrics_count_requests_tokens_refusals_cache_redis_and_backends() {
    let backend = Backend::start().await.unwrap();
    let mut options = GatewayOptions::new(&backend, StoreKind::fresh_redis());
    options.extra_config = format!(
        "[quotas]\nlease_max_requests = 0\n\n[[prices]]\nmodel = \"{SIM_MODEL}\"\ntier = \"*\"\ncurrency = \"USD\"\ninput = \"1\"\noutput = \"2\"\n"
    );
    let gw = Gateway::start(options).await.unwrap();
    let (_, key) = gw
        .create_key("tenant-never-in-metrics", "pro")
        .await
        .unwrap();
    let (_, limited) = gw
        .create_key_with(
            "another-tenant-never-in-metrics",
            "pro",
            json!({"requests_per_minute": 1}),
        )
        .await
        .unwrap();
    let body = json!({"model": SIM_MODEL, "temperature": 0, "max_tokens": 5,
                      "messages": [{"role": "user", "content": "count me"}]})
    .to_string();
    for _ in 0..2 {
        let r = gw
            .post_raw("/v1/chat/completions", Some(&key), body.clone())
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        // The second request is a hit once the first answer is kept.
        for _ in 0..100 {
            let (_, stats) = gw
                .admin(reqwest::Method::GET, "/admin/v1/cache/stats")
                .await
                .unwrap();
            if stats["entries"] == 1 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
    let statuses: Vec<u16> = {
        let mut s = Vec::new();
        for _ in 0..2 {
            let r = gw
                .post_raw("/v1/chat/completions", Some(&limited), body.clone())
                .await
                .unwrap();
            s.push(r.status().as_u16());
        }
        s
    };
    assert_eq!(statuses, [200, 429]);

    let unauthorized = gw
        .http
        .get(format!("{}/metrics", gw.admin_url))
        .send()
        .await
        .unwrap();
    assert_eq!(unauthorized.status(), 401);
    // Both tenants' answers are kept just after they are sent, and each request is counted
    // just after its answer: wait for both.
    let mut text = String::new();
    for _ in 0..100 {
        let response = gw
            .http
            .get(format!("{}/metrics", gw.admin_url))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert!(response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain"));
        text = response.text().await.unwrap();
        // A request is counted in its logging phase, just after its answer went out.
        let refused_counted = sample(&text, "sluice_rate_limited_total", &[]).is_some();
        if sample(&text, "sluice_cache_entries", &[]) == Some(2.0) && refused_counted {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    let ok = [
        ("route", "chat_completions"),
        ("model", SIM_MODEL),
        ("tier", "pro"),
        ("status", "200"),
    ];
    let miss = sample(
        &text,
        "sluice_requests_total",
        &[ok.as_slice(), &[("cache", "miss")]].concat(),
    );
    let hit = sample(
        &text,
        "sluice_requests_total",
        &[ok.as_slice(), &[("cache", "hit")]].concat(),
    );
    assert_eq!(miss, Some(2.0), "{text}");
    assert_eq!(hit, Some(1.0), "{text}");
    assert_eq!(
        sample(
            &text,
            "sluice_rate_limited_total",
            &[("tier", "pro"), ("limit", "requests_per_minute")]
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "sluice_tokens_total",
            &[("model", SIM_MODEL), ("kind", "completion")]
        ),
        Some(15.0),
        "three answers of five tokens\n{text}"
    );
    assert!(sample(&text, "sluice_cost_nano_total", &[("currency", "USD")]).unwrap() > 0.0);
    // The refused request was turned away before its body (and so its model) was read: it
    // is counted under the route with no model.
    assert!(
        sum(
            &text,
            "sluice_request_duration_seconds_count",
            &[("route", "chat_completions")]
        ) >= 4.0,
        "{text}"
    );
    // Leases are off in this gateway: each of the three admitted requests was one store step
    // (the refused one is not admitted).
    assert_eq!(
        sample(&text, "sluice_quota_admissions_total", &[("path", "store")]),
        Some(3.0),
        "{text}"
    );
    assert!(
        sample(
            &text,
            "sluice_redis_call_duration_seconds_count",
            &[("command", "EVALSHA")]
        )
        .unwrap()
            >= 4.0
    );
    assert_eq!(
        sample(&text, "sluice_backend_up", &[("backend", "backend-0")]),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "sluice_cache_lookups_total", &[("result", "hit")]),
        Some(1.0)
    );
    assert_eq!(sample(&text, "sluice_cache_entries", &[]), Some(2.0));
    assert_eq!(sample(&text, "sluice_usage_journal_bytes", &[]), Some(0.0));
    assert!(
        !text.contains("tenant-never-in-metrics"),
        "no tenant in labels"
    );
    assert!(!text.contains("sk-sluice"), "no key in labels");

    // Every series the Grafana dashboard queries is one the gateway exports.
    let dashboard = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/grafana/sluice.json"
    ))
    .unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&dashboard).unwrap();
    let mut queried = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap();
            for (at, _) in expr.match_indices("sluice_") {
                let name: String = expr[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                queried.push(name);
            }
        }
    }
    assert!(queried.len() > 10, "{queried:?}");
    for name in queried {
        let family = ["_bucket", "_count", "_sum"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .unwrap_or(&name);
        assert!(
            text.contains(&format!("# TYPE {family} ")),
            "the dashboard queries {name}, which /metrics does not export"
        );
    }

    // One access-log line per request, with what billing and debugging need. Lines are
    // written by the log writer's own thread: wait for it.
    let is_hit_line = |l: &&str| l.contains("sluice::access") && l.contains("\"cache\":\"hit\"");
    let mut log = gw.log();
    for _ in 0..100 {
        if log.lines().any(|l| is_hit_line(&l)) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        log = gw.log();
    }
    let hit_line = log
        .lines()
        .find(is_hit_line)
        .unwrap_or_else(|| panic!("no access line for the hit:\n{log}"));
    for field in [
        "\"request_id\"",
        "\"key_id\"",
        "\"tenant\"",
        "\"cost\":\"0.0",
        "\"currency\":\"USD\"",
        "\"first_byte_ms\"",
        "\"duration_ms\"",
    ] {
        assert!(hit_line.contains(field), "{field} missing from {hit_line}");
    }
    assert!(!log.contains(&key), "the key's secret is never logged");
}
