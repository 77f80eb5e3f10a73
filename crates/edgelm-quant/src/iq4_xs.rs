//! IQ4_XS: 256 elements as f16 `d`, eight 6-bit sub-block scales (low nibbles in `scales_l[4]`,
//! high bit pairs in the u16 `scales_h`) and 128 bytes of 4-bit indices into the IQ4_NL grid;
//! sub-block `ib` (32 elements) is `x = d · (ls_ib − 32) · GRID[q]`, its nibbles laid out as an
//! IQ4_NL block's. 4.25 bits per weight.

use crate::iq4_nl::{self, GRID};
use crate::{f16_at, put_f16};

pub const BLOCK_ELEMS: usize = 256;
pub const BLOCK_BYTES: usize = 136;

const SCALES_H: usize = 2;
const SCALES_L: usize = 4;
const QS: usize = 8;

/// The 6-bit scale code of sub-block `ib` (the scale is `code − 32`).
pub fn scale_code(b: &[u8; BLOCK_BYTES], ib: usize) -> i32 {
    let h = u16::from_le_bytes([b[SCALES_H], b[SCALES_H + 1]]);
    let lo = (b[SCALES_L + ib / 2] >> (4 * (ib % 2))) & 0x0F;
    (lo as i32) | ((((h >> (2 * ib)) & 3) as i32) << 4)
}

pub fn dequantize_block(b: &[u8; BLOCK_BYTES], y: &mut [f32; BLOCK_ELEMS]) {
    let d = f16_at(b, 0);
    for ib in 0..8 {
        let dl = d * (scale_code(b, ib) - 32) as f32;
        let qs = &b[QS + 16 * ib..QS + 16 * ib + 16];
        let y = &mut y[32 * ib..32 * ib + 32];
        for j in 0..16 {
            y[j] = dl * GRID[(qs[j] & 0x0F) as usize] as f32;
            y[j + 16] = dl * GRID[(qs[j] >> 4) as usize] as f32;
        }
    }
}

/// [`quantize_block_weighted`] with the default error weights ([`crate::weighted::error_weights`]).
pub fn quantize_block(x: &[f32; BLOCK_ELEMS], b: &mut [u8; BLOCK_BYTES]) {
    let mut w = [0f32; BLOCK_ELEMS];
    crate::weighted::error_weights(crate::GgmlType::IQ4_XS, x, None, &mut w);
    quantize_block_weighted(x, &w, b);
}

/// Weighted least-squares rounding: each sub-block's best free scale by the IQ4_NL search,
/// then the super-block scale `d` putting the largest on either end of the 6-bit code range
/// (−32 or 31), codes rounded, levels re-assigned for the coded scales and `d` refit by least
/// squares over the whole block; the better end is kept.
pub fn quantize_block_weighted(
    x: &[f32; BLOCK_ELEMS],
    w: &[f32; BLOCK_ELEMS],
    b: &mut [u8; BLOCK_BYTES],
) {
    let mut scales = [0f32; 8];
    for (ib, s) in scales.iter_mut().enumerate() {
        let r = 32 * ib..32 * ib + 32;
        *s = iq4_nl::search(&x[r.clone()], &w[r], |d| d).0;
    }
    let max = crate::weighted::signed_extreme(&scales);
    b.fill(0);
    if max == 0.0 {
        put_codes(b, 0.0, &[32; 8], &[0; BLOCK_ELEMS]);
        return;
    }
    let mut best = (f32::INFINITY, 0f32, [32i32; 8], [0u8; BLOCK_ELEMS]);
    for end in [-32f32, 31.0] {
        let d0 = max / end;
        let codes: [i32; 8] =
            std::array::from_fn(|ib| ((scales[ib] / d0).round() as i32).clamp(-32, 31) + 32);
        let mut q = [0u8; BLOCK_ELEMS];
        let mut d = d0;
        for _ in 0..2 {
            for ib in 0..8 {
                let r = 32 * ib..32 * ib + 32;
                iq4_nl::assign(&x[r.clone()], d * (codes[ib] - 32) as f32, &mut q[r]);
            }
            d = refit(x, w, &codes, &q);
        }
        let err = error(x, w, d, &codes, &q);
        if err < best.0 {
            best = (err, d, codes, q);
        }
    }
    let (_, d, codes, q) = best;
    put_codes(b, d, &codes, &q);
}

/// The `d` (as f16 stores it) minimizing the weighted error for fixed codes and levels.
fn refit(x: &[f32], w: &[f32], codes: &[i32; 8], q: &[u8]) -> f32 {
    let (mut sxg, mut sgg) = (0f64, 0f64);
    for i in 0..BLOCK_ELEMS {
        let g = ((codes[i / 32] - 32) * GRID[q[i] as usize] as i32) as f64;
        sxg += (w[i] * x[i]) as f64 * g;
        sgg += w[i] as f64 * g * g;
    }
    let d = if sgg > 0.0 { (sxg / sgg) as f32 } else { 0.0 };
    half::f16::from_f32(d).to_f32()
}

fn error(x: &[f32], w: &[f32], d: f32, codes: &[i32; 8], q: &[u8]) -> f32 {
    (0..BLOCK_ELEMS)
        .map(|i| {
            let y = d * ((codes[i / 32] - 32) * GRID[q[i] as usize] as i32) as f32;
            w[i] * (x[i] - y).powi(2)
        })
        .sum()
}

fn put_codes(b: &mut [u8; BLOCK_BYTES], d: f32, codes: &[i32; 8], q: &[u8; BLOCK_ELEMS]) {
    put_f16(b, 0, d);
    let mut h = 0u16;
    for (ib, &c) in codes.iter().enumerate() {
        b[SCALES_L + ib / 2] |= ((c & 0x0F) as u8) << (4 * (ib % 2));
        h |= (((c >> 4) & 3) as u16) << (2 * ib);
        for j in 0..16 {
            b[QS + 16 * ib + j] = q[32 * ib + j] | (q[32 * ib + j + 16] << 4);
        }
    }
    b[SCALES_H..SCALES_H + 2].copy_from_slice(&h.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every code and level lands where the layout says: codes 0..63 spread over the
    /// sub-blocks, read back by `scale_code` and used by the dequantizer.
    #[test]
    fn packed_fields_round_trip() {
        for base in [0, 13, 56] {
            let codes: [i32; 8] = std::array::from_fn(|ib| (base + 7 * ib as i32) % 64);
            let q: [u8; BLOCK_ELEMS] = std::array::from_fn(|i| (i * 5 % 16) as u8);
            let mut b = [0u8; BLOCK_BYTES];
            put_codes(&mut b, 0.5, &codes, &q);
            let mut y = [0f32; BLOCK_ELEMS];
            dequantize_block(&b, &mut y);
            for ib in 0..8 {
                assert_eq!(scale_code(&b, ib), codes[ib]);
                for j in 0..32 {
                    let i = 32 * ib + j;
                    let want = 0.5 * (codes[ib] - 32) as f32 * GRID[q[i] as usize] as f32;
                    assert_eq!(y[i], want, "sub-block {ib} element {j}");
                }
            }
        }
    }
}
