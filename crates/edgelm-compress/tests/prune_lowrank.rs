//! Pruned and factored tiny models run and compute what their weights say: structured pruning
//! equals zeroing what it removed in the unpruned model (checked against the independent f64
//! reference of `edgelm-models`' tests), unstructured pruning zeroes exactly the lowest scores
//! and the result matches the reference on its weights, and a factored model equals the
//! reference with each matrix replaced by the product of its factors.

#[path = "../../edgelm-models/tests/common/mod.rs"]
mod common;

use common::{reference_logits, Arch, Flaw, Rng, Spec, Tensor, TinyModel};
use edgelm_compress::imatrix::{Entry, Imatrix};
use edgelm_compress::lowrank::{self, LowRankOptions, RankChoice, Whitening};
use edgelm_compress::prune::{self, Method, PruneOptions, Unstructured};
use edgelm_compress::CompressError;
use edgelm_gguf::{GgmlType, GgufFile};
use edgelm_kernels::{Compute, Isa};
use edgelm_models::{Batch, KvCache, KvConfig, KvType, Scratch};
use std::path::{Path, PathBuf};

/// Relative tolerance on logits (f32 forward against the f64 reference).
const TOL: f64 = 1e-4;
const SEQ: usize = 10;

fn out_path(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("edgelm-prune-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir.join(name)
}

fn open(path: &Path) -> GgufFile {
    GgufFile::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Logits of every position through edgelm, once per instruction set this CPU runs.
fn edgelm_logits(path: &Path, tokens: &[u32]) -> Vec<Vec<Vec<f32>>> {
    let file = std::sync::Arc::new(open(path));
    let model = edgelm_models::load(file).expect("the output loads");
    Isa::available()
        .into_iter()
        .map(|isa| {
            let c = Compute::precise(isa, 2);
            let mut cache = KvCache::new(&model.hp, KvConfig::new(64, KvType::F32)).expect("cache");
            cache.alloc();
            let batch = Batch::from_tokens(tokens, 0, 0, true);
            let logits = model
                .forward(&c, &batch, &mut cache, &mut Scratch::default())
                .expect("forward");
            (0..tokens.len()).map(|i| logits.row(i).to_vec()).collect()
        })
        .collect()
}

#[track_caller]
fn assert_close(got: &[Vec<Vec<f32>>], want: &[Vec<f64>], what: &str) {
    for per_isa in got {
        assert_eq!(per_isa.len(), want.len());
        let mut worst = 0f64;
        for (g, w) in per_isa.iter().zip(want) {
            assert_eq!(g.len(), w.len(), "{what}: vocabulary");
            for (&g, &w) in g.iter().zip(w) {
                worst = worst.max((g as f64 - w).abs() / w.abs().max(1.0));
            }
        }
        assert!(worst <= TOL, "{what}: logits differ by {worst:.3e}");
    }
}

/// The values of a tensor of `f`, row-major.
fn values(f: &GgufFile, name: &str) -> Vec<f32> {
    let t = f.tensor(name).unwrap_or_else(|| panic!("no tensor {name}"));
    let n: u64 = t.dims().iter().product();
    let mut out = vec![0f32; n as usize];
    edgelm_quant::dequantize_row(t.ty(), t.data, &mut out).expect("dequantize");
    out
}

/// Which rows of `original` (row length `cols`) the rows of `kept` are, in order.
fn rows_kept(original: &[f32], kept: &[f32], cols: usize) -> Vec<usize> {
    kept.chunks(cols)
        .map(|row| {
            original
                .chunks(cols)
                .position(|o| o == row)
                .expect("a kept row is a copy of an original row")
        })
        .collect()
}

fn set_values(m: &mut TinyModel, name: &str, f: impl Fn(usize, usize, &mut f32)) {
    let t = m
        .tensors
        .iter_mut()
        .find(|t| t.name == name)
        .expect("tensor");
    let cols = t.dims[0] as usize;
    let mut v = t.values.clone();
    for (i, x) in v.iter_mut().enumerate() {
        f(i / cols, i % cols, x);
    }
    *t = Tensor::new(name, &t.dims.clone(), GgmlType::F32, v);
}

/// An importance matrix with random positive entries for every projection of `m`.
fn random_imatrix(m: &TinyModel, seed: u64) -> Imatrix {
    let mut rng = Rng::new(seed);
    let mut im = Imatrix::default();
    for t in m
        .tensors
        .iter()
        .filter(|t| t.dims.len() == 2 && t.name.starts_with("blk."))
    {
        let cols = t.dims[0] as usize;
        let sums = (0..cols)
            .map(|_| 0.05 + 4.0 * rng.uniform().abs())
            .collect();
        im.entries.insert(
            t.name.clone(),
            Entry {
                sums,
                counts: vec![1.0],
                input_sums: Vec::new(),
            },
        );
    }
    im
}

/// Prunes `m` with `opts`, then checks edgelm on the output against the reference on the
/// original with the removed neurons, heads and blocks zeroed out.
fn check_structured(m: &TinyModel, opts: &PruneOptions, file: &str) {
    let s = &m.spec;
    let path = out_path(file);
    let summary = prune::prune(&m.to_gguf(), &path, opts, &mut |_, _, _| true).expect("prune");
    let out = open(&path);
    let kept_layers: Vec<usize> = (0..s.n_layer)
        .filter(|l| !opts.drop_layers.contains(l))
        .collect();
    assert_eq!(summary.layers, (s.n_layer, kept_layers.len()));
    assert_eq!(
        out.get_u64(&format!("{}.block_count", s.arch.name())),
        Some(kept_layers.len() as u64)
    );

    let mut zeroed = m.clone();
    let hd = s.head_dim;
    for l in 0..s.n_layer {
        let p = |n: &str| format!("blk.{l}.{n}.weight");
        let Some(new) = kept_layers.iter().position(|&k| k == l) else {
            // A dropped block adds nothing to the residual stream.
            set_values(&mut zeroed, &p("attn_output"), |_, _, x| *x = 0.0);
            set_values(&mut zeroed, &p("ffn_down"), |_, _, x| *x = 0.0);
            continue;
        };
        let q = |n: &str| format!("blk.{new}.{n}.weight");
        let neurons = rows_kept(
            &m.get(&p("ffn_gate")).values,
            &values(&out, &q("ffn_gate")),
            s.n_embd,
        );
        if let Some(f) = opts.ffn_keep {
            assert_eq!(
                neurons.len(),
                (f * s.n_ff as f64).round() as usize,
                "layer {l} FFN width"
            );
        }
        set_values(&mut zeroed, &p("ffn_down"), |_, c, x| {
            if !neurons.contains(&c) {
                *x = 0.0
            }
        });
        let heads = rows_kept(
            &m.get(&p("attn_q")).values,
            &values(&out, &q("attn_q")),
            s.n_embd * hd,
        );
        if let Some(h) = opts.heads_keep {
            assert_eq!(heads.len(), h, "layer {l} heads");
        }
        set_values(&mut zeroed, &p("attn_output"), |_, c, x| {
            if !heads.contains(&(c / hd)) {
                *x = 0.0
            }
        });
    }
    let tokens = Rng::new(5).tokens(SEQ, s.n_vocab);
    let want = reference_logits(&zeroed, &tokens, Flaw::None);
    assert_close(
        &edgelm_logits(&path, &tokens),
        &want,
        &format!("{} {file}", s.arch.name()),
    );
    // And the pruning did change the model: the comparison would catch a no-op.
    let before = reference_logits(m, &tokens, Flaw::None);
    let moved = before
        .iter()
        .flatten()
        .zip(want.iter().flatten())
        .any(|(a, b)| (a - b).abs() > 1e-2);
    assert!(moved, "{file}: pruning changed nothing");
}

#[test]
fn structured_pruning_equals_zeroing_what_it_removed() {
    for arch in Arch::ALL {
        let mut m = TinyModel::random(&Spec::tiny(arch), 10 + arch as u64);
        // As in the shipped Qwen file: the rotation covers the head, unstated; once heads are
        // removed it must not be taken from embedding ÷ heads.
        m.remove_meta(&format!("{}.rope.dimension_count", arch.name()));
        // Gemma: dropping layer 1 moves the global layer 5 to index 4; it must stay global.
        let drop = if arch == Arch::Gemma3 {
            vec![1]
        } else {
            vec![0]
        };
        let im = random_imatrix(&m, 3);
        let opts = PruneOptions {
            imatrix: Some(&im),
            ffn_keep: Some(0.5),
            heads_keep: Some(2), // one of the two key/value groups
            drop_layers: drop,
            threads: 2,
            ..Default::default()
        };
        check_structured(&m, &opts, &format!("structured-{}.gguf", arch.name()));
        // Blocks dropped alone need no importance matrix.
        let opts = PruneOptions {
            drop_layers: vec![1],
            threads: 1,
            ..Default::default()
        };
        check_structured(&m, &opts, &format!("drop-{}.gguf", arch.name()));
    }
    // Heads taken from within each group when whole groups cannot make the count: 4 query
    // heads over one key/value head, keep 2.
    let spec = Spec {
        n_head_kv: 1,
        ..Spec::tiny(Arch::Llama)
    };
    let m = TinyModel::random(&spec, 21);
    let im = random_imatrix(&m, 5);
    let opts = PruneOptions {
        imatrix: Some(&im),
        heads_keep: Some(2),
        threads: 2,
        ..Default::default()
    };
    check_structured(&m, &opts, "heads-in-group.gguf");
}

#[test]
fn a_pruned_model_loads_its_new_shapes_from_metadata() {
    let m = TinyModel::random(&Spec::tiny(Arch::Qwen2), 31);
    let path = out_path("meta.gguf");
    let im = random_imatrix(&m, 7);
    let opts = PruneOptions {
        imatrix: Some(&im),
        ffn_keep: Some(0.5),
        heads_keep: Some(2),
        threads: 1,
        ..Default::default()
    };
    let s = prune::prune(&m.to_gguf(), &path, &opts, &mut |_, _, _| true).expect("prune");
    let f = open(&path);
    assert_eq!(f.get_u64("qwen2.feed_forward_length"), Some(32));
    assert_eq!(f.get_u64("qwen2.attention.head_count"), Some(2));
    assert_eq!(f.get_u64("qwen2.attention.head_count_kv"), Some(1));
    assert_eq!(f.get_u64("qwen2.attention.key_length"), Some(16));
    assert_eq!(s.n_ff, (64, 32));
    assert_eq!(s.heads, ((4, 2), (2, 1)));
    assert!(s.read_per_token_out < s.read_per_token_in);
    // Biases follow their rows.
    assert_eq!(
        f.tensor_info("blk.0.attn_q.bias").map(|t| t.dims.clone()),
        Some(vec![32])
    );
    assert_eq!(
        f.tensor_info("blk.0.attn_k.bias").map(|t| t.dims.clone()),
        Some(vec![16])
    );
}

/// Every row of every block matrix: the zeros are the lowest scores, the rest unchanged.
fn check_unstructured(m: &TinyModel, u: Unstructured, im: Option<&Imatrix>, file: &str) {
    let path = out_path(file);
    let opts = PruneOptions {
        imatrix: im,
        unstructured: Some(u),
        threads: 2,
        ..Default::default()
    };
    let s = prune::prune(&m.to_gguf(), &path, &opts, &mut |_, _, _| true).expect("prune");
    let out = open(&path);
    let mut zeros = 0usize;
    let mut total = 0usize;
    for t in m
        .tensors
        .iter()
        .filter(|t| t.dims.len() == 2 && t.name.starts_with("blk."))
    {
        let cols = t.dims[0] as usize;
        let got = values(&out, &t.name);
        let scale: Vec<f32> = match (u.method, im) {
            (Method::Wanda, Some(im)) => im
                .importance(&t.name)
                .expect("entry")
                .iter()
                .map(|v| v.sqrt())
                .collect(),
            _ => vec![1.0; cols],
        };
        for (orig, row) in t.values.chunks(cols).zip(got.chunks(cols)) {
            let groups = match u.pattern {
                Some((_, m)) => m,
                None => cols,
            };
            for (g, (o, r)) in orig.chunks(groups).zip(row.chunks(groups)).enumerate() {
                let score = |j: usize| o[j].abs() * scale[g * groups + j];
                let (mut max_zeroed, mut min_kept) = (0f32, f32::INFINITY);
                for j in 0..o.len() {
                    if r[j] == 0.0 {
                        max_zeroed = max_zeroed.max(score(j));
                    } else {
                        assert_eq!(r[j], o[j], "{}: a kept weight changed", t.name);
                        min_kept = min_kept.min(score(j));
                    }
                }
                assert!(
                    max_zeroed <= min_kept,
                    "{}: a higher score was zeroed",
                    t.name
                );
                let z = r.iter().filter(|&&v| v == 0.0).count();
                if let Some((n, m)) = u.pattern {
                    assert_eq!(z, m - n, "{}: {n}:{m}", t.name);
                }
                zeros += z;
                total += r.len();
            }
        }
    }
    let fraction = zeros as f64 / total as f64;
    assert!(
        (fraction - u.sparsity).abs() < 0.01,
        "{file}: sparsity {fraction}"
    );
    assert_eq!(s.zeroed, (zeros as u64, total as u64));
    // The pruned file runs, and computes what its weights say.
    let mut as_stored = m.clone();
    for t in as_stored.tensors.iter_mut() {
        let v = values(&out, &t.name);
        *t = Tensor::new(&t.name, &t.dims.clone(), GgmlType::F32, v);
    }
    let tokens = Rng::new(8).tokens(SEQ, m.spec.n_vocab);
    assert_close(
        &edgelm_logits(&path, &tokens),
        &reference_logits(&as_stored, &tokens, Flaw::None),
        file,
    );
}

#[test]
fn unstructured_pruning_zeroes_the_lowest_scores() {
    let m = TinyModel::random(&Spec::tiny(Arch::Llama), 41);
    let im = random_imatrix(&m, 4);
    let half = |method| Unstructured {
        method,
        sparsity: 0.5,
        pattern: None,
    };
    check_unstructured(&m, half(Method::Magnitude), None, "magnitude.gguf");
    check_unstructured(&m, half(Method::Wanda), Some(&im), "wanda.gguf");
    let two_four = Unstructured {
        method: Method::Wanda,
        sparsity: 0.5,
        pattern: Some((2, 4)),
    };
    check_unstructured(&m, two_four, Some(&im), "wanda-2-4.gguf");
    let one_four = Unstructured {
        method: Method::Magnitude,
        sparsity: 0.75,
        pattern: Some((1, 4)),
    };
    check_unstructured(&m, one_four, None, "magnitude-1-4.gguf");
}

/// The tiny model with every factored projection replaced by the product of its factors.
fn multiplied_out(m: &TinyModel, f: &GgufFile) -> TinyModel {
    let mut dense = m.clone();
    for t in dense.tensors.iter_mut() {
        let prefix = t.name.trim_end_matches(".weight");
        let (inner, outer) = edgelm_models::low_rank_names(prefix);
        if f.tensor_info(&inner).is_none() {
            continue;
        }
        let (b, a) = (values(f, &inner), values(f, &outer));
        let (cols, rows) = (t.dims[0] as usize, t.dims[1] as usize);
        let rank = b.len() / cols;
        let mut w = vec![0f32; rows * cols];
        for r in 0..rows {
            for c in 0..cols {
                w[r * cols + c] = (0..rank)
                    .map(|k| a[r * rank + k] as f64 * b[k * cols + c] as f64)
                    .sum::<f64>() as f32;
            }
        }
        *t = Tensor::new(&t.name, &t.dims.clone(), GgmlType::F32, w);
    }
    dense
}

fn factor_file(
    m: &TinyModel,
    choice: RankChoice,
    im: Option<&Imatrix>,
    file: &str,
) -> (PathBuf, lowrank::LowRankSummary) {
    let path = out_path(file);
    let opts = LowRankOptions {
        choice,
        tensors: fancy_regex::Regex::new(lowrank::DEFAULT_TENSORS).expect("regex"),
        imatrix: im,
        moments: None,
        threads: 2,
        description: String::new(),
    };
    let s = lowrank::lowrank(&m.to_gguf(), &path, &opts, &mut |_, _, _| true).expect("lowrank");
    (path, s)
}

#[test]
fn a_factored_model_runs_as_the_product_of_its_factors() {
    for arch in Arch::ALL {
        let m = TinyModel::random(&Spec::tiny(arch), 50 + arch as u64);
        let im = random_imatrix(&m, 6);
        let tokens = Rng::new(9).tokens(SEQ, m.spec.n_vocab);
        for (choice, imatrix, name) in [
            (RankChoice::Rank(12), None, "rank"),
            (RankChoice::Energy(0.8), Some(&im), "energy"),
        ] {
            let file = format!("lowrank-{name}-{}.gguf", arch.name());
            let (path, s) = factor_file(&m, choice, imatrix, &file);
            let f = open(&path);
            assert_eq!(s.factored.len(), 3 * m.spec.n_layer, "{file}");
            assert!(f.tensor_info("blk.0.ffn_up.weight").is_none());
            assert_close(
                &edgelm_logits(&path, &tokens),
                &reference_logits(&multiplied_out(&m, &f), &tokens, Flaw::None),
                &file,
            );
        }
        // At full rank the factors are the matrix.
        let (path, _) = factor_file(&m, RankChoice::Rank(m.spec.n_embd), None, "full.gguf");
        assert_close(
            &edgelm_logits(&path, &tokens),
            &reference_logits(&m, &tokens, Flaw::None),
            "full rank",
        );
    }
}

fn frobenius2(x: &[f64]) -> f64 {
    x.iter().map(|v| v * v).sum()
}

/// Rank 1 keeps the top singular value (found here by power iteration, not the library's
/// eigensolver): ‖W − AB‖² = ‖W‖² − σ₁². Whitening by importance lowers the weighted error it
/// aims at.
#[test]
fn truncation_is_optimal_and_whitening_targets_the_weighted_error() {
    let (rows, cols) = (24, 40);
    let mut rng = Rng::new(77);
    let w: Vec<f32> = (0..rows * cols).map(|_| rng.uniform()).collect();
    let f =
        lowrank::factor(&w, rows, cols, Whitening::None, RankChoice::Rank(1), "w").expect("factor");
    let residual: Vec<f64> = (0..rows * cols)
        .map(|i| w[i] as f64 - f.a[i / cols] as f64 * f.b[i % cols] as f64)
        .collect();
    let mut v = vec![1f64; cols];
    let mut sigma2 = 0.0;
    for _ in 0..500 {
        let wv: Vec<f64> = (0..rows)
            .map(|r| (0..cols).map(|c| w[r * cols + c] as f64 * v[c]).sum())
            .collect();
        let wtwv: Vec<f64> = (0..cols)
            .map(|c| (0..rows).map(|r| w[r * cols + c] as f64 * wv[r]).sum())
            .collect();
        sigma2 = frobenius2(&wv) / frobenius2(&v);
        let n = frobenius2(&wtwv).sqrt();
        v = wtwv.iter().map(|x| x / n).collect();
    }
    let total: f64 = w.iter().map(|&x| x as f64 * x as f64).sum();
    let err = frobenius2(&residual);
    assert!(
        (err - (total - sigma2)).abs() < 1e-4 * total,
        "{err} vs {}",
        total - sigma2
    );

    let imp: Vec<f32> = (0..cols)
        .map(|c| if c % 5 == 0 { 50.0 } else { 0.1 })
        .collect();
    let weighted = |f: &lowrank::Factors| -> f64 {
        (0..rows * cols)
            .map(|i| {
                let (r, c) = (i / cols, i % cols);
                let ab: f64 = (0..f.rank)
                    .map(|k| f.a[r * f.rank + k] as f64 * f.b[k * cols + c] as f64)
                    .sum();
                imp[c] as f64 * (w[i] as f64 - ab).powi(2)
            })
            .sum()
    };
    let plain =
        lowrank::factor(&w, rows, cols, Whitening::None, RankChoice::Rank(8), "w").expect("plain");
    let aware = lowrank::factor(
        &w,
        rows,
        cols,
        Whitening::Diagonal(&imp),
        RankChoice::Rank(8),
        "w",
    )
    .expect("aware");
    assert!(
        weighted(&aware) < 0.8 * weighted(&plain),
        "{} vs {}",
        weighted(&aware),
        weighted(&plain)
    );
}

fn no_leftovers(path: &Path) {
    assert!(!path.exists(), "{} was written", path.display());
    let dir = path.parent().expect("dir");
    let name = path
        .file_name()
        .expect("name")
        .to_string_lossy()
        .into_owned();
    let stray = std::fs::read_dir(dir)
        .expect("dir")
        .filter_map(|e| e.ok())
        .any(|e| {
            e.file_name()
                .to_string_lossy()
                .contains(&format!(".{name}.partial"))
        });
    assert!(!stray, "a temporary file of {name} was left behind");
}

#[test]
fn bad_arguments_are_refused_and_leave_no_file() {
    let m = TinyModel::random(&Spec::tiny(Arch::Llama), 61);
    let src = m.to_gguf();
    let im = random_imatrix(&m, 2);
    let path = out_path("refused.gguf");
    let unstructured = |method, sparsity, pattern| PruneOptions {
        unstructured: Some(Unstructured {
            method,
            sparsity,
            pattern,
        }),
        ..Default::default()
    };
    let cases: Vec<(PruneOptions, &str)> = vec![
        (unstructured(Method::Magnitude, 0.0, None), "outside (0, 1)"),
        (unstructured(Method::Magnitude, 1.5, None), "outside (0, 1)"),
        (
            unstructured(Method::Magnitude, 0.6, Some((2, 5))),
            "does not fit",
        ),
        (
            unstructured(Method::Magnitude, 0.5, Some((4, 4))),
            "0 < N < M",
        ),
        (unstructured(Method::Wanda, 0.5, None), "importance matrix"),
        (
            PruneOptions {
                ffn_keep: Some(1.5),
                ..Default::default()
            },
            "--ffn-keep",
        ),
        (
            PruneOptions {
                ffn_keep: Some(0.0),
                ..Default::default()
            },
            "--ffn-keep",
        ),
        (
            PruneOptions {
                heads_keep: Some(3),
                ..Default::default()
            },
            "can keep 2, 4",
        ),
        (
            PruneOptions {
                ffn_keep: Some(0.5),
                ..Default::default()
            },
            "give an importance matrix",
        ),
        (
            PruneOptions {
                drop_layers: vec![2],
                ..Default::default()
            },
            "does not exist",
        ),
        (
            PruneOptions {
                drop_layers: vec![0, 1],
                ..Default::default()
            },
            "leaves none",
        ),
    ];
    for (opts, want) in cases {
        let e = prune::prune(&src, &path, &opts, &mut |_, _, _| true)
            .expect_err(want)
            .to_string();
        assert!(e.contains(want), "{want:?} not in {e:?}");
        no_leftovers(&path);
    }
    let lr = |choice, tensors: &str| LowRankOptions {
        choice,
        tensors: fancy_regex::Regex::new(tensors).expect("regex"),
        imatrix: Some(&im),
        moments: None,
        threads: 1,
        description: String::new(),
    };
    for (opts, want) in [
        (
            lr(RankChoice::Rank(33), lowrank::DEFAULT_TENSORS),
            "its rank is 1..=32",
        ),
        (
            lr(RankChoice::Rank(0), lowrank::DEFAULT_TENSORS),
            "its rank is 1..=32",
        ),
        (lr(RankChoice::Rank(4), "^nothing$"), "no matrix"),
        (lr(RankChoice::Rank(4), "token_embd"), "not a projection"),
    ] {
        let e = lowrank::lowrank(&src, &path, &opts, &mut |_, _, _| true)
            .expect_err(want)
            .to_string();
        assert!(e.contains(want), "{want:?} not in {e:?}");
        no_leftovers(&path);
    }
    // Interrupted runs.
    let opts = PruneOptions {
        imatrix: Some(&im),
        ffn_keep: Some(0.5),
        ..Default::default()
    };
    let e = prune::prune(&src, &path, &opts, &mut |_, i, _| i < 5).expect_err("stopped");
    assert!(matches!(e, CompressError::Interrupted), "{e}");
    no_leftovers(&path);
    let e = lowrank::lowrank(
        &src,
        &path,
        &lr(RankChoice::Rank(4), lowrank::DEFAULT_TENSORS),
        &mut |_, done, _| done < 2,
    )
    .expect_err("stopped");
    assert!(matches!(e, CompressError::Interrupted), "{e}");
    no_leftovers(&path);
    // A factored model is not pruned again (prune the dense one, then factor it).
    let (factored, _) = factor_file(&m, RankChoice::Rank(8), None, "to-prune.gguf");
    let e =
        prune::prune(&open(&factored), &path, &opts, &mut |_, _, _| true).expect_err("factored");
    assert!(e.to_string().contains("factored"), "{e}");
}

/// Whitened by the full second moments of correlated inputs, the factors reach a lower error on
/// those inputs than the diagonal or plain truncation, and the input-side and output-side
/// statistics give the same (optimal) answer.
#[test]
fn full_whitening_minimizes_the_error_on_the_inputs() {
    let (rows, cols, n, rank) = (20, 32, 200, 6);
    let mut rng = Rng::new(91);
    let w: Vec<f32> = (0..rows * cols).map(|_| rng.uniform()).collect();
    // Inputs with few directions plus noise, and one loud channel.
    let basis: Vec<f32> = (0..4 * cols).map(|_| rng.uniform()).collect();
    let x: Vec<Vec<f64>> = (0..n)
        .map(|_| {
            let coef: Vec<f32> = (0..4).map(|_| rng.uniform()).collect();
            (0..cols)
                .map(|c| {
                    let v: f32 = (0..4).map(|k| coef[k] * basis[k * cols + c]).sum();
                    (v + 0.05 * rng.uniform() + if c == 3 { 5.0 * coef[0] } else { 0.0 }) as f64
                })
                .collect()
        })
        .collect();
    let mut c = vec![0f64; cols * cols];
    for xt in &x {
        for i in 0..cols {
            for j in 0..cols {
                c[i * cols + j] += xt[i] * xt[j];
            }
        }
    }
    let y: Vec<Vec<f64>> = x
        .iter()
        .map(|xt| {
            (0..rows)
                .map(|r| (0..cols).map(|j| w[r * cols + j] as f64 * xt[j]).sum())
                .collect()
        })
        .collect();
    let mut m = vec![0f64; rows * rows];
    for yt in &y {
        for i in 0..rows {
            for j in 0..rows {
                m[i * rows + j] += yt[i] * yt[j];
            }
        }
    }
    let diag: Vec<f32> = (0..cols).map(|i| c[i * cols + i] as f32).collect();
    let error = |f: &lowrank::Factors| -> f64 {
        x.iter()
            .zip(&y)
            .map(|(xt, yt)| {
                let mid: Vec<f64> = (0..f.rank)
                    .map(|k| (0..cols).map(|j| f.b[k * cols + j] as f64 * xt[j]).sum())
                    .collect();
                (0..rows)
                    .map(|r| {
                        let got: f64 = (0..f.rank)
                            .map(|k| f.a[r * f.rank + k] as f64 * mid[k])
                            .sum();
                        (got - yt[r]).powi(2)
                    })
                    .sum::<f64>()
            })
            .sum()
    };
    let run =
        |wh| lowrank::factor(&w, rows, cols, wh, RankChoice::Rank(rank), "w").expect("factor");
    // Stored in f32, as the collector stores them.
    let narrow = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
    let (c32, m32) = (narrow(&c), narrow(&m));
    let (inputs, outputs) = (run(Whitening::Inputs(&c32)), run(Whitening::Outputs(&m32)));
    let (diagonal, plain) = (run(Whitening::Diagonal(&diag)), run(Whitening::None));
    let (ei, eo, ed, ep) = (
        error(&inputs),
        error(&outputs),
        error(&diagonal),
        error(&plain),
    );
    assert!(
        (ei - eo).abs() <= 1e-3 * ei.max(1e-9),
        "inputs {ei} vs outputs {eo}"
    );
    assert!(
        ei < 0.7 * ed && ed < ep,
        "full {ei}, diagonal {ed}, plain {ep}"
    );
    // The optimum: what the output moments' top eigenvectors leave, Σ of the rest of ‖y‖².
    let total: f64 = y.iter().flatten().map(|v| v * v).sum();
    assert!(
        (outputs.energy - (1.0 - eo / total)).abs() < 1e-6,
        "{} vs {}",
        outputs.energy,
        1.0 - eo / total
    );
}
