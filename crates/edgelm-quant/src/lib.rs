//! GGML/GGUF block quantization formats, bit-exact to llama.cpp's definitions.
//!
//! Row-level entry points ([`dequantize_row`], [`quantize_row`], [`dot_f32`]) check lengths and
//! dispatch on the type; the per-format modules expose single-block functions on fixed-size
//! arrays so SIMD kernels can be tested against them. [`int_dot`] holds the integer reference
//! dot products of weight blocks with quantized activations, as llama.cpp computes them.

#![forbid(unsafe_code)]
// Index loops mirror the packed layouts; `!(a > b)` is deliberate so NaN takes the safe branch.
#![allow(clippy::needless_range_loop, clippy::neg_cmp_op_on_partial_ord)]

pub mod fit;
pub mod float;
pub mod int_dot;
pub mod iq4_nl;
pub mod iq4_xs;
pub mod k_quants;
pub mod q4_0;
pub mod q4_1;
pub mod q5_0;
pub mod q5_1;
pub mod q8_0;
pub mod q8_1;
pub mod weighted;

pub use edgelm_gguf::GgmlType;
use float::{bf16, fp16, fp32};
pub use k_quants::{q2_k, q3_k, q4_k, q5_k, q6_k, q8_k};

#[cfg(test)]
mod tests;

#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    #[error("{op} is not supported for type {ty}")]
    Unsupported { ty: GgmlType, op: &'static str },
    #[error("{ty}: {n} elements is not a whole number of blocks of {block}")]
    PartialBlock {
        ty: GgmlType,
        n: usize,
        block: usize,
    },
    #[error("{ty}: {what} is {got} bytes, expected {expected}")]
    ByteLength {
        ty: GgmlType,
        what: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("importance has {got} values for a row of {expected}")]
    ImportanceLength { expected: usize, got: usize },
    #[error("{ty}: {n} elements overflows the addressable byte size")]
    TooLarge { ty: GgmlType, n: usize },
}

/// Bytes of `ty` holding `n` elements, or an error if `n` is not a whole number of blocks.
pub fn row_bytes(ty: GgmlType, n: usize) -> Result<usize, QuantError> {
    let block = ty.block_elems();
    if !n.is_multiple_of(block) {
        return Err(QuantError::PartialBlock { ty, n, block });
    }
    (n / block)
        .checked_mul(ty.block_bytes())
        .ok_or(QuantError::TooLarge { ty, n })
}

fn check_bytes(ty: GgmlType, what: &'static str, n: usize, got: usize) -> Result<(), QuantError> {
    let expected = row_bytes(ty, n)?;
    if expected != got {
        return Err(QuantError::ByteLength {
            ty,
            what,
            expected,
            got,
        });
    }
    Ok(())
}

/// Whether [`dequantize_row`] and [`dot_f32`] support the type.
pub fn can_dequantize(ty: GgmlType) -> bool {
    use GgmlType::*;
    matches!(
        ty,
        F32 | F16
            | BF16
            | Q4_0
            | Q4_1
            | Q5_0
            | Q5_1
            | Q8_0
            | Q8_1
            | Q2_K
            | Q3_K
            | Q4_K
            | Q5_K
            | Q6_K
            | Q8_K
            | IQ4_NL
            | IQ4_XS
    )
}

/// Whether [`quantize_row`] supports the type.
pub fn can_quantize(ty: GgmlType) -> bool {
    can_dequantize(ty)
}

/// Walks matching blocks of a byte row and an f32 row; callers have checked the lengths.
fn each_block<const B: usize, const E: usize>(
    mut src: &[u8],
    mut dst: &mut [f32],
    mut f: impl FnMut(&[u8; B], &mut [f32; E]),
) {
    while let (Some((sb, srest)), Some((db, drest))) = (
        src.split_first_chunk::<B>(),
        std::mem::take(&mut dst).split_first_chunk_mut::<E>(),
    ) {
        f(sb, db);
        src = srest;
        dst = drest;
    }
}

fn each_block_q<const B: usize, const E: usize>(
    mut src: &[f32],
    mut dst: &mut [u8],
    mut f: impl FnMut(&[f32; E], &mut [u8; B]),
) {
    while let (Some((sb, srest)), Some((db, drest))) = (
        src.split_first_chunk::<E>(),
        std::mem::take(&mut dst).split_first_chunk_mut::<B>(),
    ) {
        f(sb, db);
        src = srest;
        dst = drest;
    }
}

fn dot_blocks<const B: usize, const E: usize>(
    mut src: &[u8],
    mut x: &[f32],
    deq: impl Fn(&[u8; B], &mut [f32; E]),
) -> f32 {
    let mut buf = [0f32; E];
    let mut sum = 0f32;
    while let (Some((sb, srest)), Some((xb, xrest))) =
        (src.split_first_chunk::<B>(), x.split_first_chunk::<E>())
    {
        deq(sb, &mut buf);
        for (w, a) in buf.iter().zip(xb) {
            sum += w * a;
        }
        src = srest;
        x = xrest;
    }
    sum
}

/// Expands `$go!(module)` for the format module of `$ty`.
macro_rules! dispatch {
    ($ty:expr, $go:ident) => {{
        use GgmlType::*;
        match $ty {
            F32 => $go!(fp32),
            F16 => $go!(fp16),
            BF16 => $go!(bf16),
            Q4_0 => $go!(q4_0),
            Q4_1 => $go!(q4_1),
            Q5_0 => $go!(q5_0),
            Q5_1 => $go!(q5_1),
            Q8_0 => $go!(q8_0),
            Q8_1 => $go!(q8_1),
            Q2_K => $go!(q2_k),
            Q3_K => $go!(q3_k),
            Q4_K => $go!(q4_k),
            Q5_K => $go!(q5_k),
            Q6_K => $go!(q6_k),
            Q8_K => $go!(q8_k),
            IQ4_NL => $go!(iq4_nl),
            IQ4_XS => $go!(iq4_xs),
        }
    }};
}

