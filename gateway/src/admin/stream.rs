//! How does an export of any size go out? Written a chunk at a time by a task of its own, in
//! constant memory. A failure after the answer started cuts the body off (the connection is
//! reset), so no client mistakes a partial export for a whole one.

use crate::error::ApiError;
use axum::body::Body;
use axum::response::{IntoResponse, Response};
use std::future::Future;

/// Where an export's writer sends its chunks.
pub(super) type Chunks = tokio::sync::mpsc::Sender<Result<Vec<u8>, std::io::Error>>;

/// Answers with what `write` sends, as it comes. `write` ends with `Ok` when it is done (or
/// when a send fails: the client has gone), and with the error that cuts the body off.
pub(super) fn streamed<W, F>(content_type: &'static str, export: &'static str, write: W) -> Response
where
    W: FnOnce(Chunks) -> F,
    F: Future<Output = Result<(), ApiError>> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let cut = tx.clone();
    let writing = write(tx);
    tokio::spawn(async move {
        if let Err(e) = writing.await {
            tracing::error!(export, error = %e.message, "export cut off: the store failed mid-way");
            let _ = cut.send(Err(std::io::Error::other(e.message))).await;
        }
    });
    let body = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|chunk| (chunk, rx))
    });
    (
        [(http::header::CONTENT_TYPE, content_type)],
        Body::from_stream(body),
    )
        .into_response()
}
