//! Spend alerts as a finance team meets them: a webhook receiver that fails each first
//! delivery gets every alert again, signed, and accepts each exactly once, across three
//! replicas on Redis; a soft budget alerts but never refuses; a tenant's budget alerts once for
//! all of its keys; an embedded gateway restarted on its data does not alert twice.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use sluice_e2e::{Backend, Gateway, GatewayOptions, StoreKind, ADMIN_TOKEN, SIM_MODEL};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const SECRET: &str = "alerts-webhook-secret-0123456789";

/// A completion token costs 0.001 and a prompt token nothing, so a request of `max_tokens`
/// 2 costs exactly 0.002, reservation and all.
fn config(webhook: &str) -> String {
    format!(
        r#"
[quotas]
lease_max_requests = 0

[alerts]
webhook_url = "{webhook}"
webhook_secret = "{SECRET}"
thresholds = [50, 80, 100]
check_interval_ms = 200

[[prices]]
model = "{SIM_MODEL}"
tier = "*"
currency = "USD"
input = "0"
output = "1000"
"#
    )
}

/// The receiver: refuses the first delivery of each alert with 500, accepts the next ones,
/// and keeps what it accepted, after checking the signature.
#[derive(Clone, Default)]
struct Receiver {
    attempts: Arc<Mutex<BTreeMap<String, u32>>>,
    accepted: Arc<Mutex<Vec<Value>>>,
    bad_signatures: Arc<Mutex<u32>>,
}

