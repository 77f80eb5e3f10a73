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
    /// How an embedding pools the final hidden states (`{arch}.pooling_type`), or why this
    /// model gives none. Generation never reads it.
    pub pooling: std::result::Result<Pooling, UnsupportedPooling>,
}

/// Which final hidden states (after the output norm) make a sequence's embedding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// The average over every token.
    Mean,
    /// The first token's.
    Cls,
    /// The last token's.
    Last,
}

/// A `pooling_type` that gives no embedding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("this model's `pooling_type` is {0} ({name}), which gives no embedding; edgelm embeds with mean (1), cls (2) or last (3) pooling: use an embedding model or a generative one", name = pooling_name(*.0))]
pub struct UnsupportedPooling(pub u64);

fn pooling_name(v: u64) -> &'static str {
    match v {
        4 => "rank: a reranker's score head",
        _ => "unknown",
    }
}

impl Pooling {
    /// From llama.cpp's `pooling_type` enum (0 none, 1 mean, 2 cls, 3 last, 4 rank). Absent
    /// means mean, and so does "none": llama.cpp then returns a state per token, but an
    /// embedding is one vector per input, and mean is what absent already means.
    pub fn from_gguf(value: Option<u64>) -> std::result::Result<Pooling, UnsupportedPooling> {
        match value {
            None | Some(0 | 1) => Ok(Pooling::Mean),
            Some(2) => Ok(Pooling::Cls),
            Some(3) => Ok(Pooling::Last),
            Some(v) => Err(UnsupportedPooling(v)),
        }
    }

    /// Whether position `pos` of a `len`-token input goes into its embedding.
    pub fn includes(self, pos: usize, len: usize) -> bool {
        match self {
            Pooling::Mean => true,
            Pooling::Cls => pos == 0,
            Pooling::Last => pos + 1 == len,
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooling_follows_llama_cpp_values() {
        assert_eq!(Pooling::from_gguf(None), Ok(Pooling::Mean));
        assert_eq!(Pooling::from_gguf(Some(0)), Ok(Pooling::Mean));
        assert_eq!(Pooling::from_gguf(Some(1)), Ok(Pooling::Mean));
        assert_eq!(Pooling::from_gguf(Some(2)), Ok(Pooling::Cls));
        assert_eq!(Pooling::from_gguf(Some(3)), Ok(Pooling::Last));
        let rank = Pooling::from_gguf(Some(4)).unwrap_err().to_string();
        assert!(
            rank.contains("4 (rank") && rank.contains("embedding model"),
            "{rank}"
        );
        assert!(Pooling::from_gguf(Some(9)).is_err());
    }

    #[test]
    fn pooling_picks_positions() {
        let picked = |p: Pooling| (0..4).filter(|&i| p.includes(i, 4)).collect::<Vec<_>>();
        assert_eq!(picked(Pooling::Mean), [0, 1, 2, 3]);
        assert_eq!(picked(Pooling::Cls), [0]);
        assert_eq!(picked(Pooling::Last), [3]);
    }
}
