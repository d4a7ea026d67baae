//! What happened to a request? One [`RequestOutcome`], built when the request ends, feeds
//! everything that reports on it: its usage event (billing), its metrics, its trace span and
//! its one access-log line. Nothing here reaches back into the proxy: the outcome carries
//! what they need.

use crate::auth::Identity;
use crate::cache::CacheStatus;
use crate::metering::{Usage, UsageSource};
use crate::request::Route;
use crate::usage::UsageEvent;
use std::borrow::Cow;
use std::time::Duration;

/// How a request ended.
#[derive(Debug)]
pub struct RequestOutcome<'a> {
    pub request_id: &'a str,
    pub method: &'a str,
    /// The client's HTTP version (`HTTP/1.1`, `HTTP/2`).
    pub protocol: &'static str,
    pub route: Option<Route>,
    /// The status the client got (0 when it got none).
    pub status: u16,
    /// The backend's status, when a backend answered.
    pub upstream_status: Option<u16>,
    pub identity: Option<&'a Identity>,
    pub model: &'a str,
    pub stream: bool,
    /// The backend that served it ("" when none did).
    pub backend: &'a str,
    pub cache: Option<CacheStatus>,
    pub usage: Option<Usage>,
    pub usage_source: UsageSource,
    /// Its cost at the price book's first bands, in nano-units of `currency` ("" when the
    /// model has no price).
    pub cost_nano: i64,
    pub currency: &'a str,
    pub client_left: bool,
    pub duration: Duration,
    pub first_byte: Option<Duration>,
    pub retries: u32,
    /// The limit that refused it.
    pub refused_by: Option<&'static str>,
    pub error: Option<String>,
}

