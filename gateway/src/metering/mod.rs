//! How much was that? Reads each response's token usage as it passes to the client, and
//! turns a finished request into a usage event for billing.
//!
//! Nothing here buffers the client's stream: a JSON body is copied aside (bounded) and read
//! at its end; an SSE stream goes through [`sse::SseUsageScanner`].

mod feed;
pub mod journal;
mod json_scan;
mod spool;
mod sse;
mod target;
pub mod tokens;

pub use crate::usage::UsageSource;
pub use feed::{Feed, FeedConfig};
pub use sse::SseUsageScanner;
pub use target::UsageTarget;

use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Deserializer, Serialize};

/// A JSON response larger than this is passed on but not read for usage (and counted).
const MAX_JSON_BYTES: usize = 16 << 20;

/// The most a request could use, as it was reserved: its prompt estimate and its completion
/// cap (all choices, all prompts). Estimates never exceed it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ceiling {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

impl Ceiling {
    fn usage(self, completion_tokens: u64) -> Usage {
        Usage {
            prompt_tokens: self.prompt_tokens,
            completion_tokens: completion_tokens.min(self.completion_tokens),
            cached_tokens: 0,
            served_from_cache: false,
        }
    }
}

/// The keys whose string values are generated text: `content`, `text`, `arguments` (tool
/// calls) and `reasoning_content`. Their searchers are built once: building one per search
/// (`memmem::find_iter`) was a third of a stream's metering, four per chunk.
static TEXT_KEYS: std::sync::LazyLock<[memchr::memmem::Finder<'static>; 4]> =
    std::sync::LazyLock::new(|| {
        [
            &b"\"content\""[..],
            b"\"text\"",
            b"\"arguments\"",
            b"\"reasoning_content\"",
        ]
        .map(memchr::memmem::Finder::new)
    });

/// Bytes of generated text in a response chunk or body: the string values of [`TEXT_KEYS`],
/// as written (escapes count whole). A byte-level BPE token covers at least one byte, so this
/// is at least the tokens generated: an estimate that does not under-bill.
pub fn text_bytes(json: &[u8]) -> u64 {
    let mut total = 0;
    for key in TEXT_KEYS.iter() {
        for at in key.find_iter(json) {
            total += string_value_len(&json[at + key.needle().len()..]);
        }
    }
    total as u64
}

/// The generated text of a response chunk or body (the same values as [`text_bytes`]),
/// decoded, appended to `out`: for counting with the model's tokenizer.
pub fn generated_text(json: &[u8], out: &mut String) {
    for key in TEXT_KEYS.iter() {
        for at in key.find_iter(json) {
            let rest = &json[at + key.needle().len()..];
            if let Some((start, Some(end))) = string_value(rest) {
                // The value with its quotes, so JSON decodes its escapes.
                if let Ok(text) = serde_json::from_slice::<String>(&rest[start - 1..=end]) {
                    out.push_str(&text);
                }
            }
        }
    }
}

/// The length of the JSON string value after a key (`: "..."`), or 0 when it is not a string.
fn string_value_len(rest: &[u8]) -> usize {
    match string_value(rest) {
        Some((start, Some(end))) => end - start,
        Some((start, None)) => rest.len().saturating_sub(start),
        None => 0,
    }
}

/// Where the JSON string value after a key (`: "..."`) starts (after its opening quote) and
/// ends (its closing quote, when it has one in `rest`); `None` when it is not a string.
fn string_value(rest: &[u8]) -> Option<(usize, Option<usize>)> {
    let mut i = 0;
    let skip_space = |i: &mut usize| {
        while rest.get(*i).is_some_and(u8::is_ascii_whitespace) {
            *i += 1;
        }
    };
    skip_space(&mut i);
    if rest.get(i) != Some(&b':') {
        return None;
    }
    i += 1;
    skip_space(&mut i);
    if rest.get(i) != Some(&b'"') {
        return None;
    }
    let start = i + 1;
    Some((start, json_scan::string_end(rest, start)))
}

/// Token usage as OpenAI reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Prompt tokens served from the backend's prompt cache
    /// (`prompt_tokens_details.cached_tokens`); part of `prompt_tokens`.
    pub cached_tokens: u64,
    /// The answer came from Sluice's response cache, not a backend: every token is billed
    /// at the cached price.
    #[serde(skip)]
    pub served_from_cache: bool,
}

