//! Integer reference dot products of weight rows with quantized activation rows, computed as
//! llama.cpp's scalar `ggml_vec_dot_*` do: integer sums of quant products per (sub-)block,
//! scaled by the block scales and accumulated over blocks in f32. Min terms use the
//! activation block's precomputed sums (`s` of Q8_1, `bsums` of Q8_K), so results depend on
//! those fields exactly as llama.cpp's do. Fast kernels are checked against these.

use crate::k_quants::{get_scale_min_k4, q3_k, q4_k, q8_k};
use crate::{f16_at, iq4_nl, iq4_xs, q2_k, q4_0, q4_1, q5_0, q5_1, q5_k, q6_k, q8_0, q8_1};
use crate::{GgmlType, QuantError};

/// The activation format llama.cpp pairs with a weight type (its `vec_dot_type`).
pub fn activation_type(ty: GgmlType) -> GgmlType {
    use GgmlType::*;
    match ty {
        Q4_0 | Q5_0 | Q8_0 | IQ4_NL => Q8_0,
        Q4_1 | Q5_1 | Q8_1 => Q8_1,
        Q2_K | Q3_K | Q4_K | Q5_K | Q6_K | Q8_K | IQ4_XS => Q8_K,
        F32 => F32,
        F16 => F16,
        BF16 => BF16,
    }
}

/// Whether [`vec_dot`] supports `ty` as the weight type.
pub fn can_vec_dot(ty: GgmlType) -> bool {
    !matches!(ty, GgmlType::Q8_1 | GgmlType::Q8_K)
}

/// Dot product of weight row `w` (type `ty`) with activation row `a`
/// (type [`activation_type`]`(ty)`, same element count). Float types are multiplied in f32
/// and accumulated in f64, like ggml's `vec_dot_f32/f16/bf16`.
pub fn vec_dot(ty: GgmlType, w: &[u8], a: &[u8]) -> Result<f32, QuantError> {
    use GgmlType::*;
    if !can_vec_dot(ty) {
        return Err(QuantError::Unsupported {
            ty,
            op: "integer dot product as a weight type",
        });
    }
    let at = activation_type(ty);
    let wb = ty.block_bytes();
    if !w.len().is_multiple_of(wb) {
        return Err(QuantError::ByteLength {
            ty,
            what: "weight row (not whole blocks)",
            expected: w.len() / wb * wb,
            got: w.len(),
        });
    }
    let expected = w.len() / wb * at.block_bytes();
    if a.len() != expected {
        return Err(QuantError::ByteLength {
            ty: at,
            what: "activation row",
            expected,
            got: a.len(),
        });
    }
    Ok(match ty {
        Q4_0 => rows(w, a, q4_0_q8_0),
        Q4_1 => rows(w, a, q4_1_q8_1),
        Q5_0 => rows(w, a, q5_0_q8_0),
        Q5_1 => rows(w, a, q5_1_q8_1),
        Q8_0 => rows(w, a, q8_0_q8_0),
        IQ4_NL => rows(w, a, iq4_nl_q8_0),
        IQ4_XS => rows(w, a, iq4_xs_q8_k),
        Q2_K => rows(w, a, q2_k_q8_k),
        Q3_K => rows(w, a, q3_k_q8_k),
        Q4_K => rows(w, a, q4_k_q8_k),
        Q5_K => rows(w, a, q5_k_q8_k),
        Q6_K => rows(w, a, q6_k_q8_k),
        F32 => floats::<4>(w, a, |b| f32::from_le_bytes(*b)),
        F16 => floats::<2>(w, a, |b| half::f16::from_le_bytes(*b).to_f32()),
        BF16 => floats::<2>(w, a, |b| half::bf16::from_le_bytes(*b).to_f32()),
        Q8_1 | Q8_K => 0.0, // rejected above
    })
}

