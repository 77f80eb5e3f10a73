//! AVX-512 (F/BW/VL + VNNI) row dots of the fast path, and the Q8_0/Q8_1 activation
//! quantizers. Types without a kernel here use their AVX2 one (and its quantizer: Q8_K).
//!
//! The core instruction is `vpdpbusd` (u8 × i8, four products summed into each i32 lane, no
//! i16 saturation), on full 512-bit registers: 64 weights at a time, unpacked once and
//! multiplied with the same elements of up to [`MAX_COLS`] activation rows (a const generic,
//! so the per-row accumulators live in registers).
//!
//! Legacy formats (32-element blocks, one scale each): two blocks per register. Signed weights
//! (Q4_0, Q5_0, Q8_0) go in the i8 operand and the activations, flipped to `a + 128` with one
//! xor, in the u8 one; the `128 · Σw` this adds is computed once per weight block pair and is
//! the initial value of the accumulate, so every block's integer sum is exact for any i8
//! input. Unsigned weights (Q4_1, Q5_1) go in the u8 operand as they are, with the min term
//! from Q8_1's `s`. Each block pair, weights and activations alike, is one 64-byte load (plus
//! the last 4 or 8 bytes of a 68/72-byte Q8_0/Q8_1 pair); a word permute puts the quants in
//! element order, and two more pick the f16 scales of eight blocks out of four such loads, to
//! be converted at once and multiplied with the activation row's eight. A lane permute then
//! hands each block pair its two scale products: one convert and one FMA per pair and row.
//! (Q8_0 with a single activation row goes to the AVX2 kernel, which is faster there.)
//!
//! K-quants (256-element super-blocks): four registers of unsigned weight codes per
//! super-block. Per activation row, `vpdpbusd` gives sums of four products (|sum| ≤ 4·63·128,
//! so they fit i16); two registers are packed to i16 with `vpackssdw` and `vpdpwssd` multiplies
//! them with the matching sub-block scales (arranged once per super-block to the pack's lane
//! order) into the row's i32 sum. Offsets of the signed formats (Q3_K's −4, Q6_K's −32) become
//! one more `vpdpwssd` of the activation's `bsums` with `−offset · scale`; mins (Q2_K, Q4_K,
//! Q5_K) one `vpmaddwd` of the bsums with the mins, scaled by `dmin`. Integer sums are exact
//! for every input byte; only the f32 accumulation order differs from `edgelm_quant::int_dot`.

use super::avx2_legacy::{put_q8_header, q8_blocks};
use super::{f32_at, u32_at, weight_type};
use super::{T_Q2_K, T_Q3_K, T_Q4_0, T_Q4_1, T_Q4_K, T_Q5_0, T_Q5_1, T_Q5_K, T_Q6_K, T_Q8_0};
use crate::qdot::{row_tiles, Out, QuantKernel, QuantizeFn, RowDotFn};
use crate::Isa;
use edgelm_quant::k_quants::q8_k::{BLOCK_BYTES as Q8K_BYTES, BSUMS as Q8K_BSUMS, QS as Q8K_QS};
use edgelm_quant::GgmlType;
use std::arch::x86_64::*;

/// Bytes of one weight block.
const fn w_bytes(t: u8) -> usize {
    match t {
        T_Q4_0 => 18,
        T_Q4_1 => 20,
        T_Q5_0 => 22,
        T_Q5_1 => 24,
        T_Q8_0 => 34,
        T_Q2_K => 84,
        T_Q3_K => 110,
        T_Q4_K => 144,
        T_Q5_K => 176,
        _ => 210,
    }
}

const fn is_k(t: u8) -> bool {
    t >= T_Q2_K
}

/// Legacy formats with a min, paired with Q8_1 activations.
const fn has_min(t: u8) -> bool {
    matches!(t, T_Q4_1 | T_Q5_1)
}

/// Bytes of one activation block (Q8_K; Q8_1: d, s, 32 quants; Q8_0: d, 32 quants).
const fn a_bytes(t: u8) -> usize {
    if is_k(t) {
        Q8K_BYTES
    } else if has_min(t) {
        36
    } else {
        34
    }
}

/// The AVX-512 kernel for a weight type, where one exists; Q8_0 and Q8_1 activations are
/// quantized here, Q8_K ones with the AVX2 quantizer. IQ4_NL and IQ4_XS have only the interleaved AVX-512 dot (weights are
/// always repacked where one exists); in GGUF order they keep the AVX2 row dot.
pub fn kernel(ty: GgmlType) -> Option<QuantKernel> {
    use GgmlType::*;
    let base = super::avx2_quant::kernel(ty)?;
    let row_dot: RowDotFn = match ty {
        Q4_0 => row_dot::<T_Q4_0>,
        Q4_1 => row_dot::<T_Q4_1>,
        Q5_0 => row_dot::<T_Q5_0>,
        Q5_1 => row_dot::<T_Q5_1>,
        Q8_0 => row_dot::<T_Q8_0>,
        Q2_K => row_dot::<T_Q2_K>,
        Q3_K => row_dot::<T_Q3_K>,
        Q4_K => row_dot::<T_Q4_K>,
        Q5_K => row_dot::<T_Q5_K>,
        Q6_K => row_dot::<T_Q6_K>,
        IQ4_NL | IQ4_XS => base.row_dot,
        _ => return None,
    };
    let quantize: QuantizeFn = match base.act {
        Q8_0 => quantize_row_q8_0,
        Q8_1 => quantize_row_q8_1,
        _ => base.quantize,
    };
    Some(QuantKernel {
        weight: ty,
        act: base.act,
        isa: Isa::Avx512,
        row_dot,
        quantize,
        interleaved: super::avx512_interleaved::row_dot_for(ty),
        prefill: None,
    })
}

/// Quantize a row of f32 into Q8_0 blocks, byte-identical to `edgelm_quant::quantize_row`.
///
/// # Safety
/// The CPU has F16C and AVX-512 F/BW/VL.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
pub unsafe fn quantize_row_q8_0(x: &[f32], out: &mut [u8]) {
    quantize_q8::<false>(x, out)
}

/// Quantize a row of f32 into Q8_1 blocks, byte-identical to `edgelm_quant::quantize_row`.
///
/// # Safety
/// The CPU has F16C and AVX-512 F/BW/VL.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
pub unsafe fn quantize_row_q8_1(x: &[f32], out: &mut [u8]) {
    quantize_q8::<true>(x, out)
}

