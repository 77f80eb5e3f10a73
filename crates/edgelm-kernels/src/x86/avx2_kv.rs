//! Attention tiles over Q8_0 and Q4_0 cached keys and values: each block's 32 levels widened
//! to f32 and scaled in registers, eight at a time, then used by every query head (or output
//! row) of the tile, so the conversion is paid once per head group. And the rounding that
//! writes those blocks, eight trial scales at a time ([`fit_trials`]).

use super::hsum;
use crate::attention::{BlockQ4_0, BlockQ8_0};
use std::arch::x86_64::*;

/// A block format as its eight-value chunks.
pub(crate) trait Chunks {
    /// The block's scale in every lane.
    unsafe fn scale(b: *const Self) -> __m256;
    /// Levels `8c .. 8c + 8` (unscaled) as f32.
    unsafe fn chunk(b: *const Self, c: usize) -> __m256;
}

#[inline(always)]
unsafe fn widen(bytes: __m128i) -> __m256 {
    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes))
}

#[inline(always)]
unsafe fn scale_at(b: *const u8) -> __m256 {
    _mm256_cvtph_ps(_mm_set1_epi16(b.cast::<i16>().read_unaligned()))
}

impl Chunks for BlockQ8_0 {
    #[inline(always)]
    unsafe fn scale(b: *const Self) -> __m256 {
        scale_at(b.cast())
    }
    #[inline(always)]
    unsafe fn chunk(b: *const Self, c: usize) -> __m256 {
        widen(_mm_loadl_epi64(b.cast::<u8>().add(2 + 8 * c).cast()))
    }
}

impl Chunks for BlockQ4_0 {
    #[inline(always)]
    unsafe fn scale(b: *const Self) -> __m256 {
        scale_at(b.cast())
    }
    #[inline(always)]
    unsafe fn chunk(b: *const Self, c: usize) -> __m256 {
        // Chunks 0 and 1 are the low nibbles of bytes 0..8 and 8..16; 2 and 3 the high ones.
        let raw = _mm_loadl_epi64(b.cast::<u8>().add(2 + 8 * (c & 1)).cast());
        let raw = if c >= 2 { _mm_srli_epi16(raw, 4) } else { raw };
        let levels = _mm_sub_epi8(_mm_and_si128(raw, _mm_set1_epi8(0x0F)), _mm_set1_epi8(8));
        widen(levels)
    }
}

/// `out[r][t] = k[r] · q[t]` over `hd` values: `R` quantized key rows by `T` f32 query rows.
#[inline(always)]
unsafe fn tile<B: Chunks, const R: usize, const T: usize>(
    k: &[*const B; R],
    q: &[*const f32; T],
    hd: usize,
    out: &mut [[f32; T]; R],
) {
    let mut acc = [[_mm256_setzero_ps(); T]; R];
    for blk in 0..hd / 32 {
        let d: [__m256; R] = std::array::from_fn(|r| B::scale(k[r].add(blk)));
        for c in 0..4 {
            let at = blk * 32 + 8 * c;
            let mut qv = [_mm256_setzero_ps(); T];
            for t in 0..T {
                qv[t] = _mm256_loadu_ps(q[t].add(at));
            }
            for r in 0..R {
                let kv = _mm256_mul_ps(B::chunk(k[r].add(blk), c), d[r]);
                for t in 0..T {
                    acc[r][t] = _mm256_fmadd_ps(kv, qv[t], acc[r][t]);
                }
            }
        }
    }
    for r in 0..R {
        for t in 0..T {
            out[r][t] = hsum(acc[r][t]);
        }
    }
}

/// `out[r] += Σ_j p[r][j] · v[j]` over quantized value rows of `hd` values: sixteen columns of
/// every output row stay in registers while all `v` rows stream past once.
#[inline(always)]
unsafe fn weighted<B: Chunks, const R: usize>(
    p: &[*const f32; R],
    v: &[*const B],
    hd: usize,
    out: &[*mut f32; R],
) {
    for half in 0..hd / 16 {
        let (blk, c0) = (half / 2, 2 * (half % 2));
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        for (j, vj) in v.iter().enumerate() {
            let b = vj.add(blk);
            let d = B::scale(b);
            let v0 = _mm256_mul_ps(B::chunk(b, c0), d);
            let v1 = _mm256_mul_ps(B::chunk(b, c0 + 1), d);
            for r in 0..R {
                let w = _mm256_broadcast_ss(&*p[r].add(j));
                acc[r][0] = _mm256_fmadd_ps(w, v0, acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(w, v1, acc[r][1]);
            }
        }
        for r in 0..R {
            let o = out[r].add(half * 16);
            _mm256_storeu_ps(o, _mm256_add_ps(_mm256_loadu_ps(o), acc[r][0]));
            _mm256_storeu_ps(
                o.add(8),
                _mm256_add_ps(_mm256_loadu_ps(o.add(8)), acc[r][1]),
            );
        }
    }
}

/// [`tile`] over Q8_0 keys.
///
/// # Safety
/// The CPU supports AVX2, FMA and F16C; `hd` is a multiple of 32; every key row holds
/// `hd / 32` blocks and every query row `hd` floats.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn tile_q8_0<const R: usize, const T: usize>(
    k: &[*const BlockQ8_0; R],
    q: &[*const f32; T],
    hd: usize,
    out: &mut [[f32; T]; R],
) {
    tile(k, q, hd, out)
}

