//! AVX2 + FMA f32 kernels. Callers guarantee the CPU has both (checked once by `Isa`).

use super::hsum;
use std::arch::x86_64::*;

/// Dot products of `R` weight rows with `T` activation rows, each of length `k`:
/// `out[r][t] = Σ w[r][i]·x[t][i]`. Register tile of R×T accumulators; the tail past a multiple
/// of 8 is summed in scalar.
///
/// # Safety
/// The CPU supports AVX2 and FMA, and every pointer is valid for `k` floats.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn tile<const R: usize, const T: usize>(
    w: &[*const f32; R],
    x: &[*const f32; T],
    k: usize,
    out: &mut [[f32; T]; R],
) {
    let mut acc = [[_mm256_setzero_ps(); T]; R];
    let k8 = k / 8 * 8;
    let mut i = 0;
    while i < k8 {
        let mut xv = [_mm256_setzero_ps(); T];
        for t in 0..T {
            xv[t] = _mm256_loadu_ps(x[t].add(i));
        }
        for r in 0..R {
            let wv = _mm256_loadu_ps(w[r].add(i));
            for t in 0..T {
                acc[r][t] = _mm256_fmadd_ps(wv, xv[t], acc[r][t]);
            }
        }
        i += 8;
    }
    for r in 0..R {
        for t in 0..T {
            let mut s = hsum(acc[r][t]);
            for j in k8..k {
                s += *w[r].add(j) * *x[t].add(j);
            }
            out[r][t] = s;
        }
    }
}

/// An 8×8 block transposed: `dst[j·dst_stride + q] = src[q·src_stride + j]` for q, j < 8.
///
/// # Safety
/// The CPU supports AVX2; `src` holds 8 rows of 8 floats `src_stride` apart, `dst` room for 8
/// rows of 8 `dst_stride` apart.
#[target_feature(enable = "avx2")]
pub unsafe fn transpose8(src: *const f32, src_stride: usize, dst: *mut f32, dst_stride: usize) {
    let r: [__m256; 8] = std::array::from_fn(|q| _mm256_loadu_ps(src.add(q * src_stride)));
    // Pairs of rows interleaved, then pairs of pairs: s[c] holds columns c and c + 4 of rows
    // 0–3 (and s[c + 4] of rows 4–7), one column per 128-bit half.
    let mut s = [_mm256_setzero_ps(); 8];
    for half in [0, 4] {
        let t0 = _mm256_unpacklo_ps(r[half], r[half + 1]);
        let t1 = _mm256_unpackhi_ps(r[half], r[half + 1]);
        let t2 = _mm256_unpacklo_ps(r[half + 2], r[half + 3]);
        let t3 = _mm256_unpackhi_ps(r[half + 2], r[half + 3]);
        s[half] = _mm256_shuffle_ps::<0x44>(t0, t2);
        s[half + 1] = _mm256_shuffle_ps::<0xee>(t0, t2);
        s[half + 2] = _mm256_shuffle_ps::<0x44>(t1, t3);
        s[half + 3] = _mm256_shuffle_ps::<0xee>(t1, t3);
    }
    for c in 0..4 {
        let low = _mm256_permute2f128_ps::<0x20>(s[c], s[c + 4]);
        let high = _mm256_permute2f128_ps::<0x31>(s[c], s[c + 4]);
        _mm256_storeu_ps(dst.add(c * dst_stride), low);
        _mm256_storeu_ps(dst.add((c + 4) * dst_stride), high);
    }
}

/// Rows of a strip: two vectors of eight.
pub const STRIP_ROWS: usize = 16;
/// Tokens of a strip tile: 2×6 accumulators, two weight vectors and a broadcast fill 15 of the
/// 16 registers.
pub const STRIP_TOKENS: usize = 6;