impl RequestOutcome<'_> {
    fn served_from_cache(&self) -> bool {
        matches!(self.cache, Some(CacheStatus::Hit | CacheStatus::Semantic))
    }

    /// The usage event of a request a backend (or the response cache) answered; `None` for
    /// everything else.
    pub fn usage_event(&self, time_ms: i64) -> Option<UsageEvent> {
        let status = match self.upstream_status {
            Some(status) => status,
            None if self.served_from_cache() => 200,
            None => return None,
        };
        let identity = self.identity?;
        let usage = self.usage.unwrap_or_default();
        Some(UsageEvent {
            id: crate::request::time_ordered_id(),
            time_ms,
            request_id: self.request_id.to_owned(),
            key_id: identity.key_id.clone(),
            tenant: identity.tenant.clone(),
            tier: identity.tier.clone(),
            model: self.model.to_owned(),
            backend: self.backend.to_owned(),
            route: Cow::Borrowed(self.route.map_or("", Route::name)),
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            cached_tokens: usage.cached_tokens,
            cache_status: Cow::Borrowed(self.cache.unwrap_or(CacheStatus::Miss).as_str()),
            status,
            latency_ms: self.duration.as_millis() as u64,
            ttft_ms: self.first_byte.map(|t| t.as_millis() as u64),
            client_disconnected: self.client_left,
            usage_reported: self.usage_source == UsageSource::Reported,
            usage_source: self.usage_source,
        })
    }

    pub fn record_metrics(&self) {
        let usage = self.usage.unwrap_or_default();
        crate::metrics::get().record_request(&crate::metrics::RequestRecord {
            route: self.route.map_or("unknown", Route::name),
            model: self.model,
            tier: self.identity.map_or("", |i| i.tier.as_str()),
            status: self.status,
            cache: self.cache.map_or("", CacheStatus::as_str),
            duration: self.duration,
            first_byte: self.first_byte,
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            cached_tokens: usage.cached_tokens,
            cost_nano: self.cost_nano,
            currency: self.currency,
            refused_by: self.refused_by,
        });
    }

    /// The request's one `sluice::access` log line. As JSON (stderr not a terminal) it is
    /// formatted here, directly: tracing's JSON formatter gathers every field into a map
    /// first, which cost several microseconds per request; the line is the same.
    pub fn log(&self) {
        if !tracing::enabled!(target: "sluice::access", tracing::Level::INFO) {
            return;
        }
        if sluice_telemetry::json_logs() {
            ACCESS_LINE.with_borrow_mut(|line| {
                line.clear();
                self.write_json_line(line, time::OffsetDateTime::now_utc());
                sluice_telemetry::log_line(line);
            });
            return;
        }
        self.log_with_tracing();
    }

    /// The access line through tracing's formatter (readable text on a terminal).
    fn log_with_tracing(&self) {
        let identity = self.identity;
        let usage = self.usage;
        tracing::info!(
            target: "sluice::access",
            request_id = %self.request_id,
            method = %self.method,
            protocol = self.protocol,
            route = self.route.map_or("unknown", Route::name),
            status = self.status,
            key_id = identity.map_or("", |i| i.key_id.as_str()),
            tenant = identity.map_or("", |i| i.tenant.as_str()),
            tier = identity.map_or("", |i| i.tier.as_str()),
            model = self.model,
            stream = self.stream,
            backend = self.backend,
            prompt_tokens = usage.map_or(0, |u| u.prompt_tokens),
            completion_tokens = usage.map_or(0, |u| u.completion_tokens),
            cached_tokens = usage.map_or(0, |u| u.cached_tokens),
            usage_source = self.usage_source.as_str(),
            cost = %self.cost(),
            currency = self.currency,
            client_left = self.client_left,
            cache = self.cache.map_or("", CacheStatus::as_str),
            duration_ms = self.duration.as_millis() as u64,
            first_byte_ms = self.first_byte.map(|t| t.as_millis() as u64),
            retries = self.retries,
            error = self.error.as_deref(),
            "request"
        );
    }

    fn cost(&self) -> rust_decimal::Decimal {
        rust_decimal::Decimal::new(self.cost_nano, 9).normalize()
    }

    /// The access line as tracing's JSON formatter writes it (same fields, same order), with
    /// its newline.
    fn write_json_line(&self, out: &mut Vec<u8>, now: time::OffsetDateTime) {
        let identity = self.identity;
        let usage = self.usage.unwrap_or_default();
        let mut line = JsonLine(out);
        line.0.extend_from_slice(b"{\"timestamp\":\"");
        write_timestamp(line.0, now);
        line.0
            .extend_from_slice(b"\",\"level\":\"INFO\",\"message\":\"request\"");
        line.str("request_id", self.request_id);
        line.str("method", self.method);
        line.str("protocol", self.protocol);
        line.str("route", self.route.map_or("unknown", Route::name));
        line.num("status", self.status);
        line.str("key_id", identity.map_or("", |i| i.key_id.as_str()));
        line.str("tenant", identity.map_or("", |i| i.tenant.as_str()));
        line.str("tier", identity.map_or("", |i| i.tier.as_str()));
        line.str("model", self.model);
        line.bool("stream", self.stream);
        line.str("backend", self.backend);
        line.num("prompt_tokens", usage.prompt_tokens);
        line.num("completion_tokens", usage.completion_tokens);
        line.num("cached_tokens", usage.cached_tokens);
        line.str("usage_source", self.usage_source.as_str());
        if self.cost_nano == 0 {
            line.str("cost", "0");
        } else {
            line.str("cost", &self.cost().to_string());
        }
        line.str("currency", self.currency);
        line.bool("client_left", self.client_left);
        line.str("cache", self.cache.map_or("", CacheStatus::as_str));
        line.num("duration_ms", self.duration.as_millis() as u64);
        if let Some(first_byte) = self.first_byte {
            line.num("first_byte_ms", first_byte.as_millis() as u64);
        }
        line.num("retries", self.retries);
        if let Some(error) = &self.error {
            line.str("error", error);
        }
        line.str("target", "sluice::access");
        line.0.extend_from_slice(b"}\n");
    }
}

/// `now` as RFC 3339 in UTC to the microsecond (`2026-12-06T07:05:09.123456Z`), written
/// digit by digit: through `write!` it was a fifth of the access line's cost.
fn write_timestamp(out: &mut Vec<u8>, now: time::OffsetDateTime) {
    let digits = |out: &mut Vec<u8>, value: u32, width: u32| {
        for place in (0..width).rev() {
            out.push(b'0' + (value / 10u32.pow(place) % 10) as u8);
        }
    };
    digits(out, now.year().clamp(0, 9999) as u32, 4);
    out.push(b'-');
    digits(out, u8::from(now.month()).into(), 2);
    out.push(b'-');
    digits(out, now.day().into(), 2);
    out.push(b'T');
    digits(out, now.hour().into(), 2);
    out.push(b':');
    digits(out, now.minute().into(), 2);
    out.push(b':');
    digits(out, now.second().into(), 2);
    out.push(b'.');
    digits(out, now.microsecond(), 6);
    out.push(b'Z');
}

thread_local! {
    /// Each proxy thread formats its access lines in one reused buffer.
    static ACCESS_LINE: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(Vec::with_capacity(1024));
}

/// The fields of one JSON object being written, after its first.
struct JsonLine<'a>(&'a mut Vec<u8>);

