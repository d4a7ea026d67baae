//! Reading `usage` out of an OpenAI server-sent-event stream as it passes, chunk by chunk,
//! without holding the stream back: events may be split across chunks at any byte.
//!
//! When the gateway itself asked the backend for the usage chunk (the client did not), that
//! chunk is removed from what the client sees. Only then are bytes held, and only the bytes of
//! an event not yet complete; every complete event goes on at once.

use super::Usage;
use bytes::{Bytes, BytesMut};
use serde::Deserialize;

/// An event larger than this without its terminating blank line is not an OpenAI chunk:
/// it is passed on and counted as malformed rather than held.
const MAX_EVENT_BYTES: usize = 1 << 20;

pub struct SseUsageScanner {
    /// The bytes of the event in progress (all of the stream's bytes pass through here once).
    partial: BytesMut,
    strip_usage_chunk: bool,
    usage: Option<Usage>,
    malformed: u64,
    /// Bytes of generated text seen (see [`super::text_bytes`]), for an estimate when the
    /// stream ends without usage.
    text_bytes: u64,
}

#[derive(Deserialize)]
struct Chunk {
    #[serde(default)]
    choices: Option<Vec<serde::de::IgnoredAny>>,
    #[serde(default)]
    usage: Option<Usage>,
}

impl SseUsageScanner {
    /// `strip_usage_chunk`: drop the final usage-only chunk from the client's stream.
    pub fn new(strip_usage_chunk: bool) -> Self {
        SseUsageScanner {
            partial: BytesMut::new(),
            strip_usage_chunk,
            usage: None,
            malformed: 0,
            text_bytes: 0,
        }
    }

    /// Reads `chunk`, and returns what the client should get now.
    pub fn feed(&mut self, chunk: Bytes) -> Bytes {
        self.partial.extend_from_slice(&chunk);
        let mut out = self.strip_usage_chunk.then(BytesMut::new);
        while let Some(end) = event_end(&self.partial) {
            let event = self.partial.split_to(end);
            let keep = self.read_event(&event);
            if let Some(out) = out.as_mut() {
                if keep {
                    out.extend_from_slice(&event);
                }
            }
        }
        if self.partial.len() > MAX_EVENT_BYTES {
            self.malformed += 1;
            let oversized = self.partial.split();
            if let Some(out) = out.as_mut() {
                out.extend_from_slice(&oversized);
            }
        }
        match out {
            Some(out) => out.freeze(),
            None => chunk,
        }
    }

    /// The end of the stream: whatever is left (an unterminated last event) goes to the client
    /// when it was held back, and is read for usage too.
    pub fn finish(&mut self) -> Bytes {
        if self.partial.is_empty() {
            return Bytes::new();
        }
        let rest = self.partial.split();
        let keep = self.read_event(&rest);
        if self.strip_usage_chunk && keep {
            rest.freeze()
        } else {
            Bytes::new()
        }
    }

    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }

    /// Bytes of generated text the stream carried so far.
    pub fn text_bytes(&self) -> u64 {
        self.text_bytes
    }

    /// Events that could not be read (not JSON, or too large).
    pub fn malformed(&self) -> u64 {
        self.malformed
    }

    /// Reads one event for usage; says whether the client should see it.
    fn read_event(&mut self, event: &[u8]) -> bool {
        let Some(data) = event_data(event) else {
            return true;
        };
        if data == b"[DONE]" {
            return true;
        }
        self.text_bytes += super::text_bytes(data);
        // Only a chunk that names "usage" can carry it; the rest are not parsed at all.
        if memfind(data, b"\"usage\"").is_none() {
            return true;
        }
        match serde_json::from_slice::<Chunk>(data) {
            Ok(chunk) => {
                let usage_only = chunk.choices.as_ref().is_some_and(Vec::is_empty);
                if let Some(usage) = chunk.usage {
                    self.usage = Some(usage);
                    return !(self.strip_usage_chunk && usage_only);
                }
                true
            }
            Err(_) => {
                self.malformed += 1;
                true
            }
        }
    }
}