fn rows<const BW: usize, const BA: usize>(
    mut w: &[u8],
    mut a: &[u8],
    f: impl Fn(&[u8; BW], &[u8; BA]) -> f32,
) -> f32 {
    let mut sum = 0f32;
    while let (Some((wb, wr)), Some((ab, ar))) =
        (w.split_first_chunk::<BW>(), a.split_first_chunk::<BA>())
    {
        sum += f(wb, ab);
        w = wr;
        a = ar;
    }
    sum
}

fn floats<const B: usize>(mut w: &[u8], mut a: &[u8], conv: impl Fn(&[u8; B]) -> f32) -> f32 {
    let mut sum = 0f64;
    while let (Some((wb, wr)), Some((ab, ar))) =
        (w.split_first_chunk::<B>(), a.split_first_chunk::<B>())
    {
        sum += (conv(wb) * conv(ab)) as f64;
        w = wr;
        a = ar;
    }
    sum as f32
}

#[inline]
fn i8s(b: &[u8]) -> impl Iterator<Item = i32> + '_ {
    b.iter().map(|&v| v as i8 as i32)
}

/// One IQ4_NL block times one Q8_0 block (`ggml_vec_dot_iq4_nl_q8_0`): the grid levels times
/// the activations, summed in integers, scaled by both block scales.
pub fn iq4_nl_q8_0(w: &[u8; iq4_nl::BLOCK_BYTES], a: &[u8; q8_0::BLOCK_BYTES]) -> f32 {
    let mut sum = 0i32;
    for j in 0..16 {
        let q = w[2 + j];
        sum += iq4_nl::GRID[(q & 0x0F) as usize] as i32 * a[2 + j] as i8 as i32;
        sum += iq4_nl::GRID[(q >> 4) as usize] as i32 * a[18 + j] as i8 as i32;
    }
    f16_at(w, 0) * f16_at(a, 0) * sum as f32
}

/// One IQ4_XS block times one Q8_K block (`ggml_vec_dot_iq4_xs_q8_K`): per sub-block of 32,
/// the grid levels times the activations summed in integers, scaled by its code − 32; the
/// sub-blocks summed in f32, times `d_w·d_a`.
pub fn iq4_xs_q8_k(w: &[u8; iq4_xs::BLOCK_BYTES], a: &[u8; q8_k::BLOCK_BYTES]) -> f32 {
    let d = f16_at(w, 0) * f32::from_le_bytes([a[0], a[1], a[2], a[3]]);
    let mut sum = 0f32;
    for ib in 0..8 {
        let (qs, y) = (&w[8 + 16 * ib..24 + 16 * ib], &a[4 + 32 * ib..36 + 32 * ib]);
        let mut sumi = 0i32;
        for j in 0..16 {
            sumi += iq4_nl::GRID[(qs[j] & 0x0F) as usize] as i32 * y[j] as i8 as i32;
            sumi += iq4_nl::GRID[(qs[j] >> 4) as usize] as i32 * y[j + 16] as i8 as i32;
        }
        sum += d * (iq4_xs::scale_code(w, ib) - 32) as f32 * sumi as f32;
    }
    sum
}

/// One Q4_0 block times one Q8_0 block (`ggml_vec_dot_q4_0_q8_0`).
pub fn q4_0_q8_0(w: &[u8; q4_0::BLOCK_BYTES], a: &[u8; q8_0::BLOCK_BYTES]) -> f32 {
    let y = &a[2..34];
    let mut sumi = 0i32;
    for j in 0..16 {
        let v0 = (w[2 + j] & 0x0F) as i32 - 8;
        let v1 = (w[2 + j] >> 4) as i32 - 8;
        sumi += v0 * (y[j] as i8) as i32 + v1 * (y[j + 16] as i8) as i32;
    }
    sumi as f32 * f16_at(w, 0) * f16_at(a, 0)
}

