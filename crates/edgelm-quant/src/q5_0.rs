//! Q5_0: 32 elements as f16 `d`, a little-endian u32 `qh` of fifth bits and 16 bytes of low
//! nibbles; `x = (q - 16) * d`. Bit `j` of `qh` belongs to element `j`, bit `j + 16` to
//! element `j + 16`, matching the nibble layout of Q4_0.

use crate::{f16_at, put_f16};

pub const BLOCK_ELEMS: usize = 32;
pub const BLOCK_BYTES: usize = 22;

pub fn dequantize_block(b: &[u8; BLOCK_BYTES], y: &mut [f32; BLOCK_ELEMS]) {
    let d = f16_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    for j in 0..16 {
        let q = b[6 + j];
        let h0 = ((qh >> j) & 1) << 4;
        let h1 = ((qh >> (j + 16)) & 1) << 4;
        y[j] = (((q & 0x0F) as u32 | h0) as i32 - 16) as f32 * d;
        y[j + 16] = (((q >> 4) as u32 | h1) as i32 - 16) as f32 * d;
    }
}

/// ggml's reference: the largest-magnitude value maps to -16.
pub fn quantize_block(x: &[f32; BLOCK_ELEMS], b: &mut [u8; BLOCK_BYTES]) {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    let d = max / -16.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(b, 0, d);
    let mut qh = 0u32;
    for j in 0..16 {
        let q0 = ((x[j] * id + 16.5) as i32).clamp(0, 31) as u32;
        let q1 = ((x[j + 16] * id + 16.5) as i32).clamp(0, 31) as u32;
        b[6 + j] = ((q0 & 0x0F) | ((q1 & 0x0F) << 4)) as u8;
        qh |= (q0 >> 4) << j;
        qh |= (q1 >> 4) << (j + 16);
    }
    b[2..6].copy_from_slice(&qh.to_le_bytes());
}

/// Weighted least-squares rounding ([`crate::weighted`]); `w` ≥ 0 weighs each value's error.
pub fn quantize_block_weighted(
    x: &[f32; BLOCK_ELEMS],
    w: &[f32; BLOCK_ELEMS],
    b: &mut [u8; BLOCK_BYTES],
) {
    let mut q = [0i8; 32];
    let d = crate::weighted::f16_grid_scale(x, -16, 15, &mut q).unwrap_or_else(|| {
        crate::weighted::fit_scale(x, w, -16, 15, false, &mut q, crate::weighted::f16r).0
    });
    put_f16(b, 0, d);
    let mut qh = 0u32;
    for j in 0..16 {
        let (q0, q1) = ((q[j] + 16) as u32, (q[j + 16] + 16) as u32);
        b[6 + j] = ((q0 & 0x0F) | ((q1 & 0x0F) << 4)) as u8;
        qh |= (q0 >> 4) << j;
        qh |= (q1 >> 4) << (j + 16);
    }
    b[2..6].copy_from_slice(&qh.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_block_high_bits() {
        let mut b = [0u8; BLOCK_BYTES];
        b[0..2].copy_from_slice(&0x3C00u16.to_le_bytes()); // d = 1
                                                           // qh bits: 0 (elem 0), 15 (elem 15), 16 (elem 16), 31 (elem 31)
        b[2..6].copy_from_slice(&0x8001_8001u32.to_le_bytes());
        b[6] = 0x2F; // elem 0 low nibble 15, elem 16 low nibble 2
        b[6 + 15] = 0x0F; // elem 15 low nibble 15, elem 31 low nibble 0
        b[6 + 1] = 0x3F; // elem 1: 15 without high bit, elem 17: 3 without high bit
        let mut y = [0f32; 32];
        dequantize_block(&b, &mut y);
        assert_eq!(y[0], 15.0); // 31 - 16
        assert_eq!(y[16], 2.0); // 18 - 16
        assert_eq!(y[15], 15.0);
        assert_eq!(y[31], 0.0); // 16 - 16
        assert_eq!(y[1], -1.0); // 15 - 16
        assert_eq!(y[17], -13.0); // 3 - 16
        assert_eq!(y[2], -16.0);
    }
}
