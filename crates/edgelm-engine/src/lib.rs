//! The engine: a loaded model with its tokenizer and compute context; the step-wise scheduler
//! that generates for many requests at once (sampling, stop rules, streaming, prefix reuse);
//! teacher-forced scoring and perplexity. Clients (CLI, server) call this crate, never the
//! kernels.

pub mod bench;
mod eval;
mod sampler;
mod scheduler;
mod sequence;
mod stop;

pub use eval::{perplexity, score, PerplexityChunk, PerplexityResult, ScoredPosition};
pub use sampler::{apply_penalties, Candidate, Rng, Sampler, SamplingParams};
pub use scheduler::{Counters, Scheduler, SchedulerConfig, SubmitError};
pub use sequence::{Event, FinishReason, Request, SequenceStats, Sink, TokenLogprob};
pub use stop::StopMatcher;

use edgelm_gguf::GgufFile;
use edgelm_kernels::{Compute, Precision};
use edgelm_models::{KvCache, KvConfig, KvType, Model};
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
    #[error(transparent)]
    Submit(#[from] SubmitError),
    #[error("{0}")]
    Input(String),
}

pub type Result<T> = std::result::Result<T, EngineError>;

/// A model ready to run: weights and tokenizer (immutable, shared), and the compute context
/// (ISA, threads) of whoever runs it.
pub struct Engine {
    pub model: Arc<Model>,
    pub tokenizer: Arc<Tokenizer>,
    pub compute: Compute,
}

impl Engine {
    pub fn load(path: &Path, compute: Compute) -> Result<Engine> {
        let file = Arc::new(GgufFile::open(path)?);
        let tokenizer = Tokenizer::from_gguf(&file)?;
        let model = edgelm_models::load(file)?;
        Ok(Engine {
            model: Arc::new(model),
            tokenizer: Arc::new(tokenizer),
            compute,
        })
    }

    /// The KV settings of this engine's path for one sequence of up to `n_ctx` tokens (0 = the
    /// model's trained length).
    pub fn kv_config(&self, n_ctx: usize) -> KvConfig {
        KvConfig::new(self.context_length(n_ctx), self.kv_type())
    }

    /// A KV cache for one sequence of up to `n_ctx` tokens (0 = the model's trained length).
    pub fn new_cache(&self, n_ctx: usize) -> Result<KvCache> {
        Ok(KvCache::new(&self.model.hp, self.kv_config(n_ctx))?)
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
