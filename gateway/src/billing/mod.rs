//! Billing: what usage cost, and the exports finance takes.
//!
//! Costs are computed here, from the stored usage events, and nowhere else: events are
//! priced in time order, and graduated prices are evaluated on each key's running total for
//! the model in the calendar month (UTC) of the event. Because the graduated cost of a month
//! telescopes, the sum of the per-event costs of a period equals the price of its totals,
//! exactly (decimal arithmetic, never floats, no rounding: amounts are printed in full).
//! The same holds for a day's sums priced at once, which is how exports from the ledger's
//! rollups are priced (`source`).

pub mod source;

use crate::clock::{day_label as day_of, utc, Month};
use crate::metering::Usage;
use crate::usage::{UsageEvent, UsageSource};
use rust_decimal::Decimal;
use serde::Serialize;
use sluice_policies::pricing::{ModelPrice, PriceBook, PriceSchedule, TokenCounts};
use sluice_policies::quota;
use sluice_policies::Tiers;
use std::collections::{BTreeMap, HashMap};
use time::{Date, OffsetDateTime};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ExportError {
    #[error("'{value}' is not a date (YYYY-MM-DD) or an RFC 3339 time for '{field}'")]
    BadTime { field: &'static str, value: String },
    #[error("'from' ({from}) must be before 'to' ({to})")]
    EmptyRange { from: String, to: String },
    #[error(
        "unknown group_by '{0}': use key, tenant, model, day, month (comma-separated) or event"
    )]
    BadGroup(String),
    #[error("unknown format '{0}': use csv, jsonl or cloudevents")]
    BadFormat(String),
    #[error("format=cloudevents is one event per line: use it with group_by=event")]
    CloudEventsNeedEvents,
}

/// What to group an export by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dim {
    Key,
    Tenant,
    Model,
    Day,
    Month,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Csv,
    Jsonl,
    /// One CloudEvent per usage event, in OpenMeter's ingest shape (JSON Lines).
    CloudEvents,
}

/// Rows of aggregates, or one row per event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grouping {
    By(Vec<Dim>),
    Events,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportQuery {
    pub from_ms: i64,
    pub to_ms: i64,
    pub grouping: Grouping,
    pub format: Format,
}

/// Parses `YYYY-MM-DD` (midnight UTC) or an RFC 3339 time into unix milliseconds.
pub fn parse_time(field: &'static str, value: &str) -> Result<i64, ExportError> {
    let bad = || ExportError::BadTime {
        field,
        value: value.to_owned(),
    };
    let date_format = time::macros::format_description!("[year]-[month]-[day]");
    let at = match Date::parse(value, &date_format) {
        Ok(date) => date.midnight().assume_utc(),
        Err(_) => OffsetDateTime::parse(value, &time::format_description::well_known::Rfc3339)
            .map_err(|_| bad())?,
    };
    Ok((at.unix_timestamp_nanos() / 1_000_000) as i64)
}

/// A request's cost at the model's first bands, exact, in the price's currency: what its
/// answer says it cost (`x-sluice-cost`), the same as its billing export's cost unless the
/// price is graduated (exports follow each key's month to date). `None`: no price.
pub fn first_band_cost<'p>(
    prices: &'p PriceBook,
    model: &str,
    tier: &str,
    usage: &Usage,
) -> Option<(Decimal, &'p str)> {
    let price = prices.lookup(model, tier)?;
    let cost = price.cost(&TokenCounts::default(), &usage.billable());
    Some((cost, price.currency()))
}

/// What a request's usage counts against its budget, in nano-units rounded up: its
/// [`first_band_cost`] (the budget does not follow graduated bands, which exports do; for
/// prices that fall with volume this over-counts, never under).
pub fn settled_cost_nano(prices: &PriceBook, model: &str, tier: &str, usage: &Usage) -> i64 {
    first_band_cost(prices, model, tier, usage).map_or(0, |(cost, _)| quota::to_nano_ceil(cost))
}

/// The most any one token of each kind can cost under a schedule: its dearest band.
fn dearest(schedule: &PriceSchedule) -> Decimal {
    schedule
        .bands()
        .iter()
        .map(|b| b.per_million.amount())
        .max()
        .unwrap_or(Decimal::ZERO)
}

/// The most `counts` can cost under `price`: every token at its kind's dearest band (what a
/// reservation holds against a budget).
pub fn cost_ceiling(price: &ModelPrice, counts: &TokenCounts) -> Decimal {
    let million = Decimal::from(1_000_000);
    (Decimal::from(counts.input) * dearest(price.input())
        + Decimal::from(counts.output) * dearest(price.output())
        + Decimal::from(counts.cached) * dearest(price.cached()))
        / million
}

