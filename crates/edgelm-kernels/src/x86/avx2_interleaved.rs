//! AVX2 row dots over interleaved legacy weights (see [`crate::interleave`]): the AVX-512
//! panels' layout, read half a panel (eight rows, one 256-bit half of every image) at a time.
//! Without `vpdpbusd`, each image times four broadcast activation bytes is `maddubs` (u8 × i8
//! → i16 pairs); nibble codes (≤ 31) let the i16 sums of four or eight images add up before one
//! `madd` with ones widens them to i32 (|sum| ≤ 8·2·15·127 or 4·2·31·127 < 2¹⁵). Q8_0's codes
//! go back to signed bytes and take the sign trick (`maddubs(|q|, sign(a, q))`, ≤ 2·128·127),
//! one `madd` per image; IQ4_NL's nibbles, shuffled onto its signed grid, take the same path.
//! Integer sums are exact for activation quants in [−127, 127] — all the Q8 quantizers produce.

use super::{
    half_kernels, panel_times_tokens, weight_type, HalfKernel, TOKENS, T_IQ4_NL, T_Q4_0, T_Q4_1,
    T_Q5_0, T_Q5_1, T_Q8_0,
};
use crate::interleave::{
    format, packed_act_bytes, tile_layout, whole_panel_tiles, ACT_BLOCK_BYTES, PANEL,
};
use crate::qdot::{DecodeFn, DecodedDotFn, InterleavedDotFn, Out, PanelPrefill};
use edgelm_quant::GgmlType;
use std::arch::x86_64::*;

/// The interleaved row dot for `ty`, if it has one.
pub fn row_dot_for(ty: GgmlType) -> Option<InterleavedDotFn> {
    use GgmlType::*;
    Some(match ty {
        Q4_0 => row_dot::<T_Q4_0>,
        Q4_1 => row_dot::<T_Q4_1>,
        Q5_0 => row_dot::<T_Q5_0>,
        Q5_1 => row_dot::<T_Q5_1>,
        Q8_0 => row_dot::<T_Q8_0>,
        IQ4_NL => row_dot::<T_IQ4_NL>,
        _ => return None,
    })
}

/// [`crate::qdot::RowDotFn`] over one panel of interleaved rows (or a last partial panel, GGUF
/// order); each `acts[j]` one packed token.
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
    let Some(nb) = whole_panel_tiles(weight_type(T), w, row_bytes, n_rows, acts, out) else {
        return;
    };
    panel_times_tokens(w.as_ptr(), nb, acts, out, &half_kernels!(half_panel, T));
}

/// Constants of the unpacking, built once per kernel call.
struct Unpack {
    low: __m256i,
    spread: __m256i,
    bits: __m256i,
    sixteen: __m256i,
    flip: __m256i,
    grid: __m256i,
}

impl Unpack {
    #[inline(always)]
    unsafe fn new() -> Unpack {
        Unpack {
            low: _mm256_set1_epi8(0x0F),
            // Fifth bits: byte k of the half's 32-bit mask word spread over bytes 8k..8k + 8,
            // then each byte tests its own bit.
            spread: _mm256_setr_epi8(
                0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3,
                3, 3, 3, 3,
            ),
            bits: _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64),
            sixteen: _mm256_set1_epi8(16),
            flip: _mm256_set1_epi8(-128),
            grid: _mm256_broadcastsi128_si256(_mm_loadu_si128(
                edgelm_quant::iq4_nl::GRID.as_ptr().cast(),
            )),
        }
    }

    /// Image `g` of half `half` of the tile at `tp` as eight rows' 8-bit codes: unsigned
    /// (nibbles, plus 16 for a set fifth bit), or signed for Q8_0 (its quants) and IQ4_NL (its
    /// grid levels).
    ///
    /// # Safety
    /// `tp` is a whole tile of type `T`; the CPU has AVX2.
    #[inline(always)]
    unsafe fn image<const T: u8>(&self, tp: *const u8, g: usize, half: usize) -> __m256i {
        let f = match format(weight_type(T)) {
            Some(f) => f,
            None => unreachable!("interleaved kernels exist only for interleavable types"),
        };
        let lay = tile_layout(f);
        let v = if f.nibbles {
            let x = _mm256_loadu_si256(tp.add(lay.quants + 64 * (g % 4) + 32 * half).cast());
            let nibble = if g < 4 {
                _mm256_and_si256(x, self.low)
            } else {
                _mm256_and_si256(_mm256_srli_epi16::<4>(x), self.low)
            };
            if f.grid {
                _mm256_shuffle_epi8(self.grid, nibble)
            } else {
                nibble
            }
        } else {
            // Back to the signed quant.
            let x = _mm256_loadu_si256(tp.add(lay.quants + 64 * g + 32 * half).cast());
            _mm256_xor_si256(x, self.flip)
        };
        if f.high {
            let mask = tp
                .add(lay.high + 8 * g + 4 * half)
                .cast::<i32>()
                .read_unaligned();
            let spread = _mm256_shuffle_epi8(_mm256_set1_epi32(mask), self.spread);
            let set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, self.bits), self.bits);
            _mm256_add_epi8(v, _mm256_and_si256(set, self.sixteen))
        } else {
            v
        }
    }
}

