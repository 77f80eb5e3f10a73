//! The interleaved layout of the 32-element block formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL),
//! into which the fast paths repack weights, and the matching layout of quantized activations.
//!
//! In GGUF order each row's 32-element blocks are contiguous, so a SIMD dot sums one row's
//! products across lanes and needs a horizontal sum per row and token. Interleaved, the matrix
//! is cut into panels of [`PANEL`] rows; within a panel, block `b` of all sixteen rows forms one
//! tile in which 32-bit lane `r` holds row `r`'s bytes. One 512-bit integer dot of a tile image
//! against four activation bytes broadcast to every lane advances sixteen rows at once, and
//! the sixteen results of a token leave as one store: no horizontal sums at all.
//!
//! A panel keeps the bytes of its sixteen GGUF rows (tile `b` at `16·block·b`), so memory plans
//! hold and any run of whole panels can be repacked on its own. A last panel of fewer than
//! sixteen rows stays in GGUF order. A tile, byte offsets:
//! - fifth bits (Q5_0, Q5_1): a 64-byte bit plane lined up with the images: bit `g` of byte
//!   `4·r + q` = the fifth bit of row `r`'s element `4·g + q` (image `g`'s byte there), so one
//!   shift and mask put image `g`'s fifth bits at bit 4 of its bytes (AVX2), or one test makes
//!   its 64-bit mask (AVX-512);
//! - quants: nibble types four 64-byte images, lane `r` of image `h` = row `r`'s quant bytes
//!   `4·h..4·h + 4` (low nibbles elements `4·h + q`, high nibbles `16 + 4·h + q`, the GGUF
//!   pairing); Q8_0 eight images of `q + 128` (so every weight is unsigned);
//! - `d` of each row as f16 (32 bytes), then `m` (Q4_1, Q5_1) likewise.
//!
//! Weights are unsigned codes `u`: the signed types' value is `d·(u − offset)` (offset 8, 16,
//! 128), folded into the activations as `−offset·Σa` per block, an exact integer. IQ4_NL keeps
//! its nibbles as Q4_0 does; the kernels map each through the 16-level grid (one byte shuffle),
//! to `GRID + 128` with offset 128 where they need unsigned codes.
//!
//! Activations, per token and block ([`ACT_BLOCK_BYTES`]): the 32 i8 quants, `d` as f32, then
//! the block term: `−offset·Σa` as i32 for the signed types, `s = d·Σa` (Q8_1's f16 field) as
//! f32 for Q4_1 / Q5_1.
//!
//! K-quants (Q4_K, Q5_K, Q6_K, and IQ4_XS) are panelled the same way, one tile per 256-element
//! super-block:
//! each run of quant or scale bytes becomes 64-byte images of four bytes per row ([`KFormat`]),
//! the f16 fields (and IQ4_XS's 16-bit high scale bits) 32-byte vectors. Their activations (from
//! Q8_K), per super-block: the 256 quants, `d` as f32, then Q4_K's / Q5_K's / IQ4_XS's eight sums
//! of 32 quants as i16, or Q6_K's sixteen `−32·Σa` of 16 quants as i32 (the code offset, folded
//! in as for the legacy types). IQ4_XS's codes are `GRID[nibble] + 128`: its offset 128 times
//! each sub-block's scale and sum is taken off in integers.

use edgelm_quant::GgmlType;
use half::f16;

/// The version of this layout: bumped whenever the bytes of a repacked weight change, so
/// repack caches written by other versions are rewritten rather than misread.
pub const LAYOUT_VERSION: u32 = 2;

/// Rows per interleaved panel: one per 32-bit lane of a 512-bit register.
pub const PANEL: usize = 16;
/// Bytes of one token's packed activations per 32-element block.
pub const ACT_BLOCK_BYTES: usize = 40;

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
    /// Nibbles index IQ4_NL's grid: the code is `GRID[nibble] + 128`.
    pub grid: bool,
}

