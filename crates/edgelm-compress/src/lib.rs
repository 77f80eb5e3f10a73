//! Model compression: quantize a GGUF model with mix rules and importance-weighted rounding;
//! prune it (unstructured, or structured into a smaller dense model); factor its projections
//! into low-rank pairs; read and write importance matrices in llama.cpp's formats.
//!
//! The block formats and their rounding searches live in `edgelm-quant`; this crate decides
//! which tensor gets which type and writes whole files, never leaving a partial one under the
//! final name.

#![forbid(unsafe_code)]

pub mod gptq;
pub mod imatrix;
mod linalg;
pub mod lowrank;
pub mod mix;
pub mod prune;
pub mod quantize;
mod rows;

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum CompressError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Gguf(#[from] edgelm_gguf::GgufError),
    #[error(transparent)]
    Quant(#[from] edgelm_quant::QuantError),
    #[error(transparent)]
    Kernel(#[from] edgelm_kernels::KernelError),
    #[error("importance matrix {what}: {reason}")]
    BadImatrix { what: String, reason: String },
    #[error("{0}")]
    Unsupported(String),
    #[error("{0}")]
    BadArgument(String),
    #[error("collecting the calibration moments: {0}")]
    Calibration(String),
    #[error("interrupted; no output was written")]
    Interrupted,
    #[error("a worker thread panicked while quantizing")]
    Panicked,
}

impl CompressError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> CompressError {
        CompressError::Io {
            path: path.display().to_string(),
            source,
        }
    }
}

pub type Result<T> = std::result::Result<T, CompressError>;

/// Writes through `write` into a temporary file beside `path`, then renames it into place: an
/// interrupted or failed run — an error or a panic — leaves nothing under `path` and removes
/// its temporary file.
pub fn write_atomically(
    path: &Path,
    write: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> Result<()>,
) -> Result<()> {
    /// Removes the temporary file when dropped before the rename, unwinding included.
    struct Partial(PathBuf);
    impl Drop for Partial {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let tmp = Partial(temporary_name(path));
    let io = |e| CompressError::io(path, e);
    let file = std::fs::File::create(&tmp.0).map_err(io)?;
    let mut buf = std::io::BufWriter::new(file);
    write(&mut buf)?;
    let file = buf.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&tmp.0, path).map_err(io)?;
    // Renamed: nothing is left to remove.
    std::mem::forget(tmp);
    Ok(())
}

/// `dir/.name.partial-PID`: hidden, unique per process, on the same file system as `path`.
pub fn temporary_name(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "output".into());
    path.with_file_name(format!(".{name}.partial-{}", std::process::id()))
}

#[cfg(test)]
mod tests;