/// Both quantizers, the scalar reference's arithmetic (see `avx2_legacy::quantize_q8`) in two
/// registers per block, ties rounded away from zero as AVX2's `round_to_i8` does: quantizing
/// took 9% of a SmolLM2 prompt's time with the AVX2 quantizer, 4.6% with this one.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
unsafe fn quantize_q8<const SUM: bool>(x: &[f32], out: &mut [u8]) {
    let (nb, bb, qoff) = q8_blocks(x, out, SUM);
    let sign = _mm512_set1_epi32(i32::MIN);
    let below_half = _mm512_set1_epi32(0.499_999_97f32.to_bits() as i32);
    for b in 0..nb {
        // SAFETY: b < nb; the block's 32 floats and bb bytes are inside `x` and `out`.
        let xp = x.as_ptr().add(32 * b);
        let op = out.as_mut_ptr().add(bb * b);
        let v = [_mm512_loadu_ps(xp), _mm512_loadu_ps(xp.add(16))];
        // max_ps returns its second operand when either is NaN, so NaN lanes keep `m`.
        let m = _mm512_max_ps(_mm512_abs_ps(v[0]), _mm512_setzero_ps());
        let m = _mm512_max_ps(_mm512_abs_ps(v[1]), m);
        let amax = _mm512_reduce_max_ps(m);
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let vid = _mm512_set1_ps(id);
        let q = v.map(|v| {
            let t = _mm512_mul_ps(v, vid);
            let half = _mm512_or_si512(_mm512_and_si512(_mm512_castps_si512(t), sign), below_half);
            let r = _mm512_add_ps(t, _mm512_castsi512_ps(half));
            let r = _mm512_min_ps(
                _mm512_max_ps(r, _mm512_set1_ps(-128.0)),
                _mm512_set1_ps(127.0),
            );
            // NaN → 0, as `as i8` does.
            let r = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask::<_CMP_ORD_Q>(t, t), r);
            _mm512_cvttps_epi32(r)
        });
        _mm_storeu_si128(op.add(qoff).cast(), _mm512_cvtepi32_epi8(q[0]));
        _mm_storeu_si128(op.add(qoff + 16).cast(), _mm512_cvtepi32_epi8(q[1]));
        let s = if SUM {
            _mm512_reduce_add_epi32(_mm512_add_epi32(q[0], q[1])) as f32 * d
        } else {
            0.0
        };
        put_q8_header(op, qoff, d, s);
    }
}

/// [`RowDotFn`]: checks the lengths once for the block (so the block loops can use raw
/// pointers), then dispatches on the activation-row count, [`MAX_COLS`] rows at a time.
///
/// # Safety
/// The CPU has AVX2, FMA, F16C and AVX-512 F/BW/VL/VNNI.
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
    if acts.len() == 1 {
        // Decoding (one activation row) streams weights from memory: there the AVX2 kernels
        // are faster end to end (measured: qwen2.5 tg 80 vs 61 tok/s), although the 512-bit
        // ones win with the weights in cache. From two rows on (prefill) these are faster.
        if let Some(k) = super::avx2_quant::kernel(weight_type(T)) {
            return (k.row_dot)(w, row_bytes, n_rows, acts, out);
        }
    }
    row_tiles!(n_rows, acts, out, |r, a, o, N| {
        let w = w.as_ptr().add(r * row_bytes);
        rows::<T, N>(w, nb, a, &mut o)
    });
}

/// # Safety
/// As [`legacy_rows`] / [`kq_rows`].
#[inline(always)]
unsafe fn rows<const T: u8, const N: usize>(
    w: *const u8,
    nb: usize,
    acts: &[&[u8]],
    out: &mut [f32],
) {
    let a: [*const u8; N] = core::array::from_fn(|j| acts[j].as_ptr());
    let out: &mut [f32; N] = (&mut out[..N]).try_into().unwrap();
    if is_k(T) {
        kq_rows::<T, N>(w, nb, &a, out)
    } else {
        legacy_rows::<T, N>(w, nb, &a, out)
    }
}

// ---------------------------------------------------------------------------------------------
// Small helpers

/// # Safety
/// `p` is valid for 32 bytes; the CPU has AVX.
#[inline(always)]
unsafe fn load256(p: *const u8) -> __m256i {
    _mm256_loadu_si256(p.cast())
}

/// # Safety
/// `p` is valid for 64 bytes; the CPU has AVX-512F.
#[inline(always)]
unsafe fn load512(p: *const u8) -> __m512i {
    _mm512_loadu_si512(p.cast())
}

/// 32 bytes at `p` in both 256-bit halves.
///
/// # Safety
/// `p` is valid for 32 bytes; the CPU has AVX-512F.
#[inline(always)]
unsafe fn bcast256(p: *const u8) -> __m512i {
    _mm512_broadcast_i64x4(load256(p))
}

/// Per-qword counts: `lo` for the low 256 bits, `hi` for the high ones.
#[inline(always)]
const fn halves(lo: u64, hi: u64) -> [u64; 8] {
    [lo, lo, lo, lo, hi, hi, hi, hi]
}

// ---------------------------------------------------------------------------------------------
// Legacy formats
//
// Eight blocks per step, as four pairs. Each pair of weight blocks and each pair of activation
// blocks is read with one 64-byte load (plus the last 4 or 8 bytes of a Q8_0/Q8_1 pair, which
// is 68 / 72 bytes): the quants are put in element order by one word permute, and the f16
// scales of the step's eight blocks are picked out of the same four loads by two more. (With
// separate loads for the scales the activation side was bound by load bandwidth.)

/// Lane `i` of the eight-block scale products that block pair `k` uses: `2k` for the low
/// eight lanes (its first block), `2k + 1` for the high eight.
static PAIR_IDX: [[i32; 16]; 4] = {
    let mut t = [[0i32; 16]; 4];
    let mut k = 0;
    while k < 4 {
        let mut i = 0;
        while i < 16 {
            t[k][i] = (2 * k + i / 8) as i32;
            i += 1;
        }
        k += 1;
    }
    t
};

/// Q4_x/Q5_x nibbles: the low 128-bit lanes of each block keep their low nibbles, the high
/// ones are shifted down by 4.
static NIB_SHIFT: [u64; 8] = [0, 0, 4, 4, 0, 0, 4, 4];

