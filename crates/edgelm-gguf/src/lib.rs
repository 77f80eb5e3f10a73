//! GGUF: read (over mmap or owned bytes, bounds-checked, zero-copy tensor views) and write.
//!
//! Every length and offset read from a file is checked against the bytes actually present before
//! anything is allocated or sliced, so hostile files end in a [`GgufError`], never a panic.

mod reader;
mod types;
mod value;
mod writer;

pub use reader::{GgufFile, MappedFile, TensorInfo, TensorView};
pub use types::GgmlType;
pub use value::{Array, Value, ValueType};
pub use writer::{GgufStream, GgufWriter, TensorHeader};

/// Default data alignment when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
pub const MAGIC: &[u8; 4] = b"GGUF";

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("cannot open {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("not a GGUF file: magic is {found:?} (expected \"GGUF\"); is this the right file?")]
    BadMagic { found: [u8; 4] },
    #[error("unsupported GGUF version {0}: edgelm reads versions 2 and 3")]
    UnsupportedVersion(u32),
    #[error("file truncated: needed {needed} bytes at offset {offset} while reading {what}, but the file has {len} bytes")]
    Truncated {
        what: String,
        offset: u64,
        needed: u64,
        len: u64,
    },
    #[error(
        "implausible {what} = {value} at offset {offset} (limit {limit}); the file is corrupt"
    )]
    Implausible {
        what: String,
        value: u64,
        offset: u64,
        limit: u64,
    },
    #[error("metadata key at offset {offset} is not valid UTF-8")]
    BadUtf8 { offset: u64 },
    #[error("metadata key {key:?} has unknown value type id {id} (offset {offset})")]
    UnknownValueType { key: String, id: u32, offset: u64 },
    #[error("tensor {name:?} has unknown or unsupported type id {id} (offset {offset})")]
    UnknownTensorType { name: String, id: u32, offset: u64 },
    #[error("tensor {name:?}: {reason}")]
    BadTensor { name: String, reason: String },
    #[error("duplicate {what} {name:?}")]
    Duplicate { what: &'static str, name: String },
    #[error("metadata key {key:?}: {reason}")]
    BadMetadata { key: String, reason: String },
}

pub type Result<T> = std::result::Result<T, GgufError>;
