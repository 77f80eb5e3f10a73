//! Q4_1: 32 elements as f16 `d`, f16 `m` and 16 bytes of 4-bit quants; `x = q * d + m`.
//! Nibble layout as in Q4_0.

use crate::{f16_at, put_f16};

pub const BLOCK_ELEMS: usize = 32;
pub const BLOCK_BYTES: usize = 20;

pub fn dequantize_block(b: &[u8; BLOCK_BYTES], y: &mut [f32; BLOCK_ELEMS]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    for j in 0..16 {
        let q = b[4 + j];
        y[j] = (q & 0x0F) as f32 * d + m;
        y[j + 16] = (q >> 4) as f32 * d + m;
    }
}

/// ggml's reference: `m` = block minimum, `d` = range / 15, round half up.
pub fn quantize_block(x: &[f32; BLOCK_ELEMS], b: &mut [u8; BLOCK_BYTES]) {
    let (mut min, mut max) = (f32::MAX, -f32::MAX);
    for &v in x {
        min = min.min(v);
        max = max.max(v);
    }
    let d = (max - min) / 15.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(b, 0, d);
    put_f16(b, 2, min);
    for j in 0..16 {
        let q0 = (((x[j] - min) * id + 0.5) as i32).clamp(0, 15) as u8;
        let q1 = (((x[j + 16] - min) * id + 0.5) as i32).clamp(0, 15) as u8;
        b[4 + j] = q0 | (q1 << 4);
    }
}

/// Weighted least-squares rounding ([`crate::weighted`]) of scale and offset together; `w` ≥ 0
/// weighs each value's error.
pub fn quantize_block_weighted(
    x: &[f32; BLOCK_ELEMS],
    w: &[f32; BLOCK_ELEMS],
    b: &mut [u8; BLOCK_BYTES],
) {
    let mut q = [0u8; 32];
    let (d, m) = crate::weighted::f16_grid_affine(x, 15, &mut q).unwrap_or_else(|| {
        let (d, m, _) =
            crate::weighted::fit_affine(x, w, 15, false, true, &mut q, crate::weighted::f16r);
        (d, m)
    });
    put_f16(b, 0, d);
    put_f16(b, 2, m);
    for j in 0..16 {
        b[4 + j] = q[j] | (q[j + 16] << 4);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_block() {
        let mut b = [0u8; BLOCK_BYTES];
        b[0..2].copy_from_slice(&0x4000u16.to_le_bytes()); // d = 2
        b[2..4].copy_from_slice(&0xBC00u16.to_le_bytes()); // m = -1
        b[4] = 0xF0; // element 0: q=0, element 16: q=15
        b[5] = 0x1E; // element 1: q=14, element 17: q=1
        let mut y = [0f32; 32];
        dequantize_block(&b, &mut y);
        assert_eq!(y[0], -1.0);
        assert_eq!(y[16], 29.0);
        assert_eq!(y[1], 27.0);
        assert_eq!(y[17], 1.0);
        assert_eq!(y[2], -1.0);
        assert_eq!(y[31], -1.0);
    }
}
