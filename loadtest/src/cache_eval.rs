//! How precise is the semantic cache, seen from outside? Asks pairs of questions through the
//! public API exactly as a client would, and counts how often the second question of a pair
//! was answered from the cache kept for the first: for pairs that mean the same thing that
//! is recall, for pairs that do not it is a false hit (a wrong answer served).
//!
//! It must never let pairs see each other's entries, or an earlier run's: each pair asks in a
//! namespace of its own, chosen by a system message naming this run and the pair.
//!
//! A pair file is JSON Lines, one pair a line:
//! `{"class": "negation", "same": false, "a": "...", "b": "..."}`; blank lines are skipped.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Number, Value};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// How often the admin API is asked whether the first answer has been stored, and for how
/// long before the pair is counted as not stored.
const STORED_POLL: Duration = Duration::from_millis(20);
const STORED_TIMEOUT: Duration = Duration::from_secs(5);
/// Without the admin API there is no way to see the store land, so a fixed wait stands in.
const BLIND_WAIT: Duration = Duration::from_millis(300);

/// Two questions, and whether an answer to one is a right answer to the other.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Pair {
    /// Where in the pair file it was, for error messages and `--show-wrong`.
    #[serde(skip)]
    pub line: usize,
    pub class: String,
    pub same: bool,
    pub a: String,
    pub b: String,
}

/// Reads a pair file; a line that is not a pair is an error naming its line number.
pub fn parse_pairs(text: &str) -> Result<Vec<Pair>> {
    let mut pairs = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let mut pair: Pair = serde_json::from_str(line)
            .with_context(|| format!("pair file line {}: not a pair", i + 1))?;
        pair.line = i + 1;
        pairs.push(pair);
    }
    if pairs.is_empty() {
        bail!("the pair file has no pairs");
    }
    Ok(pairs)
}

/// How the second question of a pair was answered (the `x-sluice-cache` header), or that it
/// was never asked because the first answer was not stored in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// An exact hit: the same request was kept.
    Hit,
    Semantic,
    Miss,
    NotStored,
}

impl Outcome {
    fn from_header(value: Option<&str>) -> Option<Outcome> {
        match value? {
            "hit" => Some(Outcome::Hit),
            "semantic" => Some(Outcome::Semantic),
            "miss" => Some(Outcome::Miss),
            _ => None,
        }
    }

    /// As the header says it (and "not stored").
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::Semantic => "semantic",
            Outcome::Miss => "miss",
            Outcome::NotStored => "not stored",
        }
    }

    pub fn served_from_cache(self) -> bool {
        matches!(self, Outcome::Hit | Outcome::Semantic)
    }
}

/// What became of one pair.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PairResult {
    /// 1-based, in file order; the number in the pair's system message.
    pub pair: usize,
    pub line: usize,
    pub class: String,
    pub same: bool,
    pub outcome: Outcome,
    /// `x-sluice-cache-similarity` of the second answer, when the gateway sent one.
    pub similarity: Option<f64>,
    /// The second request, sent to body read; none when it was not sent.
    pub latency_ms: Option<f64>,
}

/// Pairs served from the cache, of those asked.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Rate {
    pub pairs: u64,
    pub served: u64,
    /// `None` when no pair was asked.
    pub percent: Option<f64>,
}

impl Rate {
    fn of<'r>(results: impl IntoIterator<Item = &'r PairResult>) -> Rate {
        let (mut pairs, mut served) = (0, 0);
        for r in results {
            if r.outcome != Outcome::NotStored {
                pairs += 1;
                served += u64::from(r.outcome.served_from_cache());
            }
        }
        Rate {
            pairs,
            served,
            percent: (pairs > 0).then(|| served as f64 * 100.0 / pairs as f64),
        }
    }
}

/// One row of the per-class table. A class is split by `same`, since a rate over pairs of
/// both kinds would mix recall with false hits.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClassRow {
    pub class: String,
    pub same: bool,
    #[serde(flatten)]
    pub rate: Rate,
    pub exact_hits: u64,
    pub semantic_hits: u64,
    /// Excluded from the rate.
    pub not_stored: u64,
}

