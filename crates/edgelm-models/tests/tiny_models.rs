//! Tiny random Llama, Qwen2 and Gemma 3 models, written with edgelm's GGUF writer and loaded
//! with `edgelm_models::load`, against the independent f64 reference in `common`: one batch,
//! prefill then single tokens, two interleaved sequences, sliding-window rings, truncation,
//! quantized weights, and the errors of bad files and bad batches.

mod common;

use common::{reference_hidden, reference_logits, Arch, Flaw, Rng, Spec, TinyModel};
use edgelm_gguf::{GgmlType, Value};
use edgelm_kernels::{Compute, Isa};
use edgelm_models::{Batch, KvCache, KvConfig, KvType, KvTypes, Model, ModelError, Scratch};

/// Absolute tolerance on logits of magnitude ~1 (f32 forward against the f64 reference).
const TOL: f64 = 1e-4;
/// Longer than Gemma's window of 5, so local layers drop keys.
const SEQ_LEN: usize = 12;

/// One compute context per instruction set this CPU runs, with 2 threads to exercise the pool.
fn computes() -> Vec<Compute> {
    Isa::available()
        .into_iter()
        .map(|isa| Compute::precise(isa, 2))
        .collect()
}

/// An f32 cache of `n_ctx` positions per sequence in blocks of `block_len`, with sequences 0
/// and 1 allocated.
fn new_cache(model: &Model, n_ctx: usize, block_len: usize) -> KvCache {
    let cfg = KvConfig {
        block_len,
        max_seqs: 2,
        ..KvConfig::new(n_ctx, KvType::F32)
    };
    let mut cache = KvCache::new(&model.hp, cfg).unwrap();
    assert_eq!((cache.alloc(), cache.alloc()), (0, 1));
    cache
}

fn load(m: &TinyModel) -> Model {
    match m.load() {
        Ok(model) => model,
        Err(e) => panic!("loading tiny {}: {e}", m.spec.arch.name()),
    }
}

fn load_err(m: &TinyModel) -> ModelError {
    match m.load() {
        Ok(_) => panic!("tiny {} loaded but should not have", m.spec.arch.name()),
        Err(e) => e,
    }
}

/// Largest |got - want| / max(1, |want|) over all rows; panics on a row count mismatch.
fn max_err(got: &[Vec<f32>], want: &[Vec<f64>]) -> f64 {
    assert_eq!(got.len(), want.len(), "number of logit rows");
    let mut worst = 0f64;
    for (g, w) in got.iter().zip(want) {
        assert_eq!(g.len(), w.len(), "vocabulary size");
        for (&g, &w) in g.iter().zip(w) {
            worst = worst.max((g as f64 - w).abs() / w.abs().max(1.0));
        }
    }
    worst
}

#[track_caller]
fn assert_close(got: &[Vec<f32>], want: &[Vec<f64>], what: &str) {
    let err = max_err(got, want);
    assert!(
        err <= TOL,
        "{what}: logits differ from the reference by {err:.3e} (tolerance {TOL:.0e})"
    );
}

/// Logits of all positions of one sequence, fed as a single batch.
fn one_batch(model: &Model, c: &Compute, cache: &mut KvCache, tokens: &[u32]) -> Vec<Vec<f32>> {
    let logits = model
        .forward(
            c,
            &Batch::from_tokens(tokens, 0, 0, true),
            cache,
            &mut Scratch::default(),
        )
        .unwrap();
    assert_eq!(logits.batch_index, (0..tokens.len()).collect::<Vec<_>>());
    (0..tokens.len()).map(|i| logits.row(i).to_vec()).collect()
}

/// Logits of all positions: `tokens[from..]` fed to `seq` in steps of `step` tokens.
fn in_steps(
    model: &Model,
    c: &Compute,
    cache: &mut KvCache,
    seq: usize,
    tokens: &[u32],
    from: usize,
    step: usize,
) -> Vec<Vec<f32>> {
    let mut rows = Vec::new();
    // One `Logits` reused across steps, as a decoding loop does: each step must see only its
    // own rows.
    let mut logits = edgelm_models::Logits::default();
    let mut scratch = Scratch::default();
    for start in (from..tokens.len()).step_by(step) {
        let end = (start + step).min(tokens.len());
        model
            .forward_into(
                c,
                &Batch::from_tokens(&tokens[start..end], start, seq, true),
                cache,
                &mut scratch,
                &mut logits,
            )
            .unwrap();
        assert_eq!(logits.n_rows(), end - start);
        rows.extend((0..end - start).map(|i| logits.row(i).to_vec()));
        assert_eq!(cache.seq_len(seq), end);
    }
    rows
}

/// The three ways of running a model the brief names, each against the reference.
fn check_against_reference(arch: Arch) {
    let spec = Spec::tiny(arch);
    let m = TinyModel::random(&spec, 1 + arch as u64);
    let model = load(&m);
    let mut rng = Rng::new(99);
    let a = rng.tokens(SEQ_LEN, spec.n_vocab);
    let b = rng.tokens(SEQ_LEN - 3, spec.n_vocab);
    let (ref_a, ref_b) = (
        reference_logits(&m, &a, Flaw::None),
        reference_logits(&m, &b, Flaw::None),
    );
    let name = arch.name();

    for c in computes() {
        let isa = c.isa();
        let new_cache = || new_cache(&model, 32, 16);

        // (a) The whole sequence as one batch.
        let got = one_batch(&model, &c, &mut new_cache(), &a);
        assert_close(&got, &ref_a, &format!("{name} {isa}: one batch"));

        // (b) Prefill of 5, then one token at a time.
        let mut cache = new_cache();
        let mut got = in_steps(&model, &c, &mut cache, 0, &a[..5], 0, 5);
        got.extend(in_steps(&model, &c, &mut cache, 0, &a, 5, 1));
        assert_close(
            &got,
            &ref_a,
            &format!("{name} {isa}: prefill then single tokens"),
        );

        // (c) Two sequences interleaved in one batch (b is shorter, so a ends alone); only
        // every other position of b asks for logits, to check the row bookkeeping.
        let mut batch = Batch::new();
        for i in 0..SEQ_LEN {
            batch.push(a[i], i, 0, true);
            if i < b.len() {
                batch.push(b[i], i, 1, i % 2 == 0);
            }
        }
        let mut cache = new_cache();
        let logits = model
            .forward(&c, &batch, &mut cache, &mut Scratch::default())
            .unwrap();
        let rows_of = |seq: usize| -> Vec<Vec<f32>> {
            (0..batch.len())
                .filter(|&i| batch.seqs[i] == seq)
                .filter_map(|i| logits.for_batch_index(i).map(<[f32]>::to_vec))
                .collect()
        };
        assert_close(
            &rows_of(0),
            &ref_a,
            &format!("{name} {isa}: sequence 0 of two"),
        );
        let ref_b_even: Vec<Vec<f64>> = ref_b.iter().step_by(2).cloned().collect();
        assert_close(
            &rows_of(1),
            &ref_b_even,
            &format!("{name} {isa}: sequence 1 of two"),
        );
        assert_eq!((cache.seq_len(0), cache.seq_len(1)), (a.len(), b.len()));
    }
}