/// Scale words of four blocks from the 64-word table (pair A, pair B) of blocks `stride`
/// bytes long: lane `i < 4` is block `i`'s first word (its `d`), lane `8 + i` the next (`s`
/// or `m`).
const fn scale_words(stride: usize) -> [i16; 32] {
    let mut r = [0i16; 32];
    let mut i = 0;
    while i < 4 {
        let word = 32 * (i / 2) + (i % 2) * (stride / 2);
        r[i] = word as i16;
        r[8 + i] = word as i16 + 1;
        i += 1;
    }
    r
}

/// Q8_0/Q8_1 pairs: the 32 quant words of blocks `stride` bytes long with a `hdr`-byte
/// header, from the table (the pair's first 64 bytes, the rest of the pair).
const fn q8_words(stride: usize, hdr: usize) -> [i16; 32] {
    let mut r = [0i16; 32];
    let mut o = 0;
    while o < 32 {
        r[o] = (((o / 16) * stride + hdr) / 2 + o % 16) as i16;
        o += 1;
    }
    r
}

/// Q4_x/Q5_x pairs: each block's 16 nibble bytes (at `qs` in blocks of `stride` bytes) into
/// two 128-bit lanes, `[q_b, q_b, q_b1, q_b1]`.
const fn nib_words(stride: usize, qs: usize) -> [i16; 32] {
    let mut r = [0i16; 32];
    let mut o = 0;
    while o < 32 {
        r[o] = (((o / 16) * stride + qs) / 2 + o % 8) as i16;
        o += 1;
    }
    r
}

/// Byte offset of the quants in a weight block.
const fn qs_offset(t: u8) -> usize {
    match t {
        T_Q4_0 => 2,
        T_Q4_1 => 4,
        T_Q5_0 => 6,
        T_Q5_1 => 8,
        _ => 2,
    }
}

/// Permute indices of the legacy kernels, read through volatile loads so the compiler sees
/// variable permutes: with constant ones it folds the permutes into each other and into the
/// loads, re-lowered as long shuffle sequences (measured 1.7× slower).
struct Idx {
    /// [`scale_words`] of the weight and the activation blocks.
    wd: __m512i,
    ad: __m512i,
    /// The weights' quant words ([`q8_words`] or [`nib_words`]) and the activations'.
    wq: __m512i,
    aq: __m512i,
    /// [`PAIR_IDX`].
    pair: [__m512i; 4],
}

impl Idx {
    /// # Safety
    /// The CPU has AVX-512F.
    #[inline(always)]
    unsafe fn new(t: u8) -> Idx {
        let (wb, ab) = (w_bytes(t), a_bytes(t));
        let wq = if t == T_Q8_0 {
            q8_words(wb, 2)
        } else {
            nib_words(wb, qs_offset(t))
        };
        Idx {
            wd: opaque(&scale_words(wb)),
            ad: opaque(&scale_words(ab)),
            wq: opaque(&wq),
            aq: opaque(&q8_words(ab, ab - 32)),
            pair: [
                opaque(&PAIR_IDX[0]),
                opaque(&PAIR_IDX[1]),
                opaque(&PAIR_IDX[2]),
                opaque(&PAIR_IDX[3]),
            ],
        }
    }
}

/// The 64 bytes of `v` as a register the optimizer knows nothing about.
///
/// # Safety
/// `T` is 64 bytes; the CPU has AVX-512F.
#[inline(always)]
unsafe fn opaque<T: Copy>(v: &T) -> __m512i {
    let copy = core::ptr::read_volatile(v);
    _mm512_loadu_si512((&copy as *const T).cast())
}

/// The first `min(avail, 64)` bytes at `p`, zeros after; nothing past them is read.
///
/// # Safety
/// `p` is valid for `min(avail, 64)` bytes; the CPU has AVX-512 F/BW.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn load_upto(p: *const u8, avail: usize) -> __m512i {
    let k = if avail >= 64 {
        !0u64
    } else {
        (1u64 << avail) - 1
    };
    _mm512_maskz_loadu_epi8(_cvtu64_mask64(k), p.cast())
}

/// The scales of a step's eight blocks from its four pair loads, as f32: `d` in lanes 0..8,
/// the second f16 (`s` / `m`) in lanes 8..16.
///
/// # Safety
/// The CPU has the kernels' features.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn step_scales(z: &[__m512i; 4], idx: __m512i) -> __m512 {
    let x = _mm512_permutex2var_epi16(z[0], idx, z[1]);
    // Blocks 4..8 land in lanes 0..4 / 8..12 too; an 8-byte shift within each 128-bit lane
    // moves them to 4..8 / 12..16.
    let y = _mm512_bslli_epi128::<8>(_mm512_permutex2var_epi16(z[2], idx, z[3]));
    let r = _mm512_mask_blend_epi16(0xF0F0, x, y);
    _mm512_cvtph_ps(_mm512_castsi512_si256(r))
}

/// The block loop for `N` activation rows.
///
/// # Safety
/// AVX-512 as [`row_dot`]; `w` holds `nb` weight blocks and every `a[j]` at least `nb`
/// activation blocks.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn legacy_rows<const T: u8, const N: usize>(
    w: *const u8,
    nb: usize,
    a: &[*const u8; N],
    out: &mut [f32; N],
) {
    // With one or two rows, alternate two accumulator sets so consecutive block pairs do not
    // wait on each other's FMA.
    let mut acc = [[_mm512_setzero_ps(); N]; 2];
    let mut macc = [_mm512_setzero_ps(); N];
    let idx = Idx::new(T);
    // Weight pairs shorter than 64 bytes are read 64 bytes at a time: full steps whose last
    // pair starts at least 64 bytes before the end of the row need no masks.
    let wb = w_bytes(T);
    let unmasked = 8usize.max(6 + 64usize.div_ceil(wb));
    let mut b = 0;
    while b + unmasked <= nb {
        step::<T, N, true, false>(w, a, b, nb, &idx, &mut acc, &mut macc);
        b += 8;
    }
    while b + 8 <= nb {
        step::<T, N, true, true>(w, a, b, nb, &idx, &mut acc, &mut macc);
        b += 8;
    }
    if b < nb {
        step::<T, N, false, true>(w, a, b, nb, &idx, &mut acc, &mut macc);
    }
    for j in 0..N {
        let mut s = _mm512_reduce_add_ps(_mm512_add_ps(acc[0][j], acc[1][j]));
        if has_min(T) {
            // The high eight lanes of the scale products are m_w · s_a.
            s += _mm512_mask_reduce_add_ps(0xFF00, macc[j]);
        }
        out[j] = s;
    }
}