/// Latency of the second requests that came to one outcome, in milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Latency {
    pub count: usize,
    pub p50: f64,
    pub p99: f64,
}

impl Latency {
    fn of(mut values: Vec<f64>) -> Option<Latency> {
        values.sort_by(f64::total_cmp);
        Some(Latency {
            count: values.len(),
            p50: percentile(&values, 0.50)?,
            p99: percentile(&values, 0.99)?,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LatencyByOutcome {
    pub semantic: Option<Latency>,
    pub hit: Option<Latency>,
    pub miss: Option<Latency>,
}

/// The nearest-rank percentile of sorted values: the smallest value with at least `q` of
/// them at or below it. Exact, because an evaluation has hundreds of samples, not millions.
pub fn percentile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// What the gateway's `verification` counters did during the run.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Verification {
    /// No `--admin`, so the counters were not read.
    NotRead,
    /// The cache stats have no `verification` object.
    Absent,
    /// Every numeric leaf's change, by dotted path (`rejected.role_swap`).
    Read { delta: BTreeMap<String, Number> },
}

/// `after - before` for every numeric leaf of `after`, by dotted path; a leaf `before` lacks
/// counts from zero. Generic so that a counter the gateway adds shows without a change here.
pub fn counter_delta(before: &Value, after: &Value) -> BTreeMap<String, Number> {
    let (mut was, mut now) = (BTreeMap::new(), BTreeMap::new());
    numeric_leaves(before, String::new(), &mut was);
    numeric_leaves(after, String::new(), &mut now);
    now.into_iter()
        .filter_map(|(path, after)| {
            let delta = match was.get(&path) {
                None => after,
                Some(before) => match (after.as_i64(), before.as_i64()) {
                    (Some(a), Some(b)) => Number::from(a.wrapping_sub(b)),
                    _ => Number::from_f64(after.as_f64()? - before.as_f64()?)?,
                },
            };
            Some((path, delta))
        })
        .collect()
}

fn numeric_leaves(value: &Value, path: String, out: &mut BTreeMap<String, Number>) {
    let child = |key: &str| {
        if path.is_empty() {
            key.to_owned()
        } else {
            format!("{path}.{key}")
        }
    };
    match value {
        Value::Number(n) => {
            out.insert(path, n.clone());
        }
        Value::Object(map) => {
            for (key, v) in map {
                numeric_leaves(v, child(key), out);
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                numeric_leaves(v, child(&i.to_string()), out);
            }
        }
        _ => {}
    }
}

/// The whole evaluation, as printed and as written by `--json`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Evaluation {
    pub target: String,
    pub run_id: String,
    pub model: String,
    pub max_tokens: u32,
    /// How the store of each first answer was awaited: `"stored_counter"` (admin API) or
    /// `"sleep_300ms"`.
    pub waited_for: String,
    pub pairs: usize,
    pub not_stored: usize,
    pub classes: Vec<ClassRow>,
    /// Same-meaning pairs served from the cache.
    pub paraphrase_recall: Rate,
    /// Different-meaning pairs served from the cache.
    pub false_hit_rate: Rate,
    pub latency_ms: LatencyByOutcome,
    pub verification: Verification,
    pub results: Vec<PairResult>,
}

/// What the run was, besides its results.
#[derive(Debug, Clone)]
pub struct RunInfo {
    pub target: String,
    pub run_id: String,
    pub model: String,
    pub max_tokens: u32,
    pub waited_for: String,
}

impl Evaluation {
    /// Tallies the results; pairs not stored are counted apart and left out of every rate.
    pub fn new(run: RunInfo, results: Vec<PairResult>, verification: Verification) -> Self {
        let mut classes: BTreeMap<(&str, bool), Vec<&PairResult>> = BTreeMap::new();
        for r in &results {
            classes.entry((&r.class, r.same)).or_default().push(r);
        }
        let count =
            |rs: &[&PairResult], outcome| rs.iter().filter(|r| r.outcome == outcome).count();
        let classes = classes
            .into_iter()
            .map(|((class, same), rs)| ClassRow {
                class: class.to_owned(),
                same,
                rate: Rate::of(rs.iter().copied()),
                exact_hits: count(&rs, Outcome::Hit) as u64,
                semantic_hits: count(&rs, Outcome::Semantic) as u64,
                not_stored: count(&rs, Outcome::NotStored) as u64,
            })
            .collect();
        let latencies = |outcome| {
            Latency::of(
                results
                    .iter()
                    .filter(|r| r.outcome == outcome)
                    .filter_map(|r| r.latency_ms)
                    .collect(),
            )
        };
        Evaluation {
            target: run.target,
            run_id: run.run_id,
            model: run.model,
            max_tokens: run.max_tokens,
            waited_for: run.waited_for,
            pairs: results.len(),
            not_stored: results
                .iter()
                .filter(|r| r.outcome == Outcome::NotStored)
                .count(),
            classes,
            paraphrase_recall: Rate::of(results.iter().filter(|r| r.same)),
            false_hit_rate: Rate::of(results.iter().filter(|r| !r.same)),
            latency_ms: LatencyByOutcome {
                semantic: latencies(Outcome::Semantic),
                hit: latencies(Outcome::Hit),
                miss: latencies(Outcome::Miss),
            },
            verification,
            results,
        }
    }

    /// The plain-text report.
    pub fn text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "cache-eval {} (run {}, model {}, max_tokens {}): {} pairs, {} not stored (left out of the rates)",
            self.target, self.run_id, self.model, self.max_tokens, self.pairs, self.not_stored
        );
        let width = self
            .classes
            .iter()
            .map(|c| c.class.len())
            .max()
            .unwrap_or(0)
            .max("class".len());
        let _ = writeln!(
            out,
            "  {:<width$}  same  pairs  served     rate  exact  semantic  not stored",
            "class"
        );
        for c in &self.classes {
            let _ = writeln!(
                out,
                "  {:<width$}  {:<4}  {:>5}  {:>6}  {:>7}  {:>5}  {:>8}  {:>10}",
                c.class,
                if c.same { "yes" } else { "no" },
                c.rate.pairs,
                c.rate.served,
                percent(c.rate.percent),
                c.exact_hits,
                c.semantic_hits,
                c.not_stored
            );
        }
        for (name, rate, what) in [
            (
                "paraphrase recall",
                &self.paraphrase_recall,
                "same-meaning pairs served from the cache",
            ),
            (
                "false-hit rate",
                &self.false_hit_rate,
                "different-meaning pairs served from the cache",
            ),
        ] {
            let _ = writeln!(
                out,
                "{name:<18} {}/{} = {} ({what})",
                rate.served,
                rate.pairs,
                percent(rate.percent)
            );
        }
        let _ = writeln!(out, "second-request latency (ms, send to body read):");
        for (name, latency) in [
            ("semantic hit", &self.latency_ms.semantic),
            ("exact hit", &self.latency_ms.hit),
            ("miss", &self.latency_ms.miss),
        ] {
            match latency {
                Some(l) => {
                    let _ = writeln!(
                        out,
                        "  {name:<12} n {:>5}  p50 {:>8.2}  p99 {:>8.2}",
                        l.count, l.p50, l.p99
                    );
                }
                None => {
                    let _ = writeln!(out, "  {name:<12} n     0");
                }
            }
        }
        match &self.verification {
            Verification::NotRead => {
                let _ = writeln!(out, "verification counters: not read (no --admin)");
            }
            Verification::Absent => {
                let _ = writeln!(
                    out,
                    "verification counters: absent from /admin/v1/cache/stats"
                );
            }
            Verification::Read { delta } => {
                let _ = writeln!(out, "verification counters (change over the run):");
                let width = delta.keys().map(String::len).max().unwrap_or(0);
                for (path, n) in delta {
                    let sign = if n.to_string().starts_with('-') {
                        ""
                    } else {
                        "+"
                    };
                    let _ = writeln!(out, "  {path:<width$}  {sign}{n}");
                }
            }
        }
        out
    }

