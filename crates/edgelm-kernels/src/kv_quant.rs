//! The KV cache's least-squares rounding of a block of 32 values (`edgelm_quant::fit`, the
//! scalar reference) on the SIMD path: every key and value a prompt writes passes here.

use crate::Isa;
use edgelm_quant::fit::{best_trial, fit_symmetric as fit_scalar, trial_inverses};

/// [`edgelm_quant::fit::fit_symmetric`] on `isa`: the same levels and scale, bit for bit.
pub fn fit_symmetric(isa: Isa, x: &[f32; 32], lo: i32, hi: i32, q: &mut [i8; 32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if isa != Isa::Scalar {
        return fit_avx2(x, lo, hi, q);
    }
    let _ = isa;
    fit_scalar(x, lo, hi, q)
}

#[cfg(target_arch = "x86_64")]
fn fit_avx2(x: &[f32; 32], lo: i32, hi: i32, q: &mut [i8; 32]) -> f32 {
    use crate::x86::avx2_kv::fit_trials;
    let Some((inv, n)) = trial_inverses(x, lo, hi) else {
        q.fill(0);
        return 0.0;
    };
    let mut padded = [0f32; 24];
    padded[..inv.len()].copy_from_slice(&inv);
    let mut levels = [[0f32; 24]; 32];
    let (mut d, mut err, mut sqq) = ([0f32; 24], [0f32; 24], [0f32; 24]);
    let grid = (lo as f32, hi as f32);
    let out = (&mut d, &mut err, &mut sqq);
    // SAFETY: every path but the scalar one runs on CPUs with AVX2 and F16C (`Isa`).
    unsafe {
        if n <= 16 {
            fit_trials::<2>(x, &padded, grid, &mut levels, out)
        } else {
            fit_trials::<3>(x, &padded, grid, &mut levels, out)
        }
    }
    match best_trial(&err[..n], &sqq[..n]) {
        Some(t) => {
            for (qj, l) in q.iter_mut().zip(&levels) {
                *qj = l[t] as i8;
            }
            d[t]
        }
        None => 0.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgelm_quant::{q4_0, q8_0};

    /// Every path gives the scalar rounding's scale bits and levels, on both grids, for blocks
    /// of every magnitude (subnormal to 10⁶), with outliers, constants, zeros and lone values.
    #[test]
    fn every_path_rounds_as_the_scalar_reference() {
        let mut rng = crate::test_rng::Rng(41);
        let mut blocks: Vec<[f32; 32]> = Vec::new();
        for trial in 0..20_000 {
            let scale = [1e-38f32, 1e-6, 0.01, 1.0, 3.0, 100.0, 1e6][trial % 7];
            let mut x = [0f32; 32];
            x.iter_mut().for_each(|v| *v = rng.unit() * scale);
            match trial % 5 {
                0 => x[trial % 32] *= 12.0,
                1 => x.iter_mut().skip(1).for_each(|v| *v = 0.0),
                2 => x = [x[0]; 32],
                _ => {}
            }
            blocks.push(x);
        }
        blocks.push([0.0; 32]);
        // Half-integers and their neighbours at the reference trial's scale 1 (an extreme of
        // 127 on Q8_0's grid, −8 on Q4_0's), where rounding ties must go away from zero.
        let ties = [
            0.5f32,
            -0.5,
            1.5,
            -2.5,
            3.5,
            0.499_999_97,
            -0.499_999_97,
            6.5,
        ];
        for extreme in [127.0f32, -8.0] {
            let mut x = [0f32; 32];
            x[0] = extreme;
            for (j, v) in x.iter_mut().enumerate().skip(1) {
                *v = ties[j % ties.len()] * if j > 16 { -1.0 } else { 1.0 };
            }
            blocks.push(x);
        }
        let grids = [q8_0::LEVELS, q4_0::LEVELS];
        #[cfg(target_arch = "x86_64")]
        if Isa::available().contains(&Isa::Avx2) {
            trials_round_as_round(&blocks, grids);
        }
        for isa in Isa::available() {
            for x in &blocks {
                for (lo, hi) in grids {
                    let (mut want, mut got) = ([0i8; 32], [0i8; 32]);
                    let d_want = fit_scalar(x, lo, hi, &mut want);
                    let d_got = fit_symmetric(isa, x, lo, hi, &mut got);
                    assert_eq!(
                        d_got.to_bits(),
                        d_want.to_bits(),
                        "{isa} {x:?} on {lo}..={hi}"
                    );
                    assert_eq!(got, want, "{isa} {x:?} on {lo}..={hi}");
                }
            }
        }
    }

    /// Every trial's levels, not only the kept one's, against `f32::round` (ties away from
    /// zero; an undefined product to 0, as the scalar trials' `as i32` does).
    #[cfg(target_arch = "x86_64")]
    fn trials_round_as_round(blocks: &[[f32; 32]], grids: [(i32, i32); 2]) {
        for x in blocks {
            for (lo, hi) in grids {
                let Some((inv, n)) = trial_inverses(x, lo, hi) else {
                    continue;
                };
                let mut padded = [0f32; 24];
                padded[..inv.len()].copy_from_slice(&inv);
                let mut levels = [[0f32; 24]; 32];
                let (mut d, mut err, mut sqq) = ([0f32; 24], [0f32; 24], [0f32; 24]);
                let out = (&mut d, &mut err, &mut sqq);
                // SAFETY: the caller checked that the CPU has AVX2 (and with it F16C).
                unsafe {
                    crate::x86::avx2_kv::fit_trials::<3>(
                        x,
                        &padded,
                        (lo as f32, hi as f32),
                        &mut levels,
                        out,
                    )
                };
                for (j, &v) in x.iter().enumerate() {
                    for (t, &i) in inv[..n].iter().enumerate() {
                        let p = v * i;
                        let want = if p.is_nan() {
                            0.0
                        } else {
                            p.round().clamp(lo as f32, hi as f32)
                        };
                        assert_eq!(levels[j][t], want, "{v} × {i} on {lo}..={hi}");
                    }
                }
            }
        }
    }
}
