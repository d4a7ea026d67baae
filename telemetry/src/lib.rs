//! Where do logs and traces go? Shared by `sluice` and `sluice-backend`.
//!
//! Logs: human-readable on a terminal, JSON lines otherwise, filtered by an environment
//! variable. Traces: when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._TRACES_ENDPOINT`) is set,
//! spans with the target [`TARGET`] are exported over OTLP/HTTP (`OTEL_EXPORTER_OTLP_PROTOCOL`:
//! `http/protobuf`, the default, or `http/json`; the other standard `OTEL_*` variables apply:
//! service name, resource attributes, batch delays). When it is not set, nothing is
//! installed and [`enabled`] is false, so callers create no spans at all: tracing costs
//! nothing when off.
//!
//! W3C `traceparent` carries a trace from the gateway to a backend ([`inject`],
//! [`continue_from`]).

mod log_buffer;

use log_buffer::LogBuffer;
use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// The tracing target of spans meant for export; other spans stay in the logs' world.
pub const TARGET: &str = "sluice::trace";

static ENABLED: AtomicBool = AtomicBool::new(false);
/// The log's buffer and whether its lines are JSON, once [`init`] has run.
static LOG: OnceLock<(LogBuffer, bool)> = OnceLock::new();

/// Whether spans are exported. Callers skip creating spans when not.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Keeps the exporter and the log writer alive; dropping it flushes the spans and log lines
/// not yet written.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    _logs: log_buffer::Flusher,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            if let Err(e) = provider.shutdown() {
                eprintln!("telemetry: could not flush spans: {e}");
            }
        }
    }
}

/// Whether log lines are JSON (stderr is not a terminal), for callers that format their own
/// lines (see [`log_line`]); false before [`init`].
pub fn json_logs() -> bool {
    LOG.get().is_some_and(|(_, json)| *json)
}

/// Appends one whole line (newline included), formatted by the caller, to the log: for a
/// line written on every request, where formatting it directly is far cheaper than
/// tracing's per-field formatting. The caller checks that its target is enabled. Before
/// [`init`], the line goes straight to stderr.
pub fn log_line(line: &[u8]) {
    match LOG.get() {
        Some((buffer, _)) => buffer.write_line(line),
        None => {
            use std::io::Write;
            let _ = std::io::stderr().write_all(line);
        }
    }
}

/// Installs logging (filtered by the variable `filter_env`, default `info`) and, when an OTLP
/// endpoint is configured, trace export as `service`.
pub fn init(service: &'static str, filter_env: &str) -> Telemetry {
    use std::io::IsTerminal;
    let filter = EnvFilter::try_from_env(filter_env).unwrap_or_else(|_| EnvFilter::new("info"));
    // Formatting stays on the logging thread; lines are written in batches by a thread of
    // their own (see log_buffer).
    let (writer, guard) = log_buffer::buffer(std::io::stderr(), "sluice-log-writer");
    let json = !std::io::stderr().is_terminal();
    let _ = LOG.set((writer.clone(), json));
    let logs = if !json {
        tracing_subscriber::fmt::layer().with_writer(writer).boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_writer(writer)
            .boxed()
    };
    let provider = match tracer_provider(service) {
        Ok(provider) => provider,
        Err(e) => {
            eprintln!("telemetry: trace export is off: {e}");
            None
        }
    };
    let traces = provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("sluice"))
            .with_filter(tracing_subscriber::filter::filter_fn(|meta| {
                meta.target() == TARGET
            }))
    });
    tracing_subscriber::registry()
        .with(logs.with_filter(filter))
        .with(traces)
        .init();
    ENABLED.store(provider.is_some(), Ordering::Relaxed);
    Telemetry {
        provider,
        _logs: guard,
    }
}

fn tracer_provider(service: &'static str) -> Result<Option<SdkTracerProvider>, String> {
    let configured = [
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ]
    .iter()
    .any(|v| std::env::var(v).is_ok_and(|v| !v.is_empty()));
    if !configured {
        return Ok(None);
    }
    let protocol = match std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL").as_deref() {
        Ok("http/json") => Protocol::HttpJson,
        Ok("http/protobuf") | Err(_) => Protocol::HttpBinary,
        Ok(other) => {
            return Err(format!(
                "OTEL_EXPORTER_OTLP_PROTOCOL={other} is not supported (http/protobuf or http/json)"
            ))
        }
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(protocol)
        .build()
        .map_err(|e| e.to_string())?;
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").is_err() {
        resource = resource.with_service_name(service);
    }
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    Ok(Some(
        SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource.build())
            .build(),
    ))
}

/// Writes `span`'s trace context (`traceparent`, `tracestate`) through `set`.
pub fn inject(span: &tracing::Span, set: &mut dyn FnMut(&str, String)) {
    struct Set<'a>(&'a mut dyn FnMut(&str, String));
    impl Injector for Set<'_> {
        fn set(&mut self, key: &str, value: String) {
            (self.0)(key, value)
        }
    }
    let context = span.context();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&context, &mut Set(set)));
}

/// Makes `span` continue the trace whose context `headers` carry (when they carry one).
pub fn continue_from(span: &tracing::Span, headers: &http::HeaderMap) {
    struct Headers<'a>(&'a http::HeaderMap);
    impl Extractor for Headers<'_> {
        fn get(&self, key: &str) -> Option<&str> {
            self.0.get(key).and_then(|v| v.to_str().ok())
        }
        fn keys(&self) -> Vec<&str> {
            self.0.keys().map(http::HeaderName::as_str).collect()
        }
    }
    let parent = opentelemetry::global::get_text_map_propagator(|p| p.extract(&Headers(headers)));
    let _ = span.set_parent(parent);
}
