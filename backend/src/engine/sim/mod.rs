//! What does a "model" answer when no model is loaded? The simulated engine.
//!
//! Everything here is a pure function of the request, so tests and benchmarks can rely on
//! exact replies, token counts and vectors. It must never sleep, lock or do I/O: pacing
//! (time to first token, delay between tokens) is applied by the streaming layer, which is
//! the part that has a client to stop for.

mod embed;
mod text;

use std::time::Duration;

pub use embed::{embed, to_base64, truncate};
pub use text::{
    count_input_tokens, count_tokens, input_text, reply_tokens, MESSAGE_OVERHEAD_TOKENS,
};

use super::Finish;

/// How the simulated engine behaves; set from the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimConfig {
    /// Delay before the first token of a reply.
    pub ttft: Duration,
    /// Delay between one token and the next.
    pub token_delay: Duration,
    /// The length of a reply the request does not cap lower: the point at which the
    /// simulated model "chooses" to stop.
    pub output_tokens: u32,
    /// Length of every embedding vector (before a request's `dimensions`).
    pub embedding_dim: usize,
    /// Replies generated at once at most, like a GPU's batch; the rest queue (0: no limit).
    pub max_running: usize,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            ttft: Duration::ZERO,
            token_delay: Duration::ZERO,
            output_tokens: 16,
            embedding_dim: 384,
            max_running: 0,
        }
    }
}

impl SimConfig {
    /// How long a reply is and why it ends. The simulated model stops by itself after
    /// `output_tokens`; a cap below that cuts it short, which OpenAI reports as `length`.
    pub fn reply_length(&self, cap: Option<u32>) -> (usize, Finish) {
        match cap {
            Some(cap) if cap < self.output_tokens => (cap as usize, Finish::Length),
            _ => (self.output_tokens as usize, Finish::Stop),
        }
    }

    /// How long generating `steps` tokens per sequence takes, for replies that are not
    /// streamed but should still cost the time a real engine would take.
    pub fn generation_time(&self, steps: usize) -> Duration {
        if steps == 0 {
            return self.ttft;
        }
        let gaps = u32::try_from(steps - 1).unwrap_or(u32::MAX);
        self.ttft
            .saturating_add(self.token_delay.saturating_mul(gaps))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cap_below_the_natural_length_ends_with_length() {
        let config = SimConfig::default();
        assert_eq!(config.reply_length(Some(5)), (5, Finish::Length));
        assert_eq!(config.reply_length(Some(16)), (16, Finish::Stop));
        assert_eq!(config.reply_length(Some(100)), (16, Finish::Stop));
        assert_eq!(config.reply_length(None), (16, Finish::Stop));
    }

    #[test]
    fn generation_time_counts_the_gaps_between_tokens() {
        let config = SimConfig {
            ttft: Duration::from_millis(100),
            token_delay: Duration::from_millis(10),
            ..SimConfig::default()
        };
        assert_eq!(config.generation_time(0), Duration::from_millis(100));
        assert_eq!(config.generation_time(1), Duration::from_millis(100));
        assert_eq!(config.generation_time(4), Duration::from_millis(130));
    }
}
