//! AVX2 kernels for the 32-element formats — Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and IQ4_NL weights
//! against 8-bit activations (Q8_0, or Q8_1 for the formats with a min) — and the two activation
//! quantizers.
//!
//! Row dot: one weight row against up to [`MAX_COLS`] activation rows. Each weight block is
//! unpacked once into 32 i8 lanes plus its scale (and min) in f32, then multiplied with the same
//! block of every activation row: `maddubs` (u8 × i8 → i16 pairs), `madd` with ones (→ 8 i32),
//! converted to f32 and FMA'd with `d_w·d_a` into one accumulator per activation row. The number
//! of activation rows is a const generic, so the accumulators live in registers.
//!
//! Exactness: the per-block integer sums are exact whenever the activation quants are in
//! [-127, 127] (Q8_0 weights may use -128) — all the Q8 quantizers produce, except in blocks
//! whose scale underflows f16 to 0, which contribute 0 either way. Only the f32 accumulation order differs from the scalar
//! reference. The quantizers are byte-exact against `edgelm_quant::quantize_row`.

use super::avx2_interleaved::P_MADDUBS;
use super::{hsum, hsum_i32, T_IQ4_NL, T_Q4_0, T_Q4_1, T_Q5_0, T_Q5_1, T_Q8_0};
use crate::qdot::{row_tiles, Out, QuantKernel, QuantizeFn, RowDotFn};
use crate::Isa;
use edgelm_quant::GgmlType;
use std::arch::x86_64::*;

/// Bytes of one weight block.
const fn w_bytes(t: u8) -> usize {
    match t {
        T_Q4_0 | T_IQ4_NL => 18,
        T_Q4_1 => 20,
        T_Q5_0 => 22,
        T_Q5_1 => 24,
        _ => 34,
    }
}

/// Formats `x = q·d + m`: unsigned quants, paired with Q8_1 activations for the min term.
const fn has_min(t: u8) -> bool {
    matches!(t, T_Q4_1 | T_Q5_1)
}

/// Bytes of one activation block (Q8_1: d, s, 32 quants; Q8_0: d, 32 quants).
const fn a_bytes(t: u8) -> usize {
    if has_min(t) {
        36
    } else {
        34
    }
}

/// The AVX2 kernel for a legacy weight type; None for every other type.
pub fn kernel(ty: GgmlType) -> Option<QuantKernel> {
    use GgmlType::*;
    let (act, row_dot, quantize): (GgmlType, RowDotFn, QuantizeFn) = match ty {
        Q4_0 => (Q8_0, row_dot::<T_Q4_0>, quantize_row_q8_0),
        Q4_1 => (Q8_1, row_dot::<T_Q4_1>, quantize_row_q8_1),
        Q5_0 => (Q8_0, row_dot::<T_Q5_0>, quantize_row_q8_0),
        Q5_1 => (Q8_1, row_dot::<T_Q5_1>, quantize_row_q8_1),
        Q8_0 => (Q8_0, row_dot::<T_Q8_0>, quantize_row_q8_0),
        IQ4_NL => (Q8_0, row_dot::<T_IQ4_NL>, quantize_row_q8_0),
        _ => return None,
    };
    Some(QuantKernel {
        weight: ty,
        act,
        isa: Isa::Avx2,
        row_dot,
        quantize,
        interleaved: super::avx2_interleaved::row_dot_for::<P_MADDUBS>(ty),
        prefill: super::avx2_interleaved::prefill_for::<P_MADDUBS>(ty),
    })
}

/// [`RowDotFn`]: checks the lengths once for the block (so the block loop can use raw
/// pointers), then dispatches on the activation-row count, [`MAX_COLS`] rows at a time.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C.
unsafe fn row_dot<const T: u8>(
    w: &[u8],
    row_bytes: usize,
    n_rows: usize,
    acts: &[&[u8]],
    out: Out,
) {
    let nb = row_bytes / w_bytes(T);
    assert!(
        n_rows * row_bytes <= w.len(),
        "row_dot: {} weight bytes for {n_rows} rows of {row_bytes}",
        w.len(),
    );
    for a in acts {
        assert!(
            a.len() >= nb * a_bytes(T),
            "row_dot: activation row shorter than the weight row"
        );
    }
    row_tiles!(n_rows, acts, out, |r, a, o, N| {
        let w = w.as_ptr().add(r * row_bytes);
        dot_rows::<T, N>(w, nb, a, &mut o)
    });
}