pub(crate) const fn format(ty: GgmlType) -> Option<Format> {
    use GgmlType::*;
    let (block, nibbles, high, min, offset) = match ty {
        Q4_0 => (18, true, false, false, 8),
        Q4_1 => (20, true, false, true, 0),
        Q5_0 => (22, true, true, false, 16),
        Q5_1 => (24, true, true, true, 0),
        Q8_0 => (34, false, false, false, 128),
        IQ4_NL => (18, true, false, false, 128),
        _ => return None,
    };
    Some(Format {
        block,
        nibbles,
        high,
        min,
        offset,
        grid: matches!(ty, IQ4_NL),
    })
}

/// A k-quant's tile: runs of `bytes` at GGUF block offset `from` become `bytes / 4` images
/// at tile offset `to` (`words`); f16 fields at `from` become 32 bytes at `to` (`halves`).
pub(crate) struct KFormat {
    pub block: usize,
    pub words: &'static [(usize, usize, usize)],
    pub halves: &'static [(usize, usize)],
    /// Bytes of one super-block of packed activations.
    pub act: usize,
}

/// Q4_K: d, dmin, 12 bytes of 6-bit scales and mins, 128 bytes of nibbles. The tile puts the
/// scales and f16 fields first, in the order the kernel reads them.
pub(crate) const Q4_K_TILE: KFormat = KFormat {
    block: 144,
    words: &[(4, 12, 0), (16, 128, 256)],
    halves: &[(0, 192), (2, 224)],
    act: 256 + 4 + 16,
};

/// Q5_K: d, dmin, 12 bytes of scales and mins, 32 bytes of fifth bits, 128 bytes of nibbles
/// (in the tile: scales, d, dmin, fifth bits, nibbles).
pub(crate) const Q5_K_TILE: KFormat = KFormat {
    block: 176,
    words: &[(4, 12, 0), (16, 32, 256), (48, 128, 768)],
    halves: &[(0, 192), (2, 224)],
    act: 256 + 4 + 16,
};

/// Q6_K: 128 bytes of low nibbles, 64 of high bit pairs, 16 i8 scales, d. The quant images go
/// in the order the kernel reads them: for each half `n` and sixteenth `h` of its elements,
/// the four images of low nibbles of elements `l`, the four of elements `l + 32`, and the four
/// of their high bits (768 contiguous bytes read together; decoding streams the tile).
pub(crate) const Q6_K_TILE: KFormat = KFormat {
    block: 210,
    words: &[
        (0, 16, 0),
        (32, 16, 256),
        (128, 16, 512),
        (16, 16, 768),
        (48, 16, 1024),
        (144, 16, 1280),
        (64, 16, 1536),
        (96, 16, 1792),
        (160, 16, 2048),
        (80, 16, 2304),
        (112, 16, 2560),
        (176, 16, 2816),
        (192, 16, 3072),
    ],
    halves: &[(208, 3328)],
    act: 256 + 4 + 64,
};

/// IQ4_XS: d, 16 bits of high scale bits, 4 bytes of low scale nibbles, 128 bytes of nibbles
/// (sub-block j's 32 elements in bytes 16j..16j + 16, paired as in IQ4_NL). The tile: the low
/// scale image, the 32 nibble images, then d and the high scale bits as 16-bit vectors.
pub(crate) const IQ4_XS_TILE: KFormat = KFormat {
    block: 136,
    words: &[(4, 4, 0), (8, 128, 64)],
    halves: &[(0, 2112), (2, 2144)],
    act: 256 + 4 + 16,
};

pub(crate) const fn k_format(ty: GgmlType) -> Option<&'static KFormat> {
    match ty {
        GgmlType::IQ4_XS => Some(&IQ4_XS_TILE),
        GgmlType::Q4_K => Some(&Q4_K_TILE),
        GgmlType::Q5_K => Some(&Q5_K_TILE),
        GgmlType::Q6_K => Some(&Q6_K_TILE),
        _ => None,
    }
}

/// GGUF bytes and elements per block of an interleavable type.
#[inline(always)]
pub(crate) fn block_shape(ty: GgmlType) -> Option<(usize, usize)> {
    format(ty)
        .map(|f| (f.block, 32))
        .or(k_format(ty).map(|k| (k.block, 256)))
}

