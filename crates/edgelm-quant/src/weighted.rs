//! Weighted least-squares searches shared by the weight quantizers: each minimizes
//! `Σ wᵢ (xᵢ − x̂ᵢ)²` over one block or sub-block.
//!
//! ggml rounds at a fixed grid of trial scales around the block's extreme and keeps the best.
//! Here a coarse sweep first puts the extreme from 0.7 to 4 times the grid's reach (clipping it
//! when its weight is small pays) in steps of 2^⅛, then a fine sweep spanning a coarse step
//! either side of the best (affine grids also from several offsets around the minimum);
//! every trial is refit to its weighted least-squares scale (and offset) as it will be stored,
//! and the best is improved by alternating nearest-level assignment and refitting until the
//! error stops falling.

use crate::GgmlType;

/// Fine trials either side of the best coarse reach, spanning one coarse step each way.
const STEPS: i32 = 10;
/// Coarse reaches: the grid's end times 2^(k/8) for k in COARSE.
const COARSE: std::ops::RangeInclusive<i32> = -4..=16;
/// Rounds of assignment and refit after the trials.
const REFINE: usize = 8;
/// Affine grids: starting offsets per coarse reach, and per fine reach (evenly spaced from half
/// a step below the block minimum), the fine trials either side of the best coarse reach,
/// and the rounds of assignment and refit each fine trial gets. Refitting from the minimum
/// alone stops in a local optimum: on 4-bit blocks with log-normal weights it left 7.3% more
/// weighted error than a dense search of scale and offset; these leave 1.3% in under twice the
/// time (8 offsets per coarse reach and 3 rounds would leave 0.5% in 4×).
const AFFINE_COARSE_OFFSETS: i32 = 2;
const AFFINE_FINE_OFFSETS: i32 = 8;
const AFFINE_FINE_STEPS: i32 = 2;
const AFFINE_FINE_ROUNDS: usize = 2;

/// The scale `d` (passed through `round`, as it will be stored) minimizing the weighted error
/// of `x ≈ d·q` with integer levels `q` in `lo..=hi` (`lo ≤ 0 < hi`), the levels in `q`, and
/// that error. With `grid`, the step of a grid the values already sit on is tried too (see
/// [`grid_step`]; k-quants' sub-blocks leave it out: their scales are coded afterwards, and the
/// exact step of a sub-block codes badly).
pub(crate) fn fit_scale(
    x: &[f32],
    w: &[f32],
    lo: i32,
    hi: i32,
    grid: bool,
    q: &mut [i8],
    round: impl Fn(f32) -> f32,
) -> (f32, f32) {
    let max = signed_extreme(x);
    if max == 0.0 || !max.is_finite() {
        q.fill(0);
        return (0.0, error_scale(x, w, 0.0, q));
    }
    let sxx: f64 = x.iter().zip(w).map(|(&x, &w)| (w * x * x) as f64).sum();
    let mut products = [0f32; 256];
    let wx = weighted_values(x, w, &mut products);
    let mut trial = [0f32; 256];
    let trial = &mut trial[..x.len()];
    let mut best = (0f32, f64::INFINITY);
    // Rounds at `d0`, then refits the scale (or keeps `d0`); kept if it beats the best. One pass
    // gathers the sums the error needs in closed form.
    let mut try_scale = |d0: f32, refit: bool, best: &mut (f32, f64), q: &mut [i8]| {
        let inv = if d0 != 0.0 { 1.0 / d0 } else { 0.0 };
        let (sxq, sqq, _) = level_sums(x, w, wx, inv, 0.0, lo, hi, trial);
        let d = match (refit, sqq > 0.0) {
            (false, _) => d0,
            (true, true) => round((sxq / sqq) as f32),
            (true, false) => 0.0,
        } as f64;
        let err = sxx - 2.0 * d * sxq + d * d * sqq;
        if err < best.1 {
            *best = (d as f32, err);
            q.iter_mut()
                .zip(trial.iter())
                .for_each(|(q, &l)| *q = l as i8);
        }
    };
    // Symmetric grids have one end; the others are tried with the extreme on either.
    let ends: &[i32] = if lo == -hi || lo == 0 {
        &[hi]
    } else {
        &[lo, hi]
    };
    // Sorting a block to find its step costs as much as several trials: only when wanted, once.
    let step = if grid { grid_step(x) } else { None };
    for &end in ends {
        // ggml's reference rounding (the extreme on the end, no refit) is a candidate too, so
        // the result never has a larger weighted error.
        try_scale(round(max / end as f32), false, &mut best, q);
        if let Some(g) = step {
            try_scale(g * end.signum() as f32, true, &mut best, q);
        }
        let mut coarse = (end as f32, f64::INFINITY);
        for k in COARSE {
            let reach = end as f32 * (k as f32 / 8.0).exp2();
            let before = best.1;
            try_scale(max / reach, true, &mut best, q);
            if best.1 < before && best.1 < coarse.1 {
                coarse = (reach, best.1);
            }
        }
        for k in -STEPS..=STEPS {
            let reach = coarse.0 * (k as f32 / (8 * STEPS) as f32).exp2();
            if reach.abs() >= 0.5 {
                try_scale(max / reach, true, &mut best, q);
            }
        }
    }
    // Alternate: levels nearest under the best scale, the scale refit to them.
    for _ in 0..REFINE {
        let before = best.1;
        try_scale(best.0, true, &mut best, q);
        if !(best.1 < before) {
            break;
        }
    }
    // Levels nearest under the stored scale itself (refitting may have moved it past a midpoint).
    try_scale(best.0, false, &mut best, q);
    (best.0, error_scale(x, w, best.0, q))
}

