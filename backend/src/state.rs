//! What every request handler can reach: the served models, the engine's settings, the
//! stream gates and the metrics. Built once at start-up and shared read-only; anything that
//! changes at run time (gates, counters) synchronises itself.

use std::sync::Arc;

use crate::error::ApiError;
use crate::gates::Gates;
use crate::metrics::Metrics;
use crate::models::DEFAULT_SIM_MODEL;
use crate::openai::unix_now;
use crate::sim::SimConfig;

#[derive(Debug)]
pub struct AppState {
    models: Vec<String>,
    /// Reported as every model's `created`: when this process started serving it.
    pub started_at: u64,
    pub sim: SimConfig,
    pub gates: Arc<Gates>,
    pub metrics: Arc<Metrics>,
}

impl AppState {
    /// State for the simulated engine serving `models`; with none, it serves one model
    /// named [`DEFAULT_SIM_MODEL`].
    pub fn new(models: Vec<String>, sim: SimConfig) -> Arc<Self> {
        let models = if models.is_empty() {
            vec![DEFAULT_SIM_MODEL.to_owned()]
        } else {
            models
        };
        Arc::new(Self {
            models,
            started_at: unix_now(),
            sim,
            gates: Arc::default(),
            metrics: Arc::default(),
        })
    }

    pub fn models(&self) -> &[String] {
        &self.models
    }

    /// The served model a request names, or the 404 OpenAI gives for an unknown one.
    pub fn model(&self, requested: &str) -> Result<&str, ApiError> {
        self.models
            .iter()
            .find(|name| *name == requested)
            .map(String::as_str)
            .ok_or_else(|| ApiError::ModelNotFound(requested.to_owned()))
    }
}