#[test]
fn llama_matches_reference() {
    check_against_reference(Arch::Llama);
}

#[test]
fn qwen2_matches_reference() {
    check_against_reference(Arch::Qwen2);
}

#[test]
fn gemma3_matches_reference() {
    check_against_reference(Arch::Gemma3);
}

/// One batch where sequence 0 wants every final hidden state (embeddings) and sequence 1 its
/// logits: each gets exactly its rows, and they match the reference.
#[test]
fn hidden_states_and_logits_in_one_batch() {
    for arch in [Arch::Llama, Arch::Qwen2, Arch::Gemma3] {
        let spec = Spec::tiny(arch);
        let m = TinyModel::random(&spec, 7 + arch as u64);
        let model = load(&m);
        let mut rng = Rng::new(5);
        let a = rng.tokens(SEQ_LEN, spec.n_vocab);
        let b = rng.tokens(SEQ_LEN - 4, spec.n_vocab);
        let hidden_a = reference_hidden(&m, &a, Flaw::None);
        let logits_b = reference_logits(&m, &b, Flaw::None);
        let mut batch = Batch::new();
        for i in 0..SEQ_LEN {
            batch.push_embd(a[i], i, 0, true);
            if i < b.len() {
                batch.push(b[i], i, 1, true);
            }
        }
        for c in computes() {
            let what = format!("{} {}", arch.name(), c.isa());
            let mut cache = new_cache(&model, 32, 16);
            let out = model
                .forward(&c, &batch, &mut cache, &mut Scratch::default())
                .unwrap();
            let rows = |seq: usize, hidden: bool| -> Vec<Vec<f32>> {
                (0..batch.len())
                    .filter(|&i| batch.seqs[i] == seq)
                    .filter_map(|i| match hidden {
                        true => out.embd_for_batch_index(i),
                        false => out.for_batch_index(i),
                    })
                    .map(<[f32]>::to_vec)
                    .collect()
            };
            assert_close(&rows(0, true), &hidden_a, &format!("{what}: hidden states"));
            assert_close(
                &rows(1, false),
                &logits_b,
                &format!("{what}: logits beside them"),
            );
            assert!(
                rows(0, false).is_empty() && rows(1, true).is_empty(),
                "{what}"
            );
        }
    }
}

/// The comparison must be sharp enough to catch a plausible mistake: the reference with each
/// flaw must differ from the crate by far more than the tolerance.
#[test]
fn comparison_catches_plausible_mistakes() {
    for arch in Arch::ALL {
        let m = TinyModel::random(&Spec::tiny(arch), 1 + arch as u64);
        let model = load(&m);
        let c = Compute::precise(Isa::Scalar, 1);
        let tokens = Rng::new(5).tokens(SEQ_LEN, m.spec.n_vocab);
        let got = one_batch(&model, &c, &mut new_cache(&model, 32, 16), &tokens);
        let mut flaws = vec![Flaw::SwappedRopePairs, Flaw::InterleavedGqa];
        if arch == Arch::Gemma3 {
            flaws.extend([Flaw::NoSlidingWindow, Flaw::FileRopeBaseEverywhere]);
        }
        for flaw in flaws {
            let err = max_err(&got, &reference_logits(&m, &tokens, flaw));
            assert!(
                err > 100.0 * TOL,
                "{}: a reference with {flaw:?} differs by only {err:.3e}",
                arch.name()
            );
        }
    }
}

#[test]
fn gemma3_every_sixth_layer_is_global() {
    let model = load(&TinyModel::random(&Spec::tiny(Arch::Gemma3), 3));
    let windows: Vec<Option<usize>> = model.hp.layers.iter().map(|l| l.window).collect();
    assert_eq!(windows, [Some(5), Some(5), Some(5), Some(5), Some(5), None]);
    assert_eq!(model.hp.head_dim, 16);
}

/// With n_ctx larger than the window, Gemma's local layers release the blocks their window has
/// passed; feeding a sequence several times longer than the window, in steps across block
/// boundaries, must not change the logits.
#[test]
fn gemma3_sliding_window_blocks_match_reference() {
    let m = TinyModel::random(&Spec::tiny(Arch::Gemma3), 4);
    let model = load(&m);
    let tokens = Rng::new(6).tokens(3 * SEQ_LEN, m.spec.n_vocab);
    let want = reference_logits(&m, &tokens, Flaw::None);
    let c = Compute::precise(Isa::detect(), 2);
    for (block_len, step) in [(1, 1), (2, 3), (4, 4), (4, 7)] {
        let mut cache = new_cache(&model, 64, block_len);
        let got = in_steps(&model, &c, &mut cache, 0, &tokens, 0, step);
        assert_close(
            &got,
            &want,
            &format!("blocks of {block_len}, steps of {step}"),
        );
    }
}