/// The value of largest magnitude (its sign kept; the first of equals), 0 for an empty block.
pub(crate) fn signed_extreme(x: &[f32]) -> f32 {
    x.iter()
        .copied()
        .fold(0f32, |m, v| if v.abs() > m.abs() { v } else { m })
}

/// The smallest gap between distinct values of a short block: the step of the grid its values
/// already sit on when it was quantized before (a requantized model), so that grid is tried.
fn grid_step(x: &[f32]) -> Option<f32> {
    let mut v = [0f32; 64];
    let v = v.get_mut(..x.len())?;
    v.copy_from_slice(x);
    v.sort_unstable_by(f32::total_cmp);
    let span = v[v.len() - 1] - v[0];
    v.windows(2)
        .map(|p| p[1] - p[0])
        .filter(|&g| g > span * 1e-3)
        .min_by(f32::total_cmp)
}

/// `w·x` per value into the front of `buf` (blocks are at most 256 values): [`level_sums`]'s
/// `wx`, formed once per block rather than once per trial.
fn weighted_values<'a>(x: &[f32], w: &[f32], buf: &'a mut [f32; 256]) -> &'a [f32] {
    let out = &mut buf[..x.len()];
    out.iter_mut()
        .zip(x.iter().zip(w))
        .for_each(|(p, (&x, &w))| *p = w * x);
    out
}

/// Adding and subtracting 1.5·2²³ rounds an f32 of magnitude below 2²² to the nearest integer
/// (ties to even, as ggml's `nearest_int`), in plain float arithmetic that vectorizes.
const ROUNDER: f32 = 12_582_912.0;

/// Levels of `x` at inverse scale `inv` and offset `m` (nearest in `lo..=hi`) into `out` as
/// floats, with `Σ w·x·l` (`wx` = `w·x`, formed once per block), `Σ w·l²` and `Σ w·l`: the inner
/// loop of every search. Lanes of 8 as arrays, float arithmetic only (clamped by comparisons,
/// which are plain `maxps`/`minps`, then rounded) so that the baseline target's SSE2 vectorizes
/// it; callers convert the levels only of a trial they keep.
#[inline]
#[allow(clippy::too_many_arguments)]
fn level_sums(
    x: &[f32],
    w: &[f32],
    wx: &[f32],
    inv: f32,
    m: f32,
    lo: i32,
    hi: i32,
    out: &mut [f32],
) -> (f64, f64, f64) {
    let (lo, hi) = (lo as f32, hi as f32);
    let level = |v: f32| {
        let v = (v - m) * inv;
        let v = if v > lo { v } else { lo };
        let v = if v < hi { v } else { hi };
        v + ROUNDER - ROUNDER
    };
    let (xc, xt) = x.as_chunks::<8>();
    let (wc, wt) = w.as_chunks::<8>();
    let (pc, pt) = wx.as_chunks::<8>();
    let (oc, ot) = out.as_chunks_mut::<8>();
    let (mut sxq, mut sqq, mut sq) = ([0f32; 8], [0f32; 8], [0f32; 8]);
    for (((x, w), p), o) in xc.iter().zip(wc).zip(pc).zip(oc.iter_mut()) {
        for k in 0..8 {
            let l = level(x[k]);
            o[k] = l;
            let wl = w[k] * l;
            sxq[k] += p[k] * l;
            sqq[k] += wl * l;
            sq[k] += wl;
        }
    }
    for (((&x, &w), &p), o) in xt.iter().zip(wt).zip(pt).zip(ot.iter_mut()) {
        let l = level(x);
        *o = l;
        sxq[0] += p * l;
        sqq[0] += w * l * l;
        sq[0] += w * l;
    }
    let sum = |a: [f32; 8]| a.iter().map(|&v| v as f64).sum::<f64>();
    (sum(sxq), sum(sqq), sum(sq))
}

/// Round half away from zero by a truncating conversion: `f32::round` is a libm call on the
/// baseline x86-64 target, and this runs for every value of every trial.
#[inline]
fn nearest(v: f32) -> i32 {
    (v + 0.5f32.copysign(v)) as i32
}

/// `q` = the levels in `lo..=hi` nearest `x / d`.
pub(crate) fn assign_scale(x: &[f32], d: f32, lo: i32, hi: i32, q: &mut [i8]) {
    let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
    for (q, &v) in q.iter_mut().zip(x) {
        *q = nearest(v * inv).clamp(lo, hi) as i8;
    }
}

