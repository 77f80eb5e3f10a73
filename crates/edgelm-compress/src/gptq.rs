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
use edgelm_kernels::{Compute, Weight};

/// Fraction of H's mean diagonal added to its diagonal: keeps the factorization stable when
/// calibration inputs span fewer directions than the matrix has columns (GPTQ's 1%).
pub const DAMPING: f64 = 0.01;

/// How far H's off-diagonal entries are shrunk towards zero (H becomes (1 − s)·H + s·diag H):
/// correlations measured on the calibration text carry over to other text less than the
/// per-column energies do. Measured on Q4_0, mean KLD on gpl-3.txt with Python sources as the
/// calibration text: SmolLM2 0.158 / 0.123 / 0.114 / 0.113 / 0.119 at s = 0 / 0.3 / 0.5 / 0.65
/// / 0.8 (0.140 without feedback); Qwen 0.163 at 0.6 (0.192 without).
pub const SHRINK: f64 = 0.6;

/// Columns whose rounding errors are carried row by row within the band, then into every
/// later column at once as one matrix product (GPTQ's lazy batch): the band of U stays in
/// cache while the rows walk it, and the bulk of the work runs on the f32 kernels.
const BAND: usize = 256;

/// Rows fed back together: their errors of one band make one product's tokens.
pub const ROWS_AT_ONCE: usize = 1024;

/// The upper Cholesky factor of one projection's damped inverse input moments, shared by
/// every row of every tensor reading that input.
pub struct Compensator {
    /// Row-major `cols × cols`, upper triangle (below the diagonal is zero).
    u: Vec<f32>,
    cols: usize,
}