/// Dequantize `dst.len()` elements from `src`, which must be exactly
/// `ty.bytes_for(dst.len())` bytes.
pub fn dequantize_row(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<(), QuantError> {
    check_bytes(ty, "source row", dst.len(), src.len())?;
    macro_rules! go {
        ($m:ident) => {
            each_block::<{ $m::BLOCK_BYTES }, { $m::BLOCK_ELEMS }>(src, dst, $m::dequantize_block)
        };
    }
    dispatch!(ty, go);
    Ok(())
}

/// Scalar reference dot product `sum_i w_i * x_i` of a quantized row with f32 activations:
/// each block is dequantized to f32 and products are accumulated in order in f32.
pub fn dot_f32(ty: GgmlType, src: &[u8], x: &[f32]) -> Result<f32, QuantError> {
    check_bytes(ty, "weight row", x.len(), src.len())?;
    macro_rules! go {
        ($m:ident) => {
            dot_blocks::<{ $m::BLOCK_BYTES }, { $m::BLOCK_ELEMS }>(src, x, $m::dequantize_block)
        };
    }
    Ok(dispatch!(ty, go))
}

/// Quantize a row whose length is a whole number of blocks into `dst`, which must be exactly
/// `ty.bytes_for(src.len())` bytes.
pub fn quantize_row(ty: GgmlType, src: &[f32], dst: &mut [u8]) -> Result<(), QuantError> {
    check_bytes(ty, "destination row", src.len(), dst.len())?;
    macro_rules! go {
        ($m:ident) => {
            each_block_q::<{ $m::BLOCK_BYTES }, { $m::BLOCK_ELEMS }>(src, dst, $m::quantize_block)
        };
    }
    dispatch!(ty, go);
    Ok(())
}

/// Quantize a weight row searching each block's rounding by weighted least squares
/// ([`weighted`]): `importance` holds one value per column (an importance matrix's mean squared
/// input), or none for uniform importance. Types without a search (floats, activation types)
/// convert as [`quantize_row`] does.
pub fn quantize_row_weighted(
    ty: GgmlType,
    src: &[f32],
    importance: Option<&[f32]>,
    dst: &mut [u8],
) -> Result<(), QuantError> {
    check_bytes(ty, "destination row", src.len(), dst.len())?;
    if let Some(m) = importance {
        if m.len() != src.len() {
            return Err(QuantError::ImportanceLength {
                expected: src.len(),
                got: m.len(),
            });
        }
    }
    let mut w = vec![0f32; src.len()];
    weighted::error_weights(ty, src, importance, &mut w);
    quantize_row_with_error_weights(ty, src, &w, dst)
}

/// Quantizes `src` into `dst` minimizing each block's error weighted by `w` (one weight per
/// value, as [`weighted::error_weights`] makes them from a whole row): for callers that round
/// a row piecewise and must weigh every piece by the row's statistics.
pub fn quantize_row_with_error_weights(
    ty: GgmlType,
    src: &[f32],
    w: &[f32],
    dst: &mut [u8],
) -> Result<(), QuantError> {
    check_bytes(ty, "destination row", src.len(), dst.len())?;
    if w.len() != src.len() {
        return Err(QuantError::ImportanceLength {
            expected: src.len(),
            got: w.len(),
        });
    }
    macro_rules! go {
        ($m:ident) => {{
            let (mut x, mut w, mut b) = (src, &w[..], &mut dst[..]);
            while let (Some((xb, xr)), Some((wb, wr)), Some((bb, br))) = (
                x.split_first_chunk::<{ $m::BLOCK_ELEMS }>(),
                w.split_first_chunk::<{ $m::BLOCK_ELEMS }>(),
                std::mem::take(&mut b).split_first_chunk_mut::<{ $m::BLOCK_BYTES }>(),
            ) {
                $m::quantize_block_weighted(xb, wb, bb);
                (x, w, b) = (xr, wr, br);
            }
        }};
    }
    use GgmlType::*;
    match ty {
        Q4_0 => go!(q4_0),
        Q4_1 => go!(q4_1),
        Q5_0 => go!(q5_0),
        Q5_1 => go!(q5_1),
        Q8_0 => go!(q8_0),
        Q2_K => go!(q2_k),
        Q3_K => go!(q3_k),
        Q4_K => go!(q4_k),
        Q5_K => go!(q5_k),
        Q6_K => go!(q6_k),
        IQ4_NL => go!(iq4_nl),
        IQ4_XS => go!(iq4_xs),
        F32 | F16 | BF16 | Q8_1 | Q8_K => return quantize_row(ty, src, dst),
    }
    Ok(())
}

/// Reads the little-endian f16 at `off`.
#[inline]
pub(crate) fn f16_at(b: &[u8], off: usize) -> f32 {
    half::f16::from_le_bytes([b[off], b[off + 1]]).to_f32()
}

#[inline]
pub(crate) fn put_f16(b: &mut [u8], off: usize, v: f32) {
    b[off..off + 2].copy_from_slice(&half::f16::from_f32(v).to_le_bytes());
}

/// Rounds to nearest, ties to even, like ggml's `nearest_int` (which is exact for the
/// magnitudes it is used on); saturates instead of misbehaving out of range.
#[inline]
pub(crate) fn nearest_int(v: f32) -> i32 {
    v.round_ties_even() as i32
}