/// One Q4_1 block times one Q8_1 block: `d_w d_a sumi + m_w s_a`.
pub fn q4_1_q8_1(w: &[u8; q4_1::BLOCK_BYTES], a: &[u8; q8_1::BLOCK_BYTES]) -> f32 {
    let y = &a[4..36];
    let mut sumi = 0i32;
    for j in 0..16 {
        let v0 = (w[4 + j] & 0x0F) as i32;
        let v1 = (w[4 + j] >> 4) as i32;
        sumi += v0 * (y[j] as i8) as i32 + v1 * (y[j + 16] as i8) as i32;
    }
    (f16_at(w, 0) * f16_at(a, 0)) * sumi as f32 + f16_at(w, 2) * f16_at(a, 2)
}

fn q5_quants(qh: u32, qs: &[u8], j: usize) -> (i32, i32) {
    let h0 = ((qh >> j) & 1) << 4;
    let h1 = ((qh >> (j + 16)) & 1) << 4;
    (
        ((qs[j] & 0x0F) as u32 | h0) as i32,
        ((qs[j] >> 4) as u32 | h1) as i32,
    )
}

/// One Q5_0 block times one Q8_0 block.
pub fn q5_0_q8_0(w: &[u8; q5_0::BLOCK_BYTES], a: &[u8; q8_0::BLOCK_BYTES]) -> f32 {
    let qh = u32::from_le_bytes([w[2], w[3], w[4], w[5]]);
    let y = &a[2..34];
    let mut sumi = 0i32;
    for j in 0..16 {
        let (v0, v1) = q5_quants(qh, &w[6..22], j);
        sumi += (v0 - 16) * (y[j] as i8) as i32 + (v1 - 16) * (y[j + 16] as i8) as i32;
    }
    sumi as f32 * f16_at(w, 0) * f16_at(a, 0)
}

/// One Q5_1 block times one Q8_1 block.
pub fn q5_1_q8_1(w: &[u8; q5_1::BLOCK_BYTES], a: &[u8; q8_1::BLOCK_BYTES]) -> f32 {
    let qh = u32::from_le_bytes([w[4], w[5], w[6], w[7]]);
    let y = &a[4..36];
    let mut sumi = 0i32;
    for j in 0..16 {
        let (v0, v1) = q5_quants(qh, &w[8..24], j);
        sumi += v0 * (y[j] as i8) as i32 + v1 * (y[j + 16] as i8) as i32;
    }
    (f16_at(w, 0) * f16_at(a, 0)) * sumi as f32 + f16_at(w, 2) * f16_at(a, 2)
}

/// One Q8_0 block times one Q8_0 block.
pub fn q8_0_q8_0(w: &[u8; q8_0::BLOCK_BYTES], a: &[u8; q8_0::BLOCK_BYTES]) -> f32 {
    let sumi: i32 = i8s(&w[2..34]).zip(i8s(&a[2..34])).map(|(x, y)| x * y).sum();
    sumi as f32 * (f16_at(w, 0) * f16_at(a, 0))
}

fn q8k_parts(a: &[u8; q8_k::BLOCK_BYTES]) -> (f32, &[u8]) {
    (f32::from_le_bytes([a[0], a[1], a[2], a[3]]), &a[4..260])
}

/// One Q2_K block times one Q8_K block: `d dA isum - dmin dA sum(min_j bsum_j)`.
pub fn q2_k_q8_k(w: &[u8; q2_k::BLOCK_BYTES], a: &[u8; q8_k::BLOCK_BYTES]) -> f32 {
    let (da, q8) = q8k_parts(a);
    let sc = &w[0..16];
    let summs: i32 = (0..16)
        .map(|j| q8_k::bsum(a, j) as i32 * (sc[j] >> 4) as i32)
        .sum();
    let mut isum = 0i32;
    for e in 0..256 {
        let q = (w[16 + (e / 128) * 32 + e % 32] >> (2 * ((e % 128) / 32))) & 3;
        isum += (sc[e / 16] & 0x0F) as i32 * q as i32 * (q8[e] as i8) as i32;
    }
    let dall = da * f16_at(w, 80);
    let dmin = da * f16_at(w, 82);
    dall * isum as f32 - dmin * summs as f32
}