/// Blocks `b0 .. b0 + 8` (all eight when `FULL`, else the `nb - b0 < 8` left); the weight
/// loads are masked to the row when `WMASK`.
///
/// # Safety
/// As [`legacy_rows`], `b0 < nb`, `b0 + 8 <= nb` when `FULL`, and the row holds 64 bytes
/// from block `b0 + 6` unless `WMASK`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn step<const T: u8, const N: usize, const FULL: bool, const WMASK: bool>(
    w: *const u8,
    a: &[*const u8; N],
    b0: usize,
    nb: usize,
    idx: &Idx,
    acc: &mut [[__m512; N]; 2],
    macc: &mut [__m512; N],
) {
    let (wb, ab) = (w_bytes(T), a_bytes(T));
    let m = if FULL { 8 } else { nb - b0 };
    let zero = _mm512_setzero_si512();
    // SAFETY (pointer offsets and loads): blocks b0 + 2k (+ 1 when `two`) are below nb, so
    // inside `w` and every `a[j]`; 64-byte reads past a pair are masked unless in bounds.
    let wp = w.add(b0 * wb);
    let mut zw = [zero; 4];
    let mut xw = [zero; 4];
    for k in 0..4 {
        if 2 * k < m {
            let two = FULL || 2 * k + 1 < m;
            let p = wp.add(2 * k * wb);
            zw[k] = if WMASK {
                load_upto(p, (nb - b0 - 2 * k) * wb)
            } else {
                load512(p)
            };
            if T == T_Q8_0 && two {
                xw[k] = _mm512_zextsi128_si512(_mm_cvtsi32_si128(u32_at(p.add(64)) as i32));
            }
        }
    }
    let fw = step_scales(&zw, idx.wd);
    let mut wv = [zero; 4];
    let mut init = [zero; 4];
    for k in 0..4 {
        if 2 * k < m {
            let two = FULL || 2 * k + 1 < m;
            wv[k] = unpack_pair::<T>(zw[k], xw[k], wp.add(2 * k * wb), two, idx.wq);
            if !has_min(T) {
                // -128 · Σw per lane: cancels what the activations' +128 adds.
                let c = _mm512_dpbusd_epi32(zero, _mm512_set1_epi8(0x80u8 as i8), wv[k]);
                init[k] = _mm512_sub_epi32(zero, c);
            }
        }
    }
    for j in 0..N {
        let ap = a[j].add(b0 * ab);
        let mut za = [zero; 4];
        let mut xa = [zero; 4];
        for k in 0..4 {
            if 2 * k < m {
                let two = FULL || 2 * k + 1 < m;
                let p = ap.add(2 * k * ab);
                if two {
                    // A pair is 68 (Q8_0) or 72 (Q8_1) bytes.
                    za[k] = load512(p);
                    xa[k] = if has_min(T) {
                        _mm512_zextsi128_si512(_mm_loadl_epi64(p.add(64).cast()))
                    } else {
                        _mm512_zextsi128_si512(_mm_cvtsi32_si128(u32_at(p.add(64)) as i32))
                    };
                } else {
                    za[k] = load_upto(p, ab);
                }
            }
        }
        let p = _mm512_mul_ps(step_scales(&za, idx.ad), fw);
        if has_min(T) {
            macc[j] = _mm512_add_ps(macc[j], p);
        }
        for k in 0..4 {
            if 2 * k < m {
                let y = _mm512_permutex2var_epi16(za[k], idx.aq, xa[k]);
                let t = if has_min(T) {
                    _mm512_dpbusd_epi32(zero, wv[k], y)
                } else {
                    let yu = _mm512_xor_si512(y, _mm512_set1_epi8(0x80u8 as i8));
                    _mm512_dpbusd_epi32(init[k], yu, wv[k])
                };
                let s = _mm512_permutexvar_ps(idx.pair[k], p);
                let set = if N <= 2 { k % 2 } else { 0 };
                acc[set][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), s, acc[set][j]);
            }
        }
    }
}

