//! The ledger's statements, and a batch of events as the columns they bind.

use super::LedgerError;
use crate::clock::{day_label, Month};
use crate::usage::UsageEvent;
use rust_decimal::Decimal;
use sluice_policies::pricing::TokenCounts;
use sqlx::postgres::PgPool;

/// The advisory lock that creating and dropping partitions take (any number, chosen once:
/// "sluice" in ASCII).
pub(super) const PARTITION_LOCK: i64 = 0x736c_7569_6365;

/// `usage_events_y2026m12`: a month's partition.
pub(super) fn partition_name(month: &Month) -> String {
    format!("usage_events_y{:04}m{:02}", month.year, month.month)
}

/// The month a partition of ours holds, from its name.
pub(super) fn month_of_partition(name: &str) -> Option<Month> {
    let rest = name.strip_prefix("usage_events_y")?;
    let (year, month) = rest.split_once('m')?;
    let (year, month): (i32, u8) = (year.parse().ok()?, month.parse().ok()?);
    let month = time::Month::try_from(month).ok()?;
    let first = time::Date::from_calendar_date(year, month, 1).ok()?;
    let ms = (first.midnight().assume_utc().unix_timestamp_nanos() / 1_000_000) as i64;
    Some(Month::of_ms(ms))
}

/// The partitions of `usage_events`.
pub(super) const PARTITIONS: &str = "SELECT c.relname::text FROM pg_inherits i \
     JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'usage_events'::regclass";