impl ExportQuery {
    /// From the query string's values. `to` defaults to now, `from` to the start of `to`'s month.
    pub fn parse(
        from: Option<&str>,
        to: Option<&str>,
        group_by: Option<&str>,
        format: Option<&str>,
        now_ms: i64,
    ) -> Result<ExportQuery, ExportError> {
        let to_ms = to
            .map(|t| parse_time("to", t))
            .transpose()?
            .unwrap_or(now_ms);
        let from_ms = from
            .map(|f| parse_time("from", f))
            .transpose()?
            .unwrap_or_else(|| Month::of_ms(to_ms - 1).start_ms);
        if from_ms >= to_ms {
            return Err(ExportError::EmptyRange {
                from: from.unwrap_or("").to_owned(),
                to: to.unwrap_or("now").to_owned(),
            });
        }
        let grouping = match group_by.unwrap_or("key,model,day") {
            "event" | "events" => Grouping::Events,
            dims => Grouping::By(
                dims.split(',')
                    .map(|d| match d.trim() {
                        "key" => Ok(Dim::Key),
                        "tenant" => Ok(Dim::Tenant),
                        "model" => Ok(Dim::Model),
                        "day" => Ok(Dim::Day),
                        "month" => Ok(Dim::Month),
                        other => Err(ExportError::BadGroup(other.to_owned())),
                    })
                    .collect::<Result<_, _>>()?,
            ),
        };
        let format = match format.unwrap_or("csv") {
            "csv" => Format::Csv,
            "jsonl" | "json" => Format::Jsonl,
            "cloudevents" => Format::CloudEvents,
            other => return Err(ExportError::BadFormat(other.to_owned())),
        };
        if format == Format::CloudEvents && grouping != Grouping::Events {
            return Err(ExportError::CloudEventsNeedEvents);
        }
        Ok(ExportQuery {
            from_ms,
            to_ms,
            grouping,
            format,
        })
    }
}

/// An event with its price.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct PricedEvent {
    #[serde(flatten)]
    pub event: UsageEvent,
    /// Exact decimal.
    #[serde(serialize_with = "exact")]
    #[schema(value_type = String)]
    pub cost: Decimal,
    pub currency: String,
}

/// Prices events one at a time, in time order from the beginning of the first one's month:
/// graduated prices depend on what each key used of the model earlier in the month, which
/// is all a pricer keeps (one entry per key, model and month, however many events pass).
pub struct Pricer<'a> {
    prices: &'a PriceBook,
    tiers: &'a Tiers,
    month_to_date: HashMap<(String, String, String), TokenCounts>,
}

impl<'a> Pricer<'a> {
    pub fn new(prices: &'a PriceBook, tiers: &'a Tiers) -> Self {
        Pricer {
            prices,
            tiers,
            month_to_date: HashMap::new(),
        }
    }

    pub fn price(&mut self, event: UsageEvent) -> PricedEvent {
        let counts = crate::metering::Usage::of_event(&event).billable();
        let (cost, currency) = self.cost(
            &event.key_id,
            &event.model,
            &event.tier,
            event.time_ms,
            &counts,
        );
        PricedEvent {
            event,
            cost,
            currency,
        }
    }

    /// The price of `counts` of a key's use of a model at `time_ms` (an event, or a day's
    /// sums at the day's start), after everything priced before in the same month.
    pub fn cost(
        &mut self,
        key_id: &str,
        model: &str,
        tier: &str,
        time_ms: i64,
        counts: &TokenCounts,
    ) -> (Decimal, String) {
        match self.prices.lookup(model, tier) {
            Some(price) => {
                let month = Month::of_ms(time_ms).label;
                let before = self
                    .month_to_date
                    .entry((key_id.to_owned(), model.to_owned(), month))
                    .or_default();
                let cost = price.cost(before, counts);
                before.input += counts.input;
                before.output += counts.output;
                before.cached += counts.cached;
                (cost, price.currency().to_owned())
            }
            None => {
                let currency = self
                    .tiers
                    .get(tier)
                    .map_or_else(|_| "USD".to_owned(), |t| t.currency.clone());
                (Decimal::ZERO, currency)
            }
        }
    }
}

/// What an aggregate row adds up: one priced event, or a priced day of a rollup.
#[derive(Debug, Clone)]
pub struct Tally<'a> {
    /// The event's time, or the start of the rollup's day.
    pub time_ms: i64,
    pub key_id: &'a str,
    pub tenant: &'a str,
    pub model: &'a str,
    pub currency: &'a str,
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cached_tokens: u64,
    pub cost: Decimal,
}

