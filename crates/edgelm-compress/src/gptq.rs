//! Error feedback from calibration inputs (GPTQ, Frantar et al. 2022): a weight row is rounded
//! block by block, and each block's rounding error is carried into the columns not yet rounded,
//! where the calibration inputs' second moments say it costs least. What it minimizes is the
//! output error ‖(w − q)·X‖² = (w − q)ᵀ·H·(w − q) with H = Σ x·xᵀ, all of it, where rounding
//! weighted by an importance matrix sees only H's diagonal.
//!
//! H is first shrunk towards its diagonal ([`SHRINK`]) and damped ([`DAMPING`]). With
//! H⁻¹ = UᵀU (U upper triangular), fixing column i at its rounded value and refitting the
//! later columns optimally moves them by −(wᵢ − qᵢ)/Uᵢᵢ · Uᵢⱼ (the optimal-brain-surgeon update
//! in Cholesky form). Applied column after column across a block whose values the block
//! format fixed together, it is the joint optimum for that block, so any block type works
//! unchanged: the block's own weighted search picks its scale and codes, weighing each column
//! by what its error costs after that refit, 1/Uᵢᵢ² ([`Compensator::conditional_importance`]).

use crate::{CompressError, Result};
use edgelm_gguf::GgmlType;

/// Fraction of H's mean diagonal added to its diagonal: keeps the factorization stable when
/// calibration inputs span fewer directions than the matrix has columns (GPTQ's 1%).
pub const DAMPING: f64 = 0.01;

/// How far H's off-diagonal entries are shrunk towards zero (H becomes (1 − s)·H + s·diag H):
/// correlations measured on the calibration text carry over to other text less than the
/// per-column energies do. Measured on Q4_0, mean KLD on gpl-3.txt with Python sources as the
/// calibration text: SmolLM2 0.158 / 0.123 / 0.114 / 0.113 / 0.119 at s = 0 / 0.3 / 0.5 / 0.65
/// / 0.8 (0.140 without feedback); Qwen 0.163 at 0.6 (0.192 without).
pub const SHRINK: f64 = 0.6;

/// The upper Cholesky factor of one projection's damped inverse input moments, shared by
/// every row of every tensor reading that input.
pub struct Compensator {
    /// Row-major `cols × cols`, upper triangle (below the diagonal is zero).
    u: Vec<f32>,
    cols: usize,
}