    /// Each false hit and each missed paraphrase, with both questions and the similarity.
    pub fn wrong(&self, pairs: &[Pair]) -> String {
        let mut out = String::new();
        for (r, p) in self.results.iter().zip(pairs) {
            let what = match (r.same, r.outcome.served_from_cache()) {
                _ if r.outcome == Outcome::NotStored => continue,
                (false, true) => "false hit",
                (true, false) => "missed paraphrase",
                _ => continue,
            };
            let similarity = r
                .similarity
                .map_or_else(|| "-".to_owned(), |s| format!("{s:.4}"));
            let _ = writeln!(
                out,
                "{what}: pair {} (line {}, class {}), {}, similarity {similarity}\n  a: {}\n  b: {}",
                r.pair,
                r.line,
                r.class,
                r.outcome.as_str(),
                p.a,
                p.b
            );
        }
        out
    }
}

fn percent(p: Option<f64>) -> String {
    p.map_or_else(|| "-".to_owned(), |p| format!("{p:.2}%"))
}

/// Where to ask, and as whom.
#[derive(Debug, Clone)]
pub struct Target {
    pub url: String,
    pub key: String,
    /// The admin API's base URL and token, to see answers stored and read the counters.
    pub admin: Option<(String, String)>,
    pub model: String,
    pub max_tokens: u32,
    pub timeout: Duration,
}