/// One batch spread over many blocks, and two sequences whose blocks interleave in the pool.
#[test]
fn sequences_over_many_small_blocks_match_reference() {
    for arch in Arch::ALL {
        let m = TinyModel::random(&Spec::tiny(arch), 8);
        let model = load(&m);
        let mut rng = Rng::new(9);
        let (a, b) = (
            rng.tokens(2 * SEQ_LEN, m.spec.n_vocab),
            rng.tokens(SEQ_LEN, m.spec.n_vocab),
        );
        let c = Compute::precise(Isa::detect(), 2);
        let what = format!("{} blocks of 2", arch.name());
        let got = one_batch(&model, &c, &mut new_cache(&model, 64, 2), &a);
        assert_close(&got, &reference_logits(&m, &a, Flaw::None), &what);
        let mut cache = new_cache(&model, 64, 2);
        let (mut got_a, mut got_b) = (Vec::new(), Vec::new());
        for i in (0..b.len()).step_by(3) {
            got_a.extend(in_steps(&model, &c, &mut cache, 0, &a[..i + 3], i, 3));
            got_b.extend(in_steps(&model, &c, &mut cache, 1, &b[..i + 3], i, 3));
        }
        assert_close(
            &got_a,
            &reference_logits(&m, &a[..b.len()], Flaw::None),
            &what,
        );
        assert_close(&got_b, &reference_logits(&m, &b, Flaw::None), &what);
    }
}

/// Truncating a sequence (rejected draft tokens) and feeding other tokens must give the logits
/// of the new sequence; where a sliding window already released what the cut needs, truncate
/// refuses and the caller starts over.
#[test]
fn truncate_then_continue_matches_reference() {
    for arch in [Arch::Llama, Arch::Gemma3] {
        let m = TinyModel::random(&Spec::tiny(arch), 10);
        let model = load(&m);
        let c = Compute::precise(Isa::detect(), 2);
        let mut rng = Rng::new(11);
        let first = rng.tokens(16, m.spec.n_vocab);
        for block_len in [1, 2, 4] {
            for cut in 1..=9 {
                let keep = first.len() - cut;
                let mut cache = new_cache(&model, 64, block_len);
                in_steps(&model, &c, &mut cache, 0, &first, 0, block_len);
                let held = match cache.truncate(0, keep) {
                    Ok(()) => keep,
                    Err(ModelError::Truncate { .. }) if arch == Arch::Gemma3 && cut > block_len => {
                        cache.free(0).unwrap();
                        assert_eq!(cache.alloc(), 0);
                        0
                    }
                    Err(e) => panic!("{} cut {cut}, blocks of {block_len}: {e}", arch.name()),
                };
                assert_eq!(cache.seq_len(0), held);
                // Continue with different tokens after the kept prefix.
                let mut tokens = first[..keep].to_vec();
                tokens.extend(rng.tokens(4, m.spec.n_vocab));
                let got = in_steps(&model, &c, &mut cache, 0, &tokens, held, block_len);
                let want = reference_logits(&m, &tokens, Flaw::None);
                let what = format!(
                    "{} blocks of {block_len}: cut {cut} of 16, kept {held}",
                    arch.name()
                );
                assert_close(&got, &want[held..], &what);
            }
        }
    }
}

/// Quantized weights: the reference uses the dequantized values the file holds, so the only
/// differences left are f32 rounding.
#[test]
fn quantized_weights_match_reference() {
    let ty_of = |name: &str| match name {
        "token_embd.weight" => GgmlType::Q8_0,
        "output.weight" => GgmlType::Q6_K,
        _ if name.ends_with("attn_q.weight") || name.ends_with("ffn_gate.weight") => GgmlType::Q4_K,
        _ if name.ends_with("attn_k.weight") => GgmlType::IQ4_XS,
        _ if name.ends_with("ffn_down.weight") => GgmlType::Q6_K,
        _ if name.ends_with("attn_v.weight") => GgmlType::F16,
        _ if name.ends_with("ffn_up.weight") => GgmlType::IQ4_NL,
        _ => GgmlType::Q8_0,
    };
    for arch in Arch::ALL {
        let m = TinyModel::random_typed(&Spec::k_quantizable(arch), 12, ty_of);
        assert_eq!(m.get("blk.1.ffn_down.weight").ty, GgmlType::Q6_K);
        let model = load(&m);
        let tokens = Rng::new(13).tokens(SEQ_LEN, m.spec.n_vocab);
        let want = reference_logits(&m, &tokens, Flaw::None);
        for c in computes() {
            let what = format!("quantized {} {}", arch.name(), c.isa());
            let got = one_batch(&model, &c, &mut new_cache(&model, 32, 16), &tokens);
            assert_close(&got, &want, &format!("{what}: one batch"));
            let mut cache = new_cache(&model, 32, 16);
            let mut got = in_steps(&model, &c, &mut cache, 0, &tokens[..5], 0, 5);
            got.extend(in_steps(&model, &c, &mut cache, 0, &tokens, 5, 1));
            assert_close(&got, &want, &format!("{what}: prefill then single tokens"));
        }
    }
}

/// Decoding at depth splits each token's keys into parts attended in parallel and merged: the
/// logits of single steps after 600 positions still match the reference, on every path.
#[test]
fn decoding_at_depth_matches_reference() {
    for arch in Arch::ALL {
        let m = TinyModel::random(&Spec::tiny(arch), 31);
        let model = load(&m);
        let tokens = Rng::new(7).tokens(600, m.spec.n_vocab);
        let want = reference_logits(&m, &tokens, Flaw::None);
        for c in computes() {
            let mut cache = new_cache(&model, 640, 16);
            in_steps(&model, &c, &mut cache, 0, &tokens[..590], 0, 590);
            let got = in_steps(&model, &c, &mut cache, 0, &tokens, 590, 1);
            let what = format!("{} {}: decoding after 590 positions", arch.name(), c.isa());
            assert_close(&got, &want[590..], &what);
        }
    }
}

