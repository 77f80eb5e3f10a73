//! Low-rank factoring: a chosen matrix W (outputs × inputs) becomes A·B by truncated SVD, stored
//! as `{prefix}.lowrank_in.weight` = B (rank × inputs, applied first) and
//! `{prefix}.lowrank_out.weight` = A (outputs × rank), which `edgelm-models` runs as two
//! products. With an importance matrix the SVD is activation-aware: W·S with S = diag(√E[x²])
//! is factored, so the truncation discards what the inputs excite least, and S⁻¹ is folded back
//! into B (the diagonal whitening of ASVD; SVD-LLM whitens by the full input covariance, which an
//! importance matrix does not hold). The singular values are split evenly, A = U·√Σ and
//! B = √Σ·Vᵀ·S⁻¹, so both factors quantize alike.
//!
//! The SVD comes from the eigendecomposition of the smaller Gram matrix (WᵀW or WWᵀ) in f64.

use crate::imatrix::Imatrix;
use crate::linalg::symmetric_eigen;
use crate::rows::{encode, Matrix};
use crate::{CompressError, Result};
use edgelm_gguf::{GgmlType, GgufFile, GgufWriter, Value};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

/// How large each factored matrix's rank is.
#[derive(Clone, Copy, Debug)]
pub enum RankChoice {
    /// Exactly this rank.
    Rank(usize),
    /// The smallest rank keeping this fraction of the (whitened) squared singular values.
    Energy(f64),
    /// The rank whose factors hold this fraction of the matrix's parameters.
    Params(f64),
}

pub struct LowRankOptions<'a> {
    pub choice: RankChoice,
    /// Which tensors to factor (matched against the full name).
    pub tensors: fancy_regex::Regex,
    pub imatrix: Option<&'a Imatrix>,
    pub threads: usize,
    /// Recorded in the output's metadata (`edgelm.lowrank`).
    pub description: String,
}

/// The tensors factored by default: the FFN projections, two-thirds of a block's weights.
pub const DEFAULT_TENSORS: &str = r"^blk\.\d+\.ffn_(gate|up|down)\.weight$";

#[derive(Debug, Clone)]
pub struct Factored {
    pub name: String,
    pub rows: usize,
    pub cols: usize,
    pub rank: usize,
    /// Fraction of the whitened squared singular values the rank keeps.
    pub energy: f64,
    /// Types of B and A as stored.
    pub types: (GgmlType, GgmlType),
}

#[derive(Debug, Default)]
pub struct LowRankSummary {
    pub factored: Vec<Factored>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Weight bytes one decoded token reads (every matrix but an untied embedding table).
    pub read_per_token_in: u64,
    pub read_per_token_out: u64,
    /// Parameters of the factored matrices before and after.
    pub params: (u64, u64),
}

/// The factors of W ≈ A·B in f32, row-major: A is rows × rank, B rank × cols.
pub struct Factors {
    pub a: Vec<f32>,
    pub b: Vec<f32>,
    pub rank: usize,
    pub energy: f64,
}

