//! The same store behaviour, proved against both implementations: the embedded store on a
//! temporary directory and the Redis store on a real Redis (SLUICE_TEST_REDIS_URL, default
//! redis://127.0.0.1:6379), each Redis run under its own key prefix.

use sluice_gateway::keys::{new_key_id, KeyHash, KeyRecord, NewSecret};
use sluice_gateway::store::{EmbeddedStore, RedisStore, Store};
use sluice_gateway::usage::UsageEvent;
use sluice_policies::LimitOverrides;

mod common;
use common::redis_url;

async fn redis_store() -> (RedisStore, String) {
    let prefix = format!("sluice-test-{}", uuid::Uuid::new_v4().simple());
    let store = RedisStore::connect(&redis_url(), &prefix)
        .await
        .expect("a Redis for the store tests (start one, or set SLUICE_TEST_REDIS_URL)");
    (store, prefix)
}

/// Deletes a run's keys: the admin keys, the per-API-key quota keys and cache bodies.
async fn drop_prefix(prefix: &str) {
    common::drop_keys(&[
        format!("{{{prefix}}}:*"),
        format!("{{{prefix}:*"),
        format!("{prefix}:cache:*"),
    ])
    .await;
}

fn record(name: &str, created_at: i64) -> (KeyRecord, String) {
    let secret = NewSecret::generate();
    let record = KeyRecord {
        id: new_key_id(),
        name: name.into(),
        tenant: "acme".into(),
        tier: "free".into(),
        limits: LimitOverrides {
            requests_per_minute: Some(7),
            ..Default::default()
        },
        hash: secret.hash,
        display_prefix: secret.display_prefix,
        created_at,
        revoked_at: None,
        cache: true,
        // Stored flattened beside the limits: kept through every store's round trip.
        models: sluice_policies::ModelLists {
            allowed_models: Some(vec!["llama-*".into(), "chat".into()]),
            denied_models: vec!["llama-405b".into()],
        },
        model_limits: [(
            "llama-70b".to_owned(),
            Limits {
                tokens_per_minute: Some(900),
                ..Limits::default()
            },
        )]
        .into(),
        distillation: Some(sluice_policies::Distillation { models: vec![] }),
    };
    (record, secret.secret)
}

/// Runs one contract case against both stores.
macro_rules! contract {
    ($name:ident, $case:ident) => {
        mod $name {
            #[tokio::test]
            async fn embedded() {
                let dir = tempfile::tempdir().unwrap();
                let store = super::EmbeddedStore::open(dir.path()).unwrap();
                super::$case(&store).await;
            }

            #[tokio::test]
            async fn redis() {
                let (store, prefix) = super::redis_store().await;
                super::$case(&store).await;
                super::drop_prefix(&prefix).await;
            }
        }
    };
}

contract!(
    created_key_is_found_by_id_and_secret_hash,
    created_key_is_found
);
contract!(pool_changes_are_kept_and_move_the_epoch, pool_changes_case);

async fn pool_changes_case(store: &dyn Store) {
    use sluice_gateway::backend_spec::BackendSpec;
    assert!(store.backend_changes().await.unwrap().is_empty());
    let epoch = store.keys_epoch().await.unwrap();
    let record = BackendSpec {
        url: "https://api.example.com/v1".into(),
        models: vec!["m".into()],
        kind: Some("openai_compatible".into()),
        api_key_env: Some("EXAMPLE_KEY".into()),
        model_map: [("m".to_owned(), "provider-m".to_owned())].into(),
        priority: Some(2),
        http2: Some(true),
        ..BackendSpec::default()
    };
    store.set_backend("gpu-2", Some(&record)).await.unwrap();
    store.set_backend("gpu-1", None).await.unwrap();
    assert!(store.keys_epoch().await.unwrap() > epoch);
    let mut changes = store.backend_changes().await.unwrap();
    changes.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        changes,
        vec![
            ("gpu-1".to_owned(), None),
            ("gpu-2".to_owned(), Some(record))
        ]
    );
}

contract!(
    an_alert_is_recorded_once_listed_newest_first_and_expires,
    alerts_case
);

