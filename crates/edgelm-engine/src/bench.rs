//! Timed runs in the manner of llama-bench: prompt processing of `n` random tokens in one batch
//! (pp), and generation of `n` tokens one at a time (tg), from an empty context or after `depth`
//! tokens already in the cache (llama-bench's `-d`).

use crate::{Engine, Result, Rng};
use edgelm_models::{Batch, KvCache, Logits, Scratch, SeqId};
use std::time::{Duration, Instant};

/// Random token ids (llama-bench feeds random tokens too), never a control token at 0.
fn random_tokens(engine: &Engine, n: usize, seed: u64) -> Vec<u32> {
    let mut rng = Rng::new(seed);
    let vocab = engine.model.hp.n_vocab as u64;
    (0..n)
        .map(|_| (1 + rng.next_u64() % (vocab - 1)) as u32)
        .collect()
}

/// A new sequence in an emptied `cache` holding `depth` random tokens (prefilled in chunks,
/// untimed): the context later timed runs continue from, as llama-bench's `-d`.
pub fn fill_depth(
    engine: &Engine,
    cache: &mut KvCache,
    scratch: &mut Scratch,
    depth: usize,
) -> Result<SeqId> {
    cache.clear();
    let seq = cache.alloc();
    let tokens = random_tokens(engine, depth, u64::MAX);
    for (i, chunk) in tokens.chunks(512).enumerate() {
        engine.model.forward(
            &engine.compute,
            &Batch::from_tokens(chunk, i * 512, seq, false),
            cache,
            scratch,
        )?;
    }
    Ok(seq)
}

/// Time one batched forward of `n` tokens after the `depth` tokens `base` holds, in a fork of
/// it (freed after, so `base` serves every run even where sliding windows release keys; the
/// cache needs room for two sequences); logits for the last token only. The cache and scratch
/// are reused across runs, as llama-bench reuses its context: their memory is allocated once,
/// not inside the timed region.
pub fn time_prompt(
    engine: &Engine,
    cache: &mut KvCache,
    scratch: &mut Scratch,
    base: SeqId,
    depth: usize,
    n: usize,
    seed: u64,
) -> Result<Duration> {
    let tokens = random_tokens(engine, n, seed);
    let seq = cache.fork(base)?;
    let t0 = Instant::now();
    engine.model.forward(
        &engine.compute,
        &Batch::from_tokens(&tokens, depth, seq, false),
        cache,
        scratch,
    )?;
    let elapsed = t0.elapsed();
    cache.free(seq)?;
    Ok(elapsed)
}

/// Time `n` single-token forwards after the `depth` tokens `base` holds (in a fork, as
/// [`time_prompt`]).
pub fn time_generation(
    engine: &Engine,
    cache: &mut KvCache,
    scratch: &mut Scratch,
    base: SeqId,
    depth: usize,
    n: usize,
    seed: u64,
) -> Result<Duration> {
    let tokens = random_tokens(engine, n, seed);
    let seq = cache.fork(base)?;
    let mut logits = Logits::default();
    let t0 = Instant::now();
    for (i, &t) in tokens.iter().enumerate() {
        engine.model.forward_into(
            &engine.compute,
            &Batch::from_tokens(&[t], depth + i, seq, true),
            cache,
            scratch,
            &mut logits,
        )?;
    }
    let elapsed = t0.elapsed();
    cache.free(seq)?;
    Ok(elapsed)
}

/// Mean and sample standard deviation.
pub fn mean_sd(xs: &[f64]) -> (f64, f64) {
    let n = xs.len().max(1) as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let var = if xs.len() > 1 {
        xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (mean, var.sqrt())
}