/// Quantized caches stay near the reference, q8_0 nearer than q4_0; rotating keys or values
/// changes no result (f16 caches rotated or not agree to rounding); and heads that are not whole
/// blocks are refused by name.
#[test]
fn quantized_kv_caches_stay_near_reference() {
    for arch in Arch::ALL {
        let m = TinyModel::random(&Spec::k_quantizable(arch), 12);
        let model = load(&m);
        let tokens = Rng::new(13).tokens(SEQ_LEN, m.spec.n_vocab);
        let want = reference_logits(&m, &tokens, Flaw::None);
        for c in computes() {
            let err = |k: KvType, v: KvType, rotate: bool| {
                let types = KvTypes {
                    k,
                    v,
                    rotate_keys: rotate,
                    rotate_values: rotate,
                };
                let mut cache = KvCache::new(&model.hp, KvConfig::new(32, types)).unwrap();
                let seq = cache.alloc();
                let mut got = in_steps(&model, &c, &mut cache, seq, &tokens[..5], 0, 5);
                got.extend(in_steps(&model, &c, &mut cache, seq, &tokens, 5, 1));
                max_err(&got, &want)
            };
            let what = format!("{} {}", arch.name(), c.isa());
            let f16 = err(KvType::F16, KvType::F16, false);
            let f16_rotated = err(KvType::F16, KvType::F16, true);
            let q8 = err(KvType::Q8_0, KvType::Q8_0, false);
            let q8_rotated = err(KvType::Q8_0, KvType::Q8_0, true);
            let q4 = err(KvType::Q4_0, KvType::Q4_0, false);
            let q4_rotated = err(KvType::Q4_0, KvType::Q4_0, true);
            let mixed = err(KvType::Q8_0, KvType::Q4_0, true);
            eprintln!(
                "{what}: largest logit error, f16 {f16:.1e} (rotated {f16_rotated:.1e}), \
                 q8_0 {q8:.1e} ({q8_rotated:.1e}), q4_0 {q4:.1e} ({q4_rotated:.1e}), \
                 q8_0 keys with q4_0 values {mixed:.1e}"
            );
            // A rotation of keys without queries, or of values without turning the output back,
            // would move logits by units.
            assert!(
                f16 < 3e-3 && f16_rotated < 3e-3,
                "{what}: f16 {f16} / {f16_rotated}"
            );
            assert!(
                q8 < 0.1 && q8_rotated < 0.1,
                "{what}: q8_0 {q8} / {q8_rotated}"
            );
            assert!(
                q4 < 1.5 && q4_rotated < 1.5 && mixed < 1.5,
                "{what}: q4_0 {q4}"
            );
            assert!(
                q8 < q4 && q8_rotated < q4_rotated,
                "{what}: q8_0 above q4_0"
            );
        }
        let e = KvCache::new(
            &load(&TinyModel::random(&Spec::tiny(arch), 12)).hp,
            KvConfig::new(32, KvType::Q8_0),
        )
        .unwrap_err();
        assert!(e.to_string().contains("blocks of 32"), "{e}");
    }
}

/// Context shift on one-layer models (whose keys depend only on their token and position, so a
/// shifted cache is what a fresh run over the kept tokens makes): teacher-forced logits after the
/// shift equal the fresh run's, for exact, f16 and quantized rotated caches.
#[test]
fn context_shift_equals_a_fresh_run_over_the_kept_tokens() {
    let (keep, discard, held, next) = (3, 8, 24, 6);
    for arch in Arch::ALL {
        for (spec, types, tol) in [
            (Spec::tiny(arch), KvTypes::from(KvType::F32), 1e-4),
            (
                Spec::k_quantizable(arch),
                KvTypes {
                    k: KvType::F16,
                    v: KvType::F16,
                    rotate_keys: true,
                    rotate_values: true,
                },
                5e-3,
            ),
            (Spec::k_quantizable(arch), KvType::Q8_0.into(), 0.1),
        ] {
            let m = TinyModel::random(&Spec { n_layer: 1, ..spec }, 21);
            let model = load(&m);
            let c = Compute::precise(Isa::detect(), 2);
            let tokens = Rng::new(5).tokens(held + next, m.spec.n_vocab);
            // With the prefix cache on and a fork sharing every block: the shift copies what
            // the fork holds and unindexes the rest, and the fork goes on untouched.
            let cfg = KvConfig {
                block_len: 4,
                max_seqs: 2,
                prefix_cache: true,
                ..KvConfig::new(32, types)
            };
            let mut cache = KvCache::new(&model.hp, cfg.clone()).unwrap();
            let seq = cache.alloc();
            in_steps(&model, &c, &mut cache, seq, &tokens[..held], 0, 5);
            let fork = cache.fork(seq).unwrap();
            model.shift_context(&mut cache, seq, keep, discard).unwrap();
            let kept: Vec<u32> = [&tokens[..keep], &tokens[keep + discard..]].concat();
            assert_eq!(cache.tokens(seq), &kept[..held - discard]);
            let got = in_steps(&model, &c, &mut cache, seq, &kept, held - discard, 1);
            let forked = in_steps(&model, &c, &mut cache, fork, &tokens[..held + 2], held, 1);
            let mut plain = KvCache::new(&model.hp, cfg.clone()).unwrap();
            let p = plain.alloc();
            // The prompt as the fork's was, then its two tokens one at a time as it decoded them
            // (block and single-token attention round differently).
            in_steps(&model, &c, &mut plain, p, &tokens[..held], 0, 5);
            let unshifted = in_steps(&model, &c, &mut plain, p, &tokens[..held + 2], held, 1);
            assert_eq!(forked, unshifted, "{}: the fork changed", arch.name());

            let mut fresh = KvCache::new(&model.hp, cfg).unwrap();
            let f = fresh.alloc();
            let want = in_steps(&model, &c, &mut fresh, f, &kept, 0, 4);
            let want: Vec<Vec<f64>> = want[held - discard..]
                .iter()
                .map(|r| r.iter().map(|&x| x as f64).collect())
                .collect();
            let err = max_err(&got, &want);
            assert!(
                err <= tol,
                "{} {types}: shifted logits off by {err:.2e}",
                arch.name()
            );
        }
    }
}

