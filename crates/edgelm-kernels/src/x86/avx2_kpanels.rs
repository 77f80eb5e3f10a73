//! The decode-once prompt path for k-quants on AVX2 ([`crate::qdot::PanelPrefill`]): sixteen
//! GGUF rows decoded into 8-bit codes once, then read by every tile of tokens with `maddubs`.
//!
//! Decoded, per half panel (eight rows) and super-block, [`K_BLOCK`] bytes:
//! - 64 images of codes: lane `r` of image `i` holds row `r`'s elements `4i..4i + 4` — Q4_K's
//!   and Q5_K's unsigned codes, Q6_K's signed `q − 32` (the sign trick, `|c| ≤ 32`);
//! - 16 scale vectors, one per 16 elements, lane `r` = the row's scale in both 16-bit halves,
//!   so one `madd` both widens a group's i16 sums and scales them;
//! - `d` as f32; for Q4_K / Q5_K `dmin` as f32 and eight min vectors (lane = the sub-block's
//!   min in both halves), `madd`ed with Q8_K's pairs of 16-element sums.
//!
//! i16 bounds: a group is four images, `4·2·c·127` with `c ≤ 31` (Q5_K) or `|c| ≤ 32` (Q6_K)
//! stays below 2¹⁵; i32 sums of a super-block stay below 2³¹ (|scale| ≤ 128).
//!
//! On the AVX-VNNI tier (`P_VNNI`) each group's four images go through `vpdpbusd` straight into
//! i32 (Q6_K's with the same sign trick) and one `vpmulld` by the group's scale replaces the
//! `maddubs` chain and its `madd`: the same integers, so results are bit for bit AVX2's.

#[cfg(test)]
use super::avx2_interleaved::P_EMULATED;
use super::avx2_interleaved::{dpbusd, P_MADDUBS, P_VNNI};
use super::{
    half_kernel_for_product, half_kernels, panel_times_tokens, weight_type, HalfKernel, TOKENS,
    T_Q4_K, T_Q5_K, T_Q6_K,
};
use crate::interleave::PANEL;
use crate::qdot::{DecodeFn, DecodedDotFn, Out, PanelPrefill};
use edgelm_quant::k_quants::q8_k::{BLOCK_BYTES as Q8K_BYTES, BSUMS as Q8K_BSUMS, QS as Q8K_QS};
use edgelm_quant::GgmlType;
use half::f16;
use std::arch::x86_64::*;

/// Bytes of one decoded super-block of eight rows.
const K_BLOCK: usize = 64 * 32 + 16 * 32 + 32 + 32 + 8 * 32;
const SCALES_AT: usize = 64 * 32;
const D_AT: usize = SCALES_AT + 16 * 32;
const DMIN_AT: usize = D_AT + 32;
const MINS_AT: usize = DMIN_AT + 32;

/// The decode-once prompt path of a k-quant with product `P`, where one exists.
pub(super) fn prefill_for<const P: u8>(ty: GgmlType) -> Option<PanelPrefill> {
    use GgmlType::*;
    let (decode, dot): (DecodeFn, DecodedDotFn) = match ty {
        Q4_K => (decode::<T_Q4_K>, decoded_dot::<T_Q4_K, P>),
        Q5_K => (decode::<T_Q5_K>, decoded_dot::<T_Q5_K, P>),
        Q6_K => (decode::<T_Q6_K>, decoded_dot::<T_Q6_K, P>),
        _ => return None,
    };
    Some(PanelPrefill {
        from_interleaved: false,
        // Decoding a super-block costs a few tokens' products on it (criterion's prefill group,
        // one thread: at 8 tokens the row dots lead, at 12 Q4_K gains 21% and Q6_K breaks even,
        // at 16 Q4_K gains 26%).
        min_tokens: 12,
        bytes: |cols| (cols / 256) * 2 * K_BLOCK,
        decode,
        dot,
    })
}

/// One row's super-block apart from its codes: 16-element group scales, sub-block mins, `d` and
/// `dmin`.
struct Header {
    scales: [i16; 16],
    mins: [i16; 8],
    d: f32,
    dmin: f32,
}

