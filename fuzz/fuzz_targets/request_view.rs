//! The request view and the cache keys: any body, on every route, is a view or a clear
//! error, never a panic; a body the cache understands always yields keys.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sluice_gateway::cache::key::CacheRequest;
use sluice_gateway::request::{RequestView, Route};

fuzz_target!(|body: &[u8]| {
    for route in [
        Route::ChatCompletions,
        Route::Completions,
        Route::Embeddings,
    ] {
        if let Ok(view) = RequestView::parse(route, body) {
            let _ = (view.model(), view.is_stream());
        }
        if let Some(request) = CacheRequest::parse(body) {
            let _ = request.facts();
            let _ = request.keys("tenant", route);
        }
    }
});