/// The block loop for `N` activation rows.
///
/// # Safety
/// AVX2+FMA+F16C; `w` holds `nb` weight blocks and every `acts[j]` (`j < N`) at least `nb`
/// activation blocks; `out` has at least `N` elements.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_rows<const T: u8, const N: usize>(
    w: *const u8,
    nb: usize,
    acts: &[&[u8]],
    out: &mut [f32],
) {
    let a: [*const u8; N] = core::array::from_fn(|j| acts[j].as_ptr());
    let mut acc = [_mm256_setzero_ps(); N];
    // With one or two rows each block's accumulate would wait on the previous one: alternate
    // between two sets of accumulators to keep two blocks in flight.
    let mut acc2 = [_mm256_setzero_ps(); N];
    let mut b = 0;
    if N <= 2 {
        while b + 2 <= nb {
            block::<T, N>(w, &a, b, &mut acc);
            block::<T, N>(w, &a, b + 1, &mut acc2);
            b += 2;
        }
    }
    while b < nb {
        block::<T, N>(w, &a, b, &mut acc);
        b += 1;
    }
    for j in 0..N {
        out[j] = hsum(_mm256_add_ps(acc[j], acc2[j]));
    }
}

/// Weight block `b` times block `b` of every activation row, added into `acc`.
///
/// # Safety
/// As [`dot_rows`], and `b < nb`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn block<const T: u8, const N: usize>(
    w: *const u8,
    a: &[*const u8; N],
    b: usize,
    acc: &mut [__m256; N],
) {
    let (ab, aq) = (a_bytes(T), a_bytes(T) - 32);
    let ones = _mm256_set1_epi16(1);
    // SAFETY: b < nb, so the block lies inside `w` (caller's contract).
    let wp = w.add(b * w_bytes(T));
    let x = unpack::<T>(wp);
    // Scales are converted full-width on purpose: converting a lone f16 lets LLVM load it with
    // `vpinsrw` into whatever register, chaining each block onto some accumulator (a false
    // dependency that halved the one-row speed). d_w goes to all lanes; the min formats also
    // get [0, m_w, 0, 0], which times the activation's [d_a, s_a, 0, 0] gives the min term.
    let dw = _mm256_cvtph_ps(_mm_set1_epi16((wp as *const i16).read_unaligned()));
    let mw = if has_min(T) {
        let dm = _mm_cvtph_ps(_mm_cvtsi32_si128((wp as *const i32).read_unaligned()));
        _mm_blend_ps::<0b0010>(_mm_setzero_ps(), dm)
    } else {
        _mm_setzero_ps()
    };
    // Signed formats use the sign trick: |x| as the u8 operand, y with x's sign as the i8 one.
    // |x| ≤ 128 and |y| ≤ 127 keep the i16 pair sums below saturation.
    let ax = _mm256_sign_epi8(x, x);
    for j in 0..N {
        // SAFETY: b < nb and every activation row holds nb blocks (checked by `row_dot`).
        let ap = a[j].add(b * ab);
        let y = _mm256_loadu_si256(ap.add(aq) as *const __m256i);
        let p16 = if has_min(T) {
            _mm256_maddubs_epi16(x, y)
        } else {
            _mm256_maddubs_epi16(ax, _mm256_sign_epi8(y, x))
        };
        let sumi = _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, ones));
        if has_min(T) {
            // [d_a, s_a, 0, 0] from one 32-bit load; the block's sum goes into the accumulator
            // with one add, keeping the loop-carried chain short.
            let sa = _mm_cvtph_ps(_mm_cvtsi32_si128((ap as *const i32).read_unaligned()));
            let d = _mm256_mul_ps(_mm256_broadcastss_ps(sa), dw);
            let m = _mm256_zextps128_ps256(_mm_mul_ps(sa, mw));
            acc[j] = _mm256_add_ps(acc[j], _mm256_fmadd_ps(d, sumi, m));
        } else {
            let da = _mm256_cvtph_ps(_mm_set1_epi16((ap as *const i16).read_unaligned()));
            acc[j] = _mm256_fmadd_ps(_mm256_mul_ps(da, dw), sumi, acc[j]);
        }
    }
}

