//! Kernels of block attention (`crate::flash`): the small f32 products on 8 and 16 lanes, the
//! column-wise online softmax, and the widening of cached rows to f32.

use super::avx2::exp8;
use super::avx2_kv::Chunks;
use std::arch::x86_64::*;

/// `c[i·ldc + j] += Σ_p a[i·ars + p·acs] · b[p·ldb + j]` for `i < m`, `j < n`, `p < k`: each `a`
/// value broadcast against `b` rows held in registers, `MR` rows by `NV` vectors of `c` per tile.
///
/// # Safety
/// The CPU supports AVX2 and FMA; `n` is a multiple of 8 and every index above is in bounds.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm8(
    (m, n, k): (usize, usize, usize),
    a: *const f32,
    (ars, acs): (usize, usize),
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
) {
    let mut j = 0;
    while j < n {
        let (a, b, c) = (a, b.add(j), c.add(j));
        if n - j >= 16 {
            panel8::<2>(m, k, a, (ars, acs), b, ldb, c, ldc);
            j += 16;
        } else {
            panel8::<1>(m, k, a, (ars, acs), b, ldb, c, ldc);
            j += 8;
        }
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn panel8<const NV: usize>(
    m: usize,
    k: usize,
    a: *const f32,
    (ars, acs): (usize, usize),
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
) {
    let mut i = 0;
    while i + 6 <= m {
        tile8::<6, NV>(k, a.add(i * ars), (ars, acs), b, ldb, c.add(i * ldc), ldc);
        i += 6;
    }
    while i < m {
        tile8::<1, NV>(k, a.add(i * ars), (ars, acs), b, ldb, c.add(i * ldc), ldc);
        i += 1;
    }
}

#[inline(always)]
unsafe fn tile8<const MR: usize, const NV: usize>(
    k: usize,
    a: *const f32,
    (ars, acs): (usize, usize),
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
) {
    let mut acc = [[_mm256_setzero_ps(); NV]; MR];
    for p in 0..k {
        let mut bv = [_mm256_setzero_ps(); NV];
        for (v, x) in bv.iter_mut().enumerate() {
            *x = _mm256_loadu_ps(b.add(p * ldb + 8 * v));
        }
        for (i, row) in acc.iter_mut().enumerate() {
            let av = _mm256_broadcast_ss(&*a.add(i * ars + p * acs));
            for v in 0..NV {
                row[v] = _mm256_fmadd_ps(av, bv[v], row[v]);
            }
        }
    }
    for (i, row) in acc.iter().enumerate() {
        for (v, x) in row.iter().enumerate() {
            let at = c.add(i * ldc + 8 * v);
            _mm256_storeu_ps(at, _mm256_add_ps(_mm256_loadu_ps(at), *x));
        }
    }
}

/// [`gemm8`] on 16 lanes: tiles of 6 rows by up to four vectors (24 accumulators of 32).
///
/// # Safety
/// The CPU supports AVX-512 F; `n` is a multiple of 16 and every index is in bounds.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm16(
    (m, n, k): (usize, usize, usize),
    a: *const f32,
    (ars, acs): (usize, usize),
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
) {
    let mut j = 0;
    while j < n {
        let (b, c) = (b.add(j), c.add(j));
        let s = (a, (ars, acs), b, ldb, c, ldc);
        match ((n - j) / 16).min(4) {
            4 => panel16::<4>(m, k, s),
            3 => panel16::<3>(m, k, s),
            2 => panel16::<2>(m, k, s),
            _ => panel16::<1>(m, k, s),
        }
        j += 16 * ((n - j) / 16).min(4);
    }
}

type Operands = (
    *const f32,
    (usize, usize),
    *const f32,
    usize,
    *mut f32,
    usize,
);

#[inline(always)]
unsafe fn panel16<const NV: usize>(m: usize, k: usize, (a, st, b, ldb, c, ldc): Operands) {
    let mut i = 0;
    while i + 6 <= m {
        tile16::<6, NV>(k, a.add(i * st.0), st, b, ldb, c.add(i * ldc), ldc);
        i += 6;
    }
    if i + 4 <= m {
        tile16::<4, NV>(k, a.add(i * st.0), st, b, ldb, c.add(i * ldc), ldc);
        i += 4;
    }
    while i < m {
        tile16::<1, NV>(k, a.add(i * st.0), st, b, ldb, c.add(i * ldc), ldc);
        i += 1;
    }
}

#[inline(always)]
unsafe fn tile16<const MR: usize, const NV: usize>(
    k: usize,
    a: *const f32,
    (ars, acs): (usize, usize),
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
) {
    let mut acc = [[_mm512_setzero_ps(); NV]; MR];
    for p in 0..k {
        let mut bv = [_mm512_setzero_ps(); NV];
        for (v, x) in bv.iter_mut().enumerate() {
            *x = _mm512_loadu_ps(b.add(p * ldb + 16 * v));
        }
        for (i, row) in acc.iter_mut().enumerate() {
            let av = _mm512_set1_ps(*a.add(i * ars + p * acs));
            for v in 0..NV {
                row[v] = _mm512_fmadd_ps(av, bv[v], row[v]);
            }
        }
    }
    for (i, row) in acc.iter().enumerate() {
        for (v, x) in row.iter().enumerate() {
            let at = c.add(i * ldc + 16 * v);
            _mm512_storeu_ps(at, _mm512_add_ps(_mm512_loadu_ps(at), *x));
        }
    }
}

/// One key block of the online softmax, eight query columns at a time (see
/// `crate::flash::softmax_scalar`, which this matches): `s` (rows of `rp` scores) becomes the
/// weights against the new running maxima `m` (scores equal to `masked` exactly 0), `l` the rescaled sums, `alpha` each column's
/// rescale factor. Returns whether any factor differs from 1.
///
/// # Safety
/// The CPU supports AVX2 and FMA; `rp` is a multiple of 8, `s` whole rows of `rp`, and `m`, `l`,
/// `alpha` hold `rp` values.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn softmax(
    masked: f32,
    s: &mut [f32],
    rp: usize,
    m: &mut [f32],
    l: &mut [f32],
    alpha: &mut [f32],
) -> bool {
    let rows = s.len() / rp;
    let sp = s.as_mut_ptr();
    let one = _mm256_set1_ps(1.0);
    let mut changed = false;
    for c in (0..rp).step_by(8) {
        let old = _mm256_loadu_ps(m.as_ptr().add(c));
        let mut max = old;
        for j in 0..rows {
            max = _mm256_max_ps(max, _mm256_loadu_ps(sp.add(j * rp + c)));
        }
        let a = exp8(_mm256_sub_ps(old, max));
        changed |= _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_NEQ_OQ>(a, one)) != 0;
        let mut sum = _mm256_setzero_ps();
        for j in 0..rows {
            let at = sp.add(j * rp + c);
            let x = _mm256_loadu_ps(at);
            let masked = _mm256_cmp_ps::<_CMP_EQ_OQ>(x, _mm256_set1_ps(masked));
            let e = _mm256_andnot_ps(masked, exp8(_mm256_sub_ps(x, max)));
            _mm256_storeu_ps(at, e);
            sum = _mm256_add_ps(sum, e);
        }
        _mm256_storeu_ps(m.as_mut_ptr().add(c), max);
        _mm256_storeu_ps(alpha.as_mut_ptr().add(c), a);
        let lc = l.as_mut_ptr().add(c);
        _mm256_storeu_ps(lc, _mm256_fmadd_ps(_mm256_loadu_ps(lc), a, sum));
    }
    changed
}