async fn alerts_case(store: &dyn Store) {
    use sluice_gateway::store::ALERT_RETENTION_MS;
    let day = 86_400_000;
    let t0 = 1_800_000_000_000;
    assert!(store.recent_alerts(10).await.unwrap().is_empty());
    assert!(store.record_alert_once("a", t0, b"first").await.unwrap());
    assert!(!store
        .record_alert_once("a", t0 + 1, b"again")
        .await
        .unwrap());
    assert!(store
        .record_alert_once("b", t0 + day, b"second")
        .await
        .unwrap());
    assert_eq!(
        store.recent_alerts(10).await.unwrap(),
        [b"second".to_vec(), b"first".to_vec()]
    );
    assert_eq!(store.recent_alerts(1).await.unwrap(), [b"second".to_vec()]);
    // Past the retention, "a" is forgotten as a new alert comes (and could be recorded anew).
    let later = t0 + ALERT_RETENTION_MS + day / 2;
    assert!(store.record_alert_once("c", later, b"third").await.unwrap());
    assert_eq!(
        store.recent_alerts(10).await.unwrap(),
        [b"third".to_vec(), b"second".to_vec()]
    );
    assert!(store
        .record_alert_once("a", later, b"a year on")
        .await
        .unwrap());
}

contract!(
    cache_entries_expire_and_the_log_replays_in_order,
    cache_entries_and_log_case
);

async fn cache_entries_and_log_case(store: &dyn Store) {
    assert!(store.cache_log("0", 10).await.unwrap().is_empty());
    store
        .cache_put("a", b"body-a", 60_000, b"put-a", 3_600_000)
        .await
        .unwrap();
    store
        .cache_put("b", b"body-b", 150, b"put-b", 3_600_000)
        .await
        .unwrap();
    assert_eq!(
        store.cache_get("a").await.unwrap().as_deref(),
        Some(&b"body-a"[..])
    );
    assert_eq!(store.cache_get("missing").await.unwrap(), None);

    let log = store.cache_log("0", 10).await.unwrap();
    let events: Vec<&[u8]> = log.iter().map(|(_, e)| e.as_slice()).collect();
    assert_eq!(events, [&b"put-a"[..], &b"put-b"[..]]);
    // Reading on from a cursor gives only what came after it.
    let after_first = store.cache_log(&log[0].0, 10).await.unwrap();
    assert_eq!(after_first.len(), 1);
    assert_eq!(after_first[0].1, b"put-b");
    assert_eq!(store.cache_log(&log[0].0, 0).await.unwrap().len(), 0);

    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(store.cache_get("b").await.unwrap(), None, "expired");

    store.cache_purge(&["a".into()], b"purge").await.unwrap();
    assert_eq!(store.cache_get("a").await.unwrap(), None);
    let tail = store.cache_log(&log[1].0, 10).await.unwrap();
    assert_eq!(tail.len(), 1);
    assert_eq!(tail[0].1, b"purge");
}

async fn created_key_is_found(store: &dyn Store) {
    let (rec, secret) = record("one", 100);
    store.put_key(&rec, None).await.unwrap();
    assert_eq!(store.key(&rec.id).await.unwrap().as_ref(), Some(&rec));
    let by_hash = store
        .key_by_hash(&KeyHash::of_secret(&secret))
        .await
        .unwrap();
    assert_eq!(by_hash, Some(rec));
    assert_eq!(store.key("key_missing").await.unwrap(), None);
    assert_eq!(
        store
            .key_by_hash(&KeyHash::of_secret("sk-sluice-nope"))
            .await
            .unwrap(),
        None
    );
}

contract!(
    revoked_key_no_longer_resolves,
    revoked_key_no_longer_resolves_case
);
async fn revoked_key_no_longer_resolves_case(store: &dyn Store) {
    let (mut rec, secret) = record("revoked", 100);
    store.put_key(&rec, None).await.unwrap();
    rec.revoked_at = Some(200);
    store.put_key(&rec, None).await.unwrap();
    assert_eq!(
        store
            .key_by_hash(&KeyHash::of_secret(&secret))
            .await
            .unwrap(),
        None
    );
    // The record stays, for audit and billing.
    assert_eq!(
        store.key(&rec.id).await.unwrap().unwrap().revoked_at,
        Some(200)
    );
}

