//! Q5_1: 32 elements as f16 `d`, f16 `m`, u32 `qh` and 16 bytes of low nibbles;
//! `x = q * d + m`. Bit layout as in Q5_0.

use crate::{f16_at, put_f16};

pub const BLOCK_ELEMS: usize = 32;
pub const BLOCK_BYTES: usize = 24;

pub fn dequantize_block(b: &[u8; BLOCK_BYTES], y: &mut [f32; BLOCK_ELEMS]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    for j in 0..16 {
        let q = b[8 + j];
        let h0 = ((qh >> j) & 1) << 4;
        let h1 = ((qh >> (j + 16)) & 1) << 4;
        y[j] = ((q & 0x0F) as u32 | h0) as f32 * d + m;
        y[j + 16] = ((q >> 4) as u32 | h1) as f32 * d + m;
    }
}

/// ggml's reference: `m` = block minimum, `d` = range / 31, round half up.
pub fn quantize_block(x: &[f32; BLOCK_ELEMS], b: &mut [u8; BLOCK_BYTES]) {
    let (mut min, mut max) = (f32::MAX, -f32::MAX);
    for &v in x {
        min = min.min(v);
        max = max.max(v);
    }
    let d = (max - min) / 31.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(b, 0, d);
    put_f16(b, 2, min);
    let mut qh = 0u32;
    for j in 0..16 {
        let q0 = (((x[j] - min) * id + 0.5) as i32).clamp(0, 31) as u32;
        let q1 = (((x[j + 16] - min) * id + 0.5) as i32).clamp(0, 31) as u32;
        b[8 + j] = ((q0 & 0x0F) | ((q1 & 0x0F) << 4)) as u8;
        qh |= (q0 >> 4) << j;
        qh |= (q1 >> 4) << (j + 16);
    }
    b[4..8].copy_from_slice(&qh.to_le_bytes());
}

/// Weighted least-squares rounding ([`crate::weighted`]) of scale and offset together; `w` ≥ 0
/// weighs each value's error.
pub fn quantize_block_weighted(
    x: &[f32; BLOCK_ELEMS],
    w: &[f32; BLOCK_ELEMS],
    b: &mut [u8; BLOCK_BYTES],
) {
    let mut q = [0u8; 32];
    let (d, m) = crate::weighted::f16_grid_affine(x, 31, &mut q).unwrap_or_else(|| {
        let (d, m, _) =
            crate::weighted::fit_affine(x, w, 31, false, true, &mut q, crate::weighted::f16r);
        (d, m)
    });
    put_f16(b, 0, d);
    put_f16(b, 2, m);
    let mut qh = 0u32;
    for j in 0..16 {
        let (q0, q1) = (q[j] as u32, q[j + 16] as u32);
        b[8 + j] = ((q0 & 0x0F) | ((q1 & 0x0F) << 4)) as u8;
        qh |= (q0 >> 4) << j;
        qh |= (q1 >> 4) << (j + 16);
    }
    b[4..8].copy_from_slice(&qh.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_block_high_bits() {
        let mut b = [0u8; BLOCK_BYTES];
        b[0..2].copy_from_slice(&0x3800u16.to_le_bytes()); // d = 0.5
        b[2..4].copy_from_slice(&0x4200u16.to_le_bytes()); // m = 3
                                                           // qh bit 3 (elem 3) and bit 19 (elem 19) set; byte order little-endian
        b[4..8].copy_from_slice(&[0x08, 0x00, 0x08, 0x00]);
        b[8 + 3] = 0xA5; // elem 3 low 5 -> 21, elem 19 low 10 -> 26
        b[8 + 4] = 0xFF; // elems 4, 20: 15 (no high bit)
        let mut y = [0f32; 32];
        dequantize_block(&b, &mut y);
        assert_eq!(y[3], 21.0 * 0.5 + 3.0);
        assert_eq!(y[19], 26.0 * 0.5 + 3.0);
        assert_eq!(y[4], 15.0 * 0.5 + 3.0);
        assert_eq!(y[20], 15.0 * 0.5 + 3.0);
        assert_eq!(y[0], 3.0);
    }
}
