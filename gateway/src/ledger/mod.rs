//! Where does usage live at fleet scale? The PostgreSQL ledger (`[billing] postgres_url`):
//! raw events in a table partitioned by month, and per-day rollups kept in the same
//! statement that inserts the events they count.
//!
//! Every replica writes its own batches (one writer each, no coordination between them):
//! an event is counted once by its id (`ON CONFLICT DO NOTHING`), and only the events a
//! statement really inserted are added to the rollups, so a batch delivered twice (a lost
//! answer, a journal replay, two replicas draining the same buffer) changes nothing the
//! second time. Migrations are versioned (`migrations/`, run by sqlx under an advisory lock,
//! so replicas starting together apply each once) and run before the first write, so a
//! gateway starts while PostgreSQL is down and catches up when it is back.

mod schema;

use crate::clock::{day_label, Month};
use crate::metering::Usage;
use crate::usage::{UsageEvent, UsageSource};
use parking_lot::Mutex;
use rust_decimal::prelude::ToPrimitive;
use rust_decimal::Decimal;
use sluice_policies::pricing::{PriceBook, TokenCounts};
use sqlx::postgres::{PgPool, PgPoolOptions, PgRow};
use sqlx::Row;
use std::collections::HashSet;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("postgres: {0}")]
    Postgres(#[from] sqlx::Error),
    #[error("postgres migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("ledger: {0}")]
    Invalid(String),
}

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("reading the store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("writing the ledger: {0}")]
    Ledger(#[from] LedgerError),
}

/// How the ledger is reached and what it keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerConfig {
    /// `postgres://user@host:port/database`.
    pub url: String,
    /// Connections this replica's pool holds at most.
    pub pool: u32,
    /// How long raw events are kept (rollups are kept for ever); `None`: for ever.
    pub retention: Option<Duration>,
}

/// One day's sums for a key, model, tier and tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rollup {
    /// `YYYY-MM-DD` (UTC).
    pub day: String,
    pub key_id: String,
    pub model: String,
    pub tier: String,
    pub tenant: String,
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cached_tokens: u64,
    /// Tokens of each price kind.
    pub billed: TokenCounts,
    /// What the events counted against the key's monthly budget, in nano-units.
    pub spend_nano: i64,
}

/// Where a page of rollups ended: its last row's primary key.
pub type RollupCursor = (String, String, String, String, String);

/// Where a page of events ended: its last event's time and id.
pub type EventAfter = (i64, String);

pub struct Ledger {
    pool: PgPool,
    prices: PriceBook,
    retention: Option<Duration>,
    migrated: tokio::sync::OnceCell<()>,
    /// Months (their first millisecond) whose partition this replica knows exists.
    partitions: Mutex<HashSet<i64>>,
}

impl Ledger {
    /// A ledger at `config.url`. Nothing is connected yet: the first call connects and
    /// migrates, so a gateway starts (and journals) while PostgreSQL is down.
    pub fn new(config: &LedgerConfig, prices: PriceBook) -> Result<Ledger, LedgerError> {
        let pool = PgPoolOptions::new()
            .max_connections(config.pool.max(1))
            // Fail fast like the Redis store: usage waits in the buffer or the journal, and
            // an export answers 503, rather than stalling behind a dead server.
            .acquire_timeout(Duration::from_secs(2))
            .connect_lazy(&config.url)?;
        Ok(Ledger {
            pool,
            prices,
            retention: config.retention,
            migrated: tokio::sync::OnceCell::new(),
            partitions: Mutex::new(HashSet::new()),
        })
    }

    /// Applies the migrations not yet applied (once per process once it succeeds).
    pub async fn migrate(&self) -> Result<(), LedgerError> {
        self.migrated
            .get_or_try_init(|| async {
                sqlx::migrate!("src/ledger/migrations")
                    .run(&self.pool)
                    .await?;
                Ok::<_, LedgerError>(())
            })
            .await?;
        Ok(())
    }