contract!(
    rotation_retires_the_old_secret,
    rotation_retires_the_old_secret_case
);
async fn rotation_retires_the_old_secret_case(store: &dyn Store) {
    let (mut rec, old_secret) = record("rotating", 100);
    store.put_key(&rec, None).await.unwrap();
    let new = NewSecret::generate();
    let old_hash = std::mem::replace(&mut rec.hash, new.hash);
    store.put_key(&rec, Some(&old_hash)).await.unwrap();
    assert_eq!(
        store
            .key_by_hash(&KeyHash::of_secret(&old_secret))
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        store
            .key_by_hash(&KeyHash::of_secret(&new.secret))
            .await
            .unwrap()
            .map(|r| r.id),
        Some(rec.id)
    );
}

contract!(
    keys_list_in_creation_order,
    keys_list_in_creation_order_case
);
async fn keys_list_in_creation_order_case(store: &dyn Store) {
    let (late, _) = record("late", 300);
    let (early, _) = record("early", 100);
    store.put_key(&late, None).await.unwrap();
    store.put_key(&early, None).await.unwrap();
    let names: Vec<String> = store
        .list_keys()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.name)
        .collect();
    assert_eq!(names, ["early", "late"]);
}

contract!(
    every_key_change_moves_the_epoch,
    every_key_change_moves_the_epoch_case
);
async fn every_key_change_moves_the_epoch_case(store: &dyn Store) {
    let before = store.keys_epoch().await.unwrap();
    let (mut rec, _) = record("epoch", 100);
    store.put_key(&rec, None).await.unwrap();
    let after_create = store.keys_epoch().await.unwrap();
    assert_ne!(before, after_create);
    rec.revoked_at = Some(1);
    store.put_key(&rec, None).await.unwrap();
    assert_ne!(after_create, store.keys_epoch().await.unwrap());
}

#[tokio::test]
async fn embedded_store_keeps_keys_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (rec, secret) = record("durable", 100);
    {
        let store = EmbeddedStore::open(dir.path()).unwrap();
        store.put_key(&rec, None).await.unwrap();
    }
    let reopened = EmbeddedStore::open(dir.path()).unwrap();
    assert_eq!(
        reopened
            .key_by_hash(&KeyHash::of_secret(&secret))
            .await
            .unwrap(),
        Some(rec)
    );
}