/// A shift whose window already released keys it would read is refused, changing nothing.
#[test]
fn context_shift_refuses_what_a_window_released() {
    let m = TinyModel::random(&Spec::tiny(Arch::Gemma3), 3);
    let model = load(&m);
    let c = Compute::precise(Isa::detect(), 2);
    let tokens = Rng::new(5).tokens(28, m.spec.n_vocab);
    let cfg = KvConfig {
        block_len: 4,
        ..KvConfig::new(32, KvType::F32)
    };
    let mut cache = KvCache::new(&model.hp, cfg).unwrap();
    let seq = cache.alloc();
    in_steps(&model, &c, &mut cache, seq, &tokens, 0, 4);
    let before = cache.stats();
    // Keeping 13 of 16 needs position 12 beside the moved ones, and the window (5) let it go.
    let e = model.shift_context(&mut cache, seq, 13, 12).unwrap_err();
    assert!(e.to_string().contains("sliding window"), "{e}");
    let e = model.shift_context(&mut cache, seq, 4, 6).unwrap_err();
    assert!(e.to_string().contains("whole blocks"), "{e}");
    assert_eq!((cache.stats(), cache.tokens(seq)), (before, &tokens[..]));
    // Keeping 12 (a block boundary) needs nothing released.
    model.shift_context(&mut cache, seq, 12, 12).unwrap();
    assert_eq!(cache.seq_len(seq), 16);
    let kept = [&tokens[..12], &tokens[24..]].concat();
    assert_eq!(cache.tokens(seq), &kept[..]);
}

// ---------------------------------------------------------------------------------------------
// Errors: each names what is wrong.

#[test]
fn unknown_architecture_lists_supported_ones() {
    let mut m = TinyModel::random(&Spec::tiny(Arch::Llama), 1);
    m.set_meta("general.architecture", Value::String("mamba".into()));
    let e = load_err(&m);
    assert!(
        matches!(&e, ModelError::UnknownArchitecture(a) if a == "mamba"),
        "{e:?}"
    );
    let msg = e.to_string();
    for name in ["mamba", "llama", "qwen2", "gemma3"] {
        assert!(msg.contains(name), "{msg:?} should name {name}");
    }
}

#[test]
fn missing_metadata_key_is_named() {
    let mut m = TinyModel::random(&Spec::tiny(Arch::Qwen2), 1);
    m.remove_meta("qwen2.embedding_length");
    let e = load_err(&m);
    assert!(
        matches!(&e, ModelError::Metadata { key, .. } if key == "qwen2.embedding_length"),
        "{e:?}"
    );
    assert!(e.to_string().contains("qwen2.embedding_length"), "{e}");
}

#[test]
fn missing_tensor_is_named() {
    for (arch, name) in [
        (Arch::Llama, "blk.1.ffn_up.weight"),
        (Arch::Llama, "output_norm.weight"),
        (Arch::Qwen2, "token_embd.weight"),
        (Arch::Gemma3, "blk.5.attn_k_norm.weight"),
        (Arch::Gemma3, "blk.0.post_ffw_norm.weight"),
    ] {
        let mut m = TinyModel::random(&Spec::tiny(arch), 1);
        m.remove_tensor(name);
        let e = load_err(&m);
        assert!(
            matches!(&e, ModelError::MissingTensor(t, a) if t == name && a == arch.name()),
            "{e:?}"
        );
        assert!(e.to_string().contains(name), "{e}");
    }
}

#[test]
fn wrong_tensor_shape_is_named() {
    // Llama tiny: d 32, 4 heads × 8, 2 kv heads, ffn 64, vocab 64.
    for (name, dims) in [
        ("blk.0.attn_k.weight", vec![24, 16]), // rows of 24, not n_embd
        ("blk.1.attn_k.weight", vec![32, 12]), // 12 outputs: not whole heads of 8
        ("blk.0.attn_v.weight", vec![32, 8]),  // fewer values than keys
        ("blk.1.ffn_down.weight", vec![64, 40]), // 40 outputs, not n_embd
        ("blk.0.ffn_up.weight", vec![32, 48]), // not the gate's width
        ("blk.0.attn_norm.weight", vec![31]),  // norm of the wrong length
        ("token_embd.weight", vec![16, 64]),   // rows of 16, not n_embd
        ("blk.0.attn_output.weight", vec![32, 16, 2]), // not a matrix
    ] {
        let mut m = TinyModel::random(&Spec::tiny(Arch::Llama), 1);
        m.reshape_tensor(name, &dims);
        let e = load_err(&m);
        assert!(
            matches!(&e, ModelError::Shape { name: n, .. } if n == name),
            "{name} {dims:?}: {e:?}"
        );
        assert!(e.to_string().contains(name), "{e}");
    }
    // An output head whose rows are not the vocabulary.
    let mut m = TinyModel::random(&Spec::tiny(Arch::Qwen2), 1);
    m.reshape_tensor("output.weight", &[64, 95]);
    let e = load_err(&m);
    assert!(
        matches!(&e, ModelError::Shape { name, .. } if name == "output.weight"),
        "{e:?}"
    );
}

/// A rotation wider than the heads (or odd) is refused at load, not met as a panic mid-forward.
#[test]
fn rope_wider_than_the_heads_is_refused() {
    for (arch, n_rot) in [(Arch::Llama, 16), (Arch::Qwen2, 32), (Arch::Llama, 7)] {
        let mut m = TinyModel::random(&Spec::tiny(arch), 1);
        m.set_meta(
            &format!("{}.rope.dimension_count", arch.name()),
            Value::U32(n_rot),
        );
        let e = load_err(&m);
        assert!(
            matches!(&e, ModelError::Metadata { key, .. } if key.ends_with("rope.dimension_count")),
            "{e:?}"
        );
        assert!(e.to_string().contains("do not fit heads"), "{e}");
    }
}