/// Q4_K / Q5_K's 6-bit scale and min of sub-block `j` (GGUF's packing of 12 bytes).
fn scale_min(j: usize, q: &[u8]) -> (i16, i16) {
    if j < 4 {
        ((q[j] & 63) as i16, (q[j + 4] & 63) as i16)
    } else {
        (
            ((q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4)) as i16,
            ((q[j + 4] >> 4) | ((q[j] >> 6) << 4)) as i16,
        )
    }
}

fn half_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// The header of super-block `blk` (GGUF bytes) of type `T`.
fn header<const T: u8>(blk: &[u8]) -> Header {
    let mut o = Header {
        scales: [0; 16],
        mins: [0; 8],
        d: 0.0,
        dmin: 0.0,
    };
    if T == T_Q6_K {
        o.d = half_at(blk, 208);
        for (s, &b) in o.scales.iter_mut().zip(&blk[192..208]) {
            *s = b as i8 as i16;
        }
    } else {
        o.d = half_at(blk, 0);
        o.dmin = half_at(blk, 2);
        for j in 0..8 {
            let (sc, m) = scale_min(j, &blk[4..16]);
            o.scales[2 * j] = sc;
            o.scales[2 * j + 1] = sc;
            o.mins[j] = m;
        }
    }
    o
}

/// The 256 codes of super-block `blk` (GGUF bytes, [`weight_type`]`(T)`'s size) of type `T` in
/// element order into `codes`: Q4_K's and Q5_K's unsigned, Q6_K's as `q − 32`.
///
/// # Safety
/// The CPU has AVX2.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn codes<const T: u8>(blk: &[u8], codes: &mut [u8; 256]) {
    assert!(
        blk.len() >= weight_type(T).block_bytes(),
        "codes: block too short"
    );
    let b = blk.as_ptr();
    let c = codes.as_mut_ptr();
    let nibble = _mm256_set1_epi8(0x0F);
    let load = |at: usize| _mm256_loadu_si256(b.add(at).cast());
    // Bits `s..` of each byte of `v` under `mask`, moved up to bit 4 (16-bit shifts: the mask
    // drops what crosses from the neighbouring byte).
    let bits = |v: __m256i, s: i32, mask: i8| {
        let v = _mm256_and_si256(
            _mm256_srl_epi16(v, _mm_cvtsi32_si128(s)),
            _mm256_set1_epi8(mask),
        );
        _mm256_slli_epi16::<4>(v)
    };
    let store = |at: usize, v: __m256i| _mm256_storeu_si256(c.add(at).cast(), v);
    if T == T_Q6_K {
        let minus32 = _mm256_set1_epi8(32);
        for n in 0..2 {
            let (a, bb, h) = (load(64 * n), load(64 * n + 32), load(128 + 32 * n));
            let hi_a = _mm256_and_si256(_mm256_srli_epi16::<4>(a), nibble);
            let hi_b = _mm256_and_si256(_mm256_srli_epi16::<4>(bb), nibble);
            let parts = [
                (_mm256_and_si256(a, nibble), 0),
                (_mm256_and_si256(bb, nibble), 2),
                (hi_a, 4),
                (hi_b, 6),
            ];
            for (k, (low, s)) in parts.into_iter().enumerate() {
                let q = _mm256_or_si256(low, bits(h, s, 3));
                store(128 * n + 32 * k, _mm256_sub_epi8(q, minus32));
            }
        }
    } else {
        let (qs, qh) = if T == T_Q5_K {
            (48, Some(load(16)))
        } else {
            (16, None)
        };
        for j in 0..4 {
            let v = load(qs + 32 * j);
            let mut lo = _mm256_and_si256(v, nibble);
            let mut hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), nibble);
            if let Some(h) = qh {
                lo = _mm256_or_si256(lo, bits(h, 2 * j as i32, 1));
                hi = _mm256_or_si256(hi, bits(h, 2 * j as i32 + 1, 1));
            }
            store(64 * j, lo);
            store(64 * j + 32, hi);
        }
    }
}

