//! Teacher-forced evaluation: per-position scores and llama-perplexity-compatible perplexity.

use crate::{Engine, EngineError, Result, SubmitError};
use edgelm_models::{Batch, Forward, Logits, Observer, Scratch, MAX_CHUNK};

/// One position of a teacher-forced pass: the logit row predicting `next`.
#[derive(Debug, Clone)]
pub struct ScoredPosition {
    pub pos: usize,
    pub next: u32,
    /// log p(next | tokens ..= pos).
    pub logprob: f64,
    /// The `top_n` highest raw logits, highest first.
    pub top: Vec<(u32, f32)>,
}

/// Feed `tokens` once and report, for every position but the last, how the model scored the
/// token that follows. Results stream to `each` chunk by chunk, so memory stays bounded.
pub fn score(
    engine: &Engine,
    tokens: &[u32],
    top_n: usize,
    n_ctx: usize,
    each: &mut dyn FnMut(ScoredPosition),
) -> Result<()> {
    if tokens.len() < 2 {
        return Err(EngineError::Input(
            "scoring needs at least two tokens".into(),
        ));
    }
    let n_ctx = engine.context_length(n_ctx);
    if tokens.len() > n_ctx {
        return Err(SubmitError::PromptTooLong {
            prompt: tokens.len(),
            n_ctx,
        }
        .into());
    }
    let mut cache = engine.new_cache(n_ctx)?;
    let seq = cache.alloc();
    let mut scratch = Scratch::default();
    let inputs = &tokens[..tokens.len() - 1];
    for (ci, chunk) in inputs.chunks(MAX_CHUNK).enumerate() {
        let start = ci * MAX_CHUNK;
        let logits = engine.model.forward(
            &engine.compute,
            &Batch::from_tokens(chunk, start, seq, true),
            &mut cache,
            &mut scratch,
        )?;
        for i in 0..chunk.len() {
            let row = logits.row(i);
            let next = tokens[start + i + 1];
            each(ScoredPosition {
                pos: start + i,
                next,
                logprob: log_softmax_at(row, next),
                top: top_n_logits(row, top_n),
            });
        }
    }
    Ok(())
}

pub fn log_softmax_at(row: &[f32], id: u32) -> f64 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = row.iter().map(|&l| (l as f64 - max).exp()).sum();
    row[id as usize] as f64 - max - sum.ln()
}

pub fn top_n_logits(row: &[f32], n: usize) -> Vec<(u32, f32)> {
    let mut idx: Vec<(u32, f32)> = row
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, l))
        .collect();
    let n = n.min(idx.len());
    if n == 0 {
        return Vec::new();
    }
    idx.select_nth_unstable_by(n - 1, |a, b| b.1.total_cmp(&a.1));
    idx.truncate(n);
    idx.sort_by(|a, b| b.1.total_cmp(&a.1));
    idx
}

#[derive(Debug, Clone)]
pub struct PerplexityChunk {
    pub index: usize,
    /// Running perplexity after this chunk.
    pub ppl: f64,
}

#[derive(Debug, Clone)]
pub struct PerplexityResult {
    pub ppl: f64,
    /// Standard error of the perplexity estimate.
    pub ppl_err: f64,
    pub n_chunks: usize,
    pub n_scored: usize,
}

/// Perplexity as llama.cpp's llama-perplexity computes it: consecutive chunks of `n_ctx`
/// tokens, each evaluated from an empty cache, BOS replacing the first token where the model
/// adds BOS, and only the second half of each chunk scored.
pub fn perplexity(
    engine: &Engine,
    tokens: &[u32],
    n_ctx: usize,
    progress: &mut dyn FnMut(PerplexityChunk),
) -> Result<PerplexityResult> {
    perplexity_rows(engine, tokens, n_ctx, progress, &mut |_, _| Ok(()))
}

/// [`perplexity`], handing every scored position's logits and right next token to `row` in
/// order (for KL divergence against a base run).
pub fn perplexity_rows(
    engine: &Engine,
    tokens: &[u32],
    n_ctx: usize,
    progress: &mut dyn FnMut(PerplexityChunk),
    row: &mut dyn FnMut(&[f32], u32) -> Result<()>,
) -> Result<PerplexityResult> {
    chunked(engine, tokens, n_ctx, 2, None, progress, row)
}

/// [`perplexity`] over `n_chunks` chunks (at least one) with `observer` seeing every
/// projection's input: the calibration pass of an importance matrix.
pub fn perplexity_observed(
    engine: &Engine,
    tokens: &[u32],
    n_ctx: usize,
    observer: &dyn Observer,
    progress: &mut dyn FnMut(PerplexityChunk),
) -> Result<PerplexityResult> {
    chunked(
        engine,
        tokens,
        n_ctx,
        1,
        Some(observer),
        progress,
        &mut |_, _| Ok(()),
    )
}

/// Chunks of `n_ctx` tokens from a fresh cache, each starting at BOS where the model adds one,
/// scored over their second half (as llama.cpp's perplexity).
fn chunked(
    engine: &Engine,
    tokens: &[u32],
    n_ctx: usize,
    min_chunks: usize,
    observer: Option<&dyn Observer>,
    progress: &mut dyn FnMut(PerplexityChunk),
    row: &mut dyn FnMut(&[f32], u32) -> Result<()>,
) -> Result<PerplexityResult> {
    if n_ctx < 4 {
        return Err(EngineError::Input(format!(
            "context {n_ctx} is too small for perplexity"
        )));
    }
    let n_chunks = tokens.len() / n_ctx;
    if n_chunks < min_chunks {
        return Err(EngineError::Input(format!(
            "the text has {} tokens; -c {n_ctx} needs at least {} ({min_chunks} chunk(s))",
            tokens.len(),
            min_chunks * n_ctx
        )));
    }
    let bos = if engine.tokenizer.adds_bos() {
        engine.tokenizer.bos()
    } else {
        None
    };
    let first = n_ctx / 2;
    let (mut nll, mut nll2, mut count) = (0f64, 0f64, 0usize);
    let mut cache = engine.new_cache(n_ctx)?;
    let mut scratch = Scratch::default();
    let mut logits = Logits::default();
    for ci in 0..n_chunks {
        let mut chunk = tokens[ci * n_ctx..(ci + 1) * n_ctx].to_vec();
        if let Some(b) = bos {
            chunk[0] = b;
        }
        cache.clear();
        let seq = cache.alloc();
        let mut batch = Batch::new();
        for (i, &t) in chunk.iter().enumerate() {
            batch.push(t, i, seq, i >= first && i + 1 < n_ctx);
        }
        let f = Forward {
            compute: &engine.compute,
            observer,
        };
        engine
            .model
            .forward_with(f, &batch, &mut cache, &mut scratch, &mut logits)?;
        for (r, &bi) in logits.batch_index.iter().enumerate() {
            let next = tokens[ci * n_ctx + bi + 1];
            row(logits.row(r), next)?;
            let v = -log_softmax_at(logits.row(r), next);
            nll += v;
            nll2 += v * v;
            count += 1;
        }
        progress(PerplexityChunk {
            index: ci,
            ppl: (nll / count as f64).exp(),
        });
    }
    let mean = nll / count as f64;
    let var = nll2 / count as f64 - mean * mean;
    let ppl = mean.exp();
    let ppl_err = if var > 0.0 && count > 1 {
        (var / (count - 1) as f64).sqrt() * ppl
    } else {
        0.0
    };
    Ok(PerplexityResult {
        ppl,
        ppl_err,
        n_chunks,
        n_scored: count,
    })
}