impl Usage {
    /// The tokens of each price kind this usage is billed as.
    pub fn billable(&self) -> sluice_policies::TokenCounts {
        if self.served_from_cache {
            return sluice_policies::TokenCounts {
                input: 0,
                output: 0,
                cached: self.prompt_tokens + self.completion_tokens,
            };
        }
        sluice_policies::TokenCounts {
            input: self.prompt_tokens - self.cached_tokens.min(self.prompt_tokens),
            output: self.completion_tokens,
            cached: self.cached_tokens,
        }
    }

    /// The usage a stored event records.
    pub fn of_event(event: &crate::usage::UsageEvent) -> Usage {
        Usage {
            prompt_tokens: event.prompt_tokens,
            completion_tokens: event.completion_tokens,
            cached_tokens: event.cached_tokens,
            served_from_cache: event.cache_status != "miss",
        }
    }
}

impl<'de> Deserialize<'de> for Usage {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Details {
            #[serde(default)]
            cached_tokens: Option<u64>,
        }
        #[derive(Deserialize)]
        struct Wire {
            #[serde(default)]
            prompt_tokens: Option<u64>,
            #[serde(default)]
            completion_tokens: Option<u64>,
            #[serde(default)]
            prompt_tokens_details: Option<Details>,
        }
        let w = Wire::deserialize(d)?;
        let prompt_tokens = w.prompt_tokens.unwrap_or(0);
        Ok(Usage {
            prompt_tokens,
            completion_tokens: w.completion_tokens.unwrap_or(0),
            cached_tokens: w
                .prompt_tokens_details
                .and_then(|d| d.cached_tokens)
                .unwrap_or(0)
                .min(prompt_tokens),
            served_from_cache: false,
        })
    }
}

/// The usage reader for one response, chosen by its content type.
pub enum Meter {
    Sse(SseUsageScanner),
    Json {
        /// The body's first chunk, shared with the client's copy (a JSON answer is nearly
        /// always one chunk), and from a second chunk on the whole body copied into `rest`
        /// (holding every piece instead would keep each tiny piece's allocation alive).
        first: Option<Bytes>,
        rest: BytesMut,
        overflowed: bool,
        /// Set by `finish`: generated text bytes of a body that parsed but had no usage.
        text_bytes: Option<u64>,
        /// Set with `text_bytes`: that text, decoded.
        text: Option<String>,
    },
    /// A body the gateway cannot read (compressed): billed at its reservation.
    Unreadable,
}

impl Meter {
    /// Keeps the generated text of a stream as it passes (bounded), so that it can be counted
    /// with the model's tokenizer if the stream ends without usage. A JSON body's text is
    /// read at its end anyway.
    pub fn collect_text(&mut self) {
        if let Meter::Sse(scanner) = self {
            scanner.collect_text();
        }
    }

    /// The generated text that passed, when it was kept whole (see `collect_text`).
    pub fn generated_text(&self) -> Option<&str> {
        match self {
            Meter::Sse(scanner) => scanner.text(),
            Meter::Json { text, .. } => text.as_deref(),
            Meter::Unreadable => None,
        }
    }

    /// An event stream (whose end the gateway may add to), not one JSON body.
    pub fn is_stream(&self) -> bool {
        matches!(self, Meter::Sse(_))
    }

    pub fn for_response(content_type: Option<&[u8]>, strip_usage_chunk: bool) -> Meter {
        let is_sse = content_type.is_some_and(|ct| ct.starts_with(b"text/event-stream"));
        if is_sse {
            Meter::Sse(SseUsageScanner::new(strip_usage_chunk))
        } else {
            Meter::Json {
                first: None,
                rest: BytesMut::new(),
                overflowed: false,
                text_bytes: None,
                text: None,
            }
        }
    }

    /// The reader for a backend's 2xx answer with these headers, and whether the answer's
    /// length changes on the way (the usage chunk the gateway asked for is removed).
    pub fn for_answer(headers: &http::HeaderMap, strip_usage_chunk: bool) -> (Meter, bool) {
        if headers.contains_key(http::header::CONTENT_ENCODING) {
            return (Meter::Unreadable, false);
        }
        let content_type = headers
            .get(http::header::CONTENT_TYPE)
            .map(|v| v.as_bytes());
        let meter = Meter::for_response(content_type, strip_usage_chunk);
        let resized = strip_usage_chunk && matches!(meter, Meter::Sse(_));
        (meter, resized)
    }

