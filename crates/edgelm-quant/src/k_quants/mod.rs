//! K-quants: 256-element super-blocks split into 16- or 32-element sub-blocks whose scales
//! (and mins) are themselves quantized against one or two f16 super-block scales.
//!
//! Element order inside a super-block is not sequential in the packed bytes; each module
//! documents where element `e` lives.

pub mod q2_k;
pub mod q3_k;
pub mod q4_k;
pub mod q5_k;
pub mod q6_k;
pub mod q8_k;

use crate::weighted::{assign_affine, assign_scale, f16r, fit_affine, fit_scale};

/// Elements per super-block.
pub const QK_K: usize = 256;

/// The 6-bit (scale, min) pair `j` (0..8) of the 12-byte Q4_K/Q5_K scale field: pairs 0..4
/// are the low 6 bits of bytes 0..4 / 4..8; pairs 4..8 keep their low nibbles in bytes
/// 8..12 and their top 2 bits in the spare top bits of bytes 0..8.
#[inline]
pub fn get_scale_min_k4(j: usize, q: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Inverse of [`get_scale_min_k4`] for 6-bit values.
pub fn pack_scale_min_k4(sc: &[u8; 8], mn: &[u8; 8]) -> [u8; 12] {
    let mut q = [0u8; 12];
    for j in 0..8 {
        let (s, m) = (sc[j] & 63, mn[j] & 63);
        if j < 4 {
            q[j] |= s;
            q[j + 4] |= m;
        } else {
            q[j + 4] = (s & 0x0F) | ((m & 0x0F) << 4);
            q[j - 4] |= (s >> 4) << 6;
            q[j] |= (m >> 4) << 6;
        }
    }
    q
}

/// A super-block quantized to per-sub-block unsigned (scale, min) codes in `0..=smax`,
/// super-block `d` and `dmin` (as f16 stores them), and levels `0..=nmax`:
/// `x = d·sc·q − dmin·mn`.
pub(crate) struct AsymBlock<const NSUB: usize> {
    pub d: f32,
    pub dmin: f32,
    pub sc: [u8; NSUB],
    pub mn: [u8; NSUB],
    pub q: [u8; QK_K],
}

/// Weighted least-squares quantization of an asymmetric k-quant super-block: each sub-block's
/// best free (scale, min) by [`fit_affine`]; the scales and mins coded against `d` and `dmin`
/// by the same search, each sub-block weighted by how much its error grows with a change of
/// its scale (`Σ w q²`) or min (`Σ w`); then levels re-assigned for the coded values, `d` and
/// `dmin` refit, and each sub-block's codes moved by ±1 wherever that lowers its error.
///
/// A super-block a k-quant wrote before (a requantized model) has sub-blocks on grids whose
/// steps are integer multiples of one `d`: the fit that tries each sub-block's own step, coded
/// the same way, is taken instead where it ends with at most half the error. (Alone it would
/// not do: elsewhere the exact step of a sub-block codes badly against the others'.)
pub(crate) fn quantize_asym<const NSUB: usize>(
    x: &[f32; QK_K],
    w: &[f32; QK_K],
    nmax: i32,
    smax: i32,
) -> AsymBlock<NSUB> {
    let free = SubFits::<NSUB>::new(x, w, nmax, false);
    let (out, err) = code_asym(x, w, nmax, smax, &free, false);
    let grid = SubFits::<NSUB>::new(x, w, nmax, true);
    let (on_grid, grid_err) = code_asym(x, w, nmax, smax, &grid, true);
    // Only a clear win: where a block is on a grid the error falls by far more, and narrow wins
    // elsewhere measured worse in KL divergence (SmolLM2 Q4_K_S 0.0290 at half, 0.0298 at any).
    if grid_err < 0.5 * err {
        on_grid
    } else {
        out
    }
}

/// Each sub-block's free (scale, min) and the weights of their coding.
struct SubFits<const NSUB: usize> {
    scales: [f32; NSUB],
    mins: [f32; NSUB],
    /// `Σ w q²` and `Σ w` per sub-block: how its error grows with its scale and its min.
    ws: [f32; NSUB],
    wm: [f32; NSUB],
}

impl<const NSUB: usize> SubFits<NSUB> {
    fn new(x: &[f32; QK_K], w: &[f32; QK_K], nmax: i32, grid: bool) -> Self {
        let sub = QK_K / NSUB;
        let mut f = SubFits {
            scales: [0f32; NSUB],
            mins: [0f32; NSUB],
            ws: [0f32; NSUB],
            wm: [0f32; NSUB],
        };
        let mut q = [0u8; QK_K];
        for j in 0..NSUB {
            let r = j * sub..(j + 1) * sub;
            let (s, m, _) = fit_affine(
                &x[r.clone()],
                &w[r.clone()],
                nmax,
                true,
                grid,
                &mut q[r.clone()],
                |v| v,
            );
            (f.scales[j], f.mins[j]) = (s, -m);
            for i in r {
                f.ws[j] += w[i] * (q[i] as f32).powi(2);
                f.wm[j] += w[i];
            }
        }
        f
    }
}

/// The sub-blocks' fits coded against `d` and `dmin` (with `grid`, the step of a grid the
/// scales already sit on tried too), then refined: the block and its weighted error.
fn code_asym<const NSUB: usize>(
    x: &[f32; QK_K],
    w: &[f32; QK_K],
    nmax: i32,
    smax: i32,
    fits: &SubFits<NSUB>,
    grid: bool,
) -> (AsymBlock<NSUB>, f32) {
    let sub = QK_K / NSUB;
    let mut q = [0u8; QK_K];
    let mut codes = [0i8; NSUB];
    let mut out = AsymBlock {
        d: 0.0,
        dmin: 0.0,
        sc: [0; NSUB],
        mn: [0; NSUB],
        q: [0; QK_K],
    };
    let code = |values: &[f32; NSUB], weights: &[f32; NSUB], codes: &mut [i8; NSUB]| {
        let (d, err) = fit_scale(values, weights, 0, smax, grid, codes, f16r);
        let mut whole = [0i8; NSUB];
        match grid
            .then(|| fit_divisor(values, weights, smax, &mut whole))
            .flatten()
        {
            Some((dd, e)) if e < err => {
                *codes = whole;
                dd
            }
            _ => d,
        }
    };
    out.d = code(&fits.scales, &fits.ws, &mut codes);
    out.sc = codes.map(|c| c as u8);
    out.dmin = code(&fits.mins, &fits.wm, &mut codes);
    out.mn = codes.map(|c| c as u8);

    // Levels of sub-block `j` for codes (sc, mn) and their weighted error.
    let levels = |j: usize, d: f32, dmin: f32, sc: u8, mn: u8, q: &mut [u8]| -> f32 {
        let r = j * sub..(j + 1) * sub;
        let (de, dm) = (d * sc as f32, dmin * mn as f32);
        assign_affine(&x[r.clone()], de, -dm, nmax, q);
        let mut err = 0f32;
        for (k, i) in r.enumerate() {
            let e = de * q[k] as f32 - dm - x[i];
            err += w[i] * e * e;
        }
        err
    };
    let all_levels = |out: &AsymBlock<NSUB>, q: &mut [u8; QK_K]| -> f32 {
        (0..NSUB)
            .map(|j| {
                levels(
                    j,
                    out.d,
                    out.dmin,
                    out.sc[j],
                    out.mn[j],
                    &mut q[j * sub..(j + 1) * sub],
                )
            })
            .sum()
    };
    let mut err = all_levels(&out, &mut q);
    for _ in 0..3 {
        let mut improved = false;
        // d and dmin by least squares for the chosen codes and levels.
        let (mut aa, mut ab, mut bb, mut xa, mut xb) = (0f32, 0f32, 0f32, 0f32, 0f32);
        for i in 0..QK_K {
            let a = out.sc[i / sub] as f32 * q[i] as f32;
            let b = -(out.mn[i / sub] as f32);
            aa += w[i] * a * a;
            ab += w[i] * a * b;
            bb += w[i] * b * b;
            xa += w[i] * x[i] * a;
            xb += w[i] * x[i] * b;
        }
        let det = aa * bb - ab * ab;
        if det > 0.0 {
            let d = f16r((xa * bb - xb * ab) / det);
            let dmin = f16r((aa * xb - ab * xa) / det);
            if d > 0.0 && dmin >= 0.0 {
                let trial = AsymBlock {
                    d,
                    dmin,
                    sc: out.sc,
                    mn: out.mn,
                    q: [0; QK_K],
                };
                let mut q2 = [0u8; QK_K];
                let e2 = all_levels(&trial, &mut q2);
                if e2 < err {
                    (out.d, out.dmin, q, err, improved) = (d, dmin, q2, e2, true);
                }
            }
        }
        // Each sub-block's codes one step either way.
        let mut buf = [0u8; QK_K];
        for j in 0..NSUB {
            let r = j * sub..(j + 1) * sub;
            let mut best = levels(j, out.d, out.dmin, out.sc[j], out.mn[j], &mut buf[..sub]);
            let start = best;
            for ds in -1..=1i32 {
                for dm in -1..=1i32 {
                    let (s, m) = (out.sc[j] as i32 + ds, out.mn[j] as i32 + dm);
                    if (ds, dm) == (0, 0) || !(0..=smax).contains(&s) || !(0..=smax).contains(&m) {
                        continue;
                    }
                    let e = levels(j, out.d, out.dmin, s as u8, m as u8, &mut buf[..sub]);
                    if e < best {
                        best = e;
                        (out.sc[j], out.mn[j]) = (s as u8, m as u8);
                        q[r.clone()].copy_from_slice(&buf[..sub]);
                    }
                }
            }
            if best < start {
                err += best - start;
                improved = true;
            }
        }
        if !improved {
            break;
        }
    }
    out.q = q;
    (out, err)
}

/// The `d` among `max(values) / c` for whole `c` in `1..=smax` (as f16 stores it) with the
/// least weighted error of `values ≈ d·code`, codes in `0..=smax`: where the values are whole
/// multiples of one `d`, as a k-quant's coded scales are, that `d` exactly.
fn fit_divisor<const N: usize>(
    values: &[f32; N],
    weights: &[f32; N],
    smax: i32,
    codes: &mut [i8; N],
) -> Option<(f32, f32)> {
    let max = values.iter().copied().fold(0f32, f32::max);
    let mut best: Option<(f32, f32)> = None;
    for c in 1..=smax {
        let d = f16r(max / c as f32);
        if !(d > 0.0) {
            continue;
        }
        let mut err = 0f32;
        for (&v, &w) in values.iter().zip(weights) {
            let e = v - d * (v / d).round().clamp(0.0, smax as f32);
            err += w * e * e;
        }
        if best.is_none_or(|(_, b)| err < b) {
            best = Some((d, err));
        }
    }
    let (d, err) = best?;
    for (code, &v) in codes.iter_mut().zip(values) {
        *code = (v / d).round().clamp(0.0, smax as f32) as i8;
    }
    Some((d, err))
}

/// A super-block of 16 sub-blocks of 16 quantized to signed scale codes in
/// `-(smax+1)..=smax`, super-block `d` (as f16 stores it) and levels `-nmax..nmax`:
/// `x = d·sc·q`.
pub(crate) struct SymBlock {
    pub d: f32,
    pub sc: [i8; 16],
    pub q: [i8; QK_K],
}

/// Weighted least-squares quantization of a symmetric k-quant super-block, as
/// [`quantize_asym`] without mins.
pub(crate) fn quantize_sym(x: &[f32; QK_K], w: &[f32; QK_K], nmax: i32, smax: i32) -> SymBlock {
    let mut scales = [0f32; 16];
    let mut ws = [0f32; 16];
    let mut q = [0i8; QK_K];
    for j in 0..16 {
        let r = j * 16..(j + 1) * 16;
        scales[j] = fit_scale(
            &x[r.clone()],
            &w[r.clone()],
            -nmax,
            nmax - 1,
            false,
            &mut q[r.clone()],
            |v| v,
        )
        .0;
        ws[j] = r.map(|i| w[i] * (q[i] as f32).powi(2)).sum();
    }
    let mut out = SymBlock {
        d: 0.0,
        sc: [0; 16],
        q: [0; QK_K],
    };
    out.d = fit_scale(&scales, &ws, -smax - 1, smax, false, &mut out.sc, f16r).0;
    if out.d == 0.0 {
        return out;
    }
    let levels = |j: usize, d: f32, sc: i8, q: &mut [i8]| -> f32 {
        let r = j * 16..(j + 1) * 16;
        let de = d * sc as f32;
        assign_scale(&x[r.clone()], de, -nmax, nmax - 1, q);
        let mut err = 0f32;
        for (k, i) in r.enumerate() {
            let e = de * q[k] as f32 - x[i];
            err += w[i] * e * e;
        }
        err
    };
    let all_levels = |d: f32, sc: &[i8; 16], q: &mut [i8; QK_K]| -> f32 {
        (0..16)
            .map(|j| levels(j, d, sc[j], &mut q[j * 16..(j + 1) * 16]))
            .sum()
    };
    let mut err = all_levels(out.d, &out.sc, &mut q);
    for _ in 0..3 {
        let mut improved = false;
        let (mut aa, mut xa) = (0f32, 0f32);
        for i in 0..QK_K {
            let a = out.sc[i / 16] as f32 * q[i] as f32;
            aa += w[i] * a * a;
            xa += w[i] * x[i] * a;
        }
        if aa > 0.0 {
            let d = f16r(xa / aa);
            let mut q2 = [0i8; QK_K];
            let e2 = all_levels(d, &out.sc, &mut q2);
            if e2 < err {
                (out.d, q, err, improved) = (d, q2, e2, true);
            }
        }
        let mut buf = [0i8; 16];
        for j in 0..16 {
            let start = levels(j, out.d, out.sc[j], &mut buf);
            let mut best = start;
            for step in [-1i32, 1] {
                let s = out.sc[j] as i32 + step;
                if !(-smax - 1..=smax).contains(&s) {
                    continue;
                }
                let e = levels(j, out.d, s as i8, &mut buf);
                if e < best {
                    best = e;
                    out.sc[j] = s as i8;
                    q[j * 16..(j + 1) * 16].copy_from_slice(&buf);
                }
            }
            if best < start {
                err += best - start;
                improved = true;
            }
        }
        if !improved {
            break;
        }
    }
    out.q = q;
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_min_k4_packing() {
        // Pair 5: scale 0b11_0101 = 53, min 0b10_1010 = 42.
        let mut q = [0u8; 12];
        q[9] = 0xA5; // low nibbles: scale 5, min 10
        q[1] = 0b11 << 6; // scale top bits live in byte j-4
        q[5] = 0b10 << 6; // min top bits live in byte j
        assert_eq!(get_scale_min_k4(5, &q), (53, 42));
        // The top bits must not leak into pairs 1 (scale from byte 1, min from byte 5).
        assert_eq!(get_scale_min_k4(1, &q), (0, 0));
        q[1] |= 0x3F;
        q[5] |= 0x21;
        assert_eq!(get_scale_min_k4(1, &q), (63, 33));

        let sc = [1, 2, 3, 63, 17, 33, 48, 62];
        let mn = [63, 0, 5, 9, 40, 1, 31, 32];
        let p = pack_scale_min_k4(&sc, &mn);
        for j in 0..8 {
            assert_eq!(get_scale_min_k4(j, &p), (sc[j], mn[j]), "pair {j}");
        }
    }
}