/// One weight block as 32 i8 lanes in element order (unsigned for the min formats, `q - 8` /
/// `q - 16` / `q` for the others).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn unpack<const T: u8>(p: *const u8) -> __m256i {
    // SAFETY (all loads): each stays inside the block of w_bytes(T) bytes at `p`.
    match T {
        // Q4_0 [d, qs[16]]: nibbles, minus 8.
        T_Q4_0 => _mm256_sub_epi8(nibbles(p.add(2)), _mm256_set1_epi8(8)),
        // Q4_1 [d, m, qs[16]]: nibbles as they are.
        T_Q4_1 => nibbles(p.add(4)),
        // Q5_0 [d, qh, qs[16]]: q - 16 is the nibble when the fifth bit is set, else the
        // nibble with 0xF0 or'ed in (nibble - 16 in two's complement).
        T_Q5_0 => _mm256_or_si256(
            nibbles(p.add(6)),
            _mm256_andnot_si256(high_bits(p.add(2)), _mm256_set1_epi8(0xF0u8 as i8)),
        ),
        // Q5_1 [d, m, qh, qs[16]]: nibble | fifth bit << 4.
        T_Q5_1 => _mm256_or_si256(
            nibbles(p.add(8)),
            _mm256_and_si256(high_bits(p.add(4)), _mm256_set1_epi8(0x10)),
        ),
        // IQ4_NL [d, qs[16]]: each nibble indexes the 16-level grid, one shuffle for all 32.
        T_IQ4_NL => {
            let grid = _mm_loadu_si128(edgelm_quant::iq4_nl::GRID.as_ptr() as *const __m128i);
            _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(grid), nibbles(p.add(2)))
        }
        // Q8_0 [d, qs[32]]: the quants already are i8.
        _ => _mm256_loadu_si256(p.add(2) as *const __m256i),
    }
}

/// 16 bytes of nibble pairs → 32 u8 lanes: byte `j`'s low nibble is element `j`, its high
/// nibble element `j + 16`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn nibbles(p: *const u8) -> __m256i {
    let q = _mm_loadu_si128(p as *const __m128i);
    let both = _mm256_inserti128_si256::<1>(_mm256_castsi128_si256(q), _mm_srli_epi16::<4>(q));
    _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
}

/// The little-endian u32 at `p` → 32 byte lanes, 0xFF where element `i`'s bit `i` is set: each
/// byte lane picks qh byte `i / 8`, then tests bit `i % 8`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn high_bits(p: *const u8) -> __m256i {
    let qh = _mm256_set1_epi32((p as *const i32).read_unaligned());
    let pick = _mm256_set_epi64x(
        0x0303_0303_0303_0303,
        0x0202_0202_0202_0202,
        0x0101_0101_0101_0101,
        0,
    );
    let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    _mm256_cmpeq_epi8(_mm256_and_si256(_mm256_shuffle_epi8(qh, pick), bit), bit)
}

/// Quantize a row of f32 into Q8_0 blocks, byte-identical to `edgelm_quant::quantize_row`.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn quantize_row_q8_0(x: &[f32], out: &mut [u8]) {
    quantize_q8::<false>(x, out)
}

/// Quantize a row of f32 into Q8_1 blocks, byte-identical to `edgelm_quant::quantize_row`
/// (the f16 `s` included: it is `sum(q) · d` in f32, rounded once to f16 as the scalar does).
///
/// # Safety
/// The CPU has AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn quantize_row_q8_1(x: &[f32], out: &mut [u8]) {
    quantize_q8::<true>(x, out)
}

