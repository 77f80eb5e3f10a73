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

use crate::nearest_int;

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

/// Least-squares fit `x ≈ scale * l - min` with integer levels `l` in `0..=nmax`,
/// `scale >= 0` and `min >= 0` (the offset may only shift values down, as the formats store
/// it unsigned). Tries a few candidate level spacings and keeps the lowest squared error.
pub(crate) fn fit_scale_min(x: &[f32], nmax: i32) -> (f32, f32) {
    let mut lo = x.iter().fold(f32::INFINITY, |a, &v| a.min(v));
    let hi = x.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
    if lo > 0.0 {
        lo = 0.0;
    }
    if !(hi > lo) || !(hi - lo).is_finite() {
        return (0.0, if lo.is_finite() { -lo } else { 0.0 });
    }
    let n = x.len() as f32;
    let sum_x: f32 = x.iter().sum();
    let level = |v: f32, iscale: f32, off: f32| nearest_int(iscale * (v - off)).clamp(0, nmax);
    let err_of = |s: f32, b: f32, iscale: f32, off: f32| -> f32 {
        x.iter()
            .map(|&v| {
                let e = s * level(v, iscale, off) as f32 + b - v;
                e * e
            })
            .sum()
    };
    // Plain min/max spacing as the fallback.
    let s0 = (hi - lo) / nmax as f32;
    let mut best = (err_of(s0, lo, 1.0 / s0, lo), s0, lo);
    for k in 0..=20 {
        let iscale = (nmax as f32 - 1.0 + 0.1 * k as f32) / (hi - lo);
        let (mut sl, mut sl2, mut slx) = (0f32, 0f32, 0f32);
        for &v in x {
            let l = level(v, iscale, lo) as f32;
            sl += l;
            sl2 += l * l;
            slx += l * v;
        }
        let det = n * sl2 - sl * sl;
        if det <= 0.0 {
            continue;
        }
        let mut s = (n * slx - sl * sum_x) / det;
        let mut b = (sl2 * sum_x - sl * slx) / det;
        if b > 0.0 {
            b = 0.0;
            s = slx / sl2;
        }
        if !(s > 0.0) {
            continue;
        }
        // Levels as they will be recomputed from (s, b) when packing.
        let err = err_of(s, b, 1.0 / s, b);
        if err < best.0 {
            best = (err, s, b);
        }
    }
    (best.1, -best.2)
}

/// Least-squares fit `x ≈ scale * l` with levels `l` in `-nmax..nmax` (one more negative
/// level than positive). The largest-magnitude value goes to the `-nmax` end, so `scale`
/// carries that value's opposite sign.
pub(crate) fn fit_scale_sym(x: &[f32], nmax: i32) -> f32 {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if !(amax > 0.0) || !amax.is_finite() {
        return 0.0;
    }
    let mut best = (f32::NEG_INFINITY, 0f32);
    for k in -9..=9 {
        let iscale = -(nmax as f32 + 0.1 * k as f32) / max;
        let (mut sl2, mut slx) = (0f32, 0f32);
        for &v in x {
            let l = nearest_int(iscale * v).clamp(-nmax, nmax - 1) as f32;
            sl2 += l * l;
            slx += l * v;
        }
        if sl2 > 0.0 {
            // Squared error at the optimal scale is sum(x^2) - slx^2 / sl2.
            let gain = slx * slx / sl2;
            if gain > best.0 {
                best = (gain, slx / sl2);
            }
        }
    }
    best.1
}

/// Quantizes a super-block to per-sub-block unsigned (scale, min) codes in `0..=smax`,
/// super-block `d` and `dmin` (already rounded to f16), and levels `0..=nmax`.
pub(crate) struct AsymBlock<const NSUB: usize> {
    pub d: f32,
    pub dmin: f32,
    pub sc: [u8; NSUB],
    pub mn: [u8; NSUB],
    pub q: [u8; QK_K],
}