/// Eight rows' codes (`rows[l]` row `l`'s, element order) into images of four codes per row:
/// image `i` at `dst[32·i..]`, lane `l` = row `l`'s elements `4i..4i + 4` — 8×8 transposes of
/// 32-bit words.
///
/// # Safety
/// The CPU has AVX2.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn images(rows: &[[u8; 256]; 8], dst: &mut [u8]) {
    assert!(dst.len() >= 64 * 32, "images: destination too short");
    for g in 0..8 {
        let v: [__m256i; 8] =
            core::array::from_fn(|r| _mm256_loadu_si256(rows[r].as_ptr().add(32 * g).cast()));
        let t: [__m256i; 8] = core::array::from_fn(|k| {
            let (a, b) = (v[2 * (k / 2)], v[2 * (k / 2) + 1]);
            if k % 2 == 0 {
                _mm256_unpacklo_epi32(a, b)
            } else {
                _mm256_unpackhi_epi32(a, b)
            }
        });
        // s[q]: words q and q + 4 of rows 0–3 (q < 4) or rows 4–7 (q ≥ 4).
        let s: [__m256i; 8] = core::array::from_fn(|q| {
            let (base, w) = (4 * (q / 4), q % 4);
            let (a, b) = (t[base + w / 2], t[base + 2 + w / 2]);
            if w % 2 == 0 {
                _mm256_unpacklo_epi64(a, b)
            } else {
                _mm256_unpackhi_epi64(a, b)
            }
        });
        for w in 0..4 {
            let low = _mm256_permute2x128_si256::<0x20>(s[w], s[w + 4]);
            let high = _mm256_permute2x128_si256::<0x31>(s[w], s[w + 4]);
            _mm256_storeu_si256(dst.as_mut_ptr().add(32 * (8 * g + w)).cast(), low);
            _mm256_storeu_si256(dst.as_mut_ptr().add(32 * (8 * g + w + 4)).cast(), high);
        }
    }
}

/// [`DecodeFn`]: a panel of sixteen GGUF rows of type `T` into the layout of the module note,
/// half `h`, super-block `b` at `(h·nb + b)·K_BLOCK`.
///
/// # Safety
/// The CPU has AVX2.
#[target_feature(enable = "avx2")]
unsafe fn decode<const T: u8>(w: &[u8], row_bytes: usize, dst: &mut [u8]) {
    let block = weight_type(T).block_bytes();
    let nb = row_bytes / block;
    assert!(
        w.len() >= PANEL * row_bytes && dst.len() >= 2 * nb * K_BLOCK,
        "decode: panel or destination too short"
    );
    let lane = |v: i16| ((v as u16 as u32) | ((v as u16 as u32) << 16)).to_le_bytes();
    let mut rows = [[0u8; 256]; 8];
    for half in 0..2 {
        for b in 0..nb {
            let rec = &mut dst[(half * nb + b) * K_BLOCK..(half * nb + b + 1) * K_BLOCK];
            for (l, row_codes) in rows.iter_mut().enumerate() {
                let at = (8 * half + l) * row_bytes + b * block;
                let blk = &w[at..at + block];
                codes::<T>(blk, row_codes);
                let x = header::<T>(blk);
                for (g, &s) in x.scales.iter().enumerate() {
                    let p = SCALES_AT + 32 * g + 4 * l;
                    rec[p..p + 4].copy_from_slice(&lane(s));
                }
                rec[D_AT + 4 * l..D_AT + 4 * l + 4].copy_from_slice(&x.d.to_le_bytes());
                rec[DMIN_AT + 4 * l..DMIN_AT + 4 * l + 4].copy_from_slice(&x.dmin.to_le_bytes());
                for (j, &m) in x.mins.iter().enumerate() {
                    let p = MINS_AT + 32 * j + 4 * l;
                    rec[p..p + 4].copy_from_slice(&lane(m));
                }
            }
            images(&rows, rec);
        }
    }
}

/// [`DecodedDotFn`]: a decoded panel against Q8_K activation rows, [`TOKENS`] at a time per
/// half.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C (and AVX-VNNI for `P_VNNI`); `dec` is [`decode`]'s output
/// for `cols` columns.
unsafe fn decoded_dot<const T: u8, const P: u8>(dec: &[u8], cols: usize, acts: &[&[u8]], out: Out) {
    let nb = cols / 256;
    assert!(
        dec.len() >= 2 * nb * K_BLOCK && acts.iter().all(|a| a.len() >= nb * Q8K_BYTES),
        "decoded_dot: decoded panel or activations too short"
    );
    let kernels = match P {
        P_MADDUBS => half_kernels!(decoded_half, T),
        P_VNNI => half_kernels!(decoded_half_vnni, T),
        #[cfg(test)]
        P_EMULATED => half_kernels!(decoded_half_emulated, T),
        _ => unreachable!("a product tag without kernels"),
    };
    panel_times_tokens(dec.as_ptr(), nb, acts, out, &kernels);
}