/// Truncated SVD of the row-major `w` (`rows` × `cols`), whitened by `importance` (one mean
/// squared input per column) when given.
pub fn factor(
    w: &[f32],
    rows: usize,
    cols: usize,
    importance: Option<&[f32]>,
    choice: RankChoice,
    name: &str,
) -> Result<Factors> {
    let m = rows.min(cols);
    let rank = match choice {
        RankChoice::Rank(r) => {
            if r == 0 || r > m {
                return Err(CompressError::BadArgument(format!(
                    "rank {r} does not fit {name}: it is {rows}×{cols}, so its rank is 1..={m}"
                )));
            }
            Some(r)
        }
        RankChoice::Params(p) => {
            let r = (p * (rows * cols) as f64 / (rows + cols) as f64).floor() as usize;
            Some(round_rank(r, m))
        }
        RankChoice::Energy(_) => None,
    };
    // Column scales S: √E[x²], floored so a silent input keeps its weights representable.
    let scale: Vec<f64> = match importance {
        Some(imp) => {
            let max = imp
                .iter()
                .fold(0f32, |a, &b| a.max(b))
                .max(f32::MIN_POSITIVE) as f64;
            imp.iter()
                .map(|&v| (v as f64).max(max * 1e-6).sqrt())
                .collect()
        }
        None => vec![1.0; cols],
    };
    let ws: Vec<f64> = w
        .chunks_exact(cols)
        .flat_map(|row| row.iter().zip(&scale).map(|(&x, &s)| x as f64 * s))
        .collect();
    // Gram of the smaller side: its eigenvectors are one side's singular vectors.
    let by_cols = cols <= rows;
    let gram = if by_cols {
        gram_of_columns(&ws, rows, cols)
    } else {
        gram_of_rows(&ws, rows, cols)
    };
    let eig = symmetric_eigen(&gram, m);
    let lambda: Vec<f64> = eig.values.iter().map(|&l| l.max(0.0)).collect();
    let total: f64 = lambda.iter().sum();
    let rank = match (rank, choice) {
        (Some(r), _) => r,
        (None, RankChoice::Energy(e)) => {
            let mut acc = 0.0;
            let r = lambda
                .iter()
                .position(|&l| {
                    acc += l;
                    acc >= e * total
                })
                .map_or(m, |k| k + 1);
            round_rank(r, m)
        }
        (None, _) => m,
    };
    let energy = if total > 0.0 {
        lambda[..rank].iter().sum::<f64>() / total
    } else {
        1.0
    };
    let mut a = vec![0f32; rows * rank];
    let mut b = vec![0f32; rank * cols];
    for k in 0..rank {
        let sigma = lambda[k].sqrt();
        if sigma <= total.sqrt() * 1e-12 {
            continue; // A null direction: both factors stay zero there.
        }
        let root = sigma.sqrt();
        let v = &eig.vectors[k * m..(k + 1) * m];
        if by_cols {
            // v is a right singular vector: W·S·v = σ·u.
            for r in 0..rows {
                let x: f64 = ws[r * cols..(r + 1) * cols]
                    .iter()
                    .zip(v)
                    .map(|(a, b)| a * b)
                    .sum();
                a[r * rank + k] = (x / root) as f32;
            }
            for c in 0..cols {
                b[k * cols + c] = (root * v[c] / scale[c]) as f32;
            }
        } else {
            // v is a left singular vector: vᵀ·W·S = σ·(right vector)ᵀ.
            for r in 0..rows {
                a[r * rank + k] = (root * v[r]) as f32;
            }
            for c in 0..cols {
                let x: f64 = (0..rows).map(|r| v[r] * ws[r * cols + c]).sum();
                b[k * cols + c] = (x / root / scale[c]) as f32;
            }
        }
    }
    Ok(Factors { a, b, rank, energy })
}

/// A rank at least 1; for matrices of model size rounded up to whole 32-blocks, so the outer
/// factor's rows quantize to the block types.
fn round_rank(r: usize, m: usize) -> usize {
    let r = r.clamp(1, m);
    let up = r.div_ceil(32) * 32;
    if m >= 128 && up <= m {
        up
    } else {
        r
    }
}

/// WᵀW (cols × cols) of the row-major `w`.
fn gram_of_columns(w: &[f64], rows: usize, cols: usize) -> Vec<f64> {
    let mut g = vec![0f64; cols * cols];
    for r in 0..rows {
        let row = &w[r * cols..(r + 1) * cols];
        for i in 0..cols {
            let wi = row[i];
            if wi == 0.0 {
                continue;
            }
            let gi = &mut g[i * cols..(i + 1) * cols];
            gi[i..]
                .iter_mut()
                .zip(&row[i..])
                .for_each(|(g, &wj)| *g += wi * wj);
        }
    }
    mirror(&mut g, cols);
    g
}

