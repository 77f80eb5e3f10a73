//! AVX-512 VNNI row dots over interleaved legacy weights (see [`crate::interleave`]) and packed
//! activations. Per tile (one block of a panel's sixteen rows) the weights are unpacked once
//! into eight registers of unsigned codes, lane `r` holding row `r`; for each token, eight
//! `vpdpbusd` against four activation bytes broadcast to every lane accumulate all sixteen
//! rows' integer sums, seeded with the block's `−offset·Σa`; one convert and one FMA with
//! `d_w·d_a` scale them, and formats with a min add `m·s` with one more FMA. A token's sixteen
//! results leave in one store. Integer sums are exact for any input bytes
//! (|sum| ≤ 32·255·128 + 128·32·128).

use crate::interleave::{format, packed_act_bytes, packed_dot, tile_layout, ACT_BLOCK_BYTES, PANEL};
use crate::qdot::{InterleavedDotFn, Out, MAX_COLS};
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

/// [`crate::qdot::RowDotFn`] over one panel of interleaved rows at the start of `w` (`n_rows`
/// = [`PANEL`]), or a last partial panel (`n_rows` < [`PANEL`], GGUF order); each `acts[j]`
/// one packed token.
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
    let ty = weight_type(T);
    let Some(f) = format(ty) else {
        return;
    };
    let nb = row_bytes / f.block;
    assert!(
        n_rows <= PANEL
            && n_rows * row_bytes <= w.len()
            && acts.iter().all(|a| a.len() >= packed_act_bytes(nb * 32)),
        "interleaved row_dot: weights or activations shorter than the panel"
    );
    if n_rows < PANEL {
        for r in 0..n_rows {
            let row = &w[r * row_bytes..(r + 1) * row_bytes];
            for (j, a) in acts.iter().enumerate() {
                let v = packed_dot(ty, row, &a[..packed_act_bytes(nb * 32)]).unwrap_or(f32::NAN);
                out.put(r, j, &[v]);
            }
        }
        return;
    }
    for (chunk, a) in acts.chunks(MAX_COLS).enumerate() {
        let o = Out {
            ptr: out.ptr.add(chunk * MAX_COLS * out.ld),
            ld: out.ld,
        };
        let p: [*const u8; MAX_COLS] = core::array::from_fn(|j| a[j.min(a.len() - 1)].as_ptr());
        match a.len() {
            1 => panel::<T, 1>(w.as_ptr(), nb, &p, o),
            2 => panel::<T, 2>(w.as_ptr(), nb, &p, o),
            3 => panel::<T, 3>(w.as_ptr(), nb, &p, o),
            4 => panel::<T, 4>(w.as_ptr(), nb, &p, o),
            5 => panel::<T, 5>(w.as_ptr(), nb, &p, o),
            6 => panel::<T, 6>(w.as_ptr(), nb, &p, o),
            7 => panel::<T, 7>(w.as_ptr(), nb, &p, o),
            _ => panel::<T, 8>(w.as_ptr(), nb, &p, o),
        }
    }
}