impl<'a> Tally<'a> {
    pub fn of_event(p: &'a PricedEvent) -> Tally<'a> {
        let e = &p.event;
        Tally {
            time_ms: e.time_ms,
            key_id: &e.key_id,
            tenant: &e.tenant,
            model: &e.model,
            currency: &p.currency,
            requests: 1,
            prompt_tokens: e.prompt_tokens,
            completion_tokens: e.completion_tokens,
            cached_tokens: e.cached_tokens,
            cost: p.cost,
        }
    }
}

/// One aggregate row. Fields of dimensions not grouped by are empty (`null`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Row {
    #[schema(required)]
    pub month: Option<String>,
    #[schema(required)]
    pub day: Option<String>,
    #[schema(required)]
    pub key_id: Option<String>,
    #[schema(required)]
    pub tenant: Option<String>,
    #[schema(required)]
    pub model: Option<String>,
    pub currency: String,
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cached_tokens: u64,
    /// Exact decimal.
    #[serde(serialize_with = "exact")]
    #[schema(value_type = String)]
    pub cost: Decimal,
}

/// An amount printed exactly, without trailing zeros.
fn exact<S: serde::Serializer>(amount: &Decimal, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&amount.normalize())
}

/// What a row is grouped by: month, day, key, tenant, model (each when grouped) and currency.
type GroupKey = (
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    String,
);

/// Sums priced events as they pass: memory grows with the rows, not the events.
pub struct Aggregator<'a> {
    dims: &'a [Dim],
    range: std::ops::Range<i64>,
    rows: BTreeMap<GroupKey, Row>,
}

impl<'a> Aggregator<'a> {
    /// Sums of the events in `[from_ms, to_ms)` by `dims` (and currency); others are skipped.
    pub fn new(dims: &'a [Dim], from_ms: i64, to_ms: i64) -> Self {
        Aggregator {
            dims,
            range: from_ms..to_ms,
            rows: BTreeMap::new(),
        }
    }

    pub fn add(&mut self, p: &PricedEvent) {
        self.add_tally(&Tally::of_event(p));
    }

    pub fn add_tally(&mut self, t: &Tally) {
        if !self.range.contains(&t.time_ms) {
            return;
        }
        let dims = self.dims;
        let pick = |dim: Dim, value: &str| dims.contains(&dim).then(|| value.to_owned());
        let group = (
            dims.contains(&Dim::Month)
                .then(|| Month::of_ms(t.time_ms).label),
            dims.contains(&Dim::Day).then(|| day_of(t.time_ms)),
            pick(Dim::Key, t.key_id),
            pick(Dim::Tenant, t.tenant),
            pick(Dim::Model, t.model),
            t.currency.to_owned(),
        );
        let row = self.rows.entry(group.clone()).or_insert_with(|| Row {
            month: group.0,
            day: group.1,
            key_id: group.2,
            tenant: group.3,
            model: group.4,
            currency: group.5,
            ..Row::default()
        });
        row.requests += t.requests;
        row.prompt_tokens += t.prompt_tokens;
        row.completion_tokens += t.completion_tokens;
        row.cached_tokens += t.cached_tokens;
        row.cost += t.cost;
    }

    /// The rows, in group order.
    pub fn rows(self) -> Vec<Row> {
        self.rows.into_values().collect()
    }
}

pub const CSV_HEADER: [&str; 11] = [
    "month",
    "day",
    "key_id",
    "tenant",
    "model",
    "currency",
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "cost",
];

pub const EVENT_CSV_HEADER: [&str; 22] = [
    "id",
    "time",
    "request_id",
    "key_id",
    "tenant",
    "tier",
    "model",
    "backend",
    "route",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "cache_status",
    "status",
    "latency_ms",
    "ttft_ms",
    "client_disconnected",
    "usage_reported",
    "usage_source",
    "cost",
    "currency",
    "time_ms",
];

/// A text cell as a spreadsheet will read it: one that starts like a formula (`=`, `+`, `-`,
/// `@`, tab or carriage return; a tenant or request id is chosen by someone else) is
/// prefixed with `'`, so that opening an export never runs it (OWASP's CSV injection advice).
/// JSON Lines exports carry values unchanged.
fn text_cell(value: &str) -> String {
    if value.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{value}")
    } else {
        value.to_owned()
    }
}