/// One answer's cache headers and how long it took.
struct Reply {
    outcome: Outcome,
    similarity: Option<f64>,
    latency: Duration,
}

/// Asks every pair in turn and tallies what came back. Any non-2xx answer ends the run with
/// an error, since a rate over failed requests would measure the failures. Once `stop` is
/// set, no further pair is asked and the pairs asked so far are tallied.
pub async fn evaluate(target: &Target, pairs: &[Pair], stop: &AtomicBool) -> Result<Evaluation> {
    let http = reqwest::Client::builder()
        .timeout(target.timeout)
        .tcp_nodelay(true)
        .build()?;
    let run_id = format!("{:016x}", rand::random::<u64>());
    let admin = target.admin.as_ref().map(|(url, token)| Admin {
        http: &http,
        url: url.trim_end_matches('/'),
        token,
    });
    let verification_before = match &admin {
        Some(admin) => Some(admin.stats().await?.get("verification").cloned()),
        None => None,
    };

    let progress = indicatif::ProgressBar::new(pairs.len() as u64);
    if !std::io::stderr().is_terminal() {
        progress.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let mut results = Vec::with_capacity(pairs.len());
    for (i, pair) in pairs.iter().enumerate() {
        if stop.load(Ordering::Relaxed) {
            eprintln!("sluice-load: stopped after {i} of {} pairs", pairs.len());
            break;
        }
        let n = i + 1;
        let system = format!("cache-eval {run_id} pair {n}");
        let which_pair = || format!("pair {n} (line {})", pair.line);
        let stored_before = match &admin {
            Some(admin) => Some(admin.stored().await?),
            None => None,
        };
        let first = ask(&http, target, &system, &pair.a)
            .await
            .with_context(|| format!("{}, first question", which_pair()))?;
        if first.outcome.served_from_cache() {
            bail!(
                "{}: the first question was answered from the cache ({}) in a namespace no one \
                 has used, so the system message no longer keeps pairs apart",
                which_pair(),
                first.outcome.as_str()
            );
        }
        let stored = match (&admin, stored_before) {
            (Some(admin), Some(before)) => admin.wait_stored(before + 1).await?,
            _ => {
                tokio::time::sleep(BLIND_WAIT).await;
                true
            }
        };
        let mut result = PairResult {
            pair: n,
            line: pair.line,
            class: pair.class.clone(),
            same: pair.same,
            outcome: Outcome::NotStored,
            similarity: None,
            latency_ms: None,
        };
        if stored {
            let stored_after_first = match &admin {
                Some(admin) => Some(admin.stored().await?),
                None => None,
            };
            let second = ask(&http, target, &system, &pair.b)
                .await
                .with_context(|| format!("{}, second question", which_pair()))?;
            result.outcome = second.outcome;
            result.similarity = second.similarity;
            result.latency_ms = Some(second.latency.as_secs_f64() * 1000.0);
            // A missed second question is kept too, asynchronously; waiting for it keeps its
            // store from being taken for the next pair's first answer.
            if let (Some(admin), Some(count), Outcome::Miss) =
                (&admin, stored_after_first, second.outcome)
            {
                admin.wait_stored(count + 1).await?;
            }
        }
        results.push(result);
        progress.inc(1);
    }
    progress.finish_and_clear();

    let verification = match (&admin, verification_before) {
        (Some(admin), Some(before)) => match (before, admin.stats().await?.get("verification")) {
            (Some(before), Some(after)) => Verification::Read {
                delta: counter_delta(&before, after),
            },
            _ => Verification::Absent,
        },
        _ => Verification::NotRead,
    };
    let run = RunInfo {
        target: target.url.clone(),
        run_id,
        model: target.model.clone(),
        max_tokens: target.max_tokens,
        waited_for: if admin.is_some() {
            "stored_counter"
        } else {
            "sleep_300ms"
        }
        .to_owned(),
    };
    Ok(Evaluation::new(run, results, verification))
}

/// Sends one temperature-0 chat request and reads how the cache answered it.
async fn ask(
    http: &reqwest::Client,
    target: &Target,
    system: &str,
    question: &str,
) -> Result<Reply> {
    let body = json!({
        "model": target.model,
        "temperature": 0,
        "max_tokens": target.max_tokens,
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": question},
        ],
    });
    let started = Instant::now();
    let response = http
        .post(format!(
            "{}/v1/chat/completions",
            target.url.trim_end_matches('/')
        ))
        .bearer_auth(&target.key)
        .json(&body)
        .send()
        .await?;
    let status = response.status();
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let cache = header("x-sluice-cache");
    let similarity = header("x-sluice-cache-similarity").and_then(|s| s.parse().ok());
    let body = response.bytes().await?;
    let latency = started.elapsed();
    if !status.is_success() {
        bail!("HTTP {status}: {}", String::from_utf8_lossy(&body));
    }
    let outcome = Outcome::from_header(cache.as_deref()).with_context(|| {
        format!(
            "x-sluice-cache is {cache:?}, not hit, semantic or miss: is the cache on for this \
             key and model?"
        )
    })?;
    Ok(Reply {
        outcome,
        similarity,
        latency,
    })
}