/// What every panel row dot does before its SIMD loop (see [`crate::qdot::InterleavedDotFn`]):
/// the lengths of the panel and of each packed token asserted once; a last partial panel, in
/// GGUF order, computed here with [`packed_dot`]. For a whole panel, the tiles per row.
///
/// # Safety
/// `out` is valid for every (row, token) of the call.
#[inline(always)]
pub(crate) unsafe fn whole_panel_tiles(
    ty: GgmlType,
    w: &[u8],
    row_bytes: usize,
    n_rows: usize,
    acts: &[&[u8]],
    out: crate::qdot::Out,
) -> Option<usize> {
    let (block, block_len) = block_shape(ty)?;
    let nb = row_bytes / block;
    let act_bytes = packed_act_bytes(ty, nb * block_len);
    assert!(
        n_rows <= PANEL
            && n_rows * row_bytes <= w.len()
            && acts.iter().all(|a| a.len() >= act_bytes),
        "interleaved row_dot: weights or activations shorter than the panel"
    );
    if n_rows == PANEL {
        return Some(nb);
    }
    for r in 0..n_rows {
        let row = &w[r * row_bytes..(r + 1) * row_bytes];
        for (j, a) in acts.iter().enumerate() {
            let v = packed_dot(ty, row, &a[..act_bytes]).unwrap_or(f32::NAN);
            out.put(r, j, &[v]);
        }
    }
    None
}

/// Byte offsets inside a tile (one block of a panel's sixteen rows).
#[derive(Clone, Copy)]
pub(crate) struct TileLayout {
    pub high: usize,
    pub quants: usize,
    pub d: usize,
    pub m: usize,
    /// `PANEL · block`.
    pub len: usize,
}

#[inline(always)]
pub(crate) const fn tile_layout(f: Format) -> TileLayout {
    let quants = if f.high { 64 } else { 0 };
    let d = quants + if f.nibbles { 256 } else { 512 };
    let m = d + 2 * PANEL;
    TileLayout {
        high: 0,
        quants,
        d,
        m,
        len: PANEL * f.block,
    }
}

/// GGUF block field offsets: (m, qh, qs); `d` is always first.
const fn fields(ty: GgmlType) -> (Option<usize>, Option<usize>, usize) {
    use GgmlType::*;
    match ty {
        Q4_1 => (Some(2), None, 4),
        Q5_0 => (None, Some(2), 6),
        Q5_1 => (Some(2), Some(4), 8),
        _ => (None, None, 2),
    }
}

/// Error for bytes that are not whole rows of an interleavable type.
#[derive(Debug, thiserror::Error)]
#[error("{len} bytes of {ty} are not whole rows of {row_bytes} bytes of an interleavable type")]
pub struct LayoutError {
    ty: GgmlType,
    len: usize,
    row_bytes: usize,
}

/// The type's GGUF block bytes, once `a` and `b` are equally long whole rows of them.
fn check(ty: GgmlType, row_bytes: usize, a: &[u8], b: &[u8]) -> Result<usize, LayoutError> {
    block_shape(ty)
        .map(|(block, _)| block)
        .filter(|&block| {
            a.len() == b.len()
                && row_bytes > 0
                && row_bytes.is_multiple_of(block)
                && a.len().is_multiple_of(row_bytes)
        })
        .ok_or(LayoutError {
            ty,
            len: a.len(),
            row_bytes,
        })
}

/// Repack rows of `row_bytes` in GGUF order (`src`) into the interleaved layout (`dst`, the
/// same length): whole panels interleaved, a last partial panel copied as it is.
pub fn interleave_rows(
    ty: GgmlType,
    row_bytes: usize,
    src: &[u8],
    dst: &mut [u8],
) -> Result<(), LayoutError> {
    let block = check(ty, row_bytes, src, dst)?;
    let panel_bytes = PANEL * row_bytes;
    let whole = src.len() / panel_bytes * panel_bytes;
    for (s, d) in src[..whole]
        .chunks_exact(panel_bytes)
        .zip(dst[..whole].chunks_exact_mut(panel_bytes))
    {
        for r in 0..PANEL {
            let row = &s[r * row_bytes..(r + 1) * row_bytes];
            for (b, blk) in row.chunks_exact(block).enumerate() {
                let tile = &mut d[b * PANEL * block..(b + 1) * PANEL * block];
                match (format(ty), k_format(ty)) {
                    (Some(f), _) => put_block(ty, f, blk, r, tile),
                    (_, Some(k)) => put_k_block(k, blk, r, tile),
                    _ => {}
                }
            }
        }
    }
    dst[whole..].copy_from_slice(&src[whole..]);
    Ok(())
}

