//! AVX2 + FMA k-quant kernels: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K and IQ4_XS weight rows against
//! Q8_K activation rows, and the Q8_K activation quantizer.
//!
//! Every row dot walks the weight row's 256-element super-blocks once. For each super-block it
//! unpacks the quants of one 32-element group into a register of unsigned bytes (low nibbles,
//! high bits, 2-bit fields — whatever the layout needs) together with a register of i16 scales
//! for that group, then multiplies that pair against the same group of every activation row:
//! `maddubs` (u8 weight × i8 activation → i16 pairs), `madd` with the scales (→ i32), added into
//! one i32 accumulator per activation row. At the end of the super-block each row's i32 lanes
//! are converted and FMA'd with `d_w·d_a`; min terms (Q2_K, Q4_K, Q5_K) and the offsets of the
//! signed formats (Q3_K's −4, Q6_K's −32) are taken from the activation's i16 `bsums` in one
//! `madd` per row, so weights stay unsigned and no per-element correction is needed. (The
//! scalar reference reads no bsums for Q3_K/Q6_K; the two agree because Q8_K's bsums are by
//! definition the sums of its quants, as every Q8_K quantizer writes them.)
//!
//! Activation rows are a const generic (1..=8) so accumulators live in registers; the eight
//! i32 row accumulators, the group's weights and scales and a temporary fit in 16 ymm
//! registers. The integer sums are exactly those of `edgelm_quant::int_dot`; only the f32
//! accumulation order differs (per lane across super-blocks, horizontal sum at the end).

use super::{f32_at, hsum, hsum_i32, u32_at};
use crate::qdot::{row_tiles, Out, QuantKernel, RowDotFn};
use crate::Isa;
use edgelm_quant::k_quants::q8_k::{BLOCK_BYTES as Q8K_BYTES, BSUMS as Q8K_BSUMS, QS as Q8K_QS};
use edgelm_quant::GgmlType;
use std::arch::x86_64::*;

/// Elements per super-block.
const QK: usize = 256;

/// The AVX2 kernel for k-quant weight type `ty`, if this module has one.
pub fn kernel(ty: GgmlType) -> Option<QuantKernel> {
    let row_dot: RowDotFn = match ty {
        GgmlType::Q2_K => row_dot_q2_k,
        GgmlType::Q3_K => row_dot_q3_k,
        GgmlType::Q4_K => row_dot_q4_k,
        GgmlType::Q5_K => row_dot_q5_k,
        GgmlType::Q6_K => row_dot_q6_k,
        GgmlType::IQ4_XS => row_dot_iq4_xs,
        _ => return None,
    };
    Some(QuantKernel {
        weight: ty,
        act: GgmlType::Q8_K,
        isa: Isa::Avx2,
        row_dot,
        quantize: quantize_row_q8_k,
        interleaved: None,
        prefill: super::avx2_kpanels::prefill_for::<{ super::avx2_interleaved::P_MADDUBS }>(ty),
    })
}

// ---------------------------------------------------------------------------------------------
// Shared helpers

/// IEEE half to f32, exact for every value (NaN payloads aside). Scalar: only two per
/// super-block, so a vector conversion would not pay for its lane moves.
#[inline(always)]
fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h as u32) & 0x8000) << 16;
    let exp = ((h >> 10) & 0x1F) as u32;
    let man = (h & 0x3FF) as u32;
    let mag = if exp == 0 {
        // Zero or subnormal: man · 2^-24, exact in f32.
        (man as f32 * (1.0 / 16_777_216.0)).to_bits()
    } else if exp == 31 {
        0x7F80_0000 | (man << 13)
    } else {
        ((exp + 112) << 23) | (man << 13)
    };
    f32::from_bits(sign | mag)
}

/// The little-endian f16 at `p`.
///
/// # Safety
/// `p` is valid for 2 bytes.
#[inline(always)]
unsafe fn f16_at(p: *const u8) -> f32 {
    f16_to_f32(u16::from_le_bytes(p.cast::<[u8; 2]>().read_unaligned()))
}

/// # Safety
/// `p` is valid for 32 bytes; the CPU has AVX2.
#[inline(always)]
unsafe fn load(p: *const u8) -> __m256i {
    _mm256_loadu_si256(p.cast())
}

/// Pointers to the first `N` activation rows, after checking each holds `nb` Q8_K blocks (once
/// per call, so the loops below need no bounds checks).
#[inline(always)]
fn act_ptrs<const N: usize>(acts: &[&[u8]], nb: usize) -> [*const u8; N] {
    assert!(
        acts.len() >= N,
        "fewer activation rows than the kernel width"
    );
    core::array::from_fn(|j| {
        assert!(acts[j].len() >= nb * Q8K_BYTES, "activation row too short");
        acts[j].as_ptr()
    })
}

/// Shuffle masks that, applied to a vector holding 16 scale bytes in both 128-bit lanes and
/// followed by `srai_epi16(8)`, give 8 copies of the sign-extended byte `lo` in the low lane and
/// of byte `hi` in the high lane (each i16 is the byte duplicated into both halves).
const fn lane_mask(lo: u8, hi: u8) -> [u8; 32] {
    let mut m = [0u8; 32];
    let mut i = 0;
    while i < 32 {
        m[i] = if i < 16 { lo } else { hi };
        i += 1;
    }
    m
}

/// Group `g` of a 16-element-sub-block format: scale `2g` for the low lane, `2g + 1` for the high.
static PAIR_MASKS: [[u8; 32]; 8] = {
    let mut t = [[0u8; 32]; 8];
    let mut g = 0;
    while g < 8 {
        t[g] = lane_mask(2 * g as u8, 2 * g as u8 + 1);
        g += 1;
    }
    t
};