/// What an export starts with: the CSV header row (nothing for JSON Lines).
pub fn header(query: &ExportQuery) -> Vec<u8> {
    let mut out = Vec::new();
    if query.format == Format::Csv {
        let mut w = csv::Writer::from_writer(&mut out);
        let _ = match query.grouping {
            Grouping::By(_) => w.write_record(CSV_HEADER),
            Grouping::Events => w.write_record(EVENT_CSV_HEADER),
        };
        let _ = w.flush();
    }
    out
}

/// Appends one aggregate row's line to `out`.
pub fn write_row(out: &mut Vec<u8>, r: &Row, format: Format) {
    match format {
        // Refused at parsing (grouped rows are not events); written as JSON Lines anyway.
        Format::Jsonl | Format::CloudEvents => {
            serde_json::to_writer(&mut *out, r).expect("row serializes");
            out.push(b'\n');
        }
        Format::Csv => {
            let cell = |v: &Option<String>| text_cell(v.as_deref().unwrap_or_default());
            let mut w = csv::Writer::from_writer(out);
            let _ = w.write_record([
                cell(&r.month),
                cell(&r.day),
                cell(&r.key_id),
                cell(&r.tenant),
                cell(&r.model),
                text_cell(&r.currency),
                r.requests.to_string(),
                r.prompt_tokens.to_string(),
                r.completion_tokens.to_string(),
                r.cached_tokens.to_string(),
                r.cost.normalize().to_string(),
            ]);
            let _ = w.flush();
        }
    }
}

/// Appends one event's line to `out`.
pub fn write_event(out: &mut Vec<u8>, p: &PricedEvent, format: Format) {
    match format {
        Format::Jsonl => {
            serde_json::to_writer(&mut *out, p).expect("event serializes");
            out.push(b'\n');
        }
        Format::CloudEvents => {
            serde_json::to_writer(
                &mut *out,
                &cloud_event(&p.event, Some((&p.cost, &p.currency))),
            )
            .expect("event serializes");
            out.push(b'\n');
        }
        Format::Csv => {
            let e = &p.event;
            let time = utc(e.time_ms)
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default();
            let mut w = csv::Writer::from_writer(out);
            let _ = w.write_record([
                text_cell(&e.id),
                time,
                text_cell(&e.request_id),
                text_cell(&e.key_id),
                text_cell(&e.tenant),
                text_cell(&e.tier),
                text_cell(&e.model),
                text_cell(&e.backend),
                text_cell(&e.route),
                e.prompt_tokens.to_string(),
                e.completion_tokens.to_string(),
                e.cached_tokens.to_string(),
                text_cell(&e.cache_status),
                e.status.to_string(),
                e.latency_ms.to_string(),
                e.ttft_ms.map(|t| t.to_string()).unwrap_or_default(),
                e.client_disconnected.to_string(),
                e.usage_reported.to_string(),
                e.usage_source.as_str().to_owned(),
                p.cost.normalize().to_string(),
                text_cell(&p.currency),
                e.time_ms.to_string(),
            ]);
            let _ = w.flush();
        }
    }
}

/// The CloudEvents `type` of a usage event: what an OpenMeter meter's `eventType` names.
pub const CLOUD_EVENT_TYPE: &str = "sluice.usage";

/// A usage event as a CloudEvent (spec 1.0) in the shape OpenMeter ingests: the event id as
/// the CloudEvent id (what a consumer deduplicates on), the tenant as the subject (the
/// customer billed), and the figures under `data`.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct UsageCloudEvent<'a> {
    /// Always `1.0`.
    specversion: &'static str,
    id: &'a str,
    /// Always `sluice`.
    source: &'static str,
    /// Always `sluice.usage`.
    r#type: &'static str,
    /// The tenant.
    subject: &'a str,
    /// RFC 3339.
    time: String,
    /// Always `application/json`.
    datacontenttype: &'static str,
    data: UsageCloudEventData<'a>,
}

/// Counts as numbers; with a price, the event's cost as an exact decimal string and its
/// currency (the live feed carries none, since graduated prices depend on the month's
/// whole usage).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct UsageCloudEventData<'a> {
    key_id: &'a str,
    tier: &'a str,
    model: &'a str,
    route: &'a str,
    backend: &'a str,
    request_id: &'a str,
    prompt_tokens: u64,
    completion_tokens: u64,
    total_tokens: u64,
    cached_tokens: u64,
    cache_status: &'a str,
    status: u16,
    usage_source: UsageSource,
    #[serde(skip_serializing_if = "Option::is_none")]
    cost: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    currency: Option<&'a str>,
}