pub(crate) fn quantize_asym<const NSUB: usize>(
    x: &[f32; QK_K],
    nmax: i32,
    smax: i32,
) -> AsymBlock<NSUB> {
    let sub = QK_K / NSUB;
    let mut scales = [0f32; NSUB];
    let mut mins = [0f32; NSUB];
    for j in 0..NSUB {
        (scales[j], mins[j]) = fit_scale_min(&x[j * sub..(j + 1) * sub], nmax);
    }
    let max_s = scales.iter().fold(0f32, |a, &v| a.max(v));
    let max_m = mins.iter().fold(0f32, |a, &v| a.max(v));
    let code = |v: f32, max: f32| {
        if max > 0.0 {
            nearest_int(v * smax as f32 / max).clamp(0, smax) as u8
        } else {
            0
        }
    };
    let mut out = AsymBlock {
        d: f16r(max_s / smax as f32),
        dmin: f16r(max_m / smax as f32),
        sc: [0; NSUB],
        mn: [0; NSUB],
        q: [0; QK_K],
    };
    for j in 0..NSUB {
        out.sc[j] = code(scales[j], max_s);
        out.mn[j] = code(mins[j], max_m);
    }
    let levels = |d: f32, dmin: f32, q: &mut [u8; QK_K]| {
        // Levels against the scales as they will be decoded; returns the squared error.
        let mut err = 0f32;
        for (i, (qi, &xi)) in q.iter_mut().zip(x).enumerate() {
            let j = i / sub;
            let de = d * out.sc[j] as f32;
            let dm = dmin * out.mn[j] as f32;
            *qi = if de > 0.0 {
                nearest_int((xi + dm) / de).clamp(0, nmax) as u8
            } else {
                0
            };
            let e = de * *qi as f32 - dm - xi;
            err += e * e;
        }
        err
    };
    let mut q = [0u8; QK_K];
    let mut err = levels(out.d, out.dmin, &mut q);
    // Refit d and dmin by least squares for the chosen codes and levels, keeping the result
    // only while it lowers the error: the codes were rounded from per-sub-block fits.
    for _ in 0..2 {
        let (mut aa, mut ab, mut bb, mut xa, mut xb) = (0f32, 0f32, 0f32, 0f32, 0f32);
        for (i, (&qi, &xi)) in q.iter().zip(x).enumerate() {
            let a = out.sc[i / sub] as f32 * qi as f32;
            let b = -(out.mn[i / sub] as f32);
            aa += a * a;
            ab += a * b;
            bb += b * b;
            xa += xi * a;
            xb += xi * b;
        }
        let det = aa * bb - ab * ab;
        if !(det > 0.0) {
            break;
        }
        let d = f16r((xa * bb - xb * ab) / det);
        let dmin = f16r((aa * xb - ab * xa) / det);
        if !(d > 0.0 && dmin >= 0.0) {
            break;
        }
        let mut q2 = [0u8; QK_K];
        let e2 = levels(d, dmin, &mut q2);
        if !(e2 < err) {
            break;
        }
        (out.d, out.dmin, q, err) = (d, dmin, q2, e2);
    }
    out.q = q;
    out
}

/// Quantizes a super-block of 16 sub-blocks of 16 to signed scale codes in
/// `-(smax+1)..=smax`, super-block `d` (rounded to f16) and levels `-nmax..nmax`.
pub(crate) struct SymBlock {
    pub d: f32,
    pub sc: [i8; 16],
    pub q: [i8; QK_K],
}

pub(crate) fn quantize_sym(x: &[f32; QK_K], nmax: i32, smax: i32) -> SymBlock {
    let mut scales = [0f32; 16];
    for j in 0..16 {
        scales[j] = fit_scale_sym(&x[j * 16..(j + 1) * 16], nmax);
    }
    let mut max_s = 0f32;
    for &s in &scales {
        if s.abs() > max_s.abs() {
            max_s = s;
        }
    }
    let mut out = SymBlock {
        d: 0.0,
        sc: [0; 16],
        q: [0; QK_K],
    };
    if max_s == 0.0 {
        return out;
    }
    // The largest scale goes to the code -(smax+1), using the full signed range.
    let iscale = -(smax as f32 + 1.0) / max_s;
    out.d = f16r(1.0 / iscale);
    for j in 0..16 {
        out.sc[j] = nearest_int(iscale * scales[j]).clamp(-smax - 1, smax) as i8;
    }
    let sc = out.sc;
    let levels = |d: f32, q: &mut [i8; QK_K]| {
        let mut err = 0f32;
        for (i, (qi, &xi)) in q.iter_mut().zip(x).enumerate() {
            let de = d * sc[i / 16] as f32;
            *qi = if de != 0.0 {
                nearest_int(xi / de).clamp(-nmax, nmax - 1) as i8
            } else {
                0
            };
            let e = de * *qi as f32 - xi;
            err += e * e;
        }
        err
    };
    let mut q = [0i8; QK_K];
    let mut err = levels(out.d, &mut q);
    // Least-squares refit of d for the chosen codes and levels, kept while it helps.
    for _ in 0..2 {
        let (mut aa, mut xa) = (0f32, 0f32);
        for (i, (&qi, &xi)) in q.iter().zip(x).enumerate() {
            let a = sc[i / 16] as f32 * qi as f32;
            aa += a * a;
            xa += xi * a;
        }
        if !(aa > 0.0) {
            break;
        }
        let d = f16r(xa / aa);
        let mut q2 = [0i8; QK_K];
        let e2 = levels(d, &mut q2);
        if !(e2 < err) {
            break;
        }
        (out.d, q, err) = (d, q2, e2);
    }
    out.q = q;
    out
}

/// Rounds through f16, as the value will be stored.
#[inline]
pub(crate) fn f16r(v: f32) -> f32 {
    half::f16::from_f32(v).to_f32()
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
