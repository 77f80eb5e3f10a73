//! The interleaved layout of legacy block formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0), into which the
//! AVX-512 fast path repacks weights, and the matching layout of quantized activations.
//!
//! In GGUF order each 32-element block is contiguous, so a SIMD dot sums a block's products
//! across lanes and needs one horizontal step and one scale multiply per block. Interleaved,
//! a row is cut into groups of up to [`GROUP`] blocks, and quant byte `4·g + q` of block `b`
//! of a group sits at byte `4·b + q` of the group's "image" `g` (`g < 8`): one 512-bit integer
//! dot of an image against the activations' image puts block `b`'s partial sum in 32-bit lane
//! `b`, so the eight images of a group accumulate in integers, and one convert and one FMA
//! scale sixteen blocks at once.
//!
//! A group of `nt` blocks, byte sizes (the row keeps its GGUF size, so memory plans hold):
//! - fifth bits (Q5_0, Q5_1): `4·nt` bytes, a bit stream of eight `4·nt`-bit masks, mask `g`
//!   bit `4·b + q` = the fifth bit of element `4·g + q` of block `b`;
//! - quants: nibble types four images of `4·nt` bytes, low nibble = element `4·h + q`, high
//!   nibble = element `16 + 4·h + q` (the GGUF pairing); Q8_0 eight images of `4·nt` bytes
//!   holding `q + 128` (so every weight is unsigned);
//! - `d` of each block as f16 (`2·nt` bytes), then `m` (Q4_1, Q5_1) likewise.
//!
//! Weights are unsigned codes `u`: the signed types' value is `d·(u − offset)` (offset 8, 16,
//! 128), folded into the activations as `−offset·Σa` per block, an exact integer.
//!
//! Activations, per token and group (padded to [`GROUP`] blocks with zeros): eight 64-byte
//! images of i8 quants, then `d` as 16 f32, then 16 lanes of the block term: `−offset·Σa` as
//! i32 for the signed types, `s = d·Σa` (Q8_1's f16 field) as f32 for Q4_1 / Q5_1.

use edgelm_quant::GgmlType;
use half::f16;

/// Blocks per interleaved group: one per 32-bit lane of a 512-bit register.
pub const GROUP: usize = 16;
/// Bytes of one token's packed activations per group.
pub const ACT_GROUP_BYTES: usize = 8 * 64 + 2 * 64;

/// What the layout needs to know of a legacy format.
#[derive(Clone, Copy)]
pub(crate) struct Format {
    /// GGUF bytes per block.
    pub block: usize,
    /// Quants are nibbles (else bytes).
    pub nibbles: bool,
    /// A fifth bit per element.
    pub high: bool,
    /// A min per block (else an offset).
    pub min: bool,
    /// Subtracted from the unsigned code for formats without a min.
    pub offset: i32,
}

pub(crate) const fn format(ty: GgmlType) -> Option<Format> {
    use GgmlType::*;
    let (block, nibbles, high, min, offset) = match ty {
        Q4_0 => (18, true, false, false, 8),
        Q4_1 => (20, true, false, true, 0),
        Q5_0 => (22, true, true, false, 16),
        Q5_1 => (24, true, true, true, 0),
        Q8_0 => (34, false, false, false, 128),
        _ => return None,
    };
    Some(Format {
        block,
        nibbles,
        high,
        min,
        offset,
    })
}

/// Byte offsets inside a group of `nt` blocks.
#[derive(Clone, Copy)]
pub(crate) struct GroupLayout {
    pub high: usize,
    pub quants: usize,
    pub d: usize,
    pub m: usize,
    pub len: usize,
}

#[inline(always)]
pub(crate) const fn group_layout(f: Format, nt: usize) -> GroupLayout {
    let high = if f.high { 4 * nt } else { 0 };
    let quants = if f.nibbles { 16 * nt } else { 32 * nt };
    let d = high + quants;
    let m = d + 2 * nt;
    let len = m + if f.min { 2 * nt } else { 0 };
    GroupLayout {
        high: 0,
        quants: high,
        d,
        m,
        len,
    }
}