/// A store written before 2026-12 counted events once through an index of their ids; opened
/// now, an event it kept still counts once, and one a tenant purge deleted (its id left in
/// the index) is still not brought back by a replay.
#[tokio::test]
async fn an_embedded_store_with_the_old_id_index_still_counts_each_event_once() {
    use redb::TableDefinition;
    let dir = tempfile::tempdir().unwrap();
    let (kept, purged) = (usage_event("kept", 1000), usage_event("purged", 1001));
    let key = |e: &UsageEvent| format!("{:020}/{}", e.time_ms, e.id);
    {
        let db = redb::Database::create(dir.path().join("sluice.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let usage: TableDefinition<&str, &[u8]> = TableDefinition::new("usage_events");
            let ids: TableDefinition<&str, &str> = TableDefinition::new("usage_event_ids");
            let mut usage = txn.open_table(usage).unwrap();
            let mut ids = txn.open_table(ids).unwrap();
            usage
                .insert(
                    key(&kept).as_str(),
                    serde_json::to_vec(&kept).unwrap().as_slice(),
                )
                .unwrap();
            ids.insert("kept", key(&kept).as_str()).unwrap();
            ids.insert("purged", key(&purged).as_str()).unwrap();
        }
        txn.commit().unwrap();
    }
    let store = EmbeddedStore::open(dir.path()).unwrap();
    let new = usage_event("new", 1002);
    let replayed = [kept.clone(), purged, new.clone()];
    assert_eq!(store.append_usage(&replayed).await.unwrap(), 1);
    drop(store);
    let reopened = EmbeddedStore::open(dir.path()).unwrap();
    assert_eq!(reopened.append_usage(&replayed).await.unwrap(), 0);
    assert_eq!(
        reopened.usage_events(0, i64::MAX).await.unwrap(),
        vec![kept, new]
    );
}

#[tokio::test]
async fn the_secret_is_never_stored() {
    let dir = tempfile::tempdir().unwrap();
    let (rec, secret) = record("secret", 100);
    {
        let store = EmbeddedStore::open(dir.path()).unwrap();
        store.put_key(&rec, None).await.unwrap();
    }
    let bytes = std::fs::read(dir.path().join("sluice.redb")).unwrap();
    let needle = &secret.as_bytes()["sk-sluice-".len()..];
    assert!(!bytes.windows(needle.len()).any(|w| w == needle));
}

// ---- admission: the operations of `sluice_policies::ledger`, on both stores ----

use sluice_policies::ledger::{Admit, Charge, Refresh, Scope, Settle, Verdict};
use sluice_policies::quota::{Decision, LimitKind, Reservation};
use sluice_policies::{Limits, Tenant};

const MONTH: &str = "2026-12";
/// 2026-12-03 12:00:00 UTC.
const NOON: i64 = 1_796_299_200;

fn a_key() -> String {
    format!("contract-{}", uuid::Uuid::new_v4().simple())
}

/// Admits `r` into `ledger` alone, checked against `limits`.
async fn admit(
    store: &dyn Store,
    ledger: &str,
    limits: &Limits,
    r: &Reservation,
    id: &str,
    now: i64,
) -> Decision {
    admit_scoped(store, &[Scope { ledger, limits }], r, id, now)
        .await
        .decision
}

async fn admit_scoped(
    store: &dyn Store,
    scopes: &[Scope<'_>],
    r: &Reservation,
    id: &str,
    now: i64,
) -> Verdict {
    let args = Admit {
        scopes,
        reservation: r,
        reservation_id: id,
        now_sec: now,
        month: MONTH,
        secs_to_month_end: 1_000_000,
        slot_ttl_secs: 60,
    };
    store.admit(&args).await.unwrap()
}

fn one(tokens: u64) -> Reservation {
    Reservation {
        requests: 1,
        tokens,
        cost_nano: 7,
    }
}

contract!(
    a_settled_request_frees_the_slot_it_took,
    settled_request_frees_its_slot
);

async fn settled_request_frees_its_slot(store: &dyn Store) {
    let key = a_key();
    let limits = Limits {
        max_concurrent: Some(1),
        ..Limits::default()
    };
    for i in 0..5 {
        let id = format!("r{i}");
        let d = admit(store, &key, &limits, &one(10), &id, NOON + i).await;
        assert_eq!(
            d.refused, None,
            "request {i}: the previous one freed its slot"
        );
        let d = admit(store, &key, &limits, &one(10), "other", NOON + i).await;
        assert_eq!(
            d.refused,
            Some((LimitKind::Concurrent, 60)),
            "one slot, held 60 s"
        );
        store
            .settle(
                std::slice::from_ref(&key),
                &Settle {
                    reservation_id: &id,
                    admitted_sec: NOON + i,
                    month: MONTH,
                    reserved: one(10),
                    actual: one(4),
                },
            )
            .await
            .unwrap();
    }
    let c = store.quota_counters(&key, NOON + 5, MONTH).await.unwrap();
    assert_eq!((c.in_flight, c.day_requests, c.day_tokens), (0, 5, 20));
}

contract!(
    a_tenants_limit_counts_all_its_keys_together,
    tenant_limit_counts_keys_together
);

async fn tenant_limit_counts_keys_together(store: &dyn Store) {
    let (a, b) = (a_key(), a_key());
    let tenant = sluice_policies::tenants::ledger_of(&a_key());
    let each = Limits {
        requests_per_minute: Some(10),
        ..Limits::default()
    };
    let together = Limits {
        requests_per_minute: Some(3),
        monthly_budget: Some("0.000000050".parse().unwrap()),
        ..Limits::default()
    };
    let scopes = |key: &str| -> [(String, Limits); 2] {
        [
            (key.to_owned(), each.clone()),
            (tenant.clone(), together.clone()),
        ]
    };
    let mut verdicts = Vec::new();
    for (i, key) in [&a, &b, &a, &b].into_iter().enumerate() {
        let owned = scopes(key);
        let scoped: Vec<Scope> = owned
            .iter()
            .map(|(ledger, limits)| Scope { ledger, limits })
            .collect();
        let v = admit_scoped(store, &scoped, &one(10), &format!("r{i}"), NOON).await;
        verdicts.push((v.refused_by, v.decision.refused.map(|r| r.0)));
    }
    assert_eq!(
        verdicts,
        [
            (None, None),
            (None, None),
            (None, None),
            (Some(1), Some(LimitKind::RequestsPerMinute))
        ]
    );
    let c =
        |ledger: String| async move { store.quota_counters(&ledger, NOON, MONTH).await.unwrap() };
    // Refused by the tenant: counted in neither ledger.
    assert_eq!(c(a.clone()).await.day_requests, 2);
    assert_eq!(c(b.clone()).await.day_requests, 1);
    let t = c(tenant.clone()).await;
    assert_eq!(
        (t.day_requests, t.in_flight, t.month_spend_nano),
        (3, 3, 21)
    );
    // A settlement frees the slot and moves the spend in both.
    let ledgers = [b.clone(), tenant.clone()];
    store
        .settle(
            &ledgers,
            &Settle {
                reservation_id: "r1",
                admitted_sec: NOON,
                month: MONTH,
                reserved: one(10),
                actual: Reservation {
                    requests: 1,
                    tokens: 4,
                    cost_nano: 40,
                },
            },
        )
        .await
        .unwrap();
    let t = c(tenant.clone()).await;
    assert_eq!((t.in_flight, t.month_spend_nano), (2, 54));
    assert_eq!(c(b.clone()).await.month_spend_nano, 40);
    // The budget (50 nano) is the tenant's: 54 spent, so a fourth request a minute later is
    // refused by it, though the key has spent 14.
    let owned = scopes(&a);
    let scoped: Vec<Scope> = owned
        .iter()
        .map(|(ledger, limits)| Scope { ledger, limits })
        .collect();
    let v = admit_scoped(store, &scoped, &one(1), "late", NOON + 61).await;
    assert_eq!(v.refused_by, Some(1));
    assert_eq!(
        v.decision.refused.map(|r| r.0),
        Some(LimitKind::MonthlyBudget)
    );
}

contract!(tenants_limits_are_kept_and_move_the_epoch, tenants_case);

async fn tenants_case(store: &dyn Store) {
    let before = store.keys_epoch().await.unwrap();
    let acme = Tenant {
        id: format!("acme-{}", uuid::Uuid::new_v4().simple()),
        limits: Limits {
            tokens_per_day: Some(1_000),
            monthly_budget: Some("12.5".parse().unwrap()),
            ..Limits::default()
        },
        model_limits: [(
            "llama-70b".to_owned(),
            Limits {
                max_concurrent: Some(2),
                ..Limits::default()
            },
        )]
        .into(),
        distillation: Some(sluice_policies::Distillation {
            models: vec!["llama-*".to_owned()],
        }),
    };
    store.put_tenant(&acme).await.unwrap();
    assert_ne!(store.keys_epoch().await.unwrap(), before);
    let replaced = Tenant {
        limits: Limits {
            requests_per_minute: Some(9),
            ..Limits::default()
        },
        ..acme.clone()
    };
    store.put_tenant(&replaced).await.unwrap();
    let all = store.tenants().await.unwrap();
    let found: Vec<&Tenant> = all.iter().filter(|t| t.id == acme.id).collect();
    assert_eq!(found, [&replaced], "replaced, not merged");
}

contract!(a_lease_counts_as_its_size, lease_counts_as_its_size);

async fn lease_counts_as_its_size(store: &dyn Store) {
    let key = a_key();
    let limits = Limits {
        requests_per_day: Some(10),
        ..Limits::default()
    };
    let lease = Reservation {
        requests: 8,
        tokens: 80,
        cost_nano: 56,
    };
    let d = admit(store, &key, &limits, &lease, "L", NOON).await;
    assert_eq!(d.refused, None);
    let c = store.quota_counters(&key, NOON, MONTH).await.unwrap();
    assert_eq!((c.day_requests, c.in_flight), (8, 8));
    let d = admit(store, &key, &limits, &one(1), "x", NOON).await;
    assert_eq!(d.refused, None, "9 of 10");
    let three = Reservation {
        requests: 3,
        ..lease
    };
    let d = admit(store, &key, &limits, &three, "y", NOON).await;
    assert_eq!(d.refused.map(|r| r.0), Some(LimitKind::RequestsPerDay));
    // The lease served 2 requests: it gives back 6, and all of its slots.
    store
        .settle(
            std::slice::from_ref(&key),
            &Settle {
                reservation_id: "L",
                admitted_sec: NOON,
                month: MONTH,
                reserved: lease,
                actual: Reservation {
                    requests: 2,
                    tokens: 9,
                    cost_nano: 5,
                },
            },
        )
        .await
        .unwrap();
    let c = store.quota_counters(&key, NOON + 1, MONTH).await.unwrap();
    assert_eq!((c.day_requests, c.day_tokens, c.in_flight), (3, 10, 1));
    assert_eq!(c.month_spend_nano, 5 + 7);
}

contract!(
    settling_many_at_once_is_settling_each,
    settle_all_is_settle_each
);

async fn settle_all_is_settle_each(store: &dyn Store) {
    let limits = Limits::default();
    let lease = |requests: u64| Reservation {
        requests,
        tokens: 10 * requests,
        cost_nano: 7 * requests as i64,
    };
    let (a, b) = (a_key(), a_key());
    // Two leases of one key and one of another, given back together.
    for (key, id, size) in [(&a, "A1", 4), (&a, "A2", 6), (&b, "B1", 5)] {
        let d = admit(store, key, &limits, &lease(size), id, NOON).await;
        assert_eq!(d.refused, None);
    }
    let used = |requests: u64| Reservation {
        requests,
        tokens: 3 * requests,
        cost_nano: 2 * requests as i64,
    };
    let settle = |id: &'static str, size: u64, served: u64| Settle {
        reservation_id: id,
        admitted_sec: NOON,
        month: MONTH,
        reserved: lease(size),
        actual: used(served),
    };
    store
        .settle_all(&[
            (std::slice::from_ref(&a), settle("A1", 4, 1)),
            (std::slice::from_ref(&b), settle("B1", 5, 5)),
            (std::slice::from_ref(&a), settle("A2", 6, 2)),
        ])
        .await
        .unwrap();
    let c = store.quota_counters(&a, NOON + 1, MONTH).await.unwrap();
    assert_eq!(
        (
            c.day_requests,
            c.day_tokens,
            c.in_flight,
            c.month_spend_nano
        ),
        (3, 9, 0, 6)
    );
    let c = store.quota_counters(&b, NOON + 1, MONTH).await.unwrap();
    assert_eq!(
        (
            c.day_requests,
            c.day_tokens,
            c.in_flight,
            c.month_spend_nano
        ),
        (5, 15, 0, 10)
    );
}

contract!(
    a_renewed_slot_outlives_its_first_expiry,
    renewed_slot_outlives_its_first_expiry
);

async fn renewed_slot_outlives_its_first_expiry(store: &dyn Store) {
    let key = a_key();
    let limits = Limits::default();
    admit(store, &key, &limits, &one(1), "long", NOON).await;
    store
        .refresh(
            std::slice::from_ref(&key),
            &Refresh {
                reservation_id: "long",
                slots: 1,
                now_sec: NOON + 50,
                slot_ttl_secs: 60,
            },
        )
        .await
        .unwrap();
    let c = store.quota_counters(&key, NOON + 100, MONTH).await.unwrap();
    assert_eq!((c.in_flight, c.next_slot_expiry), (1, Some(NOON + 110)));
    let c = store.quota_counters(&key, NOON + 110, MONTH).await.unwrap();
    assert_eq!(c.in_flight, 0, "not renewed again: it runs out");
}

contract!(a_charge_counts_once_by_its_id, charge_counts_once);

async fn charge_counts_once(store: &dyn Store) {
    let key = a_key();
    let charge = Charge {
        id: "outage-1",
        at_sec: NOON - 5,
        month: MONTH,
        amount: Reservation {
            requests: 1,
            tokens: 30,
            cost_nano: 900,
        },
        now_sec: NOON,
    };
    let ledgers = std::slice::from_ref(&key);
    assert!(store.charge(ledgers, &charge).await.unwrap());
    assert!(!store.charge(ledgers, &charge).await.unwrap(), "a repeat");
    let c = store.quota_counters(&key, NOON, MONTH).await.unwrap();
    assert_eq!(
        (c.day_requests, c.day_tokens, c.month_spend_nano),
        (1, 30, 900)
    );
    assert_eq!(c.minute.iter().map(|b| b.tokens).sum::<u64>(), 30);
}

contract!(month_spends_read_every_ledger_at_once, month_spends_case);

async fn month_spends_case(store: &dyn Store) {
    let (spender, idle) = (a_key(), a_key());
    let charge = |id, cost_nano| Charge {
        id,
        at_sec: NOON - 5,
        month: MONTH,
        amount: Reservation {
            requests: 1,
            tokens: 10,
            cost_nano,
        },
        now_sec: NOON,
    };
    let tenant = sluice_policies::tenants::ledger_of(&a_key());
    let both = [spender.clone(), tenant.clone()];
    assert!(store.charge(&both, &charge("a", 700)).await.unwrap());
    assert!(store.charge(&both, &charge("b", 50)).await.unwrap());
    let ledgers = [idle.clone(), spender.clone(), tenant.clone(), spender];
    assert_eq!(
        store.month_spends(&ledgers, NOON, MONTH).await.unwrap(),
        [0, 750, 750, 750],
        "in the order asked, a ledger never charged at 0"
    );
    assert_eq!(
        store.month_spends(&ledgers, NOON, "2026-01").await.unwrap(),
        [0, 0, 0, 0],
        "another month's spend is its own"
    );
    assert!(store
        .month_spends(&[], NOON, MONTH)
        .await
        .unwrap()
        .is_empty());
}

contract!(
    traffic_buckets_add_up_what_each_replica_counted,
    traffic_case
);

async fn traffic_case(store: &dyn Store) {
    let counts = |pairs: &[(&str, u64)]| -> std::collections::BTreeMap<String, u64> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
    };
    // Two replicas' shares of one bucket add up field by field; other buckets are apart.
    let now = NOON;
    store
        .add_traffic(now, &counts(&[("requests", 3), ("status:200", 3)]), 3600)
        .await
        .unwrap();
    store
        .add_traffic(now, &counts(&[("requests", 2), ("status:429", 2)]), 3600)
        .await
        .unwrap();
    store
        .add_traffic(now + 10, &counts(&[("requests", 1)]), 3600)
        .await
        .unwrap();
    let read = store.traffic(now - 5, now + 15, 5).await.unwrap();
    assert_eq!(
        read,
        vec![
            (
                now,
                counts(&[("requests", 5), ("status:200", 3), ("status:429", 2)])
            ),
            (now + 10, counts(&[("requests", 1)])),
        ],
        "buckets that hold anything, oldest first"
    );
    assert_eq!(
        store.traffic(now + 15, now + 60, 5).await.unwrap(),
        vec![],
        "nothing after"
    );
}