/// The panel at `w` (`nb` tiles) against tokens `a[..N]`: row `r` of token `j` to
/// `out.ptr[j·ld + r]`.
///
/// # Safety
/// As [`row_dot`], lengths checked there; `out` is valid for the panel's rows of N tokens.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn panel<const T: u8, const N: usize>(
    w: *const u8,
    nb: usize,
    a: &[*const u8; MAX_COLS],
    out: Out,
) {
    let Some(f) = format(weight_type(T)) else {
        return;
    };
    let lay = tile_layout(f);
    let low = _mm512_set1_epi8(0x0F);
    let sixteen = _mm512_set1_epi8(16);
    let mut acc = [_mm512_setzero_ps(); N];
    for b in 0..nb {
        // SAFETY (weight reads): tile b lies inside the panel's `PANEL · row_bytes` bytes.
        let tp = w.add(b * lay.len);
        let mut wv = [_mm512_setzero_si512(); 8];
        if f.nibbles {
            for h in 0..4 {
                let x = _mm512_loadu_si512(tp.add(lay.quants + 64 * h).cast());
                wv[h] = _mm512_and_si512(x, low);
                wv[h + 4] = _mm512_and_si512(_mm512_srli_epi16::<4>(x), low);
            }
        } else {
            for (g, v) in wv.iter_mut().enumerate() {
                *v = _mm512_loadu_si512(tp.add(lay.quants + 64 * g).cast());
            }
        }
        if f.high {
            for (g, v) in wv.iter_mut().enumerate() {
                let m = tp.add(lay.high + 8 * g).cast::<u64>().read_unaligned();
                *v = _mm512_mask_add_epi8(*v, _cvtu64_mask64(m), *v, sixteen);
            }
        }
        let dw = _mm512_cvtph_ps(_mm256_loadu_si256(tp.add(lay.d).cast()));
        let mw = if f.min {
            _mm512_cvtph_ps(_mm256_loadu_si256(tp.add(lay.m).cast()))
        } else {
            _mm512_setzero_ps()
        };
        for j in 0..N {
            // SAFETY: token j's block b is ACT_BLOCK_BYTES at `ap` (length checked).
            let ap = a[j].add(b * ACT_BLOCK_BYTES);
            let word = |at: usize| ap.add(at).cast::<i32>().read_unaligned();
            let mut t = if f.min {
                _mm512_setzero_si512()
            } else {
                _mm512_set1_epi32(word(36))
            };
            // Two chains per token halve the dependent dpbusd latency per tile.
            let mut u = _mm512_setzero_si512();
            for g in (0..8).step_by(2) {
                t = _mm512_dpbusd_epi32(t, wv[g], _mm512_set1_epi32(word(4 * g)));
                u = _mm512_dpbusd_epi32(u, wv[g + 1], _mm512_set1_epi32(word(4 * g + 4)));
            }
            t = _mm512_add_epi32(t, u);
            let da = _mm512_set1_ps(f32::from_bits(word(32) as u32));
            acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_mul_ps(dw, da), acc[j]);
            if f.min {
                let s = _mm512_set1_ps(f32::from_bits(word(36) as u32));
                acc[j] = _mm512_fmadd_ps(mw, s, acc[j]);
            }
        }
    }
    for (j, v) in acc.iter().enumerate() {
        // SAFETY: token j's sixteen rows of `out` are valid (caller).
        _mm512_storeu_ps(out.ptr.add(j * out.ld), *v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interleave::{interleave_rows, pack_activations, packed_dot};
    use crate::test_rng::Rng;
    use edgelm_quant::{int_dot, quantize_row};

    fn have_cpu() -> bool {
        let ok = crate::Isa::detect() == crate::Isa::Avx512;
        if !ok {
            eprintln!("skipping: this CPU lacks AVX-512 F/BW/VL/VNNI; the path is untested");
        }
        ok
    }

    /// Random panels of 1–40 blocks per row, 1..=8 and 11 tokens, weights from the quantizer
    /// and from raw random bytes: every output equals the scalar packed dot on the GGUF row
    /// within f32 reordering (`1e-5` of the absolute sum of block terms) and the integer
    /// reference likewise; a partial panel (GGUF order) gives each row the same result.
    #[test]
    fn interleaved_row_dot_matches_scalar() {
        if !have_cpu() {
            return;
        }
        let mut rng = Rng(0xD1B5_4A32_D192_ED03);
        for ty in crate::interleave::tests::TYPES {
            let act_ty = int_dot::activation_type(ty);
            let dot = row_dot_for(ty).unwrap();
            for nb in [1usize, 2, 7, 16, 17, 28, 40] {
                let row_bytes = nb * ty.block_bytes();
                let rows: Vec<Vec<u8>> = (0..PANEL).map(|_| weights(&mut rng, ty, nb)).collect();
                let gguf = rows.concat();
                let mut wp = vec![0u8; gguf.len()];
                interleave_rows(ty, row_bytes, &gguf, &mut wp).unwrap();
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
                    let mut out = vec![f32::NAN; n * PANEL];
                    // SAFETY: the CPU was checked; lengths match.
                    unsafe { dot(&wp, row_bytes, PANEL, &refs, Out::slice(&mut out, PANEL)) };
                    // The first three rows as a partial panel, in GGUF order.
                    let mut part = vec![f32::NAN; n * 3];
                    // SAFETY: as above.
                    unsafe { dot(&gguf, row_bytes, 3, &refs, Out::slice(&mut part, 3)) };
                    for (r, row) in rows.iter().enumerate() {
                        for j in 0..n {
                            let got = out[j * PANEL + r];
                            let scalar = packed_dot(ty, row, &packed[j]).unwrap();
                            let reference = int_dot::vec_dot(ty, row, &std_acts[j]).unwrap();
                            let tol = 1e-5 * magnitude(ty, row, &std_acts[j]) + 1e-6;
                            for (what, want) in [("packed scalar", scalar), ("int_dot", reference)]
                            {
                                let err = (got - want).abs();
                                assert!(
                                    got.is_finite() && err <= tol,
                                    "{ty:?} {nb} blocks, {n} tokens, row {r} token {j}: avx512 \
                                     {got} {what} {want} (err {err:e}, tol {tol:e})"
                                );
                            }
                            if r < 3 {
                                assert_eq!(part[j * 3 + r], scalar, "{ty:?}: partial panel");
                            }
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
