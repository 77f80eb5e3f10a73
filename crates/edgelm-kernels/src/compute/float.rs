//! The precise path's products, and the fast path's for float weights: for a few tokens rows
//! read as stored (F16) or widened to f32 four at a time, for many rows widened into strips (rows
//! side by side); every product and sum in f32, in the same order either way.

use super::{scalar_dot, Compute, Shared, Weight, ROWS_PER_TASK};
use crate::Isa;
use edgelm_quant::{dequantize_row, GgmlType};
use std::cell::RefCell;

/// How far ahead of its tile the few-token product requests rows, whatever their float type
/// (8 KiB measured best on Gemma 3's 1280-byte F16 rows, within noise of 16 KiB on SmolLM2's 1152).
#[cfg(target_arch = "x86_64")]
const PREFETCH_AHEAD_BYTES: usize = 8 << 10;

/// Up to this many tokens a float product reads its rows as they are (F16) or widened four at
/// a time; more take the strips, whose widening and transposing (~155 µs per million weights on
/// one Zen 5 core) pays back from about 32 tokens: `cargo bench --bench kernels -- f16_`,
/// 1024×896, one thread, µs by tokens, rows as stored / strips: 6: 77 / 175, 12: 155 / 199, 24:
/// 279 / 295.
#[cfg(target_arch = "x86_64")]
const FEW_TOKENS_MAX: usize = 24;

/// A strip kernel: `(strip, steps, x, k, first token, tokens, phase, out)`, as
/// `avx2::strip_tile`.
#[cfg(target_arch = "x86_64")]
type StripTile<const W: usize, const T: usize> =
    unsafe fn(&[f32], usize, &[f32], usize, usize, usize, usize, &mut [[f32; W]; T]);