/// GGUF block field offsets: (d, m, qh, qs).
const fn fields(ty: GgmlType) -> (usize, Option<usize>, Option<usize>, usize) {
    use GgmlType::*;
    match ty {
        Q4_0 => (0, None, None, 2),
        Q4_1 => (0, Some(2), None, 4),
        Q5_0 => (0, None, Some(2), 6),
        Q5_1 => (0, Some(2), Some(4), 8),
        _ => (0, None, None, 2),
    }
}

/// Error for a row that is not whole blocks of an interleavable type.
#[derive(Debug, thiserror::Error)]
#[error("{ty} row of {len} bytes cannot be interleaved")]
pub struct LayoutError {
    ty: GgmlType,
    len: usize,
}

fn check(ty: GgmlType, a: &[u8], b: &[u8]) -> Result<Format, LayoutError> {
    format(ty)
        .filter(|f| a.len() == b.len() && a.len().is_multiple_of(f.block))
        .ok_or(LayoutError { ty, len: a.len() })
}

/// Repack one GGUF row (`src`) into the interleaved layout (`dst`, the same length).
pub fn interleave_row(ty: GgmlType, src: &[u8], dst: &mut [u8]) -> Result<(), LayoutError> {
    let f = check(ty, src, dst)?;
    let (fd, fm, fh, fq) = fields(ty);
    let nb = src.len() / f.block;
    let mut out = 0;
    for g0 in (0..nb).step_by(GROUP) {
        let nt = (nb - g0).min(GROUP);
        let lay = group_layout(f, nt);
        let grp = &mut dst[out..out + lay.len];
        grp.fill(0);
        // The fifth-bit masks: block b's element 4g + q is bit 4b + q of mask g.
        let mut masks = [0u64; 8];
        for b in 0..nt {
            let blk = &src[(g0 + b) * f.block..(g0 + b + 1) * f.block];
            grp[lay.d + 2 * b..lay.d + 2 * b + 2].copy_from_slice(&blk[fd..fd + 2]);
            if let Some(m) = fm {
                grp[lay.m + 2 * b..lay.m + 2 * b + 2].copy_from_slice(&blk[m..m + 2]);
            }
            if f.nibbles {
                for h in 0..4 {
                    let at = lay.quants + h * 4 * nt + 4 * b;
                    grp[at..at + 4].copy_from_slice(&blk[fq + 4 * h..fq + 4 * h + 4]);
                }
            } else {
                for g in 0..8 {
                    let at = lay.quants + g * 4 * nt + 4 * b;
                    for q in 0..4 {
                        grp[at + q] = blk[fq + 4 * g + q] ^ 0x80;
                    }
                }
            }
            if let Some(h) = fh {
                let qh = u32::from_le_bytes([blk[h], blk[h + 1], blk[h + 2], blk[h + 3]]);
                for (g, m) in masks.iter_mut().enumerate() {
                    *m |= ((qh >> (4 * g) & 15) as u64) << (4 * b);
                }
            }
        }
        if f.high {
            // Mask g occupies bits g·4nt .. (g+1)·4nt of the stream.
            for (g, m) in masks.iter().enumerate() {
                let bit = lay.high * 8 + g * 4 * nt;
                let (byte, shift) = (bit / 8, bit % 8);
                let shifted = (*m as u128) << shift;
                let n = (4 * nt + shift).div_ceil(8);
                for (i, o) in grp[byte..byte + n].iter_mut().enumerate() {
                    *o |= (shifted >> (8 * i)) as u8;
                }
            }
        }
        out += lay.len;
    }
    Ok(())
}