/// GGUF block `blk` as row `r` of `tile`.
fn put_block(ty: GgmlType, f: Format, blk: &[u8], r: usize, tile: &mut [u8]) {
    let lay = tile_layout(f);
    let (fm, fh, fq) = fields(ty);
    tile[lay.d + 2 * r..lay.d + 2 * r + 2].copy_from_slice(&blk[..2]);
    if let Some(m) = fm {
        tile[lay.m + 2 * r..lay.m + 2 * r + 2].copy_from_slice(&blk[m..m + 2]);
    }
    let images = if f.nibbles { 4 } else { 8 };
    for h in 0..images {
        let at = lay.quants + 64 * h + 4 * r;
        for q in 0..4 {
            let byte = blk[fq + 4 * h + q];
            tile[at + q] = if f.nibbles { byte } else { byte ^ 0x80 };
        }
    }
    if let Some(h) = fh {
        let qh = u32::from_le_bytes([blk[h], blk[h + 1], blk[h + 2], blk[h + 3]]);
        for q in 0..4 {
            tile[lay.high + 4 * r + q] =
                (0..8).fold(0u8, |plane, g| plane | ((qh >> (4 * g + q) & 1) as u8) << g);
        }
    }
}

/// GGUF k-quant block `blk` as row `r` of `tile`.
fn put_k_block(k: &KFormat, blk: &[u8], r: usize, tile: &mut [u8]) {
    for &(from, bytes, to) in k.words {
        for w in 0..bytes / 4 {
            let at = to + 64 * w + 4 * r;
            tile[at..at + 4].copy_from_slice(&blk[from + 4 * w..from + 4 * w + 4]);
        }
    }
    for &(from, to) in k.halves {
        tile[to + 2 * r..to + 2 * r + 2].copy_from_slice(&blk[from..from + 2]);
    }
}

/// Row `r` of a k-quant `tile` as a GGUF block.
fn get_k_block(k: &KFormat, tile: &[u8], r: usize, blk: &mut [u8]) {
    for &(from, bytes, to) in k.words {
        for w in 0..bytes / 4 {
            let at = to + 64 * w + 4 * r;
            blk[from + 4 * w..from + 4 * w + 4].copy_from_slice(&tile[at..at + 4]);
        }
    }
    for &(from, to) in k.halves {
        blk[from..from + 2].copy_from_slice(&tile[to + 2 * r..to + 2 * r + 2]);
    }
}

/// Row `r` of `tile` as a GGUF block.
fn get_block(ty: GgmlType, f: Format, tile: &[u8], r: usize, blk: &mut [u8]) {
    let lay = tile_layout(f);
    let (fm, fh, fq) = fields(ty);
    blk[..2].copy_from_slice(&tile[lay.d + 2 * r..lay.d + 2 * r + 2]);
    if let Some(m) = fm {
        blk[m..m + 2].copy_from_slice(&tile[lay.m + 2 * r..lay.m + 2 * r + 2]);
    }
    let images = if f.nibbles { 4 } else { 8 };
    for h in 0..images {
        let at = lay.quants + 64 * h + 4 * r;
        for q in 0..4 {
            let byte = tile[at + q];
            blk[fq + 4 * h + q] = if f.nibbles { byte } else { byte ^ 0x80 };
        }
    }
    if let Some(h) = fh {
        let mut qh = 0u32;
        for q in 0..4 {
            let plane = tile[lay.high + 4 * r + q];
            for g in 0..8 {
                qh |= ((plane >> g & 1) as u32) << (4 * g + q);
            }
        }
        blk[h..h + 4].copy_from_slice(&qh.to_le_bytes());
    }
}