/// Whether type `T`'s codes are signed (they take the sign trick).
const fn signed(t: u8) -> bool {
    t == T_Q8_0 || t == T_IQ4_NL
}

/// How many images' i16 sums stay below 2¹⁵ before widening (see the module note).
const fn run(t: u8) -> usize {
    match t {
        T_Q8_0 | T_IQ4_NL => 1,
        T_Q5_0 | T_Q5_1 => 4,
        _ => 8,
    }
}

/// [`HalfKernel`] over an interleaved panel (`nb` tiles).
///
/// # Safety
/// As [`row_dot`], lengths checked there; `out` is valid for the eight rows of N tokens.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn half_panel<const T: u8, const N: usize>(
    w: *const u8,
    nb: usize,
    half: usize,
    a: &[*const u8; TOKENS],
    out: Out,
) {
    let Some(f) = format(weight_type(T)) else {
        return;
    };
    let lay = tile_layout(f);
    let unpack = Unpack::new();
    let mut acc = [_mm256_setzero_ps(); N];
    for b in 0..nb {
        // SAFETY (weight reads): tile b lies inside the panel; half `half` of each 64-byte image
        // is 32 bytes at +32·half. Activation reads inside token j's block b.
        let tp = w.add(b * lay.len);
        let halves = |at: usize| _mm256_cvtph_ps(_mm_loadu_si128(tp.add(at + 16 * half).cast()));
        let m = if f.min {
            halves(lay.m)
        } else {
            _mm256_setzero_ps()
        };
        block_times_tokens::<T, N>(
            |g| unpack.image::<T>(tp, g, half),
            halves(lay.d),
            m,
            a,
            b * ACT_BLOCK_BYTES,
            &mut acc,
        );
    }
    for (j, v) in acc.iter().enumerate() {
        // SAFETY: token j's eight rows of `out` are valid (caller).
        _mm256_storeu_ps(out.ptr.add(j * out.ld), *v);
    }
}

/// One block of eight rows (images `image(0..8)`, scales `dw`, mins `m`) times tokens
/// `a[..N]` at activation offset `at`, added to `acc`.
///
/// # Safety
/// Each `a[j]` holds a packed block at `at`; the CPU has AVX2, FMA.
#[inline(always)]
unsafe fn block_times_tokens<const T: u8, const N: usize>(
    image: impl Fn(usize) -> __m256i,
    dw: __m256,
    m: __m256,
    a: &[*const u8; TOKENS],
    at: usize,
    acc: &mut [__m256; N],
) {
    let Some(f) = format(weight_type(T)) else {
        return;
    };
    let ones = _mm256_set1_epi16(1);
    let mut sums: [__m256i; N] = core::array::from_fn(|j| {
        if f.min || signed(T) {
            _mm256_setzero_si256()
        } else {
            _mm256_set1_epi32(a[j].add(at + 36).cast::<i32>().read_unaligned())
        }
    });
    let mut s16 = [_mm256_setzero_si256(); N];
    for g in 0..8 {
        let v = image(g);
        let magnitude = _mm256_abs_epi8(v);
        for j in 0..N {
            let x = _mm256_set1_epi32(a[j].add(at + 4 * g).cast::<i32>().read_unaligned());
            let p = if signed(T) {
                _mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(x, v))
            } else {
                _mm256_maddubs_epi16(v, x)
            };
            s16[j] = _mm256_add_epi16(s16[j], p);
            if (g + 1) % run(T) == 0 {
                sums[j] = _mm256_add_epi32(sums[j], _mm256_madd_epi16(s16[j], ones));
                s16[j] = _mm256_setzero_si256();
            }
        }
    }
    for j in 0..N {
        let ap = a[j].add(at);
        let da = _mm256_set1_ps(ap.add(32).cast::<f32>().read_unaligned());
        acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[j]), _mm256_mul_ps(dw, da), acc[j]);
        if f.min {
            let s = _mm256_set1_ps(ap.add(36).cast::<f32>().read_unaligned());
            acc[j] = _mm256_fmadd_ps(m, s, acc[j]);
        }
    }
}