/// Both quantizers, following ggml's reference step by step: `amax` ignoring NaNs,
/// `d = amax / 127`, `id = 1 / d` (0 if d is 0), `q = round(x · id)` with ties away from zero,
/// saturated to i8 and NaN → 0 like Rust's `as i8`; f16 fields rounded to nearest even (F16C).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_q8<const SUM: bool>(x: &[f32], out: &mut [u8]) {
    let (nb, bb, qoff) = q8_blocks(x, out, SUM);
    let sign = _mm256_set1_ps(-0.0);
    for b in 0..nb {
        // SAFETY: b < nb; the block's 32 floats and bb bytes are inside `x` and `out`.
        let xp = x.as_ptr().add(32 * b);
        let op = out.as_mut_ptr().add(bb * b);
        let v: [__m256; 4] = core::array::from_fn(|k| _mm256_loadu_ps(xp.add(8 * k)));
        // max_ps returns its second operand when either is NaN, so NaN lanes keep `m`.
        let mut m = _mm256_setzero_ps();
        for vk in v {
            m = _mm256_max_ps(_mm256_andnot_ps(sign, vk), m);
        }
        let amax = hmax(m);
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let vid = _mm256_set1_ps(id);
        let q: [__m256i; 4] = core::array::from_fn(|k| round_to_i8(_mm256_mul_ps(v[k], vid)));
        // packs interleave 128-bit lanes: the 4-byte groups come out as
        // q0a q1a q2a q3a q0b q1b q2b q3b; the permute puts them back in element order.
        let p = _mm256_packs_epi16(
            _mm256_packs_epi32(q[0], q[1]),
            _mm256_packs_epi32(q[2], q[3]),
        );
        let p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256(op.add(qoff) as *mut __m256i, p);
        let s = if SUM {
            let t = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
            hsum_i32(t) as f32 * d
        } else {
            0.0
        };
        put_q8_header(op, qoff, d, s);
    }
}

/// Blocks of 32 in `x`, bytes per Q8_1 (`sum`) or Q8_0 block and where its quants start;
/// panics unless `out` holds exactly that many blocks.
pub(super) fn q8_blocks(x: &[f32], out: &[u8], sum: bool) -> (usize, usize, usize) {
    let (bb, qoff) = if sum { (36, 4) } else { (34, 2) };
    let nb = x.len() / 32;
    assert!(
        x.len().is_multiple_of(32) && out.len() == nb * bb,
        "quantize_q8: bad lengths"
    );
    (nb, bb, qoff)
}

/// A Q8 block's f16 fields before its quants at `op`: `d`, then (Q8_1, `qoff` 4) `s`, each
/// rounded to nearest even as the scalar reference does.
///
/// # Safety
/// The CPU has F16C; `op` is valid for `qoff` bytes.
#[inline]
#[target_feature(enable = "f16c")]
pub(super) unsafe fn put_q8_header(op: *mut u8, qoff: usize, d: f32, s: f32) {
    let h = _mm_cvtsi128_si32(_mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm_setr_ps(
        d, s, 0.0, 0.0,
    )));
    let h = (h as u32).to_le_bytes();
    std::ptr::copy_nonoverlapping(h.as_ptr(), op, qoff);
}

/// `t.round() as i8` per lane, as i32: rounds half away from zero as `trunc(t + copysign(0.49999997,
/// t))` (equal to `t.round()` for every f32 up to 10⁶ in magnitude, checked exhaustively; larger
/// ones saturate), clamps to [-128, 127], NaN → 0.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn round_to_i8(t: __m256) -> __m256i {
    let sign = _mm256_set1_ps(-0.0);
    let r = _mm256_add_ps(
        t,
        _mm256_or_ps(_mm256_and_ps(t, sign), _mm256_set1_ps(0.499_999_97)),
    );
    let r = _mm256_and_ps(r, _mm256_cmp_ps::<_CMP_ORD_Q>(t, t));
    let r = _mm256_min_ps(
        _mm256_max_ps(r, _mm256_set1_ps(-128.0)),
        _mm256_set1_ps(127.0),
    );
    _mm256_cvttps_epi32(r)
}

