//! Timed runs in the manner of llama-bench: prompt processing of `n` random tokens in one batch
//! (pp), and generation of `n` tokens one at a time (tg), from an empty context or after `depth`
//! tokens already in the cache (llama-bench's `-d`).

use crate::{Engine, Result, Rng};
use edgelm_kernels::Compute;
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

/// The memory read bandwidth decoding is judged against: every thread of a pool streams its
/// own contiguous share of a buffer far larger than any cache, as a decoding step streams its
/// share of each weight matrix. Measured beside each timed run (this machine's bandwidth moves
/// with its neighbours' load), never once for all.
pub struct BandwidthProbe {
    buf: Vec<u64>,
}

impl BandwidthProbe {
    /// 512 MiB: many times the largest last-level cache of a laptop or server part.
    pub const BYTES: usize = 512 << 20;

    /// The buffer, written once so its pages are in place before any reading is timed.
    pub fn new() -> BandwidthProbe {
        BandwidthProbe {
            buf: vec![1; Self::BYTES / 8],
        }
    }

    /// GB/s (10⁹ bytes) read by every thread of `compute`'s pool at once, over two passes.
    pub fn read_gbps(&self, compute: &Compute) -> f64 {
        const PASSES: usize = 2;
        let threads = compute.n_threads();
        let share = self.buf.len().div_ceil(threads);
        let t0 = Instant::now();
        compute.pool().run(threads, &|task| {
            let part = self.buf.chunks(share).nth(task).unwrap_or_default();
            for _ in 0..PASSES {
                // Eight independent lanes per cache line: the loads, not the adds, set the pace.
                let mut acc = [0u64; 8];
                for line in part.chunks_exact(8) {
                    for (a, v) in acc.iter_mut().zip(line) {
                        *a ^= v;
                    }
                }
                std::hint::black_box(acc);
            }
        });
        (PASSES * Self::BYTES) as f64 / t0.elapsed().as_secs_f64() / 1e9
    }
}

impl Default for BandwidthProbe {
    fn default() -> Self {
        BandwidthProbe::new()
    }
}

/// Median of `xs` (the mean of the middle two for an even count; 0 when empty).
pub fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_even_and_empty_lists() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
    }
}