impl Compensator {
    /// From `h` = Σ x·xᵀ over calibration inputs (`cols × cols`, row-major, symmetric). Inputs
    /// that never varied (zero diagonal) get no feedback.
    pub fn new(h: &[f64], cols: usize, threads: usize) -> Result<Compensator> {
        if h.len() != cols * cols {
            return Err(CompressError::BadArgument(format!(
                "input moments hold {} values, expected {cols}×{cols}",
                h.len()
            )));
        }
        let mean_diag = (0..cols).map(|i| h[i * cols + i]).sum::<f64>() / cols.max(1) as f64;
        if mean_diag.is_nan() || mean_diag <= 0.0 || mean_diag.is_infinite() {
            return Err(CompressError::BadArgument(
                "the calibration inputs are all zero or not finite: nothing to weigh by".into(),
            ));
        }
        let damp = DAMPING * mean_diag;
        // H in reversed index order: its lower Cholesky factor L gives U = P·L⁻¹·P (P the
        // reversal), since H⁻¹ = P·L⁻ᵀ·L⁻¹·P = (P·L⁻¹·P)ᵀ·(P·L⁻¹·P).
        let rev = |i: usize| cols - 1 - i;
        let mut a = vec![0f64; cols * cols];
        for i in 0..cols {
            for j in 0..=i {
                let mut v = h[rev(i) * cols + rev(j)];
                if i == j {
                    v = if v > 0.0 { v + damp } else { 1.0 };
                } else if h[rev(i) * cols + rev(i)] <= 0.0 || h[rev(j) * cols + rev(j)] <= 0.0 {
                    v = 0.0;
                } else {
                    v *= 1.0 - SHRINK;
                }
                a[i * cols + j] = v;
            }
        }
        let l = cholesky_lower(a, cols, threads)?;
        let m_cols = inverse_lower_by_columns(&l, cols, threads);
        let mut u = vec![0f32; cols * cols];
        for (c, col) in m_cols.iter().enumerate() {
            // Column c of L⁻¹ holds rows c..cols: U[rev(r)][rev(c)] = L⁻¹[r][c].
            for (k, &v) in col.iter().enumerate() {
                u[rev(c + k) * cols + rev(c)] = v as f32;
            }
        }
        Ok(Compensator { u, cols })
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// What an error in each column costs once the later columns absorbed what they can:
    /// 1/Uᵢᵢ², the input's variance given the later inputs.
    pub fn conditional_importance(&self) -> Vec<f32> {
        (0..self.cols)
            .map(|i| {
                let u = self.u[i * self.cols + i];
                1.0 / (u * u)
            })
            .collect()
    }

    /// Quantizes `row` (consumed: it ends holding the compensated values) to `ty` in `out`,
    /// each block's rounding searched with `weights` (one per column, from the source row), its
    /// error carried into the later columns.
    pub fn quantize_row(
        &self,
        ty: GgmlType,
        row: &mut [f32],
        weights: &[f32],
        out: &mut [u8],
    ) -> Result<()> {
        let n = self.cols;
        if row.len() != n || weights.len() != n {
            return Err(CompressError::BadArgument(format!(
                "a row of {} values (weights {}) for moments of {n} columns",
                row.len(),
                weights.len()
            )));
        }
        let block = ty.block_elems();
        let bytes = ty.block_bytes();
        if !n.is_multiple_of(block) || out.len() != n / block * bytes {
            return Err(CompressError::BadArgument(format!(
                "a row of {n} is not whole {ty} blocks in {} bytes",
                out.len()
            )));
        }
        let mut q = vec![0f32; block];
        let mut err = vec![0f32; block];
        for (k, dst) in out.chunks_exact_mut(bytes).enumerate() {
            let (start, end) = (k * block, (k + 1) * block);
            edgelm_quant::quantize_row_with_error_weights(
                ty,
                &row[start..end],
                &weights[start..end],
                dst,
            )?;
            edgelm_quant::dequantize_row(ty, dst, &mut q)?;
            for i in 0..block {
                let c = start + i;
                let u = &self.u[c * n..(c + 1) * n];
                let e = (row[c] - q[i]) / u[c];
                err[i] = e;
                for (w, &uj) in row[c + 1..end].iter_mut().zip(&u[c + 1..end]) {
                    *w -= e * uj;
                }
            }
            if end < n {
                let (_, rest) = row.split_at_mut(end);
                for (i, &e) in err.iter().enumerate() {
                    let c = start + i;
                    let u = &self.u[c * n + end..(c + 1) * n];
                    for (w, &uj) in rest.iter_mut().zip(u) {
                        *w -= e * uj;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Columns per panel of the blocked factorization: a panel of the widest inputs (4864 × 64
/// f64) stays in L2 while every later row is updated from it.
const PANEL: usize = 64;

/// The lower Cholesky factor of the symmetric positive definite `a` (row-major, lower triangle
/// read), in place: right-looking by panels of [`PANEL`] columns, the update of the rows below
/// each panel split over `threads`.
fn cholesky_lower(mut a: Vec<f64>, n: usize, threads: usize) -> Result<Vec<f64>> {
    let not_definite = |i: usize| {
        CompressError::BadArgument(format!(
            "the calibration inputs' second moments are not positive definite at column {i} \
             even damped: use more calibration text"
        ))
    };
    for k0 in (0..n).step_by(PANEL) {
        let k1 = (k0 + PANEL).min(n);
        // The panel's columns for every row from k0 on, left-looking within the panel.
        for i in k0..n {
            for j in k0..k1.min(i + 1) {
                let (head, row_i) = a.split_at_mut(i * n);
                let row_j = if j < i {
                    &head[j * n + k0..j * n + j]
                } else {
                    &row_i[k0..j]
                };
                let s = row_i[j] - dot(&row_i[k0..j], row_j);
                if j == i {
                    if s.is_nan() || s <= 0.0 {
                        return Err(not_definite(i));
                    }
                    row_i[i] = s.sqrt();
                } else {
                    row_i[j] = s / head[j * n + j];
                }
            }
        }
        if k1 == n {
            break;
        }
        // Every later entry (i, j), k1 ≤ j ≤ i, loses the panel's contribution.
        let panel: Vec<f64> = (k1..n)
            .flat_map(|i| a[i * n + k0..i * n + k1].iter().copied())
            .collect();
        let width = k1 - k0;
        let rows = &mut a[k1 * n..];
        let bounds = triangle_split(n - k1, threads);
        std::thread::scope(|s| {
            let mut rest = rows;
            let mut first = 0;
            for w in bounds.windows(2) {
                let (part, tail) = std::mem::take(&mut rest).split_at_mut((w[1] - first) * n);
                rest = tail;
                let (lo, panel) = (w[0], &panel);
                first = w[1];
                s.spawn(move || {
                    for (r, row) in part.chunks_exact_mut(n).enumerate() {
                        let i = lo + r;
                        let pi = &panel[i * width..(i + 1) * width];
                        for j in 0..=i {
                            row[k1 + j] -= dot(pi, &panel[j * width..(j + 1) * width]);
                        }
                    }
                });
            }
        });
    }
    for i in 0..n {
        a[i * n + i + 1..(i + 1) * n].fill(0.0);
    }
    Ok(a)
}

/// Row bounds splitting the first `m` rows of a lower triangle into `threads` runs of about
/// equal area.
fn triangle_split(m: usize, threads: usize) -> Vec<usize> {
    let threads = threads.clamp(1, 64);
    let total = (m * (m + 1) / 2) as f64;
    let mut bounds = vec![0];
    let mut area = 0.0;
    for i in 0..m {
        area += (i + 1) as f64;
        if area >= total * bounds.len() as f64 / threads as f64 && bounds.len() < threads {
            bounds.push(i + 1);
        }
    }
    if bounds.last() != Some(&m) {
        bounds.push(m);
    }
    bounds
}

/// Columns of L⁻¹ for the lower triangular `l`: column c holds rows c..n. Each is a forward
/// substitution of its own, so threads take columns in turn.
fn inverse_lower_by_columns(l: &[f64], n: usize, threads: usize) -> Vec<Vec<f64>> {
    let solve = |c: usize| {
        let mut m = vec![0f64; n - c];
        for i in c..n {
            let row = &l[i * n + c..i * n + i];
            let s = if i == c { 1.0 } else { 0.0 } - dot(row, &m[..i - c]);
            m[i - c] = s / l[i * n + i];
        }
        m
    };
    let threads = threads.clamp(1, 64);
    let mut cols: Vec<Vec<f64>> = vec![Vec::new(); n];
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let solve = &solve;
                s.spawn(move || {
                    (t..n)
                        .step_by(threads)
                        .map(|c| (c, solve(c)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for h in handles {
            if let Ok(done) = h.join() {
                for (c, m) in done {
                    cols[c] = m;
                }
            }
        }
    });
    cols
}

/// Four independent sums so the compiler can keep several multiply-adds in flight.
fn dot(a: &[f64], b: &[f64]) -> f64 {
    let mut s = [0f64; 4];
    let (ac, at) = a.as_chunks::<4>();
    let (bc, bt) = b.as_chunks::<4>();
    for (x, y) in ac.iter().zip(bc) {
        for k in 0..4 {
            s[k] += x[k] * y[k];
        }
    }
    let tail: f64 = at.iter().zip(bt).map(|(x, y)| x * y).sum();
    (s[0] + s[1]) + (s[2] + s[3]) + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::tests::{correlated_inputs, Rng};

    /// The inputs in f64, as the moments are summed.
    fn inputs(rng: &mut Rng, tokens: usize, cols: usize) -> Vec<f64> {
        correlated_inputs(rng, tokens, cols)
            .into_iter()
            .map(f64::from)
            .collect()
    }

    fn moments(x: &[f64], tokens: usize, cols: usize) -> Vec<f64> {
        let mut h = vec![0f64; cols * cols];
        for t in 0..tokens {
            let v = &x[t * cols..(t + 1) * cols];
            for i in 0..cols {
                for j in 0..cols {
                    h[i * cols + j] += v[i] * v[j];
                }
            }
        }
        h
    }

    /// Wider than two panels and not a multiple of one, so the blocked update runs.
    #[test]
    fn factor_inverts_the_damped_moments() {
        let mut rng = Rng(7);
        let (tokens, cols) = (300, 150);
        let x = inputs(&mut rng, tokens, cols);
        let h = moments(&x, tokens, cols);
        let c = Compensator::new(&h, cols, 3).expect("positive definite");
        let damp = DAMPING * (0..cols).map(|i| h[i * cols + i]).sum::<f64>() / cols as f64;
        let u = |r: usize, i: usize| c.u[r * cols + i] as f64;
        let mut inv = vec![0f64; cols * cols];
        for i in 0..cols {
            for k in 0..cols {
                inv[i * cols + k] = (0..cols).map(|r| u(r, i) * u(r, k)).sum();
            }
            for j in 0..i {
                assert_eq!(u(i, j), 0.0, "U is upper triangular");
            }
        }
        // (UᵀU)·(H shrunk + λI) = I.
        for i in 0..cols {
            for j in 0..cols {
                let v: f64 = (0..cols)
                    .map(|k| {
                        let hkj = if k == j {
                            h[k * cols + j] + damp
                        } else {
                            h[k * cols + j] * (1.0 - SHRINK)
                        };
                        inv[i * cols + k] * hkj
                    })
                    .sum();
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((v - want).abs() < 2e-3, "({i},{j}) = {v}");
            }
        }
    }

    /// On correlated inputs the output error of the fed-back rounding is well below that of
    /// rounding each block alone with the same (diagonal) weights.
    #[test]
    fn feedback_lowers_the_output_error() {
        let mut rng = Rng(11);
        let (tokens, cols, rows) = (1024, 512, 8);
        let x = inputs(&mut rng, tokens, cols);
        let h = moments(&x, tokens, cols);
        let c = Compensator::new(&h, cols, 1).expect("positive definite");
        let weights: Vec<f32> = (0..cols).map(|i| h[i * cols + i] as f32).collect();
        let output_error = |w: &[f32], q: &[f32]| -> f64 {
            (0..tokens)
                .map(|t| {
                    let y: f64 = (0..cols)
                        .map(|j| (w[j] - q[j]) as f64 * x[t * cols + j])
                        .sum();
                    y * y
                })
                .sum()
        };
        for ty in [GgmlType::Q4_0, GgmlType::IQ4_NL, GgmlType::Q4_K] {
            let (mut plain, mut fed) = (0.0, 0.0);
            for _ in 0..rows {
                let w: Vec<f32> = (0..cols).map(|_| rng.normal()).collect();
                let n_bytes = edgelm_quant::row_bytes(ty, cols).expect("whole blocks");
                let mut a = vec![0u8; n_bytes];
                edgelm_quant::quantize_row_with_error_weights(ty, &w, &weights, &mut a)
                    .expect("quantizes");
                let mut b = vec![0u8; n_bytes];
                let mut work = w.clone();
                c.quantize_row(ty, &mut work, &weights, &mut b)
                    .expect("quantizes");
                let (mut qa, mut qb) = (vec![0f32; cols], vec![0f32; cols]);
                edgelm_quant::dequantize_row(ty, &a, &mut qa).expect("dequantizes");
                edgelm_quant::dequantize_row(ty, &b, &mut qb).expect("dequantizes");
                plain += output_error(&w, &qa);
                fed += output_error(&w, &qb);
            }
            assert!(fed < 0.8 * plain, "{ty}: fed back {fed} against {plain}");
        }
    }

    #[test]
    fn bad_shapes_are_refused() {
        assert!(Compensator::new(&[1.0; 8], 3, 1).is_err());
        assert!(Compensator::new(&[0.0; 9], 3, 1).is_err());
        let c = Compensator::new(&[1.0, 0.0, 0.0, 1.0], 2, 1).expect("identity");
        let mut row = vec![0f32; 32];
        assert!(c
            .quantize_row(GgmlType::Q4_0, &mut row, &[1.0; 32], &mut [0u8; 18])
            .is_err());
    }
}