/// The inverse of [`interleave_rows`].
pub fn deinterleave_rows(
    ty: GgmlType,
    row_bytes: usize,
    src: &[u8],
    dst: &mut [u8],
) -> Result<(), LayoutError> {
    check(ty, row_bytes, src, dst)?;
    for (r, out) in dst.chunks_exact_mut(row_bytes).enumerate() {
        deinterleave_row(ty, row_bytes, src, r, out)?;
    }
    Ok(())
}

/// Row `r` (GGUF order, into `dst` of `row_bytes`) of the interleaved rows `src`.
pub fn deinterleave_row(
    ty: GgmlType,
    row_bytes: usize,
    src: &[u8],
    r: usize,
    dst: &mut [u8],
) -> Result<(), LayoutError> {
    let bad = LayoutError {
        ty,
        len: src.len(),
        row_bytes,
    };
    let block = check(ty, row_bytes, src, src)?;
    if dst.len() != row_bytes || (r + 1) * row_bytes > src.len() {
        return Err(bad);
    }
    let panel_bytes = PANEL * row_bytes;
    let (p, lane) = (r / PANEL, r % PANEL);
    if (p + 1) * panel_bytes > src.len() {
        dst.copy_from_slice(&src[r * row_bytes..(r + 1) * row_bytes]);
        return Ok(());
    }
    let panel = &src[p * panel_bytes..(p + 1) * panel_bytes];
    for (b, blk) in dst.chunks_exact_mut(block).enumerate() {
        let tile = &panel[b * PANEL * block..(b + 1) * PANEL * block];
        match (format(ty), k_format(ty)) {
            (Some(f), _) => get_block(ty, f, tile, lane, blk),
            (_, Some(k)) => get_k_block(k, tile, lane, blk),
            _ => {}
        }
    }
    Ok(())
}

/// Bytes of one token's packed activations for weight type `ty` and rows of `cols` elements.
pub fn packed_act_bytes(ty: GgmlType, cols: usize) -> usize {
    match k_format(ty) {
        Some(k) => cols / 256 * k.act,
        None => cols / 32 * ACT_BLOCK_BYTES,
    }
}

/// Pack one token's activations, quantized in the weight type's activation format (Q8_0, or
/// Q8_1 for Q4_1 / Q5_1), into the packed activation layout for weight type `ty`.
/// `dst` holds [`packed_act_bytes`]; every byte of it is written.
pub fn pack_activations(ty: GgmlType, src: &[u8], dst: &mut [u8]) -> Result<(), LayoutError> {
    let bad = LayoutError {
        ty,
        len: src.len(),
        row_bytes: dst.len(),
    };
    if let Some(k) = k_format(ty) {
        return pack_k_activations(ty, k, src, dst).ok_or(bad);
    }
    let Some(f) = format(ty) else {
        return Err(bad);
    };
    // Q8_1: d, s, 32 quants; Q8_0: d, 32 quants.
    let (act_block, qs) = if f.min { (36, 4) } else { (34, 2) };
    let nb = src.len() / act_block;
    if !src.len().is_multiple_of(act_block) || dst.len() != packed_act_bytes(ty, nb * 32) {
        return Err(bad);
    }
    for (blk, out) in src
        .chunks_exact(act_block)
        .zip(dst.chunks_exact_mut(ACT_BLOCK_BYTES))
    {
        out[..32].copy_from_slice(&blk[qs..qs + 32]);
        let d = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
        out[32..36].copy_from_slice(&d.to_le_bytes());
        let term = if f.min {
            f16::from_le_bytes([blk[2], blk[3]]).to_f32().to_le_bytes()
        } else {
            let sum: i32 = blk[qs..qs + 32].iter().map(|&q| q as i8 as i32).sum();
            (-f.offset * sum).to_le_bytes()
        };
        out[36..40].copy_from_slice(&term);
    }
    Ok(())
}