/// Every row of `o` (rows of `rp` columns) times `alpha` column-wise.
///
/// # Safety
/// The CPU supports AVX2; `rp` is a multiple of 8 and `alpha` holds `rp` values.
#[target_feature(enable = "avx2")]
pub unsafe fn rescale(o: &mut [f32], rp: usize, alpha: &[f32]) {
    for row in o.chunks_exact_mut(rp) {
        for c in (0..rp).step_by(8) {
            let at = row.as_mut_ptr().add(c);
            let a = _mm256_loadu_ps(alpha.as_ptr().add(c));
            _mm256_storeu_ps(at, _mm256_mul_ps(_mm256_loadu_ps(at), a));
        }
    }
}

/// `dst[i] = f16 src[i]` as f32.
///
/// # Safety
/// The CPU supports AVX2 and F16C; `src` holds `dst.len()` values.
#[target_feature(enable = "avx2,f16c")]
pub unsafe fn widen_f16(src: *const u16, dst: &mut [f32]) {
    let n = dst.len();
    let mut i = 0;
    while i + 8 <= n {
        let h = _mm_loadu_si128(src.add(i).cast());
        _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
        i += 8;
    }
    for (j, d) in dst.iter_mut().enumerate().skip(i) {
        *d = crate::attention::f16(*src.add(j));
    }
}

/// `dst` = the `dst.len() / 32` quantized blocks at `src`, dequantized.
///
/// # Safety
/// The CPU supports AVX2, FMA and F16C; `dst.len()` is a multiple of 32 and `src` holds that
/// many values' blocks.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn widen_blocks<B: Chunks>(src: *const B, dst: &mut [f32]) {
    for (i, out) in dst.chunks_exact_mut(32).enumerate() {
        let b = src.add(i);
        let d = B::scale(b);
        for c in 0..4 {
            _mm256_storeu_ps(
                out.as_mut_ptr().add(8 * c),
                _mm256_mul_ps(B::chunk(b, c), d),
            );
        }
    }
}