fn error_scale(x: &[f32], w: &[f32], d: f32, q: &[i8]) -> f32 {
    let mut err = 0f32;
    for ((&x, &w), &q) in x.iter().zip(w).zip(q) {
        let e = x - d * q as f32;
        err += w * e * e;
    }
    err
}

/// The scale `d ≥ 0` and offset `m` (each passed through `round`) minimizing the weighted error
/// of `x ≈ d·q + m` with levels `q` in `0..=nmax`, the levels in `q`, and that error. With
/// `offset_at_most_zero`, `m ≤ 0` (k-quants store `−m` unsigned); `grid` as in [`fit_scale`].
pub(crate) fn fit_affine(
    x: &[f32],
    w: &[f32],
    nmax: i32,
    offset_at_most_zero: bool,
    grid: bool,
    q: &mut [u8],
    round: impl Fn(f32) -> f32,
) -> (f32, f32, f32) {
    let mut lo = x.iter().fold(f32::INFINITY, |a, &v| a.min(v));
    let hi = x.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
    if offset_at_most_zero && lo > 0.0 {
        lo = 0.0;
    }
    if !(hi > lo) || !(hi - lo).is_finite() {
        // Constant (or non-finite) block: the offset alone, when it may carry it.
        q.fill(0);
        let m = if lo.is_finite() { round(lo) } else { 0.0 };
        let m = if offset_at_most_zero { m.min(0.0) } else { m };
        return (0.0, m, error_affine(x, w, 0.0, m, q));
    }
    // Sums over the values shifted by `lo`: the closed-form error then cancels far less.
    let mut shifted = [0f32; 256];
    let xs = &mut shifted[..x.len()];
    xs.iter_mut().zip(x).for_each(|(s, &v)| *s = v - lo);
    let xs = &*xs;
    let (mut sw, mut sx, mut sxx) = (0f64, 0f64, 0f64);
    for (&x, &w) in xs.iter().zip(w) {
        let (x, w) = (x as f64, w as f64);
        sw += w;
        sx += w * x;
        sxx += w * x * x;
    }
    let mut products = [0f32; 256];
    let wx = weighted_values(xs, w, &mut products);
    let mut trial = [0f32; 256];
    let trial = &mut trial[..x.len()];
    let mut best = (0f32, 0f32, f64::INFINITY);
    // Rounds at spacing `d0` from `m0`, then refits scale and offset (or keeps them), `rounds`
    // times or until the refit stops moving; each kept if it beats the best. One pass gathers
    // the sums the error needs in closed form.
    let mut try_spacing =
        |d0: f32, m0: f32, refit: bool, rounds: usize, best: &mut (f32, f32, f64), q: &mut [u8]| {
            let (mut d0, mut m0) = (d0, m0);
            for _ in 0..rounds {
                let inv = if d0 > 0.0 { 1.0 / d0 } else { 0.0 };
                let (sxq, sqq, sq) = level_sums(xs, w, wx, inv, m0 - lo, 0, nmax, trial);
                let (d, m) = if refit {
                    let det = sqq * sw - sq * sq;
                    let (mut d, mut m) = if det > 0.0 {
                        (
                            (sw * sxq - sq * sx) / det,
                            (sqq * sx - sq * sxq) / det + lo as f64,
                        )
                    } else if sw > 0.0 {
                        (0.0, sx / sw + lo as f64)
                    } else {
                        (0.0, lo as f64)
                    };
                    if offset_at_most_zero && m > 0.0 {
                        m = 0.0;
                        d = if sqq > 0.0 {
                            (sxq + lo as f64 * sq) / sqq
                        } else {
                            0.0
                        };
                    }
                    (round(d.max(0.0) as f32), round(m as f32))
                } else {
                    (d0, m0)
                };
                let (df, mf) = (d as f64, (m - lo) as f64);
                let err = sxx + df * df * sqq + mf * mf * sw - 2.0 * df * sxq - 2.0 * mf * sx
                    + 2.0 * df * mf * sq;
                // Gains within the rounding of the f32 sums (the closed form cancels to about 1e-7
                // of `sxx`) are no gain: a block already on a grid fits exactly from many starts,
                // and the first found, from its own step, is the one k-quants' scales code again.
                if err < best.2 - 1e-6 * sxx {
                    *best = (d, m, err);
                    q.iter_mut()
                        .zip(trial.iter())
                        .for_each(|(q, &l)| *q = l as u8);
                }
                if !(d > 0.0) || (d, m) == (d0, m0) {
                    break;
                }
                (d0, m0) = (d, m);
            }
        };
    // ggml's reference (minimum and range, no refit) as a candidate: never a larger error.
    try_spacing(
        round((hi - lo) / nmax as f32),
        round(lo),
        false,
        1,
        &mut best,
        q,
    );
    if let Some(g) = if grid { grid_step(x) } else { None } {
        try_spacing(g, lo, true, 1, &mut best, q);
    }
    // The t-th of n starting offsets, evenly spaced from half a step below the block minimum
    // (n = 2: that and the minimum; n = 8: up to ⅜ of a step above it, the minimum clipped).
    let offset = |d: f32, t: i32, n: i32| lo + d * (t as f32 / n as f32 - 0.5);
    let mut coarse = (nmax as f32, f64::INFINITY);
    for k in COARSE {
        let reach = nmax as f32 * (k as f32 / 8.0).exp2();
        let d = (hi - lo) / reach;
        let before = best.2;
        for t in 0..AFFINE_COARSE_OFFSETS {
            try_spacing(
                d,
                offset(d, t, AFFINE_COARSE_OFFSETS),
                true,
                1,
                &mut best,
                q,
            );
        }
        if best.2 < before && best.2 < coarse.1 {
            coarse = (reach, best.2);
        }
    }
    for k in -AFFINE_FINE_STEPS..=AFFINE_FINE_STEPS {
        let reach = coarse.0 * (k as f32 / (8 * AFFINE_FINE_STEPS) as f32).exp2();
        if reach >= 0.5 {
            let d = (hi - lo) / reach;
            for t in 0..AFFINE_FINE_OFFSETS {
                let m = offset(d, t, AFFINE_FINE_OFFSETS);
                try_spacing(d, m, true, AFFINE_FINE_ROUNDS, &mut best, q);
            }
        }
    }
    if best.0 > 0.0 {
        try_spacing(best.0, best.1, true, REFINE, &mut best, q);
        try_spacing(best.0, best.1, false, 1, &mut best, q);
    }
    (best.0, best.1, error_affine(x, w, best.0, best.1, q))
}

