//! AVX-512 VNNI row dots over interleaved legacy weights (see [`crate::interleave`]) and packed
//! activations. Per group of sixteen blocks a weight row is unpacked once into eight registers
//! of unsigned codes; for each activation row, eight `vpdpbusd` (codes × i8 activations, the
//! activations straight from memory) accumulate every block's integer sum in its own 32-bit
//! lane, seeded with the block's `−offset·Σa`; one convert and one FMA with `d_w·d_a` scale all
//! sixteen, and formats with a min add `m·s` with one more FMA. Integer sums are exact for any
//! input bytes (|sum| ≤ 32·255·128 + 128·32·128).

use crate::interleave::{format, group_layout, packed_act_bytes, ACT_GROUP_BYTES, GROUP};
use crate::qdot::{row_tiles, InterleavedDotFn, InterleavedMatVecFn, Out};
use edgelm_quant::GgmlType;
use std::arch::x86_64::*;

/// Format tags for the const generic.
const T_Q4_0: u8 = 0;
const T_Q4_1: u8 = 1;
const T_Q5_0: u8 = 2;
const T_Q5_1: u8 = 3;
const T_Q8_0: u8 = 4;

const fn weight_type(t: u8) -> GgmlType {
    match t {
        T_Q4_0 => GgmlType::Q4_0,
        T_Q4_1 => GgmlType::Q4_1,
        T_Q5_0 => GgmlType::Q5_0,
        T_Q5_1 => GgmlType::Q5_1,
        _ => GgmlType::Q8_0,
    }
}

/// The interleaved row dot for `ty`, if it has one.
pub fn row_dot_for(ty: GgmlType) -> Option<InterleavedDotFn> {
    use GgmlType::*;
    Some(match ty {
        Q4_0 => row_dot::<T_Q4_0>,
        Q4_1 => row_dot::<T_Q4_1>,
        Q5_0 => row_dot::<T_Q5_0>,
        Q5_1 => row_dot::<T_Q5_1>,
        Q8_0 => row_dot::<T_Q8_0>,
        _ => return None,
    })
}

/// The interleaved matrix–vector product for `ty`, if it has one.
pub fn matvec_for(ty: GgmlType) -> Option<InterleavedMatVecFn> {
    use GgmlType::*;
    Some(match ty {
        Q4_0 => matvec::<T_Q4_0>,
        Q4_1 => matvec::<T_Q4_1>,
        Q5_0 => matvec::<T_Q5_0>,
        Q5_1 => matvec::<T_Q5_1>,
        Q8_0 => matvec::<T_Q8_0>,
        _ => return None,
    })
}

/// `out[r] = row_r · act` for the `out.len()` rows of `row_bytes` at the start of `w`: one
/// token (decoding), checked once for all rows rather than once per row.
///
/// # Safety
/// As [`row_dot`].
unsafe fn matvec<const T: u8>(w: &[u8], row_bytes: usize, act: &[u8], out: &mut [f32]) {
    let Some(f) = format(weight_type(T)) else {
        return;
    };
    let nb = row_bytes / f.block;
    assert!(
        out.len() * row_bytes <= w.len() && act.len() >= packed_act_bytes(nb * 32),
        "interleaved matvec: weight or activations shorter than the rows"
    );
    matvec_rows::<T>(w.as_ptr(), w.len(), row_bytes, nb, act.as_ptr(), out);
}

/// # Safety
/// As [`matvec`], lengths checked there.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn matvec_rows<const T: u8>(
    w: *const u8,
    avail: usize,
    row_bytes: usize,
    nb: usize,
    act: *const u8,
    out: &mut [f32],
) {
    for (r, o) in out.iter_mut().enumerate() {
        let at = r * row_bytes;
        *o = groups::<T, 1>(w.add(at), avail - at, nb, &[act])[0];
    }
}

/// [`crate::qdot::RowDotFn`] over the `n_rows` interleaved rows of `row_bytes` at the start of
/// `w`; each `acts[j]` one packed token.
///
/// # Safety
/// The CPU has AVX2, F16C and AVX-512 F/BW/VL/VNNI.
unsafe fn row_dot<const T: u8>(
    w: &[u8],
    row_bytes: usize,
    n_rows: usize,
    acts: &[&[u8]],
    out: Out,
) {
    let Some(f) = format(weight_type(T)) else {
        return;
    };
    let nb = row_bytes / f.block;
    assert!(
        n_rows * row_bytes <= w.len() && acts.iter().all(|a| a.len() >= packed_act_bytes(nb * 32)),
        "interleaved row_dot: weights or activations shorter than the block"
    );
    row_tiles!(n_rows, acts, out, |r, a, o, N| {
        let wr = &w[r * row_bytes..];
        rows::<T, N>(wr, nb, a, &mut o)
    });
}

