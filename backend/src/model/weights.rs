//! What are the named tensors of a `.safetensors` file? Read as f32, whatever float type
//! they were saved in.
//!
//! Files come from many exporters, so names are looked up with and without a model-type
//! prefix (`bert.encoder...` and `encoder...` are the same tensor), and only the tensors a
//! model asks for are converted: other entries (such as BERT's i64 `position_ids` buffer)
//! are never read.

use std::path::{Path, PathBuf};

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use super::LoadError;
use crate::quant::{GgmlType, QMatrix};

/// A safetensors file held in memory, answering "give me this tensor as f32".
pub struct Weights {
    path: PathBuf,
    bytes: Vec<u8>,
    /// Tried before each bare name: `bert.` for BERT checkpoints saved from `BertFor*`.
    prefix: &'static str,
}

impl Weights {
    pub fn open(path: &Path, prefix: &'static str) -> Result<Self, LoadError> {
        let bytes = std::fs::read(path).map_err(|err| LoadError::Read {
            path: path.to_owned(),
            message: err.to_string(),
        })?;
        // Parse once up front, so a truncated or foreign file is reported as such rather
        // than as a missing tensor.
        SafeTensors::deserialize(&bytes).map_err(|err| LoadError::Invalid {
            path: path.to_owned(),
            message: err.to_string(),
        })?;
        Ok(Self {
            path: path.to_owned(),
            bytes,
            prefix,
        })
    }

    /// Whether the file holds `name` (or its prefixed form).
    pub fn contains(&self, name: &str) -> bool {
        SafeTensors::deserialize(&self.bytes).is_ok_and(|tensors| {
            let prefixed = format!("{}{name}", self.prefix);
            tensors.tensor(&prefixed).is_ok() || tensors.tensor(name).is_ok()
        })
    }

    /// Calls `read` with the tensor `name` (or its prefixed form), after checking it has
    /// `shape`.
    fn with_view<T>(
        &self,
        name: &str,
        shape: &[usize],
        read: impl FnOnce(&TensorView<'_>) -> Result<T, LoadError>,
    ) -> Result<T, LoadError> {
        let tensors = SafeTensors::deserialize(&self.bytes).map_err(|err| LoadError::Invalid {
            path: self.path.clone(),
            message: err.to_string(),
        })?;
        let prefixed = format!("{}{name}", self.prefix);
        let view = tensors
            .tensor(&prefixed)
            .or_else(|_| tensors.tensor(name))
            .map_err(|_| LoadError::MissingTensor {
                path: self.path.clone(),
                name: name.to_owned(),
            })?;
        if view.shape() != shape {
            return Err(LoadError::TensorShape {
                name: name.to_owned(),
                found: view.shape().to_vec(),
                expected: shape.to_vec(),
            });
        }
        read(&view)
    }

    /// The `[rows, cols]` tensor `name` in the float encoding it was saved in, so that an
    /// F16 or BF16 checkpoint takes half the memory of an f32 one.
    pub fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<QMatrix, LoadError> {
        self.with_view(name, &[rows, cols], |view| {
            let dtype = match view.dtype() {
                Dtype::F32 => GgmlType::F32,
                Dtype::F16 => GgmlType::F16,
                Dtype::BF16 => GgmlType::BF16,
                other => {
                    return Err(LoadError::TensorType {
                        name: name.to_owned(),
                        dtype: format!("{other:?}"),
                    })
                }
            };
            Ok(QMatrix::new(dtype, rows, cols, view.data().to_vec()))
        })
    }

    /// The tensor `name` (or its prefixed form), as f32, after checking it has `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, LoadError> {
        self.with_view(name, shape, |view| Self::to_f32(name, view))
    }

    fn to_f32(name: &str, view: &TensorView<'_>) -> Result<Vec<f32>, LoadError> {
        let data = view.data();
        let values = match view.dtype() {
            Dtype::F32 => data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::F16 => data
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::BF16 => data
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            other => {
                return Err(LoadError::TensorType {
                    name: name.to_owned(),
                    dtype: format!("{other:?}"),
                })
            }
        };
        Ok(values)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with(tensors: &[(&str, Dtype, Vec<u8>, Vec<usize>)]) -> PathBuf {
        let views: Vec<(String, TensorView<'_>)> = tensors
            .iter()
            .map(|(name, dtype, bytes, shape)| {
                (
                    (*name).to_owned(),
                    TensorView::new(*dtype, shape.clone(), bytes).unwrap(),
                )
            })
            .collect();
        let bytes = safetensors::serialize(views, None).unwrap();
        let path = std::env::temp_dir().join(format!(
            "sluice-weights-{}-{}.safetensors",
            std::process::id(),
            tensors[0].0
        ));
        std::fs::write(&path, bytes).unwrap();
        path
    }

    #[test]
    fn f32_f16_and_bf16_load_as_f32_under_either_name() {
        let values = [1.5f32, -2.0, 0.25];
        let f32_bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let f16_bytes: Vec<u8> = values
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect();
        let bf16_bytes: Vec<u8> = values
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
            .collect();
        let ids: Vec<u8> = [0i64, 1, 2].iter().flat_map(|v| v.to_le_bytes()).collect();
        let path = file_with(&[
            ("a32", Dtype::F32, f32_bytes, vec![3]),
            ("bert.a16", Dtype::F16, f16_bytes, vec![3]),
            ("b16", Dtype::BF16, bf16_bytes, vec![1, 3]),
            ("position_ids", Dtype::I64, ids, vec![3]),
        ]);
        let weights = Weights::open(&path, "bert.").unwrap();
        assert_eq!(weights.get("a32", &[3]).unwrap(), values);
        assert_eq!(weights.get("a16", &[3]).unwrap(), values);
        assert_eq!(weights.get("b16", &[1, 3]).unwrap(), values);
        assert!(matches!(
            weights.get("a32", &[4]),
            Err(LoadError::TensorShape { .. })
        ));
        assert!(matches!(
            weights.get("position_ids", &[3]),
            Err(LoadError::TensorType { .. })
        ));
        assert!(matches!(
            weights.get("nope", &[3]),
            Err(LoadError::MissingTensor { .. })
        ));
        std::fs::remove_file(path).unwrap();
    }
}
