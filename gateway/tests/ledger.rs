//! The PostgreSQL usage ledger on a real PostgreSQL (SLUICE_TEST_POSTGRES_URL, default the
//! local server), each test in a database of its own: events counted once however they are
//! delivered (again, concurrently, twice in one batch), rollups that agree with the raw
//! events, monthly partitions, retention, a tenant's purge, and month-to-date spend.

use sluice_gateway::billing::parse_time;
use sluice_gateway::clock::Month;
use sluice_gateway::ledger::{Ledger, LedgerConfig, Rollup};
use sluice_gateway::usage::{UsageEvent, UsageSource};
use sluice_policies::pricing::PriceBook;
use std::sync::Arc;
use std::time::Duration;

mod common;
use common::TestDatabase;

fn event(
    n: u64,
    key: &str,
    tenant: &str,
    time_ms: i64,
    prompt: u64,
    completion: u64,
) -> UsageEvent {
    UsageEvent {
        id: format!("ev-{n}"),
        time_ms,
        request_id: format!("req-{n}"),
        key_id: key.into(),
        tenant: tenant.into(),
        tier: "pro".into(),
        model: "m".into(),
        backend: "b".into(),
        route: "chat_completions".into(),
        prompt_tokens: prompt,
        completion_tokens: completion,
        cached_tokens: 0,
        cache_status: "miss".into(),
        status: 200,
        latency_ms: 12,
        ttft_ms: Some(3),
        client_disconnected: false,
        usage_reported: true,
        usage_source: UsageSource::Reported,
    }
}

fn prices() -> PriceBook {
    #[derive(serde::Deserialize)]
    struct File {
        prices: PriceBook,
    }
    let file: File = toml::from_str(
        r#"
        [[prices]]
        model = "m"
        tier = "*"
        currency = "USD"
        input = "1.00"
        output = "3.00"
        "#,
    )
    .unwrap();
    file.prices
}

fn ledger(db: &TestDatabase, retention: Option<Duration>) -> Arc<Ledger> {
    let config = LedgerConfig {
        url: db.url.clone(),
        pool: 4,
        retention,
    };
    Arc::new(Ledger::new(&config, prices()).unwrap())
}

async fn all_events(ledger: &Ledger) -> Vec<UsageEvent> {
    let mut all = Vec::new();
    let mut after = None;
    loop {
        let (page, next) = ledger
            .events_page(i64::MIN, i64::MAX, after, 7)
            .await
            .unwrap();
        all.extend(page);
        match next {
            Some(next) => after = Some(next),
            None => return all,
        }
    }
}

async fn all_rollups(ledger: &Ledger) -> Vec<Rollup> {
    let mut all = Vec::new();
    let mut after = None;
    loop {
        let (page, next) = ledger
            .rollups_page("1970-01-01", "9999-01-01", after, 3)
            .await
            .unwrap();
        all.extend(page);
        match next {
            Some(next) => after = Some(next),
            None => return all,
        }
    }
}

/// What the rollups must hold: the raw events summed by day, key, model, tier and tenant.
fn summed(events: &[UsageEvent]) -> Vec<(String, String, u64, u64, u64)> {
    let mut sums = std::collections::BTreeMap::new();
    for e in events {
        let s = sums
            .entry((
                sluice_gateway::clock::day_label(e.time_ms),
                e.key_id.clone(),
            ))
            .or_insert((0, 0, 0));
        s.0 += 1;
        s.1 += e.prompt_tokens;
        s.2 += e.completion_tokens;
    }
    sums.into_iter()
        .map(|((day, key), (n, p, c))| (day, key, n, p, c))
        .collect()
}

fn rolled(rollups: &[Rollup]) -> Vec<(String, String, u64, u64, u64)> {
    rollups
        .iter()
        .map(|r| {
            (
                r.day.clone(),
                r.key_id.clone(),
                r.requests,
                r.prompt_tokens,
                r.completion_tokens,
            )
        })
        .collect()
}

#[tokio::test]
async fn events_count_once_however_delivered_and_rollups_agree() {
    let db = TestDatabase::create().await;
    let ledger = ledger(&db, None);
    let day = 86_400_000;
    let start = parse_time("t", "2026-11-30T22:00:00Z").unwrap();
    // Across a day and a month boundary, two keys, every event delivered several times.
    let events: Vec<UsageEvent> = (0..60)
        .map(|n| {
            let key = if n % 3 == 0 { "k1" } else { "k2" };
            event(n, key, "acme", start + (n as i64) * day / 20, 10 + n, n)
        })
        .collect();
    assert_eq!(ledger.insert(&events[..40]).await.unwrap(), 40);
    // Again, overlapping, with one event twice in the same batch.
    let mut again = events[30..].to_vec();
    again.push(events[45].clone());
    assert_eq!(ledger.insert(&again).await.unwrap(), 20);
    // Three "replicas" delivering the same batch at once.
    let racing = (0..3).map(|_| {
        let (ledger, batch) = (ledger.clone(), events.clone());
        tokio::spawn(async move { ledger.insert(&batch).await.unwrap() })
    });
    let new: usize = futures::future::join_all(racing)
        .await
        .into_iter()
        .map(Result::unwrap)
        .sum();
    assert_eq!(new, 0);

    let stored = all_events(&ledger).await;
    assert_eq!(stored.len(), events.len(), "each event once");
    let mut expected = events.clone();
    expected.sort_by(|a, b| (a.time_ms, &a.id).cmp(&(b.time_ms, &b.id)));
    assert_eq!(stored, expected, "events read back whole, in time order");
    assert_eq!(rolled(&all_rollups(&ledger).await), summed(&events));

    // A value PostgreSQL's text cannot hold does not make the batch fail for ever.
    let mut odd = event(1000, "k1", "acme", start, 1, 1);
    odd.request_id = "nul\0inside".into();
    assert_eq!(ledger.insert(&[odd]).await.unwrap(), 1);
}