/// Sub-block `k` of a 32-element-sub-block format: scale `k` in both lanes.
static SAME_MASKS: [[u8; 32]; 8] = {
    let mut t = [[0u8; 32]; 8];
    let mut k = 0;
    while k < 8 {
        t[k] = lane_mask(k as u8, k as u8);
        k += 1;
    }
    t
};

/// For Q4_K/Q5_K's `[sc0..sc7, mn0..mn7]` bytes (in both lanes): i16 lane `i` = `mn[i / 2]`, so
/// one `madd` with the 16 bsums gives `mn_k · (bsum_2k + bsum_2k+1)` per i32 lane.
static MIN_DUP: [u8; 32] = {
    let mut m = [0x80u8; 32];
    let mut i = 0;
    while i < 16 {
        // Lane-local byte index; each lane holds all 16 bytes.
        m[2 * i] = 8 + (i / 2) as u8;
        i += 1;
    }
    m
};

/// The i16 scale vector for mask table entry `mask` over `bytes` (16 scale bytes in both lanes).
///
/// # Safety
/// The CPU has AVX2.
#[inline(always)]
unsafe fn scale16(bytes: __m256i, mask: &[u8; 32]) -> __m256i {
    _mm256_srai_epi16::<8>(_mm256_shuffle_epi8(bytes, load(mask.as_ptr())))
}

/// `sumi += madd(maddubs(w, act), scales)` for one 32-element group of every activation row.
///
/// # Safety
/// Every `ys[j] + off` is valid for 32 bytes; the CPU has AVX2.
#[inline(always)]
unsafe fn group<const N: usize>(
    sumi: &mut [__m256i; N],
    ys: &[*const u8; N],
    off: usize,
    w: __m256i,
    scales: __m256i,
) {
    for j in 0..N {
        let p = _mm256_maddubs_epi16(w, load(ys[j].add(off)));
        sumi[j] = _mm256_add_epi32(sumi[j], _mm256_madd_epi16(p, scales));
    }
}

/// One [`RowDotFn`] per type: for each weight row of the block, splits `acts` into groups of at
/// most [`MAX_COLS`] rows and dispatches each to the const-generic kernel of its width.
macro_rules! row_dot_entry {
    ($name:ident, $kernel:ident) => {
        /// # Safety
        /// The CPU has AVX2 and FMA; lengths are checked (panics if inconsistent).
        unsafe fn $name(w: &[u8], row_bytes: usize, n_rows: usize, acts: &[&[u8]], out: Out) {
            assert!(
                n_rows * row_bytes <= w.len(),
                "weights shorter than the block"
            );
            row_tiles!(n_rows, acts, out, |r, a, o, N| {
                $kernel::<N>(&w[r * row_bytes..(r + 1) * row_bytes], a, &mut o)
            });
        }
    };
}

row_dot_entry!(row_dot_q2_k, q2_k_rows);
row_dot_entry!(row_dot_q3_k, q3_k_rows);
row_dot_entry!(row_dot_q4_k, q4_k_rows);
row_dot_entry!(row_dot_q5_k, q5_k_rows);
row_dot_entry!(row_dot_q6_k, q6_k_rows);
row_dot_entry!(row_dot_iq4_xs, iq4_xs_rows);

// ---------------------------------------------------------------------------------------------
// IQ4_XS

/// IQ4_XS (136 bytes: f16 d, u16 scales_h, scales_l[4], qs[128]). Sub-block `ib`'s 16 bytes of
/// `qs` hold its 32 nibbles as an IQ4_NL block does; one shuffle maps them onto the grid. The
/// levels are signed, so the sign trick (`maddubs(|w|, y·sign w)`, exact for activations in
/// [−127, 127], all the Q8_K quantizer writes) replaces the unsigned weights of the others; the
/// sub-block's 6-bit code − 32 multiplies the pairs in the `madd`.
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
unsafe fn iq4_xs_rows<const N: usize>(w: &[u8], acts: &[&[u8]], out: &mut [f32]) {
    const BW: usize = 136;
    let nb = w.len() / BW;
    let ys = act_ptrs::<N>(acts, nb);
    let out: &mut [f32; N] = (&mut out[..N]).try_into().unwrap();
    let grid =
        _mm256_broadcastsi128_si256(_mm_loadu_si128(edgelm_quant::iq4_nl::GRID.as_ptr().cast()));
    let m4 = _mm256_set1_epi8(0x0F);
    let mut acc = [_mm256_setzero_ps(); N];
    for i in 0..nb {
        // SAFETY: block i of the weight row is in bounds (i < nb = w.len() / BW).
        let x = w.as_ptr().add(i * BW);
        let yb: [*const u8; N] = core::array::from_fn(|j| ys[j].add(i * Q8K_BYTES));
        let h = u16::from_le_bytes(x.add(2).cast::<[u8; 2]>().read_unaligned()) as i32;
        let mut sumi = [_mm256_setzero_si256(); N];
        for ib in 0..8 {
            let lo = ((*x.add(4 + ib / 2) >> (4 * (ib % 2))) & 0x0F) as i32;
            let code = lo | (((h >> (2 * ib)) & 3) << 4);
            let scale = _mm256_set1_epi16((code - 32) as i16);
            // SAFETY: bytes 8 + 16ib .. 24 + 16ib of the block; the activation group lies
            // inside the checked Q8_K block.
            let q = _mm_loadu_si128(x.add(8 + 16 * ib).cast());
            let both =
                _mm256_inserti128_si256::<1>(_mm256_castsi128_si256(q), _mm_srli_epi16::<4>(q));
            let wv = _mm256_shuffle_epi8(grid, _mm256_and_si256(both, m4));
            let aw = _mm256_sign_epi8(wv, wv);
            for j in 0..N {
                let y = load(yb[j].add(Q8K_QS + 32 * ib));
                let p = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(y, wv));
                sumi[j] = _mm256_add_epi32(sumi[j], _mm256_madd_epi16(p, scale));
            }
        }
        let d = f16_at(x);
        for j in 0..N {
            let da = _mm256_set1_ps(d * f32_at(yb[j]));
            acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sumi[j]), da, acc[j]);
        }
    }
    for j in 0..N {
        out[j] = hsum(acc[j]);
    }
}