/// Largest lane (no lane is NaN).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn hmax(v: __m256) -> f32 {
    let s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_rng::Rng;
    use edgelm_quant::{int_dot, quantize_row};

    fn have_cpu() -> bool {
        let ok = is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c");
        if !ok {
            eprintln!("skipping: this CPU lacks AVX2/FMA/F16C");
        }
        ok
    }

    fn f16(b: &[u8], off: usize) -> f32 {
        let h = u16::from_le_bytes([b[off], b[off + 1]]);
        // SAFETY: only called after `have_cpu`.
        unsafe { _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h as i32))) }
    }

    const TYPES: [GgmlType; 6] = [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::IQ4_NL,
    ];

    /// The integer quant of element `i` of weight block `b`, as the integer dot uses it.
    fn weight_q(ty: GgmlType, b: &[u8], i: usize) -> i32 {
        let nib = |qs: &[u8]| if i < 16 { qs[i] & 0x0F } else { qs[i - 16] >> 4 } as i32;
        let hi = |off: usize| {
            ((u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]]) >> i) & 1) as i32
        };
        match ty {
            GgmlType::Q4_0 => nib(&b[2..]) - 8,
            GgmlType::Q4_1 => nib(&b[4..]),
            GgmlType::Q5_0 => (nib(&b[6..]) | hi(2) << 4) - 16,
            GgmlType::Q5_1 => nib(&b[8..]) | hi(4) << 4,
            GgmlType::IQ4_NL => edgelm_quant::iq4_nl::GRID[nib(&b[2..]) as usize] as i32,
            _ => b[2 + i] as i8 as i32,
        }
    }

    /// Σ over blocks of |d_w d_a| Σ_i |q_w q_a| + |m_w s_a|: the sum of the magnitudes of every
    /// term both the kernel and the reference add up, which bounds their rounding errors.
    fn magnitude(ty: GgmlType, w: &[u8], a: &[u8]) -> f64 {
        let (wb, ab) = (ty.block_bytes(), int_dot::activation_type(ty).block_bytes());
        let min = matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1);
        let aq = ab - 32;
        w.chunks_exact(wb)
            .zip(a.chunks_exact(ab))
            .map(|(wb, ab)| {
                let s: f64 = (0..32)
                    .map(|i| (weight_q(ty, wb, i) * (ab[aq + i] as i8 as i32)).abs() as f64)
                    .sum();
                let mut m = (f16(wb, 0) as f64 * f16(ab, 0) as f64).abs() * s;
                if min {
                    m += (f16(wb, 2) as f64 * f16(ab, 2) as f64).abs();
                }
                m
            })
            .sum()
    }

    /// Random floats with a random magnitude per block, now and then a zero block.
    fn floats(rng: &mut Rng, n: usize) -> Vec<f32> {
        let mut x = Vec::with_capacity(n);
        for _ in 0..n / 32 {
            let scale = if rng.below(8) == 0 {
                0.0
            } else {
                rng.magnitude(3.0)
            };
            x.extend((0..32).map(|_| rng.unit() * scale));
        }
        x
    }

    fn weight_row(rng: &mut Rng, ty: GgmlType, nb: usize, raw: bool) -> Vec<u8> {
        let mut w = vec![0u8; nb * ty.block_bytes()];
        if raw {
            // Any quant bytes at all, with sane f16 scale (and min) fields.
            w.iter_mut().for_each(|b| *b = rng.next() as u8);
            for blk in w.chunks_exact_mut(ty.block_bytes()) {
                blk[0..2].copy_from_slice(&rng.f16_bytes(8..=16));
                if matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1) {
                    blk[2..4].copy_from_slice(&rng.f16_bytes(8..=16));
                }
            }
        } else {
            quantize_row(ty, &floats(rng, nb * 32), &mut w).unwrap();
        }
        w
    }

    /// Every type, row lengths of 1, 2, 7 and 32 blocks, 1..=8 (and 11) activation rows, weights
    /// from the scalar quantizer and from raw random bytes.
    ///
    /// Tolerance, the same for all six types: |avx2 - scalar| ≤ 1e-5 · magnitude (see
    /// [`magnitude`]). Both sides compute every block's integer sum exactly and differ only in
    /// f32 rounding: the scalar rounds ≤ nb + 2 times along any term's path, the kernel
    /// ≤ nb + 7 (scale product, min product, FMA, accumulator add per block, merging the two
    /// accumulator sets, 3 horizontal adds), each ≤ 2^-24 relative to a partial sum bounded by
    /// the magnitude. With nb ≤ 32 that is < 40 · 6e-8 ≈ 2.4e-6 of it, so 1e-5 is safe (the
    /// observed worst is < 5e-7), while one wrong quant moves the result by ~1/(32 nb) of it.
    #[test]
    fn row_dot_matches_scalar() {
        if !have_cpu() {
            eprintln!("skipping: this CPU lacks AVX2/FMA/F16C; the path is untested here");
            return;
        }
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for ty in TYPES {
            let k = kernel(ty).unwrap();
            assert_eq!(k.act, int_dot::activation_type(ty));
            for nb in [1usize, 2, 7, 32] {
                for raw in [false, true] {
                    for n_acts in (1..=8).chain([11]) {
                        let w = weight_row(&mut rng, ty, nb, raw);
                        let acts: Vec<Vec<u8>> = (0..n_acts)
                            .map(|_| {
                                let mut a = vec![0u8; nb * k.act.block_bytes()];
                                quantize_row(k.act, &floats(&mut rng, nb * 32), &mut a).unwrap();
                                a
                            })
                            .collect();
                        let refs: Vec<&[u8]> = acts.iter().map(|a| &a[..]).collect();
                        let mut out = vec![f32::NAN; n_acts];
                        // SAFETY: the CPU was checked; the lengths match.
                        unsafe { (k.row_dot)(&w, w.len(), 1, &refs, Out::slice(&mut out, 1)) };
                        for (j, a) in acts.iter().enumerate() {
                            let want = int_dot::vec_dot(ty, &w, a).unwrap();
                            let tol = 1e-5 * magnitude(ty, &w, a);
                            let err = (out[j] as f64 - want as f64).abs();
                            assert!(
                                err <= tol,
                                "{ty:?} nb={nb} raw={raw} rows={n_acts} row {j}: avx2 {} scalar {want} (err {err:e}, tol {tol:e})",
                                out[j]
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn table_covers_32_element_types_only() {
        for ty in TYPES {
            let k = kernel(ty).unwrap();
            assert_eq!((k.weight, k.isa), (ty, Isa::Avx2));
        }
        for ty in [
            GgmlType::F32,
            GgmlType::F16,
            GgmlType::Q8_1,
            GgmlType::Q4_K,
            GgmlType::Q6_K,
            GgmlType::Q8_K,
        ] {
            assert!(kernel(ty).is_none(), "{ty:?}");
        }
    }

    /// Rows mixing every awkward case, one kind per block.
    fn nasty_row(rng: &mut Rng, nb: usize) -> Vec<f32> {
        let mut x = Vec::with_capacity(nb * 32);
        for blk in 0..nb {
            let kind = blk % 10;
            x.extend((0..32).map(|i| match kind {
                0 => 0.0,
                1 => rng.unit() * rng.magnitude(38.0),
                2 if i == 7 => f32::MAX,
                2 => rng.unit() * 1e38,
                3 => f32::from_bits(rng.next() as u32 & 0x807F_FFFF), // subnormals
                4 => rng.unit() * 1e-37,
                // d = 1 exactly: half-integers are ties, rounded away from zero.
                5 if i == 0 => 127.0,
                5 => (rng.below(254) as f32 - 127.0) + 0.5,
                6 => f32::from_bits(rng.next() as u32), // NaNs, infinities, anything
                7 if i == 3 => f32::INFINITY,
                7 if i == 9 => f32::NEG_INFINITY,
                7 => rng.unit(),
                8 => -1.5,
                _ => rng.unit() * rng.magnitude(3.0),
            }));
        }
        x
    }

    #[test]
    fn quantizers_match_scalar_bytes() {
        if !have_cpu() {
            return;
        }
        let avx512 = is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl");
        if !avx512 {
            eprintln!("skipping the AVX-512 quantizers: this CPU lacks AVX-512 F/BW/VL");
        }
        let mut rng = Rng(0xD1B5_4A32_D192_ED03);
        for round in 0..200 {
            let nb = 1 + round % 23;
            let mut x = nasty_row(&mut rng, nb);
            if round % 2 == 1 {
                // Shuffle the kinds across blocks too.
                for i in (1..x.len()).rev() {
                    x.swap(i, rng.below(i as u64 + 1) as usize);
                }
            }
            let mut quantizers = vec![
                (GgmlType::Q8_0, quantize_row_q8_0 as QuantizeFn),
                (GgmlType::Q8_1, quantize_row_q8_1),
            ];
            if avx512 {
                use crate::x86::avx512_quant;
                quantizers.push((GgmlType::Q8_0, avx512_quant::quantize_row_q8_0));
                quantizers.push((GgmlType::Q8_1, avx512_quant::quantize_row_q8_1));
            }
            for (ty, f) in quantizers {
                let mut want = vec![0u8; nb * ty.block_bytes()];
                quantize_row(ty, &x, &mut want).unwrap();
                let mut got = vec![0xAAu8; want.len()];
                // SAFETY: the CPU was checked; `got` holds exactly nb blocks.
                unsafe { f(&x, &mut got) };
                for (b, (g, w)) in got
                    .chunks(ty.block_bytes())
                    .zip(want.chunks(ty.block_bytes()))
                    .enumerate()
                {
                    assert_eq!(
                        g,
                        w,
                        "{ty:?} round {round} block {b}: {:?}",
                        &x[32 * b..32 * b + 32]
                    );
                }
            }
        }
    }
}
