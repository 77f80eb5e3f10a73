//! Least-squares rounding of one block of 32 values to a symmetric integer grid `x ≈ d·q`
//! (Q8_0 and Q4_0 as the KV cache writes them). ggml's reference rounds at one scale, the
//! block's extreme over the grid's reach; here a few trial scales around it are rounded, each
//! refit to its least-squares `d` (rounded to f16 as stored), and the smallest error kept.
//! The reference's own choice is among the trials, so the error never exceeds it.

/// Trial scales per side of the grid: the reference's and steps of 2.5% either way.
const TRIALS: i32 = 4;
/// Trials per end of the grid, and at most two ends.
const PER_END: usize = 2 * TRIALS as usize + 1;
/// Trials of a grid with two ends (one longer than the other, as Q4_0's −8..=7).
pub const MAX_TRIALS: usize = 2 * PER_END;

/// Levels in `lo..=hi` into `q` and the scale `d` (as f16 rounds it) for `x`.
pub fn fit_symmetric(x: &[f32; 32], lo: i32, hi: i32, q: &mut [i8; 32]) -> f32 {
    let Some((inv, n)) = trial_inverses(x, lo, hi) else {
        q.fill(0);
        return 0.0;
    };
    if n == PER_END {
        fit_trials::<PER_END>(x, inv[..PER_END].try_into().expect("one end"), lo, hi, q)
    } else {
        fit_trials::<MAX_TRIALS>(x, inv, lo, hi, q)
    }
}

/// The inverses of the trial scales for `x` on the grid `lo..=hi`, and how many there are;
/// `None` for a block of zeros. Around the scale putting the block's extreme on either end of
/// the grid (the longer one first: the reference's choice); a grid symmetric about zero has one.
pub fn trial_inverses(x: &[f32; 32], lo: i32, hi: i32) -> Option<([f32; MAX_TRIALS], usize)> {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax == 0.0 {
        return None;
    }
    let ends: &[i32] = if lo == -hi { &[hi] } else { &[lo, hi] };
    let mut inv = [0f32; MAX_TRIALS];
    for (e, &end) in ends.iter().enumerate() {
        for k in -TRIALS..=TRIALS {
            let d0 = max / (end as f32 * (1.0 + 0.025 * k as f32));
            inv[e * PER_END + (k + TRIALS) as usize] = 1.0 / d0;
        }
    }
    Some((inv, ends.len() * PER_END))
}

/// The trial kept: the first with the smallest error among those with any nonzero level
/// (`sqq[t]`, the sum of squared levels, above 0).
pub fn best_trial(err: &[f32], sqq: &[f32]) -> Option<usize> {
    let mut best: Option<(f32, usize)> = None;
    for t in (0..err.len()).filter(|&t| sqq[t] != 0.0) {
        if err[t] < best.map_or(f32::INFINITY, |b| b.0) {
            best = Some((err[t], t));
        }
    }
    best.map(|b| b.1)
}

/// [`fit_symmetric`]'s `N` trials, at inverse scales `inv`: a constant count, so the loops over
/// trials unroll and vectorize.
fn fit_trials<const N: usize>(
    x: &[f32; 32],
    inv: [f32; N],
    lo: i32,
    hi: i32,
    q: &mut [i8; 32],
) -> f32 {
    // All trials side by side, element by element: each trial's sums still run in element
    // order (the same bits as one trial after another), but the trials' chains of additions
    // overlap instead of each waiting on its own.
    let mut levels = [[0i8; 32]; N];
    let (mut sxq, mut sqq) = ([0f32; N], [0f32; N]);
    for (j, &v) in x.iter().enumerate() {
        for t in 0..N {
            let r = round_away(v * inv[t]).clamp(lo, hi) as f32;
            levels[t][j] = r as i8;
            sxq[t] += v * r;
            sqq[t] += r * r;
        }
    }
    let mut d = [0f32; N];
    for t in 0..N {
        if sqq[t] != 0.0 {
            d[t] = half::f16::from_f32(sxq[t] / sqq[t]).to_f32();
        }
    }
    let mut err = [0f32; N];
    for (j, &v) in x.iter().enumerate() {
        for t in 0..N {
            err[t] += (v - d[t] * levels[t][j] as f32).powi(2);
        }
    }
    match best_trial(&err, &sqq) {
        Some(t) => {
            q.copy_from_slice(&levels[t]);
            d[t]
        }
        None => 0.0,
    }
}

