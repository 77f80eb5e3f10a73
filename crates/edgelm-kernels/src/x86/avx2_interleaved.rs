//! AVX2 row dots over interleaved legacy weights (see [`crate::interleave`]): the AVX-512
//! panels' layout, read half a panel (eight rows, one 256-bit half of every image) at a time.
//! Without `vpdpbusd`, each image times four broadcast activation bytes is `maddubs` (u8 × i8
//! → i16 pairs); nibble codes (≤ 31) let the i16 sums of four or eight images add up before one
//! `madd` with ones widens them to i32 (|sum| ≤ 8·2·15·127 or 4·2·31·127 < 2¹⁵). Q8_0's codes
//! go back to signed bytes and take the sign trick (`maddubs(|q|, sign(a, q))`, ≤ 2·128·127),
//! one `madd` per image; IQ4_NL's nibbles, shuffled onto its signed grid, take the same path.
//! Integer sums are exact for activation quants in [−127, 127] — all the Q8 quantizers produce.
//!
//! The same kernels make the AVX-VNNI tier (`P_VNNI`): there every type's codes are unsigned
//! (Q8_0's stored `q + 128`, IQ4_NL's `GRID + 128`), each sum is seeded with the activations'
//! `−offset·Σa`, and one VEX `vpdpbusd` per image and token replaces the `maddubs` chain, as in
//! the AVX-512 kernels on 256 bits (|sum| ≤ 32·255·128 + 128·32·128: exact for any bytes).

use super::{
    half_kernel_for_product, half_kernels, panel_times_tokens, prefetch, weight_type, HalfKernel,
    TOKENS, T_IQ4_NL, T_Q4_0, T_Q4_1, T_Q5_0, T_Q5_1, T_Q8_0,
};
use crate::interleave::{
    format, packed_act_bytes, tile_layout, whole_panel_tiles, ACT_BLOCK_BYTES, PANEL,
};
use crate::qdot::{DecodeFn, DecodedDotFn, InterleavedDotFn, Out, PanelPrefill};
use edgelm_quant::GgmlType;
use std::arch::x86_64::*;

/// How a kernel multiplies codes by activation bytes: AVX2's `maddubs` chains.
pub(super) const P_MADDUBS: u8 = 0;
/// AVX-VNNI's 256-bit `vpdpbusd` (the CPU has `avx_vnni`).
pub(super) const P_VNNI: u8 = 1;
/// `vpdpbusd` emulated exactly with AVX2, so the VNNI kernels' arithmetic is tested on every
/// AVX2 machine (only the instruction itself needs one with `avx_vnni`).
#[cfg(test)]
pub(super) const P_EMULATED: u8 = 2;

/// Whether product `P` takes unsigned codes for every type (the `vpdpbusd` forms).
const fn unsigned_codes(p: u8) -> bool {
    p != P_MADDUBS
}

/// The interleaved row dot for `ty` with product `P`, if it has one.
pub(super) fn row_dot_for<const P: u8>(ty: GgmlType) -> Option<InterleavedDotFn> {
    use GgmlType::*;
    Some(match ty {
        Q4_0 => row_dot::<T_Q4_0, P>,
        Q4_1 => row_dot::<T_Q4_1, P>,
        Q5_0 => row_dot::<T_Q5_0, P>,
        Q5_1 => row_dot::<T_Q5_1, P>,
        Q8_0 => row_dot::<T_Q8_0, P>,
        IQ4_NL => row_dot::<T_IQ4_NL, P>,
        _ => return None,
    })
}

/// [`crate::qdot::RowDotFn`] over one panel of interleaved rows (or a last partial panel, GGUF
/// order); each `acts[j]` one packed token.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C (and AVX-VNNI for `P_VNNI`).
unsafe fn row_dot<const T: u8, const P: u8>(
    w: &[u8],
    row_bytes: usize,
    n_rows: usize,
    acts: &[&[u8]],
    out: Out,
) {
    let Some(nb) = whole_panel_tiles(weight_type(T), w, row_bytes, n_rows, acts, out) else {
        return;
    };
    let kernels = match P {
        P_MADDUBS => half_kernels!(half_panel, T),
        P_VNNI => half_kernels!(half_panel_vnni, T),
        #[cfg(test)]
        P_EMULATED => half_kernels!(half_panel_emulated, T),
        _ => unreachable!("a product tag without kernels"),
    };
    panel_times_tokens(w.as_ptr(), nb, acts, out, &kernels);
}