    /// Reads a body chunk in place as it passes; at the end of the body, appends what was
    /// held back and returns the usage read (`Some(None)`: the body ended without one).
    pub fn pass(&mut self, body: &mut Option<Bytes>, end_of_stream: bool) -> Option<Option<Usage>> {
        if let Some(chunk) = body.take() {
            *body = Some(self.feed(chunk));
        }
        if !end_of_stream {
            return None;
        }
        let (rest, usage) = self.finish();
        if !rest.is_empty() {
            let mut joined = BytesMut::from(body.take().unwrap_or_default());
            joined.extend_from_slice(&rest);
            *body = Some(joined.freeze());
        }
        Some(usage)
    }

    /// Reads a body chunk; returns what the client gets in its place.
    pub fn feed(&mut self, chunk: Bytes) -> Bytes {
        match self {
            Meter::Sse(scanner) => scanner.feed(chunk),
            Meter::Unreadable => chunk,
            Meter::Json {
                first,
                rest,
                overflowed,
                ..
            } => {
                if *overflowed {
                    return chunk;
                }
                let held = first.as_ref().map_or(0, Bytes::len) + rest.len();
                if held + chunk.len() > MAX_JSON_BYTES {
                    *overflowed = true;
                    (*first, *rest) = (None, BytesMut::new());
                } else if first.is_none() && rest.is_empty() {
                    *first = Some(chunk.clone());
                } else {
                    if let Some(first) = first.take() {
                        rest.extend_from_slice(&first);
                    }
                    rest.extend_from_slice(&chunk);
                }
                chunk
            }
        }
    }

    /// The end of the body: anything still held for the client, and the usage read.
    pub fn finish(&mut self) -> (Bytes, Option<Usage>) {
        match self {
            Meter::Sse(scanner) => (scanner.finish(), scanner.usage()),
            Meter::Unreadable => (Bytes::new(), None),
            Meter::Json {
                first,
                rest,
                overflowed,
                text_bytes,
                text,
            } => {
                #[derive(Deserialize)]
                struct WithUsage {
                    usage: Option<Usage>,
                }
                if *overflowed {
                    return (Bytes::new(), None);
                }
                let (first, rest) = (first.take(), std::mem::take(rest));
                let body: &[u8] = first.as_deref().unwrap_or(&rest);
                // The top-level `usage` alone when it can be found by a scan; the whole body
                // parsed otherwise (no such field, or a body the scan cannot vouch for).
                let scanned = json_scan::top_level_field(body, b"usage").and_then(|value| {
                    Option::<Usage>::deserialize(&mut serde_json::Deserializer::from_slice(value))
                        .ok()
                });
                let read = match scanned {
                    Some(usage) => Ok(usage),
                    None => serde_json::from_slice::<WithUsage>(body).map(|w| w.usage),
                };
                let usage = match read {
                    Ok(Some(usage)) => Some(usage),
                    Ok(None) => {
                        *text_bytes = Some(self::text_bytes(body));
                        let mut generated = String::new();
                        generated_text(body, &mut generated);
                        *text = Some(generated);
                        None
                    }
                    Err(_) => None,
                };
                (Bytes::new(), usage)
            }
        }
    }

    /// The usage to bill, after `finish`, when the backend's own could not be read: an
    /// estimate from the text that passed, or the reservation when nothing could be read.
    pub fn estimate(&self, ceiling: Ceiling) -> (Usage, UsageSource) {
        match self {
            Meter::Sse(scanner) => (ceiling.usage(scanner.text_bytes()), UsageSource::Estimated),
            Meter::Json {
                text_bytes: Some(bytes),
                ..
            } => (ceiling.usage(*bytes), UsageSource::Estimated),
            Meter::Json { .. } | Meter::Unreadable => (
                ceiling.usage(ceiling.completion_tokens),
                UsageSource::Reserved,
            ),
        }
    }
}

/// The usage of a backend's 2xx answer whose own usage could not be read (a body past the
/// copy bound, a stream cut off before its usage chunk, a compressed body, a backend that
/// reports none): what the end of the body still holds, else an estimate from what passed,
/// else the reservation (`ceiling`). Never zero. `body_done`: the answer reached its end.
pub fn unread_usage(meter: &mut Meter, body_done: bool, ceiling: Ceiling) -> (Usage, UsageSource) {
    if !body_done {
        // Cut off: what is held of the last event is read too.
        if let (_, Some(usage)) = meter.finish() {
            return (usage, UsageSource::Reported);
        }
    }
    meter.estimate(ceiling)
}

