//! AVX-512 VNNI row dots over interleaved weights (see [`crate::interleave`]) and packed
//! activations. Per tile (one block of a panel's sixteen rows) the weights are unpacked once
//! into eight registers of unsigned codes, lane `r` holding row `r`; for each token, eight
//! `vpdpbusd` against four activation bytes broadcast to every lane accumulate all sixteen
//! rows' integer sums, seeded with the block's `−offset·Σa`; one convert and one FMA with
//! `d_w·d_a` scale them, and formats with a min add `m·s` with one more FMA. A token's sixteen
//! results leave in one store. Integer sums are exact for any input bytes
//! (|sum| ≤ 32·255·128 + 128·32·128).
//!
//! K-quants take the same shape per super-block: Q4_K's and Q5_K's eight sub-blocks of 32
//! (eight images each, Q5_K's fifth bits added under a byte mask; their 6-bit scales unpacked
//! per panel in registers and applied with one `vpmulld` per sub-block and token; the mins'
//! term one `vpdpwssd` per pair of sub-blocks), Q6_K's sixteen sub-blocks of 16 (four images
//! each, assembled from low nibbles and high bit pairs, each sum seeded with the activations'
//! `−32·Σa`). Integer sums stay exact (|Q6_K's| ≤ 16·128·(16·63·128 + 32·16·128) < 2³¹).

use super::{
    prefetch, weight_type, T_IQ4_NL, T_IQ4_XS, T_Q4_0, T_Q4_1, T_Q4_K, T_Q5_0, T_Q5_1, T_Q5_K,
    T_Q6_K, T_Q8_0,
};
use crate::interleave::{
    format, tile_layout, whole_panel_tiles, KFormat, ACT_BLOCK_BYTES, IQ4_XS_TILE, PANEL,
    Q4_K_TILE, Q5_K_TILE, Q6_K_TILE,
};
use crate::qdot::{InterleavedDotFn, Out, MAX_COLS};
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
        Q4_K => row_dot::<T_Q4_K>,
        Q5_K => row_dot::<T_Q5_K>,
        Q6_K => row_dot::<T_Q6_K>,
        IQ4_XS => row_dot::<T_IQ4_XS>,
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
    let Some(nb) = whole_panel_tiles(weight_type(T), w, row_bytes, n_rows, acts, out) else {
        return;
    };
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

/// The panel of type `T` at `w` (`nb` tiles) against tokens `a[..N]`.
///
/// # Safety
/// As [`legacy_panel`].
#[inline(always)]
unsafe fn panel<const T: u8, const N: usize>(
    w: *const u8,
    nb: usize,
    a: &[*const u8; MAX_COLS],
    out: Out,
) {
    match T {
        T_Q4_K => q4_k_panel::<false, N>(w, nb, a, out),
        T_Q5_K => q4_k_panel::<true, N>(w, nb, a, out),
        T_Q6_K => q6_k_panel::<N>(w, nb, a, out),
        T_IQ4_XS => iq4_xs_panel::<N>(w, nb, a, out),
        _ => legacy_panel::<T, N>(w, nb, a, out),
    }
}

/// IQ4_NL's grid as unsigned codes, `GRID[i] + 128`.
const GRID_CODES: [u8; 16] = {
    let mut c = [0u8; 16];
    let mut i = 0;
    while i < 16 {
        c[i] = (edgelm_quant::iq4_nl::GRID[i] as i16 + 128) as u8;
        i += 1;
    }
    c
};