/// Q8_K blocks (`d` f32, 256 quants, 16 i16 sums) packed for k-quant type `ty`.
fn pack_k_activations(ty: GgmlType, k: &KFormat, src: &[u8], dst: &mut [u8]) -> Option<()> {
    const Q8_K: usize = 292;
    let nb = src.len() / Q8_K;
    if !src.len().is_multiple_of(Q8_K) || dst.len() != nb * k.act {
        return None;
    }
    for (blk, out) in src.chunks_exact(Q8_K).zip(dst.chunks_exact_mut(k.act)) {
        out[..256].copy_from_slice(&blk[4..260]);
        out[256..260].copy_from_slice(&blk[..4]);
        let bsum = |j: usize| i16::from_le_bytes([blk[260 + 2 * j], blk[261 + 2 * j]]) as i32;
        if ty != GgmlType::Q6_K {
            for j in 0..8 {
                let pair = (bsum(2 * j) + bsum(2 * j + 1)) as i16;
                out[260 + 2 * j..262 + 2 * j].copy_from_slice(&pair.to_le_bytes());
            }
        } else {
            for j in 0..16 {
                out[260 + 4 * j..264 + 4 * j].copy_from_slice(&(-32 * bsum(j)).to_le_bytes());
            }
        }
    }
    Some(())
}

/// [`packed_dot`] for k-quants: one integer sum per super-block (scales applied in integers),
/// one f32 scale (and, for Q4_K / Q5_K, the mins' term).
fn packed_k_dot(ty: GgmlType, k: &KFormat, row: &[u8], a: &[u8]) -> f32 {
    let f16_at = |p: &[u8], i: usize| f16::from_le_bytes([p[i], p[i + 1]]).to_f32();
    let mut sum = 0f32;
    for (w, act) in row.chunks_exact(k.block).zip(a.chunks_exact(k.act)) {
        let x = |e: usize| act[e] as i8 as i32;
        let da = f32::from_le_bytes([act[256], act[257], act[258], act[259]]);
        let mut int = 0i32;
        let pair = |j: usize| i16::from_le_bytes([act[260 + 2 * j], act[261 + 2 * j]]) as i32;
        if ty == GgmlType::IQ4_XS {
            let high = u16::from_le_bytes([w[2], w[3]]) as i32;
            for j in 0..8 {
                let low = (w[4 + j / 2] >> (4 * (j % 2))) as i32 & 15;
                let sc = (low | ((high >> (2 * j)) & 3) << 4) - 32;
                let s: i32 = (0..32)
                    .map(|e| {
                        let b = w[8 + 16 * j + e % 16];
                        let nibble = if e < 16 { b & 15 } else { b >> 4 };
                        let code = edgelm_quant::iq4_nl::GRID[nibble as usize] as i32 + 128;
                        code * x(32 * j + e)
                    })
                    .sum();
                int += sc * (s - 128 * pair(j));
            }
            sum += f16_at(w, 0) * da * int as f32;
        } else if ty != GgmlType::Q6_K {
            let scales: &[u8; 12] = w[4..16].try_into().unwrap_or(&[0; 12]);
            // Q5_K: nibbles after 32 bytes of fifth bits (bit j of byte l: element 32j + l).
            let (qs, five) = if ty == GgmlType::Q5_K {
                (48, true)
            } else {
                (16, false)
            };
            let mut mins = 0i32;
            for j in 0..8 {
                let (sc, m) = edgelm_quant::k_quants::get_scale_min_k4(j, scales);
                mins += m as i32 * pair(j);
                let s: i32 = (32 * j..32 * j + 32)
                    .map(|e| {
                        let b = w[qs + (e / 64) * 32 + e % 32];
                        let lo = if j % 2 == 1 { b >> 4 } else { b & 15 };
                        let hi = if five { (w[16 + e % 32] >> j) & 1 } else { 0 };
                        (lo | hi << 4) as i32 * x(e)
                    })
                    .sum();
                int += sc as i32 * s;
            }
            sum += f16_at(w, 0) * da * int as f32 - f16_at(w, 2) * da * mins as f32;
        } else {
            for j in 0..16 {
                let at = 260 + 4 * j;
                let mut s = i32::from_le_bytes([act[at], act[at + 1], act[at + 2], act[at + 3]]);
                for e in 16 * j..16 * j + 16 {
                    let (h, q, l) = (e / 128, (e % 128) / 32, e % 32);
                    let lb = w[64 * h + 32 * (q & 1) + l];
                    let lo = if q >= 2 { lb >> 4 } else { lb & 15 };
                    let hi = (w[128 + 32 * h + l] >> (2 * q)) & 3;
                    s += (lo | hi << 4) as i32 * x(e);
                }
                int += w[192 + j] as i8 as i32 * s;
            }
            sum += f16_at(w, 208) * da * int as f32;
        }
    }
    sum
}

