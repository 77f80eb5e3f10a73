//! Sessions: a sequence's keys and values in a file, so a later run restores a prompt instead
//! of recomputing it (llama.cpp's prompt cache). The file is versioned, tied to the model (a
//! SHA-256 of its GGUF header, metadata and tensor table, and its length) and checksummed;
//! anything else is refused with the reason, and a refused file changes nothing.
//!
//! Layout: `EDGELMKV`, version (u32 LE), model fingerprint (32 bytes), state length (u64 LE),
//! the state (`KvCache::save_state`: KV type, block length, tokens, keys and values), SHA-256 of
//! everything before it (32 bytes).

use crate::Scheduler;
use edgelm_gguf::GgufFile;
use sha2::{Digest, Sha256};
use std::path::Path;

const MAGIC: &[u8; 8] = b"EDGELMKV";
// 2: key and value types stored apart, and the key rotation.
const VERSION: u32 = 2;
const HEADER: usize = 8 + 4 + 32 + 8;

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("{path}: {reason}")]
    Io {
        path: String,
        reason: std::io::Error,
    },
    #[error("{0} is not an edgelm session file")]
    NotASession(String),
    #[error("{path} is a session of format version {found}; this edgelm reads version {VERSION}: recompute it")]
    Version { path: String, found: u32 },
    #[error("{0} is damaged (its checksum does not match): delete it and recompute")]
    Corrupt(String),
    #[error(
        "{0} was saved with another model (or another file of it); use that model or recompute"
    )]
    OtherModel(String),
    #[error("{path}: {reason}")]
    State {
        path: String,
        reason: edgelm_models::ModelError,
    },
    #[error("sessions need the prefix cache, which this scheduler was made without")]
    NoPrefixCache,
}

/// What identifies a model file: its header, metadata and tensor table, and its length.
pub fn model_fingerprint(file: &GgufFile) -> [u8; 32] {
    let bytes = file.bytes();
    let head = (file.data_offset as usize).min(bytes.len());
    let mut h = Sha256::new();
    h.update((bytes.len() as u64).to_le_bytes());
    h.update(&bytes[..head]);
    h.finalize().into()
}

fn shown(path: &Path) -> String {
    path.display().to_string()
}

impl Scheduler {
    /// Save the keys and values of the longest cached prefix of `tokens` (whole blocks) to
    /// `path`, written under a temporary name and renamed. Returns the positions saved (0:
    /// nothing cached, no file written).
    pub fn save_session(&mut self, path: &Path, tokens: &[u32]) -> Result<usize, SessionError> {
        if !self.config().prefix_cache {
            return Err(SessionError::NoPrefixCache);
        }
        // `alloc_with_prefix` keeps the last token to compute: give it one more.
        let mut probe = tokens.to_vec();
        probe.push(0);
        let (seq, held) = self.kv_mut().alloc_with_prefix(&probe);
        let state = self.kv().save_state(seq);
        let _ = self.kv_mut().free(seq);
        let state = state.map_err(|reason| SessionError::State {
            path: shown(path),
            reason,
        })?;
        if held == 0 {
            return Ok(0);
        }
        let mut out = Vec::with_capacity(HEADER + state.len() + 32);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&model_fingerprint(self.engine().model.file()));
        out.extend_from_slice(&(state.len() as u64).to_le_bytes());
        out.extend_from_slice(&state);
        let sum: [u8; 32] = Sha256::digest(&out).into();
        out.extend_from_slice(&sum);
        let io = |reason| SessionError::Io {
            path: shown(path),
            reason,
        };
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        std::fs::write(&tmp, &out).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)?;
        Ok(held)
    }

    /// Restore the session in `path` into the prefix cache: a request whose prompt starts with
    /// its tokens reuses their keys and values. Returns those tokens. A file that is not a
    /// session, is damaged, is of another model, KV type or block length, or does not fit is
    /// refused and changes nothing.
    pub fn load_session(&mut self, path: &Path) -> Result<Vec<u32>, SessionError> {
        if !self.config().prefix_cache {
            return Err(SessionError::NoPrefixCache);
        }
        let bytes = std::fs::read(path).map_err(|reason| SessionError::Io {
            path: shown(path),
            reason,
        })?;
        if bytes.len() < HEADER + 32 || &bytes[..8] != MAGIC {
            return Err(SessionError::NotASession(shown(path)));
        }
        let version = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
        if version != VERSION {
            return Err(SessionError::Version {
                path: shown(path),
                found: version,
            });
        }
        let (body, sum) = bytes.split_at(bytes.len() - 32);
        if Sha256::digest(body).as_slice() != sum {
            return Err(SessionError::Corrupt(shown(path)));
        }
        if body[12..44] != model_fingerprint(self.engine().model.file()) {
            return Err(SessionError::OtherModel(shown(path)));
        }
        let mut len = [0u8; 8];
        len.copy_from_slice(&body[44..52]);
        let state = &body[HEADER..];
        if u64::from_le_bytes(len) != state.len() as u64 {
            return Err(SessionError::Corrupt(shown(path)));
        }
        let state_error = |reason| SessionError::State {
            path: shown(path),
            reason,
        };
        let seq = self.kv_mut().load_state(state).map_err(state_error)?;
        let tokens = self.kv().tokens(seq).to_vec();
        // Freed, its full blocks stay in the prefix index for the next request to adopt.
        self.kv_mut().free(seq).map_err(state_error)?;
        Ok(tokens)
    }
}