/// The 32-bit word at `p`, broadcast.
///
/// # Safety
/// `p` is readable for 4 bytes; the CPU has AVX.
#[inline(always)]
unsafe fn bcast(p: *const u8) -> __m256i {
    _mm256_set1_epi32(p.cast::<i32>().read_unaligned())
}

half_kernel_for_product!(decoded_half, decoded_half_body, P_MADDUBS, "avx2,fma,f16c");
half_kernel_for_product!(
    decoded_half_vnni,
    decoded_half_body,
    P_VNNI,
    "avx2,fma,f16c,avxvnni"
);
#[cfg(test)]
half_kernel_for_product!(
    decoded_half_emulated,
    decoded_half_body,
    P_EMULATED,
    "avx2,fma,f16c"
);

/// The body of the `decoded_half` kernels: inlined into each, so its intrinsics compile with
/// that kernel's features.
///
/// # Safety
/// As [`decoded_dot`]; the CPU has what product `P` needs.
#[inline(always)]
unsafe fn decoded_half_body<const T: u8, const N: usize, const P: u8>(
    dec: *const u8,
    nb: usize,
    half: usize,
    a: &[*const u8; TOKENS],
    out: Out,
) {
    let d = dec.add(half * nb * K_BLOCK);
    let signed = T == T_Q6_K;
    let mut acc = [_mm256_setzero_ps(); N];
    for b in 0..nb {
        let rec = d.add(b * K_BLOCK);
        let at = b * Q8K_BYTES;
        let mut sums = [_mm256_setzero_si256(); N];
        for g in 0..16 {
            // i16 pair sums (`maddubs`) or i32 sums (`vpdpbusd`) of the group's four images.
            let mut part = [_mm256_setzero_si256(); N];
            for i in 0..4 {
                let v = _mm256_load_si256(rec.add(32 * (4 * g + i)).cast());
                let magnitude = if signed { _mm256_abs_epi8(v) } else { v };
                for j in 0..N {
                    let x = bcast(a[j].add(at + Q8K_QS + 16 * g + 4 * i));
                    let x = if signed { _mm256_sign_epi8(x, v) } else { x };
                    part[j] = if P == P_MADDUBS {
                        _mm256_add_epi16(part[j], _mm256_maddubs_epi16(magnitude, x))
                    } else {
                        dpbusd::<P>(part[j], magnitude, x)
                    };
                }
            }
            let sc = _mm256_load_si256(rec.add(SCALES_AT + 32 * g).cast());
            if P == P_MADDUBS {
                for j in 0..N {
                    sums[j] = _mm256_add_epi32(sums[j], _mm256_madd_epi16(part[j], sc));
                }
            } else {
                // The scale sits in both 16-bit halves of its lane.
                let sc = _mm256_srai_epi32::<16>(sc);
                for j in 0..N {
                    sums[j] = _mm256_add_epi32(sums[j], _mm256_mullo_epi32(part[j], sc));
                }
            }
        }
        let dw = _mm256_load_ps(rec.add(D_AT).cast());
        let dmin = _mm256_load_ps(rec.add(DMIN_AT).cast());
        for j in 0..N {
            let da = _mm256_set1_ps(a[j].add(at).cast::<f32>().read_unaligned());
            acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[j]), _mm256_mul_ps(dw, da), acc[j]);
            if !signed {
                let mut m = _mm256_setzero_si256();
                for k in 0..8 {
                    let mins = _mm256_load_si256(rec.add(MINS_AT + 32 * k).cast());
                    m = _mm256_add_epi32(
                        m,
                        _mm256_madd_epi16(mins, bcast(a[j].add(at + Q8K_BSUMS + 4 * k))),
                    );
                }
                acc[j] = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(m), _mm256_mul_ps(dmin, da), acc[j]);
            }
        }
    }
    for (j, v) in acc.iter().enumerate() {
        // SAFETY: token j's eight rows of `out` are valid (caller).
        _mm256_storeu_ps(out.ptr.add(j * out.ld), *v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interleave::tests::magnitude;
    use crate::test_rng::Rng;
    use edgelm_quant::{int_dot, quantize_row};

    /// A random panel of every k-quant with a prompt path, 1–9 tokens: the decoded dot of every
    /// product (`maddubs`, `vpdpbusd` emulated, AVX-VNNI's where the CPU has it) equals the
    /// integer reference on the GGUF rows within f32 reordering, and the AVX2 row dots exactly.
    #[test]
    fn decoded_k_panels_match_the_integer_reference() {
        if !crate::Isa::available().contains(&crate::Isa::Avx2) {
            eprintln!("skipping: this CPU lacks AVX2/FMA/F16C; the path is untested");
            return;
        }
        let vnni = crate::Isa::available().contains(&crate::Isa::AvxVnni);
        if !vnni {
            eprintln!(
                "skipping the AVX-VNNI k-quant panels: this CPU lacks avx_vnni (their arithmetic \
                 is tested through the emulated vpdpbusd)"
            );
        }
        let mut rng = Rng(0x0DEC_0DE5_4B51);
        for (ty, product) in [GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q6_K]
            .into_iter()
            .flat_map(|ty| [(ty, P_MADDUBS), (ty, P_EMULATED), (ty, P_VNNI)])
            .filter(|&(_, p)| p != P_VNNI || vnni)
        {
            let p = match product {
                P_MADDUBS => prefill_for::<P_MADDUBS>(ty),
                P_EMULATED => prefill_for::<P_EMULATED>(ty),
                _ => prefill_for::<P_VNNI>(ty),
            }
            .unwrap();
            let row_dot = crate::qdot::kernel_for(crate::Isa::Avx2, ty).unwrap();
            for nb in [1usize, 3, 19] {
                let cols = nb * 256;
                let row_bytes = ty.bytes_for(cols as u64).unwrap() as usize;
                let rows: Vec<Vec<u8>> = (0..PANEL)
                    .map(|_| {
                        let x: Vec<f32> = (0..cols).map(|_| rng.weight() * 2.0).collect();
                        let mut w = vec![0u8; row_bytes];
                        quantize_row(ty, &x, &mut w).unwrap();
                        w
                    })
                    .collect();
                let panel = rows.concat();
                let mut dec = vec![0u8; (p.bytes)(cols) + 32];
                // The kernels' aligned loads: the decoded panel on a 32-byte boundary.
                let skew = dec.as_ptr().align_offset(32);
                let dec = &mut dec[skew..skew + (p.bytes)(cols)];
                // SAFETY: the CPU was checked; lengths match.
                unsafe { (p.decode)(&panel, row_bytes, dec) };
                for n in 1..=9 {
                    let acts: Vec<Vec<u8>> = (0..n)
                        .map(|_| {
                            let scale = 0.05 + 4.0 * rng.unit().abs();
                            let x: Vec<f32> = (0..cols).map(|_| rng.weight() * scale).collect();
                            let mut a = vec![0u8; nb * Q8K_BYTES];
                            quantize_row(GgmlType::Q8_K, &x, &mut a).unwrap();
                            a
                        })
                        .collect();
                    let refs: Vec<&[u8]> = acts.iter().map(|a| a.as_slice()).collect();
                    let mut out = vec![f32::NAN; n * PANEL];
                    let mut rows_out = vec![f32::NAN; n * PANEL];
                    // SAFETY: the CPU was checked; lengths match.
                    unsafe {
                        (p.dot)(dec, cols, &refs, Out::slice(&mut out, PANEL));
                        (row_dot.row_dot)(
                            &panel,
                            row_bytes,
                            PANEL,
                            &refs,
                            Out::slice(&mut rows_out, PANEL),
                        );
                    }
                    // Bit for bit the row dots' results: a token's result must not depend on
                    // its batch.
                    assert_eq!(
                        out, rows_out,
                        "{ty:?} product {product}: {nb} blocks, {n} tokens"
                    );
                    for (r, row) in rows.iter().enumerate() {
                        for (j, a) in acts.iter().enumerate() {
                            let want = int_dot::vec_dot(ty, row, a).unwrap();
                            let got = out[j * PANEL + r];
                            let tol = 1e-5 * magnitude(ty, row, a) + 1e-6;
                            assert!(
                                (got - want).abs() <= tol,
                                "{ty:?} {nb} blocks, {n} tokens, row {r} token {j}: {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }
}
