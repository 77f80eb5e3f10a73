//! Q4_0: 32 elements as f16 `d` and 16 bytes of 4-bit quants; `x = (q - 8) * d`.
//! Byte `j` holds element `j` in its low nibble and element `j + 16` in its high nibble.

use crate::{f16_at, put_f16};

pub const BLOCK_ELEMS: usize = 32;
pub const BLOCK_BYTES: usize = 18;

pub fn dequantize_block(b: &[u8; BLOCK_BYTES], y: &mut [f32; BLOCK_ELEMS]) {
    let d = f16_at(b, 0);
    for j in 0..16 {
        let q = b[2 + j];
        y[j] = ((q & 0x0F) as i32 - 8) as f32 * d;
        y[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
    }
}

/// ggml's reference: the largest-magnitude value maps to -8, the others round to nearest.
pub fn quantize_block(x: &[f32; BLOCK_ELEMS], b: &mut [u8; BLOCK_BYTES]) {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(b, 0, d);
    for j in 0..16 {
        let q0 = ((x[j] * id + 8.5) as i32).clamp(0, 15) as u8;
        let q1 = ((x[j + 16] * id + 8.5) as i32).clamp(0, 15) as u8;
        b[2 + j] = q0 | (q1 << 4);
    }
}

/// [`quantize_block`] with least-squares rounding ([`crate::fit::fit_symmetric`]): never a
/// larger error, what the KV cache writes.
pub fn quantize_block_fitted(x: &[f32; BLOCK_ELEMS], b: &mut [u8; BLOCK_BYTES]) {
    let mut q = [0i8; 32];
    let d = crate::fit::fit_symmetric(x, LEVELS.0, LEVELS.1, &mut q);
    pack(d, &q, b);
}

/// The grid a block's levels lie on.
pub const LEVELS: (i32, i32) = (-8, 7);

/// A block of scale `d` and levels `q` (in [`LEVELS`]) in the stored layout.
pub fn pack(d: f32, q: &[i8; BLOCK_ELEMS], b: &mut [u8; BLOCK_BYTES]) {
    put_f16(b, 0, d);
    for j in 0..16 {
        b[2 + j] = (q[j] + 8) as u8 | ((q[j + 16] + 8) as u8) << 4;
    }
}

/// Weighted least-squares rounding ([`crate::weighted`]); `w` ≥ 0 weighs each value's error.
pub fn quantize_block_weighted(
    x: &[f32; BLOCK_ELEMS],
    w: &[f32; BLOCK_ELEMS],
    b: &mut [u8; BLOCK_BYTES],
) {
    let mut q = [0i8; 32];
    let d = crate::weighted::f16_grid_scale(x, -8, 7, &mut q).unwrap_or_else(|| {
        crate::weighted::fit_scale(x, w, -8, 7, false, &mut q, crate::weighted::f16r).0
    });
    put_f16(b, 0, d);
    for j in 0..16 {
        b[2 + j] = (q[j] + 8) as u8 | ((q[j + 16] + 8) as u8) << 4;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_block() {
        let mut b = [0u8; BLOCK_BYTES];
        b[0..2].copy_from_slice(&0x3800u16.to_le_bytes()); // d = 0.5
        for j in 0..16 {
            b[2 + j] = (j as u8) | ((15 - j as u8) << 4);
        }
        let mut y = [0f32; 32];
        dequantize_block(&b, &mut y);
        // low nibbles 0..15 -> (q-8)*0.5, high nibbles 15..0
        assert_eq!(y[0], -4.0);
        assert_eq!(y[8], 0.0);
        assert_eq!(y[15], 3.5);
        assert_eq!(y[16], 3.5);
        assert_eq!(y[24], -0.5);
        assert_eq!(y[31], -4.0);
        for j in 0..16 {
            assert_eq!(y[j], (j as f32 - 8.0) * 0.5);
            assert_eq!(y[j + 16], (7.0 - j as f32) * 0.5);
        }
    }

    #[test]
    fn quantize_exact_grid() {
        // Values on the grid of d = 1 (the extreme -8 maps to q = 0) survive exactly.
        let mut x = [0f32; 32];
        for (i, v) in x.iter_mut().enumerate() {
            *v = (i % 16) as f32 - 8.0;
        }
        x[5] = -8.0;
        let mut b = [0u8; BLOCK_BYTES];
        quantize_block(&x, &mut b);
        assert_eq!(f16_at(&b, 0), 1.0);
        let mut y = [0f32; 32];
        dequantize_block(&b, &mut y);
        assert_eq!(x, y);
    }
}