/// The panel at `w` (`nb` tiles) against tokens `a[..N]`: row `r` of token `j` to
/// `out.ptr[j·ld + r]`.
///
/// # Safety
/// As [`row_dot`], lengths checked there; `out` is valid for the panel's rows of N tokens.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn legacy_panel<const T: u8, const N: usize>(
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
    // IQ4_NL: nibble → GRID + 128, the same 16 bytes in every 128-bit lane for the shuffle.
    let grid = _mm512_broadcast_i32x4(_mm_loadu_si128(GRID_CODES.as_ptr().cast()));
    let mut acc = [_mm512_setzero_ps(); N];
    for b in 0..nb {
        // SAFETY (weight reads): tile b lies inside the panel's `PANEL · row_bytes` bytes.
        let tp = w.add(b * lay.len);
        // The same tile of the next panel, one panel ahead of the reads (6–17 KB for these
        // models' 576–1536-column matrices; wider rows overrun L1 and still land in L2).
        prefetch(tp.wrapping_add(nb * lay.len), lay.len);
        let mut wv = [_mm512_setzero_si512(); 8];
        if f.nibbles {
            for h in 0..4 {
                let x = _mm512_loadu_si512(tp.add(lay.quants + 64 * h).cast());
                wv[h] = _mm512_and_si512(x, low);
                wv[h + 4] = _mm512_and_si512(_mm512_srli_epi16::<4>(x), low);
            }
            if f.grid {
                for v in wv.iter_mut() {
                    *v = _mm512_shuffle_epi8(grid, *v);
                }
            }
        } else {
            for (g, v) in wv.iter_mut().enumerate() {
                *v = _mm512_loadu_si512(tp.add(lay.quants + 64 * g).cast());
            }
        }
        if f.high {
            // Bit g of the plane's bytes: image g's fifth bits.
            let plane = _mm512_loadu_si512(tp.add(lay.high).cast());
            for (g, v) in wv.iter_mut().enumerate() {
                let set = _mm512_test_epi8_mask(plane, _mm512_set1_epi8((1u8 << g) as i8));
                *v = _mm512_mask_add_epi8(*v, set, *v, sixteen);
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
    store(&acc, out);
}

/// `acc[j] += sums[j] · d_w · d_a`, token j's `d_a` the f32 at byte `at` of its activations.
///
/// # Safety
/// Each `a[j]` is readable at `at..at + 4`; the CPU has AVX-512F.
#[inline(always)]
unsafe fn scale_into<const N: usize>(
    acc: &mut [__m512; N],
    sums: &[__m512i; N],
    dw: __m512,
    a: &[*const u8; MAX_COLS],
    at: usize,
) {
    for (j, (acc, s)) in acc.iter_mut().zip(sums).enumerate() {
        let da = _mm512_set1_ps(a[j].add(at).cast::<f32>().read_unaligned());
        *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(*s), _mm512_mul_ps(dw, da), *acc);
    }
}

/// Token j's sixteen results to `out.ptr[j·ld..]`.
///
/// # Safety
/// `out` is valid for the panel's rows of N tokens; the CPU has AVX-512F.
#[inline(always)]
unsafe fn store<const N: usize>(acc: &[__m512; N], out: Out) {
    for (j, v) in acc.iter().enumerate() {
        _mm512_storeu_ps(out.ptr.add(j * out.ld), *v);
    }
}

/// The 32-bit word at `p`, broadcast to every lane.
///
/// # Safety
/// `p` is readable for 4 bytes.
#[inline(always)]
unsafe fn bcast(p: *const u8) -> __m512i {
    _mm512_set1_epi32(p.cast::<i32>().read_unaligned())
}

/// Q4_K (`FIVE`: Q5_K) panel: per super-block the mins' term first, then eight sub-blocks of
/// eight images, each sub-block's sums scaled by its 6-bit scale in integers.
///
/// # Safety
/// As [`legacy_panel`].
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn q4_k_panel<const FIVE: bool, const N: usize>(
    w: *const u8,
    nb: usize,
    a: &[*const u8; MAX_COLS],
    out: Out,
) {
    let k: &KFormat = if FIVE { &Q5_K_TILE } else { &Q4_K_TILE };
    // Tile: three scale images, d and dmin (at byte 192), then Q5_K's fifth-bit images and the
    // nibble images.
    const D_AT: usize = 192;
    let tile_len = PANEL * k.block;
    let six = _mm512_set1_epi32(63);
    let two = _mm512_set1_epi32(3);
    let nib = _mm512_set1_epi32(15);
    let mut acc = [_mm512_setzero_ps(); N];
    for b in 0..nb {
        // SAFETY (weight reads): tile b lies inside the panel's bytes; activation reads inside
        // token j's super-block b (lengths checked by the caller).
        let tp = w.add(b * tile_len);
        let img = |i: usize| _mm512_loadu_si512(tp.add(64 * i).cast());
        let (s0, s1, s2) = (img(0), img(1), img(2));
        // 6-bit scales and mins of the eight sub-blocks, one lane per row (GGUF's packing:
        // j < 4 in the low six bits of bytes j and 4 + j; j ≥ 4 split between the nibbles of
        // byte 4 + j and the top two bits of bytes j − 4 and j).
        let byte = |v: __m512i, j: usize, shift: i32| {
            _mm512_srlv_epi32(v, _mm512_set1_epi32(8 * j as i32 + shift))
        };
        let mut scales = [_mm512_setzero_si512(); 8];
        let mut mins = [_mm512_setzero_si512(); 8];
        for j in 0..4 {
            scales[j] = _mm512_and_si512(byte(s0, j, 0), six);
            mins[j] = _mm512_and_si512(byte(s1, j, 0), six);
            let top = |v: __m512i| _mm512_slli_epi32::<4>(_mm512_and_si512(byte(v, j, 6), two));
            scales[4 + j] = _mm512_or_si512(_mm512_and_si512(byte(s2, j, 0), nib), top(s0));
            mins[4 + j] = _mm512_or_si512(_mm512_and_si512(byte(s2, j, 4), nib), top(s1));
        }
        let dw = _mm512_cvtph_ps(_mm256_loadu_si256(tp.add(D_AT).cast()));
        let dmin = _mm512_cvtph_ps(_mm256_loadu_si256(tp.add(D_AT + 32).cast()));
        // Mins: Σ_j m_j · (Σ of sub-block j's activations), pairs of sub-blocks per vpdpwssd.
        let pairs: [__m512i; 4] = core::array::from_fn(|p| {
            _mm512_or_si512(mins[2 * p], _mm512_slli_epi32::<16>(mins[2 * p + 1]))
        });
        for j in 0..N {
            let mut m = _mm512_setzero_si512();
            for (p, v) in pairs.iter().enumerate() {
                m = _mm512_dpwssd_epi32(m, *v, bcast(a[j].add(b * k.act + 260 + 4 * p)));
            }
            let da = _mm512_set1_ps(a[j].add(b * k.act + 256).cast::<f32>().read_unaligned());
            acc[j] = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(m), _mm512_mul_ps(dmin, da), acc[j]);
        }
        let mut sums = [_mm512_setzero_si512(); N];
        for c in 0..4 {
            // Images 8c..8c + 8: low nibbles are sub-block 2c, high nibbles 2c + 1.
            q4_k_sub::<false, FIVE, N>(tp, c, scales[2 * c], a, b * k.act, &mut sums);
            q4_k_sub::<true, FIVE, N>(tp, c, scales[2 * c + 1], a, b * k.act, &mut sums);
        }
        scale_into(&mut acc, &sums, dw, a, b * k.act + 256);
    }
    store(&acc, out);
}