    /// Adds events (each counted once by its id, however often delivered) and their
    /// rollups, in one statement; returns how many were new. Events older than the
    /// retention period are not taken (their rollups may already hold them, and their raw
    /// rows were let go): they are logged and skipped.
    pub async fn insert(&self, events: &[UsageEvent]) -> Result<usize, LedgerError> {
        self.migrate().await?;
        let horizon = self.horizon_ms(crate::clock::now_ms());
        let mut seen = HashSet::with_capacity(events.len());
        let mut rows = schema::Columns::with_capacity(events.len());
        for event in events {
            if event.time_ms < horizon {
                tracing::warn!(id = %event.id, time_ms = event.time_ms, "usage event older than the ledger's retention; not taken");
                continue;
            }
            // A batch may hold an event twice (the journal and the queue both had it):
            // the rollups must see it once.
            if seen.insert((event.time_ms, event.id.as_str())) {
                let usage = Usage::of_event(event);
                let spend = crate::billing::settled_cost_nano(
                    &self.prices,
                    &event.model,
                    &event.tier,
                    &usage,
                );
                rows.push(event, usage.billable(), spend);
            }
        }
        if rows.is_empty() {
            return Ok(0);
        }
        let months: HashSet<i64> = rows
            .time_ms
            .iter()
            .map(|&t| Month::of_ms(t).start_ms)
            .collect();
        self.ensure_partitions(&months).await?;
        match rows.insert(&self.pool).await {
            Err(LedgerError::Postgres(e)) if is_missing_partition(&e) => {
                // Retention on another replica dropped a month this one thought was there.
                self.partitions.lock().clear();
                self.ensure_partitions(&months).await?;
                rows.insert(&self.pool).await
            }
            other => other,
        }
    }

    fn horizon_ms(&self, now_ms: i64) -> i64 {
        self.retention
            .map_or(i64::MIN, |r| now_ms - r.as_millis() as i64)
    }

    /// Creates the monthly partitions these months need, under an advisory lock so that
    /// replicas creating the same one do not race.
    async fn ensure_partitions(&self, months: &HashSet<i64>) -> Result<(), LedgerError> {
        let missing: Vec<i64> = {
            let known = self.partitions.lock();
            months
                .iter()
                .filter(|m| !known.contains(m))
                .copied()
                .collect()
        };
        if missing.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(schema::PARTITION_LOCK)
            .execute(&mut *tx)
            .await?;
        for &start in &missing {
            let month = Month::of_ms(start);
            // DDL takes no parameters; the name and bounds are numbers this code made.
            let ddl = format!(
                "CREATE TABLE IF NOT EXISTS {} PARTITION OF usage_events FOR VALUES FROM ({}) TO ({})",
                schema::partition_name(&month),
                month.start_ms,
                month.end_ms
            );
            sqlx::query(&ddl).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        self.partitions.lock().extend(missing);
        Ok(())
    }

    /// Up to `limit` events that finished in `[from_ms, to_ms)`, in (time, id) order, after
    /// `after`; and where the page ended (`None`: the range is done).
    pub async fn events_page(
        &self,
        from_ms: i64,
        to_ms: i64,
        after: Option<EventAfter>,
        limit: usize,
    ) -> Result<(Vec<UsageEvent>, Option<EventAfter>), LedgerError> {
        self.migrate().await?;
        let limit = limit.max(1);
        let (after_ms, after_id) = after.unwrap_or((i64::MIN, String::new()));
        let rows = sqlx::query(schema::EVENTS_PAGE)
            .bind(from_ms)
            .bind(to_ms)
            .bind(after_ms)
            .bind(after_id)
            .bind(limit as i64)
            .fetch_all(&self.pool)
            .await?;
        let events = rows
            .iter()
            .map(event_of_row)
            .collect::<Result<Vec<_>, _>>()?;
        let next = (events.len() == limit).then(|| {
            let last = events.last().expect("a full page");
            (last.time_ms, last.id.clone())
        });
        Ok((events, next))
    }

    /// Up to `limit` rollups of the days in `[from_day, to_day)` (`YYYY-MM-DD`), in day, key,
    /// model, tier, tenant order, after `after`.
    pub async fn rollups_page(
        &self,
        from_day: &str,
        to_day: &str,
        after: Option<RollupCursor>,
        limit: usize,
    ) -> Result<(Vec<Rollup>, Option<RollupCursor>), LedgerError> {
        self.migrate().await?;
        let limit = limit.max(1);
        let after = after.unwrap_or_default();
        let rows = sqlx::query(schema::ROLLUPS_PAGE)
            .bind(from_day)
            .bind(to_day)
            // The first page starts after an empty day, which sorts before any date.
            .bind(after.0.is_empty())
            .bind(if after.0.is_empty() {
                from_day
            } else {
                after.0.as_str()
            })
            .bind(&after.1)
            .bind(&after.2)
            .bind(&after.3)
            .bind(&after.4)
            .bind(limit as i64)
            .fetch_all(&self.pool)
            .await?;
        let rollups = rows
            .iter()
            .map(rollup_of_row)
            .collect::<Result<Vec<_>, _>>()?;
        let next = (rollups.len() == limit).then(|| {
            let r = rollups.last().expect("a full page");
            (
                r.day.clone(),
                r.key_id.clone(),
                r.model.clone(),
                r.tier.clone(),
                r.tenant.clone(),
            )
        });
        Ok((rollups, next))
    }

    /// Each key's spend (key id, tenant, nano-units) against its budget in the month that
    /// starts at `month`, from the rollups: what a replica's quota counters are rebuilt from.
    pub async fn month_spend(
        &self,
        month: &Month,
    ) -> Result<Vec<(String, String, i64)>, LedgerError> {
        self.migrate().await?;
        let rows = sqlx::query(schema::MONTH_SPEND)
            .bind(day_label(month.start_ms))
            .bind(day_label(month.end_ms))
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| {
                let spend: Decimal = row.try_get("spend_nano")?;
                Ok((
                    row.try_get("key_id")?,
                    row.try_get("tenant")?,
                    spend.to_i64().unwrap_or(i64::MAX),
                ))
            })
            .collect()
    }

