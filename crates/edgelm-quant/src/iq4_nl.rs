//! IQ4_NL: 32 elements as f16 `d` and 16 bytes of 4-bit indices into a fixed non-linear grid of
//! 16 levels (denser near zero, where most weights are); `x = d · GRID[q]`. Byte `j` holds
//! element `j` in its low nibble and element `j + 16` in its high nibble, as Q4_0.

use crate::{f16_at, put_f16};

pub const BLOCK_ELEMS: usize = 32;
pub const BLOCK_BYTES: usize = 18;

/// The 16 levels, ggml's `kvalues_iq4nl` (the format's definition).
pub const GRID: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

pub fn dequantize_block(b: &[u8; BLOCK_BYTES], y: &mut [f32; BLOCK_ELEMS]) {
    let d = f16_at(b, 0);
    for j in 0..16 {
        let q = b[2 + j];
        y[j] = d * GRID[(q & 0x0F) as usize] as f32;
        y[j + 16] = d * GRID[(q >> 4) as usize] as f32;
    }
}

/// [`quantize_block_weighted`] with the default error weights ([`crate::weighted::error_weights`]).
pub fn quantize_block(x: &[f32; BLOCK_ELEMS], b: &mut [u8; BLOCK_BYTES]) {
    let mut w = [0f32; BLOCK_ELEMS];
    crate::weighted::error_weights(crate::GgmlType::IQ4_NL, x, None, &mut w);
    quantize_block_weighted(x, &w, b);
}

/// `LEVEL_OF[t + 256]`: the index of the grid level nearest any `v` with `floor(2v) = t` — the
/// count of midpoints between neighbouring levels at or below `t / 2` (a value exactly on a
/// midpoint goes up).
const LEVEL_OF: [u8; 512] = {
    let mut table = [0u8; 512];
    let mut t = 0;
    while t < 512 {
        let mut i = 0;
        while i < 15 && GRID[i] as i32 + GRID[i + 1] as i32 <= t as i32 - 256 {
            i += 1;
        }
        table[t] = i as u8;
        t += 1;
    }
    table
};

/// Index of the grid level nearest `v` (in units of `d`): one table lookup, since it runs for
/// every value of every trial scale.
fn nearest(v: f32) -> usize {
    // floor(2v) by truncation of a positive number; outside ±128 the ends are nearest anyway.
    let v = if v > -128.0 { v } else { -128.0 };
    let v = if v < 128.0 { v } else { 128.0 };
    let t = (2.0 * v + 512.0) as i32 - 512;
    LEVEL_OF[(t + 256).clamp(0, 511) as usize] as usize
}

/// The scale minimizing `Σ w (x − d·GRID[q])²` (then passed through `round`, as it will be
/// stored) and that error, for fixed indices `q`.
fn fit(x: &[f32], w: &[f32], q: &[u8], round: &impl Fn(f32) -> f32) -> (f32, f32) {
    let (mut sxq, mut sqq, mut sxx) = (0f64, 0f64, 0f64);
    for i in 0..x.len() {
        let g = GRID[q[i] as usize] as f64;
        sxq += (w[i] * x[i]) as f64 * g;
        sqq += w[i] as f64 * g * g;
        sxx += (w[i] * x[i]) as f64 * x[i] as f64;
    }
    if sqq == 0.0 {
        return (0.0, sxx as f32);
    }
    let d = round((sxq / sqq) as f32) as f64;
    (d as f32, (sxx - 2.0 * d * sxq + d * d * sqq) as f32)
}

/// `q` = the nearest grid levels of `x / d`.
pub(crate) fn assign(x: &[f32], d: f32, q: &mut [u8]) {
    let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
    for (q, &v) in q.iter_mut().zip(x) {
        *q = nearest(v * inv) as u8;
    }
}