/// WWᵀ (rows × rows) of the row-major `w`.
fn gram_of_rows(w: &[f64], rows: usize, cols: usize) -> Vec<f64> {
    let mut g = vec![0f64; rows * rows];
    for i in 0..rows {
        let ri = &w[i * cols..(i + 1) * cols];
        for j in i..rows {
            let rj = &w[j * cols..(j + 1) * cols];
            g[i * rows + j] = ri.iter().zip(rj).map(|(a, b)| a * b).sum();
        }
    }
    mirror(&mut g, rows);
    g
}

/// Copies the upper triangle onto the lower.
fn mirror(g: &mut [f64], n: usize) {
    for i in 0..n {
        for j in 0..i {
            g[i * n + j] = g[j * n + i];
        }
    }
}

/// Factors the tensors `o.tensors` matches and writes the model to `out` (under a temporary
/// name until complete). `progress(name, done, total)` is called as each factored tensor
/// finishes and stops the run by returning false.
pub fn lowrank(
    src: &GgufFile,
    out: &Path,
    o: &LowRankOptions,
    progress: &mut dyn FnMut(&Factored, usize, usize) -> bool,
) -> Result<LowRankSummary> {
    let chosen: Vec<&str> = src
        .tensors()
        .iter()
        .filter(|t| t.dims.len() == 2 && o.tensors.is_match(&t.name).unwrap_or(false))
        .map(|t| t.name.as_str())
        .collect();
    if chosen.is_empty() {
        return Err(CompressError::BadArgument(format!(
            "no matrix of the model matches --tensors {:?}",
            o.tensors.as_str()
        )));
    }
    if let Some(bad) = chosen
        .iter()
        .find(|n| !n.starts_with("blk.") && **n != "output.weight")
    {
        return Err(CompressError::BadArgument(format!(
            "{bad} is not a projection (an embedding table is looked up, not multiplied): \
             factor the blocks' matrices or output.weight"
        )));
    }
    if let Some(bad) = chosen.iter().find(|n| n.contains(".lowrank_")) {
        return Err(CompressError::BadArgument(format!(
            "{bad} is already a factor"
        )));
    }
    // A rank is checked against every matrix before any work starts.
    if let RankChoice::Rank(r) = o.choice {
        for name in &chosen {
            let m = Matrix::of(src, name)?;
            if r == 0 || r > m.rows.min(m.cols) {
                return Err(CompressError::BadArgument(format!(
                    "rank {r} does not fit {name}: it is {}×{}, so its rank is 1..={}",
                    m.rows,
                    m.cols,
                    m.rows.min(m.cols)
                )));
            }
        }
    }

    // Each worker factors whole matrices (the eigensolver is sequential), then encodes them.
    type Done = (Factored, Vec<u8>, Vec<u8>);
    let results: Mutex<Vec<Option<Done>>> = Mutex::new((0..chosen.len()).map(|_| None).collect());
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let (tx, rx) = std::sync::mpsc::channel::<Result<usize>>();
    let workers = o.threads.clamp(1, chosen.len());
    let mut first_error = None;
    std::thread::scope(|s| {
        for _ in 0..workers {
            let tx = tx.clone();
            let (chosen, results, next, stop) = (&chosen, &results, &next, &stop);
            s.spawn(move || loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= chosen.len() || stop.load(Ordering::Relaxed) {
                    break;
                }
                let r = factor_one(src, chosen[i], o).map(|done| {
                    if let Ok(mut v) = results.lock() {
                        v[i] = Some(done);
                    }
                    i
                });
                let failed = r.is_err();
                let _ = tx.send(r);
                if failed {
                    break;
                }
            });
        }
        drop(tx);
        let mut finished = 0;
        for msg in rx {
            match msg {
                Ok(i) => {
                    finished += 1;
                    let keep_going = results
                        .lock()
                        .ok()
                        .and_then(|v| {
                            v[i].as_ref()
                                .map(|d| progress(&d.0, finished, chosen.len()))
                        })
                        .unwrap_or(true);
                    if !keep_going && first_error.is_none() {
                        first_error = Some(CompressError::Interrupted);
                        stop.store(true, Ordering::Relaxed);
                    }
                }
                Err(e) => {
                    stop.store(true, Ordering::Relaxed);
                    first_error.get_or_insert(e);
                }
            }
        }
    });
    if let Some(e) = first_error {
        return Err(e);
    }
    let mut done: Vec<Option<Done>> = results.into_inner().map_err(|_| CompressError::Panicked)?;

    let tied = src.tensor_info("output.weight").is_none();
    let reads = |name: &str, n_dims: usize| {
        n_dims >= 2 && (name != "token_embd.weight" || tied) && !name.contains("_norm.")
    };
    let mut summary = LowRankSummary::default();
    let mut w = GgufWriter::new();
    for (k, v) in src.metadata() {
        w.set(k, v.clone());
    }
    if !o.description.is_empty() {
        w.set("edgelm.lowrank", Value::String(o.description.clone()));
    }
    for t in src.tensors() {
        let view = src
            .tensor(&t.name)
            .ok_or_else(|| CompressError::Unsupported(format!("tensor {} has no data", t.name)))?;
        summary.bytes_in += view.data.len() as u64;
        if reads(&t.name, t.dims.len()) {
            summary.read_per_token_in += view.data.len() as u64;
        }
        match chosen.iter().position(|n| *n == t.name) {
            Some(i) => {
                let (f, b, a) = done[i].take().ok_or(CompressError::Panicked)?;
                let prefix = t.name.trim_end_matches(".weight");
                let (inner, outer) = (
                    format!("{prefix}.lowrank_in.weight"),
                    format!("{prefix}.lowrank_out.weight"),
                );
                let out_bytes = (a.len() + b.len()) as u64;
                summary.bytes_out += out_bytes;
                summary.read_per_token_out += out_bytes;
                summary.params.0 += (f.rows * f.cols) as u64;
                summary.params.1 += (f.rank * (f.rows + f.cols)) as u64;
                w.add_tensor(&inner, &[f.cols as u64, f.rank as u64], f.types.0, b)?;
                w.add_tensor(&outer, &[f.rank as u64, f.rows as u64], f.types.1, a)?;
                summary.factored.push(f);
            }
            None => {
                summary.bytes_out += view.data.len() as u64;
                if reads(&t.name, t.dims.len()) {
                    summary.read_per_token_out += view.data.len() as u64;
                }
                w.add_tensor(&t.name, &t.dims, t.ty, view.data.to_vec())?;
            }
        }
    }
    crate::write_atomically(out, |f| w.write_to(f))?;
    Ok(summary)
}