/// Bytes of one decoded block of eight rows: eight images of codes, `d` and `m` as f32.
const DECODED_BLOCK: usize = 8 * 32 + 2 * 32;

/// [`crate::qdot::PanelPrefill`] for the interleaved legacy formats, where one exists.
pub fn prefill_for(ty: GgmlType) -> Option<PanelPrefill> {
    use GgmlType::*;
    let (decode, dot): (DecodeFn, DecodedDotFn) = match ty {
        Q4_0 => (decode::<T_Q4_0>, decoded_dot::<T_Q4_0>),
        Q4_1 => (decode::<T_Q4_1>, decoded_dot::<T_Q4_1>),
        Q5_0 => (decode::<T_Q5_0>, decoded_dot::<T_Q5_0>),
        Q5_1 => (decode::<T_Q5_1>, decoded_dot::<T_Q5_1>),
        Q8_0 => (decode::<T_Q8_0>, decoded_dot::<T_Q8_0>),
        IQ4_NL => (decode::<T_IQ4_NL>, decoded_dot::<T_IQ4_NL>),
        _ => return None,
    };
    Some(PanelPrefill {
        from_interleaved: true,
        // Decoding is a few SIMD operations per image: it pays from the second tile on.
        min_tokens: crate::qdot::MAX_COLS + 1,
        bytes: |cols| (cols / 32) * 2 * DECODED_BLOCK,
        decode,
        dot,
    })
}

