//! Q8_0: 32 elements as f16 `d` and 32 i8 quants; `x = q * d`. Also the activation format
//! for Q4_0, Q5_0 and Q8_0 weights.

use crate::{f16_at, put_f16};

pub const BLOCK_ELEMS: usize = 32;
pub const BLOCK_BYTES: usize = 34;

pub fn dequantize_block(b: &[u8; BLOCK_BYTES], y: &mut [f32; BLOCK_ELEMS]) {
    let d = f16_at(b, 0);
    for j in 0..32 {
        y[j] = (b[2 + j] as i8) as f32 * d;
    }
}

/// ggml's reference: `d = amax / 127`, `q = roundf(x / d)` (ties away from zero).
pub fn quantize_block(x: &[f32; BLOCK_ELEMS], b: &mut [u8; BLOCK_BYTES]) {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(b, 0, d);
    for j in 0..32 {
        b[2 + j] = ((x[j] * id).round() as i8) as u8;
    }
}

/// [`quantize_block`] with least-squares rounding ([`crate::fit::fit_symmetric`], levels
/// −127..=127 as ggml's): never a larger error, what the KV cache writes.
pub fn quantize_block_fitted(x: &[f32; BLOCK_ELEMS], b: &mut [u8; BLOCK_BYTES]) {
    let mut q = [0i8; 32];
    let d = crate::fit::fit_symmetric(x, LEVELS.0, LEVELS.1, &mut q);
    pack(d, &q, b);
}

/// The grid the fitted rounding uses (ggml's: −128 is never produced).
pub const LEVELS: (i32, i32) = (-127, 127);

/// A block of scale `d` and levels `q` in the stored layout.
pub fn pack(d: f32, q: &[i8; BLOCK_ELEMS], b: &mut [u8; BLOCK_BYTES]) {
    put_f16(b, 0, d);
    for j in 0..32 {
        b[2 + j] = q[j] as u8;
    }
}

/// Weighted least-squares rounding ([`crate::weighted`]) over ggml's levels −127..=127; `w` ≥ 0
/// weighs each value's error.
pub fn quantize_block_weighted(
    x: &[f32; BLOCK_ELEMS],
    w: &[f32; BLOCK_ELEMS],
    b: &mut [u8; BLOCK_BYTES],
) {
    let mut q = [0i8; 32];
    let d = crate::weighted::f16_grid_scale(x, -127, 127, &mut q).unwrap_or_else(|| {
        crate::weighted::fit_scale(x, w, -127, 127, false, &mut q, crate::weighted::f16r).0
    });
    put_f16(b, 0, d);
    for j in 0..32 {
        b[2 + j] = q[j] as u8;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_block() {
        let mut b = [0u8; BLOCK_BYTES];
        b[0..2].copy_from_slice(&0x3400u16.to_le_bytes()); // d = 0.25
        b[2] = 0x80; // -128
        b[3] = 0x7F; // 127
        b[4] = 0xFF; // -1
        b[33] = 4;
        let mut y = [0f32; 32];
        dequantize_block(&b, &mut y);
        assert_eq!(y[0], -32.0);
        assert_eq!(y[1], 31.75);
        assert_eq!(y[2], -0.25);
        assert_eq!(y[31], 1.0);
        assert_eq!(y[3], 0.0);
    }

    #[test]
    fn quantize_rounds_half_away() {
        let mut x = [0f32; 32];
        x[0] = 127.0; // d = 1
        x[1] = 2.5;
        x[2] = -2.5;
        x[3] = 0.49;
        let mut b = [0u8; BLOCK_BYTES];
        quantize_block(&x, &mut b);
        assert_eq!(f16_at(&b, 0), 1.0);
        assert_eq!(b[2] as i8, 127);
        assert_eq!(b[3] as i8, 3);
        assert_eq!(b[4] as i8, -3);
        assert_eq!(b[5] as i8, 0);
    }
}