#[tokio::test]
async fn months_are_partitions_and_retention_drops_raw_events_but_keeps_rollups() {
    let db = TestDatabase::create().await;
    let day = 86_400_000i64;
    let now = sluice_gateway::clock::now_ms();
    let old = now - 100 * day;
    let recent = now - day;
    let keep_all = ledger(&db, None);
    let events = vec![
        event(1, "k", "acme", old, 5, 5),
        event(2, "k", "acme", recent, 7, 7),
    ];
    assert_eq!(keep_all.insert(&events).await.unwrap(), 2);
    let partitions = |db: &TestDatabase| {
        let url = db.url.clone();
        async move {
            use sqlx::Connection;
            let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
            let mut names: Vec<String> = sqlx::query_scalar(
                "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
                 WHERE i.inhparent = 'usage_events'::regclass",
            )
            .fetch_all(&mut conn)
            .await
            .unwrap();
            names.sort();
            names
        }
    };
    let months: std::collections::BTreeSet<String> = [old, recent]
        .iter()
        .map(|&t| {
            let m = Month::of_ms(t);
            format!("usage_events_y{:04}m{:02}", m.year, m.month)
        })
        .collect();
    assert_eq!(
        partitions(&db).await,
        months.iter().cloned().collect::<Vec<_>>()
    );

    // 30 days of raw events: the old month's partition goes, its rollup stays.
    let retaining = ledger(&db, Some(Duration::from_secs(30 * 86_400)));
    let dropped = retaining.expire(now).await.unwrap();
    assert!(dropped >= 1);
    let left = all_events(&retaining).await;
    assert_eq!(left, vec![events[1].clone()]);
    assert_eq!(partitions(&db).await.len(), months.len() - dropped);
    assert_eq!(rolled(&all_rollups(&retaining).await), summed(&events));

    // An event older than retention (a very late replay) is not taken: its rollup may
    // already hold it.
    assert_eq!(retaining.insert(&events[..1]).await.unwrap(), 0);
    assert_eq!(rolled(&all_rollups(&retaining).await), summed(&events));
    // A replica whose partition list is stale (it saw the dropped month) still writes.
    let late_but_kept = event(3, "k", "acme", now - 29 * day, 1, 1);
    assert_eq!(keep_all.insert(&[late_but_kept]).await.unwrap(), 1);
}

#[tokio::test]
async fn a_tenants_purge_takes_its_events_and_rollups_only() {
    let db = TestDatabase::create().await;
    let ledger = ledger(&db, None);
    let t = parse_time("t", "2026-11-10").unwrap();
    let events = vec![
        event(1, "a1", "acme", t, 1, 1),
        event(2, "a2", "acme", t + 1, 2, 2),
        event(3, "g1", "globex", t + 2, 3, 3),
    ];
    ledger.insert(&events).await.unwrap();
    assert_eq!(ledger.purge_tenant("acme").await.unwrap(), (2, 2));
    assert_eq!(all_events(&ledger).await, vec![events[2].clone()]);
    let rollups = all_rollups(&ledger).await;
    assert_eq!(rollups.len(), 1);
    assert_eq!(rollups[0].tenant, "globex");
    assert_eq!(ledger.purge_tenant("nobody").await.unwrap(), (0, 0));
}

#[tokio::test]
async fn month_to_date_spend_is_rebuilt_from_rollups() {
    let db = TestDatabase::create().await;
    let ledger = ledger(&db, None);
    let nov = parse_time("t", "2026-11-05").unwrap();
    let dec = parse_time("t", "2026-12-02").unwrap();
    // 1,000 prompt tokens at $1/M and 1,000 completion at $3/M: $0.004 = 4,000,000 nano.
    ledger
        .insert(&[
            event(1, "k", "acme", nov, 1000, 1000),
            event(2, "k", "acme", nov + 1, 1000, 1000),
            event(3, "k", "acme", dec, 1000, 1000),
            event(4, "j", "acme", dec + 5, 2000, 0),
        ])
        .await
        .unwrap();
    let mut spend = ledger.month_spend(&Month::of_ms(nov)).await.unwrap();
    spend.sort();
    assert_eq!(spend, vec![("k".to_owned(), "acme".to_owned(), 8_000_000)]);
    let mut spend = ledger.month_spend(&Month::of_ms(dec)).await.unwrap();
    spend.sort();
    assert_eq!(
        spend,
        vec![
            ("j".to_owned(), "acme".to_owned(), 2_000_000),
            ("k".to_owned(), "acme".to_owned(), 4_000_000)
        ]
    );
    let rollups = all_rollups(&ledger).await;
    let billed: u64 = rollups.iter().map(|r| r.billed.output).sum();
    assert_eq!(billed, 3000);
}

#[tokio::test]
async fn a_ledger_that_cannot_be_reached_is_an_error_not_a_hang() {
    // Nothing listens on port 9 (discard) on loopback.
    let config = LedgerConfig {
        url: "postgres://postgres@127.0.0.1:9/none".into(),
        pool: 1,
        retention: None,
    };
    let ledger = Ledger::new(&config, prices()).unwrap();
    assert!(ledger.insert(&[event(1, "k", "t", 1, 1, 1)]).await.is_err());
    assert!(ledger.month_spend(&Month::of_ms(1)).await.is_err());
}