/// Constants of the unpacking, built once per kernel call.
struct Unpack {
    low: __m256i,
    sixteen: __m256i,
    flip: __m256i,
    grid: __m256i,
    grid_unsigned: __m256i,
}

impl Unpack {
    #[inline(always)]
    unsafe fn new() -> Unpack {
        Unpack {
            low: _mm256_set1_epi8(0x0F),
            sixteen: _mm256_set1_epi8(16),
            flip: _mm256_set1_epi8(-128),
            grid: _mm256_broadcastsi128_si256(_mm_loadu_si128(
                edgelm_quant::iq4_nl::GRID.as_ptr().cast(),
            )),
            grid_unsigned: _mm256_broadcastsi128_si256(_mm_loadu_si128(
                edgelm_quant::iq4_nl::GRID
                    .map(|v| (v as i32 + 128) as u8)
                    .as_ptr()
                    .cast(),
            )),
        }
    }

    /// Image `g` of half `half` of the tile at `tp` as eight rows' 8-bit codes: unsigned
    /// (nibbles, plus 16 for a set fifth bit), or for `maddubs` (`P_MADDUBS`) signed for Q8_0
    /// (its quants) and IQ4_NL (its grid levels).
    ///
    /// # Safety
    /// `tp` is a whole tile of type `T`; the CPU has AVX2.
    #[inline(always)]
    unsafe fn image<const T: u8, const P: u8>(
        &self,
        tp: *const u8,
        g: usize,
        half: usize,
    ) -> __m256i {
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
            match (f.grid, unsigned_codes(P)) {
                (false, _) => nibble,
                (true, false) => _mm256_shuffle_epi8(self.grid, nibble),
                (true, true) => _mm256_shuffle_epi8(self.grid_unsigned, nibble),
            }
        } else {
            let x = _mm256_loadu_si256(tp.add(lay.quants + 64 * g + 32 * half).cast());
            if unsigned_codes(P) {
                x
            } else {
                // Back to the signed quant.
                _mm256_xor_si256(x, self.flip)
            }
        };
        if f.high {
            // Bit g of the half's bit-plane bytes is image g's fifth bit: shifted to bit 4 (left
            // by 4 − g, or right by g − 4: a negative count, as u64 past 15, shifts to zero) and
            // masked; what crosses from the neighbouring byte of the 16-bit lane lands on bits
            // 0..3 or 5..7. Once `g` is constant the zero shift folds away.
            let plane = _mm256_loadu_si256(tp.add(lay.high + 32 * half).cast());
            let at_bit4 = _mm256_or_si256(
                _mm256_sll_epi16(plane, _mm_cvtsi64_si128(4 - g as i64)),
                _mm256_srl_epi16(plane, _mm_cvtsi64_si128(g as i64 - 4)),
            );
            _mm256_add_epi8(v, _mm256_and_si256(at_bit4, self.sixteen))
        } else {
            v
        }
    }
}

/// Whether type `T`'s codes are signed for `maddubs` (they take the sign trick).
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

half_kernel_for_product!(half_panel, half_panel_body, P_MADDUBS, "avx2,fma,f16c");
half_kernel_for_product!(
    half_panel_vnni,
    half_panel_body,
    P_VNNI,
    "avx2,fma,f16c,avxvnni"
);
#[cfg(test)]
half_kernel_for_product!(
    half_panel_emulated,
    half_panel_body,
    P_EMULATED,
    "avx2,fma,f16c"
);

