//! Matrix products over quantized weights, on one of two paths:
//! - **precise**: weight rows dequantized block by block to f32, every product and sum in f32;
//!   each task dequantizes a small panel of rows once and reuses it for every token of the batch.
//! - **fast**: activations quantized on the fly to the 8-bit block format the weight type pairs
//!   with, integer block dots (`qdot`), each weight row unpacked once for up to eight tokens.
//!
//! Rows are split across the pool in both. This file holds the context, its entry points and
//! their checks; `fast.rs` plans and runs the quantized products, `float.rs` the f32 ones.

use crate::interleave::PANEL as INTERLEAVED_PANEL;
use crate::interleave::{deinterleave_rows, interleave_rows};
use crate::qdot::{kernel_for, InterleavedDotFn, QuantKernel};
use crate::{Isa, ThreadPool};
use edgelm_quant::GgmlType;
use std::sync::Mutex;

mod fast;
mod float;

use fast::Plan;

/// Which arithmetic the products use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// f32 activations against dequantized weights: the reference for correctness.
    Precise,
    /// 8-bit activations and integer dot products, as llama.cpp computes.
    Fast,
}

/// Weight rows per kernel call: one interleaved panel; enough to amortize dispatch, small
/// enough to keep the rows in cache.
const ROWS_PER_TASK: usize = INTERLEAVED_PANEL;

/// A 2-D weight matrix in its stored type: `rows` rows of `cols` elements each.
#[derive(Debug, Clone, Copy)]
pub struct Weight<'a> {
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    pub data: &'a [u8],
    pub layout: Layout,
}

impl<'a> Weight<'a> {
    /// A weight as GGUF stores it.
    pub fn gguf(ty: GgmlType, rows: usize, cols: usize, data: &'a [u8]) -> Weight<'a> {
        Weight {
            ty,
            rows,
            cols,
            data,
            layout: Layout::Gguf,
        }
    }
}

/// How a weight's rows are laid out; each row keeps its byte size in both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Layout {
    #[default]
    Gguf,
    /// Repacked by [`Compute::interleave_into`] (see [`crate::interleave`]).
    Interleaved,
}

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("matmul shape mismatch: {0}")]
    Shape(String),
    #[error("weight type {0} cannot be dequantized")]
    Type(GgmlType),
}

/// The ISA, precision and threads every kernel call runs with; created once and handed down.
pub struct Compute {
    isa: Isa,
    precision: Precision,
    pool: ThreadPool,
    /// Fast-path kernels by weight type id, resolved once here so hot loops never re-dispatch.
    kernels: Vec<Option<QuantKernel>>,
    /// Quantized activations of the current fast matmul, reused across calls.
    activations: Mutex<Vec<u8>>,
}

/// How finely the fast path quantizes a matmul's input activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ActivationPrecision {
    /// One 8-bit block quantization, as llama.cpp does.
    #[default]
    Int8,
    /// The residual of the first quantization is quantized again and both are multiplied:
    /// about 15 bits of activation precision for one extra activation row in each integer dot
    /// (the weight block is unpacked once for both). For inputs with heavy outliers.
    Refined,
}

/// A raw pointer to elements shared by tasks that each touch their own (output values,
/// activation bytes, cache blocks).
struct Shared<T>(*mut T);
// SAFETY: tasks touch disjoint elements, and `run` joins them before the borrow ends; the
// elements themselves may move between threads (`T: Send`).
unsafe impl<T: Send> Send for Shared<T> {}
// SAFETY: as for `Send`.
unsafe impl<T: Send> Sync for Shared<T> {}

// By hand: a derive would ask `T: Copy`, and only the pointer is copied.
impl<T> Clone for Shared<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Shared<T> {}

impl<T> Shared<T> {
    /// A method, not a field access, so closures capture the whole `Sync` wrapper.
    fn get(self) -> *mut T {
        self.0
    }
}

impl Compute {
    /// A precise-path context (the reference arithmetic: f32 activations, dequantized weights).
    pub fn precise(isa: Isa, threads: usize) -> Compute {
        Compute::with_precision(isa, threads, Precision::Precise)
    }