/// [`DecodeFn`]: the whole interleaved panel at `w` to codes and f32 scales, half by half
/// (half `h`, block `b` at `(h·nb + b)·DECODED_BLOCK`), so a token pass reads one run.
///
/// # Safety
/// The CPU has AVX2 and F16C.
unsafe fn decode<const T: u8>(w: &[u8], row_bytes: usize, dst: &mut [u8]) {
    decode_tiles::<T>(w, row_bytes, dst)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn decode_tiles<const T: u8>(w: &[u8], row_bytes: usize, dst: &mut [u8]) {
    let Some(f) = format(weight_type(T)) else {
        return;
    };
    let lay = tile_layout(f);
    let nb = row_bytes / f.block;
    assert!(
        w.len() >= PANEL * row_bytes && dst.len() >= 2 * nb * DECODED_BLOCK,
        "decode: panel or destination too short"
    );
    let unpack = Unpack::new();
    for half in 0..2 {
        for b in 0..nb {
            // SAFETY: tile b is inside the panel (checked above), the block inside `dst`.
            let tp = w.as_ptr().add(b * lay.len);
            let rec = dst.as_mut_ptr().add((half * nb + b) * DECODED_BLOCK);
            for g in 0..8 {
                _mm256_storeu_si256(rec.add(32 * g).cast(), unpack.image::<T>(tp, g, half));
            }
            let halves =
                |at: usize| _mm256_cvtph_ps(_mm_loadu_si128(tp.add(at + 16 * half).cast()));
            _mm256_storeu_ps(rec.add(256).cast(), halves(lay.d));
            if f.min {
                _mm256_storeu_ps(rec.add(288).cast(), halves(lay.m));
            }
        }
    }
}

/// [`DecodedDotFn`]: a decoded panel against each of `acts` (packed), in passes of
/// [`TOKENS`] tokens over each half.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C; `dec` is [`decode`]'s output for `cols` columns.
unsafe fn decoded_dot<const T: u8>(dec: &[u8], cols: usize, acts: &[&[u8]], out: Out) {
    let nb = cols / 32;
    let act_bytes = packed_act_bytes(weight_type(T), cols);
    assert!(
        dec.len() >= 2 * nb * DECODED_BLOCK && acts.iter().all(|a| a.len() >= act_bytes),
        "decoded_dot: decoded panel or activations too short"
    );
    panel_times_tokens(dec.as_ptr(), nb, acts, out, &half_kernels!(decoded_half, T));
}

/// [`HalfKernel`] over a decoded panel (each half `nb` blocks, one after the other).
///
/// # Safety
/// As [`decoded_dot`]; `out` is valid for the eight rows of N tokens.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn decoded_half<const T: u8, const N: usize>(
    dec: *const u8,
    nb: usize,
    half: usize,
    a: &[*const u8; TOKENS],
    out: Out,
) {
    let d = dec.add(half * nb * DECODED_BLOCK);
    let mut acc = [_mm256_setzero_ps(); N];
    for b in 0..nb {
        let rec = d.add(b * DECODED_BLOCK);
        block_times_tokens::<T, N>(
            |g| _mm256_loadu_si256(rec.add(32 * g).cast()),
            _mm256_loadu_ps(rec.add(256).cast()),
            _mm256_loadu_ps(rec.add(288).cast()),
            a,
            b * ACT_BLOCK_BYTES,
            &mut acc,
        );
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
    use crate::interleave::{
        interleave_rows, pack_activations, packed_act_bytes, packed_dot, PANEL,
    };
    use crate::test_rng::Rng;
    use edgelm_quant::{int_dot, quantize_row};

    /// Random panels of 1–40 blocks, 1..=9 tokens: every output, of the row dot and of the
    /// decode-once prompt path, equals the integer reference on the GGUF rows within f32
    /// reordering, and the packed scalar dot likewise; the two paths agree bit for bit.
    #[test]
    fn avx2_interleaved_row_dot_matches_scalar() {
        if !crate::Isa::available().contains(&crate::Isa::Avx2) {
            eprintln!("skipping: this CPU lacks AVX2/FMA/F16C; the path is untested");
            return;
        }
        let mut rng = Rng(0x5151_7A7A_0101_2323);
        for ty in [
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q5_0,
            GgmlType::Q5_1,
            GgmlType::Q8_0,
            GgmlType::IQ4_NL,
        ] {
            let act_ty = int_dot::activation_type(ty);
            let dot = row_dot_for(ty).unwrap();
            let prefill = prefill_for(ty).unwrap();
            for nb in [1usize, 3, 16, 28, 40] {
                let row_bytes = nb * ty.block_bytes();
                let rows: Vec<Vec<u8>> = (0..PANEL)
                    .map(|_| {
                        let x: Vec<f32> = (0..nb * 32).map(|_| rng.weight() * 2.0).collect();
                        let mut w = vec![0u8; row_bytes];
                        quantize_row(ty, &x, &mut w).unwrap();
                        w
                    })
                    .collect();
                let gguf = rows.concat();
                let mut wp = vec![0u8; gguf.len()];
                interleave_rows(ty, row_bytes, &gguf, &mut wp).unwrap();
                for n in 1..=9 {
                    let mut std_acts = Vec::new();
                    let mut packed = Vec::new();
                    for _ in 0..n {
                        let scale = 0.05 + 4.0 * rng.unit().abs();
                        let x: Vec<f32> = (0..nb * 32).map(|_| rng.weight() * scale).collect();
                        let mut a = vec![0u8; nb * act_ty.block_bytes()];
                        quantize_row(act_ty, &x, &mut a).unwrap();
                        let mut p = vec![0u8; packed_act_bytes(ty, x.len())];
                        pack_activations(ty, &a, &mut p).unwrap();
                        std_acts.push(a);
                        packed.push(p);
                    }
                    let refs: Vec<&[u8]> = packed.iter().map(|p| p.as_slice()).collect();
                    let mut out = vec![f32::NAN; n * PANEL];
                    // SAFETY: the CPU was checked; lengths match.
                    unsafe { dot(&wp, row_bytes, PANEL, &refs, Out::slice(&mut out, PANEL)) };
                    // The decode-once prompt path on the same panel.
                    let mut decoded = vec![f32::NAN; n * PANEL];
                    let mut dec = vec![0xA5u8; (prefill.bytes)(nb * 32)];
                    // SAFETY: as above; `dec` has the decoded panel's length.
                    unsafe {
                        (prefill.decode)(&wp, row_bytes, &mut dec);
                        (prefill.dot)(&dec, nb * 32, &refs, Out::slice(&mut decoded, PANEL));
                    }
                    assert_eq!(
                        out, decoded,
                        "{ty:?} {nb} blocks, {n} tokens: not bit for bit"
                    );
                    for (r, row) in rows.iter().enumerate() {
                        for j in 0..n {
                            let (got, dgot) = (out[j * PANEL + r], decoded[j * PANEL + r]);
                            let want = int_dot::vec_dot(ty, row, &std_acts[j]).unwrap();
                            let scalar = packed_dot(ty, row, &packed[j]).unwrap();
                            let tol = 1e-5 * magnitude(ty, row, &std_acts[j]) + 1e-6;
                            assert!(
                                (got - want).abs() <= tol
                                    && (got - scalar).abs() <= tol
                                    && (dgot - want).abs() <= tol,
                                "{ty:?} {nb} blocks, {n} tokens, row {r} token {j}: avx2 {got} \
                                 decoded {dgot} int_dot {want} packed {scalar}"
                            );
                        }
                    }
                }
            }
        }
    }
}
