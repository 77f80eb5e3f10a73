//! Q2_K: 16 sub-blocks of 16; `x = d * sc * q - dmin * m` with 2-bit `q` and 4-bit `sc`, `m`.
//!
//! Layout: `scales[16]` (low nibble scale, high nibble min) at 0, `qs[64]` at 16, f16 `d` at
//! 80, f16 `dmin` at 82. Element `e` uses scale byte `e / 16` and bits
//! `2 * ((e % 128) / 32)` of `qs[(e / 128) * 32 + e % 32]`: each 128-element half shares 32
//! bytes, with four 32-element groups in successive bit pairs.

use super::{quantize_asym, QK_K};
use crate::{f16_at, put_f16};

pub const BLOCK_ELEMS: usize = QK_K;
pub const BLOCK_BYTES: usize = 84;

const QS: usize = 16;

pub fn dequantize_block(b: &[u8; BLOCK_BYTES], y: &mut [f32; BLOCK_ELEMS]) {
    let d = f16_at(b, 80);
    let dmin = f16_at(b, 82);
    let mut e = 0;
    for h in 0..2 {
        let q = &b[QS + h * 32..QS + h * 32 + 32];
        for j in 0..4 {
            let shift = 2 * j;
            for half in 0..2 {
                let sc = b[h * 8 + j * 2 + half];
                let dl = d * (sc & 0x0F) as f32;
                let ml = dmin * (sc >> 4) as f32;
                for &qb in &q[half * 16..half * 16 + 16] {
                    y[e] = dl * ((qb >> shift) & 3) as f32 - ml;
                    e += 1;
                }
            }
        }
    }
}

/// [`quantize_block_weighted`] with the default error weights ([`crate::weighted::error_weights`]).
pub fn quantize_block(x: &[f32; BLOCK_ELEMS], b: &mut [u8; BLOCK_BYTES]) {
    let mut w = [0f32; BLOCK_ELEMS];
    crate::weighted::error_weights(crate::GgmlType::Q2_K, x, None, &mut w);
    quantize_block_weighted(x, &w, b);
}

/// Weighted least-squares quantization; `w` ≥ 0 weighs each value's error.
pub fn quantize_block_weighted(
    x: &[f32; BLOCK_ELEMS],
    w: &[f32; BLOCK_ELEMS],
    b: &mut [u8; BLOCK_BYTES],
) {
    let a = quantize_asym::<16>(x, w, 3, 15);
    b.fill(0);
    for j in 0..16 {
        b[j] = a.sc[j] | (a.mn[j] << 4);
    }
    for (e, &q) in a.q.iter().enumerate() {
        b[QS + (e / 128) * 32 + e % 32] |= q << (2 * ((e % 128) / 32));
    }
    put_f16(b, 80, a.d);
    put_f16(b, 82, a.dmin);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_block() {
        let mut b = [0u8; BLOCK_BYTES];
        b[80..82].copy_from_slice(&0x3C00u16.to_le_bytes()); // d = 1
        b[82..84].copy_from_slice(&0x3800u16.to_le_bytes()); // dmin = 0.5
        b[0] = 0x21; // sub 0: scale 1, min 2
        b[3] = 0xF3; // sub 3: scale 3, min 15
        b[8] = 0x04; // sub 8: scale 4, min 0
        b[14] = 0x11; // sub 14: scale 1, min 1
        b[QS] = 0b11_10_01_00; // elems 0, 32, 64, 96 -> q 0, 1, 2, 3
        b[QS + 16] = 0b0000_1100; // elem 48 -> q 3 (elem 16 -> q 0)
        b[QS + 32 + 5] = 0b01_00_00_10; // elem 133 -> q 2, elem 229 -> q 1
        let mut y = [0f32; 256];
        dequantize_block(&b, &mut y);
        assert_eq!(y[0], -1.0); // 1*0 - 0.5*2
        assert_eq!(y[1], -1.0);
        assert_eq!(y[32], 0.0); // sub 2 is all zero
        assert_eq!(y[48], 1.5); // 3*3 - 0.5*15
        assert_eq!(y[49], -7.5);
        assert_eq!(y[16], 0.0);
        assert_eq!(y[133], 8.0); // 4*2
        assert_eq!(y[229], 0.5); // 1*1 - 0.5
        assert_eq!(y[230], -0.5);
    }
}