/// A grid `x` was decoded from and stored back to f16 by — a block of an already quantized
/// file, or of Q4_0/Q5_0 inside Q4_1/Q5_1 — is kept as it is: a scale (and offset) whose every
/// value rounds to exactly `xᵢ` in f16. Nothing fits those values better; a weighted search
/// could only fit the source's own f16 rounding, and that moves values by a fraction of a
/// step where a model may be most sensitive (SmolLM2's Q4_1 requantized: 20 such blocks of
/// 130 000 took its mean KLD from 0.00240 to 0.00245). The scales tried: the extreme over the
/// grid's end and the block's smallest gap, each with two f16 neighbours either side.
fn f16_scales(bases: impl Iterator<Item = Option<f32>>) -> impl Iterator<Item = f32> {
    bases.flatten().flat_map(|base| {
        let bits = half::f16::from_f32(base).to_bits();
        [0i16, -1, 1, -2, 2]
            .into_iter()
            .map(move |step| half::f16::from_bits(bits.wrapping_add_signed(step)).to_f32())
            .filter(|d| *d != 0.0 && d.is_finite())
    })
}

/// f16's rounding error bounds (relative; absolute below its normal range), doubled.
const REL: f32 = 1.0 / 1024.0;
const ABS: f32 = 1.0 / 16_777_216.0;

/// Whether some scale `d` could give `f16(l·d) = xᵢ` for every value with levels `|l| ≤ reach`:
/// a non-zero value is at least one step, the extreme at most `reach` steps, each within
/// [`REL`] and [`ABS`]. Most blocks never quantized fail it, which spares [`grid_step`]'s sort.
fn may_sit_on_scale_grid(x: &[f32], max: f32, reach: u32) -> bool {
    let smallest = x
        .iter()
        .map(|v| v.abs())
        .filter(|&v| v > 0.0)
        .fold(f32::INFINITY, f32::min);
    let widest_step = (smallest + ABS) / (1.0 - REL);
    let narrowest_step = (max.abs() - ABS) / (reach as f32 * (1.0 + REL));
    widest_step >= narrowest_step
}

/// [`may_sit_on_scale_grid`] for `x ≈ d·q + lo`, `q` in `0..=nmax`, `lo` the minimum: a value
/// above the minimum is at least one step above it, the maximum at most `nmax` steps.
fn may_sit_on_affine_grid(x: &[f32], lo: f32, hi: f32, nmax: i32) -> bool {
    let slack = REL * lo.abs().max(hi.abs()) + ABS;
    let smallest_rise = x
        .iter()
        .map(|&v| v - lo)
        .filter(|&r| r > 0.0)
        .fold(f32::INFINITY, f32::min);
    smallest_rise + slack >= (hi - lo - slack) / nmax as f32
}

/// [`f16_scales`]' grid for `x ≈ d·q`, `q` in `lo..=hi`: the scale, its levels in `q`.
pub(crate) fn f16_grid_scale(x: &[f32], lo: i32, hi: i32, q: &mut [i8]) -> Option<f32> {
    let max = signed_extreme(x);
    if max == 0.0 || !max.is_finite() {
        return None;
    }
    if !may_sit_on_scale_grid(x, max, lo.unsigned_abs().max(hi.unsigned_abs())) {
        return None;
    }
    search_f16_scale(x, max, lo, hi, q)
}

