//! Q6_K: 16 sub-blocks of 16; `x = d * sc * (q - 32)` with 6-bit `q` and i8 `sc`.
//!
//! Layout: `ql[128]` at 0, `qh[64]` at 128, i8 `scales[16]` at 192, f16 `d` at 208. For
//! element `e` with half `h = e / 128`, quarter `k = (e % 128) / 32` and `l = e % 32`: the low
//! nibble is in `ql[64h + 32(k & 1) + l]` (high nibble when `k >= 2`), the top 2 bits at bit
//! `2k` of `qh[32h + l]`, and the scale is `scales[e / 16]`.

use super::{quantize_sym, QK_K};
use crate::{f16_at, put_f16};

pub const BLOCK_ELEMS: usize = QK_K;
pub const BLOCK_BYTES: usize = 210;

const QH: usize = 128;
const SCALES: usize = 192;

pub fn dequantize_block(b: &[u8; BLOCK_BYTES], y: &mut [f32; BLOCK_ELEMS]) {
    let d = f16_at(b, 208);
    for h in 0..2 {
        let ql = &b[64 * h..64 * h + 64];
        let qh = &b[QH + 32 * h..QH + 32 * h + 32];
        let sc = &b[SCALES + 8 * h..SCALES + 8 * h + 8];
        let y = &mut y[128 * h..128 * h + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
            y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
            y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
            y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
        }
    }
}

/// [`quantize_block_weighted`] with the default error weights ([`crate::weighted::error_weights`]).
pub fn quantize_block(x: &[f32; BLOCK_ELEMS], b: &mut [u8; BLOCK_BYTES]) {
    let mut w = [0f32; BLOCK_ELEMS];
    crate::weighted::error_weights(crate::GgmlType::Q6_K, x, None, &mut w);
    quantize_block_weighted(x, &w, b);
}

/// Weighted least-squares quantization; `w` ≥ 0 weighs each value's error.
pub fn quantize_block_weighted(
    x: &[f32; BLOCK_ELEMS],
    w: &[f32; BLOCK_ELEMS],
    b: &mut [u8; BLOCK_BYTES],
) {
    let a = quantize_sym(x, w, 32, 127);
    b.fill(0);
    for (e, &q) in a.q.iter().enumerate() {
        let u = (q as i32 + 32) as u8; // 0..64
        let (h, k, l) = (e / 128, (e % 128) / 32, e % 32);
        let nib = if k >= 2 { 4 } else { 0 };
        b[64 * h + 32 * (k & 1) + l] |= (u & 0x0F) << nib;
        b[QH + 32 * h + l] |= (u >> 4) << (2 * k);
    }
    for j in 0..16 {
        b[SCALES + j] = a.sc[j] as u8;
    }
    put_f16(b, 208, a.d);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_block() {
        let mut b = [0u8; BLOCK_BYTES];
        b[208..210].copy_from_slice(&0x3400u16.to_le_bytes()); // d = 0.25
        for j in 0..16 {
            b[SCALES + j] = (j as i8 - 8) as u8; // scale of sub j is j - 8
        }
        // elem 0: ql[0] low = 0xF, qh[0] bits 0-1 = 3 -> 63 - 32 = 31 (scale -8)
        // elem 64: ql[0] high = 0x2, qh[0] bits 4-5 = 1 -> 18 - 32 = -14 (sub 4, scale -4)
        b[0] = 0x2F;
        b[QH] = 0b0001_0011;
        // elem 160 = h 1, k 1, l 0: ql[64 + 32] low, qh[32] bits 2-3, sub 10 (scale 2)
        b[96] = 0x05;
        b[QH + 32] = 0b0000_1000; // top bits 2 -> q = 32 + 5 = 37 -> 5
                                  // elem 255 = h 1, k 3, l 31: ql[64 + 32 + 31] high, qh[63] bits 6-7, sub 15 (scale 7)
        b[127] = 0x00;
        b[QH + 63] = 0; // q = 0 -> -32
        let mut y = [0f32; 256];
        dequantize_block(&b, &mut y);
        assert_eq!(y[0], 0.25 * -8.0 * 31.0);
        assert_eq!(y[64], 0.25 * -4.0 * -14.0);
        assert_eq!(y[32], 0.25 * -6.0 * -32.0); // sub 2, everything zero
        assert_eq!(y[160], 0.25 * 2.0 * 5.0);
        assert_eq!(y[255], 0.25 * 7.0 * -32.0);
    }
}
