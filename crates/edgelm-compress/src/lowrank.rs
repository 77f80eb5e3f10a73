//! Low-rank factoring: a chosen matrix W (outputs × inputs) becomes A·B by truncated SVD, stored
//! as `{prefix}.lowrank_in.weight` = B (rank × inputs, applied first) and
//! `{prefix}.lowrank_out.weight` = A (outputs × rank), which `edgelm-models` runs as two
//! products. The truncation is activation-aware when statistics of the inputs are given: it
//! minimizes ‖(W − A·B)·X‖ over calibration inputs X (SVD-LLM's target) from their second
//! moments (collected by `edgelm lowrank -f`), or, from an importance matrix alone, its diagonal
//! approximation ‖(W − A·B)·diag(√E[x²])‖ (ASVD's). See [`factor`].
//!
//! The SVDs come from eigendecompositions of the narrower side's Gram matrix in f64.

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

/// Second moments of one projection on calibration text, summed over tokens (row-major,
/// symmetric): of its inputs (cols × cols) or of its outputs before bias (rows × rows).
#[derive(Clone, Debug)]
pub enum SecondMoments {
    Inputs(std::sync::Arc<Vec<f32>>),
    Outputs(std::sync::Arc<Vec<f32>>),
}

/// Second moments by weight name (`blk.0.ffn_up.weight`).
pub type Moments = std::collections::BTreeMap<String, SecondMoments>;

/// Rows of the second moments made by one product.
const MOMENT_BAND: usize = 512;

/// Adds `Σ_t v[t]·v[t]ᵀ` over the `n` rows of `v` (`d` wide) to the lower triangle (j ≤ i) of
/// `sum` (`d × d`, row-major; the caller mirrors it once all chunks are in): one chunk's
/// product in f32 on the SIMD kernels (vᵀ as both the weight and the tokens), by bands of rows
/// each against the rows up to its end, so little more than half the square is made.
pub fn add_second_moments(
    compute: &edgelm_kernels::Compute,
    sum: &mut [f32],
    v: &[f32],
    d: usize,
    n: usize,
) -> Result<()> {
    if sum.len() != d * d || v.len() < n * d {
        return Err(CompressError::BadArgument(format!(
            "second moments of {d} columns from {} values into {}",
            v.len(),
            sum.len()
        )));
    }
    let mut vt = vec![0f32; d * n];
    for (t, row) in v[..n * d].chunks_exact(d).enumerate() {
        for (i, &x) in row.iter().enumerate() {
            vt[i * n + t] = x;
        }
    }
    let mut out = Vec::new();
    for i0 in (0..d).step_by(MOMENT_BAND) {
        let i1 = (i0 + MOMENT_BAND).min(d);
        out.resize((i1 - i0) * i1, 0.0);
        crate::gptq::f32_product(compute, &vt[..i1 * n], i1, n, &vt[i0 * n..i1 * n], &mut out)?;
        for (t, o) in out.chunks_exact(i1).enumerate() {
            let i = i0 + t;
            let row = &mut sum[i * d..i * d + i + 1];
            row.iter_mut().zip(o).for_each(|(s, &x)| *s += x);
        }
    }
    Ok(())
}

/// Copies the lower triangle of the square `m` (`d × d`, row-major) over its upper one.
pub fn mirror_lower(m: &mut [f32], d: usize) {
    for i in 0..d {
        for j in 0..i {
            m[j * d + i] = m[i * d + j];
        }
    }
}

fn widen(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

pub struct LowRankOptions<'a> {
    pub choice: RankChoice,
    /// Which tensors to factor (matched against the full name).
    pub tensors: fancy_regex::Regex,
    /// Diagonal whitening where `moments` has no entry.
    pub imatrix: Option<&'a Imatrix>,
    /// Full whitening (SVD-LLM's target), preferred over the importance matrix.
    pub moments: Option<&'a Moments>,
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
    /// Mean square of each component of B·x where the whitening says (weights A's rounding).
    pub mid_importance: Option<Vec<f32>>,
}