/// One Q4_K sub-block (`HIGH`: the high nibbles of chunk `c`'s images, else the low ones;
/// `FIVE`: Q5_K, bit `2c + HIGH` of fifth-bit image `g` adds 16 to image `g`) times every
/// token's activations at super-block offset `at`, scaled by `sc` into `sums`.
///
/// # Safety
/// As [`q4_k_panel`].
#[inline(always)]
unsafe fn q4_k_sub<const HIGH: bool, const FIVE: bool, const N: usize>(
    tp: *const u8,
    c: usize,
    sc: __m512i,
    a: &[*const u8; MAX_COLS],
    at: usize,
    sums: &mut [__m512i; N],
) {
    let low = _mm512_set1_epi8(0x0F);
    // The first nibble image, after the scales (and Q5_K's eight fifth-bit images).
    let quants = if FIVE { 12 } else { 4 };
    let sb = 2 * c + HIGH as usize;
    let bit = _mm512_set1_epi8(1 << sb);
    let sixteen = _mm512_set1_epi8(16);
    let wv: [__m512i; 8] = core::array::from_fn(|g| {
        let x = _mm512_loadu_si512(tp.add(64 * (quants + 8 * c + g)).cast());
        let v = if HIGH {
            _mm512_and_si512(_mm512_srli_epi16::<4>(x), low)
        } else {
            _mm512_and_si512(x, low)
        };
        if FIVE {
            let qh = _mm512_loadu_si512(tp.add(64 * (4 + g)).cast());
            _mm512_mask_add_epi8(v, _mm512_test_epi8_mask(qh, bit), v, sixteen)
        } else {
            v
        }
    });
    let el = 64 * c + if HIGH { 32 } else { 0 };
    for (j, s) in sums.iter_mut().enumerate() {
        let ap = a[j].add(at + el);
        let mut t = _mm512_setzero_si512();
        let mut u = _mm512_setzero_si512();
        for g in (0..8).step_by(2) {
            t = _mm512_dpbusd_epi32(t, wv[g], bcast(ap.add(4 * g)));
            u = _mm512_dpbusd_epi32(u, wv[g + 1], bcast(ap.add(4 * g + 4)));
        }
        *s = _mm512_add_epi32(*s, _mm512_mullo_epi32(_mm512_add_epi32(t, u), sc));
    }
}