thread_local! {
    /// A task's widened rows: one row (scalar path), four (few tokens), or W rows and their strip.
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
        let shared = Shared(out.as_mut_ptr());
        let isa = self.isa;
        // A few tokens read each row once: F16 rows are multiplied as stored, other rows widened
        // four at a time into a small buffer, instead of a strip (which only pays back over many
        // tokens); each thread streams one contiguous range of rows (as the quantized products
        // while decoding).
        #[cfg(target_arch = "x86_64")]
        if matches!(isa, Isa::Avx2 | Isa::AvxVnni | Isa::Avx512) && n_tokens <= FEW_TOKENS_MAX {
            let as_stored = w.ty == GgmlType::F16 && (w.data.as_ptr() as usize).is_multiple_of(2);
            let per_task = w
                .rows
                .div_ceil(self.pool.n_threads())
                .next_multiple_of(ROWS_PER_TASK);
            self.pool.run(w.rows.div_ceil(per_task), &|task| {
                let r0 = task * per_task;
                let r1 = (r0 + per_task).min(w.rows);
                PANEL.with_borrow_mut(|widened| {
                    widened.resize(4 * w.cols, 0.0);
                    let mut r = r0;
                    while r < r1 {
                        let nr = (r1 - r).min(4);
                        // Rows a few KiB ahead requested now: one core streaming F16 rows read
                        // ~17 GB/s here without, and decoding ran 30–50% faster with.
                        let ahead = r + (PREFETCH_AHEAD_BYTES / row_bytes).max(4);
                        crate::x86::prefetch(
                            w.data.as_ptr().wrapping_add(ahead * row_bytes),
                            nr * row_bytes,
                        );
                        if !as_stored {
                            for (i, row) in widened.chunks_exact_mut(w.cols).take(nr).enumerate() {
                                let src = &w.data[(r + i) * row_bytes..(r + i + 1) * row_bytes];
                                float_row(isa, w.ty, src, row);
                            }
                        }
                        let mut put = |i: usize, j: usize, v: f32| {
                            // SAFETY: (token j, row i) is inside `out`, and this task's rows
                            // are written by it alone.
                            unsafe { *shared.get().add(j * w.rows + i) = v }
                        };
                        let mut t = 0;
                        while t < n_tokens {
                            let nt = (n_tokens - t).min(3);
                            // SAFETY: AVX2/FMA/F16C present (Isa); rows r..r+nr (of `w`, 2-byte
                            // aligned as checked, or widened) and tokens t..t+nt of `x` are in
                            // bounds.
                            unsafe {
                                if as_stored {
                                    let row = |i| w.data[i * row_bytes..].as_ptr().cast::<u16>();
                                    few_tile(row, r, nr, w.cols, x, t, nt, &mut put)
                                } else {
                                    let row = |i| widened[(i - r) * w.cols..].as_ptr();
                                    few_tile(row, r, nr, w.cols, x, t, nt, &mut put)
                                }
                            };
                            t += nt;
                        }
                        r += nr;
                    }
                });
            });
            return;
        }
        #[cfg(target_arch = "x86_64")]
        match isa {
            Isa::Avx512 => {
                use crate::x86::avx512_float::{strip_tile, STRIP_ROWS, STRIP_TOKENS};
                return self.strip_product::<STRIP_ROWS, STRIP_TOKENS>(
                    w, x, n_tokens, shared, row_bytes, strip_tile,
                );
            }
            Isa::Avx2 | Isa::AvxVnni => {
                use crate::x86::avx2::{strip_tile, STRIP_ROWS, STRIP_TOKENS};
                return self.strip_product::<STRIP_ROWS, STRIP_TOKENS>(
                    w, x, n_tokens, shared, row_bytes, strip_tile,
                );
            }
            Isa::Scalar => {}
        }
        let n_tasks = w.rows.div_ceil(ROWS_PER_TASK);
        self.pool.run(n_tasks, &|task| {
            let r0 = task * ROWS_PER_TASK;
            let r1 = (r0 + ROWS_PER_TASK).min(w.rows);
            PANEL.with_borrow_mut(|row| {
                row.resize(w.cols, 0.0);
                for r in r0..r1 {
                    float_row(isa, w.ty, &w.data[r * row_bytes..(r + 1) * row_bytes], row);
                    for t in 0..n_tokens {
                        let v = scalar_dot(row, &x[t * w.cols..(t + 1) * w.cols]);
                        // SAFETY: (t, r) is inside `out` and owned by this task alone.
                        unsafe { *shared.get().add(t * w.rows + r) = v }
                    }
                }
            });
        });
    }

    /// Many tokens against float weights: each task widens `W` rows into a strip — element i of
    /// every row side by side, zeros past the last row, ordered by phase (i mod 8) then i / 8 —
    /// and multiplies it by every token, `T` at a time, with `tile`, one phase after another.
    /// The phases' sums are added in `hsum`'s order and the columns past the last multiple of 8
    /// one by one, as the few-token tiles do: a token's products are the same bits whatever
    /// else the batch holds (what `edgelm serve` promises), and the strip is still read from
    /// cache once per `T` tokens.
    #[cfg(target_arch = "x86_64")]
    fn strip_product<const W: usize, const T: usize>(
        &self,
        w: Weight<'_>,
        x: &[f32],
        n_tokens: usize,
        out: Shared<f32>,
        row_bytes: usize,
        tile: StripTile<W, T>,
    ) {
        let (isa, cols) = (self.isa, w.cols);
        let (k8, steps) = (cols / 8 * 8, cols / 8);
        self.pool.run(w.rows.div_ceil(W), &|task| {
            let r0 = task * W;
            let rows = W.min(w.rows - r0);
            PANEL.with_borrow_mut(|buffer| {
                // The rows as f32, then the strip on a cache-line boundary (a vector of a
                // misaligned strip would span two lines at every step).
                buffer.resize(2 * W * cols + 16, 0.0);
                let (widened, rest) = buffer.split_at_mut(W * cols);
                let skew = rest.as_ptr().align_offset(64).min(16);
                let strip = &mut rest[skew..skew + W * k8];
                for (r, row) in widened.chunks_exact_mut(cols).enumerate() {
                    if r < rows {
                        let src = &w.data[(r0 + r) * row_bytes..(r0 + r + 1) * row_bytes];
                        float_row(isa, w.ty, src, row);
                    } else {
                        row.fill(0.0);
                    }
                }
                // SAFETY: AVX2 present (every x86 tier has it); `widened` holds W rows of `cols`.
                unsafe { transpose_into_strip::<W>(widened, cols, strip) };
                let mut phases = [[[0f32; W]; T]; 8];
                for t in (0..n_tokens).step_by(T) {
                    let nt = T.min(n_tokens - t);
                    for (phase, sums) in phases.iter_mut().enumerate() {
                        let part = &strip[phase * steps * W..(phase + 1) * steps * W];
                        // SAFETY: `tile` is this CPU's kernel (chosen from `isa`); `part` holds
                        // W·steps floats and `x` tokens t..t+nt of `cols` ≥ 8·steps (shapes
                        // checked).
                        unsafe { tile(part, steps, x, cols, t, nt, phase, sums) };
                    }
                    for j in 0..nt {
                        let token = &x[(t + j) * cols..(t + j + 1) * cols];
                        // SAFETY: rows r0..r0+rows of token t+j are inside `out` and written
                        // by this task alone.
                        let dst = unsafe {
                            std::slice::from_raw_parts_mut(
                                out.get().add((t + j) * w.rows + r0),
                                rows,
                            )
                        };
                        for (r, d) in dst.iter_mut().enumerate() {
                            let p = |phase: usize| phases[phase][j][r];
                            let mut s =
                                ((p(0) + p(4)) + (p(2) + p(6))) + ((p(1) + p(5)) + (p(3) + p(7)));
                            for i in k8..cols {
                                s += widened[r * cols + i] * token[i];
                            }
                            *d = s;
                        }
                    }
                }
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

/// A weight row element the few-token tiles multiply as they are: F16 bits (widened by F16C) or
/// f32. AVX2's eight-lane tiles on every tier: their summation order (eight FMA chains, `hsum`,
/// then the tail) is the one the strips reproduce, and these products are bound by memory.
#[cfg(target_arch = "x86_64")]
trait TileElem: Sized {
    /// The R×T tile.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C; every pointer is valid for `k` elements.
    unsafe fn tile<const R: usize, const T: usize>(
        w: &[*const Self; R],
        xs: &[*const f32; T],
        k: usize,
        out: &mut [[f32; T]; R],
    );
}

#[cfg(target_arch = "x86_64")]
impl TileElem for u16 {
    unsafe fn tile<const R: usize, const T: usize>(
        w: &[*const u16; R],
        xs: &[*const f32; T],
        k: usize,
        out: &mut [[f32; T]; R],
    ) {
        crate::x86::avx2::tile_f16::<R, T>(w, xs, k, out)
    }
}

#[cfg(target_arch = "x86_64")]
impl TileElem for f32 {
    unsafe fn tile<const R: usize, const T: usize>(
        w: &[*const f32; R],
        xs: &[*const f32; T],
        k: usize,
        out: &mut [[f32; T]; R],
    ) {
        crate::x86::avx2::tile::<R, T>(w, xs, k, out)
    }
}

/// Dispatch a runtime-sized tile (≤4 rows × ≤3 tokens) to its const-generic kernel; `row(i)`
/// points at weight row i.
///
/// # Safety
/// AVX2, FMA and F16C are available; rows `r..r+nr` hold `cols` elements each and tokens
/// `t..t+nt` of `x` exist.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn few_tile<E: TileElem>(
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
        E::tile::<R, T>(&w, &xs, cols, &mut out);
        for (i, row) in out.iter().enumerate() {
            for (j, v) in row.iter().enumerate() {
                put(r + i, t + j, *v);
            }
        }
    }
    match (nr, nt) {
        (4, 3) => go::<E, 4, 3>(row, r, cols, x, t, put),
        (4, 2) => go::<E, 4, 2>(row, r, cols, x, t, put),
        (4, 1) => go::<E, 4, 1>(row, r, cols, x, t, put),
        (3, 3) => go::<E, 3, 3>(row, r, cols, x, t, put),
        (3, 2) => go::<E, 3, 2>(row, r, cols, x, t, put),
        (3, 1) => go::<E, 3, 1>(row, r, cols, x, t, put),
        (2, 3) => go::<E, 2, 3>(row, r, cols, x, t, put),
        (2, 2) => go::<E, 2, 2>(row, r, cols, x, t, put),
        (2, 1) => go::<E, 2, 1>(row, r, cols, x, t, put),
        (1, 3) => go::<E, 1, 3>(row, r, cols, x, t, put),
        (1, 2) => go::<E, 1, 2>(row, r, cols, x, t, put),
        _ => go::<E, 1, 1>(row, r, cols, x, t, put),
    }
}

/// `strip[((i mod 8)·(cols / 8) + i / 8)·W + r] = widened[r·cols + i]` for i below the last
/// multiple of 8 (the strip by phase), 8×8 blocks transposed in registers (row by row in scalar
/// the transpose cost more than 300 µs per million weights, as much as the products of 40
/// tokens).
///
/// # Safety
/// The CPU supports AVX2; `widened` holds `W·cols` floats and `strip` `W·(cols / 8)·8`, W a
/// multiple of 8.
#[cfg(target_arch = "x86_64")]
unsafe fn transpose_into_strip<const W: usize>(widened: &[f32], cols: usize, strip: &mut [f32]) {
    let steps = cols / 8;
    assert!(W.is_multiple_of(8) && widened.len() >= W * cols && strip.len() >= W * steps * 8);
    for m in 0..steps {
        for r in (0..W).step_by(8) {
            // SAFETY: rows r..r+8 at columns 8m..8m+8 are inside `widened`; phase l's lanes
            // r..r+8 at step m, (l·steps + m)·W + r, are inside the strip (asserted above).
            unsafe {
                crate::x86::avx2::transpose8(
                    widened.as_ptr().add(r * cols + 8 * m),
                    cols,
                    strip.as_mut_ptr().add(m * W + r),
                    steps * W,
                )
            };
        }
    }
}
