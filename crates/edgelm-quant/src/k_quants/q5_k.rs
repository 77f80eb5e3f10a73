//! Q5_K: 8 sub-blocks of 32; `x = d * sc * q - dmin * m` with 5-bit `q` and 6-bit `sc`, `m`.
//!
//! Layout: f16 `d` at 0, f16 `dmin` at 2, `scales[12]` at 4, `qh[32]` at 16, `qs[128]` at 48.
//! Low nibbles are arranged as in Q4_K; the fifth bit of element `e` is bit `e / 32` of
//! `qh[e % 32]`.

use super::{get_scale_min_k4, pack_scale_min_k4, quantize_asym, QK_K};
use crate::{f16_at, put_f16};

pub const BLOCK_ELEMS: usize = QK_K;
pub const BLOCK_BYTES: usize = 176;

const QH: usize = 16;
const QS: usize = 48;

pub fn dequantize_block(b: &[u8; BLOCK_BYTES], y: &mut [f32; BLOCK_ELEMS]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let s = super::q4_k::scales_of(b);
    for c in 0..4 {
        let (sc1, m1) = get_scale_min_k4(2 * c, &s);
        let (sc2, m2) = get_scale_min_k4(2 * c + 1, &s);
        let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
        let (u1, u2) = (1u8 << (2 * c), 2u8 << (2 * c));
        for l in 0..32 {
            let ql = b[QS + 32 * c + l];
            let qh = b[QH + l];
            let h1 = if qh & u1 != 0 { 16 } else { 0 };
            let h2 = if qh & u2 != 0 { 16 } else { 0 };
            y[64 * c + l] = d1 * ((ql & 0x0F) + h1) as f32 - m1;
            y[64 * c + 32 + l] = d2 * ((ql >> 4) + h2) as f32 - m2;
        }
    }
}

/// [`quantize_block_weighted`] with the default error weights ([`crate::weighted::error_weights`]).
pub fn quantize_block(x: &[f32; BLOCK_ELEMS], b: &mut [u8; BLOCK_BYTES]) {
    let mut w = [0f32; BLOCK_ELEMS];
    crate::weighted::error_weights(crate::GgmlType::Q5_K, x, None, &mut w);
    quantize_block_weighted(x, &w, b);
}

/// Weighted least-squares quantization; `w` ≥ 0 weighs each value's error.
pub fn quantize_block_weighted(
    x: &[f32; BLOCK_ELEMS],
    w: &[f32; BLOCK_ELEMS],
    b: &mut [u8; BLOCK_BYTES],
) {
    let a = quantize_asym::<8>(x, w, 31, 63);
    b.fill(0);
    put_f16(b, 0, a.d);
    put_f16(b, 2, a.dmin);
    b[4..16].copy_from_slice(&pack_scale_min_k4(&a.sc, &a.mn));
    for (e, &q) in a.q.iter().enumerate() {
        let shift = if (e / 32) % 2 == 1 { 4 } else { 0 };
        b[QS + (e / 64) * 32 + e % 32] |= (q & 0x0F) << shift;
        if q & 0x10 != 0 {
            b[QH + e % 32] |= 1 << (e / 32);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_block() {
        let mut b = [0u8; BLOCK_BYTES];
        b[0..2].copy_from_slice(&0x3800u16.to_le_bytes()); // d = 0.5
        b[2..4].copy_from_slice(&0x3C00u16.to_le_bytes()); // dmin = 1
        b[4] = 4; // sub 0: scale 4
        b[4 + 4] = 3; // sub 0: min 3
        b[4 + 3] = 10; // sub 3: scale 10, min 0
        b[4 + 11] = 0x0F; // sub 7: scale 15, min 0
        b[QS] = 0x0F; // elem 0 low 15, elem 32 (sub 1, scale 0) high 0
        b[QH] = 0b1000_0001; // elem 0 +16; elem 224 (bit 7) +16
        b[QS + 32 + 2] = 0x70; // elem 98 (sub 3, high nibble) = 7
        b[QH + 2] = 0b0000_1000; // bit 3: elem 98 +16
        b[QS + 96] = 0x90; // elem 224 (sub 7, high nibble) = 9
        let mut y = [0f32; 256];
        dequantize_block(&b, &mut y);
        assert_eq!(y[0], 0.5 * 4.0 * 31.0 - 3.0);
        assert_eq!(y[1], -3.0);
        assert_eq!(y[32], 0.0);
        assert_eq!(y[98], 0.5 * 10.0 * 23.0);
        assert_eq!(y[224], 0.5 * 15.0 * 25.0);
        assert_eq!(y[225], 0.0);
    }
}