#[test]
fn token_outside_vocabulary_is_rejected() {
    let m = TinyModel::random(&Spec::tiny(Arch::Llama), 1);
    let model = load(&m);
    let c = Compute::precise(Isa::detect(), 1);
    let mut cache = new_cache(&model, 32, 16);
    let bad = m.spec.n_vocab as u32;
    let e = model
        .forward(
            &c,
            &Batch::from_tokens(&[1, bad, 2], 0, 0, true),
            &mut cache,
            &mut Scratch::default(),
        )
        .unwrap_err();
    assert!(
        matches!(&e, ModelError::Batch(msg) if msg.contains(&bad.to_string()) && msg.contains("vocabulary")),
        "{e:?}"
    );
    assert_eq!(
        cache.seq_len(0),
        0,
        "a rejected batch must leave the cache alone"
    );
}

#[test]
fn positions_must_continue_the_cache() {
    let m = TinyModel::random(&Spec::tiny(Arch::Qwen2), 1);
    let model = load(&m);
    let c = Compute::precise(Isa::detect(), 1);
    let tokens = Rng::new(2).tokens(8, m.spec.n_vocab);
    let mut cache = new_cache(&model, 32, 16);
    model
        .forward(
            &c,
            &Batch::from_tokens(&tokens[..5], 0, 0, true),
            &mut cache,
            &mut Scratch::default(),
        )
        .unwrap();

    // A gap after the cached prefix, and a repeat of a cached position.
    for start in [7, 4] {
        let e = model
            .forward(
                &c,
                &Batch::from_tokens(&tokens[5..6], start, 0, true),
                &mut cache,
                &mut Scratch::default(),
            )
            .unwrap_err();
        let ok = matches!(&e, ModelError::Batch(msg) if msg.contains("position 5") && msg.contains(&format!("not {start}")));
        assert!(ok, "{e:?}");
    }
    // A gap inside the batch.
    let mut batch = Batch::new();
    batch.push(tokens[5], 5, 0, true);
    batch.push(tokens[6], 7, 0, true);
    let e = model
        .forward(&c, &batch, &mut cache, &mut Scratch::default())
        .unwrap_err();
    assert!(
        matches!(&e, ModelError::Batch(msg) if msg.contains("position 7")),
        "{e:?}"
    );
    // A new sequence must start at 0.
    let e = model
        .forward(
            &c,
            &Batch::from_tokens(&tokens[..1], 3, 1, true),
            &mut cache,
            &mut Scratch::default(),
        )
        .unwrap_err();
    assert!(
        matches!(&e, ModelError::Batch(msg) if msg.contains("sequence 1")),
        "{e:?}"
    );

    // The errors left the cache as it was: continuing gives the reference logits.
    assert_eq!(cache.seq_len(0), 5);
    let got = in_steps(&model, &c, &mut cache, 0, &tokens, 5, 1);
    assert_close(
        &got,
        &reference_logits(&m, &tokens, Flaw::None)[5..],
        "after rejected batches",
    );
}

