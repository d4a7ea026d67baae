//! Does a stored question ask what was asked? The semantic cache's second stage: each
//! candidate the index found must pass the structural checks (`same_question`), then the
//! learned verifier where one is configured. A verifier that is down, slow or answers
//! nonsense makes the candidate a miss, never an error the client sees.

use super::endpoint::{EndpointError, JsonEndpoint};
use crate::config::{LearnedVerifierConfig, VerificationConfig};
use serde::{Deserialize, Serialize};
use sluice_policies::same_question::{self, Check};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

/// Why a candidate was turned down, as stats and metrics name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    Structure(Check),
    /// The learned verifier scored the pair below its threshold.
    Learned,
    /// The learned verifier could not be asked (down, slow, a bad answer).
    VerifierUnavailable,
}

impl Rejection {
    pub fn name(self) -> &'static str {
        match self {
            Rejection::Structure(check) => check.name(),
            Rejection::Learned => "learned",
            Rejection::VerifierUnavailable => "verifier_unavailable",
        }
    }
}

pub struct Verifier {
    config: VerificationConfig,
    learned: Option<Scorer>,
    candidates: AtomicU64,
    verified: AtomicU64,
    /// One per [`Check`], then learned, then unavailable.
    rejected: [AtomicU64; Check::ALL.len() + 2],
}

/// What the verifier has done on this replica, for `GET /admin/v1/cache/stats` and metrics.
#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
pub struct VerificationStats {
    pub enabled: bool,
    pub learned: bool,
    /// Candidates looked at (each semantic lookup may look at several).
    pub candidates: u64,
    pub verified: u64,
    /// Candidates turned down, by the check that turned them down.
    #[schema(value_type = BTreeMap<String, u64>)]
    pub rejected: BTreeMap<&'static str, u64>,
}

impl Verifier {
    pub fn new(config: VerificationConfig) -> Verifier {
        let learned = config.learned.clone().map(Scorer::new);
        Verifier {
            config,
            learned,
            candidates: AtomicU64::new(0),
            verified: AtomicU64::new(0),
            rejected: Default::default(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.config.enabled
    }

    /// The lowest similarity a candidate may have: the retrieval threshold when verifying,
    /// else the serving threshold itself.
    pub fn floor(&self, strict: f32) -> f32 {
        if self.config.enabled {
            self.config.retrieval_threshold.min(strict)
        } else {
            strict
        }
    }

    pub fn top_k(&self) -> usize {
        if self.config.enabled {
            self.config.top_k
        } else {
            1
        }
    }

    /// Whether the answer to `stored` may be served for `asked`, counted.
    pub async fn judge(
        &self,
        stored: &str,
        asked: &str,
        similarity: f32,
        strict: f32,
    ) -> Result<(), Rejection> {
        if !self.config.enabled {
            return Ok(());
        }
        self.candidates.fetch_add(1, Ordering::Relaxed);
        let verdict = self.decide(stored, asked, similarity, strict).await;
        match verdict {
            Ok(()) => self.verified.fetch_add(1, Ordering::Relaxed),
            Err(why) => self.rejected[slot(why)].fetch_add(1, Ordering::Relaxed),
        };
        verdict
    }

    async fn decide(
        &self,
        stored: &str,
        asked: &str,
        similarity: f32,
        strict: f32,
    ) -> Result<(), Rejection> {
        let Some(scorer) = &self.learned else {
            return same_question::verify(stored, asked, similarity, strict)
                .map_err(Rejection::Structure);
        };
        // The model judges the wording; the structure is checked first, and for free.
        same_question::verify_structure(stored, asked).map_err(Rejection::Structure)?;
        match scorer.score(stored, asked).await {
            Ok(score) if score >= scorer.config.threshold => Ok(()),
            Ok(_) => Err(Rejection::Learned),
            Err(e) => {
                tracing::warn!(error = %e, "cannot ask the cache verifier; treated as a miss");
                Err(Rejection::VerifierUnavailable)
            }
        }
    }

    pub fn stats(&self) -> VerificationStats {
        let count = |n: &AtomicU64| n.load(Ordering::Relaxed);
        let reasons = Check::ALL
            .iter()
            .map(|c| Rejection::Structure(*c))
            .chain([Rejection::Learned, Rejection::VerifierUnavailable]);
        VerificationStats {
            enabled: self.config.enabled,
            learned: self.learned.is_some(),
            candidates: count(&self.candidates),
            verified: count(&self.verified),
            rejected: reasons
                .map(|r| (r.name(), count(&self.rejected[slot(r)])))
                .collect(),
        }
    }
}

fn slot(rejection: Rejection) -> usize {
    match rejection {
        Rejection::Structure(check) => Check::ALL
            .iter()
            .position(|c| *c == check)
            .expect("every check is in ALL"),
        Rejection::Learned => Check::ALL.len(),
        Rejection::VerifierUnavailable => Check::ALL.len() + 1,
    }
}

/// A client of a pair-scoring endpoint. Two shapes are spoken, chosen by the URL: a path
/// ending in `rerank` gets `{"query", "documents"}` (TEI answers `[{"index","score"}]`,
/// Cohere, Jina and vLLM `{"results": [{"index","relevance_score"}]}`); any other gets vLLM's
/// `/v1/score` `{"text_1", "text_2"}` and reads `data[0].score`.
struct Scorer {
    endpoint: JsonEndpoint,
    config: LearnedVerifierConfig,
    rerank: bool,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum ScoreAnswer {
    Score { data: Vec<ScoreItem> },
    Rerank { results: Vec<RerankItem> },
    Tei(Vec<ScoreItem>),
}

#[derive(Deserialize)]
struct ScoreItem {
    score: f64,
}

#[derive(Deserialize)]
struct RerankItem {
    relevance_score: f64,
}

impl Scorer {
    fn new(config: LearnedVerifierConfig) -> Scorer {
        let endpoint =
            JsonEndpoint::new(config.url.clone(), config.api_key.clone(), config.timeout);
        let rerank = config
            .url
            .trim_end_matches('/')
            .to_ascii_lowercase()
            .ends_with("rerank");
        Scorer {
            endpoint,
            config,
            rerank,
        }
    }

    async fn score(&self, stored: &str, asked: &str) -> Result<f32, EndpointError> {
        let body = if self.rerank {
            serde_json::json!({
                "model": self.config.model,
                "query": asked,
                "documents": [stored],
                "texts": [stored],
            })
        } else {
            serde_json::json!({
                "model": self.config.model,
                "text_1": asked,
                "text_2": stored,
            })
        };
        let score = match self.endpoint.post::<ScoreAnswer>(&body).await? {
            ScoreAnswer::Score { data } | ScoreAnswer::Tei(data) => data.first().map(|d| d.score),
            ScoreAnswer::Rerank { results } => results.first().map(|r| r.relevance_score),
        };
        score
            .filter(|s| s.is_finite())
            .map(|s| s as f32)
            .ok_or(EndpointError::Empty("a score"))
    }
}
