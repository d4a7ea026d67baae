//! The cached-answer parsers: any backend answer, JSON or stream, is an answer or nothing;
//! an answer renders in both shapes, and the JSON it renders is valid.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sluice_gateway::cache::answer::{CachedAnswer, Shape};
use sluice_gateway::request::Route;

fuzz_target!(|body: &[u8]| {
    for route in [Route::ChatCompletions, Route::Completions] {
        for answer in [
            CachedAnswer::from_json(route, body),
            CachedAnswer::from_stream(route, body),
        ]
        .into_iter()
        .flatten()
        {
            let json = answer.render(Shape::Json, 1);
            serde_json::from_slice::<serde_json::Value>(&json).expect("rendered JSON parses");
            let _ = answer.render(
                Shape::Stream {
                    include_usage: true,
                },
                1,
            );
        }
    }
});