/// Factors and encodes one matrix: (what was done, B's bytes, A's bytes).
fn factor_one(
    src: &GgufFile,
    name: &str,
    o: &LowRankOptions,
) -> Result<(Factored, Vec<u8>, Vec<u8>)> {
    let m = Matrix::of(src, name)?;
    let w = m.to_f32()?;
    let importance = o
        .imatrix
        .and_then(|im| im.importance(name))
        .filter(|v| v.len() == m.cols);
    let f = factor(&w, m.rows, m.cols, importance.as_deref(), o.choice, name)?;
    // B reads the layer's input; A reads B's output, whose mean squares follow from the
    // input's if its channels are taken as uncorrelated.
    let mid_importance: Option<Vec<f32>> = importance.as_ref().map(|imp| {
        f.b.chunks_exact(m.cols)
            .map(|row| row.iter().zip(imp).map(|(b, i)| b * b * i).sum())
            .collect()
    });
    let (ty_b, b) = encode(m.ty, &f.b, m.cols, importance.as_deref(), 1)?;
    let (ty_a, a) = encode(m.ty, &f.a, f.rank, mid_importance.as_deref(), 1)?;
    Ok((
        Factored {
            name: name.to_owned(),
            rows: m.rows,
            cols: m.cols,
            rank: f.rank,
            energy: f.energy,
            types: (ty_b, ty_a),
        },
        b,
        a,
    ))
}
