//! The admin console, driven in a real browser (headless Chromium, through Selenium from
//! tests/python/console_test.py) against a real gateway with real traffic and thousands of
//! keys.

use futures::StreamExt;
use serde_json::json;
use sluice_e2e::{
    python_check, Backend, Gateway, GatewayOptions, StoreKind, ADMIN_TOKEN, SIM_MODEL,
};
use std::path::{Path, PathBuf};

/// Where the test's screenshots are kept: `target/test-artifacts/` (beside the test
/// binaries' directory), emptied of this test's earlier ones.
fn artifacts(prefix: &str) -> PathBuf {
    let dir = std::env::current_exe()
        .unwrap()
        .parent()
        .and_then(Path::parent)
        .and_then(Path::parent)
        .unwrap()
        .join("test-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(&dir).unwrap().flatten() {
        if entry.file_name().to_string_lossy().starts_with(prefix) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    dir
}

/// Creates `count` keys named `bulk-N` over `tenants` tenants through the admin API, many at
/// once.
async fn bulk_keys(gw: &Gateway, count: usize, tenants: usize) {
    futures::stream::iter(0..count)
        .map(|i| async move {
            let (status, body) = gw
                .admin_json(
                    reqwest::Method::POST,
                    "/admin/v1/keys",
                    Some(json!({"name": format!("bulk-{i}"), "tenant": format!("tenant-{}", i % tenants)})),
                )
                .await;
            assert_eq!(status, 201, "{body}");
        })
        .buffer_unordered(16)
        .collect::<Vec<()>>()
        .await;
}

/// How many keys the admin API lists.
async fn key_total(gw: &Gateway) -> u64 {
    let (status, page) = gw
        .admin_json(reqwest::Method::GET, "/admin/v1/keys?limit=1", None)
        .await;
    assert_eq!(status, 200, "{page}");
    page["total"].as_u64().unwrap()
}

fn browser() -> Option<String> {
    let browser = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    if Path::new(&browser).exists() {
        return Some(browser);
    }
    let message = "no Chromium for the console test: scripts/test.sh installs chromium and \
                   chromium-driver (or set CHROMIUM and CHROMEDRIVER)";
    assert!(std::env::var("CI").as_deref() != Ok("true"), "{message}");
    eprintln!("skipping: {message}");
    None
}

#[tokio::test]
async fn the_console_manages_keys_and_shows_usage_cache_and_backends_in_a_browser() {
    if browser().is_none() {
        return;
    }
    let backend = Backend::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(GatewayOptions::new(
        &backend,
        StoreKind::Embedded(dir.path().to_owned()),
    ))
    .await
    .unwrap();

    // Traffic for the charts and the cache table.
    let (_, key) = gw.create_key("traffic-tenant", "pro").await.unwrap();
    for _ in 0..2 {
        let r = gw
            .post_raw(
                "/v1/chat/completions",
                Some(&key),
                json!({"model": SIM_MODEL, "temperature": 0,
                       "messages": [{"role": "user", "content": "chart me"}]})
                .to_string(),
            )
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    // Two thousand keys, one of them to be found by search.
    bulk_keys(&gw, 2_000, 20).await;
    let (status, needle) = gw
        .admin_json(
            reqwest::Method::POST,
            "/admin/v1/keys",
            Some(json!({"name": "needle-in-the-haystack", "tenant": "tenant-7"})),
        )
        .await;
    assert_eq!(status, 201, "{needle}");
    let keys = key_total(&gw).await.to_string();

    let page = gw
        .http
        .get(format!("{}/console", gw.admin_url))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));

    let screenshots = artifacts("console-");
    let screenshots_arg = screenshots.display().to_string();
    python_check(
        "console_test.py",
        &[
            ("SLUICE_ADMIN_URL", &gw.admin_url),
            ("SLUICE_ADMIN_TOKEN", ADMIN_TOKEN),
            ("SLUICE_TENANT", "traffic-tenant"),
            ("SLUICE_NEEDLE", "needle-in-the-haystack"),
            ("SLUICE_KEYS", &keys),
            ("SLUICE_BACKEND_URL", &backend.url),
            ("SLUICE_SCREENSHOTS", &screenshots_arg),
            ("SE_OFFLINE", "true"),
        ],
        || gw.log(),
    )
    .await;
    for page in [
        "traffic", "keys", "tenants", "tiers", "money", "usage", "cache", "backends", "alerts",
        "audit",
    ] {
        let path = screenshots.join(format!("console-{page}.png"));
        let png = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(
            png.starts_with(b"\x89PNG"),
            "{} is not a PNG",
            path.display()
        );
    }
    eprintln!(
        "console screenshots: {}/console-*.png",
        screenshots.display()
    );
}

/// The console with 10,000 keys over 100 tenants (each with limits of its own) and traffic:
/// every page makes at most a few admin API requests and brings at most 256 KiB, as with a
/// handful of keys (tests/python/console_budget.py prints each page's figures).
#[tokio::test]
async fn every_console_page_keeps_its_request_budget_with_10000_keys() {
    if browser().is_none() {
        return;
    }
    let backend = Backend::start().await.unwrap();
    let gw = Gateway::start(GatewayOptions::new(&backend, StoreKind::fresh_redis()))
        .await
        .unwrap();
    bulk_keys(&gw, 10_000, 100).await;
    for t in 0..100 {
        let (status, body) = gw
            .admin_json(
                reqwest::Method::PUT,
                &format!("/admin/v1/tenants/tenant-{t}"),
                Some(json!({"limits": {"requests_per_minute": 1000 + t}})),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }
    for tenant in ["tenant-1", "tenant-2"] {
        let (_, key) = gw.create_key(tenant, "pro").await.unwrap();
        for i in 0..3 {
            let r = gw
                .post_raw(
                    "/v1/chat/completions",
                    Some(&key),
                    json!({"model": SIM_MODEL, "max_tokens": 4,
                           "messages": [{"role": "user", "content": format!("budget {i}")}]})
                    .to_string(),
                )
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
        }
    }
    let keys = key_total(&gw).await.to_string();
    python_check(
        "console_budget.py",
        &[
            ("SLUICE_ADMIN_URL", &gw.admin_url),
            ("SLUICE_ADMIN_TOKEN", ADMIN_TOKEN),
            ("SLUICE_KEYS", &keys),
            ("SE_OFFLINE", "true"),
        ],
        || gw.log(),
    )
    .await;
}