impl JsonLine<'_> {
    fn key(&mut self, key: &str) {
        self.0.extend_from_slice(b",\"");
        self.0.extend_from_slice(key.as_bytes());
        self.0.extend_from_slice(b"\":");
    }

    fn str(&mut self, key: &str, value: &str) {
        self.key(key);
        // serde_json's escaping, so that any value (a client's request id, an error) stays
        // one valid JSON string.
        let _ = serde_json::to_writer(&mut *self.0, value);
    }

    fn num(&mut self, key: &str, value: impl Into<u64>) {
        self.key(key);
        let _ = serde_json::to_writer(&mut *self.0, &value.into());
    }

    fn bool(&mut self, key: &str, value: bool) {
        self.key(key);
        self.0
            .extend_from_slice(if value { b"true" } else { b"false" });
    }
}

/// How the access log names an HTTP version.
pub fn protocol_name(version: http::Version) -> &'static str {
    match version {
        http::Version::HTTP_09 => "HTTP/0.9",
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_11 => "HTTP/1.1",
        http::Version::HTTP_2 => "HTTP/2",
        http::Version::HTTP_3 => "HTTP/3",
        _ => "HTTP/?",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_policies::Limits;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The line as tracing's JSON formatter (the one every other log line goes through)
    /// writes it.
    fn through_tracing(outcome: &RequestOutcome) -> String {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || outcome.log_with_tracing());
        let line = captured.0.lock().unwrap().clone();
        String::from_utf8(line).unwrap()
    }

    fn direct(outcome: &RequestOutcome) -> String {
        let mut line = Vec::new();
        outcome.write_json_line(&mut line, time::OffsetDateTime::now_utc());
        String::from_utf8(line).unwrap()
    }

    /// The line after its timestamp, checked to be one JSON object.
    fn fields(line: &str) -> &str {
        assert!(
            line.ends_with('\n') && line.matches('\n').count() == 1,
            "{line:?}"
        );
        serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(line)
            .expect("one JSON object");
        let (_, after) = line.split_once("Z\",").expect("a timestamp first");
        after
    }

    #[test]
    fn the_timestamp_is_rfc3339_to_the_microsecond_with_every_leading_zero() {
        let mut out = Vec::new();
        let at =
            time::OffsetDateTime::from_unix_timestamp_nanos(1_767_323_045_000_006_000).unwrap();
        write_timestamp(&mut out, at);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "2026-01-02T03:04:05.000006Z"
        );
    }

    #[test]
    fn the_directly_written_access_line_is_the_line_tracing_writes() {
        let identity = Identity {
            key_id: "key_1".into(),
            tenant: "t \"quoted\" \u{e9}".into(),
            tier: "pro".into(),
            limits: Limits::default(),
            cache: true,
            models: Default::default(),
            tenant_limits: Limits::default(),
            ledgers: crate::auth::quota_ledgers("key_1", "t"),
            model_limits: Default::default(),
            tenant_model_limits: Default::default(),
            distillation: None,
        };
        let full = RequestOutcome {
            protocol: "HTTP/2",
            request_id: "req-1:a.b_c",
            method: "POST",
            route: Some(Route::ChatCompletions),
            status: 200,
            upstream_status: Some(200),
            identity: Some(&identity),
            model: "m\\odel\n",
            stream: true,
            backend: "b1",
            cache: Some(CacheStatus::Miss),
            usage: Some(Usage {
                prompt_tokens: 12,
                completion_tokens: u64::MAX,
                cached_tokens: 3,
                served_from_cache: false,
            }),
            usage_source: UsageSource::Reported,
            cost_nano: 1_234_500_000,
            currency: "USD",
            client_left: true,
            duration: Duration::from_millis(1500),
            first_byte: Some(Duration::from_millis(7)),
            retries: 2,
            refused_by: None,
            error: Some("backend said \"no\"\n\tand hung up \u{1}".into()),
        };
        let bare = RequestOutcome {
            protocol: "HTTP/1.1",
            route: None,
            status: 0,
            upstream_status: None,
            identity: None,
            cache: None,
            usage: None,
            cost_nano: 0,
            currency: "",
            first_byte: None,
            error: None,
            ..full
        };
        for outcome in [&full, &bare] {
            let direct = direct(outcome);
            assert_eq!(fields(&direct), fields(&through_tracing(outcome)));
            let stamp = &direct["{\"timestamp\":\"".len()..][..27];
            assert!(
                time::OffsetDateTime::parse(stamp, &time::format_description::well_known::Rfc3339)
                    .is_ok(),
                "{stamp}"
            );
        }
    }
}