/// The body to send upstream so a stream ends with a usage chunk: unchanged when the client
/// asked for one itself, else with `stream_options.include_usage` set. The common case (no
/// `stream_options` at all) is a splice, not a re-serialisation.
pub fn request_usage_chunk(body: &Bytes, stream_options: Option<&str>) -> Option<Bytes> {
    #[derive(Deserialize)]
    struct Options {
        include_usage: Option<bool>,
    }
    // `"stream_options": null` reads as absent, but the key is there: re-serialise.
    let stream_options = match stream_options {
        None if memchr::memmem::find(body, b"\"stream_options\"").is_some() => Some("null"),
        other => other,
    };
    match stream_options {
        None => {
            let open = body.iter().position(|&b| b == b'{')?;
            let rest = &body[open + 1..];
            let empty_object = rest
                .iter()
                .find(|b| !b.is_ascii_whitespace())
                .is_some_and(|&b| b == b'}');
            let insert: &[u8] = if empty_object {
                br#""stream_options":{"include_usage":true}"#
            } else {
                br#""stream_options":{"include_usage":true},"#
            };
            let mut out = BytesMut::with_capacity(body.len() + insert.len());
            out.extend_from_slice(&body[..=open]);
            out.extend_from_slice(insert);
            out.extend_from_slice(rest);
            Some(out.freeze())
        }
        Some(raw) => {
            if let Ok(Options {
                include_usage: Some(true),
            }) = serde_json::from_str(raw)
            {
                return None;
            }
            // The client's other options and every other member stay as sent.
            let options =
                crate::request::with_members(raw.as_bytes(), &[("include_usage", "true")])
                    .unwrap_or_else(|_| Bytes::from_static(br#"{"include_usage":true}"#));
            let options = std::str::from_utf8(&options).ok()?;
            crate::request::with_members(body, &[("stream_options", options)]).ok()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_usage_is_read_at_the_end() {
        let mut meter = Meter::for_response(Some(b"application/json"), true);
        let body =
            br#"{"id":"x","usage":{"prompt_tokens":5,"completion_tokens":3,"total_tokens":8}}"#;
        let out = meter.feed(Bytes::from_static(&body[..10]));
        assert_eq!(&out[..], &body[..10], "JSON passes through unchanged");
        meter.feed(Bytes::from_static(&body[10..]));
        let (rest, usage) = meter.finish();
        assert!(rest.is_empty());
        assert_eq!(
            usage,
            Some(Usage {
                prompt_tokens: 5,
                completion_tokens: 3,
                cached_tokens: 0,
                served_from_cache: false,
            })
        );
    }

    #[test]
    fn a_json_answer_in_many_pieces_is_passed_on_as_is_and_read_whole() {
        let body = br#"{"id":"x","choices":[{"message":{"content":"a \"quoted\" reply"}}],"usage":{"prompt_tokens":11,"completion_tokens":4}}"#;
        let mut meter = Meter::for_response(Some(b"application/json"), false);
        let mut passed = Vec::new();
        for piece in body.chunks(3) {
            passed.extend_from_slice(&meter.feed(Bytes::copy_from_slice(piece)));
        }
        assert_eq!(passed, body);
        let usage = meter.finish().1.expect("usage read across pieces");
        assert_eq!((usage.prompt_tokens, usage.completion_tokens), (11, 4));
    }

    #[test]
    fn only_the_answers_own_usage_counts_wherever_it_stands() {
        let read = |body: &'static [u8]| {
            let mut meter = Meter::for_response(Some(b"application/json"), false);
            meter.feed(Bytes::from_static(body));
            meter
                .finish()
                .1
                .map(|u| (u.prompt_tokens, u.completion_tokens))
        };
        // A usage of a choice's, or one quoted in the content, is not the answer's.
        let nested_after = br#"{"usage":{"prompt_tokens":7,"completion_tokens":2},"choices":[{"message":{"content":"\"usage\":{\"prompt_tokens\":1}","meta":{"usage":{"prompt_tokens":900}}}}]}"#;
        assert_eq!(read(nested_after), Some((7, 2)));
        // Spelled with an escape, or given twice: the full parse decides, as before.
        assert_eq!(
            read(br#"{"\u0075sage":{"prompt_tokens":4,"completion_tokens":1}}"#),
            Some((4, 1))
        );
        assert_eq!(
            read(br#"{"usage":{"prompt_tokens":4},"usage":{"prompt_tokens":5}}"#),
            None
        );
        // `null`, or a body cut short: no usage read.
        assert_eq!(read(br#"{"choices":[],"usage":null}"#), None);
        assert_eq!(
            read(br#"{"usage":{"prompt_tokens":4,"completion_tokens":1}"#),
            None
        );
    }

    #[test]
    fn a_json_answer_past_the_reading_limit_is_passed_on_unread() {
        let mut meter = Meter::for_response(Some(b"application/json"), false);
        let piece = Bytes::from(vec![b' '; 1 << 20]);
        for _ in 0..(MAX_JSON_BYTES >> 20) {
            assert_eq!(meter.feed(piece.clone()).len(), piece.len());
        }
        let last = Bytes::from_static(br#"{"usage":{"prompt_tokens":1,"completion_tokens":1}}"#);
        assert_eq!(meter.feed(last.clone()), last);
        assert_eq!(meter.finish().1, None, "too large to read");
    }

    #[test]
    fn embeddings_usage_has_no_completion_tokens() {
        let mut meter = Meter::for_response(Some(b"application/json"), false);
        meter.feed(Bytes::from_static(
            br#"{"data":[],"usage":{"prompt_tokens":7,"total_tokens":7}}"#,
        ));
        assert_eq!(meter.finish().1.unwrap().prompt_tokens, 7);
    }

    #[test]
    fn the_usage_chunk_is_requested_without_disturbing_the_body() {
        let body = Bytes::from_static(br#" {"model":"m","stream":true,"messages":[]}"#);
        let out = request_usage_chunk(&body, None).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["model"], "m");

        let body =
            Bytes::from_static(br#"{"model":"m","stream_options":{"include_usage":false,"x":1}}"#);
        let out = request_usage_chunk(&body, Some(r#"{"include_usage":false,"x":1}"#)).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            v["stream_options"],
            serde_json::json!({"include_usage": true, "x": 1})
        );

        let body = Bytes::from_static(br#"{"model":"m","stream_options":{"include_usage":true}}"#);
        assert!(request_usage_chunk(&body, Some(r#"{"include_usage":true}"#)).is_none());
    }

    #[test]
    fn a_null_stream_options_is_replaced_not_doubled() {
        let body = Bytes::from_static(br#"{"model":"m","stream":true,"stream_options":null}"#);
        let out = request_usage_chunk(&body, None).unwrap();
        let text = std::str::from_utf8(&out).unwrap();
        assert_eq!(text.matches("stream_options").count(), 1, "{text}");
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
    }

    #[test]
    fn generated_text_is_counted_in_bytes() {
        let chunk = br#"{"choices":[{"delta":{"content":"Hi \"you\""}},{"text" : "abc"}],"x":{"content":null}}"#;
        assert_eq!(text_bytes(chunk), r#"Hi \"you\""#.len() as u64 + 3);
    }

    #[test]
    fn unreadable_usage_is_estimated_or_reserved_never_zero() {
        let ceiling = Ceiling {
            prompt_tokens: 70,
            completion_tokens: 50,
        };
        let mut meter = Meter::for_response(Some(b"application/json"), false);
        meter.feed(Bytes::from_static(
            br#"{"choices":[{"message":{"content":"twelve bytes"}}]}"#,
        ));
        assert_eq!(meter.finish().1, None);
        let (usage, source) = meter.estimate(ceiling);
        assert_eq!((usage.prompt_tokens, usage.completion_tokens), (70, 12));
        assert_eq!(source, UsageSource::Estimated);

        let mut meter = Meter::for_response(Some(b"application/json"), false);
        meter.feed(Bytes::from_static(b"\x1f\x8b garbage"));
        meter.finish();
        let (usage, source) = meter.estimate(ceiling);
        assert_eq!(
            (usage.completion_tokens, source),
            (50, UsageSource::Reserved)
        );

        let mut meter = Meter::for_response(Some(b"text/event-stream"), true);
        meter.feed(Bytes::from_static(
            b"data: {\"choices\":[{\"delta\":{\"content\":\"abcd\"}}]}\n\n",
        ));
        let (usage, source) = meter.estimate(ceiling);
        assert_eq!(
            (usage.completion_tokens, source),
            (4, UsageSource::Estimated)
        );
    }
}