fn usage_event(id: &str, time_ms: i64) -> UsageEvent {
    serde_json::from_value(serde_json::json!({
        "id": id, "time_ms": time_ms, "request_id": format!("req-{id}"), "key_id": "key",
        "tenant": "t", "tier": "pro", "model": "m", "backend": "b",
        "route": "/v1/chat/completions", "prompt_tokens": 1, "completion_tokens": 2,
        "cached_tokens": 0, "cache_status": "miss", "status": 200, "latency_ms": 1,
        "ttft_ms": null, "client_disconnected": false, "usage_reported": true,
        "usage_source": "reported",
    }))
    .unwrap()
}

contract!(
    usage_pages_cover_a_range_once_in_time_order,
    usage_pages_case
);

/// Reading a range page by page (pages smaller than the events of one millisecond, events
/// written between pages) gives every event of the range once, in time order, and nothing
/// outside it.
async fn usage_pages_case(store: &dyn Store) {
    let mut events = vec![usage_event("before", 999), usage_event("after", 2000)];
    // 25 events in one millisecond, more than three pages of them.
    events.extend((0..25).map(|i| usage_event(&format!("same-{i:02}"), 1000)));
    events.extend((1..=10).map(|i| usage_event(&format!("later-{i}"), 1000 + i)));
    store.append_usage(&events).await.unwrap();
    let mut read = Vec::new();
    let mut cursor = None;
    let mut pages = 0;
    loop {
        let (page, next) = store
            .usage_events_page(1000, 2000, cursor, 7)
            .await
            .unwrap();
        assert!(page.len() <= 7);
        read.extend(page);
        pages += 1;
        if pages == 2 {
            // Written while the range is being read, in the millisecond being paged.
            store
                .append_usage(&[usage_event("same-00a", 1000), usage_event("same-99", 1000)])
                .await
                .unwrap();
        }
        match next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    let ids: Vec<&str> = read.iter().map(|e| e.id.as_str()).collect();
    let unique: std::collections::HashSet<&str> = ids.iter().copied().collect();
    assert_eq!(unique.len(), ids.len(), "an event read twice: {ids:?}");
    for e in &events[2..] {
        assert!(unique.contains(e.id.as_str()), "{} missing: {ids:?}", e.id);
    }
    assert!(!unique.contains("before") && !unique.contains("after"));
    assert!(read.windows(2).all(|w| w[0].time_ms <= w[1].time_ms));
    // The whole range in one call is the same events.
    let all = store.usage_events(1000, 2000).await.unwrap();
    let all_ids: std::collections::HashSet<&str> = all.iter().map(|e| e.id.as_str()).collect();
    assert!(unique.is_subset(&all_ids));
    assert_eq!(all.len(), all_ids.len());
}

contract!(
    a_tenants_usage_purge_takes_its_events_only,
    usage_purge_case
);

/// A data-deletion request deletes one tenant's events and no other's, and a replay of a
/// deleted event does not bring it back (its id stays counted).
async fn usage_purge_case(store: &dyn Store) {
    let of = |id: &str, tenant: &str, time_ms: i64| {
        let mut e = usage_event(id, time_ms);
        e.tenant = tenant.into();
        e
    };
    let events = vec![
        of("a1", "acme", 1000),
        of("g1", "globex", 1001),
        of("a2", "acme", 1002),
    ];
    store.append_usage(&events).await.unwrap();
    assert_eq!(store.purge_usage("acme").await.unwrap(), 2);
    assert_eq!(store.purge_usage("nobody").await.unwrap(), 0);
    let left = store.usage_events(0, i64::MAX).await.unwrap();
    assert_eq!(left, vec![events[1].clone()]);
    assert_eq!(store.append_usage(&events[..1]).await.unwrap(), 0);
    assert_eq!(store.usage_events(0, i64::MAX).await.unwrap().len(), 1);
}

contract!(
    captured_conversations_page_in_order_within_retention,
    captures_case
);

async fn captures_case(store: &dyn Store) {
    use sluice_gateway::store::Retention;
    let keep_all = Retention {
        oldest_ms: 0,
        max_records: 1_000,
    };
    assert!(store.captures_page(None, 10).await.unwrap().is_empty());
    let entries: Vec<Vec<u8>> = (0..7)
        .map(|i| format!("{{\"n\":{i}}}").into_bytes())
        .collect();
    store
        .append_captures(&entries[..3], &keep_all)
        .await
        .unwrap();
    store
        .append_captures(&entries[3..], &keep_all)
        .await
        .unwrap();

    // Paged from the oldest, in the order appended, each page after the last id.
    let first = store.captures_page(None, 4).await.unwrap();
    let rest = store
        .captures_page(Some(&first.last().unwrap().0), 10)
        .await
        .unwrap();
    let read: Vec<Vec<u8>> = first.iter().chain(&rest).map(|(_, e)| e.clone()).collect();
    assert_eq!(read, entries);
    let ids: Vec<String> = first
        .iter()
        .chain(&rest)
        .map(|(id, _)| id.clone())
        .collect();

    // Deleting answers how many were there; an unknown id counts nothing, a malformed one
    // is an error, not a silent no-op.
    let gone = vec![ids[1].clone(), ids[4].clone(), "1-999".to_owned()];
    assert_eq!(store.delete_captures(&gone).await.unwrap(), 2);
    assert_eq!(store.delete_captures(&gone).await.unwrap(), 0);
    assert!(store.delete_captures(&["x".to_owned()]).await.is_err());
    assert!(store.captures_page(Some("x"), 10).await.is_err());
    let left = store.captures_page(None, 10).await.unwrap();
    assert_eq!(left.len(), 5);

    // The newest max_records stay.
    let few = Retention {
        oldest_ms: 0,
        max_records: 3,
    };
    store.append_captures(&entries[..1], &few).await.unwrap();
    let kept: Vec<String> = store
        .captures_page(None, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(kept.len(), 3);
    assert_eq!(kept[..2], [ids[5].clone(), ids[6].clone()]);

    // Entries appended before oldest_ms go.
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let newest_ms: i64 = kept[2].split('-').next().unwrap().parse().unwrap();
    let recent = Retention {
        oldest_ms: newest_ms + 1,
        max_records: 1_000,
    };
    store.append_captures(&entries[6..], &recent).await.unwrap();
    let after = store.captures_page(None, 10).await.unwrap();
    assert_eq!(after.len(), 1, "only the entry appended now is recent");
    assert_eq!(after[0].1, entries[6]);
}
