//! The engine: a loaded model with its tokenizer and compute context; generation with sampling
//! and stop rules; teacher-forced scoring and perplexity. Clients (CLI, later the server) call
//! this crate, never the kernels.

pub mod bench;
mod eval;
mod generate;
mod sampler;
mod stop;

pub use eval::{perplexity, score, PerplexityChunk, PerplexityResult, ScoredPosition};
pub use generate::{generate, GenerateRequest, GenerationStats, StopReason};
pub use sampler::{apply_penalties, Candidate, Rng, Sampler, SamplingParams};
pub use stop::StopMatcher;

use edgelm_gguf::GgufFile;
use edgelm_kernels::{Compute, Precision};
use edgelm_models::{KvCache, KvType, Model, MAX_CHUNK};
use edgelm_tokenizer::Tokenizer;
use std::path::Path;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Gguf(#[from] edgelm_gguf::GgufError),
    #[error(transparent)]
    Model(#[from] edgelm_models::ModelError),
    #[error(transparent)]
    Tokenizer(#[from] edgelm_tokenizer::TokenizerError),
    #[error("the prompt is {prompt} tokens but the context holds {n_ctx}; shorten the prompt or raise --ctx (the model was trained on {n_ctx_train})")]
    PromptTooLong {
        prompt: usize,
        n_ctx: usize,
        n_ctx_train: usize,
    },
    #[error("the prompt is empty: give at least one token of text")]
    EmptyPrompt,
    #[error("{0}")]
    Input(String),
}

pub type Result<T> = std::result::Result<T, EngineError>;

/// A model ready to run: weights, tokenizer, and the compute context (ISA + threads).
pub struct Engine {
    pub model: Model,
    pub tokenizer: Tokenizer,
    pub compute: Compute,
}

impl Engine {
    pub fn load(path: &Path, compute: Compute) -> Result<Engine> {
        let file = Arc::new(GgufFile::open(path)?);
        let tokenizer = Tokenizer::from_gguf(&file)?;
        let model = edgelm_models::load(file)?;
        Ok(Engine {
            model,
            tokenizer,
            compute,
        })
    }

    /// A KV cache for one conversation of up to `n_ctx` tokens (0 = the model's trained length).
    pub fn new_cache(&self, n_ctx: usize) -> KvCache {
        KvCache::new(
            &self.model.hp,
            self.context_length(n_ctx),
            MAX_CHUNK,
            self.kv_type(),
        )
    }

    /// The KV cache type of this engine's path: f16 on the fast path (as llama.cpp), f32 on the
    /// precise one.
    pub fn kv_type(&self) -> KvType {
        match self.compute.precision() {
            Precision::Fast => KvType::F16,
            Precision::Precise => KvType::F32,
        }
    }

    pub fn context_length(&self, requested: usize) -> usize {
        if requested == 0 {
            self.model.hp.n_ctx_train
        } else {
            requested
        }
    }
}