    pub fn with_precision(isa: Isa, threads: usize, precision: Precision) -> Compute {
        let max_id = GgmlType::ALL.iter().map(|t| *t as usize).max().unwrap_or(0);
        let mut kernels = vec![None; max_id + 1];
        for ty in GgmlType::ALL {
            // Float weights keep f32 activations on the SIMD f32 tiles: more accurate, and faster
            // than rounding activations to 16 bits for a float dot product.
            let float = matches!(ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16);
            kernels[ty as usize] = if float { None } else { kernel_for(isa, ty) };
        }
        Compute {
            isa,
            precision,
            pool: ThreadPool::new(threads),
            kernels,
            activations: Mutex::new(Vec::new()),
        }
    }

    pub fn isa(&self) -> Isa {
        self.isa
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    pub fn pool(&self) -> &ThreadPool {
        &self.pool
    }

    pub fn n_threads(&self) -> usize {
        self.pool.n_threads()
    }

    /// `out[t·rows + r] = Σ_k W[r, k] · x[t·cols + k]` for `t < n_tokens`.
    pub fn matmul(
        &self,
        w: Weight<'_>,
        x: &[f32],
        n_tokens: usize,
        out: &mut [f32],
    ) -> Result<(), KernelError> {
        self.matmul_with(w, x, n_tokens, out, ActivationPrecision::Int8)
    }

    /// [`Compute::matmul`] with the fast path's activation precision chosen by the caller.
    pub fn matmul_with(
        &self,
        w: Weight<'_>,
        x: &[f32],
        n_tokens: usize,
        out: &mut [f32],
        act: ActivationPrecision,
    ) -> Result<(), KernelError> {
        let row_bytes = check_shapes(w, x, n_tokens, out)?;
        if w.layout == Layout::Interleaved && self.interleaved_kernel(w.ty).is_none() {
            // A weight repacked for another context: back to GGUF order (slow, never the
            // case for a model run with the context it was prepared for).
            let mut rows = vec![0u8; w.data.len()];
            deinterleave_rows(w.ty, row_bytes, w.data, &mut rows)
                .map_err(|e| KernelError::Shape(e.to_string()))?;
            let gguf = Weight::gguf(w.ty, w.rows, w.cols, &rows);
            return self.matmul_with(gguf, x, n_tokens, out, act);
        }
        if let Some(k) = self.quantized_kernel(w) {
            let plan = Plan {
                k,
                w,
                row_bytes,
                passes: passes(act),
                out: Shared(out.as_mut_ptr()),
            };
            self.run_plans(&[plan], x, n_tokens);
            return Ok(());
        }
        self.matmul_float(w, x, n_tokens, out, row_bytes);
        Ok(())
    }

    /// [`Compute::matmul_with`] for up to [`MAX_GROUP`] products of the same input `x`, in one
    /// fork/join where they all take the quantized kernels: while decoding, a fork/join costs
    /// about as much as a small product, so q, k and v (or gate and up) share one.
    pub fn matmul_group(
        &self,
        x: &[f32],
        n_tokens: usize,
        products: &mut [Product<'_, '_>],
    ) -> Result<(), KernelError> {
        let n = products.len();
        let mut plans: [Option<Plan<'_>>; MAX_GROUP] = [None; MAX_GROUP];
        for (slot, p) in plans.iter_mut().zip(products.iter_mut()) {
            let row_bytes = check_shapes(p.w, x, n_tokens, p.out)?;
            *slot = self.quantized_kernel(p.w).map(|k| Plan {
                k,
                w: p.w,
                row_bytes,
                passes: passes(p.act),
                out: Shared(p.out.as_mut_ptr()),
            });
        }
        if n == 0 || n > MAX_GROUP || plans[..n].iter().any(Option::is_none) {
            for p in products.iter_mut() {
                self.matmul_with(p.w, x, n_tokens, p.out, p.act)?;
            }
            return Ok(());
        }
        let list: [Plan<'_>; MAX_GROUP] =
            std::array::from_fn(|i| plans[i.min(n - 1)].expect("every product has a plan"));
        self.run_plans(&list[..n], x, n_tokens);
        Ok(())
    }

    /// The quantized kernel for `w` on this context, if the fast path has one for its type,
    /// width and layout.
    fn quantized_kernel(&self, w: Weight<'_>) -> Option<QuantKernel> {
        if self.precision != Precision::Fast {
            return None;
        }
        let k = self.kernels.get(w.ty as usize).copied().flatten()?;
        let layout_ok = w.layout == Layout::Gguf || k.interleaved.is_some();
        (layout_ok && k.act.bytes_for(w.cols as u64).is_some()).then_some(k)
    }

    /// The fast kernel for interleaved weights of type `ty`, if this context has one.
    fn interleaved_kernel(&self, ty: GgmlType) -> Option<InterleavedDotFn> {
        if self.precision != Precision::Fast {
            return None;
        }
        self.kernels
            .get(ty as usize)
            .copied()
            .flatten()?
            .interleaved
    }

    /// Whether this context's fast kernels read weights of type `ty` faster interleaved (see
    /// [`Compute::interleave_into`]).
    pub fn wants_interleaved(&self, ty: GgmlType) -> bool {
        self.interleaved_kernel(ty).is_some()
    }

    /// Repack `w` (GGUF layout) into `dst`, the same length, panels in parallel; pass the
    /// result to `matmul` as a [`Layout::Interleaved`] weight. Any run of whole panels
    /// ([`INTERLEAVED_PANEL`] rows) can be repacked on its own, so callers can release the
    /// source as they go.
    pub fn interleave_into(&self, w: Weight<'_>, dst: &mut [u8]) -> Result<(), KernelError> {
        let bad =
            || KernelError::Shape(format!("cannot interleave {} {}×{}", w.ty, w.rows, w.cols));
        if w.layout != Layout::Gguf
            || w.rows == 0
            || dst.len() != w.data.len()
            || !w.data.len().is_multiple_of(w.rows)
        {
            return Err(bad());
        }
        let row_bytes = w.data.len() / w.rows;
        let shared = Shared(dst.as_mut_ptr());
        let per_task = w
            .rows
            .div_ceil(4 * self.pool.n_threads())
            .next_multiple_of(INTERLEAVED_PANEL);
        let failed = std::sync::atomic::AtomicBool::new(false);
        self.pool.run(w.rows.div_ceil(per_task), &|task| {
            let rows = task * per_task..((task + 1) * per_task).min(w.rows);
            let bytes = rows.start * row_bytes..rows.end * row_bytes;
            // SAFETY: these rows' bytes are inside `dst` and written by this task only; `run`
            // joins before `dst` is used again.
            let out = unsafe {
                std::slice::from_raw_parts_mut(shared.get().add(bytes.start), bytes.len())
            };
            if interleave_rows(w.ty, row_bytes, &w.data[bytes], out).is_err() {
                failed.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        });
        if failed.into_inner() {
            Err(bad())
        } else {
            Ok(())
        }
    }
}

impl Compute {
    /// Run `f(i, chunk)` over consecutive `chunk_len`-element chunks of `data` (the last may be
    /// shorter), spread over the pool: for element-wise work too large for one thread.
    pub fn par_chunks_mut<T: Send>(
        &self,
        data: &mut [T],
        chunk_len: usize,
        f: &(dyn Fn(usize, &mut [T]) + Sync),
    ) {
        let chunk_len = chunk_len.max(1);
        let len = data.len();
        let shared = Shared(data.as_mut_ptr());
        self.pool.run(len.div_ceil(chunk_len), &|i| {
            let start = i * chunk_len;
            let n = chunk_len.min(len - start);
            // SAFETY: chunk i is [start, start + n) inside `data`, disjoint from every other
            // task's, and `run` joins all tasks before the borrow of `data` ends.
            f(i, unsafe {
                std::slice::from_raw_parts_mut(shared.get().add(start), n)
            });
        });
    }

    /// Run `f(i, &mut data[ranges[i]])` for every range, spread over the pool: for work whose
    /// pieces differ in size. Panics if the ranges are not in order and disjoint, or run past
    /// `data`.
    pub fn par_ranges_mut(
        &self,
        data: &mut [f32],
        ranges: &[std::ops::Range<usize>],
        f: &(dyn Fn(usize, &mut [f32]) + Sync),
    ) {
        let mut end = 0;
        for r in ranges {
            assert!(
                end <= r.start && r.start <= r.end && r.end <= data.len(),
                "par_ranges_mut: range {r:?} overlaps the one before or runs past {}",
                data.len()
            );
            end = r.end;
        }
        let shared = Shared(data.as_mut_ptr());
        self.pool.run(ranges.len(), &|i| {
            let r = &ranges[i];
            // SAFETY: the ranges are disjoint and inside `data` (checked above), and `run` joins
            // all tasks before the borrow of `data` ends.
            f(i, unsafe {
                std::slice::from_raw_parts_mut(shared.get().add(r.start), r.len())
            });
        });
    }

    /// `Σ a[i]·b[i]` over the shorter length.
    pub fn dot(&self, a: &[f32], b: &[f32]) -> f32 {
        match self.isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Isa::Avx2`/`Avx512` are only chosen when the CPU has AVX2 and FMA.
            Isa::Avx2 | Isa::AvxVnni | Isa::Avx512 => unsafe { crate::x86::avx2::dot(a, b) },
            _ => scalar_dot(a, b),
        }
    }

    /// `y[i] += a·x[i]`.
    pub fn axpy(&self, a: f32, x: &[f32], y: &mut [f32]) {
        match self.isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as in `dot`.
            Isa::Avx2 | Isa::AvxVnni | Isa::Avx512 => unsafe { crate::x86::avx2::axpy(a, x, y) },
            _ => x.iter().zip(y.iter_mut()).for_each(|(x, y)| *y += a * x),
        }
    }
}

/// Products one [`Compute::matmul_group`] fuses: q, k and v; gate and up.
pub const MAX_GROUP: usize = 4;

/// One product of a [`Compute::matmul_group`]: a weight, its activation precision, its output.
pub struct Product<'w, 'o> {
    pub w: Weight<'w>,
    pub act: ActivationPrecision,
    pub out: &'o mut [f32],
}

/// Activation passes of a precision: refined ones add the 8-bit residual.
fn passes(act: ActivationPrecision) -> usize {
    if act == ActivationPrecision::Refined {
        2
    } else {
        1
    }
}

/// Bytes per row of `w` once `w`, `x` and `out` agree on their shapes and the type is readable.
fn check_shapes(
    w: Weight<'_>,
    x: &[f32],
    n_tokens: usize,
    out: &[f32],
) -> Result<usize, KernelError> {
    let row_bytes = w.ty.bytes_for(w.cols as u64).ok_or_else(|| {
        KernelError::Shape(format!("{} columns are not whole {} blocks", w.cols, w.ty))
    })? as usize;
    if w.data.len() != row_bytes * w.rows {
        return Err(KernelError::Shape(format!(
            "{} bytes of {} for {}×{}",
            w.data.len(),
            w.ty,
            w.rows,
            w.cols
        )));
    }
    if x.len() != n_tokens * w.cols || out.len() != n_tokens * w.rows {
        return Err(KernelError::Shape(format!(
            "x has {} values and out {}, expected {}×{} and {}×{}",
            x.len(),
            out.len(),
            n_tokens,
            w.cols,
            n_tokens,
            w.rows
        )));
    }
    if !edgelm_quant::can_dequantize(w.ty) {
        return Err(KernelError::Type(w.ty));
    }
    Ok(row_bytes)
}

/// Scalar reference dot product (the AVX2 path is tested against it).
pub(crate) fn scalar_dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(a, b)| a * b).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_rng::Rng;

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    /// Every ISA's matmul equals a plain f64 product, for odd shapes hitting every tile remainder.
    #[test]
    fn matmul_matches_reference_on_every_isa() {
        let mut rng = Rng(0x1234_5678_9abc_def1);
        for isa in Isa::available() {
            let c = Compute::precise(isa, 2);
            for &(rows, cols, n_tokens) in
                &[(1, 1, 1), (5, 13, 2), (37, 40, 7), (16, 64, 3), (33, 96, 5)]
            {
                let wv: Vec<f32> = (0..rows * cols).map(|_| rng.unit()).collect();
                let x: Vec<f32> = (0..n_tokens * cols).map(|_| rng.unit()).collect();
                let data = f32_bytes(&wv);
                let w = Weight {
                    ty: GgmlType::F32,
                    rows,
                    cols,
                    data: &data,
                    layout: Layout::Gguf,
                };
                let mut out = vec![0f32; rows * n_tokens];
                c.matmul(w, &x, n_tokens, &mut out).unwrap();
                for t in 0..n_tokens {
                    for r in 0..rows {
                        let want: f64 = (0..cols)
                            .map(|k| wv[r * cols + k] as f64 * x[t * cols + k] as f64)
                            .sum();
                        let got = out[t * rows + r] as f64;
                        assert!(
                            (got - want).abs() < 1e-4,
                            "{isa} {rows}x{cols}x{n_tokens}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn simd_dot_and_axpy_match_scalar() {
        let mut rng = Rng(99);
        for isa in Isa::available() {
            let c = Compute::precise(isa, 1);
            for n in [0, 1, 7, 8, 9, 31, 64, 100] {
                let a: Vec<f32> = (0..n).map(|_| rng.unit()).collect();
                let b: Vec<f32> = (0..n).map(|_| rng.unit()).collect();
                assert!(
                    (c.dot(&a, &b) - scalar_dot(&a, &b)).abs() < 1e-5,
                    "{isa} n={n}"
                );
                let mut y1 = b.clone();
                let mut y2 = b.clone();
                c.axpy(0.7, &a, &mut y1);
                y2.iter_mut().zip(&a).for_each(|(y, x)| *y += 0.7 * x);
                for (p, q) in y1.iter().zip(&y2) {
                    assert!((p - q).abs() < 1e-6, "{isa}");
                }
            }
        }
    }

    /// The fast path on every ISA and layout equals the integer reference.
    #[test]
    fn fast_matmul_matches_integer_reference() {
        let mut rng = Rng(0xfeed_beef);
        let types = [
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q5_0,
            GgmlType::Q8_0,
            GgmlType::Q4_K,
            GgmlType::Q6_K,
            GgmlType::IQ4_NL,
            GgmlType::IQ4_XS,
        ];
        for isa in Isa::available() {
            let c = Compute::with_precision(isa, 2, Precision::Fast);
            for ty in types {
                let (rows, cols, n_tokens) = (37, 512, 27);
                let wf: Vec<f32> = (0..rows * cols).map(|_| rng.unit()).collect();
                let row_bytes = ty.bytes_for(cols as u64).unwrap() as usize;
                let mut data = vec![0u8; rows * row_bytes];
                for r in 0..rows {
                    edgelm_quant::quantize_row(
                        ty,
                        &wf[r * cols..(r + 1) * cols],
                        &mut data[r * row_bytes..(r + 1) * row_bytes],
                    )
                    .unwrap();
                }
                let x: Vec<f32> = (0..n_tokens * cols).map(|_| rng.unit()).collect();
                let gguf = Weight::gguf(ty, rows, cols, &data);
                let mut out = vec![0f32; rows * n_tokens];
                c.matmul(gguf, &x, n_tokens, &mut out).unwrap();
                // Interleaved too where the ISA repacks: whole panels (the decode-once prompt
                // path, more tokens than one tile) and a partial one.
                let mut repacked = vec![0u8; data.len()];
                if c.wants_interleaved(ty) {
                    c.interleave_into(gguf, &mut repacked).unwrap();
                    let w = Weight {
                        layout: Layout::Interleaved,
                        data: &repacked,
                        ..gguf
                    };
                    let mut y = vec![0f32; rows * n_tokens];
                    c.matmul(w, &x, n_tokens, &mut y).unwrap();
                    for (p, q) in out.iter().zip(&y) {
                        assert!(
                            (p - q).abs() <= 1e-4 * (1.0 + q.abs()),
                            "{isa} {ty}: {p} {q}"
                        );
                    }
                }
                let act = edgelm_quant::int_dot::activation_type(ty);
                let act_bytes = act.bytes_for(cols as u64).unwrap() as usize;
                for t in 0..n_tokens {
                    let mut a = vec![0u8; act_bytes];
                    edgelm_quant::quantize_row(act, &x[t * cols..(t + 1) * cols], &mut a).unwrap();
                    for r in 0..rows {
                        let want = edgelm_quant::int_dot::vec_dot(
                            ty,
                            &data[r * row_bytes..(r + 1) * row_bytes],
                            &a,
                        )
                        .unwrap();
                        let got = out[t * rows + r];
                        assert!(
                            (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                            "{isa} {ty}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    /// Refined activations (two passes: the 8-bit rows and their residual) give the sum of both
    /// passes' integer dots on every ISA and layout, with several tokens per tile.
    #[test]
    fn refined_matmul_sums_both_passes() {
        let mut rng = Rng(0x5eed_0002);
        for isa in Isa::available() {
            let c = Compute::with_precision(isa, 2, Precision::Fast);
            for ty in [
                GgmlType::Q5_0,
                GgmlType::Q8_0,
                GgmlType::Q4_K,
                GgmlType::IQ4_NL,
                GgmlType::IQ4_XS,
            ] {
                let (rows, cols, n_tokens) = (19, 512, 7);
                let wf: Vec<f32> = (0..rows * cols).map(|_| rng.unit()).collect();
                let row_bytes = ty.bytes_for(cols as u64).unwrap() as usize;
                let mut data = vec![0u8; rows * row_bytes];
                for (src, dst) in wf.chunks_exact(cols).zip(data.chunks_exact_mut(row_bytes)) {
                    edgelm_quant::quantize_row(ty, src, dst).unwrap();
                }
                let w = Weight::gguf(ty, rows, cols, &data);
                let mut packed = vec![0u8; data.len()];
                let interleaved = c.wants_interleaved(ty).then(|| {
                    c.interleave_into(w, &mut packed).unwrap();
                    Weight {
                        layout: Layout::Interleaved,
                        data: &packed,
                        ..w
                    }
                });
                let x: Vec<f32> = (0..n_tokens * cols).map(|_| rng.unit()).collect();
                let act = edgelm_quant::int_dot::activation_type(ty);
                let act_bytes = act.bytes_for(cols as u64).unwrap() as usize;
                for w in [Some(w), interleaved].into_iter().flatten() {
                    let mut out = vec![0f32; rows * n_tokens];
                    c.matmul_with(w, &x, n_tokens, &mut out, ActivationPrecision::Refined)
                        .unwrap();
                    for t in 0..n_tokens {
                        let xt = &x[t * cols..(t + 1) * cols];
                        let (mut a1, mut a2) = (vec![0u8; act_bytes], vec![0u8; act_bytes]);
                        edgelm_quant::quantize_row(act, xt, &mut a1).unwrap();
                        let mut residual = vec![0f32; cols];
                        edgelm_quant::dequantize_row(act, &a1, &mut residual).unwrap();
                        residual.iter_mut().zip(xt).for_each(|(r, x)| *r = x - *r);
                        edgelm_quant::quantize_row(act, &residual, &mut a2).unwrap();
                        for r in 0..rows {
                            let row = &data[r * row_bytes..(r + 1) * row_bytes];
                            let want = edgelm_quant::int_dot::vec_dot(ty, row, &a1).unwrap()
                                + edgelm_quant::int_dot::vec_dot(ty, row, &a2).unwrap();
                            let got = out[t * rows + r];
                            assert!(
                                (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                                "{isa} {ty} {:?}: token {t} row {r}: {got} vs {want}",
                                w.layout
                            );
                        }
                    }
                }
            }
        }
    }

    /// A group of products over one input (mixed types, layouts and precisions, two reading
    /// the same activations, and a float weight that forces the unfused fallback) gives exactly
    /// each product's own result.
    #[test]
    fn matmul_group_equals_separate_products() {
        let mut rng = Rng(0x9e37_79b9);
        let (cols, n_tokens) = (256, 3);
        let x: Vec<f32> = (0..n_tokens * cols).map(|_| rng.unit()).collect();
        let specs = [
            (GgmlType::Q5_0, 40, ActivationPrecision::Int8),
            (GgmlType::Q8_0, 24, ActivationPrecision::Refined),
            (GgmlType::Q5_0, 33, ActivationPrecision::Int8),
            (GgmlType::Q4_K, 17, ActivationPrecision::Int8),
            (GgmlType::F16, 9, ActivationPrecision::Int8),
        ];
        let weights: Vec<(GgmlType, usize, ActivationPrecision, Vec<u8>)> = specs
            .iter()
            .map(|&(ty, rows, act)| {
                let wf: Vec<f32> = (0..rows * cols).map(|_| rng.unit()).collect();
                let mut data = vec![0u8; ty.bytes_for((rows * cols) as u64).unwrap() as usize];
                edgelm_quant::quantize_row(ty, &wf, &mut data).unwrap();
                (ty, rows, act, data)
            })
            .collect();
        for isa in Isa::available() {
            for precision in [Precision::Fast, Precision::Precise] {
                let c = Compute::with_precision(isa, 2, precision);
                let packed: Vec<Vec<u8>> = weights
                    .iter()
                    .map(|(ty, rows, _, data)| {
                        let w = Weight::gguf(*ty, *rows, cols, data);
                        let mut p = data.clone();
                        if c.wants_interleaved(*ty) {
                            c.interleave_into(w, &mut p).unwrap();
                        }
                        p
                    })
                    .collect();
                let view = |i: usize| {
                    let (ty, rows, _, _) = &weights[i];
                    let layout = if c.wants_interleaved(*ty) {
                        Layout::Interleaved
                    } else {
                        Layout::Gguf
                    };
                    Weight {
                        layout,
                        ..Weight::gguf(*ty, *rows, cols, &packed[i])
                    }
                };
                // The quantized four fuse (the two Q5_0 sharing their activations); with the
                // float weight the group falls back to one product at a time.
                for n in [4, 5] {
                    let mut outs: Vec<Vec<f32>> = (0..n)
                        .map(|i| vec![f32::NAN; weights[i].1 * n_tokens])
                        .collect();
                    let mut products: Vec<Product<'_, '_>> = outs
                        .iter_mut()
                        .enumerate()
                        .map(|(i, out)| Product {
                            w: view(i),
                            act: weights[i].2,
                            out,
                        })
                        .collect();
                    c.matmul_group(&x, n_tokens, &mut products).unwrap();
                    for (i, out) in outs.iter().enumerate() {
                        let mut alone = vec![f32::NAN; out.len()];
                        c.matmul_with(view(i), &x, n_tokens, &mut alone, weights[i].2)
                            .unwrap();
                        assert_eq!(*out, alone, "{isa} {precision:?}: product {i} of {n}");
                    }
                }
            }
        }
    }

    /// Float weights take the f32 tiles on the fast path too, so both paths agree exactly.
    #[test]
    fn float_weights_keep_f32_activations_on_the_fast_path() {
        let mut rng = Rng(77);
        let (rows, cols, n_tokens) = (9, 40, 5);
        let wf: Vec<f32> = (0..rows * cols).map(|_| rng.unit()).collect();
        let mut data = vec![0u8; rows * cols * 2];
        edgelm_quant::quantize_row(GgmlType::F16, &wf, &mut data).unwrap();
        let x: Vec<f32> = (0..n_tokens * cols).map(|_| rng.unit()).collect();
        let w = Weight {
            ty: GgmlType::F16,
            rows,
            cols,
            data: &data,
            layout: Layout::Gguf,
        };
        let run = |p| {
            let mut out = vec![0f32; rows * n_tokens];
            Compute::with_precision(Isa::detect(), 2, p)
                .matmul(w, &x, n_tokens, &mut out)
                .unwrap();
            out
        };
        assert_eq!(run(Precision::Fast), run(Precision::Precise));
    }

    /// F32, F16 and BF16 weights on every ISA this CPU runs, for token counts on both sides of
    /// F16 rows multiplied as stored (≤ 24 tokens) and through the strips, row lengths off the
    /// eight-lane step, against an f64 product of the stored values.
    #[test]
    fn float_weights_match_the_scalar_reference_on_every_path() {
        let mut rng = Rng(91);
        // 43 columns: a tail past every vector width; 96: whole vectors of 8 and 16.
        for (ty, cols) in [GgmlType::F32, GgmlType::F16, GgmlType::BF16]
            .into_iter()
            .flat_map(|ty| [(ty, 43), (ty, 96)])
        {
            // 37 rows: a partial strip after whole ones of 16 and of 32.
            let rows = 37;
            let wf: Vec<f32> = (0..rows * cols).map(|_| rng.unit()).collect();
            let mut data = vec![0u8; edgelm_quant::row_bytes(ty, cols).unwrap() * rows];
            edgelm_quant::quantize_row(ty, &wf, &mut data).unwrap();
            let mut stored = vec![0f32; rows * cols];
            edgelm_quant::dequantize_row(ty, &data, &mut stored).unwrap();
            let w = Weight::gguf(ty, rows, cols, &data);
            // Past the F16 rows as stored (≤ 24 tokens), whole strip tiles of 6 and 12 tokens and
            // partial ones.
            for n_tokens in [1, 2, 3, 4, 5, 9, 14, 29, 36] {
                let x: Vec<f32> = (0..n_tokens * cols).map(|_| rng.unit()).collect();
                for isa in Isa::available() {
                    let mut out = vec![0f32; rows * n_tokens];
                    Compute::with_precision(isa, 2, Precision::Fast)
                        .matmul(w, &x, n_tokens, &mut out)
                        .unwrap();
                    for t in 0..n_tokens {
                        for r in 0..rows {
                            let want: f64 = (0..cols)
                                .map(|k| stored[r * cols + k] as f64 * x[t * cols + k] as f64)
                                .sum();
                            let got = out[t * rows + r] as f64;
                            assert!(
                                (got - want).abs() <= 1e-5 * want.abs().max(1.0),
                                "{ty} {isa:?} {n_tokens} tokens, row {r}: {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// A token's product with float weights is the same bits alone, in a few tokens (rows as
    /// stored or widened four at a time) and among many (the strips): what `edgelm serve`
    /// promises, a greedy answer that does not depend on the load.
    #[test]
    fn float_products_do_not_depend_on_the_batch() {
        let mut rng = Rng(17);
        let (rows, n) = (37, 40);
        for (ty, cols) in [GgmlType::F32, GgmlType::F16, GgmlType::BF16]
            .into_iter()
            .flat_map(|ty| [(ty, 43), (ty, 96)])
        {
            let wf: Vec<f32> = (0..rows * cols).map(|_| rng.unit()).collect();
            let mut data = vec![0u8; edgelm_quant::row_bytes(ty, cols).unwrap() * rows];
            edgelm_quant::quantize_row(ty, &wf, &mut data).unwrap();
            let w = Weight::gguf(ty, rows, cols, &data);
            let x: Vec<f32> = (0..n * cols).map(|_| rng.unit()).collect();
            for isa in Isa::available() {
                for precision in [Precision::Fast, Precision::Precise] {
                    let c = Compute::with_precision(isa, 2, precision);
                    let product = |first: usize, count: usize| {
                        let mut out = vec![0f32; rows * count];
                        c.matmul(w, &x[first * cols..(first + count) * cols], count, &mut out)
                            .unwrap();
                        out
                    };
                    let all = product(0, n);
                    for (first, count) in [(0, 1), (7, 1), (39, 1), (3, 5), (10, 24), (2, 30)] {
                        assert_eq!(
                            product(first, count),
                            all[first * rows..(first + count) * rows],
                            "{ty} {isa:?} {precision:?}: tokens {first}..{} alone",
                            first + count
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn shape_errors() {
        let c = Compute::precise(Isa::Scalar, 1);
        let data = vec![0u8; 16];
        let w = Weight {
            ty: GgmlType::F32,
            rows: 2,
            cols: 2,
            data: &data,
            layout: Layout::Gguf,
        };
        let mut out = vec![0f32; 2];
        assert!(c.matmul(w, &[0.0; 3], 1, &mut out).is_err());
        let w = Weight {
            ty: GgmlType::F32,
            rows: 3,
            cols: 2,
            data: &data,
            layout: Layout::Gguf,
        };
        assert!(c.matmul(w, &[0.0; 2], 1, &mut out).is_err());
    }
}