/// One phase of a strip tile: `out[j][r] = Σ_m strip[m·16 + r]·x[(t + j)·k + 8m + phase]` over
/// `steps` steps for tokens `t..t + nt` (`nt` ≤ 6). The strip holds 16 weight rows side by side,
/// element 8m + phase of every row at step m, so each step is two weight loads, one broadcast per
/// token and no horizontal sums; each sum is one FMA chain in m — what lane `phase` of [`tile`]
/// computes — so the caller can add the eight phases in `hsum`'s order and get [`tile`]'s
/// results bit for bit, whatever the number of tokens.
///
/// # Safety
/// The CPU supports AVX2 and FMA; `strip` holds `16·steps` floats and `x` tokens `t..t + nt` of
/// `k` with `8·steps + phase` ≤ `k`.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn strip_tile(
    strip: &[f32],
    steps: usize,
    x: &[f32],
    k: usize,
    t: usize,
    nt: usize,
    phase: usize,
    out: &mut [[f32; STRIP_ROWS]; STRIP_TOKENS],
) {
    match nt {
        1 => strip_tile_n::<1>(strip, steps, x, k, t, phase, out),
        2 => strip_tile_n::<2>(strip, steps, x, k, t, phase, out),
        3 => strip_tile_n::<3>(strip, steps, x, k, t, phase, out),
        4 => strip_tile_n::<4>(strip, steps, x, k, t, phase, out),
        5 => strip_tile_n::<5>(strip, steps, x, k, t, phase, out),
        6 => strip_tile_n::<6>(strip, steps, x, k, t, phase, out),
        _ => unreachable!("a strip tile has 1 to 6 tokens"),
    }
}

#[inline(always)]
unsafe fn strip_tile_n<const T: usize>(
    strip: &[f32],
    steps: usize,
    x: &[f32],
    k: usize,
    t: usize,
    phase: usize,
    out: &mut [[f32; STRIP_ROWS]; STRIP_TOKENS],
) {
    debug_assert!(strip.len() >= STRIP_ROWS * steps && x.len() >= (t + T) * k);
    debug_assert!(steps == 0 || 8 * (steps - 1) + phase < k);
    let xs: [*const f32; T] = std::array::from_fn(|j| x.as_ptr().add((t + j) * k + phase));
    let w = strip.as_ptr();
    let mut acc = [[_mm256_setzero_ps(); 2]; T];
    for m in 0..steps {
        let w0 = _mm256_loadu_ps(w.add(m * STRIP_ROWS));
        let w1 = _mm256_loadu_ps(w.add(m * STRIP_ROWS + 8));
        for j in 0..T {
            let xv = _mm256_broadcast_ss(&*xs[j].add(8 * m));
            acc[j][0] = _mm256_fmadd_ps(w0, xv, acc[j][0]);
            acc[j][1] = _mm256_fmadd_ps(w1, xv, acc[j][1]);
        }
    }
    for j in 0..T {
        _mm256_storeu_ps(out[j].as_mut_ptr(), acc[j][0]);
        _mm256_storeu_ps(out[j].as_mut_ptr().add(8), acc[j][1]);
    }
}

/// `Σ a[i]·b[i]`.
///
/// # Safety
/// The CPU supports AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let mut out = [[0f32; 1]; 1];
    tile::<1, 1>(&[a.as_ptr()], &[b.as_ptr()], n, &mut out);
    out[0][0]
}

/// `y[i] += a · x[i]`.
///
/// # Safety
/// The CPU supports AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    let n = x.len().min(y.len());
    let n8 = n / 8 * 8;
    let av = _mm256_set1_ps(a);
    let mut i = 0;
    while i < n8 {
        let yv = _mm256_loadu_ps(y.as_ptr().add(i));
        let xv = _mm256_loadu_ps(x.as_ptr().add(i));
        _mm256_storeu_ps(y.as_mut_ptr().add(i), _mm256_fmadd_ps(av, xv, yv));
        i += 8;
    }
    for j in n8..n {
        y[j] += a * x[j];
    }
}