pub fn cloud_event<'a>(
    e: &'a UsageEvent,
    price: Option<(&Decimal, &'a str)>,
) -> UsageCloudEvent<'a> {
    let time = utc(e.time_ms)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    UsageCloudEvent {
        specversion: "1.0",
        id: &e.id,
        source: "sluice",
        r#type: CLOUD_EVENT_TYPE,
        subject: &e.tenant,
        time,
        datacontenttype: "application/json",
        data: UsageCloudEventData {
            key_id: &e.key_id,
            tier: &e.tier,
            model: &e.model,
            route: &e.route,
            backend: &e.backend,
            request_id: &e.request_id,
            prompt_tokens: e.prompt_tokens,
            completion_tokens: e.completion_tokens,
            total_tokens: e.prompt_tokens.saturating_add(e.completion_tokens),
            cached_tokens: e.cached_tokens,
            cache_status: &e.cache_status,
            status: e.status,
            usage_source: e.usage_source,
            cost: price.map(|(cost, _)| cost.normalize().to_string()),
            currency: price.map(|(_, currency)| currency),
        },
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn csv_text_cells_never_start_a_formula() {
        for evil in [
            "=HYPERLINK(\"http://x\")",
            "+1+1",
            "-2+3",
            "@SUM(A1)",
            "\tx",
            "\rx",
        ] {
            let cell = super::text_cell(evil);
            assert_eq!(cell, format!("'{evil}"));
        }
        assert_eq!(super::text_cell("acme"), "acme");
        assert_eq!(super::text_cell(""), "");
    }

    use super::*;

    fn price(events: Vec<UsageEvent>, prices: &PriceBook, tiers: &Tiers) -> Vec<PricedEvent> {
        let mut pricer = Pricer::new(prices, tiers);
        events.into_iter().map(|e| pricer.price(e)).collect()
    }

    fn aggregate(events: &[PricedEvent], dims: &[Dim], from_ms: i64, to_ms: i64) -> Vec<Row> {
        let mut sums = Aggregator::new(dims, from_ms, to_ms);
        events.iter().for_each(|p| sums.add(p));
        sums.rows()
    }

    fn event(key: &str, model: &str, time_ms: i64, prompt: u64, completion: u64) -> UsageEvent {
        UsageEvent::for_test(key, model, time_ms, prompt, completion)
    }

    fn book() -> PriceBook {
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
            input = "0.50"
            output = [ { up_to = 2000, per_million = "2.00" }, { per_million = "1.25" } ]
            "#,
        )
        .unwrap();
        file.prices
    }

    #[test]
    fn graduated_prices_follow_each_keys_month_to_date() {
        let d = |s: &str| Decimal::from_str_exact(s).unwrap();
        let day = 86_400_000;
        let nov = parse_time("t", "2026-11-01").unwrap();
        let dec = parse_time("t", "2026-12-01").unwrap();
        let events = vec![
            event("a", "m", nov + day, 1000, 1500),
            event("a", "m", nov + 2 * day, 0, 1000), // crosses the 2000-token band
            event("b", "m", nov + 2 * day, 0, 1000), // another key starts at zero
            event("a", "m", dec, 0, 1000),           // a new month starts at zero
        ];
        let priced = price(events, &book(), &Tiers::builtin());
        let costs: Vec<Decimal> = priced.iter().map(|p| p.cost).collect();
        assert_eq!(costs, [d("0.0035"), d("0.001625"), d("0.002"), d("0.002")]);
        let months = aggregate(&priced, &[Dim::Month], nov, dec + day);
        let labels: Vec<_> = months.iter().map(|r| r.month.clone().unwrap()).collect();
        assert_eq!(labels, ["2026-11", "2026-12"]);
        assert_eq!(months[0].requests, 3);
        let rows = aggregate(&priced, &[Dim::Key], nov, dec);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].key_id.as_deref(), Some("a"));
        assert_eq!(rows[0].cost, d("0.005125"));
        assert_eq!(rows[0].requests, 2);
    }

    #[test]
    fn query_parsing_defaults_and_errors() {
        let now = parse_time("t", "2026-11-28T12:00:00Z").unwrap();
        let q = ExportQuery::parse(None, None, None, None, now).unwrap();
        assert_eq!(q.from_ms, parse_time("t", "2026-11-01").unwrap());
        assert_eq!(q.to_ms, now);
        assert_eq!(q.format, Format::Csv);
        assert!(matches!(
            ExportQuery::parse(Some("2026-11-02"), Some("2026-11-01"), None, None, now),
            Err(ExportError::EmptyRange { .. })
        ));
        assert!(ExportQuery::parse(None, None, Some("key,colour"), None, now).is_err());
    }
}
