//! What is in a GGUF file (llama.cpp's model format, versions 2 and 3)? Its tensors, after
//! the header and metadata that `sluice_gguf` reads (the gateway reads those too, for the
//! tokenizer).
//!
//! The whole file is read into memory once. An mmap would share pages between processes
//! and start faster, but needs `unsafe` over a file another process may truncate under us
//! and one more dependency; the quantised tensors are used in place from this buffer (never
//! widened to f32), so reading costs the file's size (98 MB for SmolLM2-135M Q4_1) and
//! nothing more. This module only parses: it never interprets what the tensors mean.

use std::collections::BTreeMap;
use std::path::Path;

use crate::quant::GgmlType;
use sluice_gguf::{Cursor, Header};
pub use sluice_gguf::{GgufError, Value};

/// Where a tensor is and what it holds.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// GGML's order: `dims[0]` varies fastest (a row's length), as the file stores it.
    pub dims: Vec<usize>,
    pub dtype: GgmlType,
    /// From the start of the data section.
    pub offset: usize,
}

impl TensorInfo {
    pub fn elements(&self) -> usize {
        self.dims.iter().product()
    }

    pub fn byte_len(&self) -> usize {
        self.dtype.row_bytes(self.elements())
    }
}

/// A parsed GGUF file that owns its bytes.
pub struct Gguf {
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: BTreeMap<String, TensorInfo>,
    pub alignment: usize,
    bytes: Vec<u8>,
    data_start: usize,
}