impl Receiver {
    async fn start(&self) -> String {
        async fn receive(State(r): State<Receiver>, headers: HeaderMap, body: Bytes) -> StatusCode {
            let header = |name: &str| {
                headers
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned()
            };
            if !signed(&header("x-sluice-signature"), &body) {
                *r.bad_signatures.lock().unwrap() += 1;
                return StatusCode::UNAUTHORIZED;
            }
            let id = header("x-sluice-event-id");
            let attempt = {
                let mut attempts = r.attempts.lock().unwrap();
                let n = attempts.entry(id).or_default();
                *n += 1;
                *n
            };
            if attempt == 1 {
                return StatusCode::INTERNAL_SERVER_ERROR;
            }
            r.accepted
                .lock()
                .unwrap()
                .push(serde_json::from_slice(&body).unwrap());
            StatusCode::OK
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hooks/sluice", listener.local_addr().unwrap());
        let app = Router::new()
            .route("/hooks/sluice", post(receive))
            .with_state(self.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        url
    }

    /// The alerts accepted, by id, once `count` have been (or what there is after a wait).
    async fn accepted(&self, count: usize) -> BTreeMap<String, Value> {
        for _ in 0..300 {
            if self.accepted.lock().unwrap().len() >= count {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Anything more would arrive within the check interval and a retry.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let accepted = self.accepted.lock().unwrap().clone();
        let by_id: BTreeMap<String, Value> = accepted
            .iter()
            .map(|a| (a["id"].as_str().unwrap().to_owned(), a.clone()))
            .collect();
        assert_eq!(
            by_id.len(),
            accepted.len(),
            "an alert was accepted twice: {accepted:?}"
        );
        by_id
    }
}

/// `t=<ts>,v1=<hex>`: the HMAC-SHA256 of "<ts>.<body>" with the shared secret.
fn signed(signature: &str, body: &[u8]) -> bool {
    let Some((t, v1)) = signature
        .strip_prefix("t=")
        .and_then(|rest| rest.split_once(",v1="))
    else {
        return false;
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(t.as_bytes());
    mac.update(b".");
    mac.update(body);
    hex::decode(v1).is_ok_and(|v| mac.verify_slice(&v).is_ok())
}

async fn spend(gw: &Gateway, key: &str) -> u16 {
    gw.post_raw(
        "/v1/chat/completions",
        Some(key),
        json!({"model": SIM_MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "spend"}]})
            .to_string(),
    )
    .await
    .unwrap()
    .status()
    .as_u16()
}

async fn create_key(gw: &Gateway, limits: Value) -> (String, String) {
    gw.create_key_with("finance-tenant", "pro", limits)
        .await
        .unwrap()
}

async fn listed_alerts(gw: &Gateway) -> Vec<Value> {
    let r = gw
        .http
        .get(format!("{}/admin/v1/alerts", gw.admin_url))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    v["data"].as_array().unwrap().clone()
}

fn ids(alerts: &[Value]) -> Vec<String> {
    let mut ids: Vec<String> = alerts
        .iter()
        .map(|a| a["id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    ids
}

#[tokio::test]
async fn each_threshold_alerts_once_across_three_replicas_signed_and_retried() {
    let receiver = Receiver::default();
    let webhook = receiver.start().await;
    let backend = Backend::start().await.unwrap();
    let store = StoreKind::fresh_redis();
    let mut replicas = Vec::new();
    for _ in 0..3 {
        let options = GatewayOptions {
            extra_config: config(&webhook),
            ..GatewayOptions::new(&backend, store.clone())
        };
        replicas.push(Gateway::start(options).await.unwrap());
    }
    // Hard budget 0.02 and soft budget 0.01; six requests spend 0.012: the soft budget's
    // 50, 80 and 100% and the hard budget's 50% are reached, nothing else.
    let (id, key) = create_key(
        &replicas[0],
        json!({"monthly_budget": "0.02", "soft_monthly_budget": "0.01"}),
    )
    .await;
    for i in 0..6 {
        assert_eq!(
            spend(&replicas[i % 3], &key).await,
            200,
            "soft budgets never refuse"
        );
        // Each replica's check sees the spend as it grows.
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let accepted = receiver.accepted(4).await;
    let month = accepted
        .values()
        .next()
        .map(|a| a["month"].as_str().unwrap().to_owned());
    let month = month.expect("alerts were delivered");
    let expected: Vec<String> = ["hard:50", "soft:100", "soft:50", "soft:80"]
        .iter()
        .map(|t| {
            let (budget, percent) = t.split_once(':').unwrap();
            format!("budget:{id}:{month}:{budget}:{percent}")
        })
        .collect();
    assert_eq!(accepted.keys().cloned().collect::<Vec<_>>(), expected);
    assert_eq!(*receiver.bad_signatures.lock().unwrap(), 0);
    for (alert_id, attempts) in receiver.attempts.lock().unwrap().iter() {
        assert_eq!(*attempts, 2, "{alert_id}: refused once, then accepted once");
    }
    let soft80 = &accepted[&expected[3]];
    assert_eq!(soft80["key_id"], id.as_str());
    assert_eq!(soft80["tenant"], "finance-tenant");
    assert_eq!(soft80["budget_amount"], "0.01");
    assert_eq!(soft80["currency"], "USD");
    assert_eq!(soft80["threshold_percent"], 80);
    let counted: f64 = soft80["counted"].as_str().unwrap().parse().unwrap();
    assert!((0.008..=0.012).contains(&counted), "{soft80}");

    // Every replica lists the same four, recorded once for the fleet.
    for gw in &replicas {
        assert_eq!(ids(&listed_alerts(gw).await), expected);
    }
    // The hard budget still refuses where it ends: 0.012 + 4 × 0.002 = 0.02, then 429.
    for _ in 0..4 {
        assert_eq!(spend(&replicas[0], &key).await, 200);
    }
    assert_eq!(spend(&replicas[1], &key).await, 429);
}

#[tokio::test]
async fn an_embedded_gateway_restarted_on_its_data_does_not_alert_twice() {
    let receiver = Receiver::default();
    let webhook = receiver.start().await;
    let backend = Backend::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let options = || GatewayOptions {
        extra_config: config(&webhook),
        ..GatewayOptions::new(&backend, StoreKind::Embedded(dir.path().to_owned()))
    };
    let gw = Gateway::start(options()).await.unwrap();
    let (_, key) = create_key(&gw, json!({"soft_monthly_budget": "0.004"})).await;
    // 0.002 of 0.004: 50%.
    assert_eq!(spend(&gw, &key).await, 200);
    let first = receiver.accepted(1).await;
    assert_eq!(first.len(), 1, "{first:?}");
    drop(gw);

    // Restarted: the spend and the recorded alert are both still there; the next request
    // reaches 100% (and 80%), and only those are new.
    let gw = Gateway::start(options()).await.unwrap();
    assert_eq!(spend(&gw, &key).await, 200);
    let all = receiver.accepted(3).await;
    let thresholds: Vec<u64> = {
        let mut t: Vec<u64> = all
            .values()
            .map(|a| a["threshold_percent"].as_u64().unwrap())
            .collect();
        t.sort();
        t
    };
    assert_eq!(thresholds, [50, 80, 100]);
    assert_eq!(listed_alerts(&gw).await.len(), 3);
}

#[tokio::test]
async fn a_tenants_budget_alerts_once_per_threshold_for_all_its_keys_across_three_replicas() {
    let receiver = Receiver::default();
    let webhook = receiver.start().await;
    let backend = Backend::start().await.unwrap();
    let store = StoreKind::fresh_redis();
    let mut gws = Vec::new();
    for _ in 0..3 {
        gws.push(
            Gateway::start(GatewayOptions {
                extra_config: config(&webhook),
                ..GatewayOptions::new(&backend, store.clone())
            })
            .await
            .unwrap(),
        );
    }
    // Two keys without budgets of their own; their tenant's soft budget is four requests.
    let (_, a) = create_key(&gws[0], json!({})).await;
    let (_, b) = create_key(&gws[1], json!({})).await;
    let r = gws[2]
        .http
        .put(format!(
            "{}/admin/v1/tenants/finance-tenant",
            gws[2].admin_url
        ))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"limits": {"soft_monthly_budget": "0.008"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    tokio::time::sleep(Duration::from_secs(1)).await;
    for i in 0..4 {
        let key = if i % 2 == 0 { &a } else { &b };
        assert_eq!(
            spend(&gws[i % 3], key).await,
            200,
            "a soft budget never refuses"
        );
    }
    let accepted = receiver.accepted(3).await;
    let got: Vec<String> = accepted
        .keys()
        .map(|id| id.rsplit_once(':').unwrap().1.to_owned())
        .collect();
    let mut thresholds: Vec<u64> = got.iter().map(|t| t.parse().unwrap()).collect();
    thresholds.sort();
    assert_eq!(thresholds, [50, 80, 100], "{accepted:?}");
    for (id, alert) in &accepted {
        assert!(id.starts_with("budget:tenant:finance-tenant:"), "{id}");
        assert!(id.contains(":soft:"), "{id}");
        assert_eq!(alert["scope"], "tenant");
        assert_eq!(alert["key_id"], Value::Null);
        assert_eq!(alert["tenant"], "finance-tenant");
        assert_eq!(alert["budget_amount"], "0.008");
        // Each was refused once by the receiver, then delivered again.
        assert_eq!(receiver.attempts.lock().unwrap()[id], 2, "{id}");
    }
    assert_eq!(*receiver.bad_signatures.lock().unwrap(), 0);
    assert_eq!(
        ids(&listed_alerts(&gws[1]).await),
        ids(&accepted.into_values().collect::<Vec<_>>())
    );
}