/// `out[r][d] += Σ_j p[r][j] · v[j][d]` for `R` rows, `j < v.len()`, `d < hd` (a multiple of 16):
/// sixteen columns of every row stay in registers while all `v` rows stream past once.
///
/// # Safety
/// The CPU supports AVX2 and FMA; every `p[r]` holds `v.len()` values, every `v[j]` and
/// `out[r]` `hd` floats.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn weighted_rows<const R: usize>(
    p: &[*const f32; R],
    v: &[*const f32],
    hd: usize,
    out: &[*mut f32; R],
) {
    let mut d = 0;
    while d + 16 <= hd {
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        for (j, vj) in v.iter().enumerate() {
            let v0 = _mm256_loadu_ps(vj.add(d));
            let v1 = _mm256_loadu_ps(vj.add(d + 8));
            for r in 0..R {
                let w = _mm256_broadcast_ss(&*p[r].add(j));
                acc[r][0] = _mm256_fmadd_ps(w, v0, acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(w, v1, acc[r][1]);
            }
        }
        for r in 0..R {
            let o = out[r].add(d);
            _mm256_storeu_ps(o, _mm256_add_ps(_mm256_loadu_ps(o), acc[r][0]));
            _mm256_storeu_ps(
                o.add(8),
                _mm256_add_ps(_mm256_loadu_ps(o.add(8)), acc[r][1]),
            );
        }
        d += 16;
    }
}

/// [`tile`] with f16 rows `w` (bit patterns, converted with F16C) against f32 rows `x`.
///
/// # Safety
/// The CPU supports AVX2, FMA and F16C; every pointer is valid for `k` elements.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn tile_f16<const R: usize, const T: usize>(
    w: &[*const u16; R],
    x: &[*const f32; T],
    k: usize,
    out: &mut [[f32; T]; R],
) {
    let mut acc = [[_mm256_setzero_ps(); T]; R];
    let k8 = k / 8 * 8;
    let mut i = 0;
    while i < k8 {
        let mut xv = [_mm256_setzero_ps(); T];
        for t in 0..T {
            xv[t] = _mm256_loadu_ps(x[t].add(i));
        }
        for r in 0..R {
            let wv = _mm256_cvtph_ps(_mm_loadu_si128(w[r].add(i).cast()));
            for t in 0..T {
                acc[r][t] = _mm256_fmadd_ps(wv, xv[t], acc[r][t]);
            }
        }
        i += 8;
    }
    for r in 0..R {
        for t in 0..T {
            let mut s = hsum(acc[r][t]);
            for j in k8..k {
                s += half::f16::from_bits(*w[r].add(j)).to_f32() * *x[t].add(j);
            }
            out[r][t] = s;
        }
    }
}

/// [`weighted_rows`] over f16 value rows.
///
/// # Safety
/// As [`weighted_rows`], and the CPU supports F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn weighted_rows_f16<const R: usize>(
    p: &[*const f32; R],
    v: &[*const u16],
    hd: usize,
    out: &[*mut f32; R],
) {
    let mut d = 0;
    while d + 16 <= hd {
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        for (j, vj) in v.iter().enumerate() {
            let v0 = _mm256_cvtph_ps(_mm_loadu_si128(vj.add(d).cast()));
            let v1 = _mm256_cvtph_ps(_mm_loadu_si128(vj.add(d + 8).cast()));
            for r in 0..R {
                let w = _mm256_broadcast_ss(&*p[r].add(j));
                acc[r][0] = _mm256_fmadd_ps(w, v0, acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(w, v1, acc[r][1]);
            }
        }
        for r in 0..R {
            let o = out[r].add(d);
            _mm256_storeu_ps(o, _mm256_add_ps(_mm256_loadu_ps(o), acc[r][0]));
            _mm256_storeu_ps(
                o.add(8),
                _mm256_add_ps(_mm256_loadu_ps(o.add(8)), acc[r][1]),
            );
        }
        d += 16;
    }
}

/// `row[i] ← e^(row[i] − shift)`, returning their sum: the softmax numerators of one block of
/// scores. Cephes' single-precision exp (range reduction by ln 2 in two parts, degree-6
/// polynomial), within a few ulp of `f32::exp`; arguments below −87.3 give about 1e-38, not 0.
///
/// # Safety
/// The CPU supports AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn exp_shifted(row: &mut [f32], shift: f32) -> f32 {
    let s = _mm256_set1_ps(shift);
    let mut sum = _mm256_setzero_ps();
    let mut chunks = row.chunks_exact_mut(8);
    for c in &mut chunks {
        let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), s));
        _mm256_storeu_ps(c.as_mut_ptr(), e);
        sum = _mm256_add_ps(sum, e);
    }
    let mut total = hsum(sum);
    for v in chunks.into_remainder() {
        *v = (*v - shift).exp();
        total += *v;
    }
    total
}

