//! Random operation sequences against a plain reference: every sequence's readable keys and
//! values must be what its tokens would have written, whatever was shared, copied, evicted or
//! released on the way.

use super::*;
use crate::hparams::LayerShape;
use crate::layers::{Activation, Rope, RopeStyle};
use edgelm_kernels::KvPlane;

/// Layers: a full one, a windowed one (window 6), another full one with a wider kv head.
fn hparams() -> HParams {
    let rope = Rope::new(RopeStyle::Neox, 4, 10000.0, 1.0, None);
    let layer = |n_head_kv, window| LayerShape {
        n_head: 2,
        n_head_kv,
        n_ff: 8,
        window,
        rope: rope.clone(),
    };
    HParams {
        arch: "test".into(),
        n_embd: 8,
        n_vocab: 8,
        n_ctx_train: 64,
        head_dim: 4,
        rms_eps: 1e-6,
        activation: Activation::Silu,
        embed_scale: None,
        attn_scale: 0.5,
        layers: vec![layer(1, None), layer(1, Some(6)), layer(2, None)],
        pooling: Ok(crate::hparams::Pooling::Mean),
    }
}

struct Lcg(u64);
impl Lcg {
    /// `n` tokens from a vocabulary of two, so prompts share prefixes often.
    fn tokens(&mut self, n: usize) -> Vec<u32> {
        (0..n).map(|_| self.below(2) as u32).collect()
    }

    fn below(&mut self, n: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 33) % n.max(1) as u64) as usize
    }
}

/// The value a model would store at element `j` of position `tokens.len() - 1`, layer `layer`:
/// a function of the whole prefix, as real keys are; multiples of 1/8 below 128 (exact in f16).
fn value(tokens: &[u32], layer: usize, j: usize, is_v: bool) -> f32 {
    let h = chain_key(layer as u64 * 2 + is_v as u64, tokens) ^ (j as u64).wrapping_mul(0x9e37);
    (h % 1024) as f32 / 8.0
}

/// What a forward pass does to the cache for `tokens` appended to `seq`.
fn append(cache: &mut KvCache, hp: &HParams, seq: SeqId, tokens: &[u32]) -> Result<()> {
    let first = cache.seq_len(seq);
    cache.reserve(seq, first, tokens.len())?;
    let mut all = cache.tokens(seq).to_vec();
    for &t in tokens {
        all.push(t);
        let pos = all.len() - 1;
        for (l, shape) in hp.layers.iter().enumerate() {
            let d = shape.n_head_kv * hp.head_dim;
            let k: Vec<f32> = (0..d).map(|j| value(&all, l, j, false)).collect();
            let v: Vec<f32> = (0..d).map(|j| value(&all, l, j, true)).collect();
            cache.write(seq, l, pos, &k, &v);
        }
    }
    cache.append_tokens(seq, tokens);
    Ok(())
}

/// `d` values of an exact (f32 or f16) plane from value `at`.
fn widen(plane: KvPlane<'_>, at: usize, d: usize) -> Vec<f32> {
    match plane {
        KvPlane::F32(x) => x[at..at + d].to_vec(),
        KvPlane::F16(x) => x[at..at + d]
            .iter()
            .map(|b| half::f16::from_bits(*b).to_f32())
            .collect(),
        _ => panic!("these tests keep exact caches"),
    }
}

/// Every key and value the next position of `seq` would read, against `value`.
fn check(cache: &KvCache, hp: &HParams, seq: SeqId, want: &[u32], what: &str) {
    assert_eq!(cache.tokens(seq), want, "{what}: tokens of sequence {seq}");
    let len = want.len();
    for (l, shape) in hp.layers.iter().enumerate() {
        let d = shape.n_head_kv * hp.head_dim;
        let first = shape.window.map_or(0, |w| (len + 1).saturating_sub(w));
        if first >= len {
            continue;
        }
        let view = cache.view(seq, l, first, len - first, 0..d);
        for p in first..len {
            let slot =
                view.blocks[p / view.block_len] as usize * view.block_len + p % view.block_len;
            let at = slot * view.stride;
            let (k, v) = (widen(view.keys, at, d), widen(view.values, at, d));
            for j in 0..d {
                assert_eq!(
                    k[j],
                    value(&want[..=p], l, j, false),
                    "{what}: seq {seq} layer {l} pos {p} key {j}"
                );
                assert_eq!(
                    v[j],
                    value(&want[..=p], l, j, true),
                    "{what}: seq {seq} layer {l} pos {p} value {j}"
                );
            }
        }
    }
}

