//! The precise path's products, and the fast path's for float weights: rows widened to f32
//! panels (or F16 rows multiplied as stored, for a few tokens), every product and sum in f32.

use super::{scalar_dot, Compute, SharedOut, Weight, ROWS_PER_TASK};
use crate::Isa;
use edgelm_quant::{dequantize_row, GgmlType};
use std::cell::RefCell;

/// How far ahead of its tile the few-token F16 product requests rows (8 KiB measured best on
/// Gemma 3's 1280-byte rows, within noise of 16 KiB on SmolLM2's 1152).
#[cfg(target_arch = "x86_64")]
const F16_PREFETCH_BYTES: usize = 8 << 10;

thread_local! {
    static PANEL: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

impl Compute {
    /// `out = x·wᵀ` for weights the quantized kernels do not take, shapes checked (`row_bytes`
    /// per row).
    pub(super) fn matmul_float(
        &self,
        w: Weight<'_>,
        x: &[f32],
        n_tokens: usize,
        out: &mut [f32],
        row_bytes: usize,
    ) {
        let shared = SharedOut(out.as_mut_ptr());
        let isa = self.isa;
        // A few tokens read each F16 row once: multiply it as stored instead of converting it
        // to an f32 panel first (which only pays back over many tokens), each thread streaming
        // one contiguous range of rows (as the quantized products while decoding).
        #[cfg(target_arch = "x86_64")]
        if w.ty == GgmlType::F16
            && matches!(isa, Isa::Avx2 | Isa::AvxVnni | Isa::Avx512)
            && n_tokens <= 4
            && (w.data.as_ptr() as usize).is_multiple_of(2)
        {
            let per_task = w
                .rows
                .div_ceil(self.pool.n_threads())
                .next_multiple_of(ROWS_PER_TASK);
            self.pool.run(w.rows.div_ceil(per_task), &|task| {
                let r0 = task * per_task;
                let r1 = (r0 + per_task).min(w.rows);
                let mut r = r0;
                while r < r1 {
                    let nr = (r1 - r).min(4);
                    // Rows a few KiB ahead requested now: one core streaming F16 rows read ~17
                    // GB/s here without, and decoding ran 30–50% faster with.
                    let ahead = r + (F16_PREFETCH_BYTES / row_bytes).max(4);
                    crate::x86::prefetch(
                        w.data.as_ptr().wrapping_add(ahead * row_bytes),
                        nr * row_bytes,
                    );
                    let mut t = 0;
                    while t < n_tokens {
                        let nt = (n_tokens - t).min(3);
                        // SAFETY: AVX2/FMA/F16C present (Isa); rows r..r+nr of `w` (2-byte
                        // aligned, checked above) and tokens t..t+nt of `x` are in bounds;
                        // (token, row) pairs of this task's rows are written by it alone.
                        unsafe {
                            float_tile(
                                isa,
                                |i| w.data[i * row_bytes..].as_ptr().cast::<u16>(),
                                r,
                                nr,
                                w.cols,
                                x,
                                t,
                                nt,
                                &mut |i, j, v| *shared.get().add(j * w.rows + i) = v,
                            )
                        };
                        t += nt;
                    }
                    r += nr;
                }
            });
            return;
        }
        let n_tasks = w.rows.div_ceil(ROWS_PER_TASK);
        self.pool.run(n_tasks, &|task| {
            let r0 = task * ROWS_PER_TASK;
            let r1 = (r0 + ROWS_PER_TASK).min(w.rows);
            PANEL.with(|panel| {
                let mut panel = panel.borrow_mut();
                panel.resize(ROWS_PER_TASK * w.cols, 0.0);
                for r in r0..r1 {
                    let dst = &mut panel[(r - r0) * w.cols..(r - r0 + 1) * w.cols];
                    float_row(isa, w.ty, &w.data[r * row_bytes..(r + 1) * row_bytes], dst);
                }
                let rows = r1 - r0;
                panel_times_x(
                    isa,
                    &panel[..rows * w.cols],
                    rows,
                    w.cols,
                    x,
                    n_tokens,
                    |r, t, v| {
                        // SAFETY: (t, r0 + r) is inside `out` and owned by this task alone.
                        unsafe { *shared.get().add(t * w.rows + r0 + r) = v }
                    },
                );
            });
        });
    }
}

/// One weight row as f32: 16-bit floats converted eight at a time where the ISA can, the rest
/// (and the precise path's quantized types) through edgelm-quant's dequantizer.
fn float_row(isa: Isa, ty: GgmlType, src: &[u8], dst: &mut [f32]) {
    match (isa, ty) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the Avx2 tier is chosen only on CPUs with AVX2, FMA and F16C (Isa); `src` is
        // one row of `dst.len()` 16-bit values (shapes checked by the caller).
        (Isa::Avx2 | Isa::AvxVnni | Isa::Avx512, GgmlType::F16) => unsafe {
            crate::x86::avx2::f16_to_f32(src, dst)
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        (Isa::Avx2 | Isa::AvxVnni | Isa::Avx512, GgmlType::BF16) => unsafe {
            crate::x86::avx2::bf16_to_f32(src, dst)
        },
        // Shape and type were checked by the caller, so this cannot fail.
        _ => {
            let _ = dequantize_row(ty, src, dst);
        }
    }
}

/// Every row of an f32 panel against every token row of `x`, reported through `put(r, t, v)`.
fn panel_times_x(
    isa: Isa,
    panel: &[f32],
    rows: usize,
    cols: usize,
    x: &[f32],
    n_tokens: usize,
    mut put: impl FnMut(usize, usize, f32),
) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::AvxVnni | Isa::Avx512 => {
            let mut r = 0;
            while r < rows {
                let nr = (rows - r).min(4);
                let mut t = 0;
                while t < n_tokens {
                    let nt = (n_tokens - t).min(3);
                    // SAFETY: AVX2/FMA present (Isa); row r+i and token t+j are in bounds.
                    unsafe {
                        float_tile(
                            isa,
                            |i| panel[i * cols..].as_ptr(),
                            r,
                            nr,
                            cols,
                            x,
                            t,
                            nt,
                            &mut put,
                        )
                    };
                    t += nt;
                }
                r += nr;
            }
        }
        _ => {
            for r in 0..rows {
                let w = &panel[r * cols..(r + 1) * cols];
                for t in 0..n_tokens {
                    put(r, t, scalar_dot(w, &x[t * cols..(t + 1) * cols]));
                }
            }
        }
    }
}