/// [`crate::Compute::glu`] on eight lanes: `x · up / (1 + e^(−y))` with [`exp8`].
///
/// # Safety
/// The CPU supports AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn glu(act: crate::Activation, gate: &mut [f32], up: &[f32]) {
    use crate::activation::{GELU_CUBIC, TWO_SQRT_2_OVER_PI};
    let n = gate.len().min(up.len());
    let (gate, up) = (&mut gate[..n], &up[..n]);
    let one = _mm256_set1_ps(1.0);
    let mut i = 0;
    while i + 8 <= n {
        let x = _mm256_loadu_ps(gate.as_ptr().add(i));
        let y = match act {
            crate::Activation::Silu => x,
            crate::Activation::GeluTanh => {
                let x3 = _mm256_mul_ps(_mm256_mul_ps(x, x), x);
                _mm256_mul_ps(
                    _mm256_set1_ps(TWO_SQRT_2_OVER_PI),
                    _mm256_fmadd_ps(_mm256_set1_ps(GELU_CUBIC), x3, x),
                )
            }
        };
        let e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), y));
        let g = _mm256_div_ps(x, _mm256_add_ps(one, e));
        _mm256_storeu_ps(
            gate.as_mut_ptr().add(i),
            _mm256_mul_ps(g, _mm256_loadu_ps(up.as_ptr().add(i))),
        );
        i += 8;
    }
    crate::activation::glu_scalar(act, &mut gate[i..], &up[i..]);
}

/// `e^x` on eight lanes (see [`exp_shifted`]).
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn exp8(x: __m256) -> __m256 {
    let x = _mm256_min_ps(
        _mm256_max_ps(x, _mm256_set1_ps(-87.33654)),
        _mm256_set1_ps(88.37626),
    );
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        x,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
    ));
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
    let mut p = _mm256_set1_ps(1.987_569_1e-4);
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5,
    ] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    }
    let r2 = _mm256_mul_ps(r, r);
    let p = _mm256_add_ps(_mm256_fmadd_ps(p, r2, r), _mm256_set1_ps(1.0));
    // 2^n by building the exponent field; n ∈ [−126, 127] after the clamp.
    let pow2 = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
        _mm256_cvtps_epi32(n),
        _mm256_set1_epi32(127),
    )));
    _mm256_mul_ps(p, pow2)
}

/// Little-endian F16 `src` to f32 `dst` (`src` holds 2·`dst.len()` bytes), eight at a time with
/// F16C; exact, like the scalar conversion.
///
/// # Safety
/// The CPU supports AVX2 and F16C.
#[target_feature(enable = "avx2,f16c")]
pub unsafe fn f16_to_f32(src: &[u8], dst: &mut [f32]) {
    let n = dst.len();
    assert!(src.len() >= 2 * n, "two bytes per value");
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: 16 bytes at 2i and 8 floats at i are in bounds (checked above).
        let h = _mm_loadu_si128(src.as_ptr().add(2 * i) as *const __m128i);
        _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
        i += 8;
    }
    for j in i..n {
        dst[j] = half::f16::from_le_bytes([src[2 * j], src[2 * j + 1]]).to_f32();
    }
}

