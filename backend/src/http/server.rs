//! Which route answers a request, and which layers does every request pass through?
//!
//! The generation routes live in their own modules; the small routes (models, health,
//! metrics, stream gates) live here. The layer order is listed once, in `router`.

use std::future::Future;
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{header, HeaderName, HeaderValue, Method, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::{Json, Router};
use serde_json::json;
use tokio::net::TcpListener;

use super::completion::chat::Chat;
use super::completion::complete;
use super::completion::text::Text;
use super::embeddings;
use super::error::ApiError;
use super::metrics::Route;
use super::openai::{ModelCard, ModelList};
use super::state::{AppState, ModelEngine, ServedModel};
use crate::engine::stats::StatsSnapshot;

/// Long chat histories and batched embedding inputs are large; axum's 2 MiB default is not.
const MAX_BODY_BYTES: usize = 32 * 1024 * 1024;

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Every route this backend answers.
pub fn router(state: Arc<AppState>) -> Router {
    let mut routes = Router::new();
    if state.serves_sim() {
        // A test hook of the simulated engine; a backend serving real models has none.
        routes = routes.route("/sim/gates/{name}/open", post(open_gate));
    }
    routes
        .route("/v1/chat/completions", post(complete::<Chat>))
        .route("/v1/completions", post(complete::<Text>))
        .route("/v1/embeddings", post(embeddings::embeddings))
        .route("/v1/models", get(list_models))
        // Model names may contain slashes (`org/model`).
        .route("/v1/models/{*model}", get(get_model))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(unknown_route)
        .method_not_allowed_fallback(method_not_allowed)
        // Layers run outermost-last-listed: a request meets `trace_request` first, then
        // `echo_request_id`, then the body limit, then its route.
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn(echo_request_id))
        .layer(middleware::from_fn(trace_request))
        .with_state(state)
}

/// One exported span per request when trace export is on, continuing the caller's trace
/// (the gateway's `traceparent`); nothing at all when it is off.
async fn trace_request(request: Request, next: Next) -> Response {
    use tracing::Instrument;
    // Health checks and scrapes come every few seconds from every gateway: not traced.
    let housekeeping = matches!(request.uri().path(), "/health" | "/metrics");
    if !sluice_telemetry::enabled() || housekeeping {
        return next.run(request).await;
    }
    let span = tracing::info_span!(
        target: sluice_telemetry::TARGET,
        "backend request",
        otel.name = %format!("{} {}", request.method(), request.uri().path()),
        otel.kind = "server",
        http.request.method = %request.method(),
        url.path = %request.uri().path(),
        http.response.status_code = tracing::field::Empty,
    );
    sluice_telemetry::continue_from(&span, request.headers());
    let response = next.run(request).instrument(span.clone()).await;
    span.record(
        "http.response.status_code",
        i64::from(response.status().as_u16()),
    );
    response
}

/// Serves `state` on `listener` until `shutdown` resolves, then lets in-flight requests
/// (streams included) finish. Streams held at a gate are released at that point, or the
/// shutdown would wait for their timeout.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let gates = Arc::clone(&state.gates);
    let shutdown = async move {
        shutdown.await;
        let released = gates.open_all();
        if released > 0 {
            tracing::info!(released, "shutdown opened the stream gates");
        }
    };
    // Tokens are small writes: without TCP_NODELAY, Nagle's algorithm and the peer's delayed
    // ACK hold each short stream for ~40 ms.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY");
        }
    });
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

/// The gateway stamps each request with an id; echoing it lets a client or an operator tie
/// a response (or an error) to the gateway's logs.
async fn echo_request_id(request: Request, next: Next) -> Response {
    let request_id = request.headers().get(X_REQUEST_ID).cloned();
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let mut response = next.run(request).await;
    tracing::debug!(
        %method,
        %path,
        status = response.status().as_u16(),
        request_id = request_id.as_ref().and_then(|id| id.to_str().ok()),
        "request"
    );
    if let Some(request_id) = request_id {
        response.headers_mut().insert(X_REQUEST_ID, request_id);
    }
    response
}

async fn list_models(State(state): State<Arc<AppState>>) -> Response {
    state.metrics.record_request(Route::Models);
    let data = state
        .models()
        .iter()
        .map(|model| model_card(model, state.started_at))
        .collect();
    Json(ModelList {
        object: "list",
        data,
    })
    .into_response()
}

async fn get_model(
    State(state): State<Arc<AppState>>,
    Path(model): Path<String>,
) -> Result<Response, ApiError> {
    state.metrics.record_request(Route::Models);
    let model = state.model(&model)?;
    Ok(Json(model_card(model, state.started_at)).into_response())
}

fn model_card(model: &ServedModel, created: u64) -> ModelCard<'_> {
    let simulated = matches!(model.engine, ModelEngine::Sim);
    ModelCard {
        id: &model.name,
        object: "model",
        created,
        owned_by: if simulated { "sluice-sim" } else { "sluice" },
        simulated,
        device: match &model.engine {
            ModelEngine::Sim => None,
            ModelEngine::Embedding(engine) => Some(engine.device()),
            ModelEngine::Text(engine) => Some(engine.device()),
        },
        max_model_len: match &model.engine {
            ModelEngine::Text(engine) => Some(engine.context_length()),
            _ => None,
        },
    }
}

async fn health(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    state.metrics.record_request(Route::Health);
    Json(json!({ "status": "ok" }))
}

async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    state.metrics.record_request(Route::Metrics);
    let engines: Vec<(&str, StatsSnapshot)> = state
        .models()
        .iter()
        .filter_map(|model| match &model.engine {
            ModelEngine::Text(engine) => Some((model.name.as_str(), engine.stats().snapshot())),
            _ => None,
        })
        .collect();
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        state.metrics.render(state.engine_label(), &engines),
    )
}

/// The test hook documented in `stream_gates`.
async fn open_gate(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Json<serde_json::Value> {
    state.metrics.record_request(Route::SimGates);
    let released = state.gates.open(&name);
    tracing::debug!(gate = %name, released, "stream gate opened");
    Json(json!({ "released": released }))
}

async fn unknown_route(method: Method, uri: Uri) -> ApiError {
    ApiError::UnknownRoute {
        method: method.to_string(),
        path: uri.path().to_owned(),
    }
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::MethodNotAllowed {
        method: method.to_string(),
        path: uri.path().to_owned(),
    }
}