/// # Safety
/// As [`row_dot`]; `acts.len() >= N`, `out.len() >= N`, lengths checked there.
#[inline(always)]
unsafe fn rows<const T: u8, const N: usize>(w: &[u8], nb: usize, acts: &[&[u8]], out: &mut [f32]) {
    let a: [*const u8; N] = core::array::from_fn(|j| acts[j].as_ptr());
    let r = groups::<T, N>(w.as_ptr(), w.len(), nb, &a);
    out[..N].copy_from_slice(&r);
}

/// # Safety
/// As [`row_dot`]: `w` holds `nb` blocks interleaved and is readable for `avail` bytes, each
/// `a[j]` their packed activations.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn groups<const T: u8, const N: usize>(
    w: *const u8,
    avail: usize,
    nb: usize,
    a: &[*const u8; N],
) -> [f32; N] {
    let Some(f) = format(weight_type(T)) else {
        return [0.0; N];
    };
    let mut acc = [_mm512_setzero_ps(); N];
    let low = _mm512_set1_epi8(0x0F);
    let sixteen = _mm512_set1_epi8(16);
    let mut at = 0;
    let mut g0 = 0;
    let mut half_acc = [_mm256_setzero_ps(); N];
    while g0 < nb {
        let nt = (nb - g0).min(GROUP);
        let lay = group_layout(f, nt);
        if nt <= GROUP / 2 {
            // A tail of at most eight blocks fits 256-bit registers, at half the cost.
            half_group::<T, N>(w.add(at), lay, nt, avail - at, a, g0, &mut half_acc);
            break;
        }
        let bytes = 4 * nt;
        let kq: u64 = if nt == GROUP { !0 } else { (1u64 << bytes) - 1 };
        let kd: __mmask16 = ((1u32 << nt) - 1) as u16;
        let wp = w.add(at);
        // A partial group's images are shorter than a register. Masked loads stall the
        // hardware prefetcher (measured: 2.5x slower decoding), so full-width loads read past
        // them where the buffer allows; the extra lanes meet zero activations, and scales are
        // masked in registers. Near the end of the buffer the loads are masked instead.
        let wide = nt == GROUP || at + lay.len + 64 <= avail;
        // SAFETY (all weight reads): `wide` loads stay inside the `avail` bytes; masked ones
        // read only the group's own bytes; the fifth-bit words start in the group's first
        // `4·nt` bytes and end inside it (the quants follow).
        let load = |p: *const u8| {
            if wide {
                _mm512_loadu_si512(p.cast())
            } else {
                _mm512_maskz_loadu_epi8(kq, p.cast())
            }
        };
        let halves = |p: *const u8| {
            let x = if wide {
                _mm256_loadu_si256(p.cast())
            } else {
                _mm256_maskz_loadu_epi16(kd, p.cast())
            };
            _mm512_cvtph_ps(_mm256_maskz_mov_epi16(kd, x))
        };
        let mut wv = [_mm512_setzero_si512(); 8];
        if f.nibbles {
            for h in 0..4 {
                let x = load(wp.add(lay.quants + h * bytes));
                wv[h] = _mm512_and_si512(x, low);
                wv[h + 4] = _mm512_and_si512(_mm512_srli_epi16::<4>(x), low);
            }
        } else {
            for (g, v) in wv.iter_mut().enumerate() {
                *v = load(wp.add(lay.quants + g * bytes));
            }
        }
        if f.high {
            for (g, v) in wv.iter_mut().enumerate() {
                let pos = g * bytes;
                let word = wp
                    .add(lay.high + pos / 8)
                    .cast::<[u8; 8]>()
                    .read_unaligned();
                let m = (u64::from_le_bytes(word) >> (pos % 8)) & kq;
                *v = _mm512_mask_add_epi8(*v, _cvtu64_mask64(m), *v, sixteen);
            }
        }
        let dw = halves(wp.add(lay.d));
        let mw = if f.min {
            halves(wp.add(lay.m))
        } else {
            _mm512_setzero_ps()
        };
        let ag = g0 / GROUP * ACT_GROUP_BYTES;
        for j in 0..N {
            // SAFETY: token j's packed group is ACT_GROUP_BYTES at `ap` (length checked).
            let ap = a[j].add(ag);
            let mut t = if f.min {
                _mm512_setzero_si512()
            } else {
                _mm512_loadu_si512(ap.add(576).cast())
            };
            // Two chains per token halve the dependent dpbusd latency per group, so fewer
            // tokens must be in flight to keep both VNNI pipes busy.
            let mut u = _mm512_setzero_si512();
            for g in (0..8).step_by(2) {
                t = _mm512_dpbusd_epi32(t, wv[g], _mm512_loadu_si512(ap.add(64 * g).cast()));
                let next = _mm512_loadu_si512(ap.add(64 * g + 64).cast());
                u = _mm512_dpbusd_epi32(u, wv[g + 1], next);
            }
            t = _mm512_add_epi32(t, u);
            let scale = _mm512_mul_ps(dw, _mm512_loadu_ps(ap.add(512).cast()));
            acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), scale, acc[j]);
            if f.min {
                acc[j] = _mm512_fmadd_ps(mw, _mm512_loadu_ps(ap.add(576).cast()), acc[j]);
            }
        }
        at += lay.len;
        g0 += GROUP;
    }
    core::array::from_fn(|j| {
        let half = _mm512_castps256_ps512(half_acc[j]);
        _mm512_reduce_add_ps(_mm512_add_ps(
            acc[j],
            _mm512_mask_mov_ps(_mm512_setzero_ps(), 0xFF, half),
        ))
    })
}