/// Little-endian BF16 `src` to f32 `dst`: each value's bits moved to the top half.
///
/// # Safety
/// The CPU supports AVX2.
#[target_feature(enable = "avx2")]
pub unsafe fn bf16_to_f32(src: &[u8], dst: &mut [f32]) {
    let n = dst.len();
    assert!(src.len() >= 2 * n, "two bytes per value");
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: as in `f16_to_f32`.
        let h = _mm_loadu_si128(src.as_ptr().add(2 * i) as *const __m128i);
        let wide = _mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h));
        _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_castsi256_ps(wide));
        i += 8;
    }
    for j in i..n {
        dst[j] = half::bf16::from_le_bytes([src[2 * j], src[2 * j + 1]]).to_f32();
    }
}

#[cfg(test)]
mod tests {
    use crate::test_rng::Rng;

    #[test]
    fn transpose8_matches_scalar() {
        if !is_x86_feature_detected!("avx2") {
            eprintln!("skipping: this CPU lacks AVX2; the transpose is untested");
            return;
        }
        let mut rng = Rng(8);
        let src: Vec<f32> = (0..8 * 11).map(|_| rng.unit()).collect();
        let mut dst = vec![0f32; 8 * 13];
        // SAFETY: AVX2 checked above; 8 rows of 11 and of 13 floats.
        unsafe { super::transpose8(src.as_ptr().add(2), 11, dst.as_mut_ptr().add(1), 13) };
        for q in 0..8 {
            for j in 0..8 {
                assert_eq!(
                    dst[1 + j * 13 + q],
                    src[2 + q * 11 + j],
                    "row {q} column {j}"
                );
            }
        }
    }

    /// Every one of the 65 536 half-precision values (F16 and BF16), at lengths off the
    /// eight-lane step, against edgelm-quant's scalar conversion: bit for bit (NaN for NaN).
    #[test]
    fn half_rows_convert_exactly() {
        if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("f16c")) {
            eprintln!("skipping: this CPU lacks AVX2/F16C; the path is untested");
            return;
        }
        let bytes: Vec<u8> = (0..=u16::MAX).flat_map(|v| v.to_le_bytes()).collect();
        for (ty, convert) in [
            (
                edgelm_quant::GgmlType::F16,
                super::f16_to_f32 as unsafe fn(&[u8], &mut [f32]),
            ),
            (edgelm_quant::GgmlType::BF16, super::bf16_to_f32),
        ] {
            for len in [65_536usize, 13, 8, 1] {
                let src = &bytes[2 * (65_536 - len)..];
                let mut want = vec![0f32; len];
                edgelm_quant::dequantize_row(ty, src, &mut want).unwrap();
                let mut got = vec![0f32; len];
                // SAFETY: features checked above.
                unsafe { convert(src, &mut got) };
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
                        "{ty} value {i} of {len}: {g} vs {w}"
                    );
                }
            }
        }
    }

    /// Against `f32::exp` over the softmax's range and beyond (−103 to 80), lengths off the
    /// eight-lane step: each value within about 2 ulp (2.5e-7 relative + 1e-37), the sum likewise.
    #[test]
    fn exp_shifted_matches_scalar_exp() {
        if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
            eprintln!("skipping: this CPU lacks AVX2/FMA; the path is untested");
            return;
        }
        let mut rng = Rng(0x0e_0e_0e);
        for len in [1usize, 7, 8, 9, 64, 100] {
            for spread in [1.0f32, 20.0, 100.0] {
                // Up to e^80 (finite); softmax arguments are ≤ 0, down to underflow.
                let row: Vec<f32> = (0..len).map(|_| (rng.unit() * spread).min(77.0)).collect();
                let shift = rng.unit() * 3.0;
                let mut got = row.clone();
                // SAFETY: features checked above.
                let sum = unsafe { super::exp_shifted(&mut got, shift) };
                let mut want_sum = 0f64;
                for (g, x) in got.iter().zip(&row) {
                    let want = (x - shift).exp();
                    want_sum += want as f64;
                    let tol = 2.5e-7 * want.abs() + 1e-37;
                    assert!(
                        (g - want).abs() <= tol,
                        "exp({}) = {g}, want {want}",
                        x - shift
                    );
                }
                assert!(
                    ((sum as f64) - want_sum).abs() <= 1e-6 * want_sum + 1e-30,
                    "sum {sum} vs {want_sum}"
                );
            }
        }
    }
}