fn run(seed: u64, ty: KvType, prefix_cache: bool, budget: Option<u64>) {
    let hp = hparams();
    let cfg = KvConfig {
        n_ctx: 40,
        types: ty.into(),
        block_len: 4,
        max_seqs: 4,
        budget,
        prefix_cache,
    };
    let mut cache = KvCache::new(&hp, cfg).unwrap();
    let mut rng = Lcg(seed);
    // (sequence, its tokens, the length it can always be cut back to: a block before where its
    // furthest append began; usize::MAX where it adopted a cached prefix, which promises none)
    let mut live: Vec<(SeqId, Vec<u32>, usize)> = Vec::new();
    let mut reused = 0;
    for step in 0..400 {
        let what = format!("seed {seed} {ty:?} prefix {prefix_cache} step {step}");
        let op = rng.below(10);
        match op {
            0..=2 if live.len() < 4 => {
                let n = 1 + rng.below(24);
                let prompt = rng.tokens(n);
                let (id, hit) = cache.alloc_with_prefix(&prompt);
                assert!(
                    hit < prompt.len() && hit % 4 == 0,
                    "{what}: reused {hit} of {}",
                    prompt.len()
                );
                assert!(prefix_cache || hit == 0);
                reused += hit;
                check(&cache, &hp, id, &prompt[..hit], &what);
                match append(&mut cache, &hp, id, &prompt[hit..]) {
                    Ok(()) => live.push((id, prompt, if hit > 0 { usize::MAX } else { 0 })),
                    Err(ModelError::KvFull { .. }) => {
                        check(&cache, &hp, id, &prompt[..hit], &what);
                        cache.free(id).unwrap();
                    }
                    Err(e) => panic!("{what}: {e}"),
                }
            }
            3..=5 if !live.is_empty() => {
                let i = rng.below(live.len());
                let n = 1 + rng.below(9);
                let more = rng.tokens(n);
                let (id, ref mut want, ref mut from) = live[i];
                match append(&mut cache, &hp, id, &more) {
                    Ok(()) => {
                        if *from != usize::MAX {
                            *from = (*from).max(want.len().saturating_sub(4));
                        }
                        want.extend(more)
                    }
                    Err(ModelError::ContextFull { .. }) => assert!(want.len() + more.len() > 40),
                    Err(ModelError::KvFull { .. }) => {}
                    Err(e) => panic!("{what}: {e}"),
                }
            }
            6 if !live.is_empty() && live.len() < 4 => {
                let (id, want, from) = live[rng.below(live.len())].clone();
                let child = cache.fork(id).unwrap();
                live.push((child, want, from));
            }
            7 if !live.is_empty() => {
                let i = rng.below(live.len());
                let (id, ref mut want, from) = live[i];
                let len = rng.below(want.len() + 1);
                match cache.truncate(id, len) {
                    Ok(()) => want.truncate(len),
                    // Only a window refuses, and only below that length.
                    Err(ModelError::Truncate { .. }) => {
                        assert!(len < from, "{what}: cut to {len}, promised {from}")
                    }
                    Err(e) => panic!("{what}: {e}"),
                }
            }
            8 | 9 if !live.is_empty() => {
                let (id, _, _) = live.swap_remove(rng.below(live.len()));
                cache.free(id).unwrap();
                assert_eq!(cache.seq_len(id), 0);
            }
            _ => {}
        }
        for (id, want, _) in &live {
            check(&cache, &hp, *id, want, &what);
        }
        let s = cache.stats();
        assert_eq!(s.sequences, live.len(), "{what}");
        assert!(s.used + s.cached <= s.blocks, "{what}");
    }
    for (id, _, _) in live.drain(..) {
        cache.free(id).unwrap();
    }
    let s = cache.stats();
    assert_eq!(
        s.used, 0,
        "seed {seed}: blocks still held after every sequence was freed"
    );
    if prefix_cache {
        assert!(reused > 0, "seed {seed}: no prefix was ever reused");
    }
}

#[test]
fn random_operations_match_a_plain_cache() {
    for seed in 0..40 {
        run(seed, KvType::F32, seed % 2 == 0, None);
    }
}

#[test]
fn random_operations_under_a_tight_budget_evict_and_refuse_cleanly() {
    let hp = hparams();
    // Room for ~1.5 sequences of the full context: appends run out, cached blocks get evicted.
    let per_pos = (2 * 4 + 2 * 8 + 2 * 4) as u64 * 2;
    for seed in 0..40 {
        run(100 + seed, KvType::F16, true, Some(per_pos * 64 + 2048));
    }
    let cfg = KvConfig {
        budget: Some(16),
        ..KvConfig::new(40, KvType::F16)
    };
    let e = KvCache::new(&hp, cfg).unwrap_err();
    assert!(e.to_string().contains("holds no block"), "{e}");
}

#[test]
fn a_window_releases_blocks_and_bounds_its_memory() {
    let hp = hparams();
    let mut cache = KvCache::new(&hp, KvConfig::new(400, KvType::F32)).unwrap();
    let seq = cache.alloc();
    let mut tokens = Vec::new();
    for i in 0..300u32 {
        append(&mut cache, &hp, seq, &[i % 2]).unwrap();
        tokens.push(i % 2);
    }
    check(&cache, &hp, seq, &tokens, "after 300 single steps");
    let windowed = &cache.seqs[seq].as_ref().unwrap().tables[1];
    let held = windowed.iter().filter(|&&b| b != HOLE).count();
    assert!(held <= 3, "the window of 6 holds {held} blocks of 4");
    // Cutting back within the window works; past it the cache refuses and keeps the sequence.
    cache.truncate(seq, 298).unwrap();
    let e = cache.truncate(seq, 100).unwrap_err();
    assert!(e.to_string().contains("sliding window"), "{e}");
    assert_eq!(cache.seq_len(seq), 298);
}