/// [`f16_grid_scale`]'s search itself, every candidate tried.
fn search_f16_scale(x: &[f32], max: f32, lo: i32, hi: i32, q: &mut [i8]) -> Option<f32> {
    let end = |e: i32| (e != 0).then(|| max / e as f32);
    // The step (a sort) only once both ends have failed.
    let step = std::iter::once_with(|| grid_step(x).map(|g| g.copysign(max)));
    f16_scales([end(hi), end(lo)].into_iter().chain(step)).find(|&d| {
        let inv = 1.0 / d;
        x.iter().zip(q.iter_mut()).all(|(&v, q)| {
            let l = nearest(v * inv).clamp(lo, hi);
            *q = l as i8;
            f16r(l as f32 * d) == v
        })
    })
}

/// [`f16_scales`]' grid for `x ≈ d·q + m`, `q` in `0..=nmax`, `m` the block's minimum: the
/// scale and offset, the levels in `q`.
pub(crate) fn f16_grid_affine(x: &[f32], nmax: i32, q: &mut [u8]) -> Option<(f32, f32)> {
    let lo = x.iter().fold(f32::INFINITY, |a, &v| a.min(v));
    let hi = x.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
    if !(hi > lo) || !(hi - lo).is_finite() || f16r(lo) != lo {
        return None;
    }
    if !may_sit_on_affine_grid(x, lo, hi, nmax) {
        return None;
    }
    search_f16_affine(x, lo, hi, nmax, q)
}

/// [`f16_grid_affine`]'s search itself, every candidate tried.
fn search_f16_affine(x: &[f32], lo: f32, hi: f32, nmax: i32, q: &mut [u8]) -> Option<(f32, f32)> {
    let step = std::iter::once_with(|| grid_step(x));
    let d = f16_scales(std::iter::once(Some((hi - lo) / nmax as f32)).chain(step)).find(|&d| {
        let inv = 1.0 / d;
        d > 0.0
            && x.iter().zip(q.iter_mut()).all(|(&v, q)| {
                let l = nearest((v - lo) * inv).clamp(0, nmax);
                *q = l as u8;
                f16r(l as f32 * d + lo) == v
            })
    })?;
    Some((d, lo))
}

/// `q` = the levels in `0..=nmax` nearest `(x − m) / d`.
pub(crate) fn assign_affine(x: &[f32], d: f32, m: f32, nmax: i32, q: &mut [u8]) {
    let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
    for (q, &v) in q.iter_mut().zip(x) {
        *q = nearest((v - m) * inv).clamp(0, nmax) as u8;
    }
}

fn error_affine(x: &[f32], w: &[f32], d: f32, m: f32, q: &[u8]) -> f32 {
    let mut err = 0f32;
    for ((&x, &w), &q) in x.iter().zip(w).zip(q) {
        let e = x - (d * q as f32 + m);
        err += w * e * e;
    }
    err
}

/// Rounds through f16, as a block header stores it.
#[inline]
pub(crate) fn f16r(v: f32) -> f32 {
    half::f16::from_f32(v).to_f32()
}

/// Whether the rounding of `ty` also weighs each value by its own size, given the row's
/// importance if any. Measured by KL divergence (COMPRESSION.md): it pays on the k-quants of 4
/// bits or fewer always; on the other 4-bit types without an importance matrix, or with one
/// that barely tells the columns apart ([`is_flat`]: Qwen's FFN inputs) — with an informative
/// one, importance alone is best (SmolLM2, Gemma 3, Qwen's other inputs); it costs on finer
/// grids.
fn weighs_magnitude(ty: GgmlType, importance: Option<&[f32]>) -> bool {
    use GgmlType::*;
    match ty {
        Q2_K | Q3_K | Q4_K => true,
        Q4_0 | Q4_1 | IQ4_NL | IQ4_XS => importance.is_none_or(is_flat),
        _ => false,
    }
}

/// Ratio of an importance row's 99th percentile to its median below which it is flat: it says
/// little about which columns matter beyond what the weights' own sizes say. Qwen's FFN inputs
/// sit at 2.4–4.9, every other projection input of the three models at 5 or more but four
/// FFN inputs and one attention output of SmolLM2 and Gemma 3 (COMPRESSION.md).
const FLAT_IMPORTANCE: f32 = 5.0;

/// Whether `importance` is flat ([`FLAT_IMPORTANCE`]).
fn is_flat(importance: &[f32]) -> bool {
    let mut v = importance.to_vec();
    let n = v.len();
    if n == 0 {
        return false;
    }
    let p99 = *v.select_nth_unstable_by(n * 99 / 100, f32::total_cmp).1;
    let median = *v.select_nth_unstable_by(n / 2, f32::total_cmp).1;
    p99 < FLAT_IMPORTANCE * median
}

