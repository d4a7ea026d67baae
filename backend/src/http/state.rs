//! What can every request handler reach? The served models, the engine's settings, the
//! stream gates and the metrics. Built once at start-up and shared read-only; anything that
//! changes at run time (gates, counters) synchronises itself.

use std::sync::Arc;

use super::error::ApiError;
use super::metrics::{Metrics, RunningGuard};
use super::openai::unix_now;
use super::stream_gates::Gates;
use crate::cli::model_spec::DEFAULT_SIM_MODEL;
use crate::engine::sim::SimConfig;
use crate::engine::{EmbeddingModel, TextModel};

/// What answers requests for one served model name.
#[derive(Debug, Clone)]
pub enum ModelEngine {
    /// The simulated engine: chat, completions and embeddings.
    Sim,
    /// A real encoder: embeddings only.
    Embedding(Arc<EmbeddingModel>),
    /// A real decoder: chat completions.
    Text(Arc<TextModel>),
}

#[derive(Debug)]
pub struct ServedModel {
    pub name: String,
    pub engine: ModelEngine,
}

#[derive(Debug)]
pub struct AppState {
    models: Vec<ServedModel>,
    /// Reported as every model's `created`: when this process started serving it.
    pub started_at: u64,
    pub sim: SimConfig,
    pub gates: Arc<Gates>,
    pub metrics: Arc<Metrics>,
    /// The simulated engine's capacity (`SimConfig::max_running`), when it has one.
    slots: Option<Arc<tokio::sync::Semaphore>>,
}

/// A simulated reply's place in the engine's capacity: it holds a slot (when capacity is
/// limited) and counts the reply as running until dropped.
pub struct GenerationSlot {
    _slot: Option<tokio::sync::OwnedSemaphorePermit>,
    _running: RunningGuard,
}

impl AppState {
    /// Waits for a slot of the engine's capacity (counted as waiting meanwhile), then counts
    /// the reply as running.
    pub async fn start_generation(&self) -> GenerationSlot {
        let slot = match &self.slots {
            Some(slots) => {
                let _waiting = self.metrics.waiting();
                slots.clone().acquire_owned().await.ok()
            }
            None => None,
        };
        GenerationSlot {
            _slot: slot,
            _running: self.metrics.running(),
        }
    }

    /// State for the simulated engine serving `models`; with none, it serves one model
    /// named [`DEFAULT_SIM_MODEL`].
    pub fn new(models: Vec<String>, sim: SimConfig) -> Arc<Self> {
        let models = if models.is_empty() {
            vec![DEFAULT_SIM_MODEL.to_owned()]
        } else {
            models
        };
        Self::with_models(
            models
                .into_iter()
                .map(|name| ServedModel {
                    name,
                    engine: ModelEngine::Sim,
                })
                .collect(),
            sim,
        )
    }

    /// State for the native engine serving these loaded models.
    pub fn native(models: Vec<ServedModel>) -> Arc<Self> {
        Self::with_models(models, SimConfig::default())
    }

    fn with_models(models: Vec<ServedModel>, sim: SimConfig) -> Arc<Self> {
        let slots =
            (sim.max_running > 0).then(|| Arc::new(tokio::sync::Semaphore::new(sim.max_running)));
        Arc::new(Self {
            models,
            started_at: unix_now(),
            slots,
            sim,
            gates: Arc::default(),
            metrics: Arc::default(),
        })
    }

    pub fn models(&self) -> &[ServedModel] {
        &self.models
    }

    pub fn model_names(&self) -> Vec<&str> {
        self.models.iter().map(|m| m.name.as_str()).collect()
    }

    /// Whether any model is served by the simulated engine (whose test hooks, `/sim/*`,
    /// exist only then).
    pub fn serves_sim(&self) -> bool {
        self.models
            .iter()
            .any(|m| matches!(m.engine, ModelEngine::Sim))
    }

    /// The engine label `/metrics` reports: `sim`, or `native` once any real model is served.
    pub fn engine_label(&self) -> &'static str {
        if self
            .models
            .iter()
            .all(|m| matches!(m.engine, ModelEngine::Sim))
        {
            "sim"
        } else {
            "native"
        }
    }

    /// The served model a request names, or the 404 OpenAI gives for an unknown one.
    pub fn model(&self, requested: &str) -> Result<&ServedModel, ApiError> {
        self.models
            .iter()
            .find(|model| model.name == requested)
            .ok_or_else(|| ApiError::ModelNotFound(requested.to_owned()))
    }

    /// The served model a chat or completion request names: 404 for an unknown one, 400
    /// for one that only serves embeddings.
    pub fn text_model(
        &self,
        requested: &str,
        route: &'static str,
    ) -> Result<&ServedModel, ApiError> {
        let model = self.model(requested)?;
        match model.engine {
            ModelEngine::Sim | ModelEngine::Text(_) => Ok(model),
            ModelEngine::Embedding(_) => Err(ApiError::EmbeddingsOnly {
                model: model.name.clone(),
                route,
            }),
        }
    }
}