/// [`tile`] over Q4_0 keys.
///
/// # Safety
/// As [`tile_q8_0`].
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn tile_q4_0<const R: usize, const T: usize>(
    k: &[*const BlockQ4_0; R],
    q: &[*const f32; T],
    hd: usize,
    out: &mut [[f32; T]; R],
) {
    tile(k, q, hd, out)
}

/// [`weighted`] over Q8_0 values.
///
/// # Safety
/// The CPU supports AVX2, FMA and F16C; `hd` is a multiple of 32; every `p[r]` holds
/// `v.len()` weights, every `v[j]` `hd / 32` blocks and every `out[r]` `hd` floats.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn weighted_rows_q8_0<const R: usize>(
    p: &[*const f32; R],
    v: &[*const BlockQ8_0],
    hd: usize,
    out: &[*mut f32; R],
) {
    weighted(p, v, hd, out)
}

/// [`weighted`] over Q4_0 values.
///
/// # Safety
/// As [`weighted_rows_q8_0`].
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn weighted_rows_q4_0<const R: usize>(
    p: &[*const f32; R],
    v: &[*const BlockQ4_0],
    hd: usize,
    out: &[*mut f32; R],
) {
    weighted(p, v, hd, out)
}

/// The trials of `edgelm_quant::fit` (the KV cache's least-squares rounding), eight per register:
/// trial `t` at inverse scale `inv[t]` leaves its levels in `levels[j][t]`, its f16-rounded
/// scale, squared error and sum of squared levels in `d[t]`, `err[t]`, `sqq[t]` — every sum in
/// element order, multiplications and additions unfused, as the scalar trials run, so each
/// value has their bits.
///
/// # Safety
/// The CPU has AVX2 and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn fit_trials<const V: usize>(
    x: &[f32; 32],
    inv: &[f32; 24],
    (lo, hi): (f32, f32),
    levels: &mut [[f32; 24]; 32],
    (d, err, sqq): (&mut [f32; 24], &mut [f32; 24], &mut [f32; 24]),
) {
    assert!(V <= 3, "fit_trials: at most 24 trials");
    let sign = _mm256_set1_ps(-0.0);
    let half = _mm256_set1_ps(0.499_999_97);
    let (lo, hi) = (_mm256_set1_ps(lo), _mm256_set1_ps(hi));
    // SAFETY (all loads and stores): lanes 8t..8t + 8 with t < V ≤ 3 lie inside the 24-wide
    // arrays.
    let inv: [__m256; V] = core::array::from_fn(|t| _mm256_loadu_ps(inv.as_ptr().add(8 * t)));
    let (mut sxq, mut sq) = ([_mm256_setzero_ps(); V], [_mm256_setzero_ps(); V]);
    for (j, &xj) in x.iter().enumerate() {
        let v = _mm256_set1_ps(xj);
        for t in 0..V {
            // Ties away from zero as the scalar `round_away`: add ½ (just below) with the
            // sign, truncate; an undefined product (0·∞) rounds to 0 as its `as i32` does.
            let p = _mm256_mul_ps(v, inv[t]);
            let nudged = _mm256_add_ps(p, _mm256_or_ps(_mm256_and_ps(p, sign), half));
            let r = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(nudged);
            let r = _mm256_and_ps(r, _mm256_cmp_ps::<_CMP_ORD_Q>(r, r));
            let r = _mm256_min_ps(_mm256_max_ps(r, lo), hi);
            _mm256_storeu_ps(levels[j].as_mut_ptr().add(8 * t), r);
            sxq[t] = _mm256_add_ps(sxq[t], _mm256_mul_ps(v, r));
            sq[t] = _mm256_add_ps(sq[t], _mm256_mul_ps(r, r));
        }
    }
    let zero = _mm256_setzero_ps();
    let scale: [__m256; V] = core::array::from_fn(|t| {
        let fit = _mm256_div_ps(sxq[t], sq[t]);
        let stored = _mm256_cvtph_ps(_mm256_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT }>(fit));
        _mm256_and_ps(stored, _mm256_cmp_ps::<_CMP_NEQ_OQ>(sq[t], zero))
    });
    let mut e = [zero; V];
    for (j, &xj) in x.iter().enumerate() {
        let v = _mm256_set1_ps(xj);
        for t in 0..V {
            let l = _mm256_loadu_ps(levels[j].as_ptr().add(8 * t));
            let diff = _mm256_sub_ps(v, _mm256_mul_ps(scale[t], l));
            e[t] = _mm256_add_ps(e[t], _mm256_mul_ps(diff, diff));
        }
    }
    for t in 0..V {
        _mm256_storeu_ps(d.as_mut_ptr().add(8 * t), scale[t]);
        _mm256_storeu_ps(err.as_mut_ptr().add(8 * t), e[t]);
        _mm256_storeu_ps(sqq.as_mut_ptr().add(8 * t), sq[t]);
    }
}