/// What the truncation's error is measured against.
#[derive(Clone, Copy)]
pub enum Whitening<'a> {
    /// ‖W − AB‖: the plain truncated SVD.
    None,
    /// Mean squared input per column (an importance matrix): ‖(W − AB)·diag(√E[x²])‖.
    Diagonal(&'a [f32]),
    /// Σ x·xᵀ of calibration inputs (cols × cols, row-major): ‖(W − AB)·X‖, SVD-LLM's target.
    Inputs(&'a [f32]),
    /// Σ y·yᵀ of calibration outputs y = W·x (rows × rows): the same target, from the side
    /// that is narrower when the inputs are wide (`ffn_down`).
    Outputs(&'a [f32]),
}

/// The best rank-r approximation of the row-major `w` (`rows` × `cols`) in the metric
/// `whitening` gives. Whatever the metric, the optimum is A = U_r, B = U_rᵀ·W with U_r the top
/// left singular vectors of the whitened matrix (W·S with S·Sᵀ the input second moments;
/// equivalently the top eigenvectors of the output second moments), so B never needs S⁻¹.
/// The factors are rescaled to equal norms per rank component so both quantize alike.
pub fn factor(
    w: &[f32],
    rows: usize,
    cols: usize,
    whitening: Whitening,
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
    let check = |what: &str, len: usize, n: usize| -> Result<()> {
        if len == n * n {
            Ok(())
        } else {
            Err(CompressError::BadArgument(format!(
                "{name}: {what} second moments hold {len} values, not {n}×{n}"
            )))
        }
    };
    // Left singular vectors (rows of `u`, each `rows` long) and the energies they carry.
    let (u, lambda): (Vec<f64>, Vec<f64>) = match whitening {
        Whitening::Outputs(moments) => {
            check("output", moments.len(), rows)?;
            let eig = symmetric_eigen(&widen(moments), rows);
            (eig.vectors, eig.values)
        }
        other => {
            let ws = whitened(w, rows, cols, other, name, &check)?;
            if cols <= rows {
                // Right vectors from the small Gram WᵀW; u_k = W·v_k / σ_k.
                let eig = symmetric_eigen(&gram_of_columns(&ws, rows, cols), cols);
                let mut u = vec![0f64; cols * rows];
                for k in 0..cols {
                    let sigma = eig.values[k].max(0.0).sqrt();
                    if sigma == 0.0 {
                        continue;
                    }
                    let v = &eig.vectors[k * cols..(k + 1) * cols];
                    for r in 0..rows {
                        let x: f64 = ws[r * cols..(r + 1) * cols]
                            .iter()
                            .zip(v)
                            .map(|(a, b)| a * b)
                            .sum();
                        u[k * rows + r] = x / sigma;
                    }
                }
                (u, eig.values)
            } else {
                let eig = symmetric_eigen(&gram_of_rows(&ws, rows, cols), rows);
                (eig.vectors, eig.values)
            }
        }
    };
    let lambda: Vec<f64> = lambda.iter().map(|&l| l.max(0.0)).collect();
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
    let mut bk = vec![0f64; cols];
    let mut mids = Vec::with_capacity(rank);
    for k in 0..rank {
        let uk = &u[k * rows..(k + 1) * rows];
        bk.iter_mut().for_each(|x| *x = 0.0);
        for (r, &ur) in uk.iter().enumerate() {
            if ur != 0.0 {
                let row = &w[r * cols..(r + 1) * cols];
                bk.iter_mut()
                    .zip(row)
                    .for_each(|(x, &wv)| *x += ur * wv as f64);
            }
        }
        // ‖u_k‖ = 1: give both factors the norm √‖b_k‖.
        let norm = bk.iter().map(|x| x * x).sum::<f64>().sqrt();
        let t = if norm > 0.0 { norm.sqrt() } else { 1.0 };
        for (r, &ur) in uk.iter().enumerate() {
            a[r * rank + k] = (ur * t) as f32;
        }
        for (c, &x) in bk.iter().enumerate() {
            b[k * cols + c] = (x / t) as f32;
        }
        // E[(B·x)_k²]: u_kᵀ·E[y·yᵀ]·u_k / t² = λ_k / t² in the output metric.
        mids.push(match whitening {
            Whitening::None => 0.0,
            Whitening::Outputs(_) => lambda[k] / (t * t),
            Whitening::Diagonal(imp) => {
                bk.iter()
                    .zip(imp)
                    .map(|(x, &i)| x * x * i as f64)
                    .sum::<f64>()
                    / (t * t)
            }
            Whitening::Inputs(c) => {
                let row = &b[k * cols..(k + 1) * cols];
                (0..cols)
                    .map(|i| {
                        let ci = &c[i * cols..(i + 1) * cols];
                        row[i] as f64
                            * ci.iter()
                                .zip(row)
                                .map(|(&c, &x)| c as f64 * x as f64)
                                .sum::<f64>()
                    })
                    .sum()
            }
        });
    }
    let mid_importance = match whitening {
        Whitening::None => None,
        _ => Some(mids.iter().map(|&v| v as f32).collect()),
    };
    Ok(Factors {
        a,
        b,
        rank,
        energy,
        mid_importance,
    })
}

/// W·S in f64, with S·Sᵀ the input second moments (S = Q·Λ^½ for moments Q·Λ·Qᵀ; the rotation
/// Q leaves the left singular vectors alone).
fn whitened(
    w: &[f32],
    rows: usize,
    cols: usize,
    whitening: Whitening,
    name: &str,
    check: &dyn Fn(&str, usize, usize) -> Result<()>,
) -> Result<Vec<f64>> {
    let plain = || w.iter().map(|&x| x as f64).collect::<Vec<f64>>();
    Ok(match whitening {
        Whitening::None | Whitening::Outputs(_) => plain(),
        Whitening::Diagonal(imp) => {
            if imp.len() != cols {
                return Err(CompressError::BadArgument(format!(
                    "{name}: the importance matrix has {} columns, the matrix {cols}",
                    imp.len()
                )));
            }
            let scale: Vec<f64> = imp.iter().map(|&v| (v.max(0.0) as f64).sqrt()).collect();
            w.chunks_exact(cols)
                .flat_map(|row| row.iter().zip(&scale).map(|(&x, &s)| x as f64 * s))
                .collect()
        }
        Whitening::Inputs(moments) => {
            check("input", moments.len(), cols)?;
            let eig = symmetric_eigen(&widen(moments), cols);
            let mut ws = vec![0f64; rows * cols];
            for k in 0..cols {
                let s = eig.values[k].max(0.0).sqrt();
                let q = &eig.vectors[k * cols..(k + 1) * cols];
                for r in 0..rows {
                    let x: f64 = w[r * cols..(r + 1) * cols]
                        .iter()
                        .zip(q)
                        .map(|(&a, &b)| a as f64 * b)
                        .sum();
                    ws[r * cols + k] = x * s;
                }
            }
            ws
        }
    })
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

/// The matrices `tensors` picks, after checking that each can be factored as `choice` asks.
pub fn check<'f>(
    src: &'f GgufFile,
    tensors: &fancy_regex::Regex,
    choice: RankChoice,
) -> Result<Vec<&'f str>> {
    let chosen: Vec<&str> = src
        .tensors()
        .iter()
        .filter(|t| t.dims.len() == 2 && tensors.is_match(&t.name).unwrap_or(false))
        .map(|t| t.name.as_str())
        .collect();
    if chosen.is_empty() {
        return Err(CompressError::BadArgument(format!(
            "no matrix of the model matches --tensors {:?}",
            tensors.as_str()
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
    if let RankChoice::Rank(r) = choice {
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

    Ok(chosen)
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
    let chosen = check(src, &o.tensors, o.choice)?;

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
    let reads = |name: &str, n_dims: usize| crate::rows::read_per_token(name, n_dims, tied);
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
    crate::write_atomically(out, |f| {
        w.write_to(f).map_err(|e| crate::CompressError::io(out, e))
    })?;
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
    let moments = o.moments.and_then(|mo| mo.get(name));
    let whitening = match (moments, &importance) {
        (Some(SecondMoments::Inputs(c)), _) => Whitening::Inputs(c),
        (Some(SecondMoments::Outputs(c)), _) => Whitening::Outputs(c),
        (None, Some(imp)) => Whitening::Diagonal(imp),
        (None, None) => Whitening::None,
    };
    let f = factor(&w, m.rows, m.cols, whitening, o.choice, name)?;
    // B reads the layer's input: its rounding is weighted by the input's mean squares.
    let input_importance = importance.or_else(|| match moments {
        Some(SecondMoments::Inputs(c)) => Some((0..m.cols).map(|i| c[i * m.cols + i]).collect()),
        _ => None,
    });
    let (ty_b, b) = encode(m.ty, &f.b, m.cols, input_importance.as_deref(), 1)?;
    let (ty_a, a) = encode(m.ty, &f.a, f.rank, f.mid_importance.as_deref(), 1)?;
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