/// The search of [`quantize_block_weighted`] over `BLOCK_ELEMS` values: the scale (through
/// `round`), its weighted error, and the levels.
pub(crate) fn search(
    x: &[f32],
    w: &[f32],
    round: impl Fn(f32) -> f32,
) -> (f32, f32, [u8; BLOCK_ELEMS]) {
    let max = crate::weighted::signed_extreme(x);
    let mut q = [0u8; BLOCK_ELEMS];
    if max == 0.0 {
        return (0.0, 0.0, q);
    }
    let mut best = (0f32, f32::INFINITY, q);
    let mut try_reach = |reach: f32, best: &mut (f32, f32, [u8; BLOCK_ELEMS])| {
        assign(x, max / reach, &mut q);
        let (d, err) = fit(x, w, &q, &round);
        if err < best.1 {
            *best = (d, err, q);
        }
        err
    };
    for end in [GRID[0] as f32, GRID[15] as f32] {
        // ggml's trials: the extreme on the end and on the 8 levels either side of it.
        for step in -8..=8 {
            try_reach(end + step as f32 * end.signum(), &mut best);
        }
        // Then reaches from 0.7 to 4 times the end in steps of 2^⅛ (clipping the extreme
        // pays where its weight is small), and a fine sweep around the best of them.
        let mut coarse = (end, f32::INFINITY);
        for k in -4..=16 {
            let reach = end * (k as f32 / 8.0).exp2();
            let err = try_reach(reach, &mut best);
            if err < coarse.1 {
                coarse = (reach, err);
            }
        }
        for k in -7..=7 {
            try_reach(coarse.0 * (k as f32 / 64.0).exp2(), &mut best);
        }
    }
    for _ in 0..8 {
        assign(x, best.0, &mut q);
        let (d, err) = fit(x, w, &q, &round);
        if err >= best.1 {
            break;
        }
        best = (d, err, q);
    }
    best
}

/// Weighted least-squares rounding: trial scales put the block's extreme on each end of the grid
/// and on the 16 levels either side of it (ggml tries one end's), each rounded to the nearest
/// levels and refit to its least-squares scale; the best is then improved by alternating
/// nearest-level assignment and refitting until the error stops falling. `w` ≥ 0 weighs each
/// value's error (an importance matrix's, or the value's square).
pub fn quantize_block_weighted(
    x: &[f32; BLOCK_ELEMS],
    w: &[f32; BLOCK_ELEMS],
    b: &mut [u8; BLOCK_BYTES],
) {
    let (d, _, q) = search(x, w, |d| half::f16::from_f32(d).to_f32());
    put_f16(b, 0, d);
    for j in 0..16 {
        b[2 + j] = q[j] | (q[j + 16] << 4);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table lookup equals counting the midpoints below `v`, away from exact midpoints.
    #[test]
    fn nearest_level_by_table_equals_the_scan() {
        let scan = |v: f32| {
            let mut i = 0;
            while i < 15 && v > (GRID[i] as f32 + GRID[i + 1] as f32) * 0.5 {
                i += 1;
            }
            i
        };
        let mut v = -300.0f32;
        while v < 300.0 {
            if (0..15).all(|i| (2.0 * v - (GRID[i] as f32 + GRID[i + 1] as f32)).abs() > 1e-3) {
                assert_eq!(nearest(v), scan(v), "v = {v}");
            }
            v += 0.0137;
        }
        assert_eq!(nearest(f32::NAN), 0);
    }

    #[test]
    fn hand_block() {
        let mut b = [0u8; BLOCK_BYTES];
        b[0..2].copy_from_slice(&0x3800u16.to_le_bytes()); // d = 0.5
        for j in 0..16 {
            b[2 + j] = (j as u8) | ((15 - j as u8) << 4);
        }
        let mut y = [0f32; 32];
        dequantize_block(&b, &mut y);
        for j in 0..16 {
            assert_eq!(y[j], 0.5 * GRID[j] as f32);
            assert_eq!(y[j + 16], 0.5 * GRID[15 - j] as f32);
        }
    }

    /// The refined search never does worse than ggml's single end with its trial steps, on
    /// random blocks with outliers (the weighted error of each, compared block by block).
    #[test]
    fn search_beats_a_single_scale() {
        let mut rng = crate::tests::Rng(77);
        for _ in 0..500 {
            let x: [f32; 32] =
                std::array::from_fn(|i| rng.normal() * if i == 5 { 6.0 } else { 1.0 });
            let w: [f32; 32] = std::array::from_fn(|i| x[i] * x[i]);
            let mut b = [0u8; BLOCK_BYTES];
            quantize_block_weighted(&x, &w, &mut b);
            let mut y = [0f32; 32];
            dequantize_block(&b, &mut y);
            let ours: f32 = (0..32).map(|i| w[i] * (x[i] - y[i]).powi(2)).sum();
            // One scale: the extreme on the grid's long end, nearest levels, no refit.
            let max = crate::weighted::signed_extreme(&x);
            let d = half::f16::from_f32(max / GRID[0] as f32).to_f32();
            let single: f32 = (0..32)
                .map(|i| {
                    let g = GRID[nearest(x[i] / d)] as f32;
                    w[i] * (x[i] - d * g).powi(2)
                })
                .sum();
            assert!(ours <= single * 1.0001 + 1e-12, "{ours} > {single}");
        }
    }
}
