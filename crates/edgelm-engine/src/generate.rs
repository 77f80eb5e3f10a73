//! The generation loop: prefill the prompt in one batch, then sample and decode token by token,
//! streaming only complete UTF-8 text and honouring stop strings and end-of-generation tokens.

use crate::sampler::{Sampler, SamplingParams};
use crate::stop::StopMatcher;
use crate::{Engine, EngineError, Result};
use edgelm_models::{Batch, KvCache};
use edgelm_tokenizer::StreamDecoder;
use std::time::{Duration, Instant};

pub struct GenerateRequest<'a> {
    pub prompt: &'a [u32],
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    /// Keep going past the model's end-of-generation tokens.
    pub ignore_eos: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    MaxTokens,
    EndOfGeneration,
    StopString,
    ContextFull,
}

#[derive(Debug, Clone)]
pub struct GenerationStats {
    pub prompt_tokens: usize,
    pub prompt_time: Duration,
    pub time_to_first_token: Duration,
    pub generated_tokens: usize,
    /// Time spent after the first token (the decode phase).
    pub decode_time: Duration,
    pub stop_reason: StopReason,
    pub tokens: Vec<u32>,
}

impl GenerationStats {
    pub fn prompt_tokens_per_second(&self) -> f64 {
        self.prompt_tokens as f64 / self.prompt_time.as_secs_f64().max(1e-9)
    }

    /// Decode speed over the tokens after the first.
    pub fn decode_tokens_per_second(&self) -> f64 {
        self.generated_tokens.saturating_sub(1) as f64 / self.decode_time.as_secs_f64().max(1e-9)
    }
}

/// Generate from `req.prompt` appended to sequence 0 of `cache`, passing text to `on_text`.
pub fn generate(
    engine: &Engine,
    cache: &mut KvCache,
    req: &GenerateRequest<'_>,
    on_text: &mut dyn FnMut(&str),
) -> Result<GenerationStats> {
    let n_ctx = cache.n_ctx();
    let start = cache.seq_len(0);
    if req.prompt.is_empty() {
        return Err(EngineError::EmptyPrompt);
    }
    if start + req.prompt.len() >= n_ctx {
        return Err(EngineError::PromptTooLong {
            prompt: start + req.prompt.len(),
            n_ctx,
            n_ctx_train: engine.model.hp.n_ctx_train,
        });
    }
    let t0 = Instant::now();
    let batch = Batch::from_tokens(req.prompt, start, 0, false);
    let mut logits = engine.model.forward(&engine.compute, &batch, cache)?;
    let prompt_time = t0.elapsed();

    let mut sampler = Sampler::new(req.sampling.clone());
    let mut decoder = StreamDecoder::new(&engine.tokenizer);
    let mut stops = StopMatcher::new(req.stop.clone());
    let mut history: Vec<u32> = req.prompt.to_vec();
    let mut generated = Vec::new();
    let mut ttft = None;
    let mut t_first = t0;
    let reason = loop {
        if generated.len() >= req.max_tokens {
            break StopReason::MaxTokens;
        }
        let token = sampler.sample(logits.row(0), &history);
        if ttft.is_none() {
            t_first = Instant::now();
            ttft = Some(t_first - t0);
        }
        if !req.ignore_eos && engine.tokenizer.is_eog(token) {
            break StopReason::EndOfGeneration;
        }
        generated.push(token);
        history.push(token);
        let (text, hit) = stops.push(&decoder.push(token));
        if !text.is_empty() {
            on_text(&text);
        }
        if hit {
            break StopReason::StopString;
        }
        if generated.len() >= req.max_tokens {
            break StopReason::MaxTokens;
        }
        let pos = cache.seq_len(0);
        if pos + 1 > n_ctx {
            break StopReason::ContextFull;
        }
        engine.model.forward_into(
            &engine.compute,
            &Batch::from_tokens(&[token], pos, 0, true),
            cache,
            &mut logits,
        )?;
    };
    if reason != StopReason::StopString {
        let (text, _) = stops.push(&decoder.flush());
        let rest = text + &stops.flush();
        if !rest.is_empty() {
            on_text(&rest);
        }
    }
    Ok(GenerationStats {
        prompt_tokens: req.prompt.len(),
        prompt_time,
        time_to_first_token: ttft.unwrap_or(prompt_time),
        generated_tokens: generated.len(),
        decode_time: t_first.elapsed(),
        stop_reason: reason,
        tokens: generated,
    })
}
