//! AVX-512 f32 kernels for float weights: F16 rows against a few tokens (the AVX2 tiles of
//! `avx2.rs` at twice the width, the tail past a multiple of 16 read under a mask), and strips
//! of 32 widened rows against many. Callers guarantee AVX-512 F/BW/VL (checked once by `Isa`).

use std::arch::x86_64::*;

/// `out[r][t] = Σ w[r][i]·x[t][i]` over `k` elements for f16 rows `w` (bit patterns): R×T
/// accumulators of 16 lanes, the tail past a multiple of 16 read under a mask.
///
/// # Safety
/// The CPU supports AVX-512 F, BW and VL; every pointer is valid for `k` elements.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub unsafe fn tile_f16<const R: usize, const T: usize>(
    w: &[*const u16; R],
    x: &[*const f32; T],
    k: usize,
    out: &mut [[f32; T]; R],
) {
    let mut acc = [[_mm512_setzero_ps(); T]; R];
    let mut step = |i: usize, mask: u16| {
        let mut xv = [_mm512_setzero_ps(); T];
        for t in 0..T {
            xv[t] = _mm512_maskz_loadu_ps(mask, x[t].add(i));
        }
        for r in 0..R {
            let wv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, w[r].add(i).cast()));
            for t in 0..T {
                acc[r][t] = _mm512_fmadd_ps(wv, xv[t], acc[r][t]);
            }
        }
    };
    let k16 = k / 16 * 16;
    let mut i = 0;
    while i < k16 {
        step(i, u16::MAX);
        i += 16;
    }
    if k16 < k {
        step(k16, (1u16 << (k - k16)) - 1);
    }
    for r in 0..R {
        for t in 0..T {
            out[r][t] = _mm512_reduce_add_ps(acc[r][t]);
        }
    }
}

/// Rows of a strip: two vectors of sixteen.
pub const STRIP_ROWS: usize = 32;
/// Tokens of a strip tile: 2×12 accumulators, two weight vectors and a broadcast fill 27 of the
/// 32 registers.
pub const STRIP_TOKENS: usize = 12;

/// `out[j][r] = Σ_i strip[i·32 + r]·x[(t + j)·k + i]` for tokens `t..t + nt` (`nt` ≤ 12): the
/// strip holds 32 weight rows side by side (element i of every row together), so each step
/// is two weight loads, one broadcast per token and no horizontal sums.
///
/// # Safety
/// The CPU supports AVX-512 F; `strip` holds `32·k` floats and `x` tokens `t..t + nt` of `k`.
#[target_feature(enable = "avx512f")]
pub unsafe fn strip_tile(
    strip: &[f32],
    k: usize,
    x: &[f32],
    t: usize,
    nt: usize,
    out: &mut [[f32; STRIP_ROWS]; STRIP_TOKENS],
) {
    macro_rules! by_tokens {
        ($($n:literal)*) => {
            match nt {
                $($n => strip_tile_n::<$n>(strip, k, x, t, out),)*
                _ => unreachable!("a strip tile has 1 to 12 tokens"),
            }
        };
    }
    by_tokens!(1 2 3 4 5 6 7 8 9 10 11 12)
}

#[inline(always)]
unsafe fn strip_tile_n<const T: usize>(
    strip: &[f32],
    k: usize,
    x: &[f32],
    t: usize,
    out: &mut [[f32; STRIP_ROWS]; STRIP_TOKENS],
) {
    debug_assert!(strip.len() >= STRIP_ROWS * k && x.len() >= (t + T) * k);
    let xs: [*const f32; T] = std::array::from_fn(|j| x.as_ptr().add((t + j) * k));
    let w = strip.as_ptr();
    let mut acc = [[_mm512_setzero_ps(); 2]; T];
    for i in 0..k {
        let w0 = _mm512_loadu_ps(w.add(i * STRIP_ROWS));
        let w1 = _mm512_loadu_ps(w.add(i * STRIP_ROWS + 16));
        for j in 0..T {
            let xv = _mm512_set1_ps(*xs[j].add(i));
            acc[j][0] = _mm512_fmadd_ps(w0, xv, acc[j][0]);
            acc[j][1] = _mm512_fmadd_ps(w1, xv, acc[j][1]);
        }
    }
    for j in 0..T {
        _mm512_storeu_ps(out[j].as_mut_ptr(), acc[j][0]);
        _mm512_storeu_ps(out[j].as_mut_ptr().add(16), acc[j][1]);
    }
}