/// A weight row element the float tiles multiply as stored: f32, or F16 bits (widened by
/// F16C, or by AVX-512's 16-wide convert).
#[cfg(target_arch = "x86_64")]
trait TileElem: Sized {
    /// The tile on `isa` (AVX2 or AVX-512).
    ///
    /// # Safety
    /// The CPU has what `isa`'s kernel needs; every pointer is valid for `k` elements.
    unsafe fn tile<const R: usize, const T: usize>(
        isa: Isa,
        w: &[*const Self; R],
        xs: &[*const f32; T],
        k: usize,
        out: &mut [[f32; T]; R],
    );
}

#[cfg(target_arch = "x86_64")]
impl TileElem for f32 {
    unsafe fn tile<const R: usize, const T: usize>(
        isa: Isa,
        w: &[*const f32; R],
        xs: &[*const f32; T],
        k: usize,
        out: &mut [[f32; T]; R],
    ) {
        match isa {
            Isa::Avx512 => crate::x86::avx512_float::tile::<R, T>(w, xs, k, out),
            _ => crate::x86::avx2::tile::<R, T>(w, xs, k, out),
        }
    }
}

#[cfg(target_arch = "x86_64")]
impl TileElem for u16 {
    unsafe fn tile<const R: usize, const T: usize>(
        isa: Isa,
        w: &[*const u16; R],
        xs: &[*const f32; T],
        k: usize,
        out: &mut [[f32; T]; R],
    ) {
        match isa {
            Isa::Avx512 => crate::x86::avx512_float::tile_f16::<R, T>(w, xs, k, out),
            _ => crate::x86::avx2::tile_f16::<R, T>(w, xs, k, out),
        }
    }
}

/// Dispatch a runtime-sized tile (≤4 rows × ≤3 tokens) to its const-generic kernel on `isa`
/// (AVX2 or AVX-512); `row(i)` points at weight row i.
///
/// # Safety
/// `isa`'s features (AVX2, FMA and F16C at least) are available; rows `r..r+nr` hold `cols`
/// elements each and tokens `t..t+nt` of `x` exist.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn float_tile<E: TileElem>(
    isa: Isa,
    row: impl Fn(usize) -> *const E,
    r: usize,
    nr: usize,
    cols: usize,
    x: &[f32],
    t: usize,
    nt: usize,
    put: &mut impl FnMut(usize, usize, f32),
) {
    unsafe fn go<E: TileElem, const R: usize, const T: usize>(
        isa: Isa,
        row: impl Fn(usize) -> *const E,
        r: usize,
        cols: usize,
        x: &[f32],
        t: usize,
        put: &mut impl FnMut(usize, usize, f32),
    ) {
        let w: [*const E; R] = std::array::from_fn(|i| row(r + i));
        let xs: [*const f32; T] = std::array::from_fn(|j| x[(t + j) * cols..].as_ptr());
        let mut out = [[0f32; T]; R];
        E::tile::<R, T>(isa, &w, &xs, cols, &mut out);
        for (i, row) in out.iter().enumerate() {
            for (j, v) in row.iter().enumerate() {
                put(r + i, t + j, *v);
            }
        }
    }
    match (nr, nt) {
        (4, 3) => go::<E, 4, 3>(isa, row, r, cols, x, t, put),
        (4, 2) => go::<E, 4, 2>(isa, row, r, cols, x, t, put),
        (4, 1) => go::<E, 4, 1>(isa, row, r, cols, x, t, put),
        (3, 3) => go::<E, 3, 3>(isa, row, r, cols, x, t, put),
        (3, 2) => go::<E, 3, 2>(isa, row, r, cols, x, t, put),
        (3, 1) => go::<E, 3, 1>(isa, row, r, cols, x, t, put),
        (2, 3) => go::<E, 2, 3>(isa, row, r, cols, x, t, put),
        (2, 2) => go::<E, 2, 2>(isa, row, r, cols, x, t, put),
        (2, 1) => go::<E, 2, 1>(isa, row, r, cols, x, t, put),
        (1, 3) => go::<E, 1, 3>(isa, row, r, cols, x, t, put),
        (1, 2) => go::<E, 1, 2>(isa, row, r, cols, x, t, put),
        _ => go::<E, 1, 1>(isa, row, r, cols, x, t, put),
    }
}