/// The inverse of [`interleave_row`].
pub fn deinterleave_row(ty: GgmlType, src: &[u8], dst: &mut [u8]) -> Result<(), LayoutError> {
    let f = check(ty, src, dst)?;
    let (fd, fm, fh, fq) = fields(ty);
    let nb = src.len() / f.block;
    let mut at_group = 0;
    for g0 in (0..nb).step_by(GROUP) {
        let nt = (nb - g0).min(GROUP);
        let lay = group_layout(f, nt);
        let grp = &src[at_group..at_group + lay.len];
        for b in 0..nt {
            let blk = &mut dst[(g0 + b) * f.block..(g0 + b + 1) * f.block];
            blk[fd..fd + 2].copy_from_slice(&grp[lay.d + 2 * b..lay.d + 2 * b + 2]);
            if let Some(m) = fm {
                blk[m..m + 2].copy_from_slice(&grp[lay.m + 2 * b..lay.m + 2 * b + 2]);
            }
            if f.nibbles {
                for h in 0..4 {
                    let at = lay.quants + h * 4 * nt + 4 * b;
                    blk[fq + 4 * h..fq + 4 * h + 4].copy_from_slice(&grp[at..at + 4]);
                }
            } else {
                for g in 0..8 {
                    let at = lay.quants + g * 4 * nt + 4 * b;
                    for q in 0..4 {
                        blk[fq + 4 * g + q] = grp[at + q] ^ 0x80;
                    }
                }
            }
            if let Some(h) = fh {
                let mut qh = 0u32;
                for e in 0..32 {
                    let bit = lay.high * 8 + (e / 4) * 4 * nt + 4 * b + e % 4;
                    qh |= ((grp[bit / 8] >> (bit % 8) & 1) as u32) << e;
                }
                blk[h..h + 4].copy_from_slice(&qh.to_le_bytes());
            }
        }
        at_group += lay.len;
    }
    Ok(())
}

/// Bytes of one token's packed activations for rows of `cols` elements.
pub fn packed_act_bytes(cols: usize) -> usize {
    (cols / 32).div_ceil(GROUP) * ACT_GROUP_BYTES
}

/// Pack one token's activations, quantized in the weight type's activation format (Q8_0, or
/// Q8_1 for Q4_1 / Q5_1), into the interleaved activation layout for weight type `ty`.
/// `dst` holds [`packed_act_bytes`]; every byte of it is written.
pub fn pack_activations(ty: GgmlType, src: &[u8], dst: &mut [u8]) -> Result<(), LayoutError> {
    let f = format(ty).ok_or(LayoutError { ty, len: src.len() })?;
    // Q8_1: d, s, 32 quants; Q8_0: d, 32 quants.
    let (act_block, qs) = if f.min { (36, 4) } else { (34, 2) };
    let nb = src.len() / act_block;
    if !src.len().is_multiple_of(act_block) || dst.len() != packed_act_bytes(nb * 32) {
        return Err(LayoutError { ty, len: src.len() });
    }
    dst.fill(0);
    for (b, blk) in src.chunks_exact(act_block).enumerate() {
        let grp = &mut dst[b / GROUP * ACT_GROUP_BYTES..][..ACT_GROUP_BYTES];
        let lane = b % GROUP;
        for g in 0..8 {
            grp[g * 64 + 4 * lane..g * 64 + 4 * lane + 4]
                .copy_from_slice(&blk[qs + 4 * g..qs + 4 * g + 4]);
        }
        let d = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
        grp[512 + 4 * lane..512 + 4 * lane + 4].copy_from_slice(&d.to_le_bytes());
        let term = if f.min {
            f16::from_le_bytes([blk[2], blk[3]]).to_f32().to_le_bytes()
        } else {
            let sum: i32 = blk[qs..qs + 32].iter().map(|&q| q as i8 as i32).sum();
            (-f.offset * sum).to_le_bytes()
        };
        grp[576 + 4 * lane..576 + 4 * lane + 4].copy_from_slice(&term);
    }
    Ok(())
}