// ---------------------------------------------------------------------------------------------
// Q4_K / Q5_K

/// The 12-byte 6-bit (scale, min) field unpacked to bytes `[sc0..sc7, mn0..mn7]`, in both
/// 128-bit lanes. Done on three u32 words: pairs 0..4 are the low 6 bits of bytes 0..8; pairs
/// 4..8 take their low nibbles from bytes 8..12 and top 2 bits from the spare bits of bytes 0..8.
///
/// # Safety
/// `p` is valid for 12 bytes; the CPU has AVX2.
#[inline(always)]
unsafe fn k4_scales_mins(p: *const u8) -> __m256i {
    const LOW6: u32 = 0x3F3F_3F3F;
    const LOW4: u32 = 0x0F0F_0F0F;
    const LOW2: u32 = 0x0303_0303;
    let (a0, a1, a2) = (u32_at(p), u32_at(p.add(4)), u32_at(p.add(8)));
    let sc_lo = a0 & LOW6;
    let sc_hi = (a2 & LOW4) | (((a0 >> 6) & LOW2) << 4);
    let mn_lo = a1 & LOW6;
    let mn_hi = ((a2 >> 4) & LOW4) | (((a1 >> 6) & LOW2) << 4);
    _mm256_broadcastsi128_si256(_mm_setr_epi32(
        sc_lo as i32,
        sc_hi as i32,
        mn_lo as i32,
        mn_hi as i32,
    ))
}

/// `acc + s·scale`, fused: each super-block of Q4_K, Q5_K and Q6_K enters a row's total as its
/// exact integer sums times the f32 product of the two `d`s, in this order and rounding —
/// exactly as the decode-once prompt path (`avx2_kpanels`) does, so a token's result does not
/// depend on which of the two its batch takes.
#[inline(always)]
fn add_block(acc: f32, s: i32, scale: f32) -> f32 {
    (s as f32).mul_add(scale, acc)
}

/// Q4_K (144 bytes: f16 d, f16 dmin, scales[12], qs[128]). Each 32 bytes of `qs` hold two
/// 32-element sub-blocks, low nibbles then high nibbles, so one load gives two weight
/// registers with an `and` and a shift. Mins: `madd` of the duplicated mins with the bsums.
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
unsafe fn q4_k_rows<const N: usize>(w: &[u8], acts: &[&[u8]], out: &mut [f32]) {
    const BW: usize = 144;
    let nb = w.len() / BW;
    let ys = act_ptrs::<N>(acts, nb);
    let out: &mut [f32; N] = (&mut out[..N]).try_into().unwrap();
    let m4 = _mm256_set1_epi8(0x0F);
    let mut acc = [0f32; N];
    for i in 0..nb {
        // SAFETY: block i of the weight row is in bounds (i < nb = w.len() / BW).
        let x = w.as_ptr().add(i * BW);
        let yb: [*const u8; N] = core::array::from_fn(|j| ys[j].add(i * Q8K_BYTES));
        let yq: [*const u8; N] = core::array::from_fn(|j| yb[j].add(Q8K_QS));
        let (d, dmin) = (f16_at(x), f16_at(x.add(2)));
        let sm = k4_scales_mins(x.add(4));
        let mut sumi = [_mm256_setzero_si256(); N];
        for c in 0..4 {
            // SAFETY: bytes 16 + 32c .. 48 + 32c of a 144-byte block; activation offsets stay
            // below 4 + 256 of a checked Q8_K block.
            let q = load(x.add(16 + 32 * c));
            let lo = _mm256_and_si256(q, m4);
            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q), m4);
            group(&mut sumi, &yq, 64 * c, lo, scale16(sm, &SAME_MASKS[2 * c]));
            group(
                &mut sumi,
                &yq,
                64 * c + 32,
                hi,
                scale16(sm, &SAME_MASKS[2 * c + 1]),
            );
        }
        let mins = _mm256_shuffle_epi8(sm, load(MIN_DUP.as_ptr()));
        for j in 0..N {
            let da = f32_at(yb[j]);
            let msum = _mm256_madd_epi16(mins, load(yb[j].add(Q8K_BSUMS)));
            acc[j] = add_block(acc[j], hsum_i32(sumi[j]), d * da);
            acc[j] = add_block(acc[j], -hsum_i32(msum), dmin * da);
        }
    }
    *out = acc;
}