/// One Q3_K block times one Q8_K block.
pub fn q3_k_q8_k(w: &[u8; q3_k::BLOCK_BYTES], a: &[u8; q8_k::BLOCK_BYTES]) -> f32 {
    let (da, q8) = q8k_parts(a);
    let sc = q3_k::scales_of(w);
    let mut isum = 0i32;
    for j in 0..16 {
        let mut s = 0i32;
        for e in 16 * j..16 * j + 16 {
            let lo = (w[32 + (e / 128) * 32 + e % 32] >> (2 * ((e % 128) / 32))) & 3;
            let hi = (w[e % 32] >> (e / 32)) & 1;
            let q = lo as i32 - if hi != 0 { 0 } else { 4 };
            s += q * (q8[e] as i8) as i32;
        }
        isum += sc[j] as i32 * s;
    }
    f16_at(w, 108) * da * isum as f32
}

/// Shared by Q4_K and Q5_K: `quant(e)` gives the unsigned level of element `e`.
fn k4_dot(
    scales: &[u8; 12],
    d: f32,
    dmin: f32,
    a: &[u8; q8_k::BLOCK_BYTES],
    quant: impl Fn(usize) -> i32,
) -> f32 {
    let (da, q8) = q8k_parts(a);
    let (mut isum, mut summs) = (0i32, 0i32);
    for j in 0..8 {
        let (sc, m) = get_scale_min_k4(j, scales);
        let bs = q8_k::bsum(a, 2 * j) as i32 + q8_k::bsum(a, 2 * j + 1) as i32;
        summs += m as i32 * bs;
        let s: i32 = (32 * j..32 * j + 32)
            .map(|e| quant(e) * (q8[e] as i8) as i32)
            .sum();
        isum += sc as i32 * s;
    }
    d * da * isum as f32 - dmin * da * summs as f32
}

/// One Q4_K block times one Q8_K block.
pub fn q4_k_q8_k(w: &[u8; q4_k::BLOCK_BYTES], a: &[u8; q8_k::BLOCK_BYTES]) -> f32 {
    let quant = |e: usize| {
        let b = w[16 + (e / 64) * 32 + e % 32];
        (if (e / 32) % 2 == 1 { b >> 4 } else { b & 0x0F }) as i32
    };
    k4_dot(&q4_k::scales_of(w), f16_at(w, 0), f16_at(w, 2), a, quant)
}

/// One Q5_K block times one Q8_K block.
pub fn q5_k_q8_k(w: &[u8; q5_k::BLOCK_BYTES], a: &[u8; q8_k::BLOCK_BYTES]) -> f32 {
    let quant = |e: usize| {
        let b = w[48 + (e / 64) * 32 + e % 32];
        let lo = if (e / 32) % 2 == 1 { b >> 4 } else { b & 0x0F };
        let hi = (w[16 + e % 32] >> (e / 32)) & 1;
        (lo | (hi << 4)) as i32
    };
    k4_dot(&q4_k::scales_of(w), f16_at(w, 0), f16_at(w, 2), a, quant)
}

/// One Q6_K block times one Q8_K block.
pub fn q6_k_q8_k(w: &[u8; q6_k::BLOCK_BYTES], a: &[u8; q8_k::BLOCK_BYTES]) -> f32 {
    let (da, q8) = q8k_parts(a);
    let mut isum = 0i32;
    for j in 0..16 {
        let mut s = 0i32;
        for e in 16 * j..16 * j + 16 {
            let (h, k, l) = (e / 128, (e % 128) / 32, e % 32);
            let lb = w[64 * h + 32 * (k & 1) + l];
            let lo = if k >= 2 { lb >> 4 } else { lb & 0x0F };
            let hi = (w[128 + 32 * h + l] >> (2 * k)) & 3;
            s += ((lo | (hi << 4)) as i32 - 32) * (q8[e] as i8) as i32;
        }
        isum += (w[192 + j] as i8) as i32 * s;
    }
    f16_at(w, 208) * da * isum as f32
}