impl Compensator {
    /// From `h` = Σ x·xᵀ over calibration inputs (`cols × cols`, row-major, symmetric). Inputs
    /// that never varied (zero diagonal) get no feedback. The factorization keeps f64 and
    /// takes its products from `compute`'s f32 kernels.
    pub fn new(h: &[f32], cols: usize, compute: &Compute) -> Result<Compensator> {
        if h.len() != cols * cols {
            return Err(CompressError::BadArgument(format!(
                "input moments hold {} values, expected {cols}×{cols}",
                h.len()
            )));
        }
        let h = |i: usize, j: usize| h[i * cols + j] as f64;
        let mean_diag = (0..cols).map(|i| h(i, i)).sum::<f64>() / cols.max(1) as f64;
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
                let mut v = h(rev(i), rev(j));
                if i == j {
                    v = if v > 0.0 { v + damp } else { 1.0 };
                } else if h(rev(i), rev(i)) <= 0.0 || h(rev(j), rev(j)) <= 0.0 {
                    v = 0.0;
                } else {
                    v *= 1.0 - SHRINK;
                }
                a[i * cols + j] = v;
            }
        }
        let l = cholesky_lower(a, cols, compute)?;
        let inv = inverse_lower(&l, cols, compute)?;
        let mut u = vec![0f32; cols * cols];
        for r in 0..cols {
            for c in 0..=r {
                u[rev(r) * cols + rev(c)] = inv[r * cols + c] as f32;
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

    /// Quantizes the rows of `rows` (row-major, `cols` wide; consumed: they end holding the
    /// compensated values) to `ty` in `out`, each block's rounding searched with `weights`
    /// (one per value, from the source rows), its error carried into the later columns: within
    /// a [`BAND`] row by row on `compute`'s threads, beyond it by one product per band.
    pub fn quantize_rows(
        &self,
        compute: &Compute,
        ty: GgmlType,
        rows: &mut [f32],
        weights: &[f32],
        out: &mut [u8],
    ) -> Result<()> {
        let n = self.cols;
        let block = ty.block_elems();
        let bytes = ty.block_bytes();
        let m = rows.len() / n.max(1);
        if !n.is_multiple_of(block)
            || rows.len() != m * n
            || weights.len() != rows.len()
            || out.len() != m * (n / block) * bytes
        {
            return Err(CompressError::BadArgument(format!(
                "{} values (weights {}) into {} bytes are not whole rows of {n} in {ty} blocks",
                rows.len(),
                weights.len(),
                out.len()
            )));
        }
        let row_bytes = n / block * bytes;
        let band = BAND.div_ceil(block) * block;
        let threads = compute.n_threads().max(1);
        let rows_per_thread = m.div_ceil(threads).max(1);
        for b0 in (0..n).step_by(band) {
            let b1 = (b0 + band).min(n);
            let width = b1 - b0;
            // Each row's scaled errors in this band: the tokens of the product below.
            let mut err = vec![0f32; m * width];
            std::thread::scope(|s| {
                let handles: Vec<_> = rows
                    .chunks_mut(rows_per_thread * n)
                    .zip(weights.chunks(rows_per_thread * n))
                    .zip(out.chunks_mut(rows_per_thread * row_bytes))
                    .zip(err.chunks_mut(rows_per_thread * width))
                    .map(|(((rows, weights), out), err)| {
                        s.spawn(move || -> Result<()> {
                            let parts = rows
                                .chunks_exact_mut(n)
                                .zip(weights.chunks_exact(n))
                                .zip(out.chunks_exact_mut(row_bytes))
                                .zip(err.chunks_exact_mut(width));
                            for (((row, w), dst), e) in parts {
                                let dst = &mut dst[b0 / block * bytes..b1 / block * bytes];
                                self.quantize_band(ty, row, w, dst, b0, b1, e)?;
                            }
                            Ok(())
                        })
                    })
                    .collect();
                crate::rows::join_all(handles)
            })?;
            if b1 == n {
                break;
            }
            // rows[·, b1..] −= err · U[b0..b1, b1..], the band's rows of U transposed as the
            // product's weight rows.
            let later = n - b1;
            let mut ut = vec![0f32; later * width];
            for (i, u_row) in self.u[b0 * n..b1 * n].chunks_exact(n).enumerate() {
                for (j, &v) in u_row[b1..].iter().enumerate() {
                    ut[j * width + i] = v;
                }
            }
            let mut delta = vec![0f32; m * later];
            f32_product(compute, &ut, later, width, &err, &mut delta)?;
            for (row, d) in rows.chunks_exact_mut(n).zip(delta.chunks_exact(later)) {
                row[b1..].iter_mut().zip(d).for_each(|(w, &d)| *w -= d);
            }
        }
        Ok(())
    }

    /// One row's blocks in columns `b0..b1` into `dst`, each block's error carried into the
    /// band's later columns at once and its scaled errors left in `err` for the columns
    /// beyond.
    #[allow(clippy::too_many_arguments)]
    fn quantize_band(
        &self,
        ty: GgmlType,
        row: &mut [f32],
        weights: &[f32],
        dst: &mut [u8],
        b0: usize,
        b1: usize,
        err: &mut [f32],
    ) -> Result<()> {
        let n = self.cols;
        let block = ty.block_elems();
        let mut q = vec![0f32; block];
        for (k, dst) in dst.chunks_exact_mut(ty.block_bytes()).enumerate() {
            let (start, end) = (b0 + k * block, b0 + (k + 1) * block);
            edgelm_quant::quantize_row_with_error_weights(
                ty,
                &row[start..end],
                &weights[start..end],
                dst,
            )?;
            edgelm_quant::dequantize_row(ty, dst, &mut q)?;
            for c in start..end {
                let u = &self.u[c * n..c * n + b1];
                let e = (row[c] - q[c - start]) / u[c];
                err[c - b0] = e;
                for (w, &uj) in row[c + 1..b1].iter_mut().zip(&u[c + 1..]) {
                    *w -= e * uj;
                }
            }
        }
        Ok(())
    }
}

/// Error feedback when the input moments are known only as each column's E[x²] and the inputs'
/// means μ (an importance matrix with input sums): H holds E[x²] on its diagonal and μᵢ·μⱼ off
/// it, the part of E[x·xᵀ] the inputs' shared offset makes. A diagonal importance prices each
/// column's error alone; the offset adds up a row's errors, μ·(w − q), in every token, so errors
/// in one direction along μ cost far more than scattered ones. Damped and shrunk as
/// [`Compensator::new`] does, H = D + s·μ·μᵀ with D diagonal and s = 1 − [`SHRINK`], and the
/// feedback has a closed form: fixing column c with error δ moves each later column j by
/// s·μ_c·δ·(μ_j / D_j) / (1 + s·Σ_{k>c} μ_k² / D_k), one running sum per row, and column c's
/// error costs D_c + s·μ_c² / (1 + s·Σ_{k>c} μ_k² / D_k) once they have. That is O(cols) per
/// row where the dense factor costs O(cols²) and a cols³ factorization; the arithmetic is f64
/// and the same on every machine. Measured on Gemma 3 (Python sources): the means hold 8–50% of
/// the inputs' energy, and mean KLD fell 3–12% on gpl-3.txt and 8–28% on pydoc-topics at Q4_1,
/// IQ4_NL and Q5_0.
pub struct MeanFeedback {
    /// μ_j / D_j: the share of the running sum column j takes.
    take: Vec<f64>,
    /// s·μ_c / (1 + s·Σ_{k>c} μ_k² / D_k): the share of column c's error the sum takes.
    give: Vec<f64>,
    /// What each column's error costs after the later columns' refit.
    conditional: Vec<f32>,
}

impl MeanFeedback {
    /// From the per-column mean squared input (`importance`) and mean input (`means`). Columns
    /// that never varied (no energy) get no feedback, as in [`Compensator::new`].
    pub fn new(importance: &[f32], means: &[f32]) -> Result<MeanFeedback> {
        let n = importance.len();
        if means.len() != n {
            return Err(CompressError::BadArgument(format!(
                "{} input means for {n} columns of importance",
                means.len()
            )));
        }
        let mean_diag = importance.iter().map(|&v| v as f64).sum::<f64>() / n.max(1) as f64;
        if !mean_diag.is_finite() || mean_diag <= 0.0 || means.iter().any(|v| !v.is_finite()) {
            return Err(CompressError::BadArgument(
                "the calibration inputs are all zero or not finite: nothing to weigh by".into(),
            ));
        }
        let damp = DAMPING * mean_diag;
        let s = 1.0 - SHRINK;
        let (mut d, mut mu) = (vec![1f64; n], vec![0f64; n]);
        for i in 0..n {
            let e2 = importance[i] as f64;
            if e2 > 0.0 {
                // A mean never exceeds the root mean square (Jensen); a file claiming otherwise
                // is clamped so that D stays positive.
                let m = (means[i] as f64).clamp(-e2.sqrt(), e2.sqrt());
                mu[i] = m;
                d[i] = e2 + damp - s * m * m;
            }
        }
        let (mut take, mut give, mut conditional) = (vec![0f64; n], vec![0f64; n], vec![0f32; n]);
        // Σ_{k>c} μ_k² / D_k, walked from the last column down.
        let mut later = 0f64;
        for c in (0..n).rev() {
            take[c] = mu[c] / d[c];
            give[c] = s * mu[c] / (1.0 + s * later);
            conditional[c] = (d[c] + s * mu[c] * mu[c] / (1.0 + s * later)) as f32;
            later += mu[c] * mu[c] / d[c];
        }
        Ok(MeanFeedback {
            take,
            give,
            conditional,
        })
    }

    pub fn cols(&self) -> usize {
        self.take.len()
    }

    /// What an error in each column costs once the later columns absorbed what they can.
    pub fn conditional_importance(&self) -> &[f32] {
        &self.conditional
    }

    /// Quantizes one row to `ty` in `out`, block by block, each block's rounding searched with
    /// `weights` (one per value, from the source row) and its errors carried into the later
    /// columns; `row` ends holding the values each block was rounded from, compensated.
    pub fn quantize_row(
        &self,
        ty: GgmlType,
        row: &mut [f32],
        weights: &[f32],
        out: &mut [u8],
    ) -> Result<()> {
        let n = self.cols();
        let block = ty.block_elems();
        if row.len() != n
            || weights.len() != n
            || !n.is_multiple_of(block)
            || out.len() != n / block * ty.block_bytes()
        {
            return Err(CompressError::BadArgument(format!(
                "a row of {} values (weights {}) into {} bytes is not {n} values in whole {ty} \
                 blocks",
                row.len(),
                weights.len(),
                out.len()
            )));
        }
        let mut q = vec![0f32; block];
        let mut sum = 0f64;
        for (k, dst) in out.chunks_exact_mut(ty.block_bytes()).enumerate() {
            let cols = k * block..(k + 1) * block;
            for j in cols.clone() {
                row[j] = (row[j] as f64 + self.take[j] * sum) as f32;
            }
            edgelm_quant::quantize_row_with_error_weights(
                ty,
                &row[cols.clone()],
                &weights[cols.clone()],
                dst,
            )?;
            edgelm_quant::dequantize_row(ty, dst, &mut q)?;
            // The block was rounded together; its columns' errors still move the later ones
            // within it before each is counted.
            let at_block = sum;
            for (j, &qj) in cols.zip(&q) {
                let target = row[j] as f64 + self.take[j] * (sum - at_block);
                row[j] = target as f32;
                sum += self.give[j] * (target - qj as f64);
            }
        }
        Ok(())
    }
}

/// `out[t·rows + r] = Σ_k w[r·cols + k] · x[t·cols + k]` on `compute`'s f32 kernels.
pub(crate) fn f32_product(
    compute: &Compute,
    w: &[f32],
    rows: usize,
    cols: usize,
    x: &[f32],
    out: &mut [f32],
) -> Result<()> {
    let bytes: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
    let tokens = x.len() / cols.max(1);
    compute.matmul(
        Weight::gguf(GgmlType::F32, rows, cols, &bytes),
        x,
        tokens,
        out,
    )?;
    Ok(())
}

/// Columns per panel of the blocked factorizations: a panel's diagonal block is factored and
/// inverted in f64, everything else is products on the f32 kernels.
const PANEL: usize = 128;

/// Later rows updated by one product of a Cholesky panel: bounds the product's output.
const UPDATE_ROWS: usize = 1024;

/// The lower Cholesky factor of the symmetric positive definite `a` (row-major, lower triangle
/// read), in place: right-looking by panels of [`PANEL`] columns. Per panel: its diagonal block
/// factored, the rows below it solved against that factor (one product with its inverse), and
/// every later row updated (the panel times itself, by bands of rows so only the lower
/// triangle is made).
fn cholesky_lower(mut a: Vec<f64>, n: usize, compute: &Compute) -> Result<Vec<f64>> {
    for k0 in (0..n).step_by(PANEL) {
        let k1 = (k0 + PANEL).min(n);
        let width = k1 - k0;
        let mut diag: Vec<f64> = (k0..k1)
            .flat_map(|i| a[i * n + k0..i * n + k1].iter().copied())
            .collect();
        cholesky_small(&mut diag, width).map_err(|i| {
            CompressError::BadArgument(format!(
                "the calibration inputs' second moments are not positive definite at column \
                 {} even damped: use more calibration text",
                k0 + i
            ))
        })?;
        for (r, row) in diag.chunks_exact(width).enumerate() {
            a[(k0 + r) * n + k0..(k0 + r) * n + k1].copy_from_slice(row);
        }
        if k1 == n {
            break;
        }
        let m = n - k1;
        // L21 = A21 · L11⁻ᵀ: row j of the product's weight is row j of L11⁻¹.
        let inv = to_f32(&inverse_small(&diag, width));
        let below: Vec<f32> = (k1..n)
            .flat_map(|i| a[i * n + k0..i * n + k1].iter().map(|&v| v as f32))
            .collect();
        let mut panel = vec![0f32; m * width];
        f32_product(compute, &inv, width, width, &below, &mut panel)?;
        for (t, row) in panel.chunks_exact(width).enumerate() {
            let i = k1 + t;
            a[i * n + k0..i * n + k1]
                .iter_mut()
                .zip(row)
                .for_each(|(v, &l)| *v = l as f64);
        }
        let mut out = Vec::new();
        for i0 in (0..m).step_by(UPDATE_ROWS) {
            let i1 = (i0 + UPDATE_ROWS).min(m);
            out.resize((i1 - i0) * i1, 0.0);
            f32_product(
                compute,
                &panel[..i1 * width],
                i1,
                width,
                &panel[i0 * width..i1 * width],
                &mut out,
            )?;
            for (t, o) in out.chunks_exact(i1).enumerate() {
                let i = k1 + i0 + t;
                let row = &mut a[i * n + k1..i * n + i + 1];
                row.iter_mut().zip(o).for_each(|(v, &d)| *v -= d as f64);
            }
        }
    }
    for i in 0..n {
        a[i * n + i + 1..(i + 1) * n].fill(0.0);
    }
    Ok(a)
}

/// L⁻¹ for the lower triangular `l` (row-major), by solving L·X = I a panel of rows at a
/// time: the panel's rows are its diagonal block's inverse times what is left of the right
/// side there (one product), and its contribution to every later row is another.
fn inverse_lower(l: &[f64], n: usize, compute: &Compute) -> Result<Vec<f64>> {
    let mut x = vec![0f64; n * n];
    for i in 0..n {
        x[i * n + i] = 1.0;
    }
    for i0 in (0..n).step_by(PANEL) {
        let i1 = (i0 + PANEL).min(n);
        let width = i1 - i0;
        let diag: Vec<f64> = (i0..i1)
            .flat_map(|r| l[r * n + i0..r * n + i1].iter().copied())
            .collect();
        let inv = inverse_small(&diag, width);
        // X[i0..i1, 0..i1] = L_ii⁻¹ · B[i0..i1, 0..i1], made transposed: the columns of B are
        // the product's tokens, and the transposed panel is what the update below takes.
        let mut bt = vec![0f32; i1 * width];
        for k in 0..width {
            for (c, &v) in x[(i0 + k) * n..(i0 + k) * n + i1].iter().enumerate() {
                bt[c * width + k] = v as f32;
            }
        }
        let mut xt = vec![0f32; i1 * width];
        f32_product(compute, &to_f32(&inv), width, width, &bt, &mut xt)?;
        // The diagonal block exactly: the right side there is still I.
        for r in 0..width {
            for c in 0..i1 {
                x[(i0 + r) * n + c] = if c >= i0 {
                    inv[r * width + c - i0]
                } else {
                    xt[c * width + r] as f64
                };
            }
        }
        if i1 == n {
            break;
        }
        // Rows i1.. of the right side lose L[·, i0..i1] · X[i0..i1, 0..i1].
        let m = n - i1;
        let tokens: Vec<f32> = (i1..n)
            .flat_map(|r| l[r * n + i0..r * n + i1].iter().map(|&v| v as f32))
            .collect();
        let mut out = vec![0f32; m * i1];
        f32_product(compute, &xt, i1, width, &tokens, &mut out)?;
        for (t, o) in out.chunks_exact(i1).enumerate() {
            let r = i1 + t;
            x[r * n..r * n + i1]
                .iter_mut()
                .zip(o)
                .for_each(|(v, &d)| *v -= d as f64);
        }
    }
    Ok(x)
}

/// The lower Cholesky factor of a small dense `w × w` block, in place (upper part left as
/// read), or the first column where it is not positive definite.
fn cholesky_small(a: &mut [f64], w: usize) -> std::result::Result<(), usize> {
    for i in 0..w {
        for j in 0..=i {
            let s = a[i * w + j] - dot(&a[i * w..i * w + j], &a[j * w..j * w + j]);
            if j == i {
                if s.is_nan() || s <= 0.0 {
                    return Err(i);
                }
                a[i * w + i] = s.sqrt();
            } else {
                a[i * w + j] = s / a[j * w + j];
            }
        }
    }
    Ok(())
}

/// The inverse of a small lower triangular `w × w` block (its upper part ignored), by forward
/// substitution.
fn inverse_small(l: &[f64], w: usize) -> Vec<f64> {
    let mut x = vec![0f64; w * w];
    for c in 0..w {
        for r in c..w {
            let s: f64 = (c..r).map(|k| l[r * w + k] * x[k * w + c]).sum();
            let b = if r == c { 1.0 } else { 0.0 };
            x[r * w + c] = (b - s) / l[r * w + r];
        }
    }
    x
}

fn to_f32(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
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

    /// Summed in f64, stored in f32 as the collector stores them.
    fn moments(x: &[f64], tokens: usize, cols: usize) -> Vec<f32> {
        let mut h = vec![0f64; cols * cols];
        for t in 0..tokens {
            let v = &x[t * cols..(t + 1) * cols];
            for i in 0..cols {
                for j in 0..cols {
                    h[i * cols + j] += v[i] * v[j];
                }
            }
        }
        h.into_iter().map(|v| v as f32).collect()
    }

    /// A context on every path this machine runs, several threads.
    fn computes() -> Vec<Compute> {
        edgelm_kernels::Isa::available()
            .into_iter()
            .map(|isa| Compute::precise(isa, 3))
            .collect()
    }

    /// Wider than two panels and not a multiple of one, so the blocked updates run.
    #[test]
    fn factor_inverts_the_damped_moments() {
        let mut rng = Rng(7);
        let (tokens, cols) = (600, 300);
        let x = inputs(&mut rng, tokens, cols);
        let h = moments(&x, tokens, cols);
        for compute in computes() {
            let c = Compensator::new(&h, cols, &compute).expect("positive definite");
            let h = |i: usize, j: usize| h[i * cols + j] as f64;
            let damp = DAMPING * (0..cols).map(|i| h(i, i)).sum::<f64>() / cols as f64;
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
                                h(k, j) + damp
                            } else {
                                h(k, j) * (1.0 - SHRINK)
                            };
                            inv[i * cols + k] * hkj
                        })
                        .sum();
                    let want = if i == j { 1.0 } else { 0.0 };
                    assert!(
                        (v - want).abs() < 2e-3,
                        "{:?}: ({i},{j}) = {v}",
                        compute.isa()
                    );
                }
            }
        }
    }

    /// The plain algorithm, one row at a time with every error carried at once into every
    /// later column: what the banded products must reproduce.
    fn quantize_row_plainly(c: &Compensator, ty: GgmlType, row: &mut [f32], w: &[f32]) -> Vec<u8> {
        let n = c.cols;
        let block = ty.block_elems();
        let mut out = vec![0u8; edgelm_quant::row_bytes(ty, n).expect("whole blocks")];
        let mut q = vec![0f32; block];
        for (k, dst) in out.chunks_exact_mut(ty.block_bytes()).enumerate() {
            let (start, end) = (k * block, (k + 1) * block);
            edgelm_quant::quantize_row_with_error_weights(
                ty,
                &row[start..end],
                &w[start..end],
                dst,
            )
            .expect("quantizes");
            edgelm_quant::dequantize_row(ty, dst, &mut q).expect("dequantizes");
            for c0 in start..end {
                let u = &c.u[c0 * n..(c0 + 1) * n];
                let e = (row[c0] - q[c0 - start]) / u[c0];
                for j in c0 + 1..n {
                    row[j] -= e * u[j];
                }
            }
        }
        out
    }

    /// Correlated inputs, their moments' compensator, and importance-like weights.
    fn setup(
        rng: &mut Rng,
        tokens: usize,
        cols: usize,
        compute: &Compute,
    ) -> (Vec<f64>, Compensator, Vec<f32>) {
        let x = inputs(rng, tokens, cols);
        let h = moments(&x, tokens, cols);
        let c = Compensator::new(&h, cols, compute).expect("positive definite");
        let weights: Vec<f32> = (0..cols).map(|i| h[i * cols + i]).collect();
        (x, c, weights)
    }

    /// Several bands, rows split unevenly over threads: the same codes as the plain
    /// algorithm but where float sums in another order tip a near tie.
    #[test]
    fn banded_products_match_the_plain_algorithm() {
        let mut rng = Rng(5);
        for compute in computes() {
            for (ty, cols) in [(GgmlType::Q4_0, 576), (GgmlType::Q4_K, 768)] {
                let (_, c, weights) = setup(&mut rng, 900, cols, &compute);
                let rows = 7;
                let w: Vec<f32> = (0..rows * cols).map(|_| rng.normal()).collect();
                let all_weights: Vec<f32> = (0..rows).flat_map(|_| weights.clone()).collect();
                let mut work = w.clone();
                let row_bytes = edgelm_quant::row_bytes(ty, cols).expect("whole blocks");
                let mut banded = vec![0u8; rows * row_bytes];
                c.quantize_rows(&compute, ty, &mut work, &all_weights, &mut banded)
                    .expect("quantizes");
                let mut plain = Vec::new();
                for r in 0..rows {
                    let mut row = w[r * cols..(r + 1) * cols].to_vec();
                    plain.extend(quantize_row_plainly(&c, ty, &mut row, &weights));
                }
                let blocks = banded.len() / ty.block_bytes();
                let same = banded
                    .chunks_exact(ty.block_bytes())
                    .zip(plain.chunks_exact(ty.block_bytes()))
                    .filter(|(a, b)| a == b)
                    .count();
                assert!(
                    same * 10 >= blocks * 9,
                    "{:?} {ty}: {same} of {blocks} blocks as the plain algorithm's",
                    compute.isa()
                );
            }
        }
    }

    /// On correlated inputs the output error of the fed-back rounding is well below that of
    /// rounding each block alone with the same (diagonal) weights.
    #[test]
    fn feedback_lowers_the_output_error() {
        let mut rng = Rng(11);
        let (tokens, cols, rows) = (1024, 512, 8);
        let compute = Compute::precise(edgelm_kernels::Isa::detect(), 2);
        let (x, c, weights) = setup(&mut rng, tokens, cols, &compute);
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
            let row_bytes = edgelm_quant::row_bytes(ty, cols).expect("whole blocks");
            let w: Vec<f32> = (0..rows * cols).map(|_| rng.normal()).collect();
            let all_weights: Vec<f32> = (0..rows).flat_map(|_| weights.clone()).collect();
            let mut fed_codes = vec![0u8; rows * row_bytes];
            let mut work = w.clone();
            c.quantize_rows(&compute, ty, &mut work, &all_weights, &mut fed_codes)
                .expect("quantizes");
            let (mut plain, mut fed) = (0.0, 0.0);
            for r in 0..rows {
                let w = &w[r * cols..(r + 1) * cols];
                let mut a = vec![0u8; row_bytes];
                edgelm_quant::quantize_row_with_error_weights(ty, w, &weights, &mut a)
                    .expect("quantizes");
                let (mut qa, mut qb) = (vec![0f32; cols], vec![0f32; cols]);
                edgelm_quant::dequantize_row(ty, &a, &mut qa).expect("dequantizes");
                let b = &fed_codes[r * row_bytes..(r + 1) * row_bytes];
                edgelm_quant::dequantize_row(ty, b, &mut qb).expect("dequantizes");
                plain += output_error(w, &qa);
                fed += output_error(w, &qb);
            }
            assert!(fed < 0.8 * plain, "{ty}: fed back {fed} against {plain}");
        }
    }

    /// The closed form gives what the dense factor of the same moments gives: the same
    /// conditional importances, and the same codes and compensated values but where f32 sums
    /// in another order tip a near tie (values compared up to a row's first such block; a tip
    /// in an affine block's search moves the rest of its row), so the same output error; a
    /// column without energy included.
    #[test]
    fn mean_feedback_matches_the_dense_factor() {
        let mut rng = Rng(13);
        let cols = 512;
        let mut means: Vec<f32> = (0..cols).map(|_| rng.normal() * 0.8).collect();
        let mut importance: Vec<f32> = means
            .iter()
            .map(|m| m * m + 0.05 + rng.normal().abs())
            .collect();
        (means[17], importance[17]) = (0.0, 0.0);
        let mut h = vec![0f32; cols * cols];
        for i in 0..cols {
            for j in 0..cols {
                h[i * cols + j] = if i == j {
                    importance[i]
                } else {
                    means[i] * means[j]
                };
            }
        }
        let closed = MeanFeedback::new(&importance, &means).expect("consistent");
        for compute in computes() {
            let dense = Compensator::new(&h, cols, &compute).expect("positive definite");
            let weights = dense.conditional_importance();
            for (i, (a, b)) in closed
                .conditional_importance()
                .iter()
                .zip(&weights)
                .enumerate()
            {
                assert!((a - b).abs() <= 1e-3 * b, "column {i}: {a} against {b}");
            }
            for ty in [GgmlType::Q4_0, GgmlType::Q5_1, GgmlType::Q4_K] {
                let (block, bytes) = (ty.block_elems(), ty.block_bytes());
                let (mut same, mut blocks) = (0, 0);
                let (mut closed_error, mut dense_error) = (0f64, 0f64);
                // (w − q)ᵀ·H·(w − q) with the moments as given.
                let output_error = |w: &[f32], codes: &[u8]| {
                    let mut q = vec![0f32; cols];
                    edgelm_quant::dequantize_row(ty, codes, &mut q).expect("dequantizes");
                    let e: Vec<f64> = w.iter().zip(&q).map(|(a, b)| (a - b) as f64).collect();
                    let along: f64 = e.iter().zip(&means).map(|(e, &m)| e * m as f64).sum();
                    along * along
                        + (0..cols)
                            .map(|i| (importance[i] - means[i] * means[i]) as f64 * e[i] * e[i])
                            .sum::<f64>()
                };
                for _ in 0..40 {
                    let w: Vec<f32> = (0..cols).map(|_| rng.normal()).collect();
                    let mut a = w.clone();
                    let mut codes = vec![0u8; edgelm_quant::row_bytes(ty, cols).expect("blocks")];
                    closed
                        .quantize_row(ty, &mut a, &weights, &mut codes)
                        .expect("quantizes");
                    let mut b = w.clone();
                    let plain = quantize_row_plainly(&dense, ty, &mut b, &weights);
                    let equal: Vec<bool> = codes
                        .chunks_exact(bytes)
                        .zip(plain.chunks_exact(bytes))
                        .map(|(x, y)| x == y)
                        .collect();
                    let agreed = equal.iter().take_while(|&&e| e).count() * block;
                    for (j, (x, y)) in a.iter().zip(&b).take(agreed).enumerate() {
                        assert!(
                            (x - y).abs() <= 1e-3 * (1.0 + y.abs()),
                            "{ty} column {j}: {x} against {y}"
                        );
                    }
                    blocks += equal.len();
                    same += equal.iter().filter(|&&e| e).count();
                    closed_error += output_error(&w, &codes);
                    dense_error += output_error(&w, &plain);
                }
                assert!(
                    (closed_error - dense_error).abs() <= 0.05 * dense_error,
                    "{:?} {ty}: output error {closed_error} against {dense_error}",
                    compute.isa()
                );
                assert!(
                    same * 10 >= blocks * 8,
                    "{:?} {ty}: {same} of {blocks} blocks as the dense factor's",
                    compute.isa()
                );
            }
        }
        assert!(MeanFeedback::new(&importance, &means[1..]).is_err());
        means[3] = f32::NAN;
        assert!(MeanFeedback::new(&importance, &means).is_err());
    }

    #[test]
    fn bad_shapes_are_refused() {
        let compute = Compute::precise(edgelm_kernels::Isa::Scalar, 1);
        assert!(Compensator::new(&[1.0; 8], 3, &compute).is_err());
        assert!(Compensator::new(&[0.0; 9], 3, &compute).is_err());
        let c = Compensator::new(&[1.0, 0.0, 0.0, 1.0], 2, &compute).expect("identity");
        let mut row = vec![0f32; 32];
        assert!(c
            .quantize_rows(
                &compute,
                GgmlType::Q4_0,
                &mut row,
                &[1.0; 32],
                &mut [0u8; 18]
            )
            .is_err());
    }
}
