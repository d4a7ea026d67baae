//! The body rewrites the gateway makes before forwarding (an alias resolved to its model, a
//! usage chunk asked for): the output is valid JSON that reads as the input with just that
//! change, so the backend parses the request the client meant.
#![no_main]
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use sluice_gateway::metering::request_usage_chunk;
use sluice_gateway::request::{with_model, RequestView, Route};

fuzz_target!(|body: &[u8]| {
    let Ok(view) = RequestView::parse(Route::ChatCompletions, body) else {
        return;
    };
    let Ok(original) = serde_json::from_slice::<Value>(body) else {
        return;
    };
    let bytes = Bytes::copy_from_slice(body);
    if let Ok(rewritten) = with_model(&bytes, "another-model") {
        let mut expected = original.clone();
        expected["model"] = Value::String("another-model".into());
        let got: Value = serde_json::from_slice(&rewritten).expect("with_model gives JSON");
        assert_eq!(got, expected);
    }
    let options = view.stream_options.map(|o| o.get());
    if let Some(rewritten) = request_usage_chunk(&bytes, options) {
        let got: Value = serde_json::from_slice(&rewritten).expect("usage chunk asked in JSON");
        assert_eq!(got["stream_options"]["include_usage"], Value::Bool(true));
        let mut without = got.clone();
        let mut original_without = original.clone();
        for v in [&mut without, &mut original_without] {
            if let Some(o) = v.as_object_mut() {
                o.remove("stream_options");
            }
        }
        assert_eq!(without, original_without, "nothing else changed");
    }
});