    /// Deletes a tenant's raw events and rollups (a data-deletion request); returns how
    /// many of each went.
    pub async fn purge_tenant(&self, tenant: &str) -> Result<(u64, u64), LedgerError> {
        self.migrate().await?;
        let mut tx = self.pool.begin().await?;
        let events = sqlx::query("DELETE FROM usage_events WHERE tenant = $1")
            .bind(tenant)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        let rollups = sqlx::query("DELETE FROM usage_rollups WHERE tenant = $1")
            .bind(tenant)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        tx.commit().await?;
        Ok((events, rollups))
    }

    /// Lets go of raw events older than the retention period (whole months are dropped as
    /// partitions, the rest deleted); rollups stay. Returns how many months were dropped.
    /// A no-op without a retention period.
    pub async fn expire(&self, now_ms: i64) -> Result<usize, LedgerError> {
        if self.retention.is_none() {
            return Ok(0);
        }
        self.migrate().await?;
        let horizon = self.horizon_ms(now_ms);
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(schema::PARTITION_LOCK)
            .execute(&mut *tx)
            .await?;
        let names: Vec<String> = sqlx::query_scalar(schema::PARTITIONS)
            .fetch_all(&mut *tx)
            .await?;
        let mut dropped = 0;
        for name in names {
            let Some(month) = schema::month_of_partition(&name) else {
                continue;
            };
            if month.end_ms <= horizon {
                sqlx::query(&format!("DROP TABLE IF EXISTS {name}"))
                    .execute(&mut *tx)
                    .await?;
                self.partitions.lock().remove(&month.start_ms);
                dropped += 1;
            }
        }
        sqlx::query("DELETE FROM usage_events WHERE time_ms < $1")
            .bind(horizon)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(dropped)
    }