/// A weight block pair — its first 64 bytes `z` (zeros past the row), the rest `x`, in memory
/// at `p` — as 64 byte lanes in element order: signed quants (`q - 8`, `q - 16`, `q`) for
/// Q4_0/Q5_0/Q8_0, unsigned ones for Q4_1/Q5_1. Without `two` only the first block is used.
///
/// # Safety
/// The block(s) at `p` are readable; the CPU has the kernels' features.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn unpack_pair<const T: u8>(
    z: __m512i,
    x: __m512i,
    p: *const u8,
    two: bool,
    idx: __m512i,
) -> __m512i {
    if T == T_Q8_0 {
        return _mm512_permutex2var_epi16(z, idx, x);
    }
    // [q_b, q_b, q_b1, q_b1] per 128-bit lane, then low nibbles in lanes 0, 2 and high ones in
    // 1, 3: byte j's low nibble is element j, its high nibble element j + 16.
    let q = _mm512_permutexvar_epi16(idx, z);
    let n = _mm512_and_si512(
        _mm512_srlv_epi64(q, _mm512_loadu_si512(NIB_SHIFT.as_ptr().cast())),
        _mm512_set1_epi8(0x0F),
    );
    match T {
        T_Q4_0 => _mm512_sub_epi8(n, _mm512_set1_epi8(8)),
        T_Q4_1 => n,
        _ => {
            // The fifth bits: bit i of the block's u32 qh is element i's.
            let wb = w_bytes(T);
            let qh = if T == T_Q5_0 { 2 } else { 4 };
            let h0 = u32_at(p.add(qh)) as u64;
            let h1 = if two {
                u32_at(p.add(wb + qh)) as u64
            } else {
                0
            };
            let h = h0 | h1 << 32;
            let sixteen = _mm512_set1_epi8(16);
            if T == T_Q5_0 {
                // q - 16: the nibble where the bit is set, nibble - 16 where it is not.
                _mm512_mask_sub_epi8(n, _cvtu64_mask64(!h), n, sixteen)
            } else {
                _mm512_mask_add_epi8(n, _cvtu64_mask64(h), n, sixteen)
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// K-quants

/// One super-block's weights, unpacked: four registers of unsigned codes (elements 64g ..
/// 64g + 64), i16 scales in the lane order of `packs(t0, t1)` and `packs(t2, t3)`, the
/// bsums multipliers of the offset (`corr`) or of the mins, and `d`, `dmin` in every lane.
struct KBlock {
    w: [__m512i; 4],
    sc01: __m512i,
    sc23: __m512i,
    corr: __m512i,
    mins: __m512i,
    d: __m512,
    dmin: __m512,
}

/// Formats whose codes carry an offset, removed through the bsums (Q3_K −4, Q6_K −32).
const fn k_offset(t: u8) -> bool {
    matches!(t, T_Q3_K | T_Q6_K)
}

/// Formats with mins, subtracted through the bsums times `dmin`.
const fn k_min(t: u8) -> bool {
    matches!(t, T_Q2_K | T_Q4_K | T_Q5_K)
}

/// For `packs(t_a, t_b)` of the dpbusd sums of groups `a`, `b` (64 elements each): i16 lane
/// `q` (128-bit lane `l = q / 8`, position `p = q % 8`) holds i32 lane `4l + p % 4` of `t_a`
/// (`p < 4`) or `t_b`, i.e. elements `64g + 16l ..`; its scale is that sub-block's, where
/// sub-blocks have 16 elements (`wide` false) or 32.
const fn pack_idx(a: usize, b: usize, wide: bool) -> [i16; 32] {
    let mut r = [0i16; 32];
    let mut q = 0;
    while q < 32 {
        let (l, p) = (q / 8, q % 8);
        let g = if p < 4 { a } else { b };
        r[q] = (if wide { 2 * g + l / 2 } else { 4 * g + l }) as i16;
        q += 1;
    }
    r
}

static IDX16_01: [i16; 32] = pack_idx(0, 1, false);
static IDX16_23: [i16; 32] = pack_idx(2, 3, false);
static IDX32_01: [i16; 32] = pack_idx(0, 1, true);
static IDX32_23: [i16; 32] = pack_idx(2, 3, true);

/// Q4_K/Q5_K mins for `madd` with the 16 bsums: i16 lane `k` takes min `k / 2` (lane 8 + k / 2
/// of `[sc0..sc7, mn0..mn7]`).
static MIN_IDX: [i16; 32] = {
    let mut r = [0i16; 32];
    let mut k = 0;
    while k < 16 {
        r[k] = 8 + (k / 2) as i16;
        k += 1;
    }
    r
};

/// Q4_K/Q5_K: low nibbles for the low 256 bits, high nibbles for the high ones.
static K_NIB_SHIFT: [u64; 8] = halves(0, 4);
/// Q2_K/Q3_K: bit pairs 0/1 (groups 0, 2) and 2/3 (groups 1, 3) of the half's 32 qs bytes.
static K_PAIR_SHIFT: [[u64; 8]; 2] = [halves(0, 2), halves(4, 6)];
/// Q5_K: rotations taking bit `2g` (low half) / `2g + 1` (high half) of each qh byte to bit 4.
static Q5K_ROT: [[u64; 8]; 4] = [halves(4, 3), halves(2, 1), halves(0, 63), halves(62, 61)];
/// Q3_K: rotations taking hmask bit `2g` / `2g + 1` to bit 2.
static Q3K_ROT: [[u64; 8]; 4] = [halves(2, 1), halves(0, 63), halves(62, 61), halves(60, 59)];
/// Q6_K: rotations taking qh bit pairs 0/1 (even groups) and 2/3 (odd ones) to bits 4-5.
static Q6K_ROT: [[u64; 8]; 2] = [halves(4, 2), halves(0, 62)];

/// A 64-byte constant table as a register.
///
/// # Safety
/// `T` is 64 bytes; the CPU has AVX-512F.
#[inline(always)]
unsafe fn vconst<T>(p: &T) -> __m512i {
    _mm512_loadu_si512((p as *const T).cast())
}

/// The f16 values at `p` and `p + 2`, each as f32 in every lane.
///
/// # Safety
/// `p` is valid for 4 bytes; the CPU has AVX-512F and F16C.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn f16_pair(p: *const u8) -> (__m512, __m512) {
    let v = _mm_cvtph_ps(_mm_cvtsi32_si128(u32_at(p) as i32));
    (
        _mm512_broadcastss_ps(v),
        _mm512_broadcastss_ps(_mm_movehdup_ps(v)),
    )
}

/// `a | (b & c)`, bitwise (ternary-logic table 0xF8).
///
/// # Safety
/// The CPU has AVX-512F.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn or_masked(a: __m512i, b: __m512i, c: __m512i) -> __m512i {
    _mm512_ternarylogic_epi32::<0xF8>(a, b, c)
}

/// Unpacks the super-block at `x`.
///
/// # Safety
/// `x` is valid for `w_bytes(T)` bytes; the CPU has the kernels' features.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn k_unpack<const T: u8>(x: *const u8) -> KBlock {
    let zero = _mm512_setzero_si512();
    let m4 = _mm512_set1_epi8(0x0F);
    let m2 = _mm512_set1_epi8(0x03);
    let mut w = [zero; 4];
    let (mut corr, mut mins) = (zero, zero);
    // SAFETY (all loads): offsets inside the block layout of each format.
    let (d, dmin, sc16, wide) = match T {
        T_Q4_K | T_Q5_K => {
            // f16 d, dmin, scales[12], then (Q5_K) qh[32], qs[128].
            let (d, dmin) = f16_pair(x);
            let s16 = _mm512_zextsi256_si512(_mm256_cvtepu8_epi16(k4_scales_mins(x.add(4))));
            mins = _mm512_permutexvar_epi16(vconst(&MIN_IDX), s16);
            let qs = if T == T_Q4_K { 16 } else { 48 };
            let sh = vconst(&K_NIB_SHIFT);
            for (g, wg) in w.iter_mut().enumerate() {
                *wg = _mm512_and_si512(_mm512_srlv_epi64(bcast256(x.add(qs + 32 * g)), sh), m4);
            }
            if T == T_Q5_K {
                let h = bcast256(x.add(16));
                let bit4 = _mm512_set1_epi8(0x10);
                for g in 0..4 {
                    let hb = _mm512_rolv_epi64(h, vconst(&Q5K_ROT[g]));
                    w[g] = or_masked(w[g], hb, bit4);
                }
            }
            (d, dmin, s16, true)
        }
        T_Q6_K => {
            // ql[128], qh[64], i8 scales[16], f16 d.
            let (_, d) = f16_pair(x.add(206));
            let s16 =
                _mm512_zextsi256_si512(_mm256_cvtepi8_epi16(_mm_loadu_si128(x.add(192).cast())));
            corr = _mm512_sub_epi16(zero, _mm512_slli_epi16::<5>(s16));
            let bits45 = _mm512_set1_epi8(0x30);
            for h in 0..2 {
                let ql = load512(x.add(64 * h));
                let qh = bcast256(x.add(128 + 32 * h));
                let lo = _mm512_and_si512(ql, m4);
                let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(ql), m4);
                let h0 = _mm512_rolv_epi64(qh, vconst(&Q6K_ROT[0]));
                let h1 = _mm512_rolv_epi64(qh, vconst(&Q6K_ROT[1]));
                w[2 * h] = or_masked(lo, h0, bits45);
                w[2 * h + 1] = or_masked(hi, h1, bits45);
            }
            (d, d, s16, false)
        }
        T_Q3_K => {
            // hmask[32], qs[64], scales[12], f16 d.
            let (_, d) = f16_pair(x.add(106));
            let s16 = _mm512_zextsi256_si512(_mm256_cvtepi8_epi16(q3_scales(x.add(96))));
            corr = _mm512_sub_epi16(zero, _mm512_slli_epi16::<2>(s16));
            let hm = bcast256(x);
            let bit2 = _mm512_set1_epi8(0x04);
            for h in 0..2 {
                let qs = bcast256(x.add(32 + 32 * h));
                for (k, shift) in K_PAIR_SHIFT.iter().enumerate() {
                    let g = 2 * h + k;
                    let lo = _mm512_and_si512(_mm512_srlv_epi64(qs, vconst(shift)), m2);
                    let hb = _mm512_rolv_epi64(hm, vconst(&Q3K_ROT[g]));
                    w[g] = or_masked(lo, hb, bit2);
                }
            }
            (d, d, s16, false)
        }
        _ => {
            // Q2_K: scales[16] (low nibble scale, high nibble min), qs[64], f16 d, dmin.
            let (d, dmin) = f16_pair(x.add(80));
            let raw = _mm_loadu_si128(x.cast());
            let nib = _mm_set1_epi8(0x0F);
            let s16 = _mm512_zextsi256_si512(_mm256_cvtepu8_epi16(_mm_and_si128(raw, nib)));
            mins = _mm512_zextsi256_si512(_mm256_cvtepu8_epi16(_mm_and_si128(
                _mm_srli_epi16::<4>(raw),
                nib,
            )));
            for h in 0..2 {
                let qs = bcast256(x.add(16 + 32 * h));
                for k in 0..2 {
                    w[2 * h + k] =
                        _mm512_and_si512(_mm512_srlv_epi64(qs, vconst(&K_PAIR_SHIFT[k])), m2);
                }
            }
            (d, dmin, s16, false)
        }
    };
    let (i01, i23) = if wide {
        (vconst(&IDX32_01), vconst(&IDX32_23))
    } else {
        (vconst(&IDX16_01), vconst(&IDX16_23))
    };
    KBlock {
        w,
        sc01: _mm512_permutexvar_epi16(i01, sc16),
        sc23: _mm512_permutexvar_epi16(i23, sc16),
        corr,
        mins,
        d,
        dmin,
    }
}

