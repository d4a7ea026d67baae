//! What does a GGUF file (llama.cpp's model format, versions 2 and 3) say about its model?
//! Its header and metadata (`Header`), read from the start of the file, and the byte-level
//! BPE tokenizer the metadata describes (`tokenizer`). Shared by the backend, which goes on
//! to read the tensors, and the gateway, which only counts tokens and so never reads past
//! the metadata of a file that may hold tens of gigabytes of weights.

pub mod tokenizer;

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Why a GGUF file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("cannot read {path}: {message}")]
    Read { path: PathBuf, message: String },
    #[error("not a GGUF file (magic {0:?})")]
    Magic([u8; 4]),
    #[error("GGUF version {0} (only 2 and 3 are read)")]
    Version(u32),
    #[error("truncated at byte {0}")]
    Truncated(usize),
    #[error("{0}")]
    Invalid(String),
    #[error("tensor `{name}` is of GGML type {type_id} ({type_name}); only F32, F16, Q8_0 and Q4_1 load")]
    TensorType {
        name: String,
        type_id: u32,
        type_name: &'static str,
    },
}

/// One metadata value, with GGUF's own types.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    /// Any non-negative integer value, whatever its width: writers differ in which they use.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// Reads GGUF's little-endian fields one after another from a buffer.
pub struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    pub fn new(bytes: &'a [u8]) -> Cursor<'a> {
        Cursor { bytes, pos: 0 }
    }

    /// How many bytes have been read.
    pub fn position(&self) -> usize {
        self.pos
    }

    pub fn take(&mut self, n: usize) -> Result<&'a [u8], GgufError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&end| end <= self.bytes.len())
            .ok_or(GgufError::Truncated(self.pos))?;
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], GgufError> {
        Ok(self.take(N)?.try_into().expect("N bytes"))
    }

    pub fn u32(&mut self) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    pub fn u64(&mut self) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// A count or length that must fit in memory; a corrupt file claiming 2⁶³ entries is
    /// refused here, before anything is allocated for it.
    pub fn length(&mut self) -> Result<usize, GgufError> {
        let at = self.pos;
        let n = self.u64()?;
        usize::try_from(n)
            .ok()
            .filter(|&n| n <= self.bytes.len())
            .ok_or_else(|| GgufError::Invalid(format!("length {n} at byte {at}")))
    }

    pub fn string(&mut self) -> Result<String, GgufError> {
        let at = self.pos;
        let n = self.length()?;
        String::from_utf8(self.take(n)?.to_vec())
            .map_err(|_| GgufError::Invalid(format!("string at byte {at} is not UTF-8")))
    }

    pub fn value(&mut self, type_id: u32) -> Result<Value, GgufError> {
        Ok(match type_id {
            0 => Value::U8(self.array::<1>()?[0]),
            1 => Value::I8(self.array::<1>()?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array()?)),
            3 => Value::I16(i16::from_le_bytes(self.array()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.array()?)),
            6 => Value::F32(f32::from_le_bytes(self.array()?)),
            7 => match self.array::<1>()?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(GgufError::Invalid(format!("bool byte {b}"))),
            },
            8 => Value::String(self.string()?),
            9 => {
                let item_type = self.u32()?;
                let n = self.length()?;
                let mut items = Vec::with_capacity(n.min(1 << 20));
                for _ in 0..n {
                    items.push(self.value(item_type)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.array()?)),
            12 => Value::F64(f64::from_le_bytes(self.array()?)),
            other => {
                return Err(GgufError::Invalid(format!(
                    "metadata value type {other} at byte {}",
                    self.pos - 4
                )))
            }
        })
    }
}

/// No model's metadata comes near this; a header that does is a corrupt file, not read on.
const MAX_HEADER_BYTES: u64 = 1 << 30;

/// A GGUF file's header: its version, metadata and how many tensors follow.
#[derive(Debug, Clone, PartialEq)]
pub struct Header {
    pub version: u32,
    pub tensor_count: usize,
    pub metadata: BTreeMap<String, Value>,
}