/// The weight of each value's error in a row of type `ty`, given the row's importance (an
/// importance matrix's mean squared input per column) or none: the importance, times
/// `√(σ² + x²)` (`σ²` the row's mean square) where [`weighs_magnitude`] says so. The input
/// statistics say which columns matter (the output error of a row is `Σ δⱼ² E[xⱼ²]` for
/// independent inputs); on coarse grids the value's own size also steers the error away from
/// the large weights (ggml weighs by the same form).
pub fn error_weights(ty: GgmlType, x: &[f32], importance: Option<&[f32]>, out: &mut [f32]) {
    let magnitude = weighs_magnitude(ty, importance);
    let sigma2 = x.iter().map(|v| v * v).sum::<f32>() / x.len().max(1) as f32;
    for (i, (o, &v)) in out.iter_mut().zip(x).enumerate() {
        let imp = importance.map_or(1.0, |m| m[i].max(0.0));
        *o = if magnitude {
            imp * (sigma2 + v * v).sqrt()
        } else {
            imp
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::Rng;

    /// With an importance row whose 99th percentile is within [`FLAT_IMPORTANCE`] of its median
    /// the 4-bit legacy and IQ4 types weigh magnitude as well, as without one; with a peaked
    /// row, importance alone; the k-quants of 4 bits or fewer always, finer types never.
    #[test]
    fn magnitude_joins_a_flat_importance_only() {
        let x: Vec<f32> = (0..256)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 40.0)
            .collect();
        let flat: Vec<f32> = (0..256).map(|i| 1.0 + (i % 7) as f32 * 0.3).collect();
        let mut peaked = flat.clone();
        for v in peaked.iter_mut().step_by(16) {
            *v *= 50.0;
        }
        let sigma2 = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
        let mut w = vec![0f32; x.len()];
        for ty in [
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::IQ4_NL,
            GgmlType::IQ4_XS,
        ] {
            error_weights(ty, &x, Some(&flat), &mut w);
            for ((&w, &v), &m) in w.iter().zip(&x).zip(&flat) {
                assert_eq!(w, m * (sigma2 + v * v).sqrt(), "{ty:?}, flat importance");
            }
            error_weights(ty, &x, Some(&peaked), &mut w);
            assert_eq!(w, peaked, "{ty:?}, peaked importance");
        }
        error_weights(GgmlType::Q4_K, &x, Some(&peaked), &mut w);
        assert_ne!(w, peaked, "Q4_K weighs magnitude always");
        error_weights(GgmlType::Q5_0, &x, Some(&flat), &mut w);
        assert_eq!(w, flat, "Q5_0 never weighs magnitude");
    }

    /// The cheap tests that spare the grid searches reject only blocks the searches would:
    /// blocks on grids of every kind (steps down to f16's subnormals, levels short of the
    /// ends, a few values moved off the grid) and blocks never quantized; and they do reject
    /// most of the latter, or they would spare nothing.
    #[test]
    fn grid_prechecks_reject_only_what_the_searches_would() {
        let mut rng = Rng(5);
        let (mut q8, mut qu) = ([0i8; 32], [0u8; 32]);
        // Blocks never quantized that each check rejected; on-grid blocks each search found.
        let (mut rejected, mut found) = ([0usize; 2], [0usize; 2]);
        for n in 0..4000 {
            // A stored scale: an f16, down to its subnormals.
            let step = f16r(10f32.powf(rng.normal().clamp(-3.0, 1.0) * 1.5 - 2.0));
            let (reach, nmax) = [(8u32, 15), (16, 31), (127, 255)][n % 3];
            let r = reach as f32;
            let kind = (n / 3) % 4;
            let mut x: [f32; 32] = std::array::from_fn(|_| match kind {
                0 => rng.normal() * step * r / 3.0,
                1 => (rng.normal() * r / 4.0).round().clamp(-r, r - 1.0) * step,
                2 => ((rng.normal().abs() * nmax as f32 / 4.0).round() - 1.0) * step,
                _ => (rng.normal() * r / 2.0).round().clamp(-8.0, 7.0) * step,
            });
            if n % 7 == 0 {
                x[n % 32] += step * 0.37;
            }
            let x = x.map(f16r);
            let max = signed_extreme(&x);
            let (lo, hi) = (-(reach as i32), reach as i32 - i32::from(reach != 127));
            if max != 0.0 {
                let hit = search_f16_scale(&x, max, lo, hi, &mut q8).is_some();
                let pass = may_sit_on_scale_grid(&x, max, reach);
                assert!(pass || !hit, "scale grid rejected: {x:?}");
                rejected[0] += usize::from(kind == 0 && reach < 127 && !pass);
                found[0] += usize::from(hit);
            }
            let (l, h) = x
                .iter()
                .fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &v| {
                    (l.min(v), h.max(v))
                });
            if h > l {
                let hit = search_f16_affine(&x, l, h, nmax, &mut qu).is_some();
                let pass = may_sit_on_affine_grid(&x, l, h, nmax);
                assert!(pass || !hit, "affine grid rejected: {x:?}");
                rejected[1] += usize::from(kind == 0 && reach < 127 && !pass);
                found[1] += usize::from(hit);
            }
        }
        // Of the 667 blocks never quantized at 4 and 5 bits (an affine grid's lowest gap, and
        // 8 bits, reject fewer); some 2500 blocks are on grids.
        assert!(
            rejected[0] > 450 && rejected[1] > 150,
            "rejected {rejected:?}"
        );
        assert!(found[0] > 1200 && found[1] > 900, "found {found:?}");
    }

    /// A block written by ggml's reference rounding and read back through f16 (a requantized
    /// file's source) comes back as the same values (the scale's sign may flip with the
    /// levels'), with any importance, in every legacy type: a file keeps the grid it has.
    #[test]
    fn reference_grids_are_recovered() {
        fn check<const E: usize, const B: usize>(
            name: &str,
            rng: &mut Rng,
            reference: fn(&[f32; E], &mut [u8; B]),
            decode: fn(&[u8; B], &mut [f32; E]),
            weighted: fn(&[f32; E], &[f32; E], &mut [u8; B]),
        ) {
            let mut missed = 0;
            for _ in 0..500 {
                let scale = 10f32.powf(rng.normal().clamp(-3.0, 3.0));
                let offset = rng.normal() * 2.0;
                let x: [f32; E] = std::array::from_fn(|_| (rng.normal() + offset) * scale);
                let (mut b, mut again) = ([0u8; B], [0u8; B]);
                reference(&x, &mut b);
                let (mut y, mut z) = ([0f32; E], [0f32; E]);
                decode(&b, &mut y);
                let y = y.map(f16r);
                let w: [f32; E] = std::array::from_fn(|_| rng.normal().abs() + 0.01);
                weighted(&y, &w, &mut again);
                decode(&again, &mut z);
                missed += usize::from(z.map(f16r) != y);
            }
            assert_eq!(missed, 0, "{name}: blocks of 500 not recovered");
        }
        use crate::{q4_0, q4_1, q5_0, q5_1, q8_0};
        let mut rng = Rng(11);
        check(
            "Q8_0",
            &mut rng,
            q8_0::quantize_block,
            q8_0::dequantize_block,
            q8_0::quantize_block_weighted,
        );
        check(
            "Q4_0",
            &mut rng,
            q4_0::quantize_block,
            q4_0::dequantize_block,
            q4_0::quantize_block_weighted,
        );
        check(
            "Q5_0",
            &mut rng,
            q5_0::quantize_block,
            q5_0::dequantize_block,
            q5_0::quantize_block_weighted,
        );
        check(
            "Q4_1",
            &mut rng,
            q4_1::quantize_block,
            q4_1::dequantize_block,
            q4_1::quantize_block_weighted,
        );
        check(
            "Q5_1",
            &mut rng,
            q5_1::quantize_block,
            q5_1::dequantize_block,
            q5_1::quantize_block_weighted,
        );
    }

    /// Brute force over a fine scale grid with nearest levels and exact refit: the search comes
    /// within a fraction of a percent of it, and beats the extreme-on-the-end rounding always.
    #[test]
    fn scale_search_is_near_the_best_scale() {
        let mut rng = Rng(5);
        let mut ratios = Vec::new();
        for trial in 0..300 {
            let x: Vec<f32> = (0..32)
                .map(|i| rng.normal() * if i == trial % 32 { 5.0 } else { 1.0 })
                .collect();
            let w: Vec<f32> = (0..32).map(|_| rng.normal().abs() + 0.1).collect();
            let mut q = vec![0i8; 32];
            let (d, err) = fit_scale(&x, &w, -8, 7, true, &mut q, |d| d);
            assert!((error_scale(&x, &w, d, &q) - err).abs() <= 1e-4 * err.max(1e-6));
            let mut brute = f32::INFINITY;
            let max = x.iter().fold(0f32, |a, v| a.max(v.abs()));
            let mut t = vec![0i8; 32];
            for k in 1..4000 {
                for sign in [-1.0, 1.0] {
                    let d = sign * max * k as f32 / 16000.0;
                    assign_scale(&x, d, -8, 7, &mut t);
                    let (sxq, sqq) = (0..32).fold((0f32, 0f32), |(a, b), i| {
                        let l = t[i] as f32;
                        (a + w[i] * x[i] * l, b + w[i] * l * l)
                    });
                    brute = brute.min(error_scale(&x, &w, sxq / sqq, &t));
                }
            }
            ratios.push(err / brute);
            let naive_d = x
                .iter()
                .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m })
                / -8.0;
            assign_scale(&x, naive_d, -8, 7, &mut t);
            assert!(err <= error_scale(&x, &w, naive_d, &t) + 1e-6);
        }
        // A local search: on average within 0.2% of the brute force, never 5% above it.
        let mean = ratios.iter().sum::<f32>() / ratios.len() as f32;
        let max = ratios.iter().copied().fold(0f32, f32::max);
        assert!(mean < 1.002 && max < 1.05, "mean ratio {mean}, worst {max}");
    }

    #[test]
    fn affine_search_is_near_the_best() {
        let mut rng = Rng(6);
        for trial in 0..300 {
            let x: Vec<f32> = (0..32).map(|_| rng.normal() + 0.3).collect();
            let w: Vec<f32> = (0..32).map(|_| rng.normal().abs() + 0.1).collect();
            let at_most_zero = trial % 2 == 0;
            let mut q = vec![0u8; 32];
            let (d, m, err) = fit_affine(&x, &w, 15, at_most_zero, true, &mut q, |d| d);
            assert!(d > 0.0 && (!at_most_zero || m <= 0.0));
            assert!((error_affine(&x, &w, d, m, &q) - err).abs() <= 1e-4 * err.max(1e-6));
            // min/max spacing with nearest levels, as ggml's reference Q4_1
            let lo = x.iter().fold(f32::INFINITY, |a, &v| a.min(v));
            let lo = if at_most_zero { lo.min(0.0) } else { lo };
            let hi = x.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
            let mut t = vec![0u8; 32];
            assign_affine(&x, (hi - lo) / 15.0, lo, 15, &mut t);
            let naive = error_affine(&x, &w, (hi - lo) / 15.0, lo, &t);
            assert!(err <= naive + 1e-6, "{err} > {naive}");
        }
    }

    /// Weights spread as an importance matrix's are (log-normal): against a dense search of
    /// scale and offset (400 spacings × 16 starting offsets, each refit to convergence) the
    /// search keeps within 2% of the least total error, with and without `m ≤ 0`. Starting
    /// every trial from the block minimum with one refit, as before, left 7.3% (unconstrained).
    #[test]
    fn affine_search_is_near_a_dense_search() {
        let mut rng = Rng(7);
        for at_most_zero in [false, true] {
            let (mut total, mut dense) = (0f64, 0f64);
            for _ in 0..200 {
                let x: Vec<f32> = (0..32).map(|_| rng.normal() * 0.03).collect();
                let w: Vec<f32> = (0..32).map(|_| (rng.normal() * 1.2).exp()).collect();
                let mut q = [0u8; 32];
                total += fit_affine(&x, &w, 15, at_most_zero, true, &mut q, f16r).2 as f64;
                let lo = x.iter().fold(f32::INFINITY, |a, &v| a.min(v));
                let lo = if at_most_zero { lo.min(0.0) } else { lo };
                let hi = x.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
                let mut best = f32::INFINITY;
                let mut t = [0u8; 32];
                for i in 0..400 {
                    let d0 = (hi - lo) / (15.0 * (0.5 + 1.5 * i as f32 / 400.0));
                    for k in 0..16 {
                        let (mut d, mut m) = (d0, lo + d0 * (k as f32 / 16.0 - 0.5));
                        for _ in 0..6 {
                            assign_affine(&x, d, m, 15, &mut t);
                            best = best.min(error_affine(&x, &w, f16r(d), f16r(m), &t));
                            let (mut sw, mut sx, mut sq, mut sqq, mut sxq) =
                                (0f64, 0f64, 0f64, 0f64, 0f64);
                            for j in 0..32 {
                                let (x, w, l) = (x[j] as f64, w[j] as f64, t[j] as f64);
                                (sw, sx, sq, sqq, sxq) = (
                                    sw + w,
                                    sx + w * x,
                                    sq + w * l,
                                    sqq + w * l * l,
                                    sxq + w * x * l,
                                );
                            }
                            let det = sqq * sw - sq * sq;
                            if det <= 0.0 {
                                break;
                            }
                            d = ((sw * sxq - sq * sx) / det).max(0.0) as f32;
                            m = ((sqq * sx - sq * sxq) / det) as f32;
                            if at_most_zero && m > 0.0 {
                                break;
                            }
                        }
                    }
                }
                dense += best as f64;
            }
            let ratio = total / dense;
            assert!(
                ratio < 1.02,
                "m ≤ 0: {at_most_zero}, {ratio} of a dense search's error"
            );
        }
    }

    #[test]
    fn degenerate_blocks() {
        let w = [1f32; 16];
        let mut q = [0i8; 16];
        assert_eq!(fit_scale(&[0.0; 16], &w, -4, 3, true, &mut q, |d| d).0, 0.0);
        let mut u = [0u8; 16];
        let (d, m, err) = fit_affine(&[-2.5; 16], &w, 3, true, true, &mut u, |d| d);
        assert_eq!((d, m, err), (0.0, -2.5, 0.0));
        let (d, m, _) = fit_affine(&[2.5; 16], &w, 3, false, true, &mut u, |d| d);
        assert_eq!((d, m), (0.0, 2.5));
        // a positive constant under a non-positive offset takes the scale
        let (d, m, err) = fit_affine(&[2.5; 16], &w, 3, true, true, &mut u, |d| d);
        assert!(d > 0.0 && m == 0.0 && err < 1e-9, "{d} {m} {err}");
    }
}
