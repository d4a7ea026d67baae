//! Are a completion request's sampling parameters in OpenAI's ranges? The checks that turn
//! the fields as sent into the engine's [`SamplingParams`] and stop strings, for a native
//! decoder; the simulated engine ignores them.

use serde_json::Value;

use crate::engine::sampling::SamplingParams;
use crate::http::error::ApiError;
use crate::http::openai::Stop;

/// The sampling fields of a chat or text completion request, as sent.
pub struct SamplingFields {
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub seed: Option<i64>,
    pub stop: Option<Stop>,
    /// As sent: an object from token ids (as strings) to biases.
    pub logit_bias: Option<Value>,
}

/// The most tokens a `logit_bias` may name.
const MAX_BIASED_TOKENS: usize = 1024;

/// `logit_bias` read: token ids and their biases, in id order. Whether the ids are in the
/// model's vocabulary is checked once the model is known.
fn logit_bias(value: Option<Value>) -> Result<Vec<(u32, f32)>, ApiError> {
    let fields = match value {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Object(fields)) => fields,
        Some(_) => {
            return Err(ApiError::InvalidType {
                param: "logit_bias".to_owned(),
                message: "expected an object from token ids to biases".to_owned(),
            })
        }
    };
    if fields.len() > MAX_BIASED_TOKENS {
        return Err(ApiError::invalid_value(
            "logit_bias",
            format!(
                "{} tokens; at most {MAX_BIASED_TOKENS} may be biased",
                fields.len()
            ),
        ));
    }
    let mut biases = fields
        .iter()
        .map(|(key, value)| {
            let id = key.parse::<u32>().map_err(|_| {
                ApiError::invalid_value("logit_bias", format!("`{key}` is not a token id"))
            })?;
            match value.as_f64() {
                Some(bias) if (-100.0..=100.0).contains(&bias) => Ok((id, bias as f32)),
                _ => Err(ApiError::invalid_value(
                    "logit_bias",
                    format!("the bias of token {id} must be a number from -100 to 100"),
                )),
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    biases.sort_unstable_by_key(|&(id, _)| id);
    Ok(biases)
}

/// The most stop strings a request may give, as OpenAI allows.
const MAX_STOPS: usize = 4;

impl SamplingFields {
    /// The parameters in OpenAI's ranges, and the stop strings.
    pub fn check(self) -> Result<(SamplingParams, Vec<String>), ApiError> {
        let ranged =
            |param: &'static str, value: Option<f64>, min: f64, max: f64, default| match value {
                None => Ok(default),
                Some(v) if (min..=max).contains(&v) => Ok(v as f32),
                Some(v) => Err(ApiError::invalid_value(
                    param,
                    format!("{v} is out of range; it must be between {min} and {max}"),
                )),
            };
        let defaults = SamplingParams::default();
        let top_p = ranged("top_p", self.top_p, 0.0, 1.0, defaults.top_p)?;
        if top_p == 0.0 {
            return Err(ApiError::invalid_value(
                "top_p",
                "0 keeps no token; it must be above 0",
            ));
        }
        let top_k = match self.top_k {
            None | Some(-1) => 0,
            Some(k @ 0..) => usize::try_from(k).unwrap_or(usize::MAX),
            Some(k) => {
                return Err(ApiError::invalid_value(
                    "top_k",
                    format!(
                        "{k} is out of range; give 0 (or -1) for no limit, or a positive count"
                    ),
                ))
            }
        };
        let stop = self.stop.map(Stop::into_vec).unwrap_or_default();
        if stop.len() > MAX_STOPS {
            return Err(ApiError::invalid_value(
                "stop",
                format!(
                    "{} stop sequences; at most {MAX_STOPS} are allowed",
                    stop.len()
                ),
            ));
        }
        if stop.iter().any(String::is_empty) {
            return Err(ApiError::invalid_value(
                "stop",
                "a stop sequence must not be empty",
            ));
        }
        let params = SamplingParams {
            temperature: ranged(
                "temperature",
                self.temperature,
                0.0,
                2.0,
                defaults.temperature,
            )?,
            top_p,
            top_k,
            presence_penalty: ranged("presence_penalty", self.presence_penalty, -2.0, 2.0, 0.0)?,
            frequency_penalty: ranged("frequency_penalty", self.frequency_penalty, -2.0, 2.0, 0.0)?,
            // The seed's bits, whatever its sign: any i64 names a distinct stream.
            seed: self.seed.map(|seed| seed as u64),
            logit_bias: logit_bias(self.logit_bias)?,
        };
        Ok((params, stop))
    }
}