/// `t.round()` (ties away from zero) as an integer, saturating far outside any grid. Adding
/// the largest f32 below ½ with `t`'s sign and truncating equals `round` for every |t| ≤ 10⁶ (at
/// ½ itself the sum rounds up to the next integer; just below it, it stays below). Unlike
/// `round`, which is a libm call on x86-64's baseline, it vectorizes: the KV cache's quantizer
/// rounds nine trial scales per block of every prompt token's keys and values.
#[inline]
fn round_away(t: f32) -> i32 {
    (t + 0.499_999_97f32.copysign(t)) as i32
}

#[cfg(test)]
mod tests {
    use crate::{q4_0, q8_0};

    fn error(x: &[f32; 32], y: &[f32; 32]) -> f32 {
        x.iter().zip(y).map(|(a, b)| (a - b) * (a - b)).sum()
    }

    /// `round_away` is `round` around every half-integer a grid reaches (and far beyond it),
    /// a few ulps either side, and on random values.
    #[test]
    fn round_away_equals_round() {
        for k in -1000..=1000 {
            let half = k as f32 + 0.5;
            let mut t = half;
            for _ in 0..4 {
                t = t.next_down();
            }
            for _ in 0..9 {
                assert_eq!(super::round_away(t), t.round() as i32, "{t}");
                t = t.next_up();
            }
        }
        let mut seed = 3u64;
        for _ in 0..100_000 {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
            let t = ((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 600.0;
            assert_eq!(super::round_away(t), t.round() as i32, "{t}");
        }
    }

    /// Never worse than ggml's rounding, and better on average, for both formats; on blocks
    /// with an outlier as KV rows have them.
    #[test]
    fn least_squares_rounding_beats_the_reference() {
        let mut seed = 99u64;
        let mut rnd = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        };
        let (mut ours4, mut ref4, mut ours8, mut ref8) = (0f32, 0f32, 0f32, 0f32);
        for trial in 0..2000 {
            let mut x = [0f32; 32];
            x.iter_mut().for_each(|v| *v = rnd() * 3.0);
            if trial % 2 == 0 {
                x[trial % 32] *= 12.0;
            }
            let (mut a, mut b) = ([0u8; 18], [0u8; 18]);
            q4_0::quantize_block(&x, &mut a);
            q4_0::quantize_block_fitted(&x, &mut b);
            let (mut ya, mut yb) = ([0f32; 32], [0f32; 32]);
            q4_0::dequantize_block(&a, &mut ya);
            q4_0::dequantize_block(&b, &mut yb);
            let (ea, eb) = (error(&x, &ya), error(&x, &yb));
            assert!(eb <= ea * 1.0001, "q4_0 trial {trial}: {eb} > {ea}");
            ref4 += ea;
            ours4 += eb;
            let (mut a, mut b) = ([0u8; 34], [0u8; 34]);
            q8_0::quantize_block(&x, &mut a);
            q8_0::quantize_block_fitted(&x, &mut b);
            q8_0::dequantize_block(&a, &mut ya);
            q8_0::dequantize_block(&b, &mut yb);
            let (ea, eb) = (error(&x, &ya), error(&x, &yb));
            assert!(eb <= ea * 1.0001, "q8_0 trial {trial}: {eb} > {ea}");
            ref8 += ea;
            ours8 += eb;
        }
        assert!(ours4 < 0.95 * ref4, "q4_0: {ours4} against {ref4}");
        assert!(ours8 < ref8, "q8_0: {ours8} against {ref8}");
        let mut zero = [0u8; 18];
        q4_0::quantize_block_fitted(&[0.0; 32], &mut zero);
        let mut y = [1f32; 32];
        q4_0::dequantize_block(&zero, &mut y);
        assert_eq!(y, [0.0; 32]);
    }
}