/// The body of the `half_panel` kernels.
///
/// # Safety
/// As [`row_dot`]; inlined only into kernels with the features product `P` needs.
#[inline(always)]
unsafe fn half_panel_body<const T: u8, const N: usize, const P: u8>(
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
    // The next panel is fetched while this one is worked on, half a tile per step over both
    // halves: all of it during the second half (which reads this panel from L1) left memory
    // idle while the first ran.
    let step_bytes = lay.len.div_ceil(2);
    let next = w.wrapping_add(nb * lay.len + half * nb * step_bytes);
    for b in 0..nb {
        // SAFETY (weight reads): tile b lies inside the panel; half `half` of each 64-byte image
        // is 32 bytes at +32·half. Activation reads inside token j's block b.
        let tp = w.add(b * lay.len);
        prefetch(next.wrapping_add(b * step_bytes), step_bytes);
        let m = if f.min {
            half_scales(tp, lay.m, half)
        } else {
            _mm256_setzero_ps()
        };
        block_times_tokens::<T, N, P>(
            &TileImages {
                unpack: &unpack,
                tp,
                half,
            },
            half_scales(tp, lay.d, half),
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

/// Half `half` of a tile's f16 fields at `at`, as f32.
///
/// # Safety
/// `tp + at` holds the field's 32 bytes; the CPU has F16C.
#[inline(always)]
unsafe fn half_scales(tp: *const u8, at: usize, half: usize) -> __m256 {
    _mm256_cvtph_ps(_mm_loadu_si128(tp.add(at + 16 * half).cast()))
}

/// Where a block's eight images of codes come from. A trait, not a closure: a closure is a
/// function of its own without the caller's target features, so the intrinsics in it would
/// not be inlined (each a call: Q5_0's decoding ran at a tenth of the memory's speed).
trait Images {
    /// Image `g` of the block (codes in product `P`'s form).
    ///
    /// # Safety
    /// The source is valid for its block; the CPU has AVX2.
    unsafe fn image<const T: u8, const P: u8>(&self, g: usize) -> __m256i;
}

/// Half `half` of the interleaved tile at `tp`, unpacked image by image.
struct TileImages<'a> {
    unpack: &'a Unpack,
    tp: *const u8,
    half: usize,
}

impl Images for TileImages<'_> {
    #[inline(always)]
    unsafe fn image<const T: u8, const P: u8>(&self, g: usize) -> __m256i {
        self.unpack.image::<T, P>(self.tp, g, self.half)
    }
}

/// A block of [`decode`]'s output: eight images of codes, one after the other.
struct DecodedImages(*const u8);

impl Images for DecodedImages {
    #[inline(always)]
    unsafe fn image<const T: u8, const P: u8>(&self, g: usize) -> __m256i {
        _mm256_loadu_si256(self.0.add(32 * g).cast())
    }
}

/// Token `j`'s activation bytes `4·g..4·g + 4` of the block at `at`, in every lane.
///
/// # Safety
/// `a[j]` holds a packed block at `at`; the CPU has AVX.
#[inline(always)]
unsafe fn act_word(a: &[*const u8; TOKENS], j: usize, at: usize, g: usize) -> __m256i {
    _mm256_set1_epi32(a[j].add(at + 4 * g).cast::<i32>().read_unaligned())
}

/// One block of eight rows (images `images.image(0..8)`, scales `dw`, mins `m`) times tokens
/// `a[..N]` at activation offset `at`, added to `acc`, with product `P`.
///
/// # Safety
/// Each `a[j]` holds a packed block at `at`; the CPU has AVX2, FMA (and AVX-VNNI for `P_VNNI`).
#[inline(always)]
unsafe fn block_times_tokens<const T: u8, const N: usize, const P: u8>(
    images: &impl Images,
    dw: __m256,
    m: __m256,
    a: &[*const u8; TOKENS],
    at: usize,
    acc: &mut [__m256; N],
) {
    let Some(f) = format(weight_type(T)) else {
        return;
    };
    let mut sums = [_mm256_setzero_si256(); N];
    if !(f.min || (signed(T) && !unsigned_codes(P))) {
        // The offset term `−offset·Σa` (word 9 of the block) seeds the sums.
        for (j, s) in sums.iter_mut().enumerate() {
            *s = act_word(a, j, at, 9);
        }
    }
    if unsigned_codes(P) {
        // With one or two tokens a second chain of sums hides `vpdpbusd`'s latency.
        let mut odd = [_mm256_setzero_si256(); N];
        for g in 0..8 {
            let v = images.image::<T, P>(g);
            for j in 0..N {
                let chain = if N <= 2 && g % 2 == 1 {
                    &mut odd[j]
                } else {
                    &mut sums[j]
                };
                *chain = dpbusd::<P>(*chain, v, act_word(a, j, at, g));
            }
        }
        if N <= 2 {
            for j in 0..N {
                sums[j] = _mm256_add_epi32(sums[j], odd[j]);
            }
        }
    } else {
        let ones = _mm256_set1_epi16(1);
        let mut s16 = [_mm256_setzero_si256(); N];
        for g in 0..8 {
            let v = images.image::<T, P>(g);
            let magnitude = _mm256_abs_epi8(v);
            for j in 0..N {
                let x = act_word(a, j, at, g);
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

/// `acc` plus, in each 32-bit lane, the four products of unsigned bytes of `u` with the signed
/// bytes of `s` beside them: `vpdpbusd`, or for `P_EMULATED` its exact AVX2 equal (bytes
/// widened to 16 bits, products ≤ 255·128, summed in pairs by `madd`).
///
/// # Safety
/// The CPU has AVX-VNNI for `P_VNNI`, AVX2 for `P_EMULATED`.
#[inline(always)]
pub(super) unsafe fn dpbusd<const P: u8>(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
    match P {
        P_VNNI => _mm256_dpbusd_avx_epi32(acc, u, s),
        #[cfg(test)]
        P_EMULATED => {
            let even = _mm256_set1_epi16(0x00FF);
            let u_even = _mm256_and_si256(u, even);
            let u_odd = _mm256_srli_epi16::<8>(u);
            let s_even = _mm256_srai_epi16::<8>(_mm256_slli_epi16::<8>(s));
            let s_odd = _mm256_srai_epi16::<8>(s);
            let pairs = _mm256_add_epi32(
                _mm256_madd_epi16(u_even, s_even),
                _mm256_madd_epi16(u_odd, s_odd),
            );
            _mm256_add_epi32(acc, pairs)
        }
        _ => unreachable!("maddubs kernels take no vpdpbusd"),
    }
}

/// Bytes of one decoded block of eight rows: eight images of codes, `d` and `m` as f32.
const DECODED_BLOCK: usize = 8 * 32 + 2 * 32;

/// [`crate::qdot::PanelPrefill`] for the interleaved legacy formats with product `P`, where
/// one exists.
pub(super) fn prefill_for<const P: u8>(ty: GgmlType) -> Option<PanelPrefill> {
    use GgmlType::*;
    let (decode, dot): (DecodeFn, DecodedDotFn) = match ty {
        Q4_0 => (decode::<T_Q4_0, P>, decoded_dot::<T_Q4_0, P>),
        Q4_1 => (decode::<T_Q4_1, P>, decoded_dot::<T_Q4_1, P>),
        Q5_0 => (decode::<T_Q5_0, P>, decoded_dot::<T_Q5_0, P>),
        Q5_1 => (decode::<T_Q5_1, P>, decoded_dot::<T_Q5_1, P>),
        Q8_0 => (decode::<T_Q8_0, P>, decoded_dot::<T_Q8_0, P>),
        IQ4_NL => (decode::<T_IQ4_NL, P>, decoded_dot::<T_IQ4_NL, P>),
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

/// [`DecodeFn`]: the whole interleaved panel at `w` to codes (in product `P`'s form) and f32
/// scales, half by half (half `h`, block `b` at `(h·nb + b)·DECODED_BLOCK`), so a token pass
/// reads one run.
///
/// # Safety
/// The CPU has AVX2 and F16C.
unsafe fn decode<const T: u8, const P: u8>(w: &[u8], row_bytes: usize, dst: &mut [u8]) {
    decode_tiles::<T, P>(w, row_bytes, dst)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn decode_tiles<const T: u8, const P: u8>(w: &[u8], row_bytes: usize, dst: &mut [u8]) {
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
                _mm256_storeu_si256(rec.add(32 * g).cast(), unpack.image::<T, P>(tp, g, half));
            }
            _mm256_storeu_ps(rec.add(256).cast(), half_scales(tp, lay.d, half));
            if f.min {
                _mm256_storeu_ps(rec.add(288).cast(), half_scales(tp, lay.m, half));
            }
        }
    }
}

/// [`DecodedDotFn`]: a decoded panel against each of `acts` (packed), in passes of
/// [`TOKENS`] tokens over each half.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C (and AVX-VNNI for `P_VNNI`); `dec` is [`decode`]'s output
/// for `cols` columns and the same `P`.
unsafe fn decoded_dot<const T: u8, const P: u8>(dec: &[u8], cols: usize, acts: &[&[u8]], out: Out) {
    let nb = cols / 32;
    let act_bytes = packed_act_bytes(weight_type(T), cols);
    assert!(
        dec.len() >= 2 * nb * DECODED_BLOCK && acts.iter().all(|a| a.len() >= act_bytes),
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

/// [`HalfKernel`] body over a decoded panel (each half `nb` blocks, one after the other).
///
/// # Safety
/// As [`decoded_dot`]; `out` is valid for the eight rows of N tokens; inlined only into kernels
/// with the features product `P` needs.
#[inline(always)]
unsafe fn decoded_half_body<const T: u8, const N: usize, const P: u8>(
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
        block_times_tokens::<T, N, P>(
            &DecodedImages(rec),
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
    /// reordering, and the packed scalar dot likewise; both paths of every product (AVX2's
    /// `maddubs`, `vpdpbusd` emulated, AVX-VNNI's where the CPU has it) agree bit for bit.
    #[test]
    fn avx2_interleaved_row_dot_matches_scalar() {
        if !crate::Isa::available().contains(&crate::Isa::Avx2) {
            eprintln!("skipping: this CPU lacks AVX2/FMA/F16C; the path is untested");
            return;
        }
        type Product = (&'static str, InterleavedDotFn, PanelPrefill);
        let kernels = |ty: GgmlType| -> Vec<Product> {
            let mut k = vec![
                (
                    "maddubs",
                    row_dot_for::<P_MADDUBS>(ty).unwrap(),
                    prefill_for::<P_MADDUBS>(ty).unwrap(),
                ),
                (
                    "emulated vpdpbusd",
                    row_dot_for::<P_EMULATED>(ty).unwrap(),
                    prefill_for::<P_EMULATED>(ty).unwrap(),
                ),
            ];
            if crate::Isa::available().contains(&crate::Isa::AvxVnni) {
                k.push((
                    "avx-vnni",
                    row_dot_for::<P_VNNI>(ty).unwrap(),
                    prefill_for::<P_VNNI>(ty).unwrap(),
                ));
            }
            k
        };
        if !crate::Isa::available().contains(&crate::Isa::AvxVnni) {
            eprintln!(
                "skipping the AVX-VNNI kernels: this CPU lacks avx_vnni (their arithmetic is \
                 tested through the emulated vpdpbusd)"
            );
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
            let products = kernels(ty);
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
                    let mut first: Option<Vec<f32>> = None;
                    for (name, dot, prefill) in &products {
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
                        let at = format!("{name} {ty:?} {nb} blocks, {n} tokens");
                        assert_eq!(out, decoded, "{at}: paths not bit for bit");
                        if let Some(first) = &first {
                            assert_eq!(&out, first, "{at}: products not bit for bit");
                            continue;
                        }
                        for (r, row) in rows.iter().enumerate() {
                            for j in 0..n {
                                let got = out[j * PANEL + r];
                                let want = int_dot::vec_dot(ty, row, &std_acts[j]).unwrap();
                                let scalar = packed_dot(ty, row, &packed[j]).unwrap();
                                let tol = 1e-5 * magnitude(ty, row, &std_acts[j]) + 1e-6;
                                assert!(
                                    (got - want).abs() <= tol && (got - scalar).abs() <= tol,
                                    "{at}, row {r} token {j}: {got}, int_dot {want}, \
                                     packed {scalar}"
                                );
                            }
                        }
                        first = Some(out);
                    }
                }
            }
        }
    }
}