/// Q5_K (176 bytes: f16 d, f16 dmin, scales[12], qh[32], qs[128]). Low nibbles as Q4_K; the
/// fifth bit of sub-block `k` is bit `k` of `qh`, so one `qh` register shifted right by 2 per
/// 64 elements supplies bits 0 and 1 for the two sub-blocks of each `qs` load.
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
unsafe fn q5_k_rows<const N: usize>(w: &[u8], acts: &[&[u8]], out: &mut [f32]) {
    const BW: usize = 176;
    let nb = w.len() / BW;
    let ys = act_ptrs::<N>(acts, nb);
    let out: &mut [f32; N] = (&mut out[..N]).try_into().unwrap();
    let m4 = _mm256_set1_epi8(0x0F);
    let bit0 = _mm256_set1_epi8(0x01);
    let bit1 = _mm256_set1_epi8(0x02);
    let mut acc = [0f32; N];
    for i in 0..nb {
        // SAFETY: block i of the weight row is in bounds (i < nb = w.len() / BW).
        let x = w.as_ptr().add(i * BW);
        let yb: [*const u8; N] = core::array::from_fn(|j| ys[j].add(i * Q8K_BYTES));
        let yq: [*const u8; N] = core::array::from_fn(|j| yb[j].add(Q8K_QS));
        let (d, dmin) = (f16_at(x), f16_at(x.add(2)));
        let sm = k4_scales_mins(x.add(4));
        // SAFETY: qh is bytes 16..48, qs 48..176 of the block.
        let mut hb = load(x.add(16));
        let mut sumi = [_mm256_setzero_si256(); N];
        for c in 0..4 {
            let q = load(x.add(48 + 32 * c));
            // Bits 0/1 of each hb byte are this chunk's fifth bits; the srli_epi16 below leaks
            // the high byte's bits only into the top of the low byte, never into bits 0/1.
            let h_lo = _mm256_slli_epi16::<4>(_mm256_and_si256(hb, bit0));
            let h_hi = _mm256_slli_epi16::<3>(_mm256_and_si256(hb, bit1));
            let lo = _mm256_or_si256(_mm256_and_si256(q, m4), h_lo);
            let hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(q), m4), h_hi);
            hb = _mm256_srli_epi16::<2>(hb);
            group(&mut sumi, &yq, 64 * c, lo, scale16(sm, &SAME_MASKS[2 * c]));
            group(
                &mut sumi,
                &yq,
                64 * c + 32,
                hi,
                scale16(sm, &SAME_MASKS[2 * c + 1]),
            );
        }
        let mins = _mm256_shuffle_epi8(sm, load(MIN_DUP.as_ptr()));
        for j in 0..N {
            let da = f32_at(yb[j]);
            let msum = _mm256_madd_epi16(mins, load(yb[j].add(Q8K_BSUMS)));
            acc[j] = add_block(acc[j], hsum_i32(sumi[j]), d * da);
            acc[j] = add_block(acc[j], -hsum_i32(msum), dmin * da);
        }
    }
    *out = acc;
}

// ---------------------------------------------------------------------------------------------
// Q6_K, Q3_K, Q2_K (16-element sub-blocks)

/// Q6_K (210 bytes: ql[128], qh[64], i8 scales[16], f16 d). Per 128-element half: two `ql`
/// registers give the low nibbles of four 32-element groups (low then high nibbles) and one
/// `qh` register their top 2 bits (bit pairs 0..3), masked into bits 4-5. Weights stay
/// unsigned (0..63); the −32 offset is `32 · Σ_j sc_j · bsum_j`, one `madd` per row and block.
/// The low/high 128-bit lanes of a group are different sub-blocks, hence per-lane scales.
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
unsafe fn q6_k_rows<const N: usize>(w: &[u8], acts: &[&[u8]], out: &mut [f32]) {
    const BW: usize = 210;
    let nb = w.len() / BW;
    let ys = act_ptrs::<N>(acts, nb);
    let out: &mut [f32; N] = (&mut out[..N]).try_into().unwrap();
    let m4 = _mm256_set1_epi8(0x0F);
    let m2 = _mm256_set1_epi8(0x30);
    let mut acc = [0f32; N];
    for i in 0..nb {
        // SAFETY: block i of the weight row is in bounds (i < nb = w.len() / BW).
        let x = w.as_ptr().add(i * BW);
        let yb: [*const u8; N] = core::array::from_fn(|j| ys[j].add(i * Q8K_BYTES));
        let yq: [*const u8; N] = core::array::from_fn(|j| yb[j].add(Q8K_QS));
        let d = f16_at(x.add(208));
        // SAFETY: scales are bytes 192..208.
        let sc = _mm_loadu_si128(x.add(192).cast());
        let sc_b = _mm256_broadcastsi128_si256(sc);
        let mut sumi = [_mm256_setzero_si256(); N];
        for t in 0..4 {
            // Half h = t / 2; `pair` 0 covers quarters 0 and 2 (low/high nibbles of ql bytes
            // 64h..64h+32, qh bit pairs 0 and 2), `pair` 1 quarters 1 and 3 (ql bytes
            // 64h+32..64h+64, qh bit pairs 1 and 3: qh pre-shifted right by 2). Two groups per
            // iteration, like Q4_K, keeps 8 row accumulators in registers.
            let (h, pair) = (t / 2, t % 2);
            // SAFETY: ql bytes 32t..32t+32 (< 128) and qh bytes 128+32h..160+32h (< 192).
            let ql = load(x.add(32 * t));
            let qh = _mm256_srl_epi16(
                load(x.add(128 + 32 * h)),
                _mm_cvtsi32_si128(2 * pair as i32),
            );
            let lo = _mm256_or_si256(
                _mm256_and_si256(ql, m4),
                _mm256_and_si256(_mm256_slli_epi16::<4>(qh), m2),
            );
            let hi = _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16::<4>(ql), m4),
                _mm256_and_si256(qh, m2),
            );
            let g = 4 * h + pair;
            group(&mut sumi, &yq, 32 * g, lo, scale16(sc_b, &PAIR_MASKS[g]));
            group(
                &mut sumi,
                &yq,
                32 * g + 64,
                hi,
                scale16(sc_b, &PAIR_MASKS[g + 2]),
            );
        }
        let sc16 = _mm256_cvtepi8_epi16(sc);
        for j in 0..N {
            let da = f32_at(yb[j]);
            let off = _mm256_madd_epi16(sc16, load(yb[j].add(Q8K_BSUMS)));
            let isum = _mm256_sub_epi32(sumi[j], _mm256_slli_epi32::<5>(off));
            acc[j] = add_block(acc[j], hsum_i32(isum), d * da);
        }
    }
    *out = acc;
}

