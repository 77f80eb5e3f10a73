//! AVX-512 f32 tiles for float weights (f32 rows, or f16 rows widened 16 at a time): the AVX2
//! tiles of `avx2.rs` at twice the width, with the tail past a multiple of 16 read under a mask
//! instead of summed in scalar. Callers guarantee AVX-512 F/BW/VL (checked once by `Isa`).

use std::arch::x86_64::*;

/// `out[r][t] = Σ w[r][i]·x[t][i]` over `k` elements: R×T accumulators of 16 lanes.
///
/// # Safety
/// The CPU supports AVX-512 F; every pointer is valid for `k` floats.
#[target_feature(enable = "avx512f")]
pub unsafe fn tile<const R: usize, const T: usize>(
    w: &[*const f32; R],
    x: &[*const f32; T],
    k: usize,
    out: &mut [[f32; T]; R],
) {
    tile_with::<R, T, f32>(w, x, k, out, |p, i, m| _mm512_maskz_loadu_ps(m, p.add(i)))
}

/// [`tile`] with f16 rows `w` (bit patterns).
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
    tile_with::<R, T, u16>(w, x, k, out, |p, i, m| {
        _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p.add(i).cast()))
    })
}

/// The tile loop; `load(row, i, mask)` reads 16 weights from element `i` as f32, lanes outside
/// `mask` zero.
#[inline(always)]
unsafe fn tile_with<const R: usize, const T: usize, E>(
    w: &[*const E; R],
    x: &[*const f32; T],
    k: usize,
    out: &mut [[f32; T]; R],
    load: impl Fn(*const E, usize, u16) -> __m512,
) {
    let mut acc = [[_mm512_setzero_ps(); T]; R];
    let mut step = |i: usize, mask: u16| {
        let mut xv = [_mm512_setzero_ps(); T];
        for t in 0..T {
            xv[t] = _mm512_maskz_loadu_ps(mask, x[t].add(i));
        }
        for r in 0..R {
            let wv = load(w[r], i, mask);
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