impl Header {
    /// Reads the header from the start of `c`, leaving it at the first tensor's description.
    pub fn parse(c: &mut Cursor<'_>) -> Result<Header, GgufError> {
        let magic = c.array::<4>()?;
        if &magic != b"GGUF" {
            return Err(GgufError::Magic(magic));
        }
        let version = c.u32()?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::Version(version));
        }
        let tensor_count = c.length()?;
        let kv_count = c.length()?;
        let mut metadata = BTreeMap::new();
        for _ in 0..kv_count {
            let key = c.string()?;
            let type_id = c.u32()?;
            let value = c.value(type_id)?;
            metadata.insert(key, value);
        }
        Ok(Header {
            version,
            tensor_count,
            metadata,
        })
    }

    /// The header of the file at `path`, reading no more of it than the header takes.
    pub fn read(path: &Path) -> Result<Header, GgufError> {
        let failed = |e: std::io::Error| GgufError::Read {
            path: path.to_owned(),
            message: e.to_string(),
        };
        let file = std::fs::File::open(path).map_err(failed)?;
        let size = file.metadata().map_err(failed)?.len();
        let mut reader = std::io::BufReader::new(file);
        // A vocabulary of 150k tokens with its merges is a few MB: start there, and read
        // on only while the header runs past what is in hand.
        let mut bytes = Vec::new();
        let mut want: u64 = 8 << 20;
        loop {
            let have = bytes.len() as u64;
            (&mut reader)
                .take(want.saturating_sub(have))
                .read_to_end(&mut bytes)
                .map_err(failed)?;
            let more = (bytes.len() as u64) < size && want < MAX_HEADER_BYTES;
            match Header::parse(&mut Cursor::new(&bytes)) {
                // Lengths are checked against what is in hand: either may mean "read on".
                Err(GgufError::Truncated(_) | GgufError::Invalid(_)) if more => want *= 2,
                other => return other,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// GGUF's layout, written by hand, so the reader is checked against the specification
    /// rather than against itself.
    struct Writer(Vec<u8>);

    impl Writer {
        fn header(tensors: u64, kvs: u64) -> Writer {
            let mut w = Writer(b"GGUF".to_vec());
            w.u32(3).u64(tensors).u64(kvs);
            w
        }
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

    #[test]
    fn a_header_longer_than_the_first_read_is_read_whole() {
        let long = "x".repeat(9 << 20);
        let mut w = Writer::header(1, 2);
        w.string("general.architecture").u32(8).string("llama");
        w.string("long").u32(8).string(&long);
        let header_end = w.0.len();
        // A tensor description and weights follow, which the header does not need.
        w.string("weights").u32(1).u64(4).u32(0).u64(0);
        w.0.extend(std::iter::repeat_n(0u8, 4 * 4));
        let file = tempfile_with(&w.0);
        let header = Header::read(&file).unwrap();
        assert_eq!((header.version, header.tensor_count), (3, 1));
        assert_eq!(
            header.metadata["long"].as_str().map(str::len),
            Some(long.len())
        );
        assert_eq!(header.metadata.len(), 2);

        // Cut inside the header: truncated, not misread.
        let cut = tempfile_with(&w.0[..header_end - 10]);
        assert!(matches!(
            Header::read(&cut),
            Err(GgufError::Truncated(_) | GgufError::Invalid(_))
        ));
        let not_gguf = tempfile_with(b"GGML and more bytes");
        assert!(matches!(Header::read(&not_gguf), Err(GgufError::Magic(_))));
        assert!(matches!(
            Header::read(Path::new("/nonexistent/model.gguf")),
            Err(GgufError::Read { .. })
        ));
    }

    fn tempfile_with(bytes: &[u8]) -> PathBuf {
        let path = std::env::temp_dir().join(format!(
            "sluice-gguf-{}-{}.gguf",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::write(&path, bytes).unwrap();
        path
    }

    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
}