/// Q3_K's 16 6-bit scale codes minus 32, as i8: low nibbles from bytes 0..8 (low then high
/// halves), top 2 bits from the bit pairs of bytes 8..12, assembled on u32 words.
///
/// # Safety
/// `p` is valid for 12 bytes; the CPU has AVX2.
#[inline(always)]
unsafe fn q3_scales(p: *const u8) -> __m128i {
    const LOW4: u32 = 0x0F0F_0F0F;
    const LOW2: u32 = 0x0303_0303;
    let (a0, a1, a2) = (u32_at(p), u32_at(p.add(4)), u32_at(p.add(8)));
    let s0 = (a0 & LOW4) | ((a2 & LOW2) << 4);
    let s1 = (a1 & LOW4) | (((a2 >> 2) & LOW2) << 4);
    let s2 = ((a0 >> 4) & LOW4) | (((a2 >> 4) & LOW2) << 4);
    let s3 = ((a1 >> 4) & LOW4) | (((a2 >> 6) & LOW2) << 4);
    _mm_sub_epi8(
        _mm_setr_epi32(s0 as i32, s1 as i32, s2 as i32, s3 as i32),
        _mm_set1_epi8(32),
    )
}

/// Q3_K (110 bytes: hmask[32], qs[64], scales[12], f16 d). Group `g` of half `h` takes bit
/// pair `g % 4` of the half's `qs` register and bit `g` of the `hmask` register; two groups
/// (bit pairs p and p + 2) per shifted load. `lo | hbit << 2` is `q + 4` in 0..8 (unsigned for
/// `maddubs`), and the +4 comes back out as `4 · Σ_j sc_j · bsum_j`.
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
unsafe fn q3_k_rows<const N: usize>(w: &[u8], acts: &[&[u8]], out: &mut [f32]) {
    const BW: usize = 110;
    let nb = w.len() / BW;
    let ys = act_ptrs::<N>(acts, nb);
    let out: &mut [f32; N] = (&mut out[..N]).try_into().unwrap();
    let m3 = _mm256_set1_epi8(0x03);
    let bit2 = _mm256_set1_epi8(0x04);
    let mut acc = [_mm256_setzero_ps(); N];
    for i in 0..nb {
        // SAFETY: block i of the weight row is in bounds (i < nb = w.len() / BW).
        let x = w.as_ptr().add(i * BW);
        let yb: [*const u8; N] = core::array::from_fn(|j| ys[j].add(i * Q8K_BYTES));
        let yq: [*const u8; N] = core::array::from_fn(|j| yb[j].add(Q8K_QS));
        let d = f16_at(x.add(108));
        let sc = q3_scales(x.add(96));
        let sc_b = _mm256_broadcastsi128_si256(sc);
        // SAFETY: hmask is bytes 0..32, qs 32..96.
        let hm = load(x);
        let mut sumi = [_mm256_setzero_si256(); N];
        for t in 0..4 {
            // Half h = t / 2; groups g = 4h + pair and g + 2 use bit pairs `pair` and
            // `pair + 2` of the half's qs bytes and bits g, g + 2 of hmask. Shifting right by
            // a per-iteration count puts them at bits 0-1 / 4-5 and 0 / 2 (srl_epi16 leaks the
            // high byte only into the low byte's top bits, which the masks drop).
            let (h, pair) = (t / 2, t % 2);
            let g = 4 * h + pair;
            let qs = _mm256_srl_epi16(load(x.add(32 + 32 * h)), _mm_cvtsi32_si128(2 * pair as i32));
            let hb = _mm256_srl_epi16(hm, _mm_cvtsi32_si128(g as i32));
            let lo = _mm256_or_si256(
                _mm256_and_si256(qs, m3),
                _mm256_and_si256(_mm256_slli_epi16::<2>(hb), bit2),
            );
            let hi = _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16::<4>(qs), m3),
                _mm256_and_si256(hb, bit2),
            );
            group(&mut sumi, &yq, 32 * g, lo, scale16(sc_b, &PAIR_MASKS[g]));
            group(
                &mut sumi,
                &yq,
                32 * g + 64,
                hi,
                scale16(sc_b, &PAIR_MASKS[g + 2]),
            );
        }
        let sc16 = _mm256_cvtepi8_epi16(sc);
        for j in 0..N {
            let da = f32_at(yb[j]);
            let off = _mm256_madd_epi16(sc16, load(yb[j].add(Q8K_BSUMS)));
            let isum = _mm256_sub_epi32(sumi[j], _mm256_slli_epi32::<2>(off));
            acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_set1_ps(d * da), acc[j]);
        }
    }
    for j in 0..N {
        out[j] = hsum(acc[j]);
    }
}

/// Q2_K (84 bytes: scales[16] (low nibble scale, high nibble min), qs[64], f16 d, f16 dmin).
/// Each half's 32 `qs` bytes hold four 32-element groups in successive bit pairs: a load
/// shifted right by 0 or 2 gives two groups (`and 3`, and shift by 4 then `and 3`). Mins:
/// `madd` of the 16 mins with the 16 bsums.
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
unsafe fn q2_k_rows<const N: usize>(w: &[u8], acts: &[&[u8]], out: &mut [f32]) {
    const BW: usize = 84;
    let nb = w.len() / BW;
    let ys = act_ptrs::<N>(acts, nb);
    let out: &mut [f32; N] = (&mut out[..N]).try_into().unwrap();
    let m3 = _mm256_set1_epi8(0x03);
    let mut acc = [_mm256_setzero_ps(); N];
    for i in 0..nb {
        // SAFETY: block i of the weight row is in bounds (i < nb = w.len() / BW).
        let x = w.as_ptr().add(i * BW);
        let yb: [*const u8; N] = core::array::from_fn(|j| ys[j].add(i * Q8K_BYTES));
        let yq: [*const u8; N] = core::array::from_fn(|j| yb[j].add(Q8K_QS));
        let (d, dmin) = (f16_at(x.add(80)), f16_at(x.add(82)));
        // SAFETY: scales are bytes 0..16, qs 16..80.
        let raw = _mm_loadu_si128(x.cast());
        let nib = _mm_set1_epi8(0x0F);
        let sc_b = _mm256_broadcastsi128_si256(_mm_and_si128(raw, nib));
        let mut sumi = [_mm256_setzero_si256(); N];
        for t in 0..4 {
            // Half h = t / 2; groups g = 4h + pair and g + 2 are bit pairs `pair` and
            // `pair + 2` of the half's 32 qs bytes.
            let (h, pair) = (t / 2, t % 2);
            let g = 4 * h + pair;
            let qs = _mm256_srl_epi16(load(x.add(16 + 32 * h)), _mm_cvtsi32_si128(2 * pair as i32));
            let lo = _mm256_and_si256(qs, m3);
            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(qs), m3);
            group(&mut sumi, &yq, 32 * g, lo, scale16(sc_b, &PAIR_MASKS[g]));
            group(
                &mut sumi,
                &yq,
                32 * g + 64,
                hi,
                scale16(sc_b, &PAIR_MASKS[g + 2]),
            );
        }
        let mins = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16::<4>(raw), nib));
        for j in 0..N {
            let da = f32_at(yb[j]);
            let msum = _mm256_madd_epi16(mins, load(yb[j].add(Q8K_BSUMS)));
            acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sumi[j]), _mm256_set1_ps(d * da), acc[j]);
            acc[j] = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(msum), _mm256_set1_ps(dmin * da), acc[j]);
        }
    }
    for j in 0..N {
        out[j] = hsum(acc[j]);
    }
}