/// Q4_K/Q5_K's 12 bytes of 6-bit (scale, min) pairs as bytes `[sc0..sc7, mn0..mn7]`, on
/// the u32 words `a0, a1, a2` of the field: pairs 0..4 are the low 6 bits of `a0` (scales) and
/// `a1` (mins); pairs 4..8 take their low nibbles from `a2` (scales low, mins high nibbles)
/// and their top 2 bits from the top bits of `a0` / `a1`.
///
/// # Safety
/// `p` is valid for 16 bytes (the field and 4 more); the CPU has the kernels' features.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn k4_scales_mins(p: *const u8) -> __m128i {
    let v = _mm_loadu_si128(p.cast());
    // [a0, a2, a1, a2] >> [0, 0, 0, 4], masked to the low bits each result keeps.
    let lo = _mm_and_si128(
        _mm_srlv_epi32(
            _mm_shuffle_epi32::<0b10_01_10_00>(v),
            _mm_setr_epi32(0, 0, 0, 4),
        ),
        _mm_setr_epi32(0x3F3F_3F3F, 0x0F0F_0F0F, 0x3F3F_3F3F, 0x0F0F_0F0F),
    );
    // Bits 6-7 of [a0, a0, a1, a1] to bits 4-5, for the high words only.
    let hi = _mm_srli_epi32::<2>(_mm_shuffle_epi32::<0b01_01_00_00>(v));
    let hi_mask = _mm_setr_epi32(0, 0x3030_3030, 0, 0x3030_3030);
    _mm_ternarylogic_epi32::<0xF8>(lo, hi, hi_mask)
}

/// Q3_K's 16 scales (6-bit codes minus 32) as i8: scale `k`'s low nibble is byte `k % 8`'s
/// low (k < 8) or high nibble, its top 2 bits bit pair `k / 4` of byte `8 + k % 4`. Words
/// `a0, a1, a2` of the field: `[a0, a1, a0 >> 4, a1 >> 4]` low nibbles, or'ed with bit pair
/// `k / 4` of `a2` moved to bits 4-5.
///
/// # Safety
/// `p - 2` is valid for 16 bytes (the field is the last 12 before the block's f16 `d`); the
/// CPU has the kernels' features.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn q3_scales(p: *const u8) -> __m128i {
    // Bytes 2..14 of the load are the field.
    let v = _mm_loadu_si128(p.sub(2).cast());
    let words = _mm_shuffle_epi8(
        v,
        _mm_setr_epi8(2, 3, 4, 5, 6, 7, 8, 9, 2, 3, 4, 5, 6, 7, 8, 9),
    );
    let lo = _mm_and_si128(
        _mm_srlv_epi32(words, _mm_setr_epi32(0, 0, 4, 4)),
        _mm_set1_epi8(0x0F),
    );
    let a2 = _mm_shuffle_epi8(
        v,
        _mm_setr_epi8(
            10, 11, 12, 13, 10, 11, 12, 13, 10, 11, 12, 13, 10, 11, 12, 13,
        ),
    );
    // Rotating each word left by 4, 2, 0 and 30 takes bit pair k / 4 of every byte to 4-5.
    let hi = _mm_rolv_epi32(a2, _mm_setr_epi32(4, 2, 0, 30));
    let codes = _mm_ternarylogic_epi32::<0xF8>(lo, hi, _mm_set1_epi8(0x30));
    _mm_sub_epi8(codes, _mm_set1_epi8(32))
}

