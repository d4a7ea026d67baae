//! What the backend's model tests share: where the real weights are, and which Python runs
//! the independent references.

use std::path::{Path, PathBuf};

/// The SmolLM2-135M-Instruct GGUF file from `SLUICE_SMOLLM2_GGUF`. Without it a test says
/// so and passes, except under `CI=true` (scripts/test.sh fetches the weights there), where
/// a missing model is a broken setup and fails it.
#[allow(dead_code)] // Not every test binary that includes this module runs SmolLM2.
pub fn smollm2_weights() -> Option<PathBuf> {
    let path = std::env::var_os("SLUICE_SMOLLM2_GGUF").map(PathBuf::from);
    if let Some(path) = path.filter(|p| p.is_file()) {
        return Some(path);
    }
    let message = "SLUICE_SMOLLM2_GGUF does not name the SmolLM2-135M-Instruct GGUF file: run \
                   `export SLUICE_SMOLLM2_GGUF=$(scripts/fetch-weights.sh SmolLM2-135M-Instruct)` \
                   (scripts/test.sh does this)";
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{message}");
    }
    eprintln!("skipping: {message}");
    None
}

/// SLUICE_TEST_PYTHON, else the repository's .venv, else python3.
#[allow(dead_code)] // Not every test binary that includes this module runs Python.
pub fn python() -> String {
    std::env::var("SLUICE_TEST_PYTHON").unwrap_or_else(|_| {
        let venv = concat!(env!("CARGO_MANIFEST_DIR"), "/../.venv/bin/python");
        if Path::new(venv).exists() {
            venv.to_owned()
        } else {
            "python3".to_owned()
        }
    })
}

/// The all-MiniLM-L6-v2 folder from `SLUICE_MINILM_DIR`, under the same rule as
/// [`smollm2_weights`].
#[allow(dead_code)] // Not every test binary that includes this module embeds.
pub fn minilm_folder() -> Option<PathBuf> {
    let dir = std::env::var_os("SLUICE_MINILM_DIR").map(PathBuf::from);
    if let Some(dir) = dir.filter(|d| d.join("config.json").is_file()) {
        return Some(dir);
    }
    let message = "SLUICE_MINILM_DIR does not name the all-MiniLM-L6-v2 folder: run \
                   `export SLUICE_MINILM_DIR=$(scripts/fetch-weights.sh all-MiniLM-L6-v2)` \
                   (scripts/test.sh does this)";
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{message}");
    }
    eprintln!("skipping: {message}");
    None
}
