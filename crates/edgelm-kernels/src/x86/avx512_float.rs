//! AVX-512 strips of 32 widened float rows against many tokens (see `avx2::strip_tile`). Callers
//! guarantee AVX-512 F (checked once by `Isa`).

use std::arch::x86_64::*;

/// Rows of a strip: two vectors of sixteen.
pub const STRIP_ROWS: usize = 32;
/// Tokens of a strip tile: 2×12 accumulators, two weight vectors and a broadcast fill 27 of the
/// 32 registers.
pub const STRIP_TOKENS: usize = 12;

/// One phase of a strip tile: `out[j][r] = Σ_m strip[m·32 + r]·x[(t + j)·k + 8m + phase]` over
/// `steps` steps for tokens `t..t + nt` (`nt` ≤ 12), each sum one FMA chain in m (see
/// `avx2::strip_tile`); per step two weight loads and one broadcast per token.
///
/// # Safety
/// The CPU supports AVX-512 F; `strip` holds `32·steps` floats and `x` tokens `t..t + nt` of `k`
/// with `8·steps + phase` ≤ `k`.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn strip_tile(
    strip: &[f32],
    steps: usize,
    x: &[f32],
    k: usize,
    t: usize,
    nt: usize,
    phase: usize,
    out: &mut [[f32; STRIP_ROWS]; STRIP_TOKENS],
) {
    match nt {
        1 => strip_tile_n::<1>(strip, steps, x, k, t, phase, out),
        2 => strip_tile_n::<2>(strip, steps, x, k, t, phase, out),
        3 => strip_tile_n::<3>(strip, steps, x, k, t, phase, out),
        4 => strip_tile_n::<4>(strip, steps, x, k, t, phase, out),
        5 => strip_tile_n::<5>(strip, steps, x, k, t, phase, out),
        6 => strip_tile_n::<6>(strip, steps, x, k, t, phase, out),
        7 => strip_tile_n::<7>(strip, steps, x, k, t, phase, out),
        8 => strip_tile_n::<8>(strip, steps, x, k, t, phase, out),
        9 => strip_tile_n::<9>(strip, steps, x, k, t, phase, out),
        10 => strip_tile_n::<10>(strip, steps, x, k, t, phase, out),
        11 => strip_tile_n::<11>(strip, steps, x, k, t, phase, out),
        12 => strip_tile_n::<12>(strip, steps, x, k, t, phase, out),
        _ => unreachable!("a strip tile has 1 to 12 tokens"),
    }
}

#[inline(always)]
unsafe fn strip_tile_n<const T: usize>(
    strip: &[f32],
    steps: usize,
    x: &[f32],
    k: usize,
    t: usize,
    phase: usize,
    out: &mut [[f32; STRIP_ROWS]; STRIP_TOKENS],
) {
    debug_assert!(strip.len() >= STRIP_ROWS * steps && x.len() >= (t + T) * k);
    debug_assert!(steps == 0 || 8 * (steps - 1) + phase < k);
    let xs: [*const f32; T] = std::array::from_fn(|j| x.as_ptr().add((t + j) * k + phase));
    let w = strip.as_ptr();
    let mut acc = [[_mm512_setzero_ps(); 2]; T];
    for m in 0..steps {
        let w0 = _mm512_loadu_ps(w.add(m * STRIP_ROWS));
        let w1 = _mm512_loadu_ps(w.add(m * STRIP_ROWS + 16));
        for j in 0..T {
            let xv = _mm512_set1_ps(*xs[j].add(8 * m));
            acc[j][0] = _mm512_fmadd_ps(w0, xv, acc[j][0]);
            acc[j][1] = _mm512_fmadd_ps(w1, xv, acc[j][1]);
        }
    }
    for j in 0..T {
        _mm512_storeu_ps(out[j].as_mut_ptr(), acc[j][0]);
        _mm512_storeu_ps(out[j].as_mut_ptr().add(16), acc[j][1]);
    }
}
