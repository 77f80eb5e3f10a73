//! Q8_K: the activation format for k-quant dot products. f32 `d` at 0, i8 `qs[256]` at 4,
//! i16 `bsums[16]` (sums of each 16 quants, for the min terms) at 260; `x = d * q`.

use super::QK_K;
use crate::nearest_int;

pub const BLOCK_ELEMS: usize = QK_K;
pub const BLOCK_BYTES: usize = 292;

/// Offset of the quants.
pub const QS: usize = 4;
/// Offset of the i16 sums of 16 quants.
pub const BSUMS: usize = 260;

pub fn dequantize_block(b: &[u8; BLOCK_BYTES], y: &mut [f32; BLOCK_ELEMS]) {
    let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    for (j, v) in y.iter_mut().enumerate() {
        *v = d * (b[QS + j] as i8) as f32;
    }
}

/// The `j`-th i16 block sum.
#[inline]
pub fn bsum(b: &[u8; BLOCK_BYTES], j: usize) -> i16 {
    i16::from_le_bytes([b[BSUMS + 2 * j], b[BSUMS + 2 * j + 1]])
}

/// ggml's definition: the largest-magnitude value `max` maps to -127 through
/// `iscale = -127 / max`, `q = min(127, nearest_int(iscale * x))`, `d = 1 / iscale`.
pub fn quantize_block(x: &[f32; BLOCK_ELEMS], b: &mut [u8; BLOCK_BYTES]) {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    b.fill(0);
    if amax == 0.0 {
        return;
    }
    let iscale = -127.0 / max;
    for j in 0..QK_K {
        b[QS + j] = nearest_int(iscale * x[j]).clamp(-128, 127) as i8 as u8;
    }
    for j in 0..16 {
        let s: i32 = (0..16).map(|i| (b[QS + 16 * j + i] as i8) as i32).sum();
        b[BSUMS + 2 * j..BSUMS + 2 * j + 2].copy_from_slice(&(s as i16).to_le_bytes());
    }
    b[0..4].copy_from_slice(&(1.0 / iscale).to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_block() {
        let mut b = [0u8; BLOCK_BYTES];
        b[0..4].copy_from_slice(&0.5f32.to_le_bytes());
        b[QS] = 0x80; // -128
        b[QS + 255] = 100;
        let mut y = [0f32; 256];
        dequantize_block(&b, &mut y);
        assert_eq!(y[0], -64.0);
        assert_eq!(y[255], 50.0);
        assert_eq!(y[1], 0.0);
    }

    #[test]
    fn quantize_matches_ggml_definition() {
        let mut x = [0f32; 256];
        x[3] = -127.0; // iscale = 1, d = 1
        x[0] = 2.5; // ties go to even: 2
        x[1] = 3.5; // 4
        x[2] = -0.5; // -0
        x[17] = 126.6; // 127
        x[255] = -1.25; // -1
        let mut b = [0u8; BLOCK_BYTES];
        quantize_block(&x, &mut b);
        assert_eq!(f32::from_le_bytes([b[0], b[1], b[2], b[3]]), 1.0);
        let q = |j: usize| b[QS + j] as i8;
        assert_eq!((q(0), q(1), q(2), q(3)), (2, 4, 0, -127));
        assert_eq!(q(17), 127);
        assert_eq!(q(255), -1);
        assert_eq!(bsum(&b, 0), 2 + 4 - 127);
        assert_eq!(bsum(&b, 1), 127);
        assert_eq!(bsum(&b, 15), -1);

        // A positive maximum maps to -127 (d is negative), as in ggml.
        let mut x = [0f32; 256];
        x[10] = 2.0;
        x[11] = -1.0;
        quantize_block(&x, &mut b);
        let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        assert_eq!(d, 1.0 / (-127.0 / 2.0));
        assert_eq!(b[QS + 10] as i8, -127);
        assert_eq!(b[QS + 11] as i8, 64); // 63.5 -> 64 (ties to even)
    }
}