/// The gateway's admin API, for the cache's counters.
struct Admin<'a> {
    http: &'a reqwest::Client,
    url: &'a str,
    token: &'a str,
}

impl Admin<'_> {
    async fn stats(&self) -> Result<Value> {
        let response = self
            .http
            .get(format!("{}/admin/v1/cache/stats", self.url))
            .bearer_auth(self.token)
            .send()
            .await
            .context("GET /admin/v1/cache/stats")?;
        let status = response.status();
        let body = response.bytes().await?;
        if !status.is_success() {
            bail!(
                "GET /admin/v1/cache/stats: HTTP {status}: {}",
                String::from_utf8_lossy(&body)
            );
        }
        serde_json::from_slice(&body).context("GET /admin/v1/cache/stats: not JSON")
    }

    async fn stored(&self) -> Result<u64> {
        self.stats()
            .await?
            .get("stored")
            .and_then(Value::as_u64)
            .context("/admin/v1/cache/stats has no numeric `stored`")
    }

    /// Waits until `stored` reaches `count`; false if it has not within [`STORED_TIMEOUT`].
    async fn wait_stored(&self, count: u64) -> Result<bool> {
        let deadline = Instant::now() + STORED_TIMEOUT;
        loop {
            if self.stored().await? >= count {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            tokio::time::sleep(STORED_POLL).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pair_file_skips_blank_lines_and_names_a_bad_line() {
        let good = r#"{"class": "paraphrase", "same": true, "a": "x?", "b": "y?"}

{"class": "negation", "same": false, "a": "p", "b": "not p", "note": "kept for people"}
"#;
        let pairs = parse_pairs(good).unwrap();
        assert_eq!(pairs.len(), 2);
        assert_eq!((pairs[0].line, pairs[1].line), (1, 3));
        assert!(pairs[0].same && !pairs[1].same);
        assert_eq!(pairs[1].b, "not p");

        let bad = format!("{good}{{\"class\": \"x\", \"a\": \"no same\", \"b\": \"\"}}\n");
        let error = format!("{:#}", parse_pairs(&bad).unwrap_err());
        assert!(error.contains("line 4"), "{error}");
        assert!(parse_pairs("\n  \n").is_err());
    }

    #[test]
    fn nearest_rank_percentiles() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&values, 0.5), Some(50.0));
        assert_eq!(percentile(&values, 0.99), Some(99.0));
        assert_eq!(percentile(&[7.0], 0.99), Some(7.0));
        assert_eq!(percentile(&[1.0, 2.0, 3.0], 0.5), Some(2.0));
        assert_eq!(percentile(&[], 0.5), None);
    }

    fn result(class: &str, same: bool, outcome: Outcome, latency_ms: f64) -> PairResult {
        PairResult {
            pair: 0,
            line: 0,
            class: class.to_owned(),
            same,
            outcome,
            similarity: None,
            latency_ms: (outcome != Outcome::NotStored).then_some(latency_ms),
        }
    }

    #[test]
    fn rates_leave_out_pairs_not_stored_and_split_classes_by_meaning() {
        let results = vec![
            result("paraphrase", true, Outcome::Semantic, 4.0),
            result("paraphrase", true, Outcome::Semantic, 6.0),
            result("paraphrase", true, Outcome::Miss, 2.0),
            result("paraphrase", true, Outcome::NotStored, 0.0),
            result("identical", true, Outcome::Hit, 1.0),
            result("negation", false, Outcome::Semantic, 5.0),
            result("negation", false, Outcome::Miss, 3.0),
            result("negation", false, Outcome::Miss, 3.0),
            result("negation", false, Outcome::Miss, 3.0),
        ];
        let run = RunInfo {
            target: "t".into(),
            run_id: "r".into(),
            model: "m".into(),
            max_tokens: 8,
            waited_for: "stored_counter".into(),
        };
        let e = Evaluation::new(run, results, Verification::NotRead);
        assert_eq!(e.not_stored, 1);
        assert_eq!(
            e.paraphrase_recall,
            Rate {
                pairs: 4,
                served: 3,
                percent: Some(75.0)
            }
        );
        assert_eq!(e.false_hit_rate.percent, Some(25.0));
        let paraphrase = e.classes.iter().find(|c| c.class == "paraphrase").unwrap();
        assert_eq!(
            (
                paraphrase.rate.pairs,
                paraphrase.rate.served,
                paraphrase.not_stored
            ),
            (3, 2, 1)
        );
        let semantic = e.latency_ms.semantic.as_ref().unwrap();
        assert_eq!((semantic.count, semantic.p50, semantic.p99), (3, 5.0, 6.0));
        assert_eq!(e.latency_ms.hit.as_ref().unwrap().count, 1);
        assert_eq!(e.latency_ms.miss.as_ref().unwrap().count, 4);
        let text = e.text();
        assert!(text.contains("paraphrase recall  3/4 = 75.00%"), "{text}");
        assert!(text.contains("false-hit rate     1/4 = 25.00%"), "{text}");
    }

    #[test]
    fn verification_delta_covers_every_nested_numeric_leaf() {
        let before = json!({"candidates": 3, "rejected": {"role_swap": 1}, "note": "x"});
        let after = json!({"candidates": 10, "rejected": {"role_swap": 2, "negation": 4},
                           "verifier_errors": 0});
        let delta = counter_delta(&before, &after);
        let delta: Vec<(&str, String)> = delta
            .iter()
            .map(|(k, v)| (k.as_str(), v.to_string()))
            .collect();
        assert_eq!(
            delta,
            [
                ("candidates", "7".to_owned()),
                ("rejected.negation", "4".to_owned()),
                ("rejected.role_swap", "1".to_owned()),
                ("verifier_errors", "0".to_owned()),
            ]
        );
    }
}
