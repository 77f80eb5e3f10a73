//! Hyperparameters: global ones from metadata, per-layer shapes from the tensors themselves.

use crate::layers::{Activation, Rope};
use crate::{ModelError, Result};
use edgelm_gguf::GgufFile;

#[derive(Debug, Clone)]
pub struct LayerShape {
    pub n_head: usize,
    pub n_head_kv: usize,
    pub n_ff: usize,
    /// Sliding attention window (keys p-window+1 ..= p), or None for global attention.
    pub window: Option<usize>,
    pub rope: Rope,
}

#[derive(Debug, Clone)]
pub struct HParams {
    pub arch: String,
    pub n_embd: usize,
    pub n_vocab: usize,
    pub n_ctx_train: usize,
    pub head_dim: usize,
    pub rms_eps: f32,
    pub activation: Activation,
    /// Multiplies the token embeddings (Gemma: √n_embd).
    pub embed_scale: Option<f32>,
    /// Multiplies q·k (1/√head_dim unless the architecture says otherwise).
    pub attn_scale: f32,
    pub layers: Vec<LayerShape>,
}

/// Typed access to `{arch}.*` metadata with errors naming the key.
pub struct Meta<'a> {
    pub file: &'a GgufFile,
    pub arch: &'a str,
}

impl Meta<'_> {
    pub fn key(&self, k: &str) -> String {
        format!("{}.{k}", self.arch)
    }

    pub fn usize(&self, k: &str) -> Result<usize> {
        let key = self.key(k);
        self.file
            .get_u64(&key)
            .map(|v| v as usize)
            .ok_or(ModelError::Metadata {
                key,
                reason: "missing or not an integer".into(),
            })
    }

    pub fn opt_usize(&self, k: &str) -> Option<usize> {
        self.file.get_u64(&self.key(k)).map(|v| v as usize)
    }

    pub fn opt_f64(&self, k: &str) -> Option<f64> {
        self.file.get_f64(&self.key(k))
    }

    pub fn f64_or(&self, k: &str, default: f64) -> f64 {
        self.opt_f64(k).unwrap_or(default)
    }
}