/// Inserts a batch given as one array per column, and adds what was new to the rollups;
/// answers how many events were new. The rollup statement joins the input with what the
/// insert returned, so an event that was already there adds nothing.
const INSERT: &str = r#"
WITH input AS (
    SELECT * FROM UNNEST(
        $1::text[], $2::int8[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
        $8::text[], $9::text[], $10::numeric[], $11::numeric[], $12::numeric[], $13::text[],
        $14::int4[], $15::int8[], $16::int8[], $17::bool[], $18::bool[], $19::text[],
        $20::text[], $21::numeric[], $22::numeric[], $23::numeric[], $24::numeric[]
    ) AS t(id, time_ms, request_id, key_id, tenant, tier, model, backend, route,
           prompt_tokens, completion_tokens, cached_tokens, cache_status, status,
           latency_ms, ttft_ms, client_disconnected, usage_reported, usage_source,
           day, billed_input, billed_output, billed_cached, spend_nano)
), inserted AS (
    INSERT INTO usage_events (id, time_ms, request_id, key_id, tenant, tier, model, backend,
        route, prompt_tokens, completion_tokens, cached_tokens, cache_status, status,
        latency_ms, ttft_ms, client_disconnected, usage_reported, usage_source)
    SELECT id, time_ms, request_id, key_id, tenant, tier, model, backend, route,
        prompt_tokens, completion_tokens, cached_tokens, cache_status, status, latency_ms,
        ttft_ms, client_disconnected, usage_reported, usage_source
    FROM input
    ON CONFLICT DO NOTHING
    RETURNING time_ms, id
), rolled AS (
    INSERT INTO usage_rollups AS r (day, key_id, model, tier, tenant, requests,
        prompt_tokens, completion_tokens, cached_tokens, billed_input, billed_output,
        billed_cached, spend_nano)
    SELECT i.day::date, i.key_id, i.model, i.tier, i.tenant, count(*), sum(i.prompt_tokens),
        sum(i.completion_tokens), sum(i.cached_tokens), sum(i.billed_input),
        sum(i.billed_output), sum(i.billed_cached), sum(i.spend_nano)
    FROM input i JOIN inserted n ON n.time_ms = i.time_ms AND n.id = i.id
    GROUP BY i.day, i.key_id, i.model, i.tier, i.tenant
    ON CONFLICT (day, key_id, model, tier, tenant) DO UPDATE SET
        requests = r.requests + EXCLUDED.requests,
        prompt_tokens = r.prompt_tokens + EXCLUDED.prompt_tokens,
        completion_tokens = r.completion_tokens + EXCLUDED.completion_tokens,
        cached_tokens = r.cached_tokens + EXCLUDED.cached_tokens,
        billed_input = r.billed_input + EXCLUDED.billed_input,
        billed_output = r.billed_output + EXCLUDED.billed_output,
        billed_cached = r.billed_cached + EXCLUDED.billed_cached,
        spend_nano = r.spend_nano + EXCLUDED.spend_nano
)
SELECT count(*) FROM inserted
"#;

pub(super) const EVENTS_PAGE: &str = "SELECT id, time_ms, request_id, key_id, tenant, tier, \
     model, backend, route, prompt_tokens, completion_tokens, cached_tokens, cache_status, \
     status, latency_ms, ttft_ms, client_disconnected, usage_reported, usage_source \
     FROM usage_events WHERE time_ms >= $1 AND time_ms < $2 AND (time_ms, id) > ($3, $4) \
     ORDER BY time_ms, id LIMIT $5";

pub(super) const ROLLUPS_PAGE: &str = "SELECT day::text AS day, key_id, model, tier, tenant, \
     requests, prompt_tokens, completion_tokens, cached_tokens, billed_input, billed_output, \
     billed_cached, spend_nano FROM usage_rollups \
     WHERE day >= $1::date AND day < $2::date \
       AND ($3 OR (day, key_id, model, tier, tenant) > ($4::date, $5, $6, $7, $8)) \
     ORDER BY day, key_id, model, tier, tenant LIMIT $9";

pub(super) const MONTH_SPEND: &str = "SELECT key_id, tenant, sum(spend_nano) AS spend_nano \
     FROM usage_rollups WHERE day >= $1::date AND day < $2::date GROUP BY key_id, tenant";

/// A value as PostgreSQL's `text` can hold it: it refuses NUL characters, and one such
/// value would make its whole batch fail on every retry.
fn text(value: &str) -> String {
    value.replace('\0', "\u{fffd}")
}

/// A batch of events, a column at a time (what `UNNEST` takes).
#[derive(Default)]
pub(super) struct Columns {
    id: Vec<String>,
    pub(super) time_ms: Vec<i64>,
    request_id: Vec<String>,
    key_id: Vec<String>,
    tenant: Vec<String>,
    tier: Vec<String>,
    model: Vec<String>,
    backend: Vec<String>,
    route: Vec<String>,
    prompt_tokens: Vec<Decimal>,
    completion_tokens: Vec<Decimal>,
    cached_tokens: Vec<Decimal>,
    cache_status: Vec<String>,
    status: Vec<i32>,
    latency_ms: Vec<i64>,
    ttft_ms: Vec<Option<i64>>,
    client_disconnected: Vec<bool>,
    usage_reported: Vec<bool>,
    usage_source: Vec<String>,
    day: Vec<String>,
    billed_input: Vec<Decimal>,
    billed_output: Vec<Decimal>,
    billed_cached: Vec<Decimal>,
    spend_nano: Vec<Decimal>,
}

impl Columns {
    pub(super) fn with_capacity(n: usize) -> Columns {
        Columns {
            id: Vec::with_capacity(n),
            time_ms: Vec::with_capacity(n),
            ..Columns::default()
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.id.is_empty()
    }

    pub(super) fn push(&mut self, e: &UsageEvent, billed: TokenCounts, spend_nano: i64) {
        let millis = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.id.push(text(&e.id));
        self.time_ms.push(e.time_ms);
        self.request_id.push(text(&e.request_id));
        self.key_id.push(text(&e.key_id));
        self.tenant.push(text(&e.tenant));
        self.tier.push(text(&e.tier));
        self.model.push(text(&e.model));
        self.backend.push(text(&e.backend));
        self.route.push(text(&e.route));
        self.prompt_tokens.push(Decimal::from(e.prompt_tokens));
        self.completion_tokens
            .push(Decimal::from(e.completion_tokens));
        self.cached_tokens.push(Decimal::from(e.cached_tokens));
        self.cache_status.push(text(&e.cache_status));
        self.status.push(i32::from(e.status));
        self.latency_ms.push(millis(e.latency_ms));
        self.ttft_ms.push(e.ttft_ms.map(millis));
        self.client_disconnected.push(e.client_disconnected);
        self.usage_reported.push(e.usage_reported);
        self.usage_source.push(e.usage_source.as_str().to_owned());
        self.day.push(day_label(e.time_ms));
        self.billed_input.push(Decimal::from(billed.input));
        self.billed_output.push(Decimal::from(billed.output));
        self.billed_cached.push(Decimal::from(billed.cached));
        self.spend_nano.push(Decimal::from(spend_nano));
    }

    /// Inserts the batch; how many events were new.
    pub(super) async fn insert(&self, pool: &PgPool) -> Result<usize, LedgerError> {
        let new: i64 = sqlx::query_scalar(INSERT)
            .bind(&self.id)
            .bind(&self.time_ms)
            .bind(&self.request_id)
            .bind(&self.key_id)
            .bind(&self.tenant)
            .bind(&self.tier)
            .bind(&self.model)
            .bind(&self.backend)
            .bind(&self.route)
            .bind(&self.prompt_tokens)
            .bind(&self.completion_tokens)
            .bind(&self.cached_tokens)
            .bind(&self.cache_status)
            .bind(&self.status)
            .bind(&self.latency_ms)
            .bind(&self.ttft_ms)
            .bind(&self.client_disconnected)
            .bind(&self.usage_reported)
            .bind(&self.usage_source)
            .bind(&self.day)
            .bind(&self.billed_input)
            .bind(&self.billed_output)
            .bind(&self.billed_cached)
            .bind(&self.spend_nano)
            .fetch_one(pool)
            .await?;
        Ok(new.max(0) as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_names_read_back_as_their_month() {
        let month = Month::of_ms(crate::billing::parse_time("t", "2026-12-15").unwrap());
        let name = partition_name(&month);
        assert_eq!(name, "usage_events_y2026m12");
        assert_eq!(month_of_partition(&name), Some(month));
        assert_eq!(month_of_partition("usage_events_y2026m13"), None);
        assert_eq!(month_of_partition("other_table"), None);
    }
}
