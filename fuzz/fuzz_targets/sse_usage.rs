//! The SSE usage scanner, split anywhere: the usage it reads, and what the client gets, do
//! not depend on how the stream was cut into chunks.
#![no_main]
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use sluice_gateway::metering::Meter;

fn scan(parts: &[&[u8]], strip: bool) -> (Vec<u8>, Option<sluice_gateway::metering::Usage>) {
    let mut meter = Meter::for_response(Some(&b"text/event-stream"[..]), strip);
    let mut out = Vec::new();
    for part in parts {
        out.extend_from_slice(&meter.feed(Bytes::copy_from_slice(part)));
    }
    let (rest, usage) = meter.finish();
    out.extend_from_slice(&rest);
    (out, usage)
}

fuzz_target!(|data: &[u8]| {
    let Some((&cut, stream)) = data.split_first() else {
        return;
    };
    let at = usize::from(cut) * stream.len() / 256;
    let (head, tail) = stream.split_at(at);
    for strip in [false, true] {
        let whole = scan(&[stream], strip);
        let split = scan(&[head, tail], strip);
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        let byte_by_byte = scan(&bytes, strip);
        assert_eq!(whole, split, "split at {at}");
        assert_eq!(whole, byte_by_byte);
        if !strip {
            assert_eq!(whole.0, stream, "passed through unchanged");
        }
    }
});