/// [`groups`] for a last group of `nt ≤ 8` blocks at `wp` (readable for `avail` bytes), on
/// 256-bit registers: lanes 0..8 of every image and activation vector.
///
/// # Safety
/// As [`groups`].
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn half_group<const T: u8, const N: usize>(
    wp: *const u8,
    lay: crate::interleave::GroupLayout,
    nt: usize,
    avail: usize,
    a: &[*const u8; N],
    g0: usize,
    acc: &mut [__m256; N],
) {
    let Some(f) = format(weight_type(T)) else {
        return;
    };
    let low = _mm256_set1_epi8(0x0F);
    let sixteen = _mm256_set1_epi8(16);
    let bytes = 4 * nt;
    let kq: u32 = if bytes == 32 { !0 } else { (1u32 << bytes) - 1 };
    let kd: __mmask8 = ((1u32 << nt) - 1) as u8;
    // As in `groups`: full-width loads where the buffer has the bytes, masked ones otherwise.
    let wide = lay.len + 32 <= avail;
    // SAFETY (weight reads): as in `groups`, with 32-byte loads.
    let load = |p: *const u8| {
        if wide {
            _mm256_loadu_si256(p.cast())
        } else {
            _mm256_maskz_loadu_epi8(kq, p.cast())
        }
    };
    let halves = |p: *const u8| {
        let x = if wide {
            _mm_loadu_si128(p.cast())
        } else {
            _mm_maskz_loadu_epi16(kd, p.cast())
        };
        _mm256_cvtph_ps(_mm_maskz_mov_epi16(kd, x))
    };
    let mut wv = [_mm256_setzero_si256(); 8];
    if f.nibbles {
        for h in 0..4 {
            let x = load(wp.add(lay.quants + h * bytes));
            wv[h] = _mm256_and_si256(x, low);
            wv[h + 4] = _mm256_and_si256(_mm256_srli_epi16::<4>(x), low);
        }
    } else {
        for (g, v) in wv.iter_mut().enumerate() {
            *v = load(wp.add(lay.quants + g * bytes));
        }
    }
    if f.high {
        for (g, v) in wv.iter_mut().enumerate() {
            let pos = g * bytes;
            let word = wp
                .add(lay.high + pos / 8)
                .cast::<[u8; 8]>()
                .read_unaligned();
            let m = ((u64::from_le_bytes(word) >> (pos % 8)) as u32) & kq;
            *v = _mm256_mask_add_epi8(*v, m, *v, sixteen);
        }
    }
    let dw = halves(wp.add(lay.d));
    let mw = if f.min {
        halves(wp.add(lay.m))
    } else {
        _mm256_setzero_ps()
    };
    let ag = g0 / GROUP * ACT_GROUP_BYTES;
    for j in 0..N {
        // SAFETY: token j's packed group is ACT_GROUP_BYTES at `ap`.
        let ap = a[j].add(ag);
        let mut t = if f.min {
            _mm256_setzero_si256()
        } else {
            _mm256_loadu_si256(ap.add(576).cast())
        };
        for (g, v) in wv.iter().enumerate() {
            t = _mm256_dpbusd_epi32(t, *v, _mm256_loadu_si256(ap.add(64 * g).cast()));
        }
        let scale = _mm256_mul_ps(dw, _mm256_loadu_ps(ap.add(512).cast()));
        acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), scale, acc[j]);
        if f.min {
            acc[j] = _mm256_fmadd_ps(mw, _mm256_loadu_ps(ap.add(576).cast()), acc[j]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interleave::{interleave_row, pack_activations, packed_dot};
    use crate::qdot::MAX_COLS;
    use crate::test_rng::Rng;
    use edgelm_quant::{int_dot, quantize_row};

    fn have_cpu() -> bool {
        let ok = crate::Isa::detect() == crate::Isa::Avx512;
        if !ok {
            eprintln!("skipping: this CPU lacks AVX-512 F/BW/VL/VNNI; the path is untested");
        }
        ok
    }

    /// Random rows of 1–40 blocks (whole and partial groups), 1..=8 and 11 activation rows,
    /// weights from the quantizer and from raw random bytes: every output equals the scalar
    /// packed dot within f32 reordering (`1e-5` of the absolute sum of block terms) and the
    /// integer reference on the GGUF layout likewise; tiles of two and three rows give each row
    /// exactly its one-row result.
    #[test]
    fn interleaved_row_dot_matches_scalar() {
        if !have_cpu() {
            return;
        }
        let mut rng = Rng(0xD1B5_4A32_D192_ED03);
        for ty in crate::interleave::tests::TYPES {
            let act_ty = int_dot::activation_type(ty);
            let dot = row_dot_for(ty).unwrap();
            for nb in [1usize, 2, 7, 15, 16, 17, 18, 28, 32, 40] {
                let w = weights(&mut rng, ty, nb);
                let mut wp = vec![0u8; w.len()];
                interleave_row(ty, &w, &mut wp).unwrap();
                for n in (1..=MAX_COLS).chain([11]) {
                    let mut std_acts = Vec::new();
                    let mut packed = Vec::new();
                    for _ in 0..n {
                        let scale = 0.05 + 4.0 * rng.unit().abs();
                        let x: Vec<f32> = (0..nb * 32).map(|_| rng.weight() * scale).collect();
                        let mut a = vec![0u8; nb * act_ty.block_bytes()];
                        quantize_row(act_ty, &x, &mut a).unwrap();
                        let mut p = vec![0u8; packed_act_bytes(nb * 32)];
                        pack_activations(ty, &a, &mut p).unwrap();
                        std_acts.push(a);
                        packed.push(p);
                    }
                    let refs: Vec<&[u8]> = packed.iter().map(|p| p.as_slice()).collect();
                    let mut out = vec![f32::NAN; n];
                    // SAFETY: the CPU was checked; lengths match.
                    unsafe { dot(&wp, wp.len(), 1, &refs, Out::slice(&mut out, 1)) };
                    // With readable bytes after the row (the next rows of a matrix), partial
                    // groups take full-width loads; those bytes must not change the result.
                    let mut slack = wp.clone();
                    slack.extend((0..64).map(|_| rng.next() as u8 | 0x7C));
                    let mut wide = vec![f32::NAN; n];
                    // SAFETY: as above.
                    unsafe { dot(&slack, wp.len(), 1, &refs, Out::slice(&mut wide, 1)) };
                    assert_eq!(
                        out, wide,
                        "{ty:?} {nb} blocks: bytes past the row leaked in"
                    );
                    // Three copies of the row as a matrix: the matrix-vector entry gives each
                    // row the single-row result.
                    let matrix = wp.repeat(3);
                    let mut mv = [f32::NAN; 3];
                    // SAFETY: as above.
                    unsafe { matvec_for(ty).unwrap()(&matrix, wp.len(), &packed[0], &mut mv) };
                    let mut one = [f32::NAN];
                    // SAFETY: as above.
                    unsafe { dot(&matrix, wp.len(), 1, &refs[..1], Out::slice(&mut one, 1)) };
                    assert_eq!(mv, [one[0]; 3], "{ty:?} {nb} blocks: matvec");
                    // Two and three different rows as one tile: each result equals that row's
                    // own dot, the last row's partial group read masked at the end of the buffer.
                    let others: Vec<Vec<u8>> = (0..2)
                        .map(|_| {
                            let w = weights(&mut rng, ty, nb);
                            let mut p = vec![0u8; w.len()];
                            interleave_row(ty, &w, &mut p).unwrap();
                            p
                        })
                        .collect();
                    let tile_rows = [others[0].as_slice(), others[1].as_slice(), &wp];
                    for n_rows in [2, 3] {
                        let matrix = tile_rows[3 - n_rows..].concat();
                        let mut tile = vec![f32::NAN; n_rows * n];
                        // SAFETY: as above.
                        unsafe {
                            dot(
                                &matrix,
                                wp.len(),
                                n_rows,
                                &refs,
                                Out::slice(&mut tile, n_rows),
                            )
                        };
                        for r in 0..n_rows {
                            let mut alone = vec![f32::NAN; n];
                            // SAFETY: as above.
                            unsafe {
                                let out = Out::slice(&mut alone, 1);
                                dot(tile_rows[3 - n_rows + r], wp.len(), 1, &refs, out)
                            };
                            let row: Vec<f32> = (0..n).map(|j| tile[j * n_rows + r]).collect();
                            assert_eq!(
                                row, alone,
                                "{ty:?} {nb} blocks, {n} tokens: row {r} of a {n_rows}-row tile"
                            );
                        }
                    }
                    for j in 0..n {
                        let scalar = packed_dot(ty, &wp, &packed[j]).unwrap();
                        let reference = int_dot::vec_dot(ty, &w, &std_acts[j]).unwrap();
                        let tol = 1e-5 * magnitude(ty, &w, &std_acts[j]) + 1e-6;
                        for (what, want) in [("packed scalar", scalar), ("int_dot", reference)] {
                            let err = (out[j] - want).abs();
                            assert!(
                                out[j].is_finite() && err <= tol,
                                "{ty:?} {nb} blocks, {n} rows, row {j}: avx512 {} {what} {want} \
                                 (err {err:e}, tol {tol:e})",
                                out[j]
                            );
                        }
                    }
                }
            }
        }
    }

    /// Quantizer output, or (every other call) raw random bytes with sane f16 scales.
    fn weights(rng: &mut Rng, ty: GgmlType, nb: usize) -> Vec<u8> {
        let mut w = vec![0u8; nb * ty.block_bytes()];
        if rng.below(2) == 0 {
            let x: Vec<f32> = (0..nb * 32).map(|_| rng.weight() * 2.0).collect();
            quantize_row(ty, &x, &mut w).unwrap();
        } else {
            w.iter_mut().for_each(|b| *b = rng.next() as u8);
            let has_min = matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1);
            for b in w.chunks_mut(ty.block_bytes()) {
                b[0..2].copy_from_slice(&rng.small_f16());
                if has_min {
                    b[2..4].copy_from_slice(&rng.small_f16());
                }
            }
        }
        w
    }

    /// Σ |d·(code − offset)|·|a| + |m·a| over the row: bounds every partial sum either side forms.
    fn magnitude(ty: GgmlType, w: &[u8], a: &[u8]) -> f32 {
        let act_ty = int_dot::activation_type(ty);
        let n = a.len() / act_ty.block_bytes() * 32;
        let mut wf = vec![0f32; n];
        let mut af = vec![0f32; n];
        edgelm_quant::dequantize_row(ty, w, &mut wf).unwrap();
        edgelm_quant::dequantize_row(act_ty, a, &mut af).unwrap();
        let mins: f32 = if matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1) {
            w.chunks(ty.block_bytes())
                .zip(af.chunks(32))
                .map(|(b, a)| {
                    let m = half::f16::from_le_bytes([b[2], b[3]]).to_f32().abs();
                    m * a.iter().map(|v| v.abs()).sum::<f32>()
                })
                .sum()
        } else {
            0.0
        };
        wf.iter().zip(&af).map(|(w, a)| (w * a).abs()).sum::<f32>() + mins
    }
}