/// The super-block loop for `N` activation rows.
///
/// # Safety
/// As [`legacy_rows`], with Q8_K activation blocks.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn kq_rows<const T: u8, const N: usize>(
    w: *const u8,
    nb: usize,
    a: &[*const u8; N],
    out: &mut [f32; N],
) {
    let zero = _mm512_setzero_si512();
    let mut acc = [_mm512_setzero_ps(); N];
    for i in 0..nb {
        // SAFETY: i < nb: the super-block is in `w` and every activation row.
        let k = k_unpack::<T>(w.add(i * w_bytes(T)));
        for j in 0..N {
            let yb = a[j].add(i * Q8K_BYTES);
            let yq = yb.add(Q8K_QS);
            let t0 = _mm512_dpbusd_epi32(zero, k.w[0], load512(yq));
            let t1 = _mm512_dpbusd_epi32(zero, k.w[1], load512(yq.add(64)));
            let t2 = _mm512_dpbusd_epi32(zero, k.w[2], load512(yq.add(128)));
            let t3 = _mm512_dpbusd_epi32(zero, k.w[3], load512(yq.add(192)));
            let mut s = _mm512_dpwssd_epi32(zero, _mm512_packs_epi32(t0, t1), k.sc01);
            s = _mm512_dpwssd_epi32(s, _mm512_packs_epi32(t2, t3), k.sc23);
            // The 16 bsums in the low 256 bits, zeros above.
            let bs = _mm512_zextsi256_si512(load256(yb.add(Q8K_BSUMS)));
            if k_offset(T) {
                s = _mm512_dpwssd_epi32(s, bs, k.corr);
            }
            let mut v = _mm512_mul_ps(_mm512_cvtepi32_ps(s), k.d);
            if k_min(T) {
                let ms = _mm512_cvtepi32_ps(_mm512_madd_epi16(bs, k.mins));
                v = _mm512_fnmadd_ps(ms, k.dmin, v);
            }
            acc[j] = _mm512_fmadd_ps(v, _mm512_set1_ps(f32_at(yb)), acc[j]);
        }
    }
    for j in 0..N {
        out[j] = _mm512_reduce_add_ps(acc[j]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qdot::MAX_COLS;
    use crate::test_rng::Rng;
    use edgelm_quant::{dequantize_row, int_dot, quantize_row};

    fn have_cpu() -> bool {
        let ok = is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni");
        if !ok {
            eprintln!(
                "skipping: this CPU lacks AVX-512 F/BW/VL/VNNI; the AVX-512 path is untested"
            );
        }
        ok
    }

    const LEGACY: [GgmlType; 5] = [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
    ];
    const KQUANTS: [GgmlType; 5] = [
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
    ];

    /// Offsets of the f16 scale fields (d, and the min's scale where there is one).
    fn scale_fields(ty: GgmlType) -> (usize, Option<usize>) {
        use GgmlType::*;
        match ty {
            Q4_1 | Q5_1 | Q4_K | Q5_K => (0, Some(2)),
            Q2_K => (80, Some(82)),
            Q3_K => (108, None),
            Q6_K => (208, None),
            _ => (0, None),
        }
    }

    fn bytes(ty: GgmlType, n: usize) -> usize {
        n / ty.block_elems() * ty.block_bytes()
    }

    fn quantized_weights(rng: &mut Rng, ty: GgmlType, n: usize) -> Vec<u8> {
        let mut x = Vec::with_capacity(n);
        for _ in 0..n / 32 {
            // A random magnitude per 32 elements, now and then a zero run.
            let scale = if rng.below(8) == 0 {
                0.0
            } else {
                10f32.powf(2.0 * rng.unit())
            };
            x.extend((0..32).map(|_| rng.weight() * scale));
        }
        let mut w = vec![0u8; bytes(ty, n)];
        quantize_row(ty, &x, &mut w).unwrap();
        w
    }

    /// Any quant bytes at all, with sane f16 scale fields.
    fn random_weights(rng: &mut Rng, ty: GgmlType, n: usize) -> Vec<u8> {
        let mut w: Vec<u8> = (0..bytes(ty, n)).map(|_| rng.next() as u8).collect();
        let (d, dmin) = scale_fields(ty);
        for b in w.chunks_mut(ty.block_bytes()) {
            b[d..d + 2].copy_from_slice(&rng.small_f16());
            if let Some(m) = dmin {
                b[m..m + 2].copy_from_slice(&rng.small_f16());
            }
        }
        w
    }

    fn activations(rng: &mut Rng, act: GgmlType, n: usize) -> Vec<u8> {
        let scale = 0.05 + 4.0 * rng.unit().abs();
        let x: Vec<f32> = (0..n).map(|_| rng.weight() * scale).collect();
        let mut a = vec![0u8; bytes(act, n)];
        quantize_row(act, &x, &mut a).unwrap();
        a
    }

    /// Σ_e (|w_e| + |min_e|)·|a_e| over dequantized values, `min_e` read off by dequantizing
    /// with d = 0: bounds every partial sum either side forms (scale and min terms alike).
    fn magnitude(ty: GgmlType, w: &[u8], a: &[u8]) -> f64 {
        let act = int_dot::activation_type(ty);
        let n = a.len() / act.block_bytes() * act.block_elems();
        let deq = |ty, b: &[u8]| {
            let mut v = vec![0f32; n];
            dequantize_row(ty, b, &mut v).unwrap();
            v
        };
        let (wf, af) = (deq(ty, w), deq(act, a));
        let mf = match scale_fields(ty) {
            (d, Some(_)) => {
                let mut w0 = w.to_vec();
                for b in w0.chunks_mut(ty.block_bytes()) {
                    b[d..d + 2].fill(0);
                }
                deq(ty, &w0)
            }
            _ => vec![0f32; n],
        };
        (0..n)
            .map(|e| (wf[e].abs() as f64 + mf[e].abs() as f64) * af[e].abs() as f64)
            .sum()
    }

    /// Runs the AVX-512 row dot of `w` against all `acts` and checks every row against the
    /// scalar integer reference within `1e-5 · magnitude + 1e-6`: both sides form every
    /// block's integer sum exactly and differ only in f32 rounding, a few roundings per block
    /// relative to partial sums bounded by the magnitude (observed errors are far below).
    fn check(ty: GgmlType, w: &[u8], acts: &[Vec<u8>], what: &str) {
        let k = kernel(ty).unwrap();
        let refs: Vec<&[u8]> = acts.iter().map(|a| a.as_slice()).collect();
        let mut out = vec![f32::NAN; acts.len()];
        // SAFETY: the CPU was checked by the caller; the lengths match.
        unsafe { (k.row_dot)(w, w.len(), 1, &refs, Out::slice(&mut out, 1)) };
        for (j, a) in acts.iter().enumerate() {
            let want = int_dot::vec_dot(ty, w, a).unwrap();
            let tol = 1e-5 * magnitude(ty, w, a) + 1e-6;
            let err = (out[j] as f64 - want as f64).abs();
            assert!(
                out[j].is_finite() && err <= tol,
                "{ty:?} {what}: {} weight bytes, {} rows, row {j}: avx512 {} scalar {want} \
                 (err {err:e}, tol {tol:e})",
                w.len(),
                acts.len(),
                out[j],
            );
        }
    }

    /// Every type; legacy rows of 1, 2, 3, 7, 8, 9, 16, 17 and 32 blocks (whole and partial
    /// eight-block steps, odd tails), k-quant rows of 1–3 super-blocks; 1..=8 and 11 activation
    /// rows; weights from the quantizer and from raw random bytes.
    #[test]
    fn row_dot_matches_scalar() {
        if !have_cpu() {
            return;
        }
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let cases = LEGACY
            .iter()
            .map(|&t| (t, vec![1usize, 2, 3, 7, 8, 9, 16, 17, 32]))
            .chain(KQUANTS.iter().map(|&t| (t, vec![1usize, 2, 3])));
        for (ty, lens) in cases {
            let act = int_dot::activation_type(ty);
            assert_eq!(kernel(ty).unwrap().act, act);
            for nb in lens {
                let n = nb * ty.block_elems();
                for rows in (1..=MAX_COLS).chain([9, 11]) {
                    let acts: Vec<Vec<u8>> =
                        (0..rows).map(|_| activations(&mut rng, act, n)).collect();
                    check(ty, &quantized_weights(&mut rng, ty, n), &acts, "quantized");
                    check(ty, &random_weights(&mut rng, ty, n), &acts, "random bytes");
                }
            }
        }
    }

    /// Activation rows of all -128 / all 127 (not reachable by the quantizers, with consistent
    /// sums) against weights of constant bytes: no intermediate may saturate or overflow.
    #[test]
    fn extreme_codes_are_exact() {
        if !have_cpu() {
            return;
        }
        let one = 0x3C00u16.to_le_bytes();
        let minus_one = 0xBC00u16.to_le_bytes();
        for ty in LEGACY.into_iter().chain(KQUANTS) {
            let act = int_dot::activation_type(ty);
            let nb = if ty.block_elems() == 32 { 9 } else { 2 };
            let n = nb * ty.block_elems();
            let act_row = |q: i8| {
                let mut a = vec![0u8; bytes(act, n)];
                for b in a.chunks_mut(act.block_bytes()) {
                    match act {
                        GgmlType::Q8_K => {
                            b[0..4].copy_from_slice(&1.0f32.to_le_bytes());
                            b[Q8K_QS..Q8K_BSUMS].fill(q as u8);
                            for s in b[Q8K_BSUMS..].chunks_mut(2) {
                                s.copy_from_slice(&(16 * q as i16).to_le_bytes());
                            }
                        }
                        GgmlType::Q8_1 => {
                            b[0..2].copy_from_slice(&one);
                            // s = d · Σq = 32q, exact in f16.
                            let s = half_bits(32.0 * q as f32);
                            b[2..4].copy_from_slice(&s.to_le_bytes());
                            b[4..].fill(q as u8);
                        }
                        _ => {
                            b[0..2].copy_from_slice(&one);
                            b[2..].fill(q as u8);
                        }
                    }
                }
                a
            };
            let acts = vec![act_row(-128), act_row(127), act_row(-128)];
            for fill in [0xFFu8, 0x00, 0x80, 0x7F] {
                let mut w = vec![fill; bytes(ty, n)];
                let (d, dmin) = scale_fields(ty);
                for b in w.chunks_mut(ty.block_bytes()) {
                    b[d..d + 2].copy_from_slice(&one);
                    if let Some(m) = dmin {
                        b[m..m + 2].copy_from_slice(&minus_one);
                    }
                }
                check(ty, &w, &acts, &format!("bytes {fill:#04x}"));
            }
        }
    }

    /// f16 bits of a value exactly representable in f16 (integers up to 2048 in magnitude,
    /// and multiples of 32 up to 65504 here).
    fn half_bits(v: f32) -> u16 {
        // SAFETY: F16C is checked by `have_cpu` before any caller runs.
        unsafe {
            _mm_extract_epi16::<0>(_mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm_set1_ps(v))) as u16
        }
    }

    #[test]
    fn empty_rows_give_zero() {
        if !have_cpu() {
            return;
        }
        for ty in LEGACY.into_iter().chain(KQUANTS) {
            let k = kernel(ty).unwrap();
            let mut out = [f32::NAN; 3];
            // SAFETY: the CPU was checked; zero blocks everywhere.
            unsafe { (k.row_dot)(&[], 0, 1, &[&[], &[], &[]], Out::slice(&mut out, 1)) };
            assert_eq!(out, [0.0; 3], "{ty:?}");
        }
    }

    #[test]
    fn table_covers_the_quantized_types() {
        for ty in LEGACY.into_iter().chain(KQUANTS) {
            let k = kernel(ty).unwrap();
            assert_eq!(
                (k.weight, k.act, k.isa),
                (ty, int_dot::activation_type(ty), Isa::Avx512)
            );
        }
        for ty in [GgmlType::F32, GgmlType::F16, GgmlType::Q8_1, GgmlType::Q8_K] {
            assert!(kernel(ty).is_none(), "{ty:?}");
        }
    }
}