#[test]
fn fork_copies_a_shared_block_on_write() {
    let hp = hparams();
    let cfg = KvConfig {
        block_len: 4,
        ..KvConfig::new(40, KvType::F32)
    };
    let mut cache = KvCache::new(&hp, cfg).unwrap();
    let a = cache.alloc();
    append(&mut cache, &hp, a, &[1, 0, 1, 1, 0, 0]).unwrap();
    let b = cache.fork(a).unwrap();
    let shared = cache.seqs[a].as_ref().unwrap().tables[0][1];
    assert_eq!(cache.groups[0].refs(shared), 2);
    append(&mut cache, &hp, b, &[1]).unwrap();
    append(&mut cache, &hp, a, &[0]).unwrap();
    check(&cache, &hp, a, &[1, 0, 1, 1, 0, 0, 0], "parent");
    check(&cache, &hp, b, &[1, 0, 1, 1, 0, 0, 1], "child");
    let (ta, tb) = (
        &cache.seqs[a].as_ref().unwrap().tables[0],
        &cache.seqs[b].as_ref().unwrap().tables[0],
    );
    assert_eq!(ta[0], tb[0], "the full first block stays shared");
    assert_ne!(ta[1], tb[1], "the written block was copied");
}

/// Every byte of a plane, whatever its type.
fn plane_bytes(plane: KvPlane<'_>) -> Vec<u8> {
    match plane {
        KvPlane::F32(x) => x.iter().flat_map(|v| v.to_le_bytes()).collect(),
        KvPlane::F16(x) => x.iter().flat_map(|v| v.to_le_bytes()).collect(),
        KvPlane::Q8_0(x) => x.iter().flat_map(|b| b.0).collect(),
        KvPlane::Q4_0(x) => x.iter().flat_map(|b| b.0).collect(),
    }
}

/// A chunk's rows written at once — quantized ones encoded across the pool — store exactly what
/// writing them token by token stores: every type, two sequences' runs in one chunk, positions
/// crossing block boundaries.
#[test]
fn writing_a_chunk_at_once_equals_writing_token_by_token() {
    // Every path this CPU runs: the SIMD rounding must store what `write`'s scalar one does.
    for isa in edgelm_kernels::Isa::available() {
        chunk_at_once_equals_token_by_token(&edgelm_kernels::Compute::precise(isa, 2));
    }
}

fn chunk_at_once_equals_token_by_token(compute: &edgelm_kernels::Compute) {
    let hp = HParams {
        head_dim: 32,
        ..hparams()
    };
    let mut rng = Lcg(5);
    for ty in [KvType::F32, KvType::F16, KvType::Q8_0, KvType::Q4_0] {
        let cfg = KvConfig {
            block_len: 4,
            ..KvConfig::new(40, ty)
        };
        let (mut whole, mut single) = (
            KvCache::new(&hp, cfg.clone()).unwrap(),
            KvCache::new(&hp, cfg).unwrap(),
        );
        let mut seqs = Vec::new();
        for cache in [&mut whole, &mut single] {
            let (a, b) = (cache.alloc(), cache.alloc());
            cache.reserve(a, 0, 7).unwrap();
            cache.reserve(b, 0, 10).unwrap();
            seqs = [vec![a; 7], vec![b; 10]].concat();
        }
        let positions: Vec<usize> = (0..7).chain(0..10).collect();
        for (l, shape) in hp.layers.iter().enumerate() {
            let d = shape.n_head_kv * hp.head_dim;
            let mut row = || -> Vec<f32> {
                (0..seqs.len() * d)
                    .map(|_| rng.below(2001) as f32 / 100.0 - 10.0)
                    .collect()
            };
            let (k, v) = (row(), row());
            whole.write_rows(compute, l, &seqs, &positions, &k, &v);
            for (t, (&s, &p)) in seqs.iter().zip(&positions).enumerate() {
                single.write(s, l, p, &k[t * d..(t + 1) * d], &v[t * d..(t + 1) * d]);
            }
            // Layers of one KV head write 17 blocks (straight into their slots), the last one
            // 34 (encoded across the pool first).
            for (seq, n) in [(seqs[0], 7), (seqs[7], 10)] {
                let (x, y) = (
                    whole.view(seq, l, 0, n, 0..d),
                    single.view(seq, l, 0, n, 0..d),
                );
                assert_eq!(
                    plane_bytes(x.keys),
                    plane_bytes(y.keys),
                    "{ty:?} layer {l} keys"
                );
                assert_eq!(
                    plane_bytes(x.values),
                    plane_bytes(y.values),
                    "{ty:?} layer {l} values"
                );
            }
        }
    }
}
