//! How does the admin API take connections? One accept loop with a cap on open connections
//! (past it, new connections wait in the kernel's backlog instead of costing memory), a
//! deadline for each request head, and (see [`read_body_within`]) one for each request body, so that slow or idle
//! clients cannot hold the operators' way in.

use crate::app::Gateway;
use crate::error::ApiError;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

/// The largest admin request body (key and tier writes are a few hundred bytes).
pub const MAX_ADMIN_BODY_BYTES: usize = 1 << 20;

#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    pub max_connections: usize,
    pub header_timeout: Duration,
}

/// Serves `router` on `listener` within `bounds`, over TLS when `tls` is given, until the
/// process ends.
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    router: Router,
    bounds: Bounds,
) {
    let open = Arc::new(Semaphore::new(bounds.max_connections));
    loop {
        let Ok(permit) = open.clone().acquire_owned().await else {
            return;
        };
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                // Out of file descriptors, most likely: wait rather than spin.
                tracing::warn!(error = %e, "admin listener could not accept");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let service = TowerToHyperService::new(router.clone());
        let tls = tls.clone();
        tokio::spawn(async move {
            let served = match tls {
                // The handshake is held to the header deadline too: a client that opens a
                // connection and says nothing must not keep its slot.
                Some(tls) => {
                    match tokio::time::timeout(bounds.header_timeout, tls.accept(tcp)).await {
                        Ok(Ok(stream)) => serve_connection(stream, service, bounds).await,
                        Ok(Err(e)) => Err(format!("TLS handshake: {e}")),
                        Err(_) => Err("TLS handshake timed out".to_owned()),
                    }
                }
                None => serve_connection(tcp, service, bounds).await,
            };
            if let Err(e) = served {
                tracing::debug!(error = %e, "admin connection ended with an error");
            }
            drop(permit);
        });
    }
}

async fn serve_connection<S>(
    stream: S,
    service: TowerToHyperService<Router>,
    bounds: Bounds,
) -> Result<(), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(bounds.header_timeout)
        .serve_connection(TokioIo::new(stream), service)
        .await
        .map_err(|e| e.to_string())
}

/// Reads the request body whole, within the deadline and the size bound, before the handler
/// runs (and after the caller is authorised, so that no stranger's upload is held).
pub(super) async fn read_body_within(
    State(gateway): State<Arc<Gateway>>,
    request: Request,
    next: Next,
) -> Response {
    let timeout = gateway.config.body_read_timeout;
    let (parts, body) = request.into_parts();
    let read =
        tokio::time::timeout(timeout, axum::body::to_bytes(body, MAX_ADMIN_BODY_BYTES)).await;
    let bytes = match read {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(_)) => {
            return ApiError::body_too_large(MAX_ADMIN_BODY_BYTES).into_response();
        }
        Err(_) => {
            return ApiError::request_timeout(format!(
                "The request body did not arrive within {} seconds.",
                timeout.as_secs()
            ))
            .into_response()
        }
    };
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}
