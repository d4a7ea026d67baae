//! Which models does this process serve, and under which names?
//!
//! The names are what clients put in `model` and what `/v1/models` lists, which is how the
//! gateway's quick start discovers them; a name must therefore be stable for a given
//! command line and unique within a process.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// The model the simulated engine serves when the command line names none.
pub const DEFAULT_SIM_MODEL: &str = "sluice-sim";

/// Extensions of single-file weights: for these the name is the file stem.
const WEIGHT_FILE_EXTENSIONS: [&str; 4] = ["gguf", "safetensors", "bin", "pt"];

/// One `--model [NAME=]PATH` argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSpec {
    pub name: String,
    pub path: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelSpecError {
    #[error("a model needs a path (or, with --engine sim, a name)")]
    Empty,
    #[error("`{0}`: the name before `=` is empty")]
    EmptyName(String),
    #[error("`{0}`: the path after `=` is empty")]
    EmptyPath(String),
    #[error("`{0}`: cannot derive a model name from this path; write NAME=PATH")]
    NoName(String),
    #[error("two models are named `{0}`; give one of them another name with NAME=PATH")]
    Duplicate(String),
}

impl FromStr for ModelSpec {
    type Err = ModelSpecError;

    fn from_str(arg: &str) -> Result<Self, Self::Err> {
        if arg.is_empty() {
            return Err(ModelSpecError::Empty);
        }
        match arg.split_once('=') {
            Some((name, path)) => {
                if name.is_empty() {
                    return Err(ModelSpecError::EmptyName(arg.to_owned()));
                }
                if path.is_empty() {
                    return Err(ModelSpecError::EmptyPath(arg.to_owned()));
                }
                Ok(Self {
                    name: name.to_owned(),
                    path: PathBuf::from(path),
                })
            }
            None => {
                let path = PathBuf::from(arg);
                let name =
                    default_name(&path).ok_or_else(|| ModelSpecError::NoName(arg.to_owned()))?;
                Ok(Self { name, path })
            }
        }
    }
}

impl fmt::Display for ModelSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.name, self.path.display())
    }
}

/// The name a model gets when the command line gives none: a folder's name, or a weight
/// file's stem. Anything else keeps its whole last component, so that a bare name given to
/// the simulated engine, such as `gpt-3.5-turbo`, is not cut at its last dot.
fn default_name(path: &Path) -> Option<String> {
    let is_weight_file = path.is_file()
        || path
            .extension()
            .and_then(|ext| ext.to_str())
            .is_some_and(|ext| WEIGHT_FILE_EXTENSIONS.contains(&ext.to_ascii_lowercase().as_str()));
    let name = if is_weight_file && !path.is_dir() {
        path.file_stem()
    } else {
        path.file_name()
    };
    name.and_then(|name| name.to_str())
        .filter(|name| !name.is_empty())
        .map(str::to_owned)
}

/// The served names, in command-line order, refusing duplicates.
pub fn served_names(specs: &[ModelSpec]) -> Result<Vec<String>, ModelSpecError> {
    let mut names: Vec<String> = Vec::with_capacity(specs.len());
    for spec in specs {
        if names.contains(&spec.name) {
            return Err(ModelSpecError::Duplicate(spec.name.clone()));
        }
        names.push(spec.name.clone());
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(arg: &str) -> String {
        arg.parse::<ModelSpec>().unwrap().name
    }

    #[test]
    fn an_explicit_name_wins() {
        let spec: ModelSpec = "chat=/models/smollm2.gguf".parse().unwrap();
        assert_eq!(spec.name, "chat");
        assert_eq!(spec.path, PathBuf::from("/models/smollm2.gguf"));
    }

    #[test]
    fn names_default_to_the_file_stem_or_folder_name() {
        assert_eq!(name("/models/smollm2-135m.Q4_1.gguf"), "smollm2-135m.Q4_1");
        assert_eq!(name("/models/all-MiniLM-L6-v2/"), "all-MiniLM-L6-v2");
        assert_eq!(name("/models/Qwen2.5-0.5B"), "Qwen2.5-0.5B");
        assert_eq!(name("sim-chat"), "sim-chat");
        assert_eq!(name("gpt-3.5-turbo"), "gpt-3.5-turbo");
        let dir = std::env::temp_dir();
        let expected = dir.file_name().unwrap().to_str().unwrap().to_owned();
        assert_eq!(name(dir.to_str().unwrap()), expected);
    }

    #[test]
    fn malformed_specs_are_refused() {
        assert_eq!("".parse::<ModelSpec>(), Err(ModelSpecError::Empty));
        assert!(matches!(
            "=x".parse::<ModelSpec>(),
            Err(ModelSpecError::EmptyName(_))
        ));
        assert!(matches!(
            "x=".parse::<ModelSpec>(),
            Err(ModelSpecError::EmptyPath(_))
        ));
        assert!(matches!(
            "/".parse::<ModelSpec>(),
            Err(ModelSpecError::NoName(_))
        ));
    }

    #[test]
    fn duplicate_names_are_refused() {
        let specs: Vec<ModelSpec> = ["a", "b=/x/a"].iter().map(|s| s.parse().unwrap()).collect();
        assert_eq!(served_names(&specs), Ok(vec!["a".into(), "b".into()]));
        let specs: Vec<ModelSpec> = ["a", "a=/x/b"].iter().map(|s| s.parse().unwrap()).collect();
        assert_eq!(
            served_names(&specs),
            Err(ModelSpecError::Duplicate("a".into()))
        );
    }
}
