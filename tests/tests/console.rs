//! The admin console, driven in a real browser (headless Chromium, through Selenium from
//! tests/python/console_test.py) against a real gateway with real traffic.

use serde_json::json;
use sluice_e2e::{
    python_check, Backend, Gateway, GatewayOptions, StoreKind, ADMIN_TOKEN, SIM_MODEL,
};
use std::path::Path;

#[tokio::test]
async fn the_console_manages_keys_and_shows_usage_cache_and_backends_in_a_browser() {
    let browser = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    if !Path::new(&browser).exists() {
        let message = "no Chromium for the console test: scripts/test.sh installs chromium and \
                       chromium-driver (or set CHROMIUM and CHROMEDRIVER)";
        assert!(std::env::var("CI").as_deref() != Ok("true"), "{message}");
        eprintln!("skipping: {message}");
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

    // Traffic for the usage chart and the cache table.
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

    // The screenshot is kept as a test artefact in the target directory:
    // target/test-artifacts/console-keys.png.
    let artifacts = std::env::current_exe()
        .unwrap()
        .parent()
        .and_then(Path::parent)
        .and_then(Path::parent)
        .unwrap()
        .join("test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let screenshot = artifacts.join("console-keys.png");
    let _ = std::fs::remove_file(&screenshot);

    let screenshot_arg = screenshot.display().to_string();
    python_check(
        "console_test.py",
        &[
            ("SLUICE_ADMIN_URL", &gw.admin_url),
            ("SLUICE_ADMIN_TOKEN", ADMIN_TOKEN),
            ("SLUICE_TENANT", "traffic-tenant"),
            ("SLUICE_SCREENSHOT", &screenshot_arg),
            ("SE_OFFLINE", "true"),
        ],
        || gw.log(),
    )
    .await;
    let png = std::fs::read(&screenshot).expect("the screenshot was saved");
    assert!(
        png.starts_with(b"\x89PNG"),
        "{} is not a PNG",
        screenshot.display()
    );
    eprintln!("console screenshot: {}", screenshot.display());
}
