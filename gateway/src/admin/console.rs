//! The admin web console: one static page that uses this API like any client.

use axum::response::IntoResponse;

/// The admin web console: one static page, built into the binary, that signs in with the
/// admin token and then uses this API like any client. The page holds no data itself, so
/// it is served without credentials.
const CONSOLE: &str = include_str!("console.html");

#[utoipa::path(
    get,
    path = "/console",
    tag = "console",
    responses((status = 200, description = "The console's page", body = String, content_type = "text/html")),
)]
pub(super) async fn console() -> impl IntoResponse {
    (
        [
            (http::header::CONTENT_TYPE, "text/html; charset=utf-8"),
            // The page runs only its own inline script and talks only to this listener.
            (
                http::header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'",
            ),
        ],
        CONSOLE,
    )
}