#[test]
fn full_context_is_reported() {
    let m = TinyModel::random(&Spec::tiny(Arch::Gemma3), 1);
    let model = load(&m);
    let c = Compute::precise(Isa::detect(), 1);
    let tokens = Rng::new(3).tokens(9, m.spec.n_vocab);

    let mut cache = new_cache(&model, 8, 16);
    let e = model
        .forward(
            &c,
            &Batch::from_tokens(&tokens, 0, 0, true),
            &mut cache,
            &mut Scratch::default(),
        )
        .unwrap_err();
    assert!(
        matches!(
            e,
            ModelError::ContextFull {
                seq: 0,
                needed: 9,
                n_ctx: 8
            }
        ),
        "{e:?}"
    );

    // Filling the context exactly works; one more token does not.
    in_steps(&model, &c, &mut cache, 0, &tokens[..8], 0, 3);
    let e = model
        .forward(
            &c,
            &Batch::from_tokens(&tokens[8..], 8, 0, true),
            &mut cache,
            &mut Scratch::default(),
        )
        .unwrap_err();
    assert!(
        matches!(
            e,
            ModelError::ContextFull {
                seq: 0,
                needed: 9,
                n_ctx: 8
            }
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("context full"), "{e}");
    assert_eq!(cache.seq_len(0), 8);
}

/// A sequence saved (`save_state`) and restored into another cache continues with the logits
/// the original would give — sliding windows included, in both KV types — and a state that is
/// cut short, altered in length, or of another KV type or block length is refused, leaving the
/// cache as it was.
#[test]
fn saved_state_restores_and_bad_states_are_refused() {
    for arch in [Arch::Qwen2, Arch::Gemma3] {
        // Quantized caches need heads of whole 32-value blocks.
        let quantized = KvTypes::new(KvType::Q8_0, KvType::Q4_0);
        for (spec, types) in [
            (Spec::tiny(arch), KvType::F32.into()),
            (Spec::tiny(arch), KvType::F16.into()),
            (Spec::k_quantizable(arch), quantized),
        ] {
            let m = TinyModel::random(&spec, 12);
            let model = load(&m);
            let c = Compute::precise(Isa::detect(), 2);
            let tokens = Rng::new(13).tokens(4 * SEQ_LEN, m.spec.n_vocab);
            let split = 3 * SEQ_LEN + 1;
            let cfg = KvConfig {
                block_len: 4,
                max_seqs: 2,
                ..KvConfig::new(64, types)
            };
            let mut original = KvCache::new(&model.hp, cfg.clone()).unwrap();
            let seq = original.alloc();
            in_steps(&model, &c, &mut original, seq, &tokens[..split], 0, 5);
            let state = original.save_state(seq).unwrap();
            let want = in_steps(&model, &c, &mut original, seq, &tokens, split, 3);

            let mut restored = KvCache::new(&model.hp, cfg.clone()).unwrap();
            let before = restored.stats();
            let what = format!("{} {types}", arch.name());
            for bad in [
                &state[..state.len() - 1],
                &state[..state.len() / 2],
                &[state.as_slice(), &[0u8]].concat()[..],
                &state[..3],
            ] {
                let e = restored.load_state(bad).expect_err("a damaged state loads");
                assert!(matches!(e, ModelError::KvState(_)), "{what}: {e}");
                assert_eq!(
                    restored.stats(),
                    before,
                    "{what}: a refused state changed the cache"
                );
            }
            let others = [
                KvTypes::from(if types.k == KvType::F32 {
                    KvType::F16
                } else {
                    KvType::F32
                }),
                KvTypes {
                    rotate_values: !types.rotate_values,
                    ..types
                },
            ];
            for other in others {
                let other_cfg = KvConfig {
                    types: other,
                    ..cfg.clone()
                };
                let e = KvCache::new(&model.hp, other_cfg)
                    .unwrap()
                    .load_state(&state)
                    .unwrap_err();
                assert!(e.to_string().contains("KV cache"), "{what} vs {other}: {e}");
            }
            let blocks = KvConfig {
                block_len: 8,
                ..cfg.clone()
            };
            let e = KvCache::new(&model.hp, blocks)
                .unwrap()
                .load_state(&state)
                .unwrap_err();
            assert!(e.to_string().contains("blocks of 4"), "{what}: {e}");

            let seq = restored.load_state(&state).unwrap();
            assert_eq!(restored.tokens(seq), &tokens[..split], "{what}");
            let got = in_steps(&model, &c, &mut restored, seq, &tokens, split, 3);
            assert_eq!(got, want, "{what}: restored logits differ");
        }
    }
}

/// A sequence's logits are bit for bit the same whether its prompt is prefilled alone in one
/// chunk or in uneven chunks beside another sequence's prompt and decoding, and its decoding
/// alone or beside another's — past 512 positions too, where a lone token's keys are split
/// into parts. (What `edgelm serve` promises: a greedy answer does not depend on the load.)
#[test]
fn a_sequence_computes_the_same_alone_or_batched() {
    for arch in Arch::ALL {
        let m = TinyModel::random(&Spec::tiny(arch), 31);
        let model = load(&m);
        let mut rng = Rng::new(9);
        let (a, b) = (
            rng.tokens(700, m.spec.n_vocab),
            rng.tokens(300, m.spec.n_vocab),
        );
        for c in computes() {
            for ty in [KvType::F32, KvType::F16] {
                let new_cache = || {
                    let cfg = KvConfig {
                        block_len: 16,
                        max_seqs: 2,
                        ..KvConfig::new(1024, ty)
                    };
                    let mut cache = KvCache::new(&model.hp, cfg).unwrap();
                    assert_eq!((cache.alloc(), cache.alloc()), (0, 1));
                    cache
                };
                let mut scratch = Scratch::default();
                // Every row of sequence 0 that `batch` computes, in order.
                let mut step = |cache: &mut KvCache, batch: &Batch| -> Vec<Vec<f32>> {
                    let logits = model.forward(&c, batch, cache, &mut scratch).unwrap();
                    (0..logits.n_rows())
                        .filter(|&i| batch.seqs[logits.batch_index[i]] == 0)
                        .map(|i| logits.row(i).to_vec())
                        .collect()
                };
                let mut cache = new_cache();
                let mut alone = step(&mut cache, &Batch::from_tokens(&a[..696], 0, 0, true));
                for i in 696..700 {
                    alone.extend(step(&mut cache, &Batch::from_tokens(&a[i..=i], i, 0, true)));
                }

                let mut cache = new_cache();
                step(&mut cache, &Batch::from_tokens(&b[..250], 0, 1, false));
                let mut beside = Vec::new();
                let cuts = [0, 37, 300, 302, 696, 697, 698, 699, 700];
                for (k, w) in cuts.windows(2).enumerate() {
                    let mut batch = Batch::new();
                    batch.push(b[250 + k], 250 + k, 1, true);
                    for i in w[0]..w[1] {
                        batch.push(a[i], i, 0, true);
                    }
                    beside.extend(step(&mut cache, &batch));
                }
                assert!(
                    alone == beside,
                    "{} {} {ty:?}: sequence 0 computed differently beside sequence 1",
                    arch.name(),
                    c.isa()
                );
            }
        }
    }
}

/// The forward context's observer sees every projection's input once per forward: each of the
/// seven matrices of every layer and the output head, by tensor name, with its width and the
/// batch's rows (only the rows that want logits for the head), and the values it is multiplied
/// by; and the residual stream entering each block and leaving the last, in order; the logits
/// are the same as without an observer.
#[test]
fn an_observer_sees_every_projection_input() {
    use edgelm_models::{Forward, Observer};
    use std::sync::Mutex;
    #[derive(Default)]
    struct Seen(
        Mutex<Vec<(String, usize, usize, f32)>>,
        Mutex<Vec<(usize, Vec<f32>)>>,
    );
    impl Observer for Seen {
        fn linear_input(&self, weight: &str, x: &[f32], cols: usize, rows: usize) {
            assert_eq!(x.len(), cols * rows, "{weight}");
            let sq = x.iter().map(|v| v * v).sum();
            self.0.lock().unwrap().push((weight.into(), cols, rows, sq));
        }
        fn residual(&self, layer: usize, x: &[f32], cols: usize, rows: usize) {
            assert_eq!(x.len(), cols * rows, "layer {layer}");
            self.1.lock().unwrap().push((layer, x.to_vec()));
        }
    }
    for arch in [Arch::Llama, Arch::Qwen2, Arch::Gemma3] {
        let spec = Spec::tiny(arch);
        let m = TinyModel::random(&spec, 11 + arch as u64);
        let model = load(&m);
        let tokens = Rng::new(3).tokens(SEQ_LEN, spec.n_vocab);
        let c = Compute::precise(Isa::Scalar, 1);
        let mut batch = Batch::new();
        for (i, &t) in tokens.iter().enumerate() {
            batch.push(t, i, 0, i >= SEQ_LEN - 3);
        }
        let seen = Seen::default();
        let f = Forward {
            compute: &c,
            observer: Some(&seen),
        };
        let mut observed = edgelm_models::Logits::default();
        let mut cache = new_cache(&model, 32, 16);
        model
            .forward_with(
                f,
                &batch,
                &mut cache,
                &mut Scratch::default(),
                &mut observed,
            )
            .unwrap();
        let plain = model
            .forward(
                &c,
                &batch,
                &mut new_cache(&model, 32, 16),
                &mut Scratch::default(),
            )
            .unwrap();
        assert_eq!(observed.data, plain.data, "{}", arch.name());
        let n_layer = model.hp.layers.len();
        // The stream entering block 0 is the embedding (scaled by √d in Gemma); each later one
        // differs from the one before.
        let residuals = seen.1.into_inner().unwrap();
        let layers: Vec<usize> = residuals.iter().map(|r| r.0).collect();
        assert_eq!(layers, (0..=n_layer).collect::<Vec<_>>(), "{}", arch.name());
        let scale = if arch == Arch::Gemma3 {
            (spec.n_embd as f32).sqrt()
        } else {
            1.0
        };
        let embd = &m.get("token_embd.weight").values;
        let first = tokens[0] as usize * spec.n_embd;
        for (got, want) in residuals[0].1[..spec.n_embd].iter().zip(&embd[first..]) {
            assert!(
                (got - want * scale).abs() < 1e-5,
                "{}: block 0 input",
                arch.name()
            );
        }
        assert!(residuals.windows(2).all(|w| w[0].1 != w[1].1));
        let seen = seen.0.into_inner().unwrap();
        assert_eq!(seen.len(), 7 * n_layer + 1, "{}", arch.name());
        for l in 0..n_layer {
            for (name, cols) in [
                ("attn_q", model.hp.n_embd),
                ("attn_k", model.hp.n_embd),
                ("attn_v", model.hp.n_embd),
                ("ffn_gate", model.hp.n_embd),
                ("ffn_up", model.hp.n_embd),
                ("ffn_down", model.hp.layers[l].n_ff),
            ] {
                let name = format!("blk.{l}.{name}.weight");
                let hit = seen.iter().find(|s| s.0 == name).expect(&name);
                assert_eq!((hit.1, hit.2), (cols, SEQ_LEN), "{name}");
                assert!(hit.3 > 0.0, "{name}: an all-zero input");
            }
            assert!(seen
                .iter()
                .any(|s| s.0 == format!("blk.{l}.attn_output.weight")));
        }
        let head = seen.last().unwrap();
        assert!(head.0 == "output.weight" || head.0 == "token_embd.weight");
        assert_eq!((head.1, head.2), (model.hp.n_embd, 3), "{}", arch.name());
    }
}

/// The repack cache: a fast-path load writes it beside the model, later loads map it instead of
/// repacking, and the logits are the same bit for bit as repacking in memory. A damaged cache,
/// one for another model, and one that cannot be written are handled without a wrong result:
/// rewritten, rewritten, and left to the in-memory path.
#[test]
fn repacked_weights_are_cached_beside_the_model() {
    use edgelm_gguf::GgufFile;
    use edgelm_models::repack_cache::{attach, cache_path, RepackCache};
    use std::sync::Arc;
    let dir = std::env::temp_dir().join(format!("edgelm-repack-cache-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tiny.gguf");
    let cache = cache_path(&path);
    let tokens = Rng::new(4).tokens(SEQ_LEN, 64);
    let model_of =
        |seed| TinyModel::random_typed(&Spec::tiny(Arch::Llama), seed, |_| GgmlType::Q4_0);
    let mut exercised = false;
    for isa in Isa::available() {
        let c = Compute::with_precision(isa, 2, edgelm_kernels::Precision::Fast);
        let logits = |model: &Model| one_batch(model, &c, &mut new_cache(model, 64, 16), &tokens);
        let open = || edgelm_models::load(Arc::new(GgufFile::open(&path).unwrap())).unwrap();
        for seed in [1, 2] {
            std::fs::write(&path, model_of(seed).to_bytes()).unwrap();
            let in_memory = logits(&open());
            let model = open();
            let status = attach(&model, &path, &c);
            if !c.wants_interleaved(GgmlType::Q4_0) {
                assert_eq!(status, RepackCache::NotNeeded, "{isa}");
                assert!(!cache.exists(), "{isa}: a cache nobody needs");
                continue;
            }
            // Seed 2 finds seed 1's cache, made for other bytes.
            assert!(
                matches!(status, RepackCache::Written { .. }),
                "{isa} {seed}: {status:?}"
            );
            assert_eq!(logits(&model), in_memory, "{isa} {seed}: written");
            let model = open();
            let status = attach(&model, &path, &c);
            assert!(
                matches!(status, RepackCache::Mapped { .. }),
                "{isa} {seed}: {status:?}"
            );
            assert_eq!(logits(&model), in_memory, "{isa} {seed}: mapped");
        }
        if !cache.exists() {
            continue;
        }
        exercised = true;
        let in_memory = logits(&open());
        // A flipped byte in the fingerprint: rewritten.
        let mut bytes = std::fs::read(&cache).unwrap();
        bytes[20] ^= 1;
        std::fs::write(&cache, &bytes).unwrap();
        let model = open();
        let status = attach(&model, &path, &c);
        assert!(
            matches!(status, RepackCache::Written { .. }),
            "{isa}: {status:?}"
        );
        assert_eq!(logits(&model), in_memory, "{isa}: rewritten");
        // A truncated cache: rewritten.
        std::fs::write(&cache, &bytes[..bytes.len() / 2]).unwrap();
        let status = attach(&open(), &path, &c);
        assert!(
            matches!(status, RepackCache::Written { .. }),
            "{isa}: {status:?}"
        );
        // Nowhere to write (a directory in the way): the in-memory path, no temporary file left.
        std::fs::remove_file(&cache).unwrap();
        std::fs::create_dir_all(cache.join("blocker")).unwrap();
        let model = open();
        let status = attach(&model, &path, &c);
        assert!(
            matches!(status, RepackCache::Unavailable { .. }),
            "{isa}: {status:?}"
        );
        assert_eq!(logits(&model), in_memory, "{isa}: unavailable");
        std::fs::remove_dir_all(&cache).unwrap();
        let left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, [std::ffi::OsString::from("tiny.gguf")], "{isa}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
    if !exercised {
        eprintln!("skipping the cache itself: no ISA of this CPU repacks Q4_0");
    }
}