impl std::fmt::Debug for Gguf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gguf")
            .field("version", &self.version)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl Gguf {
    pub fn open(path: &Path) -> Result<Gguf, GgufError> {
        let bytes = std::fs::read(path).map_err(|err| GgufError::Read {
            path: path.to_owned(),
            message: err.to_string(),
        })?;
        Gguf::parse(bytes)
    }

    pub fn parse(bytes: Vec<u8>) -> Result<Gguf, GgufError> {
        let mut c = Cursor::new(&bytes);
        let Header {
            version,
            tensor_count,
            metadata,
        } = Header::parse(&mut c)?;
        let alignment = match metadata.get("general.alignment") {
            None => 32,
            Some(v) => v
                .as_u64()
                .and_then(|a| usize::try_from(a).ok())
                .filter(|a| a.is_power_of_two())
                .ok_or_else(|| GgufError::Invalid(format!("general.alignment {v:?}")))?,
        };
        let mut tensors = BTreeMap::new();
        for _ in 0..tensor_count {
            let name = c.string()?;
            let n_dims = c.u32()?;
            if n_dims > 4 {
                return Err(GgufError::Invalid(format!(
                    "tensor `{name}` has {n_dims} dimensions"
                )));
            }
            let dims = (0..n_dims)
                .map(|_| c.length())
                .collect::<Result<Vec<_>, _>>()?;
            let type_id = c.u32()?;
            let dtype = GgmlType::from_id(type_id).map_err(|type_name| GgufError::TensorType {
                name: name.clone(),
                type_id,
                type_name,
            })?;
            let offset = c.length()?;
            if !offset.is_multiple_of(alignment) {
                return Err(GgufError::Invalid(format!(
                    "tensor `{name}` at offset {offset}, not a multiple of the alignment {alignment}"
                )));
            }
            if dims
                .first()
                .is_some_and(|&d| !d.is_multiple_of(dtype.block_len()))
            {
                return Err(GgufError::Invalid(format!(
                    "tensor `{name}` rows of {} elements are not whole {dtype:?} blocks",
                    dims[0]
                )));
            }
            tensors.insert(
                name.clone(),
                TensorInfo {
                    name,
                    dims,
                    dtype,
                    offset,
                },
            );
        }
        let data_start = c.position().next_multiple_of(alignment);
        for info in tensors.values() {
            let end = data_start
                .checked_add(info.offset)
                .and_then(|start| start.checked_add(info.byte_len()));
            if end.is_none_or(|end| end > bytes.len()) {
                return Err(GgufError::Invalid(format!(
                    "tensor `{}` ({} bytes at offset {}) runs past the end of the file",
                    info.name,
                    info.byte_len(),
                    info.offset
                )));
            }
        }
        Ok(Gguf {
            version,
            metadata,
            tensors,
            alignment,
            bytes,
            data_start,
        })
    }

    /// A tensor's bytes, exactly as stored: blocks of its [`GgmlType`].
    pub fn tensor_bytes(&self, info: &TensorInfo) -> &[u8] {
        let start = self.data_start + info.offset;
        &self.bytes[start..start + info.byte_len()]
    }

    pub fn tensor(&self, name: &str) -> Option<(&TensorInfo, &[u8])> {
        self.tensors
            .get(name)
            .map(|info| (info, self.tensor_bytes(info)))
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer for the subset of GGUF the tests need, so the reader is checked against bytes
    /// laid out by the specification rather than by itself.
    struct Writer(Vec<u8>);

    impl Writer {
        fn u32(&mut self, v: u32) -> &mut Self {
            self.0.extend_from_slice(&v.to_le_bytes());
            self
        }
        fn u64(&mut self, v: u64) -> &mut Self {
            self.0.extend_from_slice(&v.to_le_bytes());
            self
        }
        fn string(&mut self, s: &str) -> &mut Self {
            self.u64(s.len() as u64);
            self.0.extend_from_slice(s.as_bytes());
            self
        }
    }

    fn sample(alignment: Option<u32>) -> Vec<u8> {
        let mut w = Writer(b"GGUF".to_vec());
        w.u32(3).u64(2).u64(5 + u64::from(alignment.is_some()));
        w.string("general.architecture").u32(8).string("llama");
        w.string("answer").u32(10).u64(42);
        w.string("ratio")
            .u32(6)
            .0
            .extend_from_slice(&0.5f32.to_le_bytes());
        w.string("flag").u32(7).0.push(1);
        // An array of strings and one of i32s.
        w.string("words")
            .u32(9)
            .u32(8)
            .u64(2)
            .string("a")
            .string("bc");
        if let Some(a) = alignment {
            w.string("general.alignment").u32(4).u32(a);
        }
        // f32 [2, 3] at 0; Q8_0 [32] after it, aligned.
        w.string("t.f32").u32(2).u64(3).u64(2).u32(0).u64(0);
        let align = u64::from(alignment.unwrap_or(32));
        w.string("t.q8")
            .u32(1)
            .u64(32)
            .u32(8)
            .u64(24u64.next_multiple_of(align));
        let start = w.0.len().next_multiple_of(align as usize);
        w.0.resize(start, 0);
        for v in [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0] {
            w.0.extend_from_slice(&v.to_le_bytes());
        }
        w.0.resize(start + 24usize.next_multiple_of(align as usize), 0);
        w.0.extend_from_slice(&half::f16::from_f32(0.5).to_le_bytes());
        w.0.extend((0..32).map(|i| i as u8));
        w.0
    }

    #[test]
    fn reads_metadata_of_every_kind_and_tensors_at_their_alignment() {
        for alignment in [None, Some(64)] {
            let g = Gguf::parse(sample(alignment)).unwrap();
            assert_eq!(g.version, 3);
            assert_eq!(g.alignment, alignment.unwrap_or(32) as usize);
            assert_eq!(
                g.get("general.architecture").unwrap().as_str(),
                Some("llama")
            );
            assert_eq!(g.get("answer").unwrap().as_u64(), Some(42));
            assert_eq!(g.get("ratio").unwrap().as_f64(), Some(0.5));
            assert_eq!(g.get("flag").unwrap().as_bool(), Some(true));
            assert_eq!(
                g.get("words").unwrap().as_array().unwrap(),
                [Value::String("a".into()), Value::String("bc".into())]
            );
            let (info, bytes) = g.tensor("t.f32").unwrap();
            assert_eq!(
                (info.dims.as_slice(), info.dtype),
                ([3, 2].as_slice(), GgmlType::F32)
            );
            assert_eq!(&bytes[4..8], &2.0f32.to_le_bytes());
            let (info, bytes) = g.tensor("t.q8").unwrap();
            assert_eq!(info.dtype, GgmlType::Q8_0);
            assert_eq!(bytes.len(), 34);
            assert_eq!(bytes[2..], (0..32).collect::<Vec<u8>>()[..]);
        }
    }

    #[test]
    fn refuses_what_it_cannot_read_with_a_reason() {
        assert!(matches!(
            Gguf::parse(b"GGML\x03\0\0\0".to_vec()),
            Err(GgufError::Magic(_))
        ));
        let mut bytes = sample(None);
        bytes[4] = 9;
        assert!(matches!(Gguf::parse(bytes), Err(GgufError::Version(9))));
        let bytes = sample(None);
        let cut = bytes.len() - 10;
        let err = Gguf::parse(bytes[..cut].to_vec()).unwrap_err();
        assert!(err.to_string().contains("past the end"), "{err}");
        // Q4_K (type 12): a real type this engine does not multiply.
        let mut bytes = sample(None);
        let at = bytes
            .windows(4)
            .rposition(|w| w == 8u32.to_le_bytes())
            .unwrap();
        bytes[at..at + 4].copy_from_slice(&12u32.to_le_bytes());
        let err = Gguf::parse(bytes).unwrap_err();
        assert!(err.to_string().contains("Q4_K"), "{err}");
    }
}