/// IQ4_XS panel: per super-block eight sub-blocks of four nibble images, unpacked to eight
/// images of codes `GRID + 128`; each sub-block's sum, less `128·Σa` of its activations, scaled
/// by its signed 6-bit scale in integers (|sum| ≤ 8·32·32·(241 + 128)·128 < 2³¹).
///
/// # Safety
/// As [`legacy_panel`].
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn iq4_xs_panel<const N: usize>(
    w: *const u8,
    nb: usize,
    a: &[*const u8; MAX_COLS],
    out: Out,
) {
    let k = &IQ4_XS_TILE;
    let tile_len = PANEL * k.block;
    let low = _mm512_set1_epi8(0x0F);
    let grid = _mm512_broadcast_i32x4(_mm_loadu_si128(GRID_CODES.as_ptr().cast()));
    let mut acc = [_mm512_setzero_ps(); N];
    for b in 0..nb {
        // SAFETY (weight reads): tile b lies inside the panel's bytes; activation reads inside
        // token j's super-block b (lengths checked by the caller).
        let tp = w.add(b * tile_len);
        let scales_low = _mm512_loadu_si512(tp.cast());
        let scales_high = _mm512_cvtepu16_epi32(_mm256_loadu_si256(tp.add(2144).cast()));
        let mut sums = [_mm512_setzero_si512(); N];
        for j in 0..8 {
            let sc = _mm512_sub_epi32(
                _mm512_or_si512(
                    _mm512_and_si512(
                        _mm512_srlv_epi32(scales_low, _mm512_set1_epi32(4 * j as i32)),
                        _mm512_set1_epi32(15),
                    ),
                    _mm512_slli_epi32::<4>(_mm512_and_si512(
                        _mm512_srlv_epi32(scales_high, _mm512_set1_epi32(2 * j as i32)),
                        _mm512_set1_epi32(3),
                    )),
                ),
                _mm512_set1_epi32(32),
            );
            let mut wv = [_mm512_setzero_si512(); 8];
            for h in 0..4 {
                let x = _mm512_loadu_si512(tp.add(64 * (1 + 4 * j + h)).cast());
                wv[h] = _mm512_shuffle_epi8(grid, _mm512_and_si512(x, low));
                wv[h + 4] =
                    _mm512_shuffle_epi8(grid, _mm512_and_si512(_mm512_srli_epi16::<4>(x), low));
            }
            for (t, s) in sums.iter_mut().enumerate() {
                let ap = a[t].add(b * k.act);
                // −128·Σa of sub-block j: its i16 sum, sign-extended, shifted.
                let pair = ap.add(260 + 2 * j).cast::<i16>().read_unaligned() as i32;
                let mut x = _mm512_set1_epi32(-128 * pair);
                let mut y = _mm512_setzero_si512();
                for g in (0..8).step_by(2) {
                    x = _mm512_dpbusd_epi32(x, wv[g], bcast(ap.add(32 * j + 4 * g)));
                    y = _mm512_dpbusd_epi32(y, wv[g + 1], bcast(ap.add(32 * j + 4 * g + 4)));
                }
                *s = _mm512_add_epi32(*s, _mm512_mullo_epi32(_mm512_add_epi32(x, y), sc));
            }
        }
        let dw = _mm512_cvtph_ps(_mm256_loadu_si256(tp.add(2112).cast()));
        scale_into(&mut acc, &sums, dw, a, b * k.act + 256);
    }
    store(&acc, out);
}

/// Q6_K panel: per super-block sixteen sub-blocks of four images, each image's six-bit codes
/// assembled from a low-nibble image and a high-bit-pair image; sums seeded with `−32·Σa` and
/// scaled by the sub-block's i8 scale in integers.
///
/// # Safety
/// As [`legacy_panel`].
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn q6_k_panel<const N: usize>(w: *const u8, nb: usize, a: &[*const u8; MAX_COLS], out: Out) {
    let k = &Q6_K_TILE;
    let tile_len = PANEL * k.block;
    let mut acc = [_mm512_setzero_ps(); N];
    for b in 0..nb {
        // SAFETY (weight reads): tile b lies inside the panel's bytes; activation reads inside
        // token j's super-block b (lengths checked by the caller).
        let tp = w.add(b * tile_len);
        let mut sums = [_mm512_setzero_si512(); N];
        // Half n of the super-block, elements l = 16h..16h + 16 of each of its quarters.
        for n in 0..2 {
            for h in 0..2 {
                q6_k_sub::<0, N>(tp, n, h, a, b * k.act, &mut sums);
                q6_k_sub::<1, N>(tp, n, h, a, b * k.act, &mut sums);
                q6_k_sub::<2, N>(tp, n, h, a, b * k.act, &mut sums);
                q6_k_sub::<3, N>(tp, n, h, a, b * k.act, &mut sums);
            }
        }
        let dw = _mm512_cvtph_ps(_mm256_loadu_si256(tp.add(3328).cast()));
        scale_into(&mut acc, &sums, dw, a, b * k.act + 256);
    }
    store(&acc, out);
}

