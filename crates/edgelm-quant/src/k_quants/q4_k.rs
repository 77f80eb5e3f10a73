//! Q4_K: 8 sub-blocks of 32; `x = d * sc * q - dmin * m` with 4-bit `q` and 6-bit `sc`, `m`.
//!
//! Layout: f16 `d` at 0, f16 `dmin` at 2, `scales[12]` at 4 (see
//! [`super::get_scale_min_k4`]), `qs[128]` at 16. Each 64-element chunk `c`
//! uses bytes `32c..32c+32`: the first 32 elements are the low nibbles (sub-block `2c`), the
//! next 32 the high nibbles (sub-block `2c + 1`).

use super::{get_scale_min_k4, pack_scale_min_k4, quantize_asym, QK_K};
use crate::{f16_at, put_f16};

pub const BLOCK_ELEMS: usize = QK_K;
pub const BLOCK_BYTES: usize = 144;

const QS: usize = 16;

pub(crate) fn scales_of(b: &[u8]) -> [u8; 12] {
    let mut s = [0u8; 12];
    s.copy_from_slice(&b[4..16]);
    s
}

pub fn dequantize_block(b: &[u8; BLOCK_BYTES], y: &mut [f32; BLOCK_ELEMS]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let s = scales_of(b);
    for c in 0..4 {
        let (sc1, m1) = get_scale_min_k4(2 * c, &s);
        let (sc2, m2) = get_scale_min_k4(2 * c + 1, &s);
        let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
        let q = &b[QS + 32 * c..QS + 32 * c + 32];
        for l in 0..32 {
            y[64 * c + l] = d1 * (q[l] & 0x0F) as f32 - m1;
            y[64 * c + 32 + l] = d2 * (q[l] >> 4) as f32 - m2;
        }
    }
}

/// [`quantize_block_weighted`] with the default error weights ([`crate::weighted::error_weights`]).
pub fn quantize_block(x: &[f32; BLOCK_ELEMS], b: &mut [u8; BLOCK_BYTES]) {
    let mut w = [0f32; BLOCK_ELEMS];
    crate::weighted::error_weights(crate::GgmlType::Q4_K, x, None, &mut w);
    quantize_block_weighted(x, &w, b);
}

/// Weighted least-squares quantization; `w` ≥ 0 weighs each value's error.
pub fn quantize_block_weighted(
    x: &[f32; BLOCK_ELEMS],
    w: &[f32; BLOCK_ELEMS],
    b: &mut [u8; BLOCK_BYTES],
) {
    let a = quantize_asym::<8>(x, w, 15, 63);
    b.fill(0);
    put_f16(b, 0, a.d);
    put_f16(b, 2, a.dmin);
    b[4..16].copy_from_slice(&pack_scale_min_k4(&a.sc, &a.mn));
    for (e, &q) in a.q.iter().enumerate() {
        let shift = if (e / 32) % 2 == 1 { 4 } else { 0 };
        b[QS + (e / 64) * 32 + e % 32] |= q << shift;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_block() {
        let mut b = [0u8; BLOCK_BYTES];
        b[0..2].copy_from_slice(&0x3C00u16.to_le_bytes()); // d = 1
        b[2..4].copy_from_slice(&0x4000u16.to_le_bytes()); // dmin = 2
        let sc = 4; // scales field offset
        b[sc] = 2; // sub 0: scale 2
        b[sc + 4] = 1; // sub 0: min 1
        b[sc + 1] = 0x80 | 3; // sub 1: scale 3; bit 7 is the top of sub 5's scale
        b[sc + 5] = 0x40; // sub 1: min 0; bit 6 is the low top bit of sub 5's min
        b[sc + 9] = 0x21; // sub 5: scale low 1, min low 2 -> scale 0b10_0001, min 0b01_0010
        b[QS] = 0xA5; // elem 0: 5, elem 32: 10
        b[QS + 31] = 0x0F; // elem 31: 15, elem 63: 0
        b[QS + 64 + 7] = 0x30; // chunk 2: elem 135 low 0, elem 167 (sub 5) high 3
        let mut y = [0f32; 256];
        dequantize_block(&b, &mut y);
        assert_eq!(y[0], 8.0); // 1*2*5 - 2*1
        assert_eq!(y[1], -2.0);
        assert_eq!(y[31], 28.0); // 2*15 - 2
        assert_eq!(y[32], 30.0); // 3*10 - 0
        assert_eq!(y[63], 0.0);
        assert_eq!(y[135], 0.0); // sub 4: all zero
        assert_eq!(y[167], 99.0 - 36.0); // 33*3 - 2*18
        assert_eq!(y[168], -36.0);
    }
}