/// Scalar dot of one GGUF-order row with one packed activation row, in the kernels' arithmetic
/// (an integer sum per block, one f32 scale each): the reference the SIMD kernels are tested
/// against, and what they use for a last partial panel.
pub fn packed_dot(ty: GgmlType, row: &[u8], a: &[u8]) -> Result<f32, LayoutError> {
    let bad = LayoutError {
        ty,
        len: row.len(),
        row_bytes: row.len(),
    };
    if let Some(k) = k_format(ty) {
        let nb = row.len() / k.block;
        if !row.len().is_multiple_of(k.block) || a.len() != nb * k.act {
            return Err(bad);
        }
        return Ok(packed_k_dot(ty, k, row, a));
    }
    let Some(f) = format(ty) else {
        return Err(bad);
    };
    let nb = row.len() / f.block;
    if !row.len().is_multiple_of(f.block) || a.len() != packed_act_bytes(ty, nb * 32) {
        return Err(bad);
    }
    let (fm, fh, fq) = fields(ty);
    let f16_at = |p: &[u8], i: usize| f16::from_le_bytes([p[i], p[i + 1]]).to_f32();
    let word = |p: &[u8], i: usize| [p[i], p[i + 1], p[i + 2], p[i + 3]];
    let mut sum = 0f32;
    for (blk, act) in row
        .chunks_exact(f.block)
        .zip(a.chunks_exact(ACT_BLOCK_BYTES))
    {
        let qh = fh.map_or(0, |h| u32::from_le_bytes(word(blk, h)));
        let term = word(act, 36);
        let mut int = if f.min { 0 } else { i32::from_le_bytes(term) };
        for (e, &x) in act[..32].iter().enumerate() {
            let code = if !f.nibbles {
                (blk[fq + e] ^ 0x80) as i32
            } else if e < 16 {
                (blk[fq + e] & 15) as i32
            } else {
                (blk[fq + e - 16] >> 4) as i32
            };
            let code = if f.grid {
                edgelm_quant::iq4_nl::GRID[code as usize] as i32 + 128
            } else {
                code
            };
            let fifth = if qh >> e & 1 == 1 { 16 } else { 0 };
            int += (code + fifth) * x as i8 as i32;
        }
        let da = f32::from_le_bytes(word(act, 32));
        sum += int as f32 * (f16_at(blk, 0) * da);
        if let Some(m) = fm {
            sum += f16_at(blk, m) * f32::from_le_bytes(term);
        }
    }
    Ok(sum)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::test_rng::Rng;
    use edgelm_quant::{int_dot, quantize_row};

    pub(crate) const TYPES: [GgmlType; 10] = [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::IQ4_NL,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
        GgmlType::IQ4_XS,
    ];

    /// Elements per block of `ty`.
    pub(crate) fn block_len(ty: GgmlType) -> usize {
        block_shape(ty).map_or(32, |(_, len)| len)
    }

    fn random_row(rng: &mut Rng, ty: GgmlType, nb: usize) -> Vec<u8> {
        let x: Vec<f32> = (0..nb * block_len(ty))
            .map(|_| rng.weight() * 3.0)
            .collect();
        let mut w = vec![0u8; nb * ty.block_bytes()];
        quantize_row(ty, &x, &mut w).unwrap();
        w
    }

    /// Σ |d·(code − offset)|·|a| + |m·a| over the row: bounds every partial sum either side
    /// forms.
    /// For k-quants, where scales and mins partly cancel, a bound from the largest code and
    /// scale instead: (|d|·max code·max scale + |dmin|·63) · Σ|a| per super-block.
    pub(crate) fn magnitude(ty: GgmlType, w: &[u8], a: &[u8]) -> f32 {
        let act_ty = int_dot::activation_type(ty);
        let block_len = block_len(ty);
        let n = a.len() / act_ty.block_bytes() * block_len;
        let mut wf = vec![0f32; n];
        let mut af = vec![0f32; n];
        edgelm_quant::dequantize_row(ty, w, &mut wf).unwrap();
        edgelm_quant::dequantize_row(act_ty, a, &mut af).unwrap();
        let half = |b: &[u8], at: usize| half::f16::from_le_bytes([b[at], b[at + 1]]).to_f32();
        let k_bound = |(b, a): (&[u8], &[f32])| {
            let sum_a: f32 = a.iter().map(|v| v.abs()).sum();
            let per_weight = match ty {
                GgmlType::Q4_K => half(b, 0).abs() * 15.0 * 63.0 + half(b, 2).abs() * 63.0,
                GgmlType::Q5_K => half(b, 0).abs() * 31.0 * 63.0 + half(b, 2).abs() * 63.0,
                // |scale − 32| ≤ 32, codes GRID + 128 ≤ 241 and the offset 128 apart.
                GgmlType::IQ4_XS => half(b, 0).abs() * 32.0 * (241.0 + 128.0),
                _ => half(b, 208).abs() * 32.0 * 128.0,
            };
            per_weight * sum_a
        };
        if block_len == 256 {
            return w
                .chunks(ty.block_bytes())
                .zip(af.chunks(256))
                .map(k_bound)
                .sum();
        }
        let mins: f32 = if matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1) {
            w.chunks(ty.block_bytes())
                .zip(af.chunks(32))
                .map(|(b, a)| {
                    let m = half::f16::from_le_bytes([b[2], b[3]]).to_f32().abs();
                    m * a.iter().map(|v| v.abs()).sum::<f32>()
                })
                .sum()
        } else {
            0.0
        };
        wf.iter().zip(&af).map(|(w, a)| (w * a).abs()).sum::<f32>() + mins
    }

    /// Raw random bytes (every bit of every field must survive) over whole and partial panels.
    #[test]
    fn interleave_round_trips_and_keeps_the_size() {
        let mut rng = Rng(7);
        for ty in TYPES {
            for (nb, rows) in [(1, 16), (2, 17), (5, 35), (28, 32), (3, 5)] {
                let row_bytes = nb * ty.block_bytes();
                let src: Vec<u8> = (0..rows * row_bytes).map(|_| rng.next() as u8).collect();
                let mut packed = vec![0u8; src.len()];
                interleave_rows(ty, row_bytes, &src, &mut packed).unwrap();
                if rows >= PANEL {
                    assert_ne!(packed[..PANEL * row_bytes], src[..PANEL * row_bytes]);
                }
                let mut back = vec![0u8; src.len()];
                deinterleave_rows(ty, row_bytes, &packed, &mut back).unwrap();
                assert_eq!(back, src, "{ty:?} {nb} blocks × {rows} rows");
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
                let x: Vec<f32> = (0..nb * block_len(ty)).map(|_| rng.weight()).collect();
                let mut a = vec![0u8; nb * act_ty.block_bytes()];
                quantize_row(act_ty, &x, &mut a).unwrap();
                let mut ap = vec![0u8; packed_act_bytes(ty, x.len())];
                pack_activations(ty, &a, &mut ap).unwrap();
                let got = packed_dot(ty, &w, &ap).unwrap();
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
        assert!(interleave_rows(GgmlType::Q4_0, 18, &[0; 17], &mut out).is_err());
        assert!(interleave_rows(GgmlType::Q4_0, 17, &[0; 34], &mut [0; 34]).is_err());
        assert!(interleave_rows(GgmlType::Q3_K, 110, &[0; 110], &mut [0; 110]).is_err());
        assert!(pack_activations(GgmlType::Q8_0, &[0; 34], &mut [0; 10]).is_err());
        assert!(deinterleave_row(GgmlType::Q8_0, 34, &[0; 68], 2, &mut [0; 34]).is_err());
    }
}
