//! Q3_K: 16 sub-blocks of 16; `x = d * (sc - 32) * q` with 3-bit signed `q` in -4..4 and
//! 6-bit `sc`.
//!
//! Layout: `hmask[32]` at 0, `qs[64]` at 32, `scales[12]` at 96, f16 `d` at 108. Element `e`
//! takes its low 2 bits from `qs` as in Q2_K and subtracts 4 unless bit `e / 32` of
//! `hmask[e % 32]` is set. Scale `k` keeps its low nibble in byte `k` (k < 8, low nibble) or
//! `k - 8` (high nibble), and its top 2 bits at bit `2 * (k / 4)` of byte `8 + k % 4`.

use super::{quantize_sym, QK_K};
use crate::{f16_at, put_f16};

pub const BLOCK_ELEMS: usize = QK_K;
pub const BLOCK_BYTES: usize = 110;

const QS: usize = 32;
const SCALES: usize = 96;

/// The 16 scales, already offset by -32.
pub fn unpack_scales(s: &[u8; 12]) -> [i8; 16] {
    let mut out = [0i8; 16];
    for (k, o) in out.iter_mut().enumerate() {
        let low = if k < 8 { s[k] & 0x0F } else { s[k - 8] >> 4 };
        let high = (s[8 + k % 4] >> (2 * (k / 4))) & 3;
        *o = (low | (high << 4)) as i8 - 32;
    }
    out
}

/// Inverse of [`unpack_scales`] for codes in 0..64 (scale + 32).
pub fn pack_scales(codes: &[u8; 16]) -> [u8; 12] {
    let mut s = [0u8; 12];
    for (k, &c) in codes.iter().enumerate() {
        if k < 8 {
            s[k] |= c & 0x0F;
        } else {
            s[k - 8] |= (c & 0x0F) << 4;
        }
        s[8 + k % 4] |= ((c >> 4) & 3) << (2 * (k / 4));
    }
    s
}

pub(crate) fn scales_of(b: &[u8; BLOCK_BYTES]) -> [i8; 16] {
    let mut s = [0u8; 12];
    s.copy_from_slice(&b[SCALES..SCALES + 12]);
    unpack_scales(&s)
}

pub fn dequantize_block(b: &[u8; BLOCK_BYTES], y: &mut [f32; BLOCK_ELEMS]) {
    let d = f16_at(b, 108);
    let sc = scales_of(b);
    let mut e = 0;
    let mut m = 1u8;
    for h in 0..2 {
        let q = &b[QS + h * 32..QS + h * 32 + 32];
        for j in 0..4 {
            let shift = 2 * j;
            for half in 0..2 {
                let dl = d * sc[h * 8 + j * 2 + half] as f32;
                for l in half * 16..half * 16 + 16 {
                    let lo = ((q[l] >> shift) & 3) as i32;
                    let v = lo - if b[l] & m != 0 { 0 } else { 4 };
                    y[e] = dl * v as f32;
                    e += 1;
                }
            }
            m <<= 1;
        }
    }
}

/// [`quantize_block_weighted`] with the default error weights ([`crate::weighted::error_weights`]).
pub fn quantize_block(x: &[f32; BLOCK_ELEMS], b: &mut [u8; BLOCK_BYTES]) {
    let mut w = [0f32; BLOCK_ELEMS];
    crate::weighted::error_weights(crate::GgmlType::Q3_K, x, None, &mut w);
    quantize_block_weighted(x, &w, b);
}

/// Weighted least-squares quantization; `w` ≥ 0 weighs each value's error.
pub fn quantize_block_weighted(
    x: &[f32; BLOCK_ELEMS],
    w: &[f32; BLOCK_ELEMS],
    b: &mut [u8; BLOCK_BYTES],
) {
    let a = quantize_sym(x, w, 4, 31);
    b.fill(0);
    for (e, &q) in a.q.iter().enumerate() {
        let u = (q + 4) as u8; // 0..8
        b[QS + (e / 128) * 32 + e % 32] |= (u & 3) << (2 * ((e % 128) / 32));
        if u & 4 != 0 {
            b[e % 32] |= 1 << (e / 32);
        }
    }
    let codes = a.sc.map(|s| (s as i32 + 32) as u8);
    b[SCALES..SCALES + 12].copy_from_slice(&pack_scales(&codes));
    put_f16(b, 108, a.d);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_block() {
        let mut b = [0u8; BLOCK_BYTES];
        b[108..110].copy_from_slice(&0x3800u16.to_le_bytes()); // d = 0.5
                                                               // scale 2 = code 1 (low nibble in byte 2, top bits in byte 10 bits 0-1 = 0)
        b[SCALES + 2] = 0x01;
        // scale 13 = code 0b11_0111: low nibble in high half of byte 5, top bits at 6-7 of byte 9
        b[SCALES + 5] = 0x70;
        b[SCALES + 9] = 0xC0;
        // elem 32: hmask byte 0 bit 1, qs byte 0 bits 2-3 -> q = 3
        b[0] |= 0b10;
        b[QS] |= 0b11 << 2;
        // elem 208 = half 1, group 2, l 16: hmask byte 16 bit 6, qs byte 48 bits 4-5 -> q = 1
        b[16] |= 1 << 6;
        b[QS + 48] |= 0b01 << 4;
        let mut y = [0f32; 256];
        dequantize_block(&b, &mut y);
        assert_eq!(y[0], 64.0); // code 0 -> -32; q = 0 - 4; 0.5 * -32 * -4
        assert_eq!(y[32], -46.5); // 0.5 * (1 - 32) * 3
        assert_eq!(y[33], 62.0); // 0.5 * -31 * -4
        assert_eq!(y[208], 11.5); // 0.5 * (55 - 32) * 1
        assert_eq!(y[209], -46.0); // 0.5 * 23 * -4
        assert_eq!(y[224], 64.0); // scale 14 is code 0 again
    }

    #[test]
    fn scale_packing_round_trip() {
        let codes: [u8; 16] = [0, 63, 1, 62, 17, 33, 48, 5, 60, 15, 16, 31, 32, 47, 2, 44];
        let s = pack_scales(&codes);
        let un = unpack_scales(&s);
        for k in 0..16 {
            assert_eq!(un[k] as i32, codes[k] as i32 - 32, "scale {k}");
        }
    }
}
