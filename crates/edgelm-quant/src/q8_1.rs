//! Q8_1: 32 elements as f16 `d`, f16 `s = d * sum(q)` and 32 i8 quants; `x = q * d`.
//! The activation format for Q4_1 and Q5_1 weights: `s` folds their offset `m` into one
//! multiply.

use crate::{f16_at, put_f16};

pub const BLOCK_ELEMS: usize = 32;
pub const BLOCK_BYTES: usize = 36;

pub fn dequantize_block(b: &[u8; BLOCK_BYTES], y: &mut [f32; BLOCK_ELEMS]) {
    let d = f16_at(b, 0);
    for j in 0..32 {
        y[j] = (b[4 + j] as i8) as f32 * d;
    }
}

/// ggml's reference: as Q8_0, plus `s = sum(q) * d` rounded to f16.
pub fn quantize_block(x: &[f32; BLOCK_ELEMS], b: &mut [u8; BLOCK_BYTES]) {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(b, 0, d);
    let mut sum = 0i32;
    for j in 0..32 {
        let q = (x[j] * id).round() as i8;
        b[4 + j] = q as u8;
        sum += q as i32;
    }
    put_f16(b, 2, sum as f32 * d);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_block() {
        let mut b = [0u8; BLOCK_BYTES];
        b[0..2].copy_from_slice(&0x4000u16.to_le_bytes()); // d = 2
        b[2..4].copy_from_slice(&0x7BFFu16.to_le_bytes()); // s is not used when dequantizing
        b[4] = 0x81; // -127
        b[35] = 3;
        let mut y = [0f32; 32];
        dequantize_block(&b, &mut y);
        assert_eq!(y[0], -254.0);
        assert_eq!(y[31], 6.0);
        assert_eq!(y[1], 0.0);
    }

    #[test]
    fn quantize_sets_sum() {
        let mut x = [0f32; 32];
        x[0] = -12.7; // d = 0.1
        x[1] = 5.0;
        x[2] = 1.0;
        let mut b = [0u8; BLOCK_BYTES];
        quantize_block(&x, &mut b);
        assert_eq!(b[4] as i8, -127);
        assert_eq!(b[5] as i8, 50);
        assert_eq!(b[6] as i8, 10);
        let d = f16_at(&b, 0);
        assert!((d - 0.1).abs() < 1e-4);
        // s = (-127 + 50 + 10) * d, rounded to f16
        let s = f16_at(&b, 2);
        assert_eq!(s, half::f16::from_f32(-67.0 * (12.7f32 / 127.0)).to_f32());
    }
}
