//! What is sent: a weighted mix of OpenAI request bodies (from a JSON Lines file or built from
//! flags) and the API keys to spread them over.
//!
//! A mix line is `{"body": {...}, "weight": 2, "path": "/v1/chat/completions"}`; `weight`
//! defaults to 1, and `path` defaults from the body (`messages` → chat completions, `prompt`
//! → completions, `input` → embeddings).

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{json, Value};

/// One kind of request in the mix.
#[derive(Debug, Clone)]
pub struct RequestSpec {
    pub path: String,
    pub body: Bytes,
    pub stream: bool,
    weight: f64,
}

#[derive(Debug, Clone)]
pub struct Workload {
    specs: Vec<RequestSpec>,
    /// Running sums of the weights, for picking by a uniform number.
    cumulative: Vec<f64>,
    keys: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MixLine {
    body: Value,
    #[serde(default = "one")]
    weight: f64,
    path: Option<String>,
}

fn one() -> f64 {
    1.0
}

/// The route a body belongs to, from the fields it carries.
fn path_for(body: &Value) -> Option<&'static str> {
    if body.get("messages").is_some() {
        Some("/v1/chat/completions")
    } else if body.get("prompt").is_some() {
        Some("/v1/completions")
    } else if body.get("input").is_some() {
        Some("/v1/embeddings")
    } else {
        None
    }
}

impl Workload {
    pub fn new(specs: Vec<RequestSpec>, keys: Vec<String>) -> Result<Self> {
        if specs.is_empty() {
            bail!("the request mix is empty");
        }
        let mut total = 0.0;
        let cumulative = specs
            .iter()
            .map(|s| {
                total += s.weight;
                total
            })
            .collect();
        Ok(Workload {
            specs,
            cumulative,
            keys,
        })
    }

    /// Parses a JSON Lines mix; blank lines and lines starting with `#` are skipped.
    pub fn parse_mix(text: &str) -> Result<Vec<RequestSpec>> {
        let mut specs = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mix: MixLine =
                serde_json::from_str(line).with_context(|| format!("mix line {}", i + 1))?;
            if !(mix.weight.is_finite() && mix.weight > 0.0) {
                bail!("mix line {}: weight must be a positive number", i + 1);
            }
            let path = match mix.path {
                Some(p) => p,
                None => path_for(&mix.body)
                    .with_context(|| {
                        format!(
                            "mix line {}: give a path, or a body with messages, prompt or input",
                            i + 1
                        )
                    })?
                    .to_owned(),
            };
            specs.push(RequestSpec {
                stream: mix
                    .body
                    .get("stream")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
                body: Bytes::from(mix.body.to_string()),
                path,
                weight: mix.weight,
            });
        }
        Ok(specs)
    }

    /// A one-request mix built from flags.
    pub fn single(
        kind: &str,
        model: &str,
        stream: bool,
        max_tokens: u32,
        prompt: &str,
    ) -> Result<RequestSpec> {
        let (path, body) = match kind {
            "chat" => (
                "/v1/chat/completions",
                json!({"model": model, "stream": stream, "max_tokens": max_tokens,
                       "messages": [{"role": "user", "content": prompt}]}),
            ),
            "completions" => (
                "/v1/completions",
                json!({"model": model, "stream": stream, "max_tokens": max_tokens, "prompt": prompt}),
            ),
            "embeddings" => {
                if stream {
                    bail!("embeddings cannot be streamed");
                }
                ("/v1/embeddings", json!({"model": model, "input": prompt}))
            }
            other => bail!("unknown request kind '{other}': use chat, completions or embeddings"),
        };
        Ok(RequestSpec {
            path: path.to_owned(),
            body: Bytes::from(body.to_string()),
            stream,
            weight: 1.0,
        })
    }

    /// The `n`-th request: its kind by weight, its key in turn. Deterministic in `n`, so a
    /// run's mix does not depend on scheduling.
    pub fn pick(&self, n: u64) -> (&RequestSpec, Option<&str>) {
        let total = *self.cumulative.last().expect("mix is not empty");
        let u = unit_interval(n) * total;
        let i = self
            .cumulative
            .partition_point(|&c| c <= u)
            .min(self.specs.len() - 1);
        let key = (!self.keys.is_empty())
            .then(|| self.keys[(n % self.keys.len() as u64) as usize].as_str());
        (&self.specs[i], key)
    }
}

/// A well-spread number in [0, 1) from `n` (splitmix64).
fn unit_interval(n: u64) -> f64 {
    let mut z = n.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mix_lines_infer_paths_and_keep_weights() {
        let specs = Workload::parse_mix(
            r#"
            # a comment
            {"body": {"model": "m", "messages": [], "stream": true}, "weight": 3}
            {"body": {"model": "m", "input": "x"}}
            "#,
        )
        .unwrap();
        assert_eq!(specs[0].path, "/v1/chat/completions");
        assert!(specs[0].stream);
        assert_eq!(specs[1].path, "/v1/embeddings");
        let w = Workload::new(specs, vec!["k1".into(), "k2".into()]).unwrap();
        let chats = (0..4000).filter(|&n| w.pick(n).0.stream).count();
        assert!(
            (2800..3200).contains(&chats),
            "weight 3:1 gave {chats}/4000 chats"
        );
        assert_eq!(w.pick(0).1, Some("k1"));
        assert_eq!(w.pick(1).1, Some("k2"));
    }

    #[test]
    fn bad_mix_lines_say_which() {
        let err = Workload::parse_mix("{\"body\": {\"model\": \"m\"}}").unwrap_err();
        assert!(format!("{err:#}").contains("line 1"));
        let err = Workload::parse_mix("{\"body\": {}, \"weight\": -1}").unwrap_err();
        assert!(err.to_string().contains("weight"));
    }
}