/// Q6_K sub-block `8n + 2Q + h` (quarter `Q` of half `n`, elements `16h..16h + 16` of it)
/// times every token's activations at super-block offset `at`, into `sums`.
///
/// # Safety
/// As [`q6_k_panel`].
#[inline(always)]
unsafe fn q6_k_sub<const Q: usize, const N: usize>(
    tp: *const u8,
    n: usize,
    h: usize,
    a: &[*const u8; MAX_COLS],
    at: usize,
    sums: &mut [__m512i; N],
) {
    let img = |i: usize| _mm512_loadu_si512(tp.add(64 * i).cast());
    let (low, pair) = (_mm512_set1_epi8(0x0F), _mm512_set1_epi8(0x30));
    // Elements 4cc..4cc + 4 of the quarter's sixteenth h: the low (Q < 2) or high nibbles of
    // image cc of group 2n + h's low-nibble images (elements l for even Q, l + 32 for odd),
    // their two high bits at bits 2Q, 2Q + 1 of the group's bit-pair image cc.
    let group = 12 * (2 * n + h);
    let wv: [__m512i; 4] = core::array::from_fn(|cc| {
        let ql = img(group + 4 * (Q & 1) + cc);
        let lo = if Q >= 2 {
            _mm512_srli_epi16::<4>(ql)
        } else {
            ql
        };
        let qh = img(group + 8 + cc);
        let hi = match Q {
            0 => _mm512_slli_epi16::<4>(qh),
            1 => _mm512_slli_epi16::<2>(qh),
            2 => qh,
            _ => _mm512_srli_epi16::<2>(qh),
        };
        _mm512_or_si512(_mm512_and_si512(lo, low), _mm512_and_si512(hi, pair))
    });
    // The i8 scale: byte is % 4 of image 48 + is / 4, sign-extended.
    let is = 8 * n + 2 * Q + h;
    let sc = _mm512_srai_epi32::<24>(_mm512_sllv_epi32(
        img(48 + is / 4),
        _mm512_set1_epi32(24 - 8 * (is % 4) as i32),
    ));
    let el = 128 * n + 32 * Q + 16 * h;
    for (j, s) in sums.iter_mut().enumerate() {
        let ap = a[j].add(at);
        let t = _mm512_dpbusd_epi32(bcast(ap.add(260 + 4 * is)), wv[0], bcast(ap.add(el)));
        let u = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv[1], bcast(ap.add(el + 4)));
        let t = _mm512_dpbusd_epi32(t, wv[2], bcast(ap.add(el + 8)));
        let u = _mm512_dpbusd_epi32(u, wv[3], bcast(ap.add(el + 12)));
        *s = _mm512_add_epi32(*s, _mm512_mullo_epi32(_mm512_add_epi32(t, u), sc));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interleave::tests::magnitude;
    use crate::interleave::{interleave_rows, pack_activations, packed_act_bytes, packed_dot};
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
            let block_len = crate::interleave::tests::block_len(ty);
            let sizes: &[usize] = if block_len == 256 {
                &[1, 2, 5]
            } else {
                &[1, 2, 7, 16, 17, 28, 40]
            };
            for &nb in sizes {
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
                        let x: Vec<f32> =
                            (0..nb * block_len).map(|_| rng.weight() * scale).collect();
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
            let n = nb * crate::interleave::tests::block_len(ty);
            let x: Vec<f32> = (0..n).map(|_| rng.weight() * 2.0).collect();
            quantize_row(ty, &x, &mut w).unwrap();
        } else {
            w.iter_mut().for_each(|b| *b = rng.next() as u8);
            // The f16 fields sane: d and m (or dmin) at 0 and 2; Q6_K's d last.
            let halves: &[usize] = match ty {
                GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4_K | GgmlType::Q5_K => &[0, 2],
                GgmlType::Q6_K => &[208],
                _ => &[0],
            };
            for b in w.chunks_mut(ty.block_bytes()) {
                for &at in halves {
                    b[at..at + 2].copy_from_slice(&rng.small_f16());
                }
            }
        }
        w
    }
}