// ---------------------------------------------------------------------------------------------
// Q8_K activation quantizer

/// Quantizes `x` (whole 256-element blocks) to Q8_K, byte-identical to
/// `edgelm_quant::quantize_row(GgmlType::Q8_K, ..)`. Blocks the vector path cannot reproduce
/// exactly (NaN inputs, an infinite maximum, or a maximum so small `-127 / max` overflows) go
/// through that scalar reference.
///
/// # Safety
/// The CPU has AVX2 and FMA; `out` holds `x.len() / 256` blocks (panics otherwise).
unsafe fn quantize_row_q8_k(x: &[f32], out: &mut [u8]) {
    let nb = x.len() / QK;
    assert!(out.len() >= nb * Q8K_BYTES, "Q8_K output row too short");
    for i in 0..nb {
        let src: &[f32; QK] = x[i * QK..(i + 1) * QK].try_into().unwrap();
        let dst: &mut [u8; Q8K_BYTES] = (&mut out[i * Q8K_BYTES..(i + 1) * Q8K_BYTES])
            .try_into()
            .unwrap();
        if !q8_k_block(src, dst) {
            // The reference accepts exactly these lengths, so it cannot fail here.
            let _ = edgelm_quant::quantize_row(GgmlType::Q8_K, src, dst);
        }
    }
}

