//! The engine: a loaded model with its tokenizer and compute context; the step-wise scheduler
//! that generates for many requests at once (sampling, stop rules, streaming, prefix reuse);
//! teacher-forced scoring and perplexity. Clients (CLI, server) call this crate, never the
//! kernels.

#![forbid(unsafe_code)]

pub mod bench;
mod eval;
mod kld;
mod sampler;
mod scheduler;
mod sequence;
mod session;
mod stop;

pub use eval::{
    perplexity, perplexity_observed, perplexity_rows, score, PerplexityChunk, PerplexityResult,
    ScoredPosition,
};
pub use kld::{BaseReader, BaseWriter, KlStats, KlSummary, Percentiles};
pub use sampler::{apply_penalties, Candidate, Rng, Sampler, SamplingParams};
pub use scheduler::{Counters, Scheduler, SchedulerConfig, SubmitError};
pub use sequence::{Event, FinishReason, Request, SequenceStats, Sink, TokenLogprob};
pub use session::{model_fingerprint, SessionError};
pub use stop::StopMatcher;

use edgelm_chat::ChatTemplate;
use edgelm_gguf::GgufFile;
use edgelm_kernels::{Compute, Precision};
use edgelm_models::repack_cache::{self, RepackCache};
use edgelm_models::{KvCache, KvConfig, KvType, KvTypes, Model};
use edgelm_tokenizer::{Encode, Tokenizer};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

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
    #[error(transparent)]
    Chat(#[from] edgelm_chat::ChatError),
    #[error(transparent)]
    Session(#[from] SessionError),
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
    /// The model's chat template, compiled on first use.
    chat: OnceLock<std::result::Result<Arc<ChatTemplate>, String>>,
    /// Cache types chosen for this engine's caches; None keeps the path's default.
    kv_types: Option<KvTypes>,
    /// Where this engine's repacked weights came from.
    pub repack_cache: RepackCache,
    /// The model file this engine maps.
    path: PathBuf,
}

impl Engine {
    /// Load the model at `path` for `compute`: weights its kernels want repacked come from the
    /// repack cache beside the model, written on the first run
    /// ([`edgelm_models::repack_cache`]; `EDGELM_REPACK_CACHE=off` repacks in memory instead).
    pub fn load(path: &Path, compute: Compute) -> Result<Engine> {
        let file = Arc::new(GgufFile::open(path)?);
        let tokenizer = Tokenizer::from_gguf(&file)?;
        let model = edgelm_models::load(file)?;
        let repack_cache = if std::env::var("EDGELM_REPACK_CACHE").is_ok_and(|v| v == "off") {
            RepackCache::NotNeeded
        } else {
            repack_cache::attach(&model, path, &compute)
        };
        Ok(Engine {
            repack_cache,
            path: path.to_owned(),
            model: Arc::new(model),
            tokenizer: Arc::new(tokenizer),
            compute,
            chat: OnceLock::new(),
            kv_types: None,
        })
    }

    /// The files whose mapped pages are this engine's weights: the model, and its repack cache
    /// where one is mapped.
    pub fn weight_files(&self) -> Vec<PathBuf> {
        let mut files = vec![self.path.clone()];
        if let RepackCache::Mapped { path, .. } | RepackCache::Written { path, .. } =
            &self.repack_cache
        {
            files.push(path.clone());
        }
        files
    }

    /// The model's chat template, or the built-in ChatML one where the file has none.
    pub fn chat_template(&self) -> Result<Arc<ChatTemplate>> {
        let tok = &self.tokenizer;
        let text = |id: Option<u32>| id.and_then(|i| tok.token_text(i)).unwrap_or("").to_owned();
        self.chat
            .get_or_init(|| {
                ChatTemplate::new(tok.chat_template(), &text(tok.bos()), &text(tok.eos()))
                    .map(Arc::new)
                    .map_err(|e| e.to_string())
            })
            .clone()
            .map_err(EngineError::Input)
    }

    /// Whether the model file carries its own chat template.
    pub fn has_chat_template(&self) -> bool {
        self.tokenizer.chat_template().is_some()
    }

    /// The prompt tokens of a conversation (OpenAI-shaped messages, optional tools) rendered
    /// through the chat template with the assistant's turn opened (`render_prompt`: tools a
    /// template does not show are described in the system message). Special tokens in the
    /// rendered text are parsed; BOS is added where the model wants it and the template did
    /// not write it.
    pub fn encode_chat(
        &self,
        messages: &[serde_json::Value],
        tools: Option<&[serde_json::Value]>,
    ) -> Result<Vec<u32>> {
        let text = self.chat_template()?.render_prompt(messages, tools)?;
        Ok(encode_rendered_chat(&self.tokenizer, &text)?)
    }

    /// The KV settings of this engine's path for one sequence of up to `n_ctx` tokens (0 = the
    /// model's trained length).
    pub fn kv_config(&self, n_ctx: usize) -> KvConfig {
        KvConfig::new(self.context_length(n_ctx), self.kv_types())
    }

    /// A KV cache for one sequence of up to `n_ctx` tokens (0 = the model's trained length).
    pub fn new_cache(&self, n_ctx: usize) -> Result<KvCache> {
        Ok(KvCache::new(&self.model.hp, self.kv_config(n_ctx))?)
    }

    /// The KV cache types of this engine: as set, else the path's — f16 on the fast path (as
    /// llama.cpp), f32 on the precise one.
    pub fn kv_types(&self) -> KvTypes {
        self.kv_types.unwrap_or(match self.compute.precision() {
            Precision::Fast => KvType::F16.into(),
            Precision::Precise => KvType::F32.into(),
        })
    }

    /// Cache keys and values as `types` from now on. The precise path is the f32 reference and
    /// keeps f32.
    pub fn set_kv_types(&mut self, types: KvTypes) -> Result<()> {
        let exact = KvTypes::from(KvType::F32);
        if self.compute.precision() == Precision::Precise && types != exact {
            return Err(EngineError::Input(format!(
                "the precise path keeps an f32 KV cache, and {types} was asked for; drop \
                 --precise or the cache-type options"
            )));
        }
        self.kv_types = Some(types);
        Ok(())
    }

    pub fn context_length(&self, requested: usize) -> usize {
        if requested == 0 {
            self.model.hp.n_ctx_train
        } else {
            requested
        }
    }
}

/// Tokens of a rendered chat prompt: special tokens parsed, BOS added where the model wants it
/// and the template did not already write it.
pub fn encode_rendered_chat(
    tok: &Tokenizer,
    text: &str,
) -> std::result::Result<Vec<u32>, edgelm_tokenizer::TokenizerError> {
    let bos_written = tok
        .bos()
        .and_then(|b| tok.token_text(b))
        .is_some_and(|b| !b.is_empty() && text.starts_with(b));
    tok.encode(
        text,
        Encode {
            add_special: !bos_written,
            parse_special: true,
        },
    )
}
