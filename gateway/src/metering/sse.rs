//! Reading `usage` out of an OpenAI server-sent-event stream as it passes, chunk by chunk,
//! without holding the stream back: events may be split across chunks at any byte.
//!
//! When the gateway itself asked the backend for the usage chunk (the client did not), that
//! chunk is removed from what the client sees. Only then are bytes held, and only the bytes of
//! an event not yet complete; every complete event goes on at once.

use super::Usage;
use bytes::{Bytes, BytesMut};
use serde::Deserialize;

/// Generated text kept for a tokenizer count (see `collect_text`); past it the estimate falls
/// back to bytes.
const MAX_TEXT_BYTES: usize = 4 << 20;

/// An event larger than this without its terminating blank line is not an OpenAI chunk:
/// it is passed on and counted as malformed rather than held.
const MAX_EVENT_BYTES: usize = 1 << 20;

pub struct SseUsageScanner {
    /// The bytes of the event in progress (all of the stream's bytes pass through here once).
    partial: BytesMut,
    /// Where the event in progress ends, as far as its bytes have been read (each byte is
    /// read once, however the stream is split).
    boundary: EventBoundary,
    /// Whether the client got the last complete event (its split-off end follows it).
    last_kept: bool,
    strip_usage_chunk: bool,
    usage: Option<Usage>,
    malformed: u64,
    /// Bytes of generated text seen (see [`super::text_bytes`]), for an estimate when the
    /// stream ends without usage.
    text_bytes: u64,
    /// The generated text itself, when asked for and while it stays within bounds.
    text: Option<String>,
    text_overflowed: bool,
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
            boundary: EventBoundary::default(),
            last_kept: true,
            strip_usage_chunk,
            usage: None,
            malformed: 0,
            text_bytes: 0,
            text: None,
            text_overflowed: false,
        }
    }

    /// Reads `chunk`, and returns what the client should get now.
    pub fn feed(&mut self, chunk: Bytes) -> Bytes {
        self.partial.extend_from_slice(&chunk);
        let mut out = self.strip_usage_chunk.then(BytesMut::new);
        while let Some(end) = self.boundary.find(&self.partial) {
            let event = self.partial.split_to(end);
            let keep = if self.boundary.take_tail_of_last() {
                self.last_kept
            } else {
                self.read_event(&event)
            };
            self.last_kept = keep;
            if let Some(out) = out.as_mut() {
                if keep {
                    out.extend_from_slice(&event);
                }
            }
        }
        if self.partial.len() > MAX_EVENT_BYTES {
            self.malformed += 1;
            self.boundary.restart();
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

    /// Keeps the generated text from now on (for a tokenizer count).
    pub fn collect_text(&mut self) {
        self.text.get_or_insert_with(String::new);
    }

    /// The generated text so far, when it was kept and stayed within bounds.
    pub fn text(&self) -> Option<&str> {
        self.text.as_deref().filter(|_| !self.text_overflowed)
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
        if let Some(text) = self.text.as_mut().filter(|_| !self.text_overflowed) {
            super::generated_text(data, text);
            if text.len() > MAX_TEXT_BYTES {
                self.text_overflowed = true;
                *text = String::new();
            }
        }
        // Only a chunk with a `"usage"` that is not `null` can carry it; the rest (with
        // include_usage, every chunk but the last says `"usage":null`) are not parsed at all.
        if !may_carry_usage(data) {
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

/// Finds where events end: at a blank line, lines ending in LF, CRLF or a lone CR (the SSE
/// specification allows all three). It reads each byte once, keeping its place between calls,
/// so an event split into many small chunks costs no rescans.
#[derive(Debug, Clone, Copy)]
struct EventBoundary {
    /// Bytes of the event in progress already read.
    read: usize,
    /// The last byte read ended a line (or nothing has been read): a line ending now is a
    /// blank line.
    at_line_start: bool,
    /// The last byte read was a CR: an LF now belongs to the same line ending.
    after_cr: bool,
    /// The event just found is the LF that ends the one before, split from it.
    tail_of_last: bool,
}

impl Default for EventBoundary {
    fn default() -> Self {
        EventBoundary {
            read: 0,
            at_line_start: true,
            after_cr: false,
            tail_of_last: false,
        }
    }
}

impl EventBoundary {
    /// The end (blank line included) of the event `buf` begins with, if it is complete; the
    /// caller then splits that much off `buf`.
    fn find(&mut self, buf: &[u8]) -> Option<usize> {
        if self.read == 0 && self.after_cr && buf.first() == Some(&b'\n') {
            // The LF of the CRLF that ended the last event, arrived in a later chunk: it is
            // that event's, and shares its fate (see `tail_of_last`).
            self.after_cr = false;
            self.tail_of_last = true;
            return Some(1);
        }
        while self.read < buf.len() {
            let i = self.read;
            if self.after_cr && buf[i] == b'\n' {
                self.after_cr = false;
                self.read += 1;
                continue;
            }
            self.after_cr = false;
            let Some(offset) = memchr::memchr2(b'\n', b'\r', &buf[i..]) else {
                self.at_line_start = false;
                self.read = buf.len();
                return None;
            };
            let at = i + offset;
            if offset > 0 {
                self.at_line_start = false;
            }
            self.read = at + 1;
            self.after_cr = buf[at] == b'\r';
            if self.at_line_start {
                // A CRLF's LF, when already here, belongs to this event; when it comes in a
                // later chunk, `after_cr` skips it there.
                let mut end = at + 1;
                if self.after_cr && buf.get(end) == Some(&b'\n') {
                    end += 1;
                    self.after_cr = false;
                }
                let after_cr = self.after_cr;
                *self = EventBoundary {
                    after_cr,
                    ..EventBoundary::default()
                };
                return Some(end);
            }
            self.at_line_start = true;
        }
        None
    }

    /// Whether the event just found is the split-off end of the one before.
    fn take_tail_of_last(&mut self) -> bool {
        std::mem::take(&mut self.tail_of_last)
    }

    /// Starts afresh (the bytes read so far were passed on without an end).
    fn restart(&mut self) {
        *self = EventBoundary::default();
    }
}

/// The payload of an event's `data:` line (OpenAI streams send one per event).
fn event_data(event: &[u8]) -> Option<&[u8]> {
    let mut rest = event;
    loop {
        let end = memchr::memchr2(b'\n', b'\r', rest).unwrap_or(rest.len());
        if let Some(data) = rest[..end].strip_prefix(b"data:") {
            return Some(data.strip_prefix(b" ").unwrap_or(data));
        }
        rest = rest.get(end + 1..)?;
    }
}

/// Whether a chunk may carry usage: some `"usage"` in it is followed by anything but `: null`.
/// A `"usage"` inside a string value is escaped (`\"usage\"`) and never matches; one that is
/// a string value itself is not followed by a colon; anything unexpected says parse.
fn may_carry_usage(data: &[u8]) -> bool {
    static USAGE: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\"usage\""));
    USAGE.find_iter(data).any(|at| {
        let rest = data[at + USAGE.needle().len()..].trim_ascii_start();
        match rest.strip_prefix(b":") {
            Some(value) => !value.trim_ascii_start().starts_with(b"null"),
            None => false,
        }
    })
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
    fn cr_only_and_mixed_line_endings_end_events_at_every_split() {
        let variants = [
            STREAM.to_owned(),
            STREAM.replace("\r\n", "\n").replace('\n', "\r"),
            STREAM.replace("\r\n", "\n").replace('\n', "\r\n"),
            STREAM.replace("\r\n", "\n").replace("\n\n", "\r\n\r"),
        ];
        for stream in &variants {
            let mut whole = SseUsageScanner::new(true);
            let mut whole_out = whole
                .feed(Bytes::copy_from_slice(stream.as_bytes()))
                .to_vec();
            whole_out.extend_from_slice(&whole.finish());
            for at in 0..=stream.len() {
                let mut scanner = SseUsageScanner::new(true);
                let mut out = Vec::new();
                for part in [&stream[..at], &stream[at..]] {
                    out.extend_from_slice(&scanner.feed(Bytes::copy_from_slice(part.as_bytes())));
                }
                out.extend_from_slice(&scanner.finish());
                assert_eq!(
                    scanner.usage(),
                    Some(expected()),
                    "{stream:?} split at {at}"
                );
                assert_eq!(
                    out, whole_out,
                    "the same bytes however it is split, at {at}"
                );
                let out = String::from_utf8(out).unwrap();
                assert!(
                    !out.contains("prompt_tokens"),
                    "usage chunk stripped at {at}"
                );
                assert!(out.contains("[DONE]"));
                assert_eq!(scanner.malformed(), 0);
            }
            // Byte by byte, each byte is read once.
            let mut scanner = SseUsageScanner::new(false);
            let mut out = Vec::new();
            for b in stream.as_bytes() {
                out.extend_from_slice(&scanner.feed(Bytes::copy_from_slice(&[*b])));
            }
            assert_eq!(scanner.usage(), Some(expected()));
            assert_eq!(out, stream.as_bytes(), "passed through unchanged");
        }
    }

    #[test]
    fn an_event_in_many_small_chunks_is_read_once() {
        let mut boundary = EventBoundary::default();
        let mut buf = Vec::new();
        for _ in 0..10_000 {
            buf.extend_from_slice(b"data: xxxxxxxx");
            assert_eq!(boundary.find(&buf), None);
            assert_eq!(boundary.read, buf.len(), "only the new bytes were read");
        }
        buf.extend_from_slice(b"\n\n");
        assert_eq!(boundary.find(&buf), Some(buf.len()));
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

    #[test]
    fn only_a_chunk_whose_usage_is_not_null_is_parsed() {
        assert!(!may_carry_usage(br#"{"choices":[],"usage":null}"#));
        assert!(!may_carry_usage(br#"{"choices":[], "usage" :  null }"#));
        assert!(!may_carry_usage(
            br#"{"choices":[{"delta":{"content":"\"usage\": {}"}}]}"#
        ));
        assert!(!may_carry_usage(
            br#"{"choices":[{"delta":{"content":"usage"}}]}"#
        ));
        assert!(!may_carry_usage(
            br#"{"choices":[{"delta":{"content":"Hi"}}]}"#
        ));
        assert!(may_carry_usage(
            br#"{"choices":[],"usage":{"prompt_tokens":1}}"#
        ));
        assert!(may_carry_usage(
            br#"{"usage":null,"x":{"usage": {"prompt_tokens":1}}}"#
        ));
        // Not what an OpenAI backend sends; parsed (and found malformed or not) as before.
        assert!(may_carry_usage(br#"{"usage":7}"#));
    }

    #[test]
    fn the_data_line_is_found_whatever_ends_the_lines() {
        assert_eq!(event_data(b"data: {}\n\n"), Some(&b"{}"[..]));
        assert_eq!(event_data(b"event: x\r\ndata:{}\r\n\r\n"), Some(&b"{}"[..]));
        assert_eq!(event_data(b"id: 1\rdata: [DONE]"), Some(&b"[DONE]"[..]));
        assert_eq!(event_data(b": comment\n\n"), None);
        assert_eq!(event_data(b""), None);
    }
}