    /// Copies the usage events a store keeps in `[from_ms, to_ms)` into the ledger, a page at
    /// a time (for turning the ledger on where the store has been the record so far); each
    /// counts once, so running it again adds nothing. Returns (events read, events new).
    pub async fn import_from(
        &self,
        store: &dyn crate::store::Store,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<(u64, u64), ImportError> {
        let (mut read, mut new) = (0, 0);
        let mut cursor = None;
        loop {
            let (page, next) = store.usage_events_page(from_ms, to_ms, cursor, 512).await?;
            read += page.len() as u64;
            new += self.insert(&page).await? as u64;
            match next {
                Some(next) => cursor = Some(next),
                None => return Ok((read, new)),
            }
        }
    }

    /// Runs retention now and then every hour, until the process ends.
    pub async fn run_retention(self: std::sync::Arc<Self>) {
        if self.retention.is_none() {
            return;
        }
        let mut every = tokio::time::interval(Duration::from_secs(3600));
        loop {
            every.tick().await;
            match self.expire(crate::clock::now_ms()).await {
                Ok(0) => {}
                Ok(months) => {
                    tracing::info!(months, "usage ledger: raw events past retention dropped")
                }
                Err(e) => {
                    tracing::warn!(error = %e, "usage ledger retention failed; retried in an hour")
                }
            }
        }
    }
}

/// "no partition of relation found for row": a check violation raised by the partition
/// routing, not by a constraint of ours.
fn is_missing_partition(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .is_some_and(|d| d.code().as_deref() == Some("23514") && d.message().contains("partition"))
}

fn count(row: &PgRow, column: &str) -> Result<u64, sqlx::Error> {
    let value: Decimal = row.try_get(column)?;
    // A sum past u64 (only a backend reporting absurd counts gets there) reads as the most.
    Ok(value.to_u64().unwrap_or(u64::MAX))
}

fn event_of_row(row: &PgRow) -> Result<UsageEvent, LedgerError> {
    let source: String = row.try_get("usage_source")?;
    let usage_source = match source.as_str() {
        "reported" => UsageSource::Reported,
        "estimated" => UsageSource::Estimated,
        "reserved" => UsageSource::Reserved,
        other => {
            return Err(LedgerError::Invalid(format!(
                "unknown usage_source '{other}'"
            )))
        }
    };
    let latency: i64 = row.try_get("latency_ms")?;
    let ttft: Option<i64> = row.try_get("ttft_ms")?;
    let status: i32 = row.try_get("status")?;
    Ok(UsageEvent {
        id: row.try_get("id")?,
        time_ms: row.try_get("time_ms")?,
        request_id: row.try_get("request_id")?,
        key_id: row.try_get("key_id")?,
        tenant: row.try_get("tenant")?,
        tier: row.try_get("tier")?,
        model: row.try_get("model")?,
        backend: row.try_get("backend")?,
        route: row.try_get::<String, _>("route")?.into(),
        prompt_tokens: count(row, "prompt_tokens")?,
        completion_tokens: count(row, "completion_tokens")?,
        cached_tokens: count(row, "cached_tokens")?,
        cache_status: row.try_get::<String, _>("cache_status")?.into(),
        status: u16::try_from(status).unwrap_or(0),
        latency_ms: latency.max(0) as u64,
        ttft_ms: ttft.map(|t| t.max(0) as u64),
        client_disconnected: row.try_get("client_disconnected")?,
        usage_reported: row.try_get("usage_reported")?,
        usage_source,
    })
}

fn rollup_of_row(row: &PgRow) -> Result<Rollup, LedgerError> {
    let spend: Decimal = row.try_get("spend_nano")?;
    let requests: i64 = row.try_get("requests")?;
    Ok(Rollup {
        day: row.try_get("day")?,
        key_id: row.try_get("key_id")?,
        model: row.try_get("model")?,
        tier: row.try_get("tier")?,
        tenant: row.try_get("tenant")?,
        requests: requests.max(0) as u64,
        prompt_tokens: count(row, "prompt_tokens")?,
        completion_tokens: count(row, "completion_tokens")?,
        cached_tokens: count(row, "cached_tokens")?,
        billed: TokenCounts {
            input: count(row, "billed_input")?,
            output: count(row, "billed_output")?,
            cached: count(row, "billed_cached")?,
        },
        spend_nano: spend.to_i64().unwrap_or(i64::MAX),
    })
}