/// One Q8_K block: max |x| per lane (NaN lanes flagged), first index reaching it, then
/// `round_ties_even(iscale · x)` in f32 exactly as the scalar computes it, packed to i8 with
/// saturating packs (the values are within ±127) and a fixing lane permute. The bsums come from
/// the packed bytes: `maddubs` by 1 and `madd` by 1 give 4-byte sums, two `hadd` rounds give
/// 16-byte sums in a lane-interleaved order that one unpack restores. Returns false, writing
/// nothing meaningful, for blocks left to the scalar reference.
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
unsafe fn q8_k_block(x: &[f32; QK], out: &mut [u8; Q8K_BYTES]) -> bool {
    let xp = x.as_ptr();
    let op = out.as_mut_ptr();
    let sign = _mm256_set1_ps(-0.0);
    let mut vmax = _mm256_setzero_ps();
    let mut nan = _mm256_setzero_ps();
    for k in 0..QK / 8 {
        // SAFETY: 8k + 8 <= 256.
        let v = _mm256_loadu_ps(xp.add(8 * k));
        // maxps returns its second operand when either is NaN, so NaN lanes never win.
        vmax = _mm256_max_ps(_mm256_andnot_ps(sign, v), vmax);
        nan = _mm256_or_ps(nan, _mm256_cmp_ps::<_CMP_UNORD_Q>(v, v));
    }
    if _mm256_movemask_ps(nan) != 0 {
        return false;
    }
    let m = _mm_max_ps(
        _mm256_castps256_ps128(vmax),
        _mm256_extractf128_ps::<1>(vmax),
    );
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let m = _mm_max_ss(m, _mm_movehdup_ps(m));
    let amax = _mm_cvtss_f32(m);
    if amax == 0.0 {
        out.fill(0);
        return true;
    }
    // The scalar keeps the first element of largest magnitude (strict `>` while scanning).
    let vam = _mm256_set1_ps(amax);
    let mut idx = 0;
    for k in 0..QK / 8 {
        let v = _mm256_andnot_ps(sign, _mm256_loadu_ps(xp.add(8 * k)));
        let hit = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_EQ_OQ>(v, vam));
        if hit != 0 {
            idx = 8 * k + hit.trailing_zeros() as usize;
            break;
        }
    }
    let iscale = -127.0 / x[idx];
    if !amax.is_finite() || !iscale.is_finite() {
        return false;
    }
    // From here every |iscale · x| <= 127 (to within rounding), so the conversions are exact.
    let vs = _mm256_set1_ps(iscale);
    let perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    let ones8 = _mm256_set1_epi8(1);
    let ones16 = _mm256_set1_epi16(1);
    let mut part = [_mm256_setzero_si256(); 8];
    for (g, part) in part.iter_mut().enumerate() {
        let q: [__m256i; 4] = core::array::from_fn(|t| {
            // SAFETY: 32g + 8t + 8 <= 256.
            let v = _mm256_mul_ps(vs, _mm256_loadu_ps(xp.add(32 * g + 8 * t)));
            let r = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v);
            _mm256_cvttps_epi32(r)
        });
        let p16a = _mm256_packs_epi32(q[0], q[1]);
        let p16b = _mm256_packs_epi32(q[2], q[3]);
        let p8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(p16a, p16b), perm);
        // SAFETY: bytes 4 + 32g .. 36 + 32g of the 292-byte block.
        _mm256_storeu_si256(op.add(Q8K_QS + 32 * g).cast(), p8);
        // i32 lanes 0..4: 4-byte sums of sub-block 2g; lanes 4..8: of sub-block 2g + 1.
        *part = _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, p8), ones16);
    }
    // Two hadd rounds: low lane [b0, b2, b4, b6], high lane [b1, b3, b5, b7] (and b8.. for t1).
    let t0 = _mm256_hadd_epi32(
        _mm256_hadd_epi32(part[0], part[1]),
        _mm256_hadd_epi32(part[2], part[3]),
    );
    let t1 = _mm256_hadd_epi32(
        _mm256_hadd_epi32(part[4], part[5]),
        _mm256_hadd_epi32(part[6], part[7]),
    );
    // Sums of 16 i8 fit in i16, so the pack does not saturate.
    let even_odd = _mm256_packs_epi32(t0, t1);
    let even = _mm256_castsi256_si128(even_odd);
    let odd = _mm256_extracti128_si256::<1>(even_odd);
    // SAFETY: bsums are bytes 260..292.
    _mm_storeu_si128(op.add(Q8K_BSUMS).cast(), _mm_unpacklo_epi16(even, odd));
    _mm_storeu_si128(op.add(Q8K_BSUMS + 16).cast(), _mm_unpackhi_epi16(even, odd));
    out[0..4].copy_from_slice(&(1.0 / iscale).to_le_bytes());
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qdot::MAX_COLS;
    use crate::test_rng::Rng;
    use edgelm_quant::{dequantize_row, int_dot, quantize_row};

    fn have_avx2() -> bool {
        let ok = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
        if !ok {
            println!("skipped: this CPU lacks AVX2/FMA");
        }
        ok
    }

    /// Bytes of `ty` for `n` elements (whole blocks).
    fn bytes(ty: GgmlType, n: usize) -> usize {
        n / ty.block_elems() * ty.block_bytes()
    }

    const TYPES: [GgmlType; 6] = [
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
        GgmlType::IQ4_XS,
    ];

    /// Offsets of (d, dmin) in a block; dmin is None for the symmetric formats.
    fn scale_fields(ty: GgmlType) -> (usize, Option<usize>) {
        match ty {
            GgmlType::Q2_K => (80, Some(82)),
            GgmlType::Q3_K => (108, None),
            GgmlType::Q4_K | GgmlType::Q5_K => (0, Some(2)),
            GgmlType::Q6_K => (208, None),
            GgmlType::IQ4_XS => (0, None),
            _ => unreachable!(),
        }
    }

    fn quantized_weights(ty: GgmlType, n: usize, rng: &mut Rng) -> Vec<u8> {
        let scale = 0.01 + rng.unit().abs();
        let x: Vec<f32> = (0..n).map(|_| rng.weight() * scale).collect();
        let mut w = vec![0u8; bytes(ty, n)];
        quantize_row(ty, &x, &mut w).unwrap();
        w
    }

    fn random_weights(ty: GgmlType, n: usize, rng: &mut Rng) -> Vec<u8> {
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

    fn activations(n: usize, rng: &mut Rng) -> Vec<u8> {
        let scale = 0.05 + 4.0 * rng.unit().abs();
        let x: Vec<f32> = (0..n).map(|_| rng.weight() * scale).collect();
        let mut a = vec![0u8; bytes(GgmlType::Q8_K, n)];
        quantize_row(GgmlType::Q8_K, &x, &mut a).unwrap();
        a
    }

    /// Σ_e (|w_e| + |min_e|)·|a_e| over dequantized values, `min_e = dmin·m` of the element's
    /// sub-block (read off by dequantizing with d = 0): bounds every partial sum either kernel
    /// forms, scale terms and min terms alike.
    fn magnitude(ty: GgmlType, w: &[u8], a: &[u8]) -> f64 {
        let n = a.len() / Q8K_BYTES * QK;
        let deq = |ty, b: &[u8]| {
            let mut v = vec![0f32; n];
            dequantize_row(ty, b, &mut v).unwrap();
            v
        };
        let (wf, af) = (deq(ty, w), deq(GgmlType::Q8_K, a));
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
            .map(|e| ((wf[e].abs() + mf[e].abs()) * af[e].abs()) as f64)
            .sum()
    }

    /// Runs the AVX2 row dot of `w` against all `acts` and checks every column against the
    /// scalar integer reference within `1e-5 · magnitude + 1e-6`.
    fn check(ty: GgmlType, w: &[u8], acts: &[Vec<u8>], what: &str) {
        let k = kernel(ty).unwrap();
        let refs: Vec<&[u8]> = acts.iter().map(|a| a.as_slice()).collect();
        let mut out = vec![f32::NAN; acts.len()];
        // SAFETY: AVX2/FMA checked by the caller; lengths match.
        unsafe { (k.row_dot)(w, w.len(), 1, &refs, Out::slice(&mut out, 1)) };
        for (j, a) in acts.iter().enumerate() {
            let want = int_dot::vec_dot(ty, w, a).unwrap();
            let tol = 1e-5 * magnitude(ty, w, a) + 1e-6;
            let err = (out[j] as f64 - want as f64).abs();
            assert!(
                out[j].is_finite() && err <= tol,
                "{ty:?} {what}: {} blocks, {} cols, col {j}: avx2 {} scalar {want} (err {err:e}, tol {tol:e})",
                a.len() / Q8K_BYTES,
                acts.len(),
                out[j],
            );
        }
    }

    /// Tolerance for every type: 1e-5 × Σ_e (|w_e| + |min_e|)·|a_e| + 1e-6 (see `magnitude`);
    /// the integer sums are exact, only the f32 accumulation order differs.
    #[test]
    fn row_dot_matches_scalar() {
        if !have_avx2() {
            return; // have_avx2 said why
        }
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for ty in TYPES {
            for nsb in 1..=3 {
                let n = nsb * QK;
                for cols in (1..=MAX_COLS).chain([11]) {
                    let acts: Vec<Vec<u8>> = (0..cols).map(|_| activations(n, &mut rng)).collect();
                    check(ty, &quantized_weights(ty, n, &mut rng), &acts, "quantized");
                    check(ty, &random_weights(ty, n, &mut rng), &acts, "random bytes");
                }
            }
        }
    }

    /// Largest weight codes against activations of all −128 / all 127 (consistent bsums, not
    /// reachable by the quantizer; −127 for IQ4_XS, whose sign trick needs it): no
    /// intermediate may saturate or overflow.
    #[test]
    fn extreme_codes_do_not_overflow() {
        if !have_avx2() {
            return; // have_avx2 said why
        }
        let act = |q: i8| {
            let mut a = vec![0u8; Q8K_BYTES * 2];
            for b in a.chunks_mut(Q8K_BYTES) {
                b[0..4].copy_from_slice(&1.0f32.to_le_bytes());
                b[Q8K_QS..Q8K_BSUMS].fill(q as u8);
                for s in b[Q8K_BSUMS..].chunks_mut(2) {
                    s.copy_from_slice(&(16 * q as i16).to_le_bytes());
                }
            }
            a
        };
        for ty in TYPES {
            let lowest = if ty == GgmlType::IQ4_XS { -127 } else { -128 };
            let acts = vec![act(lowest), act(127), act(lowest)];
            for fill in [0xFFu8, 0x00, 0x80, 0x7F] {
                let mut w = vec![fill; bytes(ty, 2 * QK)];
                let (d, dmin) = scale_fields(ty);
                for b in w.chunks_mut(ty.block_bytes()) {
                    b[d..d + 2].copy_from_slice(&0x3C00u16.to_le_bytes()); // 1.0
                    if let Some(m) = dmin {
                        b[m..m + 2].copy_from_slice(&0xBC00u16.to_le_bytes()); // -1.0
                    }
                }
                check(ty, &w, &acts, &format!("bytes {fill:#04x}"));
            }
        }
    }

    fn quantize_both(x: &[f32]) -> (Vec<u8>, Vec<u8>) {
        let len = bytes(GgmlType::Q8_K, x.len());
        let (mut want, mut got) = (vec![0u8; len], vec![0xAAu8; len]);
        quantize_row(GgmlType::Q8_K, x, &mut want).unwrap();
        // SAFETY: AVX2/FMA checked by the caller; `got` holds the blocks for x.
        unsafe { quantize_row_q8_k(x, &mut got) };
        (want, got)
    }

    #[test]
    fn quantizer_matches_scalar_bytes() {
        if !have_avx2() {
            return; // have_avx2 said why
        }
        let mut rng = Rng(0xD1B5_4A32_D192_ED03);
        for case in 0..400 {
            let nb = 1 + case % 3;
            let scale = match case % 8 {
                0 => 1e-30,
                1 => 1e30,
                2 => 3e38 / 8.0,
                3 => 1e-3,
                _ => 10f32.powi(rng.below(9) as i32 - 4),
            };
            let mut x: Vec<f32> = (0..nb * QK).map(|_| rng.weight() * scale).collect();
            let pick = rng.below(x.len() as u64) as usize;
            match case % 7 {
                0 => x[..QK].fill(0.0), // an all-zero block
                1 => x[pick] = -0.0,    // signed zero
                2 => {
                    // Ties: the maximum -127 makes iscale 1, so halves are exact.
                    x[..QK]
                        .iter_mut()
                        .enumerate()
                        .for_each(|(i, v)| *v = (i as f32 - 128.0) * 0.5);
                    x[3] = -127.0;
                }
                3 => {
                    // Equal magnitudes of both signs: the first one sets the sign of d.
                    let i = rng.below(QK as u64) as usize;
                    x[i] = 50.0 * scale;
                    x[(i + 7) % QK] = -50.0 * scale;
                }
                4 => x.iter_mut().step_by(3).for_each(|v| *v = 1e-42), // subnormals
                5 => x[pick] = f32::MAX,
                _ => {}
            }
            let (want, got) = quantize_both(&x);
            assert_eq!(got, want, "case {case}");
        }
        // Blocks left to the scalar path: NaN, infinities, a subnormal maximum.
        for special in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1e-45, -3e-39] {
            let mut x: Vec<f32> = (0..2 * QK).map(|_| rng.weight() * 1e-3).collect();
            if special.is_finite() {
                x[..QK].fill(0.0);
                x[QK..].fill(0.0);
                x[5] = special;
                x[QK + 9] = special * 0.5;
            } else {
                x[17] = special;
            }
            let (want, got) = quantize_both(&x);
            assert_eq!(got, want, "special {special}");
        }
    }

    /// Every f16 bit pattern converts as edgelm_quant's does (via a Q8_0 block with q = 1).
    #[test]
    fn f16_conversion_exact() {
        for h in 0..=u16::MAX {
            let mut b = [0u8; 34];
            b[0..2].copy_from_slice(&h.to_le_bytes());
            b[2] = 1;
            let mut y = [0f32; 32];
            dequantize_row(GgmlType::Q8_0, &b, &mut y).unwrap();
            let got = f16_to_f32(h);
            assert!(
                got.to_bits() == y[0].to_bits() || (got.is_nan() && y[0].is_nan()),
                "{h:#06x}: {got} vs {}",
                y[0]
            );
        }
    }

    #[test]
    fn table_covers_the_k_quants() {
        for ty in TYPES {
            let k = kernel(ty).unwrap();
            assert_eq!((k.weight, k.act, k.isa), (ty, GgmlType::Q8_K, Isa::Avx2));
        }
        assert!(kernel(GgmlType::Q8_0).is_none());
        assert!(kernel(GgmlType::Q8_K).is_none());
        assert!(kernel(GgmlType::F32).is_none());
    }
}
