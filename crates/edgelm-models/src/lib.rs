//! Models: shared transformer layers, one file per architecture, the block KV cache and the
//! batched forward pass. A loaded model is immutable and shared; the KV cache and the scratch
//! belong to whoever runs it. The arithmetic (fast or precise path) is the `Compute`'s.

#![forbid(unsafe_code)]

mod batch;
mod error;
pub mod gemma3;
pub mod hparams;
mod kv;
pub mod layers;
mod linear;
pub mod llama;
pub mod qwen2;
mod transformer;

pub use batch::{Batch, Logits};
pub use error::{ModelError, Result};
pub use hparams::{HParams, Pooling, UnsupportedPooling};
pub use kv::{KvCache, KvConfig, KvStats, KvType, SeqId, DEFAULT_BLOCK_LEN};
pub use linear::{Linear, WeightRef};
pub use transformer::{Scratch, Transformer, MAX_CHUNK};

use edgelm_gguf::GgufFile;
use std::sync::Arc;

pub const SUPPORTED_ARCHITECTURES: &[&str] = &["llama", "qwen2", "gemma3"];

/// A loaded model; the architecture was chosen from `general.architecture`.
pub type Model = Transformer;

/// Build the model `general.architecture` names.
pub fn load(file: Arc<GgufFile>) -> Result<Model> {
    let arch = file.require_str("general.architecture")?.to_owned();
    match arch.as_str() {
        "llama" => llama::load(file),
        "qwen2" => qwen2::load(file),
        "gemma3" => gemma3::load(file),
        _ => Err(ModelError::UnknownArchitecture(arch)),
    }
}

/// Memory a model needs, from metadata and options alone, before anything is allocated.
#[derive(Debug, Clone, Copy)]
pub struct MemoryPlan {
    pub weights: u64,
    pub kv_cache: u64,
    pub scratch: u64,
}

impl MemoryPlan {
    pub fn total(&self) -> u64 {
        self.weights + self.kv_cache + self.scratch
    }
}

pub fn memory_plan(model: &Model, kv: &KvConfig) -> Result<MemoryPlan> {
    let hp = &model.hp;
    let chunk = MAX_CHUNK.min(kv.n_ctx) as u64;
    let widest = hp
        .layers
        .iter()
        .map(|l| (l.n_head * hp.head_dim).max(l.n_ff).max(hp.n_embd))
        .max()
        .unwrap_or(hp.n_embd) as u64;
    Ok(MemoryPlan {
        weights: model.weight_bytes(),
        kv_cache: KvCache::plan_bytes(hp, kv)?,
        // Activations of one chunk (x, h, q, k, v, attention, gate, up) plus logits for all of it.
        scratch: 4 * chunk * (8 * widest + hp.n_vocab as u64),
    })
}
