//! A backend as an operator describes it: a `[[backends]]` entry of the configuration, or the
//! body of `POST /admin/v1/backends`, which the store keeps as it came so that every replica
//! resolves the same entry (`config::backend`). Paths and secrets are named, not carried: an
//! API key comes from an environment variable or a file on each replica, never through here.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;
use utoipa::ToSchema;

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BackendSpec {
    /// Unique in the pool (`backend-N`, by position, when a configured one has none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `http://` or `https://` host and port; a path is the API's base, replacing `/v1`.
    pub url: String,
    /// The models it serves; without them the gateway asks its models endpoint.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<String>,
    /// `sluice` (a co-located engine: `/health`, `/metrics`; the default) or
    /// `openai_compatible` (a hosted API: only its OpenAI endpoints).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// The environment variable that holds the API key the gateway sends it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_env: Option<String>,
    /// A file that holds that key instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub api_key_file: Option<PathBuf>,
    /// The header the key goes in (`authorization` as `Bearer <key>` unless named).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_header: Option<String>,
    /// Fixed headers set on every request to it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// The client's model -> the name this backend knows it by.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub model_map: BTreeMap<String, String>,
    /// Lower first (default 0): a model's backends of a higher number serve only when none
    /// of a lower one can.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u32>,
    /// CA bundle its certificate is checked against (`https://` only; default: the system's
    /// roots).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub ca_file: Option<PathBuf>,
    /// The client certificate shown to it, with `client_key_file` (`https://` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub client_cert_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub client_key_file: Option<PathBuf>,
    /// Offer HTTP/2 to it by ALPN (`https://` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http2: Option<bool>,
}

impl BackendSpec {
    /// A plain co-located backend: a URL and, optionally, its models.
    pub fn plain(name: Option<String>, url: String, models: Vec<String>) -> Self {
        BackendSpec {
            name,
            url,
            models,
            ..BackendSpec::default()
        }
    }

    /// The files it names, with the field each is in.
    pub fn files(&self) -> impl Iterator<Item = (&'static str, &PathBuf)> {
        [
            ("api_key_file", &self.api_key_file),
            ("ca_file", &self.ca_file),
            ("client_cert_file", &self.client_cert_file),
            ("client_key_file", &self.client_key_file),
        ]
        .into_iter()
        .filter_map(|(field, file)| file.as_ref().map(|f| (field, f)))
    }
}
