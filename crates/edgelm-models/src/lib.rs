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
mod plan;
pub mod qwen2;
pub mod repack_cache;
mod transformer;

pub use batch::{Batch, Logits};
pub use error::{ModelError, Result};
pub use hparams::{HParams, Pooling, UnsupportedPooling};
pub use kv::{
    key_rotation, value_rotation, KvCache, KvConfig, KvStats, KvType, KvTypes, SeqId,
    DEFAULT_BLOCK_LEN,
};
pub use linear::{low_rank_names, Forward, Linear, Observer, Projection, WeightRef};
pub use plan::{
    available_memory, check_fits, memory_plan, peak_resident_memory, runtime_memory, DoesNotFit,
    MemoryPlan,
};
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