/// Scalar dot of an interleaved weight row with one packed activation row, in the kernels'
/// arithmetic (integer sums per block, one f32 scale each): the reference the SIMD kernels are
/// tested against, besides `edgelm_quant::int_dot` on the GGUF layout.
pub fn packed_dot(ty: GgmlType, w: &[u8], a: &[u8]) -> Result<f32, LayoutError> {
    let f = format(ty).ok_or(LayoutError { ty, len: w.len() })?;
    let nb = w.len() / f.block;
    if !w.len().is_multiple_of(f.block) || a.len() != packed_act_bytes(nb * 32) {
        return Err(LayoutError { ty, len: w.len() });
    }
    let f16_at = |p: &[u8], i: usize| f16::from_le_bytes([p[i], p[i + 1]]).to_f32();
    let word = |p: &[u8], i: usize| [p[i], p[i + 1], p[i + 2], p[i + 3]];
    let mut sum = 0f32;
    let mut at = 0;
    for g0 in (0..nb).step_by(GROUP) {
        let nt = (nb - g0).min(GROUP);
        let lay = group_layout(f, nt);
        let grp = &w[at..at + lay.len];
        let act = &a[g0 / GROUP * ACT_GROUP_BYTES..][..ACT_GROUP_BYTES];
        for b in 0..nt {
            let mut int = if f.min {
                0
            } else {
                i32::from_le_bytes(word(act, 576 + 4 * b))
            };
            for g in 0..8 {
                for q in 0..4 {
                    let i = 4 * b + q;
                    let code = if f.nibbles {
                        let byte = grp[lay.quants + (g % 4) * 4 * nt + i];
                        if g < 4 {
                            byte & 15
                        } else {
                            byte >> 4
                        }
                    } else {
                        grp[lay.quants + g * 4 * nt + i]
                    };
                    let bit = lay.high * 8 + g * 4 * nt + i;
                    let fifth = f.high && grp[bit / 8] >> (bit % 8) & 1 == 1;
                    let u = code as i32 + if fifth { 16 } else { 0 };
                    int += u * act[g * 64 + i] as i8 as i32;
                }
            }
            let da = f32::from_le_bytes(word(act, 512 + 4 * b));
            sum += int as f32 * (f16_at(grp, lay.d + 2 * b) * da);
            if f.min {
                let s = f32::from_le_bytes(word(act, 576 + 4 * b));
                sum += f16_at(grp, lay.m + 2 * b) * s;
            }
        }
        at += lay.len;
    }
    Ok(sum)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::test_rng::Rng;
    use edgelm_quant::{int_dot, quantize_row};

    pub(crate) const TYPES: [GgmlType; 5] = [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
    ];

    fn random_row(rng: &mut Rng, ty: GgmlType, nb: usize) -> Vec<u8> {
        let x: Vec<f32> = (0..nb * 32).map(|_| rng.weight() * 3.0).collect();
        let mut w = vec![0u8; nb * ty.block_bytes()];
        quantize_row(ty, &x, &mut w).unwrap();
        w
    }

    #[test]
    fn interleave_round_trips_and_keeps_the_size() {
        let mut rng = Rng(7);
        for ty in TYPES {
            for nb in [1, 2, 5, 15, 16, 17, 28, 33, 152] {
                // Raw random bytes: every bit of every field must survive.
                let src: Vec<u8> = (0..nb * ty.block_bytes())
                    .map(|_| rng.next() as u8)
                    .collect();
                let mut packed = vec![0u8; src.len()];
                interleave_row(ty, &src, &mut packed).unwrap();
                let mut back = vec![0u8; src.len()];
                deinterleave_row(ty, &packed, &mut back).unwrap();
                assert_eq!(back, src, "{ty:?} {nb} blocks");
            }
        }
    }

    #[test]
    fn packed_dot_equals_the_integer_reference() {
        let mut rng = Rng(11);
        for ty in TYPES {
            let act_ty = int_dot::activation_type(ty);
            for nb in [1, 3, 16, 18, 28, 40] {
                let w = random_row(&mut rng, ty, nb);
                let x: Vec<f32> = (0..nb * 32).map(|_| rng.weight()).collect();
                let mut a = vec![0u8; nb * act_ty.block_bytes()];
                quantize_row(act_ty, &x, &mut a).unwrap();
                let mut wp = vec![0u8; w.len()];
                interleave_row(ty, &w, &mut wp).unwrap();
                let mut ap = vec![0u8; packed_act_bytes(nb * 32)];
                pack_activations(ty, &a, &mut ap).unwrap();
                let got = packed_dot(ty, &wp, &ap).unwrap();
                let want = int_dot::vec_dot(ty, &w, &a).unwrap();
                let scale: f32 = want.abs().max(1.0);
                assert!(
                    (got - want).abs() <= 1e-5 * scale * nb as f32,
                    "{ty:?} {nb} blocks: packed {got} reference {want}"
                );
            }
        }
    }

    #[test]
    fn wrong_lengths_are_errors() {
        let mut out = vec![0u8; 17];
        assert!(interleave_row(GgmlType::Q4_0, &[0; 17], &mut out).is_err());
        assert!(interleave_row(GgmlType::Q4_K, &[0; 144], &mut [0; 144]).is_err());
        assert!(pack_activations(GgmlType::Q8_0, &[0; 34], &mut [0; 10]).is_err());
    }
}