/// The end (blank line included) of the first complete event in `buf`.
fn event_end(buf: &[u8]) -> Option<usize> {
    let lf = memfind(buf, b"\n\n").map(|i| i + 2);
    let crlf = memfind(buf, b"\r\n\r\n").map(|i| i + 4);
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The payload of an event's `data:` line (OpenAI streams send one per event).
fn event_data(event: &[u8]) -> Option<&[u8]> {
    event
        .split(|&b| b == b'\n')
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
        .find_map(|line| line.strip_prefix(b"data:"))
        .map(|d| d.strip_prefix(b" ").unwrap_or(d))
}

fn memfind(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    memchr::memmem::find(haystack, needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream as the sim backend sends it with include_usage, CRLF variant included.
    const STREAM: &str = concat!(
        "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}],\"usage\":null}\n\n",
        "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\n",
        ": keep-alive comment\n\n",
        "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" there \\\"usage\\\"\"}}],\"usage\":null}\r\n\r\n",
        "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n",
        "data: {\"id\":\"c1\",\"choices\":[],\"usage\":{\"prompt_tokens\":11,\"completion_tokens\":2,\"total_tokens\":13,\"prompt_tokens_details\":{\"cached_tokens\":4}}}\n\n",
        "data: [DONE]\n\n",
    );

    fn expected() -> Usage {
        Usage {
            prompt_tokens: 11,
            completion_tokens: 2,
            cached_tokens: 4,
            served_from_cache: false,
        }
    }

    fn run(splits: &[usize], strip: bool) -> (Option<Usage>, String, u64) {
        let bytes = STREAM.as_bytes();
        let mut scanner = SseUsageScanner::new(strip);
        let mut out = Vec::new();
        let mut from = 0;
        for &at in splits.iter().chain(std::iter::once(&bytes.len())) {
            out.extend_from_slice(&scanner.feed(Bytes::copy_from_slice(&bytes[from..at])));
            from = at;
        }
        out.extend_from_slice(&scanner.finish());
        (
            scanner.usage(),
            String::from_utf8(out).unwrap(),
            scanner.malformed(),
        )
    }

    #[test]
    fn every_single_split_position_gives_the_same_usage_and_output() {
        for at in 0..=STREAM.len() {
            let (usage, out, malformed) = run(&[at], false);
            assert_eq!(usage, Some(expected()), "split at {at}");
            assert_eq!(out, STREAM, "split at {at}");
            assert_eq!(malformed, 0);

            let (usage, out, _) = run(&[at], true);
            assert_eq!(usage, Some(expected()), "split at {at}");
            assert!(
                !out.contains("prompt_tokens"),
                "usage chunk stripped, split at {at}"
            );
            assert!(out.ends_with("data: [DONE]\n\n"));
        }
    }

    #[test]
    fn byte_by_byte_and_pairs_of_splits() {
        let every: Vec<usize> = (1..STREAM.len()).collect();
        assert_eq!(run(&every, true).0, Some(expected()));
        for a in (0..STREAM.len()).step_by(7) {
            for b in (a..STREAM.len()).step_by(13) {
                assert_eq!(run(&[a, b], false).0, Some(expected()), "splits {a},{b}");
            }
        }
    }

    #[test]
    fn only_the_usage_chunk_is_stripped() {
        let (_, out, _) = run(&[], true);
        let without = STREAM.replace(
            "data: {\"id\":\"c1\",\"choices\":[],\"usage\":{\"prompt_tokens\":11,\"completion_tokens\":2,\"total_tokens\":13,\"prompt_tokens_details\":{\"cached_tokens\":4}}}\n\n",
            "",
        );
        assert_eq!(out, without);
    }

    #[test]
    fn malformed_events_are_counted_and_passed_on() {
        let mut scanner = SseUsageScanner::new(false);
        let bad = Bytes::from_static(b"data: {\"usage\": nope}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":1}}\n\n");
        assert_eq!(scanner.feed(bad.clone()), bad);
        assert_eq!(scanner.malformed(), 1);
        assert_eq!(scanner.usage().unwrap().completion_tokens, 1);

        let mut scanner = SseUsageScanner::new(true);
        let huge = Bytes::from(vec![b'x'; MAX_EVENT_BYTES + 10]);
        assert_eq!(
            scanner.feed(huge).len(),
            MAX_EVENT_BYTES + 10,
            "oversized bytes are not held"
        );
        assert_eq!(scanner.malformed(), 1);
    }
}
